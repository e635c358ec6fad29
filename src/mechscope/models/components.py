"""Building blocks of the hooked transformer: norms, rotary, attention, MLP, block, embed/unembed.

Weights are stored in nn.Linear layout (out_features, in_features) so every projection is one
F.linear with no copies; TransformerLens-shaped views (W_Q [head, d_model, d_head], W_O
[head, d_head, d_model], W_in [d_model, d_mlp], ...) are properties that share storage, so
in-place edits through them change the model.
Shapes: B batch, T query positions, S key positions, H heads, K kv heads, E d_head, D d_model.
"""

from __future__ import annotations

import functools
import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from mechscope.errors import UnsupportedArchitectureError
from mechscope.models.config import ModelConfig
from mechscope.models.hooks import HookPoint

# --------------------------------------------------------------------------- activations


def _gelu_new(x: torch.Tensor) -> torch.Tensor:  # GPT-2's tanh approximation, fused
    return F.gelu(x, approximate="tanh")


def _quick_gelu(x: torch.Tensor) -> torch.Tensor:
    return x * torch.sigmoid(1.702 * x)


ACTIVATIONS = {
    "gelu": F.gelu,
    "gelu_new": _gelu_new,
    "gelu_tanh": _gelu_new,
    "gelu_fast": _gelu_new,
    "gelu_pytorch_tanh": _gelu_new,
    "relu": F.relu,
    "silu": F.silu,
    "swish": F.silu,
    "quick_gelu": _quick_gelu,
}


def activation(name: str):
    try:
        return ACTIVATIONS[name]
    except KeyError:
        raise UnsupportedArchitectureError(
            f"Unsupported activation {name!r}; supported: {sorted(ACTIVATIONS)}."
        ) from None


# --------------------------------------------------------------------------- norms


class Norm(nn.Module):
    """LayerNorm or RMSNorm over the last dim, with hook_scale and hook_normalized.

    After fold_ln the weight (and bias) are folded into the next layer: `w` becomes None and
    the norm only centres and scales (TransformerLens's LNPre/RMSPre).
    """

    def __init__(self, d: int, kind: str, eps: float, bias: bool | None = None) -> None:
        super().__init__()
        self.kind, self.eps, self.d = kind, eps, d
        self.w: nn.Parameter | None = nn.Parameter(torch.ones(d))
        use_bias = (kind == "LN") if bias is None else bias
        self.b: nn.Parameter | None = nn.Parameter(torch.zeros(d)) if use_bias else None
        self.hook_scale = HookPoint()  # [..., 1] the divisor: std (LN) or rms (RMS)
        self.hook_normalized = HookPoint()  # [..., d]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.hook_scale.active:
            return self._explicit(x)
        return self.forward_unhooked_scale(x)

    def _explicit(self, x: torch.Tensor) -> torch.Tensor:
        """hook_scale is hooked: expose the divisor; if a hook replaced it, normalise by the new one.

        The read-only case (caching every hook) costs one fused norm: LayerNorm's kernel returns the rstd it
        used, and RMSNorm computes its rsqrt once, so the output is bit-identical to the unhooked path."""
        ln = self.kind == "LN"
        w = None if self.w is None else self.w.to(x.dtype)
        b = None if self.b is None else self.b.to(x.dtype)
        if ln:
            y, _, rstd = torch.native_layer_norm(x, (self.d,), w, b, self.eps)
            rstd = rstd.float()
        else:
            rstd = torch.rsqrt(x.float().pow(2).mean(-1, keepdim=True) + self.eps)
            y = self._affine((x.float() * rstd).to(x.dtype), w, b)
        if ln and torch.is_grad_enabled() and x.requires_grad:  # a scale gradients flow through
            scale = (torch.var(x.float(), dim=-1, keepdim=True, correction=0) + self.eps).sqrt()
        else:
            scale = rstd.reciprocal()  # [..., 1] small, so keeping a copy to detect edits is cheap
        before = scale.clone()
        new_scale = self.hook_scale(scale)
        if new_scale is scale and torch.equal(scale, before):  # only read: y stands
            return self.hook_normalized(y)
        xf = x.float()  # the mean again, differentiably (the fused kernel's mean/rstd carry no gradient)
        y = xf - xf.mean(-1, keepdim=True) if ln else xf
        return self.hook_normalized(self._affine((y / new_scale).to(x.dtype), w, b))

    @staticmethod
    def _affine(y: torch.Tensor, w: torch.Tensor | None, b: torch.Tensor | None) -> torch.Tensor:
        if w is not None:
            y = y * w
        return y if b is None else y + b

    def forward_unhooked_scale(self, x: torch.Tensor) -> torch.Tensor:
        return self.hook_normalized(self.normalize(x))

    def normalize(self, x: torch.Tensor) -> torch.Tensor:
        """The norm's maths without its hook points, in x's dtype (weights cast to it when they differ).

        The one implementation: forward uses it, and so do analyses that must apply a norm from inside a hook
        on that very norm (attribution), or to a residual of another dtype (lenses decode float32 residuals).
        RMSNorm is computed in float32 like HF, then cast back before the weight (Llama convention)."""
        w = None if self.w is None else self.w.to(x.dtype)
        b = None if self.b is None else self.b.to(x.dtype)
        if self.kind == "LN":
            return F.layer_norm(x, (self.d,), w, b, self.eps)
        xf = x.float()
        return self._affine((xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)).to(x.dtype), w, b)


