"""mechscope: open up transformer language models and explain how they produce what they produce."""

from mechscope import edit, interventions, monitor, probes
from mechscope.data.harvest import HarvestConfig
from mechscope.data.store import ActivationStore
from mechscope.errors import (
    ArtifactMismatchError,
    ContextLengthError,
    CorpusNotFoundError,
    CorruptFileError,
    EmptyCorpusError,
    ExplainerError,
    HookNameError,
    HookReturnError,
    InputError,
    MechscopeError,
    MissingDependencyError,
    ModelNotFoundError,
    NonFiniteError,
    OutputNotWritableError,
    StoreMismatchError,
    StoreWriteError,
    TokenizerError,
    UnknownFormatError,
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
    "ArtifactMismatchError",
    "ActivationStore",
    "ContextLengthError",
    "CorpusNotFoundError",
    "CorruptFileError",
    "EmptyCorpusError",
    "ExplainerError",
    "HarvestConfig",
    "HookNameError",
    "HookReturnError",
    "HookPoint",
    "HookedTransformer",
    "InputError",
    "MechscopeError",
    "MissingDependencyError",
    "ModelConfig",
    "ModelNotFoundError",
    "NonFiniteError",
    "OutputNotWritableError",
    "StoreMismatchError",
    "StoreWriteError",
    "TokenizerError",
    "UnknownFormatError",
    "UnsupportedArchitectureError",
    "UnsupportedQuantizationError",
    "edit",
    "interventions",
    "monitor",
    "probes",
]
