"""mechscope: open up transformer language models and explain how they produce what they produce."""

from mechscope.errors import (
    ContextLengthError,
    CorruptFileError,
    HookNameError,
    InputError,
    MechscopeError,
    ModelNotFoundError,
    NonFiniteError,
    UnsupportedArchitectureError,
    UnsupportedQuantizationError,
)
from mechscope.models.cache import ActivationCache
from mechscope.models.config import ModelConfig
from mechscope.models.hooks import HookPoint
from mechscope.models.transformer import HookedTransformer

__version__ = "0.1.0"
__all__ = [
    "ActivationCache",
    "ContextLengthError",
    "CorruptFileError",
    "HookNameError",
    "HookPoint",
    "HookedTransformer",
    "InputError",
    "MechscopeError",
    "ModelConfig",
    "ModelNotFoundError",
    "NonFiniteError",
    "UnsupportedArchitectureError",
    "UnsupportedQuantizationError",
]
