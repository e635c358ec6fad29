"""ActivationCache: TransformerLens short names, residual decompositions, DLA helpers, files."""

from __future__ import annotations

import os

import pytest
import torch

from mechscope.errors import CorruptFileError, HookNameError, InputError
from mechscope.models.cache import ActivationCache, act_name
from mechscope.models.loading import from_pretrained

TOKENS = torch.randint(4, 64, (2, 9), generator=torch.Generator().manual_seed(0))
TOL = 1e-5


def close(a: torch.Tensor, b: torch.Tensor, tol: float = TOL) -> bool:
    return a.shape == b.shape and float((a - b).detach().abs().max()) <= tol


@pytest.fixture(scope="module")
def run(tiny_gpt2):
    """(model, logits, cache) of the unprocessed tiny GPT-2 (perturbed LN weights and biases)."""
    model = from_pretrained(str(tiny_gpt2[1]))
    with torch.no_grad():
        logits, cache = model.run_with_cache(TOKENS)
    return model, logits, cache


@pytest.fixture(scope="module")
def folded(tiny_gpt2):
    model = from_pretrained(str(tiny_gpt2[1])).process_weights()
    with torch.no_grad():
        logits, cache = model.run_with_cache(TOKENS)
    return model, logits, cache


def test_short_names_equal_full_names(run):
    model, _, cache = run
    L = model.cfg.n_layers
    pairs = {
        ("resid_post", 1): "blocks.1.hook_resid_post", ("resid_pre", -1): f"blocks.{L - 1}.hook_resid_pre",
        ("pattern", 0): "blocks.0.attn.hook_pattern", ("attn", 0): "blocks.0.attn.hook_pattern",
        ("q", 1, "attn"): "blocks.1.attn.hook_q", ("q", 1): "blocks.1.attn.hook_q",
        ("scale", 1, "ln1"): "blocks.1.ln1.hook_scale", ("normalized", 0, "ln2"): "blocks.0.ln2.hook_normalized",
        ("post", 0): "blocks.0.mlp.hook_post", ("attn_out", -2): f"blocks.{L - 2}.hook_attn_out",
        "embed": "hook_embed", "pos_embed": "hook_pos_embed", "scale": "ln_final.hook_scale",
        "ln_final.hook_scale": "ln_final.hook_scale", ("resid_mid", 0, None): "blocks.0.hook_resid_mid",
    }
    for short, full in pairs.items():
        assert cache[short] is cache[full], short
        assert short in cache and full in cache
    assert act_name("resid_post_grad", 3) == "blocks.3.hook_resid_post_grad"


def test_mapping_protocol_and_repr(run):
    model, logits, cache = run
    assert len(cache) == len(list(cache)) == len(cache.keys()) == len(model.hook_names)
    assert set(cache) == set(model.hook_names)  # names_filter=None caches every hook (incl. hook_result)
    assert dict(cache.items()).keys() == set(cache.keys())
    assert close(cache["hook_unembed"], logits, 0)
    assert "nonsense" not in cache and ("resid_post", 99) not in cache and 5 not in cache
    assert not hasattr(cache, "__setitem__")
    r = repr(cache)
    assert r.startswith("ActivationCache(") and "with batch dim" in r and "more" in r


def test_unknown_and_uncached_names_raise(run, tiny_gpt2):
    _, _, cache = run
    with pytest.raises(HookNameError, match="blocks.0.hook_resid_post"):
        cache["blocks.0.hook_resid_pots"]  # typo: the message suggests the close match
    with pytest.raises(HookNameError):
        cache["resid_post", 7]
    with pytest.raises(KeyError):  # HookNameError is a KeyError, so .get works
        cache["nope"]
    assert cache.get("nope") is None
    model = from_pretrained(str(tiny_gpt2[1]))
    _, small = model.run_with_cache(TOKENS, names_filter="blocks.0.hook_resid_pre")
    with pytest.raises(HookNameError, match="not cached.*blocks.0.hook_resid_pre"):
        small["resid_post", 0]


def test_stack_activation(run):
    model, _, cache = run
    st = cache.stack_activation("resid_post")
    assert st.shape == (model.cfg.n_layers, *TOKENS.shape, model.cfg.d_model)
    assert close(st[1], cache["resid_post", 1], 0)
    assert close(cache.stack_activation("scale", sublayer_type="ln2")[0], cache["scale", 0, "ln2"], 0)


