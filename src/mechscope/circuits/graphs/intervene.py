"""Interventions from a graph: set transcoder features in the REAL model (error terms kept), and what the graph
predicts they do.

    ivs = feature_interventions(ts, {(3, 5, 1021): 0.0})     # inhibit feature 1021 of layer 3 at position 5
    logits = model(tokens, interventions=ivs)                 # Foundation II interventions: forward, cache, ...
    text = model.generate(prompt, 10, interventions=ivs)
    predicted_logit_change(g, {(3, 5, 1021): 0.0})            # {token id: direct-effect prediction}

In the real model the MLP still runs; at each output hook the intervention adds what the edited features would
write differently: sum over edits of (value - current activation) x decoder row, the current activation computed
by the transcoder from this run's input. Everything the transcoder does not explain (the error) is kept. For the
replacement model with attention frozen use ReplacementModel.logits(edits=...).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch

from mechscope.circuits.graphs.graph import AttributionGraph
from mechscope.errors import InputError
from mechscope.models.interventions import Intervention, select_positions

Edits = Mapping[tuple[int, int, int], float] | Sequence[tuple[int, int, int, float]]


def _edits(edits: Edits) -> dict[tuple[int, int, int], float]:
    items = edits.items() if isinstance(edits, Mapping) else [((e[0], e[1], e[2]), e[3]) for e in edits]
    out = {}
    for key, v in items:
        if len(key) != 3 or not all(isinstance(k, int) and k >= 0 for k in key):
            raise InputError(f"A feature edit is (layer, position, feature) -> value with non-negative ints; got "
                             f"{key!r}.")
        out[tuple(key)] = float(v)
    return out


class _CaptureInput(Intervention):
    """Records the activation at a transcoder's input hook (unchanged) for the edits downstream."""

    def __init__(self, hook: str, store: dict, layer: int) -> None:
        super().__init__(hook)
        self.store, self.layer = store, layer

    def edit(self, act, where):
        self.store[self.layer] = act
        return act


class FeatureEdit(Intervention):
    """At output hook of layer `dst`: add (value - current) x decoder(src, dst)[feature] for every edit
    (src, pos, feature) -> value with src <= dst, at absolute position pos."""

    def __init__(self, ts, dst: int, edits: dict[tuple[int, int, int], float], inputs: dict) -> None:
        super().__init__(ts.output_hooks[dst])
        self.ts, self.dst, self.edits, self.inputs = ts, dst, edits, inputs
        self._model = None

    def bind(self, model):
        self._model = model
        return super().bind(model)

    def edit(self, act, where):
        state = self._model.run_state_now if self._model is not None else None
        if state is None or act.shape[1] != state.positions.shape[1]:
            raise InputError(f"FeatureEdit on {self.hook} needs a model run with known positions.")
        pos = state.positions[: act.shape[0]].to(act.device)  # [B, T] absolute positions
        out = act
        for (src, p, f), value in self.edits.items():
            W = self.ts.decoder(src, self.dst)
            if W is None or src not in self.inputs:
                continue
            sel = select_positions(p, pos)  # [B, T]
            if state.real is not None:
                sel = sel & state.real[: act.shape[0]].to(act.device)
            if not bool(sel.any()):
                continue
            cur = self.ts.encode(src, self.inputs[src])[..., f]  # [B, T]
            delta = (value - cur) * sel.to(cur.dtype)
            out = out + delta[..., None].to(act.dtype) * W[f].to(act.device, act.dtype)
        return out


def feature_interventions(ts, edits: Edits) -> list[Intervention]:
    """Interventions (models.interventions) that set transcoder features in the real model, error kept.
    edits: {(layer, pos, feature): value} or [(layer, pos, feature, value)]; positions are absolute."""
    e = _edits(edits)
    if not e:
        raise InputError("feature_interventions needs at least one edit (layer, pos, feature) -> value.")
    for (layer, _, f) in e:
        if layer >= ts.n_layers or f >= ts.n_features[layer]:
            raise InputError(f"Edit of feature {f} at layer {layer}: the transcoders have {ts.n_layers} layers "
                             f"and {ts.n_features[min(layer, ts.n_layers - 1)]} features there.")
    store: dict = {}
    srcs = sorted({k[0] for k in e})
    ivs: list[Intervention] = [_CaptureInput(ts.input_hooks[s], store, s) for s in srcs]
    for dst in range(min(srcs), ts.n_layers):
        mine = {k: v for k, v in e.items() if ts.decoder(k[0], dst) is not None}
        if mine:
            ivs.append(FeatureEdit(ts, dst, mine, store))
    return ivs


def predicted_change(g: AttributionGraph, edits: Edits) -> torch.Tensor:
    """[n_nodes] the graph's first-order prediction of how each node moves (its pre-activation, or demeaned logit
    before any final soft-cap: ReplacementModel.logits(softcap=False)) when features are set to new values:
    sum_s A[:, s] (value_s / activation_s - 1). Direct effects only."""
    e = _edits(edits)
    a = g.dense()
    delta = torch.zeros(len(g.nodes))
    for key, v in e.items():
        i = g.feature_index(*key)
        act = g.nodes[i].activation
        delta[i] = v / act - 1.0
    return a @ delta


def predicted_logit_change(g: AttributionGraph, edits: Edits) -> dict[int, float]:
    """{logit token id: predicted change of its demeaned (pre-soft-cap) logit} (direct effects of the edits)."""
    d = predicted_change(g, edits)
    return {n.token_id: float(d[i]) for i, n in enumerate(g.nodes) if n.kind == "logit"}
