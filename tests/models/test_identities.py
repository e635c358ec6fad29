"""Residual-stream identities hold for every family (TransformerLens's most common complaint is
that they silently do not): resid_mid = resid_pre + attn_out, resid_post = resid_mid + mlp_out,
resid_pre[l+1] = resid_post[l], attn_out = sum of per-head results + b_O, and the logits are
ln_final's output through W_U."""

from __future__ import annotations

import pytest
import torch
import transformers as tf

from mechscope.models.loading import from_hf

from parity import randomize_

SMALL = dict(hidden_size=64, num_attention_heads=4, num_hidden_layers=2, intermediate_size=96, vocab_size=64,
             max_position_embeddings=64)
FAMILIES = {
    "gpt2": lambda: tf.GPT2LMHeadModel(tf.GPT2Config(n_layer=2, n_embd=64, n_head=4, vocab_size=64, n_positions=64)),
    "neox": lambda: tf.GPTNeoXForCausalLM(tf.GPTNeoXConfig(**SMALL)),
    "llama": lambda: tf.LlamaForCausalLM(tf.LlamaConfig(**SMALL, num_key_value_heads=2)),
    "qwen2": lambda: tf.Qwen2ForCausalLM(tf.Qwen2Config(**SMALL, num_key_value_heads=2)),
    "qwen3": lambda: tf.Qwen3ForCausalLM(tf.Qwen3Config(**SMALL, num_key_value_heads=2, head_dim=16)),
    "gemma": lambda: tf.GemmaForCausalLM(tf.GemmaConfig(**SMALL, num_key_value_heads=1, head_dim=16)),
    "gemma2": lambda: tf.Gemma2ForCausalLM(tf.Gemma2Config(**SMALL, num_key_value_heads=2, head_dim=16,
                                                           sliding_window=4)),
    "gemma3": lambda: tf.Gemma3ForCausalLM(tf.Gemma3TextConfig(**SMALL, num_key_value_heads=2, head_dim=16,
                                                               sliding_window=4)),
    "bert": lambda: tf.BertForMaskedLM(tf.BertConfig(**SMALL)),
}


@pytest.fixture(scope="module", params=list(FAMILIES))
def model(request):
    torch.manual_seed(0)
    hf = FAMILIES[request.param]().eval()
    randomize_(hf, std=0.05)
    return from_hf(hf)


def test_identities(model):
    c = model.cfg
    tokens = torch.randint(0, 64, (2, 10), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        logits, cache = model.run_with_cache(tokens)
    tol = dict(atol=1e-5, rtol=1e-5)
    for l in range(c.n_layers):
        pre, post = cache["resid_pre", l], cache["resid_post", l]
        attn_out, mlp_out = cache["attn_out", l], cache["mlp_out", l]
        if c.parallel_attn_mlp:
            torch.testing.assert_close(post, pre + attn_out + mlp_out, **tol)
        else:
            mid = cache["resid_mid", l]
            torch.testing.assert_close(mid, pre + attn_out, **tol)
            # BERT is post-LN: the MLP adds to ln1(resid_mid), not to resid_mid
            into_mlp = cache["normalized", l, "ln1"] if c.post_layernorm else mid
            torch.testing.assert_close(post, into_mlp + mlp_out, **tol)
        if l + 1 < c.n_layers:
            out = cache[f"blocks.{l}.hook_normalized_resid_post"] if c.post_layernorm else post
            torch.testing.assert_close(cache["resid_pre", l + 1], out, **tol)
        if not c.post_attn_norm:  # Gemma 2/3 normalise the attention output before adding it
            attn = model.blocks[l].attn
            heads = cache["result", l, "attn"].sum(2) + attn.b_O
            torch.testing.assert_close(heads, attn_out, **tol)
            z = cache["z", l, "attn"]  # [B, T, H, E] -> attn_out through W_O [H, E, D]
            torch.testing.assert_close(torch.einsum("bthe,hed->btd", z, attn.W_O) + attn.b_O, attn_out, **tol)
    final = cache["ln_final.hook_normalized"] if c.final_norm else cache[f"blocks.{c.n_layers - 1}.hook_normalized_resid_post"]
    if c.mlm_head:
        final = model.mlm_head(final)
    recon = final @ model.W_U + model.b_U
    if c.final_softcap is not None:
        recon = torch.tanh(recon / c.final_softcap) * c.final_softcap
    torch.testing.assert_close(recon, logits, **tol)
    torch.testing.assert_close(cache["hook_unembed"], logits)


def test_every_hook_point_fires_once_and_its_edit_matters(model):
    """No hook point of any family silently never fires, fires twice, or is ignored when edited."""
    tokens = torch.randint(0, 64, (2, 10), generator=torch.Generator().manual_seed(1))
    ret = "logits" if model.cfg.has_unembed else "resid"
    with torch.no_grad():
        base = model(tokens, return_type=ret)
        for name in model.hook_names:
            calls = []

            def edit(x, hook, calls=calls):  # elementwise, non-uniform: norms cannot undo it
                calls.append(tuple(x.shape))
                return x * (1 + 0.5 * torch.rand(x.shape, generator=torch.Generator().manual_seed(0)))

            out = model.run_with_hooks(tokens, return_type=ret, fwd_hooks=[(name, edit)])
            assert len(calls) == 1, f"{name} fired {len(calls)} times"
            assert calls[0][0] == 2, f"{name}: batch dim missing in {calls[0]}"
            assert (out - base).abs().max() > 1e-4, f"{name}: editing it changed nothing"
