"""Top activating contexts of a graph's features (graph_feature_stats): equal to a brute-force pass (encode every
token, sort), for per-layer, skip and cross-layer transcoders; and `mechscope graph --stats-tokens`."""

from __future__ import annotations

import json

import pytest
import torch
from fake_graph import make_graph

from mechscope import sae
from mechscope.circuits.graphs import feature_details, graph_feature_stats, read_graph_json
from mechscope.cli import main
from mechscope.data.packing import contexts
from mechscope.errors import InputError, MechscopeError

pytestmark = pytest.mark.usefixtures("one_thread")

CORPUS = [f"Story {i}: the {w} walked to the {p} and saw {i * 7} birds near the river bank today."
          for i, (w, p) in enumerate([("cat", "market"), ("king", "castle"), ("girl", "school"), ("dog", "park"),
                                      ("farmer", "field"), ("queen", "palace"), ("boy", "harbour"),
                                      ("old man", "station"), ("teacher", "library"), ("baker", "bridge")] * 3)]
T = 16  # context length


def _transcoders(model, kind: str):
    d, L = model.cfg.d_model, model.cfg.n_layers
    ins = [f"blocks.{i}.ln2.hook_normalized" for i in range(L)]
    outs = [f"blocks.{i}.hook_mlp_out" for i in range(L)]
    if kind == "clt":
        cfg = sae.CLTConfig(n_layers=L, d_in=d, n_features=48, arch="topk", k=8, input_hooks=ins, output_hooks=outs)
        return sae.TranscoderSet.from_clt(sae.CrossLayerTranscoder(cfg).init_weights(3))
    coders = [sae.SparseCoder(sae.SAEConfig(arch="topk", d_in=d, n_latents=48, d_out=d, k=8, skip=kind == "skip",
                                            hook_in=ins[i], hook_out=outs[i])).init_weights(i) for i in range(L)]
    return sae.TranscoderSet.from_coders(coders)


def _brute_force(model, ts, layer: int, feats: list[int], n_ctx: int, k: int):
    """(top values [F, k], flat top indices ctx * T + pos [F, k], counts [F], max [F]) by sorting every token."""
    stream = contexts(CORPUS, model.tokenizer, T, seed=0)
    toks = torch.stack([r for _, r in zip(range(n_ctx), iter(stream))])  # [C, T]
    _, cache = model.run_with_cache(toks, names_filter=ts.input_hooks[layer], return_type=None)
    a = ts.encode(layer, cache[ts.input_hooks[layer]])[..., feats].float()  # [C, T, F]
    a = a.masked_fill((toks == stream.describe()["bos_token_id"])[..., None], 0.0).reshape(-1, len(feats)).T
    v, i = torch.sort(a, dim=1, descending=True, stable=True)  # ties -> the earliest token
    return v[:, :k], i[:, :k], (a > 0).sum(1), a.max(1).values


@pytest.mark.parametrize("kind", ["plt", "skip", "clt"])
def test_graph_stats_equal_brute_force(tiny_lm_folder, kind):
    _, model = tiny_lm_folder
    ts = _transcoders(model, kind)
    g = make_graph()  # feature nodes: layer 0 feature 5; layer 1 features 2 and 7
    stats = graph_feature_stats(model, ts, g, CORPUS, n_tokens=11 * T - 3, context_len=T, batch_size=4,
                                n_contexts=3, progress=False)  # 11 contexts (rounded up), batches of 4, 4, 3
    assert sorted(stats) == [0, 1] and stats[1].features.tolist() == [2, 7] and stats[0].features.tolist() == [5]
    for layer, st in stats.items():
        feats = st.features.tolist()
        v, i, count, amax = _brute_force(model, ts, layer, feats, 11, 3)
        assert st.n_contexts == 11 and st.n_tokens == 11 * T - 11  # BOS excluded (one per context here)
        assert (count > 0).all()  # the features do fire on this text: a real comparison
        torch.testing.assert_close(st.top_values, v, rtol=1e-5, atol=1e-6)
        assert (st.top_context * T + st.top_pos).tolist() == i.tolist()
        assert st.count.tolist() == count.tolist()
        torch.testing.assert_close(st.act_max, amax, rtol=1e-5, atol=1e-6)
        # each kept context carries its tokens: the top token is the one at top_pos
        stream = contexts(CORPUS, model.tokenizer, T, seed=0)
        rows = list(zip(range(11), iter(stream)))
        c, p = int(st.top_context[0, 0]), int(st.top_pos[0, 0])
        assert st.top_tokens[0, 0].tolist() == rows[c][1].tolist() and st.top_tokens[0, 0, p] == rows[c][1][p]
    det = feature_details(model, ts, g, stats=stats)
    ctx = det["1_7_2"]["top_contexts"]
    assert len(ctx) == 3 and ctx[0]["value"] == pytest.approx(float(stats[1].top_values[1, 0]))


