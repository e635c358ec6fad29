"""Generation: greedy equals transformers token for token; batched equals one-by-one; seeds."""

from __future__ import annotations

import pytest
import torch

from parity import padded_batch


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_greedy_matches_hf_with_left_padding(request, family):
    hf, _, model = request.getfixturevalue(f"tiny_{family}")
    tokens, mask = padded_batch(64, "left", seed=3)
    ours = model.generate(tokens, 10, attention_mask=mask, stop_at_eos=False)
    ref = hf.generate(tokens, attention_mask=mask, max_new_tokens=10, do_sample=False, pad_token_id=0,
                      eos_token_id=None)
    assert torch.equal(ours, ref)
    assert torch.equal(model.generate(tokens, 10, attention_mask=mask, stop_at_eos=False, use_kv_cache=False), ours)


@pytest.mark.parametrize("side", ["left", "right"])
def test_batched_generation_equals_one_by_one(tiny_llama, side):
    _, _, model = tiny_llama
    tokens, mask = padded_batch(64, side, seed=4)
    batched = model.generate(tokens, 8, attention_mask=mask, stop_at_eos=False)
    for i in range(tokens.shape[0]):
        alone = model.generate(tokens[i, mask[i].bool()][None], 8, stop_at_eos=False)
        assert torch.equal(alone[0, -8:], batched[i, -8:])


def test_text_generation_and_batched_loss(tiny_gpt2):
    _, _, model = tiny_gpt2
    out = model.generate("the cat sat", 5, stop_at_eos=False)
    assert isinstance(out, str) and out.startswith("<s> the cat sat")
    outs = model.generate(["the cat sat on", "a dog"], 5, stop_at_eos=False)
    assert isinstance(outs, list) and len(outs) == 2
    assert outs[1] == model.generate("a dog", 5, stop_at_eos=False)
    # loss of a padded batch equals the per-prompt losses
    texts = ["the cat sat on the mat", "a dog ran"]
    for side in ("left", "right"):
        tokens, mask = model.to_tokens(texts, padding_side=side, return_mask=True)
        per_tok = model(tokens, attention_mask=mask, return_type="loss", loss_per_token=True)
        for i, t in enumerate(texts):
            alone = model(t, return_type="loss", loss_per_token=True)[0]
            real = (mask[i, 1:] * mask[i, :-1]).bool()
            assert torch.allclose(per_tok[i][real], alone, atol=1e-5)


def test_sampling_is_seeded_and_respects_top_k(tiny_gpt2):
    _, _, model = tiny_gpt2
    prompt = torch.arange(4, 10)[None]
    a = model.generate(prompt, 12, do_sample=True, seed=7, temperature=1.5, stop_at_eos=False)
    b = model.generate(prompt, 12, do_sample=True, seed=7, temperature=1.5, stop_at_eos=False)
    c = model.generate(prompt, 12, do_sample=True, seed=8, temperature=1.5, stop_at_eos=False)
    assert torch.equal(a, b) and not torch.equal(a, c)
    greedy = model.generate(prompt, 12, stop_at_eos=False)
    assert torch.equal(model.generate(prompt, 12, do_sample=True, top_k=1, seed=1, stop_at_eos=False), greedy)
    assert torch.equal(model.generate(prompt, 12, do_sample=True, top_p=1e-6, seed=1, stop_at_eos=False), greedy)


def test_stops_at_eos(tiny_gpt2):
    _, _, model = tiny_gpt2
    prompt = torch.arange(4, 10)[None]
    first = model.generate(prompt, 1, stop_at_eos=False)[0, -1].item()
    out = model.generate(prompt, 10, eos_token_id=first)  # the first generated token is "EOS"
    assert out.shape[1] == prompt.shape[1] + 1
