"""Steering: add a direction, clamp SAE features, or ablate a direction while the model runs.

    v = contrastive_vector(model, ["I love this", ...], ["I hate this", ...], "blocks.12.hook_resid_post")
    text = model.generate("The movie was", 20, interventions=[steer(v, scale=6.0)])
    clamp = ClampFeatures(coder, {123: 10.0})            # latent 123 forced to 10, the rest untouched
    model(tokens, interventions=[clamp])

Everything here is an Intervention (models/interventions.py), so it acts the same in forward, run_with_cache,
patching sweeps and generate with the KV cache, and several compose (they run in the order given). Each is a
small serialisable object (`to_json` / `from_json`) so a service can receive it.

Why the SAE clamp keeps the reconstruction error: replacing the activation by the SAE's reconstruction would
change everything the SAE fails to explain (its error term is often larger than the feature itself). Adding
only the change of the chosen latents' decoder contributions, (f' - f) @ W_dec, changes exactly those features.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch

from mechscope.errors import InputError
from mechscope.models.interventions import Ablate, Add, Intervention, Positions, Scale, Set

# ------------------------------------------------------------------------------ vectors


def contrastive_vector(model, positive: Sequence[str], negative: Sequence[str], hook: str, *,
                       position: str = "last", batch_size: int = 16) -> torch.Tensor:
    """Contrastive activation addition (Rimsky et al. 2024) / mean difference: mean activation at `hook` over
    the positive prompts minus the mean over the negative ones, read at the last real token ("last") or
    averaged over real tokens ("mean"). Returns [d] float32."""
    pos, neg = _prompt_list(positive, "positive"), _prompt_list(negative, "negative")
    if position not in ("last", "mean"):
        raise InputError(f"position must be 'last' or 'mean', got {position!r}.")
    return _mean_activation(model, pos, hook, position, batch_size) - _mean_activation(model, neg, hook, position,
                                                                                        batch_size)


def _prompt_list(prompts: Any, what: str) -> list[str]:
    if isinstance(prompts, str) or not isinstance(prompts, Sequence) or not prompts \
            or not all(isinstance(p, str) and p for p in prompts):
        raise InputError(f"{what} prompts must be a non-empty list of non-empty strings, got {prompts!r:.80}.")
    return list(prompts)


@torch.no_grad()
def _mean_activation(model, prompts: list[str], hook: str, position: str, batch_size: int) -> torch.Tensor:
    total, count = None, 0
    for i in range(0, len(prompts), batch_size):
        tokens, mask = model.prepare(prompts[i:i + batch_size], padding_side="right")
        _, cache = model.run_with_cache(tokens, attention_mask=mask, names_filter=hook, return_type=None)
        act = cache[hook].float()  # [B, T, d]
        if act.dim() != 3:
            raise InputError(f"Steering vectors are read from [batch, pos, d] hook points; {hook!r} has shape "
                             f"{tuple(act.shape)}.")
        real = torch.ones(act.shape[:2], device=act.device) if mask is None else mask.to(act.device).float()
        if position == "last":
            last = real.sum(1).long() - 1  # right padding: the last real token
            rows = act[torch.arange(act.shape[0]), last]
        else:
            rows = (act * real[..., None]).sum(1) / real.sum(1, keepdim=True)
        total = rows.sum(0) if total is None else total + rows.sum(0)
        count += rows.shape[0]
    return (total / count).cpu()


def sae_direction(coder, latent: int) -> torch.Tensor:
    """The decoder row of one SAE latent, in the model's units ([d] float32): what the latent writes."""
    n = coder.cfg.n_latents
    if not isinstance(latent, int) or not 0 <= latent < n:
        raise InputError(f"latent must be an int in [0, {n}), got {latent!r}.")
    return (coder.W_dec[latent].detach().float() / coder.cfg.output_scale).cpu()


def steer(vector: torch.Tensor, hook: str, scale: float = 1.0, positions: Positions = None) -> Add:
    """An Add intervention: `scale * vector` added at `hook` (a steering vector from contrastive_vector, a probe's
    direction or sae_direction)."""
    return Add(hook, vector, scale=scale, positions=positions)


# ------------------------------------------------------------------------------ SAE feature clamping