def test_accumulated_resid(run):
    model, _, cache = run
    L = model.cfg.n_layers
    acc, labels = cache.accumulated_resid(return_labels=True)
    assert acc.shape == (L + 1, *TOKENS.shape, model.cfg.d_model)
    assert labels == [f"{i}_pre" for i in range(L)] + ["final_post"]
    assert close(acc[-1], cache["resid_post", -1], 0) and close(acc[0], cache["resid_pre", 0], 0)
    mid, labels = cache.accumulated_resid(layer=1, incl_mid=True, return_labels=True)
    assert labels == ["0_pre", "0_mid", "1_pre"] and close(mid[1], cache["resid_mid", 0], 0)
    last = cache.accumulated_resid(pos_slice=-1)
    assert last.shape == (L + 1, TOKENS.shape[0], model.cfg.d_model)
    assert close(last[-1], cache["resid_post", -1][:, -1], 0)


def test_decompose_resid_sums_to_the_residual(run):
    model, _, cache = run
    L = model.cfg.n_layers
    parts, labels = cache.decompose_resid(return_labels=True)
    assert labels[:2] == ["embed", "pos_embed"] and len(labels) == 2 + 2 * L
    assert close(parts.sum(0), cache["resid_post", -1])
    for k in range(L):
        assert close(cache.decompose_resid(layer=k).sum(0), cache["resid_pre", k])
    assert close(cache.decompose_resid(layer=1, mlp_input=True).sum(0), cache["resid_mid", 1])
    attn = cache.decompose_resid(mode="attn", incl_embeds=False)
    assert attn.shape[0] == L and close(attn[1], cache["attn_out", 1], 0)
    assert cache.decompose_resid(mode="mlp", pos_slice=(2, 5)).shape == (2 + L, 2, 3, model.cfg.d_model)
    with pytest.raises(InputError):
        cache.decompose_resid(mode="heads")


def test_stack_head_results_sum_to_attn_out(run, tiny_gpt2):
    model, _, cache = run
    L, H = model.cfg.n_layers, model.cfg.n_heads
    heads, labels = cache.stack_head_results(return_labels=True)
    assert heads.shape == (L * H, *TOKENS.shape, model.cfg.d_model) and labels[H + 1] == "L1H1"
    for la in range(L):
        total = heads[la * H : (la + 1) * H].sum(0) + model.blocks[la].attn.b_O
        assert close(total, cache["attn_out", la])
        assert close(heads[la * H : (la + 1) * H], cache["result", la].movedim(2, 0))  # equals hook_result
    # without hook_result in the cache: computed from hook_z and W_O
    _, zc = from_pretrained(str(tiny_gpt2[1])).run_with_cache(TOKENS, names_filter=lambda n: "result" not in n)
    assert "blocks.0.attn.hook_result" not in zc
    assert close(zc.stack_head_results(), heads)
    assert close(zc.stack_head_results(layer=1, pos_slice=-1), heads[:H, :, -1])
    rest = zc.stack_head_results(incl_remainder=True)
    assert close(rest.sum(0), cache["resid_post", -1])


def test_apply_ln_to_stack_matches_ln_final(run):
    model, _, cache = run
    ln = model.ln_final
    final = cache.accumulated_resid()[-1:]  # [1, B, T, D]
    normed = cache.apply_ln_to_stack(final)[0] * ln.w + ln.b  # TL: scale only; weight/bias are ours to add
    assert close(normed, cache["ln_final.hook_normalized"])
    assert close(cache.accumulated_resid(apply_ln=True)[-1] * ln.w + ln.b, cache["ln_final.hook_normalized"])
    ln1 = model.blocks[1].ln1
    pre = cache.apply_ln_to_stack(cache["resid_pre", 1][None], layer=1)[0] * ln1.w + ln1.b
    assert close(pre, cache["normalized", 1, "ln1"])
    ln2 = model.blocks[0].ln2
    mid = cache.apply_ln_to_stack(cache["resid_mid", 0][None], layer=0, mlp_input=True)[0] * ln2.w + ln2.b
    assert close(mid, cache["normalized", 0, "ln2"])
    one = cache.apply_ln_to_stack(final, batch_slice=1) * ln.w + ln.b  # [1, T, D]: example 1 only
    assert close(one[0], cache["ln_final.hook_normalized"][1])
    # decomposition after apply_ln still sums to the normalised residual
    parts = cache.decompose_resid(apply_ln=True)
    assert close(parts.sum(0) * ln.w + ln.b, cache["ln_final.hook_normalized"])


