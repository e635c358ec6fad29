"""A fitted probe: what it reads (hook, position), how (normalisation, weight, bias), for which model.

    p = fit(model, texts, labels, hook="blocks.12.hook_resid_post", position="last", method="logistic")
    p.score(model, texts)        # [n] float logits, higher = more like label 1
    p.cv_auroc                   # held-out (k-fold cross-validated) AUROC of this recipe on the data
    p.save("probe/"); load("probe/", model=model)

A saved probe is a folder: probe.safetensors (mean, std, weight [d] and bias, float64) and probe.json (hook,
position, method, C, metrics and the model's identity, see models/identity.py). Loading or scoring with
another model, or asking for another hook, raises ArtifactMismatchError: a direction in one model's
residual stream means nothing in another's.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from mechscope.errors import (
    ArtifactMismatchError,
    CorruptFileError,
    HookNameError,
    InputError,
    OutputNotWritableError,
    unknown_name_message,
)
from mechscope.fileio import atomic_write_bytes, atomic_write_json
from mechscope.models.identity import model_identity, same_model
from mechscope.probes.activations import (
    Position,
    check_labels,
    check_position,
    check_texts,
    collect,
    group_ids,
)
from mechscope.probes.linear import (
    DEFAULT_C,
    LinearFit,
    Method,
    check_C,
    check_method,
    cross_validate,
    fit_linear,
    group_scores,
)

FORMAT = "mechscope.probe"
VERSION = 1
WEIGHTS, META = "probe.safetensors", "probe.json"


@dataclass
class Probe:
    """A linear probe on one hook at one position (see the module docstring)."""

    hook: str
    position: Position
    method: Method
    fit: LinearFit
    model: dict[str, Any]  # model_identity() of the model (or store) it was fitted on
    cv_auroc: float | None = None
    cv_accuracy: float | None = None
    n_train: int = 0
    info: dict[str, Any] = field(default_factory=dict)

    @property
    def direction(self) -> torch.Tensor:
        """[d] float32: the probe's direction in the raw activation space (weight / std), e.g. for steering."""
        return (self.fit.weight / self.fit.std).float()

    @property
    def C(self) -> float | None:
        return self.fit.C

    def check_model(self, model) -> None:
        """ArtifactMismatchError unless `model` is the model this probe was fitted on."""
        key = same_model(self.model, model_identity(model))
        if key is not None:
            raise ArtifactMismatchError(
                f"This probe was fitted on {self.model.get('name')!r} ({key} {self.model.get(key)}), not on the "
                f"model given ({model.cfg.model_name!r}); a direction in one model's activations means nothing in "
                "another's. Fit a new probe on this model (probes.fit).")

    def score_activations(self, X: torch.Tensor) -> torch.Tensor:
        """[n, d] activations (rows as this probe reads them) -> [n] float32 logits."""
        X = torch.as_tensor(X)
        d = self.fit.weight.shape[0]
        if X.dim() != 2 or X.shape[1] != d:
            raise InputError(f"This probe reads {d}-dimensional rows of {self.hook}; got shape {tuple(X.shape)}.")
        return self.fit.score(X.cpu()).float()

    def score(self, model, texts, batch_size: int = 32) -> torch.Tensor:
        """[n] float32 logits for `texts` (higher = more like label 1; > 0 predicts 1). For position "all"
        a text's score is the mean over its tokens."""
        self.check_model(model)
        texts = check_texts(texts)
        feats = collect(model, texts, [self.hook], self.position, batch_size)
        s = self.score_activations(feats.rows[self.hook])
        return group_scores(s.double(), feats.text_of, len(texts)).float() if feats.text_of is not None else s

    def predict(self, model, texts, batch_size: int = 32) -> torch.Tensor:
        """[n] long 0/1 predictions."""
        return (self.score(model, texts, batch_size) > 0).long()

    # ------------------------------------------------------------------ files
    def save(self, folder: str | os.PathLike) -> Path:
        """Write probe.safetensors + probe.json into `folder` (created), each atomically."""
        from safetensors.torch import save

        folder = Path(folder)
        try:
            folder.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise OutputNotWritableError(f"Cannot create the probe folder {folder}: {e}.") from e
        f = self.fit
        # float64, as fitted: a loaded probe scores bit for bit like the saved one
        tensors = {"mean": f.mean.double().contiguous(), "std": f.std.double().contiguous(),
                   "weight": f.weight.double().contiguous(), "bias": torch.tensor([f.bias], dtype=torch.float64)}
        meta = {"format": FORMAT, "version": VERSION, "hook": self.hook, "position": self.position,
                "method": self.method, "C": f.C, "model": self.model, "cv_auroc": self.cv_auroc,
                "cv_accuracy": self.cv_accuracy, "n_train": self.n_train, "d": int(f.weight.shape[0]),
                "normalisation": "standardise (x - mean) / std, mean and std of the training rows",
                "info": self.info}
        atomic_write_bytes(folder / WEIGHTS, save(tensors))
        atomic_write_json(folder / META, meta)
        return folder

    def __repr__(self) -> str:
        cv = f", cv AUROC {self.cv_auroc:.3f}" if self.cv_auroc is not None else ""
        return (f"Probe({self.method} on {self.hook} at {self.position!r}, d={self.fit.weight.shape[0]}, "
                f"C={self.fit.C}{cv}, model {self.model.get('name')!r})")


