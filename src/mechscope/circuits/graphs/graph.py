"""AttributionGraph: the nodes and direct-effect edges of one prompt's local replacement model.

Node order (circuit-tracer's): active features (by layer, position, feature), error nodes (layer-major: index
layer * n_pos + pos), token embeddings (by position), logits (by probability, descending).
adjacency[target, source] = direct effect of source on target: on a feature's pre-activation (encoder . input)
or on a logit (demeaned unembedding . final normalised residual). Node ids follow circuit-tracer's files:
feature "{layer}_{feature}_{pos}", error "0_{layer}_{pos}", embedding "E_{token_id}_{pos}",
logit "{n_layers}_{token_id}_{pos}".
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from mechscope.errors import InputError

KINDS = ("feature", "error", "embedding", "logit")


@dataclass
class Node:
    """One graph node. layer: the transcoder layer (features, errors), None for embeddings, n_layers for logits."""

    kind: str  # "feature" | "error" | "embedding" | "logit"
    layer: int | None
    pos: int
    feature: int | None = None  # feature index within its layer (features only)
    activation: float | None = None  # feature activation on the prompt
    token: str | None = None  # the token (embeddings, logits)
    prob: float | None = None  # softmax probability (logits)
    influence: float | None = None  # cumulative influence rank in [0, 1] (after pruning; smaller = more)
    node_id: str = ""
    token_id: int | None = None  # vocabulary id (embeddings, logits)

    @property
    def key(self) -> tuple:
        """A unique key (circuit-tracer's node ids can collide: feature "0_0_5" of layer 0 vs error "0_0_5")."""
        return (self.kind, self.layer, self.pos, self.feature, self.token_id)


def node_id(kind: str, layer: int | None, pos: int, feature: int | None = None, token_id: int | None = None,
            n_layers: int | None = None) -> str:
    """circuit-tracer's node id for a node."""
    if kind == "feature":
        return f"{layer}_{feature}_{pos}"
    if kind == "error":
        return f"0_{layer}_{pos}"
    if kind == "embedding":
        return f"E_{token_id}_{pos}"
    if kind == "logit":
        return f"{n_layers}_{token_id}_{pos}"
    raise InputError(f"Unknown node kind {kind!r}; one of {KINDS}.")


@dataclass
class AttributionGraph:
    """A (full or pruned) attribution graph; see the module docstring for node order and edge convention."""

    prompt: str
    tokens: list[str]
    input_ids: list[int]
    model_name: str
    model_identity: dict
    nodes: list[Node]
    adjacency: torch.Tensor  # [n_nodes, n_nodes]: dense float32 (pruned) or sparse COO (full)
    scores: dict = field(default_factory=dict)  # {"replacement": float, "completeness": float}
    settings: dict = field(default_factory=dict)  # thresholds, transcoder info, timings
    n_layers: int = 0

    # ------------------------------------------------------------------ views
    def dense(self) -> torch.Tensor:
        """The adjacency as a dense float32 [n, n] tensor."""
        a = self.adjacency
        return (a.to_dense() if a.is_sparse else a).float()

    def kinds(self) -> list[str]:
        return [n.kind for n in self.nodes]

    def count(self, kind: str) -> int:
        return sum(n.kind == kind for n in self.nodes)

    def index(self, node_id_: str) -> int:
        """Row/column of the node with this id (InputError if absent). circuit-tracer's ids can collide (feature
        "0_0_5" = feature 0 of layer 0 at position 5, error "0_0_5" = error of layer 0 at position 5): the feature
        wins; use index_of / feature_index to be exact."""
        if getattr(self, "_ids", None) is None or len(self._ids[1]) != len(self.nodes):
            ids: dict[str, int] = {}
            for i, n in enumerate(self.nodes):
                ids.setdefault(n.node_id, i)
            self._ids = (ids, {n.key: i for i, n in enumerate(self.nodes)})
        try:
            return self._ids[0][node_id_]
        except KeyError:
            raise InputError(f"No node {node_id_!r} in this graph ({len(self.nodes)} nodes; ids look like "
                             f"{self.nodes[0].node_id!r}).") from None

    def index_of(self, node: Node) -> int:
        """Row/column of the node with the same kind, layer, position, feature and token as `node`."""
        self.index(self.nodes[0].node_id)  # builds the lookup tables
        try:
            return self._ids[1][node.key]
        except KeyError:
            raise InputError(f"No {node.kind} node at layer {node.layer}, position {node.pos} in this graph.") from None

    def feature_index(self, layer: int, pos: int, feature: int) -> int:
        """Row/column of feature `feature` of layer `layer` at position `pos` (InputError if not a node)."""
        return self.index_of(Node("feature", layer, pos, feature))

    @property
    def logit_weights(self) -> torch.Tensor:
        """[n] the logit probabilities at logit nodes, 0 elsewhere (what influence is measured against)."""
        return torch.tensor([n.prob if n.kind == "logit" else 0.0 for n in self.nodes], dtype=torch.float32)

    def feature_nodes(self) -> list[Node]:
        return [n for n in self.nodes if n.kind == "feature"]

    def top_sources(self, target: str, k: int = 10) -> list[tuple[str, float]]:
        """The k sources with the largest |direct effect| on node `target` (id): [(source id, weight)]."""
        row = self.dense()[self.index(target)]
        idx = row.abs().argsort(descending=True)[:k]
        return [(self.nodes[int(i)].node_id, float(row[i])) for i in idx if row[i] != 0]

    def summary(self) -> dict[str, Any]:
        return {k: self.count(k) for k in KINDS} | {"edges": int((self.dense() != 0).sum()), **self.scores}

    def __repr__(self) -> str:
        s = ", ".join(f"{k} {v:.3g}" if isinstance(v, float) else f"{k} {v}" for k, v in self.summary().items())
        return f"AttributionGraph({self.prompt[:40]!r}: {s})"
