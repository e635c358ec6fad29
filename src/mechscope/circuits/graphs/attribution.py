"""Attribution graphs: the direct effect of every active feature, error node and token embedding on every later
feature and on the top logits, in one prompt's local replacement model (Ameisen et al. 2025; circuit-tracer).

    g = attribute(model, "The capital of France is", ts)     # AttributionGraph (sparse adjacency)
    gp = prune(g)                                             # node 0.8 / edge 0.98 influence thresholds

Algorithm. Targets are logits (the demeaned unembedding column of each top token, read after the final norm at
the last position; tokens taken by probability until their sum reaches `desired_logit_prob`, at most
`max_n_logits`; with a final soft-cap (Gemma 2) the probabilities are the model's, from the capped logits, and the
node is the logit before the cap, the linear readout, as in circuit-tracer) and active features (their encoder
direction, read at the transcoder's input). Each target's read vector is pushed down the frozen, linear residual
stream (models.linearized: value/output paths with the prompt's attention patterns and norm scales) in batches of
targets; at every layer the batch gradient is contracted with what that layer's sources write there: activation
x decoder row (features), the error vector (error nodes), the token embedding (below layer 0). This equals
circuit-tracer's backward passes (same numbers), but it skips queries, keys and MLPs entirely, trims each batch
to the positions its targets can see (causal) and only carries the targets already injected, which is where the
speed comes from. Memory: the batch gradient [batch, pos, d_model] plus the rows of the adjacency;
`max_feature_nodes` bounds those rows and columns (features then enter in order of their influence on the
logits, re-ranked between batches, as circuit-tracer does).
"""

from __future__ import annotations

import time

import torch
from tqdm.auto import tqdm

from mechscope.circuits.graphs.graph import AttributionGraph, Node, node_id
from mechscope.circuits.graphs.prune import graph_scores, normalize_matrix
from mechscope.circuits.graphs.replacement import ReplacementModel
from mechscope.errors import InputError


def logit_targets(model, logits_last: torch.Tensor, max_n_logits: int, desired_logit_prob: float):
    """(token ids [k], probabilities [k], demeaned unembedding vectors [k, D]) of the top logits whose
    cumulative probability first reaches desired_logit_prob (at most max_n_logits). logits_last: the model's
    output (soft-capped if the model caps); the vectors read the residual after the final norm, before any cap."""
    probs = torch.softmax(logits_last.float(), dim=-1)
    top_p, top_i = probs.topk(min(max_n_logits, probs.shape[-1]))
    k = int(torch.searchsorted(top_p.cumsum(0), torch.tensor(desired_logit_prob))) + 1
    ids, p = top_i[:k], top_p[:k]
    W_U = model.W_U.detach().float()  # [D, V]
    vecs = (W_U[:, ids] - W_U.mean(dim=1, keepdim=True)).T  # [k, D]
    return ids, p, vecs


