"""Train sparse coders (SAEs, transcoders, skip-transcoders) on activations.

Why it is shaped this way:
- Resumable and reproducible by construction: the batch served at step s is a function of
  (data_seed, s) only, and the learning-rate and sparsity schedules are pure functions of s. A
  checkpoint (weights, Adam moments, dead-latent counters, RNG state, step, log; safetensors +
  JSON, written atomically) therefore restores everything, and a resumed run replays the very
  steps an uninterrupted one would: same losses, same final weights.
- `Trainer.step` is the whole inner loop body for one coder (forward, AuxK, backward, decoder
  gradient projection, Adam, decoder renormalisation, threshold EMA, dead counters), so a fast
  path (fused kernels, DDP) replaces one method.
- `train_many` trains several coders on one pass of the activations (one store read or one model
  forward per batch feeds every coder), and `train` is train_many with one spec.
- Inputs are scaled so E‖x‖ = sqrt(d) (coefficients then transfer between hooks and models); the
  scale lives in SAEConfig.input_scale/output_scale while training and is folded into the weights
  of the returned coder, which takes raw activations.
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import itertools
import json
import math
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import torch

from mechscope.errors import CorruptFileError, InputError, NonFiniteError, StoreMismatchError
from mechscope.fileio import atomic_write_bytes, atomic_write_json
from mechscope.sae import distributed, kernels, resample
from mechscope.sae.coder import SparseCoder
from mechscope.sae.config import ARCHS, TOPK_FAMILY, SAEConfig
from mechscope.sae.metrics import DENSE_THRESHOLD, batch_fve
from mechscope.sae.metrics import fve as metrics_fve

DECAYS = ("constant", "linear", "cosine")
B_DEC_INITS = ("geometric_median", "mean", "zeros")
CHECKPOINT_VERSION = 1
LOG_KEYS = ("step", "loss", "fve", "l0", "dead_fraction", "lr")  # coder.cfg.extra["train_log"]
INIT_SAMPLE_ROWS = 16384  # rows (first batches) for the b_dec init and, without store stats, the scale


# ---------------------------------------------------------------------------- configuration


@dataclass
class TrainConfig:
    """Hyper-parameters of one coder's training run (stored in coder.cfg.extra["train"]).

    None means "the documented default", resolved by `resolved(d_in)` before training starts,
    so the stored config says exactly what ran.
    """

    arch: str = "topk"
    n_latents: int = 4096
    k: int | None = None  # TopK family: active latents per token
    steps: int = 10_000
    batch_size: int = 4096
    lr: float | None = None  # None: 2e-4 / sqrt(n_latents / 2**14) (Gao et al. 2024)
    seed: int = 0  # weight init
    data_seed: int | None = None  # batch order; None: seed
    hook: str | None = None  # input hook (store / model sources)
    target_hook: str | None = None  # transcoders: the hook to predict; None: an autoencoder
    skip: bool = False  # skip-transcoder: + W_skip x
    warmup_steps: int | None = None  # linear lr warm-up; None: min(1000, steps // 20)
    decay: str = "linear"  # lr decay to 0 over the last decay_fraction of steps: constant | linear | cosine
    decay_fraction: float = 0.2
    # Sparsity penalties. The recon loss is the FVU (≈ summed MSE / d for inputs scaled to E‖x‖ = sqrt(d)),
    # so an L1 coefficient λ of Anthropic's April 2024 update (summed MSE) is λ / d here; L0 needs no such
    # scaling. Defaults are starting points to sweep, not tuned values.
    l1_coeff: float | None = None  # relu / gated; None: 2 / d_in
    l0_coeff: float | None = None  # jumprelu; None: 0.001
    sparsity_warmup_steps: int | None = None  # linear warm-up of l1/l0 from 0; None: steps // 20
    auxk: bool | None = None  # AuxK dead-latent loss; None: on for topk / batchtopk / matryoshka
    auxk_coeff: float = 1 / 32
    k_aux: int | None = None  # None: d_in // 2
    # dead-latent resampling (Bricken et al. 2023; sae/resample.py) every N steps until the lr decay
    # starts; 0: never (AuxK alone)
    resample_every: int = 0
    dead_window_tokens: int | None = None  # None: min(10M, steps * batch_size // 10)
    b_dec_init: str = "geometric_median"  # geometric_median | mean | zeros
    normalize_input: bool = True  # scale so E‖x‖ = sqrt(d_in) (and E‖y‖ = sqrt(d_out))
    autocast_bf16: bool = False
    # arch "topk": train with the fused kernel (sae.kernels.topk_loss: the same rule as coder.loss, ~3x
    # faster, never a dense [B, n] latent tensor); False: coder.loss, the plain-autograd reference
    fused_topk: bool = True
    matryoshka_prefixes: list[int] | None = None  # None: n/16, n/8, n/4, n/2, n
    jumprelu_bandwidth: float = 0.05
    jumprelu_init_threshold: float = 0.05
    threshold_ema: float = 0.99  # batchtopk / matryoshka: EMA of the smallest kept activation
    adam_betas: tuple[float, float] = (0.9, 0.999)
    adam_eps: float = 1e-8
    weight_decay: float = 0.0  # AdamW's decoupled weight decay (0: plain Adam, the usual SAE setting)
    grad_clip: float | None = None

    def __post_init__(self) -> None:
        if self.arch not in ARCHS:
            raise InputError(f"Unknown SAE architecture {self.arch!r}; choose one of {', '.join(ARCHS)}.")
        if self.steps <= 0 or self.batch_size <= 0 or self.n_latents <= 0:
            raise InputError(f"steps, batch_size and n_latents must be positive (got {self.steps}, "
                             f"{self.batch_size}, {self.n_latents}).")
        if self.decay not in DECAYS:
            raise InputError(f"decay must be one of {', '.join(DECAYS)}, got {self.decay!r}.")
        if self.b_dec_init not in B_DEC_INITS:
            raise InputError(f"b_dec_init must be one of {', '.join(B_DEC_INITS)}, got {self.b_dec_init!r}.")
        if not 0 <= self.decay_fraction <= 1 or (self.lr is not None and self.lr <= 0):
            raise InputError("need 0 <= decay_fraction <= 1 and lr > 0.")
        for name in ("warmup_steps", "sparsity_warmup_steps", "dead_window_tokens", "k_aux", "resample_every"):
            v = getattr(self, name)
            if v is not None and v < 0:
                raise InputError(f"{name} must be >= 0, got {v}.")
        self.adam_betas = tuple(self.adam_betas)  # type: ignore[assignment]  # JSON gives a list

    def resolved(self, d_in: int) -> TrainConfig:
        """A copy with every None default filled in (see the field comments)."""
        n, s = self.n_latents, self.steps
        topk = self.arch in TOPK_FAMILY
        l1 = 2 / d_in if self.arch in ("relu", "gated") else 0.0
        l0 = 0.001 if self.arch == "jumprelu" else 0.0
        return dataclasses.replace(
            self,
            lr=self.lr if self.lr is not None else 2e-4 / math.sqrt(n / 2**14),
            data_seed=self.seed if self.data_seed is None else self.data_seed,
            warmup_steps=min(1000, s // 20) if self.warmup_steps is None else self.warmup_steps,
            l1_coeff=l1 if self.l1_coeff is None else self.l1_coeff,
            l0_coeff=l0 if self.l0_coeff is None else self.l0_coeff,
            sparsity_warmup_steps=(s // 20 if self.sparsity_warmup_steps is None
                                   else self.sparsity_warmup_steps),
            auxk=topk if self.auxk is None else self.auxk,
            k_aux=max(1, d_in // 2) if self.k_aux is None else self.k_aux,
            dead_window_tokens=(min(10_000_000, max(self.batch_size, s * self.batch_size // 10))
                                if self.dead_window_tokens is None else self.dead_window_tokens),
            matryoshka_prefixes=(sorted({max(1, n >> i) for i in range(4, -1, -1)})
                                 if self.arch == "matryoshka" and self.matryoshka_prefixes is None
                                 else self.matryoshka_prefixes),
        )

    def to_dict(self) -> dict[str, Any]:
        return json.loads(json.dumps(dataclasses.asdict(self)))

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TrainConfig:
        names = {f.name for f in dataclasses.fields(cls)}
        if set(d) - names:
            raise InputError(f"Unknown TrainConfig fields {sorted(set(d) - names)}; known: {sorted(names)}.")
        return cls(**d)


def lr_at(step: int, cfg: TrainConfig) -> float:
    """Learning rate at `step` (0-based): linear warm-up, constant, then decay to 0 over the last
    decay_fraction of the steps (linear or cosine). A pure function of the step (resume needs no state)."""
    lr = float(cfg.lr)  # type: ignore[arg-type]
    warm = min(1.0, (step + 1) / cfg.warmup_steps) if cfg.warmup_steps else 1.0
    decay_steps = int(cfg.steps * cfg.decay_fraction) if cfg.decay != "constant" else 0
    start = cfg.steps - decay_steps
    if decay_steps == 0 or step < start:
        return lr * warm
    t = (step - start) / decay_steps  # 0 -> 1 over the decay window
    factor = 1 - t if cfg.decay == "linear" else 0.5 * (1 + math.cos(math.pi * t))
    return lr * warm * factor


def sparsity_scale_at(step: int, cfg: TrainConfig) -> float:
    """Multiplier of l1_coeff / l0_coeff: linear warm-up from 0 (avoids killing latents before they learn)."""
    w = cfg.sparsity_warmup_steps
    return min(1.0, (step + 1) / w) if w else 1.0


# ---------------------------------------------------------------------------- data sources


def step_generator(seed: int, index: int, stream: str) -> torch.Generator:
    """A CPU generator depending only on (seed, index, stream)."""
    digest = hashlib.sha256(f"mechscope.sae:{stream}:{seed}:{index}".encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") >> 1)


Batch = dict[str, torch.Tensor]  # key (hook name, or "x"/"y" for tensors) -> [B, d]


class BatchSource:
    """Activations served as {key: [B, d]} batches in an order that is a function of (seed, step).

    keys[i] = (input key, target key or None) for the i-th coder. `batches(start)` yields the
    batches of steps start, start + 1, ... (`one_pass=True`: a single pass over the data, last
    batch possibly smaller, for evaluation).
    """

    keys: list[tuple[str, str | None]]
    widths: dict[str, int]
    model_name: str | None = None
    model_identity: dict[str, Any] | None = None

    def batches(self, start: int, one_pass: bool = False) -> Iterator[Batch]:
        raise NotImplementedError

    def norm_scale(self, key: str) -> float | None:
        """sqrt(d) / E‖x‖ from precomputed statistics, if the source has them."""
        return None

    def check_coder(self, coder: SparseCoder, key_in: str, key_out: str | None) -> None:
        """Typed errors when a coder does not fit this source's widths or model."""
        c = coder.cfg
        for key, want, what in ((key_in, c.d_in, "d_in"), (key_out, c.out_dim, "output width")):
            if key is not None and self.widths[key] != want:
                raise InputError(f"{key} has {self.widths[key]} features per token but the coder's {what} is "
                                 f"{want}: the coder belongs to another model or hook.")
        want_id, have_id = c.model_identity, self.model_identity
        if want_id and have_id:
            for k in ("config_hash", "weights_fingerprint"):
                if k in want_id and k in have_id and want_id[k] != have_id[k]:
                    raise StoreMismatchError(f"The coder was trained on {want_id.get('name')!r} but these "
                                             f"activations come from {have_id.get('name')!r} ({k} differs).")


