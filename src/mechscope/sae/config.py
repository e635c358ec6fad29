"""SAEConfig: one dataclass for every sparse coder (SAE, transcoder, skip-transcoder).

It doubles as the JSON config on disk (native format) and as the CLI's options, so a saved
coder says exactly how it was built and what it reads.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Literal

from mechscope.config_io import from_dict
from mechscope.errors import InputError

Arch = Literal["relu", "topk", "batchtopk", "jumprelu", "gated", "matryoshka"]
ARCHS: tuple[str, ...] = ("relu", "topk", "batchtopk", "jumprelu", "gated", "matryoshka")
TOPK_FAMILY = ("topk", "batchtopk", "matryoshka")


@dataclass
class SAEConfig:
    arch: Arch
    d_in: int
    n_latents: int
    d_out: int | None = None  # None: an autoencoder (d_out = d_in); else a transcoder
    k: int | None = None  # active latents per token (TopK family)
    skip: bool = False  # skip-transcoder: + W_skip x (a linear path around the sparse code)
    apply_b_dec_to_input: bool | None = None  # subtract b_dec before encoding; None: yes for autoencoders

    # losses
    l1_coeff: float = 0.0  # relu / gated: decoder-norm-weighted L1
    l0_coeff: float = 0.0  # jumprelu: L0 penalty through the straight-through estimator
    jumprelu_bandwidth: float = 0.001  # jumprelu: width of the rectangle kernel for the STE
    jumprelu_init_threshold: float = 0.001
    matryoshka_prefixes: list[int] = field(default_factory=list)  # nested dictionary sizes (last = n_latents)

    # where it reads and writes (provenance; checked against a model when used with one)
    hook_in: str | None = None
    hook_out: str | None = None  # transcoders; None: same as hook_in
    model_name: str | None = None
    model_identity: dict[str, Any] | None = None

    # input scaling folded into the weights on save (so saved coders take raw activations)
    input_scale: float = 1.0  # x_model * input_scale is what the weights see (training time)
    output_scale: float = 1.0  # reconstruction / output_scale is returned (1.0 once folded)
    dtype: str = "float32"
    extra: dict[str, Any] = field(default_factory=dict)  # free-form: training config, metrics

    def __post_init__(self) -> None:
        if self.arch not in ARCHS:
            raise InputError(f"Unknown SAE architecture {self.arch!r}; choose one of {', '.join(ARCHS)}.")
        if self.d_in <= 0 or self.n_latents <= 0 or (self.d_out is not None and self.d_out <= 0):
            raise InputError(f"d_in, n_latents and d_out must be positive (got {self.d_in}, {self.n_latents}, "
                             f"{self.d_out}).")
        if self.arch in TOPK_FAMILY:
            if self.k is None or not 0 < self.k <= self.n_latents:
                raise InputError(f"{self.arch} needs 0 < k <= n_latents ({self.n_latents}); got k={self.k}.")
        if self.l1_coeff < 0 or self.l0_coeff < 0:
            raise InputError(f"l1_coeff and l0_coeff must be >= 0 (got {self.l1_coeff}, {self.l0_coeff}).")
        if self.jumprelu_bandwidth <= 0 or self.jumprelu_init_threshold <= 0:
            raise InputError("jumprelu_bandwidth and jumprelu_init_threshold must be > 0.")
        if self.arch == "matryoshka":
            p = list(self.matryoshka_prefixes) or [self.n_latents]
            if p[-1] != self.n_latents:
                p.append(self.n_latents)
            if any(b <= a for a, b in zip(p, p[1:], strict=False)) or p[0] <= 0:
                raise InputError(f"matryoshka_prefixes must increase strictly within (0, n_latents]; got {p}.")
            self.matryoshka_prefixes = p
        if self.apply_b_dec_to_input is None:
            self.apply_b_dec_to_input = not self.is_transcoder
        if self.apply_b_dec_to_input and self.is_transcoder:
            raise InputError("apply_b_dec_to_input needs d_out == d_in (an autoencoder).")
        if self.input_scale <= 0 or self.output_scale <= 0:
            raise InputError("input_scale and output_scale must be > 0.")

    @property
    def is_transcoder(self) -> bool:
        return self.d_out is not None and (self.d_out != self.d_in or self.hook_out not in (None, self.hook_in))

    @property
    def out_dim(self) -> int:
        return self.d_out if self.d_out is not None else self.d_in

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> SAEConfig:
        """Refuses unknown keys (InputError naming them); see mechscope.config_io.from_dict."""
        return from_dict(cls, d)
