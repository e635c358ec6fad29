"""MEMIT (Meng et al. 2023): write many facts at once, spread over several MLP layers.

    e = edit.memit(model, [{"prompt": ..., "subject": ..., "target": ...}, ...])

For each fact a residual delta at the last subject token of the *last* layer L of the range is optimised so the
model says the target (value.py: z_i = resid_post_L + delta_i). Then, layer by layer from the first, the
remaining residual change is shared out: at layer l (i-th of n), with the facts' keys K [n, d_mlp] (each averaged
over random prefixes, read with the earlier layers already edited) and the residual still missing at L,
R = (z - resid_L) / (n - i), the down projection gets the covariance-weighted least-squares update

    Delta = R^T K (lambda C + K^T K)^-1        [d_model, d_mlp]

which writes R for the new keys while keeping the outputs for ordinary keys (C = E[k k^T] from the built-in corpus,
lambda = mom2_weight, MEMIT's 15000 for GPT-J).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

import torch

from mechscope.edit.covariance import check_layer, key_covariance
from mechscope.edit.edits import Edit, apply_update
from mechscope.edit.locate import as_request, contexts, last_subject_index, random_prefixes
from mechscope.edit.rome import default_layer, subject_keys
from mechscope.edit.value import ValueSettings, optimise_delta
from mechscope.errors import InputError, NonFiniteError


def default_layers(model) -> list[int]:
    """Five layers ending at ROME's default layer + 2 (SmolLM2-135M: 4..8), like MEMIT's GPT-J range 3..8."""
    top = min(model.cfg.n_layers - 1, default_layer(model) + 2)
    return list(range(max(0, top - 4), top + 1))


@torch.no_grad()
def _resid_at_subject(model, layer: int, prompts: list[str], subjects: list[str]) -> torch.Tensor:
    """hook_resid_post of `layer` at the last subject token of each prompt: [n, d_model] float64."""
    name = f"blocks.{layer}.hook_resid_post"
    idx = [last_subject_index(model, p, s) for p, s in zip(prompts, subjects, strict=True)]
    tokens, mask = model.prepare(prompts, padding_side="right")
    _, cache = model.run_with_cache(tokens, attention_mask=mask, names_filter=name, return_type=None)
    return cache[name][torch.arange(len(prompts)), torch.tensor(idx)].to("cpu", torch.float64)


def memit(model, requests: Sequence[Any], *, layers: Sequence[int] | None = None, n_prefixes: int = 5,
          prefix_len: int = 10, cov_tokens: int = 20_000, cov_cache_dir: str | os.PathLike | None = None,
          mom2_weight: float = 15_000.0, seed: int = 0, steps: int = 20, lr: float = 0.5,
          kl_factor: float = 0.0625, weight_decay: float = 0.5, clamp_norm: float = 0.75,
          progress: bool = False) -> Edit:
    """Edit `model` in place so each request's prompt continues with its target; returns the Edit (undo() restores
    every edited matrix bit for bit). requests: dicts (or EditRequest) with prompt, subject, target. layers:
    the MLPs to edit, ascending (default `default_layers`). Typed errors: empty requests, a subject missing from
    its prompt, an unknown layer, NaN in an optimisation (the model is then left unchanged)."""
    if isinstance(requests, dict | str) or not isinstance(requests, Sequence) or not requests:
        raise InputError("memit needs a non-empty list of requests (dicts with prompt, subject and target).")
    reqs = [as_request(r, model) for r in requests]
    layers = default_layers(model) if layers is None else sorted({check_layer(model, int(x)) for x in layers})
    if not layers:
        raise InputError("memit needs at least one layer.")
    L = layers[-1]
    s = ValueSettings(steps=steps, lr=lr, kl_factor=kl_factor, weight_decay=weight_decay, clamp_norm=clamp_norm)
    prefixes = random_prefixes(model, n_prefixes, prefix_len, seed)
    ctxs = [contexts(r.prompt, prefixes) for r in reqs]
    prompts, subjects = [r.prompt for r in reqs], [r.subject for r in reqs]

    deltas, notes = [], []
    for i, (r, c) in enumerate(zip(reqs, ctxs, strict=True)):
        d, info = optimise_delta(model, "resid", L, r, c, s)
        deltas.append(d.double().cpu())
        notes.append({"subject": r.subject, **info})
        if progress:
            print(f"\rmemit: values {i + 1}/{len(reqs)}", end="", flush=True)
    if progress:
        print()
    z = _resid_at_subject(model, L, prompts, subjects) + torch.stack(deltas)  # [n, d_model] targets at L
    covs = key_covariance(model, layers, tokens=cov_tokens, cache_dir=cov_cache_dir)

    originals: dict[int, torch.Tensor] = {}
    changes: dict[int, torch.Tensor] = {}
    keys, values = {}, {}
    try:
        for i, layer in enumerate(layers):
            K = torch.stack([subject_keys(model, layer, r, c).mean(0) for r, c in zip(reqs, ctxs, strict=True)])
            R = (z - _resid_at_subject(model, L, prompts, subjects)) / (len(layers) - i)  # [n, d_model]
            A = mom2_weight * covs[layer].double() + K.T @ K  # [d_mlp, d_mlp]
            X = torch.linalg.solve(A, K.T)  # [d_mlp, n]
            update = R.T @ X.T  # [d_model, d_mlp]
            if not bool(torch.isfinite(update).all()):
                raise NonFiniteError(f"The MEMIT update of layer {layer} is not finite; the model was not changed.")
            apply_update(model, layer, update, originals, changes)
            keys[layer], values[layer] = K.float(), R.float()
    except BaseException:
        Edit(model, "memit", layers, reqs, originals, changes).undo()  # nothing half-done stays in the model
        raise
    return Edit(model, "memit", layers, reqs, originals, changes, keys=keys, values=values,
                info={"values": notes, "prefixes": prefixes, "cov_tokens": cov_tokens, "mom2_weight": mom2_weight})


__all__ = ["default_layers", "memit"]