def load(folder: str | os.PathLike, model=None, hook: str | None = None) -> Probe:
    """Read a saved probe. With `model`, refuse a probe fitted on another model; with `hook`, refuse a probe of
    another hook (both ArtifactMismatchError)."""
    from safetensors import SafetensorError, safe_open

    folder = Path(folder)
    if not (folder / META).exists() or not (folder / WEIGHTS).exists():
        raise CorruptFileError(f"{folder} holds no saved probe (needs {META} and {WEIGHTS}); save one with "
                               "probe.save(folder).")
    try:
        meta = json.loads((folder / META).read_text())
        with safe_open(str(folder / WEIGHTS), framework="pt") as f:
            t = {k: f.get_tensor(k) for k in ("mean", "std", "weight", "bias")}
    except (ValueError, SafetensorError, OSError, KeyError) as e:
        raise CorruptFileError(f"Could not read the probe in {folder}: {e}") from e
    if meta.get("format") != FORMAT:
        raise CorruptFileError(f"{folder / META} is not a mechscope probe.")
    if meta.get("version", 0) > VERSION:
        raise CorruptFileError(f"{folder} was written by a newer mechscope (probe version {meta['version']}); upgrade.")
    fit = LinearFit(t["mean"].double(), t["std"].double(), t["weight"].double(), float(t["bias"][0]), meta["C"])
    probe = Probe(meta["hook"], meta["position"], meta["method"], fit, meta["model"], meta.get("cv_auroc"),
                  meta.get("cv_accuracy"), meta.get("n_train", 0), meta.get("info", {}))
    if hook is not None and hook != probe.hook:
        raise ArtifactMismatchError(f"The probe in {folder} reads {probe.hook}, not {hook}; fit a probe on {hook} "
                                    "or drop hook=.")
    if model is not None:
        probe.check_model(model)
    return probe


# ---------------------------------------------------------------------------- fitting


