"""Llama / Mistral / Qwen2 converters: tiny random HF models saved, loaded the user's way, compared."""

from __future__ import annotations

import json

import pytest
import transformers as tf

from mechscope.errors import UnsupportedArchitectureError
from mechscope.models.families import converter_for
from mechscope.models.loading import from_hf, from_pretrained

from parity import (
    check_parity,
    check_residuals,
    hidden_state_diff,
    logprob_diff,
    randomize_,
)

V = 128
SIZES = dict(vocab_size=V, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=96,
             max_position_embeddings=64)


pytestmark = pytest.mark.usefixtures("one_thread")


def save_and_load(hf, folder):
    hf.save_pretrained(folder)
    return from_pretrained(str(folder))


LLAMA3 = {"rope_type": "llama3", "rope_theta": 10000.0, "factor": 8.0, "low_freq_factor": 1.0,
          "high_freq_factor": 4.0, "original_max_position_embeddings": 16}
YARN = {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0, "original_max_position_embeddings": 16}
LINEAR = {"rope_type": "linear", "rope_theta": 500.0, "factor": 4.0}

VARIANTS = {  # name: (config class, model class, config kwargs)
    "llama_gqa_untied_bias_headdim": (tf.LlamaConfig, tf.LlamaForCausalLM, dict(
        num_key_value_heads=2, head_dim=24, attention_bias=True, mlp_bias=True, tie_word_embeddings=False)),
    "llama_mha_tied": (tf.LlamaConfig, tf.LlamaForCausalLM, dict(tie_word_embeddings=True)),
    "llama_rope_llama3": (tf.LlamaConfig, tf.LlamaForCausalLM, dict(num_key_value_heads=2, rope_parameters=LLAMA3)),
    "llama_rope_linear": (tf.LlamaConfig, tf.LlamaForCausalLM, dict(rope_parameters=LINEAR)),
    "llama_rope_yarn": (tf.LlamaConfig, tf.LlamaForCausalLM, dict(num_key_value_heads=2, rope_parameters=YARN)),
    "mistral_window4": (tf.MistralConfig, tf.MistralForCausalLM, dict(num_key_value_heads=2, sliding_window=4)),
    "mistral_no_window": (tf.MistralConfig, tf.MistralForCausalLM, dict(num_key_value_heads=2, sliding_window=None)),
    "qwen2_window4_tied": (tf.Qwen2Config, tf.Qwen2ForCausalLM, dict(
        num_key_value_heads=2, use_sliding_window=True, sliding_window=4, max_window_layers=1,
        tie_word_embeddings=True)),
    "qwen2_full": (tf.Qwen2Config, tf.Qwen2ForCausalLM, dict(num_key_value_heads=2)),
}


@pytest.mark.parametrize("name", list(VARIANTS))
def test_parity(name, tmp_path):
    config_cls, model_cls, kw = VARIANTS[name]
    hf = randomize_(model_cls(config_cls(**SIZES, **kw)))
    ours = save_and_load(hf, tmp_path)
    assert ours.cfg.architecture == model_cls.__name__
    assert ours.cfg.tie_word_embeddings == hf.config.tie_word_embeddings
    check_parity(hf, ours, V, name)
    check_residuals(ours, V)


def test_config_mapping():
    c = converter_for(tf.LlamaConfig(**SIZES, num_key_value_heads=2, head_dim=24)).convert_config(
        tf.LlamaConfig(**SIZES, num_key_value_heads=2, head_dim=24, architectures=["LlamaForCausalLM"]))
    assert (c.n_kv_heads, c.d_head, c.rotary_dim, c.rope_scaling, c.sliding_window) == (2, 24, 24, None, None)
    q2 = converter_for(tf.Qwen2Config(**SIZES)).convert_config(
        tf.Qwen2Config(**SIZES, num_key_value_heads=2, use_sliding_window=True, sliding_window=4, max_window_layers=1))
    assert (q2.attn_bias, q2.attn_out_bias, q2.sliding_window, q2.layer_types) == (True, False, 4, ["full", "sliding"])
    m = converter_for(tf.MistralConfig(**SIZES)).convert_config(tf.MistralConfig(**SIZES, num_key_value_heads=2, sliding_window=4))
    assert m.sliding_window == 4 and m.layer_types is None and all(m.is_sliding(i) for i in range(2))
    y = converter_for(tf.LlamaConfig(**SIZES)).convert_config(tf.LlamaConfig(**SIZES, rope_parameters=YARN))
    assert y.rope_scaling == {k: v for k, v in YARN.items() if k != "rope_theta"}


@pytest.mark.parametrize("name,change", [
    ("llama_rope_llama3", "rope"), ("llama_rope_yarn", "rope"), ("llama_rope_linear", "rope"),
    ("mistral_window4", "window"), ("qwen2_window4_tied", "window"),
])
def test_scaling_and_windows_matter(name, change):
    """The variants above would fail if rope scaling or the sliding window were ignored."""
    config_cls, model_cls, kw = VARIANTS[name]
    hf = randomize_(model_cls(config_cls(**SIZES, **kw)))
    wrong = from_hf(hf)
    if change == "rope":
        wrong.rotary.scaling = None
        wrong.rotary.reset("cpu")
    else:
        wrong.cfg.sliding_window = None
    diff = logprob_diff(hf, wrong, V, "right")
    print(f"{name} without {change}: {diff:.2e}")
    assert diff > 1e-3


def test_bare_model_hidden_states(tmp_path):
    hf = randomize_(tf.LlamaModel(tf.LlamaConfig(**SIZES, num_key_value_heads=2)))
    ours = save_and_load(hf, tmp_path)
    assert not ours.cfg.has_unembed and ours.cfg.architecture == "LlamaModel"
    diff = hidden_state_diff(hf, ours, V)
    print(f"LlamaModel hidden states: {diff:.2e}")
    assert diff < 1e-4


def test_transformers4_config_json(tmp_path):
    """A config.json in the transformers 4 format (rope_theta + rope_scaling with "type") loads the same."""
    hf = randomize_(tf.LlamaForCausalLM(tf.LlamaConfig(**SIZES)))
    hf.save_pretrained(tmp_path)
    path = tmp_path / "config.json"
    d = json.loads(path.read_text())
    d.pop("rope_parameters")
    d |= {"rope_theta": 300.0, "rope_scaling": {"type": "linear", "factor": 3.0}}
    path.write_text(json.dumps(d))
    hf = tf.LlamaForCausalLM.from_pretrained(tmp_path).eval()
    ours = from_pretrained(str(tmp_path))
    assert ours.cfg.rope_theta == 300.0 and ours.cfg.rope_scaling == {"rope_type": "linear", "factor": 3.0}
    check_parity(hf, ours, V, "llama_tf4_config")


@pytest.mark.parametrize("kw,match", [
    (dict(rope_parameters={"rope_type": "dynamic", "rope_theta": 10000.0, "factor": 2.0}), "dynamic"),
    (dict(hidden_act="relu2"), "relu2"),
    (dict(rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 0.5}),
     "partial_rotary_factor"),
    (dict(architectures=["LlamaForSequenceClassification"]), "LlamaForSequenceClassification"),
])
def test_unsupported_options_raise(kw, match, tmp_path):
    tf.LlamaConfig(**SIZES, **kw).save_pretrained(tmp_path)  # config.json alone: it fails before weights
    with pytest.raises(UnsupportedArchitectureError, match=match):
        from_pretrained(str(tmp_path))