class TensorSource(BatchSource):
    """In-memory tensors: each epoch is a seeded permutation of the rows (last partial batch dropped)."""

    def __init__(self, tensors: Batch, batch_size: int, seed: int) -> None:
        n = {t.shape[0] for t in tensors.values()}
        if len(n) != 1:
            raise InputError(f"x and y must have the same number of rows, got {sorted(n)}.")
        self.tensors, self.n, self.batch_size, self.seed = tensors, n.pop(), batch_size, seed
        for k, t in tensors.items():
            if t.ndim != 2 or not t.is_floating_point():
                raise InputError(f"{k} must be a float tensor [N, d], got {tuple(t.shape)} {t.dtype}.")
        self.widths = {k: t.shape[1] for k, t in tensors.items()}
        self.keys = [("x", "y" if "y" in tensors else None)]

    def batches(self, start: int, one_pass: bool = False) -> Iterator[Batch]:
        B = self.batch_size
        if one_pass:
            perm = torch.randperm(self.n, generator=step_generator(self.seed, 0, "epoch"))
            for s in range(0, self.n, B):
                yield {k: t[perm[s:s + B].to(t.device)] for k, t in self.tensors.items()}
            return
        per_epoch = self.n // B
        if per_epoch == 0:
            raise InputError(f"batch_size {B} is larger than the {self.n} rows given; lower batch_size.")
        epoch, perm = -1, None
        for step in itertools.count(start):
            e, i = divmod(step, per_epoch)
            if e != epoch:
                epoch, perm = e, torch.randperm(self.n, generator=step_generator(self.seed, e, "epoch"))
            idx = perm[i * B:(i + 1) * B]  # type: ignore[index]
            yield {k: t[idx.to(t.device)] for k, t in self.tensors.items()}


