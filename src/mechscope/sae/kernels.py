"""Fast TopK training path: one dense matmul, everything else on the k active latents per token.

    out = topk_loss(coder, x)                     # same rule as coder.loss(x) for arch="topk"
    out.loss.backward()                           # grads of W_enc, b_enc, W_dec, b_dec (and W_skip)
    out.acts.values, out.acts.indices             # SparseCode [B, k]: the latent activations
    out.parts["recon_loss"]                       # FVU over the batch, like coder.loss
    topk_loss(coder, x, dead=dead_mask, k_aux=384, auxk_coeff=1/32)   # + AuxK, in the same pass

The training rule is exactly `SparseCoder.loss` for arch "topk" (pre = (x s - b_dec) W_enc + b_enc,
f = TopK(relu(pre)), out = f W_dec + b_dec (+ x s W_skip^T), recon_loss = Σ(out - y)² / Σ(y - ȳ)²) plus,
with `dead`, `SparseCoder.auxk_loss`; but the latents are never materialised as a dense [B, n] tensor
outside the encoder matmul, and the gradient is hand-written (one torch.autograd.Function) so that
it touches only the B*k active (token, latent) pairs:

forward
    pre  = b_enc + x_c @ W_enc           dense, in row chunks of <= 32 MiB (MKL sgemm; bf16 optional)
    vals, idx = topk(pre, k)             per chunk; relu after the selection (the same set as
                                         topk(relu(pre)) up to which zeros are picked, and those carry
                                         no activation and no gradient)
    out  = embedding_bag(idx, W_dec, vals) + b_dec;  recon = ‖out - y‖² / Σ‖y - ȳ‖²
backward, with g = dL/dout [B, d] and S the [B, n] sparse matrix of the code
    dvals  = rowwise g_b . W_dec[idx_bj]  torch.sparse.sampled_addmm on the CSR pattern (SDDMM)
    dpre   = dvals * (vals > 0)
    dW_dec = S^T g,  dW_enc^T = S_dpre^T x_c
                                         MKL CSR @ dense with S^T as a latent-major CSR matrix (one
                                         stable int32 radix sort of idx, shared by both products),
                                         written by addmm(out, S, t, beta=0, out=out): `S @ t` would
                                         zero-fill and copy its result once more
    db_enc = index_add(dpre);  db_dec = Σ_b g - W_enc @ db_enc   (the input-side b_dec gradient is a
                                         matvec: Σ_b dx_c[b] = W_enc Σ_b dpre[b]; no dx is formed)

Why these ops (measured on a 2-core AMD EPYC Zen 1, AVX2, B=4096, d=768, n=6144, k=32, per call):
    dW_dec = S^T g: latent-major CSR @ g 85-140 ms | embedding_bag autograd 210 | sparse.mm(S.t(), g)
        275 | index_add_ of the [B*k, d] products (sparsify's way) 396 | index_add_ in chunks 1130
    dvals: sampled_addmm 85 ms | embedding_bag per_sample_weights backward 160 | gather W_dec[idx]
        + bmm 600-780 (materialises B*k*d floats)
    decode: embedding_bag 56 ms | CSR @ W_dec 96
    the sort for S^T: stable int32 radix sort 1.7 ms | stable int64 12 | unstable 47
    the encoder matmul (38.6 GFLOP): 0.6 s on an idle 2-core Zen 1 (~64 GFLOP/s, the fp32 FMA peak),
        1-2 s on a shared one; MKL, OpenBLAS (numpy) and oneDNN are within noise of each other.
  The encoder matmul is the floor of any exact fp32 TopK step: the dense pre-activations are needed
  to select the top k. Everything else here costs ~0.3-0.5 s at this size.

AuxK (Gao et al. 2024; `dead` [n] bool): the top k_aux pre-activations among the dead latents are
taken per chunk from only the dead columns, and the AuxK reconstruction and its gradients run as
three dense GEMMs over the dead columns ([B, n_dead] x [n_dead, d]), not as k_aux = d/2 gathers per
token (which would move B*k_aux*d*4 B = 4.8 GB per pass at the benchmark size). Its gradient reaches
the encoder through the same backward. The Gao et al. decoder-gradient projection stays in the
trainer (`remove_parallel_grad_` here is a faster drop-in for `train._remove_parallel_grad`).

bf16=True selects the top k on a bf16 encoder matmul (fp32 master weights; a bf16 copy of W_enc is
made per call), then recomputes the kept values exactly in fp32 (SDDMM), so only the selection near
the k-th value sees bf16 rounding; everything else (decode, backward, optimizer) is fp32. It pays
only where the hardware has bf16 matmuls (CUDA, AVX512-BF16, AMX: `bf16_matmul_is_fast`); on
AVX2-only CPUs oneDNN falls back to a reference kernel ~100x SLOWER than fp32 (measured on the
Zen 1 machine: 27.8 s vs 0.29 s for the B=512 encoder matmul).
"""

