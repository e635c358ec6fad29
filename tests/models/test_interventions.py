"""One intervention mechanism: the same logits through forward, run_with_cache, patching and generate."""

from __future__ import annotations

import pytest
import torch
import transformers as tf

from mechscope import HookedTransformer
from mechscope.circuits.patching import LogitDiff, activation_patching
from mechscope.errors import HookNameError, HookReturnError, InputError
from mechscope.models.interventions import Ablate, Add, Apply, Scale, Set

from parity import randomize_

V = 64


@pytest.fixture(scope="module")
def model() -> HookedTransformer:
    torch.manual_seed(0)
    cfg = tf.LlamaConfig(vocab_size=V, hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    return HookedTransformer.from_hf(randomize_(tf.LlamaForCausalLM(cfg).eval(), std=0.1)).eval()


def steer(model, scale: float = 4.0, positions=slice(2, None)) -> Add:
    v = torch.randn(model.cfg.d_model, generator=torch.Generator().manual_seed(1))
    return Add("blocks.1.hook_resid_post", v, scale=scale, positions=positions)


TOKENS = torch.tensor([[5, 9, 13, 17, 21, 25, 29]])


@torch.no_grad()
def test_forward_and_run_with_cache_agree(model):
    iv = steer(model)
    plain = model(TOKENS)
    steered = model(TOKENS, interventions=[iv])
    assert torch.equal(steered[:, :2], plain[:, :2])  # positions before the slice are untouched
    assert (steered[:, 2:] - plain[:, 2:]).abs().max() > 0.1
    logits, cache = model.run_with_cache(TOKENS, interventions=[iv], names_filter="blocks.1.hook_resid_post")
    assert torch.equal(logits, steered)
    _, plain_cache = model.run_with_cache(TOKENS, names_filter="blocks.1.hook_resid_post")
    added = cache["blocks.1.hook_resid_post"] - plain_cache["blocks.1.hook_resid_post"]  # the cache holds what ran
    torch.testing.assert_close(added[0, 2:], (iv.scale * iv.vector).expand(5, -1), rtol=0, atol=1e-5)
    with model.interventions([iv]):
        assert torch.equal(model(TOKENS), steered)
    assert torch.equal(model(TOKENS), plain)  # removed after the block


@torch.no_grad()
def test_generate_with_kv_cache_sees_the_same_logits(model):
    iv = steer(model)
    prompt, n_new = TOKENS[:, :4], 6
    seen = []
    out = model.generate(prompt, n_new, interventions=[iv], use_kv_cache=True, stop_at_eos=False,
                         fwd_hooks=[("hook_unembed", lambda x, hook: seen.append(x[:, -1].clone()))])
    full = model(out, interventions=[iv])
    for i, logits in enumerate(seen):  # step i predicted token 4 + i from the positions before it
        torch.testing.assert_close(logits, full[:, 3 + i], rtol=0, atol=1e-4)
    no_cache = model.generate(prompt, n_new, interventions=[iv], use_kv_cache=False, stop_at_eos=False)
    assert torch.equal(out, no_cache)
    plain = model.generate(prompt, n_new, use_kv_cache=True, stop_at_eos=False)
    assert not torch.equal(out, plain)  # the intervention acted on the generated tokens too


@torch.no_grad()
def test_left_padded_batch_generates_what_each_prompt_generates_alone(model):
    iv = steer(model, positions=[1, 3, 5])  # absolute positions: padding does not shift them
    a, b = torch.tensor([5, 9, 13, 17, 21]), torch.tensor([7, 11, 3])
    batch = torch.zeros(2, 5, dtype=torch.long)
    mask = torch.zeros(2, 5, dtype=torch.long)
    batch[0], mask[0] = a, 1
    batch[1, 2:], mask[1, 2:] = b, 1
    together = model.generate(batch, 4, attention_mask=mask, interventions=[iv], stop_at_eos=False)
    alone_a = model.generate(a[None], 4, interventions=[iv], stop_at_eos=False)
    alone_b = model.generate(b[None], 4, interventions=[iv], stop_at_eos=False)
    assert torch.equal(together[0, -4:], alone_a[0, -4:])
    assert torch.equal(together[1, -4:], alone_b[0, -4:])


def test_patching_runs_use_the_intervention(model):
    iv = steer(model, scale=2.0)
    clean, corrupted = TOKENS, torch.tensor([[5, 9, 13, 40, 21, 25, 29]])
    metric = LogitDiff(7, 8)
    got = activation_patching(model, clean, corrupted, metric, "resid_pre", "position", interventions=[iv])
    with torch.no_grad():
        _, cache = model.run_with_cache(clean, interventions=[iv], names_filter="blocks.*.hook_resid_pre")
        want = torch.zeros(model.cfg.n_layers, clean.shape[1])
        for layer in range(model.cfg.n_layers):
            for pos in range(clean.shape[1]):
                src = cache[f"blocks.{layer}.hook_resid_pre"][:, pos]

                def patch(x, hook, pos=pos, src=src):
                    x = x.clone()
                    x[:, pos] = src
                    return x

                logits = model.run_with_hooks(corrupted, interventions=[iv],
                                              fwd_hooks=[(f"blocks.{layer}.hook_resid_pre", patch)])
                want[layer, pos] = metric(logits)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-4)
    plain = activation_patching(model, clean, corrupted, metric, "resid_pre", "position")
    assert (plain - got).abs().max() > 1e-3  # the intervention mattered


