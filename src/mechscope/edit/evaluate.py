"""CounterFact's measures of an edit (Meng et al. 2022): does the model now say the new object where it should,
and only there, and does it still write fluently?

- efficacy: P(new) > P(old) on the edit prompt;
- generalisation: the same on paraphrases of the prompt;
- specificity: P(old) > P(new) on neighbourhood prompts (other subjects whose answer is the old object);
- fluency: n-gram entropy of greedy generations from the prompt and its paraphrases (weighted bi- and tri-gram
  entropy in bits, as CounterFact's `compute_n_gram_entropy`; repetitive, degenerate text scores low).

Probabilities are of the whole target token sequence (teacher-forced), so several-token objects are fine.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Sequence
from typing import Any

import torch

from mechscope.edit.locate import EditRequest, as_request, target_tokens
from mechscope.errors import InputError


@torch.no_grad()
def sequence_logprob(model, prompts: Sequence[str], answer: str) -> torch.Tensor:
    """log P(answer's tokens | prompt) for each prompt: [n] float32."""
    tids = target_tokens(model, answer)
    rows = [model.to_tokens(p)[0].tolist() for p in prompts]
    T = max(len(r) for r in rows) + len(tids)
    tokens = torch.zeros(len(rows), T, dtype=torch.long)
    mask = torch.zeros(len(rows), T, dtype=torch.long)
    for i, r in enumerate(rows):
        full = r + tids
        tokens[i, :len(full)] = torch.tensor(full)
        mask[i, :len(full)] = 1
    logp = model(tokens.to(model.device), attention_mask=mask.to(model.device)).float().log_softmax(-1)
    out = torch.zeros(len(rows))
    for i, r in enumerate(rows):
        for j, t in enumerate(tids):
            out[i] += logp[i, len(r) - 1 + j, t].cpu()
    return out


def ngram_entropy(text: str, ns: Sequence[int] = (2, 3), weights: Sequence[float] = (2 / 3, 4 / 3)) -> float:
    """CounterFact's fluency: the weighted mean over n of the entropy (bits) of the text's word n-grams."""
    words = text.split()
    ents = []
    for n, w in zip(ns, weights, strict=True):
        grams = Counter(tuple(words[i:i + n]) for i in range(len(words) - n + 1))
        total = sum(grams.values())
        ent = -sum(c / total * math.log2(c / total) for c in grams.values()) if total else 0.0
        ents.append(w * ent)
    return sum(ents) / len(ents)


@torch.no_grad()
def fluency(model, prompts: Sequence[str], max_new_tokens: int = 40) -> float:
    """Mean n-gram entropy of greedy continuations of `prompts`."""
    texts = model.generate(list(prompts), max_new_tokens, stop_at_eos=False)
    return sum(ngram_entropy(t) for t in texts) / len(texts)


def evaluate_request(model, request: Any, *, fluency_tokens: int = 0) -> dict[str, Any]:
    """Per-request scores (1/0 per prompt averaged) and log-probabilities; fluency when fluency_tokens > 0.
    The request needs `old` (the true object); paraphrases and neighbours are optional."""
    r: EditRequest = as_request(request, model)
    if r.old is None:
        raise InputError(f"Evaluating the request about {r.subject!r} needs `old`, the true object.")
    out: dict[str, Any] = {"subject": r.subject, "target": r.target, "old": r.old}
    groups = {"efficacy": [r.prompt], "generalisation": r.paraphrases, "specificity": r.neighbours}
    for name, prompts in groups.items():
        if not prompts:
            out[name] = None
            continue
        new, old = sequence_logprob(model, prompts, r.target), sequence_logprob(model, prompts, r.old)
        wins = (old > new) if name == "specificity" else (new > old)
        out[name] = float(wins.float().mean())
        out[f"{name}_p_new"] = float(new.exp().mean())
        out[f"{name}_p_old"] = float(old.exp().mean())
    if fluency_tokens > 0:
        out["fluency"] = fluency(model, [r.prompt, *r.paraphrases], fluency_tokens)
    return out


def evaluate_edits(model, requests: Sequence[Any], *, fluency_tokens: int = 0) -> dict[str, Any]:
    """Mean efficacy / generalisation / specificity (and fluency) over `requests` on the model as it is now (edit
    first to score the edited model, or score the unedited one as the baseline), plus the per-request rows."""
    reqs = [as_request(r, model) for r in requests]
    if not reqs or any(r.old is None for r in reqs):
        raise InputError("evaluate_edits needs a non-empty list of requests, each with `old` (the true object).")
    rows = [evaluate_request(model, r, fluency_tokens=fluency_tokens) for r in reqs]
    summary: dict[str, Any] = {"n": len(rows), "rows": rows}
    for key in ("efficacy", "generalisation", "specificity", "fluency"):
        vals = [row[key] for row in rows if row.get(key) is not None]
        summary[key] = sum(vals) / len(vals) if vals else None
    return summary


__all__ = ["evaluate_edits", "evaluate_request", "fluency", "ngram_entropy", "sequence_logprob"]
