"""One converter per Hugging Face family.

A converter module defines:
    ARCHITECTURES: tuple[str, ...]        HF `config.architectures` names it handles
    MODEL_TYPES: tuple[str, ...]          HF `config.model_type` values (fallback when no architectures)
    PREFIXES: tuple[str, ...]             state-dict prefixes to strip ("model.", "transformer.")
    convert_config(hf_config) -> ModelConfig
    convert_weights(cfg, w: Weights) -> dict[str, Tensor]    our parameter name -> tensor
Any local folder whose config.json names a supported architecture loads; there is no list of
model names.
"""

from __future__ import annotations

import importlib
from types import ModuleType
from typing import Any

from mechscope.errors import UnsupportedArchitectureError

FAMILY_MODULES = ("gpt2", "neox", "llama", "qwen3", "gemma", "bert")


def _modules() -> list[ModuleType]:
    return [importlib.import_module(f"mechscope.models.families.{m}") for m in FAMILY_MODULES]


def supported_architectures() -> list[str]:
    return sorted(a for m in _modules() for a in m.ARCHITECTURES)


def supported_model_types() -> list[str]:
    return sorted(t for m in _modules() for t in m.MODEL_TYPES)


def check_supported(raw_config: dict[str, Any], where: str) -> None:
    """Refuse a config.json (as a plain dict) whose architecture no converter handles -- before transformers
    reads it, which for an unknown or remote-code family means a raw error, a config dump or even an
    interactive 'run custom code? [y/N]' prompt."""
    archs = list(raw_config.get("architectures") or [])
    model_type = raw_config.get("model_type")
    if any(a in supported_architectures() for a in archs) or model_type in supported_model_types():
        return
    name = ", ".join(archs) or repr(model_type) or "none given"
    raise UnsupportedArchitectureError(
        f"{where} describes a {name} model (model_type {model_type!r}), an architecture mechscope does not "
        f"support. Supported: {', '.join(supported_architectures())}.")


def converter_for(hf_config: Any) -> ModuleType:
    """The converter module for an HF config, by `architectures` first, then `model_type`."""
    archs = list(getattr(hf_config, "architectures", None) or [])
    model_type = getattr(hf_config, "model_type", None)
    mods = _modules()
    for arch in archs:
        for m in mods:
            if arch in m.ARCHITECTURES:
                return m
    for m in mods:
        if model_type in m.MODEL_TYPES:
            return m
    raise UnsupportedArchitectureError(
        f"No converter for architecture {archs or model_type!r}. Supported: "
        f"{', '.join(supported_architectures())}."
    )
