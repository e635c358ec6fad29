"""Explanation quality as a number: detection balanced accuracy on held-out text.

    dset = detection_windows(model, coder, "sotu", tokens=200_000)   # validation split by default
    scores = score_detection(explain_offline(stats, tok), dset)
    scores.summary()  # {'mean': ..., 'median': ..., 'n_above_0.8': ...}

Detection (as in EleutherAI's delphi): for each feature, show a detector some windows of held-out text
where the feature fires (positives, stratified over activation quantiles) and some where it never fires
(negatives), and ask which ones the explanation picks out. Balanced accuracy = (TPR + TNR) / 2: 0.5 is
chance, 1.0 perfect, whatever the positive/negative mix.

What the default detector measures: `term_detector` is a KEYWORD MATCHER. It predicts "fires" iff one of
the explanation's token n-grams occurs in the window, so it scores how well the explainer's keyword list
separates firing from non-firing text, not whether the prose explanation is right. Explanations without
terms (LLM ones) need an `LLMDetector`, which asks a model the same question in words.

A window is positive when the feature fires at any of its tokens; the window's own tokens are all a
detector sees, so a feature that fires because of text before the window can look unexplainable.
"""

from __future__ import annotations

import json
import math
import random
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file
from safetensors.torch import save as st_save

from mechscope.data.packing import PackedContexts, as_tokenizer, contexts
from mechscope.data.sources import TextSource
from mechscope.errors import (
    ArtifactMismatchError,
    CorruptFileError,
    EmptyCorpusError,
    ExplainerError,
    InputError,
    OutputNotWritableError,
)
from mechscope.features.explain import Explanation, artifact_id, call_explainer, decode_many
from mechscope.features.stats import check_coder, latent_acts_fn, without_token
from mechscope.fileio import atomic_write_bytes, atomic_write_json
from mechscope.models.identity import content_key

__all__ = [
    "DetectionScores",
    "DetectionSet",
    "LLMDetector",
    "detection_windows",
    "score_detection",
    "term_detector",
]

SET_FILE, SET_META = "detection_set.safetensors", "detection_set.json"
SCORES_FORMAT = "mechscope.detection_scores"
_MASK32 = 0xFFFFFFFF

Detector = Callable[[list[Explanation], torch.Tensor], torch.Tensor]


@dataclass
class DetectionSet:
    """Windows of held-out text and each tracked feature's max activation in them (tensors on CPU)."""

    features: torch.Tensor  # [F] long: latent index of each column
    window_max: torch.Tensor  # [W, F] float32: max activation of the feature over the window's tokens
    window_tokens: torch.Tensor  # [W, window] long
    window_context: torch.Tensor  # [W] long: context id in the packed held-out stream
    window_start: torch.Tensor  # [W] long: position of the window's first token in its context
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def n_windows(self) -> int:
        return self.window_tokens.shape[0]

    @property
    def window(self) -> int:
        return self.window_tokens.shape[1]

    def save(self, folder: str | Path) -> Path:
        """detection_set.safetensors + detection_set.json in `folder`, atomically."""
        folder = Path(folder)
        tensors = {n: getattr(self, n).contiguous() for n in
                   ("features", "window_max", "window_tokens", "window_context", "window_start")}
        try:
            folder.mkdir(parents=True, exist_ok=True)
            atomic_write_bytes(folder / SET_FILE, st_save(tensors))
            atomic_write_json(folder / SET_META, {"meta": self.meta})
        except OSError as e:
            raise OutputNotWritableError(f"Cannot write the detection set to {folder}: {e}. Choose a writable "
                                         "folder.") from None
        return folder

    @classmethod
    def load(cls, folder: str | Path) -> DetectionSet:
        folder = Path(folder)
        if not (folder / SET_FILE).is_file() or not (folder / SET_META).is_file():
            raise InputError(f"No {SET_FILE} + {SET_META} in {folder}; build one with detection_windows(...)"
                             ".save(folder).")
        try:
            t = load_file(str(folder / SET_FILE))
            meta = json.loads((folder / SET_META).read_text())["meta"]
        except (SafetensorError, OSError, ValueError, KeyError, TypeError) as e:
            raise CorruptFileError(f"The detection set in {folder} cannot be read ({e}); rebuild it with "
                                   "detection_windows.") from None
        names = ("features", "window_max", "window_tokens", "window_context", "window_start")
        if any(n not in t for n in names):
            raise CorruptFileError(f"{folder / SET_FILE} lacks tensors {[n for n in names if n not in t]}; "
                                   "rebuild it with detection_windows.")
        W, F = t["window_max"].shape if t["window_max"].dim() == 2 else (-1, -1)
        if (t["features"].shape != (F,) or t["window_tokens"].dim() != 2 or t["window_tokens"].shape[0] != W
                or t["window_context"].shape != (W,) or t["window_start"].shape != (W,)):
            raise CorruptFileError(f"{folder / SET_FILE} has inconsistent shapes; rebuild it with "
                                   "detection_windows.")
        return cls(meta=meta, **{n: t[n] for n in names})


