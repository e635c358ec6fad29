"""Report page sections of the probe sweep, causal tracing and editing stages (report/acting.py).

Each takes the stage's JSON result and its artifact folder and returns Markup; a skipped stage
({"skipped": why}) renders as one line saying so.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from mechscope.viz.html import Markup, esc, figure_img, table

__all__ = ["edit_section", "probes_section", "trace_section"]


def _img(path: Path, alt: str) -> Markup:
    return figure_img(path.read_bytes(), alt) if path.exists() else Markup(f"<p>(missing {esc(path.name)})</p>")


def _skipped(r: dict[str, Any]) -> Markup | None:
    return Markup(f"<p>Skipped ({esc(r['skipped'])}).</p>") if "skipped" in r else None


def probes_section(r: dict[str, Any], folder: Path) -> Markup:
    """Per-layer cross-validated and held-out AUROC (plot + table), the best layer stated."""
    if (s := _skipped(r)) is not None:
        return s
    best = r["best_layer"]
    i = r["layers"].index(best)
    test = r.get("test_auroc")
    held = f", held-out AUROC <b>{test[i]:.3f}</b>" if test else ""
    ex = "; ".join(f"<q>{esc(t)}</q> ({y})" for t, y in r["examples"][:2])
    rows = []
    for j, layer in enumerate(r["layers"]):
        row = [f"{layer}{' (best)' if layer == best else ''}", round(r["auroc"][j], 3), round(r["accuracy"][j], 3)]
        if test:
            row += [round(test[j], 3), round(r["test_accuracy"][j], 3)]
        rows.append(row)
    head = ["layer", "cv AUROC", "cv accuracy"] + (["held-out AUROC", "held-out accuracy"] if test else [])
    return Markup(
        f"<p>A logistic probe (L2, C chosen by inner cross-validation) on each layer's residual stream at the last "
        f"token, trained on the built-in <code>{esc(r['dataset'])}</code> set ({r['n_train']} labelled statements, "
        f"1 = true, e.g. {ex}): 5-fold cross-validated AUROC (folds grouped by item), and the probe fitted on all "
        f"of them scored on the held-out split ({r['n_test']} statements about unseen items).</p>"
        f"<p class='big'>Best layer {best}: cross-validated AUROC {r['best_auroc']:.3f}{held}</p>"
        "<div class='grid2'><div>" + _img(folder / "sweep.png", "probe AUROC per layer") + "</div><div>"
        + table(head, rows) + "</div></div>"
        "<p>The best layer's probe is saved in <code>artifacts/probes/probe/</code> (<code>probes.load(d, "
        "model=m)</code>); <code>mechscope probe</code> sweeps every layer with any dataset.</p>")


def trace_section(r: dict[str, Any], folder: Path) -> Markup:
    """Average indirect-effect heatmaps per kind, their peaks, and one fact's residual trace."""
    if (s := _skipped(r)) is not None:
        return s
    names = {"resid": "residual stream", "mlp": "MLP outputs", "attn": "attention outputs"}
    rows, imgs = [], []
    for kind, k in r["kinds"].items():
        p, ls = k["peak"], k["peak_last_subject"]
        win = "" if kind == "resid" else f" (window {k['window']})"
        rows.append([names[kind] + win, f"{p['effect']:.3f} at {p['position']}, layer {p['layer']}",
                     f"{ls['effect']:.3f} at layer {ls['layer']}"])
        imgs.append(f"<div>{_img(folder / f'average_{kind}.png', f'average indirect effect, {kind}')}</div>")
    known = (f"{r['n_known']} facts the model knows" if r["n_known"] == r["n_facts"] else
             f"{r['n_facts']} facts ({r['n_known']} of them known to the model; the others trace its own answer)")
    facts = ", ".join(f"<q>{esc(f['prompt'])}</q> →{esc(f['answer'])}" for f in r["facts"][:3])
    ex = r["example"]
    return Markup(
        f"<p>Causal tracing (Meng et al. 2022): the subject's token embeddings are noised (3 × the embedding std, "
        f"{r['samples']} draw(s)), then the clean value of one state is restored and the share of the answer's "
        f"probability that comes back is the indirect effect. Averaged over {known}, e.g. {facts}; positions "
        f"aligned by role, layers {esc(', '.join(map(str, r['layers'])))}. Mean P(answer): clean "
        f"{r['p_clean']:.3f}, subject noised {r['p_corrupted']:.3f}.</p>"
        + table(["restored state", "peak average indirect effect", "peak at the last subject token"], rows)
        + "<div class='grid2'>" + "".join(imgs) + "</div>"
        f"<h3>One fact: <q>{esc(ex['prompt'])}</q> →{esc(ex['target'])} (residual stream)</h3>"
        + _img(folder / "example_resid.png", "causal trace of one fact")
        + "<p>Heatmaps and their numbers: <code>artifacts/trace/average_*.png / .json</code>; every fact's trace in "
        "<code>traces.json</code>. <code>mechscope trace</code> and <code>benchmarks/causal_tracing.py</code> trace "
        "more facts with more samples.</p>")


