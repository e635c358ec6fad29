"""`mechscope graph` and the report's opt-in graph stage, on the tiny LM with random per-layer transcoders."""

from __future__ import annotations

import json

import pytest

from mechscope import sae
from mechscope.circuits import graphs
from mechscope.circuits.graphs import read_graph_json
from mechscope.cli import main

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def tiny_transcoders(tiny_lm_folder, tmp_path_factory):
    """(model folder, model, transcoder folder): 3 random TopK transcoders (32 -> 48 -> 32), saved."""
    folder, model = tiny_lm_folder
    d = model.cfg.d_model
    coders = []
    for layer in range(model.cfg.n_layers):
        cfg = sae.SAEConfig(arch="topk", d_in=d, n_latents=48, d_out=d, k=4,
                            hook_in=f"blocks.{layer}.ln2.hook_normalized", hook_out=f"blocks.{layer}.hook_mlp_out")
        coders.append(sae.SparseCoder(cfg).init_weights(layer))
    ts_dir = tmp_path_factory.mktemp("ts") / "transcoders"
    sae.TranscoderSet.from_coders(coders).save(ts_dir)
    return folder, model, ts_dir


def test_graph_cli_writes_json_explorer_png(tiny_transcoders, tmp_path, capsys):
    folder, model, ts_dir = tiny_transcoders
    out = tmp_path / "g"
    rc = main(["graph", "The capital of France is", "--model", str(folder), "--transcoders", str(ts_dir),
               "--out", str(out), "--node-threshold", "0.7", "--max-n-logits", "5", "--batch-size", "64"])
    assert rc == 0, capsys.readouterr().err
    slug = "the-capital-of-france-is"
    gf = read_graph_json(out / f"{slug}.json")
    meta = gf.metadata
    assert meta["slug"] == slug and meta["node_threshold"] == 0.7 and meta["prompt"] == "The capital of France is"
    # a text prompt starts with the tokenizer's BOS, as in circuit-tracer (that position gets no nodes)
    assert meta["prompt_tokens"] == model.to_str_tokens("The capital of France is", prepend_bos=True)
    assert meta["generation_settings"]["max_n_logits"] == 5 and meta["generation_settings"]["batch_size"] == 64
    assert meta["pruning_settings"] == {"node_threshold": 0.7, "edge_threshold": 0.98}
    kinds = [gf.kind(n) for n in gf.nodes]
    assert kinds.count("embedding") == len(meta["prompt_tokens"]) and 1 <= kinds.count("logit") <= 5
    assert kinds.count("feature") > 0 and len(gf.links) > 0
    # ids as circuit-tracer writes them: logits sit at "layer" n_layers + 1 = 4, at the last position
    last = len(meta["prompt_tokens"]) - 1
    assert all(n["node_id"].startswith("4_") and n["node_id"].endswith(f"_{last}") for n in gf.nodes
               if gf.kind(n) == "logit")
    html = (out / f"{slug}.html").read_text(encoding="utf-8")
    assert '"logits_up"' in html  # feature details (logit effects from the transcoders) are inlined ...
    details = json.loads((out / f"{slug}.details.json").read_text())  # ... and kept for the served page
    assert set(details) == {n["node_id"] for n in gf.nodes if gf.kind(n) == "feature"}
    # by default the features' top activating contexts come from 8192 tokens of the built-in corpus
    assert sum(bool(d.get("top_contexts")) for d in details.values()) >= len(details) // 2
    assert (out / f"{slug}_plot.png").read_bytes().startswith(b"\x89PNG")
    assert json.loads((out / "graph-metadata.json").read_text())["graphs"][0]["slug"] == slug
    printed = capsys.readouterr().out
    assert f"{len(gf.nodes)} nodes, {len(gf.links)} links" in printed and "replacement" in printed


def test_graph_cli_bad_input(tiny_transcoders, tmp_path, capsys):
    folder, model, ts_dir = tiny_transcoders
    assert main(["graph", "x", "--model", str(folder), "--transcoders", str(tmp_path / "none"),
                 "--out", str(tmp_path / "o")]) == 2
    assert "mechscope: error:" in capsys.readouterr().err
    short = sae.TranscoderSet.from_coders(list(sae.load_transcoders(ts_dir).coders)[:2])  # 2 layers for a 3-layer model
    short.save(tmp_path / "short")
    assert main(["graph", "x", "--model", str(folder), "--transcoders", str(tmp_path / "short"),
                 "--out", str(tmp_path / "o2")]) == 2
    assert "cover 2 layers" in capsys.readouterr().err
    assert not (tmp_path / "o2" / "x.json").exists()  # refused before any attribution


def test_report_graph_stage(tiny_transcoders, tmp_path, monkeypatch):
    """The opt-in stage on its own (the full tiny report runs in tests/report): cached by transcoder content,
    rendered as a page section."""
    from types import SimpleNamespace

    from mechscope.report.cache import ReportFolder
    from mechscope.report.graph_stage import graph_stage_key, run_graph_stage
    from mechscope.viz.graph_plot import graph_report_section

    folder, model, ts_dir = tiny_transcoders
    from mechscope.models.identity import model_identity

    ident = model_identity(model)
    cfg = SimpleNamespace(graph_transcoders=str(ts_dir), graph_prompt="The capital of France is", device=None)
    rf = ReportFolder(tmp_path / "rep", ident)
    model_in = {"model": {k: v for k, v in ident.items() if k != "name"}}
    key = graph_stage_key(cfg, model_in)
    r = rf.stage("graph", key, lambda f: run_graph_stage(model, f, cfg), log=lambda m: None)
    gf = read_graph_json(rf.artifacts / "graph" / "graph.json")
    assert r["json"] == "graph.json" and r["n_nodes"] == len(gf.nodes) and gf.prompt == "The capital of France is"
    monkeypatch.setattr(graphs, "attribute", lambda *a, **k: pytest.fail("the cached stage attributed again"))
    assert rf.stage("graph", graph_stage_key(cfg, model_in), lambda f: run_graph_stage(model, f, cfg),
                    log=lambda m: None) == r  # cached
    # other transcoder bytes -> another key (by content, not path)
    coder_file = next(p for p in sorted(ts_dir.rglob("*.safetensors")))
    data = coder_file.read_bytes()
    try:
        coder_file.write_bytes(data[:-1] + bytes([data[-1] ^ 1]))
        assert graph_stage_key(cfg, model_in) != key
    finally:
        coder_file.write_bytes(data)
    html = graph_report_section(r, rf.artifacts / "graph")
    assert "artifacts/graph/graph.html" in html and "data:image/png;base64" in html and "Output" in html


def test_report_graph_option(tmp_path):
    """--graph-transcoders is a report option (off by default) and a missing folder fails before any stage runs."""
    from mechscope.errors import InputError
    from mechscope.report.pipeline import ReportConfig

    assert ReportConfig().graph_transcoders is None
    with pytest.raises(InputError, match="graph-transcoders"):
        ReportConfig(graph_transcoders=str(tmp_path / "none")).check()
    from mechscope.cli import _parser

    args = _parser().parse_args(["report", "--graph-transcoders", "ts", "--graph-prompt", "Paris is in"])
    assert args.graph_transcoders == "ts" and args.graph_prompt == "Paris is in"
