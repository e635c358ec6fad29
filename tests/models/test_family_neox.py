"""GPT-NeoX (Pythia) converter: interleaved qkv, partial rotary, parallel and sequential residual."""

from __future__ import annotations

import copy
import json

import pytest
import torch
import transformers as tf

from mechscope.errors import UnsupportedArchitectureError
from mechscope.models.loading import from_hf, from_pretrained

from parity import batched_equals_single, hf_positions, logprob_diff, padded_batch

V = 128
SIZES = dict(vocab_size=V, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128,
             max_position_embeddings=64)


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny models run fastest on one thread (two threads on a busy 2-core machine are ~10x slower)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def randomize_(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Perturb every parameter (LayerNorm weights and biases too) so that a wrong mapping shows."""
    torch.manual_seed(seed)
    with torch.no_grad():
        for _, p in sorted(model.named_parameters()):
            p.add_(torch.nn.init.normal_(torch.empty_like(p), std=0.2))
    return model.eval()


def check_parity(hf, ours, label: str) -> None:
    """Log-probs match HF (left and right padding), batched == single, from_hf == from_pretrained."""
    for side in ("left", "right"):
        diff, single = logprob_diff(hf, ours, V, side), batched_equals_single(ours, V, side)
        print(f"{label} {side}: max |logprob diff| {diff:.2e}, batched vs single {single:.2e}")
        assert diff < 1e-4 and single < 1e-4
    tokens, mask = padded_batch(V, "left")
    with torch.no_grad():
        torch.testing.assert_close(from_hf(hf)(tokens, attention_mask=mask), ours(tokens, attention_mask=mask),
                                   rtol=0, atol=1e-6)


def check_residuals(ours) -> None:
    """Residual identities, and an all-hooks-cached forward (eager attention) equals the fast one."""
    tokens = padded_batch(V, "right")[0][:1]
    with torch.no_grad():
        logits, cache = ours.run_with_cache(tokens)
        torch.testing.assert_close(logits, ours(tokens), rtol=0, atol=1e-4)
    for layer in range(ours.cfg.n_layers):
        c = lambda n, layer=layer: cache[f"blocks.{layer}.hook_{n}"]
        if ours.cfg.parallel_attn_mlp:
            assert f"blocks.{layer}.hook_resid_mid" not in cache
            torch.testing.assert_close(c("resid_post"), c("resid_pre") + c("attn_out") + c("mlp_out"))
        else:
            torch.testing.assert_close(c("resid_mid"), c("resid_pre") + c("attn_out"))
            torch.testing.assert_close(c("resid_post"), c("resid_mid") + c("mlp_out"))
        if layer + 1 < ours.cfg.n_layers:
            assert torch.equal(cache[f"blocks.{layer + 1}.hook_resid_pre"], c("resid_post"))


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
    check_parity(hf, ours, name)  # from_hf reads the in-memory `lm_head.weight`
    check_residuals(ours)


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
    check_parity(hf, ours, "pythia_config_json")


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
    tokens, mask = padded_batch(V, "left")
    with torch.no_grad():
        ref = hf(tokens, attention_mask=mask, position_ids=hf_positions(mask)).last_hidden_state
        got = ours(tokens, attention_mask=mask, return_type="resid")
    diff = float((ref - got).abs()[mask.bool()].max())
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
