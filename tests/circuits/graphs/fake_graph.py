"""A small hand-made AttributionGraph-like object (the h-graph contract's field names) for the graph-file and
explorer tests, so they need neither transcoders nor an attribution run."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass
class FakeNode:
    kind: str
    layer: int | None
    pos: int
    feature: int | None = None
    activation: float | None = None
    token: str | None = None
    prob: float | None = None
    influence: float | None = None
    node_id: str = ""


@dataclass
class FakeGraph:
    prompt: str
    tokens: list[str]
    input_ids: list[int]
    nodes: list[FakeNode]
    adjacency: torch.Tensor  # [n, n], [target, source]
    model_name: str = "tiny"
    model_identity: dict = field(default_factory=dict)
    scores: dict = field(default_factory=dict)
    settings: dict = field(default_factory=dict)


def make_graph(sparse: bool = False) -> FakeGraph:
    """2 layers, 3 tokens: features (0, 5, pos 1), (1, 2, pos 2), (1, 7, pos 2); errors; embeddings; 2 logits.
    One error node (layer 1, pos 2) has no edge and must be dropped from the file, like circuit-tracer does."""
    nodes = [
        FakeNode("feature", 0, 1, feature=5, activation=1.5, influence=0.4),
        FakeNode("feature", 1, 2, feature=2, activation=0.75, influence=0.7),
        FakeNode("feature", 1, 2, feature=7, activation=2.0, influence=0.2),
        FakeNode("error", 0, 2, influence=0.9),
        FakeNode("error", 1, 2, influence=0.95),  # no edges
        FakeNode("embedding", None, 0, influence=0.5),
        FakeNode("embedding", None, 1, influence=0.6),
        FakeNode("embedding", None, 2, influence=0.3),
        FakeNode("logit", 2, 2, feature=42, token=" Paris", prob=0.6),
        FakeNode("logit", 2, 2, feature=17, token=" Lyon", prob=0.1),
    ]
    n = len(nodes)
    a = torch.zeros(n, n)
    a[0, 6] = 2.0     # emb pos1 -> f(0,5)
    a[1, 0] = 1.25    # f(0,5) -> f(1,2)
    a[1, 3] = -0.5    # err(0,2) -> f(1,2)
    a[2, 7] = 0.3     # emb pos2 -> f(1,7)
    a[8, 1] = 3.0     # f(1,2) -> logit Paris
    a[8, 2] = -1.0    # f(1,7) -> logit Paris
    a[9, 1] = -0.25   # f(1,2) -> logit Lyon
    a[8, 5] = 0.125   # emb pos0 -> logit Paris
    g = FakeGraph(prompt="The capital", tokens=["The", " cap", "ital"], input_ids=[464, 3139, 1287], nodes=nodes,
                  adjacency=a.to_sparse() if sparse else a, model_identity={"n_layers": 2},
                  scores={"replacement": 0.5, "completeness": 0.8},
                  settings={"node_threshold": 0.8, "edge_threshold": 0.98, "max_n_logits": 10,
                            "desired_logit_prob": 0.95, "batch_size": 256, "max_feature_nodes": None})
    return g