class _Sweep:
    """Pushes batches of target read-vectors down the frozen residual stream and collects edge rows."""

    def __init__(self, rm: ReplacementModel, feat_idx: torch.Tensor, feat_act: torch.Tensor, col_of: torch.Tensor,
                 n_cols: int, device, dtype=torch.float32) -> None:
        self.rm, self.dev, self.dt = rm, device, dtype
        ts, model = rm.ts, rm.model
        self.L, self.T, self.D = ts.n_layers, rm.n_pos, model.cfg.d_model
        self.parallel = model.cfg.parallel_attn_mlp
        self.n_cols = n_cols
        self.in_is_norm = [h.endswith("ln2.hook_normalized") for h in ts.input_hooks]
        # sources per destination layer, grouped by position: padded [T, F_max, D] vectors (activation x decoder)
        # and their columns (-1 = padding). Built lazily, kept while small.
        self.feat_idx, self.feat_act, self.col_of = feat_idx, feat_act, col_of
        self._src_cache: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        self._cache_bytes = 0
        n_feat = len(feat_idx)
        self.err_col0 = n_feat
        self.emb_col0 = n_feat + self.L * self.T
        self.errors = [e.to(device, dtype) for e in rm.errors]
        if rm.zero_positions:
            for e in self.errors:
                e[: rm.zero_positions] = 0
        self.embed = rm.embed.to(device, dtype)
        self.skip = ts.has_skip

    # ------------------------------------------------------------------ sources
    def _sources(self, dst: int) -> tuple[torch.Tensor, torch.Tensor] | None:
        if dst in self._src_cache:
            return self._src_cache[dst]
        ts = self.rm.ts
        vecs, cols, poss = [], [], []
        for src in range(dst + 1):
            W = ts.decoder(src, dst)
            if W is None:
                continue
            sel = (self.feat_idx[:, 0] == src) & (self.col_of >= 0)
            if not bool(sel.any()):
                continue
            f = self.feat_idx[sel]
            vecs.append(W.detach()[f[:, 2].to(W.device)].to(self.dev, self.dt) * self.feat_act[sel].to(self.dev, self.dt)[:, None])
            cols.append(self.col_of[sel])
            poss.append(f[:, 1])
        if not vecs:
            return None
        v, c, p = torch.cat(vecs), torch.cat(cols), torch.cat(poss)
        order = torch.argsort(p, stable=True)
        v, c, p = v[order], c[order], p[order]
        counts = torch.bincount(p, minlength=self.T)
        fmax = int(counts.max())
        slot = torch.arange(len(p)) - torch.repeat_interleave(counts.cumsum(0) - counts, counts)
        pad_v = torch.zeros(self.T, fmax, self.D, device=self.dev, dtype=self.dt)
        pad_c = torch.full((self.T, fmax), -1, dtype=torch.long)
        pad_v[p, slot] = v
        pad_c[p, slot] = c
        out = (pad_v, pad_c)
        size = pad_v.numel() * pad_v.element_size()
        if self._cache_bytes + size <= 128 * 2**20:  # keep up to 128 MiB of decoder rows between batches
            self._src_cache[dst] = out
            self._cache_bytes += size
        return out

    def _collect(self, rows: torch.Tensor, G: torch.Tensor, layer: int, n_live: int) -> None:
        """rows [n, n_cols] += direct effects of layer `layer`'s sources on the first n_live targets.
        G [n, P, D]: gradient at what layer `layer`'s MLP writes."""
        if n_live == 0:
            return
        g = G[:n_live]
        P = g.shape[1]
        src = self._sources(layer)
        if src is not None:
            pad_v, pad_c = src
            eff = torch.bmm(g.transpose(0, 1), pad_v[:P].transpose(1, 2))  # [P, n, F_max]
            valid = pad_c[:P] >= 0  # [P, F_max]
            p_i, s_i = valid.nonzero(as_tuple=True)
            rows[:n_live, pad_c[:P][p_i, s_i]] += eff[p_i.to(eff.device), :, s_i.to(eff.device)].T.to(rows.device)
        c0 = self.err_col0 + layer * self.T
        err = self.errors[layer][:P]
        for lo in range(0, n_live, 64):  # [rows, P]: error vector . gradient, 64 targets at a time
            e = (g[lo : lo + 64] * err).sum(-1)
            rows[lo : min(lo + 64, n_live), c0 : c0 + P] += e.to(rows.device)

    # ------------------------------------------------------------------ one batch
    def run(self, t_layer: torch.Tensor, t_pos: torch.Tensor, t_vec: torch.Tensor) -> torch.Tensor:
        """Edge rows [n, n_cols] of n targets: t_layer [n] (L = logit, read after the final norm), t_pos [n],
        t_vec [n, D] read vectors. Rows are returned in the given order."""
        fp = self.rm.frozen
        order = torch.argsort(t_layer, descending=True, stable=True)
        t_layer, t_pos, t_vec = t_layer[order], t_pos[order], self.resid_read(t_layer[order], t_pos[order],
                                                                              t_vec[order])
        n = len(order)
        P = int(t_pos.max()) + 1
        rows = torch.zeros(n, self.n_cols)
        G = torch.zeros(n, P, self.D, device=self.dev, dtype=self.dt)  # gradient at the residual, per target
        ar = torch.arange(n)
        top = int(t_layer.max())
        if top == self.L:  # logits: read after the final norm, above the last block
            m = t_layer == self.L
            G[ar[m], t_pos[m]] = t_vec[m]
            top = self.L - 1
        for layer in range(top, -1, -1):
            n_live = int((t_layer > layer).sum())  # rows sorted by layer desc: live rows are a prefix
            self._collect(rows, G, layer, n_live)
            m = t_layer == layer
            n_now = n_live + int(m.sum())
            if n_now == 0:
                continue
            a = self._attn_vjp(layer, G[:n_live]) if self.parallel and n_live else None
            if self.skip and n_live:  # the skip path is linear: the gradient flows through it to the MLP input
                skip = self._skip_vjp(layer, G[:n_live])
                G[:n_live] += fp.norm_vjp(f"blocks.{layer}.ln2", skip) if self.in_is_norm[layer] else skip
            if bool(m.any()):  # inject this layer's targets where their transcoder reads
                G[ar[n_live:n_now], t_pos[m]] += t_vec[m]
            if self.parallel:  # attention and MLP both read the residual before the block
                if a is not None:
                    G[:n_live] += a
            else:
                G[:n_now] += self._attn_vjp(layer, G[:n_now])
        # embeddings: what enters block 0
        e = torch.einsum("npd,pd->np", G, self.embed[:P])
        rows[:, self.emb_col0 : self.emb_col0 + P] += e.to(rows.device)
        out = torch.empty_like(rows)
        out[order] = rows
        return out

    def _attn_vjp(self, layer: int, g: torch.Tensor, rows: int = 64) -> torch.Tensor:
        """attn_vjp(layer, g), `rows` targets at a time (bounds the temporaries of a large batch)."""
        out = torch.empty_like(g)
        for lo in range(0, g.shape[0], rows):
            out[lo : lo + rows] = self.rm.frozen.attn_vjp(layer, g[lo : lo + rows])
        return out

    def resid_read(self, t_layer: torch.Tensor, t_pos: torch.Tensor, t_vec: torch.Tensor) -> torch.Tensor:
        """Read vectors [n, D] taken back through the frozen norm before them (ln2 for transcoder inputs read
        after it, ln_final for logits): what each target reads from the residual stream."""
        fp = self.rm.frozen
        out = t_vec.to(self.dev, self.dt).clone()
        for layer in t_layer.unique().tolist():
            m = t_layer == layer
            name = "ln_final" if layer == self.L else f"blocks.{layer}.ln2"
            if (layer == self.L and "ln_final" in fp.scales) or (layer < self.L and self.in_is_norm[layer]):
                out[m] = fp.norm_vjp_at(name, out[m], t_pos[m])
        return out

    def _skip_vjp(self, layer: int, g: torch.Tensor) -> torch.Tensor:
        with torch.enable_grad():
            x = torch.zeros(g.shape[0], g.shape[1], self.rm.ts.d_in[layer], device=self.dev, dtype=self.dt,
                            requires_grad=True)
            y = self.rm.ts.skip_out(layer, x)
            (gx,) = torch.autograd.grad(y, x, g.to(y.dtype))
        return gx.to(self.dt)


