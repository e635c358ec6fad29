"""Train a model's replacement MLPs: per-layer (PLT), skip or cross-layer (CLT) transcoders -> a TranscoderSet.

    ts = train_transcoders((model, "sotu"), kind="clt", n_layers=4, n_features=512, k=16, steps=2000)

Why here and not in the SAE trainer: PLT / skip are just `train_many` with one spec per layer (one pass
over the activations feeds every layer's coder); a CLT is one module whose features feed every later
layer, so its step differs, but it reuses the same pieces: batch sources whose order is a function of
(seed, step) (sae/sources.py), TrainConfig's schedules, and mechscope.training's Checkpoint / train_loop
(atomic, identity-checked, exact resume, progress bar).
"""

from __future__ import annotations

import copy
import dataclasses
from pathlib import Path
from typing import Any

import torch

from mechscope.errors import InputError, NonFiniteError
from mechscope.sae.clt import CLT_ARCHS, CLTConfig, CrossLayerTranscoder
from mechscope.sae.metrics import batch_fve
from mechscope.sae.sources import BatchSource, TensorSource, open_source
from mechscope.sae.train import train_many
from mechscope.sae.train_config import TrainConfig, lr_at, sparsity_scale_at
from mechscope.sae.transcoders import DEFAULT_INPUT_HOOK, DEFAULT_OUTPUT_HOOK, TranscoderSet
from mechscope.training import (
    Checkpoint,
    Progress,
    Saved,
    load_module_tensors,
    load_optimizer_tensors,
    module_tensors,
    optimizer_tensors,
    restore_rng,
    train_loop,
)

KINDS = ("plt", "skip", "clt")
LOG_KEYS = ("step", "loss", "fve", "l0", "dead_fraction", "lr", "auxk_loss")
INIT_ROWS = 8192  # rows of the first batches used for the scales and b_dec


def train_transcoders(source: Any, *, kind: str = "plt", n_layers: int | None = None,
                      input_hook: str = DEFAULT_INPUT_HOOK, output_hook: str = DEFAULT_OUTPUT_HOOK,
                      arch: str = "topk", n_features: int = 4096, k: int | None = None, steps: int = 10_000,
                      batch_size: int = 4096, lr: float | None = None, seed: int = 0,
                      checkpoint_dir: str | Path | None = None, checkpoint_every: int = 1000,
                      progress: bool = True, device: torch.device | str | None = None,
                      log_every: int | None = None, stop_after: int | None = None, **options: Any) -> TranscoderSet:
    """Train transcoders for layers 0 .. n_layers - 1 and return them as a TranscoderSet.

    source: (model, text) to stream activations (text: a corpus name or PackedContexts), an
    ActivationStore holding the input and output hooks of every layer, or a dict {hook: tensor [N, d]}.
    kind: "plt" (per-layer), "skip" (per-layer + linear skip) or "clt" (cross-layer). n_layers: how
    many layers from 0 (default: all of the model's, or of the store's / dict's hooks). Hooks are
    templates with "{l}". arch: topk | jumprelu | relu (and every SAE arch for plt / skip); k: active
    features per token and layer (topk). options: TrainConfig fields (warmup_steps, l0_coeff, ...).
    With checkpoint_dir the run is resumable (PLT: one checkpoint for all layers; CLT likewise).
    """
    if kind not in KINDS:
        raise InputError(f"kind must be one of {', '.join(KINDS)}, got {kind!r}.")
    src_obj, model = _unpack(source)
    n_layers = _n_layers(n_layers, model, src_obj, input_hook, output_hook)
    ins = [input_hook.format(l=i) for i in range(n_layers)]
    outs = [output_hook.format(l=i) for i in range(n_layers)]
    cfg = TrainConfig(arch=arch, n_latents=n_features, k=k, steps=steps, batch_size=batch_size, lr=lr, seed=seed,
                      skip=kind == "skip", **options)
    common = {"checkpoint_dir": checkpoint_dir, "checkpoint_every": checkpoint_every, "progress": progress,
              "device": device, "log_every": log_every, "stop_after": stop_after}
    if kind != "clt":
        if isinstance(src_obj, dict):
            coders = []
            for i in range(n_layers):
                layer_ckpt = None if checkpoint_dir is None else Path(checkpoint_dir) / f"layer_{i}"
                spec = dataclasses.replace(cfg, hook=ins[i], target_hook=outs[i])
                coders += train_many((src_obj[ins[i]], src_obj[outs[i]]), [spec], **(common | {
                    "checkpoint_dir": layer_ckpt}))
        else:
            specs = [dataclasses.replace(cfg, hook=ins[i], target_hook=outs[i]) for i in range(n_layers)]
            coders = train_many(_train_many_source(src_obj, model, ins[0]), specs, **common)
        for c, h_in, h_out in zip(coders, ins, outs, strict=True):
            c.cfg.hook_in, c.cfg.hook_out = h_in, h_out
        return TranscoderSet.from_coders(coders)
    if arch not in CLT_ARCHS:
        raise InputError(f"A cross-layer transcoder supports arch {', '.join(CLT_ARCHS)}, got {arch!r}.")
    clt = train_clt(src_obj if model is None else (model, src_obj), ins, outs, cfg, **common)
    return TranscoderSet.from_clt(clt)


