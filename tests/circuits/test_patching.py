"""Activation patching: every batched sweep must equal the naive loop (one forward pass per patch through
run_with_hooks, the way TransformerLens does it), entry by entry, for each hook layout and granularity,
in both directions; the induction model's sweep must single out its induction head."""

from __future__ import annotations

import itertools

import pytest
import torch

from mechscope.circuits.patching import (
    KLDivergence,
    LogitDiff,
    TokenProb,
    activation_patching,
    align_prompts,
    patch_block_components,
    patch_head_components,
    resolve_hook,
)
from mechscope.errors import HookNameError, InputError, MetricError, PromptMismatchError

pytestmark = pytest.mark.usefixtures("one_thread")
TOL = 1e-5


# ------------------------------------------------------------------------------ the naive reference


def _index(name: str, granularity: str, idx: tuple[int, ...]) -> tuple:
    """The activation index one patch overwrites (batch dim kept), written out per layout."""
    short = name.rsplit(".", 1)[-1]
    all_ = slice(None)
    if granularity == "layer":
        return (all_,)
    if short in ("hook_pattern", "hook_attn_scores"):  # [B, H, Tq, Tk]
        return {"position": lambda p: (all_, all_, p), "head": lambda h: (all_, h),
                "head_position": lambda h, p: (all_, h, p)}[granularity](*idx)
    if short in ("hook_q", "hook_k", "hook_v", "hook_z", "hook_result", "hook_rot_q", "hook_rot_k"):  # [B,T,H,E]
        return {"position": lambda p: (all_, p), "head": lambda h: (all_, all_, h),
                "head_position": lambda h, p: (all_, p, h)}[granularity](*idx)
    return {"position": lambda p: (all_, p), "neuron": lambda n: (Ellipsis, n)}[granularity](*idx)  # [B, T, D]


def naive_patching(model, clean, corrupted, metric, names, granularity, sizes, direction="denoise",
                   clean_mask=None, corrupted_mask=None, positions=None):
    """One full forward pass per patch. names: hook names (one per layer); sizes: the extent of each
    patched axis. Returns [len(names), *sizes] of metric values."""
    src, base = (clean, corrupted) if direction == "denoise" else (corrupted, clean)
    src_mask, base_mask = (clean_mask, corrupted_mask) if direction == "denoise" else (corrupted_mask, clean_mask)
    with torch.no_grad():
        _, cache = model.run_with_cache(src, names_filter=names, attention_mask=src_mask)
    ranges = [range(s) for s in sizes]
    out = torch.empty(len(names), *sizes)
    for li, name in enumerate(names):
        for idx in itertools.product(*ranges):
            real = tuple(positions[i] if (positions is not None and granularity.endswith("position")
                                          and k == len(idx) - 1) else i for k, i in enumerate(idx))
            ix = _index(name, granularity, real)

            def hook(act, hook, ix=ix, name=name):
                act = act.clone()
                act[ix] = cache[name][ix]
                return act

            with torch.no_grad():
                logits = model.run_with_hooks(base, attention_mask=base_mask, fwd_hooks=[(name, hook)])
            out[(li, *idx)] = metric(logits)
    return out


def _prompts(model, B=3, T=7, seed=0):
    g = torch.Generator().manual_seed(seed)
    V = model.cfg.d_vocab
    clean = torch.randint(4, V, (B, T), generator=g)
    corrupted = clean.clone()
    corrupted[:, 2] = torch.randint(4, V, (B,), generator=g)  # corrupt one early token, like IOI's S1
    corrupted[:, 4] = torch.randint(4, V, (B,), generator=g)
    ans = torch.randint(4, V, (B,), generator=g)
    wrong = torch.randint(4, V, (B,), generator=g)
    return clean, corrupted, ans, wrong


@pytest.fixture(scope="module")
def gpt2(tiny_gpt2):
    return tiny_gpt2[2]


@pytest.fixture(scope="module")
def llama(tiny_llama):
    return tiny_llama[2]