class StoreSource(BatchSource):
    """An ActivationStore: store.batches(seed=data_seed) over as many epochs as needed; resuming at step s
    re-reads and skips the first s batches (the store's order is only defined by iterating it)."""

    def __init__(self, store, hooks: list[str], batch_size: int, seed: int) -> None:
        self.store, self.hooks, self.batch_size, self.seed = store, hooks, batch_size, seed
        shapes = store.hook_shapes
        for h in hooks:
            store._check_hook(h)
        self.widths = {h: math.prod(shapes[h]) for h in hooks}
        self.model_identity = dict(store.manifest.get("model", {})) or None
        self.model_name = (self.model_identity or {}).get("name")

    def batches(self, start: int, one_pass: bool = False) -> Iterator[Batch]:
        it = self.store.batches(self.batch_size, hooks=list(self.hooks), seed=self.seed, dtype=torch.float32,
                                epochs=1 if one_pass else 1 << 40, drop_last=not one_pass)
        for b in itertools.islice(it, start, None):
            yield {h: v.flatten(1) for h, v in b.items()}

    def norm_scale(self, key: str) -> float | None:
        s = self.store.manifest.get("stats", {}).get(key, {})
        return s.get("norm_scale")


class StreamSource(BatchSource):
    """Activations computed on the fly by `stream_batches` (no disk); resuming regenerates and skips
    the batches already consumed (same model, text and seed give the same batches)."""

    def __init__(self, model, hooks: list[str], text: Any, batch_size: int, seed: int, n_tokens: int) -> None:
        from mechscope.data.harvest import HarvestConfig, check_hooks
        from mechscope.models.identity import model_identity

        check_hooks(model, hooks)
        self.model, self.hooks, self.batch_size, self.seed = model, hooks, batch_size, seed
        kw: dict[str, Any] = {}
        self.contexts = None
        if isinstance(text, str):
            kw["corpus"] = text
        else:  # PackedContexts
            self.contexts = text
            kw.update(context_len=text.context_len, prepend_bos=text.prepend_bos)
        self.harvest_cfg = HarvestConfig(hooks=list(hooks), n_tokens=n_tokens, seed=seed, **kw)
        probe = torch.zeros(1, 2, dtype=torch.long, device=model.device)
        _, cache = model.run_with_cache(probe, names_filter=list(hooks), return_type=None)
        self.widths = {h: math.prod(cache[h].shape[2:]) for h in hooks}
        self.model_identity = model_identity(model)
        self.model_name = model.cfg.model_name

    def batches(self, start: int, one_pass: bool = False) -> Iterator[Batch]:
        from mechscope.data.stream import stream_batches

        it = stream_batches(self.model, self.harvest_cfg, self.batch_size, contexts=self.contexts,
                            seed=self.seed, dtype=torch.float32)
        for b in itertools.islice(it, start, None):
            b = b if isinstance(b, dict) else {self.hooks[0]: b}
            if not one_pass and b[self.hooks[0]].shape[0] < self.batch_size:
                return  # a partial last batch would change the loss scale
            yield {h: b[h].flatten(1) for h in self.hooks}


def open_source(source: Any, *, batch_size: int, seed: int, n_tokens: int,
                keys: list[tuple[str | None, str | None]]) -> BatchSource:
    """Wrap `source` (tensor [N, d] | (x, y) tensors | ActivationStore | (model, hook, text)) and resolve
    each coder's (hook, target_hook) into source keys. target None (or == hook): an autoencoder."""
    from mechscope.data.store import ActivationStore

    if isinstance(source, torch.Tensor) or (isinstance(source, tuple | list) and len(source) == 2
                                            and all(isinstance(t, torch.Tensor) for t in source)):
        tensors = {"x": source} if isinstance(source, torch.Tensor) else {"x": source[0], "y": source[1]}
        src: BatchSource = TensorSource(tensors, batch_size, seed)
        src.keys = [("x", "y" if "y" in tensors else None) for _ in keys]
        return src
    if isinstance(source, ActivationStore):
        resolved = [_resolve_hooks(h, t, source.hooks, "this store") for h, t in keys]
        src = StoreSource(source, _unique(resolved), batch_size, seed)
    elif isinstance(source, tuple | list) and len(source) == 3 and hasattr(source[0], "run_with_cache"):
        model, hook, text = source
        resolved = [(h or hook, t) for h, t in keys]
        resolved = [(h, None if t in (None, h) else t) for h, t in resolved]  # type: ignore[misc]
        src = StreamSource(model, _unique(resolved), text, batch_size, seed, n_tokens)
    else:
        raise InputError("source must be a tensor [N, d], an (x, y) pair of tensors, an ActivationStore, or "
                         f"(model, hook, text) to stream from a model; got {type(source).__name__}.")
    src.keys = resolved  # type: ignore[assignment]
    return src