def test_logit_attrs_sum_to_logit_difference(folded):
    model, logits, cache = folded
    assert model.ln_final.w is None
    right, wrong = TOKENS[:, -1], TOKENS[:, 0]  # [B] one per example, broadcast over positions
    parts = cache.decompose_resid()  # raw: logit_attrs applies the final norm's scaling itself (TL)
    attrs = cache.logit_attrs(parts, right, wrong)  # [n, B, T]
    assert attrs.shape == parts.shape[:-1]
    b = torch.arange(TOKENS.shape[0])
    diff = logits[b, :, right] - logits[b, :, wrong]  # [B, T]
    diff = diff - (model.b_U[right] - model.b_U[wrong])[:, None]
    assert close(attrs.sum(0), diff, 1e-4)
    # per-position tokens [B, T] and a single token id
    attrs = cache.logit_attrs(parts, TOKENS)
    expect = logits.gather(-1, TOKENS[..., None])[..., 0] - model.b_U[TOKENS]
    assert close(attrs.sum(0), expect, 1e-4)
    assert cache.logit_attrs(parts, 5).shape == parts.shape[:-1]
    heads = cache.logit_attrs(cache.stack_head_results(pos_slice=-1), 5, 6, pos_slice=-1)
    assert heads.shape == (model.cfg.n_layers * model.cfg.n_heads, TOKENS.shape[0])
    with pytest.raises(InputError):
        cache.logit_attrs(parts, TOKENS, wrong)


def test_to_and_remove_batch_dim(run):
    _, _, cache = run
    half = cache.to("cpu", torch.float16)
    assert half is not cache and half["resid_post", 0].dtype == torch.float16
    assert cache["resid_post", 0].dtype == torch.float32  # the original is untouched
    with pytest.raises(InputError, match="batch size 1"):
        cache.remove_batch_dim()
    model = run[0]
    _, one = model.run_with_cache(TOKENS[:1])
    flat = one.remove_batch_dim()
    assert not flat.has_batch_dim and flat["resid_post", 0].shape == TOKENS.shape[1:] + (model.cfg.d_model,)
    assert close(flat.decompose_resid().sum(0), flat["resid_post", -1])
    assert close(flat.stack_head_results(layer=1).sum(0) + model.blocks[0].attn.b_O, flat["attn_out", 0])


def test_save_load_round_trip(run, tmp_path):
    model, _, cache = run
    path = tmp_path / "cache.safetensors"
    cache.save(path)
    assert os.listdir(tmp_path) == ["cache.safetensors"]  # the temp file was renamed away
    back = ActivationCache.load(path, model=model)
    assert set(back) == set(cache) and back.has_batch_dim
    assert all(torch.equal(back[k], cache[k]) for k in cache)
    assert close(back.stack_head_results(), cache.stack_head_results(), 0)
    alone = ActivationCache.load(path)  # no model: names, layers and norm type come from the metadata
    assert alone.model is None and close(alone.accumulated_resid(apply_ln=True), cache.accumulated_resid(apply_ln=True), 0)
    assert alone["resid_post", -1].shape == cache["resid_post", -1].shape
    with pytest.raises(InputError, match="model="):
        alone.logit_attrs(alone.decompose_resid(), 3)
    cache.save(path)  # overwriting is atomic too
    assert os.listdir(tmp_path) == ["cache.safetensors"]


def test_corrupt_files_raise(run, tmp_path):
    _, _, cache = run
    path = tmp_path / "c.safetensors"
    cache.save(path)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])  # truncated
    with pytest.raises(CorruptFileError):
        ActivationCache.load(path)
    path.write_bytes(b"\x00" * 64)
    with pytest.raises(CorruptFileError):
        ActivationCache.load(path)
    from safetensors.torch import save_file

    save_file({"x": torch.zeros(2)}, str(path))  # valid safetensors, but not a saved cache
    with pytest.raises(CorruptFileError, match="not a saved ActivationCache"):
        ActivationCache.load(path)
    with pytest.raises(InputError):
        ActivationCache.load(tmp_path / "missing.safetensors")


def test_gradients_are_cached_with_grad_suffix(tiny_gpt2):
    model = from_pretrained(str(tiny_gpt2[1]))
    logits, cache = model.run_with_cache(TOKENS, names_filter="blocks.*.hook_resid_post", incl_bwd=True)
    logits[..., 3].sum().backward()  # gradients arrive after the cache was built
    g = cache["resid_post_grad", -1]
    assert g.shape == cache["resid_post", -1].shape and "blocks.0.hook_resid_post_grad" in cache
