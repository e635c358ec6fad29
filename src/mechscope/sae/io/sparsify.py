"""EleutherAI sparsify 1.x: one folder per hookpoint, cfg.json + sae.safetensors.

Mapping: encoder.weight [n, d_in] -> W_enc = its transpose (the trap: nn.Linear orientation);
encoder.bias -> b_enc; W_dec [n, d_in] as is; b_dec. sparsify subtracts b_dec before encoding
unless `transcode`, so transcode <-> apply_b_dec_to_input=False (with d_out = d_in: sparsify's
transcoders keep the input width). `skip_connection` -> W_skip [d_in, d_in] (same orientation).
`multi_topk` and `normalize_decoder` are training-only and kept in extra. Only `activation='topk'`
has an equivalent (groupmax has none). Hookpoints are HF module paths; common ones are mapped to
our hook names, the original is kept in extra.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import torch

from mechscope.errors import CorruptFileError, InputError, UnsupportedArchitectureError
from mechscope.fileio import atomic_write_bytes, atomic_write_json
from mechscope.sae.coder import SparseCoder
from mechscope.sae.config import SAEConfig
from mechscope.sae.io.common import (
    STASH_KEY,
    cannot,
    expect_keys,
    layer_hook,
    prepare,
    read_json,
    read_safetensors,
    restore,
    safetensors_bytes,
    shape_of,
    stash,
)

CONFIG, WEIGHTS = "cfg.json", "sae.safetensors"


def looks_like(raw: dict[str, Any]) -> bool:
    return "num_latents" in raw or "expansion_factor" in raw or "activation" in raw


def hooks_for(hookpoint: str, transcode: bool) -> tuple[str | None, str | None]:
    """HF module path (what sparsify hooks: the module's output, or input and output for transcoders)."""
    m = re.fullmatch(r"(?:.*\.)?(?:layers|h|layer)\.(\d+)(?:\.(mlp|self_attn|attn|attention))?", hookpoint)
    if not m:
        return None, None
    layer, sub = int(m.group(1)), m.group(2)
    if sub is None:
        return layer_hook("resid_post", layer), None
    if sub == "mlp":
        return (layer_hook("mlp_in", layer), layer_hook("mlp_out", layer)) if transcode else \
            (layer_hook("mlp_out", layer), None)
    return (None, None) if transcode else (layer_hook("attn_out", layer), None)


def read(folder: Path) -> tuple[SAEConfig, dict[str, torch.Tensor]]:
    where = folder / WEIGHTS
    raw = read_json(folder / CONFIG)
    t, header = read_safetensors(where, with_metadata=True)
    if raw.get("activation", "topk") != "topk":
        raise UnsupportedArchitectureError(f"{folder}: sparsify activation {raw.get('activation')!r} has no "
                                           "mechscope equivalent (only 'topk').")
    skip, transcode = bool(raw.get("skip_connection", False)), bool(raw.get("transcode", False))
    expect_keys(t, {"encoder.weight", "encoder.bias", "W_dec", "b_dec"} | ({"W_skip"} if skip else set()), (), where)
    n, d_in = shape_of(t, "encoder.weight", 2, where)
    if raw.get("d_in", d_in) != d_in or raw.get("num_latents") not in (None, 0, n):
        raise CorruptFileError(f"{where}: encoder.weight is [{n}, {d_in}], cfg.json says d_in {raw.get('d_in')}, "
                               f"num_latents {raw.get('num_latents')}.")
    out = {"W_enc": t["encoder.weight"].T.contiguous(), "b_enc": t["encoder.bias"], "W_dec": t["W_dec"],
           "b_dec": t["b_dec"]}
    if skip:
        out["W_skip"] = t["W_skip"]
    hookpoint = folder.name
    hook_in, hook_out = hooks_for(hookpoint, transcode)
    try:
        cfg = SAEConfig(arch="topk", d_in=d_in, n_latents=n, k=raw.get("k", 32), skip=skip,
                        d_out=d_in if transcode else None, apply_b_dec_to_input=not transcode,
                        hook_in=hook_in, hook_out=hook_out,
                        extra={"source_format": "sparsify", "sparsify_hookpoint": hookpoint,
                               "sparsify_cfg": raw})
    except InputError as e:
        raise CorruptFileError(f"{folder}/{CONFIG} describes no valid coder: {e}") from e
    try:  # our config rides in the safetensors header (sparsify prints a note on unknown cfg.json keys)
        stashed = json.loads(header[STASH_KEY]) if STASH_KEY in header else None
    except json.JSONDecodeError:
        stashed = None
    return restore(cfg, stashed, where), out


def write(coder: SparseCoder, folder: Path) -> Path:
    cfg, sd = prepare(coder)
    if cfg.arch != "topk":
        raise cannot("sparsify", cfg, "its only activation is per-token TopK")
    if cfg.out_dim != cfg.d_in:
        raise cannot("sparsify", cfg, "its coders write as many dimensions as they read")
    prev = cfg.extra.get("sparsify_cfg") or {}
    raw = {"activation": "topk", "expansion_factor": prev.get("expansion_factor", 32),
           "normalize_decoder": prev.get("normalize_decoder", True), "num_latents": cfg.n_latents, "k": cfg.k,
           "multi_topk": prev.get("multi_topk", False), "skip_connection": cfg.skip,
           "transcode": not cfg.apply_b_dec_to_input, "d_in": cfg.d_in}
    tensors = {"encoder.weight": sd["W_enc"].T.contiguous(), "encoder.bias": sd["b_enc"], "W_dec": sd["W_dec"],
               "b_dec": sd["b_dec"]}
    if cfg.skip:
        tensors["W_skip"] = sd["W_skip"]
    folder.mkdir(parents=True, exist_ok=True)
    header = {"format": "pt", STASH_KEY: json.dumps(stash(cfg), sort_keys=True)}
    atomic_write_bytes(folder / WEIGHTS, safetensors_bytes(tensors, header))
    atomic_write_json(folder / CONFIG, raw)
    return folder
