"""One prompt -> a folder of graph files: what `mechscope graph` and the report's graph stage write.

    OUT/{slug}.json            the pruned graph (Neuronpedia / circuit-tracer JSON, see graph_json.py)
    OUT/{slug}.html            the explorer page (self-contained)
    OUT/{slug}.details.json    the feature details inlined in it (logit effects; top activating contexts over
                               `stats_tokens` tokens of `stats_corpus`), for the served page
    OUT/{slug}_plot.png        a static picture of the strongest edges (+ {slug}_plot.json, its data)
    OUT/graph-metadata.json    the index circuit-tracer's local viewer lists graphs from
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from mechscope.circuits.graphs.explorer import (
    DETAILS_SUFFIX,
    feature_details,
    graph_feature_stats,
    write_explorer,
)
from mechscope.circuits.graphs.graph_json import (
    add_to_graph_index,
    graph_slug,
    read_graph_json,
    write_graph_json,
)
from mechscope.errors import InputError
from mechscope.fileio import atomic_write_json

STATS_TOKENS = 8192  # corpus tokens for the graph features' top activating contexts (seconds on a CPU)
STATS_CORPUS = "sotu"  # the built-in default corpus (as train-sae / feature-dashboards use)


def write_graph_files(model: Any, prompt: str, transcoders: Any, out: str | Path, *, slug: str | None = None,
                      node_threshold: float = 0.8, edge_threshold: float = 0.98, max_n_logits: int = 10,
                      desired_logit_prob: float = 0.95, batch_size: int = 256, max_feature_nodes: int | None = None,
                      supernodes: dict[str, list[str]] | None = None, stats: dict[int, Any] | None = None,
                      stats_tokens: int = STATS_TOKENS, stats_corpus: Any = STATS_CORPUS, device: Any = None,
                      png: bool = True, progress: bool = True) -> dict[str, Any]:
    """Attribute `prompt` through `transcoders` (circuits.graphs.attribute), prune at the thresholds and write
    the JSON, explorer page, PNG and index into `out`. Returns a JSON-able summary (paths, sizes, scores).
    Unless `stats` ({layer: FeatureStats}) is given, the pruned graph's features get their top activating
    contexts from `stats_tokens` tokens of `stats_corpus` (graph_feature_stats; 0: none, logit effects only)."""
    from mechscope.circuits.graphs import attribute, prune

    if not isinstance(prompt, str) or not prompt.strip():
        raise InputError("The prompt to explain is empty.")
    if isinstance(stats_tokens, bool) or not isinstance(stats_tokens, int) or stats_tokens < 0:
        raise InputError(f"stats_tokens must be an int >= 0 (0: no top activating contexts), got {stats_tokens!r}.")
    if stats is None and stats_tokens:  # an unknown corpus fails here, before the attribution
        from mechscope.data.sources import text_source

        text_source(stats_corpus)
    out = Path(out)
    slug = slug or graph_slug(prompt)
    t0 = time.perf_counter()
    g = attribute(model, prompt, transcoders, max_n_logits=max_n_logits, desired_logit_prob=desired_logit_prob,
                  batch_size=batch_size, max_feature_nodes=max_feature_nodes, device=device)
    t_attr = time.perf_counter() - t0
    gp = prune(g, node_threshold=node_threshold, edge_threshold=edge_threshold)
    json_path = write_graph_json(gp, out / f"{slug}.json", slug=slug, supernodes=supernodes,
                                 node_threshold=node_threshold)
    gf = read_graph_json(json_path)
    add_to_graph_index(out, gf.metadata)
    t1 = time.perf_counter()
    if stats is None:
        stats = graph_feature_stats(model, transcoders, gf, stats_corpus, n_tokens=stats_tokens, progress=progress)
    t_stats = time.perf_counter() - t1
    details = feature_details(model, transcoders, gf, stats=stats)
    html = write_explorer(gf, out / f"{slug}.html", details=details)
    atomic_write_json(out / f"{slug}{DETAILS_SUFFIX}", details)
    result: dict[str, Any] = {
        "prompt": prompt, "slug": slug, "json": json_path.name, "html": html.name,
        "n_nodes": len(gf.nodes), "n_links": len(gf.links),
        "n_features": sum(gf.kind(n) == "feature" for n in gf.nodes),
        "n_active_features": int((getattr(g, "settings", None) or {}).get(
            "n_active_features", sum(getattr(n, "kind", None) == "feature" for n in g.nodes))),
        "logits": [[n["clerp"], n["token_prob"]] for n in gf.nodes if gf.kind(n) == "logit"],
        "scores": {k: float(v) for k, v in (getattr(g, "scores", None) or {}).items()},
        "node_threshold": node_threshold, "edge_threshold": edge_threshold, "attribution_seconds": t_attr,
        "stats_tokens": max((int(s.n_tokens) for s in stats.values()), default=0), "stats_seconds": t_stats,
    }
    if png:
        from mechscope.viz.graph_plot import attribution_graph_plot

        attribution_graph_plot(gf, title=f"Attribution graph: {prompt!r}").save(out / f"{slug}_plot.png")
        result["png"] = f"{slug}_plot.png"
    return result
