"""ROME and MEMIT on SmolLM2 over the built-in facts: CounterFact's efficacy, generalisation, specificity and
fluency, next to the unedited model's.

    python benchmarks/editing.py [--model smollm2] [--n 25] [--layer 6] [--memit-layers 4,5,6,7,8]
                                 [--fluency-tokens 30] [--cov-tokens 20000] [--threads 1] [--json out.json]
    python benchmarks/editing.py --layer-sweep 2,4,6,8,12 --n 10     # ROME efficacy per layer, no MEMIT

ROME edits one fact at a time and undoes it before the next (checked: the weights come back bit for bit);
MEMIT writes all n facts at once. Scores are fractions of prompts: efficacy P(new) > P(old) on the edit prompt,
generalisation the same on two paraphrases, specificity P(old) > P(new) on two neighbourhood prompts; fluency
is the bi/tri-gram entropy (bits) of greedy continuations of the prompt and paraphrases.
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from mechscope import HookedTransformer, edit
from mechscope.edit.evaluate import evaluate_request
from mechscope.edit.rome import default_layer

KEYS = ("efficacy", "generalisation", "specificity", "fluency")


def row(name: str, s: dict, seconds: float | None = None) -> str:
    cells = " | ".join("-" if s.get(k) is None else (f"{s[k]:.2f}" if k == "fluency" else f"{100 * s[k]:.0f}%")
                       for k in KEYS)
    return f"| {name} | {cells} | {'' if seconds is None else f'{seconds:.1f}'} |"


def mean(rows: list[dict]) -> dict:
    out = {}
    for k in KEYS:
        vals = [r[k] for r in rows if r.get(k) is not None]
        out[k] = sum(vals) / len(vals) if vals else None
    return out


def rome_each(model, reqs, layer: int, fluency_tokens: int, cov_tokens: int) -> tuple[dict, float]:
    rows, t_edit = [], 0.0
    for r in reqs:
        before = {name: p.detach().clone() for name, p in model.named_parameters() if ".mlp.down." in name}
        t0 = time.perf_counter()
        e = edit.rome(model, r.prompt, r.subject, r.target, layer=layer, cov_tokens=cov_tokens)
        t_edit += time.perf_counter() - t0
        rows.append(evaluate_request(model, r, fluency_tokens=fluency_tokens))
        e.undo()
        assert all(torch.equal(p, before[name]) for name, p in model.named_parameters() if name in before)
    return mean(rows), t_edit / len(reqs)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2")
    ap.add_argument("--n", type=int, default=25, help="number of built-in facts (of 37)")
    ap.add_argument("--layer", type=int, default=None, help="ROME layer (default edit.rome's: 6 for SmolLM2)")
    ap.add_argument("--memit-layers", default=None, help="comma-separated (default edit.memit's: 4..8)")
    ap.add_argument("--mom2-weight", type=float, default=15_000.0, help="MEMIT's lambda (weight of C)")
    ap.add_argument("--fluency-tokens", type=int, default=30)
    ap.add_argument("--cov-tokens", type=int, default=20_000)
    ap.add_argument("--layer-sweep", default=None, help="comma-separated ROME layers: efficacy per layer only")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (1: fastest on a busy 2-core machine, "
                    "where 2 threads make these small batches ~5x slower)")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model = HookedTransformer.from_pretrained(args.model)
    reqs = edit.requests.load()[:args.n]
    result: dict = {"model": args.model, "n": len(reqs)}
    header = "| model | efficacy | generalisation | specificity | fluency | s/edit |\n|---|---|---|---|---|---|"

    if args.layer_sweep:
        print(header)
        for layer in [int(x) for x in args.layer_sweep.split(",")]:
            s, sec = rome_each(model, reqs, layer, 0, args.cov_tokens)
            print(row(f"ROME layer {layer}", s, sec), flush=True)
            result[f"rome_layer_{layer}"] = s
    else:
        t0 = time.perf_counter()
        base = edit.evaluate_edits(model, reqs, fluency_tokens=args.fluency_tokens)
        t_eval = time.perf_counter() - t0
        print(header)
        print(row("unedited", base), flush=True)
        layer = default_layer(model) if args.layer is None else args.layer
        s, sec = rome_each(model, reqs, layer, args.fluency_tokens, args.cov_tokens)
        print(row(f"ROME layer {layer}, each fact alone", s, sec), flush=True)
        layers = None if args.memit_layers is None else [int(x) for x in args.memit_layers.split(",")]
        t0 = time.perf_counter()
        e = edit.memit(model, reqs, layers=layers, cov_tokens=args.cov_tokens, mom2_weight=args.mom2_weight)
        t_memit = time.perf_counter() - t0
        m = edit.evaluate_edits(model, reqs, fluency_tokens=args.fluency_tokens)
        print(row(f"MEMIT layers {e.layers[0]}-{e.layers[-1]}, {len(reqs)} facts at once", m, t_memit), flush=True)
        e.undo()
        print(f"(evaluation of the unedited model: {t_eval:.0f} s; MEMIT: {t_memit:.0f} s for all {len(reqs)} facts)")
        result.update(unedited={k: base[k] for k in KEYS}, rome=s, rome_layer=layer, rome_s_per_edit=sec,
                      memit={k: m[k] for k in KEYS}, memit_layers=e.layers, memit_s=t_memit)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)


if __name__ == "__main__":
    main()
