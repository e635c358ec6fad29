"""Attribution graphs: the replacement model is exact, edges equal autograd's direct effects (circuit-tracer's
definition: backward through the model with attention patterns and norm scales detached and MLP outputs cut),
interventions move logits and features as the graph predicts, pruning and typed errors."""

from __future__ import annotations

import pytest
import torch

from mechscope.circuits import graphs
from mechscope.errors import ContextLengthError, InputError
from mechscope.sae import TranscoderMismatchError, TranscoderSet
from mechscope.sae.coder import SparseCoder
from mechscope.sae.config import SAEConfig

PROMPT = "the cat sat on the mat and the dog ran to"


def make_ts(model, n=48, k=4, skip=False, seed=0, enc_scale=3.0, dec_scale=0.3):
    """Random per-layer TopK transcoders reading ln2's output and writing the MLP output."""
    d, coders = model.cfg.d_model, []
    g = torch.Generator().manual_seed(seed)
    for layer in range(model.cfg.n_layers):
        c = SparseCoder(SAEConfig(arch="topk", d_in=d, n_latents=n, d_out=d, k=k, skip=skip,
                                  hook_in=f"blocks.{layer}.ln2.hook_normalized",
                                  hook_out=f"blocks.{layer}.hook_mlp_out"))
        with torch.no_grad():
            c.W_enc.copy_(torch.randn(d, n, generator=g) * enc_scale / d**0.5)
            c.W_dec.copy_(torch.randn(n, d, generator=g) * dec_scale / d**0.5)
            c.b_dec.copy_(torch.randn(d, generator=g) * 0.01)
            if skip:
                c.W_skip.copy_(torch.randn(d, d, generator=g) * 0.1 / d**0.5)
        coders.append(c)
    return TranscoderSet.from_coders(coders)


def reference_adjacency(model, ts, g, rows=None):
    """Dense adjacency by autograd, one backward per target (slow, obviously right); only `rows` if given."""
    rm = graphs.ReplacementModel(model, ts, torch.tensor([g.input_ids]))
    L, T = ts.n_layers, rm.n_pos
    holes, ins = {}, {}

    def det(act, hook):
        return act.detach()

    def cut(layer):  # gradient reaches the MLP output only through a zero "hole" (and the linear skip path)
        def fn(act, hook):
            skip = ts.skip_out(layer, ins[layer]) if ts.has_skip else torch.zeros_like(act)
            holes[layer] = torch.zeros_like(act, requires_grad=True)
            return act.detach() - skip.detach() + skip + holes[layer]
        return fn

    def rec(layer):
        def fn(act, hook):
            ins[layer] = act
        return fn

    def emb(act, hook):
        holes["embed"] = torch.zeros_like(act, requires_grad=True)
        return act.detach() + holes["embed"]

    hooks = [("blocks.*.attn.hook_pattern", det), (lambda n: n.endswith("hook_scale"), det), ("hook_embed", emb)]
    hooks += [(ts.input_hooks[i], rec(i)) for i in range(L)] + [(ts.output_hooks[i], cut(i)) for i in range(L)]
    final = {}
    hooks.append(("ln_final.hook_normalized", lambda a, h: final.__setitem__("x", a)))
    with torch.enable_grad(), model.hooks(hooks):
        model(rm.tokens)
    n = len(g.nodes)
    A = torch.zeros(n, n)
    feats = [(i, nd) for i, nd in enumerate(g.nodes) if nd.kind == "feature"]
    err0 = len(feats)
    emb0 = err0 + L * T
    W_U = model.W_U.detach()
    writes = {}  # dst layer -> (columns, positions, activation x decoder rows) of the features writing there
    for dst in range(L):
        items = [(j, sn.pos, sn.activation * ts.decoder(sn.layer, dst)[sn.feature].detach()) for j, sn in feats
                 if sn.layer <= dst and ts.decoder(sn.layer, dst) is not None]
        if items:
            writes[dst] = (torch.tensor([t[0] for t in items]), torch.tensor([t[1] for t in items]),
                           torch.stack([t[2] for t in items]))
    for i, nd in enumerate(g.nodes):
        if rows is not None and i not in rows:
            continue
        if nd.kind == "feature":
            read = ins[nd.layer][0, nd.pos] @ ts.encoder(nd.layer)[:, nd.feature]
        elif nd.kind == "logit":
            u = W_U[:, nd.token_id] - W_U.mean(1)
            read = final["x"][0, -1] @ u
        else:
            continue
        srcs = [holes[layer] for layer in range(L)] + [holes["embed"]]
        grads = torch.autograd.grad(read, srcs, retain_graph=True, allow_unused=True)
        grads = [torch.zeros_like(s) if gr is None else gr for s, gr in zip(srcs, grads, strict=True)]
        for dst, (cols, pos, vecs) in writes.items():
            A[i, cols] += (grads[dst][0, pos] * vecs).sum(-1).detach()
        for layer in range(L):
            e = rm.errors[layer].clone()
            e[:1] = 0
            A[i, err0 + layer * T: err0 + (layer + 1) * T] = (grads[layer][0] * e).sum(-1)
        A[i, emb0: emb0 + T] = (grads[L][0] * rm.embed).sum(-1)
    return A