from __future__ import annotations

import contextlib
import warnings
from typing import NamedTuple

import torch
import torch.nn.functional as F

from mechscope.errors import InputError, NonFiniteError
from mechscope.sae import distributed
from mechscope.sae.coder import LossOutput, SparseCoder
from mechscope.threads import one_thread

__all__ = ["SparseCode", "topk_loss", "sparse_decode", "firing_counts", "to_dense", "bf16_matmul_is_fast",
           "remove_parallel_grad_"]

CHUNK_BYTES = 32 << 20  # encoder pre-activations are formed in row blocks of at most this many bytes
# Index bookkeeping on [B*k] vectors (casts, the radix sort, gathers, masks, counts) runs on ONE thread:
# each such op takes microseconds, while an OpenMP region whose second thread has gone to sleep costs a
# wake-up, measured at ~8 ms per region on a 2-core machine shared with other jobs (a 131k-element add:
# 0.035 ms on one thread, 8 ms on two; the int32 radix sort: 2-4 ms vs 60-110 ms).
SERIAL_SMALL_OPS = True


class SparseCode(NamedTuple):
    """A top-k code: k (latent, value) pairs per token. Dense form: `to_dense(code, n_latents)`."""

    values: torch.Tensor  # [B, k] float32, >= 0: the activations (0 where fewer than k latents are positive)
    indices: torch.Tensor  # [B, k] int64: which latents (unordered within a row; unique within a row)


# ---------------------------------------------------------------------------- helpers


def bf16_matmul_is_fast(device: torch.device | str | None = None) -> bool:
    """True where a bf16 matmul is faster than fp32: CUDA with bf16, or a CPU with AVX512-BF16 / AMX."""
    dev = torch.device(device) if device is not None else torch.device("cpu")
    if dev.type == "cuda":
        return torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    if dev.type != "cpu":
        return True
    try:
        return bool(torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported())
    except AttributeError:  # older torch: oneDNN's own check (AVX512-core at least)
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())


def to_dense(code: SparseCode, n_latents: int) -> torch.Tensor:
    """[B, k] code -> [B, n_latents] dense activations (what coder.loss returns as `acts`)."""
    v = code.values
    return torch.zeros(v.shape[0], n_latents, dtype=v.dtype, device=v.device).scatter_(1, code.indices, v)


def firing_counts(code: SparseCode, n_latents: int) -> torch.Tensor:
    """[n_latents] int64: on how many tokens of the batch each latent fired (value != 0)."""
    with _serial():
        idx = code.indices.masked_fill(code.values.detach() == 0, n_latents)  # non-firing picks -> bin n
        return torch.bincount(idx.view(-1), minlength=n_latents + 1)[:n_latents]


@torch.no_grad()
def remove_parallel_grad_(W: torch.Tensor) -> None:
    """W.grad -= <W.grad_i, W_i> / ‖W_i‖² W_i for every row i (Gao et al. 2024: with the rows renormalised
    after the step, the parallel component would only change their norm). Same as the trainer's
    `_remove_parallel_grad`, in two row-wise dots and one fused pass (~25% faster on CPU)."""
    g = W.grad
    if g is None:
        return
    coef = torch.linalg.vecdot(g, W) / torch.linalg.vecdot(W, W).clamp_min(1e-16)  # [n]
    g.addcmul_(W, coef.unsqueeze(1), value=-1)


@contextlib.contextmanager
def _serial():
    """Run the index bookkeeping on [B*k] vectors on one thread (see `SERIAL_SMALL_OPS`)."""
    with one_thread(SERIAL_SMALL_OPS):
        yield


