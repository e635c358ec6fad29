"""Does the graph's prediction hold in the real model? Attribute one prompt through trained transcoders, inhibit
the features with the largest direct effect on the top logit in the REAL model (errors kept), and compare.

    mechscope train-transcoders --model smollm2 --kind skip --arch topk --features 1024 --k 16 --steps 400 \
        --batch-size 256 --lr 2e-3 --seed 0 --out ts/skip30          # ~15 min on 2 CPU cores
    python benchmarks/graph_interventions.py --transcoders ts/skip30 [--prompt "The capital of France is"]

Prints the graph's size and scores, the replacement model's max logit difference, then one line per inhibited
feature (and one for the strongest N together): the graph's predicted change of the top logit (demeaned, direct
effects) and the real change, with the top token's probability before and after, and greedy text before and after.
"""

from __future__ import annotations

import argparse
import time

import torch

from mechscope import HookedTransformer, circuits, sae


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--transcoders", required=True, help="a transcoder set folder (sae.load_transcoders)")
    ap.add_argument("--model", default="smollm2")
    ap.add_argument("--prompt", default="The capital of France is")
    ap.add_argument("--single", type=int, default=5, help="features inhibited one at a time")
    ap.add_argument("--together", type=int, default=10, help="the strongest N inhibited at once")
    args = ap.parse_args()

    model = HookedTransformer.from_pretrained(args.model)
    ts = sae.load_transcoders(args.transcoders)
    t = time.perf_counter()
    g = circuits.graphs.attribute(model, args.prompt, ts, max_n_logits=5)
    print(f"attribution {time.perf_counter() - t:.1f} s: {g}")
    print(f"pruned (0.8 / 0.98): {circuits.graphs.prune(g)}")
    rm = circuits.graphs.ReplacementModel(model, ts, args.prompt)
    with torch.no_grad():
        base = model(rm.tokens)[0, -1]  # [V]
        print(f"replacement model max |logit difference| {float((rm.logits() - model(rm.tokens)[0]).abs().max()):.2e}")
    A = g.dense()
    top = next(i for i, n in enumerate(g.nodes) if n.kind == "logit")
    tid = g.nodes[top].token_id
    tok = model.tokenizer
    feats = sorted((n for n in g.nodes if n.kind == "feature"), key=lambda n: float(A[top, g.index_of(n)]),
                   reverse=True)
    print(f"top logit {tok.decode([tid])!r}; p = {float(base.softmax(-1)[tid]):.3f}")
    print("inhibited                          direct  predicted      real   p(top) after")

    def real_change(edit) -> tuple[float, float, torch.Tensor]:
        ivs = circuits.graphs.feature_interventions(ts, edit)
        with torch.no_grad():
            after = model(rm.tokens, interventions=ivs)[0, -1]
        d = (after[tid] - after.mean()) - (base[tid] - base.mean())
        return float(d), float(after.softmax(-1)[tid]), after

    for f in feats[:args.single]:
        edit = {(f.layer, f.pos, f.feature): 0.0}
        pred = circuits.graphs.predicted_logit_change(g, edit)[tid]
        real, p, _ = real_change(edit)
        print(f"layer {f.layer:2d} feature {f.feature:5d} pos {f.pos} (act {f.activation:6.2f}) "
              f"{float(A[top, g.index_of(f)]):7.3f} {pred:+10.3f} {real:+9.3f} {p:8.3f}")
    edit = {(f.layer, f.pos, f.feature): 0.0 for f in feats[:args.together]}
    pred = circuits.graphs.predicted_logit_change(g, edit)[tid]
    real, p, after = real_change(edit)
    print(f"the strongest {args.together} together {'':17s} {pred:+10.3f} {real:+9.3f} {p:8.3f}; top token now "
          f"{tok.decode([int(after.argmax())])!r}")
    ivs = circuits.graphs.feature_interventions(ts, edit)
    print("greedy before:", repr(model.generate(args.prompt, 6, stop_at_eos=False)))
    print("greedy after: ", repr(model.generate(args.prompt, 6, interventions=ivs, stop_at_eos=False)))


if __name__ == "__main__":
    main()