@dataclass
class DetectionScores:
    """Per explanation: balanced accuracy (NaN when unscorable, with the reason), TPR, TNR, and how many
    positive / negative windows were used. tpr_by_quantile [n, bins]: TPR per activation-quantile bin of
    the positives (bin 0 = strongest), NaN where a bin got no window."""

    features: torch.Tensor  # [n] long
    balanced_accuracy: torch.Tensor  # [n] float64
    tpr: torch.Tensor  # [n] float64
    tnr: torch.Tensor  # [n] float64
    n_pos: torch.Tensor  # [n] long
    n_neg: torch.Tensor  # [n] long
    tpr_by_quantile: torch.Tensor  # [n, bins] float64
    reasons: list[str]  # '' where scored
    meta: dict[str, Any] = field(default_factory=dict)

    def summary(self, threshold: float = 0.8) -> dict[str, Any]:
        """Mean / median balanced accuracy over the scored features and how many exceed `threshold`."""
        ba = self.balanced_accuracy
        ok = ~torch.isnan(ba)
        s = ba[ok]
        return {
            "n": int(ba.numel()),
            "n_scored": int(ok.sum()),
            "mean": float(s.mean()) if s.numel() else None,
            "median": float(s.median()) if s.numel() else None,
            f"n_above_{threshold}": int((s > threshold).sum()),
            "mean_tpr": float(self.tpr[ok].mean()) if s.numel() else None,
            "mean_tnr": float(self.tnr[ok].mean()) if s.numel() else None,
        }

    def to_dict(self) -> dict[str, Any]:
        def fl(x: torch.Tensor) -> list:
            return [None if math.isnan(v) else v for v in x.tolist()]

        return {"format": SCORES_FORMAT, "version": 1, "features": self.features.tolist(),
                "balanced_accuracy": fl(self.balanced_accuracy), "tpr": fl(self.tpr), "tnr": fl(self.tnr),
                "n_pos": self.n_pos.tolist(), "n_neg": self.n_neg.tolist(),
                "tpr_by_quantile": [fl(r) for r in self.tpr_by_quantile], "reasons": list(self.reasons),
                "meta": self.meta, "summary": self.summary()}

    def save(self, path: str | Path) -> Path:
        """JSON (NaN written as null), atomically."""
        path = Path(path)
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            atomic_write_json(path, self.to_dict())
        except OSError as e:
            raise OutputNotWritableError(f"Cannot write {path}: {e}. Choose a writable path.") from None
        return path

    @classmethod
    def load(cls, path: str | Path) -> DetectionScores:
        path = Path(path)
        if not path.is_file():
            raise InputError(f"No detection scores at {path}; write them with DetectionScores.save.")
        try:
            j = json.loads(path.read_text())
            if j.get("format") != SCORES_FORMAT:
                raise ValueError(f"format is {j.get('format')!r}")
            n = len(j["features"])

            def fl(x: list) -> torch.Tensor:
                return torch.tensor([math.nan if v is None else float(v) for v in x], dtype=torch.float64)

            bins = max((len(r) for r in j["tpr_by_quantile"]), default=0)
            res = cls(features=torch.tensor(j["features"], dtype=torch.long).view(n),
                      balanced_accuracy=fl(j["balanced_accuracy"]), tpr=fl(j["tpr"]), tnr=fl(j["tnr"]),
                      n_pos=torch.tensor(j["n_pos"], dtype=torch.long).view(n),
                      n_neg=torch.tensor(j["n_neg"], dtype=torch.long).view(n),
                      tpr_by_quantile=torch.stack([fl(r) for r in j["tpr_by_quantile"]]) if n
                      else torch.zeros(0, bins, dtype=torch.float64),
                      reasons=[str(r) for r in j["reasons"]], meta=j.get("meta", {}))
        except (ValueError, KeyError, TypeError, RuntimeError) as e:
            raise CorruptFileError(f"{path} is not a readable detection-scores file ({e}).") from None
        if not all(t.shape[0] == n for t in (res.balanced_accuracy, res.tpr, res.tnr, res.tpr_by_quantile)) \
                or len(res.reasons) != n:
            raise CorruptFileError(f"{path} has lists of different lengths; rewrite it with DetectionScores.save.")
        return res


