"""generate with monitors: tokenize, run the one generation loop with a MonitorRun watching, collect results.

model.generate(prompt, n, monitors=[...], on_token=...) lands here (models/generate.py forwards to it).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from mechscope.errors import InputError
from mechscope.models.generate import check_generation, run_generation
from mechscope.monitor.monitors import check_monitors
from mechscope.monitor.runtime import MonitorRun
from mechscope.monitor.trace import MonitoredGeneration, TokenTrace


def generate_monitored(model, input: str | Sequence[str], max_new_tokens: int = 20, *, monitors=None,
                       on_token: Callable[[TokenTrace], Any] | None = None, stop_at_eos: bool = True,
                       eos_token_id: int | None = None, prepend_bos: bool | None = None,
                       **loop) -> MonitoredGeneration | list[MonitoredGeneration]:
    """One MonitoredGeneration for a prompt string, a list of them for a list of prompts (batched, left-padded:
    each row generates what it would alone). `loop`: the sampling / hooks / interventions options of generate."""
    check_generation(model, max_new_tokens)
    single = isinstance(input, str)
    prompts = [input] if single else input
    if not isinstance(prompts, list | tuple) or not prompts or not all(isinstance(p, str) for p in prompts):
        raise InputError("generate with monitors= / on_token= takes a prompt string or a non-empty list of them "
                         f"(token ids are not accepted: the trace decodes text); got {type(input).__name__}.")
    items = check_monitors(monitors)
    for m in items:
        m.check(model)  # unknown hook, another model's probe or SAE: fails before any forward
    if on_token is not None and not callable(on_token):
        raise InputError(f"on_token must be callable(TokenTrace) -> bool | None, got {type(on_token).__name__}.")
    tok = model.require_tokenizer()
    tokens, mask = model.to_tokens(list(prompts), prepend_bos, padding_side="left", return_mask=True)
    if eos_token_id is None:
        eos_token_id = tok.eos_token_id
    run = MonitorRun(items, tok, on_token=on_token, eos_token_id=eos_token_id if stop_at_eos else None)
    run_generation(model, tokens, mask, max_new_tokens, stop_at_eos=stop_at_eos, eos_token_id=eos_token_id,
                   observer=run, **loop)
    results = []
    for b, prompt in enumerate(prompts):
        ids = run.emitted[b]
        shown = ids[:-1] if run.stopped_by[b] == "eos" else ids  # the EOS token is in the trace, not the text
        results.append(MonitoredGeneration(prompt=prompt, text=tok.decode(shown, skip_special_tokens=False),
                                           trace=run.traces[b], alerts=run.alerts[b],
                                           stopped_by=run.stopped_by[b], token_ids=list(ids)))
    return results[0] if single else results


__all__ = ["generate_monitored"]
