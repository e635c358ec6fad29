"""Static plots of the circuits analyses, as PNG bytes plus the plotted data, for reports and notebooks.

    p = patching_heatmap(res, x_labels=model.to_str_tokens(prompt))    # Plot(png, data, title)
    p.save("out/patching.png")      # out/patching.png + out/patching.json (the data), both atomic
    html = f'<img src="{p.data_uri()}">'                                 # inline in a self-contained page

Why this shape: the HTML report inlines PNGs (base64), so every plot renders to bytes, never to a screen;
and a picture alone cannot be re-checked or re-plotted, so each Plot carries its numbers as a JSON-ready
dict (NaN/inf become null, so browsers' JSON.parse reads it). Rendering uses matplotlib's object API
(`Figure` + the Agg canvas) under the library's default style with math-text parsing off: no pyplot
state, no window, no user rcParams leaking in, and token strings such as "$" or "\\n" print literally.
The same inputs give the same bytes on the same matplotlib version (PNG metadata carries no timestamp).
"""

from __future__ import annotations

import base64
import io
import math
import re
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, NamedTuple

import matplotlib
import matplotlib.style
import numpy as np
import torch
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.colors import Normalize
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.patches import FancyArrowPatch, Rectangle
from PIL import Image

from mechscope.errors import EmptyCircuitError, InputError
from mechscope.fileio import atomic_write_bytes, atomic_write_json

DPI = 100
# the fixed matplotlib style of every mechscope figure (user rcParams cannot change the output)
PLOT_STYLE = ["default", {"font.family": "DejaVu Sans", "font.size": 9, "text.parse_math": False,
                      "text.usetex": False, "svg.hashsalt": "mechscope", "figure.dpi": DPI}]
_PALETTE_ABOVE = 200_000  # bytes: larger RGB PNGs are re-encoded with a palette
_POS, _NEG = "#c0392b", "#2471a3"  # red = positive, blue = negative, as in the RdBu_r maps


class Plot(NamedTuple):
    """A rendered figure and the numbers behind it."""

    png: bytes  # the image, PNG-encoded (starts with b"\\x89PNG")
    data: dict[str, Any]  # the plotted values and labels, JSON-serialisable (non-finite values as None)
    title: str

    def save(self, path: str | Path) -> tuple[Path, Path]:
        """Write `path` (.png) and its sidecar `path.with_suffix('.json')` (the data), each atomically."""
        png = Path(path)
        if png.suffix.lower() != ".png":
            raise InputError(f"Plot.save writes a PNG: give a path ending in .png, got {str(path)!r}.")
        png.parent.mkdir(parents=True, exist_ok=True)
        side = png.with_suffix(".json")
        atomic_write_bytes(png, self.png)
        atomic_write_json(side, {"title": self.title, **self.data})
        return png, side

    def data_uri(self) -> str:
        """'data:image/png;base64,...' for an <img src> in a self-contained HTML page."""
        return "data:image/png;base64," + base64.b64encode(self.png).decode("ascii")

    def _repr_png_(self) -> bytes:  # Jupyter shows a Plot as its image
        return self.png


# ============================================================================ shared helpers


