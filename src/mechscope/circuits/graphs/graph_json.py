"""Attribution graphs as the JSON file that Neuronpedia's and circuit-tracer's graph viewers read.

    write_graph_json(g, "out/capital.json", supernodes={"Texas": ["20_1234_5", "18_77_5"]})
    gf = read_graph_json("out/capital.json")     # validated GraphFile: .nodes, .links, .supernodes, .adjacency()

Why this format: it is the one file both viewers (and Neuronpedia's upload) accept, schema "Anthropic
Attribution Graph" v1.0.0 (`metadata`, `qParams`, `nodes`, `links`). Node ids and fields are written exactly as
circuit-tracer 0.5 writes them, so a graph of ours opens in its viewer and compares id by id with its graphs:

    feature    "{layer}_{feature}_{pos}"      feature = cantor(layer, feature), jsNodeId "{layer}_{feature}-0"
    error      "0_{layer}_{pos}"              feature = -1,                      jsNodeId "{layer}_{pos}-0"
    embedding  "E_{token_id}_{pos}"           feature = pos, layer "E",          jsNodeId "E_{token_id}-{pos}"
    logit      "{n_layers+1}_{token_id}_{pos}" feature = token_id,               jsNodeId "L_{token_id}-{pos}"

circuit-tracer 0.5 gives an error node the id of the layer-0 feature whose index equals the error's layer, at
the same position (its own files have such duplicates: the circuit-tracer file in the tests has 2 in 57 nodes).
We read those files (`GraphFile.ambiguous_ids` lists the shared ids) but never write one: such an error node is
written as "{layer}_-1_{pos}" and metadata.mechscope.renamed_error_nodes says so. Supernodes (named groups of
node ids, the viewer's grouping) live in qParams.supernodes as [label, id, id, ...]. The schema we validate
against is graph_schema.json next to this module, plus the checks a schema cannot state (unique ids apart from
those, links between known nodes, finite weights).
We never read circuit-tracer's pickled .pt graphs: only this JSON.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

import torch

from mechscope.errors import CorruptFileError, InputError
from mechscope.fileio import atomic_write_bytes

SCHEMA_TITLE = "Anthropic Attribution Graph"
SCHEMA_VERSION = "1.0.0"  # the JSON Schema's version
FILE_SCHEMA_VERSION = 1  # metadata.schema_version, as circuit-tracer writes it
FEATURE_TYPES = {"feature": "cross layer transcoder", "error": "mlp reconstruction error",
                 "embedding": "embedding", "logit": "logit"}
KIND_OF_TYPE = {v: k for k, v in FEATURE_TYPES.items()}
_SCHEMA_FILE = Path(__file__).with_name("graph_schema.json")


class GraphFormatError(CorruptFileError):
    """A graph JSON that is not a valid "Anthropic Attribution Graph" file (fails the schema or its checks)."""


class GraphSchemaVersionError(GraphFormatError):
    """A graph JSON written for another schema version than the one we read and write."""


class UnknownNodeError(InputError):
    """A supernode (or pinned id) names node ids that are not in the graph."""


# ------------------------------------------------------------------------------------------ schema


@lru_cache(maxsize=1)
def graph_schema() -> dict[str, Any]:
    """The JSON Schema (draft-07) of the file, as shipped with mechscope."""
    return json.loads(_SCHEMA_FILE.read_text(encoding="utf-8"))


_TYPES = {"object": lambda v: isinstance(v, dict), "array": lambda v: isinstance(v, list),
          "string": lambda v: isinstance(v, str), "boolean": lambda v: isinstance(v, bool),
          "null": lambda v: v is None,
          "integer": lambda v: isinstance(v, int) and not isinstance(v, bool),
          "number": lambda v: isinstance(v, (int, float)) and not isinstance(v, bool)}


def schema_errors(doc: Any, schema: Mapping[str, Any] | None = None, path: str = "$",
                  limit: int = 10) -> list[str]:
    """'path: problem' for each violation of the draft-07 subset the schema uses (type, required, properties,
    items), at most `limit`. Written here so validation needs no extra dependency; tests cross-check it with
    the `jsonschema` package when that is installed."""
    schema = graph_schema() if schema is None else schema
    out: list[str] = []

    def walk(v: Any, s: Mapping[str, Any], p: str) -> None:
        if len(out) >= limit:
            return
        types = s.get("type")
        if types is not None:
            types = [types] if isinstance(types, str) else types
            if not any(_TYPES[t](v) for t in types):
                out.append(f"{p}: expected {' or '.join(types)}, got {type(v).__name__} {_short(v)}")
                return
        if isinstance(v, dict):
            for k in s.get("required", ()):
                if k not in v:
                    out.append(f"{p}: missing required key {k!r}")
            for k, sub in s.get("properties", {}).items():
                if k in v:
                    walk(v[k], sub, f"{p}.{k}")
        if isinstance(v, list) and "items" in s:
            for i, item in enumerate(v):
                walk(item, s["items"], f"{p}[{i}]")
                if len(out) >= limit:
                    return

    walk(doc, schema, path)
    return out


def _short(v: Any) -> str:
    r = repr(v)
    return r if len(r) <= 40 else r[:37] + "..."


def validate_graph_json(doc: Any, *, where: str = "graph JSON") -> None:
    """Raise GraphFormatError / GraphSchemaVersionError / UnknownNodeError unless `doc` is a valid graph file."""
    if isinstance(doc, dict):
        meta = doc.get("metadata")
        version = meta.get("schema_version") if isinstance(meta, dict) else None
        if version is not None and version != FILE_SCHEMA_VERSION:
            raise GraphSchemaVersionError(
                f"{where} has metadata.schema_version {version!r}; mechscope reads and writes version "
                f"{FILE_SCHEMA_VERSION} (\"{SCHEMA_TITLE}\" {SCHEMA_VERSION}, as circuit-tracer 0.5 writes it). "
                "Re-export the graph with a tool that writes that version.")
    problems = schema_errors(doc)
    if problems:
        raise GraphFormatError(f"{where} is not a valid \"{SCHEMA_TITLE}\" {SCHEMA_VERSION} file: "
                               + "; ".join(problems))
    ids = [n["node_id"] for n in doc["nodes"]]
    known = set(ids)
    if len(known) != len(ids):
        bad = sorted(set(duplicate_ids(doc["nodes"])) - set(ambiguous_ids(doc["nodes"])))
        if bad:
            raise GraphFormatError(f"{where} has duplicate node ids: {bad[:5]}.")
    for i, link in enumerate(doc["links"]):
        for end in ("source", "target"):
            if link[end] not in known:
                raise GraphFormatError(f"{where}: links[{i}].{end} {link[end]!r} is not a node id of the graph.")
        if not math.isfinite(link["weight"]):
            raise GraphFormatError(f"{where}: links[{i}].weight is {link['weight']} (weights must be finite).")
    q = doc["qParams"]
    check_supernodes(supernodes_from_qparams(q.get("supernodes", []), where=where), known, where=where)
    bad_pins = [p for p in q.get("pinnedIds", []) if p not in known]
    if bad_pins:
        raise UnknownNodeError(f"{where}: qParams.pinnedIds names unknown node ids {bad_pins[:5]}.")


def duplicate_ids(nodes: list[dict[str, Any]]) -> list[str]:
    seen: set[str] = set()
    dup = []
    for n in nodes:
        if n["node_id"] in seen:
            dup.append(n["node_id"])
        seen.add(n["node_id"])
    return sorted(set(dup))


def ambiguous_ids(nodes: list[dict[str, Any]]) -> list[str]:
    """Ids that circuit-tracer 0.5 gives to two nodes: an error node "0_{layer}_{pos}" and the layer-0 feature
    of index `layer` at `pos`. Files it writes contain them; we accept them on reading (links on such an id
    cannot tell the two apart; GraphFile.adjacency gives them to the first node of that id) and never write one."""
    dups = set(duplicate_ids(nodes))
    out = []
    for i in sorted(dups):
        same = [n for n in nodes if n["node_id"] == i]
        errors = [n for n in same if n["feature_type"] == FEATURE_TYPES["error"]]
        if len(same) == 2 and len(errors) == 1 and i == f"0_{errors[0]['layer']}_{errors[0]['ctx_idx']}":
            out.append(i)
    return out


# ------------------------------------------------------------------------------------------ supernodes


def supernodes_from_qparams(rows: Iterable[Any], *, where: str = "graph JSON") -> dict[str, list[str]]:
    """qParams.supernodes ([[label, id, ...], ...]) -> {label: [ids]} (labels made unique with ' (2)')."""
    out: dict[str, list[str]] = {}
    for i, row in enumerate(rows):
        if not isinstance(row, list) or not row or not all(isinstance(x, str) for x in row):
            raise GraphFormatError(f"{where}: qParams.supernodes[{i}] must be [label, node_id, ...] (strings), "
                                   f"got {_short(row)}.")
        label, k = row[0], 2
        while label in out:
            label, k = f"{row[0]} ({k})", k + 1
        out[label] = list(row[1:])
    return out


def check_supernodes(supernodes: Mapping[str, Iterable[str]], known: Iterable[str], *,
                     where: str = "graph") -> dict[str, list[str]]:
    """{label: [ids]} with every id in `known`, else UnknownNodeError naming the unknown ids."""
    known = known if isinstance(known, (set, frozenset)) else set(known)
    out = {}
    if not isinstance(supernodes, Mapping):
        raise InputError(f"supernodes must be a mapping {{label: [node_id, ...]}}, got {type(supernodes).__name__}.")
    for label, ids in supernodes.items():
        if isinstance(ids, str):
            raise InputError(f"supernode {label!r}: give a list of node ids, not the string {ids!r}.")
        ids = [str(i) for i in ids]
        unknown = [i for i in ids if i not in known]
        if unknown:
            example = sorted(known)[:3]
            raise UnknownNodeError(f"{where}: supernode {label!r} names node ids not in the graph: {unknown[:5]} "
                                   f"(ids look like {example}; see GraphFile.node_ids).")
        if not ids:
            raise InputError(f"supernode {label!r} has no node ids.")
        out[str(label)] = ids
    return out


def supernodes_to_qparams(supernodes: Mapping[str, list[str]]) -> list[list[str]]:
    return [[label, *ids] for label, ids in supernodes.items()]


# ------------------------------------------------------------------------------------------ writing


def cantor(x: int, y: int) -> int:
    """Cantor pairing: the single integer circuit-tracer stores as a feature node's `feature`."""
    return (x + y) * (x + y + 1) // 2 + y