def _check(model, hook, granularity, metric, direction="denoise", **kw):
    clean, corrupted, _, _ = _prompts(model)
    names, swept = resolve_hook(model, hook, kw.get("layers"))
    got = activation_patching(model, clean, corrupted, metric, hook, granularity, direction=direction, **kw)
    # small batches: most batches then start after layer 0 / position 0 and reuse the unpatched prefix
    small = activation_patching(model, clean, corrupted, metric, hook, granularity, direction=direction,
                                batch_size=2, **kw)
    with torch.no_grad():
        _, cache = model.run_with_cache(clean, names_filter=names[0])
    from mechscope.circuits.patching import patch_axes

    act = cache[names[0]]
    dims = patch_axes(names[0], act.dim(), granularity)
    positions = kw.get("positions")
    sizes = [len(positions) if (positions is not None and d == dims[-1] and granularity.endswith("position"))
             else act.shape[d] for d in dims]
    want = naive_patching(model, clean, corrupted, metric, names, granularity, sizes, direction,
                          positions=positions)
    want = want if swept else want[0]
    assert got.shape == want.shape, (got.shape, want.shape)
    assert (got.cpu() - want).abs().max() <= TOL, (hook, granularity, direction, (got.cpu() - want).abs().max())
    assert (small.cpu() - want).abs().max() <= TOL, (hook, granularity, direction, (small.cpu() - want).abs().max())
    return got


# ------------------------------------------------------------------------------ equality with the naive loop

CASES = [
    ("resid_pre", "position"), ("resid_post", "layer"), ("resid_mid", "neuron"), ("attn_out", "position"),
    ("mlp_out", "position"), ("mlp_post", "neuron"), ("z", "head"), ("z", "head_position"), ("q", "head"),
    ("v", "head_position"), ("result", "head"), ("pattern", "head"), ("pattern", "position"),
    ("attn_scores", "head_position"), ("embed", "position"), ("ln_final.hook_normalized", "position"),
    ("blocks.1.hook_resid_mid", "layer"), ("blocks.{layer}.ln2.hook_normalized", "position"),
]


@pytest.mark.parametrize("hook,granularity", CASES)
def test_denoise_matches_naive_loop_gpt2(gpt2, hook, granularity):
    _, _, ans, wrong = _prompts(gpt2)
    _check(gpt2, hook, granularity, LogitDiff(ans, wrong))


@pytest.mark.parametrize("hook,granularity", [("resid_pre", "position"), ("z", "head_position"),
                                              ("k", "head"), ("k", "head_position"), ("rot_k", "position"),
                                              ("pattern", "head_position"), ("mlp_post", "neuron")])
@pytest.mark.parametrize("direction", ["denoise", "noise"])
def test_gqa_rotary_both_directions_match_naive_loop(llama, hook, granularity, direction):
    _, _, ans, wrong = _prompts(llama)
    got = _check(llama, hook, granularity, LogitDiff(ans, wrong), direction)
    if hook == "k":  # GQA: k has n_kv_heads heads
        assert got.shape[1] == llama.cfg.n_kv_heads


def test_generic_callable_metric_reads_every_position(gpt2):
    """A plain callable sees full logits [B, T, V] (no fast path); mean log-prob over all positions."""
    def metric(logits):
        return torch.log_softmax(logits, -1)[..., 5].mean()

    _check(gpt2, "resid_pre", "position", metric)
    _check(gpt2, "z", "head", metric, direction="noise")


def test_per_prompt_metric_and_builtin_metrics(gpt2):
    clean, corrupted, ans, wrong = _prompts(gpt2)
    per = activation_patching(gpt2, clean, corrupted, LogitDiff(ans, wrong, per_prompt=True), "resid_pre")
    mean = activation_patching(gpt2, clean, corrupted, LogitDiff(ans, wrong), "resid_pre")
    assert per.shape == (*mean.shape, 3)
    assert torch.allclose(per.mean(-1), mean, atol=1e-6)
    with torch.no_grad():
        ref = gpt2(clean)
    _check(gpt2, "attn_out", "position", TokenProb(ans))
    _check(gpt2, "resid_pre", "position", TokenProb(ans, pos=4, log=True))  # reads before late patches
    _check(gpt2, "mlp_out", "position", KLDivergence(ref))
    _check(gpt2, "resid_post", "position", LogitDiff(ans, wrong, pos=torch.tensor([6, 5, 3])))


def test_batching_options_do_not_change_results(gpt2):
    clean, corrupted, ans, wrong = _prompts(gpt2)
    m = LogitDiff(ans, wrong)
    ref = activation_patching(gpt2, clean, corrupted, m, "resid_pre", reuse_prefix=False, batch_size=1)
    for kw in ({}, {"batch_size": 1}, {"batch_size": 3}, {"max_memory": 1}, {"reuse_prefix": False},
               {"skip_unchanged": False}, {"skip_unchanged": False, "batch_size": 2}):
        assert (activation_patching(gpt2, clean, corrupted, m, "resid_pre", **kw) - ref).abs().max() <= TOL, kw
    sub = _check(gpt2, "resid_pre", "position", m, layers=[1], positions=[-1, 2])
    assert sub.shape == (1, 2)
    assert torch.allclose(sub, ref[[1]][:, [6, 2]], atol=TOL)