class _Pattern:
    """The sparsity pattern of a [B, k] index set, in both orientations (built once per backward).

    token-major: the [B, n] CSR pattern (row b holds idx[b]) for `rowwise_dot` (SDDMM).
    latent-major: a stable sort of the flattened latent ids gives, for each latent, the tokens that
    chose it in increasing order, i.e. the [n, B] CSR structure of S^T, for `t_mm` (S^T t).
    Index dtype int32 while B*k < 2^31 (radix sort; MKL's 32-bit sparse kernels).
    """

    def __init__(self, idx: torch.Tensor, n: int) -> None:
        B, k = idx.shape
        self.B, self.k, self.n = B, k, n
        it = torch.int32 if idx.numel() < 2**31 - 1 else torch.int64
        dev = idx.device
        with _serial():
            self.cols = idx.reshape(-1).to(it)  # [B*k] token-major column = latent
            self.row_crow = torch.arange(0, B * k + 1, k, dtype=it, device=dev)  # [B + 1]
            lat, order = self.cols.sort(stable=True)
            self.order = order  # [B*k] int64 positions into idx.flatten()
            self.tok = torch.div(order, k, rounding_mode="floor").to(it)  # [B*k] latent-major column = token
            self.crow = torch.searchsorted(lat, torch.arange(n + 1, dtype=it, device=dev),
                                           out_int32=it == torch.int32)  # [n + 1]

    def rowwise_dot(self, g: torch.Tensor, W: torch.Tensor) -> torch.Tensor:
        """[B, k]: g[b] . W[idx[b, j]] for every pair, without materialising W[idx] (SDDMM: sampled_addmm;
        rows of idx must hold distinct latents, as top-k indices do)."""
        zeros = torch.zeros(self.B * self.k, dtype=g.dtype, device=g.device)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # "sparse CSR support is in beta"
            pat = torch.sparse_csr_tensor(self.row_crow, self.cols, zeros, (self.B, self.n))
            return torch.sparse.sampled_addmm(pat, g, W.T, beta=0.0).values().view(self.B, self.k)

    def t_mm(self, v: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """[n, d]: S^T t = Σ_b v[b, j] t[b] per latent j, with S the [B, n] code of values v [B, k]
        (MKL CSR @ dense on the latent-major structure)."""
        with _serial():
            vals = v.reshape(-1)[self.order]
        out = torch.empty(self.n, t.shape[1], dtype=t.dtype, device=t.device)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # "sparse CSR support is in beta"
            S = torch.sparse_csr_tensor(self.crow, self.tok, vals, (self.n, self.B))
            # addmm(out, S, t, beta=0, out=out): MKL writes the row-major result in place; `S @ t` would
            # zero-fill a result and copy it once more (~35 ms of 120 at this size)
            return torch.addmm(out, S, t, beta=0.0, out=out)


# ---------------------------------------------------------------------------- autograd functions


class _SparseDecode(torch.autograd.Function):
    """out [B, d] = Σ_j values[b, j] W[indices[b, j]]  (no bias), with a sparse backward."""

    @staticmethod
    def forward(ctx, values, indices, W):
        ctx.save_for_backward(values, indices, W)
        return F.embedding_bag(indices, W, per_sample_weights=values, mode="sum")

    @staticmethod
    def backward(ctx, g):
        values, indices, W = ctx.saved_tensors
        g = g.contiguous()
        pat = _Pattern(indices, W.shape[0])
        dv = pat.rowwise_dot(g, W) if ctx.needs_input_grad[0] else None
        dW = pat.t_mm(values, g) if ctx.needs_input_grad[2] else None
        return dv, None, dW


def sparse_decode(values: torch.Tensor, indices: torch.Tensor, W_dec: torch.Tensor) -> torch.Tensor:
    """[B, k] values and latent indices -> [B, d_out] = Σ_j values[b, j] W_dec[indices[b, j]] (no b_dec),
    differentiable in values and W_dec with a backward that only touches the B*k active rows.
    Indices must be distinct within a row."""
    return _SparseDecode.apply(values.to(W_dec.dtype), indices, W_dec)


def _encode_topk(x_c, W_enc, b_enc, k, dead_idx, k_aux, bf16):
    """Chunked pre = b_enc + x_c @ W_enc; per chunk the top k, and the top k_aux among the dead columns.

    Returns relu'd values [B, k] and latent ids [B, k]; with dead_idx also relu'd values [B, k_aux] and
    positions INTO dead_idx [B, k_aux]."""
    B, n = x_c.shape[0], W_enc.shape[1]
    dev = x_c.device
    vals = torch.empty(B, k, dtype=torch.float32, device=dev)
    idx = torch.empty(B, k, dtype=torch.int64, device=dev)
    aux = dead_idx is not None
    if aux:
        aux_vals = torch.empty(B, k_aux, dtype=torch.float32, device=dev)
        aux_pos = torch.empty(B, k_aux, dtype=torch.int64, device=dev)
    if bf16:
        W, bias, xin = W_enc.to(torch.bfloat16), b_enc.to(torch.bfloat16), x_c.to(torch.bfloat16)
    else:
        W, bias, xin = W_enc, b_enc, x_c
    max_rows = max(1, CHUNK_BYTES // (n * W.element_size()))
    n_chunks = -(-B // max_rows)
    rows = -(-B // n_chunks)  # equal chunks
    buf = torch.empty(min(rows, B), n, dtype=W.dtype, device=dev)
    for s in range(0, B, rows):
        e = min(B, s + rows)
        p = torch.addmm(bias, xin[s:e], W, out=buf[: e - s])
        if bf16:
            v, i = p.topk(k, dim=-1, sorted=False)
            vals[s:e], idx[s:e] = v, i
        else:
            torch.topk(p, k, dim=-1, sorted=False, out=(vals[s:e], idx[s:e]))
        if aux:
            v, i = p.index_select(1, dead_idx).topk(k_aux, dim=-1, sorted=False)
            aux_vals[s:e], aux_pos[s:e] = v, i
    del buf
    if bf16:  # the selection was made in bf16; recompute the kept values exactly in fp32 (SDDMM)
        vals = _Pattern(idx, n).rowwise_dot(x_c, W_enc.T).add_(b_enc[idx])
        if aux:
            aux_vals = _Pattern(dead_idx[aux_pos], n).rowwise_dot(x_c, W_enc.T).add_(b_enc[dead_idx[aux_pos]])
    with _serial():
        vals.relu_()
        if aux:
            aux_vals.relu_()
    return (vals, idx, aux_vals, aux_pos) if aux else (vals, idx, None, None)


class _Opts(NamedTuple):
    k: int
    sub_b_dec: bool  # autoencoder: x_c = x_s - b_dec
    dead_idx: torch.Tensor | None  # [n_dead] int64, or None: no AuxK
    k_aux: int  # min(k_aux, n_dead)
    aux_scale: float  # min(n_dead / k_aux, 1)
    bf16: bool


class _TopKLoss(torch.autograd.Function):
    """(x_s, y_s, skip_out, W_enc, b_enc, W_dec, b_dec) -> (recon, auxk, out_s, acts, idx, aux_acts, aux_idx)

    recon = Σ(out_s - y_s)² / Σ(y_s - ȳ_s)², out_s = Σ_j acts W_dec[idx] + b_dec (+ skip_out);
    auxk  = aux_scale Σ(ê - e)² / Σ(e - ē)², e = (y_s - out_s) detached, ê = A W_dec[dead] with A the
            [B, n_dead] dense matrix of the AuxK code (0 without dead latents).
    Differentiable outputs: recon, auxk, out_s, acts; gradients reach skip_out and the weights (x_s and
    y_s are data: they get none).

    AuxK runs as three dense GEMMs over the dead columns only ([B, n_dead] x [n_dead, d] forward; the
    transposes backward), not as gathers of k_aux rows per token: k_aux = d_in / 2 = 384 rows per token
    would move B*k_aux*d*4 B = 4.8 GB per pass at the benchmark size, while n_dead-wide GEMMs cost
    ~8 B*n_dead*d flop, cheaper for any n_dead up to ~10x k_aux.
    """

    @staticmethod
    def forward(ctx, x_s, y_s, skip_out, W_enc, b_enc, W_dec, b_dec, o: _Opts):
        x_c = x_s - b_dec if o.sub_b_dec else x_s
        acts, idx, aux_vals, aux_pos = _encode_topk(x_c, W_enc, b_enc, o.k, o.dead_idx, o.k_aux, o.bf16)
        out = F.embedding_bag(idx, W_dec, per_sample_weights=acts, mode="sum").add_(b_dec)
        if skip_out is not None:
            out += skip_out
        err = out - y_s  # [B, d]
        denom = distributed.batch_total_variance(y_s)
        recon = torch.dot(err.view(-1), err.view(-1)) / denom
        ctx.set_materialize_grads(False)
        ctx.o = o
        ctx.aux = aux_vals is not None
        if ctx.aux:
            A = torch.zeros(y_s.shape[0], o.dead_idx.shape[0], dtype=acts.dtype, device=acts.device)  # type: ignore[union-attr]
            A.scatter_(1, aux_pos, aux_vals)  # [B, n_dead]
            W_dead = W_dec.index_select(0, o.dead_idx)  # [n_dead, d]
            diff = torch.addmm(err, A, W_dead)  # ê - e = A W_dead - (y - out)
            denom_e = distributed.batch_total_variance(err)
            auxk = o.aux_scale * torch.dot(diff.view(-1), diff.view(-1)) / denom_e
            aux_idx = o.dead_idx[aux_pos]  # type: ignore[index]
            ctx.save_for_backward(x_c, err, denom, W_enc, W_dec, acts, idx, A, W_dead, diff, denom_e)
            ctx.mark_non_differentiable(idx, aux_vals, aux_idx)
        else:
            auxk, aux_idx = recon.new_zeros(()), None
            ctx.save_for_backward(x_c, err, denom, W_enc, W_dec, acts, idx)
            ctx.mark_non_differentiable(idx)
        return recon, auxk, out, acts, idx, aux_vals, aux_idx

    @staticmethod
    def backward(ctx, g_recon, g_auxk, g_out, g_acts, _g_idx, _g_aux_vals, _g_aux_idx):
        x_c, err, denom, W_enc, W_dec, acts, idx, *aux = ctx.saved_tensors
        need_skip, need_We, need_be, need_Wd, need_bd = ctx.needs_input_grad[2:7]
        o, n = ctx.o, W_enc.shape[1]
        g = None  # dL/dout [B, d]
        if g_recon is not None:  # d/d out of Σ err² / denom
            g = err * (2 * g_recon / denom)
        if g_out is not None:
            g = g_out if g is None else g + g_out
        pat = _Pattern(idx, n)
        dacts = dW_dec = db_dec = None
        if g is not None:
            g = g.contiguous()
            if need_Wd:
                dW_dec = pat.t_mm(acts, g)  # [n, d]
            if need_bd:
                db_dec = g.sum(0)
            dacts = pat.rowwise_dot(g, W_dec)  # [B, k]
        with _serial():
            if g_acts is not None:
                dacts = g_acts if dacts is None else dacts + g_acts
            dpre = dacts.masked_fill_(acts <= 0, 0) if dacts is not None else None  # [B, k]
        dpre_aux = None  # [B, n_dead] dense
        if ctx.aux and g_auxk is not None:
            A, W_dead, diff, denom_e = aux
            g_eh = diff * (2 * o.aux_scale * g_auxk / denom_e)  # d auxk / d ê  [B, d]
            if need_Wd:
                dW_dead = A.T @ g_eh  # [n_dead, d]
                dW_dec = torch.zeros_like(W_dec).index_copy_(0, o.dead_idx, dW_dead) if dW_dec is None \
                    else dW_dec.index_add_(0, o.dead_idx, dW_dead)
            dpre_aux = (g_eh @ W_dead.T).mul_(A > 0)  # relu and selection mask
        dW_enc = db_enc = None
        sub = o.sub_b_dec
        if (dpre is not None or dpre_aux is not None) and (need_We or need_be or (need_bd and sub)):
            if need_We:
                dWt = pat.t_mm(dpre, x_c) if dpre is not None else x_c.new_zeros(n, x_c.shape[1])
                if dpre_aux is not None:
                    dWt.index_add_(0, o.dead_idx, dpre_aux.T @ x_c)
                dW_enc = dWt.T.contiguous()  # [d, n]
            with _serial():
                db = torch.zeros(n, dtype=W_enc.dtype, device=W_enc.device)
                if dpre is not None:
                    db.index_add_(0, idx.view(-1), dpre.view(-1))
            if dpre_aux is not None:
                db.index_add_(0, o.dead_idx, dpre_aux.sum(0))
            if need_be:
                db_enc = db
            if need_bd and sub:  # x_c = x_s - b_dec: Σ_b dx_c[b] = W_enc Σ_b dpre[b]
                corr = W_enc @ db
                db_dec = -corr if db_dec is None else db_dec - corr
        d_skip = g if need_skip else None
        return None, None, d_skip, dW_enc, db_enc, dW_dec, db_dec, None


# ---------------------------------------------------------------------------- the loss


def topk_loss(coder: SparseCoder, x: torch.Tensor, y: torch.Tensor | None = None, *, bf16: bool = False,
              dead: torch.Tensor | None = None, k_aux: int | None = None,
              auxk_coeff: float = 1 / 32) -> LossOutput:
    """`coder.loss(x, y)` for a TopK coder, fast (see the module docstring). x [B, d_in], y [B, d_out].

    Returns LossOutput(loss, out, acts, pre, parts) where
      loss   scalar to backpropagate: recon_loss (+ auxk_coeff * auxk_loss with `dead`)
      out    [B, d_out] reconstruction in raw units (like coder.loss; differentiable)
      acts   SparseCode(values [B, k], indices [B, k]) -- NOT the dense [B, n] tensor of coder.loss
             (`to_dense(acts, n)` gives it; `firing_counts(acts, n)` counts firings per latent)
      pre    None, or with `dead`: SparseCode of the AuxK code, relu of the top-k_aux pre-activations
             among the dead latents [B, min(k_aux, n_dead)]; the dense pre-activations are never kept
      parts  {"recon_loss": FVU over the batch, "auxk_loss": AuxK as coder.auxk_loss (with `dead`)}
    dead: [n_latents] bool, latents that have not fired for the trainer's window; k_aux defaults to
    d_in // 2. AuxK = min(n_dead / k_aux, 1) * ‖e - Σ relu(pre_aux) W_dec[aux]‖² / ‖e - ē‖² with
    e = (y - out) detached, exactly `coder.auxk_loss` (0 when nothing is dead).
    bf16: select the top k on a bf16 encoder matmul (values recomputed in fp32); use it only where
    `bf16_matmul_is_fast()`. x and y are data: no gradient flows to them. Raises NonFiniteError when
    the loss is NaN / inf (NaN or inf in the activations or the weights).
    """
    c = coder.cfg
    if c.arch != "topk":
        raise InputError(f"topk_loss implements the arch='topk' training rule; this coder is {c.arch!r} "
                         "(use coder.loss).")
    if x.ndim != 2:
        raise InputError(f"topk_loss expects a batch [B, d_in], got shape {tuple(x.shape)}.")
    coder._check(x, c.d_in, "input")
    if coder.W_enc.dtype != torch.float32:
        raise InputError(f"topk_loss trains fp32 master weights (bf16=True for bf16 matmuls); the coder is "
                         f"{coder.W_enc.dtype}.")
    y = x if y is None else y
    coder._check(y, c.out_dim, "target")
    if y.shape[0] != x.shape[0]:
        raise InputError(f"input and target batches differ: {x.shape[0]} vs {y.shape[0]} rows.")
    x_s = coder._scaled_in(x.detach())
    y_s = y.detach().to(torch.float32)
    y_s = y_s * c.output_scale if c.output_scale != 1.0 else y_s

    dead_idx, ka, n_dead = None, 0, 0
    if dead is not None:
        if dead.shape != (c.n_latents,) or dead.dtype != torch.bool:
            raise InputError(f"dead must be a bool tensor of shape ({c.n_latents},), got {dead.dtype} "
                             f"{tuple(dead.shape)}.")
        k_aux = max(1, c.d_in // 2) if k_aux is None else int(k_aux)
        if k_aux <= 0:
            raise InputError(f"k_aux must be positive, got {k_aux}.")
        n_dead = int(dead.sum())
        if n_dead:
            dead_idx = dead.nonzero().squeeze(1).to(x.device)
            ka = min(k_aux, n_dead)

    skip_out = x_s @ coder.W_skip.T if c.skip else None
    opts = _Opts(int(c.k), bool(c.apply_b_dec_to_input), dead_idx, ka,  # type: ignore[arg-type]
                 min(n_dead / k_aux, 1.0) if n_dead else 0.0, bool(bf16))  # type: ignore[operator]
    recon, auxk, out_s, acts, idx, aux_vals, aux_idx = _TopKLoss.apply(
        x_s, y_s, skip_out, coder.W_enc, coder.b_enc, coder.W_dec, coder.b_dec, opts)
    if not bool(torch.isfinite(recon)):
        raise NonFiniteError(f"non-finite reconstruction loss ({float(recon.detach())}): NaN or inf in the activations "
                             "given to the sparse coder, or in its weights.")
    parts = {"recon_loss": recon}
    loss, pre = recon, None
    if dead is not None:
        parts["auxk_loss"] = auxk
        if n_dead:
            loss = loss + auxk_coeff * auxk
            pre = SparseCode(aux_vals, aux_idx)
    out = out_s / c.output_scale if c.output_scale != 1.0 else out_s
    return LossOutput(loss, out, SparseCode(acts, idx), pre, {k: v.detach() for k, v in parts.items()})  # type: ignore[arg-type]
