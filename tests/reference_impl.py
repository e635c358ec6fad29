"""Plain-PyTorch reference forwards (nanoGPT style) straight from HF state dicts.

Each calls `edit(name, tensor)` at every place mechscope has a hook point, using the same
names and shapes, so a test can apply one edit here and the same edit through a hook and
compare outputs. Written independently of mechscope's components on purpose.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def _ln(x, w, b, eps, edit, prefix):
    mu = x.mean(-1, keepdim=True)
    xc = x - mu
    scale = edit(prefix + ".hook_scale", (xc.pow(2).mean(-1, keepdim=True) + eps).sqrt())
    return edit(prefix + ".hook_normalized", xc / scale * w + b)


def _rms(x, w, eps, edit, prefix):
    scale = edit(prefix + ".hook_scale", (x.pow(2).mean(-1, keepdim=True) + eps).sqrt())
    return edit(prefix + ".hook_normalized", x / scale * w)


def _attend(q, k, v, edit, p, result_w, result_b):
    # q [B,T,H,E], k/v [B,T,K,E] -> output [B,T,D] via scores/pattern/z/result
    B, T, H, E = q.shape
    rep = H // k.shape[2]
    k, v = k.repeat_interleave(rep, 2), v.repeat_interleave(rep, 2)
    scores = torch.einsum("bqhe,bkhe->bhqk", q, k) / math.sqrt(E)
    causal = torch.ones(T, T, dtype=torch.bool).tril()
    scores = edit(p + "attn.hook_attn_scores", scores.masked_fill(~causal, torch.finfo(scores.dtype).min))
    pattern = edit(p + "attn.hook_pattern", scores.softmax(-1))
    z = edit(p + "attn.hook_z", torch.einsum("bhqk,bkhe->bqhe", pattern, v))
    w = result_w.view(-1, H, E)  # [D, H, E]
    result = edit(p + "attn.hook_result", torch.einsum("bqhe,dhe->bqhd", z, w))
    return result.sum(2) + (result_b if result_b is not None else 0)


def gpt2_forward(sd: dict, cfg, tokens: torch.Tensor, edit=lambda n, x: x) -> torch.Tensor:
    sd = {k.removeprefix("transformer."): v for k, v in sd.items()}
    eps, H = cfg.layer_norm_epsilon, cfg.n_head
    T = tokens.shape[1]
    x = edit("hook_embed", sd["wte.weight"][tokens]) + edit("hook_pos_embed", sd["wpe.weight"][torch.arange(T).expand_as(tokens)])
    for l in range(cfg.n_layer):
        p = f"blocks.{l}."
        h = f"h.{l}."
        x = edit(p + "hook_resid_pre", x)
        n = _ln(x, sd[h + "ln_1.weight"], sd[h + "ln_1.bias"], eps, edit, p + "ln1")
        qkv = n @ sd[h + "attn.c_attn.weight"] + sd[h + "attn.c_attn.bias"]
        q, k, v = (t.reshape(*t.shape[:2], H, -1) for t in qkv.chunk(3, -1))
        q, k, v = edit(p + "attn.hook_q", q), edit(p + "attn.hook_k", k), edit(p + "attn.hook_v", v)
        a = _attend(q, k, v, edit, p, sd[h + "attn.c_proj.weight"].T, sd[h + "attn.c_proj.bias"])
        x = edit(p + "hook_resid_mid", x + edit(p + "hook_attn_out", a))
        n = _ln(x, sd[h + "ln_2.weight"], sd[h + "ln_2.bias"], eps, edit, p + "ln2")
        pre = edit(p + "mlp.hook_pre", n @ sd[h + "mlp.c_fc.weight"] + sd[h + "mlp.c_fc.bias"])
        post = edit(p + "mlp.hook_post", F.gelu(pre, approximate="tanh"))
        m = post @ sd[h + "mlp.c_proj.weight"] + sd[h + "mlp.c_proj.bias"]
        x = edit(p + "hook_resid_post", x + edit(p + "hook_mlp_out", m))
    n = _ln(x, sd["ln_f.weight"], sd["ln_f.bias"], eps, edit, "ln_final")
    return edit("hook_unembed", n @ sd["wte.weight"].T)


def _rope(x, pos, theta):
    E = x.shape[-1]
    inv = 1.0 / (theta ** (torch.arange(0, E, 2).float() / E))
    ang = pos[:, None].float() * inv[None]  # [T, E/2]
    cos, sin = ang.cos().repeat(1, 2)[None, :, None], ang.sin().repeat(1, 2)[None, :, None]
    x1, x2 = x[..., : E // 2], x[..., E // 2 :]
    return x * cos + torch.cat([-x2, x1], -1) * sin


def llama_forward(sd: dict, cfg, tokens: torch.Tensor, edit=lambda n, x: x) -> torch.Tensor:
    sd = {k.removeprefix("model."): v for k, v in sd.items()}
    eps, H, K = cfg.rms_norm_eps, cfg.num_attention_heads, cfg.num_key_value_heads
    E = cfg.hidden_size // H
    T = tokens.shape[1]
    pos = torch.arange(T)
    theta = cfg.rope_parameters["rope_theta"]
    x = edit("hook_embed", sd["embed_tokens.weight"][tokens])
    for l in range(cfg.num_hidden_layers):
        p, h = f"blocks.{l}.", f"layers.{l}."
        x = edit(p + "hook_resid_pre", x)
        n = _rms(x, sd[h + "input_layernorm.weight"], eps, edit, p + "ln1")
        q = edit(p + "attn.hook_q", (n @ sd[h + "self_attn.q_proj.weight"].T).reshape(n.shape[0], T, H, E))
        k = edit(p + "attn.hook_k", (n @ sd[h + "self_attn.k_proj.weight"].T).reshape(n.shape[0], T, K, E))
        v = edit(p + "attn.hook_v", (n @ sd[h + "self_attn.v_proj.weight"].T).reshape(n.shape[0], T, K, E))
        q = edit(p + "attn.hook_rot_q", _rope(q, pos, theta))
        k = edit(p + "attn.hook_rot_k", _rope(k, pos, theta))
        a = _attend(q, k, v, edit, p, sd[h + "self_attn.o_proj.weight"], None)
        x = edit(p + "hook_resid_mid", x + edit(p + "hook_attn_out", a))
        n = _rms(x, sd[h + "post_attention_layernorm.weight"], eps, edit, p + "ln2")
        gate = edit(p + "mlp.hook_pre", n @ sd[h + "mlp.gate_proj.weight"].T)
        up = edit(p + "mlp.hook_pre_linear", n @ sd[h + "mlp.up_proj.weight"].T)
        post = edit(p + "mlp.hook_post", F.silu(gate) * up)
        x = edit(p + "hook_resid_post", x + edit(p + "hook_mlp_out", post @ sd[h + "mlp.down_proj.weight"].T))
    n = _rms(x, sd["norm.weight"], eps, edit, "ln_final")
    w_u = sd["lm_head.weight"] if "lm_head.weight" in sd else sd["embed_tokens.weight"]
    return edit("hook_unembed", n @ w_u.T)
