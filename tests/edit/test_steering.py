"""Steering vectors, SAE feature clamping and directional ablation (hooks == orthogonalised weights)."""

from __future__ import annotations

import pytest
import torch
import transformers as tf

from mechscope import HookedTransformer, edit, sae
from mechscope.errors import InputError, UnsupportedArchitectureError
from mechscope.features.stats import logit_effects
from mechscope.models.interventions import Add, Scale

from conftest import make_word_tokenizer
from parity import randomize_

V = 64


def _llama(tie: bool) -> HookedTransformer:
    torch.manual_seed(0)
    cfg = tf.LlamaConfig(vocab_size=V, hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                         tie_word_embeddings=tie)
    return HookedTransformer.from_hf(randomize_(tf.LlamaForCausalLM(cfg).eval(), std=0.1)).eval()


def _gpt2() -> HookedTransformer:
    torch.manual_seed(0)
    cfg = tf.GPT2Config(vocab_size=V, n_embd=32, n_layer=3, n_head=4, n_positions=64)
    return HookedTransformer.from_hf(randomize_(tf.GPT2LMHeadModel(cfg).eval(), std=0.1)).eval()


TOKENS = torch.tensor([[5, 9, 13, 17, 21, 25, 29], [3, 8, 12, 40, 41, 42, 43]])


@pytest.fixture(scope="module")
def worded():
    model = _llama(tie=True)
    model.tokenizer = make_word_tokenizer()
    return model


def test_contrastive_vector_is_the_mean_difference(worded):
    pos, neg = ["the cat sat", "a big red dog ran"], ["the dog", "she was small"]
    hook = "blocks.1.hook_resid_post"
    v = edit.contrastive_vector(worded, pos, neg, hook)

    def last(texts):
        rows = []
        for t in texts:
            _, cache = worded.run_with_cache(t, names_filter=hook)
            rows.append(cache[hook][0, -1])
        return torch.stack(rows).mean(0)

    torch.testing.assert_close(v, last(pos) - last(neg), rtol=0, atol=1e-5)
    mean = edit.contrastive_vector(worded, pos, neg, hook, position="mean")
    assert mean.shape == v.shape and not torch.allclose(mean, v)
    with pytest.raises(InputError, match="non-empty list"):
        edit.contrastive_vector(worded, [], neg, hook)


@torch.no_grad()
def test_steering_shifts_generation_and_serialises(worded):
    # at the last residual point the model is nearly linear, so steering with the contrastive vector must move the
    # next-token distribution of a neutral prompt towards the one the positive prompts give
    hook = f"blocks.{worded.cfg.n_layers - 1}.hook_resid_post"
    pos, neg = ["the cat sat on the mat", "a cat ran"], ["the dog sat on the mat", "a dog ran"]
    v = edit.contrastive_vector(worded, pos, neg, hook)
    target = (torch.stack([worded(t)[0, -1].log_softmax(-1) for t in pos]).mean(0)
              - torch.stack([worded(t)[0, -1].log_softmax(-1) for t in neg]).mean(0))
    plain = worded("she was a")[0, -1].log_softmax(-1)
    sizes = []
    for scale in (1.0, 2.0, 4.0):
        shift = worded("she was a", interventions=[edit.steer(v, hook, scale=scale)])[0, -1].log_softmax(-1) - plain
        assert torch.corrcoef(torch.stack([shift, target]))[0, 1] > 0.5, scale
        sizes.append(float(shift.norm()))
    assert sizes[0] < sizes[1] < sizes[2]
    out = worded.generate("she was a", 4, interventions=[edit.steer(v, hook, scale=50.0)])
    assert out != worded.generate("she was a", 4)
    hook = "blocks.1.hook_resid_post"
    iv = edit.steer(v, hook, scale=4.0, positions=slice(1, None))
    back = edit.from_json(edit.to_json(iv))
    assert torch.equal(worded(TOKENS, interventions=[back]), worded(TOKENS, interventions=[iv]))
    for kind in (Scale("blocks.0.attn.hook_z", 0.0, heads=[1, 2]), edit.directional_ablation(worded, v)[0]):
        again = edit.from_json(edit.to_json(kind))
        assert torch.equal(worded(TOKENS, interventions=[again]), worded(TOKENS, interventions=[kind]))
    with pytest.raises(InputError, match="kind"):
        edit.from_json({"hook": hook, "vector": [1.0]})
    with pytest.raises(InputError, match="needs the field 'vector'"):
        edit.from_json({"kind": "add", "hook": hook})


