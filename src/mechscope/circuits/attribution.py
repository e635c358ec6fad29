"""Gradient attribution (attribution patching, EAP, EAP-IG) and circuit faithfulness by exact edge ablation.

Why gradients: activation patching needs one forward pass per component (per edge: ~10^5 on a small
LM); a first-order Taylor expansion scores every node or edge from one forward and one backward
pass (Nanda 2023; Syed et al. 2023). Where the model is far from linear between the clean and
corrupted activations the expansion is poor; integrating the gradient along a path from the
corrupted to the clean input (EAP-IG, Hanna et al. 2024) repairs most of that for `steps` passes.

Conventions (shared by everything here):
* clean / corrupted: text or token ids [B, T] with the same token counts (tokenized exactly as
  activation_patching does); `metric(logits [B, T, V])` returns a scalar tensor or one value per
  prompt [B] (edge scores average it). The metric is what the scores explain.
* Node outputs (what a node writes into the residual stream): input = blocks.0.hook_resid_pre
  (token + positional embeddings), head a{l}.h{h} = attn.hook_result[:, :, h] (no b_O),
  MLP m{l} = hook_mlp_out. Biases (b_O) are constants and belong to no node.
* Edge scores are NOISING scores by default, as in EAP / EAP-IG:
      score(u -> v) = sum_{b,t} (a_u(corrupted) - a_u(clean)) . mean_k dm/dx_v (run k)
  where x_v is v's input (the residual as v reads it) and the runs k feed the model the input
  embeddings corrupted + (k/steps) (clean - corrupted), k = 1..steps (Hanna et al.'s formula;
  steps=1 is EAP, whose gradient is taken at the clean run). So a score approximates
  metric(clean run with u's corrupted output fed into v) - metric(clean run): negative = the edge
  carries what the metric rewards. Rank by |score|. direction="denoise" swaps the two runs.
* Node-level `attribution_patching` mirrors `patching.activation_patching` (same arguments, same
  result layout, default direction "denoise" = clean activations into the corrupted run) and returns
  the estimated metric after each patch: metric(base) + (a_src - a_base) . dm/da at the base run.

Per-input gradients: v's input gradient is NOT the residual gradient (that sums all readers). For
head h's query input it is J_ln1^T W_Q[h] dm/dq_h: we take dm/dq, dm/dk, dm/dv from backward hooks
on hook_q/k/v, map them to the normed residual through each head's own W_Q/W_K/W_V, and pull them
back through ln1 with one vector-Jacobian product of the norm at the cached residual, batched over
all heads (exact for LayerNorm and RMSNorm; checked against autograd in the tests). MLP inputs use
the gradient at ln2.hook_normalized pulled back through ln2; the logits input is the gradient at
the last hook_resid_post. Grouped-query attention: k/v inputs are per kv head (see graph.py).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any, Literal, NamedTuple

import torch

from mechscope.circuits.graph import Graph, GraphShape
from mechscope.circuits.metrics import check_metric_value
from mechscope.circuits.patching import patch_axes, resolve_hook
from mechscope.circuits.prompts import tokenize_pair
from mechscope.errors import (
    EmptyCircuitError,
    InputError,
    MetricError,
    PromptMismatchError,
    UnsupportedArchitectureError,
)

Metric = Callable[[torch.Tensor], torch.Tensor]  # logits [B, T, V] -> scalar (or [B], averaged)
Prompts = str | Sequence[str] | torch.Tensor
Ablation = Literal["zero", "mean", "resample"]
ABLATIONS: tuple[str, ...] = ("zero", "mean", "resample")

# --------------------------------------------------------------------------- shared helpers


def _check_model(model: Any) -> None:
    c = model.cfg
    bad = [n for n in ("post_layernorm", "embed_norm", "post_attn_norm", "post_mlp_norm") if getattr(c, n, False)]
    if bad:
        raise UnsupportedArchitectureError(
            f"Edge attribution needs a pre-norm residual stream that is a plain sum of node outputs; this model "
            f"has {', '.join(bad)} ({c.architecture}). Use activation patching instead.")
    if not c.has_unembed:
        raise UnsupportedArchitectureError("Edge attribution needs logits; this model has no unembedding.")


def _pair(model: Any, clean: Prompts, corrupted: Prompts, attention_mask: Any, prepend_bos: bool | None = None):
    """Tokenize like activation_patching (text is left-padded) and require the same padding in both runs:
    edges are compared position by position. Returns (clean [B, T], corrupted [B, T], mask [B, T] or None)."""
    ct, xt, cm, xm = tokenize_pair(model, clean, corrupted, attention_mask, prepend_bos)
    ct, cm = model.prepare(ct, cm, None, "left")
    xt, xm = model.prepare(xt, xm, None, "left")
    if (cm is None) != (xm is None) or (cm is not None and not torch.equal(cm, xm)):
        raise PromptMismatchError("Clean and corrupted prompts are padded differently; their real tokens must sit "
                                  "at the same positions (same token counts per pair, or one attention_mask).")
    return ct, xt, cm


def _metric_value(metric: Metric, logits: torch.Tensor) -> torch.Tensor:
    """metric(logits) checked: a finite 0-d tensor or one value per prompt [B] (differentiable)."""
    return check_metric_value(metric(logits), logits.shape[0], "run", detach=False)


def _scalar(metric: Metric, logits: torch.Tensor) -> torch.Tensor:
    """The metric as a scalar: per-prompt values are averaged."""
    return _metric_value(metric, logits).mean()


def _apply_norm(norm: Any, x: torch.Tensor) -> torch.Tensor:
    """The block's norm applied to x [..., D] without passing through its hook points (we call it from inside
    hooks on that very norm); identity where the block has no norm."""
    return x if norm is None else norm.normalize(x)


def _norm_vjp(norm: Any, x: torch.Tensor, grad_out: torch.Tensor) -> torch.Tensor:
    """J_norm(x)^T g for many cotangents at once: x [B, T, D], grad_out [B, T, n, D] -> [B, T, n, D] (float32).

    The norm is recomputed on n copies of x so one autograd call gives every input's own gradient."""
    with torch.enable_grad():
        xr = x.detach().float()[:, :, None, :].expand_as(grad_out).clone().requires_grad_(True)
        y = _apply_norm(norm, xr)
        (g,) = torch.autograd.grad(y, xr, grad_out.float())
    return g