@torch.no_grad()
def attribute(model, prompt, transcoders, max_n_logits: int = 10, desired_logit_prob: float = 0.95,
              batch_size: int = 256, max_feature_nodes: int | None = None, device=None, *,
              max_prompt_tokens: int = 128, zero_positions: int = 1, update_interval: int = 4,
              verbose: bool = False) -> AttributionGraph:
    """The attribution graph of `prompt` (text or token ids [1, T]) through `transcoders` (a sae.TranscoderSet).

    max_n_logits / desired_logit_prob: which logits become nodes. batch_size: targets per batch (memory is about
    batch_size x pos x d_model floats). max_feature_nodes: cap on feature nodes (most influential first).
    device: where the sweep runs (default: the model's). max_prompt_tokens: the budget (a typed error above it).
    zero_positions: leading positions without feature/error nodes (BOS), as circuit-tracer."""
    if not isinstance(batch_size, int) or batch_size < 1:
        raise InputError(f"batch_size must be a positive int, got {batch_size!r}.")
    if not 0 < desired_logit_prob <= 1 or max_n_logits < 1:
        raise InputError("desired_logit_prob must be in (0, 1] and max_n_logits >= 1.")
    t0 = time.perf_counter()
    dev = torch.device(device) if device is not None else model.device
    rm = ReplacementModel(model, transcoders, prompt, zero_positions=zero_positions,
                          max_prompt_tokens=max_prompt_tokens)
    L, T = transcoders.n_layers, rm.n_pos
    feat_idx, feat_act = rm.active()
    n_active = len(feat_idx)
    n_sel = n_active if max_feature_nodes is None else min(int(max_feature_nodes), n_active)
    l_ids, l_probs, l_vecs = logit_targets(model, rm.model_logits[-1], max_n_logits, desired_logit_prob)
    n_logits = len(l_ids)

    # encoder read vectors of active features: [F, D] in the residual at the transcoder input
    enc = torch.empty(n_active, model.cfg.d_model)
    for layer in range(L):
        sel = feat_idx[:, 0] == layer
        if bool(sel.any()):
            W = transcoders.encoder(layer).detach()  # [d_in, n]
            enc[sel] = W[:, feat_idx[sel, 2].to(W.device)].T.float().cpu()

    # columns: selected features are decided as we go when capped; until then all active features have columns
    col_of = torch.arange(n_active)
    n_cols = n_active + L * T + T
    sweep = _Sweep(rm, feat_idx, feat_act, col_of, n_cols, dev)
    logit_rows = torch.cat([sweep.run(torch.full((len(ids),), L), torch.full((len(ids),), T - 1), vec)
                            for ids, vec in zip(l_ids.split(batch_size), l_vecs.split(batch_size), strict=True)])
    feat_rows = torch.zeros(n_sel, n_cols)
    visited = torch.zeros(n_active, dtype=torch.bool)
    order_done: list[torch.Tensor] = []
    bar = tqdm(total=n_sel, desc="attribution", disable=not verbose, leave=False)
    if n_sel == n_active:
        # every feature: batch by position, so each batch is trimmed to the positions it can see
        order = torch.argsort(feat_idx[:, 1] * (L + 1) + (L - feat_idx[:, 0]), stable=True)
        queue = list(order.split(batch_size))
        dynamic = False
    else:
        queue, dynamic = [], True
    done = 0
    while done < n_sel:
        if dynamic and not queue:
            inf = _partial_influence(logit_rows, feat_rows[:done], torch.cat(order_done) if order_done else
                                     torch.zeros(0, dtype=torch.long), l_probs, n_active)
            rank = torch.argsort(inf[:n_active], descending=True)
            pending = rank[~visited[rank]][: min(update_interval * batch_size, n_sel - done)]
            # within the queue, batch by position (each batch is trimmed to the positions it can see)
            pending = pending[torch.argsort(feat_idx[pending, 1] * (L + 1) + (L - feat_idx[pending, 0]), stable=True)]
            queue = list(pending.split(batch_size))
        idx = queue.pop(0)
        rows = sweep.run(feat_idx[idx, 0], feat_idx[idx, 1], enc[idx])
        feat_rows[done : done + len(idx)] = rows
        order_done.append(idx)
        visited[idx] = True
        done += len(idx)
        bar.update(len(idx))
    bar.close()
    done_idx = torch.cat(order_done) if order_done else torch.zeros(0, dtype=torch.long)
    sel_feats = torch.sort(done_idx).values  # selected features in graph order
    # assemble [features, errors, embeddings, logits] x same
    keep_cols = torch.cat([sel_feats, torch.arange(n_active, n_cols)])
    n_nodes = n_sel + L * T + T + n_logits
    adj = torch.zeros(n_nodes, n_nodes)
    pos_in_rows = torch.empty(n_active, dtype=torch.long)
    pos_in_rows[done_idx] = torch.arange(len(done_idx))
    adj[n_nodes - n_logits :, : n_nodes - n_logits] = logit_rows[:, keep_cols]
    del logit_rows, sweep
    feat_rows = feat_rows[:, keep_cols]  # columns first: the row matrix can be much wider than the graph
    adj[:n_sel, : n_nodes - n_logits] = feat_rows[pos_in_rows[sel_feats]]
    del feat_rows
    nodes = _nodes(rm, feat_idx[sel_feats], feat_act[sel_feats], l_ids, l_probs, L)
    tok = model.tokenizer
    g = AttributionGraph(
        prompt=rm.prompt,
        tokens=[tok.decode([t]) for t in rm.tokens[0].tolist()] if tok is not None else [str(t) for t in
                                                                                          rm.tokens[0].tolist()],
        input_ids=rm.tokens[0].tolist(), model_name=model.cfg.model_name, model_identity=_identity(model),
        nodes=nodes, adjacency=adj, n_layers=L,
        settings={"max_n_logits": max_n_logits, "desired_logit_prob": desired_logit_prob, "batch_size": batch_size,
                  "max_feature_nodes": max_feature_nodes, "n_active_features": n_active,
                  "zero_positions": zero_positions, "transcoders": {
                      "n_layers": L, "cross_layer": bool(transcoders.cross_layer),
                      "has_skip": bool(transcoders.has_skip), "n_features": list(transcoders.n_features),
                      "input_hooks": list(transcoders.input_hooks), "output_hooks": list(transcoders.output_hooks)}},
    )
    g.scores = graph_scores(g)
    g.adjacency = adj.to_sparse()
    g.settings["time_s"] = time.perf_counter() - t0
    return g


