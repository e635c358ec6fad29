"""Shared helpers for the mechscope benchmarks. Runs in the PROJECT environment and never imports a peer
tool (TransformerLens, nnsight, ...): peers run in the isolated venv built by `bash benchmarks/peer_venv.sh`
and are reached only through `run_peer`, which starts `benchmarks/_peer_forward.py` in that venv.

    from benchmarks.common import make_gpt2_small_folder, make_tokens, run_peer, timeit_interleaved, print_row
    d = make_gpt2_small_folder("/tmp/gpt2-rand")                    # random GPT-2-small, saved offline
    peer = run_peer("tl", d, ["8x128", "1x512"], rounds=3, seed=0)  # dict from the peer venv, or None
    print_row("forward 8x128 (s)", ours, peer["shapes"]["8x128"]["forward_s"], None)

Tokenizer: the real GPT-2 vocabulary cannot be downloaded here, so `make_gpt2_small_folder` writes a
byte-level stand-in (the 256 GPT-2 byte tokens at their GPT-2 ids + `<|endoftext|>` at 50256, no merges).
It exists only so that loaders which insist on a tokenizer (TransformerLens, nnsight) work offline; every
benchmark feeds the same seeded random token ids (`make_tokens`), never text.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

BENCH_DIR = Path(__file__).resolve().parent
PEER_VENVS = {"peers": BENCH_DIR / ".venv-peers", "circuit-tracer": BENCH_DIR / ".venv-circuit-tracer"}
GPT2_VOCAB = 50257


def make_tokens(batch: int, seq: int, seed: int = 0, vocab: int = GPT2_VOCAB):
    """Seeded random token ids of shape (batch, seq). `_peer_forward.py` draws them the same way."""
    import torch

    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab, (batch, seq), generator=g)


def parse_shapes(shapes: str | Sequence[str]) -> list[tuple[int, int]]:
    """'8x128,1x512' or ['8x128', '1x512'] -> [(8, 128), (1, 512)]."""
    items = shapes.split(",") if isinstance(shapes, str) else list(shapes)
    return [tuple(int(v) for v in s.lower().split("x")) for s in items if s]


def _byte_level_tokenizer():
    """GPT-2-compatible byte-level tokenizer without merges (see module docstring)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import GPT2TokenizerFast

    # GPT-2's ids 0..255 are its byte-level symbols in this order (GPT-2's bytes_to_unicode()).
    bs = (
        list(range(ord("!"), ord("~") + 1))
        + list(range(ord("¡"), ord("¬") + 1))
        + list(range(ord("®"), ord("ÿ") + 1))
    )
    cs = bs + [256 + i for i in range(256 - len(bs))]
    vocab = {chr(c): i for i, c in enumerate(cs)}
    vocab["<|endoftext|>"] = GPT2_VOCAB - 1
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    eot = "<|endoftext|>"
    return GPT2TokenizerFast(
        tokenizer_object=tok, bos_token=eot, eos_token=eot, unk_token=eot, model_max_length=1024
    )


def make_gpt2_small_folder(path: str | os.PathLike, seed: int = 0) -> Path:
    """Save a random-init GPT-2-small (12 layers, d_model 768, 12 heads, vocab 50257, n_ctx 1024) as a local
    HF folder (config.json + model.safetensors + byte-level tokenizer). Reused if already built for `seed`."""
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    path = Path(path)
    stamp = path / "mechscope-bench.json"
    if (
        (path / "model.safetensors").exists()
        and stamp.exists()
        and json.loads(stamp.read_text()) == {"seed": seed, "v": 2}
    ):
        return path
    torch.manual_seed(seed)
    # n_ctx: legacy field that the real openai-community/gpt2 config.json carries and TransformerLens reads.
    cfg = GPT2Config(n_layer=12, n_embd=768, n_head=12, vocab_size=GPT2_VOCAB, n_positions=1024, n_ctx=1024)
    model = GPT2LMHeadModel(cfg).eval()
    path.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(path, safe_serialization=True)
    _byte_level_tokenizer().save_pretrained(path)
    stamp.write_text(json.dumps({"seed": seed, "v": 2}))
    return path


def run_peer(
    tool: str,
    model_dir: str | os.PathLike,
    shapes: str | Sequence[str],
    rounds: int = 3,
    seed: int = 0,
    venv: str = "peers",
    timeout: float = 1800,
) -> dict | None:
    """Measure a peer tool ('tl', 'bridge', 'nnsight') in its isolated venv; returns the JSON dict printed by
    `_peer_forward.py`, or None (with a note) when the venv is missing or the run fails."""
    py = PEER_VENVS[venv] / "bin" / "python"
    if not py.exists():
        print(f"[run_peer] {py} is missing: build it with `bash benchmarks/peer_venv.sh` (skipping {tool})")
        return None
    shapes = shapes if isinstance(shapes, str) else ",".join(shapes)
    cmd = [
        str(py),
        str(BENCH_DIR / "_peer_forward.py"),
        "--tool",
        tool,
        "--model-dir",
        str(model_dir),
        "--shapes",
        shapes,
        "--rounds",
        str(rounds),
        "--seed",
        str(seed),
    ]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "PYTHONPATH": ""}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)
    if proc.returncode != 0:
        print(f"[run_peer] {tool} failed (exit {proc.returncode}):\n{proc.stderr[-3000:]}", file=sys.stderr)
        return None
    return json.loads(proc.stdout.strip().splitlines()[-1])


def timeit_interleaved(
    fns: dict[str, Callable[[], object]], rounds: int = 5, warmup: int = 1
) -> dict[str, float]:
    """Time each candidate once per round, candidates interleaved (order rotated every round) so drift in
    machine speed hits all of them alike. Returns {name: median seconds}."""
    names = list(fns)
    for _ in range(warmup):
        for n in names:
            fns[n]()
    times: dict[str, list[float]] = {n: [] for n in names}
    for r in range(rounds):
        for n in names[r % len(names) :] + names[: r % len(names)]:
            t0 = time.perf_counter()
            fns[n]()
            times[n].append(time.perf_counter() - t0)
    return {n: statistics.median(t) for n, t in times.items()}


def rss_mib(peak: bool = False) -> float:
    """Resident set size of this process in MiB (VmHWM, the peak so far, with peak=True)."""
    key = "VmHWM:" if peak else "VmRSS:"
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(key):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    import resource  # fallback (non-Linux): peak only

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _fmt(v) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)


def print_row(name: str, ours, peer, ratio=None) -> None:
    """One comparison per line: `name  ours  peer  ratio`, aligned. ratio defaults to ours/peer."""
    if ratio is None and isinstance(ours, (int, float)) and isinstance(peer, (int, float)) and peer:
        ratio = ours / peer
    r = f"{ratio:.2f}x" if isinstance(ratio, (int, float)) else _fmt(ratio)
    print(f"{name:<44} {_fmt(ours):>10} {_fmt(peer):>10} {r:>8}", flush=True)


def print_header(ours: str = "ours", peer: str = "peer") -> None:
    print_row("name", ours, peer, "ratio")
