"""The report's "act on what you found" stages: a probe layer sweep, causal-tracing heatmaps, a ROME edit.

Each is a function `(model, folder, ...) -> JSON-able dict` run by report/pipeline.py under a cache key, like
the other stages; sizes are small (the report's first run must stay within its time budget): the commands
`mechscope probe`, `mechscope trace` and `mechscope edit` take bigger ones.

    probes_stage   the built-in true/false set (default `cities`): a logistic probe on every `layer_step`-th
                   layer's resid_post, cross-validated on the train split and scored on the held-out split
    trace_stage    the first `n_facts` built-in facts the model knows, traced for resid / MLP / attention
                   with `samples` noise draws on every `layer_step`-th layer, averaged (positions by role)
    edit_stage     ROME on one built-in fact (The Eiffel Tower -> Rome): P(old), P(new) and greedy continuations
                   before / after, CounterFact's efficacy / generalisation / specificity; undone afterwards
                   (the weights come back bit for bit, checked), so nothing after it sees the edited model
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from mechscope.errors import InputError

EDIT_SUBJECT = "The Eiffel Tower"  # the built-in edit request shown (edit.requests: -> " Rome", old " Paris")
EDIT_NEW_TOKENS = 8  # greedy continuation length shown before / after the edit


def swept_layers(n_layers: int, step: int) -> list[int]:
    """0, step, 2 step, ... and always the last layer."""
    layers = list(range(0, n_layers, step))
    return layers if layers[-1] == n_layers - 1 else [*layers, n_layers - 1]


def probes_stage(model, folder: Path, *, dataset: str, layer_step: int, seed: int, progress: bool) -> dict[str, Any]:
    """Sweep a logistic probe over the residual stream (last token) of a built-in labelled set; plot + probe."""
    from mechscope import probes

    train, test = probes.datasets.load(dataset), probes.datasets.load(dataset, split="test")
    layers = swept_layers(model.cfg.n_layers, layer_step)
    sw = probes.sweep(model, train.texts, train.labels, position="last", method="logistic", layers=layers,
                      groups=train.groups, test_texts=test.texts, test_labels=test.labels, seed=seed,
                      progress=progress)
    sw.plot(title=f"Probe AUROC per layer: {dataset} (logistic, last token)").save(folder / "sweep.png")
    sw.probe(sw.best_layer).save(folder / "probe")
    examples = [[t, int(y)] for t, y in zip(train.texts[:4], train.labels[:4])]
    return sw.to_dict() | {"dataset": dataset, "n_train": len(train), "n_test": len(test), "examples": examples,
                           "table": sw.table()}


def trace_stage(model, folder: Path, *, n_facts: int, samples: int, layer_step: int, seed: int,
                progress: bool) -> dict[str, Any]:
    """Causal traces (resid, MLP, attention) of built-in facts, averaged; a PNG + JSON per kind."""
    from mechscope.circuits import average_traces, causal_trace
    from mechscope.circuits.facts import FACTS, known_facts
    from mechscope.fileio import atomic_write_json

    known = known_facts(model)
    facts = known[:n_facts]
    n_known = len(facts)
    if n_known < n_facts:  # a model that knows few of them (a tiny test model): trace its own answers anyway
        facts += [f for f in FACTS if f not in known][:n_facts - n_known]
    layers = swept_layers(model.cfg.n_layers, layer_step)
    jobs = [(kind, f) for kind in ("resid", "mlp", "attn") for f in facts]
    if progress:
        from tqdm.auto import tqdm

        jobs = tqdm(jobs, desc="causal traces", unit="trace")
    traces: dict[str, list] = {"resid": [], "mlp": [], "attn": []}
    for kind, f in jobs:  # one batched causal_trace per (kind, fact): each is already many restorations
        traces[kind].append(causal_trace(model, f.prompt, f.subject, kind=kind, samples=samples, layers=layers,
                                         seed=seed))
    out: dict[str, Any] = {}
    for kind, ts in traces.items():
        avg = average_traces(ts)
        avg.save(folder, f"average_{kind}")
        layer, bucket, value = avg.peak
        ls_layer, ls_value = avg.peak_in("last subject token")
        out[kind] = {"window": avg.window, "labels": list(avg.labels), "layers": avg.layers, "counts": avg.counts,
                     "effects": avg.effects.tolist(),
                     "peak": {"layer": layer, "position": bucket, "effect": value},
                     "peak_last_subject": {"layer": ls_layer, "effect": ls_value}}
    first = traces["resid"][0]
    first.save(folder, "example_resid")
    atomic_write_json(folder / "traces.json", {k: [t.to_dict() for t in ts] for k, ts in traces.items()})
    rows = traces["resid"]
    return {"n_facts": len(facts), "n_known": n_known, "samples": samples, "layer_step": layer_step,
            "layers": layers, "kinds": out, "example": {"prompt": first.prompt, "subject": first.subject,
                                                        "target": first.target_str},
            "facts": [{"prompt": t.prompt, "subject": t.subject, "answer": t.target_str, "p_clean": t.p_clean,
                       "p_corrupted": t.p_corrupted} for t in rows],
            "p_clean": sum(t.p_clean for t in rows) / len(rows),
            "p_corrupted": sum(t.p_corrupted for t in rows) / len(rows)}


def _scores(model, req) -> dict[str, Any]:
    from mechscope.edit import evaluate_edits

    return evaluate_edits(model, [req])["rows"][0]


def edit_stage(model, folder: Path, *, cov_tokens: int, seed: int) -> dict[str, Any]:
    """ROME on one fact; before/after probabilities, continuations and scores; then undone (checked exact)."""
    from mechscope import edit
    from mechscope.edit.edits import down_weight

    reqs = [r for r in edit.requests.load() if r.subject == EDIT_SUBJECT]
    if not reqs:
        raise InputError(f"The built-in edit requests have no fact about {EDIT_SUBJECT!r}.")
    req = reqs[0]
    prompts = [req.prompt, *req.paraphrases[:1], *req.neighbours[:1]]
    roles = ["edit prompt", "paraphrase", "neighbour (other subject)"][:len(prompts)]
    with torch.no_grad():
        before = _scores(model, req)
        gen_before = model.generate(prompts, EDIT_NEW_TOKENS)
    e = edit.rome(model, prompt=req.prompt, subject=req.subject, target=req.target, cov_tokens=cov_tokens,
                  cov_cache_dir=folder / "cov", seed=seed)
    layer = e.layers[0]
    original = e.originals[layer]
    try:
        with torch.no_grad():
            after = _scores(model, req)
            gen_after = model.generate(prompts, EDIT_NEW_TOKENS)
        norm = float(e.deltas[layer].norm())
    finally:
        e.undo()  # later stages (and the user's model) see the original weights
    exact = bool(torch.equal(down_weight(model, layer).detach(), original))
    if not exact:
        raise RuntimeError("The ROME edit was not undone bit for bit; this is a bug in mechscope.edit.")
    return {"prompt": req.prompt, "subject": req.subject, "target": req.target, "old": req.old, "layer": layer,
            "cov_tokens": cov_tokens, "update_norm": norm, "target_nll": e.info.get("nll"),
            "value_steps": e.info.get("steps"),
            "paraphrases": req.paraphrases, "neighbours": req.neighbours, "before": before, "after": after,
            "generations": [{"role": r, "prompt": p, "before": b, "after": a}
                            for r, p, b, a in zip(roles, prompts, gen_before, gen_after)],
            "undone_exactly": exact}


__all__ = ["edit_stage", "probes_stage", "swept_layers", "trace_stage"]