@torch.no_grad()
def test_clamping_a_feature_moves_logits_towards_its_effects():
    model = _llama(tie=False)
    L = model.cfg.n_layers
    hook = f"blocks.{L - 1}.hook_resid_post"
    coder = sae.SparseCoder(sae.SAEConfig(arch="relu", d_in=model.cfg.d_model, n_latents=48, hook_in=hook))
    coder.init_weights(0)
    plain = model(TOKENS).log_softmax(-1)
    for latent in (3, 17, 30):
        clamped = model(TOKENS, interventions=[edit.ClampFeatures(coder, {latent: 8.0})]).log_softmax(-1)
        effect = logit_effects(model, coder, torch.tensor([latent]))[0]  # [V]
        shift = (clamped - plain)[:, -1]  # [B, V]
        for row in shift:
            corr = torch.corrcoef(torch.stack([row, effect]))[0, 1]
            assert corr > 0.5, (latent, float(corr))


@torch.no_grad()
def test_clamp_keeps_the_reconstruction_error_and_other_features():
    model = _llama(tie=False)
    hook = "blocks.1.hook_resid_post"
    coder = sae.SparseCoder(sae.SAEConfig(arch="relu", d_in=model.cfg.d_model, n_latents=48, hook_in=hook))
    coder.init_weights(1)
    _, before = model.run_with_cache(TOKENS, names_filter=hook)
    clamp = edit.ClampFeatures(coder, values={5: 3.0}, scale={7: 0.0})
    _, after = model.run_with_cache(TOKENS, names_filter=hook, interventions=[clamp])
    x, y = before[hook], after[hook]
    f = coder.encode(x)
    want = x + ((3.0 - f[..., 5])[..., None] * coder.W_dec[5] + (0.0 - f[..., 7])[..., None] * coder.W_dec[7])
    torch.testing.assert_close(y, want, rtol=0, atol=1e-5)
    with pytest.raises(InputError, match="out of range"):
        edit.ClampFeatures(coder, {99: 1.0})
    with pytest.raises(InputError, match="values=.*scale="):
        edit.ClampFeatures(coder)
    tc = sae.SparseCoder(sae.SAEConfig(arch="relu", d_in=32, n_latents=8, hook_in="blocks.0.ln2.hook_normalized",
                                       hook_out="blocks.0.hook_mlp_out", d_out=32))
    with pytest.raises(InputError, match="transcoder"):
        edit.ClampFeatures(tc, {1: 1.0})


@pytest.mark.parametrize("make", [lambda: _llama(tie=True), _gpt2], ids=["llama-tied", "gpt2"])
@torch.no_grad()
def test_orthogonalised_weights_equal_hook_ablation(make, tmp_path):
    model = make()
    d = torch.randn(model.cfg.d_model, generator=torch.Generator().manual_seed(3))
    hooked = model(TOKENS, interventions=edit.directional_ablation(model, d))
    plain = model(TOKENS)
    assert (hooked - plain).abs().max() > 1e-2  # the ablation matters
    edit.orthogonalize(model, d)
    ortho = model(TOKENS)
    torch.testing.assert_close(ortho, hooked, rtol=0, atol=1e-4)
    _, cache = model.run_with_cache(TOKENS, names_filter="blocks.*.hook_resid_post")
    for layer in range(model.cfg.n_layers):  # nothing is ever written along d
        assert (cache["resid_post", layer] @ (d / d.norm())).abs().max() < 1e-4
    model.save_pretrained(tmp_path / "ortho")
    again = HookedTransformer.from_pretrained(str(tmp_path / "ortho"))
    assert torch.equal(again(TOKENS), ortho)


def test_bad_directions_and_architectures():
    model = _gpt2()
    with pytest.raises(InputError, match="width d_model = 32"):
        edit.orthogonalize(model, torch.zeros(7))
    with pytest.raises(InputError, match="non-zero"):
        edit.directional_ablation(model, torch.zeros(32))
    with pytest.raises(InputError, match="width 32"):
        model(TOKENS, interventions=[Add("blocks.0.hook_resid_post", torch.zeros(5))])
    with pytest.raises(InputError, match="width 32 .*give a vector of that width"):  # a steering vector, in generate
        model.generate(TOKENS[:1], 2, interventions=[edit.steer(torch.zeros(5), "blocks.0.hook_resid_post", scale=2.0)])
    torch.manual_seed(0)
    gemma = HookedTransformer.from_hf(tf.Gemma2ForCausalLM(tf.Gemma2Config(
        vocab_size=V, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
        num_key_value_heads=1, head_dim=16)).eval())
    with pytest.raises(UnsupportedArchitectureError, match="directional_ablation"):
        edit.orthogonalize(gemma, torch.ones(32))