def _resolve_hooks(hook: str | None, target: str | None, available: list[str],
                   where: str) -> tuple[str, str | None]:
    if hook is None:
        if len(available) != 1:
            raise InputError(f"{where} holds several hooks ({', '.join(available)}): pass hook=.")
        hook = available[0]
    return hook, None if target in (None, hook) else target


def _unique(keys: list[tuple[str, str | None]]) -> list[str]:
    return list(dict.fromkeys(k for pair in keys for k in pair if k is not None))


# ---------------------------------------------------------------------------- initialisation


def geometric_median(x: torch.Tensor, iters: int = 20, eps: float = 1e-8) -> torch.Tensor:
    """argmin_m Σ_i ‖x_i − m‖ by Weiszfeld's iterations (x [N, d] -> [d], float64).

    The b_dec init of Bricken et al. 2023: robust to the heavy-tailed outliers of real activations."""
    x = x.double()
    m = x.mean(0)
    for _ in range(iters):
        w = 1.0 / (x - m).norm(dim=1).clamp_min(eps)  # [N]
        m_new = (w[:, None] * x).sum(0) / w.sum()
        if (m_new - m).norm() <= 1e-7 * m.norm().clamp_min(1e-12):
            return m_new
        m = m_new
    return m


def _scale_of(x: torch.Tensor) -> float:
    """sqrt(d) / E‖x‖ (1 for all-zero data)."""
    mean_norm = float(x.double().norm(dim=1).mean())
    return math.sqrt(x.shape[1]) / mean_norm if mean_norm > 0 else 1.0


# ---------------------------------------------------------------------------- the trainer


class StepStats(NamedTuple):
    """What one training step gives back (detached; nothing is synchronised but the finiteness check)."""

    loss: torch.Tensor  # scalar, the total loss
    out: torch.Tensor  # [B, d_out] output in raw units (full reconstruction, also for matryoshka)
    acts: torch.Tensor | kernels.SparseCode  # [B, n_latents] latent activations, or [B, k] on the fused path
    parts: dict[str, torch.Tensor]  # recon_loss, l1_loss / l0_loss / gate_aux_loss, auxk_loss, min_active, resampled


