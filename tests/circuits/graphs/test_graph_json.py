"""Graph files: the JSON that Neuronpedia's and circuit-tracer's viewers read ("Anthropic Attribution Graph"
1.0.0), node ids exactly as circuit-tracer 0.5 writes them, round trip, supernodes, typed errors, the PNG."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from fake_graph import FakeNode, make_graph

from mechscope.circuits.graphs import (
    GraphFormatError,
    GraphSchemaVersionError,
    UnknownNodeError,
    add_to_graph_index,
    graph_schema,
    graph_to_json,
    read_graph_json,
    validate_graph_json,
    write_graph_json,
)
from mechscope.circuits.graphs.graph_json import cantor, node_record, schema_errors
from mechscope.errors import InputError

# what circuit-tracer 0.5's frontend.graph_models.Node writes for these nodes (feature, layer, jsNodeId)
EXPECTED = {
    "0_5_1": (cantor(0, 5), "0", "0_5-0", "cross layer transcoder"),
    "1_2_2": (cantor(1, 2), "1", "1_2-0", "cross layer transcoder"),
    "1_7_2": (cantor(1, 7), "1", "1_7-0", "cross layer transcoder"),
    "0_0_2": (-1, "0", "0_2-0", "mlp reconstruction error"),  # error: "0_{layer}_{pos}" (sic, as 0.5 writes it)
    "E_464_0": (0, "E", "E_464-0", "embedding"),
    "E_3139_1": (1, "E", "E_3139-1", "embedding"),
    "E_1287_2": (2, "E", "E_1287-2", "embedding"),
    "3_42_2": (42, "3", "L_42-2", "logit"),  # layer n_layers + 1
    "3_17_2": (17, "3", "L_17-2", "logit"),
}


@pytest.fixture(scope="module")
def written(tmp_path_factory):
    path = tmp_path_factory.mktemp("gjson") / "capital.json"
    write_graph_json(make_graph(), path, supernodes={"capital": ["1_2_2", "1_7_2"]})
    return path


def test_nodes_and_fields_as_circuit_tracer_writes_them(written):
    doc = json.loads(written.read_text())
    assert cantor(0, 5) == 20 and cantor(1, 2) == 8  # (x + y)(x + y + 1) / 2 + y
    nodes = {n["node_id"]: n for n in doc["nodes"]}
    assert set(nodes) == set(EXPECTED)  # the edge-less error node (layer 1, pos 2) is left out, as 0.5 does
    for nid, (feature, layer, js, ftype) in EXPECTED.items():
        n = nodes[nid]
        assert (n["feature"], n["layer"], n["jsNodeId"], n["feature_type"]) == (feature, layer, js, ftype), nid
        assert list(n) == ["node_id", "feature", "layer", "ctx_idx", "feature_type", "token_prob", "is_target_logit",
                           "run_idx", "reverse_ctx_idx", "jsNodeId", "clerp", "influence", "activation"]
    assert nodes["0_5_1"]["activation"] == 1.5 and nodes["0_5_1"]["influence"] == 0.4
    assert nodes["3_42_2"]["is_target_logit"] and not nodes["3_17_2"]["is_target_logit"]
    assert nodes["3_42_2"]["clerp"] == 'Output " Paris" (p=0.600)' and nodes["3_42_2"]["token_prob"] == 0.6
    meta = doc["metadata"]
    assert meta["prompt_tokens"] == ["The", " cap", "ital"] and meta["prompt"] == "The capital"
    assert meta["slug"] == "capital" and meta["schema_version"] == 1 and meta["scan"] == "tiny"
    assert meta["pruning_settings"] == {"node_threshold": 0.8, "edge_threshold": 0.98}
    assert meta["mechscope"]["scores"] == {"replacement": 0.5, "completeness": 0.8}
    assert doc["qParams"]["supernodes"] == [["capital", "1_2_2", "1_7_2"]]
    # links: circuit-tracer's order (row-major over adjacency[target, source]), exact weights
    assert [(x["target"], x["source"], x["weight"]) for x in doc["links"]] == [
        ("0_5_1", "E_3139_1", 2.0), ("1_2_2", "0_5_1", 1.25), ("1_2_2", "0_0_2", -0.5),
        ("1_7_2", "E_1287_2", pytest.approx(0.3)), ("3_42_2", "1_2_2", 3.0),
        ("3_42_2", "1_7_2", -1.0), ("3_42_2", "E_464_0", 0.125), ("3_17_2", "1_2_2", -0.25)]


def test_validates_against_the_json_schema(written):
    jsonschema = pytest.importorskip("jsonschema")
    schema = graph_schema()
    assert schema["title"] == "Anthropic Attribution Graph" and schema["version"] == "1.0.0"
    doc = json.loads(written.read_text())
    jsonschema.Draft7Validator.check_schema(schema)
    jsonschema.validate(doc, schema)  # the reference validator agrees with ours on a good file ...
    assert schema_errors(doc) == []
    bad = json.loads(written.read_text())
    bad["nodes"][0]["ctx_idx"] = "1"
    del bad["links"][0]["weight"]
    bad["metadata"].pop("prompt")
    ours = schema_errors(bad)
    theirs = sorted(e.message for e in jsonschema.Draft7Validator(schema).iter_errors(bad))
    assert len(ours) == len(theirs) == 3  # ... and finds the same three problems in a bad one
    assert any("$.nodes[0].ctx_idx" in e for e in ours) and any("'weight'" in e for e in ours)


def test_round_trip_and_adjacency(written):
    g = make_graph()
    gf = read_graph_json(written)
    assert gf.prompt == g.prompt and gf.tokens == g.tokens and gf["metadata"]["slug"] == "capital"
    assert gf.supernodes == {"capital": ["1_2_2", "1_7_2"]}
    a = gf.adjacency()  # [n, n], [target, source], in gf.nodes order
    kept = [0, 1, 2, 3, 5, 6, 7, 8, 9]  # the original node indices of the file's nodes (error (1, 2) dropped)
    assert gf.node_ids == ["0_5_1", "1_2_2", "1_7_2", "0_0_2", "E_464_0", "E_3139_1", "E_1287_2", "3_42_2", "3_17_2"]
    assert torch.equal(a, g.adjacency[kept][:, kept])
    assert [gf.kind(n) for n in gf.nodes].count("feature") == 3
    assert graph_to_json(g, slug="capital") == graph_to_json(make_graph(), slug="capital")  # deterministic
    # the sparse (full-graph) adjacency gives the same nodes and links
    doc_sparse = graph_to_json(make_graph(sparse=True), slug="capital")
    assert doc_sparse["links"] == gf.links and doc_sparse["nodes"] == gf.nodes


def test_supernodes_saved_and_checked(written, tmp_path):
    gf = read_graph_json(written)
    gf2 = gf.with_supernodes({"say Paris": ["3_42_2", "1_2_2"]}, replace=False)
    out = gf2.save(tmp_path / "g2.json")
    assert read_graph_json(out).supernodes == {"capital": ["1_2_2", "1_7_2"], "say Paris": ["3_42_2", "1_2_2"]}
    with pytest.raises(UnknownNodeError, match="9_9_9"):
        gf.with_supernodes({"nope": ["1_2_2", "9_9_9"]})
    with pytest.raises(UnknownNodeError, match="1_0_4"):
        write_graph_json(make_graph(), tmp_path / "x.json", supernodes={"bad": ["1_0_4"]})
    doc = json.loads(written.read_text())
    doc["qParams"]["supernodes"].append(["ghost", "5_5_5"])
    (tmp_path / "ghost.json").write_text(json.dumps(doc))
    with pytest.raises(UnknownNodeError, match="ghost"):
        read_graph_json(tmp_path / "ghost.json")
    with pytest.raises(InputError, match="list of node ids"):
        gf.with_supernodes({"s": "1_2_2"})
    with pytest.raises(InputError, match="mapping"):
        write_graph_json(make_graph(), tmp_path / "y.json", supernodes=[["a", "1_2_2"]])
    # ids may also be the graph's own Node.node_id (h-graph numbers logits n_layers, the file n_layers + 1)
    g = make_graph()
    g.nodes[8].node_id = "2_42_2"
    doc = graph_to_json(g, supernodes={"say Paris": ["2_42_2", "1_2_2"]}, pinned=["2_42_2"], labels={"2_42_2": "Paris!"})
    assert doc["qParams"]["supernodes"] == [["say Paris", "3_42_2", "1_2_2"]] and doc["qParams"]["pinnedIds"] == ["3_42_2"]
    assert next(n for n in doc["nodes"] if n["node_id"] == "3_42_2")["clerp"] == "Paris!"


def _mutated(written, tmp_path, fn, name="bad.json"):
    doc = json.loads(written.read_text())
    fn(doc)
    p = tmp_path / name
    p.write_text(json.dumps(doc) if not isinstance(doc, str) else doc)
    return p


@pytest.mark.parametrize("mutate, error, match", [
    (lambda d: d["metadata"].__setitem__("schema_version", 2), GraphSchemaVersionError, "schema_version 2"),
    (lambda d: d.pop("links"), GraphFormatError, "missing required key 'links'"),
    (lambda d: d["nodes"][0].__setitem__("feature", "x"), GraphFormatError, r"nodes\[0\]\.feature"),
    (lambda d: d["links"][0].__setitem__("target", "7_7_7"), GraphFormatError, "7_7_7"),
    (lambda d: d["nodes"].append(dict(d["nodes"][0])), GraphFormatError, "duplicate node ids"),
    (lambda d: d["qParams"].__setitem__("pinnedIds", ["0_5_1", "8_8_8"]), UnknownNodeError, "8_8_8"),
    (lambda d: d["qParams"].__setitem__("supernodes", [[1, 2]]), GraphFormatError, "supernodes"),
])
def test_bad_files_are_typed_errors(written, tmp_path, mutate, error, match):
    with pytest.raises(error, match=match):
        read_graph_json(_mutated(written, tmp_path, mutate))


def test_bad_input_files(tmp_path, written):
    (tmp_path / "nan.json").write_text(written.read_text().replace('"weight":2.0', '"weight":NaN'))
    with pytest.raises(GraphFormatError, match="not JSON"):
        read_graph_json(tmp_path / "nan.json")
    (tmp_path / "g.pt").write_bytes(b"\x80\x04")
    with pytest.raises(InputError, match="never unpickles"):
        read_graph_json(tmp_path / "g.pt")
    with pytest.raises(InputError, match="No graph file"):
        read_graph_json(tmp_path / "missing.json")
    with pytest.raises(GraphFormatError, match="expected object"):
        validate_graph_json([1, 2])
    with pytest.raises(InputError, match=".json"):
        write_graph_json(make_graph(), tmp_path / "g.txt")


def test_reads_a_circuit_tracer_file(tmp_path):
    """A file as circuit-tracer 0.5's create_graph_files writes it (no schema_version key in older writers,
    no mechscope extras) reads and validates."""
    doc = {"metadata": {"slug": "ct", "scan": "gpt2", "transcoder_list": [], "prompt_tokens": ["a", "b"],
                        "prompt": "ab", "node_threshold": 0.8},
           "qParams": {"pinnedIds": [], "supernodes": [], "linkType": "both", "clickedId": "", "sg_pos": ""},
           "nodes": [{"node_id": "E_10_0", "feature": 0, "layer": "E", "ctx_idx": 0, "feature_type": "embedding",
                      "token_prob": 0.0, "is_target_logit": False, "run_idx": 0, "reverse_ctx_idx": 0,
                      "jsNodeId": "E_10-0", "clerp": "", "influence": 0.5, "activation": None},
                     {"node_id": "13_7_1", "feature": 7, "layer": "13", "ctx_idx": 1, "feature_type": "logit",
                      "token_prob": 0.9, "is_target_logit": True, "run_idx": 0, "reverse_ctx_idx": 0,
                      "jsNodeId": "L_7-1", "clerp": 'Output "x" (p=0.900)', "influence": None, "activation": None}],
           "links": [{"source": "E_10_0", "target": "13_7_1", "weight": 1.0}]}
    (tmp_path / "ct.json").write_text(json.dumps(doc, indent=2))
    gf = read_graph_json(tmp_path / "ct.json")
    assert gf.adjacency().tolist() == [[0.0, 0.0], [1.0, 0.0]]
    assert [gf.kind(n) for n in gf.nodes] == ["embedding", "logit"]


def test_error_id_collision_is_disambiguated():
    g = make_graph()
    # circuit-tracer 0.5 writes error (layer 0, pos 2) as "0_0_2": a layer-0 feature 0 at pos 2 has that id too
    g.nodes.append(FakeNode("feature", 0, 2, feature=0, activation=1.0))
    a = torch.zeros(len(g.nodes), len(g.nodes))
    a[: g.adjacency.shape[0], : g.adjacency.shape[1]] = g.adjacency
    a[1, len(g.nodes) - 1] = 0.5
    g.adjacency = a
    doc = graph_to_json(g)
    ids = [n["node_id"] for n in doc["nodes"]]
    assert len(ids) == len(set(ids)) and "0_-1_2" in ids and "0_0_2" in ids
    assert doc["metadata"]["mechscope"]["renamed_error_nodes"] == ["0_0_2"]


def test_graph_index(tmp_path, written):
    meta = json.loads(written.read_text())["metadata"]
    add_to_graph_index(tmp_path, meta)
    add_to_graph_index(tmp_path, {**meta, "slug": "other"})
    add_to_graph_index(tmp_path, meta)  # replaced by slug, not duplicated
    graphs = json.loads((tmp_path / "graph-metadata.json").read_text())["graphs"]
    assert [g["slug"] for g in graphs] == ["other", "capital"] and graphs[1]["prompt"] == "The capital"


def test_png_rendering(written, tmp_path):
    from mechscope.viz.graph_plot import attribution_graph_plot

    p = attribution_graph_plot(written, max_edges=5, title="capital")
    assert p.png.startswith(b"\x89PNG") and len(p.png) > 2000
    assert len(p.data["edges"]) == 5 and p.data["edges"][0][2] == 3.0  # the strongest first
    assert {n["kind"] for n in p.data["nodes"]} == {"feature", "error", "embedding", "logit"}
    png, side = p.save(tmp_path / "graph.png")
    assert png.stat().st_size == len(p.png) and json.loads(side.read_text())["title"] == "capital"


CT_FILE = Path(__file__).with_name("fixtures") / "circuit_tracer_graph.json"


def test_reads_a_genuine_circuit_tracer_file_and_writes_the_same_records():
    """fixtures/circuit_tracer_graph.json was written by circuit-tracer 0.5 itself (attribute + create_graph_files on
    a random GPT-2-small with 12 random transcoders; fixtures/make_circuit_tracer_graph.py). We read it, it passes
    the schema, and every node record we would write from the same (kind, layer, feature, position, token, values)
    is identical to circuit-tracer's, field by field and in order."""
    gf = read_graph_json(CT_FILE)
    jsonschema = pytest.importorskip("jsonschema")
    jsonschema.validate(gf.data, graph_schema())
    assert len(gf.nodes) == 57 and len(gf.links) == 673 and gf.metadata["schema_version"] == 1
    assert gf.ambiguous_ids == ["0_10_2", "0_1_2"]  # circuit-tracer 0.5's error ids shadowing layer-0 features
    emb = sorted((n for n in gf.nodes if gf.kind(n) == "embedding"), key=lambda n: n["ctx_idx"])
    input_ids = [int(n["node_id"].split("_")[1]) for n in emb]
    assert input_ids == [50256, 40, 101]
    for n in gf.nodes:
        kind, pos = gf.kind(n), n["ctx_idx"]
        if kind == "feature":
            node = FakeNode("feature", int(n["layer"]), pos, feature=int(n["node_id"].split("_")[1]),
                            activation=n["activation"], influence=n["influence"])
        elif kind == "error":
            node = FakeNode("error", int(n["layer"]), pos, influence=n["influence"])
        elif kind == "embedding":
            node = FakeNode("embedding", None, pos, influence=n["influence"])
        else:
            token = n["clerp"][len('Output "'):n["clerp"].rindex('" (p=')]
            node = FakeNode("logit", 12, pos, feature=n["feature"], token=token, prob=n["token_prob"])
        assert node_record(node, 12, input_ids, first_logit=n["is_target_logit"]) == n, n["node_id"]
    a = gf.adjacency()  # ambiguous ids: their links go to the first node of that id (summed)
    assert a.shape == (57, 57)
    assert float(a.sum()) == pytest.approx(sum(link["weight"] for link in gf.links), rel=1e-5, abs=1e-4)
    assert int((a != 0).sum()) < len(gf.links)  # links of the two nodes behind an ambiguous id were merged


