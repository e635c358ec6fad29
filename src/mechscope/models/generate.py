"""Autoregressive generation with a pre-allocated KV cache, sampling, and hooks active throughout.

Batched prompts are left-padded; positions count real tokens, so a padded batch generates
exactly what each prompt generates alone.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Literal

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
):
    """Greedy or sampled continuation. Returns text for text input (prompt + completion) or
    token ids [B, T + new] for token input (after EOS, finished rows are filled with pad/EOS).
    interventions apply to the prompt and to every generated token (they select absolute positions)."""
    if not model.cfg.causal:
        raise InputError(f"{model.cfg.architecture} is an encoder; it cannot generate.")
    if max_new_tokens < 0:
        raise InputError(f"max_new_tokens must be >= 0, got {max_new_tokens}.")
    text_in = isinstance(input, str) or (isinstance(input, list | tuple) and input and isinstance(input[0], str))
    if text_in:
        tokens, mask = model.to_tokens(input, prepend_bos, padding_side="left", return_mask=True)
    else:
        tokens, mask = model.prepare(input, attention_mask, prepend_bos, "left")
        mask = torch.ones_like(tokens) if mask is None else mask
        if not bool(mask[:, -1].all()):  # right-padded: move each row's real tokens to the end
            order = torch.argsort(mask, dim=1, stable=True)  # pads (0) first, real tokens keep their order
            tokens, mask = tokens.gather(1, order), mask.gather(1, order)
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
    with model.interventions(interventions), model.hooks(fwd_hooks):
        logits = model(tokens, attention_mask=mask, kv_cache=cache)
        for step in range(max_new_tokens):
            nxt = sample_next(logits[:, -1], do_sample, temperature, top_k, top_p, gen)
            nxt = torch.where(finished, torch.full_like(nxt, pad_id), nxt)
            out = torch.cat([out, nxt[:, None]], dim=1)
            if eos_token_id is not None:
                finished |= nxt == eos_token_id
            if step == max_new_tokens - 1 or bool(finished.all()):
                break
            mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
            if cache is not None:
                logits = model(nxt[:, None], attention_mask=mask, kv_cache=cache)
            else:
                logits = model(out, attention_mask=mask)
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
