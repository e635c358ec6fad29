"""Activation patching: run the corrupted prompts, overwrite one activation with its value from the clean
run, and measure how much of the clean behaviour comes back (Meng et al. 2022, Wang et al. 2022).

    res = activation_patching(model, clean, corrupted, LogitDiff(correct, wrong), "resid_pre", "position")
    res.shape  # [n_layers, pos]: the metric after patching clean resid_pre at (layer, position)

Why batched: a sweep is hundreds of forward passes of the same few prompts. Here one forward pass carries
n patches x B prompts (the base prompts repeated, row = patch * B + prompt); one hook per layer writes the
source activations into the rows of the patches at that layer with one advanced-indexing assignment.
Three facts make the batch cheaper than n full passes, with the same results up to float rounding:
  - nothing before a patch's layer changes: its rows join the batch at that layer, starting from the
    unpatched run's residual there (patches are sorted by layer, so the rows alive at any block are a
    prefix of the batch);
  - in a causal model a patch at position p changes nothing at positions < p: a batch of patches starting
    at p0 computes positions >= p0 only, with the unpatched run's keys/values before p0 (like a KV cache);
  - a patch that writes the values already there (e.g. at positions before the first token where clean
    and corrupted differ) is the unpatched run: it is not run at all (skip_unchanged).
The logits are computed only at the positions the metric reads (when it declares them, see BatchedMetric).

Metrics (circuits/metrics.py, re-exported here): any callable `metric(logits [B, T, V]) -> scalar | [B]`
works. The built-in metrics (LogitDiff, TokenProb, KLDivergence) also declare the positions they read
(`logit_positions`) and a batched form, so the sweep unembeds only those positions and scores all patches of a
batch at once. Prompt pairs: circuits/prompts.py.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch

from mechscope.circuits.metrics import BatchedMetric, KLDivergence, LogitDiff, TokenProb, check_metric_value
from mechscope.circuits.prompts import Prompts, align_prompts, tokenize_pair
from mechscope.errors import HookNameError, InputError, MetricError, unknown_name_message
from mechscope.models.cache import act_name
from mechscope.models.components import KVPrefix, KVRecorder
from mechscope.models.hooks import layer_of
from mechscope.models.interventions import Intervention
from mechscope.models.transformer import HookedTransformer

Granularity = Literal["layer", "position", "head", "head_position", "neuron"]
Direction = Literal["denoise", "noise"]
GRANULARITIES = ("layer", "position", "head", "head_position", "neuron")
_EMBED_HOOKS = ("hook_embed", "hook_pos_embed", "hook_token_type_embed")
_PER_HEAD = ("hook_q", "hook_k", "hook_v", "hook_rot_q", "hook_rot_k", "hook_z", "hook_result")
_PATTERN_LIKE = ("hook_pattern", "hook_attn_scores")


# ============================================================================ hook resolution


def _layer_of(model: HookedTransformer, name: str) -> int:
    """The block a patch at `name` joins the batch at: -1 for the embeddings, n_layers for ln_final."""
    layer = layer_of(name)
    if layer is not None:
        return layer
    if name in _EMBED_HOOKS:
        return -1
    if name.startswith("ln_final."):
        return model.cfg.n_layers
    raise InputError(f"Cannot patch {name!r}: patch hooks inside the blocks, the embeddings or ln_final "
                     "(the logits themselves are what the metric reads).")


def resolve_hook(model: HookedTransformer, hook: str, layers: Sequence[int] | None = None) -> tuple[list[str], bool]:
    """hook -> (hook names, swept over layers?). Accepts an exact name ('blocks.3.hook_resid_pre'), a
    template with '{layer}' ('blocks.{layer}.attn.hook_z') or a TransformerLens short name ('resid_pre',
    'z', 'pattern', 'mlp_post', 'embed', ...). Templates and per-layer short names sweep `layers`
    (default: all)."""
    if not isinstance(hook, str) or not hook:
        raise HookNameError(f"hook must be a hook name, a '{{layer}}' template or a short name, got {hook!r}.")
    L = model.cfg.n_layers
    template: str | None = None
    if "{layer}" in hook:
        template = hook
    elif hook in model.hook_dict:
        if layers is not None:
            raise InputError(f"layers= applies to swept hooks; {hook!r} is one hook point. Pass a short name "
                             "('resid_pre') or a '{layer}' template to sweep layers.")
        return [hook], False
    else:
        kind = hook.removeprefix("hook_")
        try:
            per_layer = act_name(kind, 0)
        except Exception:  # noqa: BLE001 - act_name is only a guess here
            per_layer = ""
        if per_layer in model.hook_dict:
            template = act_name(kind, 0).replace("blocks.0.", "blocks.{layer}.", 1)
        elif act_name(kind) in model.hook_dict and "." not in kind:
            if layers is not None:
                raise InputError(f"{hook!r} is not a per-layer hook; drop layers=.")
            return [act_name(kind)], False
        else:
            raise HookNameError(unknown_name_message("hook name", hook, model.hook_dict)
                                + " Short names: resid_pre, resid_mid, resid_post, attn_out, mlp_out, q, k, v, "
                                "z, result, pattern, attn_scores, mlp_pre, mlp_post; or a 'blocks.{layer}...' "
                                "template.")
    ls = list(range(L)) if layers is None else [int(x) + (L if int(x) < 0 else 0) for x in layers]
    if not ls or any(not 0 <= x < L for x in ls):
        raise InputError(f"layers must be non-empty and within [0, {L}), got {list(layers or [])}.")
    try:
        names = [template.format(layer=x) for x in ls]
    except (KeyError, IndexError, ValueError):
        raise HookNameError(f"Hook template {hook!r} must contain only the '{{layer}}' field.") from None
    missing = [n for n in names if n not in model.hook_dict]
    if missing:
        raise HookNameError(unknown_name_message("hook name", missing[0], model.hook_dict))
    return names, True


def patch_axes(name: str, ndim: int, granularity: str) -> list[int]:
    """Activation dims indexed by a patch of `granularity`, in output order. Layouts: [B, T, D] (resid, mlp, embed),
    [B, T, H, E] (q/k/v/z/result), [B, H, Tq, Tk] (pattern, attn_scores)."""
    short = name.rsplit(".", 1)[-1]
    if short in _PATTERN_LIKE:
        table = {"layer": [], "position": [2], "head": [1], "head_position": [1, 2]}
    elif short in _PER_HEAD or ndim == 4:
        table = {"layer": [], "position": [1], "head": [2], "head_position": [2, 1]}
    else:
        table = {"layer": [], "position": [1], "neuron": [ndim - 1]}
    if granularity not in GRANULARITIES:
        raise InputError(f"granularity must be one of {', '.join(GRANULARITIES)}; got {granularity!r}.")
    if granularity not in table:
        if granularity in ("head", "head_position"):
            raise InputError(f"{name!r} has no head dimension, so it cannot be patched per head. Per-head hooks: "
                             "z (head outputs before W_O), result, q, k, v, pattern, attn_scores.")
        raise InputError(f"granularity 'neuron' indexes the last dim of a [batch, pos, d] activation (resid, "
                         f"attn_out, mlp_out, mlp_post ...); {name!r} is per head: use head or head_position.")
    return table[granularity]


def _pos_dim(name: str) -> int:
    return 2 if name.rsplit(".", 1)[-1] in _PATTERN_LIKE else 1


# ============================================================================ the batched engine


@dataclass
class _Base:
    """The unpatched run of the prompts being patched (the corrupted ones when denoising)."""

    tokens: torch.Tensor  # [B, T]
    mask: torch.Tensor | None  # [B, T]
    logits: torch.Tensor  # [B, n, V] at the metric's positions
    resid: list[torch.Tensor]  # n_layers + 1 x [B, T, D]: the input of each block, then of ln_final
    kv: KVRecorder
    acts: dict[str, torch.Tensor]  # the activations of the patched hook points


def _base_run(model: HookedTransformer, tokens: torch.Tensor, mask: torch.Tensor | None, names: list[str]) -> _Base:
    """The model's staged forward one block at a time, keeping the activations at `names`, each block's input
    residual and the keys/values: the parts of an unpatched run that patched runs share. The clean and the
    corrupted runs both go through here, so activations that should agree (before the first differing token)
    agree bit for bit."""
    B, T = tokens.shape
    acts: dict[str, torch.Tensor] = {}
    kv = KVRecorder(model.cfg.n_layers)
    with model.hooks(fwd_hooks=[(n, lambda x, hook: acts.__setitem__(hook.name, x)) for n in names]):
        state = model.run_state(mask, B, T, kv=kv)
        x = model.embed_tokens(tokens, state)
        resid = []
        for layer in range(model.cfg.n_layers):
            resid.append(x)
            x = model.run_blocks(x, state, layer, layer + 1)
        resid.append(x)
        logits = model.head(x, torch.arange(T, device=x.device), state=state)
    return _Base(tokens, mask, logits, resid, kv, acts)


def _run_patched(model: HookedTransformer, base: _Base, join: torch.Tensor, p0: int, need: torch.Tensor,
                 ) -> torch.Tensor:
    """Forward len(join) copies of the base prompts from position p0, copy i joining the batch at block
    join[i] (-1 = at the embedding, n_layers = at ln_final; join is sorted), with the unpatched run's
    residual there. Rows are copy-major (row = i * B + prompt), so the rows alive at any block are a
    prefix of the batch and no block runs a copy it cannot change. Returns logits [len(join) * B,
    len(need), V] at the absolute positions `need` (those < p0 are the unpatched run's)."""
    L = model.cfg.n_layers
    B, T = base.tokens.shape
    n, Tn = len(join), T - p0
    N = n * B
    mask = base.mask.repeat(n, 1) if base.mask is not None else None
    state = model.run_state(mask, N, Tn, past=p0, kv=KVPrefix(base.kv, p0) if p0 > 0 else None)
    ends = torch.searchsorted(join, torch.arange(-1, L + 1), right=True).tolist()  # alive rows / B

    def grow(x: torch.Tensor | None, point: int) -> torch.Tensor | None:
        have = 0 if x is None else x.shape[0] // B
        k = ends[point + 1] - have
        if k == 0:
            return x
        if point < 0:
            new = model.embed_tokens(base.tokens[:, p0:].repeat(k, 1), state.rows(k * B))
        else:
            new = base.resid[point][:, p0:].repeat(k, 1, 1)
        return new if x is None else torch.cat([x, new])

    x = grow(None, -1)
    for layer in range(L):
        x = grow(x, layer)
        if x is not None:
            x = model.run_blocks(x, state.rows(x.shape[0]), layer, layer + 1)
    x = grow(x, L)
    hi = need >= p0
    if bool(hi.all()):
        return model.head(x, need - p0, state=state)
    out = x.new_empty((N, len(need), base.logits.shape[-1]))  # the metric reads positions before any patch
    if bool(hi.any()):
        out[:, hi] = model.head(x, need[hi] - p0, state=state)
    lo = (~hi).nonzero().squeeze(-1)
    out.view(n, B, *out.shape[1:])[:, :, lo] = base.logits[:, lo]
    return out


def _bytes_per_row(model: HookedTransformer, T: int, n_logits: int, eager: bool) -> int:
    """Rough peak bytes one patched row costs in a forward: a block's live activations, the keys/values,
    the (eager) attention scores and the logits the metric reads (with its log-softmax)."""
    c = model.cfg
    elt = torch.finfo(model.dtype).bits // 8
    per_pos = 10 * c.d_model + 4 * c.d_mlp + 4 * (c.n_heads + 2 * c.n_kv_heads) * c.d_head
    attn = (3 if eager else 1) * c.n_heads * T
    return elt * T * (per_pos + attn) + 4 * n_logits * c.d_vocab * 3


def _default_patches_per_batch(model: HookedTransformer, B: int, T: int, row_bytes: int) -> int:
    """Memory-bounded: half the free memory on CUDA; 1 GiB on CPU, where batches are also capped at
    8k tokens (CPU matmuls gain nothing from more rows)."""
    if model.device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(model.device)
        return max(1, int(0.5 * free) // (row_bytes * B))
    return max(1, min((1 << 30) // (row_bytes * B), 8192 // (B * T)))


def _plan(join: torch.Tensor, start: torch.Tensor, n: int, B: int, T: int, min_tokens: float) -> list[torch.Tensor]:
    """Split patch ids into batches of <= n patches. A batch takes whole groups of patches that start at
    the same position, so no row recomputes positions its patch cannot change; consecutive groups are
    merged (the later ones then recompute a few positions) only while the batch holds fewer than
    min_tokens tokens (B x positions per patch): small batches waste a GPU, while a CPU is efficient
    from a few hundred tokens on. Inside a batch patches are sorted by layer: rows join as it comes."""
    order = torch.argsort(start * (int(join.max()) + 2) + join + 1, stable=True)
    groups = torch.split(order, torch.unique_consecutive(start[order], return_counts=True)[1].tolist())
    chunks: list[torch.Tensor] = []
    cur: list[torch.Tensor] = []
    size, p0 = 0, 0
    for g in groups:  # one iteration per distinct start position
        if cur and (size + len(g) > n or size * B * (T - p0) >= min_tokens):
            chunks.append(torch.cat(cur))
            cur, size = [], 0
        if len(g) > n:
            chunks += list(g.split(n))
            continue
        if not cur:
            p0 = int(start[g[0]])
        cur.append(g)
        size += len(g)
    if cur:
        chunks.append(torch.cat(cur))
    return [ch[torch.argsort(join[ch], stable=True)] for ch in chunks]


def activation_patching(
    model: HookedTransformer,
    clean: Prompts,
    corrupted: Prompts,
    metric: Callable[[torch.Tensor], torch.Tensor],
    hook: str = "resid_pre",
    granularity: Granularity = "position",
    *,
    direction: Direction = "denoise",
    normalize: bool = False,
    layers: Sequence[int] | None = None,
    positions: Sequence[int] | None = None,
    attention_mask: torch.Tensor | tuple[torch.Tensor, torch.Tensor] | None = None,
    prepend_bos: bool | None = None,
    batch_size: int | None = None,
    max_memory: int | None = None,
    reuse_prefix: bool = True,
    skip_unchanged: bool = True,
    progress: bool | None = None,
    interventions: Intervention | Sequence[Intervention] | None = None,
) -> torch.Tensor:
    """The metric after patching each activation of a sweep from one run into the other.

    model: a HookedTransformer with an unembedding. clean, corrupted: text, lists of text or token ids
    [B, T] of the same shape (different token lengths raise PromptMismatchError; see align_prompts).
    metric: logits [B, T, V] -> scalar (or [B] per prompt: the result then ends with a prompt dim [.., B]);
    LogitDiff / TokenProb / KLDivergence are fast (only the positions they read are unembedded).
    hook: a short name ('resid_pre', 'resid_mid', 'resid_post', 'attn_out', 'mlp_out', 'z', 'result', 'q',
    'k', 'v', 'pattern', 'attn_scores', 'mlp_pre', 'mlp_post', 'embed') or a 'blocks.{layer}....' template,
    swept over `layers` (default all): the result starts with a layer dim; or one exact hook name: no layer
    dim. granularity: 'layer' (the whole activation) -> [L]; 'position' -> [L, pos] (query position for
    patterns); 'head' -> [L, head] (kv heads for k/v under GQA); 'head_position' -> [L, head, pos];
    'neuron' (last dim of [B, T, d] activations) -> [L, d]. positions: restrict the patched positions
    (the pos dim then follows this list).
    direction: 'denoise' runs the corrupted prompts with clean activations patched in (how much of the
    clean behaviour one activation restores); 'noise' runs the clean prompts with corrupted activations
    (how much is lost without it). normalize=True returns (m - m_corrupted) / (m_clean - m_corrupted): 1 =
    clean behaviour, 0 = corrupted behaviour, in both directions.
    attention_mask: [B, T] for both runs, or (clean_mask, corrupted_mask) from align_prompts.
    batch_size: patches per forward pass (each is B rows); default from max_memory (bytes; default 1 GiB on
    CPU, half the free memory on CUDA). reuse_prefix=False runs every patch through the whole model;
    skip_unchanged=False also runs patches whose source values equal the values they replace (e.g. at
    positions before the first token where clean and corrupted differ), whose result is otherwise the
    unpatched run's metric. Both are for checking: the results agree up to float rounding.
    interventions: applied in every run of the sweep (both unpatched runs and every patched one), e.g. to
    patch a steered model; they select absolute positions, so they act the same in the prefix-reusing batches.
    """
    if interventions is not None:
        with model.interventions(interventions):
            return activation_patching(model, clean, corrupted, metric, hook, granularity, direction=direction,
                                       normalize=normalize, layers=layers, positions=positions,
                                       attention_mask=attention_mask, prepend_bos=prepend_bos,
                                       batch_size=batch_size, max_memory=max_memory, reuse_prefix=reuse_prefix,
                                       skip_unchanged=skip_unchanged, progress=progress)
    if direction not in ("denoise", "noise"):
        raise InputError(f"direction must be 'denoise' (clean -> corrupted run) or 'noise' (corrupted -> clean "
                         f"run), got {direction!r}.")
    if not callable(metric):
        raise MetricError(f"metric must be callable (logits [B, T, V] -> scalar), got {type(metric).__name__}.")
    if not model.cfg.has_unembed:
        raise InputError(f"{model.cfg.architecture} has no unembedding: patching metrics read logits.")
    if batch_size is not None and (not isinstance(batch_size, int) or batch_size < 1):
        raise InputError(f"batch_size (patches per forward pass) must be a positive int, got {batch_size!r}.")
    c_tok, k_tok, c_mask, k_mask = tokenize_pair(model, clean, corrupted, attention_mask, prepend_bos)
    c_tok, c_mask = model.prepare(c_tok, c_mask, None, "right")
    k_tok, k_mask = model.prepare(k_tok, k_mask, None, "right")
    src_tok, src_mask, base_tok, base_mask = ((c_tok, c_mask, k_tok, k_mask) if direction == "denoise"
                                              else (k_tok, k_mask, c_tok, c_mask))
    B, T = base_tok.shape
    names, swept = resolve_hook(model, hook, layers)
    name_layer = torch.tensor([_layer_of(model, n) for n in names])  # validates: no patching of the logits
    axes = patch_axes(names[0], 4 if names[0].rsplit(".", 1)[-1] in _PER_HEAD + _PATTERN_LIKE else 3, granularity)
    pd = _pos_dim(names[0])
    pos_vals = torch.arange(T)
    if positions is not None:
        if pd not in axes:
            raise InputError(f"positions= restricts position sweeps; granularity {granularity!r} has no position.")
        pos_vals = torch.tensor([int(p) % T if -T <= int(p) < T else T for p in positions], dtype=torch.long)
        if len(pos_vals) == 0 or bool((pos_vals >= T).any()):
            raise InputError(f"positions must be non-empty and within [-{T}, {T}), got {list(positions)}.")
    if isinstance(metric, BatchedMetric):
        raw = [int(p) for p in metric.logit_positions]
        if any(not -T <= p < T for p in raw):
            raise MetricError(f"The metric reads positions {raw} but the prompts have {T} tokens.")
        need = torch.tensor([p % T for p in raw], device=model.device)
    else:
        need = torch.arange(T, device=model.device)

    with torch.inference_mode():
        # ---- the two unpatched runs: baselines, source activations, the shared prefix of patched runs
        src = _base_run(model, src_tok, src_mask, names)
        base = _base_run(model, base_tok, base_mask, names)
        runs = ("clean", "corrupted") if direction == "denoise" else ("corrupted", "clean")
        m_src = check_metric_value(metric(src.logits), B, f"{runs[0]} run")
        m_base = check_metric_value(metric(base.logits), B, f"{runs[1]} run")
        if m_src.shape != m_base.shape:
            raise MetricError("The metric returned a scalar on one run and per-prompt values on the other.")
        per_prompt = m_base.dim() == 1
        base.logits = base.logits[:, need]
        src_acts = [src.acts[n] for n in names]
        del src

        # ---- the patches: site (hook) and one coordinate per patched axis, [P] each
        grids = [torch.arange(len(names))] + [pos_vals if d == pd else torch.arange(src_acts[0].shape[d])
                                              for d in axes]
        site, *coords = (g.reshape(-1) for g in torch.meshgrid(*grids, indexing="ij"))
        P = len(site)
        todo = torch.arange(P)
        if skip_unchanged:  # a patch writing the values already there is the unpatched run: not run
            changed = torch.stack([_changed(a, base.acts[n], axes) for a, n in zip(src_acts, names)]).cpu()
            todo = changed[(site, *coords)].nonzero().squeeze(-1)
        base.acts = {}
        # where each patch's rows join the batch (its layer) and the first position it can change
        join = name_layer[site] if reuse_prefix else torch.full((P,), -1, dtype=torch.long)
        causal = reuse_prefix and model.cfg.causal and pd in axes
        start = coords[axes.index(pd)] if causal else torch.zeros(P, dtype=torch.long)
        if batch_size is None:
            row_bytes = _bytes_per_row(model, T, len(need), names[0].rsplit(".", 1)[-1] in _PATTERN_LIKE)
            batch_size = (max(1, int(max_memory) // (row_bytes * B)) if max_memory is not None
                          else _default_patches_per_batch(model, B, T, row_bytes))
        min_tokens = 512 if model.device.type == "cpu" else float("inf")
        chunks = [todo[ch] for ch in _plan(join[todo], start[todo], batch_size, B, T, min_tokens)] if len(todo) else []

        # ---- the sweep: one forward pass per batch of patches
        values = m_base.to(model.device).expand((P, B) if per_prompt else (P,)).clone()
        from tqdm.auto import tqdm

        show = len(chunks) > 4 if progress is None else progress
        dev = model.device
        for ids in tqdm(chunks, desc=f"patching {hook}", disable=not show, leave=False):
            n, p0 = len(ids), int(start[ids].min())  # ids are sorted by join layer
            rows = (torch.arange(n)[:, None] * B + torch.arange(B)).to(dev)  # [n, B]: patch-major
            hooks = []
            for s in torch.unique(site[ids]).tolist():  # one hook per patched layer, all its patches at once
                sel = (site[ids] == s).to(dev)
                r = rows[sel].reshape(-1)
                at = [(d, c[ids].to(dev)[sel].repeat_interleave(B) - (p0 if d == pd else 0))
                      for d, c in zip(axes, coords)]
                hooks.append((names[s], _patch_hook(src_acts[s].narrow(pd, p0, T - p0), r, r % B, at)))
            with model.hooks(fwd_hooks=hooks):
                logits = _run_patched(model, base, join[ids], p0, need)  # [n * B, len(need), V]
            grouped = logits.view(n, B, *logits.shape[1:])
            if isinstance(metric, BatchedMetric):
                v = metric.batched(grouped)
                if tuple(v.shape) != ((n, B) if per_prompt else (n,)):
                    raise MetricError(f"metric.batched returned shape {tuple(v.shape)}, expected "
                                      f"{(n, B) if per_prompt else (n,)}.")
            else:  # a plain callable: once per patch, on the final logits only
                v = torch.stack([check_metric_value(metric(g), B, "patched run") for g in grouped])
            values[ids.to(dev)] = v.float()

    if not bool(torch.isfinite(values).all()):
        raise MetricError("The metric returned a non-finite value on some patched runs.")
    if normalize:
        m_clean, m_corr = (m_src, m_base) if direction == "denoise" else (m_base, m_src)
        denom = m_clean - m_corr
        if bool((denom.abs() < 1e-12).any()):
            raise MetricError(f"normalize=True divides by metric(clean) - metric(corrupted) = {denom.tolist()}: the "
                              "corruption does not change the metric, so there is nothing to restore.")
        values = (values - m_corr) / denom
    shape = ([len(names)] if swept else []) + [len(g) for g in grids[1:]] + ([B] if per_prompt else [])
    return values.reshape(shape)


def _changed(src: torch.Tensor, base: torch.Tensor, axes: list[int]) -> torch.Tensor:
    """Which patches would change anything: bool [size of each axis, in axes order], True where src
    and base differ somewhere in the patched region (any prompt)."""
    ne = src != base
    red = tuple(d for d in range(ne.dim()) if d not in axes)
    ch = ne.any(dim=red) if red else ne
    kept = [d for d in range(ne.dim()) if d in axes]
    return ch.permute([kept.index(a) for a in axes]) if axes else ch


def _patch_hook(src: torch.Tensor, rows: torch.Tensor, prompts: torch.Tensor, coords: list[tuple[int, torch.Tensor]]):
    """A hook writing src[prompt, coords] into act[row, coords] for all (row, coords) at once."""
    ndim = src.dim()
    dst_idx: list[Any] = [slice(None)] * ndim
    src_idx: list[Any] = [slice(None)] * ndim
    dst_idx[0], src_idx[0] = rows, prompts
    for d, v in coords:
        dst_idx[d] = src_idx[d] = v
    dst_t, src_t = tuple(dst_idx), tuple(src_idx)
    values = src[src_t]

    def hook(act: torch.Tensor, hook: Any) -> torch.Tensor:
        out = act.clone()
        out[dst_t] = values.to(act.dtype)
        return out

    return hook


# ============================================================================ helpers by component


def patch_resid(model: HookedTransformer, clean: Prompts, corrupted: Prompts, metric: Callable,
                which: Literal["pre", "mid", "post"] = "pre", granularity: Granularity = "position",
                **kwargs: Any) -> torch.Tensor:
    """Residual stream patching ([n_layers, pos] by default): where does the information live?"""
    return activation_patching(model, clean, corrupted, metric, f"resid_{which}", granularity, **kwargs)


def patch_attn_out(model: HookedTransformer, clean: Prompts, corrupted: Prompts, metric: Callable,
                   granularity: Granularity = "position", **kwargs: Any) -> torch.Tensor:
    """Attention layer outputs (hook_attn_out), [n_layers, pos] by default."""
    return activation_patching(model, clean, corrupted, metric, "attn_out", granularity, **kwargs)


def patch_mlp_out(model: HookedTransformer, clean: Prompts, corrupted: Prompts, metric: Callable,
                  granularity: Granularity = "position", **kwargs: Any) -> torch.Tensor:
    """MLP layer outputs (hook_mlp_out), [n_layers, pos] by default."""
    return activation_patching(model, clean, corrupted, metric, "mlp_out", granularity, **kwargs)


def patch_head_out(model: HookedTransformer, clean: Prompts, corrupted: Prompts, metric: Callable,
                   granularity: Granularity = "head", **kwargs: Any) -> torch.Tensor:
    """Per-head outputs (hook_z, i.e. before W_O), [n_layers, n_heads] by default."""
    return activation_patching(model, clean, corrupted, metric, "z", granularity, **kwargs)


def patch_head_components(model: HookedTransformer, clean: Prompts, corrupted: Prompts, metric: Callable,
                          granularity: Granularity = "head",
                          components: Sequence[str] = ("z", "q", "k", "v", "pattern"),
                          **kwargs: Any) -> dict[str, torch.Tensor]:
    """Every per-head component: {"z": [L, H], "q": [L, H], "k": [L, K], "v": [L, K], "pattern": [L, H]}
    (k/v have n_kv_heads under GQA, hence a dict, not a stacked tensor)."""
    return {c: activation_patching(model, clean, corrupted, metric, c, granularity, **kwargs) for c in components}


def patch_block_components(model: HookedTransformer, clean: Prompts, corrupted: Prompts, metric: Callable,
                           granularity: Granularity = "position", **kwargs: Any) -> dict[str, torch.Tensor]:
    """resid_pre, attn_out and mlp_out (mlp_out absent for attention-only models), [L, pos] each."""
    parts = ["resid_pre", "attn_out"] + ([] if model.cfg.attn_only else ["mlp_out"])
    return {p: activation_patching(model, clean, corrupted, metric, p, granularity, **kwargs) for p in parts}


__all__ = ["GRANULARITIES", "KLDivergence", "LogitDiff", "TokenProb", "activation_patching", "align_prompts",
           "check_metric_value", "patch_attn_out", "patch_axes", "patch_block_components", "patch_head_components",
           "patch_head_out", "patch_mlp_out", "patch_resid", "resolve_hook"]
