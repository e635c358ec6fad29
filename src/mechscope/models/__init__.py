"""The hooked transformer, its activation cache, converters and loading."""

from mechscope.models.cache import ActivationCache
from mechscope.models.config import ModelConfig
from mechscope.models.transformer import HookedTransformer

__all__ = ["ActivationCache", "HookedTransformer", "ModelConfig"]