def _get(node: Any, name: str, default: Any = None) -> Any:
    return node.get(name, default) if isinstance(node, Mapping) else getattr(node, name, default)


def _n_layers(g: Any) -> int:
    if isinstance(getattr(g, "n_layers", None), int) and g.n_layers > 0:
        return g.n_layers
    for src in (getattr(g, "settings", None) or {}, getattr(g, "model_identity", None) or {}):
        if isinstance(src.get("n_layers"), int):
            return src["n_layers"]
    layers = [_get(n, "layer") for n in g.nodes if _get(n, "kind") in ("feature", "error")]
    if not layers:
        raise InputError("Cannot tell the model's layer count: the graph has no feature / error nodes and neither "
                         "settings nor model_identity give n_layers.")
    return max(layers) + 1


def _float(v: Any) -> float | None:
    if v is None:
        return None
    v = float(v)
    return v if math.isfinite(v) else None


def node_record(node: Any, n_layers: int, input_ids: list[int], *, first_logit: bool = False,
                clerp: str = "") -> dict[str, Any]:
    """One node of the file, fields and order as circuit-tracer 0.5's frontend model writes them."""
    kind, pos = _get(node, "kind"), int(_get(node, "pos"))
    layer, feat = _get(node, "layer"), _get(node, "feature")
    rec: dict[str, Any] = {"node_id": "", "feature": None, "layer": "", "ctx_idx": pos,
                           "feature_type": FEATURE_TYPES.get(kind, ""), "token_prob": 0.0, "is_target_logit": False,
                           "run_idx": 0, "reverse_ctx_idx": 0, "jsNodeId": "", "clerp": clerp,
                           "influence": _float(_get(node, "influence")), "activation": None}
    if kind == "feature":
        layer, feat = int(layer), int(feat)
        rec.update(node_id=f"{layer}_{feat}_{pos}", feature=cantor(layer, feat), layer=str(layer),
                   jsNodeId=f"{layer}_{feat}-0", activation=_float(_get(node, "activation")))
    elif kind == "error":
        layer = int(layer)
        rec.update(node_id=f"0_{layer}_{pos}", feature=-1, layer=str(layer), jsNodeId=f"{layer}_{pos}-0")
    elif kind == "embedding":
        if not 0 <= pos < len(input_ids):
            raise InputError(f"embedding node at position {pos} but the prompt has {len(input_ids)} tokens.")
        tid = _get(node, "token_id")
        tid = int(input_ids[pos] if tid is None else tid)
        rec.update(node_id=f"E_{tid}_{pos}", feature=pos, layer="E", jsNodeId=f"E_{tid}-{pos}")
        rec["influence"] = _float(_get(node, "influence"))
    elif kind == "logit":
        tid = _get(node, "token_id", None)
        tid = feat if tid is None else tid
        if tid is None:
            raise InputError("a logit node needs its token id (`token_id`).")
        tid, lay = int(tid), str(n_layers + 1)  # circuit-tracer 0.5: the logit "layer" is n_layers + 1
        prob = _float(_get(node, "prob")) or 0.0
        token = str(_get(node, "token") or "")
        rec.update(node_id=f"{lay}_{tid}_{pos}", feature=tid, layer=lay, token_prob=prob,
                   is_target_logit=bool(first_logit), jsNodeId=f"L_{tid}-{pos}",
                   clerp=clerp or f'Output "{token}" (p={prob:.3f})', influence=None)
    else:
        raise InputError(f"node kind {kind!r} is not one of {sorted(FEATURE_TYPES)}.")
    return rec