# ---------------------------------------------------------------------------- the pass


def detection_windows(
    model,
    coder,
    text: Any = "sotu",
    *,
    tokens: int | None = None,
    window: int = 16,
    context_len: int = 64,
    batch_size: int = 8,
    seed: int = 0,
    split: str = "validation",
    exclude_bos: bool = True,
    features: Any = None,
    progress: bool = True,
) -> DetectionSet:
    """One batched pass over HELD-OUT text: each context of `context_len` tokens is cut into
    context_len // window non-overlapping windows (a remainder at the end is dropped; the first window holds
    the BOS) and each window keeps its tokens and every tracked feature's max activation in it.

    text: a corpus name / path / list (read with `split`, default "validation": built-in corpora hold out
    1 in 20 documents by a hash of their name, and explanations are built from the train split), or a
    TextSource / PackedContexts, which keep the split they were made with. tokens: stop after about this
    many tokens (whole contexts; None: all of it). exclude_bos: BOS positions never count as firing (as in
    feature_stats). features: latent indices to track (None: all). Memory: W x F float32 for window_max."""
    for name, v, lo in (("window", window, 1), ("context_len", context_len, 2), ("batch_size", batch_size, 1)):
        if isinstance(v, bool) or not isinstance(v, int) or v < lo:
            raise InputError(f"{name} must be an int >= {lo}, got {v!r}.")
    if window > context_len:
        raise InputError(f"window ({window}) must be <= context_len ({context_len}).")
    if tokens is not None and (isinstance(tokens, bool) or not isinstance(tokens, int) or tokens < context_len):
        raise InputError(f"tokens must be None or an int >= context_len ({context_len}), got {tokens!r}.")
    feats = None if features is None else torch.as_tensor(features, dtype=torch.long).flatten()
    hook, stop = check_coder(model, coder, feats)
    if context_len > model.cfg.n_ctx:
        raise InputError(f"context_len {context_len} exceeds the model's n_ctx {model.cfg.n_ctx}.")
    if isinstance(text, PackedContexts):
        stream = text
        if stream.context_len != context_len:
            raise InputError(f"The PackedContexts has context_len {stream.context_len}, not {context_len}.")
    elif isinstance(text, TextSource):
        stream = contexts(text, model.tokenizer, context_len)
    else:
        stream = contexts(text, model.tokenizer, context_len, seed=seed, split=split)
    max_ctx = None if tokens is None else tokens // context_len
    F = coder.cfg.n_latents if feats is None else feats.numel()
    n_w = context_len // window
    run = latent_acts_fn(model, coder, hook, stop, feats)
    desc = stream.describe()
    bos_id = desc.get("bos_token_id") if exclude_bos else None
    if bos_id is not None:
        run = without_token(run, int(bos_id))
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=max_ctx, unit="ctx", desc="detection windows")
    maxes: list[torch.Tensor] = []
    toks: list[torch.Tensor] = []
    consumed = 0
    try:
        with torch.no_grad():
            for batch in stream.batches(batch_size):  # [B, T]
                if max_ctx is not None:
                    batch = batch[: max_ctx - consumed]
                B = batch.shape[0]
                a = run(batch)[:, : n_w * window]  # [B, n_w * window, F]
                maxes.append(a.reshape(B * n_w, window, F).amax(1))  # [B * n_w, F]
                toks.append(batch[:, : n_w * window].reshape(B * n_w, window))
                consumed += B
                if bar is not None:
                    bar.update(B)
                if max_ctx is not None and consumed >= max_ctx:
                    break
    except EmptyCorpusError as e:
        raise EmptyCorpusError(f"{e} detection_windows reads split={split!r} (held-out text) of corpus names, "
                               "paths and lists; pass more text, split='all', or a PackedContexts.") from None
    finally:
        if bar is not None:
            bar.close()
    if not toks:
        raise EmptyCorpusError(f"The held-out text gave no context of {context_len} tokens.")
    window_tokens = torch.cat(toks)  # [W, window]
    W = window_tokens.shape[0]
    ctx_ids = torch.arange(consumed).repeat_interleave(n_w)  # [W]
    starts = (torch.arange(n_w) * window).repeat(consumed)  # [W]
    settings = {"stream": desc, "coder": coder.cfg.to_dict(), "hook": hook, "model": content_key(model),
                "context_len": context_len, "window": window, "seed": seed, "max_contexts": max_ctx,
                "exclude_bos": exclude_bos, "features": None if feats is None else feats.tolist()}
    settings = json.loads(json.dumps(settings, default=str))
    n_tok = W * window if bos_id is None else int((window_tokens != bos_id).sum())
    return DetectionSet(
        features=torch.arange(F) if feats is None else feats.clone(), window_max=torch.cat(maxes).float(),
        window_tokens=window_tokens, window_context=ctx_ids, window_start=starts,
        meta={"settings": settings, "artifact": artifact_id(settings), "n_contexts": consumed, "n_windows": W,
              "n_tokens": n_tok})


