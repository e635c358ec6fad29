"""One prompt's forward with its attention patterns and normalisation scales frozen: the model made linear.

    fp = freeze_prompt(model, tokens)                 # one forward; records patterns [H, T, S] and norm scales [T, 1]
    with model.hooks(fp.freeze_hooks()): model(tokens) # the same forward, patterns and scales fixed (interventions)
    g_pre = fp.attn_vjp(layer, g_mid)                  # [N, T', D] grads: residual after attention -> before it

Why here: attribution graphs (Ameisen et al. 2025) need the *direct* effect of what each MLP writes on what later
layers read, with attention patterns and norm scales held at their values on the prompt. Through those frozen maps
the residual stream is linear, so a target's gradient can be pushed down layer by layer. Autograd does this too,
but it also pushes zeros through the query/key projections and needs one graph per batch of targets; these
vector-Jacobian products touch only the value/output path (2 matmuls per layer) and accept a prefix of positions
(causal models: a target at position p has zero gradient after p), which makes attribution several times faster.
They use this model's weights and norms, so nothing outside models/ re-implements the forward.
Supported: pre-norm blocks (sequential or parallel attention/MLP), post-attention/-MLP norms (Gemma), MHA/GQA,
biases, sliding windows, q/k norms and attention soft-capping (all inside the frozen pattern). A final logit
soft-cap is not in these maps: attribution reads logits before it (circuits/graphs).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from mechscope.errors import UnsupportedArchitectureError
from mechscope.models.components import Norm


@dataclass
class FrozenPrompt:
    """Patterns and norm scales of one prompt's forward (batch 1), and the linear maps they define."""

    model: object  # HookedTransformer
    tokens: torch.Tensor  # [1, T]
    patterns: list[torch.Tensor] = field(default_factory=list)  # per layer [H, T, T] (float32)
    scales: dict[str, torch.Tensor] = field(default_factory=dict)  # norm module name -> [T, 1] divisor
    _ws: dict = field(default_factory=dict, repr=False)  # cache: (norm name, dtype) -> weight / scale [T, D]

    # ------------------------------------------------------------------ frozen forward
    def freeze_hooks(self) -> list:
        """Forward hooks that replace every attention pattern and norm scale by the recorded ones (for runs of
        the same prompt with edits elsewhere: interventions see a linear, frozen model). Positions beyond the
        recorded prompt are not supported (a typed error)."""
        def pattern(act, hook):
            layer = int(hook.name.split(".")[1])
            rec = self.patterns[layer].to(act.device, act.dtype)
            if act.shape[-2:] != rec.shape[-2:]:
                raise UnsupportedArchitectureError(
                    f"Frozen attention was recorded for {rec.shape[-1]} positions, this run has {act.shape[-1]}; "
                    "freeze_hooks only replays runs of the recorded prompt.")
            return rec.expand_as(act)

        def scale(act, hook):
            rec = self.scales[hook.name.removesuffix(".hook_scale")].to(act.device, act.dtype)
            return rec.expand_as(act) if act.shape[-2] == rec.shape[0] else act

        return [("blocks.*.attn.hook_pattern", pattern),
                (lambda n: n.endswith("hook_scale") and n.removesuffix(".hook_scale") in self.scales, scale)]

    # ------------------------------------------------------------------ vector-Jacobian products
    def norm_vjp(self, name: str, g: torch.Tensor) -> torch.Tensor:
        """Gradient through the norm `name` (e.g. 'blocks.3.ln2') with its scale frozen: g [N, T', D] at its output
        -> [N, T', D] at its input (a new tensor). LayerNorm also centres (a linear map)."""
        ws = self._weight_over_scale(name, g.dtype)[: g.shape[1]]  # [T', D]
        out = g * ws
        if self.model.get_submodule(name).kind == "LN":
            out -= out.mean(-1, keepdim=True)
        return out

    def norm_vjp_at(self, name: str, v: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        """norm_vjp of vectors v [n, D] that sit at single positions pos [n] (read vectors of targets)."""
        out = v * self._weight_over_scale(name, v.dtype)[pos.to(v.device)]
        if self.model.get_submodule(name).kind == "LN":
            out -= out.mean(-1, keepdim=True)
        return out

    def _weight_over_scale(self, name: str, dtype: torch.dtype) -> torch.Tensor:
        """[T, D] the norm weight divided by the frozen per-position scale (what a gradient is multiplied by)."""
        key = (name, dtype)
        if key not in self._ws:
            norm: Norm = self.model.get_submodule(name)
            s = self.scales[name].to(dtype)  # [T, 1]
            w = norm.w.detach().to(s.device, dtype) if norm.w is not None else torch.ones(norm.d, dtype=dtype)
            self._ws[key] = w / s
        return self._ws[key]

    def attn_vjp(self, layer: int, g: torch.Tensor) -> torch.Tensor:
        """Gradient through block `layer`'s attention sublayer (post-attention norm, output and value projections,
        frozen pattern, ln1): g [N, T', D] at what attention adds to the residual -> [N, T', D] at the residual it
        reads. T' <= T: the first T' positions only (exact for causal attention)."""
        m = self.model
        c = m.cfg
        blk = m.blocks[layer]
        N, Tp, D = g.shape
        if c.post_attn_norm:
            g = self.norm_vjp(f"blocks.{layer}.ln1_post", g)
        attn = blk.attn
        gz = (g.reshape(N * Tp, D) @ attn.o.weight.to(g.dtype)).view(N, Tp, c.n_heads, c.d_head)  # [N, T', H, E]
        A = self.patterns[layer][:, :Tp, :Tp].to(g.dtype)  # [H, T', S']
        gv = torch.einsum("hts,nthe->nshe", A, gz)  # [N, S', H, E]
        if c.n_kv_heads != c.n_heads:
            gv = gv.view(N, Tp, c.n_kv_heads, c.n_heads // c.n_kv_heads, c.d_head).sum(3)
        w_v = attn.qkv.weight[c.d_q + c.d_kv:].to(g.dtype)  # [K*E, D]
        gx = (gv.reshape(N * Tp, -1) @ w_v).view(N, Tp, D)
        return self.norm_vjp(f"blocks.{layer}.ln1", gx)


def check_linearizable(model) -> None:
    """UnsupportedArchitectureError, naming each reason, unless the model is a causal LM with pre-norm blocks and
    MLPs: what a frozen replacement model needs (an encoder has no next-token logits, and post-norm or an
    embedding norm puts a norm on the residual stream itself, so what blocks write no longer adds up)."""
    c = model.cfg
    reasons = [why for bad, why in (
        (not c.causal, "its attention is bidirectional (an encoder such as BERT, not a causal language model)"),
        (c.post_layernorm, "its blocks are post-norm (the residual stream itself is normalised after each block)"),
        (c.embed_norm, "it normalises the embeddings"),
        (c.attn_only, "it is attention-only (no MLPs for transcoders to replace)"),
        (not c.has_unembed, "it has no unembedding (no logits to explain)"),
    ) if bad]
    if reasons:
        raise UnsupportedArchitectureError(
            f"{c.architecture}: frozen-attention attribution is not possible because {'; '.join(reasons)}. "
            "Supported: causal decoders with pre-norm blocks and MLPs, sequential or parallel (GPT-2, "
            "Llama/SmolLM2/Mistral, Qwen2/Qwen3, NeoX, Gemma 1/2/3).")


def freeze_prompt(model, tokens: torch.Tensor, fwd_hooks: Sequence = ()) -> tuple[FrozenPrompt, torch.Tensor]:
    """Run `tokens` [1, T] once, recording each layer's attention pattern and every norm's scale; returns the
    record and the logits [1, T, V]. fwd_hooks: extra hooks for the same run (e.g. caching transcoder inputs)."""
    check_linearizable(model)
    fp = FrozenPrompt(model, tokens, [None] * model.cfg.n_layers)  # type: ignore[list-item]

    def rec_pattern(act, hook):
        fp.patterns[int(hook.name.split(".")[1])] = act[0].detach().float()

    def rec_scale(act, hook):
        fp.scales[hook.name.removesuffix(".hook_scale")] = act[0].detach().float()

    hooks = [("blocks.*.attn.hook_pattern", rec_pattern),
             (lambda n: n.endswith("hook_scale") and ".attn." not in n, rec_scale), *fwd_hooks]
    with torch.no_grad(), model.hooks(hooks):
        logits = model(tokens)
    return fp, logits
