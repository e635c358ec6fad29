"""The fast TopK training path (mechscope.sae.kernels) against the reference rule `SparseCoder.loss`:
same loss, outputs and gradients (fp32, to ~1e-5), AuxK, transcoders and scales, bf16 closeness, a
training smoke test and typed errors."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from mechscope.errors import InputError, NonFiniteError
from mechscope.sae import kernels as K
from mechscope.sae.coder import SparseCoder
from mechscope.sae.config import SAEConfig

pytestmark = pytest.mark.usefixtures("one_thread")

PARAMS = ("W_enc", "b_enc", "W_dec", "b_dec")


def coder(d=16, n=64, k=4, seed=0, **kw) -> SparseCoder:
    c = SparseCoder(SAEConfig(arch=kw.pop("arch", "topk"), d_in=d, n_latents=n, k=k, **kw)).init_weights(seed)
    with torch.no_grad():  # non-trivial biases so that every term of the gradient is exercised
        g = torch.Generator().manual_seed(seed + 1)
        c.b_enc.copy_(0.1 * torch.randn(c.b_enc.shape, generator=g))
        c.b_dec.copy_(0.1 * torch.randn(c.b_dec.shape, generator=g))
    return c


def batch(B, d, seed=0) -> torch.Tensor:
    return torch.randn(B, d, generator=torch.Generator().manual_seed(seed + 100))


def grads(c: SparseCoder, loss: torch.Tensor) -> dict[str, torch.Tensor]:
    c.zero_grad(set_to_none=True)
    loss.backward()
    out = {n: p.grad.clone() for n, p in c.named_parameters()}
    c.zero_grad(set_to_none=True)
    return out


def assert_close(a: torch.Tensor, b: torch.Tensor, rel: float = 1e-5, what: str = "") -> None:
    scale = b.detach().abs().max().clamp_min(1e-12)
    err = float((a - b).detach().abs().max() / scale)
    assert err <= rel, f"{what}: max error {err:.2e} relative to max |ref| (want <= {rel:.0e})"


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
@pytest.mark.parametrize("shape", [(16, 64, 4, 32), (24, 200, 6, 50)])
def test_fp32_matches_reference_loss_outputs_and_gradients(seed, shape):
    d, n, k, B = shape
    c, x = coder(d, n, k, seed), batch(B, d, seed)
    ref = c.loss(x)
    g_ref = grads(c, ref.loss)
    fast = K.topk_loss(c, x)
    g_fast = grads(c, fast.loss)
    assert torch.allclose(fast.loss, ref.loss, rtol=1e-6, atol=0)
    assert torch.allclose(fast.parts["recon_loss"], ref.parts["recon_loss"], rtol=1e-6)
    assert_close(fast.out.detach(), ref.out.detach(), 1e-6, "out")
    assert torch.equal(K.to_dense(fast.acts, n), ref.acts.detach())  # same latents, same values
    assert fast.pre is None and set(fast.parts) == {"recon_loss"}
    for p in PARAMS:
        assert_close(g_fast[p], g_ref[p], 1e-5, p)


def test_transcoder_skip_and_scales_match_reference():
    for skip in (False, True):
        c = coder(12, 80, 5, seed=3, d_out=10, skip=skip, input_scale=1.7, output_scale=0.6)
        if skip:
            with torch.no_grad():
                c.W_skip.copy_(0.05 * torch.randn(c.W_skip.shape, generator=torch.Generator().manual_seed(9)))
        x, y = batch(40, 12, 1), batch(40, 10, 2)
        ref = c.loss(x, y)
        g_ref = grads(c, ref.loss)
        fast = K.topk_loss(c, x, y)
        g_fast = grads(c, fast.loss)
        assert torch.allclose(fast.loss, ref.loss, rtol=1e-6)
        assert_close(fast.out.detach(), ref.out.detach(), 1e-6, "out")
        for p in PARAMS + (("W_skip",) if skip else ()):
            assert_close(g_fast[p], g_ref[p], 1e-5, f"{p} skip={skip}")
        # AuxK in the coder's scaled units, as the trainer computes it
        dead = torch.arange(80) % 4 == 1
        ref = c.loss(x, y)
        aux = c.auxk_loss(ref.pre, ((y - ref.out) * c.cfg.output_scale).detach(), dead, 6)
        g_ref = grads(c, ref.loss + aux / 32)
        fast = K.topk_loss(c, x, y, dead=dead, k_aux=6)
        assert torch.allclose(fast.parts["auxk_loss"], aux.detach(), rtol=1e-5)
        g_fast = grads(c, fast.loss)
        for p in PARAMS:
            assert_close(g_fast[p], g_ref[p], 1e-5, f"{p} auxk skip={skip}")


@pytest.mark.parametrize("k_aux,every", [(8, 3), (40, 5), (3, 2)])
def test_auxk_matches_reference(k_aux, every):
    n = 64
    c, x = coder(16, n, 4, seed=k_aux), batch(48, 16, k_aux)
    dead = torch.zeros(n, dtype=torch.bool)
    dead[::every] = True
    coeff = 0.25
    ref = c.loss(x)
    residual = (x - ref.out).detach()
    aux_ref = c.auxk_loss(ref.pre, residual, dead, k_aux)
    g_ref = grads(c, ref.loss + coeff * aux_ref)
    fast = K.topk_loss(c, x, dead=dead, k_aux=k_aux, auxk_coeff=coeff)
    assert torch.allclose(fast.parts["auxk_loss"], aux_ref.detach(), rtol=1e-5)
    assert torch.allclose(fast.loss, ref.loss + coeff * aux_ref, rtol=1e-5)
    g_fast = grads(c, fast.loss)
    g_plain = grads(c, K.topk_loss(c, x).loss)
    for p in PARAMS:
        assert_close(g_fast[p], g_ref[p], 1e-5, p)
    assert not torch.allclose(g_fast["W_enc"], g_plain["W_enc"])  # AuxK really reaches the encoder
    # pre: the AuxK code = relu of the top-min(k_aux, n_dead) pre-activations among the dead latents
    ka = min(k_aux, int(dead.sum()))
    assert fast.pre.values.shape == (48, ka) and bool(dead[fast.pre.indices].all())
    expect = torch.where(dead, ref.pre, -torch.inf).topk(ka, dim=-1).values.relu()
    assert torch.allclose(fast.pre.values.sort(-1).values, expect.detach().sort(-1).values, atol=1e-5)


def test_gradients_through_out_and_acts():
    # extra terms on the returned reconstruction and activations backpropagate like coder.loss's
    c, x = coder(16, 64, 4, seed=4), batch(32, 16, 4)
    ref = c.loss(x)
    g_ref = grads(c, ref.loss + 0.3 * ref.acts.sum() + 0.1 * ref.out.pow(2).mean())
    fast = K.topk_loss(c, x)
    g_fast = grads(c, fast.loss + 0.3 * fast.acts.values.sum() + 0.1 * fast.out.pow(2).mean())
    for p in PARAMS:
        assert_close(g_fast[p], g_ref[p], 1e-5, p)


def test_no_dead_latents_gives_zero_auxk():
    c, x = coder(), batch(32, 16)
    out = K.topk_loss(c, x, dead=torch.zeros(64, dtype=torch.bool))
    assert out.pre is None and float(out.parts["auxk_loss"]) == 0.0
    assert torch.equal(out.loss, out.parts["recon_loss"])


def test_unused_latents_and_fewer_than_k_positive():
    # many latents that no token picks (their gradient rows are exactly zero), and tokens with
    # fewer than k positive pre-activations (the extra picks carry 0 and no gradient)
    c, x = coder(8, 500, 6, seed=5), batch(10, 8, 5)
    with torch.no_grad():
        c.b_enc.sub_(2.5)  # most pre-activations negative
    ref = c.loss(x)
    g_ref = grads(c, ref.loss)
    fast = K.topk_loss(c, x)
    g_fast = grads(c, fast.loss)
    assert bool((fast.acts.values == 0).any())  # some tokens have < k positive pre-acts
    assert torch.allclose(fast.loss, ref.loss, rtol=1e-6)
    assert torch.equal(K.to_dense(fast.acts, 500), ref.acts.detach())
    for p in PARAMS:
        assert_close(g_fast[p], g_ref[p], 1e-5, p)
    unused = torch.ones(500, dtype=torch.bool)
    unused[fast.acts.indices[fast.acts.values > 0]] = False
    assert bool((g_fast["W_dec"][unused] == 0).all()) and bool((g_fast["b_enc"][unused] == 0).all())
    counts = K.firing_counts(fast.acts, 500)
    assert torch.equal(counts, (ref.acts != 0).sum(0))


def test_chunked_encoder_equals_one_chunk(monkeypatch):
    c, x = coder(16, 64, 4, seed=7), batch(50, 16, 7)
    one = K.topk_loss(c, x)
    g_one = grads(c, one.loss)
    monkeypatch.setattr(K, "CHUNK_BYTES", 64 * 4 * 7)  # 7 rows per chunk: 8 chunks, the last shorter
    many = K.topk_loss(c, x)
    g_many = grads(c, many.loss)
    o1, o2 = one.acts.indices.argsort(-1), many.acts.indices.argsort(-1)
    assert torch.equal(one.acts.indices.gather(1, o1), many.acts.indices.gather(1, o2))
    assert torch.allclose(one.acts.values.gather(1, o1), many.acts.values.gather(1, o2), atol=1e-6)
    for p in PARAMS:
        assert_close(g_many[p], g_one[p], 1e-6, p)


def test_bf16_is_close_to_fp32():
    c, x = coder(64, 256, 8, seed=1), batch(128, 64, 1)
    ref = c.loss(x)
    g_ref = grads(c, ref.loss)
    fast = K.topk_loss(c, x, bf16=True)
    g_fast = grads(c, fast.loss)
    assert abs(float(fast.loss.detach()) / float(ref.loss.detach()) - 1) < 2e-2
    for p in PARAMS:
        cos = F.cosine_similarity(g_fast[p].flatten(), g_ref[p].flatten(), dim=0)
        assert float(cos) > 0.98, p
    # the selection is bf16, the kept values are the exact fp32 pre-activations
    pre = ((x - c.b_dec) @ c.W_enc + c.b_enc).detach()
    assert torch.allclose(fast.acts.values, pre.gather(1, fast.acts.indices).relu(), atol=1e-5)
    # most of the selected latents agree with the fp32 top-k
    ref_set = ref.acts != 0
    agree = ref_set.gather(1, fast.acts.indices).float().mean()
    assert float(agree) > 0.9
    dead = torch.arange(256) % 3 == 0
    aux_ref = c.auxk_loss(ref.pre, (x - ref.out).detach(), dead, 32)
    fast = K.topk_loss(c, x, bf16=True, dead=dead, k_aux=32)
    assert abs(float(fast.parts["auxk_loss"]) / float(aux_ref.detach()) - 1) < 2e-2
    assert isinstance(K.bf16_matmul_is_fast("cpu"), bool)


def test_sparse_decode_and_parallel_grad_helpers():
    W = torch.randn(30, 6, requires_grad=True)
    idx = torch.stack([torch.randperm(30, generator=torch.Generator().manual_seed(i))[:4] for i in range(9)])
    v = torch.rand(9, 4, requires_grad=True)
    g = torch.randn(9, 6)
    gv, gW = torch.autograd.grad(K.sparse_decode(v, idx, W), (v, W), g)
    rv, rW = torch.autograd.grad(F.embedding_bag(idx, W, per_sample_weights=v, mode="sum"), (v, W), g)
    assert_close(gv, rv, 1e-6, "values")
    assert_close(gW, rW, 1e-6, "W")
    a = torch.nn.Parameter(torch.randn(20, 5))
    b = torch.nn.Parameter(a.detach().clone())
    a.grad = torch.randn(20, 5)
    b.grad = a.grad.clone()
    K.remove_parallel_grad_(a)
    unit = b / b.norm(dim=1, keepdim=True)  # the textbook projection, row by row
    b.grad -= (b.grad * unit).sum(1, keepdim=True) * unit
    assert_close(a.grad, b.grad, 1e-5, "projection")


def test_training_steps_reduce_the_loss():
    torch.manual_seed(0)
    feats = torch.randn(48, 16)
    codes = (torch.rand(2048, 48) < 0.08) * torch.rand(2048, 48)
    data = codes @ feats  # sparse structure for the coder to find
    c = coder(16, 96, 4, seed=0)
    opt = torch.optim.Adam(c.parameters(), lr=3e-3)
    losses = []
    for step in range(40):
        x = data[(step * 256) % 2048:][:256]
        out = K.topk_loss(c, x)
        opt.zero_grad(set_to_none=True)
        out.loss.backward()
        K.remove_parallel_grad_(c.W_dec)
        opt.step()
        c.normalize_decoder()
        losses.append(float(out.parts["recon_loss"]))
    assert sum(losses[-5:]) / 5 < 0.7 * sum(losses[:5]) / 5


def test_serial_section_restores_the_thread_count():
    n = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        with K._serial():
            assert torch.get_num_threads() == 1
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(n)


def test_typed_errors():
    c = coder()
    with pytest.raises(InputError, match="topk"):
        K.topk_loss(coder(arch="batchtopk"), batch(8, 16))
    with pytest.raises(InputError, match="batch"):
        K.topk_loss(c, torch.randn(2, 3, 16))
    with pytest.raises(InputError, match="last dimension"):
        K.topk_loss(c, torch.randn(4, 15))
    with pytest.raises(InputError, match="dead"):
        K.topk_loss(c, batch(8, 16), dead=torch.zeros(63, dtype=torch.bool))
    x = batch(8, 16)
    x[3, 2] = float("nan")
    with pytest.raises(NonFiniteError):
        K.topk_loss(c, x)
