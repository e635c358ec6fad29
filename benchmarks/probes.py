"""Probe layer sweeps on a real model (the README "Probes" table): for each built-in dataset, a logistic
probe on every layer's resid_post at the last token, 5-fold cross-validated on the training split (folds
grouped by item, so a statement's false twin is never in the other fold) and scored on the held-out split
(items never seen in training). Peer: scikit-learn's LogisticRegression at the best layer, same
standardised features and the same C.

    python benchmarks/probes.py [--model smollm2] [--datasets cities,sentiment] [--out runs/probes]

Cost on SmolLM2, 2 busy CPU cores: ~1 s of forward per dataset, then ~5 s of fitting per layer (nested CV
over the C grid), so ~3 min per dataset.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent


def main() -> None:
    sys.path.insert(0, str(HERE))
    from common import print_header, print_row

    from mechscope import HookedTransformer, probes

    p = argparse.ArgumentParser()
    p.add_argument("--model", default="smollm2")
    p.add_argument("--datasets", default="cities,sentiment")
    p.add_argument("--position", default="last")
    p.add_argument("--out", default=None, help="save each sweep's plot (PNG + JSON) here")
    p.add_argument("--threads", type=int, default=1, help="1 is fastest on a shared 2-core machine")
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    model = HookedTransformer.from_pretrained(a.model)
    rows = []
    for name in a.datasets.split(","):
        train, test = probes.datasets.load(name), probes.datasets.load(name, "test")
        t0 = time.perf_counter()
        sw = probes.sweep(model, train.texts, train.labels, position=a.position, method="logistic",
                          groups=train.groups, test_texts=test.texts, test_labels=test.labels)
        seconds = time.perf_counter() - t0
        print(f"\n{name}: {len(train)} train / {len(test)} held-out texts, {sw.method} probe at {sw.position!r}, "
              f"{seconds:.0f}s")
        print(sw.table())
        if a.out:
            sw.plot(title=f"{name}: probe AUROC per layer ({a.model})").save(Path(a.out) / f"{name}.png")
        best = sw.best_index
        peer = sklearn_auroc(model, sw.probe(sw.best_layer), train, test)
        rows.append((name, sw, best, peer))
    print()
    print_header("ours", "sklearn")
    for name, sw, best, peer in rows:
        layer = sw.layers[best]
        print_row(f"{name} best layer (cv AUROC)", layer, None, f"{sw.best_auroc:.3f}")
        print_row(f"{name} held-out AUROC at layer {layer}", float(sw.test_auroc[best]), peer)
        diff = abs(float(sw.test_auroc[best]) - peer) if peer is not None else None
        print_row(f"{name} |ours - sklearn| (<= 1e-3)", diff, 0.0,
                  None if diff is None else ("ok" if diff <= 1e-3 else "FAIL"))
        top = int(torch.argmax(sw.test_auroc))
        print_row(f"{name} best held-out AUROC (layer {sw.layers[top]})", float(sw.test_auroc[top]), None, "-")


def sklearn_auroc(model, probe, train, test) -> float | None:
    """scikit-learn's LogisticRegression on the same standardised activations, at the probe's C."""
    try:
        from sklearn.linear_model import LogisticRegression
        from sklearn.metrics import roc_auc_score
    except ImportError:
        return None
    from mechscope import probes

    Xtr = probes.collect(model, train.texts, [probe.hook], probe.position).rows[probe.hook].double()
    Xte = probes.collect(model, test.texts, [probe.hook], probe.position).rows[probe.hook].double()
    f = probe.fit
    ref = LogisticRegression(C=f.C, max_iter=10_000, tol=1e-10).fit(((Xtr - f.mean) / f.std).numpy(), train.labels)
    return float(roc_auc_score(test.labels, ref.decision_function(((Xte - f.mean) / f.std).numpy())))


if __name__ == "__main__":
    main()
