"""A static picture of an attribution graph for reports: nodes by layer (rows) and prompt position (columns).

    attribution_graph_plot(gf, title="capital of Texas").save("out/graph.png")   # Plot: PNG + the data

Why static as well as the explorer: a report page and a paper need an image that renders anywhere; the
explorer is for looking closer. Only the strongest `max_edges` edges are drawn (width and opacity by |weight|,
red positive, blue negative); the data sidecar lists every drawn node and edge.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import matplotlib
import matplotlib.style
import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from mechscope.errors import EmptyCircuitError
from mechscope.viz.plots import DPI, PLOT_STYLE, Plot, render_png

_COLOURS = {"feature": "#f5d76e", "error": "#bbbbbb", "embedding": "#8fc1e3", "logit": "#7bd389", "other": "#dddddd"}
_POS, _NEG = "#c0392b", "#2471a3"


def _layout(gf: Any) -> tuple[dict[str, tuple[float, float]], int]:
    """node_id -> (x, y): x = position (spread within a cell by influence), y = layer rank (emb 0, logits top)."""
    ranks = {}
    for n in gf.nodes:
        lay = n["layer"]  # logits: "layer" n_layers + 1 (circuit-tracer), i.e. the row above the last layer
        ranks[n["node_id"]] = 0 if str(lay) == "E" else int(lay) + (0 if gf.kind(n) == "logit" else 1)
    cells: dict[tuple[int, int], list[dict]] = {}
    for n in gf.nodes:
        cells.setdefault((ranks[n["node_id"]], int(n["ctx_idx"])), []).append(n)
    xy = {}
    for (rank, pos), ns in cells.items():
        ns.sort(key=lambda n: -abs(n.get("influence") or 0.0))
        m = len(ns)
        step = min(0.12, 0.8 / max(m - 1, 1))
        for i, n in enumerate(ns):
            xy[n["node_id"]] = (pos + step * (i - (m - 1) / 2), float(rank))
    return xy, max(ranks.values(), default=1)


def attribution_graph_plot(graph: Any, *, title: str | None = None, max_edges: int = 150,
                           label_top: int = 8) -> Plot:
    """Render a graph (AttributionGraph, GraphFile, graph dict or .json path) as a PNG Plot."""
    from mechscope.circuits.graphs.explorer import as_graph_file

    gf = as_graph_file(graph)
    if not gf.nodes:
        raise EmptyCircuitError("The graph has no nodes to draw.")
    xy, top_rank = _layout(gf)
    kinds = {n["node_id"]: gf.kind(n) for n in gf.nodes}
    links = sorted(gf.links, key=lambda link: -abs(link["weight"]))[: max(0, max_edges)]
    wmax = max((abs(link["weight"]) for link in links), default=1.0) or 1.0
    tokens = list(gf.tokens)
    title = title or f"Attribution graph: {gf.prompt!r}"

    def build() -> Figure:
        width = min(18.0, max(6.0, 1.1 * len(tokens) + 1.5))
        height = min(14.0, max(4.0, 0.28 * (top_rank + 1) + 1.5))
        fig = Figure(figsize=(width, height), dpi=DPI, layout="constrained")
        FigureCanvasAgg(fig)
        ax = fig.add_subplot()
        for link in reversed(links):  # strongest drawn last (on top)
            (x0, y0), (x1, y1) = xy[link["source"]], xy[link["target"]]
            a = abs(link["weight"]) / wmax
            ax.plot([x0, x1], [y0, y1], color=_POS if link["weight"] >= 0 else _NEG, lw=0.3 + 2.5 * a,
                    alpha=0.15 + 0.7 * a, zorder=1)
        for kind, colour in _COLOURS.items():
            pts = np.array([xy[i] for i, k in kinds.items() if k == kind]).reshape(-1, 2)
            if len(pts):
                ax.scatter(pts[:, 0], pts[:, 1], s=28 if kind == "feature" else 40, c=colour, edgecolors="#333",
                           linewidths=0.5, zorder=2, label=kind)
        feats = sorted((n for n in gf.nodes if kinds[n["node_id"]] == "feature"),
                       key=lambda n: abs(n.get("influence") or 0.0))  # circuit-tracer: smaller = more influential
        for n in feats[:label_top]:
            x, y = xy[n["node_id"]]
            ax.annotate((n.get("clerp") or n["node_id"])[:28], (x, y), xytext=(3, 3), textcoords="offset points",
                        fontsize=6, zorder=3)
        logits = sorted((n for n in gf.nodes if kinds[n["node_id"]] == "logit"), key=lambda n: -n.get("token_prob", 0))
        for i, n in enumerate(logits[:4]):  # the top logits, staggered so their labels do not overlap
            x, y = xy[n["node_id"]]
            m = re.match(r'Output "(.*)" \(p=', n.get("clerp") or "")
            label = f"{(m.group(1) if m else n['node_id'])[:12]!r} {n.get('token_prob', 0):.2f}"
            ax.annotate(label, (x, y), xytext=(0, 6 + 9 * i), textcoords="offset points", fontsize=6, ha="center",
                        zorder=3)
        ax.set_xticks(range(len(tokens)), [repr(t)[1:-1][:12] for t in tokens], rotation=45, ha="right")
        step = max(1, top_rank // 6)
        ranks = [0] + list(range(step, top_rank, step)) + [top_rank]
        names = ["emb"] + [f"L{r - 1}" for r in ranks[1:-1]] + ["logits" if logits else f"L{top_rank - 1}"]
        ax.set_yticks(ranks, names)
        ax.set_xlim(-0.6, max(len(tokens), 1) - 0.4)
        ax.set_ylim(-0.6, top_rank + 1.2)
        ax.set_ylabel("layer")
        ax.set_title(title[:100])
        ax.legend(loc="upper left", fontsize=7, frameon=False, ncols=4)
        for side in ("top", "right"):
            ax.spines[side].set_visible(False)
        return fig

    with matplotlib.style.context(PLOT_STYLE):
        png = render_png(build())
    data = {"tokens": tokens, "nodes": [{"id": i, "kind": kinds[i], "x": xy[i][0], "y": xy[i][1]} for i in xy],
            "edges": [[link["source"], link["target"], float(link["weight"])] for link in links]}
    return Plot(png, data, title)


def graph_report_section(r: dict[str, Any], folder: Path, slug: str = "graph"):
    """The report section (Markup): PNG, top logits, scores, a link to the explorer page."""
    from mechscope.viz.html import Markup, esc, figure_img, table

    png = folder / r.get("png", f"{slug}_plot.png")
    img = figure_img(png.read_bytes(), "attribution graph") if png.exists() else Markup("<p>(no picture)</p>")
    scores = ", ".join(f"{esc(k)} score {v:.3f}" for k, v in r.get("scores", {}).items())
    rows = [[str(label), float(p)] for label, p in r.get("logits", [])]
    return Markup(
        f"<p>Prompt <q>{esc(r['prompt'])}</q>: {r['n_active_features']} active transcoder features; pruned at "
        f"node / edge influence {r['node_threshold']} / {r['edge_threshold']} to {r['n_nodes']} nodes and "
        f"{r['n_links']} links{'; ' + scores if scores else ''}. "
        f"<a href='artifacts/graph/{esc(r['html'])}'>Open the explorer</a> (hover, pin, group supernodes) or load "
        f"<code>artifacts/graph/{esc(r['json'])}</code> in Neuronpedia / circuit-tracer's viewer.</p>"
        + img + table(["logit node", "probability"], rows))
