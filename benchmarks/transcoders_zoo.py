"""Transcoders on the zoo's modadd model (1 layer, MLP 256): PLT / skip / CLT, FVE / L0 / dead and the answer
accuracy with the MLP replaced.

    python benchmarks/transcoders_zoo.py --zoo /tmp/modadd     # trains the zoo model first if the folder is empty

Every "a b =" input (p^2 = 3,481) is both training and evaluation data (the point is the replacement, not
generalisation); the answer is scored at the last position, since modadd's context (3) has no room for it.
"""

from __future__ import annotations

import argparse
import json
import time

import torch
import torch.nn.functional as F


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--zoo", required=True, help="modadd zoo folder (trained here if missing)")
    p.add_argument("--out", default=None, help="write the results JSON here")
    a = p.parse_args()
    torch.set_num_threads(1)
    from pathlib import Path

    from mechscope import sae, zoo
    from mechscope.models.interventions import Set
    from mechscope.zoo.modadd import all_pairs

    done = (Path(a.zoo) / "config.json").exists()
    model = zoo.load(a.zoo if done else zoo.train("modadd", a.zoo, seed=0, progress=True))
    x, y = all_pairs(model.cfg.d_vocab - 1)  # [p*p, 3] "a b =", answers [p*p]
    hooks = ["blocks.0.ln2.hook_normalized", "blocks.0.hook_mlp_out"]
    _, cache = model.run_with_cache(x, names_filter=hooks)
    data = {h: cache[h].flatten(0, 1) for h in hooks}  # [p*p*3, d]

    def score(logits: torch.Tensor) -> tuple[float, float]:
        return float(F.cross_entropy(logits.float(), y)), float((logits.argmax(-1) == y).float().mean())

    with torch.no_grad():
        res: dict = {"clean": score(model(x)[:, -1]), "zero_ablated": score(model(x, interventions=[Set(hooks[1], 0.0)])[:, -1])}
    print(f"answer CE / accuracy: clean {res['clean']}, MLP zero-ablated {res['zero_ablated']}")
    for kind in ("plt", "skip", "clt"):
        t = time.time()
        ts = sae.train_transcoders(data, kind=kind, arch="topk", n_features=512, k=16, steps=600, batch_size=512,
                                   lr=2e-3, progress=False)
        q = sae.evaluate_transcoders(ts, model, contexts=x, n_contexts=len(x), batch_size=1024)
        with torch.no_grad():
            replaced = model(x, interventions=ts.replacement_interventions())[:, -1]
        res[kind] = {"fve": q.fve[0], "l0": q.l0[0], "dead_fraction": q.dead_fraction[0],
                     "answer_ce_acc": score(replaced), "seconds": time.time() - t}
        print(kind, res[kind], flush=True)
    if a.out:
        with open(a.out, "w") as f:
            json.dump(res, f, indent=1)


if __name__ == "__main__":
    main()
