"""HookedTransformer: one config-driven transformer with TransformerLens hook names.

    x = embed(tokens) (+ pos_embed)            hook_embed, hook_pos_embed
    for block in blocks: x = block(x)          blocks.{l}.hook_resid_pre/mid/post, attn.*, mlp.*
    logits = unembed(ln_final(x))              ln_final.hook_normalized, hook_unembed

The three verbs: run_with_cache, run_with_hooks and the hooks() context manager.
"""

from __future__ import annotations

import contextlib
import fnmatch
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import nn

from mechscope.errors import (
    ContextLengthError,
    HookNameError,
    InputError,
    NonFiniteError,
    unknown_name_message,
)
from mechscope.models.cache import ActivationCache, LazyStore, LazyTensor
from mechscope.models.components import Block, Embed, KVCache, MLMHead, Norm, Rotary
from mechscope.models.config import ModelConfig
from mechscope.models.hooks import HookFn, HookPoint, layer_of
from mechscope.models.interventions import Intervention, check_interventions

ReturnType = Literal["logits", "loss", "both", "resid"] | None
NamesFilter = str | Sequence[str] | Callable[[str], bool] | None
FwdHooks = Sequence[tuple[str | Callable[[str], bool], HookFn]]


@dataclass
class RunState:
    """Everything one run of the blocks needs besides the residual, for its B rows and T new positions."""

    positions: torch.Tensor  # [B, T] absolute position of each computed position (real tokens counted from 0)
    real: torch.Tensor | None  # [B, T] bool, False at padding; None = no padding
    mask: torch.Tensor | None  # [B, past + T] the attention mask (1 = real token); None = no padding
    attn: dict[bool, torch.Tensor | None]  # attention masks [B|1, 1, T, past + T] keyed by "sliding layer?"
    rotary: dict[bool, tuple[torch.Tensor, torch.Tensor]] | None  # (cos, sin) [B, T, 1, rot_dim] per layer kind
    kv: Any = None  # KVCache, KVRecorder, KVPrefix or None
    past: int = 0  # positions before these (in the KV cache or prefix)

    def rows(self, n: int) -> RunState:
        """The state of the first n rows (a batch that grows as rows join at later layers)."""
        B = self.positions.shape[0]
        if n == B:
            return self

        def cut(t):
            return t[:n] if t is not None and t.shape[0] == B else t

        rot = None if self.rotary is None else {k: (cut(c), cut(s)) for k, (c, s) in self.rotary.items()}
        return RunState(cut(self.positions), cut(self.real), cut(self.mask),
                        {k: cut(m) for k, m in self.attn.items()}, rot, self.kv, self.past)

    def take(self, at: torch.Tensor) -> RunState:
        """The state of the positions `at` only (for hooks after the last block, e.g. on the logits)."""
        return RunState(self.positions[:, at], None if self.real is None else self.real[:, at], None, {}, None,
                        None, self.past)


