"""CrossLayerTranscoder (CLT): features that read one layer and write to that layer's MLP output and every later one.

    pre_s   = (x_s * s_in[s]) @ W_enc[s] + b_enc[s]                 [..., n]   x_s: raw input of layer s
    a_s     = act(pre_s)                                             relu | topk (per layer) | jumprelu
    y_m     = (b_dec[m] + Σ_{s<=m} a_s @ W_dec[s][:, m - s] (+ x_m s_in[m] @ W_skip[m].T)) / s_out[m]

Why: a per-layer transcoder must re-derive a feature in every MLP it passes through (long, amplifying
paths in attribution graphs); a CLT feature writes once to every later MLP output ("cross-layer
superposition", Ameisen et al. 2025). Shapes follow circuit-tracer's files: W_dec[s] is
[n_features, n_layers - s, d_out], so W_dec[s][:, j] is what layer s's features write to layer s + j.
W_enc is [n_layers, d_in, n] (our orientation: x @ W_enc). Scales (s_in, s_out per layer) keep
training scale-free and are folded into the weights when training ends (`fold_scales`).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import nn

from mechscope.config_io import from_dict
from mechscope.errors import CorruptFileError, InputError
from mechscope.sae.coder import _JumpReLU, _Step, _topk_dense

CLT_ARCHS = ("relu", "topk", "jumprelu")
CLT_CONFIG, CLT_WEIGHTS = "clt.json", "clt.safetensors"


@dataclass
class CLTConfig:
    """One CLT: sizes, nonlinearity, losses, hooks and provenance (the JSON on disk)."""

    n_layers: int
    d_in: int
    n_features: int  # per layer
    d_out: int | None = None  # None: d_in
    arch: Literal["relu", "topk", "jumprelu"] = "topk"
    k: int | None = None  # topk: active features per token AND per layer
    skip: bool = False  # + a linear skip path per layer (x_m -> y_m)
    l1_coeff: float = 0.0  # relu: decoder-norm-weighted L1
    l0_coeff: float = 0.0  # jumprelu: L0 through the straight-through estimator
    jumprelu_bandwidth: float = 0.05
    jumprelu_init_threshold: float = 0.05
    input_hooks: list[str] = field(default_factory=list)
    output_hooks: list[str] = field(default_factory=list)
    model_name: str | None = None
    model_identity: dict[str, Any] | None = None
    input_scales: list[float] | None = None  # per layer; None: all 1 (raw activations)
    output_scales: list[float] | None = None
    dtype: str = "float32"
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.arch not in CLT_ARCHS:
            raise InputError(f"Unknown CLT architecture {self.arch!r}; choose one of {', '.join(CLT_ARCHS)}.")
        if min(self.n_layers, self.d_in, self.n_features, self.out_dim) <= 0:
            raise InputError("n_layers, d_in, n_features and d_out must be positive.")
        if self.arch == "topk" and (self.k is None or not 0 < self.k <= self.n_features):
            raise InputError(f"topk needs 0 < k <= n_features ({self.n_features}); got k={self.k}.")
        for name in ("input_hooks", "output_hooks"):
            hooks = getattr(self, name)
            if hooks and len(hooks) != self.n_layers:
                raise InputError(f"{name} has {len(hooks)} entries for {self.n_layers} layers.")
        for name in ("input_scales", "output_scales"):
            s = getattr(self, name)
            if s is not None and (len(s) != self.n_layers or any(not v > 0 for v in s)):
                raise InputError(f"{name} must hold {self.n_layers} positive numbers, got {s}.")

    @property
    def out_dim(self) -> int:
        return self.d_out if self.d_out is not None else self.d_in

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> CLTConfig:
        return from_dict(cls, d)


class CrossLayerTranscoder(nn.Module):
    def __init__(self, cfg: CLTConfig, *, device=None, dtype: torch.dtype | None = None) -> None:
        super().__init__()
        self.cfg = cfg
        kw = {"device": device, "dtype": dtype or getattr(torch, cfg.dtype)}
        L, d_in, n, d_out = cfg.n_layers, cfg.d_in, cfg.n_features, cfg.out_dim
        self.W_enc = nn.Parameter(torch.zeros(L, d_in, n, **kw))
        self.b_enc = nn.Parameter(torch.zeros(L, n, **kw))
        self.W_dec = nn.ParameterList([nn.Parameter(torch.zeros(n, L - s, d_out, **kw)) for s in range(L)])
        self.b_dec = nn.Parameter(torch.zeros(L, d_out, **kw))
        if cfg.arch == "jumprelu":
            self.log_threshold = nn.Parameter(torch.full((L, n), float(cfg.jumprelu_init_threshold), **kw).log())
        if cfg.skip:
            self.W_skip = nn.Parameter(torch.zeros(L, d_out, d_in, **kw))

    def init_weights(self, seed: int = 0) -> CrossLayerTranscoder:
        """Random unit-norm encoder columns; decoders random with total norm 1 per feature, zero biases."""
        g = torch.Generator().manual_seed(seed)
        c = self.cfg
        with torch.no_grad():
            enc = torch.randn(c.n_layers, c.d_in, c.n_features, generator=g)
            self.W_enc.copy_(enc / enc.norm(dim=1, keepdim=True))
            for s, w in enumerate(self.W_dec):
                r = torch.randn(c.n_features, c.n_layers - s, c.out_dim, generator=g)
                w.copy_(r / r.flatten(1).norm(dim=1)[:, None, None])
            self.b_enc.zero_()
            self.b_dec.zero_()
            if c.skip:
                self.W_skip.zero_()
        return self

    # ------------------------------------------------------------------ scales
    def input_scale(self, layer: int) -> float:
        return self.cfg.input_scales[layer] if self.cfg.input_scales else 1.0

    def output_scale(self, layer: int) -> float:
        return self.cfg.output_scales[layer] if self.cfg.output_scales else 1.0

    @torch.no_grad()
    def fold_scales(self) -> CrossLayerTranscoder:
        """Fold per-layer input/output scales into the weights (the CLT then takes raw activations)."""
        c = self.cfg
        if c.input_scales is None and c.output_scales is None:
            return self
        s_in = torch.tensor(c.input_scales or [1.0] * c.n_layers, dtype=self.W_enc.dtype, device=self.W_enc.device)
        s_out = torch.tensor(c.output_scales or [1.0] * c.n_layers, dtype=self.W_enc.dtype,
                             device=self.W_enc.device)
        self.W_enc.mul_(s_in[:, None, None])
        for s, w in enumerate(self.W_dec):
            w.div_(s_out[s:][None, :, None])
        self.b_dec.div_(s_out[:, None])
        if c.skip:
            self.W_skip.mul_((s_in / s_out)[:, None, None])
        c.input_scales = c.output_scales = None
        return self

    # ------------------------------------------------------------------ inference
    @property
    def has_skip(self) -> bool:
        return self.cfg.skip

    def _check(self, x: torch.Tensor, layer: int) -> None:
        if not 0 <= layer < self.cfg.n_layers:
            raise InputError(f"layer {layer} out of range 0..{self.cfg.n_layers - 1}.")
        if x.shape[-1] != self.cfg.d_in:
            raise InputError(f"input has last dimension {x.shape[-1]}, this CLT expects d_in={self.cfg.d_in}.")

    def pre_acts(self, layer: int, x: torch.Tensor) -> torch.Tensor:
        """x [..., d_in] raw input of `layer` -> [..., n] pre-activations."""
        self._check(x, layer)
        x = x.to(self.W_enc.dtype) * self.input_scale(layer)
        return x @ self.W_enc[layer] + self.b_enc[layer]

    def activation(self, layer: int, pre: torch.Tensor) -> torch.Tensor:
        a = self.cfg.arch
        if a == "relu":
            return F.relu(pre)
        if a == "topk":
            return _topk_dense(F.relu(pre), self.cfg.k)  # type: ignore[arg-type]
        return pre * (pre > self.log_threshold[layer].exp())

    def encode(self, layer: int, x: torch.Tensor) -> torch.Tensor:
        """x [..., d_in] -> feature activations [..., n] of `layer` (dense)."""
        return self.activation(layer, self.pre_acts(layer, x))

    def encoder(self, layer: int) -> torch.Tensor:
        """[d_in, n] the linear read directions of `layer`'s features on raw input."""
        s = self.input_scale(layer)
        return self.W_enc[layer] * s if s != 1.0 else self.W_enc[layer]

    def decoder(self, src: int, dst: int) -> torch.Tensor | None:
        """[n, d_out] what layer src's features write to layer dst's output (raw units); None if dst < src."""
        if dst < src:
            return None
        w = self.W_dec[src][:, dst - src]
        s = self.output_scale(dst)
        return w / s if s != 1.0 else w

    def bias(self, layer: int) -> torch.Tensor:
        s = self.output_scale(layer)
        return self.b_dec[layer] / s if s != 1.0 else self.b_dec[layer]

    def skip_out(self, layer: int, x: torch.Tensor) -> torch.Tensor | None:
        if not self.cfg.skip:
            return None
        self._check(x, layer)
        return (x.to(self.W_skip.dtype) * self.input_scale(layer)) @ self.W_skip[layer].T / self.output_scale(layer)

    def reconstruct(self, xs: list[torch.Tensor]) -> list[torch.Tensor]:
        """xs: per layer [..., d_in] raw inputs -> per layer [..., d_out] predicted outputs (raw units)."""
        acts = [self.encode(s, x) for s, x in enumerate(xs)]
        outs = self._decode_scaled(acts, xs)
        return [o / self.output_scale(m) for m, o in enumerate(outs)]

    def _decode_scaled(self, acts: list[torch.Tensor], xs: list[torch.Tensor]) -> list[torch.Tensor]:
        """Outputs in the scaled (training) units: b_dec[m] + Σ_s a_s @ W_dec[s][:, m - s] (+ skip)."""
        L, d = self.cfg.n_layers, self.cfg.out_dim
        outs = [self.b_dec[m].expand(*acts[0].shape[:-1], d) for m in range(L)]
        for s in range(L):
            w = self.W_dec[s]  # [n, L - s, d]
            y = (acts[s].to(w.dtype) @ w.flatten(1)).unflatten(-1, (L - s, d))  # [..., L - s, d]
            for j in range(L - s):  # over layers (not tokens or features)
                outs[s + j] = outs[s + j] + y[..., j, :]
        if self.cfg.skip:
            outs = [o + (xs[m].to(self.W_skip.dtype) * self.input_scale(m)) @ self.W_skip[m].T for m, o in enumerate(outs)]
        return outs

    # ------------------------------------------------------------------ training
    def loss(self, xs: list[torch.Tensor], ys: list[torch.Tensor], *, sparsity_scale: float = 1.0):
        """Training forward on per-layer batches xs [B, d_in], ys [B, d_out] (raw units).

        Returns (loss, outs in raw units, acts per layer, pre per layer, parts). recon_loss is the mean over
        layers of each layer's FVU (scale-free; every layer's MLP output counts the same)."""
        c = self.cfg
        pres = [self.pre_acts(s, x) for s, x in enumerate(xs)]  # L x [B, n]
        parts: dict[str, torch.Tensor] = {}
        if c.arch == "jumprelu":
            ts = self.log_threshold.exp()  # [L, n]
            acts = [_JumpReLU.apply(p, ts[s], c.jumprelu_bandwidth) for s, p in enumerate(pres)]
            l0 = torch.stack([_Step.apply(p, ts[s], c.jumprelu_bandwidth).sum(-1).mean()
                              for s, p in enumerate(pres)]).sum()
            parts["l0_loss"] = sparsity_scale * c.l0_coeff * l0 / c.n_layers
        else:
            acts = [self.activation(s, p) for s, p in enumerate(pres)]
        outs = self._decode_scaled(acts, xs)
        fvus = []
        for m, (o, y) in enumerate(zip(outs, ys, strict=True)):
            y_s = y.to(o.dtype) * self.output_scale(m)
            denom = (y_s - y_s.mean(0)).pow(2).sum().clamp_min(1e-12)
            fvus.append((o - y_s).pow(2).sum() / denom)
        parts["recon_loss"] = torch.stack(fvus).mean()
        if c.arch == "relu":
            norms = [w.flatten(1).norm(dim=1) for w in self.W_dec]  # [n] per source layer
            parts["l1_loss"] = sparsity_scale * c.l1_coeff * torch.stack(
                [(a * nrm).sum(-1).mean() for a, nrm in zip(acts, norms, strict=True)]).sum() / c.n_layers
        loss = sum(v for k, v in parts.items() if k.endswith("_loss"))
        raw = [o / self.output_scale(m) for m, o in enumerate(outs)]
        return loss, raw, acts, pres, {k: v.detach() for k, v in parts.items()} | {
            "fvu_per_layer": torch.stack(fvus).detach()}

    def auxk_loss(self, pres: list[torch.Tensor], residuals: list[torch.Tensor], dead: torch.Tensor,
                  k_aux: int) -> torch.Tensor:
        """AuxK (Gao et al. 2024) for a CLT: per token, each layer's top-k_aux DEAD features (by pre-activation)
        decode through their cross-layer decoders, and together must explain every output layer's residual error.

        pres: L x [B, n] pre-activations (training units, as `loss` returns them); residuals: L x [B, d_out],
        y - ŷ in the scaled (training) units, detached; dead [L, n] bool. Returns the mean over the output layers
        the dead features reach of ‖e_m - ê_m‖² / ‖e_m - ē_m‖² (the recon loss's per-layer FVU), times
        min(n_dead / (L k_aux), 1) so a handful of dead features is not over-weighted (the SAE rule, per layer).
        Why: a dead feature gets no gradient from the main loss; this one pulls it towards what is unexplained."""
        L, d = self.cfg.n_layers, self.cfg.out_dim
        n_dead = dead.sum(1).tolist()  # [L] (one sync)
        total = sum(n_dead)
        if total == 0:
            return pres[0].new_zeros(())
        e_hat: list[torch.Tensor | None] = [None] * L
        for s in range(L):  # over layers (not tokens or features)
            if n_dead[s] == 0:
                continue
            masked = torch.where(dead[s], pres[s], torch.full_like(pres[s], -torch.inf))  # [B, n]
            vals, idx = masked.topk(min(k_aux, n_dead[s]), dim=-1, sorted=False)  # [B, k]
            w = self.W_dec[s].flatten(1)  # [n, (L - s) d]
            y = F.embedding_bag(idx, w, per_sample_weights=F.relu(vals).to(w.dtype), mode="sum")  # [B, (L - s) d]
            y = y.unflatten(-1, (L - s, d))  # [B, L - s, d]
            for j in range(L - s):
                e_hat[s + j] = y[:, j] if e_hat[s + j] is None else e_hat[s + j] + y[:, j]
        terms = [(eh - r).pow(2).sum() / (r - r.mean(0)).pow(2).sum().clamp_min(1e-12)
                 for eh, r in zip(e_hat, residuals, strict=True) if eh is not None]
        return min(total / (L * k_aux), 1.0) * torch.stack(terms).mean()

    # ------------------------------------------------------------------ files (our own; circuit-tracer's in sae.io)
    def tensors(self) -> dict[str, torch.Tensor]:
        """Flat name -> tensor (W_dec.{s} for the per-source decoders)."""
        return {k: v.detach() for k, v in self.state_dict().items()}

    def save(self, folder: str | Path) -> Path:
        """clt.json + clt.safetensors (scales folded on a copy: the files take raw activations)."""
        import copy

        from mechscope.fileio import atomic_write_bytes, atomic_write_json
        from mechscope.sae.io.common import safetensors_bytes

        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        clt = copy.deepcopy(self).fold_scales() if (self.cfg.input_scales or self.cfg.output_scales) else self
        atomic_write_bytes(folder / CLT_WEIGHTS, safetensors_bytes(clt.tensors(), {"format": "pt"}))
        atomic_write_json(folder / CLT_CONFIG, clt.cfg.to_dict())
        return folder

    @classmethod
    def load(cls, folder: str | Path, *, device=None, dtype=None) -> CrossLayerTranscoder:
        from mechscope.sae.io.common import read_json, read_safetensors

        folder = Path(folder)
        try:
            cfg = CLTConfig.from_dict(read_json(folder / CLT_CONFIG))
        except (TypeError, ValueError, KeyError) as e:
            raise CorruptFileError(f"{folder}/{CLT_CONFIG} is not a valid CLT config ({e}).") from e
        return cls.from_tensors(cfg, read_safetensors(folder / CLT_WEIGHTS), device=device, dtype=dtype,
                                where=folder)

    @classmethod
    def from_tensors(cls, cfg: CLTConfig, tensors: dict[str, torch.Tensor], *, device=None, dtype=None,
                     where: Any = "") -> CrossLayerTranscoder:
        """Build from a flat state dict, checking every name and shape first (CorruptFileError naming it)."""
        if dtype is None:
            dtype = next(iter(tensors.values())).dtype if tensors else torch.float32
        cfg = dataclasses.replace(cfg, dtype=str(dtype).removeprefix("torch."))
        clt = cls(cfg, device="meta")
        want = {k: tuple(v.shape) for k, v in clt.state_dict().items()}
        missing, extra = set(want) - set(tensors), set(tensors) - set(want)
        if missing or extra:
            raise CorruptFileError(f"{where}: CLT tensors do not match its config (missing {sorted(missing)[:5]}, "
                                   f"unexpected {sorted(extra)[:5]}).")
        for k, shape in want.items():
            if tuple(tensors[k].shape) != shape:
                raise CorruptFileError(f"{where}: {k} has shape {tuple(tensors[k].shape)}, expected {shape}.")
        if not all(bool(torch.isfinite(t).all()) for t in tensors.values() if t.is_floating_point()):
            raise CorruptFileError(f"{where}: the CLT weights hold NaN or inf.")
        out = cls(cfg, device=device, dtype=dtype)
        out.load_state_dict({k: v.to(dtype) for k, v in tensors.items()})
        return out

    def __repr__(self) -> str:
        c = self.cfg
        return (f"CrossLayerTranscoder({c.arch}{'' if c.k is None else f' k={c.k}'}, {c.n_layers} layers x "
                f"{c.n_features} features, d_in {c.d_in} -> d_out {c.out_dim}{', skip' if c.skip else ''})")


def n_decoder_parameters(n_layers: int, n_features: int, d_out: int) -> int:
    """Decoder size of a CLT: n * d * L (L + 1) / 2 (grows with the square of the layer count)."""
    return n_features * d_out * n_layers * (n_layers + 1) // 2


__all__ = ["CLT_ARCHS", "CLTConfig", "CrossLayerTranscoder", "n_decoder_parameters"]
