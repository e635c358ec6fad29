"""Linear probes on standardised features, fitted with torch (no scikit-learn in the core).

    fit = fit_linear(X, y, method="logistic", C="cv")   # LinearFit(mean, std, weight, bias, C)
    scores = fit.score(X)                                # [n] logits: > 0 predicts label 1

Two methods:
- "logistic": L2-regularised logistic regression with scikit-learn's objective,
  C * sum_i logloss_i + |w|^2 / 2 (the intercept unpenalised), so C has the meaning users know from there.
  C="cv" picks C from C_GRID by the held-out log-loss of an inner k-fold cross-validation (log-loss, not
  AUROC: AUROC saturates at 1 for many C on easy data and cannot break the tie).
- "diffmeans": the difference-of-means ("mass-mean") direction mu_1 - mu_0 through the midpoint of the
  class means; no parameter to choose, robust when there are fewer examples than dimensions.

Why standardised: residual streams have a few dimensions with huge variance (massive activations), which
would otherwise dominate both the L2 penalty and the mean difference. The mean and std of the training
features are part of the fit (and of a saved probe).

Solver: Newton's method with a backtracking line search, in float64. When there are fewer examples than
features the optimum lies in the span of the (centred) examples, so the fit runs in that n-dimensional
basis (an SVD), which makes a 576-dimensional residual probe on a few hundred prompts take milliseconds.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Literal, NamedTuple

import torch

from mechscope.errors import InputError
from mechscope.probes.metrics import accuracy, auroc

Method = Literal["logistic", "diffmeans"]
METHODS = ("logistic", "diffmeans")
C_GRID = (1e-3, 1e-2, 1e-1, 1.0, 10.0)
INNER_FOLDS = 3  # folds of the inner split that chooses C
DEFAULT_C: float | str = "cv"


class LinearFit(NamedTuple):
    """A linear probe in the standardised space: score(x) = ((x - mean) / std) . weight + bias."""

    mean: torch.Tensor  # [d] float64
    std: torch.Tensor  # [d] float64 (zero-variance features get 1)
    weight: torch.Tensor  # [d] float64
    bias: float
    C: float | None  # the regularisation used (None for diffmeans)

    def score(self, X: torch.Tensor) -> torch.Tensor:
        """[n, d] features -> [n] float64 logits."""
        Z = (X.double() - self.mean) / self.std
        return Z @ self.weight + self.bias


class CVResult(NamedTuple):
    """Cross-validated metrics: mean over the outer folds, each scored by a probe fitted without it."""

    auroc: float
    accuracy: float
    fold_auroc: list[float]
    fold_accuracy: list[float]


SMALL = 4_000_000  # features (rows x dims) up to which the fits run on one thread


@contextlib.contextmanager
def small_problem_threads(X: torch.Tensor) -> Iterator[None]:
    """Run the fits of a small problem on one thread. Why: they are hundreds of small matrix products and
    solves, where a thread pool only adds synchronisation; on a busy 2-core machine two threads made a
    130 x 576 cross-validation 80x slower (63 s vs 0.8 s). Large problems keep torch's thread count."""
    n = torch.get_num_threads()
    if X.numel() > SMALL or n == 1:
        yield
        return
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(n)


def check_method(method: str) -> None:
    if method not in METHODS:
        raise InputError(f"Unknown probe method {method!r}; use one of {', '.join(METHODS)}.")


def check_C(C) -> None:
    if C == "cv":
        return
    if isinstance(C, bool) or not isinstance(C, int | float) or not C > 0:
        raise InputError(f"C must be a positive number (inverse L2 strength, as in scikit-learn) or 'cv', got {C!r}.")


