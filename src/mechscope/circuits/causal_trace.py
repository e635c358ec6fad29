"""Causal tracing (Meng et al. 2022, ROME): where in the network is a fact about a subject recalled?

    t = causal_trace(model, "The Eiffel Tower is located in the city of", subject="The Eiffel Tower", kind="mlp")
    t.effects      # [n_layers, n_positions]: P(answer | corrupted, restored) - P(answer | corrupted)
    t.plot().save("trace.png")

The recipe: run the prompt clean and record every state; corrupt the subject by adding Gaussian noise to its token
embeddings (`noise` x the standard deviation of the embeddings, 3 as in the paper; `samples` seeded draws, their
probabilities averaged); then, in the corrupted run, restore the clean value of one state and see how much of the
answer's probability comes back. kind="resid" restores the residual stream after block l at one position;
kind="mlp" / "attn" restore the MLP / attention outputs of a window of `window` layers around l (10 by default,
[l - 5, l + 5) clipped at the ends, as in the paper) at one position.

Why batched: a trace is n_layers x n_positions restorations, each a forward pass. Here one forward carries many:
the rows of a batch are (restoration, noise sample) pairs, restoration-major, so the corrupted run's S noised
rows play the role of the base prompts of the activation-patching engine (circuits/patching.py):
  - a restoration starting at layer a changes nothing before block a: its rows join the batch there, from the
    corrupted run's residual (restorations are sorted by first layer, so live rows are a prefix of the batch);
  - a restoration at position p changes nothing before p: the batch of restorations at p computes positions >= p
    only, with the corrupted run's keys/values before p (KVPrefix);
  - positions before the first subject token are the same in the clean and corrupted runs: restoring them is
    the corrupted run itself (indirect effect exactly 0), so they are not run;
  - only the last position is unembedded.
`batched=False` runs the plain one-forward-per-restoration loop instead (model.run_with_hooks), for checking:
both agree up to float rounding.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch

from mechscope.errors import InputError, SubjectNotFoundError
from mechscope.fileio import atomic_write_json
from mechscope.models.components import KVPrefix, KVRecorder
from mechscope.models.transformer import HookedTransformer

Kind = Literal["resid", "mlp", "attn"]
KINDS = ("resid", "mlp", "attn")
_HOOK = {"resid": "hook_resid_post", "mlp": "hook_mlp_out", "attn": "hook_attn_out"}
DEFAULT_WINDOW = {"resid": 1, "mlp": 10, "attn": 10}
# the position classes of the paper's averaged heatmaps (Meng et al. 2022, fig. 2)
BUCKETS = ("first subject token", "middle subject tokens", "last subject token", "first subsequent token",
           "further tokens", "last token")


# ============================================================================ results


@dataclass
class CausalTrace:
    """The causal trace of one prompt. Positions before the subject have effect 0 (nothing to restore)."""

    prompt: str
    subject: str
    kind: str
    window: int
    tokens: list[str]  # [n_positions] the prompt's tokens as strings (BOS included when the model adds it)
    token_ids: list[int]
    subject_range: tuple[int, int]  # [start, stop) token positions of the subject
    target: int  # the token whose probability is traced
    target_str: str
    effects: torch.Tensor  # [n_layers, n_positions] P(target | corrupted, restored) - P(target | corrupted)
    restored: torch.Tensor  # [n_layers, n_positions] P(target | corrupted, restored)
    p_clean: float  # P(target | clean prompt)
    p_corrupted: float  # P(target | corrupted subject), averaged over noise samples
    noise_std: float  # the standard deviation of the noise added to the subject's embeddings
    samples: int
    seed: int
    note: str | None = None  # e.g. "target ' New York' is 2 tokens: traced its first token ' New'"
    layers: list[int] = field(default_factory=list)  # the layer of each row of effects

    @property
    def peak(self) -> tuple[int, int, float]:
        """(layer, position, effect) of the largest indirect effect."""
        i = int(self.effects.argmax())
        L, T = self.effects.shape
        return self.layers[i // T], i % T, float(self.effects.reshape(-1)[i])

    def to_dict(self) -> dict[str, Any]:
        d = {k: getattr(self, k) for k in ("prompt", "subject", "kind", "window", "tokens", "token_ids", "target",
                                           "target_str", "p_clean", "p_corrupted", "noise_std", "samples", "seed",
                                           "note", "layers")}
        layer, pos, value = self.peak
        return d | {"subject_range": list(self.subject_range), "effects": self.effects.tolist(),
                    "restored": self.restored.tolist(), "peak": {"layer": layer, "position": pos, "effect": value}}

    def plot(self, title: str | None = None):
        """A Plot (PNG + data) of the effects: layers down, tokens across (the subject's tokens marked '*')."""
        from mechscope.viz.plots import patching_heatmap

        s0, s1 = self.subject_range
        labels = [t + ("*" if s0 <= i < s1 else "") for i, t in enumerate(self.tokens)]
        title = title or (f"Causal trace ({self.kind}{'' if self.kind == 'resid' else f', window {self.window}'}): "
                          f"P({self.target_str!r}) restored - corrupted")
        return patching_heatmap(self.effects.T, x_labels=[str(i) for i in self.layers],
                                y_labels=labels, x_label="layer", y_label="token", title=title,
                                value_label="indirect effect", annotate=False)

    def save(self, folder: str | Path, name: str | None = None) -> tuple[Path, Path]:
        """folder/NAME.png (the heatmap, with its data as NAME.json beside it) and folder/NAME.trace.json (this
        result); NAME defaults to 'trace_{kind}'. Written atomically."""
        folder = Path(folder)
        name = name or f"trace_{self.kind}"
        png, _ = self.plot().save(folder / f"{name}.png")
        js = folder / f"{name}.trace.json"
        atomic_write_json(js, self.to_dict())
        return png, js


@dataclass
class AverageTrace:
    """Indirect effects averaged over facts, positions aligned by their role (BUCKETS): [n_layers, 6]."""

    kind: str
    window: int
    effects: torch.Tensor  # [n_layers, len(BUCKETS)]
    counts: list[int]  # facts contributing to each bucket (a one-token subject has no middle tokens)
    n_facts: int
    p_clean: float  # mean over facts
    p_corrupted: float
    layers: list[int] = field(default_factory=list)  # the layer of each row of effects
    labels: tuple[str, ...] = field(default=BUCKETS)

    @property
    def peak(self) -> tuple[int, str, float]:
        """(layer, bucket label, effect) of the largest average indirect effect."""
        i = int(self.effects.argmax())
        n = self.effects.shape[1]
        return self.layers[i // n], self.labels[i % n], float(self.effects.reshape(-1)[i])

    def peak_in(self, bucket: str) -> tuple[int, float]:
        """(layer, effect) of the largest average effect at one position class, e.g. 'last subject token'."""
        col = self.effects[:, self.labels.index(bucket)]
        return self.layers[int(col.argmax())], float(col.max())

    def to_dict(self) -> dict[str, Any]:
        layer, bucket, value = self.peak
        return {"kind": self.kind, "window": self.window, "labels": list(self.labels), "counts": self.counts,
                "layers": self.layers,
                "n_facts": self.n_facts, "p_clean": self.p_clean, "p_corrupted": self.p_corrupted,
                "effects": self.effects.tolist(), "peak": {"layer": layer, "position": bucket, "effect": value}}

    def plot(self, title: str | None = None):
        from mechscope.viz.plots import patching_heatmap

        title = title or f"Average indirect effect ({self.kind}), {self.n_facts} facts"
        return patching_heatmap(self.effects.T, x_labels=[str(i) for i in self.layers],
                                y_labels=list(self.labels), x_label="layer", y_label="", title=title,
                                value_label="average indirect effect", center=None, annotate=False, max_chars=24)

    def save(self, folder: str | Path, name: str | None = None) -> tuple[Path, Path]:
        """folder/NAME.png + NAME.json (plot data) and folder/NAME.average.json; NAME defaults to 'average_{kind}'."""
        folder = Path(folder)
        name = name or f"average_{self.kind}"
        png, _ = self.plot().save(folder / f"{name}.png")
        js = folder / f"{name}.average.json"
        atomic_write_json(js, self.to_dict())
        return png, js


def bucket_positions(subject_range: tuple[int, int], n_positions: int) -> list[list[int]]:
    """The positions of each BUCKETS class for a prompt of n_positions tokens whose subject is [s0, s1).
    A one-token subject is both the first and the last subject token; the last token is never counted as a
    subsequent one."""
    s0, s1 = subject_range
    T = n_positions
    last = T - 1
    return [[s0], list(range(s0 + 1, s1 - 1)), [s1 - 1], [s1] if s1 < last else [],
            list(range(s1 + 1, last)), [last]]


def average_traces(traces: Sequence[CausalTrace]) -> AverageTrace:
    """Average the indirect effects of many traces (one kind, one model), aligning positions by role: first /
    middle / last subject token, first subsequent token, further tokens, last token (as Meng et al. 2022 do).
    Each fact contributes its mean over the positions of a class; a class is averaged over the facts having it."""
    traces = list(traces)
    if not traces or any(not isinstance(t, CausalTrace) for t in traces):
        raise InputError("average_traces needs a non-empty list of CausalTrace results (from causal_trace).")
    kinds = {(t.kind, t.window, tuple(t.layers)) for t in traces}
    if len(kinds) > 1:
        raise InputError(f"average_traces mixes traces of different kinds / windows / traced layers: {sorted(kinds)}; "
                         "average each kind separately.")
    L = traces[0].effects.shape[0]
    total = torch.zeros(L, len(BUCKETS), dtype=torch.float64)
    counts = [0] * len(BUCKETS)
    for t in traces:
        for j, pos in enumerate(bucket_positions(t.subject_range, t.effects.shape[1])):
            if pos:
                total[:, j] += t.effects[:, pos].double().mean(1)
                counts[j] += 1
    effects = (total / torch.tensor(counts, dtype=torch.float64).clamp(min=1)).float()
    for j, c in enumerate(counts):
        if c == 0:
            effects[:, j] = float("nan")
    n = len(traces)
    return AverageTrace(traces[0].kind, traces[0].window, effects, counts, n, sum(t.p_clean for t in traces) / n,
                        sum(t.p_corrupted for t in traces) / n, list(traces[0].layers))


# ============================================================================ inputs


def find_subject(model: HookedTransformer, tokens: torch.Tensor, subject: str) -> tuple[int, int]:
    """The token range [start, stop) covering the first occurrence of `subject` in the prompt `tokens` [T].
    Matches the decoded text (so 'Eiffel Tower' is found whether or not the tokenizer glued a space to it), then
    the subject's own token ids; SubjectNotFoundError shows the prompt's tokens otherwise."""
    if not isinstance(subject, str) or not subject.strip():
        raise InputError(f"subject must be a non-empty string that occurs in the prompt, got {subject!r}.")
    tok = model.require_tokenizer()
    ids = tokens.tolist()
    special = set(getattr(tok, "all_special_ids", []) or [])
    pieces = ["" if i in special else tok.decode([i]) for i in ids]
    text = "".join(pieces)
    for want in (subject, subject.strip()):
        c0 = text.find(want)
        if c0 >= 0 and want:
            c1, start, stop, pos = c0 + len(want), None, None, 0
            for i, p in enumerate(pieces):
                if p and pos < c1 and pos + len(p) > c0:
                    start = i if start is None else start
                    stop = i + 1
                pos += len(p)
            if start is not None:
                return start, stop
    for variant in (subject, " " + subject.lstrip(), subject.strip()):  # tokenizers that decode without spaces
        sub = tok(variant, add_special_tokens=False)["input_ids"]
        for s in range(len(ids) - len(sub) + 1):
            if sub and ids[s:s + len(sub)] == sub:
                return s, s + len(sub)
    shown = [tok.decode([i]) for i in ids]
    raise SubjectNotFoundError(f"Subject {subject!r} not found in the prompt, whose tokens are {shown}; give the "
                               "subject exactly as it is written in the prompt (same case and spelling).")


def _target_id(model: HookedTransformer, target: str | int | None, clean_last: torch.Tensor) -> tuple[int, str | None]:
    """(token id, note): the model's own greedy answer when target is None; a string's first token."""
    tok = model.require_tokenizer()
    if target is None:
        return int(clean_last.argmax()), None
    if isinstance(target, int) and not isinstance(target, bool):
        if not 0 <= target < model.cfg.d_vocab:
            raise InputError(f"target token id {target} is outside the vocabulary [0, {model.cfg.d_vocab}).")
        return target, None
    if not isinstance(target, str) or not target:
        raise InputError(f"target must be None (the model's greedy answer), a token id or a non-empty string such "
                         f"as ' Paris', got {target!r}.")
    ids = tok(target, add_special_tokens=False)["input_ids"]
    if not ids:
        raise InputError(f"target {target!r} produced no tokens.")
    if len(ids) == 1:
        return ids[0], None
    first = tok.decode([ids[0]])
    return ids[0], (f"target {target!r} is {len(ids)} tokens {[tok.decode([i]) for i in ids]}: traced the "
                    f"probability of its first token {first!r}")


def embedding_std(model: HookedTransformer) -> float:
    """The standard deviation of the token embeddings (hook_embed's output) over the whole vocabulary. The
    paper measures it over the subjects' tokens of its fact set; the vocabulary is the model-only analogue."""
    w = model.embed.weight.detach().float()
    scale = model.embed.scale if model.embed.scale is not None else 1.0
    return float(w.std()) * float(scale)


# ============================================================================ the trace


def causal_trace(
    model: HookedTransformer,
    prompt: str,
    subject: str,
    kind: Kind = "resid",
    *,
    target: str | int | None = None,
    samples: int = 10,
    noise: float = 3.0,
    noise_std: float | None = None,
    window: int | None = None,
    seed: int = 0,
    layers: Sequence[int] | None = None,
    batch_size: int | None = None,
    batched: bool = True,
    prepend_bos: bool | None = None,
) -> CausalTrace:
    """Trace where the model recalls the fact `prompt` -> target about `subject` (Meng et al. 2022).

    kind: 'resid' (the residual after block l), 'mlp' or 'attn' (outputs of layers [l - window//2,
    l + ceil(window/2)) clipped to the model) restored at one position. target: None = the model's greedy next
    token on the clean prompt; a string (its first token if several, said in result.note) or a token id.
    samples: noise draws averaged (seeded by `seed`). noise: the noise's std in units of the embedding std
    (noise_std gives it absolutely; default embedding_std(model)). window: layers restored together (default 1
    for resid, 10 for mlp / attn). layers: the layers l traced (default all; the rows of effects then follow this
    list, e.g. range(0, n_layers, 2) halves the cost). batch_size: rows (restoration x sample) per forward (default: ~4k tokens).
    batched=False: the one-forward-per-restoration reference loop.
    Returns a CausalTrace with effects [n_layers (or len(layers)), n_positions]."""
    if not isinstance(prompt, str) or not prompt.strip():
        raise InputError(f"Empty prompt: causal tracing needs a prompt that states the start of a fact, got "
                         f"{prompt!r}.")
    if kind not in KINDS:
        raise InputError(f"kind must be one of {', '.join(KINDS)} (residual stream, MLP outputs, attention outputs), "
                         f"got {kind!r}.")
    c = model.cfg
    if not c.causal or not c.has_unembed:
        raise InputError(f"Causal tracing needs a causal language model with an unembedding; {c.architecture} is not.")
    if kind == "mlp" and c.attn_only:
        raise InputError("This model has no MLPs (attention-only); trace kind='attn' or 'resid'.")
    window = DEFAULT_WINDOW[kind] if window is None else window
    traced = list(range(c.n_layers)) if layers is None else [int(x) for x in layers]
    if not traced or any(not 0 <= x < c.n_layers for x in traced) or len(set(traced)) != len(traced):
        raise InputError(f"layers must be distinct layers in [0, {c.n_layers}), got {layers!r}.")
    if not isinstance(window, int) or isinstance(window, bool) or window < 1:
        raise InputError(f"window must be a positive number of layers, got {window!r}.")
    if not isinstance(samples, int) or isinstance(samples, bool) or samples < 1:
        raise InputError(f"samples (noise draws) must be a positive int, got {samples!r}.")
    if batch_size is not None and (not isinstance(batch_size, int) or batch_size < 1):
        raise InputError(f"batch_size (rows per forward) must be a positive int, got {batch_size!r}.")
    std = embedding_std(model) if noise_std is None else float(noise_std)
    level = float(noise) * std
    if not level > 0 or level != level or level == float("inf"):
        raise InputError(f"The noise level (noise x std = {noise} x {std}) must be finite and positive.")

    tokens, _ = model.prepare(prompt, prepend_bos=prepend_bos)  # [1, T]
    T, L = tokens.shape[1], c.n_layers
    model.check_context(T)
    s0, s1 = find_subject(model, tokens[0], subject)
    names = [f"blocks.{layer}.{_HOOK[kind]}" for layer in range(L)]
    g = torch.Generator().manual_seed(int(seed))
    delta = torch.zeros(samples, T, c.d_model)
    delta[:, s0:s1] = torch.randn(samples, s1 - s0, c.d_model, generator=g) * level
    delta = delta.to(model.device, model.dtype)  # [S, T, D] the noise, fixed per sample for every restoration

    def add_noise(x: torch.Tensor, hook: Any) -> torch.Tensor:  # hook_embed: [S', T', D], rows = samples
        return x + delta.repeat(x.shape[0] // samples, 1, 1)[:, -x.shape[1]:]

    with torch.inference_mode():
        clean_logits, cache = model.run_with_cache(tokens, names_filter=names)
        probs = clean_logits[0, -1].float().softmax(-1)
        tgt, note = _target_id(model, target, probs)
        p_clean = float(probs[tgt])
        clean = torch.stack([cache[n][0] for n in names])  # [L, T, D]
        del cache
        windows = [(max(0, layer - window // 2), min(L, layer - (-window // 2))) for layer in traced]
        if batched:
            p_corr, restored = _trace_batched(model, tokens, names, clean, windows, (s0, T), add_noise, samples,
                                              tgt, batch_size)
        else:
            p_corr, restored = _trace_loop(model, tokens, names, clean, windows, (s0, T), add_noise, samples, tgt)
    full = torch.full((len(traced), T), p_corr)
    full[:, s0:] = restored
    return CausalTrace(prompt, subject, kind, window, [model.tokenizer.decode([i]) for i in tokens[0].tolist()],
                       tokens[0].tolist(), (s0, s1), tgt, model.tokenizer.decode([tgt]), full - p_corr, full,
                       p_clean, p_corr, level, samples, int(seed), note, traced)


def _restore_hook(rows: torch.Tensor, col: int, value: torch.Tensor):
    """A hook writing `value` [D] into act[rows, col] (the clean state of one position, for these rows)."""

    def hook(act: torch.Tensor, hook: Any) -> torch.Tensor:
        out = act.clone()
        out[rows, col] = value.to(act.dtype)
        return out

    return hook


def _trace_loop(model, tokens, names, clean, windows, span, add_noise, S, tgt):
    """The reference: one full forward of the S noised copies per restoration, restoring by hooks."""
    s0, T = span
    batch = tokens.repeat(S, 1)
    p_corr = float(model.run_with_hooks(batch, fwd_hooks=[("hook_embed", add_noise)])[:, -1].float()
                   .softmax(-1)[:, tgt].mean())
    out = torch.zeros(len(windows), T - s0)
    rows = torch.arange(S, device=model.device)
    for p in range(s0, T):
        for layer, (a, b) in enumerate(windows):
            hooks = [("hook_embed", add_noise)] + [(names[k], _restore_hook(rows, p, clean[k, p]))
                                                  for k in range(a, b)]
            logits = model.run_with_hooks(batch, fwd_hooks=hooks)
            out[layer, p - s0] = float(logits[:, -1].float().softmax(-1)[:, tgt].mean())
    return p_corr, out


def _trace_batched(model, tokens, names, clean, windows, span, add_noise, S, tgt, batch_size):
    """The corrupted run once (S noised rows, keeping each block's input residual and the keys/values), then
    the restorations of each position p in batches: rows (restoration, sample), restoration-major, joining at
    the first restored layer and computing positions >= p only."""
    s0, T = span
    L = len(names)
    kv = KVRecorder(L)
    state = model.run_state(None, S, T, kv=kv)
    with model.hooks(fwd_hooks=[("hook_embed", add_noise)]):
        x = model.embed_tokens(tokens.repeat(S, 1), state)
    resid = []
    for layer in range(L):
        resid.append(x)
        x = model.run_blocks(x, state, layer, layer + 1)
    p_corr = float(model.head(x, [T - 1], state=state)[:, 0].float().softmax(-1)[:, tgt].mean())

    per = max(1, (batch_size or max(S, 4096 // max(1, T - s0))) // S)  # restorations per forward
    first = torch.tensor([a for a, _ in windows])
    out = torch.zeros(len(windows), T - s0)
    for p in range(s0, T):
        order = torch.argsort(first, stable=True)  # rows join by first restored layer
        for ids in order.split(per):
            out[ids, p - s0] = _run_restorations(model, resid, kv, [windows[i] for i in ids.tolist()], names,
                                                 clean[:, p], p, S, T, tgt)
    return p_corr, out


def _run_restorations(model, resid, kv, wins, names, clean_p, p, S, T, tgt) -> torch.Tensor:
    """P(target) averaged over the S samples for each restoration window in `wins` (sorted by first layer), all
    at position p, in one forward of len(wins) x S rows over positions >= p."""
    L = len(names)
    n, Tn, dev = len(wins), T - p, model.device
    state = model.run_state(None, n * S, Tn, past=p, kv=KVPrefix(kv, p) if p > 0 else None)
    hooks = []
    for k in range(L):
        hit = [i for i, (a, b) in enumerate(wins) if a <= k < b]
        if hit:
            rows = (torch.tensor(hit)[:, None] * S + torch.arange(S)).reshape(-1).to(dev)
            hooks.append((names[k], _restore_hook(rows, 0, clean_p[k])))
    starts = torch.tensor([a for a, _ in wins])
    x = None
    with model.hooks(fwd_hooks=hooks):
        for layer in range(L):
            k = int((starts == layer).sum())
            if k:
                new = resid[layer][:, p:].repeat(k, 1, 1)
                x = new if x is None else torch.cat([x, new])
            if x is not None:
                x = model.run_blocks(x, state.rows(x.shape[0]), layer, layer + 1)
    logits = model.head(x, [Tn - 1], state=state)[:, 0]  # [n * S, V]
    return logits.float().softmax(-1)[:, tgt].view(n, S).mean(1).cpu()


__all__ = ["BUCKETS", "KINDS", "AverageTrace", "CausalTrace", "average_traces", "bucket_positions", "causal_trace",
           "embedding_std", "find_subject"]