# ---------------------------------------------------------------------------- detectors


def term_detector(explanations: list[Explanation], windows: torch.Tensor) -> torch.Tensor:
    """The default detector: windows [n, S, w] (row i shown for explanation i; padding rows -1) ->
    [n, S] bool, True iff one of explanation i's n-grams occurs inside the window. A keyword matcher:
    vectorised over explanations, windows and positions, one comparison per n-gram length and offset."""
    n, S, w = windows.shape
    if len(explanations) != n:
        raise InputError(f"{len(explanations)} explanations for {n} rows of windows.")
    out = torch.zeros(n, S, dtype=torch.bool)
    lengths = sorted({len(t) for e in explanations for t in e.terms})
    for L in lengths:
        if L > w:
            continue  # an n-gram longer than the window never occurs in it
        per = [[t for t in e.terms if len(t) == L] for e in explanations]
        M = max(len(p) for p in per)
        tab = torch.full((n, M, L), -3, dtype=torch.long)  # -3 matches no token (padding is -1)
        for i, p in enumerate(per):
            if p:
                tab[i, : len(p)] = torch.tensor(p, dtype=torch.long)
        hit = torch.ones(n, S, M, w - L + 1, dtype=torch.bool)
        for j in range(L):  # the n-gram's j-th token against every start position
            hit &= windows[:, :, None, j : w - L + 1 + j] == tab[:, None, :, j, None]
        out |= hit.flatten(2).any(-1)
    return out


LLM_DETECT_PROMPT = (
    "A feature of a neural network language model is explained as:\n\"{explanation}\"\n\n"
    "Below are {n} numbered text excerpts. The feature is active in some of them and not in others. "
    "Which excerpts contain text the explanation describes (where the feature would be active)?\n\n"
    "{examples}\n\n"
    "Answer with the numbers of the matching excerpts in square brackets, e.g. [2, 5], or [] if none match."
)