@pytest.fixture(scope="module")
def gpt2(tiny_gpt2, one_thread):
    model = tiny_gpt2[2]
    return model, make_ts(model)


@pytest.fixture(scope="module")
def gpt2_graph(gpt2):
    model, ts = gpt2
    return graphs.attribute(model, PROMPT, ts, batch_size=16)


def _rel(a, b):
    return float((a - b).abs().max() / b.abs().max())


def test_replacement_reproduces_logits(gpt2, tiny_llama):
    for model, ts in (gpt2, (tiny_llama[2], make_ts(tiny_llama[2], skip=True))):
        rm = graphs.ReplacementModel(model, ts, PROMPT)
        ref = model(rm.tokens)[0]
        for kw in ({}, {"freeze_features": True}, {"freeze_attention": False}):
            assert (rm.logits(**kw) - ref).abs().max() < 1e-4, kw
        # the transcoders alone are not the model: error nodes are doing real work here
        assert max(float(e[1:].norm()) for e in rm.errors) > 1e-2


def test_edges_equal_autograd_direct_effects(gpt2, gpt2_graph):
    model, ts = gpt2
    A = gpt2_graph.dense()
    assert _rel(A, reference_adjacency(model, ts, gpt2_graph)) < 1e-4
    kinds = gpt2_graph.kinds()
    assert kinds.count("error") == 2 * len(gpt2_graph.input_ids) and kinds[-1] == "logit"
    assert A[:, [i for i, n in enumerate(gpt2_graph.nodes) if n.kind == "feature" and n.pos == 0]].abs().sum() == 0
    assert gpt2_graph.nodes[0].node_id == f"{gpt2_graph.nodes[0].layer}_{gpt2_graph.nodes[0].feature}_" \
                                          f"{gpt2_graph.nodes[0].pos}"