def _dense_edges(adjacency: torch.Tensor, n: int) -> tuple[list[int], list[int], list[float]]:
    """Non-zero entries (target, source, weight) in circuit-tracer's order: row-major over [target, source]."""
    if adjacency.shape != (n, n):
        raise InputError(f"adjacency has shape {tuple(adjacency.shape)}, expected [{n}, {n}] (one row and column "
                         "per node).")
    a = adjacency.detach().to("cpu")
    if a.is_sparse:
        a = a.coalesce()
        idx, val = a.indices(), a.values().to(torch.float64)
        keep = val != 0
        idx, val = idx[:, keep], val[keep]
        order = torch.argsort(idx[0] * n + idx[1])
        idx, val = idx[:, order], val[order]
        return idx[0].tolist(), idx[1].tolist(), val.tolist()
    dst, src = (a != 0).nonzero(as_tuple=True)
    return dst.tolist(), src.tolist(), a[dst, src].to(torch.float64).tolist()


def graph_to_json(g: Any, *, slug: str | None = None, supernodes: Mapping[str, Iterable[str]] | None = None,
                  scan: str | None = None, labels: Mapping[str, str] | None = None,
                  node_threshold: float | None = None, pinned: Iterable[str] = ()) -> dict[str, Any]:
    """An AttributionGraph (its nodes, adjacency[target, source], prompt and settings) -> the file's dict.

    Like circuit-tracer, feature and error nodes without any edge are left out (embeddings and logits stay).
    `labels` maps node ids to a label (the viewer's "clerp"), e.g. explanations from our feature statistics.
    Ids in labels / supernodes / pinned may be the file's or the graph's own (Node.node_id)."""
    labels = dict(labels or {})
    n_layers = _n_layers(g)
    input_ids = [int(t) for t in g.input_ids]
    nodes = list(g.nodes)
    first_logit = next((i for i, n in enumerate(nodes) if _get(n, "kind") == "logit"), None)
    recs = [node_record(n, n_layers, input_ids, first_logit=i == first_logit) for i, n in enumerate(nodes)]
    taken = {r["node_id"] for r in recs if r["feature_type"] != FEATURE_TYPES["error"]}
    renamed = []
    for r in recs:  # circuit-tracer 0.5's error id "0_{layer}_{pos}" can alias a layer-0 feature: disambiguate
        if r["feature_type"] == FEATURE_TYPES["error"] and r["node_id"] in taken:
            renamed.append(r["node_id"])
            r["node_id"] = f"{r['layer']}_-1_{r['ctx_idx']}"
    # ids the caller may know the nodes by (the graph's own Node.node_id) -> the file's ids
    alias = {str(_get(n, "node_id")): r["node_id"] for n, r in zip(nodes, recs) if _get(n, "node_id")}

    def file_id(i: Any) -> str:
        return alias.get(str(i), str(i))

    labels = {file_id(k): v for k, v in labels.items()}
    if isinstance(supernodes, Mapping):
        supernodes = {k: v if isinstance(v, str) else [file_id(i) for i in v] for k, v in supernodes.items()}
    supernodes = {} if supernodes is None else supernodes
    pinned = [file_id(p) for p in pinned]
    for r in recs:
        if r["node_id"] in labels:
            r["clerp"] = str(labels[r["node_id"]])
    dst, src, w = _dense_edges(g.adjacency, len(nodes))
    links = [{"source": recs[s]["node_id"], "target": recs[d]["node_id"], "weight": x}
             for d, s, x in zip(dst, src, w)]
    used = {x for link in links for x in (link["source"], link["target"])}
    recs = [r for r in recs if r["node_id"] in used or r["feature_type"] in ("embedding", "logit")]
    ids = {r["node_id"] for r in recs}
    sn = check_supernodes(supernodes, ids, where="write_graph_json")
    pins = [str(p) for p in pinned]
    if any(p not in ids for p in pins):
        raise UnknownNodeError(f"pinned ids not in the graph: {[p for p in pins if p not in ids][:5]}.")
    settings = dict(getattr(g, "settings", None) or {})
    name = str(getattr(g, "model_name", "") or "model")
    meta: dict[str, Any] = {
        "slug": slug or graph_slug(g.prompt), "scan": scan or name, "transcoder_list": [],
        "prompt_tokens": [str(t) for t in g.tokens], "prompt": str(g.prompt),
        "node_threshold": node_threshold if node_threshold is not None else settings.get("node_threshold"),
        "schema_version": FILE_SCHEMA_VERSION,
        "info": {"generator": {"name": "mechscope", "version": _version()}},  # no timestamp: same graph, same bytes
    }
    gen = {k: settings[k] for k in ("max_n_logits", "desired_logit_prob", "batch_size", "max_feature_nodes")
           if settings.get(k) is not None}  # Neuronpedia's schema has no null here
    if gen:
        meta["generation_settings"] = gen
    prune = {k: settings[k] for k in ("node_threshold", "edge_threshold")
             if isinstance(settings.get(k), (int, float))}
    if prune:
        meta["pruning_settings"] = prune
    extra = {"model_name": name, "scores": {k: _float(v) for k, v in (getattr(g, "scores", None) or {}).items()},
             "model_identity": getattr(g, "model_identity", None) or {}, "input_ids": input_ids}
    if renamed:
        extra["renamed_error_nodes"] = renamed
    meta["mechscope"] = _jsonable(extra)
    doc = {"metadata": meta,
           "qParams": {"pinnedIds": pins, "supernodes": supernodes_to_qparams(sn), "linkType": "both",
                       "clickedId": "", "sg_pos": ""},
           "nodes": recs, "links": links}
    validate_graph_json(doc, where="the graph being written")
    return doc


