"""Sparse-coder quality metrics, each defined once, accumulated in float64 over streamed batches.

Notation (REFERENCE.md §3): x is the coder's target (its input for an SAE, the target hook's
activation for a transcoder), x̂ the coder's output, f the latent activations [n], E the mean over
evaluated tokens. Every metric is a function of running sums (Σ‖x − x̂‖², Σ‖x‖², Σx, ...) kept in
float64, so streaming a million tokens in batches gives the same number as one batch would, and
the trainer's progress bar and `evaluate` use the same formulas.

Spliced metrics (`splice_metrics`) put the coder's output back into the model and measure the
next-token loss. BOS positions are excluded: when a context starts with the tokenizer's BOS token,
position 0 keeps its clean activation (harvests drop BOS rows, so coders never see them: it is an
attention sink with a huge norm) and the prediction made at position 0 is not scored.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F

from mechscope.errors import InputError, NonFiniteError
from mechscope.validate import count, positive_int

DENSE_THRESHOLD = 0.1  # a latent firing on more than 10% of tokens is "dense"
DENSITY_BINS = torch.linspace(-8, 0, 33, dtype=torch.float64)  # log10 firing frequency bin edges


# ---------------------------------------------------------------------------- the formulas


def mse(sse: float, n: int) -> float:
    """MSE = E[Σ_d (x_d − x̂_d)²] = Σ_tokens ‖x − x̂‖² / n (summed over dimensions, not averaged)."""
    return sse / max(n, 1)


def fve(sse: float, sum_sq: float, sum_x: torch.Tensor, n: int) -> float:
    """FVE = 1 − E‖x − x̂‖² / (E‖x‖² − ‖E x‖²): fraction of the variance about the mean explained.

    From the sums Σ‖x − x̂‖², Σ‖x‖², Σx [d] over n tokens (SAELens >= 6 and SAEBench use this; a
    per-token average of 1 − ‖x − x̂‖²/‖x‖² gives very different numbers).
    """
    mean = sum_x.double() / max(n, 1)
    var = sum_sq / max(n, 1) - float(mean.square().sum())
    return 1.0 - (sse / max(n, 1)) / var if var > 0 else float("nan")


def l0(n_active: float, n: int) -> float:
    """L0 = E[#{i : f_i ≠ 0}], the mean number of active latents per token."""
    return n_active / max(n, 1)


def l1(sum_abs: float, n: int) -> float:
    """L1 = E[Σ_i |f_i|] (latent activations, not weighted by decoder norms)."""
    return sum_abs / max(n, 1)


def shrinkage(sum_out_sq: float, sum_dot: float) -> float:
    """γ = E‖x̂‖² / E[x · x̂]: 1 when x̂ is not systematically shorter than x along itself, < 1 when
    an L1 penalty shrinks it (Wright & Sharkey 2024; x̂ = γ' x minimises at γ = γ')."""
    return sum_out_sq / sum_dot if sum_dot != 0 else float("nan")


def frequency(fire_counts: torch.Tensor, n: int) -> torch.Tensor:
    """[n_latents] firing frequency: fraction of tokens on which each latent is non-zero."""
    return fire_counts.double() / max(n, 1)


def dead_fraction(fire_counts: torch.Tensor) -> float:
    """Fraction of latents with no activation at all in the window the counts cover (state it in tokens)."""
    return float((fire_counts == 0).double().mean())


def dense_fraction(freq: torch.Tensor, threshold: float = DENSE_THRESHOLD) -> float:
    """Fraction of latents that fire on more than `threshold` (10%) of tokens."""
    return float((freq > threshold).double().mean())


def density_histogram(freq: torch.Tensor, edges: torch.Tensor = DENSITY_BINS) -> torch.Tensor:
    """Counts of latents per bin of log10 firing frequency (edges [b + 1]); dead latents (log10 0 =
    −inf) and any frequency below edges[0] land in the first bin. Returns counts [b] (int64)."""
    logf = freq.double().clamp_min(10 ** float(edges[0])).log10()
    idx = torch.bucketize(logf, edges[1:-1], right=True)
    return torch.bincount(idx, minlength=len(edges) - 1)


def batch_fve(x: torch.Tensor, x_hat: torch.Tensor) -> float:
    """`fve` of one batch [B, d] (what the trainer logs)."""
    x, x_hat = x.detach().double(), x_hat.detach().double()
    return fve(float((x - x_hat).square().sum()), float(x.square().sum()), x.sum(0), x.shape[0])


# ---------------------------------------------------------------------------- streamed evaluation


class EvalResult(NamedTuple):
    """Reconstruction metrics of a coder over n_tokens tokens (see the module docstring's notation)."""

    n_tokens: int
    """Tokens evaluated (the window of dead_fraction)."""
    mse: float
    """E[Σ_d (x_d − x̂_d)²]."""
    fve: float
    """1 − E‖x − x̂‖² / (E‖x‖² − ‖E x‖²)."""
    l0: float
    """E[#{i : f_i ≠ 0}]."""
    l1: float
    """E[Σ_i |f_i|]."""
    dead_fraction: float
    """Fraction of latents that never fired on the n_tokens tokens."""
    dense_fraction: float
    """Fraction of latents firing on more than 10% of the tokens."""
    shrinkage: float
    """γ = E‖x̂‖² / E[x · x̂]."""
    frequency: torch.Tensor
    """[n_latents] float64 firing frequency of each latent."""
    density_histogram: torch.Tensor
    """[32] int64 counts of latents per log10-frequency bin (edges DENSITY_BINS, −8 to 0; dead in bin 0)."""

    def summary(self) -> dict[str, float]:
        """The scalar metrics as a JSON-able dict."""
        return {k: v for k, v in self._asdict().items() if not isinstance(v, torch.Tensor)}


class Accumulator:
    """Running float64 sums over batches; `result()` applies the formulas above."""

    def __init__(self, n_latents: int, d_out: int) -> None:
        self.n = 0
        self.sse = self.sum_sq = self.sum_dot = self.sum_out_sq = self.n_active = self.sum_abs = 0.0
        self.sum_x = torch.zeros(d_out, dtype=torch.float64)  # [d_out]
        self.fire_counts = torch.zeros(n_latents, dtype=torch.int64)  # [n_latents]

    @torch.no_grad()
    def update(self, x: torch.Tensor, x_hat: torch.Tensor, acts: torch.Tensor) -> None:
        """x, x_hat [B, d_out] target and output; acts [B, n_latents]."""
        x, x_hat, acts = x.double().cpu(), x_hat.double().cpu(), acts.double().cpu()
        active = acts != 0
        self.n += x.shape[0]
        self.sse += float((x - x_hat).square().sum())
        self.sum_sq += float(x.square().sum())
        self.sum_x += x.sum(0)
        self.sum_dot += float((x * x_hat).sum())
        self.sum_out_sq += float(x_hat.square().sum())
        self.n_active += float(active.sum())
        self.sum_abs += float(acts.abs().sum())
        self.fire_counts += active.sum(0)

    def result(self) -> EvalResult:
        freq = frequency(self.fire_counts, self.n)
        return EvalResult(
            n_tokens=self.n, mse=mse(self.sse, self.n), fve=fve(self.sse, self.sum_sq, self.sum_x, self.n),
            l0=l0(self.n_active, self.n), l1=l1(self.sum_abs, self.n),
            dead_fraction=dead_fraction(self.fire_counts), dense_fraction=dense_fraction(freq),
            shrinkage=shrinkage(self.sum_out_sq, self.sum_dot), frequency=freq,
            density_histogram=density_histogram(freq),
        )


@torch.no_grad()
def evaluate(coder, source: Any, *, n_tokens: int = 100_000, batch_size: int = 4096, hook: str | None = None,
             target_hook: str | None = None, seed: int = 0,
             device: torch.device | str | None = None) -> EvalResult:
    """Reconstruction metrics of `coder` over (up to) n_tokens tokens of `source`.

    source: a tensor [N, d_in] (SAE), an (x [N, d_in], y [N, d_out]) pair (transcoder), an
    ActivationStore (hook / target_hook default to the coder's hook_in / hook_out), or
    (model, hook, text) to stream activations from a model. Rows are drawn in a seeded shuffled
    order, so n_tokens < N evaluates a random subset. Acts are the inference rule's (`encode`).
    """
    from mechscope.sae.sources import check_coder_fits, open_source

    n_tokens = positive_int("n_tokens", n_tokens)  # a negative count would be a slice: x[:-5]
    batch_size = positive_int("batch_size", batch_size)
    hook_in = hook or coder.cfg.hook_in
    hook_out = target_hook or coder.cfg.hook_out or hook_in
    src = open_source(source, batch_size=batch_size, seed=seed, n_tokens=n_tokens,
                      keys=[(hook_in, hook_out if coder.cfg.is_transcoder else None)])
    key_in, key_out = src.keys[0]
    check_coder_fits(src, coder, hook=key_in, target_hook=key_out)
    check_finite_weights(coder)
    device = torch.device(device) if device is not None else coder.W_enc.device
    acc = Accumulator(coder.cfg.n_latents, coder.cfg.out_dim)
    for batch in src.batches(0, one_pass=True):
        x = batch[key_in].to(device)
        y = batch[key_out].to(device) if key_out is not None else x
        take = min(x.shape[0], n_tokens - acc.n)
        for key, t in ((key_in, x[:take]), (key_out, y[:take])):
            if key is not None and not bool(torch.isfinite(t).all()):
                bad = int((~torch.isfinite(t)).any(-1).sum())
                raise NonFiniteError(f"The activations of {key} contain NaN/inf ({bad} of {take} rows in one batch "
                                     f"of {src.describe()}): metrics on them would be NaN. Re-harvest the store "
                                     "(the model itself may overflow: try float32).")
        out = coder(x[:take])
        acc.update(y[:take], out.out, out.acts)
        if acc.n >= n_tokens:
            break
    if acc.n == 0:
        raise InputError("The source served no rows to evaluate.")
    result = acc.result()
    bad_metrics = [k for k in ("mse", "l0", "l1") if not math.isfinite(getattr(result, k))]
    if bad_metrics:
        raise NonFiniteError(f"Evaluation gave non-finite {', '.join(bad_metrics)} over {acc.n} tokens (the coder "
                             "overflows on these activations); not reporting them as numbers.")
    return result


def check_finite_weights(coder) -> None:
    """NonFiniteError if any parameter of `coder` holds NaN/inf (it would give NaN metrics, silently)."""
    bad = [name for name, p in coder.named_parameters() if not bool(torch.isfinite(p).all())]
    if bad:
        raise NonFiniteError(f"The coder has NaN/inf weights ({', '.join(bad)}): it cannot be evaluated or "
                             "used. Retrain it, or resume from its last good checkpoint.")


# ---------------------------------------------------------------------------- spliced into the model


class SpliceResult(NamedTuple):
    """Next-token loss with the coder's output spliced into the model (BOS positions excluded)."""

    n_tokens: int
    """Scored next-token predictions."""
    ce_clean: float
    """Mean cross-entropy of the unmodified model."""
    ce_sae: float
    """Mean cross-entropy with the hook's activation replaced by the coder's output."""
    ce_zero: float
    """Mean cross-entropy with the (target) hook zero-ablated."""
    ce_mean: float
    """Mean cross-entropy with the (target) hook replaced by its mean activation."""
    ce_recovered_zero: float
    """(CE_zero − CE_sae) / (CE_zero − CE_clean); near 1 for residual SAEs whatever their quality."""
    ce_recovered_mean: float
    """(CE_mean − CE_sae) / (CE_mean − CE_clean), the stricter baseline."""
    delta_ce: float
    """ΔCE = CE_sae − CE_clean (nats per token)."""
    kl_sae: float
    """E over positions of KL(p_clean ‖ p_sae)."""
    kl_zero: float
    """E KL(p_clean ‖ p_zero)."""
    kl_mean: float
    """E KL(p_clean ‖ p_mean)."""
    kl_score_zero: float
    """(KL_zero − KL_sae) / KL_zero."""
    kl_score_mean: float
    """(KL_mean − KL_sae) / KL_mean."""

    def summary(self) -> dict[str, float]:
        return dict(self._asdict())


def _recovered(abl: float, sae: float, clean: float) -> float:
    return (abl - sae) / (abl - clean) if abl != clean else float("nan")


def _check_width(x: torch.Tensor, want: int, hook: str, what: str) -> None:
    width = math.prod(x.shape[2:])
    if width != want:
        raise InputError(f"{hook} has {width} features per token but the coder's {what} is {want}: "
                         "the coder belongs to another model or hook.")


@torch.no_grad()
def splice_metrics(coder, model, hook: str | None = None, contexts: Any = None, n_contexts: int = 32, *,
                   target_hook: str | None = None, batch_size: int = 8, mean: torch.Tensor | None = None,
                   store: Any = None, context_len: int = 128) -> SpliceResult:
    """CE / KL of `model` on n_contexts contexts, clean vs with the coder spliced in vs ablated.

    SAE: the hook's activation is replaced by coder(x).out. Transcoder: the target hook's
    activation is replaced by the coder's output computed from the input hook's activation of the
    same forward pass. Ablations act on the (target) hook: zeros, or its mean (from `mean`
    [d_out], else `store.stats(hook)["mean"]`, else computed over the same contexts first).
    contexts: LongTensor [N, T], a PackedContexts, or None for the built-in "sotu" validation split.
    """
    n_contexts = positive_int("n_contexts", n_contexts)
    batch_size = positive_int("batch_size", batch_size)
    count("context_len", context_len, min=2)
    hook_in = hook or coder.cfg.hook_in
    hook_out = target_hook or coder.cfg.hook_out or hook_in
    if hook_in is None:
        raise InputError("The coder records no hook_in: pass its input hook, e.g. "
                         "hook='blocks.6.hook_resid_post'.")
    if coder.cfg.is_transcoder and hook_out == hook_in:
        raise InputError("A transcoder writes to another hook than it reads: pass target_hook= (or set "
                         "coder.cfg.hook_out).")
    from mechscope.sae.sources import check_coder_fits

    check_coder_fits(model, coder, hook=hook_in, target_hook=hook_out if coder.cfg.is_transcoder else None)
    check_finite_weights(coder)
    batches = _context_batches(model, contexts, n_contexts, batch_size, context_len)
    bos = getattr(model.tokenizer, "bos_token_id", None) if model.tokenizer is not None else None
    if mean is None and store is not None:
        mean = store.stats(hook_out)["mean"]
    if mean is None:
        mean = _hook_mean(model, batches, hook_out, bos)
    if not bool(torch.isfinite(mean).all()):
        raise NonFiniteError(f"The mean activation of {hook_out} (for mean ablation) holds NaN/inf"
                             f"{' (from the store ' + str(store.folder) + ')' if store is not None else ''}: "
                             "re-harvest the store; the model may overflow in this dtype (try float32).")
    sums = dict.fromkeys(("clean", "sae", "zero", "mean", "kl_sae", "kl_zero", "kl_mean"), 0.0)
    n_scored = 0
    for tokens in batches:
        tokens = tokens.to(model.device)
        start = _first_scored(tokens, bos)
        hooks = _interventions(coder, hook_in, hook_out, start, mean)
        clean = model(tokens)
        lp_clean = F.log_softmax(clean[:, start:-1].float(), dim=-1)  # [B, T', V]
        sums["clean"] += float(model.loss(clean, tokens, per_token=True)[:, start:].double().sum())
        for name in ("sae", "zero", "mean"):
            logits = model.run_with_hooks(tokens, fwd_hooks=hooks[name])
            sums[name] += float(model.loss(logits, tokens, per_token=True)[:, start:].double().sum())
            lp = F.log_softmax(logits[:, start:-1].float(), dim=-1)
            sums[f"kl_{name}"] += float((lp_clean.exp() * (lp_clean - lp)).sum(-1).double().sum())
        n_scored += tokens.shape[0] * (tokens.shape[1] - 1 - start)
    if n_scored == 0:
        raise InputError("No positions to score: contexts need at least 2 tokens after BOS.")
    r = {k: v / n_scored for k, v in sums.items()}
    bad = [k for k in ("clean", "sae") if not math.isfinite(r[k])]
    if bad:
        raise NonFiniteError(f"The spliced evaluation gave a non-finite cross-entropy ({', '.join(bad)}): the "
                             f"{'model' if 'clean' in bad else 'coder'} overflows on these contexts; not "
                             "reporting it as a number.")
    return SpliceResult(
        n_tokens=n_scored, ce_clean=r["clean"], ce_sae=r["sae"], ce_zero=r["zero"], ce_mean=r["mean"],
        ce_recovered_zero=_recovered(r["zero"], r["sae"], r["clean"]),
        ce_recovered_mean=_recovered(r["mean"], r["sae"], r["clean"]), delta_ce=r["sae"] - r["clean"],
        kl_sae=r["kl_sae"], kl_zero=r["kl_zero"], kl_mean=r["kl_mean"],
        kl_score_zero=(r["kl_zero"] - r["kl_sae"]) / r["kl_zero"] if r["kl_zero"] > 0 else float("nan"),
        kl_score_mean=(r["kl_mean"] - r["kl_sae"]) / r["kl_mean"] if r["kl_mean"] > 0 else float("nan"),
    )


def _interventions(coder, hook_in: str, hook_out: str, start: int, mean: torch.Tensor) -> dict[str, list]:
    """fwd_hooks for "sae" (splice in the coder's output), "zero" and "mean" ablation; positions < start
    keep their clean activation."""
    saved: dict[str, torch.Tensor] = {}
    cdev, cdtype = coder.W_enc.device, coder.W_enc.dtype

    def read(x: torch.Tensor, hook) -> None:  # transcoder input [B, T, ...]
        _check_width(x, coder.cfg.d_in, hook_in, "d_in")
        saved["x"] = x

    def splice(x: torch.Tensor, hook) -> torch.Tensor:
        if hook_in != hook_out and "x" not in saved:
            raise InputError(f"{hook_out} runs before {hook_in} in the forward pass: a transcoder must read "
                             "an earlier hook than it writes.")
        src = saved.pop("x", x)
        _check_width(src, coder.cfg.d_in, hook_in, "d_in")
        _check_width(x, coder.cfg.out_dim, hook_out, "output width")
        B, T = src.shape[:2]
        flat = src[:, start:].reshape(B * (T - start), -1).to(cdev, cdtype)  # [B*T', d_in]
        out = coder(flat).out.reshape(B, T - start, *x.shape[2:]).to(x.device, x.dtype)
        return torch.cat([x[:, :start], out], dim=1)

    def ablate(value: torch.Tensor):
        def fn(x: torch.Tensor, hook) -> torch.Tensor:
            _check_width(x, value.numel(), hook_out, "output width")
            repl = value.to(x.device, x.dtype).reshape(x.shape[2:]).expand_as(x[:, start:])
            return torch.cat([x[:, :start], repl], dim=1)
        return fn

    sae = [(hook_out, splice)] if hook_in == hook_out else [(hook_in, read), (hook_out, splice)]
    zero = [(hook_out, ablate(torch.zeros_like(mean)))]
    return {"sae": sae, "zero": zero, "mean": [(hook_out, ablate(mean))]}


def _first_scored(tokens: torch.Tensor, bos: int | None) -> int:
    """1 when every context starts with BOS (position 0 is left alone and not scored), else 0."""
    return int(bos is not None and bool((tokens[:, 0] == bos).all()))


def _context_batches(model, contexts: Any, n_contexts: int, batch_size: int,
                     context_len: int) -> list[torch.Tensor]:
    """The first n_contexts contexts as a list of LongTensor [b, T] batches."""
    if contexts is None:
        from mechscope.data.packing import contexts as make_contexts

        contexts = make_contexts("sotu", model.require_tokenizer(), context_len, seed=0, split="validation")
    if isinstance(contexts, torch.Tensor):
        if contexts.ndim != 2 or contexts.dtype not in (torch.int64, torch.int32):
            raise InputError(f"contexts must be token ids [N, T], got {tuple(contexts.shape)} "
                             f"{contexts.dtype}.")
        rows: Iterable[torch.Tensor] = contexts[:n_contexts].long()
    else:
        rows = contexts
    out, cur, n = [], [], 0
    for row in rows:
        if n >= n_contexts:
            break
        cur.append(row)
        n += 1
        if len(cur) == batch_size:
            out.append(torch.stack(cur))
            cur = []
    if cur:
        out.append(torch.stack(cur))
    if not out:
        raise InputError("No contexts to evaluate on.")
    return out


def _hook_mean(model, batches: list[torch.Tensor], hook: str, bos: int | None) -> torch.Tensor:
    """Mean activation of `hook` over the non-BOS positions of the contexts ([*shape], float64)."""
    total, n = None, 0
    for tokens in batches:
        _, cache = model.run_with_cache(tokens.to(model.device), names_filter=[hook], return_type=None)
        a = cache[hook][:, _first_scored(tokens, bos):].double()
        s = a.reshape(-1, *a.shape[2:]).sum(0)
        total = s if total is None else total + s
        n += a.shape[0] * a.shape[1]
    return (total / n).cpu()  # type: ignore[operator]


__all__ = ["mse", "fve", "l0", "l1", "shrinkage", "frequency", "dead_fraction", "dense_fraction",
           "density_histogram", "batch_fve", "EvalResult", "Accumulator", "evaluate", "SpliceResult",
           "splice_metrics", "check_finite_weights", "DENSE_THRESHOLD", "DENSITY_BINS"]