class HookedTransformer(nn.Module):
    def __init__(self, cfg: ModelConfig, tokenizer: Any = None) -> None:
        super().__init__()
        self.cfg = cfg
        self.tokenizer = tokenizer
        self.embed = Embed(cfg.d_vocab, cfg.d_model, cfg.embed_scale)
        self.hook_embed = HookPoint()  # [B, T, D]
        if cfg.positional == "learned":
            self.pos_embed = Embed(cfg.n_ctx, cfg.d_model)
            self.hook_pos_embed = HookPoint()  # [B, T, D]
        if cfg.n_token_types:
            self.token_type_embed = Embed(cfg.n_token_types, cfg.d_model)
            self.hook_token_type_embed = HookPoint()
        if cfg.embed_norm:
            self.embed_ln = Norm(cfg.d_model, cfg.normalization, cfg.norm_eps)
        if cfg.positional == "rotary":
            self.rotary = Rotary(cfg.rotary_dim, cfg.rope_theta, cfg.rope_scaling)
            if cfg.rope_theta_local is not None:
                self.rotary_local = Rotary(cfg.rotary_dim, cfg.rope_theta_local, cfg.rope_scaling_local)
        self.blocks = nn.ModuleList(Block(cfg, layer) for layer in range(cfg.n_layers))
        if cfg.final_norm:
            self.ln_final = Norm(cfg.d_model, cfg.normalization, cfg.norm_eps)
        if cfg.mlm_head:
            self.mlm_head = MLMHead(cfg)
        if cfg.has_unembed:
            self.unembed = nn.Linear(cfg.d_model, cfg.d_vocab, bias=cfg.unembed_bias)
            if cfg.tie_word_embeddings:
                self.unembed.weight = self.embed.weight
            self.hook_unembed = HookPoint()  # [B, T, V] logits
        self.check_finite = False  # opt-in: raise NonFiniteError if a forward produces NaN/inf
        self.run_state_now: RunState | None = None  # the state of the stage running now (read by interventions)
        self._index_hooks()

    def materialize_buffers(self, device: torch.device | str) -> None:
        """Recreate derived buffers (rotary frequencies) on `device`."""
        for m in self.modules():
            if isinstance(m, Rotary):
                m.reset(device)

    # ------------------------------------------------------------------ hook bookkeeping
    def _index_hooks(self) -> None:
        self.hook_dict: dict[str, HookPoint] = {}
        for name, mod in self.named_modules():
            if isinstance(mod, HookPoint):
                mod.name = name
                self.hook_dict[name] = mod

    @property
    def hook_names(self) -> list[str]:
        return list(self.hook_dict)

    @property
    def n_parameters(self) -> int:
        """Parameter count, tied weights (e.g. embedding = unembedding) counted once."""
        return sum(p.numel() for p in {id(p): p for p in self.parameters()}.values())

    def hook_templates(self, cache) -> list[tuple[str, tuple[int, ...] | None]]:
        """(name with 'blocks.{l}.' for per-layer hooks, shape in `cache` or None) for each hook point of layer 0
        and outside the blocks: the model's hook vocabulary, as `mechscope inspect` and the report list it."""
        names = [n for n in self.hook_names if not n.startswith("blocks.") or n.startswith("blocks.0.")]
        return [(n.replace("blocks.0.", "blocks.{l}."), tuple(cache[n].shape) if n in cache else None) for n in names]

    def _match(self, name_or_fn: str | Callable[[str], bool], kind: str = "hook name") -> list[HookPoint]:
        """Resolve a hook name, glob ('blocks.*.hook_resid_post') or predicate to hook points."""
        if callable(name_or_fn):
            hits = [hp for n, hp in self.hook_dict.items() if name_or_fn(n)]
            if not hits:
                raise HookNameError(f"Hook predicate {name_or_fn!r} matched no hook point; see model.hook_names.")
            return hits
        if name_or_fn in self.hook_dict:
            return [self.hook_dict[name_or_fn]]
        if any(ch in name_or_fn for ch in "*?["):
            hits = [hp for n, hp in self.hook_dict.items() if fnmatch.fnmatchcase(n, name_or_fn)]
            if hits:
                return hits
        raise HookNameError(unknown_name_message(kind, name_or_fn, self.hook_dict))

    def add_hook(self, name: str | Callable[[str], bool], fn: HookFn, direction: str = "fwd") -> list:
        """Permanently add a hook (until reset_hooks). Prefer hooks()/run_with_hooks."""
        return [hp.add_hook(fn, direction) for hp in self._match(name)]  # type: ignore[arg-type]

    def reset_hooks(self) -> None:
        for hp in self.hook_dict.values():
            hp.remove_hooks("both")

    @contextlib.contextmanager
    def hooks(self, fwd_hooks: FwdHooks = (), bwd_hooks: FwdHooks = ()) -> Iterator[HookedTransformer]:
        """Hooks active inside the block only; nested contexts remove only their own hooks."""
        handles = []
        try:
            for direction, pairs in (("fwd", fwd_hooks), ("bwd", bwd_hooks)):
                for name, fn in pairs:
                    handles += [hp.add_hook(fn, direction) for hp in self._match(name)]  # type: ignore[arg-type]
            yield self
        finally:
            for h in handles:
                h.remove()

    # ------------------------------------------------------------------ tokenization
    def require_tokenizer(self):
        """The tokenizer, or InputError saying that this model needs token ids."""
        if self.tokenizer is None:
            raise InputError("This model has no tokenizer; pass token ids (a LongTensor [batch, pos]).")
        return self.tokenizer

    def default_prepend_bos(self) -> bool:
        """Follow the tokenizer's own default: does encoding plain text add BOS?"""
        tok = self.require_tokenizer()
        if getattr(self, "_bos_default", None) is None:
            ids = tok("a", add_special_tokens=True)["input_ids"]
            self._bos_default = tok.bos_token_id is not None and len(ids) > 0 and ids[0] == tok.bos_token_id
        return self._bos_default

    def to_tokens(
        self,
        text: str | Sequence[str],
        prepend_bos: bool | None = None,
        padding_side: Literal["left", "right"] = "right",
        return_mask: bool = False,
        truncate: bool = False,
    ):
        """Text -> token ids [B, T] (and the attention mask [B, T] if return_mask).

        prepend_bos=None follows the tokenizer's default; True/False forces it. Padding uses
        the tokenizer's pad token (or EOS) on the given side.
        """
        tok = self.require_tokenizer()
        texts = [text] if isinstance(text, str) else list(text)
        if not texts or any(not isinstance(t, str) for t in texts):
            raise InputError("to_tokens needs a string or a non-empty list of strings.")
        # special tokens other than BOS (e.g. BERT's [CLS]/[SEP]) follow the tokenizer
        encoded = tok(texts, add_special_tokens=True)["input_ids"]
        default = self.default_prepend_bos()
        bos = tok.bos_token_id
        want = default if prepend_bos is None else prepend_bos
        seqs = []
        for ids in encoded:
            ids = list(ids)
            if default and not want and ids and ids[0] == bos:
                ids = ids[1:]
            elif want and not default:
                if bos is None:
                    raise InputError("prepend_bos=True but the tokenizer has no BOS token.")
                ids = [bos] + ids
            seqs.append(ids)
        if any(len(s) == 0 for s in seqs):
            raise InputError("Empty prompt: a text produced no tokens (pass prepend_bos=True or non-empty text).")
        if truncate:
            seqs = [s[: self.cfg.n_ctx] for s in seqs]
        T = max(len(s) for s in seqs)
        pad = tok.pad_token_id if tok.pad_token_id is not None else (tok.eos_token_id or 0)
        tokens = torch.full((len(seqs), T), pad, dtype=torch.long)
        mask = torch.zeros((len(seqs), T), dtype=torch.long)
        for i, s in enumerate(seqs):
            sl = slice(T - len(s), T) if padding_side == "left" else slice(0, len(s))
            tokens[i, sl] = torch.tensor(s, dtype=torch.long)
            mask[i, sl] = 1
        tokens, mask = tokens.to(self.device), mask.to(self.device)
        return (tokens, mask) if return_mask else tokens

    def to_string(self, tokens: torch.Tensor | Sequence[int]) -> str | list[str]:
        tok = self.require_tokenizer()
        if isinstance(tokens, torch.Tensor) and tokens.dim() == 2:
            return [tok.decode(t.tolist()) for t in tokens]
        ids = tokens.tolist() if isinstance(tokens, torch.Tensor) else list(tokens)
        return tok.decode(ids)

    def to_single_token(self, string: str) -> int:
        """The id of a string that is exactly one token (no BOS), e.g. " Paris"."""
        ids = self.require_tokenizer()(string, add_special_tokens=False)["input_ids"]
        if len(ids) != 1:
            raise InputError(f"{string!r} is {len(ids)} tokens, not one: {self.tokenizer.convert_ids_to_tokens(ids)}.")
        return ids[0]

    def to_str_tokens(self, text_or_tokens: str | torch.Tensor, prepend_bos: bool | None = None) -> list[str]:
        tokens = self.to_tokens(text_or_tokens, prepend_bos) if isinstance(text_or_tokens, str) else text_or_tokens
        tokens = tokens.reshape(-1) if tokens.dim() == 2 and tokens.shape[0] == 1 else tokens
        if tokens.dim() != 1:
            raise InputError("to_str_tokens takes one sequence (a string or a 1-D / [1, T] tensor).")
        return [self.tokenizer.decode([t]) for t in tokens.tolist()]

    # ------------------------------------------------------------------ input checking
    @property
    def device(self) -> torch.device:
        return self.embed.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.embed.weight.dtype

    def prepare(self, input, attention_mask: torch.Tensor | None = None, prepend_bos: bool | None = None,
                padding_side: Literal["left", "right"] = "right", past: int = 0):
        """Validate model input, tokenizing text: returns tokens [B, T] (long, on the model's device) and the
        attention mask [B, past + T] (long) or None when every position is real. Text is padded on
        `padding_side`; token ids are checked against the vocabulary and the mask against their shape."""
        if isinstance(input, list | tuple) and not input:
            raise InputError("Model input is an empty list: give at least one prompt (str) or a LongTensor of "
                             "token ids [batch, pos].")
        if isinstance(input, str) or (isinstance(input, list | tuple) and input and isinstance(input[0], str)):
            tokens, mask = self.to_tokens(input, prepend_bos, padding_side, return_mask=True)
            return tokens, (mask if not bool(mask.all()) else None)
        if not isinstance(input, torch.Tensor):
            raise InputError(f"Model input must be text or a LongTensor of token ids, got {type(input).__name__}.")
        tokens = input
        if tokens.dtype not in (torch.long, torch.int32, torch.int64, torch.int16, torch.uint8):
            raise InputError(f"Token ids must be an integer tensor, got dtype {tokens.dtype}.")
        if tokens.dim() == 1:
            tokens = tokens[None]
        if tokens.dim() != 2:
            raise InputError(f"Token ids must have shape [batch, pos], got {tuple(tokens.shape)}.")
        if tokens.numel() == 0:
            raise InputError("Empty input: token tensor has no positions.")
        if int(tokens.min()) < 0 or int(tokens.max()) >= self.cfg.d_vocab:
            raise InputError(f"Token ids must be in [0, {self.cfg.d_vocab}); got range "
                             f"[{int(tokens.min())}, {int(tokens.max())}].")
        tokens = tokens.to(self.device, torch.long)
        if attention_mask is not None:
            want = (tokens.shape[0], past + tokens.shape[1])
            if not isinstance(attention_mask, torch.Tensor) or tuple(attention_mask.shape) != want:
                shape = tuple(attention_mask.shape) if isinstance(attention_mask, torch.Tensor) else type(attention_mask).__name__
                raise InputError(f"attention_mask must have shape {want} (batch, past + new positions), got {shape}.")
            if ((attention_mask != 0) & (attention_mask != 1)).any():
                raise InputError("attention_mask must hold only 0 and 1.")
            attention_mask = attention_mask.to(self.device).long()
            if not bool(attention_mask.any(dim=-1).all()):
                raise InputError("attention_mask has a row with no real token (all zeros).")
            if bool(attention_mask.all()):
                attention_mask = None
        return tokens, attention_mask

    # ------------------------------------------------------------------ the staged forward
    # forward = prepare -> run_state -> embed_tokens -> run_blocks -> head. Analyses that need part of the
    # forward (patching from a layer with a cached prefix, lenses, attribution) call these stages; nothing outside
    # models/ re-implements them.
    def run_state(self, attention_mask: torch.Tensor | None, batch: int, n_pos: int, *, past: int = 0,
                  kv=None) -> RunState:
        """What the blocks need besides the residual, for `n_pos` new positions after `past` earlier ones:
        absolute positions (padding does not shift them), attention masks, rotary tables and the key/value
        store (a KVCache, KVRecorder, KVPrefix or None). attention_mask: [batch, past + n_pos] or None."""
        c, dev = self.cfg, self.device
        if attention_mask is None:
            positions = torch.arange(past, past + n_pos, device=dev).expand(batch, n_pos)
            real = None
        else:
            # count real tokens so that left padding does not shift positions; the mask may cover cached positions
            positions = (attention_mask.cumsum(-1) - 1).clamp(min=0)[:, -n_pos:]
            real = attention_mask[:, -n_pos:].bool()
        attn = self._attn_masks(attention_mask, n_pos, past + n_pos)
        rotary = None
        if c.positional == "rotary":
            full = self.rotary(positions, self.dtype)
            local = self.rotary_local(positions, self.dtype) if hasattr(self, "rotary_local") else full
            rotary = {False: full, True: local}  # keyed by "is this a sliding-window layer"
        return RunState(positions, real, attention_mask, attn, rotary, kv, past)

    def _attn_masks(self, mask: torch.Tensor | None, T: int, S: int) -> dict[bool, torch.Tensor | None]:
        """Boolean masks [B, 1, T, S] (True = attend) for full and sliding layers; None = plain causal."""
        c, dev = self.cfg, self.device
        q_idx = torch.arange(S - T, S, device=dev)[:, None]
        k_idx = torch.arange(S, device=dev)[None, :]
        out: dict[bool, torch.Tensor | None] = {}
        for sliding in {c.is_sliding(layer) for layer in range(c.n_layers)}:
            needs = mask is not None or sliding or (S != T) or not c.causal
            if not needs:
                out[sliding] = None
                continue
            allowed = (k_idx <= q_idx) if c.causal else torch.ones(T, S, dtype=torch.bool, device=dev)
            if sliding:
                allowed = allowed & (q_idx - k_idx < c.sliding_window)
            allowed = allowed[None, None]
            if mask is not None:
                allowed = allowed & mask.bool()[:, None, None, :]
                # padded queries attend to themselves so no row is empty (no NaN anywhere)
                allowed = allowed | (q_idx == k_idx)[None, None]
            out[sliding] = allowed
        return out

    @contextlib.contextmanager
    def _publish(self, state: RunState | None) -> Iterator[None]:
        """Make `state` visible to hooks (interventions select positions with it) while a stage runs."""
        before, self.run_state_now = self.run_state_now, state
        try:
            yield
        finally:
            self.run_state_now = before

    def embed_tokens(self, tokens: torch.Tensor, state: RunState | None = None,
                     token_type_ids: torch.Tensor | None = None) -> torch.Tensor:
        """tokens [B, T] -> the residual entering block 0 [B, T, D] (token, position and token-type embeddings,
        embedding norm). state: from run_state (default: no padding, no past)."""
        c = self.cfg
        state = self.run_state(None, *tokens.shape) if state is None else state
        with self._publish(state):
            x = self.hook_embed(self.embed(tokens))
            if c.positional == "learned":
                x = x + self.hook_pos_embed(self.pos_embed(state.positions))
            if c.n_token_types:
                tt = torch.zeros_like(tokens) if token_type_ids is None else token_type_ids.to(self.device)
                x = x + self.hook_token_type_embed(self.token_type_embed(tt))
            if c.embed_norm:
                x = self.embed_ln(x)
        return x

    def run_blocks(self, x: torch.Tensor, state: RunState, start: int = 0, stop: int | None = None) -> torch.Tensor:
        """The residual entering block `start` [B, T, D] -> the residual entering block `stop` (default: after the
        last block). Negative indices count from the end. Keys/values go to state.kv (a KVCache appends them)."""
        c = self.cfg
        start, stop = self._layer_index(start, "start"), self._layer_index(c.n_layers if stop is None else stop, "stop")
        if stop < start:
            raise InputError(f"run_blocks: stop ({stop}) is before start ({start}).")
        if x.dim() != 3 or x.shape[-1] != c.d_model or tuple(x.shape[:2]) != tuple(state.positions.shape):
            raise InputError(f"run_blocks needs the residual [batch, pos, {c.d_model}] matching the run state "
                             f"{tuple(state.positions.shape)}; got {tuple(x.shape)}.")
        with self._publish(state):
            for block in self.blocks[start:stop]:
                sliding = c.is_sliding(block.layer)
                rot = None if state.rotary is None else state.rotary[sliding]
                x = block(x, rot, state.attn[sliding], state.kv)
        return x

    def _layer_index(self, i: int, what: str) -> int:
        L = self.cfg.n_layers
        if not isinstance(i, int) or not -L <= i <= L:
            raise InputError(f"{what} layer must be an int in [-{L}, {L}], got {i!r}.")
        return i + L if i < 0 else i

    def normalize_final(self, x: torch.Tensor, *, hooks: bool = True) -> torch.Tensor:
        """The final norm (ln_final) of the residual after the last block, or x itself if the model has none.
        hooks=False: the same maths without hook points, in x's dtype (lenses decode float32 residuals)."""
        if not self.cfg.final_norm:
            return x
        return self.ln_final(x) if hooks else self.ln_final.normalize(x)

    def head(self, x: torch.Tensor, at: torch.Tensor | Sequence[int] | None = None, *, state: RunState | None = None,
             hooks: bool = True, normalized: bool = False, softcap: bool = True) -> torch.Tensor:
        """The residual after the last block [B, T, D] -> logits [B, T, V] (or [B, len(at), V] at positions `at`):
        final norm, BERT's MLM transform, unembedding, soft-capping. The norm runs on every position (hooks on
        ln_final see them all), the unembedding only at `at`. hooks=False computes the same maths without
        hook points, in x's dtype; normalized=True skips the final norm (x is already ln_final's output).
        softcap=False skips the final tanh soft-capping (Gemma 2): the linear readout that attribution graphs'
        logit nodes measure."""
        c = self.cfg
        if not c.has_unembed:
            raise InputError(f"{c.architecture} has no unembedding; read the residual (return_type='resid').")
        with self._publish(state):
            if not normalized:
                x = self.normalize_final(x, hooks=hooks)
        if at is not None:
            at = torch.as_tensor(at, device=x.device)
            x = x[:, at]
            state = None if state is None else state.take(at)
        with self._publish(state):
            if c.mlm_head:
                h = self.mlm_head
                x = h(x) if hooks else h.ln.normalize(h.act(F.linear(x, h.dense.weight.to(x.dtype),
                                                                      h.dense.bias.to(x.dtype))))
            if hooks:
                logits = self.unembed(x)
            else:
                u = self.unembed
                logits = F.linear(x, u.weight.to(x.dtype), None if u.bias is None else u.bias.to(x.dtype))
            if c.final_softcap is not None and softcap:
                logits = torch.tanh(logits / c.final_softcap) * c.final_softcap
            return self.hook_unembed(logits) if hooks else logits

    def check_context(self, n_pos: int, kv_cache: KVCache | None = None) -> None:
        """ContextLengthError if a sequence of n_pos positions does not fit the model (or the KV cache)."""
        if n_pos > self.cfg.n_ctx:
            raise ContextLengthError(
                f"Sequence of {n_pos} tokens exceeds the model's context of {self.cfg.n_ctx}; "
                "truncate the input (to_tokens(..., truncate=True)) or split it."
            )
        if kv_cache is not None and n_pos > kv_cache.max_len:
            raise ContextLengthError(f"KV cache holds {kv_cache.max_len} positions, need {n_pos}.")

    # ------------------------------------------------------------------ interventions
    @contextlib.contextmanager
    def interventions(self, interventions: Intervention | Sequence[Intervention] | None) -> Iterator[HookedTransformer]:
        """Interventions active inside the block, in every run: forward, run_with_cache, patching sweeps,
        generate (see models/interventions.py)."""
        items = check_interventions(interventions)
        for iv in items:
            self._match(iv.hook)  # an unknown hook name fails here, on the user's line
        with self.hooks(fwd_hooks=[(iv.hook, iv.bind(self)) for iv in items]):
            yield self

    # ------------------------------------------------------------------ forward
    def forward(
        self,
        input: str | Sequence[str] | torch.Tensor,
        return_type: ReturnType = "logits",
        attention_mask: torch.Tensor | None = None,
        token_type_ids: torch.Tensor | None = None,
        stop_at_layer: int | None = None,
        start_at_layer: int | None = None,
        prepend_bos: bool | None = None,
        padding_side: Literal["left", "right"] = "right",
        loss_per_token: bool = False,
        tokens: torch.Tensor | None = None,
        kv_cache: KVCache | None = None,
        interventions: Intervention | Sequence[Intervention] | None = None,
    ):
        """Run the model.

        input: text, list of texts, token ids [B, T], or (with start_at_layer) the residual
        stream [B, T, D]. return_type: "logits" [B, T, V], "loss" (mean next-token CE over
        real tokens, or [B, T-1] with loss_per_token), "both", "resid" (final residual
        after ln_final) or None. stop_at_layer=L returns the residual entering block L.
        interventions: Intervention objects applied during this run (see models/interventions.py).
        """
        if return_type not in ("logits", "loss", "both", "resid", None):
            raise InputError(f"Unknown return_type {return_type!r}; use logits, loss, both, resid or None.")
        if interventions is not None:
            with self.interventions(interventions):
                return self.forward(input, return_type, attention_mask, token_type_ids, stop_at_layer,
                                    start_at_layer, prepend_bos, padding_side, loss_per_token, tokens, kv_cache)
        c = self.cfg
        if start_at_layer is None:
            past = kv_cache.length if kv_cache is not None else 0
            tokens, attention_mask = self.prepare(input, attention_mask, prepend_bos, padding_side, past)
            B, T = tokens.shape
            self.check_context(past + T, kv_cache)
            state = self.run_state(attention_mask, B, T, past=past, kv=kv_cache)
            x = self.embed_tokens(tokens, state, token_type_ids)
            start = 0
        else:
            x = input
            if not isinstance(x, torch.Tensor) or x.dim() != 3 or x.shape[-1] != c.d_model:
                raise InputError(f"With start_at_layer, input must be the residual [B, T, {c.d_model}].")
            if attention_mask is not None:
                attention_mask = attention_mask.to(self.device).long()
                if bool(attention_mask.all()):
                    attention_mask = None
            state = self.run_state(attention_mask, x.shape[0], x.shape[1])
            start = start_at_layer
        x = self.run_blocks(x, state, start, stop_at_layer)
        if kv_cache is not None:
            kv_cache.length += x.shape[1]
        self._check(x, "the residual stream")
        if stop_at_layer is not None and self._layer_index(stop_at_layer, "stop") < c.n_layers:
            return x
        if return_type is None:
            with self._publish(state):
                self.normalize_final(x)  # hooks on ln_final still fire
            return None
        if return_type == "resid" or not c.has_unembed:
            if return_type != "resid":
                raise InputError(f"{c.architecture} has no unembedding; use return_type='resid'.")
            with self._publish(state):
                return self.normalize_final(x)
        logits = self.head(x, state=state)
        self._check(logits, "the logits")
        if return_type == "logits":
            return logits
        if tokens is None:
            raise InputError("return_type='loss' with start_at_layer needs tokens=.")
        loss = self.loss(logits, tokens, attention_mask, per_token=loss_per_token)
        return loss if return_type == "loss" else (logits, loss)

    def _check(self, t: torch.Tensor, what: str) -> None:
        if self.check_finite and not bool(torch.isfinite(t).all()):
            raise NonFiniteError(f"NaN or inf in {what}; check inputs, hooks and dtype (fp16 overflow?).")

    @staticmethod
    def loss(logits: torch.Tensor, tokens: torch.Tensor, attention_mask: torch.Tensor | None = None,
             per_token: bool = False) -> torch.Tensor:
        """Next-token cross-entropy; padded targets are ignored."""
        logp = F.log_softmax(logits[:, :-1].float(), dim=-1)
        nll = -logp.gather(-1, tokens[:, 1:, None]).squeeze(-1)  # [B, T-1]
        if attention_mask is not None:
            valid = (attention_mask[:, 1:] * attention_mask[:, :-1]).to(nll.dtype)
        else:
            valid = torch.ones_like(nll)
        if per_token:
            return nll * valid
        return (nll * valid).sum() / valid.sum().clamp(min=1)

    # ------------------------------------------------------------------ the three verbs
    def run_with_hooks(self, *args, fwd_hooks: FwdHooks = (), bwd_hooks: FwdHooks = (), **kwargs):
        """Forward with temporary hooks (removed afterwards, even on error)."""
        with self.hooks(fwd_hooks, bwd_hooks):
            return self(*args, **kwargs)

    def run_with_cache(
        self,
        *args,
        names_filter: NamesFilter = None,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
        remove_batch_dim: bool = False,
        incl_bwd: bool = False,
        **kwargs,
    ) -> tuple[Any, ActivationCache]:
        """Forward, storing activations of the hook points selected by names_filter.

        names_filter: None (all), a name, a glob, a list of names/globs, or a predicate. A name
        matching nothing raises HookNameError. The forward pass stops early after the last
        layer whose activations were requested if stop_at_layer is not given and
        return_type=None.
        """
        points = self._select(names_filter)
        store = LazyStore()

        def convert(t: torch.Tensor) -> torch.Tensor:
            if device is not None or dtype is not None:
                t = t.to(device=device or t.device, dtype=dtype or t.dtype)
            return t[0] if remove_batch_dim else t

        def save(x: torch.Tensor, hook: HookPoint) -> None:
            store[hook.name] = convert(x.detach())

        def save_grad(g: torch.Tensor, hook: HookPoint) -> None:
            store[hook.name + "_grad"] = convert(g.detach())

        # per-head results are a function of hook_z and W_O: cache them lazily (computed on first
        # read) unless their gradients are wanted. Caching everything then costs no [B,T,H,D] tensors.
        lazy = [] if incl_bwd else [p for p in points if p.name.endswith("attn.hook_result") and not p.active]
        z_of = {p.name: p.name.removesuffix("hook_result") + "hook_z" for p in lazy}
        wanted = {p.name for p in points if p not in lazy} | set(z_of.values())
        if kwargs.get("return_type", "logits") is None and kwargs.get("stop_at_layer") is None:
            last = self._last_layer(points)
            if last is not None:
                kwargs["stop_at_layer"] = last + 1
        fwd = [(wanted.__contains__, save)]
        bwd = [(wanted.__contains__, save_grad)] if incl_bwd else []
        # interventions go first, so the cache holds the activations the run actually used
        with self.interventions(kwargs.pop("interventions", None)), self.hooks(fwd, bwd):
            out = self(*args, **kwargs)
        requested = {p.name for p in points}
        for p in lazy:
            z_name = z_of[p.name]
            if z_name in store:  # the forward may have stopped before this layer
                z = store[z_name] if z_name in requested else store.pop(z_name)
                w = self.get_submodule(p.name.removesuffix(".hook_result")).o.weight.detach()
                w = w.to(z.device, z.dtype).clone().view(self.cfg.d_model, self.cfg.n_heads, self.cfg.d_head)
                store[p.name] = LazyTensor(lambda z=z, w=w: torch.einsum("...he,dhe->...hd", z, w))
        if kwargs.get("return_type", "logits") is None:
            out = None
        return out, ActivationCache(store, self, has_batch_dim=not remove_batch_dim)

    def _select(self, names_filter: NamesFilter) -> list[HookPoint]:
        if names_filter is None:
            return list(self.hook_dict.values())
        if isinstance(names_filter, str):
            names_filter = [names_filter]
        if callable(names_filter):
            return self._match(names_filter)
        points: list[HookPoint] = []
        for n in names_filter:
            points += self._match(n, "cache name")
        return list(dict.fromkeys(points))

    @staticmethod
    def _last_layer(points: list[HookPoint]) -> int | None:
        layers = []
        for p in points:
            layer = layer_of(p.name)
            if layer is None:
                return None  # something after the blocks (ln_final, unembed) was requested
            layers.append(layer)
        return max(layers) if layers else None

    # ------------------------------------------------------------------ generation
    @torch.inference_mode()
    def generate(self, *args, **kwargs):
        from mechscope.models.generate import generate

        return generate(self, *args, **kwargs)

    # ------------------------------------------------------------------ weights, TL-style
    def _stack(self, get) -> torch.Tensor:
        return torch.stack([get(b) for b in self.blocks])

    W_Q = property(lambda self: self._stack(lambda b: b.attn.W_Q))  # [L, H, D, E]
    W_K = property(lambda self: self._stack(lambda b: b.attn.W_K))
    W_V = property(lambda self: self._stack(lambda b: b.attn.W_V))
    W_O = property(lambda self: self._stack(lambda b: b.attn.W_O))  # [L, H, E, D]
    b_Q = property(lambda self: self._stack(lambda b: b.attn.b_Q))
    b_K = property(lambda self: self._stack(lambda b: b.attn.b_K))
    b_V = property(lambda self: self._stack(lambda b: b.attn.b_V))
    b_O = property(lambda self: self._stack(lambda b: b.attn.b_O))
    W_in = property(lambda self: self._stack(lambda b: b.mlp.W_in))  # [L, D, d_mlp]
    W_out = property(lambda self: self._stack(lambda b: b.mlp.W_out))  # [L, d_mlp, D]

    @property
    def W_E(self) -> torch.Tensor:  # [V, D]
        return self.embed.weight

    @property
    def W_pos(self) -> torch.Tensor:  # [n_ctx, D]
        return self.pos_embed.weight

    @property
    def W_U(self) -> torch.Tensor:  # [D, V]
        return self.unembed.weight.T

    @property
    def b_U(self) -> torch.Tensor:  # [V]
        if self.unembed.bias is None:
            return torch.zeros(self.cfg.d_vocab, device=self.device, dtype=self.dtype)
        return self.unembed.bias

    # ------------------------------------------------------------------ loading (see loading.py)
    @classmethod
    def from_pretrained(cls, name_or_dir: str, **kwargs) -> HookedTransformer:
        from mechscope.models.loading import from_pretrained

        return from_pretrained(name_or_dir, **kwargs)

    @classmethod
    def from_hf(cls, hf_model, tokenizer=None, **kwargs) -> HookedTransformer:
        from mechscope.models.loading import from_hf

        return from_hf(hf_model, tokenizer=tokenizer, **kwargs)

    @classmethod
    def from_gguf(cls, path, **kwargs) -> HookedTransformer:
        from mechscope.models.loading import from_gguf

        return from_gguf(path, **kwargs)

    def save_pretrained(self, folder, *, extra: dict | None = None):
        """Write a native folder (config.json + model.safetensors + tokenizer) that from_pretrained loads."""
        from mechscope.models.native import save_pretrained

        return save_pretrained(self, folder, extra=extra)

    def init_weights(self, seed: int = 0, std: float = 0.02) -> HookedTransformer:
        """Random GPT-2-style initialisation for training from scratch (deterministic under seed)."""
        from mechscope.models.native import init_weights

        init_weights(self, seed=seed, std=std)
        return self

    def process_weights(self, fold_ln=True, center_writing_weights=True, center_unembed=True,
                        fold_value_biases=True, refactor_factored_attn=False) -> HookedTransformer:
        from mechscope.models import processing

        return processing.process_weights(
            self, fold_ln=fold_ln, center_writing_weights=center_writing_weights,
            center_unembed=center_unembed, fold_value_biases=fold_value_biases,
            refactor_factored_attn=refactor_factored_attn,
        )

    def __repr__(self) -> str:
        c = self.cfg
        return (f"HookedTransformer({c.model_name}: {c.architecture}, {c.n_layers} layers, d_model {c.d_model}, "
                f"{c.n_heads} heads, {len(self.hook_dict)} hook points)")

