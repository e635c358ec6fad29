"""Lenses: read the residual stream at every layer as a next-token distribution.

    res = logit_lens(model, tokens, positions=-1)          # LensResult
    res.kl_to_final                                        # [n_layers + 1] KL(final || layer), nats
    lens = TunedLens.train(model, "sotu", steps=250)       # Belrose et al. 2023
    lens.save("lens/"); lens = TunedLens.load("lens/", model)
    print(evaluate_lenses(model, "sotu", 2**14, tuned=lens).to_markdown())

Rows (the convention of ActivationCache.accumulated_resid and of the tuned-lens package): row l < n_layers
decodes blocks.{l}.hook_resid_pre (row 0 = the embeddings), row n_layers decodes the final
blocks.{n_layers-1}.hook_resid_post, so the last row reproduces the model's own logits.

Decoding applies the model's tail exactly as its forward does: the final norm with the norm's *own*
statistics for each row (LayerNorm: centre and divide by std; RMSNorm: divide by rms, computed in float32 and
cast back like HF), the norm's weight and bias as the model holds them (after fold_ln they live in W_U / b_U
and the norm has none), then the unembedding and any logit soft-capping. This is the logit lens of
nostalgebraist (2020); it is not ActivationCache.apply_ln_to_stack, which freezes the *final* position's
scale (the right choice for direct logit attribution, see dla.py, but not for decoding an earlier layer).

The tuned lens (Belrose et al. 2023, "Eliciting Latent Predictions from Transformers with the Tuned Lens")
adds one affine translator per layer before decoding, h -> h + h A_l^T + b_l (A_l, b_l start at zero, so an
untrained lens is the logit lens, and weight decay pulls it towards the identity), trained to minimise
KL(final || lens_l) on the model's own text distribution; the unembedding and final norm stay frozen.
Training follows the paper's code: SGD with Nesterov momentum 0.9, learning rate 1.0 x (1 - momentum),
weight decay 1e-3, linear decay to zero without warm-up, gradient norm clipped to 1 (Adam with amsgrad,
lr 1e-3 and a warm-up of min(1000, steps/5) steps is the alternative). All translators are trained at once from
ONE forward pass per batch: the residuals are cached under no_grad, each translator's KL is computed over the
full vocabulary in chunks of positions (bounded memory) and the gradients accumulate.
"""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from itertools import islice
from pathlib import Path
from typing import Any, Literal, NamedTuple

import torch
from torch import nn

from mechscope.errors import CorruptFileError, InputError, StoreMismatchError
from mechscope.fileio import atomic_write_bytes, atomic_write_json

FORMAT = "mechscope.TunedLens"
VERSION = 1
LENS_FILE = "lens.safetensors"
CONFIG_FILE = "config.json"
CHUNK_ELEMENTS = 2**24  # logits held at once per chunk (x4 bytes, x ~3 live copies while training)

Tokens = torch.Tensor | str | Sequence[str]
Translate = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


# ------------------------------------------------------------------------------ decoding


def check_lens_model(model) -> None:
    """Typed error for models whose residual stream cannot be decoded with the final norm + unembedding."""
    c = model.cfg
    if c.post_layernorm or c.embed_norm:
        raise InputError(f"Lenses need a pre-norm model; {c.architecture} normalises the residual stream itself "
                         "(post-LN), so earlier residuals are not in the final layer's basis.")
    if not c.has_unembed or c.mlm_head:
        raise InputError(f"{c.architecture} has no plain unembedding (bare encoder or masked-LM head); "
                         "lenses decode with W_U.")


def decode_resid(model, resid: torch.Tensor) -> torch.Tensor:
    """resid [..., D] -> logits [..., V]: the model's own head (final norm with fresh statistics per row,
    unembedding, soft-capping) without its hook points, computed in resid's dtype."""
    shape = resid.shape
    x = resid.reshape(-1, 1, shape[-1]) if resid.dim() != 3 else resid
    logits = model.head(x, hooks=False)
    return logits.reshape(*shape[:-1], logits.shape[-1])


def _neg_entropy(logp: torch.Tensor) -> torch.Tensor:
    """sum_v p log p over the last dim (0 log 0 = 0), float32."""
    return torch.where(logp > -math.inf, logp.exp() * logp, 0.0).sum(-1)


# ------------------------------------------------------------------------------ results


class TopTokens(NamedTuple):
    ids: torch.Tensor  # [n, B, P, k] token ids, most likely first
    logprobs: torch.Tensor  # [n, B, P, k]
    strings: list | None  # nested [n][B][P][k] decoded tokens when a model/tokenizer was given


