"""Acceptance: every architecture recovers known sparse features (synthetic, 64 features in 32 dims).

Each run trains 128 latents for 1-1.5k steps of 512 rows (under ~10 s on a quiet core) and must find
more than 90% of the 64 true features with cosine > 0.9. Skip-transcoders are checked on their
response to each feature (`response_recovery`): their decoder rows are only defined up to a linear
function of the input features, so W_dec alone can miss for a perfect coder.
"""

from __future__ import annotations

import pytest
import torch

from mechscope.sae.metrics import evaluate
from mechscope.sae.synthetic import random_features, recovery, response_recovery, sparse_codes, synthetic_data
from mechscope.sae.train import train

pytestmark = pytest.mark.usefixtures("one_thread")

D, F, D_OUT = 32, 64, 40
DATA = synthetic_data(2**15, D, F, p_active=0.05, seed=0)  # ≈ 3.2 active features per row
COMMON = dict(n_latents=128, batch_size=512, steps=1200, seed=0, progress=False)

CASES = {
    "relu": dict(arch="relu", l1_coeff=0.0625),
    "topk": dict(arch="topk", k=4),
    "batchtopk": dict(arch="batchtopk", k=4),
    "jumprelu": dict(arch="jumprelu", l0_coeff=0.01),
    "gated": dict(arch="gated", l1_coeff=0.0625),
    "matryoshka": dict(arch="matryoshka", k=4, matryoshka_prefixes=[64, 128]),
}


def check(fraction: float, mmcs: float, fve: float) -> None:
    assert fraction > 0.9, (fraction, mmcs, fve)
    assert mmcs > 0.95 and fve > 0.7


@pytest.mark.slow
@pytest.mark.parametrize("name", list(CASES))
def test_autoencoders_recover_the_true_features(name):
    coder = train(DATA.x, **COMMON, **CASES[name])
    r = recovery(coder, DATA.features)
    e = evaluate(coder, DATA.x, n_tokens=8192)
    check(r.fraction, r.mmcs, e.fve)


@pytest.mark.slow
def test_transcoder_recovers_the_mapped_features():
    """y = M x: latent i must read feature f_i and write M f_i."""
    M = torch.randn(D_OUT, D, generator=torch.Generator().manual_seed(5)) / D**0.5
    y = DATA.x @ M.T
    coder = train((DATA.x, y), arch="topk", k=4, lr=5e-3, **{**COMMON, "steps": 1500})
    r = recovery(coder, DATA.features @ M.T)
    check(r.fraction, r.mmcs, evaluate(coder, (DATA.x, y), n_tokens=8192).fve)


@pytest.mark.slow
def test_skip_transcoder_recovers_the_sparse_part_of_an_affine_plus_sparse_map():
    """y = L x + Σ c_i g_i: W_skip takes the linear part, latent i writes g_i."""
    L = torch.randn(D_OUT, D, generator=torch.Generator().manual_seed(5)) / D**0.5
    G = random_features(F, D_OUT, seed=7)
    y = DATA.x @ L.T + DATA.codes @ G
    coder = train((DATA.x, y), arch="topk", k=4, skip=True, **COMMON)
    r = response_recovery(coder, DATA.features, G, linear_map=L)
    check(r.fraction, r.mmcs, evaluate(coder, (DATA.x, y), n_tokens=8192).fve)


def test_synthetic_data_is_seeded_sparse_and_can_be_correlated():
    a, b = synthetic_data(1000, 8, 16, seed=1), synthetic_data(1000, 8, 16, seed=1)
    assert torch.equal(a.x, b.x) and not torch.equal(a.x, synthetic_data(1000, 8, 16, seed=2).x)
    assert torch.allclose(a.features.norm(dim=1), torch.ones(16))
    assert torch.allclose(a.x, a.codes @ a.features)
    codes = sparse_codes(20000, 8, p_active=0.1, correlation=0.8, group_size=4, seed=0)
    on = (codes > 0).float()
    assert on.mean().item() == pytest.approx(0.1, abs=0.01)  # the marginal rate is kept
    c = torch.corrcoef(on.T)
    assert c[0, 1] > 0.3 and abs(c[0, 4]) < 0.05  # same group fire together, other groups do not
    vals = codes[codes > 0]
    assert vals.min() >= 0.5 and vals.max() <= 1.5


def test_recovery_metric_by_hand():
    from mechscope.sae.coder import SparseCoder
    from mechscope.sae.config import SAEConfig

    c = SparseCoder(SAEConfig(arch="topk", d_in=2, n_latents=2, k=1))
    with torch.no_grad():
        c.W_dec.copy_(torch.tensor([[1.0, 0.0], [0.6, 0.8]]))
    true = torch.tensor([[2.0, 0.0], [0.0, 1.0], [-1.0, 0.0]])
    r = recovery(c, true)
    assert r.max_cos.tolist() == pytest.approx([1.0, 0.8, -0.6])  # signs count: a row is a direction
    assert r.fraction == pytest.approx(1 / 3) and r.mmcs == pytest.approx(0.4)
