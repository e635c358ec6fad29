"""Train sparse coders (SAEs, transcoders, skip-transcoders) on activations: the driver.

Why it is shaped this way:
- Resumable and reproducible by construction: the batch served at step s is a function of
  (data_seed, s) only (sae/sources.py), and the learning-rate and sparsity schedules are pure
  functions of s (sae/train_config.py). A checkpoint (mechscope.training.Checkpoint: weights, Adam
  moments, dead-latent counters, RNG state, step, log; safetensors + JSON, written atomically,
  identity-checked) therefore restores everything, and a resumed run replays the very steps an
  uninterrupted one would: same losses, same final weights.
- `Trainer.step` (sae/trainer.py) is the whole inner loop body for one coder, so a fast path
  (fused kernels, DDP) replaces one method.
- `train_many` trains several coders on one pass of the activations (one store read or one model
  forward per batch feeds every coder), and `train` is train_many with one spec.
- Inputs are scaled so E‖x‖ = sqrt(d) (coefficients then transfer between hooks and models); the
  scale lives in SAEConfig.input_scale/output_scale while training and is folded into the weights
  of the returned coder, which takes raw activations.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import math
from pathlib import Path
from typing import Any

import torch

from mechscope.errors import CheckpointMismatchError, InputError, NonFiniteError
from mechscope.sae import distributed, kernels
from mechscope.sae.coder import SparseCoder
from mechscope.sae.config import SAEConfig
from mechscope.sae.metrics import batch_fve
from mechscope.sae.metrics import fve as metrics_fve
from mechscope.sae.sources import (
    BatchSource,
    StoreSource,
    StreamSource,
    TensorSource,
    check_coder_fits,
    open_source,
)
from mechscope.sae.train_config import TrainConfig, lr_at, sparsity_scale_at
from mechscope.sae.trainer import StepStats, Trainer, geometric_median
from mechscope.training import Checkpoint, Progress, Saved, restore_rng, train_loop

LOG_KEYS = ("step", "loss", "fve", "l0", "dead_fraction", "lr")  # coder.cfg.extra["train_log"]
INIT_SAMPLE_BYTES = 1 << 30  # ... at most this much across all hooks (a 30-layer transcoder set has 60)
INIT_SAMPLE_ROWS = 16384  # rows (first batches) for the b_dec init and, without store stats, the scale


# ---------------------------------------------------------------------------- the loop


def train(source: Any, *, arch: str = "topk", n_latents: int = 4096, k: int | None = None,
          steps: int = 10_000, batch_size: int = 4096, lr: float | None = None, seed: int = 0,
          hook: str | None = None, target_hook: str | None = None, warmup_steps: int | None = None,
          decay: str = "linear", l1_coeff: float | None = None, l0_coeff: float | None = None,
          auxk: bool | None = None, dead_window_tokens: int | None = None,
          b_dec_init: str = "geometric_median", normalize_input: bool = True,
          autocast_bf16: bool | str = "auto", checkpoint_dir: str | Path | None = None,
          checkpoint_every: int = 1000, checkpoint_seconds: float | None = None, progress: bool = True,
          device: torch.device | str | None = None, log_every: int | None = None,
          stop_after: int | None = None, **options: Any) -> SparseCoder:
    """Train one sparse coder and return it (scales folded: it takes raw activations).

    source: a tensor [N, d] (SAE), an (x [N, d_in], y [N, d_out]) pair (transcoder), an
    ActivationStore (+ hook, and target_hook for a transcoder), or (model, hook, text) to stream
    activations from a model (text: a corpus name or a PackedContexts). The hyper-parameters are
    TrainConfig's fields (see its comments for the defaults); options takes the rest (skip,
    matryoshka_prefixes, sparsity_warmup_steps, auxk_coeff, k_aux, jumprelu_bandwidth, ...).
    With checkpoint_dir, a checkpoint is written every checkpoint_every steps (and every
    checkpoint_seconds of wall time, if given) and at the end, and an existing one is resumed (same losses and weights as an uninterrupted run); stop_after=S
    stops after step S as if interrupted. autocast_bf16="auto" selects with bf16 matmuls where they
    are fast (the resolved bool is stored). The loss curve (every log_every steps) and the final
    dead / dense fractions are in coder.cfg.extra["train_log"] and ["train_stats"].
    """
    fields = {f.name for f in dataclasses.fields(TrainConfig)}
    if set(options) - fields:
        raise InputError(f"Unknown training options {sorted(set(options) - fields)}; TrainConfig has: "
                         f"{', '.join(sorted(fields))}.")
    cfg = TrainConfig(arch=arch, n_latents=n_latents, k=k, steps=steps, batch_size=batch_size, lr=lr,
                      seed=seed, hook=hook, target_hook=target_hook, warmup_steps=warmup_steps, decay=decay,
                      l1_coeff=l1_coeff, l0_coeff=l0_coeff, auxk=auxk, dead_window_tokens=dead_window_tokens,
                      b_dec_init=b_dec_init, normalize_input=normalize_input, autocast_bf16=autocast_bf16,
                      **options)
    return train_many(source, [cfg], checkpoint_dir=checkpoint_dir, checkpoint_every=checkpoint_every,
                      checkpoint_seconds=checkpoint_seconds, progress=progress, device=device,
                      log_every=log_every, stop_after=stop_after)[0]


def train_many(source: Any, specs: list[TrainConfig | dict[str, Any]], *,
               checkpoint_dir: str | Path | None = None, checkpoint_every: int = 1000,
               checkpoint_seconds: float | None = None, progress: bool = True,
               device: torch.device | str | None = None, log_every: int | None = None,
               stop_after: int | None = None) -> list[SparseCoder]:
    """Train several coders on ONE pass of the activations (each batch feeds every coder).

    specs: TrainConfigs or dicts of TrainConfig fields; they may differ in anything but steps,
    batch_size and data_seed (one shared batch sequence), e.g. in arch, width, k, coefficients or
    hooks (one store batch dict serves them all). Each coder equals the one `train` gives with
    the same spec. Returns the coders in spec order; runtime options as in `train`.
    """
    if checkpoint_every <= 0:
        raise InputError(f"checkpoint_every must be positive, got {checkpoint_every}.")
    group = distributed.setup(device)  # None unless launched by torchrun (or a process group exists)
    if group is not None and checkpoint_seconds is not None:
        raise InputError("checkpoint_seconds is not supported under torchrun (the ranks' clocks would disagree "
                         "on when to checkpoint); use checkpoint_every.")
    dev = group.device if group is not None else (
        torch.device(device) if device is not None else _default_device(source))
    cfgs, src = _prepare(source, specs, dev)
    steps, batch_size = cfgs[0].steps, cfgs[0].batch_size
    rows = distributed.shard(batch_size, group) if group is not None else slice(None)
    main = group is None or group.is_main
    log_every = log_every or max(1, min(100, steps // 100))
    with distributed.activate(group):
        ckpt = None if checkpoint_dir is None else Checkpoint(
            checkpoint_dir, _identity(cfgs, src), writer=main,
            barrier=torch.distributed.barrier if group is not None else None)  # one writer, the others wait
        trainers, start = _resume_or_init(cfgs, src, dev, ckpt)
        data_info: dict[str, Any] = {"kind": type(src).__name__, "seed": cfgs[0].data_seed,
                                     "order": "a function of (seed, step): resume skips the batches served",
                                     "description": src.describe()}
        if group is not None:
            data_info["world_size"] = group.world  # informational: any world size resumes it
        batches = src.batches(start.step)

        def step_fn(step: int, log: list[dict[str, list[float]]]) -> None:
            batch = next(batches, None)
            if batch is None:
                raise InputError(f"The source ran out of activations after {step} steps of {batch_size}; "
                                 "ask for fewer steps or give more data.")
            for i, (t, (key_in, key_out)) in enumerate(zip(trainers, src.keys, strict=True)):
                x = batch[key_in][rows].to(dev, non_blocking=True)  # [B, d_in] (this rank's rows)
                y = batch[key_out][rows].to(dev, non_blocking=True) if key_out is not None else None
                try:
                    stats = t.step(x, y, step)
                except NonFiniteError as e:
                    raise _nan_error(i, t, step, e, ckpt) from e
                if (step + 1) % log_every == 0 or step + 1 == steps:
                    _log(log[i], step, stats, t, x if y is None else y)

        def postfix(log: list[dict[str, list[float]]]) -> dict[str, str] | None:
            lg = log[0]
            if not lg["step"]:
                return None
            return {"loss": f"{lg['loss'][-1]:.4f}", "fve": f"{lg['fve'][-1]:.3f}", "l0": f"{lg['l0'][-1]:.1f}",
                    "dead": f"{100 * lg['dead_fraction'][-1]:.1f}%"}

        # save_final: a rerun on the same folder returns the finished coders at once
        state, _ = train_loop(_Coders(trainers, data_info, ckpt), checkpoint=ckpt, steps=steps, step_fn=step_fn,
                              every=checkpoint_every, every_seconds=checkpoint_seconds, start=start,
                              save_final=True, rng=True, progress=progress and main, postfix=postfix,
                              stop_after=stop_after, desc=f"train {cfgs[0].arch}")
        return [_finished(t, state.log[i]) for i, t in enumerate(trainers)]


def _prepare(source: Any, specs: list[TrainConfig | dict[str, Any]],
             device: torch.device) -> tuple[list[TrainConfig], BatchSource]:
    """Validate the specs, open the source and resolve every default (the configs that get stored)."""
    cfgs = [s if isinstance(s, TrainConfig) else TrainConfig.from_dict(dict(s)) for s in specs]
    if not cfgs:
        raise InputError("train_many needs at least one spec.")
    shared = {(c.steps, c.batch_size, c.seed if c.data_seed is None else c.data_seed) for c in cfgs}
    if len(shared) != 1:
        raise InputError("All specs of train_many share one pass of the data: give them equal steps, "
                         f"batch_size and data_seed (got {sorted(shared)}).")
    steps, batch_size, data_seed = shared.pop()
    src = open_source(source, batch_size=batch_size, seed=data_seed, n_tokens=steps * batch_size,
                      keys=[(c.hook, c.target_hook) for c in cfgs])
    for c, (_, key_out) in zip(cfgs, src.keys, strict=True):
        if c.skip and key_out is None:
            raise InputError("A skip-transcoder predicts another activation: give a target (an (x, y) pair "
                             "of tensors or target_hook=).")
    if not isinstance(src, TensorSource):  # record the hooks actually read
        cfgs = [dataclasses.replace(c, hook=k_in, target_hook=k_out)
                for c, (k_in, k_out) in zip(cfgs, src.keys, strict=True)]
    return [c.resolved(src.widths[k_in], device) for c, (k_in, _) in zip(cfgs, src.keys, strict=True)], src


# ---------------------------------------------------------------------------- checkpoints


def _identity(cfgs: list[TrainConfig], src: BatchSource) -> dict[str, Any]:
    """What a checkpoint resumes only: the same configs (`steps` may grow when the lr schedule does not
    use it), the same data (BatchSource.data_identity: a store's content, a corpus and its cut, not a
    path) and the same model."""
    configs = []
    for c in cfgs:
        d = c.to_dict()
        if c.decay == "constant" or c.decay_fraction == 0:
            d.pop("steps")
        configs.append(d)
    return {"configs": configs, "data": src.data_identity(), "model": src.model_identity}


class _Coders:
    """The trainers as one resumable run (mechscope.training.Resumable): their tensors, counters, configs."""

    def __init__(self, trainers: list[Trainer], data_info: dict[str, Any], ckpt: Checkpoint | None) -> None:
        self.trainers, self.data_info, self.ckpt = trainers, data_info, ckpt

    def checkpoint_state(self) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        for t in self.trainers:  # on every rank: they stop together. Never overwrite a good checkpoint.
            if not all(bool(torch.isfinite(p).all()) for p in t.coder.parameters()):
                where = self.ckpt.dir if self.ckpt is not None else "the checkpoint folder"
                raise NonFiniteError(f"Non-finite weights; the last good checkpoint is kept in {where}.")
        tensors: dict[str, torch.Tensor] = {}
        for i, t in enumerate(self.trainers):
            tensors |= t.state_tensors(f"{i}/")
        return tensors, {"data": self.data_info, "coder_configs": [t.coder.cfg.to_dict() for t in self.trainers],
                         "window_tokens": [t.window_tokens for t in self.trainers]}

    def restore(self, saved: Saved) -> None:  # train_many restores before building the loop
        raise NotImplementedError


def _resume_or_init(cfgs: list[TrainConfig], src: BatchSource, dev: torch.device,
                    ckpt: Checkpoint | None) -> tuple[list[Trainer], Progress]:
    """Trainers restored from the checkpoint (and its step and log), or fresh ones initialised from data."""
    if ckpt is not None:
        _check_same_data(ckpt, src)
    saved = ckpt.load() if ckpt is not None else None  # CheckpointMismatchError if it is another run
    if saved is None:
        trainers = [Trainer(c, SparseCoder(_coder_config(c, src, *keys), device=dev).init_weights(c.seed))
                    for c, keys in zip(cfgs, src.keys, strict=True)]
        _init_from_data(trainers, src, dev)
        return trainers, Progress(0, [{k: [] for k in LOG_KEYS} for _ in cfgs])
    trainers = [Trainer(c, SparseCoder(SAEConfig.from_dict(sc), device=dev))
                for c, sc in zip(cfgs, saved.extra["coder_configs"], strict=True)]
    for i, t in enumerate(trainers):
        check_coder_fits(src, t.coder, hook=src.keys[i][0], target_hook=src.keys[i][1])
        t.load_state_tensors(saved.tensors, f"{i}/", saved.extra["window_tokens"][i])
    restore_rng(saved)
    return trainers, Progress(saved.step, saved.log)


def _check_same_data(ckpt: Checkpoint, src: BatchSource) -> None:
    """CheckpointMismatchError naming both data sources when the checkpoint was trained on other data:
    resuming would silently train one coder on two corpora."""
    state = ckpt.saved_state()
    if state is None:
        return
    saved = (state.get("identity") or {}).get("data")
    if saved == ckpt.identity["data"]:
        return
    was = (state.get("data") or {}).get("description") or f"other data ({json.dumps(saved)})"
    raise CheckpointMismatchError(
        f"{ckpt.dir} holds a run (at step {state.get('step')}) trained on {was}, but this run reads "
        f"{src.describe()}. Resume with the same --store / corpus and settings, or delete {ckpt.dir} (or "
        "choose another --checkpoint-dir) to start over.")


def _nan_error(i: int, t: Trainer, step: int, e: Exception, ckpt: Checkpoint | None) -> NonFiniteError:
    last = ckpt.step() if ckpt is not None else None
    kept = f"the last good checkpoint (step {last}) is kept in {ckpt.dir}" if last is not None and ckpt \
        else "no checkpoint was written"
    return NonFiniteError(f"Training coder {i} ({t.cfg.arch}) hit NaN/inf at step {step} ({e}); {kept}. "
                          "Lower lr, check the activations, or try autocast_bf16=False.")


def _log(lg: dict[str, list[float]], step: int, stats: StepStats, t: Trainer, target: torch.Tensor) -> None:
    """Append the step's loss, FVE and L0 (over the global batch under torchrun) to the log."""
    values = stats.acts.values if isinstance(stats.acts, kernels.SparseCode) else stats.acts
    g = distributed.active()
    if g is None:
        loss, fve, l0 = float(stats.loss), batch_fve(target, stats.out), \
            float((values != 0).sum(-1).double().mean())
    else:  # sufficient statistics summed over ranks: loss (a mean over ranks), Σerr², Σ‖y‖², Σy, rows, firings
        y, e = target.detach().double(), (target.detach().double() - stats.out.double())
        packed = torch.cat([torch.stack([stats.loss.double() / g.world, e.square().sum(), y.square().sum(),
                                         torch.tensor(float(y.shape[0]), dtype=torch.float64, device=y.device),
                                         (values != 0).sum().double()]), y.sum(0)])
        packed = distributed.all_sum(packed)
        loss, n = float(packed[0]), float(packed[3])
        fve = metrics_fve(float(packed[1]), float(packed[2]), packed[5:], int(n))
        l0 = float(packed[4]) / n
    lg["step"].append(step)
    lg["loss"].append(loss)
    lg["fve"].append(fve)
    lg["l0"].append(l0)
    lg["dead_fraction"].append(t.dead_fraction())
    lg["lr"].append(lr_at(step, t.cfg))


