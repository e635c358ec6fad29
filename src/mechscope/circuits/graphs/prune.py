"""Influence, pruning and graph scores, as defined by Ameisen et al. 2025 ("Circuit Tracing") and circuit-tracer.

Edges are normalised per target (|A| rows summing to 1), so influence measures what fraction of each node's
input a source supplies; a source's influence on the output is the logit-probability-weighted sum over all
paths (w A + w A^2 + ..., finite because the graph is a DAG). Pruning keeps the nodes carrying `node_threshold`
of the total influence (tokens and logits always), then the edges carrying `edge_threshold` of the edge
influence, then drops nodes left without outgoing (features, errors) or incoming (features) edges.
Replacement score: the share of token influence among token + error influence. Completeness: the
output-weighted share of each node's input that does not come from error nodes.
"""

from __future__ import annotations

import torch

from mechscope.circuits.graphs.graph import AttributionGraph
from mechscope.errors import InputError


def normalize_matrix(a: torch.Tensor) -> torch.Tensor:
    """|A| with each row (target) scaled to sum 1 (rows of zeros stay zero)."""
    a = a.abs()
    return a / a.sum(dim=1, keepdim=True).clamp(min=1e-10)


def influence(a_norm: torch.Tensor, weights: torch.Tensor, max_iter: int = 1000) -> torch.Tensor:
    """w A + w A^2 + ... for a DAG's normalised adjacency (stops when a power vanishes). [n]"""
    cur = weights @ a_norm
    total = cur.clone()
    for _ in range(max_iter):
        cur = cur @ a_norm
        if not bool(cur.any()):
            return total
        total += cur
    raise InputError("Influence did not converge: the adjacency is not acyclic (a graph must be a DAG).")


def find_threshold(scores: torch.Tensor, fraction: float) -> torch.Tensor:
    """The score above which the largest scores hold `fraction` of the total."""
    s = scores.sort(descending=True).values
    cum = s.cumsum(0) / s.sum().clamp(min=1e-30)
    i = min(int(torch.searchsorted(cum, torch.tensor(fraction, dtype=cum.dtype))), len(s) - 1)
    return s[i]


def _masks(g: AttributionGraph):
    kinds = g.kinds()
    feat = torch.tensor([k == "feature" for k in kinds])
    err = torch.tensor([k == "error" for k in kinds])
    tok = torch.tensor([k == "embedding" for k in kinds])
    logit = torch.tensor([k == "logit" for k in kinds])
    return feat, err, tok, logit


def graph_scores(g: AttributionGraph) -> dict[str, float]:
    """{"replacement": ..., "completeness": ...} of a full graph (Ameisen et al. 2025, circuit-tracer)."""
    a = g.dense()  # float32, as circuit-tracer (a float64 copy would double the peak memory of a full graph)
    w = g.logit_weights
    _, err, tok, _ = _masks(g)
    an = normalize_matrix(a)
    inf = influence(an, w)
    t_inf, e_inf = inf[tok].sum(), inf[err].sum()
    replacement = t_inf / (t_inf + e_inf).clamp(min=1e-30)
    non_error = 1 - an[:, err].sum(dim=1)
    out = inf + w
    completeness = (non_error * out).sum() / out.sum()
    return {"replacement": float(replacement), "completeness": float(completeness)}


def prune_masks(g: AttributionGraph, node_threshold: float = 0.8, edge_threshold: float = 0.98):
    """(node_mask [n], edge_mask [n, n], cumulative influence rank [n]) of the pruning (see module docstring)."""
    for name, v in (("node_threshold", node_threshold), ("edge_threshold", edge_threshold)):
        if not isinstance(v, (int, float)) or not 0.0 <= v <= 1.0:
            raise InputError(f"{name} must be a fraction in [0, 1], got {v!r}.")
    a = g.dense()
    w = g.logit_weights
    feat, _, tok, logit = _masks(g)
    keep_always = tok | logit
    node_inf = influence(normalize_matrix(a), w)
    node_mask = (node_inf >= find_threshold(node_inf, node_threshold)) | keep_always
    pruned = a.clone()
    pruned[~node_mask] = 0
    pruned[:, ~node_mask] = 0
    pn = normalize_matrix(pruned)
    edge_scores = pn * (influence(pn, w) + w)[:, None]
    edge_mask = edge_scores >= find_threshold(edge_scores.flatten(), edge_threshold)
    src = ~keep_always  # features and errors need an outgoing edge; features an incoming one too
    old = None
    while old is None or not torch.equal(old, node_mask):
        old = node_mask.clone()
        edge_mask[~node_mask] = False
        edge_mask[:, ~node_mask] = False
        node_mask[src] &= edge_mask[:, src].any(0)
        node_mask[feat] &= edge_mask[feat].any(1)
    s, order = node_inf.sort(descending=True)
    cum = torch.zeros_like(node_inf)
    cum[order] = s.cumsum(0) / s.sum().clamp(min=1e-30)
    return node_mask, edge_mask, cum


def prune(g: AttributionGraph, node_threshold: float = 0.8, edge_threshold: float = 0.98) -> AttributionGraph:
    """The pruned graph (same class, dense adjacency over the kept nodes, node.influence = cumulative rank)."""
    from dataclasses import replace

    node_mask, edge_mask, cum = prune_masks(g, node_threshold, edge_threshold)
    keep = node_mask.nonzero().flatten()
    a = (g.dense() * edge_mask)[keep][:, keep].contiguous()
    nodes = [replace(g.nodes[int(i)], influence=float(cum[i])) for i in keep]
    settings = dict(g.settings, node_threshold=node_threshold, edge_threshold=edge_threshold, pruned=True,
                    n_nodes_full=len(g.nodes))
    return AttributionGraph(g.prompt, g.tokens, g.input_ids, g.model_name, g.model_identity, nodes, a,
                            dict(g.scores), settings, g.n_layers)
