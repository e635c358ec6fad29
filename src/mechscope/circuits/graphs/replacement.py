"""The local replacement model of one prompt (Ameisen et al. 2025, "Circuit Tracing", section 2).

    rm = ReplacementModel(model, ts, "The capital of France is")
    rm.logits()                                   # == model(tokens) (error nodes included), within float rounding
    rm.logits(edits={(3, 5, 1021): 0.0})          # feature 1021 of layer 3 at position 5 set to 0

Every MLP is replaced by its transcoder (TranscoderSet, per-layer or cross-layer) plus an *error node*: the
residual between the real MLP output on this prompt and the transcoders' reconstruction, held constant. With the
attention patterns and normalisation scales frozen at their values on the prompt (models.linearized), every
path between feature activations is linear, so direct effects between features (attribution.py) are exact and
interventions in this model move logits exactly as the graph predicts (intervene.py).
Position 0 (BOS) carries no feature or error node (as in circuit-tracer): what its MLPs write is a constant. Text
prompts get the tokenizer's BOS prepended (prepend_bos=None) when it has one, as circuit-tracer does.
Logits soft-capped by the model (Gemma 2: c tanh(l / c)) are not linear in the residual: logit nodes measure the
logit *before* the cap (as circuit-tracer, whose targets are read after the final norm); rm.logits(softcap=False)
returns those, the quantity the graph predicts exactly.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

from mechscope.errors import InputError
from mechscope.models.linearized import FrozenPrompt, check_linearizable, freeze_prompt


def _check_hooks(ts, model) -> None:
    ts.check_model(model)
    c = model.cfg
    for layer, (h_in, h_out) in enumerate(zip(ts.input_hooks, ts.output_hooks, strict=True)):
        ok_in = (f"blocks.{layer}.ln2.hook_normalized", f"blocks.{layer}.hook_resid_mid")
        if c.parallel_attn_mlp:
            ok_in = (f"blocks.{layer}.ln2.hook_normalized", f"blocks.{layer}.hook_resid_pre")
        if h_in not in ok_in or h_out != f"blocks.{layer}.hook_mlp_out":
            from mechscope.sae import TranscoderMismatchError

            raise TranscoderMismatchError(
                f"Attribution graphs need transcoders that read {' or '.join(ok_in)} and write "
                f"blocks.{layer}.hook_mlp_out (they replace the MLP); layer {layer} reads {h_in} and writes {h_out}.")


class ReplacementModel:
    """One prompt's local replacement model: recorded inputs, feature activations and error nodes."""

    def __init__(self, model, transcoders, prompt: str | torch.Tensor, *, zero_positions: int = 1,
                 max_prompt_tokens: int = 128, prepend_bos: bool | None = None) -> None:
        check_linearizable(model)  # the architecture first: a BERT must hear why, not that its hooks differ
        _check_hooks(transcoders, model)
        self.model, self.ts = model, transcoders
        if isinstance(prompt, str):
            if prepend_bos is None:  # as circuit-tracer: start with a special token, which gets no nodes
                prepend_bos = getattr(model.require_tokenizer(), "bos_token_id", None) is not None
            tokens = model.to_tokens(prompt, prepend_bos=prepend_bos)
            self.prompt = prompt
        else:
            tokens, _ = model.prepare(prompt)
            self.prompt = model.to_string(tokens[0]) if model.tokenizer is not None else ""
        if tokens.shape[0] != 1:
            raise InputError(f"An attribution graph explains one prompt; got a batch of {tokens.shape[0]}.")
        T = tokens.shape[1]
        if T > max_prompt_tokens:
            from mechscope.errors import ContextLengthError

            raise ContextLengthError(
                f"The prompt has {T} tokens, over the attribution budget of {max_prompt_tokens} (cost and memory "
                f"grow with tokens x active features); pass max_prompt_tokens={T} (or more) to raise it.")
        self.tokens = tokens  # [1, T]
        self.zero_positions = int(zero_positions)
        L = transcoders.n_layers
        ins: dict[str, torch.Tensor] = {}
        outs: dict[str, torch.Tensor] = {}

        def rec(store):
            def fn(act, hook):
                store[hook.name] = act[0].detach()
            return fn

        hooks = [(h, rec(ins)) for h in set(transcoders.input_hooks)] + [
            (h, rec(outs)) for h in set(transcoders.output_hooks)] + [("hook_embed", rec(outs))]
        self.frozen: FrozenPrompt
        self.frozen, logits = freeze_prompt(model, tokens, hooks)
        self.model_logits = logits[0].detach()  # [T, V]
        self.embed = outs["hook_embed"]  # [T, D]
        self.inputs = [ins[h] for h in transcoders.input_hooks]  # L x [T, d_in]
        self.mlp_out = [outs[h] for h in transcoders.output_hooks]  # L x [T, d_out]
        with torch.no_grad():
            self.acts = [self._encode(layer, self.inputs[layer]) for layer in range(L)]  # L x [T, n_l]
            recon = [transcoders.output(layer, self.acts, self.inputs[layer]).to(self.mlp_out[layer].dtype)
                     for layer in range(L)]
        self.errors = [o - r for o, r in zip(self.mlp_out, recon, strict=True)]  # L x [T, d_out] (exact residual)

    def _encode(self, layer: int, x: torch.Tensor) -> torch.Tensor:
        a = self.ts.encode(layer, x)
        if self.zero_positions:
            a = a.clone()
            a[..., : self.zero_positions, :] = 0
        return a

    @property
    def n_pos(self) -> int:
        return self.tokens.shape[1]

    def active(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(indices [F, 3] of (layer, pos, feature), activations [F]) of every active feature, in graph order."""
        idx, vals = [], []
        for layer, a in enumerate(self.acts):
            nz = a.nonzero()  # [F_l, 2] (pos, feature), row-major: by position then feature
            idx.append(torch.cat([torch.full((len(nz), 1), layer, dtype=torch.long), nz.cpu()], dim=1))
            vals.append(a[nz[:, 0], nz[:, 1]].float().cpu())
        return torch.cat(idx), torch.cat(vals)

    # ------------------------------------------------------------------ running the replacement
    @torch.no_grad()
    def logits(self, edits: Mapping[tuple[int, int, int], float] | None = None, *, freeze_features: bool = False,
               freeze_attention: bool = True, softcap: bool = True, return_acts: bool = False):
        """Logits [T, V] of the replacement model, with feature activations `edits` {(layer, pos, feature): value}
        set. Features are recomputed from the (edited) residual by the transcoders unless freeze_features (then
        every unedited feature keeps its activation on the prompt: the purely linear model the graph describes).
        freeze_attention=False lets attention patterns and norm scales respond (error nodes stay constant).
        softcap=False: the logits before the model's final soft-capping (what logit nodes measure; no-op without).
        return_acts: also return the per-layer activations [T, n_l] and transcoder inputs [T, d_in] of that run:
        (logits, acts, inputs)."""
        edits = dict(edits or {})
        L = self.ts.n_layers
        for (layer, pos, feat) in edits:
            if not (0 <= layer < L and 0 <= pos < self.n_pos and 0 <= feat < self.ts.n_features[layer]):
                raise InputError(f"Edit {(layer, pos, feat)} is outside layers 0..{L - 1}, positions "
                                 f"0..{self.n_pos - 1} or that layer's {self.ts.n_features[layer]} features.")
        acts: list[torch.Tensor | None] = [None] * L
        cur_in: dict[int, torch.Tensor] = {}

        def read(layer):
            def fn(act, hook):
                x = act[0]
                cur_in[layer] = x
                a = self.acts[layer].clone() if freeze_features else self._encode(layer, x)
                for (lay, pos, feat), v in edits.items():
                    if lay == layer:
                        a[pos, feat] = v
                acts[layer] = a
            return fn

        def write(layer):
            def fn(act, hook):
                out = self.ts.output(layer, acts, cur_in.get(layer)).to(act.dtype) + self.errors[layer]
                return out[None]
            return fn

        hooks = [(h, read(i)) for i, h in enumerate(self.ts.input_hooks)]
        hooks += [(h, write(i)) for i, h in enumerate(self.ts.output_hooks)]
        if freeze_attention:
            hooks = self.frozen.freeze_hooks() + hooks
        with self.model.hooks(hooks):
            resid = self.model(self.tokens, return_type="resid")  # [1, T, D] after the final norm
            out = self.model.head(resid, normalized=True, softcap=softcap)[0]
        if return_acts:
            return out, acts, [cur_in[i][0] if cur_in[i].dim() == 3 else cur_in[i] for i in range(L)]
        return out