# --------------------------------------------------------------------------- rotary


def rope_inv_freq(dim: int, theta: float, scaling: dict[str, Any] | None) -> tuple[torch.Tensor, float]:
    """Inverse frequencies and the cos/sin multiplier, matching transformers' rope types."""
    with torch.device("cpu"):  # real numbers even while the model is built on the meta device
        return _rope_inv_freq(dim, theta, scaling)


def _rope_inv_freq(dim: int, theta: float, scaling: dict[str, Any] | None) -> tuple[torch.Tensor, float]:
    inv = 1.0 / (theta ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim))
    kind = (scaling or {}).get("rope_type", "default")
    if kind == "default":
        return inv, 1.0
    s = scaling or {}
    if kind == "linear":
        return inv / s["factor"], 1.0
    if kind == "llama3":
        factor, lo, hi = s["factor"], s["low_freq_factor"], s["high_freq_factor"]
        old = s["original_max_position_embeddings"]
        wavelen = 2 * math.pi / inv
        out = torch.where(wavelen > old / lo, inv / factor, inv)
        smooth = (old / wavelen - lo) / (hi - lo)
        smoothed = (1 - smooth) * out / factor + smooth * out
        medium = ~(wavelen < old / hi) * ~(wavelen > old / lo)
        return torch.where(medium, smoothed, out), 1.0
    if kind == "yarn":
        return _yarn(dim, theta, s)
    raise UnsupportedArchitectureError(
        f"RoPE scaling type {kind!r} is not supported; supported: default, linear, llama3, yarn."
    )


