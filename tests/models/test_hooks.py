"""Every hook point: right shape, and editing it equals the same edit in plain PyTorch."""

from __future__ import annotations

import zlib
from unittest import mock

import pytest
import torch
import torch.nn.functional as F

from mechscope.errors import HookNameError, InputError

from reference_impl import gpt2_forward, llama_forward

B, T = 2, 9
TOKENS = torch.randint(4, 64, (B, T), generator=torch.Generator().manual_seed(0))


def _noise(name: str, x: torch.Tensor) -> torch.Tensor:
    """A deterministic edit per hook name: scale by 1.3 and add name-seeded noise."""
    g = torch.Generator().manual_seed(zlib.crc32(name.encode()))
    if name.endswith(("hook_scale", "hook_pattern")):
        return x * 1.3  # keep positive; a pattern need not stay normalised
    if name.endswith("hook_attn_scores"):  # do not un-mask the causal mask
        return x + torch.randn(x.shape, generator=g).tril() * 0.5
    return x * 1.3 + torch.randn(x.shape, generator=g) * 0.1


def _expected_shape(name: str, cfg) -> tuple:
    D, H, K, E, M, V = cfg.d_model, cfg.n_heads, cfg.n_kv_heads, cfg.d_head, cfg.d_mlp, cfg.d_vocab
    table = {
        "hook_q": (B, T, H, E), "hook_rot_q": (B, T, H, E), "hook_k": (B, T, K, E), "hook_v": (B, T, K, E),
        "hook_rot_k": (B, T, K, E), "hook_attn_scores": (B, H, T, T), "hook_pattern": (B, H, T, T),
        "hook_z": (B, T, H, E), "hook_result": (B, T, H, D), "hook_pre": (B, T, M), "hook_pre_linear": (B, T, M),
        "hook_post": (B, T, M), "hook_scale": (B, T, 1), "hook_unembed": (B, T, V),
    }
    return table.get(name.rsplit(".", 1)[-1], (B, T, D))


FAMILIES = {"gpt2": gpt2_forward, "llama": llama_forward}


def _hf_and_model(request, family):
    hf, _, model = request.getfixturevalue(f"tiny_{family}")
    return hf, model


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_reference_matches_without_edits(request, family):
    hf, model = _hf_and_model(request, family)
    sd = hf.state_dict()
    with torch.no_grad():
        ref = FAMILIES[family](sd, hf.config, TOKENS)
        assert (ref - hf(TOKENS).logits).abs().max() < 1e-4  # the reference itself is right
        assert (ref - model(TOKENS)).abs().max() < 1e-4


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_every_hook_shape_and_edit_matches_plain_pytorch(request, family):
    hf, model = _hf_and_model(request, family)
    sd = hf.state_dict()
    names = model.hook_names
    assert len(names) > 20
    checked = 0
    for name in names:
        seen = {}

        def hook(x, hook, name=name, seen=seen):
            seen["shape"] = tuple(x.shape)
            return _noise(name, x)

        def ref_edit(n, x, name=name):
            return _noise(n, x) if n == name else x

        with torch.no_grad():
            ours = model.run_with_hooks(TOKENS, fwd_hooks=[(name, hook)])
            ref = FAMILIES[family](sd, hf.config, TOKENS, ref_edit)
            base = model(TOKENS)
        assert seen["shape"] == _expected_shape(name, model.cfg), name
        diff = (ours - ref).abs().max().item()
        assert diff < 1e-4, f"{name}: edited output differs from plain PyTorch by {diff}"
        assert (ours - base).abs().max() > 1e-3, f"{name}: the edit had no effect"
        checked += 1
    assert checked == len(names)