def test_only_patches_that_change_something_are_run(gpt2):
    """Only tokens 2 and 4 differ: resid_pre differs at positions 2 and 4 of layer 0 (the embeddings) and
    2..6 of layer 1; the other 7 of the 14 patches write what is already there and take no forward rows."""
    clean, corrupted, ans, wrong = _prompts(gpt2)
    rows = []
    with gpt2.hooks(fwd_hooks=[("ln_final.hook_normalized", lambda x, hook: rows.append(x.shape[0]))]):
        activation_patching(gpt2, clean, corrupted, LogitDiff(ans, wrong), "resid_pre", batch_size=1)
    B = clean.shape[0]
    assert sum(rows) - 2 * B == 7 * B  # minus the unpatched clean and corrupted runs


def test_normalize_and_endpoints(gpt2):
    """Patching the whole residual stream before layer 0 at every position turns one run into the other."""
    clean, corrupted, ans, wrong = _prompts(gpt2)
    m = LogitDiff(ans, wrong)
    with torch.no_grad():
        m_clean, m_corr = m(gpt2(clean)), m(gpt2(corrupted))
    full = activation_patching(gpt2, clean, corrupted, m, "blocks.0.hook_resid_pre", "layer")
    assert abs(float(full) - float(m_clean)) <= TOL
    noised = activation_patching(gpt2, clean, corrupted, m, "blocks.0.hook_resid_pre", "layer", direction="noise")
    assert abs(float(noised) - float(m_corr)) <= TOL
    raw = activation_patching(gpt2, clean, corrupted, m, "resid_pre")
    norm = activation_patching(gpt2, clean, corrupted, m, "resid_pre", normalize=True)
    assert torch.allclose(norm, (raw - m_corr) / (m_clean - m_corr), atol=1e-5)
    # positions never corrupted (0, 1, 3) restore nothing at layer 0
    assert norm[0, [0, 1, 3]].abs().max() <= 1e-4
    noise = activation_patching(gpt2, clean, corrupted, m, "resid_pre", direction="noise", normalize=True)
    assert (noise[0, [0, 1, 3]] - 1).abs().max() <= 1e-4


def test_text_prompts_padding_and_alignment(gpt2):
    clean = ["when mary and john went to the store john gave it to", "the cat sat on the mat"]
    corrupted = ["when mary and john went to the store mary gave it to", "the dog sat on the mat"]
    mary, john = gpt2.to_single_token(" mary"), gpt2.to_single_token(" john")
    m = LogitDiff([mary, mary], [john, john])
    got = activation_patching(gpt2, clean, corrupted, m, "resid_pre")  # rows of different lengths: left-padded
    ct, kt, cm, km = align_prompts(gpt2, clean, corrupted)
    assert torch.equal(cm, km)
    want = naive_patching(gpt2, ct, kt, m, [f"blocks.{i}.hook_resid_pre" for i in range(2)], "position",
                          [ct.shape[1]], clean_mask=cm, corrupted_mask=km)
    assert (got - want).abs().max() <= TOL
    # pairs of different token lengths: a typed error that names the fix, and the fix works
    bad = ["the big red cat sat on the mat", "the cat sat"]
    with pytest.raises(PromptMismatchError, match="align_prompts"):
        activation_patching(gpt2, clean, bad, m, "resid_pre")
    ct, kt, cm, km = align_prompts(gpt2, clean, bad)
    got = activation_patching(gpt2, ct, kt, m, "resid_pre", attention_mask=(cm, km), direction="noise")
    want = naive_patching(gpt2, ct, kt, m, [f"blocks.{i}.hook_resid_pre" for i in range(2)], "position",
                          [ct.shape[1]], "noise", clean_mask=cm, corrupted_mask=km)
    assert (got - want).abs().max() <= TOL


def test_component_helpers(llama):
    clean, corrupted, ans, wrong = _prompts(llama)
    m = LogitDiff(ans, wrong)
    heads = patch_head_components(llama, clean, corrupted, m)
    assert heads["z"].shape == (2, 4) and heads["k"].shape == (2, 2) and heads["pattern"].shape == (2, 4)
    blocks = patch_block_components(llama, clean, corrupted, m)
    assert set(blocks) == {"resid_pre", "attn_out", "mlp_out"}
    assert torch.equal(blocks["attn_out"], activation_patching(llama, clean, corrupted, m, "attn_out"))


