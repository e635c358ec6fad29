"""Attribution patching, EAP / EAP-IG and exact edge ablation, checked against independent references:
autograd through hooks that route one input through a leaf copy of the residual, finite differences,
hook-based activation patching, and explicit identities of the residual stream."""

from __future__ import annotations

import re

import pytest
import torch
import torch.nn.functional as F

from mechscope import HookedTransformer, ModelConfig
from mechscope.circuits.attribution import (
    ABLATIONS,
    _input_gradients,
    _node_outputs,
    attribution_patching,
    edge_attribution,
    evaluate_circuit,
    faithfulness,
    faithfulness_curve,
    run_with_edges,
)
from mechscope.circuits.graph import Graph, GraphShape
from mechscope.circuits.patching import activation_patching
from mechscope.errors import EmptyCircuitError, HookNameError, InputError, MetricError, PromptMismatchError

from conftest import make_tiny_lm

pytestmark = pytest.mark.usefixtures("one_thread")


def _perturb(model: HookedTransformer, seed: int) -> HookedTransformer:
    """Give every 1-D parameter (norm weights, biases) a random value so no bias term is trivially 0."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 1:
                p.add_(0.2 * torch.randn(p.shape, generator=g))
    return model


def _native(seed: int, **kw) -> HookedTransformer:
    base = dict(d_model=32, n_layers=2, n_heads=4, d_head=8, d_mlp=48, d_vocab=97, n_ctx=32)
    cfg = ModelConfig(**{**base, **kw}, model_name=f"tiny-{seed}")
    return _perturb(HookedTransformer(cfg).init_weights(seed, std=0.15), seed)


@pytest.fixture(scope="module")
def models() -> dict[str, HookedTransformer]:
    return {
        # RMSNorm, rotary, GQA (4 heads, 2 kv heads), gated MLP: the SmolLM2 shape
        "llama": make_tiny_lm(0, n_layers=2),
        # LayerNorm, learned positions, biases everywhere, MHA
        "gpt2": _native(1, normalization="LN", positional="learned", attn_bias=True, attn_out_bias=True,
                        mlp_bias=True, unembed_bias=True),
        # parallel attention + MLP (NeoX), partial rotary, GQA, LayerNorm
        "neox": _native(2, normalization="LN", positional="rotary", rotary_dim=4, parallel_attn_mlp=True,
                        n_kv_heads=2, attn_bias=True),
        # attention-only, like the zoo's induction model
        "attn_only": _native(3, normalization="LN", positional="learned", attn_only=True, d_mlp=0),
    }


def _prompts(model: HookedTransformer, seed: int = 0, B: int = 3, T: int = 7):
    g = torch.Generator().manual_seed(seed)
    n = min(model.cfg.d_vocab, 1000)
    return torch.randint(0, n, (B, T), generator=g), torch.randint(0, n, (B, T), generator=g)


def _metric(logits: torch.Tensor) -> torch.Tensor:  # a logit difference at the last position, batch mean
    return (logits[:, -1, 5] - logits[:, -1, 7]).mean()


# ----------------------------------------------------------------------------- graph structure


def test_graph_structure_gqa_and_parallel():
    s = GraphShape(n_layers=2, n_heads=4, n_kv_heads=2)
    g = Graph(s)
    assert len(g.upstream) == 1 + 2 * 5 and len(g.downstream) == 2 * (4 + 4 + 1) + 1
    assert "a1.kv1<k>" in g.downstream and "a1.h1<k>" not in g.downstream  # k/v inputs per kv head
    kv = g.downstream.index("a0.kv1<v>")
    assert [g.nodes[i] for i in g.owner[:, kv].nonzero().flatten()] == ["a0.h2", "a0.h3"]
    g.edge_index("a0.h0->m0")  # an MLP reads the heads of its own layer
    g.edge_index("m0->a1.h3<q>")
    g.edge_index("input->logits")
    for bad in ("a0.h0->a0.h1<q>", "m0->m0", "m1->a1.h0<q>", "a1.h0->a0.kv0<k>"):
        with pytest.raises(InputError, match="no edge"):
            g.edge_index(bad)
    with pytest.raises(InputError, match="Unknown downstream"):
        g.edge_index("a0.h0->a1.h0<k>")  # GQA: k inputs are named by kv head
    c = g.with_edges(["input->a0.kv1<k>", "a0.h2->logits"], prune=True)  # a kv input feeds its whole group
    assert c.n_edges == 2 and c.nodes_in_circuit() == ["input", "a0.h2", "logits"]  # a0.h3 writes nothing
    par = Graph(GraphShape(2, 4, 4, parallel_attn_mlp=True))
    with pytest.raises(InputError, match="no edge"):
        par.edge_index("a0.h0->m0")  # parallel blocks: the MLP reads resid_pre
    mha = Graph(GraphShape(1, 2, 2, attn_only=True))
    assert mha.downstream == ["a0.h0<q>", "a0.h1<q>", "a0.h0<k>", "a0.h1<k>", "a0.h0<v>", "a0.h1<v>", "logits"]
    assert mha.n_real_edges == 6 + 3  # input -> 6 head inputs and logits, each head -> logits


def test_selection_pruning_and_files(tmp_path):
    g = Graph(GraphShape(2, 2, 2, attn_only=True), torch.randn(5, 13, generator=torch.Generator().manual_seed(0)))
    edges = ["input->a1.h0<q>", "a1.h0->logits",  # a complete path
             "input->a0.h1<k>",  # a0.h1 reaches nothing: dropped
             "a0.h0->logits"]  # a0.h0 has no input edge: dropped
    c = g.with_edges(edges, prune=True)
    assert sorted(e for e, _ in c.circuit_edges()) == sorted(edges[:2])
    assert c.n_edges == 2 and c.nodes_in_circuit() == ["input", "a1.h0", "logits"] and c.n_nodes == 3
    assert g.with_edges(edges).n_edges == 4  # no pruning unless asked
    # top-k: exactly the k largest |scores| before pruning
    top = g.top_k_edges(5, prune=False)
    kept = g.scores.abs()[top.in_circuit]
    assert top.n_edges == 5 and kept.min() >= g.scores.abs()[g.real & ~top.in_circuit].max()
    assert g.threshold(float(kept.min()), prune=False).n_edges == 5
    with pytest.raises(EmptyCircuitError, match="raise k"):
        g.top_k_edges(5)  # here no top-5 edge lies on a complete path
    top = g.top_k_edges(8, prune=False)
    pruned = g.top_k_edges(8)
    assert 0 < pruned.n_edges < 8 and bool((pruned.in_circuit <= top.in_circuit).all())
    assert pruned.prune().n_edges == pruned.n_edges  # pruning is idempotent
    # node scores are row sums; summary is JSON-ready
    assert torch.allclose(g.node_scores, g.scores.sum(1))
    import json

    json.dumps(c.summary())
    # round trips: JSON and safetensors
    for back in (Graph.from_json(c.to_json()), Graph.from_json(c.to_json(tmp_path / "g.json"))):
        assert torch.equal(back.scores, c.scores) and torch.equal(back.in_circuit, c.in_circuit)
    c.save(tmp_path / "g.safetensors")
    back = Graph.load(tmp_path / "g.safetensors")
    assert back.shape == c.shape and torch.equal(back.scores, c.scores) and torch.equal(back.in_circuit, c.in_circuit)


def test_empty_circuits_raise():
    g = Graph(GraphShape(1, 2, 2, attn_only=True), torch.ones(3, 7))
    with pytest.raises(EmptyCircuitError, match="k >= 1"):
        g.top_k_edges(0)
    with pytest.raises(EmptyCircuitError, match="lower the threshold"):
        g.threshold(2.0)
    with pytest.raises(EmptyCircuitError, match="path input -> logits"):
        g.with_edges(["input->a0.h0<q>"], prune=True)  # a0.h0 -> logits missing
    with pytest.raises(EmptyCircuitError, match="top_k_edges"):
        g.n_nodes, g.node_mask  # noqa: B018 -- no circuit selected


# ----------------------------------------------------------------------------- per-input gradients


def _reference_input_grad(model: HookedTransformer, tokens: torch.Tensor, name: str) -> torch.Tensor:
    """dm/d(input of `name`) [B, T, D] by autograd: that input alone is recomputed from a leaf copy of
    the residual (same value, so the forward pass is unchanged) and the gradient is taken at the leaf."""
    c = model.cfg
    leaf: dict[str, torch.Tensor] = {}

    def grab(x, hook):
        leaf["x"] = x.detach().clone().requires_grad_(True)

    if name == "logits":
        last = f"blocks.{c.n_layers - 1}.hook_resid_post"
        hooks = [(last, grab), (last, lambda x, hook: leaf["x"])]
    elif name.startswith("m"):
        layer = int(name[1:])
        block = model.blocks[layer]
        src = f"blocks.{layer}.hook_resid_{'pre' if c.parallel_attn_mlp else 'mid'}"

        def mlp_in(y, hook):  # torch's own norms: independent of the code under test
            x = leaf["x"]
            if block.ln2.kind == "LN":
                return F.layer_norm(x, (c.d_model,), block.ln2.w, block.ln2.b, block.ln2.eps)
            return F.rms_norm(x, (c.d_model,), block.ln2.w, block.ln2.eps)

        hooks = [(src, grab), (f"blocks.{layer}.ln2.hook_normalized", mlp_in)]
    else:
        layer, kind, idx, letter = re.fullmatch(r"a(\d+)\.(h|kv)(\d+)<([qkv])>", name).groups()
        layer, idx = int(layer), int(idx)
        attn = model.blocks[layer].attn
        W = {"q": attn.W_Q, "k": attn.W_K, "v": attn.W_V}[letter][idx]  # [D, E]
        b = {"q": attn.b_Q, "k": attn.b_K, "v": attn.b_V}[letter][idx]

        def one_head(x, hook):
            x = x.clone()
            x[:, :, idx] = model.blocks[layer].ln1(leaf["x"]) @ W + b
            return x

        hooks = [(f"blocks.{layer}.hook_resid_pre", grab), (f"blocks.{layer}.attn.hook_{letter}", one_head)]
    value = _metric(model.run_with_hooks(tokens, fwd_hooks=hooks))
    (g,) = torch.autograd.grad(value, leaf["x"])
    return g


@pytest.mark.parametrize("kind", ["llama", "gpt2", "neox", "attn_only"])
def test_per_input_gradients_match_autograd(models, kind):
    model = models[kind]
    clean, _ = _prompts(model)
    grads, _ = _input_gradients(model, clean, None, _metric)  # [B, T, V, D]
    names = Graph.from_model(model).downstream
    assert grads.shape == (*clean.shape, len(names), model.cfg.d_model)
    for j, name in enumerate(names):
        ref = _reference_input_grad(model, clean, name)
        assert ref.abs().max() > 0, name
        torch.testing.assert_close(grads[:, :, j], ref, atol=2e-6 * float(ref.abs().max()) + 1e-7, rtol=1e-4,
                                   msg=lambda m, name=name: f"{kind} {name}: {m}")


# ----------------------------------------------------------------------------- node-level attribution patching


def test_attribution_patching_matches_finite_differences(models):
    model = models["llama"]
    clean, corrupted = _prompts(model)
    c = model.cfg
    with torch.no_grad():
        _, cc = model.run_with_cache(clean, names_filter="blocks.*.attn.hook_z")
        _, xc = model.run_with_cache(corrupted, names_filter="blocks.*.attn.hook_z")
    attr = attribution_patching(model, clean, corrupted, _metric, hook="z", granularity="head", delta=True)
    assert attr.shape == (c.n_layers, c.n_heads)
    eps = 1e-2  # central differences along the denoising direction of one head's z

    def patched(layer: int, head: int, t: float) -> float:
        def fn(z, hook):
            z = z.clone()
            d = cc[f"blocks.{layer}.attn.hook_z"][:, :, head] - xc[f"blocks.{layer}.attn.hook_z"][:, :, head]
            z[:, :, head] = z[:, :, head] + t * d
            return z

        with torch.no_grad():
            return float(_metric(model.run_with_hooks(corrupted, fwd_hooks=[(f"blocks.{layer}.attn.hook_z", fn)])))

    fd = torch.tensor([[(patched(la, h, eps) - patched(la, h, -eps)) / (2 * eps) for h in range(c.n_heads)]
                       for la in range(c.n_layers)])
    torch.testing.assert_close(attr, fd, atol=2e-3 * float(fd.abs().max()), rtol=1e-2)
    # without delta=True: the estimated metric after the patch, like activation_patching returns
    with torch.no_grad():
        m_corr = float(_metric(model(corrupted)))
    est = attribution_patching(model, clean, corrupted, _metric, hook="z", granularity="head")
    torch.testing.assert_close(est, attr + m_corr)
    # the other granularities are sums of the same elementwise products, laid out as activation_patching's
    T = clean.shape[1]
    by_pos = attribution_patching(model, clean, corrupted, _metric, hook="z", granularity="head_position", delta=True)
    assert by_pos.shape == (c.n_layers, c.n_heads, T)
    torch.testing.assert_close(by_pos.sum(2), attr)
    layer = attribution_patching(model, clean, corrupted, _metric, hook="z", granularity="layer", delta=True)
    torch.testing.assert_close(layer, attr.sum(1))
    pos = attribution_patching(model, clean, corrupted, _metric, hook="resid_pre", granularity="position")
    assert pos.shape == (c.n_layers, T)
    kv = attribution_patching(model, clean, corrupted, _metric, hook="k", granularity="head", layers=[1])
    assert kv.shape == (1, c.n_kv_heads)
    assert attribution_patching(model, clean, corrupted, _metric, hook="mlp_out", granularity="neuron").shape == \
        (c.n_layers, c.d_model)
    assert attribution_patching(model, clean, corrupted, _metric, hook="pattern", granularity="head_position").shape \
        == (c.n_layers, c.n_heads, T)
    per_prompt = attribution_patching(model, clean, corrupted, lambda lg: lg[:, -1, 5] - lg[:, -1, 7], hook="z",
                                      granularity="head", delta=True)  # [L, H, B], rows are independent
    assert per_prompt.shape == (c.n_layers, c.n_heads, clean.shape[0])
    torch.testing.assert_close(per_prompt.mean(-1), attr, atol=1e-6, rtol=1e-5)
    with pytest.raises(InputError, match="head dimension"):
        attribution_patching(model, clean, corrupted, _metric, hook="resid_pre", granularity="head")
    with pytest.raises(HookNameError):
        attribution_patching(model, clean, corrupted, _metric, hook="nonsense")


def test_attribution_patching_is_exact_when_the_metric_is_linear():
    """Without a final norm the logits are linear in the last resid_post: there the estimate is exact."""
    model = _native(4, normalization="RMS", positional="rotary", final_norm=False, gated_mlp=True, act_fn="silu")
    clean, corrupted = _prompts(model)
    last = model.cfg.n_layers - 1
    est = attribution_patching(model, clean, corrupted, _metric, hook="resid_post", granularity="position")
    with torch.no_grad():
        m_clean, m_corr = float(_metric(model(clean))), float(_metric(model(corrupted)))
    assert float((est[last, :-1] - m_corr).abs().max()) < 1e-6  # other positions are not read
    torch.testing.assert_close(est[last, -1], torch.tensor(m_clean), atol=1e-5, rtol=1e-5)  # patching it = clean
    # ... and equals activation patching itself wherever the model is linear in the patched activation
    for direction in ("denoise", "noise"):
        for normalize in (False, True):
            kw = dict(hook="resid_post", granularity="position", direction=direction, normalize=normalize, layers=[last])
            torch.testing.assert_close(attribution_patching(model, clean, corrupted, _metric, **kw),
                                       activation_patching(model, clean, corrupted, _metric, **kw),
                                       atol=1e-5, rtol=1e-5)


# ----------------------------------------------------------------------------- EAP / EAP-IG


@pytest.mark.parametrize("kind", ["llama", "neox"])
def test_edge_scores_sum_to_node_attribution(models, kind):
    """A node's output enters the residual once: its outgoing edge scores add up to its node-level
    attribution, computed here from gradients at the node outputs themselves (hook_result, hook_mlp_out)."""
    model = models[kind]
    clean, corrupted = _prompts(model)
    g = edge_attribution(model, clean, corrupted, _metric, method="eap")
    kw = dict(direction="noise", delta=True)
    heads = attribution_patching(model, clean, corrupted, _metric, hook="result", granularity="head", **kw)  # [L, H]
    mlps = attribution_patching(model, clean, corrupted, _metric, hook="mlp_out", granularity="layer", **kw)  # [L]
    emb = attribution_patching(model, clean, corrupted, _metric, hook="resid_pre", granularity="layer", **kw)[0]
    ns = g.node_scores
    tol = dict(atol=1e-5 * float(ns.abs().max()), rtol=1e-4)
    torch.testing.assert_close(g.head_scores(), heads, **tol)
    torch.testing.assert_close(g.mlp_scores(), mlps, **tol)
    torch.testing.assert_close(ns[0], emb, **tol)
    # and each edge score is the activation difference dotted with that input's own gradient
    a_clean, _ = _node_outputs(model, clean, None)
    a_corr, _ = _node_outputs(model, corrupted, None)
    grads, _ = _input_gradients(model, clean, None, _metric)
    u, v = g.edge_index("a0.h1->m1" if kind == "llama" else "a0.h3->a1.kv1<v>")
    ref = ((a_corr[:, :, u] - a_clean[:, :, u]) * grads[:, :, v]).sum()
    torch.testing.assert_close(g.scores[u, v], ref, atol=1e-6, rtol=1e-4)
    assert g.meta["method"] == "eap" and g.meta["metric_clean"] == pytest.approx(float(_metric(model(clean).detach())), abs=1e-6)


def test_eap_ig_one_step_is_eap_and_integrates_to_the_metric_change(models):
    model = models["llama"]
    clean, corrupted = _prompts(model, seed=3)
    eap = edge_attribution(model, clean, corrupted, _metric, method="eap")
    ig1 = edge_attribution(model, clean, corrupted, _metric, method="eap-ig", steps=1)
    torch.testing.assert_close(ig1.scores, eap.scores)
    # IG completeness: the input node's score integrates dm along the path corrupted -> clean embeddings
    ig = edge_attribution(model, clean, corrupted, _metric, method="eap-ig", steps=64)
    change = ig.meta["metric_corrupted"] - ig.meta["metric_clean"]
    assert abs(ig.node_score("input") - change) < 0.03 * abs(change)
    assert abs(eap.node_score("input") - change) > abs(ig.node_score("input") - change)
    cc = edge_attribution(model, clean, corrupted, _metric, method="eap-ig", ig="clean-corrupted")
    assert cc.meta["steps"] == 2
    with pytest.raises(InputError, match="steps"):
        edge_attribution(model, clean, corrupted, _metric, method="eap-ig", steps=0)


def test_denoise_direction_text_input_and_per_prompt_metrics(models):
    model = models["llama"]
    clean, corrupted = _prompts(model)
    noise = edge_attribution(model, corrupted, clean, _metric, method="eap-ig", steps=2)
    denoise = edge_attribution(model, clean, corrupted, _metric, method="eap-ig", steps=2, direction="denoise")
    torch.testing.assert_close(denoise.scores, noise.scores)  # the same computation, runs swapped
    assert denoise.meta["metric_clean"] == noise.meta["metric_corrupted"] and denoise.meta["direction"] == "denoise"
    per_prompt = edge_attribution(model, clean, corrupted, lambda lg: lg[:, -1, 5] - lg[:, -1, 7], method="eap")
    torch.testing.assert_close(per_prompt.scores, edge_attribution(model, clean, corrupted, _metric, method="eap").scores)
    texts = ["the cat sat on the mat", "the dog ran to the house"]
    corr = ["a dog sat on the mat", "a cat ran to the house"]
    g = edge_attribution(model, texts, corr, _metric, method="eap")
    toks = model.to_tokens(texts)
    assert g.meta["n_positions"] == toks.shape[1]
    torch.testing.assert_close(g.scores, edge_attribution(model, toks, model.to_tokens(corr), _metric, method="eap").scores)


def test_bad_inputs(models):
    model = models["llama"]
    clean, corrupted = _prompts(model)
    with pytest.raises(PromptMismatchError):
        edge_attribution(model, clean, corrupted[:, :-1], _metric)
    with pytest.raises(MetricError):
        edge_attribution(model, clean, corrupted, lambda lg: lg[:, -1])
    with pytest.raises(MetricError):
        edge_attribution(model, clean, corrupted, lambda lg: float(lg.sum()))
    g = Graph.from_model(model)
    with pytest.raises(EmptyCircuitError, match="top_k_edges"):
        faithfulness(model, g, clean, corrupted, _metric)  # no circuit selected
    with pytest.raises(InputError, match="another model shape"):
        faithfulness(model, Graph(GraphShape(1, 2, 2)).full_circuit(), clean, corrupted, _metric)
    with pytest.raises(InputError, match="at least 2 prompts"):
        faithfulness(model, g.full_circuit(), clean[:1], corrupted[:1], _metric, ablation="mean")
    with pytest.raises(InputError, match="ablation"):
        faithfulness(model, g.full_circuit(), clean, corrupted, _metric, ablation="noise")


# ----------------------------------------------------------------------------- exact edge ablation


@pytest.mark.parametrize("kind", ["llama", "gpt2", "neox", "attn_only"])
def test_edge_ablation_identities(models, kind):
    model = models[kind]
    clean, corrupted = _prompts(model)
    g = Graph.from_model(model)
    real = g.real
    with torch.no_grad():
        full, corr = model(clean), model(corrupted)
    a_clean, _ = _node_outputs(model, clean, None)
    a_corr, _ = _node_outputs(model, corrupted, None)
    zero = torch.zeros_like(a_clean[:1])
    # nothing removed: the model itself
    for abl in (a_corr, zero):
        torch.testing.assert_close(run_with_edges(model, clean, real, abl), full, atol=2e-5, rtol=1e-4)
    # everything removed, resample: every input sees only corrupted outputs = the corrupted run
    torch.testing.assert_close(run_with_edges(model, clean, torch.zeros_like(real), a_corr), corr,
                               atol=2e-5, rtol=1e-4)
    st = g._s
    H = model.cfg.n_heads

    def act_patch(fwd_hooks):
        with torch.no_grad():
            return model.run_with_hooks(clean, fwd_hooks=fwd_hooks)

    # all edges out of one head removed == activation patching that head's output
    u = int(st.head_up[0, 1])
    keep = real.clone()
    keep[u] = False

    def patch_head(r, hook):
        r = r.clone()
        r[:, :, 1] = a_corr[:, :, u]
        return r

    torch.testing.assert_close(run_with_edges(model, clean, keep, a_corr),
                               act_patch([("blocks.0.attn.hook_result", patch_head)]), atol=2e-5, rtol=1e-4)
    # all edges out of an MLP removed (zero) == zeroing hook_mlp_out
    if not model.cfg.attn_only:
        u = int(st.mlp_up[0])
        keep = real.clone()
        keep[u] = False
        torch.testing.assert_close(run_with_edges(model, clean, keep, zero),
                                   act_patch([("blocks.0.hook_mlp_out", lambda x, hook: torch.zeros_like(x))]),
                                   atol=2e-5, rtol=1e-4)
    # one edge into the logits: the final residual loses that node's (clean - corrupted) output
    last = f"blocks.{model.cfg.n_layers - 1}.hook_resid_post"
    u, v = g.edge_index(("a0.h2", "logits"))
    keep = real.clone()
    keep[u, v] = False
    ref = act_patch([(last, lambda x, hook: x - a_clean[:, :, u] + a_corr[:, :, u])])
    torch.testing.assert_close(run_with_edges(model, clean, keep, a_corr), ref, atol=2e-5, rtol=1e-4)
    # one edge into a key input (a kv group under GQA): only that projection sees the patched residual
    kname = "a1.kv1<k>" if g.shape.gqa else "a1.h1<k>"
    u, v = g.edge_index(("a0.h3", kname))
    keep = real.clone()
    keep[u, v] = False
    block = model.blocks[1]
    saved = {}

    def grab(x, hook):
        saved["x"] = x

    def key(k, hook):
        k = k.clone()
        k[:, :, 1] = block.ln1(saved["x"] - a_clean[:, :, u] + a_corr[:, :, u]) @ block.attn.W_K[1] + block.attn.b_K[1]
        return k

    ref = act_patch([("blocks.1.hook_resid_pre", grab), ("blocks.1.attn.hook_k", key)])
    out = run_with_edges(model, clean, keep, a_corr)
    torch.testing.assert_close(out, ref, atol=2e-5, rtol=1e-4)
    assert (out - full).abs().max() > 1e-4  # the edge mattered
    # an edge from a node whose own inputs are ablated carries its NEW output: removing input -> a0.h*<q> for all
    # layer-0 queries and nothing else equals patching layer 0's queries from corrupted embeddings
    keep = real.clone()
    q0 = [g.downstream.index(f"a0.h{h}<q>") for h in range(H)]
    keep[0, q0] = False

    def q_from_corrupted(q, hook):
        attn = model.blocks[0].attn
        return torch.einsum("btd,hde->bthe", model.blocks[0].ln1(a_corr[:, :, 0]), attn.W_Q) + attn.b_Q

    torch.testing.assert_close(run_with_edges(model, clean, keep, a_corr),
                               act_patch([("blocks.0.attn.hook_q", q_from_corrupted)]), atol=2e-5, rtol=1e-4)


def test_faithfulness_of_the_full_circuit_and_of_a_small_one(models):
    model = models["llama"]
    clean, corrupted = _prompts(model, B=4)
    g = edge_attribution(model, clean, corrupted, _metric, method="eap-ig", steps=3)
    res = evaluate_circuit(model, g.full_circuit(), clean, corrupted, _metric)
    assert set(res.results) == set(ABLATIONS) and res.n_edges == g.n_real_edges
    with torch.no_grad():
        m_full, m_corr = float(_metric(model(clean))), float(_metric(model(corrupted)))
    for r in res.results.values():
        assert r.metric_full == pytest.approx(m_full, abs=1e-6)
        assert r.faithfulness == pytest.approx(1.0, abs=1e-4) and r.faithfulness_normalized == pytest.approx(1.0, abs=1e-4)
        assert r.metric_complement == pytest.approx(r.metric_ablated, abs=1e-6)  # the complement is empty
        assert r.completeness_normalized == pytest.approx(0.0, abs=1e-4)
    assert res.results["resample"].metric_ablated == pytest.approx(m_corr, abs=1e-5)
    assert res.results["zero"].metric_ablated == pytest.approx(0.0, abs=1e-6)  # no biases: zero logits
    assert "resample" in res.table() and res.to_dict()["n_edges"] == res.n_edges
    # a proper circuit: circuit + complement are consistent with the explicit masks
    circ = g.top_k_edges(20)
    r = faithfulness(model, circ, clean, corrupted, _metric, ablation="resample")
    a_corr, _ = _node_outputs(model, corrupted, None)
    m_c = float(_metric(run_with_edges(model, clean, circ.in_circuit, a_corr)))
    m_k = float(_metric(run_with_edges(model, clean, g.real & ~circ.in_circuit, a_corr)))
    assert r.metric_circuit == pytest.approx(m_c, abs=1e-6) and r.metric_complement == pytest.approx(m_k, abs=1e-6)
    assert r.faithfulness_normalized == pytest.approx((m_c - m_corr) / (m_full - m_corr), rel=1e-4)
    curve = faithfulness_curve(model, g, clean, corrupted, _metric, ks=[20, g.n_real_edges])
    assert curve[0]["metric"] == pytest.approx(m_c, abs=1e-6)
    assert curve[1]["faithfulness_normalized"] == pytest.approx(1.0, abs=1e-4)


# ----------------------------------------------------------------------------- the induction model


def _spearman(a: torch.Tensor, b: torch.Tensor) -> float:
    ra, rb = a.argsort().argsort().double(), b.argsort().argsort().double()
    ra, rb = ra - ra.mean(), rb - rb.mean()
    return float((ra * rb).sum() / (ra.norm() * rb.norm()))


@pytest.mark.slow
def test_induction_circuit(induction_2l_folder):
    from mechscope import zoo
    from mechscope.zoo.induction import induction_score, prev_token_score

    model = zoo.load(induction_2l_folder)
    g = torch.Generator().manual_seed(1)
    B, n = 8, 12
    r = torch.randint(1, model.cfg.d_vocab, (B, n), generator=g)
    fresh = torch.randint(1, model.cfg.d_vocab, (B, n), generator=g)
    bos = torch.zeros(B, 1, dtype=torch.long)  # the zoo tokenizer's BOS is id 0
    clean, corrupted = torch.cat([bos, r, r], 1), torch.cat([bos, fresh, r], 1)  # only clean allows induction
    pos = torch.arange(n + 1, 2 * n)

    def metric(logits):  # mean log-prob of the induced next token over the second copy
        return logits[:, pos].float().log_softmax(-1).gather(-1, r[:, 1:, None]).mean()

    eap = edge_attribution(model, clean, corrupted, metric, method="eap")
    ig = edge_attribution(model, clean, corrupted, metric, method="eap-ig", steps=5)
    # node level: noising activation patching of each head, one forward pass per head
    a_clean, clean_logits = _node_outputs(model, clean, None)
    a_corr, _ = _node_outputs(model, corrupted, None)
    base = float(metric(clean_logits))
    st = ig._s
    L, H = model.cfg.n_layers, model.cfg.n_heads
    act = torch.zeros(L, H)
    for la in range(L):
        for h in range(H):
            def patch(x, hook, h=h, u=int(st.head_up[la, h])):
                x = x.clone()
                x[:, :, h] = a_corr[:, :, u]
                return x

            with torch.no_grad():
                logits = model.run_with_hooks(clean, fwd_hooks=[(f"blocks.{la}.attn.hook_result", patch)])
            act[la, h] = float(metric(logits)) - base
    rho_ig = _spearman(ig.head_scores().flatten(), act.flatten())
    rho_eap = _spearman(eap.head_scores().flatten(), act.flatten())
    # 8 heads: one swapped neighbour pair is 0.976. Measured EAP-IG 0.976-1.0, EAP 0.81-0.976 on the three
    # Zen 1 builds named below (it held on Zen 4 too), so a tie at the top is possible: IG is at least as good.
    assert rho_ig > 0.9 and rho_ig >= rho_eap, (rho_ig, rho_eap)
    # edge level: exact single-edge resample ablation of every edge
    real = ig.real
    exact = torch.zeros_like(ig.scores)
    for i, j in real.nonzero().tolist():
        keep = real.clone()
        keep[i, j] = False
        exact[i, j] = float(metric(run_with_edges(model, clean, keep, a_corr))) - base
    exact, big = exact[real], exact[real].abs() > 0.1  # the edges that matter (14 of 81 here)
    k = int(big.sum())
    assert k >= 8
    stats = {}
    for name, graph in (("ig", ig), ("eap", eap)):
        s = graph.scores[real]
        top = set(s.abs().topk(k).indices.tolist())
        stats[name] = (_spearman(s[big], exact[big]), len(top & set(exact.abs().topk(k).indices.tolist())) / k)
    # Rank correlation over the k edges that matter, against chance: the 99th percentile of a random
    # ranking's (0.58-0.59 here). The trained weights, and with them this correlation, move with
    # the CPU's float rounding: measured 0.85 (AMD Zen 1), 0.81 and 0.77 (Zen 1 with ATen's generic
    # kernels / MKL's compatible code path, which round like other CPUs), 0.79 (Zen 4). 0.65 leaves a
    # margin of 0.12 under the lowest. EAP's correlation lies in the same range (0.55-0.82), so which of
    # the two ranks these 14 edges better is noise; EAP-IG's advantage shows in the top-k edges below.
    g0 = torch.Generator().manual_seed(0)
    chance = torch.tensor([_spearman(torch.randn(k, generator=g0), exact[big]) for _ in range(1000)]).quantile(0.99)
    assert stats["ig"][0] > max(0.65, float(chance)), (stats, float(chance))
    # the same top-k edges as exact ablation: EAP-IG 1.0 on the three Zen 1 builds above, EAP 0.64-0.79
    assert stats["ig"][1] >= 0.85 and stats["ig"][1] > stats["eap"][1] + 0.1, stats
    # the circuit: the previous-token head (layer 0) feeds the keys of an induction head (layer 1)
    prev, ind = prev_token_score(model), induction_score(model)
    heads = ig.head_scores()  # [L, H]
    assert int(heads[0].abs().argmax()) == int(prev[0].argmax())
    assert float(ind[1, int(heads[1].abs().argmax())]) > 0.5
    p = int(prev[0].argmax())
    out_of_prev = [(e, s) for e, s in ig.top_edges(ig.n_real_edges) if e.startswith(f"a0.h{p}->")]
    dst = re.fullmatch(rf"a0\.h{p}->a1\.h(\d)<k>", out_of_prev[0][0])
    assert dst is not None and float(ind[1, int(dst.group(1))]) > 0.5, out_of_prev[:3]
    # a small circuit keeps most of the effect under resample ablation
    res = evaluate_circuit(model, ig.top_k_edges(16), clean, corrupted, metric)  # 13 edges after pruning
    assert res.n_edges <= 16 and res.results["resample"].faithfulness_normalized > 0.85, res.table()
    assert abs(res.results["resample"].completeness_normalized) < 0.1, res.table()  # nothing left without it
