"""BERT encoders: post-LN blocks, bidirectional attention, learned positions from 0, token types.

`BertForMaskedLM` keeps the MLM head (dense, activation, LayerNorm, then the decoder tied to the
word embeddings plus a bias); `BertModel` (e.g. all-MiniLM-L6-v2) and any other `bert` model
load as the bare encoder, returning hidden states (`return_type="resid"`); pooler and task
heads are not loaded.
"""

from __future__ import annotations

import torch

from mechscope.errors import UnsupportedArchitectureError
from mechscope.models.config import ModelConfig
from mechscope.models.weights import Weights

ARCHITECTURES = ("BertForMaskedLM", "BertModel")
MODEL_TYPES = ("bert",)
PREFIXES = ("bert.",)


def convert_config(h) -> ModelConfig:
    problems = [o for o in ("is_decoder", "add_cross_attention") if getattr(h, o, False)]
    if getattr(h, "position_embedding_type", "absolute") != "absolute":
        problems.append(f"position_embedding_type={h.position_embedding_type!r}")
    if not isinstance(h.hidden_act, str):
        problems.append("a non-string hidden_act")
    if problems:
        raise UnsupportedArchitectureError(f"BERT options not supported: {', '.join(problems)}.")
    mlm = "BertForMaskedLM" in (getattr(h, "architectures", None) or [])
    return ModelConfig(
        d_model=h.hidden_size, n_layers=h.num_hidden_layers, n_heads=h.num_attention_heads,
        d_head=h.hidden_size // h.num_attention_heads, d_mlp=h.intermediate_size, d_vocab=h.vocab_size,
        n_ctx=h.max_position_embeddings, normalization="LN", norm_eps=h.layer_norm_eps,
        post_layernorm=True, final_norm=False, positional="learned", causal=False,
        attn_bias=True, attn_out_bias=True, mlp_bias=True, act_fn=h.hidden_act,
        n_token_types=h.type_vocab_size, embed_norm=True,
        tie_word_embeddings=mlm and getattr(h, "tie_word_embeddings", True),
        unembed_bias=mlm, mlm_head=mlm, has_unembed=mlm,
        architecture="BertForMaskedLM" if mlm else "BertModel",
        model_name=getattr(h, "_name_or_path", "") or "bert",
    )


def _ln(w: Weights, prefix: str) -> tuple[torch.Tensor, torch.Tensor]:
    """A LayerNorm's (weight, bias); old TF-converted checkpoints call them gamma and beta."""
    if prefix + "weight" in w:
        return w[prefix + "weight"], w[prefix + "bias"]
    return w[prefix + "gamma"], w[prefix + "beta"]


def convert_weights(cfg: ModelConfig, w: Weights) -> dict:
    e = "embeddings."
    out = {
        "embed.weight": w[e + "word_embeddings.weight"],
        "pos_embed.weight": w[e + "position_embeddings.weight"],
        "token_type_embed.weight": w[e + "token_type_embeddings.weight"],
    }
    out["embed_ln.w"], out["embed_ln.b"] = _ln(w, e + "LayerNorm.")
    for layer in range(cfg.n_layers):
        p, q = f"encoder.layer.{layer}.", f"blocks.{layer}."
        s = p + "attention.self."
        out |= {
            q + "attn.qkv.weight": torch.cat([w[s + f"{x}.weight"] for x in ("query", "key", "value")]),
            q + "attn.qkv.bias": torch.cat([w[s + f"{x}.bias"] for x in ("query", "key", "value")]),
            q + "attn.o.weight": w[p + "attention.output.dense.weight"],
            q + "attn.o.bias": w[p + "attention.output.dense.bias"],
            q + "mlp.up.weight": w[p + "intermediate.dense.weight"], q + "mlp.up.bias": w[p + "intermediate.dense.bias"],
            q + "mlp.down.weight": w[p + "output.dense.weight"], q + "mlp.down.bias": w[p + "output.dense.bias"],
        }
        out[q + "ln1.w"], out[q + "ln1.b"] = _ln(w, p + "attention.output.LayerNorm.")  # after attention + residual
        out[q + "ln2.w"], out[q + "ln2.b"] = _ln(w, p + "output.LayerNorm.")  # after MLP + residual
    if cfg.mlm_head:
        c = "cls.predictions."
        out["mlm_head.dense.weight"] = w[c + "transform.dense.weight"]
        out["mlm_head.dense.bias"] = w[c + "transform.dense.bias"]
        out["mlm_head.ln.w"], out["mlm_head.ln.b"] = _ln(w, c + "transform.LayerNorm.")
        # the decoder's own bias is what HF adds; it is tied to (so saved only as) cls.predictions.bias
        # unless tie_word_embeddings is False
        out["unembed.bias"] = w[c + "decoder.bias"] if c + "decoder.bias" in w else w[c + "bias"]
        if not cfg.tie_word_embeddings:
            out["unembed.weight"] = w[c + "decoder.weight"]
    return out
