"""The value: what an MLP (ROME) or the residual (MEMIT) should output at the last subject token so that the
model says the new target.

A vector `delta` is added at the last subject token of the edit prompt (alone and after random prefixes) and
optimised with Adam, as in ROME (Meng et al. 2022, appendix): the loss is the target's negative log-likelihood,
plus a KL term keeping the model's next-token distribution on "{subject} is a" (the subject's *essence*, so
the edit does not rewrite what the subject is), plus a weight decay ||delta||^2 / ||v0||^2; delta is clamped
to `clamp_norm` times the norm of the original output v0. Only the layers after the edit site run each step:
the residual entering them is computed once (the staged forward), so a step costs a fraction of a forward.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from mechscope.edit.locate import EditRequest, last_subject_index, target_tokens
from mechscope.errors import InputError, NonFiniteError


@dataclass
class ValueSettings:
    """Adam steps, learning rate, KL factor (essence), weight decay and norm clamp (ROME's defaults)."""

    steps: int = 20
    lr: float = 0.5
    kl_factor: float = 0.0625
    weight_decay: float = 0.5
    clamp_norm: float = 4.0
    stop_nll: float = 0.05

    def __post_init__(self) -> None:
        import math

        if isinstance(self.steps, bool) or not isinstance(self.steps, int) or self.steps < 0:
            raise InputError(f"steps must be an int >= 0, got {self.steps!r}.")
        for name in ("lr", "kl_factor", "weight_decay", "clamp_norm"):
            v = getattr(self, name)
            if not isinstance(v, int | float) or not math.isfinite(v) or v < 0 or (name == "lr" and v == 0):
                raise InputError(f"{name} must be a finite number {'> 0' if name == 'lr' else '>= 0'}, got {v!r}.")


@contextlib.contextmanager
def frozen(model) -> Iterator[None]:
    """No parameter requires grad inside (only delta is optimised; saves the weights' gradients)."""
    flags = [(p, p.requires_grad) for p in model.parameters()]
    for p, _ in flags:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p, f in flags:
            p.requires_grad_(f)


def _batch(model, rows: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Right-padded token ids [B, T] and the mask (None when every row is full)."""
    T = max(len(r) for r in rows)
    tokens = torch.zeros(len(rows), T, dtype=torch.long)
    mask = torch.zeros(len(rows), T, dtype=torch.long)
    for i, r in enumerate(rows):
        tokens[i, :len(r)] = torch.tensor(r)
        mask[i, :len(r)] = 1
    return tokens.to(model.device), (None if bool(mask.all()) else mask.to(model.device))


def optimise_delta(model, site: str, layer: int, req: EditRequest, ctxs: list[str],
                   s: ValueSettings) -> tuple[torch.Tensor, dict]:
    """delta [d_model] float32 to add at `site` ("mlp": the output of block `layer`'s MLP; "resid": the block's
    output hook_resid_post) at the last subject token of each context in `ctxs`, so that each continues with
    req.target. Raises NonFiniteError (the model is untouched: only delta changed) if the loss turns NaN."""
    tids = target_tokens(model, req.target)
    rows, subj, first, essence_rows, essence_subj = [], [], [], [], []
    for c in ctxs:
        ids = model.to_tokens(c)[0].tolist()
        subj.append(last_subject_index(model, c, req.subject))
        first.append(len(ids) - 1)  # the position predicting the target's first token
        rows.append(ids + tids[:-1])
    essence = f"{req.subject} is a"
    essence_rows.append(model.to_tokens(essence)[0].tolist())
    essence_subj.append(last_subject_index(model, essence, req.subject))
    n_rw = len(rows)
    tokens, mask = _batch(model, rows + essence_rows)
    B = tokens.shape[0]
    at = torch.tensor(subj + essence_subj, device=model.device)  # [B] where delta is added
    last_essence = torch.tensor([len(r) - 1 for r in essence_rows], device=model.device)
    tgt_pos = torch.tensor([[f + j for j in range(len(tids))] for f in first], device=model.device)  # [n_rw, t]
    tgt_ids = torch.tensor(tids, device=model.device).expand(n_rw, -1)
    rows_idx = torch.arange(B, device=model.device)

    with frozen(model), torch.no_grad():
        state = model.run_state(mask, *tokens.shape)
        x0 = model.run_blocks(model.embed_tokens(tokens, state), state, 0, layer if site == "mlp" else layer + 1)
        start = layer if site == "mlp" else layer + 1
        base = {}

        def grab(mod, inp, out):
            base["v0"] = out[rows_idx, at].detach().float()
        if site == "mlp":
            h = model.blocks[layer].mlp.register_forward_hook(grab)
            try:
                model.run_blocks(x0, state, layer, layer + 1)
            finally:
                h.remove()
        else:
            base["v0"] = x0[rows_idx, at].float()
        # only the positions the loss reads are unembedded (the vocabulary is the costliest matrix)
        read_rows = torch.cat([torch.arange(n_rw, device=model.device).repeat_interleave(len(tids)),
                               torch.arange(n_rw, B, device=model.device)])
        read_pos = torch.cat([tgt_pos.reshape(-1), last_essence])
        n_tgt = n_rw * len(tids)

        def read(y: torch.Tensor) -> torch.Tensor:  # [B, T, D] -> log-probs [n_tgt + n_essence, V]
            return F.log_softmax(model.head(y[read_rows, read_pos][None])[0].float(), -1)

        ref = read(model.run_blocks(x0, state, start))[n_tgt:]  # [n_essence, V]

    v0_norm = float(base["v0"][0].norm())
    delta = torch.zeros(model.cfg.d_model, device=model.device, dtype=torch.float32, requires_grad=True)
    opt = torch.optim.Adam([delta], lr=s.lr)

    def add(out: torch.Tensor) -> torch.Tensor:
        out = out.clone()
        out[rows_idx, at] = out[rows_idx, at] + delta.to(out.dtype)
        return out

    info = {"steps": 0, "nll_start": None, "nll": None, "v0_norm": v0_norm}
    with frozen(model):
        for step in range(s.steps + 1):
            if site == "mlp":
                h = model.blocks[layer].mlp.register_forward_hook(lambda mod, inp, out: add(out))
                try:
                    y = model.run_blocks(x0, state, start)
                finally:
                    h.remove()
            else:
                y = model.run_blocks(add(x0), state, start)
            logp = read(y)
            nll = -logp[:n_tgt].gather(1, tgt_ids.reshape(-1, 1)).reshape(n_rw, -1).mean(1).mean()
            new = logp[n_tgt:]
            kl = F.kl_div(new, ref, log_target=True, reduction="batchmean")
            wd = delta.norm() ** 2 / max(v0_norm, 1e-8) ** 2
            loss = nll + s.kl_factor * kl + s.weight_decay * wd
            if not bool(torch.isfinite(loss)):
                raise NonFiniteError(f"NaN/inf in the value optimisation of {req.target!r} at step {step}; the "
                                     "model was not changed. Lower lr= or check the model's dtype (fp16?).")
            nll_now = nll.item()
            if info["nll_start"] is None:
                info["nll_start"] = nll_now
            info["nll"] = nll_now
            if step == s.steps or nll_now < s.stop_nll:
                break
            opt.zero_grad()
            loss.backward()
            opt.step()
            info["steps"] = step + 1
            with torch.no_grad():
                limit = s.clamp_norm * v0_norm
                if float(delta.norm()) > limit:
                    delta.mul_(limit / float(delta.norm()))
    out = delta.detach().float()
    if not bool(torch.isfinite(out).all()):
        raise NonFiniteError("NaN in the optimised value; the model was not changed.")
    return out, info


__all__ = ["ValueSettings", "frozen", "optimise_delta"]