def test_run_with_cache_all_equals_individual_hooks(tiny_gpt2):
    _, _, model = tiny_gpt2
    with torch.no_grad():
        logits_cached, cache = model.run_with_cache(TOKENS)
        assert (logits_cached - model(TOKENS)).abs().max() < 1e-5
    assert set(cache.keys()) == set(model.hook_names)
    for name in model.hook_names:
        seen = {}
        with torch.no_grad():
            model.run_with_hooks(TOKENS, fwd_hooks=[(name, lambda x, hook, seen=seen: seen.setdefault("x", x.clone()))])
        assert torch.allclose(cache[name], seen["x"], atol=1e-5), name


def test_unhooked_forward_uses_sdpa_for_every_layer(tiny_llama):
    _, _, model = tiny_llama
    real = F.scaled_dot_product_attention
    with mock.patch("torch.nn.functional.scaled_dot_product_attention", side_effect=real) as sdpa:
        model(TOKENS)
        assert sdpa.call_count == model.cfg.n_layers
        sdpa.reset_mock()
        model.run_with_cache(TOKENS, names_filter="blocks.*.hook_resid_post")
        assert sdpa.call_count == model.cfg.n_layers  # caching the residual keeps the fast path
        sdpa.reset_mock()
        model.run_with_hooks(TOKENS, fwd_hooks=[("blocks.0.attn.hook_pattern", lambda x, hook: None)])
        assert sdpa.call_count == model.cfg.n_layers - 1  # only the hooked layer runs eagerly


def test_unknown_hook_name_raises_with_suggestion(tiny_gpt2):
    _, _, model = tiny_gpt2
    with pytest.raises(HookNameError, match="blocks.0.hook_resid_post"):
        model.run_with_hooks(TOKENS, fwd_hooks=[("blocks.0.hook_resid_pots", lambda x, hook: x)])
    with pytest.raises(HookNameError, match="Did you mean"):
        model.run_with_cache(TOKENS, names_filter=["blocks.0.attn.hook_patern"])
    with pytest.raises(HookNameError):
        model.run_with_cache(TOKENS, names_filter=lambda n: n.endswith("nothing"))
    with pytest.raises(HookNameError):
        model.run_with_cache(TOKENS, names_filter="blocks.*.hook_nothing")
    assert not any(hp.active for hp in model.hook_dict.values())  # nothing left behind


def test_nested_hooks_contexts_remove_only_their_own(tiny_gpt2):
    _, _, model = tiny_gpt2
    calls = []
    name = "blocks.1.hook_resid_post"
    with model.hooks([(name, lambda x, hook: calls.append("outer"))]):
        with model.hooks([(name, lambda x, hook: calls.append("inner"))]):
            model(TOKENS)
        model(TOKENS)
    model(TOKENS)
    assert calls == ["outer", "inner", "outer"]
    assert not model.hook_dict[name].active


def test_hooks_removed_after_exception(tiny_gpt2):
    _, _, model = tiny_gpt2

    def boom(x, hook):
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError):
        model.run_with_hooks(TOKENS, fwd_hooks=[("hook_embed", boom)])
    assert not model.hook_dict["hook_embed"].active


def test_hook_returning_wrong_shape_raises(tiny_gpt2):
    _, _, model = tiny_gpt2
    with pytest.raises(InputError, match="shape"):
        model.run_with_hooks(TOKENS, fwd_hooks=[("blocks.0.hook_resid_pre", lambda x, hook: x[:, :1])])


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_backward_hooks_and_gradients_through_hook_points(request, family):
    _, model = _hf_and_model(request, family)
    name = "blocks.1.hook_resid_pre"
    grads, acts = {}, {}

    def keep(x, hook):
        x.retain_grad()
        acts["x"] = x

    with model.hooks(fwd_hooks=[(name, keep)], bwd_hooks=[(name, lambda g, hook: grads.setdefault("g", g))]):
        loss = model(TOKENS, return_type="loss")
        loss.backward()
    assert grads["g"].shape == (B, T, model.cfg.d_model)
    assert torch.allclose(grads["g"], acts["x"].grad, atol=1e-6)
    assert grads["g"].abs().sum() > 0
    model.zero_grad(set_to_none=True)
    # a backward hook can also replace the gradient (here: cut it) -> no grad reaches block 0
    with model.hooks(bwd_hooks=[(name, lambda g, hook: torch.zeros_like(g))]):
        model(TOKENS, return_type="loss").backward()
    assert model.blocks[0].attn.qkv.weight.grad.abs().sum() == 0
    assert model.blocks[1].attn.qkv.weight.grad.abs().sum() > 0
    model.zero_grad(set_to_none=True)


