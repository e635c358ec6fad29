"""The one-page HTML report of `mechscope report`, rendered from the stages' JSON results and PNGs.

Everything is inline (images as data: URIs) so index.html can be mailed alone; the feature dashboards it
links to live next to it under artifacts/dashboards/ (relative links).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from mechscope.viz.html import (
    Cell,
    Markup,
    esc,
    figure_img,
    filter_box,
    fmt_num,
    page,
    section,
    table,
    write_page,
)
from mechscope.viz.report_acting import edit_section, probes_section, trace_section

__all__ = ["render_report", "score_histogram"]

_CSS_EXTRA = """
.grid2 { display: flex; flex-wrap: wrap; gap: 1em; } .grid2 > div { flex: 1 1 420px; min-width: 0; }
img.fig { max-width: 100%; height: auto; } .big { font-size: 1.6em; font-weight: 600; }
.gen { font-family: monospace; white-space: pre-wrap; background: #f6f6f6; padding: .5em; }
nav a { margin-right: 1em; }
"""
NOT_RUN = {"skipped": "not run"}


def _img(path: Path, alt: str) -> Markup:
    return figure_img(path.read_bytes(), alt) if path.exists() else Markup(f"<p>(missing {esc(path.name)})</p>")


def score_histogram(scores: dict[str, list[float]]):
    """A matplotlib figure: distribution of detection balanced accuracy per unit kind (SAE vs neurons)."""
    import numpy as np
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6.4, 3.2))
    ax = fig.add_subplot(1, 1, 1)
    bins = np.linspace(0, 1, 21)
    for name, vals in scores.items():
        ax.hist(vals, bins=bins, alpha=0.55, label=f"{name} (n={len(vals)})")
    ax.axvline(0.8, color="k", lw=1, ls="--")
    ax.set_xlabel("detection balanced accuracy of the offline explanation")
    ax.set_ylabel("units")
    ax.legend()
    fig.tight_layout()
    return fig


def _model_card(r: dict[str, Any]) -> Markup:
    cfg = r["config"]
    keys = ["d_model", "n_layers", "n_heads", "n_kv_heads", "d_head", "d_mlp", "d_vocab", "n_ctx", "normalization",
            "positional", "act_fn", "gated_mlp"]
    rows = [["model", r["name"]], ["architecture", r["architecture"]], ["parameters", f"{r['parameters']:,}"],
            ["hook points", r["n_hook_points"]]] + [[k, str(cfg[k])] for k in keys if k in cfg]
    hooks = table(["hook name", "shape (batch 1 × 8 tokens)"],
                  [[h["name"], str(h["shape"]) if h["shape"] else "computed only when hooked"] for h in r["hooks"]])
    return Markup("<div class='grid2'><div>" + table(None, rows) + "</div><div>" + hooks + "</div></div>")


def _lens(r: dict[str, Any], folder: Path) -> Markup:
    parts = ["<p>Each layer's residual stream decoded with the final norm and unembedding (logit lens"
             + (", and a tuned lens" if r.get("tuned") else "") + "): the top token for the last position "
             "and the KL divergence to the model's own output.</p>"]
    for p in r["prompts"]:
        labels = p["labels"]
        step = max(1, len(labels) // 10)
        idx = list(range(0, len(labels), step)) + ([len(labels) - 1] if (len(labels) - 1) % step else [])
        parts.append(f"<h3>{esc(p['prompt'])}</h3>")
        parts.append(table(["layer"] + [labels[i] for i in idx],
                           [["top-1"] + [repr(p["top1"][i]) for i in idx],
                            ["KL (nats)"] + [round(p["kl"][i], 2) for i in idx]]))
    parts.append("<div class='grid2'><div>" + _img(folder / "lens_prompt0.png", "logit lens table") + "</div><div>"
                 + _img(folder / "lens_kl.png", "KL to final per layer") + "</div></div>")
    parts.append(f"<p>KL curve over {r['n_tokens']} held-out tokens; the model's own cross-entropy there is "
                 f"{r['model_ce']:.3f} nats.</p>")
    return Markup("".join(parts))


def _heads(r: dict[str, Any], folder: Path) -> Markup:
    cols = []
    for kind in ("induction", "previous_token"):
        top = ", ".join(f"{h} {v:.2f}" for h, v in r[kind]["top"])
        cols.append(f"<div>{_img(folder / f'{kind}.png', kind)}<p>Top heads: {esc(top)}</p></div>")
    return Markup("<p>Attention of every head on repeated random token sequences (induction: attend to the "
                  "token after the previous occurrence; previous-token: attend to position − 1).</p>"
                  "<div class='grid2'>" + "".join(cols) + "</div>")


def _ioi(r: dict[str, Any], folder: Path) -> Markup:
    c = r["circuit"]
    res = c["results"]
    rows = [[a, v["faithfulness"], v["faithfulness_normalized"], v["completeness"]] for a, v in res.items()]
    heads = ", ".join(f"{h} {v:+.2f}" for h, v in r["top_heads"])
    return Markup(
        f"<p>Indirect object identification on {r['n_prompts']} prompts, e.g. <q>{esc(r.get('example'))}</q> → "
        f"IO name; corrupted run: <q>{esc(r.get('example_corrupted'))}</q>. Logit difference (IO − S): "
        f"clean <b>{r['logit_diff_clean']:.2f}</b>, corrupted {r['logit_diff_corrupted']:.2f}.</p>"
        f"<p>Heads that matter (patching each head's output from the clean run into the corrupted one, normalised: "
        f"1 = the whole clean logit difference restored): {esc(heads)}.</p>"
        "<div class='grid2'><div>" + _img(folder / "ioi_heads.png", "head patching heatmap") + "</div><div>"
        + _img(folder / "ioi_resid.png", "residual patching heatmap") + "</div></div>"
        f"<h3>The circuit found</h3><p>Edge attribution over the graph of input, heads, MLPs and logits; the top "
        f"edges, pruned to paths from input to logits: {c['n_edges']} edges, {c['n_nodes']} nodes. Exact "
        "edge-level ablation of everything else:</p>"
        + table(["ablation", "faithfulness", "normalised", "completeness"], rows)
        + _img(folder / "ioi_circuit.png", "circuit graph"))


def _sae(r: dict[str, Any], harvest: dict[str, Any], layer_hook: str) -> Markup:
    ev, sp = r["eval"], r["splice"]
    rows = [["hook", layer_hook], ["training tokens", f"{harvest['n_tokens']:,}"], ["steps", r["steps"]],
            ["fraction of variance explained", ev["fve"]], ["L0", ev["l0"]],
            ["dead latents", f"{100 * ev['dead_fraction']:.1f}%"],
            ["CE loss recovered (vs zero ablation)", sp["ce_recovered_zero"]],
            ["CE loss recovered (vs mean ablation)", sp["ce_recovered_mean"]],
            ["ΔCE (nats/token)", sp["delta_ce"]], ["KL(clean ‖ SAE)", sp["kl_sae"]]]
    return table(None, rows)


def _features(feats: dict[str, Any]) -> Markup:
    names = {"sae": "SAE features", "neurons": "MLP neurons (baseline)"}
    summary = [[names[n], f["n_latents"], f["live"], f["scored"], f["above_0.8"], f["mean_score"], f["median_score"]]
               for n, f in feats.items()]
    parts = ["<p>Every live unit gets an offline explanation (the tokens and bigrams that characterise its top "
             "activating contexts against the corpus); the explanation is scored by <b>detection</b> on held-out "
             "text: does it pick out windows where the unit fires from windows where it does not (balanced "
             "accuracy; 0.5 = chance). The neuron baseline is the same analysis on the layer's MLP neurons, "
             "sparsified to the SAE's number of active units per token (top-k).</p>",
             table(["units", "total", "live", "scored", "score > 0.8", "mean score", "median score"], summary)]
    lists = {names[n]: f["scores"] for n, f in feats.items() if f["scores"]}
    if lists:
        parts.append(figure_img(score_histogram(lists), "distribution of detection scores"))
    for n, f in feats.items():
        link = f["index"]
        base = Path(link).parent.as_posix()
        rows, attrs = [], []
        for t in f["top"]:
            href = f"{base}/features/{t['latent']}.html"
            rows.append([Cell(Markup(f'<a href="{esc(href)}">{t["latent"]}</a>'), sort=t["latent"]),
                         t["explanation"], t["score"]])
            attrs.append({"data-search": f"{t['latent']} {t['explanation']}", "data-key": t["latent"]})
        tid = f"top-{n}"
        parts.append(f"<h3>{esc(names.get(n, n))}: best explained (<a href='{esc(link)}'>dashboards</a>)</h3>")
        parts.append(filter_box(tid, "Search explanations…"))
        parts.append(table(["unit", "explanation", "detection score"], rows, sortable=True, id=tid, row_attrs=attrs))
    return Markup("".join(parts))


def _steering(r: dict[str, Any]) -> Markup:
    if "skipped" in r:
        return Markup(f"<p>Skipped: {esc(r['skipped'])}.</p>")
    rows = [["unsteered", Markup(f"<div class='gen'>{esc(r['plain'])}</div>")]]
    rows += [[f"+ {s['multiple']:g} × max act ({s['scale']:.1f})", Markup(f"<div class='gen'>{esc(s['text'])}</div>")]
             for s in r["steered"]]
    return Markup(
        f"<p>Feature {r['latent']} (<q>{esc(r['explanation'])}</q>, detection score {r['score']:.2f}, largest "
        f"activation in the corpus {r['act_max']:.2f}): its decoder direction added to {esc(r['hook'])} at every "
        "position while generating greedily.</p>" + table(["steering", "generation"], rows))


def render_report(results: dict[str, Any], out: str | Path) -> Path:
    """Write OUT/index.html from the stage results (see report/pipeline.py) and the PNGs under OUT/artifacts."""
    out = Path(out)
    art = out / "artifacts"
    card = results["model_card"]
    feats = results["features"]
    sae_n = feats["sae"]["above_0.8"]
    neu_n = feats["neurons"]["above_0.8"]
    sections = [
        ("card", "Model card", _model_card(card)),
        ("lens", "Logit lens", _lens(results["lens"], art / "lens")),
        ("heads", "Attention heads", _heads(results["heads"], art / "heads")),
        ("ioi", "Circuit: indirect object identification", _ioi(results["ioi"], art / "ioi")),
        ("sae", "Sparse autoencoder", _sae(results["sae"], results["harvest"], results["hook"])),
        ("features", "Features and their explanations", _features(feats)),
        ("steering", "Steering with a feature", _steering(results.get("steering", {"skipped": "not run"}))),
        ("probes", "Probes: truth by layer", probes_section(results.get("probes", NOT_RUN), art / "probes")),
        ("trace", "Causal tracing: where facts are recalled", trace_section(results.get("trace", NOT_RUN),
                                                                             art / "trace")),
        ("edit", "Editing a fact (ROME)", edit_section(results.get("edit", NOT_RUN))),
    ]
    if "graph" in results:  # the opt-in attribution-graph stage
        from mechscope.viz.graph_plot import graph_report_section

        sections.append(("graph", "Attribution graph", graph_report_section(results["graph"], art / "graph")))
    nav = "<nav>" + "".join(f"<a href='#{i}'>{esc(t)}</a>" for i, t, _ in sections) + "</nav>"
    head = (f"<h1>mechscope report: {esc(card['name'])}</h1>"
            f"<p class='big'>{sae_n} SAE features with detection score &gt; 0.8 (neuron baseline: {neu_n})</p>"
            f"<p>Built in {fmt_num(results.get('seconds', 0), 3)} s. Artifacts (safetensors, JSON, PNG) are in "
            "<code>artifacts/</code> next to this page; rerunning the same command reuses them.</p>")
    body = head + nav + "".join(section(t, h, id=i) for i, t, h in sections)
    from mechscope.viz.html import BASE_CSS

    return write_page(out / "index.html", page(f"mechscope report: {card['name']}", body, css=BASE_CSS + _CSS_EXTRA))
