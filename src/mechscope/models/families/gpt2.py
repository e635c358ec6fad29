"""GPT-2: learned positions, LayerNorm, fused qkv stored as Conv1D ([in, out], so transposed)."""

from __future__ import annotations

from mechscope.errors import UnsupportedArchitectureError
from mechscope.models.config import ModelConfig
from mechscope.models.weights import Weights

ARCHITECTURES = ("GPT2LMHeadModel", "GPT2Model")
MODEL_TYPES = ("gpt2",)
PREFIXES = ("transformer.",)


def convert_config(h) -> ModelConfig:
    if getattr(h, "scale_attn_by_inverse_layer_idx", False) or getattr(h, "reorder_and_upcast_attn", False):
        raise UnsupportedArchitectureError(
            "GPT-2 options scale_attn_by_inverse_layer_idx / reorder_and_upcast_attn are not supported."
        )
    return ModelConfig(
        d_model=h.n_embd, n_layers=h.n_layer, n_heads=h.n_head, d_head=h.n_embd // h.n_head,
        d_mlp=h.n_inner or 4 * h.n_embd, d_vocab=h.vocab_size, n_ctx=h.n_positions,
        normalization="LN", norm_eps=h.layer_norm_epsilon, positional="learned",
        attn_bias=True, attn_out_bias=True, mlp_bias=True, act_fn=h.activation_function,
        tie_word_embeddings=getattr(h, "tie_word_embeddings", True),
        architecture="GPT2LMHeadModel", model_name=getattr(h, "_name_or_path", "") or "gpt2",
    )


def convert_weights(cfg: ModelConfig, w: Weights) -> dict:
    out = {"embed.weight": w["wte.weight"], "pos_embed.weight": w["wpe.weight"]}
    for layer in range(cfg.n_layers):
        p, q = f"h.{layer}.", f"blocks.{layer}."
        out |= {
            q + "ln1.w": w[p + "ln_1.weight"], q + "ln1.b": w[p + "ln_1.bias"],
            q + "attn.qkv.weight": w[p + "attn.c_attn.weight"].T, q + "attn.qkv.bias": w[p + "attn.c_attn.bias"],
            q + "attn.o.weight": w[p + "attn.c_proj.weight"].T, q + "attn.o.bias": w[p + "attn.c_proj.bias"],
            q + "ln2.w": w[p + "ln_2.weight"], q + "ln2.b": w[p + "ln_2.bias"],
            q + "mlp.up.weight": w[p + "mlp.c_fc.weight"].T, q + "mlp.up.bias": w[p + "mlp.c_fc.bias"],
            q + "mlp.down.weight": w[p + "mlp.c_proj.weight"].T, q + "mlp.down.bias": w[p + "mlp.c_proj.bias"],
        }
    out |= {"ln_final.w": w["ln_f.weight"], "ln_final.b": w["ln_f.bias"]}
    if not cfg.tie_word_embeddings:
        out["unembed.weight"] = w["lm_head.weight"]
    return out
