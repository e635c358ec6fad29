"""Layer sweep: the same probe recipe on every layer's residual stream, read in one forward per batch.

    sw = sweep(model, texts, labels, position="last", method="logistic")
    sw.auroc                 # [n_layers] k-fold cross-validated (held-out) AUROC per layer
    sw.best_layer, sw.best_auroc
    sw.plot().save("sweep.png"); print(sw.table())
    sw.probe(sw.best_layer)  # the Probe of that layer, fitted on all the data

With test_texts / test_labels (e.g. a dataset's held-out split) each layer's probe, fitted on all of
`texts`, is also scored on them: sw.test_auroc, sw.test_accuracy.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from mechscope.errors import InputError
from mechscope.models.identity import model_identity
from mechscope.probes.activations import Position, check_labels, check_position, check_texts, collect
from mechscope.probes.linear import DEFAULT_C, Method, check_C, check_method, group_scores
from mechscope.probes.metrics import accuracy, auroc
from mechscope.probes.probe import Probe, fit_features


@dataclass
class Sweep:
    """Per-layer probe metrics (index i = hooks[i], usually blocks.{i}.hook_resid_post)."""

    hooks: list[str]
    layers: list[int]
    position: str
    method: str
    auroc: torch.Tensor  # [n_layers] cross-validated AUROC
    accuracy: torch.Tensor  # [n_layers] cross-validated accuracy
    C: list[float | None]  # the C each layer's full-data probe used
    n: int  # labelled texts
    test_auroc: torch.Tensor | None = None  # [n_layers] on test_texts, if given
    test_accuracy: torch.Tensor | None = None
    n_test: int = 0
    probes: list[Probe] = field(default_factory=list, repr=False)

    @property
    def best_index(self) -> int:
        return int(torch.argmax(torch.nan_to_num(self.auroc, nan=-1.0)))

    @property
    def best_layer(self) -> int:
        """The layer with the highest cross-validated AUROC (the first one on ties)."""
        return self.layers[self.best_index]

    @property
    def best_auroc(self) -> float:
        return float(self.auroc[self.best_index])

    def probe(self, layer: int) -> Probe:
        """The probe of `layer`, fitted on all the sweep's texts."""
        if layer not in self.layers:
            raise InputError(f"Layer {layer} was not swept; the sweep covers layers {self.layers}.")
        return self.probes[self.layers.index(layer)]

    def table(self) -> str:
        """A plain-text table, one line per layer (the best marked with *)."""
        head = "layer  cv_auroc  cv_acc" + ("  test_auroc  test_acc" if self.test_auroc is not None else "")
        lines = [head]
        for i, layer in enumerate(self.layers):
            row = f"{layer:5d}  {float(self.auroc[i]):8.3f}  {float(self.accuracy[i]):6.3f}"
            if self.test_auroc is not None:
                row += f"  {float(self.test_auroc[i]):10.3f}  {float(self.test_accuracy[i]):8.3f}"
            lines.append(row + ("  *" if i == self.best_index else ""))
        return "\n".join(lines)

    def to_dict(self) -> dict[str, Any]:
        def lst(t):
            return None if t is None else [float(v) for v in t]

        return {"hooks": self.hooks, "layers": self.layers, "position": self.position, "method": self.method,
                "auroc": lst(self.auroc), "accuracy": lst(self.accuracy), "C": self.C, "n": self.n,
                "test_auroc": lst(self.test_auroc), "test_accuracy": lst(self.test_accuracy),
                "n_test": self.n_test, "best_layer": self.best_layer, "best_auroc": self.best_auroc}

    def plot(self, title: str | None = None):
        """A viz Plot (PNG + data) of AUROC per layer."""
        from mechscope.viz.plots import probe_sweep_curve

        return probe_sweep_curve(self, title=title)


def sweep(model, texts: Sequence[str], labels, *, position: Position = "last", method: Method = "logistic",
          hook: str = "hook_resid_post", layers: Sequence[int] | None = None, C: float | str = DEFAULT_C,
          folds: int = 5, seed: int = 0, groups=None, batch_size: int = 32, test_texts: Sequence[str] | None = None,
          test_labels=None, progress: bool = False) -> Sweep:
    """Fit and cross-validate a probe on `blocks.{l}.{hook}` for every layer l (or `layers`), reading all the
    layers in one forward pass per batch (see the module docstring). groups: one key per text, kept in one
    cross-validation fold (see probes.fit)."""
    texts = check_texts(texts)
    y = check_labels(labels, len(texts))
    check_position(position)
    check_method(method)
    check_C(C)
    from mechscope.data.harvest import check_hooks

    layers = list(range(model.cfg.n_layers)) if layers is None else [int(v) for v in layers]
    hooks = [f"blocks.{layer}.{hook}" for layer in layers]
    check_hooks(model, hooks)
    test = None
    if test_texts is not None or test_labels is not None:
        test_texts = check_texts(test_texts if test_texts is not None else [])
        test = (test_texts, check_labels(test_labels, len(test_texts), "test texts"))
    ident = model_identity(model)
    feats = collect(model, texts, hooks, position, batch_size, progress)
    test_feats = collect(model, test[0], hooks, position, batch_size, progress) if test else None
    y_rows = y if feats.text_of is None else y[feats.text_of]
    it = range(len(hooks))
    if progress:
        from tqdm.auto import tqdm

        it = tqdm(it, desc="probe sweep", unit="layer")
    probes, aucs, accs, t_aucs, t_accs = [], [], [], [], []
    for i in it:
        h = hooks[i]
        p = fit_features(feats.rows[h], y_rows, hook=h, position=position, model=ident, method=method, C=C,
                         folds=folds, seed=seed, text_of=feats.text_of, groups=groups)
        probes.append(p)
        aucs.append(p.cv_auroc)
        accs.append(p.cv_accuracy)
        if test_feats is not None:
            s = p.score_activations(test_feats.rows[h]).double()
            if test_feats.text_of is not None:
                s = group_scores(s, test_feats.text_of, len(test[0]))
            t_aucs.append(auroc(s, test[1]))
            t_accs.append(accuracy(s, test[1]))
    as_t = lambda v: torch.tensor(v, dtype=torch.float64)  # noqa: E731
    return Sweep(hooks, layers, position, method, as_t(aucs), as_t(accs), [p.C for p in probes], len(texts),
                 as_t(t_aucs) if test else None, as_t(t_accs) if test else None, len(test[0]) if test else 0,
                 probes)


__all__ = ["Sweep", "sweep"]
