"""What one sparse coder's training run is: TrainConfig and its schedules (pure functions of the step).

Split from the driver so that the stored config (coder.cfg.extra["train"]) and the rules that
resolve its defaults read in one place.
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass
from typing import Any

import torch

from mechscope.config_io import from_dict
from mechscope.errors import InputError
from mechscope.sae.config import ARCHS, TOPK_FAMILY
from mechscope.training import DECAYS, scheduled_lr
from mechscope.validate import finite_float

B_DEC_INITS = ("geometric_median", "mean", "zeros")


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
    # bf16 top-k selection / autocast: "auto" (the default) turns it on where bf16 matmuls are fast
    # (sae.kernels.bf16_matmul_is_fast: CUDA, AVX512-BF16 / AMX CPUs); resolved() records the bool that ran
    autocast_bf16: bool | str = "auto"
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
        for name in ("lr", "l1_coeff", "l0_coeff"):  # nan passes every comparison above: refuse it by name
            if getattr(self, name) is not None:
                finite_float(name, getattr(self, name))
        for name in ("warmup_steps", "sparsity_warmup_steps", "dead_window_tokens", "k_aux", "resample_every"):
            v = getattr(self, name)
            if v is not None and v < 0:
                raise InputError(f"{name} must be >= 0, got {v}.")
        if not isinstance(self.autocast_bf16, bool) and self.autocast_bf16 != "auto":
            raise InputError(f"autocast_bf16 must be True, False or 'auto', got {self.autocast_bf16!r}.")
        self.adam_betas = tuple(self.adam_betas)  # type: ignore[assignment]  # JSON gives a list

    def resolved(self, d_in: int, device: torch.device | str | None = None) -> TrainConfig:
        """A copy with every None default filled in (see the field comments), and autocast_bf16 "auto"
        decided for `device` (default CPU)."""
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
            autocast_bf16=resolve_bf16(self.autocast_bf16, device),
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
        return from_dict(cls, d)


def lr_at(step: int, cfg: TrainConfig) -> float:
    """Learning rate at `step` (0-based): linear warm-up, constant, then decay to 0 over the last
    decay_fraction of the steps (linear or cosine). A pure function of the step (resume needs no state)."""
    decay_steps = int(cfg.steps * cfg.decay_fraction) if cfg.decay != "constant" else 0
    return scheduled_lr(step, float(cfg.lr), warmup=cfg.warmup_steps or 0,  # type: ignore[arg-type]
                        decay=cfg.decay, steps=cfg.steps, decay_steps=decay_steps)


def sparsity_scale_at(step: int, cfg: TrainConfig) -> float:
    """Multiplier of l1_coeff / l0_coeff: linear warm-up from 0 (avoids killing latents before they learn)."""
    return scheduled_lr(step, 1.0, warmup=cfg.sparsity_warmup_steps or 0)


def resolve_bf16(setting: bool | str, device: torch.device | str | None = None) -> bool:
    """autocast_bf16 as it will run: "auto" is on where a bf16 matmul beats fp32 on `device`."""
    if setting == "auto":
        from mechscope.sae.kernels import bf16_matmul_is_fast

        return bf16_matmul_is_fast(device)
    return bool(setting)


__all__ = ["TrainConfig", "lr_at", "sparsity_scale_at", "resolve_bf16", "DECAYS", "B_DEC_INITS"]
