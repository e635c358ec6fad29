"""`mechscope` command line.

    mechscope inspect [MODEL]     load a model; print config, hook names with shapes, parameter
                                  count and a log-prob parity check against transformers
"""

from __future__ import annotations

import argparse
import sys
import time

from mechscope.errors import MechscopeError

DEFAULT_MODEL = "smollm2"
PARITY_PROMPTS = ["The capital of France is", "When Mary and John went to the store, John gave a drink to"]


def _hf_reference(folder):
    """The same checkpoint loaded by plain transformers, as the class its config.json names."""
    import torch
    import transformers

    archs = transformers.AutoConfig.from_pretrained(str(folder)).architectures or []
    cls = getattr(transformers, archs[0], None) if archs else None
    return (cls or transformers.AutoModel).from_pretrained(str(folder), dtype=torch.float32).eval()


def inspect_model(name: str, parity: bool = True, out=None) -> dict:
    """Load `name`, print what a user needs to start hooking it; returns the summary as a dict."""
    import torch

    out = out or sys.stdout
    from mechscope.models.loading import from_pretrained, resolve_folder

    t0 = time.perf_counter()
    folder = resolve_folder(name)
    model = from_pretrained(name)
    load_s = time.perf_counter() - t0
    cfg = model.cfg
    n_params = sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())
    print(f"model      {name}  ({cfg.architecture}, loaded in {load_s:.1f}s from {folder})", file=out)
    print(f"parameters {n_params:,}", file=out)
    print("config", file=out)
    for k, v in cfg.to_dict().items():
        if v not in (None, False, [], {}) or k in ("causal",):
            print(f"  {k:22s} {v}", file=out)

    texts = PARITY_PROMPTS if cfg.causal else ["The cat sat on the mat.", "A dog ran home."]
    if model.tokenizer is not None:
        tokens, mask = model.to_tokens(texts, return_mask=True, padding_side="right")
    else:
        tokens = torch.randint(0, cfg.d_vocab, (2, 8), generator=torch.Generator().manual_seed(0))
        mask = torch.ones_like(tokens)
    with torch.no_grad():
        ret = "logits" if cfg.has_unembed else "resid"
        _, cache = model.run_with_cache(tokens, attention_mask=mask, return_type=ret)
    print(f"hook points ({len(model.hook_names)}; shapes for a batch of {tokens.shape[0]} x {tokens.shape[1]} tokens)",
          file=out)
    layer0 = [n for n in model.hook_names if not n.startswith("blocks.") or n.startswith("blocks.0.")]
    for n in layer0:
        shape = tuple(cache[n].shape) if n in cache else "(computed only when hooked)"
        print(f"  {n.replace('blocks.0.', 'blocks.{l}.'):40s} {shape}", file=out)
    summary = {"model": name, "architecture": cfg.architecture, "parameters": n_params, "load_s": load_s,
               "hook_points": len(model.hook_names)}

    if parity:
        t0 = time.perf_counter()
        hf = _hf_reference(folder)
        pos = (mask.cumsum(-1) - 1).clamp(min=0)  # transformers does not derive positions from the mask
        with torch.no_grad():
            hf_out = hf(tokens, attention_mask=mask, position_ids=pos)
            if cfg.has_unembed:
                ref, ours = hf_out.logits.log_softmax(-1), model(tokens, attention_mask=mask).log_softmax(-1)
                what = "log-prob"
            else:
                ref, ours = hf_out.last_hidden_state, model(tokens, attention_mask=mask, return_type="resid")
                what = "hidden-state"
        diff = float((ref - ours).abs()[mask.bool()].max())
        ok = diff < 1e-4
        print(f"parity     max |{what} diff| vs transformers = {diff:.2e} ({'OK' if ok else 'FAIL'}, "
              f"tolerance 1e-4, {time.perf_counter() - t0:.1f}s)", file=out)
        summary |= {"parity_max_abs_diff": diff, "parity_ok": ok}
        if cfg.causal and model.tokenizer is not None:
            completion = model.generate(PARITY_PROMPTS[0], 3)
            print(f"greedy     {completion!r}", file=out)
            summary["greedy"] = completion
    return summary


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="mechscope", description="Mechanistic interpretability toolkit.")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("inspect", help="load a model and print config, hook names/shapes and parity vs transformers")
    p.add_argument("model", nargs="?", default=DEFAULT_MODEL,
                   help="a local HF folder, a built-in (smollm2, minilm) or a cached hub id")
    p.add_argument("--no-parity", action="store_true", help="skip the comparison with transformers")
    args = parser.parse_args(argv)
    try:
        if args.command == "inspect":
            summary = inspect_model(args.model, parity=not args.no_parity)
            return 0 if summary.get("parity_ok", True) else 1
    except MechscopeError as e:
        print(f"mechscope: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
