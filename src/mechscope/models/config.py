"""ModelConfig: one dataclass that describes every supported family.

Converters (models/families/*.py) translate a Hugging Face config into this; the hooked
transformer reads nothing else. Saved as JSON next to processed weights.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from typing import Any, Literal

from mechscope.config_io import from_dict
from mechscope.errors import InputError

Act = Literal["gelu", "gelu_tanh", "gelu_new", "gelu_pytorch_tanh", "gelu_fast", "relu", "silu", "swish", "quick_gelu"]


@dataclass
class ModelConfig:
    # sizes
    d_model: int
    n_layers: int
    n_heads: int
    d_head: int
    d_mlp: int
    d_vocab: int
    n_ctx: int
    n_kv_heads: int | None = None  # None: same as n_heads (MHA); fewer: grouped-query attention

    # normalisation
    normalization: Literal["LN", "RMS"] = "LN"
    norm_eps: float = 1e-5
    post_layernorm: bool = False  # BERT: norm after each residual add instead of before each sublayer
    post_attn_norm: bool = False  # Gemma 2/3 "sandwich": norm on the attention output before the add
    post_mlp_norm: bool = False  # Gemma 2/3: norm on the MLP output before the add
    final_norm: bool = True
    qk_norm: bool = False  # Qwen3, Gemma 3: RMSNorm over d_head on queries and keys

    # positions
    positional: Literal["learned", "rotary", "none"] = "learned"
    rotary_dim: int | None = None  # partial rotary (NeoX): rotate only the first rotary_dim dims
    rope_theta: float = 10000.0
    rope_scaling: dict[str, Any] | None = None  # HF rope_parameters minus theta: linear, llama3, yarn
    rope_theta_local: float | None = None  # Gemma 3: sliding-window layers use another base
    rope_scaling_local: dict[str, Any] | None = None

    # attention
    causal: bool = True
    attn_bias: bool = False  # bias on q, k, v
    attn_out_bias: bool = False
    attn_scale: float | None = None  # multiplier on q.k; None: 1/sqrt(d_head)
    attn_softcap: float | None = None  # Gemma 2: tanh soft-capping of attention scores
    sliding_window: int | None = None
    layer_types: list[str] | None = None  # per layer "full" or "sliding"; None: all full

    # mlp
    act_fn: Act = "gelu"
    gated_mlp: bool = False  # Llama/Gemma: down(act(gate(x)) * up(x))
    mlp_bias: bool = False
    attn_only: bool = False  # no MLP sublayers (the toy models of Elhage et al. / our zoo)

    # residual and ends
    parallel_attn_mlp: bool = False  # NeoX/GPT-J: x + attn(ln1 x) + mlp(ln2 x)
    embed_scale: float | None = None  # Gemma: embeddings times sqrt(d_model)
    n_token_types: int = 0  # BERT segment embeddings
    embed_norm: bool = False  # BERT: LayerNorm right after the embeddings
    tie_word_embeddings: bool = False
    unembed_bias: bool = False
    final_softcap: float | None = None  # Gemma 2: tanh soft-capping of logits
    mlm_head: bool = False  # BERT masked-LM head: dense + act + LN before the unembedding
    has_unembed: bool = True  # False for bare encoders (hidden states only)

    # provenance
    architecture: str = "custom"
    model_name: str = "custom"
    dtype: str = "float32"
    processing: list[str] = field(default_factory=list)  # e.g. ["fold_ln", "center_writing_weights"]

    def __post_init__(self) -> None:
        if self.n_kv_heads is None:
            self.n_kv_heads = self.n_heads
        if self.n_heads % self.n_kv_heads:
            raise InputError(f"n_heads ({self.n_heads}) must be a multiple of n_kv_heads ({self.n_kv_heads}).")
        if self.positional == "rotary" and self.rotary_dim is None:
            self.rotary_dim = self.d_head
        if self.layer_types is not None and len(self.layer_types) != self.n_layers:
            raise InputError(f"layer_types has {len(self.layer_types)} entries for {self.n_layers} layers.")

    # convenience ---------------------------------------------------------------------------
    @property
    def d_q(self) -> int:
        return self.n_heads * self.d_head

    @property
    def d_kv(self) -> int:
        return self.n_kv_heads * self.d_head  # type: ignore[operator]

    def is_sliding(self, layer: int) -> bool:
        return self.sliding_window is not None and (
            self.layer_types is None or self.layer_types[layer] == "sliding"
        )

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ModelConfig:
        """Refuses unknown keys (InputError naming them); see mechscope.config_io.from_dict."""
        return from_dict(cls, d)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)