@dataclass
class LensResult:
    """What a lens reads at each row (layer) and position; n rows, B prompts, P positions per prompt."""

    rows: list[int]  # layer of each row: l < n_layers = blocks.{l}.hook_resid_pre, n_layers = final resid_post
    labels: list[str]  # "0_pre", ..., "final_post" (ActivationCache.accumulated_resid's labels)
    positions: torch.Tensor  # [B, P] the token positions read (per prompt)
    valid: torch.Tensor  # [B, P] bool: a real token (not padding, not an excluded BOS)
    kl: torch.Tensor  # [n, B, P] KL(final || row) per token, nats (0 where not valid)
    kl_to_final: torch.Tensor  # [n] float64: kl averaged over valid tokens
    ce: torch.Tensor  # [n, B, P] next-token cross-entropy (NaN where the next token is unknown or padding)
    cross_entropy: torch.Tensor  # [n] float64: ce averaged over the positions that have a real next token (NaN if none)
    top_ids: torch.Tensor  # [n, B, P, top_k]
    top_logprobs: torch.Tensor  # [n, B, P, top_k]
    logprobs: torch.Tensor | None = None  # [n, B, P, V] float32, only with return_logprobs=True
    lens: str = "logit"  # "logit" or "tuned"

    def top_tokens(self, k: int | None = None, model: Any = None) -> TopTokens:
        """The k most likely tokens per row and position (k <= the top_k computed, unless logprobs were kept);
        with a model (or tokenizer) also their strings."""
        have = self.top_ids.shape[-1]
        k = have if k is None else k
        if not isinstance(k, int) or k < 1:
            raise InputError(f"k must be a positive int, got {k!r}.")
        if k <= have:
            ids, lp = self.top_ids[..., :k], self.top_logprobs[..., :k]
        elif self.logprobs is not None:
            lp, ids = self.logprobs.topk(k, dim=-1)
        else:
            raise InputError(f"Only the top {have} tokens were kept; rerun with top_k={k} or return_logprobs=True.")
        strings = None
        if model is not None:
            tok = getattr(model, "tokenizer", model)
            if tok is None:
                raise InputError("This model has no tokenizer to decode the top tokens with.")
            flat = [tok.decode([i]) for i in ids.reshape(-1).tolist()]
            strings = torch.arange(len(flat)).reshape(ids.shape).tolist()
            strings = _map_nested(strings, flat)
        return TopTokens(ids, lp, strings)


def _map_nested(index: Any, flat: list[str]) -> Any:
    return [_map_nested(i, flat) for i in index] if isinstance(index, list) else flat[index]


# ------------------------------------------------------------------------------ shared machinery


def _rows(model, layers: int | Sequence[int] | None) -> list[int]:
    n = model.cfg.n_layers
    if layers is None:
        return list(range(n + 1))
    items = [layers] if isinstance(layers, int) else list(layers)
    out = []
    for la in items:
        if not isinstance(la, int) or isinstance(la, bool) or not -(n + 1) <= la <= n:
            raise InputError(f"layers must be ints in [0, {n}] (or negative from the end; {n} = the final "
                             f"resid_post), got {la!r}.")
        out.append(la % (n + 1))
    if not out:
        raise InputError("layers is empty.")
    return out


def _labels(rows: list[int], n: int) -> list[str]:
    return ["final_post" if r == n else f"{r}_pre" for r in rows]


def _position_index(positions: int | Sequence[int] | torch.Tensor | None, T: int,
                    mask: torch.Tensor | None, B: int, device) -> torch.Tensor:
    """[B, P] positions. Negative ones count back from each prompt's last real token (so -1 with right padding
    is the last word, not a pad); non-negative ones are absolute."""
    if positions is None:
        return torch.arange(T, device=device).expand(B, T)
    p = torch.as_tensor(positions, device=device)
    if p.dtype.is_floating_point or p.dtype == torch.bool or p.dim() > 2:
        raise InputError(f"positions must be an int, a list of ints or an int tensor [P] / [B, P], got {positions!r}.")
    p = p.long().reshape(1, -1) if p.dim() < 2 else p.long()
    if p.shape[0] not in (1, B):
        raise InputError(f"positions has {p.shape[0]} rows for {B} prompts.")
    last = (T - 1 - mask.flip(-1).argmax(-1)) if mask is not None else torch.full((B,), T - 1, device=device)
    idx = torch.where(p < 0, last[:, None] + 1 + p, p).expand(B, -1)
    if bool((idx < 0).any() or (idx >= T).any()):
        raise InputError(f"positions {p.tolist()} fall outside the {T} positions of the prompts.")
    return idx


