"""The real SmolLM2-135M-Instruct (built-in "smollm2"): parity, generation and sanity."""

from __future__ import annotations

import math

import pytest
import torch

from mechscope import HookedTransformer
from mechscope.models.loading import resolve_folder

PROMPTS = [
    "The capital of France is",
    "When Mary and John went to the store, John gave a drink to",
    "def add(a, b):\n    return",
]
PARAGRAPH = ("The history of the city goes back more than two thousand years. It was founded as a small "
             "trading post on the banks of the river, and over the centuries it grew into one of the most "
             "important centres of commerce and culture in the region.")


@pytest.fixture(scope="module")
def smollm2():
    pytest.importorskip("gguf")
    return HookedTransformer.from_pretrained("smollm2")


@pytest.fixture(scope="module")
def hf_smollm2():
    from transformers import LlamaForCausalLM

    return LlamaForCausalLM.from_pretrained(str(resolve_folder("smollm2")), dtype=torch.float32).eval()


def test_config_is_the_real_model(smollm2):
    c = smollm2.cfg
    assert (c.n_layers, c.d_model, c.d_vocab, c.n_heads, c.n_kv_heads) == (30, 576, 49152, 9, 3)
    assert c.architecture == "LlamaForCausalLM" and c.tie_word_embeddings
    assert not smollm2.default_prepend_bos()  # SmolLM2's tokenizer adds no BOS


@pytest.mark.parametrize("side", ["left", "right"])
def test_logprob_parity_with_padding(smollm2, hf_smollm2, side):
    tokens, mask = smollm2.to_tokens(PROMPTS, padding_side=side, return_mask=True)
    pos = (mask.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        want = hf_smollm2(tokens, attention_mask=mask, position_ids=pos).logits.log_softmax(-1)
        got = smollm2(tokens, attention_mask=mask).log_softmax(-1)
    diff = (got - want).abs()[mask.bool()].max().item()
    print(f"\nSmolLM2 max |log-prob diff| ({side} padding): {diff:.2e}")
    assert diff < 1e-4


def test_greedy_generation_matches_hf(smollm2, hf_smollm2):
    tokens, mask = smollm2.to_tokens(PROMPTS[:2], padding_side="left", return_mask=True)
    ours = smollm2.generate(tokens, 8, attention_mask=mask, stop_at_eos=False)
    ref = hf_smollm2.generate(tokens, attention_mask=mask, max_new_tokens=8, do_sample=False,
                              pad_token_id=smollm2.tokenizer.pad_token_id, eos_token_id=None)
    assert torch.equal(ours, ref)


def test_completes_sensibly(smollm2):
    assert smollm2.generate("The capital of France is", 1) == "The capital of France is Paris"
    logits = smollm2(PROMPTS[1])
    mary, john = smollm2.to_single_token(" Mary"), smollm2.to_single_token(" John")
    assert (logits[0, -1, mary] - logits[0, -1, john]).item() > 1.0  # IOI: the indirect object wins


def test_paragraph_loss_far_below_uniform(smollm2):
    loss = smollm2(PARAGRAPH, return_type="loss").item()
    print(f"\nSmolLM2 paragraph loss {loss:.3f} nats/token (uniform {math.log(49152):.2f})")
    assert loss < 4.0


def test_from_gguf_is_the_same_model(smollm2):
    from mechscope.models.gguf import smollm2_gguf_path

    model = HookedTransformer.from_gguf(smollm2_gguf_path())  # converted once, then cached
    tokens = smollm2.to_tokens(PROMPTS[0])
    with torch.no_grad():
        assert torch.equal(model(tokens), smollm2(tokens))
