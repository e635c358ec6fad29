"""Gemma 1/2/3 converters: tiny random HF models saved, reloaded and compared with transformers."""

from __future__ import annotations

import pytest
import torch

from mechscope.errors import UnsupportedArchitectureError
from mechscope.models.loading import from_pretrained

from parity import batched_equals_single, logprob_diff

VOCAB = 128
COMMON = dict(num_hidden_layers=3, hidden_size=64, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
              intermediate_size=96, vocab_size=VOCAB, max_position_embeddings=64,
              bos_token_id=1, eos_token_id=2, pad_token_id=0)
SLIDING = ["sliding_attention", "full_attention", "sliding_attention"]
# window 4 < the 11-token prompts; softcaps small enough to bite; query_pre_attn_scalar != head_dim
VARIANTS = {
    "gemma": ("GemmaConfig", "GemmaForCausalLM", {}),
    "gemma_untied_bias": ("GemmaConfig", "GemmaForCausalLM",
                          dict(tie_word_embeddings=False, attention_bias=True, num_key_value_heads=1)),
    "gemma2": ("Gemma2Config", "Gemma2ForCausalLM",
               dict(sliding_window=4, attn_logit_softcapping=2.0, final_logit_softcapping=3.0,
                    query_pre_attn_scalar=24)),
    "gemma3": ("Gemma3TextConfig", "Gemma3ForCausalLM",
               dict(sliding_window=4, final_logit_softcapping=3.0, query_pre_attn_scalar=24, layer_types=SLIDING,
                    rope_parameters={"full_attention": {"rope_type": "linear", "factor": 2.0, "rope_theta": 1e6},
                                     "sliding_attention": {"rope_type": "default", "rope_theta": 1e4}})),
}


def _perturb(model: torch.nn.Module, seed: int, std: float = 0.2) -> None:
    """Add noise to every parameter (norm weights too) so a wrong mapping shows."""
    torch.manual_seed(seed)
    with torch.no_grad():
        for _, p in sorted(model.named_parameters()):
            p.add_(torch.nn.init.normal_(torch.empty_like(p), std=std))


def _build(variant: str, folder, seed: int = 0, **overrides):
    import transformers

    cfg_cls, model_cls, extra = VARIANTS[variant]
    torch.manual_seed(seed)
    cfg = getattr(transformers, cfg_cls)(**{**COMMON, **extra, **overrides})
    hf = getattr(transformers, model_cls)(cfg).eval()
    _perturb(hf, seed)
    hf.save_pretrained(folder)
    return hf


@pytest.fixture(scope="module", params=list(VARIANTS))
def pair(request, tmp_path_factory):
    folder = tmp_path_factory.mktemp(request.param)
    hf = _build(request.param, folder, seed=len(request.param))
    return request.param, hf, from_pretrained(str(folder))


@pytest.mark.parametrize("side", ["left", "right"])
def test_logprob_parity(pair, side):
    variant, hf, model = pair
    diff = logprob_diff(hf, model, VOCAB, side)
    print(f"{variant} {side}: max |logprob diff| = {diff:.2e}")
    assert diff < 1e-4


@pytest.mark.parametrize("side", ["left", "right"])
def test_batched_equals_single(pair, side):
    variant, _, model = pair
    diff = batched_equals_single(model, VOCAB, side)
    print(f"{variant} {side}: max |batched - single| = {diff:.2e}")
    assert diff < 1e-4


def test_config_mapping(pair):
    variant, hf, model = pair
    c, h = model.cfg, hf.config
    assert c.architecture == type(hf).__name__
    assert c.embed_scale == pytest.approx(64**0.5) and c.normalization == "RMS" and c.gated_mlp
    if variant.startswith("gemma2") or variant.startswith("gemma3"):
        assert c.layer_types == ["sliding", "full", "sliding"] and c.sliding_window == 4
        assert c.post_attn_norm and c.post_mlp_norm
        assert c.attn_scale == pytest.approx(24**-0.5) and c.final_softcap == 3.0
    else:
        assert c.sliding_window is None and not c.post_attn_norm and c.attn_scale is None
    assert c.attn_softcap == (2.0 if variant == "gemma2" else None)
    if variant == "gemma3":
        assert c.qk_norm and c.rope_theta == 1e6 and c.rope_theta_local == 1e4
        assert c.rope_scaling == {"rope_type": "linear", "factor": 2.0} and c.rope_scaling_local is None
    assert c.tie_word_embeddings == h.tie_word_embeddings


@pytest.mark.parametrize("pair", ["gemma"], indirect=True)
def test_gemma1_residual_identities(pair):
    _, _, model = pair
    tokens = torch.randint(3, VOCAB, (2, 9), generator=torch.Generator().manual_seed(0))
    _, cache = model.run_with_cache(tokens)
    for layer in range(model.cfg.n_layers):
        b = f"blocks.{layer}."
        torch.testing.assert_close(cache[b + "hook_resid_mid"], cache[b + "hook_resid_pre"] + cache[b + "hook_attn_out"])
        torch.testing.assert_close(cache[b + "hook_resid_post"], cache[b + "hook_resid_mid"] + cache[b + "hook_mlp_out"])


def test_bidirectional_gemma_is_refused(tmp_path):
    from transformers import Gemma2Config

    from mechscope.models.families import gemma

    cfg = Gemma2Config(**COMMON, use_bidirectional_attention=True)
    with pytest.raises(UnsupportedArchitectureError, match="use_bidirectional_attention"):
        gemma.convert_config(cfg)
