"""The hooked transformer, its activation cache, converters and loading."""

from mechscope.models import interventions
from mechscope.models.cache import ActivationCache
from mechscope.models.config import ModelConfig
from mechscope.models.hooks import layer_of
from mechscope.models.identity import model_identity
from mechscope.models.interventions import Ablate, Add, Apply, Intervention, Scale, Set
from mechscope.models.linearized import FrozenPrompt, freeze_prompt
from mechscope.models.transformer import HookedTransformer, RunState

__all__ = ["Ablate", "ActivationCache", "Add", "Apply", "FrozenPrompt", "HookedTransformer", "Intervention",
           "ModelConfig", "RunState", "Scale", "Set", "freeze_prompt", "interventions", "layer_of", "model_identity"]