def test_run_with_cache_gradients(tiny_gpt2):
    _, _, model = tiny_gpt2
    loss, cache = model.run_with_cache(TOKENS, names_filter="blocks.*.hook_resid_post", incl_bwd=True,
                                       return_type="loss")
    loss.backward()
    model.zero_grad(set_to_none=True)
    assert cache["blocks.0.hook_resid_post_grad"].shape == (B, T, model.cfg.d_model)


def test_stop_and_start_at_layer_compose(tiny_llama):
    _, _, model = tiny_llama
    with torch.no_grad():
        mid = model(TOKENS, stop_at_layer=1)
        assert mid.shape == (B, T, model.cfg.d_model)
        out = model(mid, start_at_layer=1)
        assert (out - model(TOKENS)).abs().max() < 1e-5


def test_run_with_cache_stops_early_and_converts(tiny_gpt2):
    _, _, model = tiny_gpt2
    ran = []
    with model.hooks([("blocks.1.hook_resid_pre", lambda x, hook: ran.append(1))]):
        out, cache = model.run_with_cache(TOKENS, names_filter="blocks.0.hook_resid_post", return_type=None,
                                          dtype=torch.float16)
    assert out is None and ran == []  # block 1 never ran
    assert list(cache.keys()) == ["blocks.0.hook_resid_post"]
    assert cache["blocks.0.hook_resid_post"].dtype == torch.float16


def test_hooks_active_during_generation(tiny_gpt2):
    _, _, model = tiny_gpt2
    calls = []
    model.generate(TOKENS[:1], 4, fwd_hooks=[("blocks.0.hook_resid_post", lambda x, hook: calls.append(x.shape))],
                   stop_at_eos=False)
    assert len(calls) == 4 and calls[0][1] == T and calls[1][1] == 1  # prompt, then one token per step


@pytest.mark.parametrize("name", ["blocks.0.ln1.hook_scale", "blocks.1.attn.hook_pattern", "blocks.0.hook_resid_mid"])
def test_in_place_edit_equals_returned_edit(tiny_gpt2, name):
    _, _, model = tiny_gpt2
    with torch.no_grad():
        returned = model.run_with_hooks(TOKENS, fwd_hooks=[(name, lambda x, hook: x * 1.3)])
        in_place = model.run_with_hooks(TOKENS, fwd_hooks=[(name, lambda x, hook: x.mul_(1.3))])
    assert torch.allclose(returned, in_place, atol=1e-6)
    assert not torch.allclose(returned, model(TOKENS), atol=1e-3)


def test_cached_head_results_are_lazy_but_exact(tiny_gpt2):
    _, _, model = tiny_gpt2
    name = "blocks.1.attn.hook_result"
    seen = {}
    with torch.no_grad():
        _, cache = model.run_with_cache(TOKENS, names_filter=name)
        model.run_with_hooks(TOKENS, fwd_hooks=[(name, lambda x, hook: seen.setdefault("x", x.clone()))])
        # with a user's edit active on the point, the cache must show the edited value
        with model.hooks([(name, lambda x, hook: x * 2)]):
            _, edited = model.run_with_cache(TOKENS, names_filter=name)
    assert list(cache.keys()) == [name]  # the helper z was not left in the cache
    torch.testing.assert_close(cache[name], seen["x"], atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(edited[name], 2 * seen["x"], atol=1e-5, rtol=1e-5)
