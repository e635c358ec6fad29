"""The neuron baseline: a SparseCoder whose latents are MLP neurons, checked against the model itself."""

from __future__ import annotations

import pytest
import torch
from tests.conftest import make_tiny_lm

from mechscope import HookedTransformer, ModelConfig
from mechscope.data.packing import contexts
from mechscope.errors import InputError
from mechscope.features import feature_stats, logit_effects
from mechscope.features.neurons import neuron_coder
from mechscope.sae import SparseCoder

pytestmark = pytest.mark.usefixtures("one_thread")

LAYER, T, N_CTX, SEED = 1, 24, 10, 2
KW = dict(tokens=T * N_CTX, context_len=T, batch_size=4, top_k=4, n_quantiles=2, hist_bins=8, seed=SEED,
          progress=False)
POST, OUT = f"blocks.{LAYER}.mlp.hook_post", f"blocks.{LAYER}.hook_mlp_out"


@pytest.fixture(scope="module")
def model():
    return make_tiny_lm(0, 2)


@pytest.fixture(scope="module")
def naive_post(model):
    """hook_post [N_CTX, T, d_mlp] over the same contexts feature_stats reads, and the BOS mask [N_CTX, T]."""
    stream = contexts("sotu", model.tokenizer, T, seed=SEED)
    rows = next(iter(stream.batches(N_CTX)))
    with torch.no_grad():
        _, cache = model.run_with_cache(rows, names_filter=POST)
    return cache[POST].float(), rows == stream.bos_token_id


def test_weights_and_config(model):
    c = neuron_coder(model, LAYER)
    d_mlp, d_model = model.cfg.d_mlp, model.cfg.d_model
    assert isinstance(c, SparseCoder) and c.cfg.arch == "relu" and c.cfg.k is None
    assert torch.equal(c.W_enc, torch.eye(d_mlp)) and (c.b_enc == 0).all()
    assert torch.equal(c.W_dec, model.blocks[LAYER].mlp.W_out.detach().float())
    assert c.W_dec.shape == (d_mlp, d_model) and (c.b_dec == 0).all()  # this model's MLP has no bias
    assert c.cfg.is_transcoder and not c.cfg.apply_b_dec_to_input
    assert (c.cfg.hook_in, c.cfg.hook_out, c.cfg.d_in, c.cfg.out_dim) == (POST, OUT, d_mlp, d_model)
    assert c.cfg.extra == {"baseline": "mlp_neurons", "layer": LAYER, "exact_decode": True}
    assert c.cfg.model_identity["name"] == model.cfg.model_name
    k = neuron_coder(model, 0, k=8)
    assert k.cfg.arch == "topk" and k.cfg.k == 8 and k.cfg.hook_in == "blocks.0.mlp.hook_post"


@pytest.mark.parametrize("gated", [True, False])
def test_decoding_the_raw_neurons_gives_mlp_out(gated):
    """decode(hook_post) == hook_mlp_out: W_dec = W_out and b_dec = the MLP's output bias (when it has one)."""
    cfg = ModelConfig(d_model=16, n_layers=2, n_heads=2, d_head=8, d_mlp=40, d_vocab=50, n_ctx=16,
                      normalization="LN", positional="learned", gated_mlp=gated, act_fn="gelu", mlp_bias=not gated,
                      model_name="tiny-bias")
    m = HookedTransformer(cfg).init_weights(3, std=0.2)
    if not gated:
        with torch.no_grad():
            m.blocks[LAYER].mlp.down.bias.normal_(generator=torch.Generator().manual_seed(1))
    c = neuron_coder(m, LAYER)
    if not gated:
        assert torch.equal(c.b_dec, m.blocks[LAYER].mlp.down.bias.detach()) and c.b_dec.abs().sum() > 0
    tokens = torch.randint(0, 50, (2, 9), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        _, cache = m.run_with_cache(tokens, names_filter=[POST, OUT])
        post = cache[POST]  # [2, 9, 40], signed
        assert (post < 0).any()
        torch.testing.assert_close(c.decode(post), cache[OUT], atol=1e-5, rtol=1e-5)
        # encode keeps exactly the positive neurons, unchanged (identity encoder, zero bias)
        assert torch.equal(c.encode(post), post.clamp(min=0))


def test_feature_stats_dense_neurons(model, naive_post):
    post, bos = naive_post
    c = neuron_coder(model, LAYER)
    st = feature_stats(model, c, "sotu", **KW)
    fired = (post > 0) & ~bos[..., None]  # [N_CTX, T, d_mlp]
    assert st.n_tokens == int((~bos).sum())
    assert torch.equal(st.count, fired.flatten(0, 1).sum(0))
    torch.testing.assert_close(st.act_max, post.clamp(min=0).masked_fill(bos[..., None], 0).amax((0, 1)))
    # dense: a typical neuron fires on a large share of tokens (the reason for the top-k baseline)
    assert 0.2 < float(st.density.mean()) < 0.8
    # logit effects = each neuron's direct effect: W_out rows through the final RMSNorm weight and W_U
    eff = (model.blocks[LAYER].mlp.W_out.detach() * model.ln_final.w.detach()) @ model.W_U.detach()
    torch.testing.assert_close(logit_effects(model, c), eff)
    assert torch.equal(st.logit_top_ids, eff.topk(10, dim=-1).indices)


def test_feature_stats_top_k_neurons(model, naive_post):
    post, bos = naive_post
    k = 6
    c = neuron_coder(model, LAYER, k=k)
    with torch.no_grad():
        acts = c.encode(post)  # [N_CTX, T, d_mlp]
    # per token: exactly min(k, positive neurons) fire, and they are the largest ones, unchanged
    want = (post > 0).sum(-1).clamp(max=k)
    assert torch.equal((acts > 0).sum(-1), want) and (want == k).all()
    kth = post.topk(k, dim=-1).values[..., -1:]  # [N_CTX, T, 1]
    assert torch.equal(acts > 0, (post >= kth) & (post > 0))
    assert torch.equal(acts[acts > 0], post[acts > 0])
    st = feature_stats(model, c, "sotu", **KW)
    naive = (acts > 0) & ~bos[..., None]
    assert torch.equal(st.count, naive.flatten(0, 1).sum(0))
    assert int(st.count.sum()) == k * st.n_tokens  # the same L0 as a TopK SAE with this k
    dense = feature_stats(model, neuron_coder(model, LAYER), "sotu", **{**KW, "features": [0, 1, 2]})
    assert (st.count[:3] <= dense.count).all() and float(st.density.mean()) == pytest.approx(k / model.cfg.d_mlp)


def test_errors(model):
    for bad in (-1, 2, "1", True):
        with pytest.raises(InputError, match="layer"):
            neuron_coder(model, bad)
    for bad in (0, 65, 2.0):
        with pytest.raises(InputError, match="k must be"):
            neuron_coder(model, 0, k=bad)
    cfg = ModelConfig(d_model=16, n_layers=1, n_heads=2, d_head=8, d_mlp=0, d_vocab=50, n_ctx=16,
                      attn_only=True, model_name="attn-only")
    with pytest.raises(InputError, match="attention-only"):
        neuron_coder(HookedTransformer(cfg), 0)