def fit_features(X: torch.Tensor, labels, *, hook: str, position: Position, model: dict[str, Any],
                 method: Method = "logistic", C: float | str = DEFAULT_C, folds: int = 5, seed: int = 0,
                 text_of: torch.Tensor | None = None, groups=None, cross_validated: bool = True) -> Probe:
    """A Probe from activation rows X [n, d] already collected (labels: one per row). `model` is the
    model_identity() of the model they came from; text_of [n] (the text of each row, position "all") and
    groups (a key per text) keep related rows in one cross-validation fold (see linear.cross_validate)."""
    check_method(method)
    check_C(C)
    check_position(position)
    X = torch.as_tensor(X)
    if X.dim() != 2 or X.shape[0] == 0:
        raise InputError(f"Activations must be [n, d] rows, got shape {tuple(X.shape)}.")
    if not bool(torch.isfinite(X).all()):
        raise InputError("The activations contain NaN or inf; drop those rows (or fix the model's dtype) first.")
    y = check_labels(labels, X.shape[0], "activation rows")
    n_texts = X.shape[0] if text_of is None else int(text_of.max()) + 1
    g = group_ids(groups, n_texts)
    cv = cross_validate(X, y, method, C, folds, seed, text_of, g) if cross_validated else None
    fit = fit_linear(X, y, method, C, seed)
    return Probe(hook, position, method, fit, model, None if cv is None else cv.auroc,
                 None if cv is None else cv.accuracy, int(X.shape[0]),
                 {"folds": folds, "seed": seed, "C_asked": C})


def fit(model_or_store, texts_or_labels, labels=None, *, hook: str, position: Position = "last",
        method: Method = "logistic", C: float | str = DEFAULT_C, folds: int = 5, seed: int = 0,
        groups=None, batch_size: int = 32, max_rows: int | None = None, cross_validated: bool = True,
        progress: bool = False) -> Probe:
    """Fit a probe.

    fit(model, texts, labels, hook=..., position="last"|"mean"|"all", method="logistic"|"diffmeans"):
    on labelled prompts (labels: a list or tensor of 0/1, 1 = the property).
    fit(store, labels, hook=...): on the rows of an ActivationStore (labels: one per stored token, or a
    function of the stored token ids [N] returning them), position "all" (every stored token is a row).

    groups: optional, one key per text (e.g. LabelledDataset.groups): texts sharing a key stay in one
    cross-validation fold, so a true statement and its false twin are never split between training and test.
    C: the logistic probe's inverse L2 strength (scikit-learn's convention) or "cv" (default) to choose it by
    an inner cross-validation. The probe's cv_auroc / cv_accuracy come from a k-fold cross-validation of the
    whole recipe (C choice included), so they are held-out numbers.
    """
    from mechscope.data.harvest import check_hooks
    from mechscope.data.store import ActivationStore

    if isinstance(model_or_store, ActivationStore):
        store = model_or_store
        if labels is not None:
            raise InputError("fit(store, labels, hook=...) takes the labels second (a store holds no texts).")
        labels = texts_or_labels
        if hook not in store.hooks:
            raise HookNameError(unknown_name_message("hook in this store", hook, store.hooks))
        X = store.load(hook, max_rows)
        if callable(labels):
            batches = store.batches(1 << 16, hooks=[hook], shuffle=False, with_tokens=True)
            tokens = torch.cat([b["tokens"] for b in batches])[:X.shape[0]]
            labels = labels(tokens.long())
        elif max_rows is not None:
            labels = torch.as_tensor(labels)[:max_rows]
        return fit_features(X.float(), labels, hook=hook, position="all", model=store.manifest["model"],
                            method=method, C=C, folds=folds, seed=seed, groups=groups, cross_validated=cross_validated)
    model = model_or_store
    texts = check_texts(texts_or_labels)
    if labels is None:
        raise InputError("fit(model, texts, labels, hook=...) needs the labels (one 0/1 per text).")
    y = check_labels(labels, len(texts))
    check_method(method)
    check_C(C)
    check_hooks(model, [hook])  # an unknown (or not position-wise) hook fails here, before any forward
    feats = collect(model, texts, [hook], position, batch_size, progress)
    X = feats.rows[hook]
    y_rows = y if feats.text_of is None else y[feats.text_of]
    return fit_features(X, y_rows, hook=hook, position=position, model=model_identity(model), method=method,
                        C=C, folds=folds, seed=seed, text_of=feats.text_of, groups=groups, cross_validated=cross_validated)


__all__ = ["Probe", "fit", "fit_features", "load"]
