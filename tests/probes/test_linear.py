"""AUROC, the torch logistic / difference-of-means fits and cross-validation, on synthetic data."""

from __future__ import annotations

import itertools

import pytest
import torch

from mechscope.errors import InputError
from mechscope.probes import auroc, cross_validate, fit_linear
from mechscope.probes.linear import stratified_folds

pytestmark = pytest.mark.usefixtures("one_thread")


def planted(n=240, d=40, signal=2.0, seed=0):
    """Features with one planted label direction, badly scaled columns (as residual streams have)."""
    g = torch.Generator().manual_seed(seed)
    y = torch.arange(n) % 2
    X = torch.randn(n, d, generator=g)
    X[:, 3] += signal * (2 * y - 1)
    X = X * torch.logspace(-2, 2, d) + 5  # scales 0.01 .. 100, offset
    return X, y


def test_auroc_is_the_pairwise_probability_with_ties_half():
    g = torch.Generator().manual_seed(0)
    for _ in range(10):
        s = torch.randint(0, 4, (30,), generator=g).float()  # many ties
        y = torch.randint(0, 2, (30,), generator=g)
        pos, neg = s[y == 1], s[y == 0]
        want = sum(1.0 if a > b else 0.5 if a == b else 0.0 for a, b in itertools.product(pos, neg))
        assert auroc(s, y) == pytest.approx(want / (len(pos) * len(neg)), abs=1e-12)
    assert auroc([1, 2, 3], [0, 1, 1]) == 1.0 and auroc([3, 2, 1], [0, 1, 1]) == 0.0
    assert auroc([1.0, 1.0], [0, 1]) == 0.5
    assert auroc([1.0, 2.0], [1, 1]) != auroc([1.0, 2.0], [1, 1])  # NaN: one class only


def test_logistic_matches_sklearn_objective_and_auroc():
    sk = pytest.importorskip("sklearn.linear_model")
    from sklearn.metrics import roc_auc_score

    X, y = planted(signal=0.6)
    tr, te = torch.arange(len(y)) < 160, torch.arange(len(y)) >= 160
    for C in (0.01, 1.0):
        fit = fit_linear(X[tr], y[tr], "logistic", C=C)
        Z = (X.double() - fit.mean) / fit.std
        ref = sk.LogisticRegression(C=C, max_iter=10_000, tol=1e-10).fit(Z[tr].numpy(), y[tr].numpy())
        assert torch.allclose(torch.from_numpy(ref.coef_[0]), fit.weight, atol=1e-5)
        ours = auroc(fit.score(X[te]), y[te])
        theirs = roc_auc_score(y[te].numpy(), ref.decision_function(Z[te].numpy()))
        assert abs(ours - theirs) < 1e-3


def test_wide_features_fit_in_the_span_of_the_examples():
    """n < d: the fit runs in the examples' span; it is the same optimum as the full-dimensional one."""
    sk = pytest.importorskip("sklearn.linear_model")
    X, y = planted(n=60, d=200, signal=1.0)
    fit = fit_linear(X, y, "logistic", C=0.5)
    Z = (X.double() - fit.mean) / fit.std
    ref = sk.LogisticRegression(C=0.5, max_iter=10_000, tol=1e-10).fit(Z.numpy(), y.numpy())
    assert torch.allclose(torch.from_numpy(ref.coef_[0]), fit.weight, atol=1e-5)


def test_planted_direction_is_found_and_random_labels_are_chance():
    X, y = planted(signal=2.0)
    for method in ("logistic", "diffmeans"):
        cv = cross_validate(X, y, method)
        assert cv.auroc > 0.9, (method, cv)
        shuffled = y[torch.randperm(len(y), generator=torch.Generator().manual_seed(1))]
        X0, _ = planted(signal=0.0)
        assert abs(cross_validate(X0, shuffled, method).auroc - 0.5) < 0.15
    fit = fit_linear(X, y, "logistic")  # C chosen by inner CV, from the grid
    assert fit.C in (1e-3, 1e-2, 1e-1, 1.0, 10.0)
    assert int(torch.argmax(fit.weight.abs())) == 3  # standardised: the planted column dominates


def test_folds_are_stratified_deterministic_and_groups_stay_together():
    y = torch.tensor([0] * 10 + [1] * 20)
    f = stratified_folds(y, 5, seed=0)
    assert torch.equal(f, stratified_folds(y, 5, seed=0))
    for k in range(5):
        assert int((y[f == k] == 1).sum()) == 4 and int((y[f == k] == 0).sum()) == 2
    X, y = planted(n=40)
    groups = torch.arange(40) // 2  # twins
    cv = cross_validate(X, y, "diffmeans", groups=groups)
    assert len(cv.fold_auroc) == 5
    with pytest.raises(InputError, match="each label"):
        cross_validate(X[:3], torch.tensor([0, 1, 1]))