class Trainer:
    """One coder, its Adam optimizer and its bookkeeping (dead-latent counters, firing frequencies)."""

    def __init__(self, cfg: TrainConfig, coder: SparseCoder) -> None:
        self.cfg, self.coder = cfg, coder
        lr = float(cfg.lr)  # type: ignore[arg-type]
        # the fused (one multi-tensor kernel) Adam where torch has it for the device: same update rule
        fused = coder.W_enc.device.type in ("cpu", "cuda") and coder.W_enc.dtype == torch.float32
        self.opt = torch.optim.AdamW(coder.parameters(), lr=lr, betas=cfg.adam_betas, eps=cfg.adam_eps,
                                     weight_decay=cfg.weight_decay, fused=fused)
        n, dev = coder.cfg.n_latents, coder.W_enc.device
        # tokens seen since each latent last fired: dead = no activation within dead_window_tokens
        self.tokens_since_fired = torch.zeros(n, dtype=torch.int64, device=dev)  # [n]
        # firing counts over the current window; frequency of the last completed window (dense fraction)
        self.window_counts = torch.zeros(n, dtype=torch.int64, device=dev)  # [n]
        self.window_tokens = 0
        self.last_frequency: torch.Tensor | None = None  # [n] float64
        # topk-style archs keep decoder rows unit norm; relu's norm-weighted L1 does not need it
        self.unit_decoder = cfg.arch != "relu"
        self.fused = cfg.arch == "topk" and cfg.fused_topk and coder.W_enc.dtype == torch.float32

    # ------------------------------------------------------------------ the inner loop body
    def step(self, x: torch.Tensor, y: torch.Tensor | None, step: int) -> StepStats:
        """One optimizer step on a batch x [B, d_in] (target y [B, d_out] or None). Raises NonFiniteError
        (before updating anything) if the loss is NaN / inf."""
        c, coder = self.cfg, self.coder
        for group in self.opt.param_groups:
            group["lr"] = lr_at(step, c)
        dead = self.tokens_since_fired >= c.dead_window_tokens if c.auxk else None  # [n]
        if distributed.active() is not None:  # all ranks stop together, or none does (no rank left waiting)
            _all_finite_or_raise("activations", x, *(() if y is None else (y,)))
        if self.fused:
            # AuxK in the same pass; bf16 selects the top k on a bf16 matmul (values stay exact fp32)
            out = kernels.topk_loss(coder, x, y, bf16=c.autocast_bf16, dead=dead, k_aux=c.k_aux,
                                    auxk_coeff=c.auxk_coeff)
            loss, parts = out.loss, dict(out.parts)
        else:
            with torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=c.autocast_bf16):
                out = coder.loss(x, y, sparsity_scale=sparsity_scale_at(step, c))
                loss, parts = out.loss, dict(out.parts)
                if dead is not None:
                    target = x if y is None else y
                    # in the coder's scaled units, like its pre-acts and decoder
                    residual = ((target.to(out.out.dtype) - out.out) * coder.cfg.output_scale).detach()
                    aux = coder.auxk_loss(out.pre, residual, dead, int(c.k_aux))  # type: ignore[arg-type]
                    parts["auxk_loss"] = aux.detach()
                    loss = loss + c.auxk_coeff * aux
        _all_finite_or_raise("loss", loss.detach())
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        distributed.average_gradients(list(coder.parameters()))  # no-op in a single process
        if self.unit_decoder and coder.W_dec.grad is not None:
            kernels.remove_parallel_grad_(coder.W_dec)
        if c.grad_clip:
            torch.nn.utils.clip_grad_norm_(coder.parameters(), c.grad_clip)
        self.opt.step()
        with torch.no_grad():
            if self.unit_decoder:
                coder.normalize_decoder()
            if "min_active" in parts:  # batch top-k: the inference threshold tracks the smallest kept act
                t = coder.threshold
                new = parts["min_active"].float()
                t.copy_(torch.where(t == 0, new, c.threshold_ema * t + (1 - c.threshold_ema) * new))
            self._count(out.acts)
            done = step + 1
            if c.resample_every and done % c.resample_every == 0 and done < c.steps * (1 - c.decay_fraction):
                parts["resampled"] = torch.tensor(float(resample.resample_dead(
                    self, x, y, out.out.detach(), step_generator(c.seed, step, "resample"))))
        acts = out.acts if self.fused else out.acts.detach()
        return StepStats(loss.detach(), out.out.detach(), acts, parts)

    # ------------------------------------------------------------------ bookkeeping
    @torch.no_grad()
    def _count(self, acts: torch.Tensor | kernels.SparseCode) -> None:
        if isinstance(acts, kernels.SparseCode):
            counts = kernels.firing_counts(acts, self.coder.cfg.n_latents)  # [n]
        else:
            counts = (acts != 0).sum(0)  # [n]
        counts = distributed.all_sum(counts)  # firing over the global batch
        B = acts[0].shape[0] if isinstance(acts, kernels.SparseCode) else acts.shape[0]
        g = distributed.active()
        B = B * g.world if g is not None else B
        self.tokens_since_fired += B
        self.tokens_since_fired[counts > 0] = 0
        self.window_counts += counts
        self.window_tokens += B
        if self.window_tokens >= int(self.cfg.dead_window_tokens):  # type: ignore[arg-type]
            self.last_frequency = self.window_counts.double() / self.window_tokens
            self.window_counts.zero_()
            self.window_tokens = 0

    def dead_fraction(self) -> float:
        """Fraction of latents that have not fired in the last dead_window_tokens tokens."""
        window = int(self.cfg.dead_window_tokens)  # type: ignore[arg-type]
        return float((self.tokens_since_fired >= window).double().mean())

    def dense_fraction(self) -> float:
        """Fraction of latents firing on > 10% of the tokens of the last full window (else the current)."""
        freq = self.last_frequency if self.last_frequency is not None else (
            self.window_counts.double() / max(self.window_tokens, 1))
        return float((freq > DENSE_THRESHOLD).double().mean())

    # ------------------------------------------------------------------ checkpoint state
    def state_tensors(self, prefix: str) -> dict[str, torch.Tensor]:
        t = {f"{prefix}coder.{k}": v for k, v in self.coder.state_dict().items()}
        for idx, st in self.opt.state_dict()["state"].items():
            for key, value in st.items():
                t[f"{prefix}optim.{idx}.{key}"] = torch.as_tensor(value)
        t[f"{prefix}tokens_since_fired"] = self.tokens_since_fired
        t[f"{prefix}window_counts"] = self.window_counts
        if self.last_frequency is not None:
            t[f"{prefix}last_frequency"] = self.last_frequency
        return {k: v.detach().cpu().contiguous() for k, v in t.items()}

    def load_state_tensors(self, tensors: dict[str, torch.Tensor], prefix: str, window_tokens: int) -> None:
        dev = self.coder.W_enc.device
        head = f"{prefix}coder."
        sd = {k.removeprefix(head): v for k, v in tensors.items() if k.startswith(head)}
        self.coder.load_state_dict(sd, strict=True)
        optim: dict[int, dict[str, torch.Tensor]] = {}
        for k, v in tensors.items():
            if k.startswith(f"{prefix}optim."):
                idx, key = k.removeprefix(f"{prefix}optim.").split(".", 1)
                optim.setdefault(int(idx), {})[key] = v
        self.opt.load_state_dict({"state": optim, "param_groups": self.opt.state_dict()["param_groups"]})
        self.tokens_since_fired = tensors[f"{prefix}tokens_since_fired"].to(dev)
        self.window_counts = tensors[f"{prefix}window_counts"].to(dev)
        self.window_tokens = window_tokens
        lf = tensors.get(f"{prefix}last_frequency")
        self.last_frequency = None if lf is None else lf.to(dev)


def _all_finite_or_raise(what: str, *tensors: torch.Tensor) -> None:
    """Raise NonFiniteError on every rank if any rank has a NaN / inf in `tensors` (no copies made)."""
    ok = torch.stack([torch.isfinite(t).all() for t in tensors]).all().to(torch.int32).reshape(1)
    if not bool(distributed.all_min(ok)):
        where = "" if distributed.active() is None else " on some rank"
        t = tensors[0]
        raise NonFiniteError(f"non-finite {what}{where}" + (f" ({float(t)})" if t.numel() == 1 else ""))


# ---------------------------------------------------------------------------- checkpoints


