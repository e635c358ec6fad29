"""Where an edit reads and writes: the request, the last subject token, the key and the prefixes.

ROME and MEMIT read the *key* (the input of an MLP's down projection, `blocks.{l}.mlp.hook_post`) at the last
token of the subject, because causal tracing finds that the fact is recalled there. The key is averaged over
a few random prefixes so the edit does not depend on the exact text before the subject.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from mechscope.errors import InputError


@dataclass
class EditRequest:
    """One fact to write: `prompt` mentions `subject`; afterwards the model should continue it with `target`.
    `old`, `paraphrases` and `neighbours` are only used by the evaluation (CounterFact's measures)."""

    prompt: str
    subject: str
    target: str
    old: str | None = None
    paraphrases: list[str] = field(default_factory=list)
    neighbours: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {"prompt": self.prompt, "subject": self.subject, "target": self.target, "old": self.old,
                "paraphrases": list(self.paraphrases), "neighbours": list(self.neighbours)}


def as_request(r: Any, model=None) -> EditRequest:
    """An EditRequest from itself or a mapping with at least prompt, subject and target (checked: the subject
    must occur in the prompt; with `model` the error shows the prompt's tokens)."""
    if isinstance(r, EditRequest):
        req = r
    elif isinstance(r, Mapping):
        missing = [k for k in ("prompt", "subject", "target") if not isinstance(r.get(k), str) or not r.get(k)]
        if missing:
            raise InputError(f"An edit request needs non-empty strings prompt, subject and target; {missing} "
                             f"missing or empty in {dict(r)!r:.200}.")
        unknown = set(r) - {"prompt", "subject", "target", "old", "paraphrases", "neighbours"}
        if unknown:
            raise InputError(f"Unknown keys {sorted(unknown)} in an edit request; use prompt, subject, target "
                             "(and old, paraphrases, neighbours for the evaluation).")
        req = EditRequest(r["prompt"], r["subject"], r["target"], r.get("old"), list(r.get("paraphrases") or []),
                          list(r.get("neighbours") or []))
    else:
        raise InputError(f"An edit request is a dict with prompt, subject and target, got {type(r).__name__}.")
    if req.subject not in req.prompt:
        tokens = f" (tokens {model.to_str_tokens(req.prompt)})" if model is not None else ""
        raise InputError(f"The subject {req.subject!r} was not found in the prompt {req.prompt!r}{tokens}; the "
                         "subject must appear in the prompt verbatim.")
    return req


def target_tokens(model, target: str) -> list[int]:
    """The target's token ids (no BOS). Several tokens are fine: the value is optimised for the whole sequence."""
    if not isinstance(target, str) or not target:
        raise InputError(f"The target must be a non-empty string, got {target!r}.")
    try:
        ids = model.to_tokens(target, prepend_bos=False)[0].tolist()
    except InputError:
        ids = []
    if not ids:
        raise InputError(f"The target {target!r} tokenizes to nothing.")
    return ids


def last_subject_index(model, text: str, subject: str) -> int:
    """Index (in the model's tokenization of `text`, BOS included if the model adds one) of the last token of
    the last occurrence of `subject`. Raises InputError showing the tokens if the subject does not end on a
    token boundary (e.g. a subject that stops mid-word)."""
    at = text.rfind(subject)
    if at < 0:
        raise InputError(f"The subject {subject!r} does not occur in {text!r}.")
    end = at + len(subject)
    full = model.to_tokens(text)[0].tolist()
    head = model.to_tokens(text[:end])[0].tolist()
    if full[:len(head)] != head:
        raise InputError(f"The subject {subject!r} does not end on a token boundary in {text!r}; the tokens are "
                         f"{model.to_str_tokens(text)}. Choose a subject that ends where a token ends.")
    return len(head) - 1


PREFIX_STARTS = ("The", "Therefore", "Because", "I", "You")


@torch.no_grad()
def random_prefixes(model, n: int = 5, length: int = 10, seed: int = 0) -> list[str]:
    """`n` short texts sampled from the model itself (as in ROME), each ending with '. ' so a prompt can follow.
    Deterministic under `seed`; an empty list when n = 0."""
    if n <= 0:
        return []
    starts = [PREFIX_STARTS[i % len(PREFIX_STARTS)] for i in range(n)]
    out = model.generate(starts, length, do_sample=True, top_k=5, seed=seed, stop_at_eos=False)
    return [" ".join(t.replace("\n", " ").split()) + ". " for t in out]


def contexts(prompt: str, prefixes: Sequence[str]) -> list[str]:
    """The prompt alone, then the prompt after each prefix."""
    return [prompt] + [p + prompt for p in prefixes]


__all__ = ["EditRequest", "as_request", "contexts", "last_subject_index",
           "random_prefixes", "target_tokens"]