@pytest.mark.slow
def test_same_graph_file_as_circuit_tracer(tmp_path_factory):
    """End to end against the peer: our attribute + prune + write_graph_json on the same random GPT-2-small and
    the same 12 transcoders (circuit-tracer's layout, read by sae.load_transcoders) give circuit-tracer 0.5's file:
    the same nodes and links, weights within 1e-4 of the largest, the same activations and influences. The model
    is rebuilt from its seed; if this transformers version initialises it differently, the test says so and skips."""
    import importlib.util

    from mechscope import sae
    from mechscope.circuits.graphs import attribute, prune
    from mechscope.models.identity import model_identity
    from mechscope.models.loading import load_model

    src = json.loads(CT_FILE.with_name("circuit_tracer_graph.source.json").read_text())
    spec = importlib.util.spec_from_file_location("make_ct", CT_FILE.with_name("make_circuit_tracer_graph.py"))
    make_ct = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(make_ct)
    work = tmp_path_factory.mktemp("ct-peer")
    make_ct.prepare(work)
    model = load_model(str(work / "gpt2"))
    ident = model_identity(model)
    if {k: ident[k] for k in src["model"]} != src["model"]:
        pytest.skip(f"the seeded GPT-2-small differs from the fixture's ({ident['weights_fingerprint']} vs "
                    f"{src['model']['weights_fingerprint']}): regenerate the fixture with make_circuit_tracer_graph.py")
    ts = sae.load_transcoders(work / "transcoders")
    g = attribute(model, torch.tensor([src["tokens"]]), ts, max_n_logits=src["max_n_logits"],
                  batch_size=src["batch_size"])
    doc = graph_to_json(prune(g, src["node_threshold"], src["edge_threshold"]))
    ct = json.loads(CT_FILE.read_text())

    def ct_id(n):  # our renamed error ids back to circuit-tracer 0.5's (ambiguous) form
        return f"0_{n['layer']}_{n['ctx_idx']}" if n["feature_type"] == "mlp reconstruction error" else n["node_id"]

    assert sorted(ct_id(n) for n in doc["nodes"]) == sorted(n["node_id"] for n in ct["nodes"])
    to_ct = {n["node_id"]: ct_id(n) for n in doc["nodes"]}

    def links(d, m):
        out = {}
        for x in d["links"]:
            k = (m(x["source"]), m(x["target"]))
            out[k] = out.get(k, 0.0) + x["weight"]
        return out

    ours, theirs = links(doc, to_ct.get), links(ct, lambda i: i)
    assert set(ours) == set(theirs) and len(doc["links"]) == len(ct["links"])
    scale = max(abs(v) for v in theirs.values())
    assert max(abs(ours[k] - theirs[k]) for k in theirs) / scale < 1e-4
    fo = {n["node_id"]: n for n in doc["nodes"] if n["feature_type"] == "cross layer transcoder"}
    fc = {n["node_id"]: n for n in ct["nodes"] if n["feature_type"] == "cross layer transcoder"}
    assert set(fo) == set(fc)
    for k in fc:
        assert fo[k]["activation"] == pytest.approx(fc[k]["activation"], rel=1e-4, abs=1e-6)
        assert fo[k]["influence"] == pytest.approx(fc[k]["influence"], abs=1e-4)
    assert [n["node_id"] for n in doc["nodes"] if n["is_target_logit"]] == \
        [n["node_id"] for n in ct["nodes"] if n["is_target_logit"]]
