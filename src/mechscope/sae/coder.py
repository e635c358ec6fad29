"""SparseCoder: every SAE / transcoder architecture behind one interface.

    pre  = (x * s_in - b_dec?) @ W_enc + b_enc         [..., n_latents]   (b_dec only for autoencoders)
    f    = act(pre)                                     relu | topk | batchtopk | jumprelu | gated
    out  = (f @ W_dec + b_dec (+ x * s_in @ W_skip.T)) / s_out          [..., d_out]

`encode`/`decode`/`forward` are the inference rules and take RAW activations (the input and
output scales are applied here and folded into the weights on save). `loss` is the training
rule (batch-level top-k, straight-through estimators, nested prefixes) and returns the losses
the trainer adds up. Shapes: d_in -> n_latents -> d_out; W_enc [d_in, n], W_dec [n, d_out]
(SAELens orientation).
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from mechscope.errors import InputError, NonFiniteError
from mechscope.sae import distributed
from mechscope.sae.config import SAEConfig


class CoderOutput(NamedTuple):
    """What a forward pass gives."""

    out: torch.Tensor  # [..., d_out] reconstruction (autoencoder) or prediction (transcoder)
    acts: torch.Tensor  # [..., n_latents] latent activations (dense; mostly zeros)
    pre: torch.Tensor  # [..., n_latents] pre-activations (for AuxK and diagnostics)


class LossOutput(NamedTuple):
    """Training losses; `loss` is what to backpropagate, `parts` names each term (detached)."""

    loss: torch.Tensor  # scalar
    out: torch.Tensor  # [B, d_out]
    acts: torch.Tensor  # [B, n_latents]
    pre: torch.Tensor  # [B, n_latents]
    parts: dict[str, torch.Tensor]


# ---------------------------------------------------------------------------- JumpReLU STE


def _rect(u: torch.Tensor) -> torch.Tensor:
    return ((u > -0.5) & (u < 0.5)).to(u.dtype)


class _JumpReLU(torch.autograd.Function):
    """z * H(z - t); d/dt through a rectangle kernel of width eps (Rajamanoharan et al. 2024)."""

    @staticmethod
    def forward(ctx, z, t, eps):
        ctx.save_for_backward(z, t)
        ctx.eps = eps
        return z * (z > t).to(z.dtype)

    @staticmethod
    def backward(ctx, g):
        z, t = ctx.saved_tensors
        dz = g * (z > t).to(g.dtype)
        dt = -(t / ctx.eps) * _rect((z - t) / ctx.eps) * g
        return dz, dt.sum_to_size(t.shape), None


class _Step(torch.autograd.Function):
    """H(z - t), the L0 count; d/dt = -K((z - t)/eps)/eps, no gradient to z."""

    @staticmethod
    def forward(ctx, z, t, eps):
        ctx.save_for_backward(z, t)
        ctx.eps = eps
        return (z > t).to(z.dtype)

    @staticmethod
    def backward(ctx, g):
        z, t = ctx.saved_tensors
        dt = -(1.0 / ctx.eps) * _rect((z - t) / ctx.eps) * g
        return torch.zeros_like(z), dt.sum_to_size(t.shape), None


# ---------------------------------------------------------------------------- the module


class SparseCoder(nn.Module):
    def __init__(self, cfg: SAEConfig, *, device=None, dtype: torch.dtype | None = None) -> None:
        super().__init__()
        self.cfg = cfg
        dtype = dtype or getattr(torch, cfg.dtype)
        kw = {"device": device, "dtype": dtype}
        n, d_in, d_out = cfg.n_latents, cfg.d_in, cfg.out_dim
        self.W_enc = nn.Parameter(torch.zeros(d_in, n, **kw))
        self.b_enc = nn.Parameter(torch.zeros(n, **kw))  # gated: the gate bias
        self.W_dec = nn.Parameter(torch.zeros(n, d_out, **kw))
        self.b_dec = nn.Parameter(torch.zeros(d_out, **kw))
        if cfg.arch == "jumprelu":
            self.log_threshold = nn.Parameter(torch.full((n,), float(cfg.jumprelu_init_threshold), **kw).log())
        if cfg.arch in ("batchtopk", "matryoshka"):
            # inference threshold, estimated during training; float32 whatever the weights' dtype
            self.register_buffer("threshold", torch.zeros(n, device=device, dtype=torch.float32))
        if cfg.arch == "gated":
            self.b_mag = nn.Parameter(torch.zeros(n, **kw))
            self.r_mag = nn.Parameter(torch.zeros(n, **kw))
        if cfg.skip:
            self.W_skip = nn.Parameter(torch.zeros(d_out, d_in, **kw))

    # ------------------------------------------------------------------ initialisation
    def init_weights(self, seed: int = 0) -> SparseCoder:
        """Unit-norm random decoder rows, encoder = decoder transpose (Gao et al. 2024), zero biases."""
        g = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            w = torch.randn(self.cfg.n_latents, self.cfg.out_dim, generator=g)
            w /= w.norm(dim=1, keepdim=True)
            self.W_dec.copy_(w)
            enc = w.T if self.cfg.out_dim == self.cfg.d_in else torch.randn(self.cfg.d_in, self.cfg.n_latents,
                                                                           generator=g) / self.cfg.d_in**0.5
            self.W_enc.copy_(enc)
            for p in (self.b_enc, self.b_dec):
                p.zero_()
            if self.cfg.skip:
                self.W_skip.zero_()
        return self

    # ------------------------------------------------------------------ properties
    @property
    def threshold_per_latent(self) -> torch.Tensor | None:  # [n] the inference threshold, if any
        if self.cfg.arch == "jumprelu":
            return self.log_threshold.exp()
        return getattr(self, "threshold", None)

    def _check(self, x: torch.Tensor, dim: int, what: str) -> None:
        if x.shape[-1] != dim:
            raise InputError(f"{what} has last dimension {x.shape[-1]}, this coder expects {dim} "
                             f"({self.cfg.arch}, hook {self.cfg.hook_in}).")

    # ------------------------------------------------------------------ inference
    def pre_acts(self, x: torch.Tensor) -> torch.Tensor:
        """[..., d_in] raw activations -> [..., n] pre-activations (gate pre-activations for gated)."""
        self._check(x, self.cfg.d_in, "input")
        x = self._scaled_in(x)
        if self.cfg.apply_b_dec_to_input:
            x = x - self.b_dec
        return x @ self.W_enc + self.b_enc

    def _scaled_in(self, x: torch.Tensor) -> torch.Tensor:
        x = x.to(self.W_enc.dtype)
        return x * self.cfg.input_scale if self.cfg.input_scale != 1.0 else x

    def activation(self, pre: torch.Tensor, x: torch.Tensor | None = None) -> torch.Tensor:
        """Inference nonlinearity: pre-acts [..., n] -> latent acts [..., n]."""
        a = self.cfg.arch
        if a == "relu":
            return F.relu(pre)
        if a == "topk":
            return _topk_dense(F.relu(pre), self.cfg.k)  # type: ignore[arg-type]
        if a in ("batchtopk", "matryoshka"):
            return F.relu(pre) * (pre > self.threshold.to(pre.dtype))
        if a == "jumprelu":
            return pre * (pre > self.log_threshold.exp())
        # gated: the gate decides which latents fire, the magnitude path how much
        assert x is not None
        return (pre > 0).to(pre.dtype) * F.relu(self._mag_pre(x))

    def _mag_pre(self, x: torch.Tensor) -> torch.Tensor:
        x = self._scaled_in(x)
        if self.cfg.apply_b_dec_to_input:
            x = x - self.b_dec
        return x @ (self.W_enc * self.r_mag.exp()) + self.b_mag

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """[..., d_in] raw activations -> [..., n_latents] latent activations."""
        return self.activation(self.pre_acts(x), x)

    def decode(self, f: torch.Tensor, x: torch.Tensor | None = None) -> torch.Tensor:
        """[..., n] latents -> [..., d_out] in the model's units. Skip-transcoders need the input x."""
        self._check(f, self.cfg.n_latents, "latent tensor")
        out = f.to(self.W_dec.dtype) @ self.W_dec + self.b_dec
        return self._finish(out, x)

    def decode_sparse(self, values: torch.Tensor, indices: torch.Tensor, x: torch.Tensor | None = None):
        """values, indices [B, k] (top-k codes) -> [B, d_out], gathering k decoder rows per token."""
        out = F.embedding_bag(indices, self.W_dec, per_sample_weights=values.to(self.W_dec.dtype), mode="sum")
        return self._finish(out + self.b_dec, x)

    def _finish(self, out: torch.Tensor, x: torch.Tensor | None) -> torch.Tensor:
        if self.cfg.skip:
            if x is None:
                raise InputError("A skip-transcoder's output needs its input: call decode(f, x).")
            out = out + self._scaled_in(x) @ self.W_skip.T
        return out / self.cfg.output_scale if self.cfg.output_scale != 1.0 else out

    def forward(self, x: torch.Tensor) -> CoderOutput:
        pre = self.pre_acts(x)
        f = self.activation(pre, x)
        return CoderOutput(self.decode(f, x), f, pre)

    # ------------------------------------------------------------------ training
    def loss(self, x: torch.Tensor, y: torch.Tensor | None = None, *, sparsity_scale: float = 1.0) -> LossOutput:
        """Training forward on a batch x [B, d_in] (target y [B, d_out] for transcoders; default x).

        Reconstruction loss is the fraction of variance unexplained, Σ‖y - ŷ‖² / Σ‖y - ȳ‖² over the
        batch (scale-free, so l1/l0 coefficients do not depend on activation norms).
        sparsity_scale multiplies l1_coeff / l0_coeff (the trainer's warm-up of the sparsity penalty).
        """
        c = self.cfg
        if x.ndim != 2:
            raise InputError(f"loss expects a batch [B, d_in], got shape {tuple(x.shape)}.")
        if not torch.isfinite(x).all():
            raise NonFiniteError("NaN or inf in the activations given to the sparse coder.")
        y = x if y is None else y
        self._check(y, c.out_dim, "target")
        y_s = y.to(self.W_dec.dtype) * c.output_scale if c.output_scale != 1.0 else y.to(self.W_dec.dtype)
        pre = self.pre_acts(x)
        parts: dict[str, torch.Tensor] = {}
        denom = distributed.batch_total_variance(y_s)  # over the global batch under torchrun

        def fvu(pred: torch.Tensor) -> torch.Tensor:
            return (pred - y_s).pow(2).sum() / denom

        if c.arch in ("relu", "topk"):
            f = F.relu(pre) if c.arch == "relu" else _topk_dense(F.relu(pre), c.k)  # type: ignore[arg-type]
        elif c.arch in ("batchtopk", "matryoshka"):
            f = _batch_topk(F.relu(pre), c.k * x.shape[0])  # type: ignore[operator]
            parts["min_active"] = _min_positive(f)
        elif c.arch == "jumprelu":
            t = self.log_threshold.exp()
            f = _JumpReLU.apply(pre, t, c.jumprelu_bandwidth)
            l0 = _Step.apply(pre, t, c.jumprelu_bandwidth).sum(-1).mean()
            parts["l0_loss"] = sparsity_scale * c.l0_coeff * l0
        else:  # gated
            mag = F.relu(self._mag_pre(x))
            f = (pre > 0).to(pre.dtype) * mag
            gate = F.relu(pre)
            parts["l1_loss"] = sparsity_scale * c.l1_coeff * (gate * self.W_dec.norm(dim=1)).sum(-1).mean()
            aux = gate @ self.W_dec.detach() + self.b_dec.detach()
            if c.skip:  # the skip path is part of the frozen decoder too
                aux = aux + self._scaled_in(x) @ self.W_skip.detach().T
            parts["gate_aux_loss"] = fvu(aux)
        out_s = f @ self.W_dec + self.b_dec
        if c.skip:
            out_s = out_s + self._scaled_in(x) @ self.W_skip.T
        if c.arch == "matryoshka":
            losses = []
            for p in c.matryoshka_prefixes:
                part = f[:, :p] @ self.W_dec[:p] + self.b_dec
                if c.skip:
                    part = part + self._scaled_in(x) @ self.W_skip.T
                losses.append(fvu(part))
            parts["recon_loss"] = torch.stack(losses).mean()
        else:
            parts["recon_loss"] = fvu(out_s)
        if c.arch == "relu":
            parts["l1_loss"] = sparsity_scale * c.l1_coeff * (f * self.W_dec.norm(dim=1)).sum(-1).mean()
        loss = sum(v for k, v in parts.items() if k.endswith("_loss"))
        out = out_s / c.output_scale if c.output_scale != 1.0 else out_s
        return LossOutput(loss, out, f, pre, {k: v.detach() for k, v in parts.items()})  # type: ignore[arg-type]

    def auxk_loss(self, pre: torch.Tensor, residual: torch.Tensor, dead: torch.Tensor, k_aux: int) -> torch.Tensor:
        """AuxK (Gao et al. 2024): dead latents' top-k_aux pre-acts must explain the residual y - ŷ.

        pre [B, n]; residual [B, d_out] (detached, in the coder's scaled units); dead [n] bool.
        Returns ‖e - W_dec TopK(pre_dead)‖² / ‖e - ē‖², scaled by min(n_dead / k_aux, 1).
        """
        n_dead = int(dead.sum())
        if n_dead == 0:
            return pre.new_zeros(())
        k = min(k_aux, n_dead)
        masked = torch.where(dead, pre, torch.full_like(pre, -torch.inf))
        vals, idx = masked.topk(k, dim=-1, sorted=False)
        e_hat = F.embedding_bag(idx, self.W_dec, per_sample_weights=F.relu(vals), mode="sum")
        denom = distributed.batch_total_variance(residual)
        return min(n_dead / k_aux, 1.0) * (e_hat - residual).pow(2).sum() / denom

    @torch.no_grad()
    def normalize_decoder(self) -> None:
        """Decoder rows to unit norm (what TopK / ReLU-L1 training keeps invariant)."""
        self.W_dec /= self.W_dec.norm(dim=1, keepdim=True).clamp_min(1e-8)

    @torch.no_grad()
    def fold_scales(self) -> SparseCoder:
        """Fold input_scale / output_scale into the weights, so the coder takes raw activations.

        pre = (x s - b) W + c = (x - b/s)(s W) + c;  out = (f D + b + x s S^T)/t = f (D/t) + b/t + x (s S/t)^T.
        """
        s, t = self.cfg.input_scale, self.cfg.output_scale
        if s == 1.0 and t == 1.0:
            return self
        if self.cfg.apply_b_dec_to_input and s != t:  # b_dec is subtracted from x*s and added to out/t
            raise InputError(f"An autoencoder reads and writes one space: input_scale {s} != output_scale {t}.")
        self.W_enc.mul_(s)  # (gated: r_mag multiplies W_enc, so the magnitude path is scaled too)
        self.W_dec.div_(t)
        self.b_dec.div_(t)
        if self.cfg.skip:
            self.W_skip.mul_(s / t)
        self.cfg.input_scale = self.cfg.output_scale = 1.0
        return self


