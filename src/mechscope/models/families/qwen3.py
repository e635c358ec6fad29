"""Qwen3: Llama layout plus RMSNorm over d_head on queries and keys (before rotary), as in HF.

q/k/v and o carry a bias only with `attention_bias`; sliding windows as in Qwen2.
"""

from __future__ import annotations

from mechscope.models.config import ModelConfig
from mechscope.models.families.llama import architecture, convert_weights, llama_like, qwen_windows

ARCHITECTURES = ("Qwen3ForCausalLM", "Qwen3Model")
MODEL_TYPES = ("qwen3",)
PREFIXES = ("model.",)
__all__ = ["ARCHITECTURES", "MODEL_TYPES", "PREFIXES", "convert_config", "convert_weights"]


def convert_config(h) -> ModelConfig:
    bias = bool(getattr(h, "attention_bias", False))
    window, types = qwen_windows(h)
    return llama_like(h, architecture(h, ARCHITECTURES), qkv_bias=bias, o_bias=bias, mlp_bias=False,
                      sliding_window=window, layer_types=types, qk_norm=True)
