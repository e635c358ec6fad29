"""What identifies a model by content (never by the path or name it was loaded from).

Artifacts (activation stores, SAEs, probes, report stages) record it so that reading them with another
model is refused, while the same weights loaded from another path, in another dtype, are accepted.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

import torch


def model_identity(model) -> dict[str, Any]:
    """config_hash ignores dtype and name (a bf16 harvest may be read with the fp32 model); the weight
    fingerprint hashes a slice of W_E rounded to bf16, which is the same whether the model was loaded in fp32
    or bf16 but differs between checkpoints."""
    cfg = model.cfg.to_dict()
    for k in ("dtype", "model_name"):
        cfg.pop(k, None)
    config_hash = hashlib.sha256(json.dumps(cfg, sort_keys=True).encode()).hexdigest()[:16]
    w = model.embed.weight.detach()[:16].to("cpu", torch.bfloat16).view(torch.int16)
    fingerprint = hashlib.sha256(w.numpy().tobytes()).hexdigest()[:16]
    return {
        "name": model.cfg.model_name, "architecture": model.cfg.architecture, "config_hash": config_hash,
        "weights_fingerprint": fingerprint, "dtype": str(model.dtype).removeprefix("torch."),
        "processing": list(model.cfg.processing), "n_layers": model.cfg.n_layers, "d_model": model.cfg.d_model,
    }


def content_identity(identity: dict[str, Any]) -> dict[str, Any]:
    """`identity` without the name the model was loaded under ("smollm2", "./m/", "/cache/gguf-..."): what a
    cache key may hash, so the same model named by another path string is the same input."""
    return {k: v for k, v in identity.items() if k != "name"}


def content_key(model) -> str:
    """A short string naming the model by content (architecture, config hash, weight fingerprint, processing):
    what artifact settings record, so the same weights loaded from another path are the same model."""
    ident = model_identity(model)
    processing = "+".join(ident["processing"]) or "raw"
    return f"{ident['architecture']}:{ident['config_hash']}:{ident['weights_fingerprint']}:{processing}"


def same_model(want: dict[str, Any], have: dict[str, Any]) -> str | None:
    """None if two identities are the same model (same config, weights and processing), else the first
    differing key."""
    for key in ("config_hash", "weights_fingerprint", "processing"):
        if want.get(key) != have.get(key):
            return key
    return None