# ---------------------------------------------------------------------------- top-k helpers


def _topk_dense(a: torch.Tensor, k: int) -> torch.Tensor:
    """Keep the k largest entries of the last dim, zero the rest (dense result)."""
    vals, idx = a.topk(k, dim=-1, sorted=False)
    return torch.zeros_like(a).scatter(-1, idx, vals)


def _batch_topk(a: torch.Tensor, k_total: int) -> torch.Tensor:
    """BatchTopK (Bussmann et al. 2024): the k * B largest entries over the whole batch (over all
    ranks' batches under torchrun)."""
    if distributed.active() is not None:
        return distributed.batch_topk(a, k_total // a.shape[0])
    flat = a.flatten()
    vals, idx = flat.topk(min(k_total, flat.numel()), sorted=False)
    return torch.zeros_like(flat).scatter(0, idx, vals).view_as(a)


def _min_positive(f: torch.Tensor) -> torch.Tensor:
    pos = f[f > 0]
    if distributed.active() is not None:  # the global minimum; +inf marks a rank without activations
        m = distributed.all_min(pos.min().detach() if pos.numel() else f.new_tensor(float("inf")))
        return torch.where(torch.isinf(m), torch.zeros_like(m), m)
    return pos.min().detach() if pos.numel() else f.new_zeros(())
