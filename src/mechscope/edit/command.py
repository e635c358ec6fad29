"""`mechscope edit`: write one fact with ROME (or several with MEMIT, --requests FILE.json) and save the edited
model folder, printing the target's and the old answer's probabilities before and after.

    mechscope edit --prompt "The Eiffel Tower is located in the city of" --subject "The Eiffel Tower" \
                   --target " Rome" --out runs/eiffel-rome

The folder is a native model folder (`from_pretrained(DIR)` loads the edited model) with the edit recorded in
config.json's mechscope_extra, and edit-step.json (mechscope.steps): rerunning with the same settings and
model prints the saved result.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from mechscope.errors import CorpusNotFoundError, InputError

STEP = "edit-step.json"


def _requests(args: Any) -> list[dict[str, Any]]:
    if args.requests is not None:
        path = Path(args.requests)
        if not path.exists():
            raise CorpusNotFoundError(f"No such requests file: {path}.")
        try:
            reqs = json.loads(path.read_text())
        except ValueError as e:
            raise InputError(f"{path} is not JSON: {e}. It must hold a list of {{prompt, subject, target}}.") from e
        if not isinstance(reqs, list) or not reqs:
            raise InputError(f"{path} must hold a non-empty JSON list of {{prompt, subject, target}} objects.")
        if any(v is not None for v in (args.prompt, args.subject, args.target)):
            raise InputError("Give either --requests FILE or --prompt/--subject/--target, not both.")
        return reqs
    missing = [f"--{k}" for k in ("prompt", "subject", "target") if getattr(args, k) is None]
    if missing:
        raise InputError(f"mechscope edit needs {', '.join(missing)} (or --requests FILE.json for MEMIT).")
    return [{"prompt": args.prompt, "subject": args.subject, "target": args.target}]


def _probabilities(model, reqs: list[dict[str, Any]]) -> list[float]:
    from mechscope.edit.evaluate import sequence_logprob

    return [float(sequence_logprob(model, [r["prompt"]], r["target"]).exp()[0]) for r in reqs]


def edit_command(args: Any) -> dict[str, Any]:
    """Run `mechscope edit` for parsed `args` (see cli.py); returns the summary it printed."""
    from mechscope.edit.memit import memit
    from mechscope.edit.rome import rome
    from mechscope.models.identity import model_identity
    from mechscope.models.loading import load_model
    from mechscope.steps import done, mark_done, step_key

    reqs = _requests(args)
    method = "memit" if args.requests is not None else "rome"
    model = load_model(args.model, device=args.device)
    out = Path(args.out)
    settings = {"method": method, "requests": reqs, "layer": args.layer, "cov_tokens": args.cov_tokens,
                "seed": args.seed}
    key = step_key(settings, {"model": model_identity(model)})
    record = done(out, key, name=STEP)
    if record is not None and (out / "model.safetensors").exists():
        print(record.result["text"])
        print(f"(cached in {out}; delete {out / STEP} to recompute)")
        return record.result
    t0 = time.perf_counter()
    before = _probabilities(model, reqs)
    if method == "rome":
        r = reqs[0]
        e = rome(model, r["prompt"], r["subject"], r["target"], layer=args.layer, cov_tokens=args.cov_tokens,
                 seed=args.seed)
    else:
        layers = None if args.layer is None else [args.layer]
        e = memit(model, reqs, layers=layers, cov_tokens=args.cov_tokens, seed=args.seed,
                  progress=not args.no_progress)
    after = _probabilities(model, reqs)
    lines = [f"{method} on layer(s) {e.layers}: P(target | prompt) before -> after"]
    for r, b, a in zip(reqs, before, after, strict=True):
        lines.append(f"  {r['prompt']!r} + {r['target']!r}: {b:.4f} -> {a:.4f}")
    model.save_pretrained(out, extra={"edit": {"method": method, "layers": e.layers, "requests": reqs}})
    lines.append(f"edited model saved to {out} (from_pretrained({str(out)!r}) loads it)")
    text = "\n".join(lines)
    print(text)
    result = {"text": text, "layers": e.layers, "before": before, "after": after}
    mark_done(out, key, result, seconds=time.perf_counter() - t0, name=STEP)
    return result


__all__ = ["edit_command"]
