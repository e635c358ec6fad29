"""modadd: a 1-layer transformer that groks (a + b) mod p (Power et al. 2022; Nanda et al. 2023).

Full-batch AdamW with weight decay 1.0 on a fraction of all p² pairs: the model memorises the
training pairs first (train accuracy ~100%), and only much later, as weight decay favours the
compact Fourier algorithm, generalises (test accuracy jumps). The trained embedding concentrates
on a few key frequencies, which `fourier_embedding_norms` exposes.

CPU budget: Nanda's setting (p=113, d_model 128, 30% split, ~10k full-batch steps at ~1 s/step
here) takes hours, so the default is p=59, d_model 64, a 40% split and lr 2e-3: test accuracy
passes 99.5% after 850 (seed 2), 3500 (seed 1) or 4300 (seed 0) steps of ~20 ms, then
cleanup_steps more. The phenomenon (memorise first, generalise much later, a few key
frequencies) is the same. For the original: p=113, train_frac=0.3, lr=1e-3, d_model=128, d_mlp=512.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from mechscope.errors import InputError
from mechscope.models.config import ModelConfig
from mechscope.models.transformer import HookedTransformer
from mechscope.training import (
    ModuleAndOptimizer,
    config_dict,
    scheduled_lr,
    set_lr,
    step_generator,
    train_loop,
)
from mechscope.zoo.settings import recipe_checkpoint


@dataclass
class ModAddConfig:
    p: int = 59
    train_frac: float = 0.4
    d_model: int = 64
    n_heads: int = 4
    d_mlp: int = 256
    lr: float = 2e-3
    weight_decay: float = 1.0
    beta2: float = 0.98
    warmup: int = 10
    steps: int = 6_000  # upper bound; see stop_test_acc
    eval_every: int = 50
    stop_test_acc: float = 0.995  # stop at the first eval cleanup_steps after test acc first passed this
    cleanup_steps: int = 500  # weight decay keeps sparsifying the Fourier embedding after the jump
    checkpoint_every: int = 500


# ------------------------------------------------------------------------------ data


def all_pairs(p: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Every input "a b =" ([p², 3], "=" is token p) and its label (a + b) mod p ([p²])."""
    a, b = torch.arange(p).repeat_interleave(p), torch.arange(p).repeat(p)
    return torch.stack([a, b, torch.full_like(a, p)], dim=1), (a + b) % p