class LLMDetector:
    """Detector that asks a model (any `(prompt) -> str`, e.g. OpenAIExplainer) which of up to
    `per_prompt` numbered windows match the explanation. Windows are shown in a seeded random order.
    An answer it cannot read (no bracketed list, numbers out of range) raises ExplainerError."""

    def __init__(self, explainer: Callable[[str], str], tokenizer: Any, *, per_prompt: int = 10, seed: int = 0):
        if not callable(explainer):
            raise InputError(f"explainer must be a callable (prompt: str) -> str or an OpenAIExplainer, got "
                             f"{type(explainer).__name__}.")
        if isinstance(per_prompt, bool) or not isinstance(per_prompt, int) or per_prompt < 1:
            raise InputError(f"per_prompt must be an int >= 1, got {per_prompt!r}.")
        self.explainer = explainer
        self.tokenizer = as_tokenizer(tokenizer)
        self.per_prompt = per_prompt
        self.seed = seed

    def __call__(self, explanations: list[Explanation], windows: torch.Tensor) -> torch.Tensor:
        n, S, w = windows.shape
        out = torch.zeros(n, S, dtype=torch.bool)
        for i, e in enumerate(explanations):
            rows = (windows[i, :, 0] >= 0).nonzero().flatten().tolist()
            random.Random(f"{self.seed}:{e.feature}").shuffle(rows)
            for s in range(0, len(rows), self.per_prompt):
                chunk = rows[s : s + self.per_prompt]
                texts = decode_many(self.tokenizer, [[t for t in windows[i, r].tolist() if t >= 0] for r in chunk])
                examples = "\n".join(f"{k}. {t.strip()}".replace("\n", "\\n") for k, t in enumerate(texts, 1))
                prompt = LLM_DETECT_PROMPT.format(explanation=e.text, n=len(chunk), examples=examples)
                picked = parse_selection(call_explainer(self.explainer, prompt, f"feature {e.feature} (detection)"),
                                         len(chunk))
                for k in picked:
                    out[i, chunk[k - 1]] = True
        return out


def parse_selection(answer: str, n: int) -> list[int]:
    """Excerpt numbers (1-based) from an answer: the last [..] list ('[2, 5]', '[1-3]', '[]'), else a bare
    list of numbers, else 'none'. Raises ExplainerError when it cannot tell or a number is out of range."""
    groups = re.findall(r"\[([^\[\]]*)\]", answer)
    if groups:
        body = groups[-1]
    elif re.fullmatch(r"(?:[\s\d,;\-–.]|\band\b)*", answer, flags=re.I) and re.search(r"\d", answer):
        body = answer
    elif re.fullmatch(r"\W*(none|no(ne of them)?|nothing)\W*", answer.strip(), flags=re.I):
        return []
    else:
        raise ExplainerError(f"Cannot read which excerpts the detector picked from its answer {answer[:200]!r}; "
                             "it must answer a list like [2, 5] (use a model that follows instructions).")
    if re.search(r"[^\s\d,;\-–.]", re.sub(r"\band\b", " ", body, flags=re.I)):
        raise ExplainerError(f"The detector's list {body[:100]!r} holds more than excerpt numbers.")
    picked: set[int] = set()
    for a, b in re.findall(r"(\d+)\s*(?:[-–]\s*(\d+))?", body):
        lo, hi = int(a), int(b) if b else int(a)
        if not 1 <= lo <= hi <= n:
            raise ExplainerError(f"The detector picked excerpt(s) {a}{'-' + b if b else ''} but only 1..{n} were "
                                 "shown.")
        picked.update(range(lo, hi + 1))
    return sorted(picked)


# ---------------------------------------------------------------------------- scoring


def _hash32(x: torch.Tensor) -> torch.Tensor:
    """A 32-bit integer mix (int64 tensors; multipliers < 2^31 so nothing overflows)."""
    x = x & _MASK32
    x = (((x >> 16) ^ x) * 0x45D9F3B) & _MASK32
    x = (((x >> 16) ^ x) * 0x45D9F3B) & _MASK32
    return (x >> 16) ^ x


def _uniform(seed: int, salt: int, latents: torch.Tensor, n: int) -> torch.Tensor:
    """[n, F] uniforms in [0, 1) that depend only on (seed, salt, latent, row): a feature's sample does not
    change with which other features are scored alongside it."""
    h = _hash32(_hash32(latents * 0x2545F49 + (seed * 0x27D4EB2 + salt) % (1 << 31)))  # [F]
    u = _hash32(h[None, :] ^ (torch.arange(n)[:, None] * 0x3C6EF37 + 0x1B873593))  # [n, F]
    return u.double() / float(1 << 32)