def test_graph_stats_bad_input(tiny_lm_folder):
    _, model = tiny_lm_folder
    ts = _transcoders(model, "plt")
    assert graph_feature_stats(model, ts, make_graph(), CORPUS, n_tokens=0) == {}
    with pytest.raises(InputError, match="n_tokens"):
        graph_feature_stats(model, ts, make_graph(), CORPUS, n_tokens=-5)
    with pytest.raises(MechscopeError, match="No such file"):  # CorpusNotFoundError
        graph_feature_stats(model, ts, make_graph(), "no-such-corpus-xyz", n_tokens=64, progress=False)
    with pytest.raises(InputError, match="n_ctx"):
        graph_feature_stats(model, ts, make_graph(), CORPUS, n_tokens=64, context_len=4096, progress=False)


@pytest.fixture(scope="module")
def ts_dir(tiny_lm_folder, tmp_path_factory):
    folder, model = tiny_lm_folder
    d = tmp_path_factory.mktemp("ts") / "plt"
    _transcoders(model, "plt").save(d)
    corpus = tmp_path_factory.mktemp("corpus") / "stories.txt"
    corpus.write_text("\n".join(CORPUS), encoding="utf-8")
    return folder, d, corpus


def test_graph_cli_stats_tokens(ts_dir, tmp_path, capsys):
    folder, ts, corpus = ts_dir
    args = ["graph", "The capital of France is", "--model", str(folder), "--transcoders", str(ts),
            "--max-n-logits", "3", "--node-threshold", "0.6"]
    assert main([*args, "--out", str(tmp_path / "a"), "--stats-tokens", "256", "--stats-corpus", str(corpus)]) == 0
    printed = capsys.readouterr().out
    assert "top activating contexts of the graph's features from" in printed
    slug = "the-capital-of-france-is"
    gf = read_graph_json(tmp_path / "a" / f"{slug}.json")
    details = json.loads((tmp_path / "a" / f"{slug}.details.json").read_text())
    feats = [n["node_id"] for n in gf.nodes if gf.kind(n) == "feature"]
    with_ctx = [nid for nid in feats if details[nid].get("top_contexts")]
    assert feats and len(with_ctx) >= len(feats) // 2  # random TopK features: most fire on 256 tokens
    c = details[with_ctx[0]]["top_contexts"][0]
    assert c["value"] > 0 and (c["before"] + c["token"] + c["after"]).strip()
    assert c["token"] in " ".join(CORPUS)  # the contexts are text from the corpus file
    html = (tmp_path / "a" / f"{slug}.html").read_text(encoding="utf-8")
    assert '"top_contexts"' in html
    # --stats-tokens 0: logit effects only
    assert main([*args, "--out", str(tmp_path / "b"), "--stats-tokens", "0"]) == 0
    details = json.loads((tmp_path / "b" / f"{slug}.details.json").read_text())
    assert details and all("top_contexts" not in d and "logits_up" in d for d in details.values())
    # bad input: a typed error (exit 2, one line), before any attribution
    capsys.readouterr()
    assert main([*args, "--out", str(tmp_path / "c"), "--stats-tokens", "-1"]) == 2
    assert "stats_tokens must be an int >= 0" in capsys.readouterr().err
    assert main([*args, "--out", str(tmp_path / "d"), "--stats-corpus", str(tmp_path / "none.txt")]) == 2
    assert "No such file" in capsys.readouterr().err
    assert not (tmp_path / "d" / f"{slug}.json").exists()
