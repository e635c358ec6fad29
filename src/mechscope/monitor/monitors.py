"""Monitor kinds: small specs that turn one hook's activation into one score per token.

A monitor never changes the activation (it is a read-only hook on the forward the model runs anyway): it
scores the newest position, and the runtime (runtime.py) turns scores into firing events with a rolling
window and hysteresis, then acts (record, alert, stop, steer).

    ProbeMonitor("deception", probe, threshold=0.0)              # a probes.Probe's logit
    FeatureMonitor("f17", coder, latents=[17], threshold=1.0)    # SAE latents' activations (max/sum/mean)
    DirectionMonitor("refusal", "blocks.6.hook_resid_post", v, threshold=2.0)   # projection on v / |v|
    FunctionMonitor("norm", hook, lambda a: a.norm(dim=-1), threshold=50.0)     # anything [B,T,d] -> [B,T]
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

from mechscope.errors import ArtifactMismatchError, InputError
from mechscope.models.identity import model_identity, same_model
from mechscope.models.interventions import Intervention, check_interventions

ACTIONS = ("record", "alert", "stop", "steer")
REDUCES = ("max", "sum", "mean")
SCOPES = ("all", "prompt")


def check_number(value: Any, what: str, *, minimum: float | None = None) -> float:
    """A finite float (bools and strings refused), or InputError naming `what`."""
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(float(value)):
        raise InputError(f"{what} must be a finite number, got {value!r} ({type(value).__name__}).")
    if minimum is not None and value < minimum:
        raise InputError(f"{what} must be >= {minimum}, got {value!r}.")
    return float(value)


class Monitor:
    """Base class. Subclasses set `hook` and implement `score(act) -> [...]` (one float per row of act).

    threshold: fires when the (windowed) score goes above it. window: the score compared is the mean of the
    last `window` per-token scores. hysteresis: after firing, the monitor re-arms only once the score is back
    at or below threshold - hysteresis (so a score hovering at the threshold fires once, not every token).
    action: "record" (trace only), "alert" (an Alert + on_alert(alert)), "stop" (the token predicted at this
    step is never emitted; generation ends), "steer" (the `steer` interventions act from the next token on).
    scope: "all" (every step may fire) or "prompt" (only step 0, the prompt's last token, before any token is
    generated: a gate on the request; later steps are still scored and traced but never fire). Why a scope: a
    probe fitted on prompts reads generated text on another scale, so one threshold cannot serve both.
    """

    kind = "monitor"

    def __init__(self, name: str, hook: str, threshold: float, *, window: int = 1, hysteresis: float = 0.0,
                 action: str = "record", steer: Intervention | Sequence[Intervention] | None = None,
                 on_alert: Callable[[Any], Any] | None = None, scope: str = "all") -> None:
        if not isinstance(name, str) or not name.strip():
            raise InputError(f"A monitor needs a non-empty name (str), got {name!r}.")
        if not isinstance(hook, str) or not hook:
            raise InputError(f"Monitor {name!r} needs a hook name (e.g. 'blocks.3.hook_resid_post'), got {hook!r}.")
        self.name, self.hook = name, hook
        self.threshold = check_number(threshold, f"Monitor {name!r}: threshold")
        if isinstance(window, bool) or not isinstance(window, int) or window < 1:
            raise InputError(f"Monitor {name!r}: window must be an int >= 1 (tokens averaged), got {window!r}.")
        self.window = window
        self.hysteresis = check_number(hysteresis, f"Monitor {name!r}: hysteresis", minimum=0.0)
        if action not in ACTIONS:
            raise InputError(f"Monitor {name!r}: action must be one of {', '.join(ACTIONS)}, got {action!r}.")
        self.action = action
        self.steer = check_interventions(steer)
        if action == "steer" and not self.steer:
            raise InputError(f"Monitor {name!r} has action='steer' but no steer= intervention (e.g. "
                             "edit.steer(vector, hook, scale=-4) or edit.ClampFeatures(coder, {i: 0.0})).")
        if action != "steer" and self.steer:
            raise InputError(f"Monitor {name!r}: steer= is used only with action='steer' (action is {action!r}).")
        if on_alert is not None and not callable(on_alert):
            raise InputError(f"Monitor {name!r}: on_alert must be callable(Alert), got {type(on_alert).__name__}.")
        self.on_alert = on_alert
        if scope not in SCOPES:
            raise InputError(f"Monitor {name!r}: scope must be one of {', '.join(SCOPES)} (\"prompt\": fire only on "
                             f"the prompt's last token), got {scope!r}.")
        self.scope = scope

    # -- what subclasses implement ---------------------------------------------------------------------------
    def score(self, act: torch.Tensor) -> torch.Tensor:
        """act [..., d] (the hook's activation rows) -> [...] float scores."""
        raise NotImplementedError

    def check(self, model) -> None:
        """Raise a typed error if this monitor cannot run on `model` (unknown hook, another model's artifact)."""
        if self.hook not in model.hook_dict:
            from mechscope.errors import HookNameError, unknown_name_message

            raise HookNameError(unknown_name_message("hook name", self.hook, model.hook_dict)
                                + f" (monitor {self.name!r})")

    def describe(self) -> dict[str, Any]:
        """The JSON-ready common fields (what the service lists)."""
        return {"name": self.name, "kind": self.kind, "hook": self.hook, "threshold": self.threshold,
                "window": self.window, "hysteresis": self.hysteresis, "action": self.action, "scope": self.scope}

    def __repr__(self) -> str:
        return (f"{type(self).__name__}({self.name!r} on {self.hook}, threshold={self.threshold}, "
                f"action={self.action!r})")


_D_MODEL = ("hook_resid_pre", "hook_resid_mid", "hook_resid_post", "hook_attn_out", "hook_mlp_out",
            "hook_normalized", "hook_embed", "hook_pos_embed")


def known_width(model, hook: str) -> int | None:
    """Features per token at `hook` when the config says it without a forward (residual-stream points: d_model;
    MLP hidden: d_mlp), else None (checked on the first forward instead)."""
    if hook.endswith(_D_MODEL):
        return model.cfg.d_model
    if hook.endswith(("mlp.hook_pre", "mlp.hook_post")) and model.cfg.d_mlp:
        return model.cfg.d_mlp
    return None


def _artifact_width(model, monitor: Monitor, d: int, what: str) -> None:
    have = known_width(model, monitor.hook)
    if have is not None and have != d:
        raise ArtifactMismatchError(f"Monitor {monitor.name!r}: the {what} reads {d}-dimensional rows but "
                                    f"{monitor.hook} has width {have} in this model: it belongs to another model "
                                    "or hook.")


def _width_check(act: torch.Tensor, d: int, monitor: Monitor) -> None:
    if act.shape[-1] != d:
        raise InputError(f"Monitor {monitor.name!r} reads {d}-dimensional rows but {monitor.hook} has width "
                         f"{act.shape[-1]}: it belongs to another model or hook.")


class ProbeMonitor(Monitor):
    """A probes.Probe's logit per token (higher = more like the probe's label 1; > 0 predicts 1). The probe's
    own position ("last", "mean", "all") is how it was fitted; a monitor scores every new token."""

    kind = "probe"

    def __init__(self, name: str, probe, threshold: float = 0.0, **common) -> None:
        from mechscope.probes import Probe, load

        self.source: Path | None = None  # the folder it was loaded from (saved by reference)
        if isinstance(probe, str | os.PathLike):
            self.source = Path(probe)
            probe = load(probe)
        if not isinstance(probe, Probe):
            raise InputError(f"ProbeMonitor {name!r} needs a probes.Probe (or its folder), got "
                             f"{type(probe).__name__}.")
        self.probe = probe
        super().__init__(name, probe.hook, threshold, **common)
        f = probe.fit  # float64, exactly as Probe.score_activations computes
        self._mean, self._std, self._w, self._b = f.mean, f.std, f.weight, float(f.bias)

    def check(self, model) -> None:
        super().check(model)
        self.probe.check_model(model)  # ArtifactMismatchError for another model's probe
        _artifact_width(model, self, self._w.shape[0], "probe")

    def score(self, act):
        _width_check(act, self._w.shape[0], self)
        dev = act.device
        if self._w.device != dev:
            self._mean, self._std, self._w = self._mean.to(dev), self._std.to(dev), self._w.to(dev)
        return ((act.double() - self._mean) / self._std) @ self._w + self._b


class FeatureMonitor(Monitor):
    """Activations of chosen SAE latents at the coder's input hook, reduced over the latents ("max", "sum",
    "mean"). The coder must be an autoencoder or a transcoder whose input hook is what it reads."""

    kind = "feature"

    def __init__(self, name: str, coder, latents: int | Sequence[int], threshold: float = 1.0,
                 reduce: str = "max", **common) -> None:
        from mechscope.sae import SparseCoder, load

        self.source: Path | None = None
        if isinstance(coder, str | os.PathLike):
            self.source = Path(coder)
            coder = load(coder)
        if not isinstance(coder, SparseCoder):
            raise InputError(f"FeatureMonitor {name!r} needs a sae.SparseCoder (or its folder), got "
                             f"{type(coder).__name__}.")
        if not coder.cfg.hook_in:
            raise InputError(f"FeatureMonitor {name!r}: the coder records no input hook (cfg.hook_in); set it.")
        items = [latents] if isinstance(latents, int) else list(latents)
        n = coder.cfg.n_latents
        if not items or any(isinstance(i, bool) or not isinstance(i, int) or not 0 <= i < n for i in items):
            raise InputError(f"FeatureMonitor {name!r}: latents must be a non-empty list of ints in [0, {n}), "
                             f"got {latents!r}.")
        if reduce not in REDUCES:
            raise InputError(f"FeatureMonitor {name!r}: reduce must be one of {', '.join(REDUCES)}, got {reduce!r}.")
        self.coder, self.latents, self.reduce = coder, [int(i) for i in items], reduce
        self._idx = torch.tensor(self.latents, dtype=torch.long)
        super().__init__(name, coder.cfg.hook_in, threshold, **common)

    def check(self, model) -> None:
        super().check(model)
        _artifact_width(model, self, self.coder.cfg.d_in, "SAE")
        want = self.coder.cfg.model_identity
        if want:
            key = same_model(want, model_identity(model))
            if key is not None:
                raise ArtifactMismatchError(
                    f"FeatureMonitor {self.name!r}: the SAE was trained on {want.get('name')!r} ({key} "
                    f"{want.get(key)}), not on the model given ({model.cfg.model_name!r}); its features mean "
                    "nothing there. Use an SAE trained on this model.")

    def score(self, act):
        _width_check(act, self.coder.cfg.d_in, self)
        if self.coder.W_enc.device != act.device:
            raise InputError(f"FeatureMonitor {self.name!r}: the SAE is on {self.coder.W_enc.device}, the model "
                             f"on {act.device}; move it (coder.to(model.device)).")
        f = self.coder.encode(act)[..., self._idx.to(act.device)].float()  # [..., n_chosen]
        return f.amax(-1) if self.reduce == "max" else (f.sum(-1) if self.reduce == "sum" else f.mean(-1))

    def describe(self):
        return super().describe() | {"latents": self.latents, "reduce": self.reduce}


class DirectionMonitor(Monitor):
    """Projection of the activation on a unit direction (direction / |direction|): e.g. a steering vector, a
    probe's direction, an SAE decoder row."""

    kind = "direction"

    def __init__(self, name: str, hook: str, direction, threshold: float = 2.0, **common) -> None:
        d = torch.as_tensor(direction).detach().float()
        if d.dim() != 1 or d.numel() == 0 or not bool(torch.isfinite(d).all()) or float(d.norm()) == 0:
            raise InputError(f"DirectionMonitor {name!r}: direction must be a finite non-zero vector [d], got "
                             f"shape {tuple(d.shape)}.")
        super().__init__(name, hook, threshold, **common)
        self.vector = d.cpu()  # [d] as given (what is saved, so a loaded monitor scores bit for bit the same)
        self.direction = (d / d.norm()).cpu()  # [d] unit, float32
        self._dir = self.direction

    def check(self, model) -> None:
        super().check(model)
        have = known_width(model, self.hook)
        if have is not None and have != self.direction.shape[0]:
            raise InputError(f"Monitor {self.name!r}: the direction has {self.direction.shape[0]} dimensions but "
                             f"{self.hook} has width {have}.")

    def score(self, act):
        _width_check(act, self.direction.shape[0], self)
        if self._dir.device != act.device:
            self._dir = self.direction.to(act.device)
        return act.float() @ self._dir


class FunctionMonitor(Monitor):
    """Any function of the activation: fn(act [B, T, d]) -> [B, T] scores. Not saveable (code is not data)."""

    kind = "function"

    def __init__(self, name: str, hook: str, fn: Callable[[torch.Tensor], torch.Tensor], threshold: float,
                 **common) -> None:
        if not callable(fn):
            raise InputError(f"FunctionMonitor {name!r} needs a callable act [B,T,d] -> [B,T], got "
                             f"{type(fn).__name__}.")
        super().__init__(name, hook, threshold, **common)
        self.fn = fn

    def score(self, act):
        out = self.fn(act)
        if not isinstance(out, torch.Tensor) or tuple(out.shape) != tuple(act.shape[:-1]):
            raise InputError(f"FunctionMonitor {self.name!r}: fn must return a tensor of shape "
                             f"{tuple(act.shape[:-1])} (one score per token), got "
                             f"{getattr(out, 'shape', type(out).__name__)}.")
        return out


def check_monitors(monitors: Any) -> list[Monitor]:
    """A list of Monitor objects with unique names (a single one is accepted), or InputError."""
    if monitors is None:
        return []
    items = [monitors] if isinstance(monitors, Monitor) else list(monitors)
    bad = [type(m).__name__ for m in items if not isinstance(m, Monitor)]
    if bad:
        raise InputError(f"monitors must be Monitor objects (ProbeMonitor, FeatureMonitor, DirectionMonitor, "
                         f"FunctionMonitor), got {bad[0]}.")
    names = [m.name for m in items]
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise InputError(f"Monitor names must be unique (they key the trace); repeated: {', '.join(dup)}.")
    return items


__all__ = ["ACTIONS", "SCOPES", "DirectionMonitor", "FeatureMonitor", "FunctionMonitor", "Monitor", "ProbeMonitor",
           "check_monitors", "check_number"]
