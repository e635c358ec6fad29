"""The inner loop of sparse-coder training: `Trainer.step` on one batch, and the data-based initialisation.

`Trainer.step` is the whole inner loop body for one coder (forward, AuxK, backward, decoder
gradient projection, Adam, decoder renormalisation, threshold EMA, dead counters), so a fast path
(fused kernels, DDP) replaces one method; the driver (sae/train.py) feeds it batches, logs and
checkpoints through mechscope.training.
"""

from __future__ import annotations

import dataclasses
from typing import NamedTuple

import torch

from mechscope.errors import NonFiniteError
from mechscope.sae import distributed, kernels, resample
from mechscope.sae.coder import SparseCoder
from mechscope.sae.metrics import DENSE_THRESHOLD
from mechscope.sae.train_config import TrainConfig, lr_at, resolve_bf16, sparsity_scale_at
from mechscope.training import (
    load_module_tensors,
    load_optimizer_tensors,
    module_tensors,
    optimizer_tensors,
    step_generator,
)

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
        if not isinstance(cfg.autocast_bf16, bool):  # "auto", when a caller did not resolve the config
            cfg = dataclasses.replace(cfg, autocast_bf16=resolve_bf16(cfg.autocast_bf16, coder.W_enc.device))
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
                    self, x, y, out.out.detach(), step_generator(c.seed, step, "sae:resample"))))
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
        """Everything a resume needs but window_tokens (an int, kept in the checkpoint's JSON)."""
        t = module_tensors(self.coder, f"{prefix}coder/") | optimizer_tensors(self.opt, f"{prefix}optim/")
        t[f"{prefix}tokens_since_fired"] = self.tokens_since_fired
        t[f"{prefix}window_counts"] = self.window_counts
        if self.last_frequency is not None:
            t[f"{prefix}last_frequency"] = self.last_frequency
        return t

    def load_state_tensors(self, tensors: dict[str, torch.Tensor], prefix: str, window_tokens: int) -> None:
        dev = self.coder.W_enc.device
        load_module_tensors(self.coder, tensors, f"{prefix}coder/")
        load_optimizer_tensors(self.opt, tensors, f"{prefix}optim/")
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


__all__ = ["Trainer", "StepStats", "geometric_median"]
