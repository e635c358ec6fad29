"""GPT-NeoX (Pythia) converter: interleaved qkv, partial rotary, parallel and sequential residual."""

from __future__ import annotations

import copy
import json

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
SIZES = dict(vocab_size=V, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128,
             max_position_embeddings=64)


pytestmark = pytest.mark.usefixtures("one_thread")


VARIANTS = {  # name: (config kwargs, expected rotary_dim)
    "parallel_rotary25_untied": (dict(rope_parameters={"rope_theta": 10000.0, "partial_rotary_factor": 0.25}), 4),
    "sequential_rotary50_tied_nobias": (dict(
        use_parallel_residual=False, tie_word_embeddings=True, attention_bias=False, hidden_act="gelu_new",
        rope_parameters={"rope_theta": 500.0, "partial_rotary_factor": 0.5}), 8),
    "parallel_full_rotary_linear": (dict(
        rope_parameters={"rope_type": "linear", "factor": 4.0, "rope_theta": 100.0, "partial_rotary_factor": 1.0}),
        16),
}


@pytest.mark.parametrize("name", list(VARIANTS))
def test_parity(name, tmp_path):
    kw, rotary_dim = VARIANTS[name]
    hf = randomize_(tf.GPTNeoXForCausalLM(tf.GPTNeoXConfig(**SIZES, **kw)))
    hf.save_pretrained(tmp_path)  # writes the unembedding as `embed_out.weight`, like Pythia checkpoints
    ours = from_pretrained(str(tmp_path))
    assert (ours.cfg.rotary_dim, ours.cfg.architecture) == (rotary_dim, "GPTNeoXForCausalLM")
    assert ours.cfg.parallel_attn_mlp == hf.config.use_parallel_residual
    check_parity(hf, ours, V, name)  # from_hf reads the in-memory `lm_head.weight`
    check_residuals(ours, V)


def test_pythia_style_config_json(tmp_path):
    """Pythia's config.json (rotary_pct, rotary_emb_base; transformers 4 format) loads the same."""
    hf = randomize_(tf.GPTNeoXForCausalLM(tf.GPTNeoXConfig(**SIZES)))
    hf.save_pretrained(tmp_path)
    path = tmp_path / "config.json"
    d = json.loads(path.read_text())
    d.pop("rope_parameters")
    d |= {"rotary_pct": 0.5, "rotary_emb_base": 1000}
    path.write_text(json.dumps(d))
    hf = tf.GPTNeoXForCausalLM.from_pretrained(tmp_path).eval()
    ours = from_pretrained(str(tmp_path))
    assert (ours.cfg.rotary_dim, ours.cfg.rope_theta) == (8, 1000.0)
    check_parity(hf, ours, V, "pythia_config_json")


def test_wrong_qkv_layout_would_show():
    """Reading the fused qkv without de-interleaving gives visibly different log-probs."""
    hf = randomize_(tf.GPTNeoXForCausalLM(tf.GPTNeoXConfig(**SIZES)))
    wrong = from_hf(copy.deepcopy(hf))  # from_hf may share storage with hf; edit a copy
    with torch.no_grad():
        for layer, block in enumerate(wrong.blocks):
            block.attn.qkv.weight.copy_(hf.gpt_neox.layers[layer].attention.query_key_value.weight)
    diff = logprob_diff(hf, wrong, V, "right")
    print(f"interleaved qkv read as [q;k;v]: {diff:.2e}")
    assert diff > 1e-3


def test_bare_model_hidden_states(tmp_path):
    hf = randomize_(tf.GPTNeoXModel(tf.GPTNeoXConfig(**SIZES)))
    hf.save_pretrained(tmp_path)
    ours = from_pretrained(str(tmp_path))
    assert not ours.cfg.has_unembed and ours.cfg.architecture == "GPTNeoXModel"
    diff = hidden_state_diff(hf, ours, V)
    print(f"GPTNeoXModel hidden states: {diff:.2e}")
    assert diff < 1e-4


@pytest.mark.parametrize("kw,match", [
    (dict(hidden_act="relu2"), "relu2"),
    (dict(rope_parameters={"rope_type": "dynamic", "factor": 2.0, "rope_theta": 10000.0}), "dynamic"),
    (dict(architectures=["GPTNeoXForSequenceClassification"]), "GPTNeoXForSequenceClassification"),
])
def test_unsupported_options_raise(kw, match, tmp_path):
    tf.GPTNeoXConfig(**SIZES, **kw).save_pretrained(tmp_path)  # config.json alone: it fails before weights
    with pytest.raises(UnsupportedArchitectureError, match=match):
        from_pretrained(str(tmp_path))