@pytest.mark.parametrize("variant", ["llama-skip", "gpt2-clt", "neox-parallel"])
def test_edges_equal_autograd_other_variants(variant, tiny_llama, tiny_gpt2, one_thread):
    prompt = PROMPT
    if variant == "neox-parallel":  # attention and MLP read the same residual (x + attn(ln1 x) + mlp(ln2 x))
        from mechscope import HookedTransformer, ModelConfig

        cfg = ModelConfig(d_model=32, n_layers=3, n_heads=4, d_head=8, d_mlp=64, d_vocab=50, n_ctx=32,
                          positional="rotary", rotary_dim=4, parallel_attn_mlp=True, model_name="tiny-neox")
        model = HookedTransformer(cfg).init_weights(0, std=0.2)
        ts = make_ts(model, seed=4)
        prompt = torch.tensor([[1, 5, 9, 2, 7, 7, 3, 11]])
    elif variant == "llama-skip":  # RMSNorm, GQA, rotary, gated MLP, skip transcoders
        model = tiny_llama[2]
        ts = make_ts(model, skip=True, seed=3)
    else:  # a cross-layer transcoder: features write to their layer and every later one
        from mechscope.sae.clt import CLTConfig, CrossLayerTranscoder

        model = tiny_gpt2[2]
        L = model.cfg.n_layers
        clt = CrossLayerTranscoder(CLTConfig(
            n_layers=L, d_in=64, d_out=64, n_features=32, arch="topk", k=3,  # d_out: see report (h-clt)
            input_hooks=[f"blocks.{i}.ln2.hook_normalized" for i in range(L)],
            output_hooks=[f"blocks.{i}.hook_mlp_out" for i in range(L)])).init_weights(seed=0)
        ts = TranscoderSet.from_clt(clt)
        assert ts.decoder(0, 1) is not None
    g = graphs.attribute(model, prompt, ts, batch_size=7)
    assert _rel(g.dense(), reference_adjacency(model, ts, g)) < 1e-4
    assert 0 <= g.scores["replacement"] <= 1 and 0 <= g.scores["completeness"] <= 1


def test_logit_selection(gpt2, gpt2_graph):
    model, _ = gpt2
    logits = [n for n in gpt2_graph.nodes if n.kind == "logit"]
    probs = torch.softmax(model(PROMPT)[0, -1], -1)
    top = probs.topk(len(logits))
    assert [n.token_id for n in logits] == top.indices.tolist()
    assert len(logits) == 10 or sum(n.prob for n in logits) >= 0.95 - 1e-6
    g1 = graphs.attribute(model, PROMPT, gpt2[1], max_n_logits=1)
    assert g1.count("logit") == 1


def test_graph_predicts_linear_interventions_exactly(gpt2, gpt2_graph):
    """With every other feature held (the linear model the graph describes), setting a feature moves each logit
    and each downstream feature's pre-activation by exactly the graph's prediction."""
    model, ts = gpt2
    check_linear_intervention(graphs.ReplacementModel(model, ts, PROMPT), gpt2_graph)


def check_linear_intervention(rm, g):
    """Set the layer-0 feature with the largest direct effect on the top logit to -1.5x its activation in the
    replacement model (other features held, logits before any soft-cap): every logit and later feature moves by
    exactly the graph's prediction, and at least one moves visibly. Returns the top logit's predicted change."""
    feats = [n for n in g.nodes if n.kind == "feature" and n.layer == 0]
    top = next(i for i, n in enumerate(g.nodes) if n.kind == "logit")
    src = max(feats, key=lambda n: abs(float(g.dense()[top, g.index_of(n)])))
    edit = {(src.layer, src.pos, src.feature): -1.5 * src.activation}
    pred = graphs.predicted_change(g, edit)

    def run(edits):
        return rm.logits(edits, freeze_features=True, softcap=False, return_acts=True)

    (base, _, ins0), (new, _, ins1) = run({}), run(edit)
    for i, n in enumerate(g.nodes):
        if n.kind == "logit":
            got = float(_demeaned(new[-1], n.token_id) - _demeaned(base[-1], n.token_id))
            assert got == pytest.approx(float(pred[i]), abs=1e-4 * max(1.0, abs(float(pred[i])))), n.node_id
    later = [(i, n) for i, n in enumerate(g.nodes) if n.kind == "feature" and n.layer > src.layer]
    moved = 0
    for i, n in later:
        d = float((ins1[n.layer][n.pos] - ins0[n.layer][n.pos]) @ rm.ts.encoder(n.layer).detach()[:, n.feature])
        assert d == pytest.approx(float(pred[i]), abs=1e-4), n.node_id
        moved += abs(d) > 1e-3
    assert moved > 0
    return float(pred[top])


def _demeaned(logits, tok):
    return logits[tok] - logits.mean()


