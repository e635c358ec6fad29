"""Exact weight processing on a HookedTransformer, in place (TransformerLens's weight processing).

Every function leaves the model's log-probabilities unchanged up to float rounding: the math
runs in float64 and is written back in the model's dtype. Activations at hook points do change
(that is the point: e.g. after fold_ln, ln1.hook_normalized is the un-weighted normalised input).

    fold_ln                 pre-norm weights (and LN biases) -> the linear maps that read them
    center_writing_weights  LayerNorm models: writes to the residual get zero mean over d_model
    center_unembed          W_U, b_U get zero mean over the vocabulary (softmax is shift-invariant)
    fold_value_biases       b_O += sum_h b_V[h] W_O[h], b_V = 0 (attention rows sum to 1)
    refactor_factored_attn  canonical SVD factorisation of W_Q W_K^T and W_V W_O per head
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from mechscope.errors import InputError

STEPS = ("fold_ln", "center_writing_weights", "center_unembed", "fold_value_biases", "refactor_factored_attn")


def _f64(t: torch.Tensor) -> torch.Tensor:
    return t.detach().to(torch.float64)


def _write(target: torch.Tensor, value: torch.Tensor) -> None:
    """Copy value into a parameter (or a view of one) in the parameter's dtype."""
    with torch.no_grad():
        target.copy_(value.to(target.dtype))


def _why_not(model, step: str) -> str | None:
    """Why `step` would not be exact for this model (None: it is)."""
    c = model.cfg
    if step == "fold_ln" and c.post_layernorm:
        return "post-LN model: its norms sit on the residual stream, not in front of a linear map"
    if step == "center_writing_weights":
        if c.normalization != "LN":
            return "RMSNorm does not subtract the mean, so the mean of the residual stream matters"
        if c.post_layernorm or not c.final_norm:
            return "the residual stream is read without a LayerNorm in front"
    if step == "center_unembed":
        if not c.has_unembed:
            return "the model has no unembedding"
        if c.final_softcap is not None:
            return "logit soft-capping (tanh) is not shift-invariant"
    if step == "refactor_factored_attn":
        if c.positional == "rotary":
            return "with rotary embeddings W_Q W_K^T depends on the relative position; it has no single factorisation"
        if c.qk_norm:
            return "queries and keys are normalised, so only the raw W_Q and W_K are meaningful"
        if c.n_kv_heads != c.n_heads:
            return "grouped-query attention shares W_K/W_V between heads, so per-head factors cannot be written back"
    return None


def _check(model, step: str) -> None:
    reason = _why_not(model, step)
    if reason:
        raise InputError(f"{step} is not exact for {model.cfg.architecture}: {reason}.")


def _untie(model) -> None:
    """Give the unembedding its own copy of the embedding before changing either."""
    if model.cfg.has_unembed and model.unembed.weight is model.embed.weight:
        w = model.embed.weight
        model.unembed.weight = nn.Parameter(w.detach().clone(), requires_grad=w.requires_grad)
    model.cfg.tie_word_embeddings = False


def _enable_bias(model, flag: str) -> None:
    """Create zero biases on every linear governed by config `flag` (keeps cfg and state_dict in step)."""
    c = model.cfg
    if flag == "unembed_bias":
        linears = [model.unembed]
    else:
        pick: dict[str, Callable] = {
            "attn_bias": lambda b: [b.attn.qkv],
            "attn_out_bias": lambda b: [b.attn.o],
            "mlp_bias": lambda b: [b.mlp.up, b.mlp.down] + ([b.mlp.gate] if c.gated_mlp else []),
        }
        linears = [lin for b in model.blocks if flag != "mlp_bias" or not c.attn_only for lin in pick[flag](b)]
    for lin in linears:
        if lin.bias is None:
            w = lin.weight
            lin.bias = nn.Parameter(torch.zeros(w.shape[0], dtype=w.dtype, device=w.device),
                                    requires_grad=w.requires_grad)
    setattr(c, flag, True)


# --------------------------------------------------------------------------- the steps


def _fold_norm(model, norm, linears: list[nn.Linear], bias_flag: str) -> None:
    """linear(n * w + b) = (W diag(w)) n + (W b + c); for LN also centre W over its input dim
    (exact because the LayerNorm output has zero mean). Then the norm keeps no weight/bias."""
    if norm.w is None and norm.b is None:
        return  # already folded
    w = None if norm.w is None else _f64(norm.w)  # [D]
    b = None if norm.b is None else _f64(norm.b)  # [D]
    if b is not None and any(lin.bias is None for lin in linears):
        _enable_bias(model, bias_flag)
    for lin in linears:
        W = _f64(lin.weight)  # [out, D]
        if b is not None:
            _write(lin.bias, _f64(lin.bias) + W @ b)
        if w is not None:
            W = W * w
        if norm.kind == "LN":
            W = W - W.mean(1, keepdim=True)
        _write(lin.weight, W)
    norm.w = None  # nn.Module keeps the name registered as a None parameter
    norm.b = None


def fold_ln(model) -> None:
    """Fold pre-norm weights into what reads them: ln1 -> attn.qkv, ln2 -> mlp.up/gate, ln_final ->
    unembed (untied first). Gemma's post-attn/post-mlp norms and q/k norms are kept as they are."""
    _check(model, "fold_ln")
    c = model.cfg
    for blk in model.blocks:
        _fold_norm(model, blk.ln1, [blk.attn.qkv], "attn_bias")
        if not c.attn_only:
            _fold_norm(model, blk.ln2, [blk.mlp.up] + ([blk.mlp.gate] if c.gated_mlp else []), "mlp_bias")
    if c.final_norm and c.has_unembed and not c.mlm_head:
        _untie(model)
        _fold_norm(model, model.ln_final, [model.unembed], "unembed_bias")


