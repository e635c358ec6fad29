"""Plots: PNG bytes that decode to a sensible image, data that round-trips through JSON and equals the input,
atomic saving of both, determinism, and typed errors on bad input."""

from __future__ import annotations

import base64
import io
import json
import math
import warnings

import matplotlib
import matplotlib.image
import pytest
import torch

from mechscope.circuits.dla import DLAResult, direct_logit_attribution
from mechscope.circuits.graph import Graph
from mechscope.circuits.lens import LensTable, logit_lens
from mechscope.errors import EmptyCircuitError, InputError
from mechscope.viz import (
    Plot,
    circuit_graph,
    dla_bars,
    head_grid,
    lens_kl_curve,
    lens_table,
    lens_table_from_result,
    patching_heatmap,
)

from conftest import make_tiny_lm

pytestmark = pytest.mark.usefixtures("one_thread")

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def tiny():
    return make_tiny_lm(0, 2)  # 2 layers, 4 heads, 2 kv heads (GQA), MLPs


def _check_png(p: Plot, w: tuple[int, int] = (250, 2000), h: tuple[int, int] = (180, 2000)) -> None:
    """A real PNG of a modest size that decodes to an RGB(A) image of w x h pixels in the given ranges."""
    assert p.png.startswith(PNG_MAGIC)
    assert len(p.png) < 300_000
    img = matplotlib.image.imread(io.BytesIO(p.png), format="png")
    assert img.ndim == 3 and img.shape[2] in (3, 4)
    assert w[0] <= img.shape[1] <= w[1] and h[0] <= img.shape[0] <= h[1], img.shape
    assert img[..., :3].std() > 0.05  # something was drawn


def _roundtrip(data: dict) -> dict:
    text = json.dumps(data, allow_nan=False)  # strict JSON: NaN must have become null
    return json.loads(text)


def _same(got, want, tol: float = 1e-6) -> bool:
    """Nested lists equal to a tensor (NaN <-> None)."""
    flat = torch.as_tensor([math.nan if v is None else v for v in _flatten(got)], dtype=torch.float64)
    ref = torch.as_tensor(want, dtype=torch.float64).flatten()
    return flat.shape == ref.shape and torch.allclose(flat, ref, atol=tol, equal_nan=True)


def _flatten(x):
    return [v for item in x for v in _flatten(item)] if isinstance(x, list) else [x]


# ------------------------------------------------------------------------------ heatmap


def test_patching_heatmap_png_data_and_colour_scale():
    torch.manual_seed(0)
    res = torch.randn(4, 6)
    res[1, 2] = math.nan  # e.g. a skipped cell
    toks = ["<s>", " $x$", "\n", " Mary", "漢字", " to"]
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no glyph / mathtext warnings escape
        p = patching_heatmap(res, x_labels=toks, title="resid_pre")
    _check_png(p)
    d = _roundtrip(p.data)
    assert p.title == "resid_pre" and d["kind"] == "patching_heatmap"
    assert _same(d["values"], res) and d["values"][1][2] is None
    assert d["x_labels"] == toks and d["y_labels"] == ["0", "1", "2", "3"]
    lim = float(res.nan_to_num(0).abs().max())  # symmetric around 0: equal colours = equal |effect|
    assert d["vmin"] == pytest.approx(-lim) and d["vmax"] == pytest.approx(lim) and d["center"] == 0.0

    norm = patching_heatmap(res.clamp(-0.3, 0.8), normalized=True).data
    assert (norm["vmin"], norm["vmax"]) == (-1.0, 1.0)
    seq = patching_heatmap(res, center=None).data
    assert seq["vmin"] == pytest.approx(float(res.nan_to_num(9).min()))
    assert seq["vmax"] == pytest.approx(float(res.nan_to_num(-9).max()))
    one = patching_heatmap(torch.tensor([0.1, 0.5, -0.2]))  # layer granularity: [n_layers]
    _check_png(one)
    assert _same(one.data["values"], [[0.1], [0.5], [-0.2]])


def test_plots_are_deterministic_and_ignore_user_style():
    res = torch.linspace(-1, 1, 12).reshape(3, 4)
    a = patching_heatmap(res, x_labels=list("abcd"))
    with matplotlib.rc_context({"font.size": 20, "axes.facecolor": "black", "image.cmap": "gray"}):
        b = patching_heatmap(res, x_labels=list("abcd"))
    assert a.png == b.png


def test_save_writes_png_and_json_atomically(tmp_path):
    p = head_grid(torch.arange(6.0).reshape(2, 3), "scores")
    png, side = p.save(tmp_path / "sub" / "grid.png")  # missing folders are created
    assert png.read_bytes() == p.png
    assert json.loads(side.read_text()) == {"title": "scores", **_roundtrip(p.data)}
    assert sorted(f.name for f in png.parent.iterdir()) == ["grid.json", "grid.png"]  # no temp files left
    assert base64.b64decode(p.data_uri().split(",", 1)[1]) == p.png
    with pytest.raises(InputError, match="png"):
        p.save(tmp_path / "grid.json")