def standardize(X: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(mean [d], std [d]) of the rows of X, in float64; a constant feature gets std 1."""
    X = X.double()
    mean = X.mean(0)
    std = X.std(0, unbiased=False)
    return mean, torch.where(std > 1e-12 * (1 + mean.abs()), std, torch.ones_like(std))


# ---------------------------------------------------------------------------- logistic regression


def _objective(P: torch.Tensor, y: torch.Tensor, theta: torch.Tensor, C: float) -> float:
    z = P @ theta[:-1] + theta[-1]
    # log(1 + e^z) - y z, stably
    loss = torch.nn.functional.softplus(z) - y * z
    return float(C * loss.sum() + 0.5 * theta[:-1].pow(2).sum())


def _newton(P: torch.Tensor, y: torch.Tensor, C: float, theta: torch.Tensor | None = None,
            max_iter: int = 100, tol: float = 1e-10) -> torch.Tensor:
    """argmin_theta C sum logloss(P w + b, y) + |w|^2/2 for P [n, r] float64; theta = [w; b] [r + 1]."""
    n, r = P.shape
    P1 = torch.cat([P, torch.ones(n, 1, dtype=P.dtype)], 1)
    reg = torch.ones(r + 1, dtype=P.dtype)
    reg[-1] = 1e-10  # intercept unpenalised (a tiny ridge keeps the Hessian invertible)
    theta = torch.zeros(r + 1, dtype=P.dtype) if theta is None else theta.clone()
    f = _objective(P, y, theta, C)
    for _ in range(max_iter):
        p = torch.sigmoid(P1 @ theta)
        g = C * (P1.T @ (p - y)) + reg * theta
        g[-1] -= reg[-1] * theta[-1]
        H = C * (P1.T * (p * (1 - p))) @ P1 + torch.diag(reg)
        step = torch.linalg.solve(H, g)
        t = 1.0
        while True:
            new = theta - t * step
            f_new = _objective(P, y, new, C)
            if f_new <= f - 1e-4 * t * float(g @ step) or t < 1e-8:
                break
            t *= 0.5
        if f_new > f:  # no descent left at machine precision: theta is the optimum
            break
        theta, decrease, f = new, f - f_new, f_new
        if float((t * step).abs().max()) < tol or decrease <= 1e-14 * max(1.0, abs(f)):
            break
    return theta


class _Basis(NamedTuple):
    """Standardised training features in the span of the examples: Z = P V^T."""

    P: torch.Tensor  # [n, r]
    V: torch.Tensor | None  # [d, r] or None (Z itself when n >= d)


def _basis(Z: torch.Tensor) -> _Basis:
    n, d = Z.shape
    if n >= d:
        return _Basis(Z, None)
    U, S, Vh = torch.linalg.svd(Z, full_matrices=False)
    keep = S > S.max() * 1e-10 if S.numel() else S > 0
    return _Basis(U[:, keep] * S[keep], Vh[keep].T)


def _logistic_in_basis(B: _Basis, y: torch.Tensor, C: float, theta=None) -> torch.Tensor:
    return _newton(B.P, y, C, theta)


def _weight(B: _Basis, theta: torch.Tensor) -> torch.Tensor:
    return theta[:-1] if B.V is None else B.V @ theta[:-1]


def stratified_folds(y: torch.Tensor, k: int, seed: int = 0) -> torch.Tensor:
    """[n] fold index in 0..k-1, each class spread evenly over the folds, deterministic under `seed`."""
    g = torch.Generator().manual_seed(seed)
    fold = torch.empty(len(y), dtype=torch.long)
    offset = 0
    for cls in (0, 1):
        idx = torch.nonzero(y == cls).reshape(-1)
        idx = idx[torch.randperm(len(idx), generator=g)]
        fold[idx] = (torch.arange(len(idx)) + offset) % k
        offset += len(idx)
    return fold


def _choose_C(Z: torch.Tensor, y: torch.Tensor, seed: int) -> float:
    """The C of C_GRID with the lowest held-out log-loss over an inner k-fold split (ties: the smaller C)."""
    k = min(INNER_FOLDS, int(y.sum()), int((1 - y).sum()))
    if k < 2:
        return 1.0  # too few examples to cross-validate: scikit-learn's default
    fold = stratified_folds(y, k, seed + 1)
    losses = torch.zeros(len(C_GRID), dtype=torch.float64)
    for f in range(k):
        tr, te = fold != f, fold == f
        B = _basis(Z[tr])
        theta = None
        for i, C in enumerate(C_GRID):  # increasing C, warm-started
            theta = _logistic_in_basis(B, y[tr], C, theta)
            z = Z[te] @ _weight(B, theta) + theta[-1]
            losses[i] += float((torch.nn.functional.softplus(z) - y[te] * z).sum())
    return C_GRID[int(torch.argmin(losses))]


# ---------------------------------------------------------------------------- fit and cross-validate


def fit_linear(X: torch.Tensor, y: torch.Tensor, method: Method = "logistic", C: float | str = DEFAULT_C,
               seed: int = 0) -> LinearFit:
    """Fit a probe on features X [n, d] with 0/1 labels y [n] (see the module docstring)."""
    check_method(method)
    check_C(C)
    with small_problem_threads(X):
        return _fit_linear(X, y, method, C, seed)


def _fit_linear(X: torch.Tensor, y: torch.Tensor, method: Method, C: float | str, seed: int) -> LinearFit:
    y = y.double()
    mean, std = standardize(X)
    Z = (X.double() - mean) / std
    if method == "diffmeans":
        m1, m0 = Z[y == 1].mean(0), Z[y == 0].mean(0)
        w = m1 - m0
        return LinearFit(mean, std, w, float(-w @ (m1 + m0) / 2), None)
    C_used = _choose_C(Z, y, seed) if C == "cv" else float(C)
    B = _basis(Z)
    theta = _logistic_in_basis(B, y, C_used)
    return LinearFit(mean, std, _weight(B, theta), float(theta[-1]), C_used)


def group_scores(scores: torch.Tensor, groups: torch.Tensor | None, n_groups: int | None = None) -> torch.Tensor:
    """Mean score per group (e.g. per text, when every token is a row); identity when groups is None."""
    if groups is None:
        return scores
    n = int(groups.max()) + 1 if n_groups is None else n_groups
    total = torch.zeros(n, dtype=scores.dtype).index_add_(0, groups, scores)
    count = torch.zeros(n, dtype=scores.dtype).index_add_(0, groups, torch.ones_like(scores))
    return total / count.clamp(min=1)


def _unit_folds(unit_y: torch.Tensor, k: int, seed: int, groups: torch.Tensor | None) -> torch.Tensor:
    """[n_units] fold of each unit (text): stratified by label, or, with groups [n_units], whole groups."""
    if groups is None:
        return stratified_folds(unit_y, k, seed)
    _, item = torch.unique(groups, return_inverse=True)
    n_items = int(item.max()) + 1
    g = torch.Generator().manual_seed(seed)
    item_fold = torch.empty(n_items, dtype=torch.long)
    item_fold[torch.randperm(n_items, generator=g)] = torch.arange(n_items) % k
    return item_fold[item]


def cross_validate(X: torch.Tensor, y: torch.Tensor, method: Method = "logistic", C: float | str = DEFAULT_C,
                   folds: int = 5, seed: int = 0, text_of: torch.Tensor | None = None,
                   groups: torch.Tensor | None = None) -> CVResult:
    """k-fold cross-validated AUROC and accuracy (means over the folds).

    text_of [n] (position "all": the text of each token row): a text's rows stay in one fold and a text is
    scored by the mean of its rows' scores, as Probe.score does. groups [n_texts] (any integer key per text,
    e.g. the city a true statement and its false twin share): texts of one group stay in one fold, so a probe
    is never scored on the twin of an example it was trained on (without it, stratified folds)."""
    check_method(method)
    y = y.long()
    if text_of is None:
        unit_y, unit = y, torch.arange(len(y))
    else:
        unit = text_of
        unit_y = torch.zeros(int(text_of.max()) + 1, dtype=torch.long).index_put_((text_of,), y)
    n_pos, n_neg = int(unit_y.sum()), int((1 - unit_y).sum())
    n_groups = len(unit_y) if groups is None else len(torch.unique(groups))
    k = min(folds, n_pos, n_neg, n_groups)
    if k < 2:
        raise InputError(f"Cross-validation needs at least 2 examples of each label, got {n_pos} of label 1 and "
                         f"{n_neg} of label 0; give more labelled texts.")
    if groups is not None and len(groups) != len(unit_y):
        raise InputError(f"{len(groups)} groups for {len(unit_y)} texts; give one group key per text.")
    unit_fold = _unit_folds(unit_y, k, seed, groups)
    with small_problem_threads(X):
        return _cross_validate(X, y, method, C, seed, text_of, unit_y, unit_fold[unit], k)


def _cross_validate(X, y, method, C, seed, text_of, unit_y, row_fold, k) -> CVResult:
    aurocs, accs = [], []
    for f in range(k):
        tr, te = row_fold != f, row_fold == f
        if y[tr].unique().numel() < 2:
            raise InputError("A cross-validation fold has training examples of one label only; give more groups "
                             "(or fewer folds).")
        fit = _fit_linear(X[tr], y[tr], method, C, seed)
        s = fit.score(X[te])
        if text_of is None:
            s_u, y_u = s, y[te]
        else:
            ids, inv = torch.unique(text_of[te], return_inverse=True)
            s_u, y_u = group_scores(s, inv, len(ids)), unit_y[ids]
        aurocs.append(auroc(s_u, y_u))
        accs.append(accuracy(s_u, y_u))
    finite = [a for a in aurocs if a == a]  # a test fold with one label has no AUROC
    return CVResult(sum(finite) / max(1, len(finite)), sum(accs) / k, aurocs, accs)


__all__ = ["C_GRID", "CVResult", "LinearFit", "METHODS", "cross_validate", "fit_linear", "group_scores",
           "standardize", "stratified_folds"]
