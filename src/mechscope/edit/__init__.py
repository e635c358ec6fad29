"""Act on what you found: steering vectors, SAE feature clamping, directional ablation, and targeted editing of
facts (ROME, MEMIT).

    from mechscope import edit
    v = edit.contrastive_vector(model, positive, negative, "blocks.12.hook_resid_post")
    model.generate("The movie was", 20, interventions=[edit.steer(v, "blocks.12.hook_resid_post", scale=6)])
    model(tokens, interventions=[edit.ClampFeatures(coder, {123: 10.0})])
    edit.orthogonalize(model, direction)          # == model(..., interventions=edit.directional_ablation(...))
    e = edit.rome(model, prompt="The Eiffel Tower is located in the city of", subject="The Eiffel Tower",
                  target=" Rome")                 # in place; e.undo() restores the weights bit for bit
    e = edit.memit(model, requests=[{"prompt": ..., "subject": ..., "target": ...}, ...])
    edit.evaluate_edits(model, edit.requests.load())   # CounterFact's efficacy, generalisation, specificity
"""

from mechscope.edit import requests
from mechscope.edit.ablation import directional_ablation, orthogonalize, residual_hooks
from mechscope.edit.covariance import key_covariance
from mechscope.edit.edits import Edit
from mechscope.edit.evaluate import evaluate_edits, ngram_entropy
from mechscope.edit.locate import EditRequest
from mechscope.edit.memit import memit
from mechscope.edit.rome import rome
from mechscope.edit.steering import (
           ClampFeatures,
           contrastive_vector,
           from_json,
           sae_direction,
           steer,
           to_json,
)

__all__ = ["ClampFeatures", "Edit", "EditRequest", "contrastive_vector", "directional_ablation", "evaluate_edits",
           "from_json", "key_covariance", "memit", "ngram_entropy", "orthogonalize", "requests", "residual_hooks",
           "rome", "sae_direction", "steer", "to_json"]
