"""Llama, Mistral, Qwen2: RMSNorm, rotary (with scaling), GQA, gated SiLU MLP, separate q/k/v.

Differences: Mistral has no biases and (when `sliding_window` is set) a sliding window on every
layer; Qwen2 has a q/k/v bias and sliding windows on the layers `layer_types` names. Qwen3
(qwen3.py) reuses this module and adds q/k RMSNorm.
"""

from __future__ import annotations

from typing import Any

import torch

from mechscope.errors import UnsupportedArchitectureError
from mechscope.models.components import activation
from mechscope.models.config import ModelConfig
from mechscope.models.weights import Weights

ARCHITECTURES = ("LlamaForCausalLM", "LlamaModel", "MistralForCausalLM", "MistralModel",
                 "Qwen2ForCausalLM", "Qwen2Model")
MODEL_TYPES = ("llama", "mistral", "qwen2")
PREFIXES = ("model.",)
ROPE_TYPES = ("default", "linear", "llama3", "yarn")


def rope_config(h) -> tuple[float, dict[str, Any] | None, float]:
    """(theta, scaling dict for ModelConfig.rope_scaling or None, partial_rotary_factor).

    Reads transformers 5 `rope_parameters`, or transformers 4 `rope_theta` + `rope_scaling`.
    """
    p = dict(getattr(h, "rope_parameters", None) or getattr(h, "rope_scaling", None) or {})
    if any(isinstance(v, dict) for v in p.values()):
        raise UnsupportedArchitectureError(f"Per-layer-type rope_parameters ({sorted(p)}) are not supported.")
    kind = p.pop("rope_type", None) or p.get("type") or "default"
    p.pop("type", None)
    theta = p.pop("rope_theta", None) or getattr(h, "rope_theta", None) or getattr(h, "rotary_emb_base", 1e4)
    partial = (p.pop("partial_rotary_factor", None) or getattr(h, "partial_rotary_factor", None)
               or getattr(h, "rotary_pct", None) or 1.0)
    if kind not in ROPE_TYPES:
        raise UnsupportedArchitectureError(
            f"RoPE type {kind!r} is not supported; supported: {', '.join(ROPE_TYPES)}.")
    if kind in ("llama3", "yarn"):
        p.setdefault("original_max_position_embeddings", h.max_position_embeddings)
    if kind == "yarn" and p.get("factor") is None:  # as transformers: ratio of the two context lengths
        p["factor"] = h.max_position_embeddings / p["original_max_position_embeddings"]
    return float(theta), (None if kind == "default" else {"rope_type": kind, **p}), float(partial)


def architecture(h, known: tuple[str, ...]) -> str:
    """The HF class name: the first of `architectures` we handle, else the family's *ForCausalLM."""
    archs = list(getattr(h, "architectures", None) or [])
    if not archs:
        return f"{type(h).__name__.removesuffix('Config')}ForCausalLM"
    for a in archs:
        if a in known:
            return a
    raise UnsupportedArchitectureError(
        f"Architecture {archs} is not supported; supported: {', '.join(known)}.")


def llama_like(h, arch: str, *, qkv_bias: bool, o_bias: bool, mlp_bias: bool,
               sliding_window: int | None = None, layer_types: list[str] | None = None,
               qk_norm: bool = False) -> ModelConfig:
    """ModelConfig for a Llama-style HF config; the caller states the family's biases and windows."""
    activation(h.hidden_act)  # raises UnsupportedArchitectureError naming the activation
    theta, scaling, partial = rope_config(h)
    if partial != 1.0:
        raise UnsupportedArchitectureError(f"partial_rotary_factor={partial} is not supported for {arch}.")
    return ModelConfig(
        d_model=h.hidden_size, n_layers=h.num_hidden_layers, n_heads=h.num_attention_heads,
        d_head=getattr(h, "head_dim", None) or h.hidden_size // h.num_attention_heads,
        d_mlp=h.intermediate_size, d_vocab=h.vocab_size, n_ctx=h.max_position_embeddings,
        n_kv_heads=getattr(h, "num_key_value_heads", None) or h.num_attention_heads,
        normalization="RMS", norm_eps=h.rms_norm_eps, qk_norm=qk_norm,
        positional="rotary", rope_theta=theta, rope_scaling=scaling,
        attn_bias=qkv_bias, attn_out_bias=o_bias, sliding_window=sliding_window, layer_types=layer_types,
        act_fn=h.hidden_act, gated_mlp=True, mlp_bias=mlp_bias,
        tie_word_embeddings=bool(getattr(h, "tie_word_embeddings", False)),
        has_unembed=not arch.endswith("Model"), architecture=arch,
        model_name=getattr(h, "_name_or_path", "") or arch,
    )


