"""The computational graph of a transformer as circuit discovery sees it (EAP / EAP-IG).

Nodes are the things that write to the residual stream plus the reader at the end:

    input          the embeddings (token + positional), i.e. blocks.0.hook_resid_pre
    a{l}.h{h}      attention head h of layer l            (its output: attn.hook_result[:, :, h])
    m{l}           the MLP of layer l (absent if attn_only) (its output: hook_mlp_out)
    logits         the unembedding, reading the final residual

Because the residual stream is a sum of node outputs, every *input* of a later node is a sum of
earlier outputs, so "edge u -> v" means "the part of v's input that u wrote". Downstream inputs:

    a{l}.h{h}<q>   the query input of head h (the residual as read by ln1 then W_Q[h])
    a{l}.h{h}<k>   key / value inputs. With grouped-query attention (n_kv_heads < n_heads) one
    a{l}.h{h}<v>   key and value projection serves a whole group of query heads, so k/v inputs
                   exist per kv head and are named a{l}.kv{g}<k> / a{l}.kv{g}<v>: an edge into
                   them feeds every query head of group g (heads g*n_heads/n_kv_heads ...).
                   Splitting them per query head would describe a computation the model does not do.
    m{l}           the MLP input (resid_mid, or resid_pre for parallel attention/MLP blocks)
    logits         the final residual (resid_post of the last block)

An edge u -> v exists when u writes before v reads: heads and MLPs of earlier layers and the
input feed every later input; an MLP also reads the heads of its own layer (not in parallel
blocks). Scores live in one [n_upstream, n_downstream] tensor; names are looked up from indices,
so a Graph of SmolLM2 (301 x 481 edges) is one small tensor, not 100k Python objects.
A circuit is a boolean mask over the same matrix.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from mechscope.errors import CorruptFileError, EmptyCircuitError, InputError

_FORMAT = "mechscope.graph/1"


@dataclass(frozen=True)
class GraphShape:
    """What the graph's structure depends on (saved with every graph)."""

    n_layers: int
    n_heads: int
    n_kv_heads: int
    attn_only: bool = False
    parallel_attn_mlp: bool = False

    @classmethod
    def from_config(cls, cfg: Any) -> GraphShape:
        return cls(cfg.n_layers, cfg.n_heads, cfg.n_kv_heads or cfg.n_heads, bool(cfg.attn_only),
                   bool(cfg.parallel_attn_mlp))

    @property
    def gqa(self) -> bool:
        return self.n_kv_heads != self.n_heads

    @property
    def n_up_per_layer(self) -> int:  # heads + MLP
        return self.n_heads + (0 if self.attn_only else 1)

    @property
    def n_down_per_layer(self) -> int:  # q per head, k and v per kv head, MLP input
        return self.n_heads + 2 * self.n_kv_heads + (0 if self.attn_only else 1)

    @property
    def n_upstream(self) -> int:
        return 1 + self.n_layers * self.n_up_per_layer

    @property
    def n_downstream(self) -> int:
        return self.n_layers * self.n_down_per_layer + 1


class _Structure:
    """Index tables derived from a GraphShape: names, which edges exist, which node owns an input."""

    def __init__(self, s: GraphShape) -> None:
        L, H, K = s.n_layers, s.n_heads, s.n_kv_heads
        up, up_pos = ["input"], [0]
        down, down_reads, down_owner = [], [], []  # reads: last residual slot visible; owner: node ids
        kv = "h" if not s.gqa else "kv"
        self.head_up = torch.zeros(L, H, dtype=torch.long)  # upstream index of each head
        self.mlp_up = torch.full((L,), -1, dtype=torch.long)
        for layer in range(L):
            # residual "slots": input 0, heads of layer l at 2l+1, MLP of layer l at 2l+2
            for h in range(H):
                self.head_up[layer, h] = len(up)
                up.append(f"a{layer}.h{h}")
                up_pos.append(2 * layer + 1)
            if not s.attn_only:
                self.mlp_up[layer] = len(up)
                up.append(f"m{layer}")
                up_pos.append(2 * layer + 2)
        for layer in range(L):
            heads = self.head_up[layer]
            for h in range(H):
                down.append(f"a{layer}.h{h}<q>")
                down_reads.append(2 * layer)
                down_owner.append([int(heads[h])])
            group = H // K
            for letter in "kv":
                for g in range(K):
                    down.append(f"a{layer}.{kv}{g}<{letter}>")
                    down_reads.append(2 * layer)
                    down_owner.append([int(i) for i in heads[g * group:(g + 1) * group]])
            if not s.attn_only:
                down.append(f"m{layer}")
                down_reads.append(2 * layer if s.parallel_attn_mlp else 2 * layer + 1)
                down_owner.append([int(self.mlp_up[layer])])
        down.append("logits")
        down_reads.append(2 * L + 1)
        self.upstream, self.downstream = up, down
        self.nodes = up + ["logits"]  # node ids: upstream indices, then logits = len(up)
        down_owner.append([len(up)])
        self.up_index = {n: i for i, n in enumerate(up)}
        self.down_index = {n: i for i, n in enumerate(down)}
        pos = torch.tensor(up_pos)
        self.real = pos[:, None] <= torch.tensor(down_reads)[None, :]  # [U, V] the edge exists
        self.owner = torch.zeros(len(self.nodes), len(down), dtype=torch.bool)  # [N, V] node reads via v
        for v, owners in enumerate(down_owner):
            self.owner[owners, v] = True


