"""Gemma 1, 2 and 3 (text): RoPE, GQA, gated GELU MLP, RMSNorm with a (1 + w) weight, scaled embeddings.

Gemma 2 adds "sandwich" norms (a norm on each sublayer's output), attention and final logit
soft-capping, query_pre_attn_scalar and sliding-window attention on alternate layers; Gemma 3
adds q/k norms and its own RoPE base (and scaling) for the sliding-window layers. Gemma 3's HF
attention ignores attn_logit_softcapping, so we do too.
"""

from __future__ import annotations

import torch

from mechscope.errors import UnsupportedArchitectureError
from mechscope.models.config import ModelConfig
from mechscope.models.weights import Weights

ARCHITECTURES = ("GemmaForCausalLM", "Gemma2ForCausalLM", "Gemma3ForCausalLM")
MODEL_TYPES = ("gemma", "gemma2", "gemma3_text")
PREFIXES = ("model.",)

# model_type -> (architecture, activation attribute, sandwich norms, attention softcap, q/k norm + local rope)
GENERATIONS = {
    "gemma": ("GemmaForCausalLM", "hidden_act", False, False, False),
    "gemma2": ("Gemma2ForCausalLM", "hidden_activation", True, True, False),
    "gemma3_text": ("Gemma3ForCausalLM", "hidden_activation", True, False, True),
}
LAYER_TYPES = {"full_attention": "full", "sliding_attention": "sliding"}


def _rope(params: dict) -> tuple[float, dict | None]:
    """HF rope_parameters -> (theta, scaling without theta, or None for plain RoPE)."""
    rest = {k: v for k, v in params.items() if k != "rope_theta"}
    return params["rope_theta"], (rest if rest.get("rope_type", "default") != "default" else None)


def convert_config(h) -> ModelConfig:
    if h.model_type not in GENERATIONS:
        raise UnsupportedArchitectureError(
            f"Gemma model_type {h.model_type!r} is not supported (only {', '.join(GENERATIONS)}; "
            "multimodal Gemma 3 checkpoints are not)."
        )
    arch, act_attr, sandwich, attn_softcap, gen3 = GENERATIONS[h.model_type]
    if getattr(h, "use_bidirectional_attention", False):
        raise UnsupportedArchitectureError("Gemma option use_bidirectional_attention is not supported.")
    layer_types = None
    if getattr(h, "layer_types", None) is not None:
        unknown = set(h.layer_types) - set(LAYER_TYPES)
        if unknown:
            raise UnsupportedArchitectureError(f"Gemma layer types {sorted(unknown)} are not supported.")
        layer_types = [LAYER_TYPES[t] for t in h.layer_types]
    rope = h.rope_parameters
    theta, scaling = _rope(rope["full_attention"] if gen3 else rope)
    theta_local, scaling_local = _rope(rope["sliding_attention"]) if gen3 else (None, None)
    d_head = getattr(h, "head_dim", None) or h.hidden_size // h.num_attention_heads
    return ModelConfig(
        d_model=h.hidden_size, n_layers=h.num_hidden_layers, n_heads=h.num_attention_heads, d_head=d_head,
        d_mlp=h.intermediate_size, d_vocab=h.vocab_size, n_ctx=h.max_position_embeddings,
        n_kv_heads=h.num_key_value_heads, normalization="RMS", norm_eps=h.rms_norm_eps,
        post_attn_norm=sandwich, post_mlp_norm=sandwich, qk_norm=gen3,
        positional="rotary", rope_theta=theta, rope_scaling=scaling,
        rope_theta_local=theta_local, rope_scaling_local=scaling_local,
        attn_bias=h.attention_bias, attn_out_bias=h.attention_bias,
        attn_scale=h.query_pre_attn_scalar**-0.5 if sandwich else None,
        attn_softcap=h.attn_logit_softcapping if attn_softcap else None,
        sliding_window=getattr(h, "sliding_window", None) if layer_types else None, layer_types=layer_types,
        act_fn=getattr(h, act_attr), gated_mlp=True, embed_scale=h.hidden_size**0.5,
        tie_word_embeddings=h.tie_word_embeddings, final_softcap=getattr(h, "final_logit_softcapping", None),
        architecture=arch, model_name=getattr(h, "_name_or_path", "") or arch,
    )


def _norm(t: torch.Tensor) -> torch.Tensor:
    return t.float() + 1.0  # Gemma's RMSNorm multiplies by (1 + w); ours by w


def convert_weights(cfg: ModelConfig, w: Weights) -> dict:
    out = {"embed.weight": w["embed_tokens.weight"], "ln_final.w": _norm(w["norm.weight"])}
    # HF norm name -> ours: Gemma 1 has two pre-norms, Gemma 2/3 a pre- and a post-norm per sublayer
    norms = {"input_layernorm": "ln1", "post_attention_layernorm": "ln2"}
    if cfg.post_attn_norm:
        norms = {"input_layernorm": "ln1", "post_attention_layernorm": "ln1_post",
                 "pre_feedforward_layernorm": "ln2", "post_feedforward_layernorm": "ln2_post"}
    for layer in range(cfg.n_layers):
        p, q = f"layers.{layer}.", f"blocks.{layer}."
        a = p + "self_attn."
        out |= {q + ours + ".w": _norm(w[p + hf + ".weight"]) for hf, ours in norms.items()}
        out[q + "attn.qkv.weight"] = torch.cat([w[a + f"{x}_proj.weight"] for x in "qkv"])
        out[q + "attn.o.weight"] = w[a + "o_proj.weight"]
        if cfg.attn_bias:
            out[q + "attn.qkv.bias"] = torch.cat([w[a + f"{x}_proj.bias"] for x in "qkv"])
            out[q + "attn.o.bias"] = w[a + "o_proj.bias"]
        if cfg.qk_norm:
            out[q + "attn.q_norm.w"] = _norm(w[a + "q_norm.weight"])
            out[q + "attn.k_norm.w"] = _norm(w[a + "k_norm.weight"])
        for hf, ours in (("up_proj", "up"), ("gate_proj", "gate"), ("down_proj", "down")):
            out[q + f"mlp.{ours}.weight"] = w[p + f"mlp.{hf}.weight"]
    if not cfg.tie_word_embeddings:
        out["unembed.weight"] = w["lm_head.weight"]
    return out