def edit_section(r: dict[str, Any]) -> Markup:
    """The before/after table of a ROME edit: probabilities, CounterFact scores, greedy continuations."""
    if (s := _skipped(r)) is not None:
        return s
    b, a = r["before"], r["after"]
    old, new = r["old"], r["target"]

    def pct(v: float | None) -> str:
        return "–" if v is None else f"{100 * v:.0f}%"

    rows = [[f"P({old!r}) on the prompt", b["efficacy_p_old"], a["efficacy_p_old"]],
            [f"P({new!r}) on the prompt", b["efficacy_p_new"], a["efficacy_p_new"]]]
    if b.get("generalisation") is not None:
        rows.append([f"P({new!r}), mean over {len(r['paraphrases'])} paraphrases", b["generalisation_p_new"],
                     a["generalisation_p_new"]])
    if b.get("specificity") is not None:
        rows.append([f"P({old!r}), mean over {len(r['neighbours'])} neighbourhood prompts", b["specificity_p_old"],
                     a["specificity_p_old"]])
    rows = [[n, f"{x:.3f}", f"{y:.3f}"] for n, x, y in rows]
    rows += [["efficacy: P(new) > P(old) on the prompt", pct(b["efficacy"]), pct(a["efficacy"])],
             ["generalisation: the same on the paraphrases", pct(b.get("generalisation")), pct(a.get("generalisation"))],
             ["specificity: P(old) > P(new) on the neighbours", pct(b.get("specificity")), pct(a.get("specificity"))]]
    gens = [[g["role"], Markup(f"<div class='gen'>{esc(g['before'])}</div>"),
             Markup(f"<div class='gen'>{esc(g['after'])}</div>")] for g in r["generations"]]
    undone = "restored bit for bit (checked)" if r["undone_exactly"] else "NOT restored exactly"
    return Markup(
        f"<p>ROME (Meng et al. 2022) writes <q>{esc(r['prompt'])}</q> →{esc(new)} (was{esc(old)}) with a rank-one "
        f"update of layer {r['layer']}'s MLP output projection (key covariance from {r['cov_tokens']:,} corpus "
        f"tokens; update norm {r['update_norm']:.2f}). Paraphrases: "
        + "; ".join(f"<q>{esc(p)}</q>" for p in r["paraphrases"]) + ". Neighbourhood prompts (should keep"
        f"{esc(old)}): " + "; ".join(f"<q>{esc(p)}</q>" for p in r["neighbours"]) + ".</p>"
        + table(["", "before", "after"], rows)
        + "<h3>Greedy continuations</h3>" + table(["prompt", "before the edit", "after the edit"], gens)
        + f"<p>The edit was then undone: weights {undone}, so every other section shows the original model. "
        "<code>mechscope edit</code> saves an edited model; <code>benchmarks/editing.py</code> scores 25 facts.</p>")