_STRUCTURES: dict[GraphShape, _Structure] = {}


def _structure(s: GraphShape) -> _Structure:
    if s not in _STRUCTURES:
        _STRUCTURES[s] = _Structure(s)
    return _STRUCTURES[s]


class Graph:
    """Edge scores [n_upstream, n_downstream] with name lookups, and optionally a circuit (a mask).

    Build an empty one with `Graph.from_model(model)`; `edge_attribution` returns a scored one.
    Selections (`top_k_edges`, `threshold`, `with_edges`) return new Graphs sharing the scores.
    """

    def __init__(self, shape: GraphShape, scores: torch.Tensor | None = None,
                 in_circuit: torch.Tensor | None = None, meta: dict[str, Any] | None = None) -> None:
        self.shape = shape
        self._s = _structure(shape)
        n = (shape.n_upstream, shape.n_downstream)
        if scores is None:
            scores = torch.zeros(n)
        if tuple(scores.shape) != n:
            raise InputError(f"Graph scores must have shape {n} (upstream, downstream), got {tuple(scores.shape)}.")
        self.scores = scores.detach().float().cpu() * self._s.real  # [U, V], 0 where no edge exists
        if in_circuit is not None:
            if tuple(in_circuit.shape) != n:
                raise InputError(f"Circuit mask must have shape {n}, got {tuple(in_circuit.shape)}.")
            in_circuit = in_circuit.detach().bool().cpu() & self._s.real
        self.in_circuit: torch.Tensor | None = in_circuit  # [U, V] bool, None = no circuit chosen
        self.meta: dict[str, Any] = dict(meta or {})

    @classmethod
    def from_model(cls, model: Any) -> Graph:
        """An unscored graph for this model (its config decides heads, kv groups, MLPs)."""
        return cls(GraphShape.from_config(model.cfg))

    # ------------------------------------------------------------------ names and structure
    @property
    def upstream(self) -> list[str]:
        """Node names that write to the residual: input, a{l}.h{h}, m{l} (rows of `scores`)."""
        return self._s.upstream

    @property
    def downstream(self) -> list[str]:
        """Inputs that read the residual: a{l}.h{h}<q>, k/v inputs, m{l}, logits (columns of `scores`)."""
        return self._s.downstream

    @property
    def nodes(self) -> list[str]:
        return self._s.nodes

    @property
    def real(self) -> torch.Tensor:
        """[U, V] bool: which edges exist (u writes before v reads)."""
        return self._s.real

    @property
    def owner(self) -> torch.Tensor:
        """[N, V] bool: node n reads through downstream input v (a kv input has several owners)."""
        return self._s.owner

    @property
    def n_real_edges(self) -> int:
        return int(self._s.real.sum())

    def _up(self, name: str) -> int:
        try:
            return self._s.up_index[name]
        except KeyError:
            raise InputError(f"Unknown upstream node {name!r}; expected 'input', 'a{{l}}.h{{h}}' or 'm{{l}}' "
                             f"(the graph has {len(self.upstream)} upstream nodes).") from None

    def _down(self, name: str) -> int:
        try:
            return self._s.down_index[name]
        except KeyError:
            kv = " or a{l}.kv{g}<k>/<v> (GQA)" if self.shape.gqa else ""
            raise InputError(f"Unknown downstream input {name!r}; expected 'a{{l}}.h{{h}}<q|k|v>'{kv}, "
                             f"'m{{l}}' or 'logits'.") from None

    def edge_index(self, edge: str | tuple[str, str]) -> tuple[int, int]:
        """'u->v' or (u, v) -> (row, column); raises InputError if the edge does not exist."""
        if isinstance(edge, str):
            if "->" not in edge:
                raise InputError(f"Edge names look like 'a0.h1->a1.h2<k>', got {edge!r}.")
            u, v = edge.split("->", 1)
        else:
            u, v = edge
        i, j = self._up(u), self._down(v)
        if not bool(self._s.real[i, j]):
            raise InputError(f"There is no edge {u}->{v}: {u} writes after {v} reads the residual stream.")
        return i, j

    def edge_name(self, i: int, j: int) -> str:
        return f"{self.upstream[i]}->{self.downstream[j]}"

    def score(self, edge: str | tuple[str, str]) -> float:
        i, j = self.edge_index(edge)
        return float(self.scores[i, j])

    # ------------------------------------------------------------------ scores
    @property
    def node_scores(self) -> torch.Tensor:
        """[U]: each upstream node's score = the sum of its outgoing edge scores.

        For attribution scores this IS the node-level attribution: a node's output enters the
        residual once, so the gradient w.r.t. it is the sum of the gradients w.r.t. every input
        reading it, and the score is linear in the gradient."""
        return self.scores.sum(dim=1)

    def head_scores(self) -> torch.Tensor:
        """[n_layers, n_heads]: node scores of the attention heads, laid out like activation_patching(hook="result",
        granularity="head") so the two can be compared directly."""
        return self.node_scores[self._s.head_up]

    def mlp_scores(self) -> torch.Tensor:
        """[n_layers]: node scores of the MLPs (like activation_patching(hook="mlp_out", granularity="layer"))."""
        if self.shape.attn_only:
            raise InputError("This graph is attention-only: it has no MLP nodes.")
        return self.node_scores[self._s.mlp_up]

    def node_score(self, name: str) -> float:
        return float(self.node_scores[self._up(name)])

    def top_edges(self, n: int = 20, absolute: bool = True, in_circuit_only: bool = False) -> list[tuple[str, float]]:
        """The n highest-scoring edges as (name, score)."""
        s = self.scores.abs() if absolute else self.scores.clone()
        mask = self._s.real if not in_circuit_only or self.in_circuit is None else self.in_circuit
        s = s.masked_fill(~mask, -float("inf")).flatten()
        n = min(n, int(mask.sum()))
        idx = s.topk(n).indices.tolist()
        V = self.shape.n_downstream
        return [(self.edge_name(k // V, k % V), float(self.scores.flatten()[k])) for k in idx]

    def top_nodes(self, n: int = 20, absolute: bool = True) -> list[tuple[str, float]]:
        ns = self.node_scores
        order = (ns.abs() if absolute else ns).argsort(descending=True)[:n].tolist()
        return [(self.upstream[i], float(ns[i])) for i in order]

    # ------------------------------------------------------------------ circuits
    def _with_mask(self, mask: torch.Tensor, prune: bool, hint: str) -> Graph:
        g = Graph(self.shape, self.scores, mask, self.meta)
        if prune:
            g = g.prune()
        if g.n_edges == 0:
            raise EmptyCircuitError(f"The circuit is empty: {hint}")
        return g

    def top_k_edges(self, k: int, absolute: bool = True, prune: bool = True) -> Graph:
        """A circuit of the k highest-scoring edges (by |score| unless absolute=False).

        With prune=True, edges not on a path input -> logits are then dropped, so the circuit may
        end up with fewer than k edges (see n_edges)."""
        if not isinstance(k, int) or k <= 0:
            raise EmptyCircuitError(f"top_k_edges(k={k!r}) keeps no edge: pass k >= 1 "
                                    f"(the graph has {self.n_real_edges} edges).")
        if k > self.n_real_edges:
            raise InputError(f"top_k_edges(k={k}) asks for more edges than the graph has ({self.n_real_edges}).")
        s = self.scores.abs() if absolute else self.scores
        s = s.masked_fill(~self._s.real, -float("inf")).flatten()
        mask = torch.zeros(s.numel(), dtype=torch.bool)
        mask[s.topk(k).indices] = True
        return self._with_mask(mask.view_as(self.scores), prune,
                               f"none of the top {k} edges lies on a path input -> logits; raise k "
                               "or pass prune=False.")

    def threshold(self, t: float, absolute: bool = True, prune: bool = True) -> Graph:
        """A circuit of the edges scoring >= t (|score| >= t unless absolute=False)."""
        s = self.scores.abs() if absolute else self.scores
        mask = (s >= t) & self._s.real
        top = float(s.masked_fill(~self._s.real, -float("inf")).max())
        if not bool(mask.any()):
            raise EmptyCircuitError(f"threshold({t}) keeps no edge (the highest {'|score|' if absolute else 'score'} "
                                    f"is {top:.4g}); lower the threshold or use top_k_edges(k).")
        return self._with_mask(mask, prune, f"no edge with score >= {t} lies on a path input -> logits; lower "
                               "the threshold or pass prune=False.")

    def with_edges(self, edges: Iterable[str | tuple[str, str]], prune: bool = False) -> Graph:
        """A circuit made of the given edges ('u->v' names or (u, v) pairs)."""
        mask = torch.zeros_like(self._s.real)
        for e in edges:
            mask[self.edge_index(e)] = True
        hint = ("no edges were given." if not bool(mask.any()) else
                "none of the given edges lies on a path input -> logits; add the missing links or pass prune=False.")
        return self._with_mask(mask, prune, hint)

    def full_circuit(self) -> Graph:
        """Every edge of the model: its faithfulness is 1 by construction."""
        return Graph(self.shape, self.scores, self._s.real.clone(), self.meta)

    def prune(self) -> Graph:
        """Drop the edges that lie on no path input -> logits inside the circuit.

        A node is reached if some circuit edge into one of its inputs comes from a reached node
        (the input node is reached); it is live if a circuit edge from it goes into an input of
        a live node (logits is live). An edge u -> v survives if u is reached and an owner of v is
        live -- then both ends are on a complete path."""
        mask = self._need_circuit()
        s = self._s
        own = s.owner.float()  # [N, V]
        U = self.shape.n_upstream
        reached = torch.zeros(len(self.nodes), dtype=torch.bool)
        reached[0] = True
        live = torch.zeros(len(self.nodes), dtype=torch.bool)
        live[-1] = True
        m = mask.float()
        for _ in range(2 * self.shape.n_layers + 3):  # fixed point; depth is at most 2 L + 2
            fed = (m.T @ reached[:U].float()) > 0  # [V] inputs fed by a reached node
            new_reached = ((own @ fed.float()) > 0) | reached
            feeds_live = (own.T @ live.float()) > 0  # [V] inputs read by a live node
            new_live = torch.cat([(m @ feeds_live.float()) > 0, torch.ones(1, dtype=torch.bool)])
            if torch.equal(new_reached, reached) and torch.equal(new_live, live):
                break
            reached, live = new_reached, new_live
        feeds_live = (own.T @ live.float()) > 0
        pruned = mask & reached[:U, None] & feeds_live[None, :]
        return Graph(self.shape, self.scores, pruned, self.meta)

    def _need_circuit(self) -> torch.Tensor:
        if self.in_circuit is None:
            raise EmptyCircuitError("This graph has no circuit selected; choose one with graph.top_k_edges(k) or "
                                    "graph.threshold(t) (or graph.full_circuit()).")
        return self.in_circuit

    @property
    def n_edges(self) -> int:
        """Edges in the circuit (0 if none is selected)."""
        return 0 if self.in_circuit is None else int(self.in_circuit.sum())

    @property
    def node_mask(self) -> torch.Tensor:
        """[N] bool: nodes that write a circuit edge, or read one through an input of their own (q, MLP input,
        logits). A GQA key/value input alone does not pull in every query head of its group."""
        mask = self._need_circuit()
        writes = mask.any(dim=1)
        own = self._s.owner & (self._s.owner.sum(0, keepdim=True) == 1)  # inputs with a single owner
        reads = (own.float() @ mask.any(dim=0).float()) > 0
        return torch.cat([writes, torch.zeros(1, dtype=torch.bool)]) | reads

    @property
    def n_nodes(self) -> int:
        """Nodes in the circuit, counting input and logits."""
        return 0 if self.in_circuit is None or self.n_edges == 0 else int(self.node_mask.sum())

    def nodes_in_circuit(self) -> list[str]:
        return [n for n, keep in zip(self.nodes, self.node_mask.tolist(), strict=True) if keep]

    def circuit_edges(self) -> list[tuple[str, float]]:
        """The circuit's edges as (name, score), highest |score| first."""
        mask = self._need_circuit()
        return self.top_edges(int(mask.sum()), in_circuit_only=True)

    def summary(self, n_top: int = 10) -> dict[str, Any]:
        """A JSON-ready digest for reports: sizes, top edges and nodes, and the metadata."""
        out: dict[str, Any] = {
            "n_real_edges": self.n_real_edges,
            "n_edges": self.n_edges,
            "n_nodes": self.n_nodes,
            "top_edges": self.top_edges(n_top),
            "top_nodes": self.top_nodes(n_top),
            **{k: v for k, v in self.meta.items() if k not in ("n_edges", "n_nodes")},
        }
        if self.in_circuit is not None:
            out["nodes"] = self.nodes_in_circuit()
        return out

    def __repr__(self) -> str:
        c = f", circuit: {self.n_edges} edges / {self.n_nodes} nodes" if self.in_circuit is not None else ""
        return (f"Graph({self.shape.n_layers} layers, {len(self.upstream)} upstream x {len(self.downstream)} "
                f"downstream, {self.n_real_edges} edges{c})")

    # ------------------------------------------------------------------ files
    def _header(self) -> dict[str, Any]:
        return {"format": _FORMAT, "shape": dataclasses.asdict(self.shape), "meta": self.meta}

    def to_json(self, path: str | os.PathLike | None = None) -> str:
        """Self-contained JSON: structure, all scores (row-major lists), and the circuit as edge names.

        Written atomically when a path is given. For big models `save` (safetensors) is smaller."""
        d = self._header()
        d["scores"] = self.scores.tolist()
        d["circuit"] = None if self.in_circuit is None else [
            self.edge_name(i, j) for i, j in self.in_circuit.nonzero().tolist()]
        text = json.dumps(d, sort_keys=True)
        if path is not None:
            from mechscope.fileio import atomic_write_bytes

            atomic_write_bytes(path, text.encode())
        return text

    @classmethod
    def from_json(cls, text_or_path: str | os.PathLike) -> Graph:
        """Read what to_json wrote (a JSON string, or the path of a file holding one)."""
        text = str(text_or_path)
        if not text.lstrip().startswith("{"):
            p = Path(text_or_path)
            if not p.is_file():
                raise InputError(f"No graph file at {p}.")
            text = p.read_text()
        try:
            d = json.loads(text)
            shape = cls._check_header(d, "JSON")
            g = cls(shape, torch.tensor(d["scores"], dtype=torch.float32), meta=d.get("meta"))
        except (ValueError, KeyError, TypeError) as e:
            raise CorruptFileError(f"Not a readable mechscope graph JSON: {e}") from e
        if d.get("circuit") is not None:
            mask = torch.zeros_like(g.real)
            for e in d["circuit"]:
                mask[g.edge_index(e)] = True
            g.in_circuit = mask
        return g

    @staticmethod
    def _check_header(d: dict[str, Any], what: str) -> GraphShape:
        if d.get("format") != _FORMAT:
            raise CorruptFileError(f"{what} is not a mechscope graph (format {d.get('format')!r}, want {_FORMAT!r}).")
        return GraphShape(**d["shape"])

    def save(self, path: str | os.PathLike) -> None:
        """One safetensors file: scores [U, V] float32, circuit [U, V] uint8 if any, JSON header in metadata."""
        from safetensors.torch import save as st_save

        from mechscope.fileio import atomic_write_bytes

        tensors = {"scores": self.scores.contiguous()}
        if self.in_circuit is not None:
            tensors["in_circuit"] = self.in_circuit.to(torch.uint8).contiguous()
        atomic_write_bytes(path, st_save(tensors, metadata={"graph": json.dumps(self._header(), sort_keys=True)}))

    @classmethod
    def load(cls, path: str | os.PathLike) -> Graph:
        from safetensors import safe_open

        if not Path(path).is_file():
            raise InputError(f"No graph file at {path}.")
        try:
            with safe_open(str(path), framework="pt") as f:
                header = json.loads((f.metadata() or {}).get("graph", "{}"))
                tensors = {k: f.get_tensor(k) for k in f.keys()}
        except Exception as e:  # safetensors raises its own error type on malformed files
            raise CorruptFileError(f"{path} is not a readable safetensors graph: {e}") from e
        shape = cls._check_header(header, str(path))
        circuit = tensors.get("in_circuit")
        return cls(shape, tensors["scores"], None if circuit is None else circuit.bool(), header.get("meta"))
