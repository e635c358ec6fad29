"""Directional ablation everywhere in the residual stream, as hooks or as an equivalent weight edit.

    hooks = directional_ablation(model, refusal_dir)          # Ablate at every residual point
    model(tokens, interventions=hooks)
    orthogonalize(model, refusal_dir)                         # the same model, with the direction edited out of
    model.save_pretrained("no-refusal")                       # every weight that writes to the residual

Arditi et al. (2024) ablate a direction d from every residual-stream activation, and show the same model is
obtained by orthogonalising every matrix (and bias) that writes to the residual stream: W <- (I - d d^T) W.
Why the two are equal: the residual is a sum of writes; if no write has a component along d, neither has the sum,
and projecting a sum is the sum of projections, so both give the same residual at every layer.
"""

from __future__ import annotations

import torch

from mechscope.errors import InputError, UnsupportedArchitectureError
from mechscope.models.interventions import Ablate


def _unit(model, direction: torch.Tensor) -> torch.Tensor:
    d = torch.as_tensor(direction).detach().float().reshape(-1)
    if d.shape[0] != model.cfg.d_model or not bool(torch.isfinite(d).all()) or float(d.norm()) == 0:
        raise InputError(f"The direction must be a finite non-zero vector of width d_model = {model.cfg.d_model}, "
                         f"got shape {tuple(torch.as_tensor(direction).shape)}.")
    return d / d.norm()


def residual_hooks(model) -> list[str]:
    """Every residual-stream point: each block's input and middle, and the last block's output."""
    c = model.cfg
    names = []
    for layer in range(c.n_layers):
        names.append(f"blocks.{layer}.hook_resid_pre")
        if f"blocks.{layer}.hook_resid_mid" in model.hook_dict:
            names.append(f"blocks.{layer}.hook_resid_mid")
    names.append(f"blocks.{c.n_layers - 1}.hook_resid_post")
    return names


def directional_ablation(model, direction: torch.Tensor) -> list[Ablate]:
    """Ablate interventions projecting `direction` [d_model] out of every residual-stream point."""
    d = _unit(model, direction)
    return [Ablate(name, d) for name in residual_hooks(model)]


def _check_orthogonalizable(model) -> None:
    c = model.cfg
    if c.post_attn_norm or c.post_mlp_norm or c.post_layernorm or c.embed_norm:
        raise UnsupportedArchitectureError(
            f"{c.architecture} normalises what it writes to the residual (post-attention/MLP or post-LN norms), so "
            "orthogonalising its weights is not the same as ablating the direction; use the hook form, "
            "directional_ablation(model, direction), instead.")


@torch.no_grad()
def orthogonalize(model, direction: torch.Tensor):
    """Edit `model` in place so no weight writes along `direction`: the embeddings, each attention output and
    MLP output projection (and their biases). A tied unembedding is untied first (the output must not change).
    Returns the model; `save_pretrained` then writes a folder that reloads as the edited model."""
    _check_orthogonalizable(model)
    d = _unit(model, direction)

    def rows(w: torch.Tensor) -> None:  # [n, D]: each row is a residual-stream vector
        dd = d.to(w.device, w.dtype)
        w.sub_((w @ dd)[:, None] * dd[None, :])

    def columns(w: torch.Tensor) -> None:  # [D, n] (nn.Linear out x in): each column writes to the residual
        dd = d.to(w.device, w.dtype)
        w.sub_(dd[:, None] * (dd @ w)[None, :])

    if model.cfg.has_unembed and model.unembed.weight is model.embed.weight:
        model.unembed.weight = torch.nn.Parameter(model.embed.weight.detach().clone())
        model.cfg.tie_word_embeddings = False
    rows(model.embed.weight)
    if hasattr(model, "pos_embed"):
        rows(model.pos_embed.weight)
    for block in model.blocks:
        for lin in (block.attn.o, *((block.mlp.down,) if hasattr(block, "mlp") else ())):
            columns(lin.weight)
            if lin.bias is not None:
                lin.bias.sub_(d.to(lin.bias.device, lin.bias.dtype) * (lin.bias @ d.to(lin.bias.device, lin.bias.dtype)))
    return model


__all__ = ["directional_ablation", "orthogonalize", "residual_hooks"]
