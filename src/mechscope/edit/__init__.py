"""Act on what you found: steering vectors, SAE feature clamping, directional ablation (and, later, ROME/MEMIT).

    from mechscope import edit
    v = edit.contrastive_vector(model, positive, negative, "blocks.12.hook_resid_post")
    model.generate("The movie was", 20, interventions=[edit.steer(v, "blocks.12.hook_resid_post", scale=6)])
    model(tokens, interventions=[edit.ClampFeatures(coder, {123: 10.0})])
    edit.orthogonalize(model, direction)          # == model(..., interventions=edit.directional_ablation(...))
"""

from mechscope.edit.ablation import directional_ablation, orthogonalize, residual_hooks
from mechscope.edit.steering import (
           ClampFeatures,
           contrastive_vector,
           from_json,
           sae_direction,
           steer,
           to_json,
)

__all__ = ["ClampFeatures", "contrastive_vector", "directional_ablation", "from_json", "orthogonalize",
           "residual_hooks", "sae_direction", "steer", "to_json"]