def score_detection(
    explanations: Sequence[Explanation],
    dset: DetectionSet,
    *,
    n_pos: int = 20,
    n_neg: int = 20,
    seed: int = 0,
    detector: Detector | None = None,
    min_windows: int = 3,
    n_bins: int = 5,
) -> DetectionScores:
    """Score each explanation by detection on `dset` -> DetectionScores (one row per explanation).

    Positives: windows where the feature fires (window_max > 0). With P of them, up to n_pos are drawn,
    one from each of n_pos equal-count slices (ranks floor(i P / n_pos) .. floor((i+1) P / n_pos) - 1) of the
    positives sorted by activation: stratified over activation quantiles, like delphi's quantile bins, only
    finer; all P when P <= n_pos.
    Negatives: up to n_neg drawn uniformly from the windows where it never fires (window_max == 0).
    Draws depend only on (seed, latent, dset), not on which other features are scored.
    detector: `(explanations, windows [n, S, w]) -> bool [n, S]` (padding rows are -1); default
    term_detector (keyword matching on each explanation's terms: explanations need terms).
    A feature with fewer than min_windows positives or negatives gets NaN and a reason, never a number.
    """
    explanations = list(explanations)
    if not explanations:
        raise InputError("score_detection needs at least one explanation.")
    if not all(isinstance(e, Explanation) for e in explanations):
        raise InputError("score_detection takes Explanation objects (from explain_offline / explain_llm).")
    if not isinstance(dset, DetectionSet):
        raise InputError(f"dset must be a DetectionSet (from detection_windows), got {type(dset).__name__}.")
    for name, v, lo in (("n_pos", n_pos, 1), ("n_neg", n_neg, 1), ("min_windows", min_windows, 1),
                        ("n_bins", n_bins, 1)):
        if isinstance(v, bool) or not isinstance(v, int) or v < lo:
            raise InputError(f"{name} must be an int >= {lo}, got {v!r}.")
    if detector is None:
        detector = term_detector
        bare = [e.feature for e in explanations if not e.terms]
        if bare:
            raise InputError(f"Explanations of features {bare[:10]} have no terms (e.g. LLM explanations); the "
                             "default keyword detector cannot score them: pass detector=LLMDetector(...).")
    elif not callable(detector):
        raise InputError(f"detector must be callable, got {type(detector).__name__}.")
    d_id = dset.meta.get("artifact")
    for e in explanations:
        e_id = e.meta.get("artifact") if isinstance(e.meta, dict) else None
        if d_id and e_id and e_id != d_id:
            raise ArtifactMismatchError(
                f"The explanation of feature {e.feature} was made for another model/coder/hook (id {e_id}) than "
                f"the detection set (id {d_id}); build both from the same model and coder.")
    col_of = {int(f): c for c, f in enumerate(dset.features.tolist())}
    missing = [e.feature for e in explanations if e.feature not in col_of]
    if missing:
        raise InputError(f"Latents {missing[:10]} are not tracked by the detection set; rebuild it with "
                         "detection_windows(..., features=None) or including them.")
    latents = torch.tensor([e.feature for e in explanations], dtype=torch.long)  # [n]
    cols = torch.tensor([col_of[int(f)] for f in latents.tolist()], dtype=torch.long)
    wm = dset.window_max[:, cols].float()  # [W, n]
    W, n = wm.shape
    is_pos = wm > 0
    P = is_pos.sum(0)  # [n]
    # positives: one random rank in each of kp equal-count slices of the ranks. Only the firing entries
    # are sorted (by activation, descending, ties by window, grouped by feature)
    kp = min(n_pos, W)
    c_idx, w_idx = is_pos.T.nonzero(as_tuple=True)  # [E] by (feature, window)
    o = torch.sort(wm[w_idx, c_idx], descending=True, stable=True).indices
    o = o[torch.sort(c_idx[o], stable=True).indices]
    pos_sorted = w_idx[o]  # [E] each feature's firing windows, strongest first
    offs = torch.cumsum(P, 0) - P  # [n] where each feature's run starts
    i = torch.arange(kp + 1)[:, None]  # [kp + 1, 1]
    edge = torch.div(i * P[None], kp, rounding_mode="floor")  # [kp + 1, n] slice edges (width >= 1 when P > kp)
    u = _uniform(seed, 1, latents, kp)  # [kp, n]
    strat = edge[:-1] + torch.floor(u * (edge[1:] - edge[:-1]).double()).long()
    rank = torch.where(P[None] > kp, strat, i[:-1].expand(kp, n))  # [kp, n] rank among the positives
    pos_ok = rank < P[None]
    at = (offs[None] + rank).clamp(max=max(pos_sorted.numel() - 1, 0))
    pos_rows = pos_sorted[at] if pos_sorted.numel() else torch.zeros(kp, n, dtype=torch.long)
    pos_bin = torch.div(rank * n_bins, P[None].clamp(min=1), rounding_mode="floor").clamp(max=n_bins - 1)
    # negatives: n_neg distinct ranks among each feature's N non-firing windows (Floyd's algorithm,
    # vectorised over features), mapped to windows through the running count of non-firing windows
    kn = n_neg
    N = W - P  # [n]
    un = _uniform(seed, 2, latents, kn).T  # [n, kn]
    ranks = torch.zeros(n, kn, dtype=torch.long)
    for it in range(kn):
        j = N - kn + it  # [n]
        t = torch.minimum(torch.floor(un[:, it] * (j + 1).double()).long(), j)
        dup = (ranks[:, :it] == t[:, None]).any(1)
        ranks[:, it] = torch.where(dup, j, t)
    few = (N < kn)[:, None]
    ranks = torch.where(few, torch.arange(kn)[None].expand(n, kn), ranks)
    neg_ok = (ranks < N[:, None]).T  # [kn, n]
    cum_neg = torch.cumsum(~is_pos, 0, dtype=torch.int32).T.contiguous()  # [n, W]
    neg_rows = torch.searchsorted(cum_neg, (ranks + 1).to(torch.int32)).clamp(max=W - 1).T  # [kn, n]
    rows = torch.cat([pos_rows, neg_rows]).T  # [n, S]
    ok = torch.cat([pos_ok, neg_ok]).T  # [n, S]
    windows = dset.window_tokens[rows].masked_fill(~ok[..., None], -1)  # [n, S, w]
    pred = detector(explanations, windows)
    if not isinstance(pred, torch.Tensor) or pred.shape != (n, kp + kn):
        raise InputError(f"The detector must return a bool tensor [{n}, {kp + kn}], got "
                         f"{getattr(pred, 'shape', type(pred).__name__)}.")
    pred = pred.bool() & ok
    pp, pn = pred[:, :kp], pred[:, kp:]
    npos, nneg = pos_ok.sum(0), neg_ok.sum(0)  # [n]
    tpr = pp.sum(1).double() / npos.clamp(min=1)
    tnr = (neg_ok.T & ~pn).sum(1).double() / nneg.clamp(min=1)
    ba = (tpr + tnr) / 2
    bad = (npos < min_windows) | (nneg < min_windows)
    ba = ba.masked_fill(bad, math.nan)
    tpr = tpr.masked_fill(npos == 0, math.nan)
    tnr = tnr.masked_fill(nneg == 0, math.nan)
    # TPR per activation-quantile bin of the drawn positives
    bins = pos_bin.T.masked_fill(~pos_ok.T, n_bins)  # [n, kp]; n_bins = no window
    shown = torch.zeros(n, n_bins + 1).scatter_add_(1, bins, torch.ones(n, kp))[:, :n_bins]
    caught = torch.zeros(n, n_bins + 1).scatter_add_(1, bins, pp.float())[:, :n_bins]
    tpr_q = (caught.double() / shown.double()).masked_fill(shown == 0, math.nan)
    reasons = []
    for a, b in zip(npos.tolist(), nneg.tolist()):
        r = []
        if a < min_windows:
            r.append(f"only {a} window(s) where the feature fires (< {min_windows})")
        if b < min_windows:
            r.append(f"only {b} window(s) where it does not fire (< {min_windows})")
        reasons.append("; ".join(r))
    return DetectionScores(
        features=latents, balanced_accuracy=ba, tpr=tpr, tnr=tnr, n_pos=npos, n_neg=nneg, tpr_by_quantile=tpr_q,
        reasons=reasons,
        meta={"n_pos": n_pos, "n_neg": n_neg, "seed": seed, "min_windows": min_windows, "n_bins": n_bins,
              "detector": getattr(detector, "__name__", type(detector).__name__), "window": dset.window,
              "n_windows": W, "artifact": d_id, "sources": sorted({e.source for e in explanations})})
