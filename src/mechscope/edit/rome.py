"""ROME (Meng et al. 2022): write one fact with a rank-one update of one MLP's output projection.

    e = edit.rome(model, prompt="The Eiffel Tower is located in the city of", subject="The Eiffel Tower",
                  target=" Rome")
    e.undo()

The MLP's down projection W [d_model, d_mlp] is read as a key-value memory: the key k (its input,
`blocks.{l}.mlp.hook_post`) at the last subject token selects the value W k. ROME finds k* (the key averaged over
random prefixes), a value v* that makes the model say the target (value.py), and the smallest change of W, in
the metric of the key covariance C, that maps k* to v*:

    W <- W + (v* - W k* - b) (C^-1 k*)^T / (k*^T C^-1 k*)

so W' k* + b = v* exactly, and keys k with k^T C^-1 k* = 0 are unchanged. Works for gated MLPs (Llama, Qwen,
Gemma: the key is the input of the down projection) and plain ones (GPT-2, NeoX) alike.
"""

from __future__ import annotations

import os

import torch

from mechscope.edit.covariance import check_layer, key_covariance
from mechscope.edit.edits import Edit, apply_update, down_weight
from mechscope.edit.locate import EditRequest, as_request, contexts, last_subject_index, random_prefixes
from mechscope.edit.value import ValueSettings, optimise_delta
from mechscope.errors import InputError, NonFiniteError


def default_layer(model) -> int:
    """An early-middle MLP (20% of the depth; SmolLM2-135M: 6 of 30), where causal tracing finds facts
    recalled at the last subject token in small models (ROME used GPT-J's layer 5 of 28)."""
    return max(0, round(0.2 * model.cfg.n_layers))


@torch.no_grad()
def subject_keys(model, layer: int, req: EditRequest, ctxs: list[str]) -> torch.Tensor:
    """The keys [len(ctxs), d_mlp] (float64) at the last subject token of each context."""
    name = f"blocks.{layer}.mlp.hook_post"
    idx = [last_subject_index(model, c, req.subject) for c in ctxs]
    tokens, mask = model.prepare(ctxs, padding_side="right")
    _, cache = model.run_with_cache(tokens, attention_mask=mask, names_filter=name, return_type=None)
    act = cache[name]  # [B, T, d_mlp]
    return act[torch.arange(len(ctxs)), torch.tensor(idx)].to("cpu", torch.float64)


def rank_one_update(W: torch.Tensor, bias: torch.Tensor | None, C: torch.Tensor, k: torch.Tensor,
                    v: torch.Tensor) -> torch.Tensor:
    """The update [d_model, d_mlp] (float64) with (W + update) k + b = v and no change for C^-1-orthogonal keys."""
    W, C, k, v = W.double().cpu(), C.double().cpu(), k.double().cpu(), v.double().cpu()
    b = torch.zeros_like(v) if bias is None else bias.detach().double().cpu()
    try:
        u = torch.linalg.solve(C, k)  # C^-1 k
    except RuntimeError as e:  # singular covariance
        raise InputError("The key covariance is singular; estimate it from more tokens (cov_tokens=).") from e
    denom = float(k @ u)
    if not torch.isfinite(u).all() or denom <= 0:
        raise NonFiniteError("The key covariance gave a non-finite or non-positive k^T C^-1 k; the model was not "
                             "changed. Estimate the covariance from more tokens (cov_tokens=).")
    return torch.outer(v - W @ k - b, u) / denom


def rome(model, prompt: str, subject: str, target: str, *, layer: int | None = None, n_prefixes: int = 5,
         prefix_len: int = 10, cov_tokens: int = 20_000, cov_cache_dir: str | os.PathLike | None = None,
         seed: int = 0, steps: int = 20, lr: float = 0.5, kl_factor: float = 0.0625, weight_decay: float = 0.5,
         clamp_norm: float = 4.0) -> Edit:
    """Edit `model` in place so that `prompt` (which mentions `subject`) continues with `target`; returns the
    Edit (`.undo()` restores the weights bit for bit). A target of several tokens is handled: the value is
    optimised for the whole token sequence. layer: the MLP to edit (default `default_layer`); the covariance
    of its keys comes from `cov_tokens` tokens of the built-in corpus `sotu`, cached on disk. If the value
    optimisation turns NaN a NonFiniteError is raised and the model is untouched."""
    req = as_request({"prompt": prompt, "subject": subject, "target": target}, model)
    layer = default_layer(model) if layer is None else check_layer(model, layer)
    ctxs = contexts(req.prompt, random_prefixes(model, n_prefixes, prefix_len, seed))
    s = ValueSettings(steps=steps, lr=lr, kl_factor=kl_factor, weight_decay=weight_decay, clamp_norm=clamp_norm)
    delta, info = optimise_delta(model, "mlp", layer, req, ctxs, s)
    k = subject_keys(model, layer, req, ctxs).mean(0)  # k* [d_mlp]
    C = key_covariance(model, layer, tokens=cov_tokens, cache_dir=cov_cache_dir)[layer]
    lin = model.blocks[layer].mlp.down
    W = down_weight(model, layer).detach()
    b = None if lin.bias is None else lin.bias.detach()
    v = W.double().cpu() @ k + (0 if b is None else b.double().cpu()) + delta.double().cpu()  # v* [d_model]
    update = rank_one_update(W, b, C, k, v)
    if not bool(torch.isfinite(update).all()):
        raise NonFiniteError("The ROME update is not finite; the model was not changed.")
    originals: dict[int, torch.Tensor] = {}
    deltas: dict[int, torch.Tensor] = {}
    apply_update(model, layer, update, originals, deltas)
    info.update(prefixes=ctxs[1:], cov_tokens=cov_tokens)
    return Edit(model, "rome", [layer], [req], originals, deltas, keys={layer: k.float()[None]},
                values={layer: v.float()[None]}, info=info)


__all__ = ["default_layer", "rank_one_update", "rome", "subject_keys"]