def _finished(t: Trainer, log: dict[str, list[float]]) -> SparseCoder:
    """A copy of the trained coder with its scales folded and its training recorded in cfg.extra."""
    coder = copy.deepcopy(t.coder).fold_scales()
    coder.cfg.extra["train"] = t.cfg.to_dict()
    coder.cfg.extra["train_log"] = log
    coder.cfg.extra["train_stats"] = {"dead_fraction": t.dead_fraction(),
                                      "dense_fraction": t.dense_fraction(),
                                      "dead_window_tokens": t.cfg.dead_window_tokens}
    return coder


def _default_device(source: Any) -> torch.device:
    if isinstance(source, torch.Tensor):
        return source.device
    if isinstance(source, tuple | list) and source and isinstance(source[0], torch.Tensor):
        return source[0].device
    if isinstance(source, tuple | list) and source and hasattr(source[0], "device"):
        return source[0].device
    return torch.device("cpu")


def _coder_config(c: TrainConfig, src: BatchSource, key_in: str, key_out: str | None) -> SAEConfig:
    d_in = src.widths[key_in]
    d_out = src.widths[key_out] if key_out is not None else None
    hook_in = c.hook if isinstance(src, TensorSource) else key_in
    hook_out = c.target_hook if isinstance(src, TensorSource) else key_out
    return SAEConfig(
        arch=c.arch, d_in=d_in, n_latents=c.n_latents, d_out=d_out, k=c.k, skip=c.skip,
        apply_b_dec_to_input=key_out is None, l1_coeff=c.l1_coeff or 0.0, l0_coeff=c.l0_coeff or 0.0,
        jumprelu_bandwidth=c.jumprelu_bandwidth, jumprelu_init_threshold=c.jumprelu_init_threshold,
        matryoshka_prefixes=list(c.matryoshka_prefixes or []), hook_in=hook_in, hook_out=hook_out,
        model_name=src.model_name, model_identity=src.model_identity,
    )