def center_writing_weights(model) -> None:
    """Subtract the mean over d_model from every write to the residual stream (W_E, W_pos, W_O,
    b_O, W_out, b_out). Exact only when every reader is a LayerNorm, which removes that mean."""
    _check(model, "center_writing_weights")
    _untie(model)  # W_E changes; W_U must not
    writes: list[tuple[torch.Tensor, int]] = [(model.embed.weight, -1)]  # [V, D]
    if model.cfg.positional == "learned":
        writes.append((model.pos_embed.weight, -1))  # [n_ctx, D]
    for blk in model.blocks:
        for lin in (blk.attn.o,) if model.cfg.attn_only else (blk.attn.o, blk.mlp.down):
            writes.append((lin.weight, 0))  # [D, in]
            if lin.bias is not None:
                writes.append((lin.bias, 0))  # [D]
    for t, dim in writes:
        x = _f64(t)
        _write(t, x - x.mean(dim, keepdim=True))


def center_unembed(model) -> None:
    """Subtract the mean over the vocabulary from W_U and b_U: log-softmax is unchanged."""
    _check(model, "center_unembed")
    _untie(model)
    W = _f64(model.unembed.weight)  # [V, D]
    _write(model.unembed.weight, W - W.mean(0, keepdim=True))
    if model.unembed.bias is not None:
        b = _f64(model.unembed.bias)
        _write(model.unembed.bias, b - b.mean())


def fold_value_biases(model) -> None:
    """b_O += sum_h b_V[h] @ W_O[h]; b_V = 0. Exact: each attention row sums to 1, so the value
    bias passes through the pattern unchanged (grouped-query: kv heads repeated per query head)."""
    c = model.cfg
    if not c.attn_bias:
        return  # no value biases
    rep = c.n_heads // c.n_kv_heads
    for blk in model.blocks:
        a = blk.attn
        b_v = _f64(a.b_V).repeat_interleave(rep, 0)  # [H, E]
        shift = torch.einsum("he,hed->d", b_v, _f64(a.W_O))  # [D]
        if a.o.bias is None:
            _enable_bias(model, "attn_out_bias")
        _write(a.o.bias, _f64(a.o.bias) + shift)
        _write(a.b_V, torch.zeros_like(b_v[: c.n_kv_heads]))


def _product_svd(a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """SVD of a @ b per head without forming it: a [H, n, E], b [H, E, m] -> U [H, n, E], S [H, E],
    Vh [H, E, m]. a = Qa Ra, b^T = Qb Rb, so a b = Qa (Ra Rb^T) Qb^T and only an ExE SVD is needed."""
    qa, ra = torch.linalg.qr(a)
    qb, rb = torch.linalg.qr(b.mT)
    u, s, vh = torch.linalg.svd(ra @ rb.mT)
    return qa @ u, s, (qb @ vh.mT).mT


def refactor_factored_attn(model) -> None:
    """TransformerLens's refactor_factored_attn_matrices: per head, W_Q W_K^T = U S V^T is rewritten
    as W_Q = U sqrt(S), W_K = V sqrt(S) (biases as an extra input row, so q.k is unchanged), and,
    after fold_value_biases, W_V W_O as W_V = U S, W_O = V^T (orthonormal rows)."""
    _check(model, "refactor_factored_attn")
    c = model.cfg
    fold_value_biases(model)
    D = c.d_model
    for blk in model.blocks:
        a = blk.attn
        wq, wk = _f64(a.W_Q), _f64(a.W_K)  # [H, D, E]
        if c.attn_bias:  # augmented [x, 1] inputs carry the biases
            wq = torch.cat([wq, _f64(a.b_Q)[:, None]], 1)  # [H, D+1, E]
            wk = torch.cat([wk, _f64(a.b_K)[:, None]], 1)
        u, s, vh = _product_svd(wq, wk.mT)
        root = s.sqrt()[:, None, :]  # [H, 1, E]
        q_new, k_new = u * root, vh.mT * root  # [H, D(+1), E]
        _write(a.W_Q, q_new[:, :D])
        _write(a.W_K, k_new[:, :D])
        if c.attn_bias:
            _write(a.b_Q, q_new[:, D])
            _write(a.b_K, k_new[:, D])
        u, s, vh = _product_svd(_f64(a.W_V), _f64(a.W_O))  # [H, D, E] @ [H, E, D]
        _write(a.W_V, u * s[:, None, :])
        _write(a.W_O, vh)


_FUNCS: dict[str, Callable] = {
    "fold_ln": fold_ln,
    "center_writing_weights": center_writing_weights,
    "center_unembed": center_unembed,
    "fold_value_biases": fold_value_biases,
    "refactor_factored_attn": refactor_factored_attn,
}


@torch.no_grad()
def process_weights(model, fold_ln: bool = True, center_writing_weights: bool = True, center_unembed: bool = True,
                    fold_value_biases: bool = True, refactor_factored_attn: bool = False):
    """Apply the requested steps that are exact for this model, in TransformerLens's order.

    Applied steps are appended to model.cfg.processing (a step already there is not repeated);
    requested steps that are not exact for the model are skipped and listed with the reason in
    model.processing_skipped ({step: reason})."""
    wanted = {"fold_ln": fold_ln, "center_writing_weights": center_writing_weights,
              "center_unembed": center_unembed, "fold_value_biases": fold_value_biases,
              "refactor_factored_attn": refactor_factored_attn}
    skipped: dict[str, str] = {}
    for step in STEPS:
        if not wanted[step] or step in model.cfg.processing:
            continue
        reason = _why_not(model, step)
        if reason:
            skipped[step] = reason
            continue
        _FUNCS[step](model)
        model.cfg.processing.append(step)
    model.processing_skipped = skipped
    return model
