"""The worker loop of benchmarks/sae_train.py, shared by our candidates (project env) and the peers'
(`_peer_sae_train.py`, isolated venv): stdlib only, so either interpreter imports it from benchmarks/.

Protocol on stdin, one JSON reply line each on stdout: `run N` (step times), `profile` (per-op self CPU
ms of one step), `rss` (current and peak RSS), `quit`.
"""

from __future__ import annotations

import argparse
import json
import sys
import time


def rss(key: str) -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key):
                return int(line.split()[1]) / 1024
    return float("nan")


def reply(obj) -> None:
    sys.__stdout__.write(json.dumps(obj) + "\n")
    sys.__stdout__.flush()


def op_key(e) -> str:
    """Profiler row name; matmuls get their operand shapes (the encoder GEMM vs sparse products)."""
    if e.key in ("aten::addmm", "aten::mm", "aten::bmm") and e.input_shapes:
        mats = [s for s in e.input_shapes if len(s) == 2][:2]
        return f"{e.key} " + "@".join("x".join(map(str, s)) for s in mats)
    return e.key


def serve(step, xs, rss_base: float) -> None:
    """Answer the protocol's commands until `quit`; `step(x)` is one training step on a batch x."""
    counter = {"i": 0}

    def one():
        x = xs[counter["i"] % xs.shape[0]]
        counter["i"] += 1
        step(x)

    reply({"ready": True, "rss_base_mib": rss_base})
    for line in sys.stdin:
        cmd = line.split()
        if not cmd:
            continue
        if cmd[0] == "run":
            times = []
            for _ in range(int(cmd[1])):
                t0 = time.perf_counter()
                one()
                times.append(time.perf_counter() - t0)
            reply({"times": times})
        elif cmd[0] == "profile":
            from torch.profiler import ProfilerActivity, profile

            with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
                one()
            ev = [e for e in prof.key_averages(group_by_input_shape=True) if e.self_cpu_time_total > 200]
            reply({"ops": [[op_key(e), e.self_cpu_time_total / 1000, e.count] for e in ev]})
        elif cmd[0] == "rss":
            reply({"rss_mib": rss("VmRSS:"), "peak_mib": rss("VmHWM:")})
        elif cmd[0] == "quit":
            break


def add_shape_args(ap: argparse.ArgumentParser) -> None:
    """The benchmark's shape and data options, the same in the driver and in every worker."""
    ap.add_argument("--d-in", type=int, default=768)
    ap.add_argument("--n-latents", type=int, default=6144)
    ap.add_argument("--k", type=int, default=32)
    ap.add_argument("--batch", type=int, default=4096)
    ap.add_argument("--n-batches", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=2)