def test_real_model_feature_interventions(gpt2, gpt2_graph):
    """Error terms kept, attention free: inhibiting the feature with the largest direct effect on the top logit
    lowers it, boosting raises it; setting it to its own value changes nothing; generate accepts it."""
    model, ts = gpt2
    g = gpt2_graph
    A = g.dense()
    top = next(i for i, n in enumerate(g.nodes) if n.kind == "logit")
    cand = [(float(A[top, i]), n) for i, n in enumerate(g.nodes) if n.kind == "feature"]
    w, src = max(cand, key=lambda t: t[0])
    assert w > 0
    key = (src.layer, src.pos, src.feature)
    tokens = torch.tensor([g.input_ids])
    tok = g.nodes[top].token_id
    base = _demeaned(model(tokens)[0, -1], tok).detach()
    same = model(tokens, interventions=graphs.feature_interventions(ts, {key: src.activation}))
    assert (same[0] - model(tokens)[0]).abs().max() < 1e-4
    down = _demeaned(model(tokens, interventions=graphs.feature_interventions(ts, {key: 0.0}))[0, -1], tok)
    up = _demeaned(model(tokens, interventions=graphs.feature_interventions(ts, {key: 3 * src.activation}))[0, -1],
                   tok)
    assert float(down) < float(base) < float(up)
    pred = graphs.predicted_logit_change(g, {key: 0.0})[tok]
    assert pred == pytest.approx(-w, rel=1e-5) and float(down - base) < 0
    out = model.generate(PROMPT, 3, interventions=graphs.feature_interventions(ts, {key: 3 * src.activation}))
    assert isinstance(out, str) and PROMPT in out


def test_prune(gpt2_graph):
    g = gpt2_graph
    default = graphs.prune(g)  # random toy transcoders: error nodes carry most influence here
    assert default.count("embedding") == g.count("embedding") and default.count("logit") == g.count("logit")
    gp = graphs.prune(g, node_threshold=0.99, edge_threshold=0.995)
    kinds = gp.kinds()
    assert kinds.count("embedding") == g.count("embedding") and kinds.count("logit") == g.count("logit")
    assert default.count("feature") <= kinds.count("feature") < g.count("feature") and kinds.count("feature") > 0
    assert not gp.adjacency.is_sparse and gp.adjacency.shape == (len(gp.nodes), len(gp.nodes))
    assert all(0 <= n.influence <= 1 for n in gp.nodes)
    ids = {n.key for n in gp.nodes}
    full = g.dense()
    i, j = gp.index_of(gp.nodes[-1]), None
    # kept edges carry their full-graph weights
    for a, na in enumerate(gp.nodes):
        for b in gp.adjacency[a].nonzero().flatten().tolist()[:3]:
            j = b
            assert float(gp.adjacency[a, b]) == float(full[g.index_of(na), g.index_of(gp.nodes[b])])
    assert j is not None and len(ids) == len(gp.nodes) and i == len(gp.nodes) - 1
    looser = graphs.prune(g, node_threshold=1.0, edge_threshold=1.0)
    assert looser.count("feature") >= gp.count("feature")
    with pytest.raises(InputError, match="node_threshold"):
        graphs.prune(g, node_threshold=1.5)


def test_max_feature_nodes(gpt2, gpt2_graph):
    model, ts = gpt2
    g = graphs.attribute(model, PROMPT, ts, max_feature_nodes=10, batch_size=4)
    assert g.count("feature") == 10
    full = gpt2_graph.dense()
    for i, n in enumerate(g.nodes):
        if n.kind != "feature":
            continue
        fi = gpt2_graph.index_of(n)
        cols = [gpt2_graph.index_of(m) for m in g.nodes]
        assert torch.allclose(g.dense()[i], full[fi, cols], atol=1e-5)


# ------------------------------------------------------------------ every decoder family
# Tiny native configs with exactly the fields our converters produce for each family (tests/models/test_family_*
# check the converters against transformers), plus a Gemma 2 converted from transformers itself.
FAMILY = dict(d_model=32, n_layers=3, n_heads=4, d_head=8, n_kv_heads=2, d_mlp=64, d_vocab=50, n_ctx=32,
              positional="rotary", normalization="RMS", gated_mlp=True)
