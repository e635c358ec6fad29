"""Synthetic sparse data with known ground-truth features, and how well a coder recovers them.

Why: on real activations nobody knows the "true" features, so an SAE bug (a wrong gradient, a
misplaced bias) hides behind plausible-looking losses. Here x = Σ_i c_i f_i with more unit-norm
features f_i than dimensions (superposition) and sparse random c_i >= 0, so the right answer is
known and `recovery` measures whether the learned decoder rows found it (Sharkey et al. 2022's
mean max cosine similarity, MMCS).

For transcoders the target is a map of the same sparse code: y = Σ_i c_i g_i (+ L x for the
skip-transcoder's linear path), and recovery compares decoder rows with the g_i.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from mechscope.errors import InputError


class SyntheticData(NamedTuple):
    """A synthetic data set and its ground truth."""

    x: torch.Tensor  # [N, d] inputs x = codes @ features
    codes: torch.Tensor  # [N, F] sparse non-negative coefficients c (the true latent activations)
    features: torch.Tensor  # [F, d] unit-norm true input features f_i (rows)


class Recovery(NamedTuple):
    """How well learned decoder rows match the true features."""

    fraction: float  # fraction of true features whose best-matching decoder row has cosine > threshold
    mmcs: float  # mean over true features of the max cosine to any decoder row
    max_cos: torch.Tensor  # [F] each true feature's best cosine


def random_features(n_features: int, d: int, *, seed: int = 0) -> torch.Tensor:
    """[F, d] random unit-norm directions (nearly orthogonal when d is large, overlapping when F > d)."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(n_features, d, generator=g)
    return w / w.norm(dim=1, keepdim=True)


def sparse_codes(n: int, n_features: int, *, p_active: float = 0.05, correlation: float = 0.0,
                 group_size: int = 4, magnitude: tuple[float, float] = (0.5, 1.5),
                 seed: int = 0) -> torch.Tensor:
    """[n, F] non-negative sparse codes: feature i fires with probability p_active, magnitude ~ U(lo, hi).

    correlation > 0 makes features of the same group (consecutive blocks of `group_size`) fire
    together: feature i fires when sqrt(ρ) u_group + sqrt(1 - ρ) ε_i exceeds the normal quantile
    of 1 - p_active (a Gaussian copula), so every feature keeps its marginal rate p_active.
    """
    if not 0 < p_active < 1 or not 0 <= correlation < 1 or group_size < 1:
        raise InputError("need 0 < p_active < 1, 0 <= correlation < 1 and group_size >= 1.")
    g = torch.Generator().manual_seed(seed)
    eps = torch.randn(n, n_features, generator=g)
    n_groups = -(-n_features // group_size)
    shared = torch.randn(n, n_groups, generator=g).repeat_interleave(group_size, dim=1)[:, :n_features]
    z = correlation**0.5 * shared + (1 - correlation) ** 0.5 * eps
    cut = torch.distributions.Normal(0.0, 1.0).icdf(torch.tensor(1 - p_active))
    lo, hi = magnitude
    mags = lo + (hi - lo) * torch.rand(n, n_features, generator=g)
    return (z > cut).float() * mags


def synthetic_data(n: int, d: int = 32, n_features: int = 64, *, p_active: float = 0.05,
                   correlation: float = 0.0, magnitude: tuple[float, float] = (0.5, 1.5),
                   seed: int = 0) -> SyntheticData:
    """n rows of x = Σ c_i f_i with F = n_features unit-norm features in d dimensions (see sparse_codes)."""
    features = random_features(n_features, d, seed=seed)
    codes = sparse_codes(n, n_features, p_active=p_active, correlation=correlation, magnitude=magnitude,
                         seed=seed + 1)
    return SyntheticData(codes @ features, codes, features)


def recovery(coder, true_features: torch.Tensor, *, threshold: float = 0.9) -> Recovery:
    """Compare the coder's decoder rows W_dec [n, d_out] with true features [F, d_out].

    max_cos_i = max_j cos(true_i, W_dec_j); fraction = mean_i [max_cos_i > threshold];
    MMCS = mean_i max_cos_i. Decoder rows are what a feature "writes", so this is the right
    comparison for transcoders too (pass the output-space features).
    """
    dec = coder.W_dec.detach().float().cpu()
    true = true_features.detach().float().cpu()
    if true.ndim != 2 or true.shape[1] != dec.shape[1]:
        raise InputError(f"true_features must be [F, {dec.shape[1]}] (the decoder's output width), "
                         f"got {tuple(true.shape)}.")
    cos = (true / true.norm(dim=1, keepdim=True).clamp_min(1e-12)) @ (dec / dec.norm(dim=1, keepdim=True)
                                                                      .clamp_min(1e-12)).T  # [F, n]
    best = cos.max(dim=1).values
    return Recovery(float((best > threshold).float().mean()), float(best.mean()), best)


@torch.no_grad()
def response_recovery(coder, input_features: torch.Tensor, output_features: torch.Tensor, *,
                      linear_map: torch.Tensor | None = None, magnitude: float = 1.0,
                      threshold: float = 0.9) -> Recovery:
    """Recovery measured on what the coder writes for each true input feature alone.

    A skip-transcoder's decoder rows are not identifiable: W_skip + P with rows d_j − P f_j gives
    the same outputs for every P (when the code is exact), so `recovery` on W_dec can fail for a
    perfect coder. Its response is identifiable: for input x = m f_i (input_features [F, d_in]),
    r_i = coder(m f_i) − coder(0) − m L f_i should point along the true sparse output feature g_i
    (output_features [F, d_out]); linear_map L [d_out, d_in] is the true linear part (None: 0).
    fraction = mean_i [cos(r_i, g_i) > threshold]; mmcs = mean_i cos(r_i, g_i).
    """
    dev, dt = coder.W_enc.device, coder.W_enc.dtype
    f_in = input_features.to(dev, dt)
    g = output_features.to(dev, dt)
    if f_in.ndim != 2 or g.shape != (f_in.shape[0], coder.cfg.out_dim):
        raise InputError(f"need input_features [F, {coder.cfg.d_in}] and output_features "
                         f"[F, {coder.cfg.out_dim}].")
    resp = coder(magnitude * f_in).out - coder(torch.zeros_like(f_in)).out  # [F, d_out]
    if linear_map is not None:
        resp = resp - magnitude * f_in @ linear_map.to(dev, dt).T
    cos = torch.nn.functional.cosine_similarity(resp, g, dim=1).cpu()  # [F]
    return Recovery(float((cos > threshold).float().mean()), float(cos.mean()), cos)


__all__ = ["SyntheticData", "Recovery", "random_features", "sparse_codes", "synthetic_data", "recovery",
           "response_recovery"]