def _yarn(dim: int, base: float, s: dict[str, Any]) -> tuple[torch.Tensor, float]:
    factor, orig = s["factor"], s["original_max_position_embeddings"]

    def mscale(scale: float, m: float = 1.0) -> float:
        return 1.0 if scale <= 1 else 0.1 * m * math.log(scale) + 1.0

    att = s.get("attention_factor")
    if att is None:
        m, m_all = s.get("mscale"), s.get("mscale_all_dim")
        att = mscale(factor, m) / mscale(factor, m_all) if (m and m_all) else mscale(factor)
    beta_fast, beta_slow = s.get("beta_fast") or 32, s.get("beta_slow") or 1

    def corr_dim(n_rot: float) -> float:
        return (dim * math.log(orig / (n_rot * 2 * math.pi))) / (2 * math.log(base))

    low, high = corr_dim(beta_fast), corr_dim(beta_slow)
    if s.get("truncate", True):
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001
    ramp = torch.clamp((torch.arange(dim // 2, dtype=torch.float32) - low) / (high - low), 0, 1)
    pos_freqs = base ** (torch.arange(0, dim, 2).float() / dim)
    extra = 1 - ramp
    inv = (1.0 / (factor * pos_freqs)) * (1 - extra) + (1.0 / pos_freqs) * extra
    return inv, float(att)


class Rotary(nn.Module):
    """Computes (cos, sin) for given positions once per forward; shared by the layers using it."""

    def __init__(self, dim: int, theta: float, scaling: dict[str, Any] | None) -> None:
        super().__init__()
        self.dim, self.theta, self.scaling = dim, theta, scaling
        inv, self.attention_scaling = rope_inv_freq(dim, theta, scaling)
        self.register_buffer("inv_freq", inv, persistent=False)

    def reset(self, device: torch.device | str) -> None:
        """Recompute inv_freq (it is derived, not saved), e.g. after building on the meta device."""
        inv, self.attention_scaling = rope_inv_freq(self.dim, self.theta, self.scaling)
        self.inv_freq = inv.to(device)

    def forward(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        # positions [B, T] -> cos, sin [B, T, 1, rot_dim], computed in float32
        freqs = positions[..., None].float() * self.inv_freq.float()
        emb = torch.cat((freqs, freqs), dim=-1)
        cos, sin = emb.cos() * self.attention_scaling, emb.sin() * self.attention_scaling
        return cos[:, :, None, :].to(dtype), sin[:, :, None, :].to(dtype)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate-half RoPE on the first cos.shape[-1] dims of x [B, T, H, E]."""
    rd = cos.shape[-1]
    rot, rest = (x, None) if rd == x.shape[-1] else (x[..., :rd], x[..., rd:])
    x1, x2 = rot[..., : rd // 2], rot[..., rd // 2 :]
    out = rot * cos + torch.cat((-x2, x1), dim=-1) * sin
    return out if rest is None else torch.cat((out, rest), dim=-1)


# --------------------------------------------------------------------------- attention


class KVCache:
    """Pre-allocated keys/values for generation: [B, max_len, K, E] per layer."""

    def __init__(self, cfg: ModelConfig, batch: int, max_len: int, device, dtype) -> None:
        shape = (batch, max_len, cfg.n_kv_heads, cfg.d_head)
        self.k = [torch.empty(shape, device=device, dtype=dtype) for _ in range(cfg.n_layers)]
        self.v = [torch.empty(shape, device=device, dtype=dtype) for _ in range(cfg.n_layers)]
        self.length = 0  # positions already stored (same for every layer once a step ends)
        self.max_len = max_len

    def append(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        end = self.length + k.shape[1]
        self.k[layer][:, self.length : end] = k
        self.v[layer][:, self.length : end] = v
        return self.k[layer][:, :end], self.v[layer][:, :end]

    def select(self, index: torch.Tensor) -> None:
        """Keep only the batch rows in `index` (e.g. finished sequences dropped)."""
        self.k = [t[index] for t in self.k]
        self.v = [t[index] for t in self.v]


class KVRecorder:
    """Stands in for a KVCache in a full run: records each layer's keys/values [B, T, K, E] as attention uses
    them, so later runs of the same prompts can start at a position p0 (see KVPrefix)."""

    def __init__(self, n_layers: int) -> None:
        self.k: list[torch.Tensor] = [torch.empty(0)] * n_layers
        self.v: list[torch.Tensor] = [torch.empty(0)] * n_layers

    def append(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        self.k[layer], self.v[layer] = k, v
        return k, v


class KVPrefix:
    """Stands in for a KVCache when copies of B recorded prompts are run again from position p0: prepends the
    recorded keys/values of positions < p0 (the same for every copy) to those computed for positions >= p0.
    Rows are copy-major (row = copy * B + prompt), as activation patching batches them."""

    def __init__(self, recorded: KVRecorder, p0: int) -> None:
        self.k, self.v, self.p0 = recorded.k, recorded.v, p0

    def _cat(self, prefix: torch.Tensor, new: torch.Tensor) -> torch.Tensor:
        B = prefix.shape[0]
        R, Tn = new.shape[:2]
        out = new.new_empty((R, self.p0 + Tn, *new.shape[2:]))
        out.view(R // B, B, *out.shape[1:])[:, :, : self.p0] = prefix[:, : self.p0]
        out[:, self.p0 :] = new
        return out

    def append(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self._cat(self.k[layer], k), self._cat(self.v[layer], v)


@functools.lru_cache(maxsize=8)
def causal_blocked(T: int, S: int, device: torch.device) -> torch.Tensor:  # [T, S] bool, True = masked out
    """The future keys each of the last T of S positions may not see; made once per shape, shared by every
    layer (eager attention runs when scores or patterns are hooked: building it per layer cost ~1% of a
    cache-everything forward). Read-only: callers must never write to it."""
    return torch.ones(T, S, dtype=torch.bool, device=device).triu(S - T + 1)


class Attention(nn.Module):
    """Multi-head / grouped-query attention. Runs SDPA unless scores or pattern are hooked."""

    def __init__(self, cfg: ModelConfig, layer: int) -> None:
        super().__init__()
        self.cfg, self.layer = cfg, layer
        D, H, K, E = cfg.d_model, cfg.n_heads, cfg.n_kv_heads, cfg.d_head
        self.qkv = nn.Linear(D, (H + 2 * K) * E, bias=cfg.attn_bias)
        self.o = nn.Linear(H * E, D, bias=cfg.attn_out_bias)
        self.scale = cfg.attn_scale if cfg.attn_scale is not None else 1.0 / math.sqrt(E)
        self.sliding = cfg.is_sliding(layer)
        self.hook_q = HookPoint()  # [B, T, H, E]
        self.hook_k = HookPoint()  # [B, S, K, E]
        self.hook_v = HookPoint()  # [B, S, K, E]
        if cfg.qk_norm:
            self.q_norm = Norm(E, "RMS", cfg.norm_eps)
            self.k_norm = Norm(E, "RMS", cfg.norm_eps)
        if cfg.positional == "rotary":
            self.hook_rot_q = HookPoint()  # [B, T, H, E]
            self.hook_rot_k = HookPoint()  # [B, S, K, E]
        self.hook_attn_scores = HookPoint()  # [B, H, T, S] after scaling/soft-capping and masking
        self.hook_pattern = HookPoint()  # [B, H, T, S]
        self.hook_z = HookPoint()  # [B, T, H, E]
        self.hook_result = HookPoint()  # [B, T, H, D] per-head output; computed only when hooked

    # TransformerLens-shaped views -------------------------------------------------------
    def _split(self, t: torch.Tensor):
        c = self.cfg
        return t.split([c.d_q, c.d_kv, c.d_kv], dim=0)

    @property
    def W_Q(self) -> torch.Tensor:  # [H, D, E]
        return self._split(self.qkv.weight)[0].view(self.cfg.n_heads, self.cfg.d_head, -1).transpose(1, 2)

    @property
    def W_K(self) -> torch.Tensor:  # [K, D, E]
        return self._split(self.qkv.weight)[1].view(self.cfg.n_kv_heads, self.cfg.d_head, -1).transpose(1, 2)

    @property
    def W_V(self) -> torch.Tensor:  # [K, D, E]
        return self._split(self.qkv.weight)[2].view(self.cfg.n_kv_heads, self.cfg.d_head, -1).transpose(1, 2)

    def _bias(self, i: int, n: int) -> torch.Tensor:
        if self.qkv.bias is None:
            return torch.zeros(n, self.cfg.d_head, device=self.qkv.weight.device, dtype=self.qkv.weight.dtype)
        return self._split(self.qkv.bias)[i].view(n, self.cfg.d_head)

    @property
    def b_Q(self) -> torch.Tensor:  # [H, E]
        return self._bias(0, self.cfg.n_heads)

    @property
    def b_K(self) -> torch.Tensor:  # [K, E]
        return self._bias(1, self.cfg.n_kv_heads)

    @property
    def b_V(self) -> torch.Tensor:  # [K, E]
        return self._bias(2, self.cfg.n_kv_heads)

    @property
    def W_O(self) -> torch.Tensor:  # [H, E, D]
        return self.o.weight.view(-1, self.cfg.n_heads, self.cfg.d_head).permute(1, 2, 0)

    @property
    def b_O(self) -> torch.Tensor:  # [D]
        if self.o.bias is None:
            return torch.zeros(self.cfg.d_model, device=self.o.weight.device, dtype=self.o.weight.dtype)
        return self.o.bias

    # forward -----------------------------------------------------------------------------
    def forward(
        self,
        x: torch.Tensor,  # [B, T, D]
        rotary: tuple[torch.Tensor, torch.Tensor] | None,
        mask: torch.Tensor | None,  # [B, 1, T, S] bool (True = attend) or None for plain causal
        kv_cache: KVCache | None = None,
    ) -> torch.Tensor:
        c = self.cfg
        B, T, _ = x.shape
        q, k, v = self.qkv(x).split([c.d_q, c.d_kv, c.d_kv], dim=-1)
        q = self.hook_q(q.view(B, T, c.n_heads, c.d_head))
        k = self.hook_k(k.view(B, T, c.n_kv_heads, c.d_head))
        v = self.hook_v(v.view(B, T, c.n_kv_heads, c.d_head))
        if c.qk_norm:
            q, k = self.q_norm(q), self.k_norm(k)
        if rotary is not None:
            cos, sin = rotary
            q = self.hook_rot_q(apply_rotary(q, cos, sin))
            k = self.hook_rot_k(apply_rotary(k, cos, sin))
        if kv_cache is not None:
            k, v = kv_cache.append(self.layer, k, v)
        qh, kh, vh = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # [B, H|K, T|S, E]
        if self.hook_attn_scores.active or self.hook_pattern.active or c.attn_softcap is not None:
            z = self._eager(qh, kh, vh, mask)
        else:
            z = F.scaled_dot_product_attention(
                qh, kh, vh, attn_mask=mask, is_causal=mask is None and c.causal and T > 1,
                scale=self.scale, enable_gqa=c.n_kv_heads != c.n_heads,
            )
        z = self.hook_z(z.transpose(1, 2))  # [B, T, H, E]
        if self.hook_result.active:
            # per-head contributions: z[b,t,h,:] @ W_O[h] -> [B, T, H, D]
            w = self.o.weight.view(c.d_model, c.n_heads, c.d_head)
            result = self.hook_result(torch.einsum("bthe,dhe->bthd", z, w))
            out = result.sum(dim=2)
            return out + self.o.bias if self.o.bias is not None else out
        return self.o(z.reshape(B, T, c.d_q))

    def _eager(self, q, k, v, mask):
        c = self.cfg
        if c.n_kv_heads != c.n_heads:
            rep = c.n_heads // c.n_kv_heads
            k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
        # scale q [B, H, T, E] rather than the scores [B, H, T, S]: S / E times less work
        scores = (q * self.scale) @ k.transpose(-1, -2)  # [B, H, T, S]
        if c.attn_softcap is not None:
            scores = torch.tanh(scores / c.attn_softcap) * c.attn_softcap
        if mask is None and c.causal:
            blocked = causal_blocked(scores.shape[-2], scores.shape[-1], q.device)
        else:
            blocked = None if mask is None else mask.logical_not()
        if blocked is not None:
            scores.masked_fill_(blocked, torch.finfo(scores.dtype).min)  # scores is a fresh tensor
        scores = self.hook_attn_scores(scores)
        pattern = torch.softmax(scores, dim=-1, dtype=torch.float32).to(q.dtype)
        pattern = self.hook_pattern(pattern)
        return pattern @ v


# --------------------------------------------------------------------------- MLP


class MLP(nn.Module):
    """Plain (W_out act(W_in x)) or gated (W_out (act(W_gate x) * W_in x)) MLP."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.act = activation(cfg.act_fn)
        self.up = nn.Linear(cfg.d_model, cfg.d_mlp, bias=cfg.mlp_bias)
        if cfg.gated_mlp:
            self.gate = nn.Linear(cfg.d_model, cfg.d_mlp, bias=cfg.mlp_bias)
        self.down = nn.Linear(cfg.d_mlp, cfg.d_model, bias=cfg.mlp_bias)
        self.hook_pre = HookPoint()  # [B, T, d_mlp] pre-activation (the gate, for gated MLPs)
        if cfg.gated_mlp:
            self.hook_pre_linear = HookPoint()  # [B, T, d_mlp] the up projection
        self.hook_post = HookPoint()  # [B, T, d_mlp]

    @property
    def W_in(self) -> torch.Tensor:  # [D, d_mlp]
        return self.up.weight.T

    @property
    def W_gate(self) -> torch.Tensor:  # [D, d_mlp]
        return self.gate.weight.T

    @property
    def W_out(self) -> torch.Tensor:  # [d_mlp, D]
        return self.down.weight.T

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.cfg.gated_mlp:
            pre = self.hook_pre(self.gate(x))
            post = self.hook_post(self.act(pre) * self.hook_pre_linear(self.up(x)))
        else:
            post = self.hook_post(self.act(self.hook_pre(self.up(x))))
        return self.down(post)


# --------------------------------------------------------------------------- block


class Block(nn.Module):
    """One transformer layer: pre-norm (GPT/Llama), parallel (NeoX), sandwich (Gemma 2/3), or post-norm (BERT)."""

    def __init__(self, cfg: ModelConfig, layer: int) -> None:
        super().__init__()
        self.cfg, self.layer = cfg, layer
        # registered in forward order, so model.hook_names reads like the computation
        self.hook_resid_pre = HookPoint()  # [B, T, D]
        self.ln1 = Norm(cfg.d_model, cfg.normalization, cfg.norm_eps)
        self.attn = Attention(cfg, layer)
        if cfg.post_attn_norm:
            self.ln1_post = Norm(cfg.d_model, cfg.normalization, cfg.norm_eps)
        self.hook_attn_out = HookPoint()  # [B, T, D] what attention adds to the residual
        if not cfg.attn_only:
            if not cfg.parallel_attn_mlp:
                self.hook_resid_mid = HookPoint()  # [B, T, D]
            self.ln2 = Norm(cfg.d_model, cfg.normalization, cfg.norm_eps)
            self.mlp = MLP(cfg)
            if cfg.post_mlp_norm:
                self.ln2_post = Norm(cfg.d_model, cfg.normalization, cfg.norm_eps)
            self.hook_mlp_out = HookPoint()  # [B, T, D] what the MLP adds
        self.hook_resid_post = HookPoint()  # [B, T, D]
        if cfg.post_layernorm:
            self.hook_normalized_resid_post = HookPoint()  # BERT: the block's output after ln2

    def forward(self, x, rotary=None, mask=None, kv_cache: KVCache | None = None) -> torch.Tensor:
        c = self.cfg
        resid_pre = self.hook_resid_pre(x)
        if c.post_layernorm:  # BERT
            attn_out = self.hook_attn_out(self.attn(resid_pre, rotary, mask, kv_cache))
            mid = self.ln1(self.hook_resid_mid(resid_pre + attn_out))
            mlp_out = self.hook_mlp_out(self.mlp(mid))
            return self.hook_normalized_resid_post(self.ln2(self.hook_resid_post(mid + mlp_out)))
        attn_out = self.attn(self.ln1(resid_pre), rotary, mask, kv_cache)
        if c.post_attn_norm:
            attn_out = self.ln1_post(attn_out)
        attn_out = self.hook_attn_out(attn_out)
        if c.attn_only:
            return self.hook_resid_post(resid_pre + attn_out)
        if c.parallel_attn_mlp:
            mlp_out = self.hook_mlp_out(self.mlp(self.ln2(resid_pre)))
            return self.hook_resid_post(resid_pre + attn_out + mlp_out)
        resid_mid = self.hook_resid_mid(resid_pre + attn_out)
        mlp_out = self.mlp(self.ln2(resid_mid))
        if c.post_mlp_norm:
            mlp_out = self.ln2_post(mlp_out)
        mlp_out = self.hook_mlp_out(mlp_out)
        return self.hook_resid_post(resid_mid + mlp_out)


# --------------------------------------------------------------------------- embeddings


class Embed(nn.Module):
    """A lookup table [n, D] (tokens, positions or BERT token types), optionally scaled (Gemma).

    A plain parameter rather than nn.Embedding: building on the meta device must not run an
    initialiser (nn.Embedding's normal_ drags in torch._dynamo: seconds and hundreds of MiB).
    """

    def __init__(self, n: int, d_model: int, scale: float | None = None) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(n, d_model))
        self.scale = scale

    @property
    def W_E(self) -> torch.Tensor:
        return self.weight

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        x = F.embedding(ids, self.weight)
        if self.scale is not None:  # Gemma multiplies by sqrt(d_model) rounded to the activation dtype
            x = x * torch.tensor(self.scale, dtype=x.dtype)
        return x


class MLMHead(nn.Module):
    """BERT's masked-LM transform (dense, activation, LayerNorm) before the unembedding."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.dense = nn.Linear(cfg.d_model, cfg.d_model)
        self.act = activation(cfg.act_fn)
        self.ln = Norm(cfg.d_model, "LN", cfg.norm_eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.ln(self.act(self.dense(x)))
