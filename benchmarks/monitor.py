"""Runtime monitors: generation speed with 0 vs 3 monitors (a probe, an SAE feature, a direction) on SmolLM2.

    python benchmarks/monitor.py [--model smollm2] [--new-tokens 32] [--rounds 3] [--threads 2] [--device cpu]

Greedy generation with the KV cache, the same prompts, timed interleaved (common.timeit_interleaved) so machine
drift hits both alike. The three monitors sit on three different layers (the worst case: three hook calls per
token; monitors on one hook share one call). The SAE is a random-init TopK coder of the usual width (8 x d_model,
k = 32): its cost per token is that of a trained one of the same shape. Target: <= 10% overhead, i.e. the
ratio (tok/s with monitors / without) >= 0.91.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent

PROMPTS = ["The weather today is", "Tell me about the history of Paris.", "My favourite recipe for soup"]
POSITIVE = ["I love this, it is wonderful.", "What a great and happy day!", "The food was delicious.",
            "She was delighted with the excellent result.", "We had a fantastic, joyful time."]
NEGATIVE = ["I hate this, it is terrible.", "What an awful and sad day!", "The food was disgusting.",
            "She was furious about the horrible result.", "We had a miserable, painful time."]


def build_monitors(model, layers: tuple[int, int, int]):
    from mechscope import edit, monitor, probes
    from mechscope.sae import SAEConfig, SparseCoder

    hp, hs, hd = (f"blocks.{layer}.hook_resid_post" for layer in layers)
    probe = probes.fit(model, POSITIVE + NEGATIVE, [1] * len(POSITIVE) + [0] * len(NEGATIVE), hook=hp,
                       method="diffmeans", cross_validated=False)
    d = model.cfg.d_model
    coder = SparseCoder(SAEConfig(arch="topk", d_in=d, n_latents=8 * d, k=32, hook_in=hs),
                        device=model.device).init_weights(0)
    vector = edit.contrastive_vector(model, POSITIVE, NEGATIVE, hd)
    return [monitor.ProbeMonitor("sentiment-probe", probe, threshold=1e9),
            monitor.FeatureMonitor("sae-feature", coder, latents=[3, 17], threshold=1e9),
            monitor.DirectionMonitor("sentiment-direction", hd, vector, threshold=1e9)]


def main() -> None:
    sys.path.insert(0, str(HERE))
    from common import print_header, print_row

    from mechscope import HookedTransformer

    p = argparse.ArgumentParser()
    p.add_argument("--model", default="smollm2")
    p.add_argument("--new-tokens", type=int, default=32)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--device", default="cpu")
    p.add_argument("--prompts", type=int, default=len(PROMPTS), help="how many of the prompts each round runs")
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    model = HookedTransformer.from_pretrained(a.model, device=a.device)
    L = model.cfg.n_layers
    monitors = build_monitors(model, (L // 3, L // 2, 2 * L // 3))
    n = a.new_tokens
    prompts = PROMPTS[: max(1, a.prompts)]

    def run(ms):
        def go():
            for prompt in prompts:
                if ms is None:
                    model.generate(prompt, n, stop_at_eos=False)
                else:
                    res = model.generate(prompt, n, monitors=ms, stop_at_eos=False)
                    assert len(res.trace) == n
        return go

    variants = {"none": run(None), "empty": run([]), "three": run(monitors)}
    wall, cpu = interleaved(variants, a.rounds)
    tokens = len(prompts) * n
    print(f"\n{model.cfg.model_name} on {a.device}, {a.threads} threads, {len(prompts)} prompts x {n} new tokens "
          f"(greedy, KV cache), median of {a.rounds} interleaved rounds; monitors: "
          + ", ".join(f"{m.name} ({m.hook})" for m in monitors))
    print_header("ours", "no monitors")
    for clock, t in (("wall", wall), ("cpu", cpu)):
        print_row(f"generate, 0 monitors (tok/s, {clock})", tokens / t["none"], tokens / t["none"])
        print_row(f"generate, monitors=[] (tok/s, {clock})", tokens / t["empty"], tokens / t["none"])
        print_row(f"generate, 3 monitors (tok/s, {clock}; >= 0.91x)", tokens / t["three"], tokens / t["none"])
    # the monitors' own work per token, timed inside the hooks and the per-step bookkeeping (noise-free part)
    spent = monitor_time(model, monitors, n)
    per_tok = 1000 * cpu["none"] / tokens
    print_row("monitor code per token (ms CPU) vs a step", 1000 * spent / n, per_tok, 1000 * spent / n / per_tok)


def interleaved(fns, rounds: int) -> tuple[dict[str, float], dict[str, float]]:
    """Median wall and CPU (process) seconds per candidate, candidates interleaved and rotated each round after
    one warm-up: a busy shared machine slows wall time for all alike; CPU time counts only this process."""
    names = list(fns)
    for name in names:
        fns[name]()
    wall: dict[str, list[float]] = {k: [] for k in names}
    cpu: dict[str, list[float]] = {k: [] for k in names}
    for r in range(rounds):
        for name in names[r % len(names):] + names[: r % len(names)]:
            w, c = time.perf_counter(), time.process_time()
            fns[name]()
            wall[name].append(time.perf_counter() - w)
            cpu[name].append(time.process_time() - c)
    return ({k: statistics.median(v) for k, v in wall.items()}, {k: statistics.median(v) for k, v in cpu.items()})


def monitor_time(model, monitors, n: int) -> float:
    """CPU seconds spent in the monitors' scoring and in MonitorRun.step during one generation of n tokens."""
    from mechscope.monitor import MonitorRun

    spent = [0.0]

    def timed(fn):
        def wrapper(*args, **kwargs):
            t = time.process_time()  # CPU time, like the forward it is compared with
            try:
                return fn(*args, **kwargs)
            finally:
                spent[0] += time.process_time() - t
        return wrapper

    originals = [(m, m.score) for m in monitors]
    step = MonitorRun.step
    try:
        for m, score in originals:
            m.score = timed(score)
        MonitorRun.step = timed(step)
        model.generate(PROMPTS[0], n, monitors=monitors, stop_at_eos=False)
    finally:
        MonitorRun.step = step
        for m, _ in originals:
            del m.score  # back to the class's method
    return spent[0]


if __name__ == "__main__":
    main()