class Checkpoint:
    """`dir/state.json` + `dir/step-XXXXXXXX.safetensors`: coders, Adam moments, counters, RNG state.

    The tensor file is written first and state.json (which names it) last, each atomically, so a
    crash at any moment leaves a state.json that points at a complete tensor file.
    """

    def __init__(self, folder: str | Path) -> None:
        self.dir = Path(folder)

    def exists(self) -> bool:
        return (self.dir / "state.json").exists()

    def save(self, step: int, trainers: list[Trainer], log: list[dict[str, list[float]]],
             data: dict[str, Any]) -> None:
        from safetensors.torch import save

        self.dir.mkdir(parents=True, exist_ok=True)
        tensors: dict[str, torch.Tensor] = {"rng.torch": torch.get_rng_state()}
        for i, t in enumerate(trainers):
            tensors |= t.state_tensors(f"{i}.")
        name = f"step-{step:08d}.safetensors"
        atomic_write_bytes(self.dir / name, save(tensors, metadata={"format": "pt"}))
        state = {
            "format_version": CHECKPOINT_VERSION, "step": step, "tensors": name, "data": data,
            "train_configs": [t.cfg.to_dict() for t in trainers],
            "coder_configs": [t.coder.cfg.to_dict() for t in trainers],
            "window_tokens": [t.window_tokens for t in trainers], "log": log,
        }
        atomic_write_json(self.dir / "state.json", state)
        for old in self.dir.glob("step-*.safetensors"):
            if old.name != name:
                old.unlink(missing_ok=True)

    def read(self) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            state = json.loads((self.dir / "state.json").read_text())
            return state, load_file(self.dir / state["tensors"])
        except (ValueError, KeyError, OSError, SafetensorError) as e:
            raise CorruptFileError(f"Unreadable checkpoint in {self.dir} ({e}); delete the folder to start "
                                   "over.") from e

    def step(self) -> int | None:
        """The step of the saved state, None without a checkpoint."""
        return self.read()[0]["step"] if self.exists() else None


def _check_resume(saved: list[dict[str, Any]], configs: list[TrainConfig], where: Path) -> None:
    """A checkpoint resumes only the same runs; `steps` may grow when the lr schedule does not use it."""
    if len(saved) != len(configs):
        raise InputError(f"{where} holds {len(saved)} coder(s), this call trains {len(configs)}; use another "
                         "folder.")
    for old, new in zip(saved, (c.to_dict() for c in configs), strict=True):
        diff = sorted(k for k in set(old) | set(new) if k != "steps" and old.get(k) != new.get(k))
        if old["steps"] != new["steps"] and new["decay"] != "constant" and new["decay_fraction"] > 0:
            diff.append("steps (the lr decay depends on it)")
        if diff:
            raise InputError(f"{where} holds a run with other settings ({', '.join(diff)} differ). Resume "
                             "it with the same settings (give defaults that depend on steps explicitly), or "
                             "use a new folder.")


# ---------------------------------------------------------------------------- the loop


def train(source: Any, *, arch: str = "topk", n_latents: int = 4096, k: int | None = None,
          steps: int = 10_000, batch_size: int = 4096, lr: float | None = None, seed: int = 0,
          hook: str | None = None, target_hook: str | None = None, warmup_steps: int | None = None,
          decay: str = "linear", l1_coeff: float | None = None, l0_coeff: float | None = None,
          auxk: bool | None = None, dead_window_tokens: int | None = None,
          b_dec_init: str = "geometric_median", normalize_input: bool = True, autocast_bf16: bool = False,
          checkpoint_dir: str | Path | None = None, checkpoint_every: int = 1000, progress: bool = True,
          device: torch.device | str | None = None, log_every: int | None = None,
          stop_after: int | None = None, **options: Any) -> SparseCoder:
    """Train one sparse coder and return it (scales folded: it takes raw activations).

    source: a tensor [N, d] (SAE), an (x [N, d_in], y [N, d_out]) pair (transcoder), an
    ActivationStore (+ hook, and target_hook for a transcoder), or (model, hook, text) to stream
    activations from a model (text: a corpus name or a PackedContexts). The hyper-parameters are
    TrainConfig's fields (see its comments for the defaults); options takes the rest (skip,
    matryoshka_prefixes, sparsity_warmup_steps, auxk_coeff, k_aux, jumprelu_bandwidth, ...).
    With checkpoint_dir, a checkpoint is written every checkpoint_every steps and at the end, and
    an existing one is resumed (same losses and weights as an uninterrupted run); stop_after=S
    stops after step S as if interrupted. The loss curve (every log_every steps) and the final
    dead / dense fractions are in coder.cfg.extra["train_log"] and ["train_stats"].
    """
    fields = {f.name for f in dataclasses.fields(TrainConfig)}
    if set(options) - fields:
        raise InputError(f"Unknown training options {sorted(set(options) - fields)}; TrainConfig has: "
                         f"{', '.join(sorted(fields))}.")
    cfg = TrainConfig(arch=arch, n_latents=n_latents, k=k, steps=steps, batch_size=batch_size, lr=lr,
                      seed=seed, hook=hook, target_hook=target_hook, warmup_steps=warmup_steps, decay=decay,
                      l1_coeff=l1_coeff, l0_coeff=l0_coeff, auxk=auxk, dead_window_tokens=dead_window_tokens,
                      b_dec_init=b_dec_init, normalize_input=normalize_input, autocast_bf16=autocast_bf16,
                      **options)
    return train_many(source, [cfg], checkpoint_dir=checkpoint_dir, checkpoint_every=checkpoint_every,
                      progress=progress, device=device, log_every=log_every, stop_after=stop_after)[0]


