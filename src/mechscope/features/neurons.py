"""The neuron baseline: the same feature analysis for raw MLP neurons, to show what an SAE adds.

    coder = neuron_coder(model, layer=6, k=32)        # latents = the layer's MLP neurons, top-32 per token
    stats = feature_stats(model, coder, "sotu")        # densities, top contexts, logit effects of neurons

`neuron_coder` returns an ordinary `SparseCoder` whose latents ARE the MLP neurons, so every tool that takes
a coder (feature_stats, dashboards, explanations, scoring) runs on neurons unchanged:

- it reads `blocks.{layer}.mlp.hook_post` (the MLP hidden activations; act(gate) * up for gated MLPs,
  signed) through an identity encoder with zero bias;
- its decoder rows are the layer's `W_out` rows and `b_dec` is the MLP's output bias, so decoding the
  raw (signed) hidden activations gives `hook_mlp_out` exactly (except for models with a norm on the MLP
  output, Gemma 2/3, where it gives the input of that norm); it is a transcoder hook_post -> hook_mlp_out;
- logit effects of a "feature" are then the neuron's direct effect on the logits.

Why k (the sparsified "top-k neurons" baseline of Paulo et al. 2024, EleutherAI's automated
interpretability): a neuron "fires" when its activation is > 0, and with GELU/SiLU-type activations
about half the neurons are positive on any token. A neuron of density ~0.5 has no token-level
explanation that separates the tokens where it fires from the rest, so explanation scores of dense
neurons measure mostly that density, not interpretability. With k set, each token keeps only its k most
active neurons (the same L0 as a TopK SAE with that k), so neurons and SAE latents are compared at equal
sparsity and any gap in interpretability is what the SAE adds.
"""

from __future__ import annotations

import torch

from mechscope.errors import InputError
from mechscope.sae.coder import SparseCoder
from mechscope.sae.config import SAEConfig

__all__ = ["neuron_coder"]


def neuron_coder(model, layer: int, *, k: int | None = None) -> SparseCoder:
    """A SparseCoder whose latents are the MLP neurons of `layer` (see the module docstring).

    k=None: arch "relu", every neuron with a positive activation fires (dense: ~half the neurons).
    k: arch "topk", the k most active positive neurons per token (equal-L0 baseline for a TopK SAE)."""
    c = model.cfg
    if isinstance(layer, bool) or not isinstance(layer, int) or not 0 <= layer < c.n_layers:
        raise InputError(f"layer must be an int in [0, {c.n_layers}), got {layer!r}.")
    if c.attn_only:
        raise InputError(f"{c.model_name} is attention-only: it has no MLP neurons.")
    d_mlp = c.d_mlp
    if k is not None and (isinstance(k, bool) or not isinstance(k, int) or not 0 < k <= d_mlp):
        raise InputError(f"k must be None or an int in [1, d_mlp={d_mlp}], got {k!r}.")
    from mechscope.models.identity import model_identity

    mlp = model.blocks[layer].mlp
    w_out = mlp.W_out.detach().float()  # [d_mlp, d_model]
    b_out = mlp.down.bias
    cfg = SAEConfig(
        arch="relu" if k is None else "topk", d_in=d_mlp, n_latents=d_mlp, d_out=c.d_model, k=k,
        apply_b_dec_to_input=False, hook_in=f"blocks.{layer}.mlp.hook_post", hook_out=f"blocks.{layer}.hook_mlp_out",
        model_name=c.model_name, model_identity=model_identity(model),
        extra={"baseline": "mlp_neurons", "layer": layer, "exact_decode": not c.post_mlp_norm},
    )
    coder = SparseCoder(cfg, device=w_out.device, dtype=torch.float32)
    with torch.no_grad():
        coder.W_enc.copy_(torch.eye(d_mlp))  # [d_mlp, d_mlp]: latent i reads neuron i
        coder.W_dec.copy_(w_out)  # [d_mlp, d_model]: and writes W_out[i]
        if b_out is not None:
            coder.b_dec.copy_(b_out.detach().float())  # [d_model] (never subtracted from the input)
    return coder.requires_grad_(False)