def _gather(t: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """t [..., B, T, X] and idx [B, P] -> [..., B, P, X]."""
    shape = (1,) * (t.dim() - 3) + idx.shape + (1,)
    return torch.take_along_dim(t, idx.reshape(shape), dim=-2)


@dataclass
class _Batch:
    resid: torch.Tensor  # [n, B, P, D] model dtype
    final_logp: torch.Tensor  # [B, P, V] float32, the model's own distribution
    valid: torch.Tensor  # [B, P] bool
    targets: torch.Tensor  # [B, P] next token (0 where none)
    has_target: torch.Tensor  # [B, P] bool
    positions: torch.Tensor  # [B, P]


def _bos_id(model) -> int | None:
    tok = getattr(model, "tokenizer", None)
    return getattr(tok, "bos_token_id", None) if tok is not None else None


def _collect(model, tokens: Tokens, attention_mask, rows: list[int], positions, exclude_bos: bool) -> _Batch:
    """One forward: the residuals of `rows` and the final log-probs at `positions`."""
    check_lens_model(model)
    tokens, mask = model.prepare(tokens, attention_mask, None, "right")
    B, T = tokens.shape
    n = model.cfg.n_layers
    names = [f"blocks.{r}.hook_resid_pre" if r < n else f"blocks.{n - 1}.hook_resid_post" for r in rows]
    with torch.no_grad():
        logits, cache = model.run_with_cache(tokens, attention_mask=mask, names_filter=sorted(set(names)))
    idx = _position_index(positions, T, mask, B, tokens.device)  # [B, P]
    if positions is None:  # every position: nothing to gather
        resid = torch.stack([cache[name] for name in names])  # [n, B, T, D]
        final_logp = logits.float().log_softmax(-1)  # [B, T, V]
    else:
        resid = torch.stack([_gather(cache[name], idx) for name in names])  # [n, B, P, D]
        final_logp = _gather(logits, idx).float().log_softmax(-1)  # [B, P, V]
    real = mask.bool() if mask is not None else torch.ones(B, T, dtype=torch.bool, device=tokens.device)
    valid = real.gather(1, idx)
    bos = _bos_id(model)
    if exclude_bos and bos is not None:
        valid &= ~((idx == 0) & (tokens[:, :1] == bos))
    nxt = (idx + 1).clamp(max=T - 1)
    has_target = valid & (idx + 1 < T) & real.gather(1, nxt)
    targets = torch.where(has_target, tokens.gather(1, nxt), 0)
    return _Batch(resid, final_logp, valid, targets, has_target, idx)


def _chunk_size(n_rows: int, V: int, chunk_elements: int) -> int:
    return max(1, chunk_elements // max(1, n_rows * V))


def _decode_stats(model, batch: _Batch, rows: list[int], translate: Translate | None, *, top_k: int,
                  return_logprobs: bool, chunk_elements: int) -> dict[str, torch.Tensor]:
    """KL to final, next-token CE and top-k per row and position, decoding chunks of positions at once
    (all rows per chunk), so memory stays ~chunk_elements logits."""
    n_rows, B, P, D = batch.resid.shape
    V = model.cfg.d_vocab
    rows_t = torch.tensor(rows, device=batch.resid.device)
    resid = batch.resid.reshape(n_rows, B * P, D)
    final = batch.final_logp.reshape(B * P, V)
    targets = batch.targets.reshape(B * P)
    k = min(top_k, V)
    out_kl, out_ce, out_ids, out_top, out_lp = [], [], [], [], []
    step = _chunk_size(n_rows, V, chunk_elements)
    with torch.no_grad():
        for s in range(0, B * P, step):
            x = resid[:, s:s + step]  # [n, c, D]
            if translate is not None:
                x = translate(x.float(), rows_t)
            logp = decode_resid(model, x).float().log_softmax(-1)  # [n, c, V]
            f = final[s:s + step]
            kl = _neg_entropy(f)[None] - torch.einsum("cv,ncv->nc", f.exp(), logp)
            out_kl.append(kl.clamp(min=0))  # >= 0 exactly; rounding can give -1e-8 on the final row
            out_ce.append(-logp.gather(-1, targets[s:s + step].expand(n_rows, -1)[..., None])[..., 0])
            if k > 0:
                top, ids = logp.topk(k, dim=-1)
                out_top.append(top)
                out_ids.append(ids)
            if return_logprobs:
                out_lp.append(logp)
    res = {
        "kl": torch.cat(out_kl, 1).reshape(n_rows, B, P),
        "ce": torch.cat(out_ce, 1).reshape(n_rows, B, P),
    }
    if k > 0:
        res["top_logprobs"] = torch.cat(out_top, 1).reshape(n_rows, B, P, k)
        res["top_ids"] = torch.cat(out_ids, 1).reshape(n_rows, B, P, k)
    if return_logprobs:
        res["logprobs"] = torch.cat(out_lp, 1).reshape(n_rows, B, P, V)
    return res


def _mean64(x: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """[n, B, P] -> [n] float64 mean over kept entries (NaN when none)."""
    keep = keep.to(x.device)
    total = torch.where(keep, x, 0).double().sum((1, 2))
    count = keep.sum((1, 2)).double()
    return torch.where(count > 0, total / count.clamp(min=1), math.nan)


def _run(model, tokens: Tokens, translate: Translate | None, lens_name: str, *, layers, positions,
         attention_mask, top_k: int, return_logprobs: bool, exclude_bos: bool, chunk_elements: int) -> LensResult:
    if not isinstance(top_k, int) or isinstance(top_k, bool) or top_k < 1:
        raise InputError(f"top_k must be a positive int, got {top_k!r}.")
    rows = _rows(model, layers)
    batch = _collect(model, tokens, attention_mask, rows, positions, exclude_bos)
    stats = _decode_stats(model, batch, rows, translate, top_k=top_k, return_logprobs=return_logprobs,
                          chunk_elements=chunk_elements)
    kl = torch.where(batch.valid, stats["kl"], 0.0)
    ce = torch.where(batch.has_target, stats["ce"], math.nan)
    return LensResult(rows=rows, labels=_labels(rows, model.cfg.n_layers), positions=batch.positions,
                      valid=batch.valid, kl=kl, kl_to_final=_mean64(kl, batch.valid.expand_as(kl)), ce=ce,
                      cross_entropy=_mean64(stats["ce"], batch.has_target.expand_as(kl)),
                      top_ids=stats["top_ids"], top_logprobs=stats["top_logprobs"],
                      logprobs=stats.get("logprobs"), lens=lens_name)


def logit_lens(model, tokens: Tokens, *, layers: int | Sequence[int] | None = None,
               positions: int | Sequence[int] | torch.Tensor | None = None,
               attention_mask: torch.Tensor | None = None, top_k: int = 10, return_logprobs: bool = False,
               exclude_bos: bool = False, chunk_elements: int = CHUNK_ELEMENTS) -> LensResult:
    """Decode the residual stream at every layer (or `layers`, 0..n_layers) with the model's final norm and
    unembedding. tokens: ids [B, T] or text. positions: None (all), an int / list (negative = from each prompt's
    last real token; -1 = the prediction for the next token) or an int tensor [B, P]. The full log-probs
    [n, B, P, V] are returned only with return_logprobs=True (V = 49152 for SmolLM2: ask for few positions);
    KL, cross-entropy and the top_k tokens are always computed. exclude_bos drops a leading BOS from the averages."""
    return _run(model, tokens, None, "logit", layers=layers, positions=positions, attention_mask=attention_mask,
                top_k=top_k, return_logprobs=return_logprobs, exclude_bos=exclude_bos, chunk_elements=chunk_elements)


# ------------------------------------------------------------------------------ tuned lens


@dataclass
class TunedLensTrainConfig:
    """Everything that determines a trained lens (saved with it; a resumed run must match it)."""

    data: dict[str, Any]  # the text source + tokenizer + packing settings, or a hash of given token contexts
    tokens: int  # training tokens read from the text (the steps cycle over them in seeded epochs)
    context_len: int
    batch_size: int  # contexts per step
    steps: int
    optimizer: str  # "sgd" (Nesterov) or "adam" (amsgrad)
    lr: float  # torch learning rate (SGD default 1.0 * (1 - momentum), as the paper's code)
    momentum: float
    weight_decay: float
    warmup: int
    max_grad_norm: float
    exclude_bos: bool
    chunk_elements: int
    model: dict[str, Any]  # the model's config hash, weight fingerprint and processing


def _model_id(model) -> dict[str, Any]:
    from mechscope.models.identity import model_identity

    return model_identity(model)


class _TrainMethod:
    """`TunedLens.train(model, text, ...)` (on the class) trains a lens, the API the brief and the tuned-lens
    package use; on an instance `lens.train(mode)` stays nn.Module's train/eval switch (which .eval() calls)."""

    def __get__(self, obj, owner):
        if obj is None:
            return owner.fit

        def train(mode: bool = True):
            if not isinstance(mode, bool):
                raise InputError("lens.train(mode) switches nn.Module train/eval mode; to train a lens call "
                                 "TunedLens.train(model, text, ...) on the class.")
            return nn.Module.train(obj, mode)

        return train


class TunedLens(nn.Module):
    """One affine translator per layer, h -> h + h A_l^T + b_l for the residual entering block l, decoded by the
    model's frozen final norm + unembedding. weight [n_layers, D, D] and bias [n_layers, D] start at zero, so a
    new lens is exactly the logit lens. The final row (resid_post of the last block) has no translator."""

    train = _TrainMethod()  # type: ignore[assignment]

    def __init__(self, model) -> None:
        super().__init__()
        check_lens_model(model)
        c = model.cfg
        self.n_layers, self.d_model = c.n_layers, c.d_model
        self.weight = nn.Parameter(torch.zeros(c.n_layers, c.d_model, c.d_model, device=model.device))  # [L, D, D]
        self.bias = nn.Parameter(torch.zeros(c.n_layers, c.d_model, device=model.device))  # [L, D]
        self.model_identity = _model_id(model)
        self.train_config: TunedLensTrainConfig | None = None
        self.train_log: dict[str, Any] = {}
        object.__setattr__(self, "model", model)  # a plain reference: the model's weights are not lens parameters

    def translate(self, resid: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        """resid [n, N, D] (row i read at layer rows[i]) -> translated [n, N, D] float32; rows equal to
        n_layers (the final residual) pass through unchanged."""
        rows = torch.as_tensor(rows, device=resid.device)
        x = resid.to(self.weight.dtype)
        if rows.numel() == self.n_layers and bool((rows == torch.arange(self.n_layers, device=rows.device)).all()):
            return x + torch.baddbmm(self.bias[:, None, :], x, self.weight.transpose(1, 2))  # no weight copy
        has = rows < self.n_layers
        r = rows.clamp(max=self.n_layers - 1)
        y = torch.baddbmm(self.bias[r][:, None, :], x, self.weight[r].transpose(1, 2))  # [n, N, D]
        return x + torch.where(has[:, None, None], y, 0.0)

    def forward(self, tokens: Tokens, *, layers: int | Sequence[int] | None = None,
                positions: int | Sequence[int] | torch.Tensor | None = None,
                attention_mask: torch.Tensor | None = None, top_k: int = 10, return_logprobs: bool = False,
                exclude_bos: bool = False, chunk_elements: int = CHUNK_ELEMENTS) -> LensResult:
        """Like logit_lens(model, tokens, ...), through the translators."""
        return _run(self.model, tokens, self.translate, "tuned", layers=layers, positions=positions,
                    attention_mask=attention_mask, top_k=top_k, return_logprobs=return_logprobs,
                    exclude_bos=exclude_bos, chunk_elements=chunk_elements)

    def _check_model(self, model, where: str) -> None:
        c, want, have = model.cfg, self.model_identity, _model_id(model)
        if (c.n_layers, c.d_model) != (self.n_layers, self.d_model):
            raise StoreMismatchError(f"{where} is a lens for a model with {self.n_layers} layers and d_model "
                                     f"{self.d_model}; this model has {c.n_layers} layers and d_model {c.d_model}.")
        for key in ("config_hash", "weights_fingerprint", "processing"):
            if want.get(key) != have.get(key):
                raise StoreMismatchError(
                    f"{where} was trained on {want.get('name')!r} ({key} {want.get(key)}), but the model given is "
                    f"{have.get('name')!r} ({key} {have.get(key)}). Use the model it was trained on (with the same "
                    "process_weights settings), or train a lens for this one.")

    # -------------------------------------------------------------- files
    def save(self, folder: str | Path) -> Path:
        """folder/lens.safetensors (weight, bias) + folder/config.json, each written atomically (tensors first)."""
        from safetensors.torch import save

        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        tensors = {"weight": self.weight.detach().cpu().contiguous(), "bias": self.bias.detach().cpu().contiguous()}
        atomic_write_bytes(folder / LENS_FILE, save(tensors, metadata={"format": FORMAT}))
        config = {"format": FORMAT, "version": VERSION, "n_layers": self.n_layers, "d_model": self.d_model,
                  "translator": "h + h @ weight[l].T + bias[l] on blocks.{l}.hook_resid_pre, then the model's "
                                "final norm and unembedding", "model": self.model_identity,
                  "train": None if self.train_config is None else dataclasses.asdict(self.train_config),
                  "train_log": self.train_log}
        atomic_write_json(folder / CONFIG_FILE, config)
        return folder

    @classmethod
    def load(cls, folder: str | Path, model) -> TunedLens:
        """Read a saved lens for `model`; StoreMismatchError if it was trained on another model."""
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        folder = Path(folder)
        if not (folder / CONFIG_FILE).is_file():
            raise CorruptFileError(f"{folder} has no {CONFIG_FILE}: it is not a saved tuned lens.")
        try:
            config = json.loads((folder / CONFIG_FILE).read_text())
            tensors = load_file(folder / LENS_FILE)
        except (ValueError, OSError, SafetensorError) as e:
            raise CorruptFileError(f"{folder} holds an unreadable tuned lens ({e}).") from e
        if not isinstance(config, dict) or config.get("format") != FORMAT:
            raise CorruptFileError(f"{folder / CONFIG_FILE} is not a mechscope tuned-lens config.")
        if config.get("version", 0) > VERSION:
            raise CorruptFileError(f"{folder} was written by a newer mechscope (version {config['version']}).")
        L, D = config["n_layers"], config["d_model"]
        if set(tensors) != {"weight", "bias"} or tuple(tensors["weight"].shape) != (L, D, D) \
                or tuple(tensors["bias"].shape) != (L, D):
            raise CorruptFileError(f"{folder / LENS_FILE} does not hold weight [{L}, {D}, {D}] and bias [{L}, {D}].")
        lens = cls.__new__(cls)
        nn.Module.__init__(lens)
        lens.n_layers, lens.d_model = L, D
        lens.model_identity = config["model"]
        lens.train_config = TunedLensTrainConfig(**config["train"]) if config.get("train") else None
        lens.train_log = config.get("train_log") or {}
        lens._check_model(model, str(folder))
        lens.weight = nn.Parameter(tensors["weight"].to(model.device))
        lens.bias = nn.Parameter(tensors["bias"].to(model.device))
        object.__setattr__(lens, "model", model)
        return lens

    # -------------------------------------------------------------- training
    @classmethod
    def fit(cls, model, text: Any = "sotu", *, tokens: int | None = None, context_len: int = 128,
            batch_size: int = 8, steps: int = 250, lr: float | None = None,
            optimizer: Literal["sgd", "adam"] = "sgd", momentum: float = 0.9, weight_decay: float = 1e-3,
            warmup: int | None = None, max_grad_norm: float = 1.0, exclude_bos: bool = True, split: str | None = None,
            seed: int = 0, progress: bool = True, checkpoint_dir: str | Path | None = None,
            checkpoint_every: int = 50, stop_after: int | None = None,
            chunk_elements: int = CHUNK_ELEMENTS) -> TunedLens:
        """Train a tuned lens for `model` (also reachable as TunedLens.train).

        text: anything mechscope.data.text_source takes (default the built-in "sotu" corpus; split None = its
        train split, or all of your own files), packed into contexts of context_len tokens (BOS first when the
        tokenizer has one; exclude_bos leaves that position out of the loss), or a LongTensor [N, T] of contexts.
        tokens: how many tokens to read (default steps * batch_size * context_len: each context seen once); the
        steps cycle over them in epochs shuffled by `seed`. Each step runs one forward on batch_size contexts.
        lr: the torch learning rate (default SGD 1.0 * (1 - momentum) = 0.1, Adam 1e-3), decayed linearly to 0.
        With checkpoint_dir, lens + optimizer state are checkpointed every checkpoint_every steps and at the end,
        and an existing checkpoint is resumed: same seed and settings give bit-identical translators.
        stop_after=K stops after K steps leaving only the checkpoint (as an interrupt would)."""
        from mechscope.training import CHECKPOINT_DIR, Checkpoint, ModuleAndOptimizer, set_lr, train_loop

        check_lens_model(model)
        if optimizer not in ("sgd", "adam"):
            raise InputError(f"optimizer must be 'sgd' or 'adam', got {optimizer!r}.")
        for name, v in (("steps", steps), ("batch_size", batch_size), ("checkpoint_every", checkpoint_every)):
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise InputError(f"{name} must be a positive int, got {v!r}.")
        if lr is None:
            lr = (1.0 - momentum) if optimizer == "sgd" else 1e-3
        if warmup is None:
            warmup = 0 if optimizer == "sgd" else min(1000, steps // 5)
        if not (lr > 0 and 0 <= momentum < 1 and weight_decay >= 0 and 0 <= warmup < steps and max_grad_norm > 0):
            raise InputError(f"Need lr > 0, 0 <= momentum < 1, weight_decay >= 0, 0 <= warmup < steps and "
                             f"max_grad_norm > 0; got lr={lr}, momentum={momentum}, weight_decay={weight_decay}, "
                             f"warmup={warmup}, max_grad_norm={max_grad_norm}.")
        data, data_id = _training_contexts(model, text, tokens, context_len, batch_size, steps, split, seed)
        cfg = TunedLensTrainConfig(
            data=data_id, tokens=int(data.numel()), context_len=int(data.shape[1]), batch_size=batch_size,
            steps=steps, optimizer=optimizer, lr=float(lr), momentum=momentum, weight_decay=weight_decay,
            warmup=warmup, max_grad_norm=max_grad_norm, exclude_bos=exclude_bos, chunk_elements=chunk_elements,
            model={k: v for k, v in _model_id(model).items() if k in ("config_hash", "weights_fingerprint",
                                                                       "processing", "name")})
        lens = cls(model)
        lens.train_config = cfg
        params = [lens.weight, lens.bias]
        if optimizer == "sgd":
            opt: torch.optim.Optimizer = torch.optim.SGD(params, lr=lr, momentum=momentum, nesterov=momentum > 0,
                                                         weight_decay=weight_decay)
        else:
            opt = torch.optim.Adam(params, lr=lr, betas=(momentum, 0.999), weight_decay=weight_decay, amsgrad=True)
        identity = {"recipe": "tuned-lens", "seed": seed, "config": dataclasses.asdict(cfg)}
        ckpt = None if checkpoint_dir is None else Checkpoint(Path(checkpoint_dir) / CHECKPOINT_DIR, identity)
        rows = list(range(model.cfg.n_layers))

        def step_fn(step: int, log: dict[str, Any]) -> float:
            set_lr(opt, lr * _lr_factor(step, steps, warmup))
            idx = _batch_rows(step, batch_size, data.shape[0], seed)
            kl = _train_step(model, lens, data[idx], rows, exclude_bos, chunk_elements)  # [L] mean KL per layer
            torch.nn.utils.clip_grad_norm_(params, max_grad_norm)
            opt.step()
            opt.zero_grad(set_to_none=False)
            loss = float(kl.sum())
            log.setdefault("loss", []).append(loss)
            log["kl_last_step"] = kl.tolist()
            return loss

        # save_final: a rerun on the same folder then returns this lens at once
        state, _ = train_loop(ModuleAndOptimizer(lens, opt), checkpoint=ckpt, steps=steps, step_fn=step_fn,
                              every=checkpoint_every, save_final=True, progress=progress, stop_after=stop_after,
                              desc="tuned lens")
        lens.train_log = state.log
        lens.zero_grad(set_to_none=True)
        return lens


def _lr_factor(step: int, steps: int, warmup: int) -> float:
    """Linear warm-up over `warmup` steps, then linear decay to 0 at `steps`: a pure function of the step."""
    from mechscope.training import scheduled_lr

    return scheduled_lr(step, 1.0, warmup=warmup, decay="linear", steps=steps, decay_steps=steps - warmup)


def _batch_rows(step: int, batch_size: int, n: int, seed: int) -> torch.Tensor:
    """Context indices of `step`: the global stream of indices is a seeded permutation of range(n) per epoch
    (the stream name keeps the order lenses were trained with before the plumbing moved to mechscope.training)."""
    from mechscope.training import EpochOrder

    return EpochOrder(n, batch_size, seed, "zoo:tuned-lens-epoch", drop_last=False).rows(step)


def _training_contexts(model, text: Any, tokens: int | None, context_len: int, batch_size: int, steps: int,
                       split: str | None, seed: int) -> tuple[torch.Tensor, dict[str, Any]]:
    """Token contexts [N, T] held in memory (ids only; activations are recomputed each step) and their identity."""
    import hashlib

    if isinstance(text, torch.Tensor):
        if text.dim() != 2 or text.dtype.is_floating_point or text.shape[0] < 1 or text.shape[1] < 2:
            raise InputError(f"Token contexts must be an int tensor [N, T] with T >= 2, got {tuple(text.shape)} "
                             f"{text.dtype}.")
        data = text.long().cpu()
        if tokens is not None:
            data = data[: max(1, math.ceil(tokens / data.shape[1]))]
        digest = hashlib.sha256(data.numpy().tobytes()).hexdigest()[:16]
        return data, {"contexts_sha256": digest, "shape": list(data.shape)}
    from mechscope.data.packing import contexts

    if tokens is not None and (not isinstance(tokens, int) or tokens < context_len):
        raise InputError(f"tokens must be an int >= context_len ({context_len}), got {tokens!r}.")
    n_ctx = math.ceil(tokens / context_len) if tokens is not None else steps * batch_size
    tok = model.require_tokenizer()
    packed = contexts(text, tok, context_len, split=split, seed=seed,
                      prepend_bos=getattr(tok, "bos_token_id", None) is not None)
    rows = list(islice(iter(packed), n_ctx))
    return torch.stack(rows), {**packed.describe(), "seed": seed, "n_contexts": len(rows)}


def _train_step(model, lens: TunedLens, tokens: torch.Tensor, rows: list[int], exclude_bos: bool,
                chunk_elements: int) -> torch.Tensor:
    """One forward of the model, then sum_l mean_tokens KL(final || lens_l) backpropagated into the lens in
    chunks of positions (gradients accumulate). Returns the per-layer mean KL [L] (detached, float64)."""
    batch = _collect(model, tokens, None, rows, None, exclude_bos)
    L, B, P, D = batch.resid.shape
    keep = batch.valid.reshape(B * P)
    resid = batch.resid.reshape(L, B * P, D)[:, keep]  # [L, N, D]
    final = batch.final_logp.reshape(B * P, -1)[keep]  # [N, V]
    N = resid.shape[1]
    if N == 0:
        raise InputError("A training batch has no positions left (all padding or BOS); use longer contexts.")
    rows_t = torch.tensor(rows, device=resid.device)
    neg_h = _neg_entropy(final)  # [N]
    p_final = final.exp()
    translated = lens.translate(resid.float(), rows_t)  # [L, N, D], one translator pass with autograd
    grad = torch.zeros_like(translated)
    total = torch.zeros(L, dtype=torch.float64, device=resid.device)
    step = _chunk_size(L, final.shape[-1], chunk_elements)
    for s in range(0, N, step):  # the [L, c, V] logits of one chunk at a time; gradients w.r.t. x collected
        x = translated[:, s:s + step].detach().requires_grad_(True)
        logp = decode_resid(model, x).float().log_softmax(-1)  # [L, c, V]
        kl = neg_h[s:s + step][None] - torch.einsum("cv,lcv->lc", p_final[s:s + step], logp)  # [L, c]
        (g,) = torch.autograd.grad(kl.sum() / N, x)
        grad[:, s:s + step] = g
        total += kl.detach().double().sum(1)
    translated.backward(grad)
    return total / N


# ------------------------------------------------------------------------------ evaluation


@dataclass
class LensTable:
    """Per layer: mean KL(final || lens) and next-token cross-entropy of the logit lens and the tuned lens
    (averaged over n_tokens tokens, float64 accumulation)."""

    labels: list[str]  # "0_pre", ..., "final_post"
    kl_logit: torch.Tensor  # [n_layers + 1]
    ce_logit: torch.Tensor  # [n_layers + 1]
    kl_tuned: torch.Tensor | None  # [n_layers + 1]
    ce_tuned: torch.Tensor | None
    n_tokens: int
    model_ce: float  # the model's own next-token loss on the same tokens (= ce of the last row)

    def rows(self) -> list[dict[str, Any]]:
        out = []
        for i, label in enumerate(self.labels):
            r = {"layer": label, "kl_logit": float(self.kl_logit[i]), "ce_logit": float(self.ce_logit[i])}
            if self.kl_tuned is not None and self.ce_tuned is not None:
                r |= {"kl_tuned": float(self.kl_tuned[i]), "ce_tuned": float(self.ce_tuned[i])}
            out.append(r)
        return out

    def to_markdown(self, digits: int = 3) -> str:
        tuned = self.kl_tuned is not None
        head = "| layer | KL logit lens | KL tuned lens | CE logit lens | CE tuned lens |" if tuned else \
            "| layer | KL logit lens | CE logit lens |"
        lines = [head, "|" + "---|" * (5 if tuned else 3)]
        for r in self.rows():
            vals = [r["kl_logit"], r["kl_tuned"], r["ce_logit"], r["ce_tuned"]] if tuned else [r["kl_logit"], r["ce_logit"]]
            lines.append(f"| {r['layer']} | " + " | ".join(f"{v:.{digits}f}" for v in vals) + " |")
        return "\n".join(lines) + f"\n\n({self.n_tokens} tokens; KL in nats; model's own CE {self.model_ce:.{digits}f})"

    def __str__(self) -> str:
        return self.to_markdown()


def evaluate_lenses(model, text: Any = "sotu", tokens: int = 2**14, *, tuned: TunedLens | None = None,
                    context_len: int = 128, batch_size: int = 8, split: str = "validation",
                    exclude_bos: bool = True, seed: int = 0, progress: bool = True,
                    chunk_elements: int = CHUNK_ELEMENTS) -> LensTable:
    """Per layer KL to the final distribution and next-token CE for the logit lens (and `tuned`), on `tokens`
    tokens of `text` packed as in training (default: the built-in corpus's held-out validation split; pass
    split="all" for your own files), one forward per batch. This is the README's logit-vs-tuned table.
    Cost: ~2 x (n_layers + 1) x d_model x d_vocab FLOPs per token and lens (SmolLM2: ~3.5 GFLOP/token/lens)."""
    from tqdm.auto import tqdm

    if tuned is not None:
        tuned._check_model(model, "This tuned lens")
    data, _ = _training_contexts(model, text, tokens, context_len, batch_size, 1, split, seed)
    rows = _rows(model, None)
    n = len(rows)
    sums = {k: torch.zeros(n, dtype=torch.float64) for k in ("kl_logit", "ce_logit", "kl_tuned", "ce_tuned")}
    n_kl = n_ce = 0
    for s in tqdm(range(0, data.shape[0], batch_size), disable=not progress, desc="evaluate lenses"):
        batch = _collect(model, data[s:s + batch_size], None, rows, None, exclude_bos)
        lenses: list[tuple[str, Translate | None]] = [("logit", None)] + ([("tuned", tuned.translate)] if tuned else [])
        for name, translate in lenses:
            st = _decode_stats(model, batch, rows, translate, top_k=0, return_logprobs=False,
                               chunk_elements=chunk_elements)
            sums[f"kl_{name}"] += torch.where(batch.valid, st["kl"], 0).double().sum((1, 2)).cpu()
            sums[f"ce_{name}"] += torch.where(batch.has_target, st["ce"], 0).double().sum((1, 2)).cpu()
        n_kl += int(batch.valid.sum())
        n_ce += int(batch.has_target.sum())
    if n_kl == 0 or n_ce == 0:
        raise InputError("No tokens to evaluate on: give more text or longer contexts.")
    return LensTable(labels=_labels(rows, model.cfg.n_layers), kl_logit=sums["kl_logit"] / n_kl,
                     ce_logit=sums["ce_logit"] / n_ce, kl_tuned=sums["kl_tuned"] / n_kl if tuned else None,
                     ce_tuned=sums["ce_tuned"] / n_ce if tuned else None, n_tokens=n_kl,
                     model_ce=float(sums["ce_logit"][-1] / n_ce))


__all__ = ["LensResult", "LensTable", "TopTokens", "TunedLens", "TunedLensTrainConfig", "check_lens_model",
           "decode_resid", "evaluate_lenses", "logit_lens"]
