"""The staged forward (prepare -> run_state -> embed_tokens -> run_blocks -> head) equals forward for every
family, with padding, GQA, sliding windows, soft-capping, parallel residuals and BERT."""

from __future__ import annotations

import pytest
import torch
import transformers as tf

from mechscope import HookedTransformer
from mechscope.errors import InputError

from parity import padded_batch, randomize_

V = 96
BASE = dict(vocab_size=V, hidden_size=48, intermediate_size=80, num_hidden_layers=4, num_attention_heads=4,
            max_position_embeddings=64)
FAMILIES = {
    "gpt2": lambda: tf.GPT2LMHeadModel(tf.GPT2Config(vocab_size=V, n_embd=48, n_layer=4, n_head=4, n_positions=64)),
    "neox": lambda: tf.GPTNeoXForCausalLM(tf.GPTNeoXConfig(**BASE, rotary_pct=0.5, use_parallel_residual=True)),
    "llama-gqa": lambda: tf.LlamaForCausalLM(tf.LlamaConfig(**BASE, num_key_value_heads=2)),
    "mistral-sliding": lambda: tf.MistralForCausalLM(tf.MistralConfig(**BASE, num_key_value_heads=2, sliding_window=4)),
    "qwen3": lambda: tf.Qwen3ForCausalLM(tf.Qwen3Config(**BASE, num_key_value_heads=2, head_dim=12)),
    "gemma2-softcap": lambda: tf.Gemma2ForCausalLM(tf.Gemma2Config(
        **BASE, num_key_value_heads=2, head_dim=12, sliding_window=4, attn_logit_softcapping=2.0,
        final_logit_softcapping=3.0, query_pre_attn_scalar=16)),
    "bert-mlm": lambda: tf.BertForMaskedLM(tf.BertConfig(**BASE)),
}


@pytest.fixture(scope="module", params=list(FAMILIES))
def model(request) -> HookedTransformer:
    torch.manual_seed(0)
    hf = randomize_(FAMILIES[request.param]().eval())
    return HookedTransformer.from_hf(hf).eval()


@pytest.mark.parametrize("side", ["left", "right"])
@torch.no_grad()
def test_staged_forward_equals_forward(model, side):
    tokens, mask = padded_batch(V, side)
    ref = model(tokens, attention_mask=mask)
    toks, m = model.prepare(tokens, mask)
    B, T = toks.shape
    state = model.run_state(m, B, T)
    x = model.embed_tokens(toks, state)
    half = model.cfg.n_layers // 2
    x = model.run_blocks(x, state, 0, half)  # in two pieces: the residual in between is resid_pre of `half`
    x = model.run_blocks(x, state, half)
    logits = model.head(x, state=state)
    assert torch.equal(logits, ref)
    at = torch.tensor([0, T - 1])
    # fewer rows in the unembedding matmul: the same numbers up to its blocking
    torch.testing.assert_close(model.head(x, at, state=state), ref[:, at], rtol=0, atol=1e-5)
    # the unhooked head is the same maths (lenses use it on float32 residuals)
    torch.testing.assert_close(model.head(x, hooks=False), ref, rtol=0, atol=1e-5)


@torch.no_grad()
def test_run_blocks_matches_start_and_stop_at_layer(model):
    tokens, mask = padded_batch(V, "left")
    L = model.cfg.n_layers
    _, cache = model.run_with_cache(tokens, attention_mask=mask, names_filter="blocks.2.hook_resid_pre")
    toks, m = model.prepare(tokens, mask)
    state = model.run_state(m, *toks.shape)
    x = model.run_blocks(model.embed_tokens(toks, state), state, 0, 2)
    assert torch.equal(x, cache["blocks.2.hook_resid_pre"])
    assert torch.equal(x, model(tokens, attention_mask=mask, stop_at_layer=2))
    rest = model(x, start_at_layer=2, attention_mask=mask)
    assert torch.equal(rest, model(tokens, attention_mask=mask))
    assert torch.equal(model.run_blocks(x, state, -(L - 2)), model.run_blocks(x, state, 2, L))


def test_stage_arguments_are_checked(model):
    toks, m = model.prepare(torch.tensor([[5, 6, 7]]))
    state = model.run_state(m, *toks.shape)
    x = model.embed_tokens(toks, state)
    with pytest.raises(InputError, match="stop .* before start"):
        model.run_blocks(x, state, 3, 1)
    with pytest.raises(InputError, match="layer must be an int"):
        model.run_blocks(x, state, 0, 99)
    with pytest.raises(InputError, match="matching the run state"):
        model.run_blocks(x[:, :2], state)


def test_prepare_and_require_tokenizer(model):
    tokens, mask = model.prepare(torch.tensor([[3, 4, 5], [6, 7, 8]]), torch.tensor([[0, 1, 1], [1, 1, 1]]))
    assert tokens.dtype == torch.long and mask.tolist() == [[0, 1, 1], [1, 1, 1]]
    assert model.prepare(torch.tensor([3, 4]))[1] is None  # no padding: no mask
    with pytest.raises(InputError, match="Token ids must be in"):
        model.prepare(torch.tensor([[V + 1]]))
    model_tok = model.tokenizer
    try:
        model.tokenizer = None
        with pytest.raises(InputError, match="no tokenizer"):
            model.require_tokenizer()
    finally:
        model.tokenizer = model_tok


def test_layer_of_is_the_one_grammar():
    from mechscope.models.hooks import layer_of, split_hook_name

    assert layer_of("blocks.12.attn.hook_z") == 12
    assert layer_of("ln_final.hook_normalized") is None and layer_of("hook_embed") is None
    assert split_hook_name("blocks.3.mlp.hook_post") == (3, "mlp.hook_post")
    assert layer_of("blocks.x.hook_z") is None
