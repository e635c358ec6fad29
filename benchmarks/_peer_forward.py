"""Measure one PEER tool's load time, memory and forward/caching speed on a local GPT-2 folder.

Runs INSIDE the isolated peer venv (never the project env); `benchmarks/common.py:run_peer` starts it:

    bash benchmarks/peer_venv.sh        # once
    benchmarks/.venv-peers/bin/python benchmarks/_peer_forward.py --tool tl \
        --model-dir /tmp/gpt2-rand --shapes 8x128,1x512 --rounds 3 --seed 0

--tool tl       transformer_lens.HookedTransformer.from_pretrained (default processing: fold_ln,
                centering), given the HF model loaded from --model-dir (see _load_tl for the offline trick)
--tool bridge   transformer_lens.model_bridge.TransformerBridge.boot_transformers(model_dir)
                (raw HF numerics; --bridge-compat also calls enable_compatibility_mode())
--tool nnsight  nnsight.LanguageModel(model_dir, dispatch=True)

Per shape BxT (token ids drawn like common.make_tokens: torch.Generator().manual_seed(seed), randint over
the vocab) it reports the median over --rounds (after --warmup rounds) of:
  forward_s      plain forward, no hooks (nnsight: a trace that saves only the model output)
  cache_all_s    run_with_cache() with every hook (TL/bridge; None for nnsight)
  cache_resid_s  run_with_cache(names_filter=blocks.*.hook_resid_post) (nnsight: a trace saving every
                 block's output, i.e. the same 12 residual-stream tensors)
  hf_forward_s   a plain HF AutoModelForCausalLM from the same folder, same process, same tokens
                 (reference for ratios; --no-hf skips it)
All candidates of a shape run interleaved round by round, under torch.inference_mode() (--no-grad-mode
to use torch.no_grad() instead), torch.set_num_threads(--threads, default 2).
Memory: rss_base_mib (after imports), rss_after_load_mib, rss_after_forward_mib (after one 1x8 forward,
before the HF reference is loaded: the tool's resident footprint), rss_peak_mib (VmHWM, includes the HF
reference and the caches). Prints ONE JSON object on stdout (everything else the tools print goes to stderr).
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import os
import sys
import tempfile
import time
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import rss_mib, timeit_interleaved  # noqa: E402  (stdlib-only at import: safe inside the peer venv)

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
warnings.filterwarnings("ignore")


def _load_tl(model_dir, tok):
    from transformer_lens import HookedTransformer
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(model_dir)
    # TL 3.9's from_pretrained first maps the name through its official-model table (a path is rejected),
    # then get_pretrained_model_config treats the name as a local folder when Path(name) exists, else asks
    # the Hub for its config. So: load under the official name "gpt2" from a cwd where ./gpt2 -> model_dir.
    cwd = os.getcwd()
    with tempfile.TemporaryDirectory() as d:
        os.symlink(os.path.abspath(model_dir), os.path.join(d, "gpt2"))
        os.chdir(d)
        try:
            model = HookedTransformer.from_pretrained("gpt2", hf_model=hf, tokenizer=tok, device="cpu")
        finally:
            os.chdir(cwd)
    del hf
    return model.eval()


def _load_bridge(model_dir, tok, compat):
    from transformer_lens.model_bridge import TransformerBridge

    model = TransformerBridge.boot_transformers(model_dir, device="cpu", tokenizer=tok)
    if compat:
        model.enable_compatibility_mode()
    return model.eval()


def _load_nnsight(model_dir):
    from nnsight import LanguageModel

    return LanguageModel(model_dir, dispatch=True)


def _nnsight_fns(model, ids):
    def forward():
        with model.trace(ids):
            out = model.output.save()
        return out

    def blocks():
        saved = []
        with model.trace(ids):
            for blk in model.transformer.h:  # a for loop: comprehensions don't work inside a trace
                saved.append(blk.output.save())
        return saved

    return {"forward_s": forward, "cache_resid_s": blocks}


def _hooked_fns(model, ids, n_layers):
    resid = [f"blocks.{i}.hook_resid_post" for i in range(n_layers)]
    return {
        "forward_s": lambda: model(ids),
        "cache_all_s": lambda: model.run_with_cache(ids),
        "cache_resid_s": lambda: model.run_with_cache(ids, names_filter=resid),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tool", required=True, choices=["tl", "bridge", "nnsight"])
    ap.add_argument("--model-dir", required=True)
    ap.add_argument("--shapes", default="8x128,1x512")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--no-hf", action="store_true", help="skip the in-process HF reference forward")
    ap.add_argument("--no-grad-mode", action="store_true", help="torch.no_grad() instead of inference_mode()")
    ap.add_argument("--bridge-compat", action="store_true", help="bridge: enable_compatibility_mode()")
    args = ap.parse_args()
    real_stdout = sys.stdout
    res: dict = {
        "tool": args.tool,
        "threads": args.threads,
        "rounds": args.rounds,
        "warmup": args.warmup,
        "seed": args.seed,
    }

    with contextlib.redirect_stdout(sys.stderr):  # TL prints "Loaded pretrained model ..." to stdout
        t0 = time.perf_counter()
        import torch
        import transformers
        from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

        if args.tool == "nnsight":
            import nnsight

            res["versions"] = {"nnsight": nnsight.__version__}
        else:
            from importlib.metadata import version

            import transformer_lens  # noqa: F401

            res["versions"] = {"transformer_lens": version("transformer-lens")}
        res["versions"].update(torch=torch.__version__, transformers=transformers.__version__)
        res["import_s"] = time.perf_counter() - t0
        torch.set_num_threads(args.threads)
        grad_ctx = torch.no_grad if args.no_grad_mode else torch.inference_mode
        cfg = AutoConfig.from_pretrained(args.model_dir)
        n_layers, vocab = cfg.n_layer, cfg.vocab_size
        gc.collect()
        res["rss_base_mib"] = rss_mib()

        t0 = time.perf_counter()
        if args.tool == "nnsight":
            model = _load_nnsight(args.model_dir)
        else:
            tok = AutoTokenizer.from_pretrained(args.model_dir)
            model = (
                _load_tl(args.model_dir, tok)
                if args.tool == "tl"
                else _load_bridge(args.model_dir, tok, args.bridge_compat)
            )
        res["load_s"] = time.perf_counter() - t0
        gc.collect()
        res["rss_after_load_mib"] = rss_mib()
        res["param_mib"] = sum(p.numel() * p.element_size() for p in model.parameters()) / 2**20
        # Weights may still be lazily mmapped from model.safetensors right after loading: one small forward
        # touches them all, so this is the resident footprint of the loaded tool.
        with grad_ctx():
            probe = torch.zeros(1, 8, dtype=torch.long)
            _nnsight_fns(model, probe)["forward_s"]() if args.tool == "nnsight" else model(probe)
        gc.collect()
        res["rss_after_forward_mib"] = rss_mib()

        hf = None if args.no_hf else AutoModelForCausalLM.from_pretrained(args.model_dir).eval()
        res["shapes"] = {}
        for shape in args.shapes.split(","):
            b, t = (int(v) for v in shape.lower().split("x"))
            ids = torch.randint(0, vocab, (b, t), generator=torch.Generator().manual_seed(args.seed))
            with grad_ctx():
                fns = (
                    _nnsight_fns(model, ids) if args.tool == "nnsight" else _hooked_fns(model, ids, n_layers)
                )
                if hf is not None:
                    fns["hf_forward_s"] = lambda ids=ids: hf(ids)
                row = timeit_interleaved(fns, rounds=args.rounds, warmup=args.warmup)
                if args.tool != "nnsight":
                    row["n_cached_all"] = len(model.run_with_cache(ids)[1])
            row.setdefault("cache_all_s", None)
            if hf is not None:
                row["ratio_forward_vs_hf"] = row["forward_s"] / row["hf_forward_s"]
            res["shapes"][shape] = row
        res["rss_peak_mib"] = rss_mib(peak=True)

    print(json.dumps(res), file=real_stdout, flush=True)


if __name__ == "__main__":
    main()
