"""mechscope's own model folder: config.json + model.safetensors in our parameter names.

Why a native format: models trained here (the zoo: attention-only transformers, ...) and
processed models (fold_ln etc.) have no Hugging Face equivalent. The folder still looks like an
HF folder (config.json with `model_type: "mechscope"`, safetensors weights, tokenizer files), so
`HookedTransformer.from_pretrained(DIR)` loads it like any other, without unpickling anything.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch

from mechscope.errors import CorruptFileError
from mechscope.fileio import atomic_write_bytes, atomic_write_json
from mechscope.models.config import ModelConfig

__all__ = ["atomic_write_bytes", "save_pretrained", "load_native", "init_weights", "is_native"]

MODEL_TYPE = "mechscope"
FORMAT_VERSION = 1


def is_native(config: dict[str, Any]) -> bool:
    return config.get("model_type") == MODEL_TYPE


def save_pretrained(model, folder: str | os.PathLike, *, extra: dict[str, Any] | None = None) -> Path:
    """Save `model` (a HookedTransformer) as a native folder; the tokenizer too, if it has one.

    extra: JSON-able provenance (training recipe, seed, metrics) stored under "mechscope_extra".
    """
    from safetensors.torch import save

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    sd = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    if model.cfg.tie_word_embeddings and model.cfg.has_unembed:
        sd.pop("unembed.weight", None)  # the same tensor as embed.weight
    folded = sorted(n for n, m in model.named_modules() if hasattr(m, "w") and hasattr(m, "kind") and m.w is None)
    config = {
        "model_type": MODEL_TYPE, "architectures": ["HookedTransformer"], "format_version": FORMAT_VERSION,
        "mechscope_config": model.cfg.to_dict(), "folded_norms": folded, "mechscope_extra": extra or {},
    }
    if model.tokenizer is not None:
        model.tokenizer.save_pretrained(str(folder))
    atomic_write_bytes(folder / "model.safetensors", save(sd, metadata={"format": "pt"}))
    atomic_write_json(folder / "config.json", config)
    return folder


def load_native(folder: Path, config: dict[str, Any], *, device=None, dtype=torch.float32, tokenizer: Any = None):
    """Rebuild the model from its saved ModelConfig and assign the saved tensors (no conversion; no copy
    either where the stored dtype is the one asked for: the parameters are the file's private mapping)."""
    from mechscope.models.transformer import HookedTransformer
    from mechscope.models.weights import Weights, place

    if config.get("format_version", 0) > FORMAT_VERSION:
        raise CorruptFileError(f"{folder} was written by a newer mechscope (format {config['format_version']}); upgrade.")
    try:
        cfg = ModelConfig.from_dict(dict(config["mechscope_config"]))
    except (KeyError, TypeError) as e:
        raise CorruptFileError(f"{folder}/config.json has no valid mechscope_config ({e}).") from e
    cfg.dtype = str(dtype).removeprefix("torch.")
    device = torch.device(device or "cpu")
    with torch.device("meta"):
        model = HookedTransformer(cfg, tokenizer=tokenizer)
    for name in config.get("folded_norms", []):
        norm = model.get_submodule(name)
        norm.w = None
        norm.b = None
    weights = Weights.from_folder(folder)
    expected = set(model.state_dict())
    if cfg.tie_word_embeddings and cfg.has_unembed:
        expected.discard("unembed.weight")
    have = set(weights.keys())
    if have != expected:
        raise CorruptFileError(
            f"{folder}/model.safetensors does not match its config: missing {sorted(expected - have)[:5]}, "
            f"unexpected {sorted(have - expected)[:5]}."
        )
    sd = {}
    for name in sorted(expected):
        t = weights[name]
        want = model.get_parameter(name).shape
        if t.shape != want:
            raise CorruptFileError(f"Tensor {name} has shape {tuple(t.shape)}, config implies {tuple(want)}.")
        sd[name] = place(t, dtype=dtype, device=device, adopt=True)  # a file view, used as is when it fits
    model.load_state_dict(sd, strict=False, assign=True)
    if cfg.tie_word_embeddings and cfg.has_unembed:
        model.unembed.weight = model.embed.weight
    model.materialize_buffers(device)
    return model.eval()


def init_weights(model, seed: int = 0, std: float = 0.02) -> None:
    """GPT-2-style initialisation for training from scratch: N(0, std) matrices, residual writes
    scaled by 1/sqrt(2 n_layers), zero biases, unit norm weights. Deterministic under `seed`."""
    g = torch.Generator().manual_seed(seed)
    resid_std = std / (2 * model.cfg.n_layers) ** 0.5
    with torch.no_grad():
        for name, p in model.named_parameters():  # registration order: stable across runs
            if p.ndim == 1:
                p.fill_(1.0 if name.endswith(".w") else 0.0)
                continue
            s = resid_std if name.endswith(("attn.o.weight", "mlp.down.weight")) else std
            p.copy_(torch.randn(p.shape, generator=g, dtype=torch.float32) * s)
