"""Direct logit attribution (DLA): how much each component's write to the residual stream adds, directly, to
a logit (difference) at one position per prompt.

    res = direct_logit_attribution(model, tokens, (" Mary", " John"))     # DLAResult
    res.heads.mean(0)            # [n_layers, n_heads]; res.mlps [B, n_layers]; "neurons" -> [B, n_layers, d_mlp]
    res.total()                  # == res.logit_diff, the model's own value, to float rounding

Why it is exact: the final residual is the sum of the embeddings and every attention / MLP output
(ActivationCache.decompose_resid), and the only non-linearity between it and the logits is the final norm.
Freezing the norm's scale at its value in the actual forward (the cached ln_final.hook_scale: std for LayerNorm,
rms for RMSNorm) makes that map linear -- LayerNorm's centring is a linear projection -- so the logit difference
splits into one term per component:

    logit_a - logit_b = sum_c  c . u  +  ln_final.b . d  +  (b_U[a] - b_U[b]),
    d = W_U[:, a] - W_U[:, b],   u = centre(ln_final.w * d) / scale        (no centring for RMSNorm)

(centre(v) . x = v . centre(x), so u is computed once per prompt with ActivationCache.apply_ln_to_stack).
This is the standard treatment (TransformerLens's logit_attrs / decompose_resid(apply_ln=True)); the
attribution is of each component's *direct* path only, not of its effect through later layers. A head's term
is z[h] @ W_O[h] . u (stack_head_results) and its layer's b_O is reported apart; a neuron's term is
post[n] * (W_out[n] . u), with the MLP's output bias apart. Processed models (fold_ln, center_unembed, ...)
work unchanged: the norm's weight then lives in W_U, and W_U, b_U are read from the model as they are.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from mechscope.errors import InputError
from mechscope.models.cache import ActivationCache

COMPONENTS = ("embed", "heads", "attn", "mlps", "neurons")
TokenSpec = int | str | Sequence[int] | Sequence[str] | torch.Tensor


@dataclass
class DLAResult:
    """Direct contributions (in logit units) at one position per prompt. With a batch dim B first (per prompt)
    or, after .mean(), without it. L layers, H heads."""

    logit_diff: torch.Tensor  # [B] what the model computed: logit[a] - logit[b], logit[a], or ln_final(x) . direction
    embed: torch.Tensor  # [B] token embedding
    pos_embed: torch.Tensor  # [B] learned positional embedding (0 for rotary / no positions)
    attn: torch.Tensor  # [B, L] each attention layer's output (its heads + b_O)
    mlps: torch.Tensor | None  # [B, L] each MLP's output (None for attention-only models)
    final_bias: torch.Tensor  # [B] ln_final bias . d + the unembedding bias difference
    scale: torch.Tensor  # [B] the frozen final-norm scale (std or rms) at the position
    positions: torch.Tensor  # [B] the position attributed in each prompt
    heads: torch.Tensor | None = None  # [B, L, H] each head's z @ W_O[h] (with "heads")
    attn_bias: torch.Tensor | None = None  # [B, L] each layer's b_O (with "heads")
    neurons: torch.Tensor | None = None  # [B, L, d_mlp] post[n] * W_out[n] (with "neurons")
    mlp_bias: torch.Tensor | None = None  # [B, L] each MLP's output bias (with "neurons")
    batched: bool = True

    def total(self) -> torch.Tensor:
        """[B] the sum of every component: equals logit_diff up to float rounding."""
        t = self.embed + self.pos_embed + self.attn.sum(-1) + self.final_bias
        return t + self.mlps.sum(-1) if self.mlps is not None else t

    def accumulated(self) -> torch.Tensor:
        """[B, L + 1]: the direct value of the residual entering each layer (through the frozen final norm, plus
        final_bias), and of the final residual in the last column (= total()). The 'accumulated residual' plot."""
        per_layer = self.attn + (self.mlps if self.mlps is not None else 0)  # [B, L]
        start = (self.embed + self.pos_embed + self.final_bias)[..., None]
        return torch.cat([start, start + per_layer.cumsum(-1)], dim=-1)

    def mean(self) -> DLAResult:
        """The same attribution averaged over prompts (tensors lose their batch dim)."""
        if not self.batched:
            return self
        fields = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        out = {k: (v.float().mean(0) if isinstance(v, torch.Tensor) and k != "positions" else v)
               for k, v in fields.items()}
        return DLAResult(**{**out, "batched": False})

    def top_heads(self, k: int = 10) -> list[tuple[str, float]]:
        """The k heads with the largest |mean contribution|, as ("L{l}H{h}", value)."""
        if self.heads is None:
            raise InputError("Per-head values were not computed; pass components including 'heads'.")
        h = self.heads.mean(0) if self.batched else self.heads  # [L, H]
        vals, idx = h.flatten().abs().topk(min(k, h.numel()))
        H = h.shape[-1]
        return [(f"L{i // H}H{i % H}", float(h.flatten()[i])) for i in idx.tolist()]


def _token_ids(model, spec: TokenSpec, B: int, what: str) -> torch.Tensor:
    """An id, a single-token string, or one of them per prompt -> LongTensor [B]."""
    if isinstance(spec, str):
        ids = torch.tensor([model.to_single_token(spec)])
    elif isinstance(spec, torch.Tensor):
        if spec.dtype.is_floating_point:
            raise InputError(f"{what} token ids must be integers, got {spec.dtype}.")
        ids = spec.reshape(-1).long()
    elif isinstance(spec, int) and not isinstance(spec, bool):
        ids = torch.tensor([spec])
    elif isinstance(spec, Sequence) and spec and all(isinstance(s, str) for s in spec):
        ids = torch.tensor([model.to_single_token(s) for s in spec])
    elif isinstance(spec, Sequence) and spec and all(isinstance(s, int) and not isinstance(s, bool) for s in spec):
        ids = torch.tensor(list(spec))
    else:
        raise InputError(f"{what} must be a token id, a single-token string, or one per prompt; got {spec!r}.")
    if ids.numel() not in (1, B):
        raise InputError(f"{what} has {ids.numel()} tokens for {B} prompts.")
    if int(ids.min()) < 0 or int(ids.max()) >= model.cfg.d_vocab:
        raise InputError(f"{what} token ids must be in [0, {model.cfg.d_vocab}).")
    return ids.expand(B).to(model.device)


def _components(components: str | Sequence[str]) -> set[str]:
    items = {components} if isinstance(components, str) else set(components)
    bad = items - set(COMPONENTS)
    if bad or not items:
        raise InputError(f"Unknown components {sorted(bad)}; choose from {', '.join(COMPONENTS)} "
                         "(e.g. ('embed', 'heads', 'mlps') or 'neurons').")
    return items


def _check_model(model, want: set[str]) -> None:
    c = model.cfg
    if c.post_layernorm or c.embed_norm or c.n_token_types:
        raise InputError(f"Direct logit attribution needs a pre-norm model; {c.architecture} normalises the residual "
                         "stream itself (post-LN), so its components do not add up to the final residual.")
    if c.final_softcap is not None:
        raise InputError("This model soft-caps its logits (tanh), which is not linear: attribute the pre-cap logits "
                         "by passing a direction and comparing with ln_final.hook_normalized.")
    if "heads" in want and c.post_attn_norm:
        raise InputError("Per-head attribution is not exact here: a norm sits between the heads and the residual "
                         "(post_attn_norm); use components=('embed', 'attn', 'mlps').")
    if "neurons" in want and (c.post_mlp_norm or c.attn_only):
        raise InputError("Per-neuron attribution needs MLPs that write to the residual directly "
                         f"({'no MLPs' if c.attn_only else 'post_mlp_norm'} here).")


def _positions(position: int | torch.Tensor, mask: torch.Tensor | None, B: int, T: int, device) -> torch.Tensor:
    """[B]: negative positions count back from each prompt's last real token."""
    p = torch.as_tensor(position, device=device)
    if p.dtype.is_floating_point or p.dim() > 1 or p.numel() not in (1, B):
        raise InputError(f"position must be an int or an int tensor [B], got {position!r}.")
    p = p.long().reshape(-1).expand(B)
    last = (T - 1 - mask.flip(-1).argmax(-1)) if mask is not None else torch.full((B,), T - 1, device=device)
    idx = torch.where(p < 0, last + 1 + p, p)
    if bool((idx < 0).any() or (idx >= T).any()):
        raise InputError(f"position {position!r} falls outside the {T} positions of the prompts.")
    return idx


