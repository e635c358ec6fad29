"""TopK SAE training speed and memory: mechscope (reference and fast path) vs sparsify and SAELens.

    python benchmarks/sae_train.py [--rounds 7] [--steps 1] [--warmup 2] [--no-peers] [--profile-rounds 3]

TopK SAE 768 -> 6144, k = 32, batch 4096, fp32 master weights, CPU, torch.set_num_threads(2); the same
seeded random activations everywhere (torch.randn from torch.Generator().manual_seed(--seed), 2 batches
cycled). Each candidate lives in its OWN fresh process (its peak RSS is that process's VmHWM); the
peers run in the isolated venv made by `bash benchmarks/peer_venv.sh` (`_peer_sae_train.py`). All
processes are started first, then driven round by round in a rotating order, one at a time (the
others wait on stdin), so machine drift hits every candidate alike; act/s = batch / median step time.

What one step is (a full training step: forward, backward, optimizer, decoder renormalisation, the
dead-latent counters; no latent is dead within a benchmark, so no AuxK work runs anywhere):
  ours-ref-fp32     mechscope.sae.train.Trainer.step with fused_topk=False: coder.loss (dense [B, n]
                    latents, autograd), torch.optim.Adam (default for-loop implementation),
                    normalize_decoder, dense firing counters
  ours-fast-fp32    Trainer.step as it trains by default: mechscope.sae.kernels.topk_loss (one dense
                    matmul, sparse hand-written backward), kernels.remove_parallel_grad_, firing counts
                    from the [B, k] indices, and torch.optim.Adam(fused=True)
  ours-fast-fp32-adam   ours-fast-fp32 with the default torch.optim.Adam (what sparsify uses): isolates
                    the kernels from the optimizer implementation
  ours-fast-bf16    ours-fast-fp32 with the encoder matmul in bf16; only run where bf16 matmuls are fast
                    (kernels.bf16_matmul_is_fast(): AVX512-BF16 / AMX / CUDA) or with --force-bf16
  sparsify, saelens, saelens-sparse   see _peer_sae_train.py (each tool's own loop body, torch Adam)
Prints a table (act/s = batch / median step time, RSS) and one `name ours peer ratio` line per
comparison, where ratio is the median over rounds of the within-round act/s ratio (steps of the two
candidates seconds apart, so load spikes from other jobs on a shared machine cancel); --profile-rounds N
adds a per-op table (torch.profiler self CPU ms of one step, median over N interleaved rounds);
--json writes everything.
Target (issue): ours-fast >= 2x sparsify's act/s, peak RSS <= sparsify's.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH))
sys.path.insert(0, str(BENCH.parent / "src"))  # benchmark this working tree, whatever is installed
from _sae_worker import add_shape_args, rss, serve  # noqa: E402
from common import PEER_VENVS, print_header, print_row  # noqa: E402

OURS = ("ours-ref-fp32", "ours-fast-fp32", "ours-fast-fp32-adam", "ours-fast-bf16")
PEERS = ("sparsify", "saelens", "saelens-sparse")


# ---------------------------------------------------------------------------- worker side (project env)


def build_ours(name: str, a):
    """A step function for one of our candidates: mechscope.sae.train.Trainer.step itself."""
    import torch

    from mechscope.sae.coder import SparseCoder
    from mechscope.sae.config import SAEConfig
    from mechscope.sae.train import TrainConfig, Trainer

    cfg = TrainConfig(arch="topk", n_latents=a.n_latents, k=a.k, batch_size=a.batch, steps=10_000,
                      seed=a.seed, fused_topk=name != "ours-ref-fp32",
                      autocast_bf16=name == "ours-fast-bf16").resolved(a.d_in)
    coder = SparseCoder(SAEConfig(arch="topk", d_in=a.d_in, n_latents=a.n_latents, k=a.k)).init_weights(a.seed)
    t = Trainer(cfg, coder)
    if name in ("ours-ref-fp32", "ours-fast-fp32-adam"):  # the default for-loop Adam, as the peers use
        t.opt = torch.optim.Adam(coder.parameters(), lr=float(cfg.lr), betas=cfg.adam_betas, eps=cfg.adam_eps)
    state = {"step": 0}

    def step(x):
        t.step(x, None, state["step"])
        state["step"] += 1

    return step


def worker_main(a) -> None:
    sys.stdout = sys.stderr
    import torch

    torch.set_num_threads(a.threads)
    g = torch.Generator().manual_seed(a.seed)
    xs = torch.randn(a.n_batches, a.batch, a.d_in, generator=g)  # as _peer_sae_train.make_batches
    base = rss("VmRSS:")
    serve(build_ours(a.worker, a), xs, base)


# ---------------------------------------------------------------------------- driver


class Worker:
    def __init__(self, name: str, cmd: list[str], env: dict[str, str]) -> None:
        self.name = name
        self.proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                     text=True, env=env, bufsize=1)
        self.info: dict = {}
        self.times: list[float] = []
        self.error: str | None = None

    def ask(self, line: str) -> dict | None:
        if self.error:
            return None
        try:
            self.proc.stdin.write(line + "\n")  # type: ignore[union-attr]
            self.proc.stdin.flush()  # type: ignore[union-attr]
            out = self.proc.stdout.readline()  # type: ignore[union-attr]
        except (BrokenPipeError, OSError) as e:
            out, self.error = "", str(e)
        if not out:
            self.error = (self.error or "worker died") + ": " + self.proc.stderr.read()[-2000:]  # type: ignore[union-attr]
            print(f"[sae_train] {self.name} failed: {self.error}", file=sys.stderr)
            return None
        return json.loads(out)

    def wait_ready(self) -> None:
        while True:
            out = self.proc.stdout.readline()  # type: ignore[union-attr]
            if not out:
                self.error = "did not start: " + self.proc.stderr.read()[-3000:]  # type: ignore[union-attr]
                print(f"[sae_train] {self.name} {self.error}", file=sys.stderr)
                return
            try:
                self.info = json.loads(out)
                return
            except json.JSONDecodeError:
                continue

    def close(self) -> None:
        if self.proc.poll() is None:
            try:
                self.proc.stdin.write("quit\n")  # type: ignore[union-attr]
                self.proc.stdin.flush()  # type: ignore[union-attr]
                self.proc.wait(timeout=30)
            except Exception:
                self.proc.kill()


def shape_args(a) -> list[str]:
    return ["--d-in", str(a.d_in), "--n-latents", str(a.n_latents), "--k", str(a.k), "--batch", str(a.batch),
            "--n-batches", str(a.n_batches), "--seed", str(a.seed), "--threads", str(a.threads)]


def start_worker(name: str, a) -> Worker | None:
    env = {**os.environ, "OMP_NUM_THREADS": str(a.threads)}
    if name in OURS:
        cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", name, *shape_args(a)]
    else:
        py = PEER_VENVS["peers"] / "bin" / "python"
        if not py.exists():
            print(f"[sae_train] {py} is missing: build it with `bash benchmarks/peer_venv.sh` (skipping {name})")
            return None
        tool = "sparsify" if name.startswith("sparsify") else name
        cmd = [str(py), str(BENCH / "_peer_sae_train.py"), "--tool", tool, *shape_args(a)]
        if name == "sparsify-signum":
            cmd += ["--sparsify-opt", "signum"]
        env = {**env, "PYTHONPATH": "", "HF_HUB_OFFLINE": "1", "SPARSIFY_DISABLE_TRITON": "1"}
    return Worker(name, cmd, env)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    add_shape_args(ap)
    ap.add_argument("--rounds", type=int, default=7, help="timed rounds; each runs --steps steps per candidate")
    ap.add_argument("--steps", type=int, default=1)
    ap.add_argument("--warmup", type=int, default=2, help="untimed steps per candidate first")
    ap.add_argument("--only", default="", help="comma-separated candidates (default: all)")
    ap.add_argument("--no-peers", action="store_true")
    ap.add_argument("--sparsify-signum", action="store_true", help="also time sparsify with its default optimizer")
    ap.add_argument("--force-bf16", action="store_true", help="run ours-fast-bf16 even without fast bf16 matmuls")
    ap.add_argument("--profile-rounds", type=int, default=0,
                    help="also profile one step per candidate in this many interleaved rounds (per-op table)")
    ap.add_argument("--json", help="write the results here")
    a = ap.parse_args()
    if a.worker:
        worker_main(a)
        return

    from mechscope.sae.kernels import bf16_matmul_is_fast

    names = [n for n in OURS + PEERS + (("sparsify-signum",) if a.sparsify_signum else ())]
    if a.only:
        names = [n for n in a.only.split(",") if n]
    if a.no_peers:
        names = [n for n in names if n in OURS]
    bf16_ok = bf16_matmul_is_fast("cpu")
    if "ours-fast-bf16" in names and not (bf16_ok or a.force_bf16):
        names.remove("ours-fast-bf16")
        print("[sae_train] ours-fast-bf16 skipped: this CPU has no fast bf16 matmul (no AVX512-BF16/AMX; oneDNN "
              "falls back to a reference kernel many times slower than fp32). --force-bf16 runs it anyway.")
    print(f"[sae_train] TopK {a.d_in} -> {a.n_latents}, k={a.k}, batch {a.batch}, {a.threads} threads; "
          f"{a.warmup} warm-up + {a.rounds} rounds x {a.steps} steps per candidate, interleaved", flush=True)

    workers = [w for w in (start_worker(n, a) for n in names) if w is not None]
    rounds: list[dict[str, float]] = []  # per round: candidate -> median step seconds in that round
    profiles: dict[str, list[dict[str, float]]] = {}
    try:
        for w in workers:
            w.wait_ready()
        for w in workers:  # warm-up, one candidate at a time
            w.ask(f"run {a.warmup}")
        for r in range(a.rounds):
            live = [w for w in workers if not w.error]
            order = live[r % len(live):] + live[: r % len(live)] if live else []
            this: dict[str, float] = {}
            for w in order:
                out = w.ask(f"run {a.steps}")
                if out:
                    w.times += out["times"]
                    this[w.name] = statistics.median(out["times"])
            rounds.append(this)
            print(f"[sae_train] round {r + 1}/{a.rounds}: " + ", ".join(
                f"{n} {1000 * t:.0f} ms" for n, t in this.items()), flush=True)
        for r in range(a.profile_rounds):  # one profiled step per candidate per round, interleaved
            live = [w for w in workers if not w.error]
            for w in live[r % len(live):] + live[: r % len(live)]:
                ops = (w.ask("profile") or {}).get("ops")
                if ops:
                    profiles.setdefault(w.name, []).append({k: ms for k, ms, _ in ops})
        for w in workers:
            if not w.error:
                w.info.update(w.ask("rss") or {})
    finally:
        for w in workers:
            w.close()

    res = {}
    for w in workers:
        if w.error or not w.times:
            res[w.name] = {"error": w.error}
            continue
        med = statistics.median(w.times)
        res[w.name] = {"act_per_s": a.batch / med, "step_ms": 1000 * med, "times": w.times,
                       "peak_rss_mib": w.info.get("peak_mib"), "rss_base_mib": w.info.get("rss_base_mib")}

    def paired(ours: str, peer: str) -> float | None:
        """Median over rounds of act/s ratio ours/peer within the round (robust to machine drift)."""
        rs = [rd[peer] / rd[ours] for rd in rounds if ours in rd and peer in rd]
        return statistics.median(rs) if rs else None

    print(f"\n{'candidate':<22} {'act/s':>9} {'step ms':>9} {'min ms':>8} {'peak RSS MiB':>13} {'(base)':>8}")
    for n, r in res.items():
        if "error" in r:
            print(f"{n:<22} failed")
            continue
        print(f"{n:<22} {r['act_per_s']:>9.0f} {r['step_ms']:>9.0f} {1000 * min(r['times']):>8.0f} "
              f"{r['peak_rss_mib']:>13.0f} {r['rss_base_mib']:>8.0f}")

    def get(n, key):
        return res.get(n, {}).get(key)

    print("\nact/s: batch / median step time; ratio: median over rounds of the within-round ratio")
    print_header()
    for ours in ("ours-fast-bf16", "ours-fast-fp32", "ours-fast-fp32-adam", "ours-ref-fp32"):
        for peer in ("sparsify", "saelens", "saelens-sparse", "sparsify-signum"):
            if get(ours, "act_per_s") and get(peer, "act_per_s"):
                print_row(f"act/s {ours} vs {peer}", round(get(ours, "act_per_s")), round(get(peer, "act_per_s")),
                          paired(ours, peer))
    if get("ours-fast-fp32", "act_per_s") and get("ours-ref-fp32", "act_per_s"):
        print_row("act/s ours-fast-fp32 vs ours-ref-fp32", round(get("ours-fast-fp32", "act_per_s")),
                  round(get("ours-ref-fp32", "act_per_s")), paired("ours-fast-fp32", "ours-ref-fp32"))
    for ours in ("ours-fast-bf16", "ours-fast-fp32", "ours-ref-fp32"):
        for peer in ("sparsify", "saelens", "saelens-sparse"):
            if get(ours, "peak_rss_mib") and get(peer, "peak_rss_mib"):
                print_row(f"peak RSS MiB {ours} vs {peer}", round(get(ours, "peak_rss_mib")),
                          round(get(peer, "peak_rss_mib")))
    best = max(((paired(n, "sparsify") or 0), n) for n in ("ours-fast-bf16", "ours-fast-fp32"))
    if best[0]:
        mem = (get(best[1], "peak_rss_mib") or 0) <= (get("sparsify", "peak_rss_mib") or 0)
        print(f"\ntarget: {best[1]} {best[0]:.2f}x sparsify act/s (want >= 2x: {'met' if best[0] >= 2 else 'NOT met'}); "
              f"peak RSS <= sparsify's: {'met' if mem else 'NOT met'}")
    table = {}
    if profiles:
        # per-op self CPU ms: median over the profiled rounds (an op absent from a round counts 0)
        for n, runs in profiles.items():
            keys = {k for run in runs for k in run}
            table[n] = {k: statistics.median([run.get(k, 0.0) for run in runs]) for k in keys}
            table[n]["(total)"] = statistics.median([sum(run.values()) for run in runs])
        shown = [n for n in ("ours-fast-fp32", "sparsify", "ours-fast-fp32-adam", "ours-ref-fp32", "saelens",
                             "saelens-sparse", "ours-fast-bf16") if n in table]
        top = sorted({k for n in shown[:2] for k in table[n]}, key=lambda k: -max(table[n].get(k, 0) for n in shown[:2]))
        print(f"\nper-op self CPU ms of one step (torch.profiler; median of {a.profile_rounds} interleaved rounds)")
        print(f"{'op':<52}" + "".join(f"{n[:18]:>19}" for n in shown))
        for k in top[:30]:
            print(f"{k[:51]:<52}" + "".join(f"{table[n].get(k, 0):>19.1f}" for n in shown))
    if a.json:
        Path(a.json).write_text(json.dumps({"args": vars(a), "results": res, "rounds": rounds, "ops": table},
                                           indent=1))


if __name__ == "__main__":
    main()
