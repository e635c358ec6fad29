"""Activation patching sweep speed: mechscope's batched sweep vs the one-forward-per-patch loop.

    python benchmarks/patching.py [--prompts 8] [--rounds 1] [--quick] [--no-peers]

Task: IOI on the real SmolLM2-135M (30 layers), a batch of prompts with ABC corruptions
(`mechscope.circuits.tasks.ioi`), metric = logit difference IO - S at the last position. Sweep:
resid_pre x position over every layer (--quick: 6 layers), denoising (clean patched into corrupted).
Candidates, timed interleaved in one process (medians over --rounds):
  ours       activation_patching(...) as shipped: batched patches, the unpatched prefix (earlier layers,
             earlier positions) computed once, logits only where the metric reads them, and patches that
             write the values already there (positions before the corrupted token) not run at all
  ours_all   the same with skip_unchanged=False: every patch is run (the engine's speed alone)
  loop       the TransformerLens-style loop through OUR hooks: one full forward pass (full logits) per patch
Peer: TransformerLens 3.9 itself (`transformer_lens.patching.generic_activation_patch` with
`layer_pos_patch_setter` on resid_pre, i.e. get_act_patch_resid_pre restricted to the swept layers)
on the same weights (SmolLM2 loaded from our local folder with from_pretrained_no_processing), run in
the isolated venv built by `bash benchmarks/peer_venv.sh` (this file re-runs itself there with --peer;
it then imports only torch, transformers and transformer_lens).
Checks: ours == loop entry by entry (max abs diff <= 1e-5); TL's grid is compared too (its attention
and rotary code differ from ours in float rounding, so that diff is reported, not required to be 0).
Prints `name ours peer ratio` lines. Target (issue): ours >= 5x faster than the loop.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
TOL = 1e-5


# ------------------------------------------------------------------------------ peer side (runs in the venv)


def peer_main(spec_path: str) -> None:
    """Run TransformerLens's own resid_pre patching sweep on the spec's tokens; print one JSON line."""
    import contextlib
    import warnings

    warnings.filterwarnings("ignore")
    spec = json.loads(Path(spec_path).read_text())
    real_stdout = sys.stdout
    with contextlib.redirect_stdout(sys.stderr):
        torch.set_num_threads(spec["threads"])
        from transformer_lens import HookedTransformer
        from transformer_lens import patching as tl_patching
        from transformers import AutoModelForCausalLM, AutoTokenizer

        folder = spec["model_dir"]
        hf = AutoModelForCausalLM.from_pretrained(folder)
        tok = AutoTokenizer.from_pretrained(folder)
        # TL 3.9 maps names through its official table (SmolLM2 is not in it) but reads the config of a local
        # folder when Path(name) exists: load under an official name from a cwd where that name -> our folder.
        # The config (LlamaForCausalLM, 30 layers, GQA) and the weights (hf_model) are SmolLM2's.
        cwd = os.getcwd()
        with tempfile.TemporaryDirectory() as d:
            os.symlink(os.path.abspath(folder), os.path.join(d, "gpt2"))
            os.chdir(d)
            try:
                model = HookedTransformer.from_pretrained_no_processing("gpt2", hf_model=hf, tokenizer=tok,
                                                                         device="cpu")
            finally:
                os.chdir(cwd)
        del hf
        model.eval()
        clean = torch.tensor(spec["clean"])
        corrupted = torch.tensor(spec["corrupted"])
        io, s, pos = (torch.tensor(spec[k]) for k in ("answers", "wrong", "answer_pos"))
        rows = torch.arange(len(clean))
        layers = spec["layers"]

        def metric(logits):
            at = logits[rows, pos]
            return (at[rows, io] - at[rows, s]).mean()

        import pandas as pd

        T = clean.shape[1]
        # get_act_patch_resid_pre over the requested layers only: the same generic_activation_patch call
        # (layer_pos_patch_setter on resid_pre) with an explicit index_df instead of every layer
        index_df = pd.DataFrame([(layer, p) for layer in layers for p in range(T)], columns=["layer", "pos"])

        def sweep():
            with torch.no_grad():
                _, cache = model.run_with_cache(clean)
                flat = tl_patching.generic_activation_patch(
                    model, corrupted, cache, metric, patch_setter=tl_patching.layer_pos_patch_setter,
                    activation_name="resid_pre", index_df=index_df)
            return flat.reshape(len(layers), T)

        with torch.no_grad():
            cl, co = metric(model(clean)).item(), metric(model(corrupted)).item()
        times, res = [], None
        for _ in range(spec["rounds"]):
            t0 = time.perf_counter()
            res = sweep()
            times.append(time.perf_counter() - t0)
    times.sort()
    out = {"tl_s": times[len(times) // 2], "grid": res.tolist(), "clean": cl, "corrupted": co}
    print(json.dumps(out), file=real_stdout, flush=True)


def run_tl_peer(spec: dict) -> dict | None:
    py = HERE / ".venv-peers" / "bin" / "python"
    if not py.exists():
        print(f"[peer] {py} is missing: build it with `bash benchmarks/peer_venv.sh` (skipping TransformerLens)")
        return None
    with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as f:
        json.dump(spec, f)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "PYTHONPATH": ""}
    try:
        proc = subprocess.run([str(py), __file__, "--peer", f.name], capture_output=True, text=True, env=env,
                              timeout=3600)
    finally:
        os.unlink(f.name)
    if proc.returncode != 0:
        print(f"[peer] TransformerLens failed (exit {proc.returncode}):\n{proc.stderr[-3000:]}", file=sys.stderr)
        return None
    return json.loads(proc.stdout.strip().splitlines()[-1])


# ------------------------------------------------------------------------------ our side


def loop_patching(model, clean, corrupted, metric, layers):
    """The TransformerLens-style sweep through our hooks: one full forward pass per (layer, position)."""
    names = [f"blocks.{layer}.hook_resid_pre" for layer in layers]
    with torch.inference_mode():
        _, cache = model.run_with_cache(clean, names_filter=names)
        T = clean.shape[1]
        out = torch.empty(len(layers), T)
        for i, name in enumerate(names):
            for p in range(T):
                def hook(act, hook, p=p, name=name):
                    act[:, p] = cache[name][:, p]
                    return act

                out[i, p] = metric(model.run_with_hooks(corrupted, fwd_hooks=[(name, hook)]))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--prompts", type=int, default=8, help="IOI prompts in the batch")
    ap.add_argument("--rounds", type=int, default=1, help="timed rounds per candidate (median)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--quick", action="store_true", help="6 of the 30 layers (for development)")
    ap.add_argument("--no-peers", action="store_true")
    ap.add_argument("--batch-size", type=int, default=None, help="patches per forward (default: memory-bounded)")
    ap.add_argument("--peer", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.peer:
        return peer_main(args.peer)

    sys.path.insert(0, str(HERE))
    from common import print_header, print_row, timeit_interleaved

    from mechscope import HookedTransformer
    from mechscope.circuits.patching import LogitDiff, activation_patching
    from mechscope.circuits.tasks import ioi
    from mechscope.models.loading import resolve_folder

    torch.set_num_threads(args.threads)
    model = HookedTransformer.from_pretrained("smollm2")
    task = ioi(model, args.prompts, seed=args.seed)
    clean, corrupted = task.clean_tokens, task.corrupted_tokens
    B, T = clean.shape
    L = model.cfg.n_layers
    layers = list(range(0, L, 5)) if args.quick else list(range(L))
    fast_metric = LogitDiff(task.answers, task.wrong_answers, pos=task.answer_pos)

    def ours():
        return activation_patching(model, clean, corrupted, fast_metric, "resid_pre", "position", layers=layers,
                                   batch_size=args.batch_size, progress=False)

    def ours_all():
        return activation_patching(model, clean, corrupted, fast_metric, "resid_pre", "position", layers=layers,
                                   batch_size=args.batch_size, skip_unchanged=False, progress=False)

    def loop():
        return loop_patching(model, clean, corrupted, task.metric, layers)

    try:
        load = os.getloadavg()
    except OSError:
        load = (float("nan"),) * 3
    print(f"# SmolLM2-135M, IOI x {B} prompts of {T} tokens, resid_pre x position over {len(layers)} layers = "
          f"{len(layers) * T} patches; CPU fp32, {torch.get_num_threads()} threads, torch {torch.__version__}; "
          f"load average {load[0]:.2f} {load[1]:.2f} {load[2]:.2f} on {os.cpu_count()} cores")
    results: dict[str, torch.Tensor] = {}
    fns = {"ours": ours, "ours_all": ours_all, "loop": loop}
    t = timeit_interleaved({k: (lambda k=k, f=f: results.__setitem__(k, f())) for k, f in fns.items()},
                           rounds=args.rounds, warmup=0)
    got, want = results["ours"], results["loop"]
    diff_all = float((results["ours_all"] - want).abs().max())
    base = task.baseline(model)
    diff = float((got - want).abs().max())
    print(f"# clean logit diff {base.clean:.3f}, corrupted {base.corrupted:.3f}; "
          f"max |ours - loop| = {diff:.2e} (required <= {TOL:g})")
    norm = (got - base.corrupted) / (base.clean - base.corrupted)
    best = divmod(int(norm.argmax()), T)
    roles = ", ".join(f"{k} in {int((v == best[1]).sum())} of {B} prompts" for k, v in task.positions.items()
                      if bool((v == best[1]).any()))
    print(f"# strongest restoration: layer {layers[best[0]]}, position {best[1]} ({roles or 'no named role'}): "
          f"{float(norm.max()):.2f} of the clean logit diff")
    print_header("ours", "peer")
    print_row(f"resid_pre sweep {len(layers)}x{T} (s) vs loop our hooks", t["ours"], t["loop"])
    print_row("same, skip_unchanged=False (s) vs loop", t["ours_all"], t["loop"])
    print_row("max abs diff vs loop (<= 1e-5)", diff, 0.0, "ok" if diff <= TOL else "FAIL")
    print_row("max abs diff vs loop, skip_unchanged=False", diff_all, 0.0, "ok" if diff_all <= TOL else "FAIL")
    ratio = t["loop"] / t["ours"]
    print_row("speedup vs one forward per patch (>= 5x)", ratio, 5.0, "ok" if ratio >= 5 else "MISS")
    print_row("speedup, skip_unchanged=False", t["loop"] / t["ours_all"], 5.0, "-")

    if not args.no_peers:
        spec = {"model_dir": str(resolve_folder("smollm2")), "clean": clean.tolist(), "corrupted": corrupted.tolist(),
                "answers": task.answers.tolist(), "wrong": task.wrong_answers.tolist(),
                "answer_pos": task.answer_pos.tolist(), "layers": layers, "rounds": args.rounds,
                "threads": args.threads}
        t0 = time.perf_counter()
        res = run_tl_peer(spec)
        if res is not None:
            tl_grid = torch.tensor(res["grid"])
            print_row(f"resid_pre sweep {len(layers)}x{T} (s) vs TransformerLens", t["ours"], res["tl_s"])
            print_row("max abs diff vs TransformerLens", float((got - tl_grid).abs().max()), 0.0, "-")
            print_row("speedup vs TransformerLens", res["tl_s"] / t["ours"], 5.0,
                      "ok" if res["tl_s"] / t["ours"] >= 5 else "MISS")
            print(f"# TransformerLens run (load + sweep) took {time.perf_counter() - t0:.0f} s in the peer venv; "
                  f"its clean/corrupted logit diffs {res['clean']:.3f}/{res['corrupted']:.3f}")
    if max(diff, diff_all) > TOL:
        sys.exit(1)


if __name__ == "__main__":
    main()