def _scale_of(x: torch.Tensor) -> float:
    """sqrt(d) / E‖x‖ (1 for all-zero data)."""
    mean_norm = float(x.double().norm(dim=1).mean())
    return math.sqrt(x.shape[1]) / mean_norm if mean_norm > 0 else 1.0


def first_rows(src: BatchSource, n_rows: int) -> dict[str, torch.Tensor]:
    """The first batches of `src`'s data order (deterministic), concatenated until >= n_rows: {key: [N, d]}.
    What initialisation (input / output scales, b_dec) reads before training starts."""
    rows: dict[str, list[torch.Tensor]] = {}
    n = 0
    for batch in src.batches(0):
        for key, v in batch.items():
            rows.setdefault(key, []).append(v)
        n += next(iter(batch.values())).shape[0]
        row_bytes = sum(v.element_size() * v[0].numel() for v in batch.values())
        if n >= min(n_rows, max(1, INIT_SAMPLE_BYTES // row_bytes)):  # many hooks: fewer rows, bounded memory
            break
    if n == 0:
        raise InputError("The source served no full batch to start training from: lower the batch size or "
                         "give more data (more --tokens, a longer corpus).")
    return {k: torch.cat(v) for k, v in rows.items()}


@torch.no_grad()
def _init_from_data(trainers: list[Trainer], src: BatchSource, dev: torch.device) -> None:
    """Input/output scales and b_dec from the first batches of the data order (deterministic)."""
    sample = {k: v.to(dev) for k, v in first_rows(src, INIT_SAMPLE_ROWS).items()}
    for t, (key_in, key_out) in zip(trainers, src.keys, strict=True):
        c, sc = t.cfg, t.coder.cfg
        if c.normalize_input:
            sc.input_scale = src.norm_scale(key_in) or _scale_of(sample[key_in])
            sc.output_scale = (src.norm_scale(key_out) or _scale_of(sample[key_out])) if key_out \
                else sc.input_scale
        y = sample[key_out if key_out is not None else key_in].double() * sc.output_scale
        b = {"geometric_median": geometric_median, "mean": lambda v: v.mean(0),
             "zeros": lambda v: torch.zeros(v.shape[1], dtype=v.dtype, device=v.device)}[c.b_dec_init](y)
        t.coder.b_dec.copy_(b.to(t.coder.b_dec.dtype))


__all__ = ["TrainConfig", "Trainer", "StepStats", "Checkpoint", "train", "train_many", "first_rows", "lr_at",
           "sparsity_scale_at", "geometric_median", "open_source", "check_coder_fits", "BatchSource",
           "TensorSource", "StoreSource", "StreamSource"]
