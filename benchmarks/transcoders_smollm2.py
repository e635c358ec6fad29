"""Train PLT / skip / CLT transcoders on the first layers of SmolLM2-135M and measure their quality.

    python benchmarks/transcoders_smollm2.py --kinds plt,skip,clt --layers 4 --steps 250 --out /tmp/ts

Harvests the input (blocks.{l}.ln2.hook_normalized) and output (blocks.{l}.hook_mlp_out) of the first
--layers layers ONCE from the "sotu" train split (BOS positions excluded; one forward feeds every kind), trains
each kind on those tensors, then evaluates on the validation split: per-layer FVE / L0 / dead %, and CE with
all covered MLPs replaced at once (sae.evaluate_transcoders). Prints the tables, writes <out>/<kind>/quality.json.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch


@torch.no_grad()
def harvest(model, hooks: list[str], n_tokens: int, context_len: int = 128) -> dict[str, torch.Tensor]:
    from tqdm.auto import tqdm

    from mechscope.data.packing import contexts

    ctx = contexts("sotu", model.tokenizer, context_len, seed=0, split="train")
    rows: dict[str, list[torch.Tensor]] = {h: [] for h in hooks}
    n, batch = 0, []
    bar = tqdm(total=n_tokens, desc="harvest")
    for c in ctx:
        batch.append(torch.as_tensor(c))
        if len(batch) < 8:
            continue
        tokens = torch.stack(batch).to(model.device)
        batch = []
        _, cache = model.run_with_cache(tokens, names_filter=hooks, return_type=None)
        for h in hooks:
            rows[h].append(cache[h][:, 1:].flatten(0, 1).float())  # BOS excluded
        got = tokens.shape[0] * (tokens.shape[1] - 1)
        n += got
        bar.update(got)
        if n >= n_tokens:
            break
    bar.close()
    return {h: torch.cat(v)[:n_tokens] for h, v in rows.items()}


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--kinds", default="plt,skip,clt")
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--n-features", type=int, default=768)
    p.add_argument("--k", type=int, default=16)
    p.add_argument("--arch", default="topk")
    p.add_argument("--steps", type=int, default=250)
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--n-contexts", type=int, default=8)
    p.add_argument("--out", required=True)
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    from mechscope import sae
    from mechscope.models import HookedTransformer
    from mechscope.models.identity import model_identity

    model = HookedTransformer.from_pretrained("smollm2")
    out = Path(a.out)
    ins = [f"blocks.{i}.ln2.hook_normalized" for i in range(a.layers)]
    outs = [f"blocks.{i}.hook_mlp_out" for i in range(a.layers)]
    t0 = time.time()
    data = harvest(model, ins + outs, a.steps * a.batch_size)
    harvest_s = time.time() - t0
    print(f"harvested {next(iter(data.values())).shape[0]} tokens x {len(data)} hooks in {harvest_s:.0f} s")
    for kind in a.kinds.split(","):
        t0 = time.time()
        ts = sae.train_transcoders(data, kind=kind, n_layers=a.layers, arch=a.arch, n_features=a.n_features,
                                   k=a.k if a.arch == "topk" else None, steps=a.steps, batch_size=a.batch_size,
                                   lr=a.lr, checkpoint_dir=out / kind / ".checkpoint", checkpoint_every=50)
        ts.model_name, ts.model_identity = model.cfg.model_name, model_identity(model)
        train_s = time.time() - t0
        ts.save(out / kind / "transcoders")
        t1 = time.time()
        q = sae.evaluate_transcoders(ts, model, n_contexts=a.n_contexts)
        eval_s = time.time() - t1
        print(f"\n{kind} ({a.arch}, {a.layers} layers x {a.n_features} features, k={a.k}, {a.steps} steps x "
              f"{a.batch_size} tokens): trained in {train_s:.0f} s, evaluated in {eval_s:.0f} s")
        print(q.table(), flush=True)
        (out / kind / "quality.json").write_text(json.dumps({
            "settings": vars(a), "harvest_seconds": harvest_s, "train_seconds": train_s, "eval_seconds": eval_s,
            "n_tokens": q.n_tokens, "fve": q.fve, "l0": q.l0, "dead_fraction": q.dead_fraction,
            "ce_clean": q.ce_clean, "ce_replaced": q.ce_replaced, "ce_zero_ablated": q.ce_zero_ablated,
            "ce_recovered": q.ce_recovered}, indent=1))


if __name__ == "__main__":
    main()