def _node_output_names(model: Any) -> list[str]:
    c = model.cfg
    names = ["blocks.0.hook_resid_pre"]
    for layer in range(c.n_layers):
        names.append(f"blocks.{layer}.attn.hook_result")
        if not c.attn_only:
            names.append(f"blocks.{layer}.hook_mlp_out")
    return names


@torch.no_grad()
def _node_outputs(model: Any, tokens: torch.Tensor, mask: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Every upstream node's output in graph order: ([B, T, U, D], logits [B, T, V])."""
    logits, cache = model.run_with_cache(tokens, attention_mask=mask, names_filter=_node_output_names(model))
    return _stack_outputs(model, cache), logits


def _stack_outputs(model: Any, cache: Any) -> torch.Tensor:
    c = model.cfg
    parts = [cache["blocks.0.hook_resid_pre"][:, :, None]]
    for layer in range(c.n_layers):
        parts.append(cache[f"blocks.{layer}.attn.hook_result"])  # [B, T, H, D]
        if not c.attn_only:
            parts.append(cache[f"blocks.{layer}.hook_mlp_out"][:, :, None])
    return torch.cat(parts, dim=2)


# --------------------------------------------------------------------------- per-input gradients


def _input_gradients(model: Any, tokens: torch.Tensor, mask: torch.Tensor | None, metric: Metric,
                     input_embeds: torch.Tensor | None = None,
                     outputs: dict[str, torch.Tensor] | None = None) -> tuple[torch.Tensor, float]:
    """d metric / d (input of every downstream node), in graph column order: ([B, T, V, D] float32, metric).

    input_embeds [B, T, D], if given, replaces blocks.0.hook_resid_pre (the EAP-IG interpolation).
    outputs, if given, receives this run's node outputs (saves a separate forward pass)."""
    c = model.cfg
    L = c.n_layers
    seq = not c.attn_only and not c.parallel_attn_mlp
    resid: dict[str, torch.Tensor] = {}  # norm inputs of this run
    grads: dict[str, torch.Tensor] = {}

    leaf: dict[str, torch.Tensor] = {}

    def make_leaf(x, hook):  # backward stops here: no parameter .grad is touched, frozen models work
        src = x if input_embeds is None else input_embeds.to(x.dtype)
        leaf["x"] = src.detach().clone().requires_grad_(True)
        return leaf["x"]

    def save(x, hook):
        resid[hook.name] = x.detach()

    def save_grad(g, hook):
        grads[hook.name] = g.detach()

    fwd: list = [("blocks.0.hook_resid_pre", make_leaf)]
    fwd += [(f"blocks.{la}.hook_resid_pre", save) for la in range(L)]
    bwd: list = [(f"blocks.{la}.attn.hook_{x}", save_grad) for la in range(L) for x in "qkv"]
    if not c.attn_only:
        if seq:
            fwd += [(f"blocks.{la}.hook_resid_mid", save) for la in range(L)]
        bwd += [(f"blocks.{la}.ln2.hook_normalized", save_grad) for la in range(L)]
    final = f"blocks.{L - 1}.hook_resid_post"
    bwd.append((final, save_grad))
    if outputs is not None:
        fwd += [(n, lambda x, hook: outputs.__setitem__(hook.name, x.detach())) for n in _node_output_names(model)]
    with torch.enable_grad(), model.hooks(fwd, bwd):
        logits = model(tokens, attention_mask=mask)
        value = _scalar(metric, logits)
        torch.autograd.grad(value, leaf["x"], allow_unused=True)  # fills `grads` through the hooks only

    def g(name: str, like: torch.Tensor) -> torch.Tensor:
        return grads[name].float() if name in grads else torch.zeros_like(like, dtype=torch.float32)

    parts = []
    for la, block in enumerate(model.blocks):
        attn, pre = block.attn, resid[f"blocks.{la}.hook_resid_pre"]
        B, T, _ = pre.shape
        zq = pre.new_zeros(B, T, c.n_heads, c.d_head)
        zk = pre.new_zeros(B, T, c.n_kv_heads, c.d_head)
        gq, gk, gv = (g(f"blocks.{la}.attn.hook_{x}", z) for x, z in (("q", zq), ("k", zk), ("v", zk)))
        # each head's gradient on the normed residual through its own projection: [B, T, H + 2K, D]
        gy = torch.cat([torch.einsum("bthe,hde->bthd", gq, attn.W_Q.detach().float()),
                        torch.einsum("bthe,hde->bthd", gk, attn.W_K.detach().float()),
                        torch.einsum("bthe,hde->bthd", gv, attn.W_V.detach().float())], dim=2)
        parts.append(_norm_vjp(block.ln1, pre, gy))
        if not c.attn_only:
            x = resid[f"blocks.{la}.hook_resid_mid"] if seq else pre
            parts.append(_norm_vjp(block.ln2, x, g(f"blocks.{la}.ln2.hook_normalized", x)[:, :, None]))
    parts.append(g(final, pre)[:, :, None])
    return torch.cat(parts, dim=2), float(value.detach())


# --------------------------------------------------------------------------- EAP / EAP-IG


def edge_attribution(
    model: Any,
    clean: Prompts,
    corrupted: Prompts,
    metric: Metric,
    method: Literal["eap", "eap-ig"] = "eap-ig",
    steps: int = 5,
    ig: Literal["inputs", "clean-corrupted"] = "inputs",
    *,
    direction: Literal["noise", "denoise"] = "noise",
    attention_mask: Any = None,
    prepend_bos: bool | None = None,
    progress: bool = False,
) -> Graph:
    """Score every edge of the model's graph (see graph.py) with EAP or EAP-IG. Returns a Graph.

    method="eap": one gradient pass at the clean run (Syed et al. 2023).
    method="eap-ig", ig="inputs": gradients averaged over `steps` runs whose input embeddings go from
    corrupted to clean, alpha = k/steps for k = 1..steps (Hanna et al. 2024); cost = steps passes.
    ig="clean-corrupted": the mean of the gradients at the clean and the corrupted runs (2 passes).
    Scores follow the noising convention in the module docstring; graph.node_scores are the node-level
    attributions (sum of each node's outgoing edges). direction="denoise" swaps the roles of the prompts
    (base run = corrupted, patched-in values = clean; the IG path then ends at the corrupted input): use it
    to compare with denoising activation patching. A per-prompt metric is averaged. Metric values and the
    settings are kept in graph.meta.
    """
    _check_model(model)
    if method not in ("eap", "eap-ig"):
        raise InputError(f"method must be 'eap' or 'eap-ig', got {method!r}.")
    if ig not in ("inputs", "clean-corrupted"):
        raise InputError(f"ig must be 'inputs' or 'clean-corrupted', got {ig!r}.")
    if method == "eap-ig" and (not isinstance(steps, int) or steps < 1):
        raise InputError(f"steps must be a positive integer, got {steps!r}.")
    if direction not in ("noise", "denoise"):
        raise InputError(f"direction must be 'noise' or 'denoise', got {direction!r}.")
    ct, xt, mask = _pair(model, clean, corrupted, attention_mask, prepend_bos)
    if direction == "denoise":  # the same computation with the roles of the two runs swapped
        ct, xt = xt, ct
    # from here on "clean" is the base run (the corrupted prompts when denoising)
    a_corr, corr_logits = _node_outputs(model, xt, mask)  # [B, T, U, D]
    m_src = float(_scalar(metric, corr_logits))
    if method == "eap":
        alphas = [1.0]
    elif ig == "clean-corrupted":
        alphas = [1.0, 0.0]
    else:
        alphas = [k / steps for k in range(steps, 0, -1)]  # alpha = 1 (the clean run) first
    with torch.no_grad():
        emb_clean = model(ct, attention_mask=mask, stop_at_layer=0)  # the input node's output: [B, T, D]
    emb_corr = a_corr[:, :, 0]
    from tqdm.auto import tqdm

    grad_sum, outputs = None, {}
    for alpha in tqdm(alphas, disable=not progress, desc=method, leave=False):
        embeds = None if alpha == 1.0 else emb_corr + alpha * (emb_clean - emb_corr)
        grad, m = _input_gradients(model, ct, mask, metric, embeds, outputs if alpha == 1.0 else None)
        if alpha == 1.0:  # the unmodified clean run: its node outputs and metric
            a_clean, m_base = _stack_outputs(model, outputs), m
        grad_sum = grad if grad_sum is None else grad_sum.add_(grad)
    grad_mean = grad_sum / len(alphas)  # [B, T, V, D]
    m_clean, m_corr = (m_base, m_src) if direction == "noise" else (m_src, m_base)
    delta = (a_corr.float() - a_clean.float())  # [B, T, U, D]
    U, V = delta.shape[2], grad_mean.shape[2]
    scores = delta.permute(2, 0, 1, 3).reshape(U, -1) @ grad_mean.permute(2, 0, 1, 3).reshape(V, -1).T  # [U, V]
    conv = ("score(u->v) ~ metric(clean run, u's corrupted output into v) - metric(clean)" if direction == "noise"
            else "score(u->v) ~ metric(corrupted run, u's clean output into v) - metric(corrupted)")
    meta = {"method": method, "steps": len(alphas), "ig": ig if method == "eap-ig" else None,
            "direction": direction, "metric_clean": m_clean, "metric_corrupted": m_corr,
            "n_prompts": int(ct.shape[0]), "n_positions": int(ct.shape[1]), "model": model.cfg.model_name,
            "convention": conv}
    return Graph(GraphShape.from_config(model.cfg), scores, meta=meta)


# --------------------------------------------------------------------------- node-level attribution patching

Granularity = Literal["layer", "position", "head", "head_position", "neuron"]


def attribution_patching(
    model: Any,
    clean: Prompts,
    corrupted: Prompts,
    metric: Metric,
    hook: str = "resid_pre",
    granularity: Granularity = "position",
    *,
    direction: Literal["denoise", "noise"] = "denoise",
    normalize: bool = False,
    delta: bool = False,
    layers: Sequence[int] | None = None,
    attention_mask: Any = None,
    prepend_bos: bool | None = None,
) -> torch.Tensor:
    """First-order (gradient) estimate of `activation_patching` with the same arguments and result layout,
    from two forward passes and one backward pass instead of one pass per patch.

    For the activation a at each patched slice: estimate = metric(base) + sum_slice (a_src - a_base) . dm/da,
    the gradient taken at the base run. direction 'denoise': base = corrupted run, src = clean (TransformerLens's
    attribution patching); 'noise': base = clean, src = corrupted. hook / granularity / layers follow
    activation_patching: 'layer' [L], 'position' [L, pos], 'head' [L, head] (kv heads for k/v under GQA),
    'head_position' [L, head, pos], 'neuron' [L, d]; a per-prompt metric ([B]) adds a trailing prompt dim.
    normalize: (value - m_corrupted) / (m_clean - m_corrupted). delta=True returns the estimated change
    (value - metric(base)) instead: the classic attribution score.
    """
    if direction not in ("denoise", "noise"):
        raise InputError(f"direction must be 'denoise' (clean -> corrupted run) or 'noise' (corrupted -> clean "
                         f"run), got {direction!r}.")
    if not callable(metric):
        raise MetricError(f"metric must be callable (logits [B, T, V] -> scalar), got {type(metric).__name__}.")
    names, swept = resolve_hook(model, hook, layers)
    ct, xt, mask = _pair(model, clean, corrupted, attention_mask, prepend_bos)
    src, base = (ct, xt) if direction == "denoise" else (xt, ct)
    with torch.no_grad():
        src_logits, cache = model.run_with_cache(src, attention_mask=mask, names_filter=names)
        src_acts = [cache[n] for n in names]
        m_src = _metric_value(metric, src_logits).detach().float()
    axes = patch_axes(names[0], src_acts[0].dim(), granularity)
    acts: dict[str, torch.Tensor] = {}

    def leaf(x, hook_point):  # grads flow even through a frozen model, and no parameter .grad is touched
        return x.detach().requires_grad_(True)

    def save(x, hook_point):
        if not x.requires_grad:  # e.g. a frozen positional embedding: a leaf of its own
            x = x.detach().requires_grad_(True)
        acts[hook_point.name] = x
        return x

    with torch.enable_grad(), model.hooks([("hook_embed", leaf)] + [(n, save) for n in names]):
        value = _metric_value(metric, model(base, attention_mask=mask))
        m_base = value.detach().float()
        grads = torch.autograd.grad(value.sum(), [acts[n] for n in names], allow_unused=True)
    per_prompt = m_base.dim() == 1
    out = []
    for a_src, n, g in zip(src_acts, names, grads):
        a = acts[n].detach()
        g = torch.zeros_like(a) if g is None else g
        attr = (a_src.float() - a.float()) * g.float()  # elementwise first-order change, [B, ...]
        keep = [0] + axes
        attr = attr.sum(dim=[d for d in range(attr.dim()) if d not in keep]) if attr.dim() > len(keep) else attr
        order = sorted(keep)  # summing keeps the remaining dims in ascending order; reorder as `axes` asks
        attr = attr.permute([order.index(d) for d in axes] + [0])  # [*axes, B]
        out.append(attr if per_prompt else attr.sum(-1))
    est = torch.stack(out) if swept else out[0]
    if delta:
        return est
    values = est + m_base  # m_base: scalar, or [B] on the trailing prompt dim
    if normalize:
        m_clean, m_corr = (m_src, m_base) if direction == "denoise" else (m_base, m_src)
        denom = m_clean - m_corr
        if bool((denom.abs() < 1e-12).any()):
            raise MetricError(f"normalize=True divides by metric(clean) - metric(corrupted) = {denom.tolist()}: the "
                              "corruption does not change the metric.")
        values = (values - m_corr) / denom
    return values


# --------------------------------------------------------------------------- faithfulness by edge ablation


class FaithfulnessResult(NamedTuple):
    """One ablation's view of a circuit. Metrics are on the clean prompts."""

    ablation: str
    """zero (outputs set to 0), mean (the clean batch mean at each position) or resample (the corrupted run's)."""
    metric_full: float
    """The unmodified model (every edge kept)."""
    metric_circuit: float
    """Only the circuit's edges carry their real values; every other edge carries the ablated value."""
    metric_ablated: float
    """Every edge ablated (the baseline the normalized scores start from)."""
    metric_complement: float
    """Only the circuit's edges ablated; the rest of the model intact."""
    faithfulness: float
    """metric_circuit / metric_full: how much of the model's metric the circuit alone gives. Raw ratios
    assume a metric whose "nothing" value is 0 (a logit difference); for others (log-probs) read the
    normalized fields."""
    faithfulness_normalized: float
    """(metric_circuit - metric_ablated) / (metric_full - metric_ablated): 1 = all, 0 = no better than ablating all."""
    completeness: float
    """metric_complement / metric_full: what the model still gets WITHOUT the circuit. Near 0 (or the ablated
    baseline) = the circuit is complete; near 1 = the rest of the model does the task as well (a backup path)."""
    completeness_normalized: float
    """(metric_complement - metric_ablated) / (metric_full - metric_ablated), same reading as completeness."""


class CircuitResult(NamedTuple):
    """A circuit's size and its faithfulness / completeness under each ablation (for reports)."""

    n_edges: int
    n_nodes: int
    results: dict[str, FaithfulnessResult]
    """ablation name -> FaithfulnessResult."""

    def table(self) -> str:
        lines = [f"circuit: {self.n_edges} edges, {self.n_nodes} nodes",
                 "ablation   full     circuit  ablated  compl.   faith   faith_n  compl   compl_n"]
        for r in self.results.values():
            lines.append(f"{r.ablation:<9} {r.metric_full:8.3f} {r.metric_circuit:8.3f} {r.metric_ablated:8.3f} "
                         f"{r.metric_complement:8.3f} {r.faithfulness:7.3f} {r.faithfulness_normalized:7.3f} "
                         f"{r.completeness:7.3f} {r.completeness_normalized:7.3f}")
        return "\n".join(lines)

    def to_dict(self) -> dict[str, Any]:
        return {"n_edges": self.n_edges, "n_nodes": self.n_nodes,
                "results": {k: v._asdict() for k, v in self.results.items()}}


def _ratio(a: float, b: float) -> float:
    return a / b if b != 0 and math.isfinite(b) else float("nan")


def ablation_values(model: Any, clean: torch.Tensor, corrupted: torch.Tensor, mask: torch.Tensor | None,
                    ablation: str) -> torch.Tensor:
    """What an ablated edge carries from each upstream node: [B or 1, T, U, D].

    zero: 0. mean: the node's mean output over the clean batch at each position (padding excluded).
    resample: the node's output on the corrupted prompts."""
    if ablation == "resample":
        return _node_outputs(model, corrupted, mask)[0]
    a_clean, _ = _node_outputs(model, clean, mask)
    if ablation == "zero":
        return torch.zeros_like(a_clean[:1])
    if ablation == "mean":
        if clean.shape[0] < 2:
            raise InputError("Mean ablation averages node outputs over the clean batch; pass at least 2 prompts.")
        w = torch.ones(clean.shape, device=a_clean.device) if mask is None else mask.to(a_clean.device).float()
        w = w[:, :, None, None].to(a_clean.dtype)  # [B, T, 1, 1]
        return (a_clean * w).sum(0, keepdim=True) / w.sum(0, keepdim=True).clamp(min=1)
    raise InputError(f"ablation must be one of {', '.join(ABLATIONS)}; got {ablation!r}.")


@torch.no_grad()
def run_with_edges(model: Any, tokens: torch.Tensor, keep: torch.Tensor, ablated: torch.Tensor,
                   attention_mask: torch.Tensor | None = None) -> torch.Tensor:
    """Logits [B, T, V] of the model where edge u -> v carries u's real output if keep[u, v], else ablated[u].

    keep [U, V] bool (graph layout); ablated [B or 1, T, U, D]. Exact because every input is a sum of node
    outputs: v's input becomes (its real input) - sum over removed u of (a_u - ablated_u), with a_u the
    output of u in THIS run (upstream changes propagate). Query/key/value inputs are recomputed per head
    from their own patched residual (ln1, then W_Q[h] / W_K[g] / W_V[g])."""
    _check_model(model)
    c = model.cfg
    s = Graph(GraphShape.from_config(c))
    remove = (~keep.bool().to(s.real.device) & s.real).to(model.device, model.dtype)  # [U, V]
    U = remove.shape[0]
    H, K = c.n_heads, c.n_kv_heads
    st = s._s
    per_layer = s.shape.n_down_per_layer
    ablated = ablated.to(model.device, model.dtype)
    diff: torch.Tensor | None = None  # [B, T, U, D]: a_u - ablated_u, filled as nodes run
    cur: dict[str, torch.Tensor] = {}
    qkv: dict[str, torch.Tensor] = {}

    def delta(n_up: int, cols: slice) -> torch.Tensor | None:
        r = remove[:n_up, cols]
        if not bool(r.any()):
            return None
        return torch.einsum("btud,uv->btvd", diff[:, :, :n_up], r)  # [B, T, n_cols, D]

    def on_input(x, hook):
        nonlocal diff
        diff = x.new_zeros(x.shape[0], x.shape[1], U, x.shape[2])
        diff[:, :, 0] = x - ablated[:, :, 0]

    def on_resid(x, hook):
        cur[hook.name] = x

    def on_q(q, hook):
        la = int(hook.name.split(".")[1])
        qkv.clear()
        d = delta(int(st.head_up[la, 0]), slice(la * per_layer, la * per_layer + H + 2 * K))
        if d is None:
            return None
        block = model.blocks[la]
        attn = block.attn
        normed = _apply_norm(block.ln1, cur[f"blocks.{la}.hook_resid_pre"][:, :, None] - d)  # [B, T, H + 2K, D]
        qkv["k"] = torch.einsum("bthd,hde->bthe", normed[:, :, H:H + K], attn.W_K) + attn.b_K
        qkv["v"] = torch.einsum("bthd,hde->bthe", normed[:, :, H + K:], attn.W_V) + attn.b_V
        return torch.einsum("bthd,hde->bthe", normed[:, :, :H], attn.W_Q) + attn.b_Q

    def on_kv(x, hook):
        return qkv.get(hook.name[-1])

    def on_result(r, hook):
        la = int(hook.name.split(".")[1])
        i = int(st.head_up[la, 0])
        diff[:, :, i:i + H] = r - ablated[:, :, i:i + H]

    def on_ln2(y, hook):
        la = int(hook.name.split(".")[1])
        col = la * per_layer + H + 2 * K
        d = delta(int(st.mlp_up[la]), slice(col, col + 1))
        if d is None:
            return None
        x = cur[f"blocks.{la}.hook_resid_{'pre' if c.parallel_attn_mlp else 'mid'}"]
        return _apply_norm(model.blocks[la].ln2, x - d[:, :, 0])

    def on_mlp_out(o, hook):
        i = int(st.mlp_up[int(hook.name.split(".")[1])])
        diff[:, :, i] = o - ablated[:, :, i]

    def on_final(x, hook):
        V = remove.shape[1]
        d = delta(U, slice(V - 1, V))  # the logits input reads every node
        return None if d is None else x - d[:, :, 0]

    L = c.n_layers
    fwd: list = [("blocks.0.hook_resid_pre", on_input)]
    for la in range(L):
        fwd += [(f"blocks.{la}.hook_resid_pre", on_resid), (f"blocks.{la}.attn.hook_q", on_q),
                (f"blocks.{la}.attn.hook_k", on_kv), (f"blocks.{la}.attn.hook_v", on_kv),
                (f"blocks.{la}.attn.hook_result", on_result)]
        if not c.attn_only:
            if not c.parallel_attn_mlp:
                fwd.append((f"blocks.{la}.hook_resid_mid", on_resid))
            fwd += [(f"blocks.{la}.ln2.hook_normalized", on_ln2), (f"blocks.{la}.hook_mlp_out", on_mlp_out)]
    fwd.append((f"blocks.{L - 1}.hook_resid_post", on_final))
    with model.hooks(fwd):
        return model(tokens, attention_mask=attention_mask)


def _circuit_mask(model: Any, circuit: Graph) -> torch.Tensor:
    if not isinstance(circuit, Graph):
        raise InputError(f"circuit must be a Graph with a circuit selected, got {type(circuit).__name__}.")
    if circuit.shape != GraphShape.from_config(model.cfg):
        raise InputError(f"This graph was built for another model shape ({circuit.shape}); score this model with "
                         "edge_attribution or build Graph.from_model(model).")
    mask = circuit._need_circuit()
    if not bool(mask.any()):
        raise EmptyCircuitError("The circuit has no edge; choose one with graph.top_k_edges(k) (k >= 1) or a lower "
                                "graph.threshold(t).")
    return mask


def faithfulness(
    model: Any,
    circuit: Graph,
    clean: Prompts,
    corrupted: Prompts,
    metric: Metric,
    ablation: Ablation = "resample",
    attention_mask: torch.Tensor | None = None,
) -> FaithfulnessResult:
    """How much of the model's metric the circuit recovers alone (faithfulness) and how much the rest of
    the model recovers without it (completeness), ablating edges exactly (see run_with_edges).

    Ratios where the denominator is 0 are NaN."""
    mask = _circuit_mask(model, circuit)
    _check_model(model)
    ct, xt, am = _pair(model, clean, corrupted, attention_mask)
    abl = ablation_values(model, ct, xt, am, ablation)
    return _faithfulness(model, mask, ct, am, metric, abl, ablation)


def _faithfulness(model, mask, ct, am, metric, abl, ablation) -> FaithfulnessResult:
    real = Graph(GraphShape.from_config(model.cfg)).real
    with torch.no_grad():
        m_full = float(_scalar(metric, model(ct, attention_mask=am)))
    m_circ = float(_scalar(metric, run_with_edges(model, ct, mask, abl, am)))
    m_abl = float(_scalar(metric, run_with_edges(model, ct, torch.zeros_like(real), abl, am)))
    m_comp = float(_scalar(metric, run_with_edges(model, ct, real & ~mask, abl, am)))
    return FaithfulnessResult(ablation, m_full, m_circ, m_abl, m_comp, _ratio(m_circ, m_full),
                              _ratio(m_circ - m_abl, m_full - m_abl), _ratio(m_comp, m_full),
                              _ratio(m_comp - m_abl, m_full - m_abl))


def evaluate_circuit(
    model: Any,
    circuit: Graph,
    clean: Prompts,
    corrupted: Prompts,
    metric: Metric,
    ablations: Sequence[str] = ABLATIONS,
    attention_mask: torch.Tensor | None = None,
) -> CircuitResult:
    """faithfulness under several ablations at once (zero, mean and resample by default)."""
    mask = _circuit_mask(model, circuit)
    _check_model(model)
    ct, xt, am = _pair(model, clean, corrupted, attention_mask)
    results = {a: _faithfulness(model, mask, ct, am, metric, ablation_values(model, ct, xt, am, a), a)
               for a in ablations}
    return CircuitResult(circuit.n_edges, circuit.n_nodes, results)


def faithfulness_curve(
    model: Any,
    graph: Graph,
    clean: Prompts,
    corrupted: Prompts,
    metric: Metric,
    ks: Sequence[int],
    ablation: Ablation = "resample",
    attention_mask: torch.Tensor | None = None,
) -> list[dict[str, float]]:
    """Normalized faithfulness of graph.top_k_edges(k) for each k (one forward pass per k), to choose a size.

    Returns [{"k", "n_edges", "n_nodes", "metric", "faithfulness", "faithfulness_normalized"}]; a k whose
    top edges form no complete path input -> logits gives an empty circuit (n_edges 0, everything ablated)."""
    _check_model(model)
    ct, xt, am = _pair(model, clean, corrupted, attention_mask)
    abl = ablation_values(model, ct, xt, am, ablation)
    real = graph.real
    with torch.no_grad():
        m_full = float(_scalar(metric, model(ct, attention_mask=am)))
    m_abl = float(_scalar(metric, run_with_edges(model, ct, torch.zeros_like(real), abl, am)))
    out = []
    for k in ks:
        try:
            circ = graph.top_k_edges(min(int(k), graph.n_real_edges))  # k beyond the graph: every edge
        except EmptyCircuitError:  # nothing survives pruning yet: the circuit is "ablate everything"
            out.append({"k": int(k), "n_edges": 0, "n_nodes": 0, "metric": m_abl,
                        "faithfulness": _ratio(m_abl, m_full), "faithfulness_normalized": 0.0})
            continue
        m = float(_scalar(metric, run_with_edges(model, ct, circ.in_circuit, abl, am)))
        out.append({"k": int(k), "n_edges": circ.n_edges, "n_nodes": circ.n_nodes, "metric": m,
                    "faithfulness": _ratio(m, m_full), "faithfulness_normalized": _ratio(m - m_abl, m_full - m_abl)})
    return out
