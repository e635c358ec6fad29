"""Probes: read a concept out of a model's activations with a linear classifier.

    from mechscope import probes
    ds = probes.datasets.load("cities")                      # built-in labelled statements (+ split="test")
    p = probes.fit(m, ds.texts, ds.labels, hook="blocks.12.hook_resid_post", position="last")
    p.score(m, texts)                                        # [n] logits, higher = more like label 1
    sw = probes.sweep(m, ds.texts, ds.labels)                # sw.auroc [n_layers], cross-validated
    p.save(d); probes.load(d, model=m)                       # refuses a probe of another model

One concept per module: datasets (labelled texts), activations (what a probe reads), linear (standardise,
logistic / difference-of-means, cross-validation), metrics (AUROC, accuracy), probe (Probe, fit, save,
load), sweep (every layer in one forward per batch).
"""

from mechscope.probes import datasets
from mechscope.probes.activations import POSITIONS, Features, collect
from mechscope.probes.linear import C_GRID, METHODS, CVResult, LinearFit, cross_validate, fit_linear
from mechscope.probes.metrics import accuracy, auroc
from mechscope.probes.probe import Probe, fit, fit_features, load
from mechscope.probes.sweep import Sweep, sweep

__all__ = ["C_GRID", "CVResult", "Features", "LinearFit", "METHODS", "POSITIONS", "Probe", "Sweep", "accuracy",
           "auroc", "collect", "cross_validate", "datasets", "fit", "fit_features", "fit_linear", "load",
           "sweep"]