GEMMA = dict(post_attn_norm=True, post_mlp_norm=True, embed_scale=32**0.5, attn_scale=6**-0.5, norm_eps=1e-6,
             act_fn="gelu_pytorch_tanh", sliding_window=3, layer_types=["sliding", "full", "sliding"],
             final_softcap=3.0, tie_word_embeddings=True)
FAMILIES = {
    "gemma2": {**GEMMA, "attn_softcap": 2.0},  # sandwich norms, both soft-caps, scaled embeddings, GQA, windows
    "gemma3": {**GEMMA, "qk_norm": True, "rope_theta": 1e6, "rope_theta_local": 1e4},
    "qwen2": dict(attn_bias=True, act_fn="silu"),  # q/k/v bias
    "mistral": dict(sliding_window=3, act_fn="silu"),  # a window on every layer
    "neox": dict(normalization="LN", n_kv_heads=4, gated_mlp=False, act_fn="gelu", rotary_dim=4,  # parallel blocks
                 parallel_attn_mlp=True, attn_bias=True, attn_out_bias=True, mlp_bias=True),
}
FAMILY_TOKENS = torch.tensor([[1, 5, 9, 2, 7, 7, 3, 11]])  # 8 positions: the window of 3 bites


def _perturb(model, seed, std=0.2):
    """Noise on every parameter: norm weights away from 1 (Gemma's (1 + w)), biases away from 0."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, p in model.named_parameters():
            p.add_(torch.randn(p.shape, generator=g) * std)
    return model


def _gemma2_from_transformers(folder):
    import transformers

    from mechscope.models.loading import from_pretrained

    cfg = transformers.Gemma2Config(
        num_hidden_layers=3, hidden_size=32, num_attention_heads=4, num_key_value_heads=2, head_dim=8,
        intermediate_size=64, vocab_size=50, max_position_embeddings=32, bos_token_id=1, eos_token_id=2,
        pad_token_id=0, sliding_window=3, attn_logit_softcapping=2.0, final_logit_softcapping=3.0,
        query_pre_attn_scalar=6)
    torch.manual_seed(0)
    _perturb(transformers.Gemma2ForCausalLM(cfg).eval(), 2).save_pretrained(folder)
    return from_pretrained(str(folder))


@pytest.fixture(scope="module", params=[*FAMILIES, "gemma2-hf"])
def family(request, tmp_path_factory, one_thread):
    """(name, model, transcoders, replacement model, graph) of one family, built once for its tests."""
    from mechscope import HookedTransformer, ModelConfig

    name = request.param
    if name == "gemma2-hf":
        model = _gemma2_from_transformers(tmp_path_factory.mktemp("gemma2-hf"))
    else:
        cfg = ModelConfig(**{**FAMILY, **FAMILIES[name]}, model_name=f"tiny-{name}")
        model = _perturb(HookedTransformer(cfg).init_weights(0, std=0.2), 1)
    ts = make_ts(model, seed=4)
    rm = graphs.ReplacementModel(model, ts, FAMILY_TOKENS)
    return name, model, ts, rm, graphs.attribute(model, FAMILY_TOKENS, ts, batch_size=7)


def test_family_replacement_reproduces_logits(family):
    name, model, ts, rm, _ = family
    c = model.cfg
    with torch.no_grad():
        ref = model(rm.tokens)[0]
        pre = model.head(model(rm.tokens, return_type="resid"), normalized=True, softcap=False)[0]
    for kw in ({}, {"freeze_features": True}, {"freeze_attention": False}):
        assert (rm.logits(**kw) - ref).abs().max() < 1e-4, kw
    assert (rm.logits(softcap=False) - pre).abs().max() < 1e-4
    assert max(float(e[1:].norm()) for e in rm.errors) > 1e-2
    if c.final_softcap is not None:  # the cap bites: what logit nodes measure is not the capped logit
        assert (pre - ref).abs().max() > 0.5 and ref.abs().max() < c.final_softcap
    for layer in range(c.n_layers):  # sliding layers: the frozen pattern holds the window (query 7 sees 5..7)
        far = rm.frozen.patterns[layer][:, -1, : -c.sliding_window] if c.sliding_window else None
        if c.is_sliding(layer):
            assert far.abs().max() == 0
        elif far is not None:
            assert far.abs().max() > 1e-3


def test_family_edges_equal_autograd(family):
    name, model, ts, _, g = family
    assert _rel(g.dense(), reference_adjacency(model, ts, g)) < 1e-4, name
    assert 0 <= g.scores["replacement"] <= 1 and 0 <= g.scores["completeness"] <= 1


def test_family_interventions_exact(family):
    """The graph's prediction is exact in the replacement model (logits before the final soft-cap, as logit nodes
    measure them), and the edited feature moves the top logit visibly."""
    name, model, ts, rm, g = family
    moved = check_linear_intervention(rm, g)
    assert abs(moved) > 1e-2, name


def test_unsupported_families_are_typed(gpt2):
    """Encoders (BERT) and attention-only models: the typed error names the reason and what is supported."""
    from mechscope import HookedTransformer, ModelConfig
    from mechscope.errors import UnsupportedArchitectureError

    bert = ModelConfig(d_model=16, n_layers=2, n_heads=2, d_head=8, d_mlp=32, d_vocab=20, n_ctx=16, causal=False,
                       post_layernorm=True, embed_norm=True, n_token_types=2, act_fn="gelu", mlm_head=True,
                       architecture="BertForMaskedLM")
    model = HookedTransformer(bert).init_weights(0)
    with pytest.raises(UnsupportedArchitectureError, match=r"BertForMaskedLM.*bidirectional.*not a causal language "
                                                           r"model.*post-norm.*Supported: causal decoders.*Gemma"):
        graphs.attribute(model, torch.tensor([[1, 2, 3]]), make_ts(model))
    lonely = ModelConfig(d_model=16, n_layers=1, n_heads=2, d_head=8, d_mlp=32, d_vocab=20, n_ctx=16,
                         attn_only=True)
    with pytest.raises(UnsupportedArchitectureError, match=r"attention-only \(no MLPs"):
        graphs.ReplacementModel(HookedTransformer(lonely).init_weights(0), gpt2[1], torch.tensor([[1, 2, 3]]))


def test_typed_errors(gpt2, tiny_llama):
    model, ts = gpt2
    with pytest.raises(ContextLengthError, match="max_prompt_tokens"):
        graphs.attribute(model, PROMPT, ts, max_prompt_tokens=4)
    with pytest.raises(TranscoderMismatchError):
        graphs.attribute(model, PROMPT, make_ts(tiny_llama[2]) if tiny_llama[2].cfg.n_layers != 2 else
                         TranscoderSet.from_coders(list(ts.coders)[:1]))
    with pytest.raises(InputError):
        graphs.feature_interventions(ts, {(0, 1, 10_000): 0.0})


@pytest.mark.slow
def test_smollm2_replacement_exact_and_edges(one_thread):
    """The real SmolLM2-135M (RMSNorm, GQA, rotary, tied embeddings): exact replacement, edges = autograd."""
    from mechscope import HookedTransformer

    model = HookedTransformer.from_pretrained("smollm2")
    ts = make_ts(model, n=256, k=4, seed=5)
    prompt = "The capital of France is"
    rm = graphs.ReplacementModel(model, ts, prompt)
    assert (rm.logits() - model(rm.tokens)[0]).abs().max() < 1e-4
    g = graphs.attribute(model, prompt, ts, max_n_logits=3)
    rows = [i for i, n in enumerate(g.nodes) if n.kind == "logit"]
    rows += [i for i, n in enumerate(g.nodes) if n.kind == "feature" and n.layer in (1, 15, 29)][::7]
    ref = reference_adjacency(model, ts, g, rows=set(rows))
    assert _rel(g.dense()[rows], ref[rows]) < 1e-4