def direct_logit_attribution(model, tokens: Any, target: Any, *, position: int | torch.Tensor = -1,
                             components: str | Sequence[str] = ("embed", "heads", "mlps"),
                             attention_mask: torch.Tensor | None = None) -> DLAResult:
    """Split the model's logit difference (or logit, or residual direction) at `position` of each prompt into
    direct contributions of the embeddings, attention layers / heads, MLP layers / neurons and biases.

    tokens: ids [B, T] or text (padded on the right; position -1 is each prompt's last real token).
    target: (answer, wrong_answer) token ids or single-token strings (one, or one per prompt) -> logit difference;
    a single answer -> its logit; a float tensor [D] or [B, D] -> ln_final(resid) . direction.
    components: granularity, from ("embed", "heads" | "attn", "mlps" | "neurons"); embeddings, attention layers,
    MLP layers and biases are always returned (they cost nothing), per-head / per-neuron values on request.
    """
    want = _components(components)
    _check_model(model, want)
    c = model.cfg
    tokens, mask = model.prepare(tokens, attention_mask, None, "right")
    B, T = tokens.shape
    pos = _positions(position, mask, B, T, tokens.device)

    # the direction d [B, D] read from the final norm's output, and the constant terms (checked before running)
    dt = torch.float32
    is_direction = isinstance(target, torch.Tensor) and target.dtype.is_floating_point
    a = b = None
    if is_direction:
        d = target.to(model.device, dt)
        if d.shape not in ((c.d_model,), (B, c.d_model)):
            raise InputError(f"A direction must have shape [{c.d_model}] or [{B}, {c.d_model}], got {tuple(d.shape)}.")
        d = d.expand(B, c.d_model)
        const = torch.zeros(B, device=model.device, dtype=dt)
    else:
        if not c.has_unembed:
            raise InputError(f"{c.architecture} has no unembedding: pass a direction [d_model] instead of tokens.")
        answer, wrong = (target if isinstance(target, tuple) and len(target) == 2 else (target, None))
        a = _token_ids(model, answer, B, "answer")
        w_u, b_u = model.W_U.detach().to(dt), model.b_U.detach().to(dt)  # [D, V], [V]
        d, const = w_u[:, a].T, b_u[a]
        if wrong is not None:
            b = _token_ids(model, wrong, B, "wrong answer")
            d, const = d - w_u[:, b].T, const - b_u[b]

    names = {"hook_embed", "ln_final.hook_scale", "ln_final.hook_normalized"}
    if c.positional == "learned":
        names.add("hook_pos_embed")
    for la in range(c.n_layers):
        names.add(f"blocks.{la}.hook_attn_out")
        if not c.attn_only:
            names.add(f"blocks.{la}.hook_mlp_out")
        if "heads" in want:
            names.add(f"blocks.{la}.attn.hook_z")
        if "neurons" in want:
            names.add(f"blocks.{la}.mlp.hook_post")
    if not c.final_norm:  # W_U reads the final residual itself
        names -= {"ln_final.hook_scale", "ln_final.hook_normalized"}
        names.add(f"blocks.{c.n_layers - 1}.hook_resid_post")
    store: dict[str, torch.Tensor] = {}
    rows = torch.arange(B, device=tokens.device)

    def keep(t: torch.Tensor, hook) -> None:  # only the attributed position: [B, 1, ...]
        store[hook.name] = t.detach()[rows, pos][:, None]

    with torch.no_grad(), model.hooks(fwd_hooks=[(names.__contains__, keep)]):
        logits = model(tokens, attention_mask=mask)
    cache = ActivationCache(store, model)
    if is_direction:  # what the model computed: the final norm's output (or the residual) . direction
        read = "ln_final.hook_normalized" if c.final_norm else f"blocks.{c.n_layers - 1}.hook_resid_post"
        value = (store[read][:, 0].to(dt) * d).sum(-1)
    else:
        final = logits[rows, pos].to(dt)  # [B, V]
        value = final.gather(-1, a[:, None])[:, 0]
        if b is not None:
            value = value - final.gather(-1, b[:, None])[:, 0]

    # u: the linear map resid -> value with the final scale frozen (centre, / scale, times the norm's weight)
    if c.final_norm:
        n = model.ln_final
        dw = d * n.w.detach().to(dt) if n.w is not None else d
        u = cache.apply_ln_to_stack(dw[None, :, None, :], None)[0, :, 0]  # [B, D]
        if n.b is not None:
            const = const + d @ n.b.detach().to(dt)
        scale = store["ln_final.hook_scale"][:, 0, 0].to(dt)
    else:
        u, scale = d, torch.ones(B, device=model.device, dtype=dt)

    stack, labels = cache.decompose_resid(None, return_labels=True)  # [n, B, 1, D]: embeds, attn_out, mlp_out
    contrib = (stack[:, :, 0].to(dt) * u).sum(-1)  # [n, B]
    by = dict(zip(labels, contrib))
    zero = torch.zeros(B, device=model.device, dtype=dt)
    L = c.n_layers
    attn = torch.stack([by[f"{la}_attn_out"] for la in range(L)], -1)  # [B, L]
    mlps = None if c.attn_only else torch.stack([by[f"{la}_mlp_out"] for la in range(L)], -1)
    res = DLAResult(logit_diff=value, embed=by["embed"], pos_embed=by.get("pos_embed", zero), attn=attn, mlps=mlps,
                    final_bias=const, scale=scale, positions=pos)

    if "heads" in want:
        heads = cache.stack_head_results(-1)  # [L*H, B, 1, D] z[h] @ W_O[h]
        res.heads = (heads[:, :, 0].to(dt) * u).sum(-1).reshape(L, c.n_heads, B).permute(2, 0, 1)  # [B, L, H]
        res.attn_bias = (u @ model.b_O.detach().to(dt).T)  # [B, D] @ [D, L] -> [B, L]
    if "neurons" in want:
        post = torch.stack([store[f"blocks.{la}.mlp.hook_post"][:, 0] for la in range(L)], 1).to(dt)  # [B, L, d_mlp]
        w_out = model.W_out.detach().to(dt)  # [L, d_mlp, D]
        res.neurons = post * torch.einsum("lnd,bd->bln", w_out, u)
        b_out = torch.stack([blk.mlp.down.bias.detach() if blk.mlp.down.bias is not None
                             else torch.zeros(c.d_model, device=model.device) for blk in model.blocks]).to(dt)  # [L, D]
        res.mlp_bias = u @ b_out.T  # [B, L]
    return res


__all__ = ["COMPONENTS", "DLAResult", "direct_logit_attribution"]
