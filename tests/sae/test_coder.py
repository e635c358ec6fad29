"""SparseCoder training rules checked by hand: top-k counts, STE gradients, gated aux loss, matryoshka
prefixes, AuxK, scale folding, typed errors."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from mechscope.errors import InputError, NonFiniteError
from mechscope.sae.coder import SparseCoder
from mechscope.sae.config import SAEConfig

D, N, B = 8, 24, 16


def coder(arch: str, seed: int = 0, **kw) -> SparseCoder:
    if arch in ("topk", "batchtopk", "matryoshka"):
        kw.setdefault("k", 3)
    c = SparseCoder(SAEConfig(arch=arch, d_in=kw.pop("d_in", D), n_latents=kw.pop("n_latents", N), **kw))
    c.init_weights(seed)
    with torch.no_grad():  # non-trivial biases so that every term of the formulas is exercised
        g = torch.Generator().manual_seed(seed + 1)
        c.b_enc.copy_(0.1 * torch.randn(c.b_enc.shape, generator=g))
        c.b_dec.copy_(0.1 * torch.randn(c.b_dec.shape, generator=g))
    return c


def batch(seed: int = 0, d: int = D) -> torch.Tensor:
    return torch.randn(B, d, generator=torch.Generator().manual_seed(seed))


def fvu(y: torch.Tensor, y_hat: torch.Tensor) -> torch.Tensor:
    return (y - y_hat).pow(2).sum() / (y - y.mean(0)).pow(2).sum()


def test_topk_keeps_k_per_token_and_batchtopk_k_times_batch():
    x = batch()
    out = coder("topk").loss(x)
    assert ((out.acts != 0).sum(-1) == 3).all()
    assert torch.allclose(out.parts["recon_loss"], fvu(x, out.out))
    bt = coder("batchtopk").loss(x)
    assert int((bt.acts != 0).sum()) == 3 * B
    assert ((bt.acts != 0).sum(-1) != 3).any()  # k per token on average over the batch, not per token
    assert torch.isclose(bt.parts["min_active"], bt.acts[bt.acts > 0].min())


def test_relu_l1_is_decoder_norm_weighted_and_scaled_by_sparsity_scale():
    c = coder("relu", l1_coeff=0.5)
    with torch.no_grad():
        c.W_dec.mul_(torch.linspace(0.5, 2, N)[:, None])
    x = batch()
    out = c.loss(x)
    want = 0.5 * (F.relu(c.pre_acts(x)) * c.W_dec.norm(dim=1)).sum(-1).mean()
    assert torch.allclose(out.parts["l1_loss"], want)
    assert torch.allclose(c.loss(x, sparsity_scale=0.25).parts["l1_loss"], 0.25 * want)
    assert torch.allclose(out.loss, out.parts["recon_loss"] + out.parts["l1_loss"])


def test_jumprelu_ste_gradients_match_rajamanoharan_et_al():
    """d/dθ JumpReLU(z; θ) = −(θ/ε) K((z − θ)/ε) and d/dθ H(z − θ) = −(1/ε) K((z − θ)/ε), K the unit
    rectangle; d/dz JumpReLU = H(z − θ) and the L0 term gives z no gradient."""
    eps, theta = 0.1, 0.5
    c = coder("jumprelu", n_latents=2, d_in=2, jumprelu_bandwidth=eps, jumprelu_init_threshold=theta,
              l0_coeff=1.0)
    with torch.no_grad():
        c.W_enc.copy_(torch.eye(2))
        c.b_enc.zero_()
        c.b_dec.zero_()
        c.W_dec.copy_(torch.eye(2))
    # latent 0 sits inside the kernel window above θ, latent 1 far below it
    x = torch.tensor([[0.52, 0.1]], requires_grad=True)
    pre = c.pre_acts(x)
    t = c.log_threshold.exp()
    from mechscope.sae.coder import _JumpReLU, _Step

    f = _JumpReLU.apply(pre, t, eps)
    (g_t,) = torch.autograd.grad(f.sum(), t, retain_graph=True)
    assert torch.allclose(g_t, torch.tensor([-theta / eps, 0.0]))
    (g_x,) = torch.autograd.grad(f.sum(), x, retain_graph=True)
    assert torch.allclose(g_x, torch.tensor([[1.0, 0.0]]))
    step = _Step.apply(pre, t, eps)
    g_t0, g_x0 = torch.autograd.grad(step.sum(), (t, x))
    assert torch.allclose(g_t0, torch.tensor([-1 / eps, 0.0])) and torch.equal(g_x0, torch.zeros_like(x))
    # the training loss's l0 term is l0_coeff * E[L0] and its gradient reaches log θ (chain rule: × θ)
    out = c.loss(torch.tensor([[0.52, 0.1], [0.7, 0.2]]))
    assert torch.isclose(out.parts["l0_loss"], torch.tensor(1.0))  # one active latent per token on average
    c.zero_grad()
    out.loss.backward()
    assert c.log_threshold.grad is not None and c.log_threshold.grad[1] == 0


def test_gated_losses_route_gradients_as_in_the_paper():
    """Recon reaches the magnitude path only (the gate is a step function); L1 and the aux loss reach the
    gate; the aux loss does not move the decoder (frozen copy)."""
    c = coder("gated", l1_coeff=0.1)
    with torch.no_grad():
        c.r_mag.copy_(0.1 * torch.randn(N))
        c.b_mag.copy_(0.1 * torch.randn(N))
    x = batch()
    out = c.loss(x)
    gate = F.relu(c.pre_acts(x))
    aux_want = fvu(x, gate @ c.W_dec + c.b_dec)
    assert torch.allclose(out.parts["gate_aux_loss"], aux_want)
    assert torch.allclose(out.acts, (c.pre_acts(x) > 0) * F.relu(c._mag_pre(x)))
    # gradient routing, through the coder's own total loss (l1 off): recon + aux
    c.cfg.l1_coeff = 0.0

    def grads(term) -> dict[str, torch.Tensor]:
        c.zero_grad()
        term.backward()
        return {k: torch.zeros_like(p) if p.grad is None else p.grad.clone() for k, p in c.named_parameters()}

    total = grads(c.loss(x).loss)
    recon = grads(fvu(x, c.loss(x).out))
    aux = grads(fvu(x, F.relu(c.pre_acts(x)) @ c.W_dec.detach() + c.b_dec.detach()))
    assert recon["b_enc"].abs().sum() == 0  # the gate bias gets nothing from recon (Heaviside gate)
    assert recon["b_mag"].abs().sum() > 0 and recon["r_mag"].abs().sum() > 0
    assert aux["W_dec"].abs().sum() == 0 and aux["b_enc"].abs().sum() > 0
    for k in total:  # the total is exactly recon + aux: the aux loss leaves the decoder alone
        assert torch.allclose(total[k], recon[k] + aux[k], atol=1e-6), k
    c.cfg.l1_coeff = 0.1
    # and the coder's own total loss equals the sum of its parts
    p = out.parts
    assert torch.allclose(out.loss, p["recon_loss"] + p["l1_loss"] + p["gate_aux_loss"])


def test_matryoshka_loss_is_the_mean_fvu_of_nested_prefixes():
    c = coder("matryoshka", matryoshka_prefixes=[4, 12])
    assert c.cfg.matryoshka_prefixes == [4, 12, N]
    x = batch()
    out = c.loss(x)
    want = torch.stack([fvu(x, out.acts[:, :p] @ c.W_dec[:p] + c.b_dec) for p in (4, 12, N)]).mean()
    assert torch.allclose(out.parts["recon_loss"], want)
    assert torch.allclose(out.out, out.acts @ c.W_dec + c.b_dec)  # the full reconstruction
    assert int((out.acts != 0).sum()) == 3 * B


def test_batchtopk_inference_uses_the_threshold():
    c = coder("batchtopk")
    x = batch()
    c.threshold.fill_(0.3)
    pre = c.pre_acts(x)
    assert torch.equal(c.encode(x), F.relu(pre) * (pre > 0.3))


def test_auxk_loss_by_hand():
    c = coder("topk")
    x = batch()
    out = c.loss(x)
    residual = (x - out.out).detach()
    dead = torch.zeros(N, dtype=torch.bool)
    assert c.auxk_loss(out.pre, residual, dead, 4) == 0
    dead[:6] = True
    got = c.auxk_loss(out.pre, residual, dead, 4)
    vals, idx = out.pre[:, :6].topk(4, dim=-1)
    e_hat = torch.zeros_like(residual)
    for b in range(B):
        e_hat[b] = (F.relu(vals[b])[:, None] * c.W_dec[idx[b]]).sum(0)
    want = min(6 / 4, 1.0) * fvu(residual, e_hat)
    assert torch.allclose(got, want, atol=1e-6)
    dead[:] = False
    dead[0] = True  # fewer dead latents than k_aux: scaled by n_dead / k_aux
    got = c.auxk_loss(out.pre, residual, dead, 4)
    want = 0.25 * fvu(residual, F.relu(out.pre[:, :1]) * c.W_dec[:1])
    assert torch.allclose(got, want, atol=1e-6)
    c.zero_grad()
    c.auxk_loss(out.pre, residual, dead, 4).backward()
    assert c.W_enc.grad[:, 1:].abs().sum() == 0 and c.W_enc.grad[:, 0].abs().sum() > 0


@pytest.mark.parametrize("arch", ["relu", "topk", "batchtopk", "jumprelu", "gated", "matryoshka"])
def test_fold_scales_keeps_outputs(arch):
    c = coder(arch)
    if arch == "gated":
        with torch.no_grad():
            c.r_mag.copy_(0.1 * torch.randn(N))
    if hasattr(c, "threshold"):
        c.threshold.fill_(0.2)
    c.cfg.input_scale = c.cfg.output_scale = 2.5
    x = batch()
    before = c(x)
    c.fold_scales()
    after = c(x)
    assert c.cfg.input_scale == 1.0
    assert torch.allclose(before.out, after.out, atol=1e-5)
    assert torch.allclose(before.acts, after.acts, atol=1e-5)


def test_skip_transcoder_folds_two_scales_and_needs_its_input():
    c = SparseCoder(SAEConfig(arch="topk", d_in=D, n_latents=N, d_out=5, k=3, skip=True)).init_weights(0)
    with torch.no_grad():
        c.W_skip.copy_(torch.randn(5, D))
    c.cfg.input_scale, c.cfg.output_scale = 2.0, 0.5
    x = batch()
    before = c(x).out
    assert torch.allclose(c.fold_scales()(x).out, before, atol=1e-5)
    with pytest.raises(InputError, match="needs its input"):
        c.decode(c.encode(x))


def test_typed_config_errors():
    with pytest.raises(InputError, match="k <= n_latents"):
        SAEConfig(arch="topk", d_in=D, n_latents=4, k=5)
    with pytest.raises(InputError, match="k <= n_latents"):
        SAEConfig(arch="batchtopk", d_in=D, n_latents=4)
    with pytest.raises(InputError, match=">= 0"):
        SAEConfig(arch="relu", d_in=D, n_latents=4, l1_coeff=-1.0)
    with pytest.raises(InputError, match="Unknown SAE architecture"):
        SAEConfig(arch="sparse", d_in=D, n_latents=4)
    with pytest.raises(InputError, match="strictly"):
        SAEConfig(arch="matryoshka", d_in=D, n_latents=8, k=2, matryoshka_prefixes=[4, 4])
    c = coder("topk")
    with pytest.raises(InputError, match="last dimension"):
        c.encode(torch.zeros(2, D + 1))
    with pytest.raises(NonFiniteError):
        c.loss(torch.full((2, D), float("nan")))