def _jsonable(x: Any) -> Any:
    if isinstance(x, Mapping):
        return {str(k): _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    if isinstance(x, float):
        return x if math.isfinite(x) else None
    if isinstance(x, (str, int, bool)) or x is None:
        return x
    if isinstance(x, torch.Tensor) and x.numel() == 1:
        return _jsonable(x.item())
    return str(x)


def graph_slug(prompt: str) -> str:
    s = "".join(c.lower() if c.isalnum() else "-" for c in str(prompt)).strip("-")
    while "--" in s:
        s = s.replace("--", "-")
    return s[:48].strip("-") or "graph"


def _version() -> str:
    try:
        from importlib.metadata import version

        return version("mechscope")
    except Exception:  # noqa: BLE001 - running from a source tree that is not installed
        return "0"


def dump_graph_json(doc: Mapping[str, Any]) -> bytes:
    """Strict JSON (no NaN), compact: graphs have tens of thousands of links."""
    return json.dumps(doc, allow_nan=False, ensure_ascii=False, separators=(",", ":")).encode("utf-8")


def write_graph_json(g: Any, path: str | Path, slug: str | None = None,
                     supernodes: Mapping[str, Iterable[str]] | None = None, **kwargs: Any) -> Path:
    """Write `g` (an AttributionGraph, usually pruned) as a Neuronpedia / circuit-tracer graph file, atomically.
    kwargs: scan, labels, node_threshold, pinned (see graph_to_json). Returns the path."""
    path = Path(path)
    if path.suffix.lower() != ".json":
        raise InputError(f"write_graph_json writes a .json file; got {str(path)!r}.")
    doc = graph_to_json(g, slug=slug or path.stem, supernodes=supernodes, **kwargs)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(path, dump_graph_json(doc))
    return path


def add_to_graph_index(folder: str | Path, metadata: Mapping[str, Any]) -> Path:
    """Add (or replace, by slug) a graph's metadata in FOLDER/graph-metadata.json: the index circuit-tracer's
    local viewer lists graphs from."""
    folder = Path(folder)
    index = folder / "graph-metadata.json"
    graphs = []
    if index.exists():
        try:
            graphs = json.loads(index.read_text(encoding="utf-8")).get("graphs", [])
        except (ValueError, AttributeError):
            raise GraphFormatError(f"{index} is not a graph index (JSON with a 'graphs' list); move it away.") from None
    graphs = [m for m in graphs if isinstance(m, dict) and m.get("slug") != metadata.get("slug")]
    keep = ("slug", "scan", "transcoder_list", "prompt_tokens", "prompt", "node_threshold", "schema_version")
    graphs.append({k: metadata[k] for k in keep if k in metadata})
    atomic_write_bytes(index, json.dumps({"graphs": graphs}, indent=2, ensure_ascii=False).encode("utf-8"))
    return index


# ------------------------------------------------------------------------------------------ reading


@dataclass
class GraphFile:
    """A validated graph file. `data` is the JSON as read (what the viewers see); the rest are views of it."""

    data: dict[str, Any]
    path: Path | None = None

    def __getitem__(self, key: str) -> Any:
        return self.data[key]

    @property
    def metadata(self) -> dict[str, Any]:
        return self.data["metadata"]

    @property
    def qparams(self) -> dict[str, Any]:
        return self.data["qParams"]

    @property
    def nodes(self) -> list[dict[str, Any]]:
        return self.data["nodes"]

    @property
    def links(self) -> list[dict[str, Any]]:
        return self.data["links"]

    @property
    def prompt(self) -> str:
        return self.metadata["prompt"]

    @property
    def tokens(self) -> list[str]:
        return self.metadata["prompt_tokens"]

    @property
    def node_ids(self) -> list[str]:
        return [n["node_id"] for n in self.nodes]

    @property
    def ambiguous_ids(self) -> list[str]:
        """Ids shared by an error node and a feature (circuit-tracer 0.5 files; see graph_json.ambiguous_ids)."""
        return ambiguous_ids(self.nodes)

    @property
    def supernodes(self) -> dict[str, list[str]]:
        return supernodes_from_qparams(self.qparams.get("supernodes", []))

    def kind(self, node: Mapping[str, Any]) -> str:
        """'feature' | 'error' | 'embedding' | 'logit' (other viewers' types, e.g. lorsa: 'other')."""
        return KIND_OF_TYPE.get(node["feature_type"], "other")

    def adjacency(self) -> torch.Tensor:
        """[n_nodes, n_nodes] float32, adjacency[target, source] = link weight (node order = self.nodes; duplicate
        links, possible only through ambiguous ids, are summed)."""
        index: dict[str, int] = {}
        for k, i in enumerate(self.node_ids):
            index.setdefault(i, k)  # an ambiguous id (see ambiguous_ids): its first node
        n = len(self.nodes)
        a = torch.zeros(n, n, dtype=torch.float32)
        if self.links:
            dst = torch.tensor([index[link["target"]] for link in self.links])
            src = torch.tensor([index[link["source"]] for link in self.links])
            a.index_put_((dst, src), torch.tensor([float(link["weight"]) for link in self.links]), accumulate=True)
        return a

    def with_supernodes(self, supernodes: Mapping[str, Iterable[str]], *, replace: bool = True) -> GraphFile:
        """A copy whose qParams.supernodes are `supernodes` (or the old ones updated with them)."""
        sn = check_supernodes(supernodes, set(self.node_ids), where=str(self.path or "graph"))
        merged = sn if replace else {**self.supernodes, **sn}
        data = json.loads(json.dumps(self.data))
        data["qParams"]["supernodes"] = supernodes_to_qparams(merged)
        return GraphFile(data, self.path)

    def save(self, path: str | Path | None = None) -> Path:
        """Validate and write (atomically) to `path` (default: where it was read from)."""
        path = Path(path) if path is not None else self.path
        if path is None:
            raise InputError("GraphFile.save needs a path (this graph was not read from a file).")
        validate_graph_json(self.data, where=str(path))
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_bytes(path, dump_graph_json(self.data))
        return path


def _no_constants(name: str) -> Any:
    raise ValueError(f"{name} is not valid JSON")


def parse_graph_json(text: str | bytes, *, where: str = "graph JSON") -> GraphFile:
    """Parse and validate graph-file text (bytes or str)."""
    try:
        data = json.loads(text, parse_constant=_no_constants)
    except (ValueError, UnicodeDecodeError) as e:
        raise GraphFormatError(f"{where} is not JSON: {e}") from None
    validate_graph_json(data, where=where)
    return GraphFile(data)


def read_graph_json(path: str | Path) -> GraphFile:
    """Read and validate a graph file (ours, circuit-tracer's or Neuronpedia's). Typed errors: GraphFormatError,
    GraphSchemaVersionError, UnknownNodeError (a supernode or pin naming an unknown node)."""
    path = Path(path)
    if path.suffix.lower() in (".pt", ".pth", ".pkl", ".pickle"):
        raise InputError(f"{str(path)!r} looks like a pickled graph; mechscope never unpickles. Export it to JSON "
                         "with circuit-tracer's create_graph_files and read that.")
    if not path.is_file():
        raise InputError(f"No graph file at {str(path)!r}.")
    gf = parse_graph_json(path.read_bytes(), where=str(path))
    gf.path = path
    return gf