def _new_figure(width: float, height: float) -> Figure:
    fig = Figure(figsize=(width, height), dpi=DPI, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def render_png(fig: Figure) -> bytes:
    """A drawn matplotlib Figure (with an Agg canvas) -> PNG bytes: RGB (a white figure needs no alpha); busy drawings (hundreds of translucent edges, big
    tables) are reduced to a 256-colour palette so an inlined image stays small (< ~300 KB)."""
    with warnings.catch_warnings():  # tokens in scripts DejaVu lacks (CJK ...) render as boxes, not warnings
        warnings.filterwarnings("ignore", message=r"Glyph \d+ .*missing from")
        fig.canvas.draw()
    img = Image.fromarray(np.asarray(fig.canvas.buffer_rgba())[..., :3])
    buf = io.BytesIO()
    img.save(buf, format="PNG", optimize=True)
    if buf.tell() > _PALETTE_ABOVE:
        buf = io.BytesIO()
        img.quantize(256, method=Image.Quantize.FASTOCTREE).save(buf, format="PNG", optimize=True)
    return buf.getvalue()


def _plot(build, *args: Any) -> bytes:
    """Build and render a figure under the fixed style (so user rcParams cannot change the output)."""
    with matplotlib.style.context(PLOT_STYLE):
        fig = build(*args)
        return render_png(fig)


def _array(x: Any, what: str, ndims: tuple[int, ...]) -> np.ndarray:
    """A tensor / array / nested list -> float64 numpy array with one of the allowed ndims."""
    try:
        if isinstance(x, torch.Tensor):
            a = x.detach().to("cpu", torch.float64).numpy()
        else:
            a = np.asarray(x, dtype=np.float64)
    except (TypeError, ValueError) as e:
        raise InputError(f"{what} must be a tensor or an array of numbers: {e}") from None
    if a.ndim not in ndims:
        want = " or ".join(f"{d}-D" for d in ndims)
        raise InputError(f"{what} must be {want}, got shape {tuple(a.shape)}.")
    if a.size == 0:
        raise InputError(f"{what} is empty (shape {tuple(a.shape)}).")
    return a


def _jsonable(a: np.ndarray) -> Any:
    """Nested lists of floats with NaN / inf as None (strict JSON)."""
    if a.ndim == 0:
        return float(a) if math.isfinite(float(a)) else None
    if a.ndim == 1:
        return [float(v) if math.isfinite(v) else None for v in a.tolist()]
    return [_jsonable(r) for r in a]


def _labels(labels: Sequence[Any] | None, n: int, what: str, default: Sequence[str]) -> list[str]:
    if labels is None:
        return list(default)
    out = [str(s) for s in labels]
    if len(out) != n:
        raise InputError(f"{what} has {len(out)} labels for {n} {'columns' if 'x' in what else 'rows'}.")
    return out


def _show(s: str, max_chars: int) -> str:
    """A token as it should print: control characters escaped, long ones cut with an ellipsis."""
    s = s.replace("\n", "\\n").replace("\t", "\\t").replace("\r", "\\r")
    s = re.sub(r"[\x00-\x08\x0b-\x1f\x7f]", lambda m: f"\\x{ord(m.group()):02x}", s)
    return s if len(s) <= max_chars else s[:max_chars - 1] + "…"


def _finite_range(a: np.ndarray, what: str) -> tuple[float, float]:
    f = a[np.isfinite(a)]
    if f.size == 0:
        raise InputError(f"{what} has no finite value to plot.")
    return float(f.min()), float(f.max())


def _set_ticks(ax, axis: str, labels: list[str], max_chars: int, max_ticks: int = 60) -> None:
    """Tick every label (or every k-th one when there are too many to read)."""
    n = len(labels)
    step = max(1, math.ceil(n / max_ticks))
    idx = list(range(0, n, step))
    shown = [_show(labels[i], max_chars) for i in idx]
    if axis == "x":
        rot = 90 if n > 8 or max((len(s) for s in shown), default=0) > 4 else 0
        ax.set_xticks(idx, shown, rotation=rot)
    else:
        ax.set_yticks(idx, shown)


def _heat_norm(a: np.ndarray, center: float | None, limit: float | None, what: str) -> tuple[Normalize, str]:
    """Diverging around `center` (symmetric, so equal colours mean equal distances from it) or sequential."""
    lo, hi = _finite_range(a, what)
    if center is None:
        return Normalize(lo, hi if hi > lo else lo + 1.0), "viridis"
    lim = limit if limit is not None else max(abs(hi - center), abs(lo - center))
    if not lim > 0:
        lim = 1.0
    return Normalize(center - lim, center + lim), "RdBu_r"


def _text_colour(cmap: Any, norm: Normalize, v: float) -> str:
    """White text on dark cells, black on light ones (by the cell colour's luminance)."""
    if not math.isfinite(v):
        return "black"
    r, g, b, _ = cmap(float(np.clip(norm(v), 0.0, 1.0)))
    return "white" if 0.299 * r + 0.587 * g + 0.114 * b < 0.5 else "black"


def _annotate_cells(ax, a: np.ndarray, norm: Normalize, cmap: Any, fontsize: float,
                    cells: np.ndarray | None = None, fmt: str = ".2g") -> None:
    """Write each value in its cell. cells: [n, 2] (row, col), or None for every cell."""
    if cells is None:
        cells = np.argwhere(np.ones(a.shape, dtype=bool))
    for r, c in cells.tolist():
        v = a[r, c]
        if math.isfinite(v):
            ax.text(c, r, format(v, fmt), ha="center", va="center", fontsize=fontsize, color=_text_colour(cmap, norm, v))


# ============================================================================ patching heatmap


def patching_heatmap(result: Any, *, x_labels: Sequence[str] | None = None, y_labels: Sequence[str] | None = None,
                     x_label: str = "position", y_label: str = "layer", title: str = "Activation patching",
                     value_label: str = "metric", center: float | None = 0.0, normalized: bool = False,
                     limit: float | None = None, annotate: bool | None = None, max_chars: int = 12) -> Plot:
    """A heatmap of an activation-patching result: [n_layers, pos] (resid sweeps), [n_layers, n_heads]
    (pass x_label="head") or [n_layers] (layer granularity, one column).

    x_labels: e.g. model.to_str_tokens(prompt) for positions. center: the colormap's white point (None = a
    sequential map over the data range); the range is symmetric around it (limit = half-width, default the
    largest |value - center|). normalized=True fixes the range to [-1, 1] (0 = corrupted, 1 = clean), so
    plots of different runs share one scale. annotate: write values in cells (default when <= 150 cells).
    Results with a head-position or prompt dim ([L, H, P], [L, P, B]) must be reduced or sliced first."""
    a = _array(result, "patching_heatmap(result)", (1, 2))
    if a.ndim == 1:
        a = a[:, None]
        x_label = x_label if x_labels is not None else ""
    if normalized:
        center, limit = 0.0, 1.0
    L, P = a.shape
    xl = _labels(x_labels, P, "x_labels", [str(i) for i in range(P)] if P > 1 or x_labels else [""])
    yl = _labels(y_labels, L, "y_labels", [str(i) for i in range(L)])
    norm, cmap = _heat_norm(a, center, limit, "patching_heatmap(result)")
    annotate = (L * P <= 150) if annotate is None else annotate

    def build() -> Figure:
        long = max(len(_show(s, max_chars)) for s in xl)
        fig = _new_figure(min(16.0, max(4.0, 1.8 + 0.42 * P)), min(12.0, max(2.6, 1.3 + 0.3 * L + 0.06 * long)))
        ax = fig.add_subplot()
        cm = matplotlib.colormaps[cmap].with_extremes(bad="#d0d0d0")
        im = ax.imshow(a, cmap=cm, norm=norm, aspect="auto", interpolation="nearest")
        _set_ticks(ax, "x", xl, max_chars)
        _set_ticks(ax, "y", yl, max_chars)
        ax.set_xlabel(x_label)
        ax.set_ylabel(y_label)
        ax.set_title(title)
        fig.colorbar(im, ax=ax, label=value_label, shrink=0.9, aspect=30)
        if annotate:
            _annotate_cells(ax, a, norm, cm, 7 if max(L, P) < 12 else 6)
        return fig

    data = {"kind": "patching_heatmap", "values": _jsonable(a), "x_labels": xl, "y_labels": yl,
            "x_label": x_label, "y_label": y_label, "value_label": value_label, "center": center,
            "vmin": float(norm.vmin), "vmax": float(norm.vmax)}
    return Plot(_plot(build), data, title)


# ============================================================================ head grid


def head_grid(scores: Any, title: str = "Head scores", *, highlight_top: int = 3, value_label: str = "score",
              center: float | None | str = "auto") -> Plot:
    """A layer x head grid of per-head scores [n_layers, n_heads] (head detectors, DLA heads, head patching),
    with the `highlight_top` heads boxed and labelled "L{l}H{h}".

    center="auto": a diverging map around 0 when any score is negative (signed effects; top = largest |score|),
    otherwise a sequential map from 0 (detector scores; top = largest score)."""
    a = _array(scores, "head_grid(scores)", (2,))
    if not isinstance(highlight_top, int) or highlight_top < 0:
        raise InputError(f"highlight_top must be an int >= 0, got {highlight_top!r}.")
    L, H = a.shape
    lo, hi = _finite_range(a, "head_grid(scores)")
    signed = lo < 0 if center == "auto" else center is not None
    if center == "auto":
        center = 0.0 if signed else None
    if center is None:
        norm, cmap = Normalize(min(0.0, lo), hi if hi > min(0.0, lo) else min(0.0, lo) + 1.0), "Blues"
    else:
        norm, cmap = _heat_norm(a, float(center), None, "head_grid(scores)")
    key = np.abs(a - (center or 0.0)) if signed else a.copy()
    key[~np.isfinite(key)] = -np.inf
    k = min(highlight_top, int(np.isfinite(key).sum()))
    order = np.argsort(-key.ravel(), kind="stable")[:k]  # ties: lower layer / head first
    top = [(int(i // H), int(i % H), float(a.flat[i])) for i in order]

    def build() -> Figure:
        fig = _new_figure(min(14.0, max(3.8, 2.0 + 0.42 * H)), min(12.0, max(2.6, 1.2 + 0.28 * L)))
        ax = fig.add_subplot()
        cm = matplotlib.colormaps[cmap].with_extremes(bad="#d0d0d0")
        im = ax.imshow(a, cmap=cm, norm=norm, aspect="auto", interpolation="nearest")
        _set_ticks(ax, "x", [str(h) for h in range(H)], 4)
        _set_ticks(ax, "y", [str(la) for la in range(L)], 4)
        ax.set_xlabel("head")
        ax.set_ylabel("layer")
        ax.set_title(title)
        fig.colorbar(im, ax=ax, label=value_label, shrink=0.9, aspect=30)
        for la, h, _ in top:
            ax.add_patch(Rectangle((h - 0.5, la - 0.5), 1, 1, fill=False, edgecolor="black", linewidth=1.8))
        if top:
            _annotate_cells(ax, a, norm, cm, 7 if max(L, H) < 16 else 5.5, np.array([[la, h] for la, h, _ in top]), ".3g")
            ax.set_xlabel("head    (top: " + ", ".join(f"L{la}H{h} {v:.3g}" for la, h, v in top[:5]) + ")")
        return fig

    data = {"kind": "head_grid", "values": _jsonable(a), "value_label": value_label,
            "top": [{"layer": la, "head": h, "score": v} for la, h, v in top],
            "vmin": float(norm.vmin), "vmax": float(norm.vmax)}
    return Plot(_plot(build), data, title)


# ============================================================================ lens plots


def lens_table(tokens: Sequence[Sequence[str]], values: Any, *, x_labels: Sequence[str] | None = None,
               y_labels: Sequence[str] | None = None, title: str = "Logit lens", value_label: str = "probability",
               value_range: tuple[float, float] | None = None, max_chars: int = 8) -> Plot:
    """A logit-lens table: rows = layers (first at the bottom), columns = prompt positions, cell text = the
    lens's top token there, cell colour = `values` [n_rows, n_positions] (its probability, or KL ...).

    value_range: the colour scale; default [0, 1] when every value lies in it (probabilities), otherwise the
    data's range. NaN values (e.g. padding) leave the cell grey. See lens_table_from_result for a LensResult."""
    a = _array(values, "lens_table(values)", (2,))
    n, P = a.shape
    rows = [list(r) for r in tokens] if isinstance(tokens, Sequence) and not isinstance(tokens, str) else None
    if rows is None or len(rows) != n or any(len(r) != P for r in rows):
        got = f"{len(rows)} rows of lengths {sorted({len(r) for r in rows})}" if rows else repr(type(tokens))
        raise InputError(f"lens_table(tokens) must be {n} rows x {P} strings, like values {tuple(a.shape)}; got {got}.")
    if any(not isinstance(t, str) for r in rows for t in r):
        raise InputError("lens_table(tokens) must hold strings (decode ids with model.to_str_tokens or "
                         "LensResult.top_tokens(1, model)).")
    xl = _labels(x_labels, P, "x_labels", [str(i) for i in range(P)])
    yl = _labels(y_labels, n, "y_labels", [str(i) for i in range(n)])
    lo, hi = _finite_range(a, "lens_table(values)")
    if value_range is None:
        value_range = (0.0, 1.0) if lo >= 0 and hi <= 1 else (lo, hi if hi > lo else lo + 1.0)
    norm = Normalize(*value_range)

    def build() -> Figure:
        fig = _new_figure(min(24.0, max(4.0, 2.0 + 0.075 * max_chars * P)), min(16.0, max(2.6, 1.4 + 0.26 * n)))
        ax = fig.add_subplot()
        cm = matplotlib.colormaps["Blues"].with_extremes(bad="#e0e0e0")
        im = ax.imshow(a, cmap=cm, norm=norm, aspect="auto", interpolation="nearest", origin="lower")
        fs = 7 if P <= 16 and n <= 40 else 6
        for r in range(n):
            for c in range(P):  # one text per cell: the table IS the cells (n x P <= a few hundred)
                ax.text(c, r, _show(rows[r][c], max_chars), ha="center", va="center", fontsize=fs,
                        color=_text_colour(cm, norm, a[r, c]))
        _set_ticks(ax, "x", xl, max_chars)
        _set_ticks(ax, "y", yl, 12)
        ax.set_xlabel("position")
        ax.set_ylabel("layer")
        ax.set_title(title)
        fig.colorbar(im, ax=ax, label=value_label, shrink=0.9, aspect=30)
        return fig

    data = {"kind": "lens_table", "tokens": rows, "values": _jsonable(a), "x_labels": xl, "y_labels": yl,
            "value_label": value_label, "value_range": [float(v) for v in value_range]}
    return Plot(_plot(build), data, title)


def lens_table_from_result(result: Any, model: Any, *, prompt: int = 0, x_labels: Sequence[str] | None = None,
                           title: str | None = None, max_chars: int = 8) -> Plot:
    """lens_table of a LensResult (logit_lens / TunedLens.run): each row's top-1 token and its probability at
    the positions of prompt `prompt` (positions that are padding or excluded show grey). `model` (or a
    tokenizer) decodes the tokens; x_labels default to the position indices read."""
    if not hasattr(result, "top_ids") or not hasattr(result, "labels"):
        raise InputError(f"lens_table_from_result needs a LensResult (from logit_lens), got {type(result).__name__}.")
    B = result.top_ids.shape[1]
    if not isinstance(prompt, int) or not -B <= prompt < B:
        raise InputError(f"prompt must be an int in [0, {B}), got {prompt!r}.")
    top = result.top_tokens(1, model)
    strings = [[pos[0] for pos in row[prompt]] for row in top.strings]  # [n][P]
    probs = top.logprobs[:, prompt, :, 0].double().exp()  # [n, P]
    valid = result.valid[prompt].cpu()  # [P]
    probs = torch.where(valid[None, :], probs.cpu(), torch.nan)
    strings = [[s if ok else "" for s, ok in zip(row, valid.tolist())] for row in strings]
    if x_labels is None:
        x_labels = [str(p) for p in result.positions[prompt].tolist()]
    name = getattr(result, "lens", "logit")
    return lens_table(strings, probs, x_labels=x_labels, y_labels=result.labels, max_chars=max_chars,
                      title=title or f"{name.capitalize()} lens: top token and its probability")


def lens_kl_curve(table: Any, *, metric: str = "kl", title: str | None = None, log_scale: bool = False) -> Plot:
    """KL to the final distribution (metric="kl") or next-token cross-entropy ("ce") per layer, one line per
    lens. table: a LensTable (evaluate_lenses: logit and, if trained, tuned lens), a LensResult, or a list of
    LensResults (one line each, named by their .lens)."""
    if metric not in ("kl", "ce"):
        raise InputError(f"metric must be 'kl' or 'ce', got {metric!r}.")
    series: dict[str, np.ndarray] = {}
    ref = None
    if hasattr(table, "kl_logit"):  # LensTable
        labels = list(table.labels)
        series["logit lens"] = _array(getattr(table, f"{metric}_logit"), "LensTable", (1,))
        if getattr(table, f"{metric}_tuned") is not None:
            series["tuned lens"] = _array(getattr(table, f"{metric}_tuned"), "LensTable", (1,))
        ref = float(table.model_ce) if metric == "ce" else None
    else:
        results = [table] if hasattr(table, "kl_to_final") else list(table) if isinstance(table, Sequence) else []
        if not results or not all(hasattr(r, "kl_to_final") for r in results):
            raise InputError("lens_kl_curve needs a LensTable, a LensResult or a list of LensResults, "
                             f"got {type(table).__name__}.")
        labels = list(results[0].labels)
        for r in results:
            if list(r.labels) != labels:
                raise InputError("The LensResults cover different layers; compute them with the same `layers`.")
            name = f"{getattr(r, 'lens', 'logit')} lens"
            if name in series:
                name = f"{name} {sum(k.startswith(name) for k in series) + 1}"
            series[name] = _array(r.kl_to_final if metric == "kl" else r.cross_entropy, "LensResult", (1,))
    for name, s in series.items():
        if s.shape[0] != len(labels):
            raise InputError(f"{name} has {s.shape[0]} values for {len(labels)} layers.")
    ylabel = "KL(final || lens), nats" if metric == "kl" else "next-token cross-entropy, nats"
    title = title or ("KL to the final layer per layer" if metric == "kl" else "Cross-entropy per layer")
    if log_scale and not any(np.any(s > 0) for s in series.values()):
        log_scale = False  # nothing positive to show on a log axis

    def build() -> Figure:
        fig = _new_figure(min(14.0, max(5.0, 2.0 + 0.22 * len(labels))), 3.6)
        ax = fig.add_subplot()
        x = np.arange(len(labels))
        for (name, s), style in zip(series.items(), ("o-", "s--", "^-.", "d:")):
            shown = np.where(s > 0, s, np.nan) if log_scale else s  # log axes cannot show 0 (the final row's KL)
            ax.plot(x, shown, style, label=name, markersize=4, linewidth=1.5)
        if ref is not None:
            ax.axhline(ref, color="gray", linestyle=":", linewidth=1, label="model's own CE")
        if log_scale:
            from matplotlib.ticker import FuncFormatter, NullFormatter

            ax.set_yscale("log")
            ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))  # parse_math is off: no $10^{2}$
            ax.yaxis.set_minor_formatter(NullFormatter())
        _set_ticks(ax, "x", labels, 12)
        ax.set_xlabel("layer (residual read)")
        ax.set_ylabel(ylabel)
        ax.set_title(title)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
        return fig

    data = {"kind": "lens_curve", "metric": metric, "labels": labels,
            "series": {k: _jsonable(v) for k, v in series.items()}, "model_ce": ref}
    return Plot(_plot(build), data, title)


# ============================================================================ circuit graph

_NODE_RE = re.compile(r"^(?:input|logits|a(\d+)\.h(\d+)|a(\d+)\.kv(\d+)|m(\d+))$")


def _node_place(name: str, shape: Any) -> tuple[int, float, float]:
    """(residual slot, x in [0, 1], y offset) of a node. Slots follow the graph: input 0, layer l's heads
    2l+1, its MLP 2l+2, logits 2L+1 -- so every edge points up."""
    m = _NODE_RE.match(name)
    if m is None:
        raise InputError(f"Unknown circuit node name {name!r}.")
    H, K = shape.n_heads, shape.n_kv_heads
    if name == "input":
        return 0, 0.5, 0.0
    if name == "logits":
        return 2 * shape.n_layers + 1, 0.5, 0.0
    if m.group(1) is not None:
        return 2 * int(m.group(1)) + 1, (int(m.group(2)) + 0.5) / H, 0.0
    if m.group(3) is not None:  # a shared GQA key/value projection: under the middle of its group of heads
        g, group = int(m.group(4)), H // K
        return 2 * int(m.group(3)) + 1, (g * group + group / 2) / H, -0.38
    return 2 * int(m.group(5)) + 2, 0.5, 0.0


def circuit_graph(graph: Any, *, title: str = "Circuit", max_edges: int = 100) -> Plot:
    """A layered drawing of a Graph's circuit (select one first: graph.top_k_edges(k) / threshold(t)).

    Input at the bottom, logits at the top, one row per layer's heads and per MLP (rows holding no circuit
    node are skipped), heads spread horizontally by index. An edge's width and opacity grow with |score|;
    red = positive, blue = negative score; line style = the input it feeds (solid: query / MLP / logits,
    dashed: key, dotted: value). With GQA an edge into a shared key/value input goes to the group's heads
    in the circuit, or to a node "a{l}.kv{g}" when none is. The `max_edges` strongest edges are drawn."""
    from mechscope.circuits.graph import Graph

    if not isinstance(graph, Graph):
        raise InputError(f"circuit_graph needs a mechscope Graph, got {type(graph).__name__}.")
    if graph.in_circuit is None:
        raise EmptyCircuitError("This graph has no circuit selected; choose one with graph.top_k_edges(k) or "
                                "graph.threshold(t) before drawing it.")
    if graph.n_edges == 0:
        raise EmptyCircuitError("The circuit has no edge to draw; select more edges (a larger k or a lower "
                                "threshold).")
    if not isinstance(max_edges, int) or max_edges < 1:
        raise InputError(f"max_edges must be an int >= 1, got {max_edges!r}.")
    shape = graph.shape
    in_nodes = set(graph.nodes_in_circuit())
    all_edges = graph.circuit_edges()  # highest |score| first
    drawn = all_edges[:max_edges]
    owner = graph.owner  # [N, V]
    edges: list[dict[str, Any]] = []
    for name, score in drawn:  # one entry per drawn edge (at most max_edges)
        i, j = graph.edge_index(name)
        targets = [graph.nodes[n] for n in owner[:, j].nonzero().flatten().tolist()]
        if len(targets) > 1:  # GQA k/v input shared by a group of query heads
            inside = [t for t in targets if t in in_nodes]
            targets = inside or [graph.downstream[j].split("<")[0]]
        kind = graph.downstream[j][-2] if graph.downstream[j].endswith(">") else "r"
        edges.append({"edge": name, "score": score, "src": graph.upstream[i], "dst": targets, "input": kind})
    nodes = sorted({e["src"] for e in edges} | {t for e in edges for t in e["dst"]},  # the drawn edges' ends
                   key=lambda n: (_node_place(n, shape)[0], _node_place(n, shape)[1], n))
    places = {n: _node_place(n, shape) for n in nodes}
    slots = sorted({p[0] for p in places.values()})
    row_of = {s: r for r, s in enumerate(slots)}
    xy = {n: (p[1], row_of[p[0]] + p[2]) for n, p in places.items()}
    L = shape.n_layers

    def slot_label(s: int) -> str:
        if s == 0:
            return "input"
        if s == 2 * L + 1:
            return "logits"
        return f"L{(s - 1) // 2} attn" if s % 2 == 1 else f"L{(s - 2) // 2} MLP"

    biggest = max(abs(e["score"]) for e in edges) or 1.0
    subtitle = f"{graph.n_edges} edges, {len(in_nodes)} nodes" + (
        f" (drawing the top {len(drawn)} edges)" if len(drawn) < len(all_edges) else "")

    def build() -> Figure:
        fig = _new_figure(min(14.0, max(6.0, 1.6 + 0.95 * shape.n_heads)), min(16.0, max(3.2, 1.0 + 0.65 * len(slots))))
        ax = fig.add_subplot()
        styles = {"q": "-", "k": "--", "v": ":", "r": "-"}
        bend = {"q": 0.12, "k": 0.24, "v": -0.14, "r": 0.12}  # parallel q/k/v edges of one pair stay apart
        for e in sorted(edges, key=lambda e: abs(e["score"])):  # strongest drawn last, on top
            w = abs(e["score"]) / biggest
            for t in e["dst"]:
                ax.add_patch(FancyArrowPatch(
                    xy[e["src"]], xy[t], arrowstyle="-|>", mutation_scale=7 + 5 * w, shrinkA=9, shrinkB=9,
                    connectionstyle=f"arc3,rad={bend[e['input']]}", linewidth=0.5 + 3.0 * w, linestyle=styles[e["input"]],
                    color=_POS if e["score"] >= 0 else _NEG, alpha=0.3 + 0.7 * w, zorder=1 + w))
        colours = {"input": "#d5d8dc", "logits": "#d5d8dc", "a": "#fdebd0", "m": "#d5f5e3"}
        fs = 7 if shape.n_heads <= 12 else 5.5
        for n in nodes:
            x, y = xy[n]
            face = colours.get(n, colours["a" if n.startswith("a") else "m"])
            ax.text(x, y, n, ha="center", va="center", fontsize=fs, zorder=10,
                    bbox={"boxstyle": "round,pad=0.25", "facecolor": face, "edgecolor": "#555555", "linewidth": 0.6})
        ax.set_xlim(-0.03, 1.03)
        ax.set_ylim(-0.7, len(slots) - 0.3)
        ax.set_yticks(range(len(slots)), [slot_label(s) for s in slots])
        ax.set_xticks([])
        for side in ("top", "right", "bottom"):
            ax.spines[side].set_visible(False)
        ax.set_title(f"{title}\n{subtitle}", fontsize=10)
        handles = [Line2D([], [], color=_POS, lw=2, label="positive"), Line2D([], [], color=_NEG, lw=2, label="negative"),
                   Line2D([], [], color="gray", ls="--", label="into key"),
                   Line2D([], [], color="gray", ls=":", label="into value")]
        ax.legend(handles=handles, fontsize=7, loc="upper left", bbox_to_anchor=(1.0, 1.0), frameon=False)
        return fig

    data = {"kind": "circuit_graph", "n_edges": graph.n_edges, "n_drawn": len(drawn),
            "nodes": [{"name": n, "x": xy[n][0], "y": xy[n][1], "row": slot_label(places[n][0])} for n in nodes],
            "edges": edges, "shape": {k: getattr(shape, k) for k in
                                      ("n_layers", "n_heads", "n_kv_heads", "attn_only", "parallel_attn_mlp")}}
    return Plot(_plot(build), data, title)


# ============================================================================ DLA bars


def _dla_components(dla: Any, prompt: int | None) -> tuple[list[str], np.ndarray, float | None]:
    """(labels, values, logit_diff) of a DLAResult's components, averaged over prompts unless `prompt`."""
    if getattr(dla, "batched", False):
        if prompt is None:
            dla = dla.mean()
        else:
            B = dla.logit_diff.shape[0]
            if not isinstance(prompt, int) or not -B <= prompt < B:
                raise InputError(f"prompt must be an int in [0, {B}), got {prompt!r}.")
    elif prompt is not None:
        raise InputError("This DLAResult is already averaged over prompts; pass prompt=None.")

    def pick(t: torch.Tensor) -> torch.Tensor:
        return (t[prompt] if prompt is not None else t).detach().double().cpu()

    labels: list[str] = ["embed"]
    vals: list[torch.Tensor] = [pick(dla.embed).reshape(1)]
    pos = pick(dla.pos_embed).reshape(1)
    if float(pos.abs().sum()) > 0:
        labels.append("pos_embed")
        vals.append(pos)
    if dla.heads is not None:
        h = pick(dla.heads)  # [L, H]
        L, H = h.shape
        labels += [f"L{i // H}H{i % H}" for i in range(L * H)]
        vals.append(h.reshape(-1))
        if dla.attn_bias is not None:
            labels += [f"L{la} b_O" for la in range(L)]
            vals.append(pick(dla.attn_bias).reshape(-1))
    else:
        a = pick(dla.attn)
        labels += [f"attn{la}" for la in range(a.shape[0])]
        vals.append(a.reshape(-1))
    if dla.mlps is not None:
        m = pick(dla.mlps)
        labels += [f"MLP{la}" for la in range(m.shape[0])]
        vals.append(m.reshape(-1))
    labels.append("final bias")
    vals.append(pick(dla.final_bias).reshape(1))
    return labels, torch.cat(vals).numpy(), float(pick(dla.logit_diff))


def dla_bars(dla: Any, top: int = 20, *, prompt: int | None = None, title: str = "Direct logit attribution",
             value_label: str = "direct effect on the logit difference") -> Plot:
    """A horizontal bar chart of the `top` components with the largest |direct effect|, largest at the top.

    dla: a DLAResult (embeddings, heads "L{l}H{h}" or attention layers, per-layer b_O, MLPs "MLP{l}", final
    bias; averaged over prompts unless `prompt` picks one), or any {label: value} mapping / (label, value)
    pairs (e.g. graph.top_nodes())."""
    if not isinstance(top, int) or top < 1:
        raise InputError(f"top must be an int >= 1, got {top!r}.")
    total = None
    if hasattr(dla, "logit_diff") and hasattr(dla, "final_bias"):
        labels, vals, total = _dla_components(dla, prompt)
    else:
        pairs = list(dla.items()) if isinstance(dla, Mapping) else list(dla) if isinstance(dla, Sequence) else None
        if not pairs or any(not isinstance(p, Sequence) or len(p) != 2 or not isinstance(p[0], str) for p in pairs):
            raise InputError("dla_bars needs a DLAResult, a {label: value} mapping or (label, value) pairs; "
                             f"got {type(dla).__name__}{' (empty)' if pairs == [] else ''}.")
        labels = [p[0] for p in pairs]
        vals = _array([p[1] for p in pairs], "dla_bars values", (1,))
    key = np.where(np.isfinite(vals), np.abs(vals), -np.inf)
    order = np.argsort(-key, kind="stable")[:top]
    lab = [labels[i] for i in order]
    v = vals[order]

    def build() -> Figure:
        fig = _new_figure(6.0, min(12.0, max(2.4, 1.1 + 0.24 * len(lab))))
        ax = fig.add_subplot()
        y = np.arange(len(lab))[::-1]  # largest at the top
        ax.barh(y, np.nan_to_num(v), color=[_POS if x >= 0 else _NEG for x in v], height=0.7)
        ax.set_yticks(y, [_show(s, 24) for s in lab])
        ax.axvline(0, color="black", linewidth=0.8)
        ax.set_xlabel(value_label)
        sub = f"\n(model's value {total:.4g}; top {len(lab)} of {len(labels)} components)" if total is not None else ""
        ax.set_title(title + sub, fontsize=10)
        ax.grid(axis="x", alpha=0.3)
        return fig

    data = {"kind": "dla_bars", "labels": lab, "values": _jsonable(v), "value_label": value_label,
            "logit_diff": total, "n_components": len(labels)}
    return Plot(_plot(build), data, title)


__all__ = ["DPI", "PLOT_STYLE", "Plot", "circuit_graph", "dla_bars", "head_grid", "lens_kl_curve", "lens_table",
           "lens_table_from_result", "patching_heatmap", "render_png"]


# ============================================================================ probe layer sweep


def probe_sweep_curve(sweep: Any, *, title: str | None = None) -> Plot:
    """Probe AUROC per layer (a probes.Sweep): the cross-validated AUROC and, if the sweep was scored on a
    held-out set, the test AUROC; chance (0.5) dotted, the best layer marked."""
    if not hasattr(sweep, "auroc") or not hasattr(sweep, "layers"):
        raise InputError(f"probe_sweep_curve needs a probes.Sweep, got {type(sweep).__name__}.")
    labels = [str(v) for v in sweep.layers]
    series = {"cross-validated AUROC": _array(sweep.auroc, "Sweep.auroc", (1,))}
    if getattr(sweep, "test_auroc", None) is not None:
        series["held-out AUROC"] = _array(sweep.test_auroc, "Sweep.test_auroc", (1,))
    for name, s in series.items():
        if s.shape[0] != len(labels):
            raise InputError(f"{name} has {s.shape[0]} values for {len(labels)} layers.")
    best = int(sweep.best_index)
    title = title or f"Probe AUROC per layer ({sweep.method}, position {sweep.position!r})"

    def build() -> Figure:
        fig = _new_figure(min(14.0, max(5.0, 2.0 + 0.22 * len(labels))), 3.6)
        ax = fig.add_subplot()
        x = np.arange(len(labels))
        for (name, s), style in zip(series.items(), ("o-", "s--")):
            ax.plot(x, s, style, label=name, markersize=4, linewidth=1.5)
        ax.axhline(0.5, color="gray", linestyle=":", linewidth=1, label="chance")
        ax.axvline(best, color=_POS, linestyle="--", linewidth=0.8, alpha=0.6,
                   label=f"best: layer {labels[best]} ({float(sweep.auroc[best]):.3f})")
        _set_ticks(ax, "x", labels, 12)
        ax.set_ylim(min(0.4, float(np.nanmin([np.nanmin(s) for s in series.values()])) - 0.02), 1.02)
        ax.set_xlabel("layer (residual read)")
        ax.set_ylabel("AUROC")
        ax.set_title(title)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8, loc="lower right")
        return fig

    data = {"kind": "probe_sweep", "labels": labels, "hooks": list(getattr(sweep, "hooks", [])),
            "series": {k: _jsonable(v) for k, v in series.items()}, "best_layer": int(sweep.layers[best]),
            "method": sweep.method, "position": sweep.position}
    return Plot(_plot(build), data, title)
