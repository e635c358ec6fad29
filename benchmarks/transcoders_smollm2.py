"""Train PLT / skip / CLT transcoders on the first layers of SmolLM2-135M and measure their quality.

    python benchmarks/transcoders_smollm2.py --kind clt --layers 6 --steps 400 --out /tmp/ts-clt

Streams activations from the "sotu" corpus (train split), then evaluates on its validation split: per-layer
FVE / L0 / dead %, and CE with all covered MLPs replaced at once (sae.evaluate_transcoders). Prints the
table and writes <out>/quality.json. Resumable (checkpoint in <out>/.checkpoint).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--kind", choices=("plt", "skip", "clt"), default="plt")
    p.add_argument("--layers", type=int, default=6)
    p.add_argument("--n-features", type=int, default=1536)
    p.add_argument("--k", type=int, default=32)
    p.add_argument("--arch", default="topk")
    p.add_argument("--steps", type=int, default=400)
    p.add_argument("--batch-size", type=int, default=512)
    p.add_argument("--lr", type=float, default=None)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--n-contexts", type=int, default=16)
    p.add_argument("--out", required=True)
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    from mechscope import sae
    from mechscope.data.packing import contexts
    from mechscope.models import HookedTransformer

    model = HookedTransformer.from_pretrained("smollm2")
    out = Path(a.out)
    t0 = time.time()
    train_ctx = contexts("sotu", model.tokenizer, 128, seed=0, split="train")
    ts = sae.train_transcoders((model, train_ctx), kind=a.kind, n_layers=a.layers, arch=a.arch,
                               n_features=a.n_features, k=a.k if a.arch == "topk" else None, steps=a.steps,
                               batch_size=a.batch_size, lr=a.lr, checkpoint_dir=out / ".checkpoint",
                               checkpoint_every=50)
    train_s = time.time() - t0
    ts.save(out / "transcoders")
    t1 = time.time()
    q = sae.evaluate_transcoders(ts, model, n_contexts=a.n_contexts)
    eval_s = time.time() - t1
    print(f"{a.kind} ({a.arch}, {a.layers} layers x {a.n_features} features, k={a.k}, {a.steps} steps x "
          f"{a.batch_size} tokens): trained in {train_s:.0f} s, evaluated in {eval_s:.0f} s")
    print(q.table())
    (out / "quality.json").write_text(json.dumps({
        "settings": vars(a), "train_seconds": train_s, "eval_seconds": eval_s, "n_tokens": q.n_tokens,
        "fve": q.fve, "l0": q.l0, "dead_fraction": q.dead_fraction, "ce_clean": q.ce_clean,
        "ce_replaced": q.ce_replaced, "ce_zero_ablated": q.ce_zero_ablated, "ce_recovered": q.ce_recovered,
    }, indent=1))


if __name__ == "__main__":
    main()