# ------------------------------------------------------------------------------ head grid


def test_head_grid_top_heads():
    g = torch.Generator().manual_seed(1)
    scores = torch.rand(5, 4, generator=g)
    p = head_grid(scores, "Induction", highlight_top=3)
    _check_png(p)
    d = _roundtrip(p.data)
    assert _same(d["values"], scores)
    vals, idx = scores.flatten().topk(3)
    assert [(t["layer"], t["head"]) for t in d["top"]] == [(i // 4, i % 4) for i in idx.tolist()]
    assert [t["score"] for t in d["top"]] == pytest.approx(vals.tolist())
    assert d["vmin"] == 0.0  # unsigned scores: a sequential scale from 0

    signed = scores - 0.5
    signed[3, 1] = -2.0  # the largest |effect| is negative
    s = head_grid(signed, highlight_top=2).data
    assert (s["top"][0]["layer"], s["top"][0]["head"]) == (3, 1)
    assert s["vmin"] == pytest.approx(-2.0) and s["vmax"] == pytest.approx(2.0)
    assert head_grid(scores, highlight_top=0).data["top"] == []


# ------------------------------------------------------------------------------ lenses


def test_lens_table_cells_and_scale():
    toks = [["the", "$", "\n"], [" Mary", " John", "漢"]]
    probs = torch.tensor([[0.1, 0.5, math.nan], [0.9, 0.2, 0.3]])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        p = lens_table(toks, probs, x_labels=["a", "b", "c"], y_labels=["0_pre", "final_post"])
    _check_png(p)
    d = _roundtrip(p.data)
    assert d["tokens"] == toks and _same(d["values"], probs) and d["value_range"] == [0.0, 1.0]
    kl = lens_table(toks, torch.tensor([[3.0, 1.0, 0.5], [0.0, 0.2, 0.1]]), value_label="KL").data
    assert kl["value_range"] == [0.0, 3.0]


def test_lens_table_from_logit_lens_result(tiny):
    tokens = tiny.to_tokens(["When Mary and John went to the store", "The cat sat"], prepend_bos=False)
    res = logit_lens(tiny, tokens, top_k=3)
    p = lens_table_from_result(res, tiny, prompt=0)
    _check_png(p)
    d = p.data
    top = res.top_ids[:, 0, :, 0]  # [n, P]
    want = [[tiny.tokenizer.decode([i]) for i in row] for row in top.tolist()]
    assert d["tokens"] == want and d["y_labels"] == res.labels
    assert _same(d["values"], res.top_logprobs[:, 0, :, 0].double().exp())
    with pytest.raises(InputError):
        lens_table_from_result(res, tiny, prompt=5)


def test_lens_kl_curve_logit_vs_tuned():
    labels = ["0_pre", "1_pre", "final_post"]
    table = LensTable(labels=labels, kl_logit=torch.tensor([4.0, 1.0, 0.0]), ce_logit=torch.tensor([6.0, 4.0, 3.0]),
                      kl_tuned=torch.tensor([1.0, 0.5, 0.0]), ce_tuned=torch.tensor([4.0, 3.5, 3.0]),
                      n_tokens=10, model_ce=3.0)
    p = lens_kl_curve(table)
    _check_png(p)
    d = _roundtrip(p.data)
    assert d["labels"] == labels and set(d["series"]) == {"logit lens", "tuned lens"}
    assert d["series"]["logit lens"] == [4.0, 1.0, 0.0] and d["series"]["tuned lens"] == [1.0, 0.5, 0.0]
    ce = lens_kl_curve(table, metric="ce", log_scale=True).data
    assert ce["series"]["tuned lens"] == [4.0, 3.5, 3.0] and ce["model_ce"] == 3.0
    no_tuned = LensTable(labels, table.kl_logit, table.ce_logit, None, None, 10, 3.0)
    assert set(lens_kl_curve(no_tuned).data["series"]) == {"logit lens"}
    with pytest.raises(InputError, match="metric"):
        lens_kl_curve(table, metric="acc")
    with pytest.raises(InputError, match="LensTable"):
        lens_kl_curve([1, 2, 3])


# ------------------------------------------------------------------------------ circuit graph


def test_circuit_graph_of_a_real_graph(tiny):
    g = Graph.from_model(tiny)
    scores = torch.randn(g.scores.shape, generator=torch.Generator().manual_seed(3))
    circuit = Graph(g.shape, scores).top_k_edges(15)
    p = circuit_graph(circuit, title="random circuit")
    _check_png(p)
    d = _roundtrip(p.data)
    assert [(e["edge"], e["score"]) for e in d["edges"]] == [(n, pytest.approx(s)) for n, s in circuit.circuit_edges()]
    assert d["n_edges"] == d["n_drawn"] == circuit.n_edges
    pos = {n["name"]: (n["x"], n["y"]) for n in d["nodes"]}
    # every circuit node is drawn; the only extras are shared GQA k/v nodes no query head of the circuit reads
    extra = set(pos) - set(circuit.nodes_in_circuit())
    assert set(circuit.nodes_in_circuit()) <= set(pos) and all(".kv" in n for n in extra)
    for e in d["edges"]:  # layered: each edge goes up, from the writer to a reader of its input
        assert all(pos[t][1] > pos[e["src"]][1] for t in e["dst"])
        assert e["src"] == e["edge"].split("->")[0]
        down = e["edge"].split("->")[1]
        if "<" in down and ".h" in down:  # a query input: owned by that head alone
            assert e["dst"] == [down.split("<")[0]] and e["input"] == "q"
    ys = [y for _, y in pos.values()]
    assert pos["input"][1] == min(ys) and pos["logits"][1] == max(ys)
    heads = sorted((n for n in pos if ".h" in n), key=lambda n: (int(n[1:].split(".")[0]), int(n.split(".h")[1])))
    for a, b in zip(heads, heads[1:]):  # heads of one layer share a row, spread left to right by index
        if a.split(".")[0] == b.split(".")[0]:
            assert pos[a][1] == pos[b][1] and pos[a][0] < pos[b][0]

    top3 = circuit_graph(circuit, max_edges=3).data
    assert top3["n_drawn"] == 3 and [e["edge"] for e in top3["edges"]] == [n for n, _ in circuit.circuit_edges()[:3]]


def test_circuit_graph_rejects_empty_circuits(tiny):
    g = Graph.from_model(tiny)
    with pytest.raises(EmptyCircuitError, match="top_k_edges"):
        circuit_graph(g)  # no circuit selected
    with pytest.raises(EmptyCircuitError):
        circuit_graph(Graph(g.shape, g.scores, torch.zeros_like(g.real)))
    with pytest.raises(InputError, match="Graph"):
        circuit_graph({"edges": []})


# ------------------------------------------------------------------------------ DLA


def test_dla_bars_synthetic_components():
    B, L, H = 2, 2, 3
    heads = torch.arange(B * L * H, dtype=torch.float32).reshape(B, L, H) - 5.0
    res = DLAResult(logit_diff=torch.tensor([1.0, 2.0]), embed=torch.tensor([0.5, 1.5]), pos_embed=torch.zeros(B),
                    attn=heads.sum(-1), mlps=torch.tensor([[-9.0, 0.1], [-7.0, 0.3]]), final_bias=torch.zeros(B),
                    scale=torch.ones(B), positions=torch.zeros(B, dtype=torch.long), heads=heads,
                    attn_bias=torch.zeros(B, L))
    p = dla_bars(res, top=4)
    _check_png(p)
    d = _roundtrip(p.data)
    mean = {f"L{i // H}H{i % H}": v for i, v in enumerate(heads.mean(0).flatten().tolist())}
    mean |= {"embed": 1.0, "MLP0": -8.0, "MLP1": 0.2, "L0 b_O": 0.0, "L1 b_O": 0.0, "final bias": 0.0}
    want = sorted(mean.items(), key=lambda kv: -abs(kv[1]))[:4]
    assert list(zip(d["labels"], d["values"])) == [(k, pytest.approx(v)) for k, v in want]
    assert d["logit_diff"] == 1.5 and d["n_components"] == len(mean)
    second = dla_bars(res, top=2, prompt=1).data  # prompt 1 alone: MLP0 = -7, then head L1H2 = 6
    assert second["labels"] == ["MLP0", "L1H2"] and second["values"] == [-7.0, float(heads[1, 1, 2])]
    pairs = dla_bars([("a0.h1", 0.2), ("m0", -0.7)]).data
    assert pairs["labels"] == ["m0", "a0.h1"]
    with pytest.raises(InputError):
        dla_bars([])
    with pytest.raises(InputError):
        dla_bars(res, top=0)


def test_dla_bars_components_add_up_to_the_models_value(tiny):
    res = direct_logit_attribution(tiny, ["When Mary and John went to the store, John gave a drink to"] * 2,
                                   (" Mary", " John"))
    d = dla_bars(res, top=1000).data  # every component: they must partition the logit difference
    assert sum(d["values"]) == pytest.approx(float(res.logit_diff.mean()), abs=1e-4)
    assert d["logit_diff"] == pytest.approx(float(res.logit_diff.mean()))


# ------------------------------------------------------------------------------ bad input


@pytest.mark.parametrize("call", [
    lambda: patching_heatmap(torch.zeros(2, 3, 4)),  # [L, H, P]: reduce or slice first
    lambda: patching_heatmap(torch.zeros(0, 3)),
    lambda: patching_heatmap(torch.zeros(2, 3), x_labels=["a", "b"]),
    lambda: patching_heatmap(torch.full((2, 2), math.nan)),
    lambda: patching_heatmap("not numbers"),
    lambda: head_grid(torch.zeros(4)),
    lambda: head_grid(torch.zeros(2, 2), highlight_top=-1),
    lambda: lens_table([["a", "b"]], torch.zeros(2, 2)),
    lambda: lens_table([["a", 3]], torch.zeros(1, 2)),
])
def test_bad_input_raises_input_error(call):
    with pytest.raises(InputError):
        call()