def split_indices(p: int, train_frac: float, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A seeded random split of the p² pairs into (train, test) index tensors."""
    if not 0 < train_frac < 1:
        raise InputError(f"train_frac must be in (0, 1), got {train_frac}.")
    perm = torch.randperm(p * p, generator=step_generator(seed, 0, "zoo:modadd-split"))
    n_train = round(train_frac * p * p)
    return perm[:n_train].sort().values, perm[n_train:].sort().values


def _split_from_model(model: HookedTransformer, p: int, split: str) -> torch.Tensor:
    extra = getattr(model, "zoo_extra", None) or {}
    cfg = extra.get("config", {})
    if "train_frac" not in cfg or "seed" not in extra:
        raise InputError("This model carries no record of its train/test split; pass split='all' or indices.")
    train, test = split_indices(p, cfg["train_frac"], extra["seed"])
    return train if split == "train" else test


# ------------------------------------------------------------------------------ metrics


@torch.no_grad()
def modadd_accuracy(model: HookedTransformer, p: int, split: str | torch.Tensor = "all") -> float:
    """Accuracy of argmax over the first p logits at the "=" position.

    split: "all", "train"/"test" (needs a model from `mechscope.zoo.load`/`train`, which records its
    split), or a LongTensor of pair indices (a * p + b).
    """
    tokens, labels = all_pairs(p)
    if isinstance(split, str):
        if split not in ("all", "train", "test"):
            raise InputError(f"split must be 'all', 'train', 'test' or an index tensor, got {split!r}.")
        idx = torch.arange(p * p) if split == "all" else _split_from_model(model, p, split)
    else:
        idx = split
    logits = model(tokens[idx].to(model.device))[:, -1, :p]  # [N, p]
    return (logits.argmax(-1).cpu() == labels[idx]).float().mean().item()


def fourier_basis(p: int) -> torch.Tensor:
    """Orthonormal Fourier basis of functions on Z_p: rows 1, cos(2πk·/p), sin(2πk·/p) for k = 1..p//2. [p, p]"""
    x = torch.arange(p, dtype=torch.float64)
    rows = [torch.ones(p, dtype=torch.float64)]
    for k in range(1, p // 2 + 1):
        rows += [torch.cos(2 * math.pi * k * x / p), torch.sin(2 * math.pi * k * x / p)]
    basis = torch.stack(rows)[:p]
    return basis / basis.norm(dim=1, keepdim=True)


@torch.no_grad()
def fourier_embedding_norms(model: HookedTransformer, p: int) -> torch.Tensor:
    """Norm of the token embedding W_E[:p] projected on each frequency, cos and sin combined.

    [p // 2 + 1]: entry 0 is the constant component, entry k frequency k. Grokked models put most
    of the non-constant norm² in a handful of key frequencies; a random embedding spreads it evenly.
    """
    W_E = model.W_E[:p].detach().double().cpu()  # [p, D]
    coef = fourier_basis(p) @ W_E  # [p, D]: row 0 constant, then cos_k, sin_k pairs
    sq = coef.pow(2).sum(-1)  # [p]
    per_freq = torch.cat([sq[:1], sq[1:].view(-1, 2).sum(-1)])  # [p // 2 + 1]
    return per_freq.sqrt().float()


def top_frequency_share(norms: torch.Tensor, k: int) -> float:
    """Share of the non-constant embedding norm² held by the k largest frequencies."""
    sq = norms[1:].double() ** 2
    return float(sq.topk(k).values.sum() / sq.sum())


# ------------------------------------------------------------------------------ recipe


def build_model(config: ModAddConfig, seed: int = 0) -> HookedTransformer:
    p = config.p
    cfg = ModelConfig(d_model=config.d_model, n_layers=1, n_heads=config.n_heads,
                      d_head=config.d_model // config.n_heads, d_mlp=config.d_mlp, d_vocab=p + 1, n_ctx=3,
                      act_fn="relu", normalization="LN", final_norm=False, tie_word_embeddings=False,
                      model_name="modadd", architecture="mechscope-zoo")
    return HookedTransformer(cfg).init_weights(seed)


def last_position_logits(model: HookedTransformer, tokens: torch.Tensor) -> torch.Tensor:
    """The logits at the last position only, [N, V]: what model(tokens)[:, -1] computes, made cheap
    for training (several times faster than model(tokens) on CPU).

    In one layer, the first positions matter only as keys and values, and LN1 and the q/k/v
    projection act on each position alone: so they are computed once per distinct (position,
    token), [T, V] rows in all, and gathered; the MLP and unembedding run on the last position.
    """
    c, block = model.cfg, model.blocks[0]
    N, T = tokens.shape
    x_table = model.W_pos[:T, None, :] + model.W_E[None, :, :]  # [T, V, D]
    qkv_table = block.attn.qkv(block.ln1(x_table))  # [T, V, (H + 2K) E]
    q, k, v = qkv_table[torch.arange(T), tokens].split([c.d_q, c.d_kv, c.d_kv], dim=-1)  # [N, T, ...]
    q = q[:, -1].view(N, 1, c.n_heads, c.d_head)  # [N, 1, H, E]
    k, v = k.view(N, T, c.n_heads, c.d_head), v.view(N, T, c.n_heads, c.d_head)  # [N, T, H, E]
    # T is tiny: elementwise products beat batched matmuls of [1, E] @ [E, T]
    pattern = ((q * k).sum(-1) * block.attn.scale).softmax(dim=1)  # [N, T, H]; the last query sees all
    z = (pattern[..., None] * v).sum(1).reshape(N, c.d_q)  # [N, H * E]
    last = x_table[T - 1, tokens[:, -1]] + block.attn.o(z)  # [N, D]
    last = last + block.mlp(block.ln2(last))
    if c.final_norm:
        last = model.ln_final(last)
    return model.unembed(last)


def train_modadd(config: ModAddConfig, out: Path, *, seed: int = 0, progress: bool = True,
                 stop_after: int | None = None) -> Path:
    p = config.p
    tokens, labels = all_pairs(p)
    train_idx, test_idx = split_indices(p, config.train_frac, seed)
    model = build_model(config, seed).train()
    # decay the matrices only: Nanda's model has no LayerNorm, and decaying our LN gains and biases
    # too left seed 1 stuck at 97% test accuracy for 6000 steps (matrices only: seeds 0, 1, 2 grok)
    matrices = [p for p in model.parameters() if p.ndim >= 2]
    vectors = [p for p in model.parameters() if p.ndim < 2]
    opt = torch.optim.AdamW([{"params": matrices, "weight_decay": config.weight_decay},
                             {"params": vectors, "weight_decay": 0.0}], lr=config.lr, betas=(0.9, config.beta2))
    x_train, y_train = tokens[train_idx], labels[train_idx]

    def step_fn(step: int, log: dict) -> float:
        set_lr(opt, scheduled_lr(step, config.lr, warmup=config.warmup))
        logits = last_position_logits(model, x_train)[:, :p]  # [N, p]
        loss = F.cross_entropy(logits.double(), y_train)  # float64 loss, as Nanda: no "slingshot" spikes
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        return loss.item()

    def after_step(step: int, log: dict) -> bool:
        if step % config.eval_every:
            return False
        with torch.no_grad():
            pred = last_position_logits(model, tokens)[:, :p].argmax(-1)
        train_acc = (pred[train_idx] == labels[train_idx]).float().mean().item()
        test_acc = (pred[test_idx] == labels[test_idx]).float().mean().item()
        log.setdefault("history", []).append([step, round(train_acc, 5), round(test_acc, 5)])
        if train_acc >= 0.99 and log.get("train_99_step") is None:
            log["train_99_step"] = step
        if train_acc >= 1.0 and log.get("train_100_step") is None:
            log["train_100_step"] = step
        if test_acc >= 0.99 and log.get("test_99_step") is None:
            log["test_99_step"] = step
        if test_acc > config.stop_test_acc and log.get("generalised_step") is None:
            log["generalised_step"] = step
        log["train_acc"], log["test_acc"] = train_acc, test_acc
        # Adam runs spike now and then (train accuracy collapses and recovers), so end only on a good eval
        done = log.get("generalised_step") is not None and step >= log["generalised_step"] + config.cleanup_steps
        return done and min(train_acc, test_acc) > config.stop_test_acc

    ckpt = recipe_checkpoint(out, "modadd", seed, config)
    state, finished = train_loop(ModuleAndOptimizer(model, opt), checkpoint=ckpt, steps=config.steps, step_fn=step_fn,
                                 every=config.checkpoint_every, after_step=after_step, progress=progress,
                                 stop_after=stop_after, desc="modadd")
    if not finished:
        return out
    model.eval()
    model.zoo_extra = {"seed": seed, "config": config_dict(config)}
    norms = fourier_embedding_norms(model, p)
    top = torch.argsort(norms[1:], descending=True)[:8] + 1
    log = state.log
    metrics = {
        "train_acc": modadd_accuracy(model, p, train_idx), "test_acc": modadd_accuracy(model, p, test_idx),
        "train_99_step": log.get("train_99_step"), "train_100_step": log.get("train_100_step"),
        "test_99_step": log.get("test_99_step"), "generalised_step": log.get("generalised_step"),
        "stopped_early_at": log.get("stopped_early_at"), "top_frequencies": top.tolist(),
        "top5_share": top_frequency_share(norms, 5), "top8_share": top_frequency_share(norms, 8),
        "history": log.get("history", []),
    }
    extra = {"recipe": "modadd", "seed": seed, "steps": state.step, "p": p, "split": {
        "train_frac": config.train_frac, "n_train": len(train_idx), "n_test": len(test_idx),
        "how": "mechscope.zoo.modadd.split_indices(p, train_frac, seed)"},
        "config": config_dict(config), "metrics": metrics}
    model.save_pretrained(out, extra=extra)
    ckpt.remove()
    return out
