"""Forward-pass speed, memory and load time: mechscope vs plain transformers vs peer tools.

    python benchmarks/forward.py [--rounds 7] [--shapes 8x128,1x512] [--no-peers]

GPT-2-small shape (124M, random weights, saved as a local HF folder), CPU fp32, 2 threads.
- ours vs plain transformers: in ONE process, candidates interleaved round by round (so machine
  drift hits both alike), medians reported. Load time (`from_pretrained` of the same local folder,
  same dtype, fp32) and RSS after load are measured in fresh subprocesses (one model each), median of 3.
- peers (TransformerLens HookedTransformer and TransformerBridge, nnsight) run in the isolated
  venv made by `bash benchmarks/peer_venv.sh`, in the same invocation; their times are given as
  ratios to the plain-transformers forward measured in their own process. Without that venv (or
  with --no-peers) the peer rows are skipped with one note.
Prints one `name ours peer ratio` line per comparison. Targets (issue #2): forward <= 1.02x HF,
run_with_cache(all) <= 1.10x, cache of resid_post only <= 1.03x, RSS <= 1.10x HF, load <= 1.5x HF
(Foundation II; was 2x).
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from common import (  # noqa: E402
    PEER_VENVS,
    make_gpt2_small_folder,
    make_tokens,
    parse_shapes,
    print_header,
    print_row,
    rss_mib,
    run_peer,
    timeit_interleaved,
)

DTYPE = torch.float32  # the folder's stored dtype: both loaders can use the file as is


def _load_probe(which: str, folder: str) -> None:
    """Subprocess body: import, then time the load of one model and report RSS (JSON on stdout)."""
    torch.set_num_threads(2)
    if which == "hf":
        from transformers import GPT2LMHeadModel

        t0 = time.perf_counter()
        model = GPT2LMHeadModel.from_pretrained(folder, dtype=DTYPE).eval()
    else:
        from transformers import AutoConfig  # noqa: F401  (the HF probe pays its imports before timing too)

        from mechscope import HookedTransformer

        t0 = time.perf_counter()
        model = HookedTransformer.from_pretrained(folder, tokenizer=False, dtype=DTYPE)
    load_s = time.perf_counter() - t0
    with torch.inference_mode():
        model(torch.zeros(1, 8, dtype=torch.long))
    print(json.dumps({"load_s": load_s, "rss_mib": rss_mib()}))


def measure_load(which: str, folder: Path, repeats: int = 3) -> dict:
    runs = []
    for _ in range(repeats):
        out = subprocess.run([sys.executable, __file__, "--probe", which, "--folder", str(folder)],
                             capture_output=True, text=True, check=True)
        runs.append(json.loads(out.stdout.strip().splitlines()[-1]))
    return {k: statistics.median(r[k] for r in runs) for k in runs[0]}


def time_forward(hf, ours, shapes, rounds: int) -> dict[tuple[str, str], float]:
    """Interleaved timings in this process; prints rows, returns ours/HF ratios per metric and shape."""
    ours_ratios: dict[tuple[str, str], float] = {}
    for B, T in shapes:
        tokens = make_tokens(B, T)
        with torch.inference_mode():
            assert (ours(tokens) - hf(tokens).logits).abs().max() < 1e-3  # same model
            t = timeit_interleaved({
                "hf": lambda x=tokens: hf(x).logits,
                "ours": lambda x=tokens: ours(x),
                "cache_all": lambda x=tokens: ours.run_with_cache(x),
                "cache_resid": lambda x=tokens: ours.run_with_cache(x, names_filter="blocks.*.hook_resid_post"),
                "hf_hidden": lambda x=tokens: hf(x, output_hidden_states=True).logits,
            }, rounds=rounds)
        s = f"{B}x{T}"
        ours_ratios |= {("forward_s", s): t["ours"] / t["hf"], ("cache_all_s", s): t["cache_all"] / t["hf"],
                        ("cache_resid_s", s): t["cache_resid"] / t["hf"]}
        print_row(f"forward {s} (s) vs transformers", t["ours"], t["hf"])
        print_row(f"run_with_cache all {s} (s) vs transformers fwd", t["cache_all"], t["hf"])
        print_row(f"cache resid_post {s} (s) vs transformers fwd", t["cache_resid"], t["hf"])
        print_row(f"cache resid_post {s} (s) vs hidden_states", t["cache_resid"], t["hf_hidden"])
    return ours_ratios


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--shapes", default="8x128,1x512")
    ap.add_argument("--folder", default=None, help="GPT-2-small folder (made if missing)")
    ap.add_argument("--no-peers", action="store_true")
    ap.add_argument("--probe", choices=["hf", "ours"], help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.probe:
        return _load_probe(args.probe, args.folder)

    torch.set_num_threads(2)
    folder = make_gpt2_small_folder(args.folder or Path(tempfile.gettempdir()) / "mechscope-gpt2-small")
    from transformers import GPT2LMHeadModel

    from mechscope import HookedTransformer

    hf = GPT2LMHeadModel.from_pretrained(folder, dtype=DTYPE).eval()
    ours = HookedTransformer.from_pretrained(str(folder), tokenizer=False, dtype=DTYPE)
    print(f"# GPT-2-small random weights, CPU fp32, {torch.get_num_threads()} threads, torch {torch.__version__}")
    print_header("ours", "peer")
    ours_ratios = time_forward(hf, ours, parse_shapes(args.shapes), args.rounds)
    del hf, ours

    load_hf, load_ours = measure_load("hf", folder), measure_load("ours", folder)
    print_row("RSS after load (MiB) vs transformers", load_ours["rss_mib"], load_hf["rss_mib"])
    print_row("load from local folder (s) vs transformers", load_ours["load_s"], load_hf["load_s"])

    if args.no_peers:
        return
    if not (PEER_VENVS["peers"] / "bin" / "python").exists():
        print(f"# peers skipped: no {PEER_VENVS['peers']} (build it with `bash benchmarks/peer_venv.sh`)")
        return
    for tool, label in (("tl", "TL HookedTransformer"), ("bridge", "TL TransformerBridge"), ("nnsight", "nnsight")):
        res = run_peer(tool, folder, args.shapes, rounds=max(3, args.rounds // 2))
        if res is None:
            continue
        _print_peer(label, res, load_ours, ours_ratios)


def _print_peer(label: str, res: dict, load_ours: dict, ours_ratios: dict) -> None:
    """Peer rows as ratios: ours/HF (this process) vs peer/HF (peer's process)."""
    for key, shape in _shape_items(res):
        ref = shape.get("hf_forward_s")
        for metric, name in (("forward_s", "forward"), ("cache_all_s", "run_with_cache all"),
                             ("cache_resid_s", "cache resid_post")):
            if shape.get(metric) and ref:
                print_row(f"{name} {key} x HF vs {label}", ours_ratios.get((metric, key)), shape[metric] / ref)
    if res.get("rss_after_forward_mib") or res.get("rss_after_load_mib"):
        print_row(f"RSS after load (MiB) vs {label}", load_ours["rss_mib"],
                  res.get("rss_after_forward_mib") or res.get("rss_after_load_mib"))
    if res.get("load_s"):
        print_row(f"load from local folder (s) vs {label}", load_ours["load_s"], res["load_s"])


def _shape_items(res: dict):
    shapes = res.get("shapes") or {}
    return list(shapes.items()) if isinstance(shapes, dict) else [(s.get("shape"), s) for s in shapes]


if __name__ == "__main__":
    main()
