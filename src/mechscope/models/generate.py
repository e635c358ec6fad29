"""Autoregressive generation with a pre-allocated KV cache, sampling, and hooks active throughout.

Batched prompts are left-padded; positions count real tokens, so a padded batch generates
exactly what each prompt generates alone.
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from typing import TYPE_CHECKING, Literal, Protocol

import torch

from mechscope.errors import ContextLengthError, InputError, NonFiniteError
from mechscope.models.components import KVCache
from mechscope.models.interventions import Intervention

if TYPE_CHECKING:
    from mechscope.models.transformer import FwdHooks, HookedTransformer


def sample_next(
    logits: torch.Tensor,  # [B, V] last-position logits
    do_sample: bool,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    generator: torch.Generator | None = None,
) -> torch.Tensor:  # [B] token ids
    if not do_sample or temperature == 0:
        return logits.argmax(-1)
    if temperature <= 0:
        raise InputError(f"temperature must be > 0 when sampling, got {temperature}.")
    logits = logits.float() / temperature
    if top_k is not None:
        if top_k < 1:
            raise InputError(f"top_k must be >= 1, got {top_k}.")
        kth = logits.topk(min(top_k, logits.shape[-1]), dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None:
        if not 0 < top_p <= 1:
            raise InputError(f"top_p must be in (0, 1], got {top_p}.")
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        cum = sorted_logits.softmax(-1).cumsum(-1)
        drop = cum - sorted_logits.softmax(-1) >= top_p  # keep the smallest prefix reaching top_p
        sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
        logits = torch.full_like(logits, float("-inf")).scatter(-1, order, sorted_logits)
    probs = logits.softmax(-1)
    if bool(torch.isnan(probs).any()):  # torch.multinomial would fail with an untyped RuntimeError
        raise NonFiniteError("The model's next-token logits are NaN, so no token can be sampled (an fp16 overflow, "
                             "or a hook or intervention writing NaN). Run in float32 (dtype=torch.float32) or check "
                             "the hooks and interventions active during generate.")
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


def check_generation(model: HookedTransformer, max_new_tokens) -> None:
    """InputError unless `model` can generate and max_new_tokens is an int >= 0."""
    if not model.cfg.causal:
        raise InputError(f"{model.cfg.architecture} is an encoder; it cannot generate.")
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 0:
        raise InputError(f"max_new_tokens must be an int >= 0, got {max_new_tokens!r}.")


def generate(
    model: HookedTransformer,
    input: str | Sequence[str] | torch.Tensor,
    max_new_tokens: int = 20,
    *,
    do_sample: bool = False,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    seed: int | None = None,
    stop_at_eos: bool = True,
    eos_token_id: int | None = None,
    attention_mask: torch.Tensor | None = None,
    prepend_bos: bool | None = None,
    use_kv_cache: bool = True,
    fwd_hooks: FwdHooks = (),
    interventions: Intervention | Sequence[Intervention] | None = None,
    return_type: Literal["auto", "str", "tokens"] = "auto",
    monitors=None,
    on_token=None,
):
    """Greedy or sampled continuation. Returns text for text input (prompt + completion) or
    token ids [B, T + new] for token input (after EOS, finished rows are filled with pad/EOS).
    interventions apply to the prompt and to every generated token (they select absolute positions).

    monitors= (a list of mechscope.monitor.Monitor) or on_token= (a callback per step) return a
    mechscope.monitor.MonitoredGeneration instead (text, per-token trace, alerts); see mechscope/monitor.
    Without them this path is unchanged (no cost)."""
    if monitors is not None or on_token is not None:
        # lazy: models/ does not depend on monitor/ (monitor/ builds on run_generation below)
        from mechscope.monitor.generation import generate_monitored

        return generate_monitored(
            model, input, max_new_tokens, monitors=monitors, on_token=on_token, do_sample=do_sample,
            temperature=temperature, top_k=top_k, top_p=top_p, seed=seed, stop_at_eos=stop_at_eos,
            eos_token_id=eos_token_id, prepend_bos=prepend_bos, use_kv_cache=use_kv_cache, fwd_hooks=fwd_hooks,
            interventions=interventions)
    check_generation(model, max_new_tokens)
    text_in = isinstance(input, str) or (isinstance(input, list | tuple) and input and isinstance(input[0], str))
    if text_in:
        tokens, mask = model.to_tokens(input, prepend_bos, padding_side="left", return_mask=True)
    else:
        tokens, mask = model.prepare(input, attention_mask, prepend_bos, "left")
        mask = torch.ones_like(tokens) if mask is None else mask
        if not bool(mask[:, -1].all()):  # right-padded: move each row's real tokens to the end
            order = torch.argsort(mask, dim=1, stable=True)  # pads (0) first, real tokens keep their order
            tokens, mask = tokens.gather(1, order), mask.gather(1, order)
    out, mask = run_generation(model, tokens, mask, max_new_tokens, do_sample=do_sample, temperature=temperature,
                               top_k=top_k, top_p=top_p, seed=seed, stop_at_eos=stop_at_eos,
                               eos_token_id=eos_token_id, use_kv_cache=use_kv_cache, fwd_hooks=fwd_hooks,
                               interventions=interventions)
    T = tokens.shape[1]
    tok = model.tokenizer
    if eos_token_id is None and tok is not None:
        eos_token_id = tok.eos_token_id
    if return_type == "tokens" or (return_type == "auto" and not text_in):
        return out
    texts = []
    for row, m in zip(out, mask[:, :T]):
        new = row[T:].tolist()
        if eos_token_id in new:  # cut after the first EOS (the rest is padding)
            new = new[: new.index(eos_token_id) + 1]
        texts.append(tok.decode(row[:T][m.bool()].tolist() + new, skip_special_tokens=False))
    if return_type == "str" and not text_in and len(texts) == 1:
        return texts[0]
    return texts[0] if isinstance(input, str) else texts


def run_generation(
    model: HookedTransformer,
    tokens: torch.Tensor,  # [B, T] left-padded prompt ids
    mask: torch.Tensor,  # [B, T] 1 = real token
    max_new_tokens: int,
    *,
    do_sample: bool = False,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    seed: int | None = None,
    stop_at_eos: bool = True,
    eos_token_id: int | None = None,
    use_kv_cache: bool = True,
    fwd_hooks: FwdHooks = (),
    interventions: Intervention | Sequence[Intervention] | None = None,
    observer: GenerationObserver | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:  # ([B, T + new] ids, [B, T + new - 1] mask)
    """The generation loop on prepared (left-padded) tokens. `observer` (optional) sees every step: its
    `active()` context is entered around the loop (it registers read-only hooks there), and `step(...)`
    after each forward decides which rows' token is blocked and whether to stop; see GenerationObserver."""
    check_generation(model, max_new_tokens)
    B, T = tokens.shape
    if T + max_new_tokens > model.cfg.n_ctx:
        raise ContextLengthError(
            f"Prompt ({T}) + max_new_tokens ({max_new_tokens}) exceeds the context of {model.cfg.n_ctx}."
        )
    tok = model.tokenizer
    if eos_token_id is None and tok is not None:
        eos_token_id = tok.eos_token_id
    if not stop_at_eos:
        eos_token_id = None  # EOS is then an ordinary token
    pad_id = eos_token_id if eos_token_id is not None else 0  # fills rows that already ended
    gen = torch.Generator(device=model.device).manual_seed(seed) if seed is not None else None
    cache = KVCache(model.cfg, B, T + max_new_tokens, model.device, model.dtype) if use_kv_cache else None

    out = tokens
    finished = torch.zeros(B, dtype=torch.bool, device=model.device)
    watch = observer.active(model, tokens, mask) if observer is not None else contextlib.nullcontext()
    with model.interventions(interventions), model.hooks(fwd_hooks), watch:
        logits = model(tokens, attention_mask=mask, kv_cache=cache)
        for step in range(max_new_tokens):
            nxt = sample_next(logits[:, -1], do_sample, temperature, top_k, top_p, gen)
            nxt = torch.where(finished, torch.full_like(nxt, pad_id), nxt)
            halt = False
            if observer is not None:  # it may block rows' tokens (they end here) or stop everything
                blocked, halt = observer.step(step, nxt, finished)
                nxt = torch.where(blocked, torch.full_like(nxt, pad_id), nxt)
                finished |= blocked
            out = torch.cat([out, nxt[:, None]], dim=1)
            if eos_token_id is not None:
                finished |= nxt == eos_token_id
            if halt or step == max_new_tokens - 1 or bool(finished.all()):
                break
            mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
            if cache is not None:
                logits = model(nxt[:, None], attention_mask=mask, kv_cache=cache)
            else:
                logits = model(out, attention_mask=mask)
    return out, mask


class GenerationObserver(Protocol):
    """What run_generation calls on each step (mechscope.monitor implements it)."""

    def active(self, model: HookedTransformer, tokens: torch.Tensor, mask: torch.Tensor
               ) -> contextlib.AbstractContextManager: ...

    def step(self, step: int, next_ids: torch.Tensor, finished: torch.Tensor
             ) -> tuple[torch.Tensor, bool]:  # ([B] bool blocked rows, stop all)
        ...
