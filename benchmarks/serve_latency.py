"""Latency of `mechscope serve`: p50 / p95 of a 32-token generation under 1 and 4 concurrent clients.

    python benchmarks/serve_latency.py [--model smollm2] [--new-tokens 32] [--requests 8] [--clients 1,4]
                                       [--monitors 3] [--threads 2]

Starts the real service (`mechscope serve` in a subprocess, 127.0.0.1, a free port) with `--monitors` direction
monitors (random unit directions on resid_post of layers spread over the depth, action "record": what any
monitor costs is its hook; see benchmarks/monitor.py for the per-kind overhead), then for each client count
runs that many clients in threads, each sending `--requests` greedy POST /v1/generate requests back to back.
Latency is measured at the client (queueing included: the service runs one generation at a time, so 4 clients
see about 4x the single-client latency; that is the queue working, not overhead). Also reported: the server's
own /metrics p50 / p95 over the same requests, tokens/s, and the baseline: the same generations by
`model.generate` in this process, without the service (1-client service p50 / direct p50 is the service's
overhead: HTTP, JSON, validation, the worker hand-off). Prompts are chosen to run on (not hit EOS early);
the mean number of tokens generated is printed next to the latencies.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import socket
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import torch

PROMPTS = ["Once upon a time, in a small village by the sea,", "Write a long story about a dragon who",
           "The history of the Roman empire begins", "Here is a detailed recipe for bread: first,"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def percentile(xs: list[float], q: float) -> float:
    """Nearest rank (the same definition as the server's /metrics)."""
    xs = sorted(xs)
    return xs[min(len(xs) - 1, max(0, math.ceil(q / 100 * len(xs)) - 1))]


def make_monitors(model, n: int) -> list:
    from mechscope import monitor

    L = model.cfg.n_layers
    g = torch.Generator().manual_seed(0)
    layers = [round((i + 1) * (L - 1) / (n + 1)) for i in range(n)]
    ms = [monitor.DirectionMonitor(f"dir{i}", f"blocks.{layer}.hook_resid_post",
                                   torch.randn(model.cfg.d_model, generator=g), threshold=3.0, action="record")
          for i, layer in enumerate(layers)]
    return ms


_WORKER = ThreadPoolExecutor(max_workers=1)  # the service generates on a worker thread: so does the baseline


def direct_generation(model, monitors: list, prompt: str, new_tokens: int) -> tuple[float, int]:
    """One generation in this process without the service: the baseline of the 1-client row."""
    t0 = time.perf_counter()
    res = _WORKER.submit(model.generate, prompt, new_tokens, monitors=monitors).result()
    return time.perf_counter() - t0, len(res.token_ids)


def run_clients(url: str, clients: int, requests: int, new_tokens: int, offset: int = 0) -> tuple[list, list]:
    lat: list[float] = []
    toks: list[int] = []
    lock = threading.Lock()
    errors: list[str] = []

    def client(c_id: int) -> None:
        with httpx.Client(base_url=url, timeout=600) as c:
            for r_id in range(requests):
                prompt = PROMPTS[(c_id + r_id + offset) % len(PROMPTS)]
                t0 = time.perf_counter()
                r = c.post("/v1/generate", json={"prompt": prompt, "max_new_tokens": new_tokens})
                dt = time.perf_counter() - t0
                if r.status_code != 200:
                    errors.append(f"{r.status_code} {r.text[:200]}")
                    continue
                with lock:
                    lat.append(dt)
                    toks.append(r.json()["n_tokens"])

    threads = [threading.Thread(target=client, args=(i,)) for i in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise SystemExit(f"{len(errors)} requests failed, e.g. {errors[0]}")
    return lat, toks


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="smollm2")
    p.add_argument("--new-tokens", type=int, default=32)
    p.add_argument("--requests", type=int, default=8, help="requests per client")
    p.add_argument("--clients", default="1,4")
    p.add_argument("--monitors", type=int, default=3, help="direction monitors loaded (0: none)")
    p.add_argument("--threads", type=int, default=1,
                   help="torch threads of the server and of the baseline (1: fastest on a busy 2-core machine)")
    p.add_argument("--out", default=None, help="also write the numbers as JSON here")
    a = p.parse_args()
    from mechscope import monitor
    from mechscope.models.loading import load_model

    torch.set_num_threads(a.threads)
    tmp = tempfile.mkdtemp(prefix="mechscope-serve-bench-")
    model = load_model(a.model)
    monitors = make_monitors(model, a.monitors)
    mon = None
    if monitors:
        mon = os.path.join(tmp, "monitors")
        monitor.save_monitors(mon, monitors)
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    cmd = [sys.executable, "-m", "mechscope.cli", "serve", "--model", a.model, "--port", str(port),
           "--threads", str(a.threads), "--max-queue", "16", "--timeout", "600", "--log-level", "warning",
           *(["--monitors", mon] if mon else [])]
    server = subprocess.Popen(cmd)
    try:
        t0 = time.monotonic()
        while True:
            if server.poll() is not None:
                raise SystemExit("the server exited before it was ready")
            try:
                if httpx.get(url + "/health", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                time.sleep(0.5)
            if time.monotonic() - t0 > 300:
                raise SystemExit("the server did not start in 300 s")
        print(f"server ready in {time.monotonic() - t0:.1f}s: {a.model}, {a.monitors} monitors, "
              f"{a.threads} threads, {a.new_tokens} new tokens")
        run_clients(url, 1, 1, a.new_tokens)  # warm-up (first-call allocations)
        results = {}
        direct_generation(model, monitors, PROMPTS[0], a.new_tokens)  # warm-up
        dlat: list[float] = []
        for n in (int(x) for x in a.clients.split(",")):
            before = httpx.get(url + "/metrics").json()["generations"]
            t0 = time.perf_counter()
            if n == 1:  # interleaved with the direct baseline, so both see the same machine load
                lat, toks, dlat, dtoks = [], [], [], []
                for r_id in range(a.requests):
                    sl, st = run_clients(url, 1, 1, a.new_tokens, offset=r_id)
                    lat += sl
                    toks += st
                    dt, dn = direct_generation(model, monitors, PROMPTS[r_id % len(PROMPTS)], a.new_tokens)
                    dlat.append(dt)
                    dtoks.append(dn)
                wall = sum(lat)
            else:
                lat, toks = run_clients(url, n, a.requests, a.new_tokens)
                wall = time.perf_counter() - t0
            m = httpx.get(url + "/metrics").json()
            assert m["generations"] - before == len(lat)
            row = {"clients": n, "requests": len(lat), "p50_s": percentile(lat, 50), "p95_s": percentile(lat, 95),
                   "mean_tokens": sum(toks) / len(toks), "tokens_per_s": sum(toks) / wall}
            results[f"{n}_clients"] = row
            print(f"serve {a.new_tokens}-token generation, {n} client(s): p50 {row['p50_s']:.3f} s  "
                  f"p95 {row['p95_s']:.3f} s  ({row['requests']} requests, {row['mean_tokens']:.1f} tokens each, "
                  f"{row['tokens_per_s']:.1f} tokens/s overall)")
        print(f"server /metrics over all requests: p50 {m['latency_s']['p50']:.3f} s  p95 {m['latency_s']['p95']:.3f} s "
              f"(queue wait p50 {m['queue_wait_s']['p50']:.3f} s)")
        if dlat:
            d50 = percentile(dlat, 50)
            print(f"direct model.generate (no service, same monitors, interleaved with the 1-client requests): "
                  f"p50 {d50:.3f} s  p95 {percentile(dlat, 95):.3f} s  ({sum(dtoks) / len(dtoks):.1f} tokens each); "
                  f"1-client service p50 / direct p50 = {results['1_clients']['p50_s'] / d50:.2f}")
            results["direct"] = {"p50_s": d50, "p95_s": percentile(dlat, 95), "mean_tokens": sum(dtoks) / len(dtoks)}
        if a.out:
            with open(a.out, "w") as f:
                json.dump({"model": a.model, "monitors": a.monitors, "threads": a.threads,
                           "new_tokens": a.new_tokens, **results}, f, indent=1)
    finally:
        server.terminate()
        server.wait(30)


if __name__ == "__main__":
    main()