def qwen_windows(h) -> tuple[int | None, list[str] | None]:
    """Qwen2/Qwen3: `sliding_window` only with `use_sliding_window`, on the "sliding_attention" layers."""
    window = h.sliding_window if getattr(h, "use_sliding_window", False) else None
    types = getattr(h, "layer_types", None) or [
        "sliding_attention" if window is not None and i >= h.max_window_layers else "full_attention"
        for i in range(h.num_hidden_layers)]
    unknown = set(types) - {"full_attention", "sliding_attention"}
    if unknown:
        raise UnsupportedArchitectureError(f"layer_types {sorted(unknown)} are not supported.")
    if window is None or "sliding_attention" not in types:
        return None, None
    return window, ["sliding" if t == "sliding_attention" else "full" for t in types]


def convert_config(h) -> ModelConfig:
    arch = architecture(h, ARCHITECTURES)
    if h.model_type == "mistral":  # no biases; transformers masks every layer when sliding_window is set
        return llama_like(h, arch, qkv_bias=False, o_bias=False, mlp_bias=False,
                          sliding_window=h.sliding_window)
    if h.model_type == "qwen2":  # q/k/v bias always, none on o_proj or the MLP
        window, types = qwen_windows(h)
        return llama_like(h, arch, qkv_bias=True, o_bias=False, mlp_bias=False,
                          sliding_window=window, layer_types=types)
    bias = bool(getattr(h, "attention_bias", False))
    return llama_like(h, arch, qkv_bias=bias, o_bias=bias, mlp_bias=bool(getattr(h, "mlp_bias", False)))


def convert_weights(cfg: ModelConfig, w: Weights) -> dict:
    out = {"embed.weight": w["embed_tokens.weight"], "ln_final.w": w["norm.weight"]}
    for layer in range(cfg.n_layers):
        p, q, a = f"layers.{layer}.", f"blocks.{layer}.", f"layers.{layer}.self_attn."
        out |= {
            q + "ln1.w": w[p + "input_layernorm.weight"],
            q + "ln2.w": w[p + "post_attention_layernorm.weight"],
            q + "attn.qkv.weight": torch.cat([w[a + f"{x}_proj.weight"] for x in "qkv"]),
            q + "attn.o.weight": w[a + "o_proj.weight"],
        }
        out |= {q + f"mlp.{x}.weight": w[p + f"mlp.{x}_proj.weight"] for x in ("up", "gate", "down")}
        if cfg.attn_bias:
            out[q + "attn.qkv.bias"] = torch.cat([w[a + f"{x}_proj.bias"] for x in "qkv"])
        if cfg.attn_out_bias:
            out[q + "attn.o.bias"] = w[a + "o_proj.bias"]
        if cfg.mlp_bias:
            out |= {q + f"mlp.{x}.bias": w[p + f"mlp.{x}_proj.bias"] for x in ("up", "gate", "down")}
        if cfg.qk_norm:
            out |= {q + "attn.q_norm.w": w[a + "q_norm.weight"], q + "attn.k_norm.w": w[a + "k_norm.weight"]}
    if cfg.has_unembed and not cfg.tie_word_embeddings:
        out["unembed.weight"] = w["lm_head.weight"]
    return out
