"""Typed exceptions. Every user-facing failure raises one of these with a message that says
what was wrong and what to do about it; `assert` is never used for user input."""

from __future__ import annotations

import difflib
from collections.abc import Iterable


class MechscopeError(Exception):
    """Base class of every error mechscope raises on purpose."""


class HookNameError(MechscopeError, KeyError):
    """A hook name (or a cache filter) matched no hook point."""

    def __str__(self) -> str:  # KeyError would otherwise repr() the message
        return str(self.args[0]) if self.args else ""


class UnsupportedArchitectureError(MechscopeError):
    """The checkpoint's architecture has no converter (or uses an option we cannot reproduce)."""


class UnsupportedQuantizationError(MechscopeError):
    """A GGUF tensor uses a quantization type we cannot dequantize."""


class ModelNotFoundError(MechscopeError):
    """A model name or folder could not be found (or needs a download while offline)."""


class CorruptFileError(MechscopeError):
    """A weight, cache or config file is truncated, malformed or unsafe to read."""


class InputError(MechscopeError, ValueError):
    """Bad tokens, text, attention mask, shapes or dtypes passed to a model."""


class CheckpointMismatchError(InputError):
    """A checkpoint folder holds a run with other settings (config, model or data) than the one asked for."""


class ContextLengthError(InputError):
    """The sequence is longer than the model's context."""


class NonFiniteError(MechscopeError, FloatingPointError):
    """A forward pass produced NaN or inf (raised only when the opt-in check is on)."""


def unknown_name_message(kind: str, name: str, known: Iterable[str], n: int = 5) -> str:
    """'Unknown hook name X. Did you mean: a, b, c?' with the closest known names."""
    known = list(known)
    close = difflib.get_close_matches(name, known, n=n, cutoff=0.5)
    if not close:  # fall back on names sharing the last component, e.g. 'hook_resid_post'
        tail = name.rsplit(".", 1)[-1]
        close = [k for k in known if k.endswith(tail)][:n]
    hint = f" Did you mean: {', '.join(close)}?" if close else ""
    return f"Unknown {kind} {name!r}.{hint} ({len(known)} names exist; see model.hook_names.)"


class CorpusNotFoundError(MechscopeError, FileNotFoundError):
    """A text source (path, built-in corpus package or dataset) could not be found."""

    def __str__(self) -> str:  # FileNotFoundError would otherwise format errno-style args
        return str(self.args[0]) if self.args else ""


class MissingDependencyError(MechscopeError, ImportError):
    """An optional package that this feature needs is not installed."""


class UnknownFormatError(InputError):
    """A file's format (extension) is not one we can read text from."""


class EmptyCorpusError(InputError):
    """A text source produced no non-empty documents."""


class TokenizerError(InputError):
    """The tokenizer lacks something the caller asked for (e.g. a BOS or EOS token)."""


class StoreMismatchError(MechscopeError):
    """An activation store does not belong to this model or to these harvest settings."""


class StoreWriteError(MechscopeError, OSError):
    """Writing an artifact failed (e.g. a full disk); what was already written is intact."""

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else ""


class PromptMismatchError(InputError):
    """Clean and corrupted prompts that cannot be compared position by position (different lengths)."""


class SubjectNotFoundError(InputError):
    """Causal tracing: the subject does not occur in the prompt (the message shows the prompt's tokens)."""


class MetricError(InputError):
    """A user metric returned something other than a finite scalar (or one value per batch row)."""


class EmptyCircuitError(InputError):
    """A circuit selection kept no edge or node (threshold too high, k = 0)."""


class OutputNotWritableError(MechscopeError, OSError):
    """The output folder cannot be created or written (permissions, a file in the way, read-only disk)."""

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else ""


class ArtifactMismatchError(MechscopeError):
    """A folder already holds artifacts made from another model or coder; mechscope never mixes them."""


class ExplainerError(MechscopeError):
    """An explainer (LLM callable or endpoint) failed or answered something unusable."""


class HookReturnError(InputError):
    """A hook function returned something that cannot replace the activation (wrong type, shape, dtype or
    device): the message names the hook point."""