def _unpack(source: Any) -> tuple[Any, Any]:
    """(the activations or the text, the model or None)."""
    if isinstance(source, tuple | list) and len(source) == 2 and hasattr(source[0], "run_with_cache"):
        return source[1], source[0]
    if isinstance(source, dict):
        bad = [k for k, v in source.items() if not isinstance(v, torch.Tensor) or v.ndim != 2]
        if bad:
            raise InputError(f"A dict source maps hook names to tensors [N, d]; {bad[0]!r} is not one.")
        return source, None
    from mechscope.data.store import ActivationStore

    if isinstance(source, ActivationStore):
        return source, None
    raise InputError("source must be (model, text), an ActivationStore or a dict {hook: tensor [N, d]}; got "
                     f"{type(source).__name__}.")


def _n_layers(n_layers: int | None, model: Any, src: Any, input_hook: str, output_hook: str) -> int:
    if model is not None:
        total = model.cfg.n_layers
    else:
        hooks = set(src) if isinstance(src, dict) else set(src.hooks)
        total = 0
        while input_hook.format(l=total) in hooks and output_hook.format(l=total) in hooks:
            total += 1
        if total == 0:
            raise InputError(f"The source has no {input_hook.format(l=0)!r} and {output_hook.format(l=0)!r}: "
                             "harvest the input and output hooks of every layer to train transcoders on.")
    n = total if n_layers is None else n_layers
    if not 0 < n <= total:
        raise InputError(f"n_layers must be in 1..{total} (the layers with activations), got {n_layers}.")
    return n


def _train_many_source(src: Any, model: Any, first_hook: str) -> Any:
    return (model, first_hook, src) if model is not None else src


# ---------------------------------------------------------------------------- the CLT run


class _CLTRun:
    """The CLT, its optimizer and dead-feature counters as one resumable run."""

    def __init__(self, clt: CrossLayerTranscoder, cfg: TrainConfig) -> None:
        self.clt, self.cfg = clt, cfg
        fused = clt.W_enc.device.type in ("cpu", "cuda") and clt.W_enc.dtype == torch.float32
        self.opt = torch.optim.AdamW(clt.parameters(), lr=float(cfg.lr), betas=cfg.adam_betas,  # type: ignore[arg-type]
                                     eps=cfg.adam_eps, weight_decay=cfg.weight_decay, fused=fused)
        c = clt.cfg
        self.tokens_since_fired = torch.zeros(c.n_layers, c.n_features, dtype=torch.int64, device=clt.W_enc.device)

    def dead_fraction(self) -> float:
        return float((self.tokens_since_fired >= int(self.cfg.dead_window_tokens)).double().mean())  # type: ignore

    def checkpoint_state(self) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        if not all(bool(torch.isfinite(p).all()) for p in self.clt.parameters()):
            raise NonFiniteError("Non-finite CLT weights; the last good checkpoint is kept.")
        t = module_tensors(self.clt, "clt/") | optimizer_tensors(self.opt, "optim/")
        t["tokens_since_fired"] = self.tokens_since_fired
        return t, {"clt_config": self.clt.cfg.to_dict()}

    def restore(self, saved: Saved) -> None:
        load_module_tensors(self.clt, saved.tensors, "clt/")
        load_optimizer_tensors(self.opt, saved.tensors, "optim/")
        self.tokens_since_fired = saved.tensors["tokens_since_fired"].to(self.clt.W_enc.device)