def _partial_influence(logit_rows, feat_rows, feat_ids, l_probs, n_active, chunk: int = 512):
    """Influence on the logits of every column given the rows computed so far (circuit-tracer's ranking).
    Rows are normalised chunk by chunk, so this needs no copy of the (large) row matrix."""
    n_cols = logit_rows.shape[1]
    row_of = torch.full((n_cols,), -1, dtype=torch.long)
    row_of[feat_ids] = torch.arange(len(feat_ids))
    has = row_of[:n_active] >= 0

    def step(w_feat: torch.Tensor, w_logit: torch.Tensor) -> torch.Tensor:  # w @ normalise(|rows|)
        out = w_logit @ normalize_matrix(logit_rows)
        for lo in range(0, len(feat_rows), chunk):
            out += w_feat[lo : lo + chunk] @ normalize_matrix(feat_rows[lo : lo + chunk])
        return out

    total = torch.zeros(n_cols)
    vec = step(torch.zeros(len(feat_rows)), l_probs.float())
    for _ in range(256):
        if not bool(vec.any()):
            break
        total += vec
        w = torch.zeros(len(feat_rows))
        w[row_of[:n_active][has]] = vec[:n_active][has]
        vec = step(w, torch.zeros(len(logit_rows)))
    return total


def _nodes(rm, feats, acts, l_ids, l_probs, L) -> list[Node]:
    tok = rm.model.tokenizer
    ids = rm.tokens[0].tolist()
    T = len(ids)

    def dec(t):
        return tok.decode([t]) if tok is not None else str(t)

    nodes = [Node("feature", int(la), int(p), int(f), float(a), node_id=node_id("feature", int(la), int(p), int(f)))
             for (la, p, f), a in zip(feats.tolist(), acts.tolist(), strict=True)]
    nodes += [Node("error", la, p, node_id=node_id("error", la, p)) for la in range(L) for p in range(T)]
    nodes += [Node("embedding", None, p, token=dec(t), token_id=t, node_id=node_id("embedding", None, p, token_id=t))
              for p, t in enumerate(ids)]
    nodes += [Node("logit", L, T - 1, token=dec(int(t)), prob=float(pr), token_id=int(t),
                   node_id=node_id("logit", L, T - 1, token_id=int(t), n_layers=L))
              for t, pr in zip(l_ids.tolist(), l_probs.tolist(), strict=True)]
    return nodes


def _identity(model) -> dict:
    try:
        from mechscope.models import model_identity

        return dict(model_identity(model))
    except Exception:  # identity is informative only; never fail a graph on it
        return {"model_name": model.cfg.model_name}
