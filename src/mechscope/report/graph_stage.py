"""The report's opt-in attribution-graph stage: one factual prompt explained through given transcoders.

    mechscope report --graph-transcoders DIR [--graph-prompt "The capital of France is"]

Opt-in because it needs transcoders for the model (training them for SmolLM2's 30 layers does not fit the
report's 15-minute CPU budget; train them once with the transcoder trainer or load circuit-tracer's). The
stage writes artifacts/graph/{graph.json, graph.html, graph.png, graph-metadata.json} (circuits/graphs/files.py)
and the page shows the PNG, the top logits and scores, and links the explorer (viz/graph_plot.py:
graph_report_section). Its cache key holds the
transcoders by content (a hash of their files), not by path.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

from mechscope.errors import InputError
from mechscope.steps import step_key

GRAPH_PROMPT = "The capital of France is"
SLUG = "graph"


def transcoders_fingerprint(path: str | Path) -> str:
    """sha256 over the transcoder files (relative names, sizes and bytes): the stage's key, by content."""
    p = Path(path)
    if not p.exists():
        raise InputError(f"--graph-transcoders {str(path)!r} does not exist; give a transcoder folder (ours, or "
                         "circuit-tracer's config.yaml + layer_{i}.safetensors / W_enc_{i} + W_dec_{i}).")
    files = sorted(f for f in (p.rglob("*") if p.is_dir() else [p]) if f.is_file())
    h = hashlib.sha256()
    for f in files:
        h.update(f"{f.relative_to(p) if p.is_dir() else f.name}:{f.stat().st_size}\n".encode())
        with open(f, "rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 22), b""):
                h.update(chunk)
    return h.hexdigest()[:16]


def graph_stage_key(cfg: Any, model_in: dict[str, Any]) -> str:
    return step_key({"stage": "graph", "prompt": cfg.graph_prompt,
                     "transcoders": transcoders_fingerprint(cfg.graph_transcoders)}, model_in)


def run_graph_stage(model: Any, folder: Path, cfg: Any) -> dict[str, Any]:
    """Load the transcoders, check they fit the model, attribute + prune + write the graph files."""
    from mechscope.circuits.graphs.files import write_graph_files
    from mechscope.sae import load_transcoders

    ts = load_transcoders(cfg.graph_transcoders, device=cfg.device)
    ts.check_model(model)
    return write_graph_files(model, cfg.graph_prompt, ts, folder, slug=SLUG, device=cfg.device)