class ClampFeatures(Intervention):
    """Set, scale or zero chosen SAE latents at the coder's hook, keeping the reconstruction error: the
    activation changes by (f' - f) @ W_dec only, so every other feature (and what the SAE misses) is untouched.

    values: {latent: value} (clamp to a value), scale: {latent: factor} (0 = ablate). Works for autoencoders
    (the coder reads and writes the same hook); transcoders write elsewhere and are refused."""

    def __init__(self, coder, values: Mapping[int, float] | None = None, scale: Mapping[int, float] | None = None,
                 positions: Positions = None) -> None:
        cfg = coder.cfg
        if not cfg.hook_in:
            raise InputError("The coder does not say which hook it reads (cfg.hook_in); set it before clamping.")
        if cfg.is_transcoder:
            raise InputError(f"{cfg.hook_in} -> {cfg.hook_out} is a transcoder: clamping its latents would change "
                             f"{cfg.hook_out}, not the hook it reads; clamp an autoencoder's latents instead.")
        super().__init__(cfg.hook_in, positions)
        self.coder = coder
        self.values = {int(k): float(v) for k, v in (values or {}).items()}
        self.scale = {int(k): float(v) for k, v in (scale or {}).items()}
        chosen = set(self.values) | set(self.scale)
        if not chosen:
            raise InputError("ClampFeatures needs values={latent: value} and/or scale={latent: factor}.")
        if set(self.values) & set(self.scale):
            raise InputError(f"latents {sorted(set(self.values) & set(self.scale))} are both clamped and scaled.")
        bad = [i for i in chosen if not 0 <= i < cfg.n_latents]
        if bad:
            raise InputError(f"latents {bad} out of range [0, {cfg.n_latents}).")
        self.latents = torch.tensor(sorted(chosen), dtype=torch.long)

    def latent_change(self, f: torch.Tensor) -> torch.Tensor:
        """f [..., n_chosen] the chosen latents' activations -> f' - f."""
        new = f.clone()
        for j, i in enumerate(self.latents.tolist()):
            new[..., j] = self.values[i] if i in self.values else f[..., j] * self.scale[i]
        return new - f

    def edit(self, act, where):
        c = self.coder
        f = c.encode(act)[..., self.latents.to(act.device)]  # [..., n_chosen]
        rows = c.W_dec[self.latents.to(c.W_dec.device)]  # [n_chosen, d]
        delta = (self.latent_change(f.float()).to(rows.dtype) @ rows) / c.cfg.output_scale
        return self.blend(act, act + delta.to(act.dtype), where)


# ------------------------------------------------------------------------------ serialisation

_KINDS = {"add": Add, "set": Set, "scale": Scale, "ablate": Ablate}


def to_json(iv: Intervention) -> dict[str, Any]:
    """A JSON-able dict of a built-in intervention (Add, Set, Scale, Ablate): what a service receives."""
    pos = iv.positions
    if callable(pos) and not isinstance(pos, slice):
        raise InputError("An intervention with a callable positions= cannot be serialised; use ints or a slice.")
    d: dict[str, Any] = {"hook": iv.hook, "heads": iv.heads,
                         "positions": ({"start": pos.start, "stop": pos.stop} if isinstance(pos, slice) else pos)}
    if type(iv) is Add:
        d |= {"kind": "add", "vector": iv.vector.float().tolist(), "scale": iv.scale}
    elif type(iv) is Set:
        d |= {"kind": "set", "value": iv.value.float().tolist()}
    elif type(iv) is Scale:
        d |= {"kind": "scale", "factor": iv.factor}
    elif type(iv) is Ablate:
        d |= {"kind": "ablate", "direction": iv.direction.float().tolist()}
        d.pop("heads")
    else:
        raise InputError(f"{type(iv).__name__} has no JSON form; built-in kinds: {', '.join(_KINDS)}.")
    return d


def from_json(d: Mapping[str, Any]) -> Intervention:
    """The intervention a to_json dict describes; a malformed dict raises InputError saying what is wrong."""
    if not isinstance(d, Mapping) or d.get("kind") not in _KINDS:
        raise InputError(f"An intervention is a dict with 'kind' one of {', '.join(_KINDS)} and 'hook'; got "
                         f"{dict(d) if isinstance(d, Mapping) else d!r:.120}.")
    pos = d.get("positions")
    if isinstance(pos, Mapping):
        pos = slice(pos.get("start"), pos.get("stop"))
    kind, hook, heads = d["kind"], d.get("hook"), d.get("heads")
    try:
        if kind == "add":
            return Add(hook, torch.tensor(d["vector"], dtype=torch.float32), scale=d.get("scale", 1.0),
                       positions=pos, heads=heads)
        if kind == "set":
            return Set(hook, torch.tensor(d["value"], dtype=torch.float32), positions=pos, heads=heads)
        if kind == "scale":
            return Scale(hook, d["factor"], positions=pos, heads=heads)
        return Ablate(hook, torch.tensor(d["direction"], dtype=torch.float32), positions=pos)
    except KeyError as e:
        raise InputError(f"A {kind!r} intervention needs the field {e.args[0]!r}.") from None
    except (TypeError, ValueError) as e:
        raise InputError(f"Malformed {kind!r} intervention: {e}.") from None


__all__ = ["ClampFeatures", "contrastive_vector", "from_json", "sae_direction", "steer", "to_json"]
