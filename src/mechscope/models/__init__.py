"""The hooked transformer, its activation cache, converters and loading."""

from mechscope.models.cache import ActivationCache
from mechscope.models.config import ModelConfig
from mechscope.models.hooks import layer_of
from mechscope.models.identity import model_identity
from mechscope.models.transformer import HookedTransformer

__all__ = ["ActivationCache", "HookedTransformer", "ModelConfig", "layer_of", "model_identity"]
