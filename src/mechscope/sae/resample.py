"""Dead-latent resampling (Bricken et al. 2023, "Towards Monosemanticity"), the optional alternative to AuxK.

Why: a latent that never fires gets no gradient, so it stays dead. Resampling gives each dead latent a
new direction drawn from where the coder is worst: inputs sampled with probability ∝ their squared
reconstruction error. The new decoder row is that input's (unit) direction, the encoder column points
the same way at 0.2x the mean norm of the live encoder columns for ReLU-style coders (the latent starts
firing weakly on inputs like it without dominating; 1x for the TopK family, where a weak latent would
never win a slot), its bias is zero, and its Adam moments restart at zero.

    train(..., resample_every=2500)        # every 2500 steps, until the lr decay starts

Under torchrun the ranks gather the per-row errors of the global batch, draw with a generator they all
share (the same draw a single process makes), and sum the picked rows each of them holds, so every rank
makes the same change as one process with the same global batch would.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from mechscope.sae import distributed

if TYPE_CHECKING:
    from mechscope.sae.trainer import Trainer

# new encoder column norm relative to the mean live column: 0.2 for threshold-style activations (Bricken
# et al. 2023: fire weakly at first); 1.0 for the TopK family, where a weak latent never wins a top-k slot
ENCODER_SCALE = {"relu": 0.2, "jumprelu": 0.2, "gated": 0.2}
TOPK_ENCODER_SCALE = 1.0


@torch.no_grad()
def resample_dead(trainer: Trainer, x: torch.Tensor, y: torch.Tensor | None, out: torch.Tensor,
                  generator: torch.Generator) -> int:
    """Re-initialise the trainer's dead latents from this batch (x [B, d_in], target y [B, d_out] or
    None, out [B, d_out] the coder's reconstruction in raw units). Returns how many were resampled."""
    coder, c = trainer.coder, trainer.cfg
    dead = (trainer.tokens_since_fired >= c.dead_window_tokens).nonzero().squeeze(1)  # [n_dead]
    n_dead = int(dead.numel())
    if n_dead == 0:
        return 0
    sc = coder.cfg
    x_s = coder._scaled_in(x)  # [B, d_in]
    y_s = x_s if y is None else y.to(x_s.dtype) * sc.output_scale  # [B, d_out]
    err = (y_s - out.to(x_s.dtype) * sc.output_scale).double().square().sum(1)  # [B]
    # one draw ∝ error over the GLOBAL batch (rank order = batch order), with a generator all ranks share;
    # each rank fills in the picked rows it holds and a sum over ranks gives everyone all of them
    g_err = distributed.all_gather(err)  # [B_global]
    pick = torch.multinomial(g_err.cpu() + 1e-30, n_dead, replacement=True, generator=generator).to(x.device)
    group = distributed.active()
    first = 0 if group is None else group.rank * x.shape[0]
    mine = (pick >= first) & (pick < first + x.shape[0])  # [n_dead]
    local = (pick - first).clamp(0, x.shape[0] - 1)
    vx = distributed.all_sum(torch.where(mine[:, None], x_s[local], 0))  # [n_dead, d_in]
    vy = distributed.all_sum(torch.where(mine[:, None], y_s[local], 0))  # [n_dead, d_out]
    if sc.apply_b_dec_to_input:  # an autoencoder's latents read and write x - b_dec
        vx = vx - coder.b_dec
        vy = vy - coder.b_dec
    unit_x = vx / vx.norm(dim=1, keepdim=True).clamp_min(1e-8)
    unit_y = vy / vy.norm(dim=1, keepdim=True).clamp_min(1e-8)
    alive = torch.ones(sc.n_latents, dtype=torch.bool, device=dead.device)
    alive[dead] = False
    enc_norm = coder.W_enc[:, alive].norm(dim=0).mean() if bool(alive.any()) else coder.W_enc.new_tensor(1.0)
    coder.W_dec[dead] = unit_y.to(coder.W_dec.dtype)
    scale = ENCODER_SCALE.get(sc.arch, TOPK_ENCODER_SCALE)
    coder.W_enc[:, dead] = (unit_x * (scale * enc_norm)).T.to(coder.W_enc.dtype)
    coder.b_enc[dead] = 0
    for name in ("b_mag", "r_mag"):  # gated: the magnitude path restarts from the gate's direction
        if hasattr(coder, name):
            getattr(coder, name)[dead] = 0
    _reset_adam_rows(trainer, dead)
    trainer.tokens_since_fired[dead] = 0  # a fresh window before they can count as dead again
    return n_dead


LATENT_AXIS = {"W_enc": 1, "W_dec": 0, "b_enc": 0, "b_mag": 0, "r_mag": 0}  # parameters reset per latent


def _reset_adam_rows(trainer: Trainer, dead: torch.Tensor) -> None:
    """Zero the Adam moments of the resampled latents (their old statistics belong to a dead direction)."""
    for name, p in trainer.coder.named_parameters():
        state = trainer.opt.state.get(p)
        if name not in LATENT_AXIS or not state:
            continue
        for key in ("exp_avg", "exp_avg_sq"):
            if key in state:
                state[key].index_fill_(LATENT_AXIS[name], dead, 0)
