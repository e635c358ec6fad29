"""`mechscope probe`: fit a probe (--hook) or sweep every layer (default) on a built-in labelled dataset or a
JSONL file of {"text": ..., "label": 0|1[, "group": ...]}, print the table, save probe + plot, cached.

    mechscope probe --dataset cities --out runs/cities            # layer sweep, held-out split scored too
    mechscope probe --dataset sentiment --hook blocks.12.hook_resid_post --out runs/sent

Output folder: sweep.png + sweep.json (sweep mode), probe/ (the best layer's probe, or the --hook one) and
step.json (mechscope.steps): rerunning with the same settings and model prints the saved result.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from mechscope.errors import CorpusNotFoundError, InputError
from mechscope.probes import datasets
from mechscope.probes.activations import check_labels
from mechscope.probes.metrics import accuracy, auroc
from mechscope.probes.probe import fit
from mechscope.probes.sweep import sweep


def read_jsonl(path: str | Path) -> datasets.LabelledDataset:
    """A labelled dataset from a JSONL file, one {"text", "label"[, "group"]} object per line."""
    path = Path(path)
    if not path.exists():
        raise CorpusNotFoundError(f"No such labelled data file: {path}.")
    texts, labels, groups = [], [], []
    for i, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            texts.append(str(row["text"]))
            labels.append(int(row["label"]))
        except (ValueError, KeyError, TypeError) as e:
            raise InputError(f"{path}:{i}: each line must be a JSON object with \"text\" and a 0/1 \"label\" "
                             f"({e}).") from e
        groups.append(str(row.get("group", f"#{i}")))
    check_labels(labels, len(texts))
    return datasets.LabelledDataset(path.stem, "all", texts, labels, groups)


def probe_command(args: Any) -> dict[str, Any]:
    """Run `mechscope probe` for parsed `args` (see cli.py); returns the summary it printed."""
    from mechscope.models.identity import model_identity
    from mechscope.models.loading import load_model
    from mechscope.steps import done, mark_done, step_key

    if (args.dataset is None) == (args.data is None):
        raise InputError(f"Give exactly one of --dataset ({', '.join(datasets.names())}) or --data FILE.jsonl.")
    if args.dataset is not None:
        train, test = datasets.load(args.dataset, "train"), datasets.load(args.dataset, "test")
    else:
        train, test = read_jsonl(args.data), None
    C = args.C if args.C == "cv" else float(args.C)
    layers = None if args.layers is None else [int(v) for v in args.layers.split(",") if v]
    model = load_model(args.model, device=args.device)
    out = Path(args.out)
    settings = {"dataset": args.dataset, "data": None if args.data is None else str(Path(args.data).resolve()),
                "texts": train.texts, "labels": train.labels, "hook": args.hook, "position": args.position,
                "method": args.method, "C": C, "folds": args.folds, "seed": args.seed, "layers": layers}
    key = step_key(settings, {"model": model_identity(model)})
    record = done(out, key)
    if record is not None:
        print((out / "summary.txt").read_text() if (out / "summary.txt").exists() else record.result)
        print(f"(cached in {out}; delete {out / 'step.json'} to recompute)")
        return record.result
    t0 = time.perf_counter()
    progress = not args.no_progress
    test_kw = {"test_texts": test.texts, "test_labels": test.labels} if test is not None else {}
    if args.hook is None:
        sw = sweep(model, train.texts, train.labels, position=args.position, method=args.method, layers=layers,
                   C=C, folds=args.folds, seed=args.seed, groups=train.groups, batch_size=args.batch_size,
                   progress=progress, **test_kw)
        p = sw.probe(sw.best_layer)
        lines = [f"probe sweep  {train.name}: {sw.n} texts{f', held-out {sw.n_test}' if test else ''}; "
                 f"{args.method} at {args.position!r}", sw.table(),
                 f"best layer {sw.best_layer}: cv AUROC {sw.best_auroc:.3f}"
                 + (f", held-out AUROC {float(sw.test_auroc[sw.best_index]):.3f}" if test else "")]
        out.mkdir(parents=True, exist_ok=True)
        sw.plot().save(out / "sweep.png")
        result = sw.to_dict()
    else:
        p = fit(model, train.texts, train.labels, hook=args.hook, position=args.position, method=args.method,
                C=C, folds=args.folds, seed=args.seed, groups=train.groups, batch_size=args.batch_size,
                progress=progress)
        result = {"hook": p.hook, "cv_auroc": p.cv_auroc, "cv_accuracy": p.cv_accuracy, "C": p.C}
        lines = [f"probe  {p.hook} ({args.method} at {args.position!r}, C={p.C}): cv AUROC {p.cv_auroc:.3f}, "
                 f"cv accuracy {p.cv_accuracy:.3f} on {p.n_train} rows"]
        if test is not None:
            s = p.score(model, test.texts, args.batch_size)
            result |= {"test_auroc": auroc(s, test.labels), "test_accuracy": accuracy(s, test.labels)}
            lines.append(f"held-out  {len(test)} texts: AUROC {result['test_auroc']:.3f}, accuracy "
                         f"{result['test_accuracy']:.3f}")
    p.save(out / "probe")
    lines.append(f"saved  {out / 'probe'}" + ("" if args.hook else f", {out / 'sweep.png'}"))
    text = "\n".join(lines)
    print(text)
    from mechscope.fileio import atomic_write_bytes

    atomic_write_bytes(out / "summary.txt", (text + "\n").encode())
    mark_done(out, key, result, seconds=time.perf_counter() - t0)
    return result


__all__ = ["probe_command", "read_jsonl"]