# ------------------------------------------------------------------------------ bad input


def test_bad_input_raises_typed_errors(gpt2):
    clean, corrupted, ans, wrong = _prompts(gpt2)
    m = LogitDiff(ans, wrong)
    with pytest.raises(PromptMismatchError, match="same number of tokens"):
        activation_patching(gpt2, clean, corrupted[:, :-1], m)
    with pytest.raises(PromptMismatchError):
        activation_patching(gpt2, clean, corrupted[:2], m)
    with pytest.raises(MetricError, match="shape"):
        activation_patching(gpt2, clean, corrupted, lambda logits: logits[:, -1])  # [B, V], not a scalar
    with pytest.raises(MetricError, match="float|tensor"):
        activation_patching(gpt2, clean, corrupted, lambda logits: "high")
    with pytest.raises(MetricError, match="non-finite"):
        activation_patching(gpt2, clean, corrupted, lambda logits: logits.sum() * float("nan"))
    with pytest.raises(MetricError, match="callable"):
        activation_patching(gpt2, clean, corrupted, 3.0)
    with pytest.raises(MetricError, match="nothing to restore"):
        activation_patching(gpt2, clean, clean, m, normalize=True)
    with pytest.raises(InputError, match="no head dimension"):
        activation_patching(gpt2, clean, corrupted, m, "resid_pre", "head")
    with pytest.raises(InputError, match="per head"):
        activation_patching(gpt2, clean, corrupted, m, "z", "neuron")
    with pytest.raises(InputError, match="granularity"):
        activation_patching(gpt2, clean, corrupted, m, "z", "heads")
    with pytest.raises(HookNameError, match="Did you mean"):
        activation_patching(gpt2, clean, corrupted, m, "resid_prr")
    with pytest.raises(HookNameError):
        activation_patching(gpt2, clean, corrupted, m, "blocks.{layer}.hook_nope")
    with pytest.raises(InputError, match="direction"):
        activation_patching(gpt2, clean, corrupted, m, direction="forward")
    with pytest.raises(InputError, match="layers"):
        activation_patching(gpt2, clean, corrupted, m, layers=[5])
    with pytest.raises(InputError, match="positions"):
        activation_patching(gpt2, clean, corrupted, m, positions=[99])
    with pytest.raises(InputError, match="logits"):
        activation_patching(gpt2, clean, corrupted, m, "hook_unembed")
    with pytest.raises(MetricError, match="positions"):
        activation_patching(gpt2, clean, corrupted, LogitDiff(ans, wrong, pos=40))


# ------------------------------------------------------------------------------ a known circuit


@pytest.mark.slow
def test_induction_head_is_most_important(induction_2l_folder):
    from mechscope import zoo
    from mechscope.zoo.induction import repeated_tokens

    model = zoo.load(induction_2l_folder)
    n, B = 12, 8
    bos = model.to_tokens("a", prepend_bos=True)[0, 0].item()
    rep = repeated_tokens(B, n, model.cfg.d_vocab, bos, seed=1)  # [B, 1 + 2n]: BOS r r
    clean = rep[:, :-1]  # ends with r[n-2]: an induction head predicts r[n-1] from the first copy
    other = repeated_tokens(B, n, model.cfg.d_vocab, bos, seed=2)
    corrupted = clean.clone()
    corrupted[:, 1 : n + 1] = other[:, 1 : n + 1]  # a different first copy: nothing to copy from
    answer = rep[:, -1]
    metric = TokenProb(answer, log=True)
    res = activation_patching(model, clean, corrupted, metric, "z", "head_position", positions=[-1])[..., 0]
    want = naive_patching(model, clean, corrupted, metric, ["blocks.0.attn.hook_z", "blocks.1.attn.hook_z"],
                          "head_position", [model.cfg.n_heads, 1], positions=[clean.shape[1] - 1])[..., 0]
    assert (res - want).abs().max() <= TOL
    # the best head to restore is an induction head: in layer 1, and scored (near-)highest by induction_score.
    # (This zoo model grows several layer-1 induction heads of almost equal score, ~0.92 each, so the two
    # argmaxes need not be the same head; every layer-1 head must beat every layer-0 head.)
    score = zoo.induction_score(model)
    best = int(res.flatten().argmax())
    assert best // model.cfg.n_heads == int(score.flatten().argmax()) // model.cfg.n_heads == 1
    assert score.flatten()[best] >= 0.9 * score.max(), (res, score)
    assert res[1].min() > res[0].max(), res