@torch.no_grad()
def test_intervention_kinds(model):
    z = "blocks.0.attn.hook_z"

    def zero_head_1(x, hook):
        x = x.clone()
        x[:, :, 1] = 0
        return x

    ref = model.run_with_hooks(TOKENS, fwd_hooks=[(z, zero_head_1)])
    assert torch.equal(model(TOKENS, interventions=Scale(z, 0.0, heads=1)), ref)
    assert torch.equal(model(TOKENS, interventions=Set(z, 0.0, heads=[1])), ref)
    assert torch.equal(model(TOKENS, interventions=Apply(z, torch.zeros_like, heads=1)), ref)
    d = torch.randn(model.cfg.d_model)
    h = "blocks.2.hook_resid_mid"
    _, cache = model.run_with_cache(TOKENS, interventions=Ablate(h, d), names_filter=h)
    assert cache[h].matmul(d / d.norm()).abs().max() < 1e-5  # nothing left along the direction


def test_bad_interventions_are_refused(model):
    with pytest.raises(HookNameError):
        model(TOKENS, interventions=Add("blocks.9.hook_resid_post", torch.zeros(32)))
    with pytest.raises(InputError, match="width 32"):
        model(TOKENS, interventions=Add("blocks.0.hook_resid_post", torch.zeros(7)))
    with pytest.raises(InputError, match="absolute token positions"):
        Add("blocks.0.hook_resid_post", torch.zeros(32), positions=-1)
    with pytest.raises(InputError, match="Intervention objects"):
        model(TOKENS, interventions=[lambda x, hook: x])
    with pytest.raises(InputError, match="no head dimension"):
        model(TOKENS, interventions=Scale("blocks.0.hook_resid_post", 0.0, heads=1))


def test_hook_returns_are_checked(model):
    name = "blocks.0.hook_resid_post"
    with pytest.raises(HookReturnError, match="dtype torch.int64.*blocks.0.hook_resid_post|blocks.0.hook_resid_post.*dtype"):
        model.run_with_hooks(TOKENS, fwd_hooks=[(name, lambda x, hook: x.long())])
    with pytest.raises(HookReturnError, match="float64"):
        model.run_with_hooks(TOKENS, fwd_hooks=[(name, lambda x, hook: x.double())])
    with pytest.raises(HookReturnError, match="shape"):
        model.run_with_hooks(TOKENS, fwd_hooks=[(name, lambda x, hook: x[:, :1])])
