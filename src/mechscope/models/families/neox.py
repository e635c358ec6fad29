"""GPT-NeoX (Pythia): LayerNorm with bias, partial rotary, parallel (or sequential) residual.

HF stores q, k, v fused and interleaved per head: `query_key_value` rows are [H, 3, E]; we
de-interleave them to our rows q (H*E), k (H*E), v (H*E). The unembedding is `embed_out` in
checkpoints (`lm_head` in a transformers 5 model in memory).
"""

from __future__ import annotations

import torch

from mechscope.models.components import activation
from mechscope.models.config import ModelConfig
from mechscope.models.families.llama import architecture, rope_config
from mechscope.models.weights import Weights

ARCHITECTURES = ("GPTNeoXForCausalLM", "GPTNeoXModel")
MODEL_TYPES = ("gpt_neox",)
PREFIXES = ("gpt_neox.",)


def convert_config(h) -> ModelConfig:
    arch = architecture(h, ARCHITECTURES)
    activation(h.hidden_act)  # raises UnsupportedArchitectureError naming the activation
    theta, scaling, partial = rope_config(h)
    d_head = h.hidden_size // h.num_attention_heads
    bias = bool(getattr(h, "attention_bias", True))
    return ModelConfig(
        d_model=h.hidden_size, n_layers=h.num_hidden_layers, n_heads=h.num_attention_heads, d_head=d_head,
        d_mlp=h.intermediate_size, d_vocab=h.vocab_size, n_ctx=h.max_position_embeddings,
        normalization="LN", norm_eps=h.layer_norm_eps,
        positional="rotary", rotary_dim=int(d_head * partial), rope_theta=theta, rope_scaling=scaling,
        attn_bias=bias, attn_out_bias=bias, mlp_bias=True, act_fn=h.hidden_act,
        parallel_attn_mlp=bool(h.use_parallel_residual),
        tie_word_embeddings=bool(getattr(h, "tie_word_embeddings", False)),
        has_unembed=arch != "GPTNeoXModel", architecture=arch,
        model_name=getattr(h, "_name_or_path", "") or arch,
    )


def _qkv(t: torch.Tensor, n_heads: int) -> torch.Tensor:
    """[H*3*E, ...] laid out [H, 3, E] -> [3*H*E, ...] laid out [3, H, E] (q rows, then k, then v)."""
    return t.unflatten(0, (n_heads, 3, -1)).transpose(0, 1).reshape(t.shape)


def convert_weights(cfg: ModelConfig, w: Weights) -> dict:
    out = {"embed.weight": w["embed_in.weight"], "ln_final.w": w["final_layer_norm.weight"],
           "ln_final.b": w["final_layer_norm.bias"]}
    for layer in range(cfg.n_layers):
        p, q = f"layers.{layer}.", f"blocks.{layer}."
        out |= {
            q + "ln1.w": w[p + "input_layernorm.weight"], q + "ln1.b": w[p + "input_layernorm.bias"],
            q + "ln2.w": w[p + "post_attention_layernorm.weight"],
            q + "ln2.b": w[p + "post_attention_layernorm.bias"],
            q + "attn.qkv.weight": _qkv(w[p + "attention.query_key_value.weight"], cfg.n_heads),
            q + "attn.o.weight": w[p + "attention.dense.weight"],
            q + "mlp.up.weight": w[p + "mlp.dense_h_to_4h.weight"],
            q + "mlp.up.bias": w[p + "mlp.dense_h_to_4h.bias"],
            q + "mlp.down.weight": w[p + "mlp.dense_4h_to_h.weight"],
            q + "mlp.down.bias": w[p + "mlp.dense_4h_to_h.bias"],
        }
        if cfg.attn_bias:
            out[q + "attn.qkv.bias"] = _qkv(w[p + "attention.query_key_value.bias"], cfg.n_heads)
            out[q + "attn.o.bias"] = w[p + "attention.dense.bias"]
    if cfg.has_unembed and not cfg.tie_word_embeddings:
        out["unembed.weight"] = w["embed_out.weight"] if "embed_out.weight" in w else w["lm_head.weight"]
    return out
