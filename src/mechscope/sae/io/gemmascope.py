"""Google DeepMind's Gemma Scope JumpReLU SAEs and transcoders.

Gemma Scope 1: `.../layer_L/width_16k/average_l0_N/params.npz` with W_enc [d_in, n], W_dec [n, d_out],
b_enc, b_dec, threshold; read with numpy's allow_pickle=False. Gemma Scope 2: params.safetensors with
lowercase names (+ `affine_skip_connection` [d_in, d_out] for affine transcoders) and an optional
config.json naming HF hook points. Traps: no b_dec subtraction before encoding
(apply_b_dec_to_input=False); the threshold is t, ours log(t) (float32); the hook, layer and
width live in the path (GS1) or in HF module names (GS2), mapped to our hook names here; GS1
embedding SAEs were trained on unscaled embeddings while our hook_embed is Gemma's scaled one
(x sqrt(d_model)), hence input/output_scale = 1/sqrt(d_in). CLT files (a per-layer w_dec) are refused.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import torch

from mechscope.errors import CorruptFileError, InputError, UnsupportedArchitectureError
from mechscope.fileio import atomic_write_bytes, atomic_write_json
from mechscope.models.hooks import split_hook_name
from mechscope.sae.coder import SparseCoder
from mechscope.sae.config import SAEConfig
from mechscope.sae.io.common import (
    STASH_KEY,
    cannot,
    expect_keys,
    layer_hook,
    log_to_threshold,
    npz_bytes,
    prepare,
    read_json,
    read_npz,
    read_safetensors,
    restore,
    safetensors_bytes,
    shape_of,
    stash,
    threshold_to_log,
)

NPZ, ST, GS2_CONFIG, SIDECAR = "params.npz", "params.safetensors", "config.json", "mechscope_config.json"
_HF = {  # Gemma 3 HF module paths (Gemma Scope 2 config.json) <-> our site kinds
    "resid_post": "model.layers.{L}.output",
    "mlp_out": "model.layers.{L}.post_feedforward_layernorm.output",
    "z": "model.layers.{L}.self_attn.o_proj.input",
    "mlp_in": "model.layers.{L}.pre_feedforward_layernorm.output",
}


def _path_info(path: Path) -> dict[str, Any]:
    """Layer, width, L0 and hook site from a Gemma Scope path (its last five parts: repo and folders)."""
    s = "/".join(path.resolve().parts[-5:])
    info: dict[str, Any] = {}
    if m := re.search(r"layer_(\d+)", s):
        info["layer"] = int(m.group(1))
    if m := re.search(r"width_(\d+)([km]?)", s):
        info["width"] = int(m.group(1)) * {"": 1, "k": 1024, "m": 1024**2}[m.group(2)]
    if m := re.search(r"(?:average_)?l0_(\d+|small|medium|big)", s):
        info["l0"] = int(m.group(1)) if m.group(1).isdigit() else m.group(1)
    if m := re.search(r"gemma-scope-(\d+(?:\.\d+)?[bm])-(pt|it)", s):
        info["model_name"] = f"gemma-2-{m.group(1)}" + ("-it" if m.group(2) == "it" else "")
    if "embedding" in s:
        info["site"] = "embed"
    elif "transcoder" in s:
        info["site"] = "transcoder"
    elif re.search(r"-res\b|resid_post", s):
        info["site"] = "resid_post"
    elif re.search(r"-mlp\b|mlp_out", s):
        info["site"] = "mlp_out"
    elif re.search(r"-att\b|attn_out", s):
        info["site"] = "z"
    return info


def _hooks(info: dict[str, Any]) -> tuple[str | None, str | None]:
    site, layer = info.get("site"), info.get("layer")
    if site == "embed":
        return "hook_embed", None
    if layer is None or site is None:
        return None, None
    if site == "transcoder":
        return layer_hook("mlp_in", layer), layer_hook("mlp_out", layer)
    return layer_hook(site, layer), None


def _from_hf(name: str | None) -> str | None:
    for kind, pattern in _HF.items():
        if name and (m := re.fullmatch(re.escape(pattern).replace(r"\{L\}", r"(\d+)"), name)):
            return layer_hook(kind, int(m.group(1)))
    return None


def _to_hf(hook: str | None) -> str | None:
    kinds = {"hook_resid_post": "resid_post", "hook_mlp_out": "mlp_out", "attn.hook_z": "z",
             "ln2.hook_normalized": "mlp_in"}
    layer, rest = split_hook_name(hook or "")
    return _HF[kinds[rest]].replace("{L}", str(layer)) if layer is not None and rest in kinds else None


def _config(where: Path, d_in: int, n: int, d_out: int, skip: bool, hook_in, hook_out, model_name, extra,
            scale=1.0) -> SAEConfig:
    try:
        return SAEConfig(arch="jumprelu", d_in=d_in, n_latents=n, skip=skip, apply_b_dec_to_input=False,
                         d_out=d_out if (d_out != d_in or hook_out or skip) else None,
                         hook_in=hook_in, hook_out=hook_out, model_name=model_name,
                         input_scale=scale, output_scale=scale, extra=extra)
    except InputError as e:
        raise CorruptFileError(f"{where}: {e}") from e


def _tensors(t: dict[str, torch.Tensor], where: Path) -> tuple[dict[str, torch.Tensor], int, int, int]:
    d_in, n = shape_of(t, "W_enc", 2, where)
    d_out = shape_of(t, "W_dec", 2, where)[1]
    out = {"W_enc": t["W_enc"], "b_enc": t["b_enc"], "W_dec": t["W_dec"], "b_dec": t["b_dec"],
           "log_threshold": threshold_to_log(t["threshold"], where)}
    return out, d_in, n, d_out


# ---------------------------------------------------------------------------- Gemma Scope 1 (npz)


def read(path: Path) -> tuple[SAEConfig, dict[str, torch.Tensor]]:
    where = path / NPZ if path.is_dir() else path
    raw = read_npz(where)
    t = {{"w_enc": "W_enc", "w_dec": "W_dec"}.get(k.lower(), k.lower()): v for k, v in raw.items()}
    expect_keys(t, {"W_enc", "W_dec", "b_enc", "b_dec", "threshold"}, (), where)
    out, d_in, n, d_out = _tensors(t, where)
    info = _path_info(where)
    sidecar = where.parent / SIDECAR
    stashed = read_json(sidecar).get(STASH_KEY) if sidecar.is_file() else None
    scale = 1.0
    if info.get("site") == "embed" and stashed is None:
        scale = d_in**-0.5  # trained on W_E rows; our hook_embed is W_E[tokens] * sqrt(d_model)
    hook_in, hook_out = _hooks(info)
    cfg = _config(where, d_in, n, d_out, False, hook_in, hook_out, info.get("model_name"),
                  {"source_format": "gemmascope", "gemmascope": info}, scale)
    return restore(cfg, stashed, where), out


def write(coder: SparseCoder, folder: Path) -> Path:
    cfg, sd = prepare(coder)
    _check(cfg, "Gemma Scope 1 (params.npz)")
    if cfg.skip:
        raise cannot("Gemma Scope 1", cfg, "it has no skip connection (Gemma Scope 2 has: format='gemmascope2')")
    folder.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(folder / NPZ, npz_bytes({"W_enc": sd["W_enc"], "W_dec": sd["W_dec"], "b_enc": sd["b_enc"],
                                                "b_dec": sd["b_dec"],
                                                "threshold": log_to_threshold(sd["log_threshold"])}))
    atomic_write_json(folder / SIDECAR, {STASH_KEY: stash(cfg)})
    return folder


def _check(cfg: SAEConfig, fmt: str) -> None:
    if cfg.arch != "jumprelu":
        raise cannot(fmt, cfg, "it holds JumpReLU coders only")
    if cfg.apply_b_dec_to_input:
        raise cannot(fmt, cfg, "it never subtracts b_dec from the input (load and re-save a coder trained "
                               "with apply_b_dec_to_input=False)")


# ---------------------------------------------------------------------------- Gemma Scope 2 (safetensors)


def read2(path: Path) -> tuple[SAEConfig, dict[str, torch.Tensor]]:
    folder = path if path.is_dir() else path.parent
    where = folder / ST if path.is_dir() else path
    raw = read_safetensors(where)
    names = {"w_enc": "W_enc", "w_dec": "W_dec", "b_enc": "b_enc", "b_dec": "b_dec", "threshold": "threshold",
             "affine_skip_connection": "W_skip"}
    t = {names.get(k, k): v for k, v in raw.items()}
    if "W_dec" in t and t["W_dec"].ndim == 3:
        raise UnsupportedArchitectureError(f"{where} is a cross-layer transcoder (w_dec per target layer); "
                                           "mechscope coders read one site and write one.")
    expect_keys(t, {"W_enc", "W_dec", "b_enc", "b_dec", "threshold"}, {"W_skip"}, where)
    out, d_in, n, d_out = _tensors(t, where)
    skip = "W_skip" in t
    if skip:
        if tuple(t["W_skip"].shape) != (d_in, d_out):
            raise CorruptFileError(f"{where}: affine_skip_connection has shape {tuple(t['W_skip'].shape)}, "
                                   f"expected ({d_in}, {d_out}).")
        out["W_skip"] = t["W_skip"].T.contiguous()  # stored [d_in, d_out], ours [d_out, d_in]
    conf = read_json(folder / GS2_CONFIG) if (folder / GS2_CONFIG).is_file() else {}
    info = _path_info(where)
    if conf:
        hook_in = _from_hf(conf.get("hf_hook_point_in"))
        transcoder = conf.get("type") == "transcoder" or skip
        hook_out = _from_hf(conf.get("hf_hook_point_out")) if transcoder else None
        if conf.get("affine_connection") and not skip:
            raise CorruptFileError(f"{where}: config.json says affine_connection but there is no "
                                   "affine_skip_connection tensor.")
    else:
        hook_in, hook_out = _hooks(info)
    extra = {"source_format": "gemmascope2", "gemmascope": info,
             "gemmascope2_config": {k: v for k, v in conf.items() if k != STASH_KEY}}
    cfg = _config(where, d_in, n, d_out, skip, hook_in, hook_out, conf.get("model_name") or info.get("model_name"),
                  extra)
    return restore(cfg, conf.get(STASH_KEY), where), out


def write2(coder: SparseCoder, folder: Path) -> Path:
    cfg, sd = prepare(coder)
    _check(cfg, "Gemma Scope 2")
    tensors = {"w_enc": sd["W_enc"], "w_dec": sd["W_dec"], "b_enc": sd["b_enc"], "b_dec": sd["b_dec"],
               "threshold": log_to_threshold(sd["log_threshold"])}
    if cfg.skip:
        tensors["affine_skip_connection"] = sd["W_skip"].T.contiguous()
    prev = cfg.extra.get("gemmascope2_config") or {}
    transcoder = cfg.is_transcoder or cfg.skip
    conf = {**prev, "architecture": "jump_relu", "width": cfg.n_latents, "model_name": cfg.model_name,
            "hf_hook_point_in": _to_hf(cfg.hook_in) or prev.get("hf_hook_point_in"),
            "hf_hook_point_out": _to_hf(cfg.hook_out if transcoder else cfg.hook_in) or prev.get("hf_hook_point_out"),
            "type": "transcoder" if transcoder else "sae", "affine_connection": cfg.skip, STASH_KEY: stash(cfg)}
    folder.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(folder / ST, safetensors_bytes(tensors))
    atomic_write_json(folder / GS2_CONFIG, conf)
    return folder