def train_many(source: Any, specs: list[TrainConfig | dict[str, Any]], *,
               checkpoint_dir: str | Path | None = None, checkpoint_every: int = 1000, progress: bool = True,
               device: torch.device | str | None = None, log_every: int | None = None,
               stop_after: int | None = None) -> list[SparseCoder]:
    """Train several coders on ONE pass of the activations (each batch feeds every coder).

    specs: TrainConfigs or dicts of TrainConfig fields; they may differ in anything but steps,
    batch_size and data_seed (one shared batch sequence), e.g. in arch, width, k, coefficients or
    hooks (one store batch dict serves them all). Each coder equals the one `train` gives with
    the same spec. Returns the coders in spec order; runtime options as in `train`.
    """
    if checkpoint_every <= 0:
        raise InputError(f"checkpoint_every must be positive, got {checkpoint_every}.")
    cfgs, src = _prepare(source, specs)
    steps, batch_size = cfgs[0].steps, cfgs[0].batch_size
    group = distributed.setup(device)  # None unless launched by torchrun (or a process group exists)
    dev = group.device if group is not None else (
        torch.device(device) if device is not None else _default_device(source))
    rows = distributed.shard(batch_size, group) if group is not None else slice(None)
    main = group is None or group.is_main
    ckpt = Checkpoint(checkpoint_dir) if checkpoint_dir is not None else None
    log_every = log_every or max(1, min(100, steps // 100))
    with distributed.activate(group):
        trainers, start, log = _resume_or_init(cfgs, src, dev, ckpt)
        data_info = {"kind": type(src).__name__, "seed": cfgs[0].data_seed,
                     "order": "a function of (seed, step): resume skips the batches served"}
        if group is not None:
            data_info["world_size"] = group.world  # informational: any world size resumes it

        from tqdm.auto import tqdm

        bar = tqdm(total=steps, initial=start, disable=not (progress and main), desc=f"train {cfgs[0].arch}",
                   dynamic_ncols=True)
        batches = src.batches(start)
        try:
            for step in range(start, steps):
                batch = next(batches, None)
                if batch is None:
                    raise InputError(f"The source ran out of activations after {step} steps of {batch_size}; "
                                     "ask for fewer steps or give more data.")
                for i, (t, (key_in, key_out)) in enumerate(zip(trainers, src.keys, strict=True)):
                    x = batch[key_in][rows].to(dev, non_blocking=True)  # [B, d_in] (this rank's rows)
                    y = batch[key_out][rows].to(dev, non_blocking=True) if key_out is not None else None
                    try:
                        stats = t.step(x, y, step)
                    except NonFiniteError as e:
                        raise _nan_error(i, t, step, e, ckpt) from e
                    if (step + 1) % log_every == 0 or step + 1 == steps:
                        _log(log[i], step, stats, t, x if y is None else y)
                bar.update(1)
                if progress and main and ((step + 1) % 10 == 0 or step + 1 == steps) and log[0]["step"]:
                    lg = log[0]
                    bar.set_postfix(loss=f"{lg['loss'][-1]:.4f}", fve=f"{lg['fve'][-1]:.3f}",
                                    l0=f"{lg['l0'][-1]:.1f}", dead=f"{100 * lg['dead_fraction'][-1]:.1f}%",
                                    refresh=False)
                done = step + 1
                interrupted = stop_after is not None and done >= stop_after
                if ckpt is not None and (done == steps or done % checkpoint_every == 0 or interrupted):
                    _check_finite_weights(ckpt, done, trainers)  # on every rank: they stop together
                    if main:  # one writer; the others wait until the checkpoint is complete
                        ckpt.save(done, trainers, log, data_info | {"batches_served": done})
                    if group is not None:
                        torch.distributed.barrier()
                if interrupted and done < steps:
                    break
        finally:
            bar.close()
        return [_finished(t, log[i]) for i, t in enumerate(trainers)]


def _prepare(source: Any, specs: list[TrainConfig | dict[str, Any]]) -> tuple[list[TrainConfig], BatchSource]:
    """Validate the specs, open the source and resolve every default (the configs that get stored)."""
    cfgs = [s if isinstance(s, TrainConfig) else TrainConfig.from_dict(dict(s)) for s in specs]
    if not cfgs:
        raise InputError("train_many needs at least one spec.")
    shared = {(c.steps, c.batch_size, c.seed if c.data_seed is None else c.data_seed) for c in cfgs}
    if len(shared) != 1:
        raise InputError("All specs of train_many share one pass of the data: give them equal steps, "
                         f"batch_size and data_seed (got {sorted(shared)}).")
    steps, batch_size, data_seed = shared.pop()
    src = open_source(source, batch_size=batch_size, seed=data_seed, n_tokens=steps * batch_size,
                      keys=[(c.hook, c.target_hook) for c in cfgs])
    for c, (_, key_out) in zip(cfgs, src.keys, strict=True):
        if c.skip and key_out is None:
            raise InputError("A skip-transcoder predicts another activation: give a target (an (x, y) pair "
                             "of tensors or target_hook=).")
    if not isinstance(src, TensorSource):  # record the hooks actually read
        cfgs = [dataclasses.replace(c, hook=k_in, target_hook=k_out)
                for c, (k_in, k_out) in zip(cfgs, src.keys, strict=True)]
    return [c.resolved(src.widths[k_in]) for c, (k_in, _) in zip(cfgs, src.keys, strict=True)], src


def _resume_or_init(cfgs: list[TrainConfig], src: BatchSource, dev: torch.device,
                    ckpt: Checkpoint | None) -> tuple[list[Trainer], int, list[dict[str, list[float]]]]:
    """Trainers restored from the checkpoint (and its step and log), or fresh ones initialised from data."""
    if ckpt is None or not ckpt.exists():
        trainers = [Trainer(c, SparseCoder(_coder_config(c, src, *keys), device=dev).init_weights(c.seed))
                    for c, keys in zip(cfgs, src.keys, strict=True)]
        _init_from_data(trainers, src, dev)
        return trainers, 0, [{k: [] for k in LOG_KEYS} for _ in cfgs]
    state, tensors = ckpt.read()
    _check_resume(state["train_configs"], cfgs, ckpt.dir)
    if state["data"].get("kind") != type(src).__name__:
        raise InputError(f"{ckpt.dir} was trained from a {state['data'].get('kind')}, this call gives a "
                         f"{type(src).__name__}; resume from the same source or use a new folder.")
    trainers = [Trainer(c, SparseCoder(SAEConfig.from_dict(sc), device=dev))
                for c, sc in zip(cfgs, state["coder_configs"], strict=True)]
    for i, t in enumerate(trainers):
        src.check_coder(t.coder, *src.keys[i])
        t.load_state_tensors(tensors, f"{i}.", state["window_tokens"][i])
    torch.set_rng_state(tensors["rng.torch"])
    return trainers, int(state["step"]), state["log"]


def _check_finite_weights(ckpt: Checkpoint, step: int, trainers: list[Trainer]) -> None:
    """Never overwrite a good checkpoint with a broken state."""
    for t in trainers:
        if not all(bool(torch.isfinite(p).all()) for p in t.coder.parameters()):
            raise NonFiniteError(f"Non-finite weights after step {step}; the last good checkpoint is kept in "
                                 f"{ckpt.dir}.")


def _nan_error(i: int, t: Trainer, step: int, e: Exception, ckpt: Checkpoint | None) -> NonFiniteError:
    last = ckpt.step() if ckpt is not None else None
    kept = f"the last good checkpoint (step {last}) is kept in {ckpt.dir}" if last is not None and ckpt \
        else "no checkpoint was written"
    return NonFiniteError(f"Training coder {i} ({t.cfg.arch}) hit NaN/inf at step {step} ({e}); {kept}. "
                          "Lower lr, check the activations, or try autocast_bf16=False.")


def _log(lg: dict[str, list[float]], step: int, stats: StepStats, t: Trainer, target: torch.Tensor) -> None:
    """Append the step's loss, FVE and L0 (over the global batch under torchrun) to the log."""
    values = stats.acts.values if isinstance(stats.acts, kernels.SparseCode) else stats.acts
    g = distributed.active()
    if g is None:
        loss, fve, l0 = float(stats.loss), batch_fve(target, stats.out), \
            float((values != 0).sum(-1).double().mean())
    else:  # sufficient statistics summed over ranks: loss (a mean over ranks), Σerr², Σ‖y‖², Σy, rows, firings
        y, e = target.detach().double(), (target.detach().double() - stats.out.double())
        packed = torch.cat([torch.stack([stats.loss.double() / g.world, e.square().sum(), y.square().sum(),
                                         torch.tensor(float(y.shape[0]), dtype=torch.float64, device=y.device),
                                         (values != 0).sum().double()]), y.sum(0)])
        packed = distributed.all_sum(packed)
        loss, n = float(packed[0]), float(packed[3])
        fve = metrics_fve(float(packed[1]), float(packed[2]), packed[5:], int(n))
        l0 = float(packed[4]) / n
    lg["step"].append(step)
    lg["loss"].append(loss)
    lg["fve"].append(fve)
    lg["l0"].append(l0)
    lg["dead_fraction"].append(t.dead_fraction())
    lg["lr"].append(lr_at(step, t.cfg))


def _finished(t: Trainer, log: dict[str, list[float]]) -> SparseCoder:
    """A copy of the trained coder with its scales folded and its training recorded in cfg.extra."""
    coder = copy.deepcopy(t.coder).fold_scales()
    coder.cfg.extra["train"] = t.cfg.to_dict()
    coder.cfg.extra["train_log"] = log
    coder.cfg.extra["train_stats"] = {"dead_fraction": t.dead_fraction(),
                                      "dense_fraction": t.dense_fraction(),
                                      "dead_window_tokens": t.cfg.dead_window_tokens}
    return coder


def _default_device(source: Any) -> torch.device:
    if isinstance(source, torch.Tensor):
        return source.device
    if isinstance(source, tuple | list) and source and isinstance(source[0], torch.Tensor):
        return source[0].device
    if isinstance(source, tuple | list) and source and hasattr(source[0], "device"):
        return source[0].device
    return torch.device("cpu")


def _coder_config(c: TrainConfig, src: BatchSource, key_in: str, key_out: str | None) -> SAEConfig:
    d_in = src.widths[key_in]
    d_out = src.widths[key_out] if key_out is not None else None
    hook_in = c.hook if isinstance(src, TensorSource) else key_in
    hook_out = c.target_hook if isinstance(src, TensorSource) else key_out
    return SAEConfig(
        arch=c.arch, d_in=d_in, n_latents=c.n_latents, d_out=d_out, k=c.k, skip=c.skip,
        apply_b_dec_to_input=key_out is None, l1_coeff=c.l1_coeff or 0.0, l0_coeff=c.l0_coeff or 0.0,
        jumprelu_bandwidth=c.jumprelu_bandwidth, jumprelu_init_threshold=c.jumprelu_init_threshold,
        matryoshka_prefixes=list(c.matryoshka_prefixes or []), hook_in=hook_in, hook_out=hook_out,
        model_name=src.model_name, model_identity=src.model_identity,
    )


@torch.no_grad()
def _init_from_data(trainers: list[Trainer], src: BatchSource, dev: torch.device) -> None:
    """Input/output scales and b_dec from the first batches of the data order (deterministic)."""
    rows: dict[str, list[torch.Tensor]] = {}
    n = 0
    for batch in src.batches(0):
        for key, v in batch.items():
            rows.setdefault(key, []).append(v)
        n += next(iter(batch.values())).shape[0]
        if n >= INIT_SAMPLE_ROWS:
            break
    sample = {k: torch.cat(v).to(dev) for k, v in rows.items()}
    for t, (key_in, key_out) in zip(trainers, src.keys, strict=True):
        c, sc = t.cfg, t.coder.cfg
        if c.normalize_input:
            sc.input_scale = src.norm_scale(key_in) or _scale_of(sample[key_in])
            sc.output_scale = (src.norm_scale(key_out) or _scale_of(sample[key_out])) if key_out \
                else sc.input_scale
        y = sample[key_out if key_out is not None else key_in].double() * sc.output_scale
        b = {"geometric_median": geometric_median, "mean": lambda v: v.mean(0),
             "zeros": lambda v: torch.zeros(v.shape[1], dtype=v.dtype, device=v.device)}[c.b_dec_init](y)
        t.coder.b_dec.copy_(b.to(t.coder.b_dec.dtype))


__all__ = ["TrainConfig", "Trainer", "StepStats", "Checkpoint", "train", "train_many", "lr_at",
           "sparsity_scale_at", "geometric_median", "open_source", "BatchSource", "TensorSource",
           "StoreSource", "StreamSource"]
