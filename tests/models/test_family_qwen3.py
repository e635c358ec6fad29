"""Qwen3 converter: Llama layout plus q/k RMSNorm over d_head (before rotary)."""

from __future__ import annotations

import copy

import pytest
import torch
import transformers as tf

from mechscope.errors import UnsupportedArchitectureError
from mechscope.models.loading import from_hf, from_pretrained

from parity import (
    check_parity,
    check_residuals,
    hidden_state_diff,
    logprob_diff,
    randomize_,
)

V = 128
SIZES = dict(vocab_size=V, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
             intermediate_size=96, max_position_embeddings=64)


pytestmark = pytest.mark.usefixtures("one_thread")


VARIANTS = {
    "gqa_headdim24_untied": dict(head_dim=24, tie_word_embeddings=False),
    "bias_tied_window4": dict(head_dim=16, attention_bias=True, tie_word_embeddings=True,
                              use_sliding_window=True, sliding_window=4, max_window_layers=1),
    "yarn": dict(head_dim=16, rope_parameters={"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0,
                                               "original_max_position_embeddings": 16}),
}


@pytest.mark.parametrize("name", list(VARIANTS))
def test_parity(name, tmp_path):
    hf = randomize_(tf.Qwen3ForCausalLM(tf.Qwen3Config(**SIZES, **VARIANTS[name])))
    hf.save_pretrained(tmp_path)
    ours = from_pretrained(str(tmp_path))
    c = ours.cfg
    assert c.qk_norm and c.architecture == "Qwen3ForCausalLM" and c.d_head == hf.config.head_dim
    assert c.attn_bias == c.attn_out_bias == hf.config.attention_bias
    assert c.layer_types == (["full", "sliding"] if hf.config.use_sliding_window else None)
    check_parity(hf, ours, V, name)
    check_residuals(ours, V)


def test_qk_norm_matters():
    """Dropping the q/k norm weights (ones instead) gives visibly different log-probs."""
    hf = randomize_(tf.Qwen3ForCausalLM(tf.Qwen3Config(**SIZES, head_dim=16)))
    wrong = from_hf(copy.deepcopy(hf))  # from_hf may share storage with hf; edit a copy
    with torch.no_grad():
        for block in wrong.blocks:
            block.attn.q_norm.w.fill_(1.0)
            block.attn.k_norm.w.fill_(1.0)
    diff = logprob_diff(hf, wrong, V, "right")
    print(f"Qwen3 without q/k norm weights: {diff:.2e}")
    assert diff > 1e-3


def test_bare_model_hidden_states(tmp_path):
    hf = randomize_(tf.Qwen3Model(tf.Qwen3Config(**SIZES, head_dim=16)))
    hf.save_pretrained(tmp_path)
    ours = from_pretrained(str(tmp_path))
    assert not ours.cfg.has_unembed and ours.cfg.architecture == "Qwen3Model"
    diff = hidden_state_diff(hf, ours, V)
    print(f"Qwen3Model hidden states: {diff:.2e}")
    assert diff < 1e-4


@pytest.mark.parametrize("kw,match", [
    (dict(rope_parameters={"rope_type": "longrope", "rope_theta": 10000.0, "long_factor": [1.0] * 8,
                           "short_factor": [1.0] * 8, "original_max_position_embeddings": 16}), "longrope"),
    (dict(hidden_act="relu2"), "relu2"),
])
def test_unsupported_options_raise(kw, match, tmp_path):
    tf.Qwen3Config(**SIZES, head_dim=16, **kw).save_pretrained(tmp_path)  # config.json alone
    with pytest.raises(UnsupportedArchitectureError, match=match):
        from_pretrained(str(tmp_path))