def train_clt(source: Any, input_hooks: list[str], output_hooks: list[str], cfg: TrainConfig, *,
              checkpoint_dir: str | Path | None = None, checkpoint_every: int = 1000, progress: bool = True,
              device: torch.device | str | None = None, log_every: int | None = None,
              stop_after: int | None = None) -> CrossLayerTranscoder:
    """Train one cross-layer transcoder on layers 0..len(input_hooks) - 1 (see train_transcoders)."""
    L = len(input_hooks)
    src = _clt_source(source, input_hooks, output_hooks, cfg)
    dev = torch.device(device) if device is not None else torch.device("cpu")
    cfg = cfg.resolved(src.widths[input_hooks[0]], dev)
    clt_cfg = CLTConfig(n_layers=L, d_in=src.widths[input_hooks[0]], n_features=cfg.n_latents,
                        d_out=src.widths[output_hooks[0]], arch=cfg.arch, k=cfg.k, skip=cfg.skip,  # type: ignore
                        l1_coeff=cfg.l1_coeff or 0.0, l0_coeff=cfg.l0_coeff or 0.0,
                        jumprelu_bandwidth=cfg.jumprelu_bandwidth, jumprelu_init_threshold=cfg.jumprelu_init_threshold,
                        input_hooks=list(input_hooks), output_hooks=list(output_hooks), model_name=src.model_name,
                        model_identity=src.model_identity)
    widths = {src.widths[h] for h in input_hooks} | {src.widths[h] for h in output_hooks}
    if len(widths) > 2 or any(src.widths[h] != clt_cfg.d_in for h in input_hooks):
        raise InputError("A CLT needs the same width at every input hook and at every output hook.")
    ident = {"kind": "clt", "config": cfg.to_dict(), "hooks": [input_hooks, output_hooks],
             "data": src.data_identity(), "model": src.model_identity}
    ckpt = None if checkpoint_dir is None else Checkpoint(checkpoint_dir, ident)
    saved = ckpt.load() if ckpt is not None else None
    if saved is None:
        clt = CrossLayerTranscoder(clt_cfg, device=dev).init_weights(cfg.seed)
        _init_from_data(clt, src, input_hooks, output_hooks, cfg.normalize_input)
        run, start = _CLTRun(clt, cfg), Progress(0, {k: [] for k in LOG_KEYS})
    else:
        clt = CrossLayerTranscoder(CLTConfig.from_dict(saved.extra["clt_config"]), device=dev)
        run = _CLTRun(clt, cfg)
        run.restore(saved)
        restore_rng(saved)
        start = Progress(saved.step, saved.log)
    log_every = log_every or max(1, min(100, cfg.steps // 100))
    batches = src.batches(start.step)

    def step_fn(step: int, log: dict[str, list[float]]) -> float:
        batch = next(batches, None)
        if batch is None:
            raise InputError(f"The source ran out of activations after {step} steps of {cfg.batch_size}; ask for "
                             "fewer steps or give more data.")
        xs = [batch[h].to(dev) for h in input_hooks]  # L x [B, d_in]
        ys = [batch[h].to(dev) for h in output_hooks]  # L x [B, d_out]
        for group in run.opt.param_groups:
            group["lr"] = lr_at(step, cfg)
        loss, outs, acts, pres, parts = clt.loss(xs, ys, sparsity_scale=sparsity_scale_at(step, cfg))
        aux = None
        if cfg.auxk:  # features silent for dead_window_tokens (before this step) explain the residual errors
            dead = run.tokens_since_fired >= int(cfg.dead_window_tokens)  # type: ignore[arg-type]  # [L, n]
            res = [((y.to(o.dtype) - o) * clt.output_scale(m)).detach() for m, (y, o) in enumerate(zip(ys, outs))]
            aux = clt.auxk_loss(pres, res, dead, int(cfg.k_aux))  # type: ignore[arg-type]
            loss = loss + cfg.auxk_coeff * aux
        if not bool(torch.isfinite(loss)):
            raise NonFiniteError(f"CLT training hit a non-finite loss at step {step}; lower lr "
                                 f"(now {lr_at(step, cfg):.2e}) or check the activations.")
        run.opt.zero_grad(set_to_none=True)
        loss.backward()
        if cfg.grad_clip:
            torch.nn.utils.clip_grad_norm_(clt.parameters(), cfg.grad_clip)
        run.opt.step()
        with torch.no_grad():
            fired = torch.stack([(a != 0).any(0) for a in acts])  # [L, n]
            run.tokens_since_fired += xs[0].shape[0]
            run.tokens_since_fired[fired] = 0
            if (step + 1) % log_every == 0 or step + 1 == cfg.steps:
                log["step"].append(step)
                log["loss"].append(float(loss.detach()))
                log["fve"].append(sum(batch_fve(y, o) for y, o in zip(ys, outs, strict=True)) / L)
                log["l0"].append(float(torch.stack([(a != 0).sum(-1).double().mean() for a in acts]).mean()))
                log["dead_fraction"].append(run.dead_fraction())
                log["lr"].append(lr_at(step, cfg))
                log.setdefault("auxk_loss", []).append(0.0 if aux is None else float(aux.detach()))
        return float(loss.detach())

    def postfix(log: dict[str, list[float]]) -> dict[str, str] | None:
        if not log["step"]:
            return None
        return {"loss": f"{log['loss'][-1]:.4f}", "fve": f"{log['fve'][-1]:.3f}", "l0": f"{log['l0'][-1]:.1f}",
                "dead": f"{100 * log['dead_fraction'][-1]:.1f}%"}

    state, _ = train_loop(run, checkpoint=ckpt, steps=cfg.steps, step_fn=step_fn, every=checkpoint_every,
                          start=start, save_final=True, rng=True, progress=progress, postfix=postfix,
                          stop_after=stop_after, desc=f"train clt {cfg.arch}")
    out = copy.deepcopy(clt).fold_scales()
    out.cfg.extra.update(train=cfg.to_dict(), train_log=state.log,
                         train_stats={"dead_fraction": run.dead_fraction(),
                                      "dead_window_tokens": cfg.dead_window_tokens})
    return out


def _clt_source(source: Any, ins: list[str], outs: list[str], cfg: TrainConfig) -> BatchSource:
    data_seed = cfg.seed if cfg.data_seed is None else cfg.data_seed
    keys = list(zip(ins, outs, strict=True))
    if isinstance(source, dict):
        missing = [h for h in ins + outs if h not in source]
        if missing:
            raise InputError(f"The dict of activations lacks {missing[0]!r} (has {', '.join(sorted(source))}).")
        src: BatchSource = TensorSource({h: source[h] for h in dict.fromkeys(ins + outs)}, cfg.batch_size, data_seed)
    elif isinstance(source, tuple):
        model, text = source
        src = open_source((model, ins[0], text), batch_size=cfg.batch_size, seed=data_seed,
                          n_tokens=cfg.steps * cfg.batch_size, keys=keys)  # type: ignore[arg-type]
    else:
        src = open_source(source, batch_size=cfg.batch_size, seed=data_seed, n_tokens=cfg.steps * cfg.batch_size,
                          keys=keys)  # type: ignore[arg-type]
    src.keys = keys  # type: ignore[assignment]
    return src


@torch.no_grad()
def _init_from_data(clt: CrossLayerTranscoder, src: BatchSource, ins: list[str], outs: list[str],
                    normalize: bool) -> None:
    """Per-layer scales (E‖x‖ = sqrt(d) after scaling) and b_dec = mean scaled output, from the first batches."""
    from mechscope.sae.train import _scale_of, first_rows

    sample = first_rows(src, INIT_ROWS)
    c = clt.cfg
    if normalize:
        c.input_scales = [_scale_of(sample[h]) for h in ins]
        c.output_scales = [_scale_of(sample[h]) for h in outs]
    for m, h in enumerate(outs):
        clt.b_dec[m].copy_((sample[h].double() * clt.output_scale(m)).mean(0).to(clt.b_dec.dtype))


__all__ = ["KINDS", "train_clt", "train_transcoders"]
