"""Shared pieces of the SAE file formats: safe readers, the coder builder, threshold conversion.

Every reader returns (SAEConfig, tensors in our names); `build` turns that into a SparseCoder after
checking names and shapes, so a bad file fails with CorruptFileError before anything is assigned.
Nothing here unpickles arbitrary objects: safetensors, numpy without pickle, torch weights_only.
"""

from __future__ import annotations

import copy
import dataclasses
import io
import json
import math
import warnings
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch

from mechscope.errors import CorruptFileError, UnsupportedArchitectureError
from mechscope.sae.coder import SparseCoder
from mechscope.sae.config import SAEConfig

STASH_KEY = "mechscope"  # our full config, kept inside a foreign config file (peers ignore unknown keys)
STASH_VERSION = 1
TINY = float(torch.finfo(torch.float32).tiny)  # smallest normal float32: stands in for a threshold <= 0


# ---------------------------------------------------------------------------- safe readers


def read_json(path: Path) -> dict[str, Any]:
    try:
        obj = json.loads(Path(path).read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CorruptFileError(f"{path} is not readable JSON ({e}).") from e
    if not isinstance(obj, dict):
        raise CorruptFileError(f"{path} holds a JSON {type(obj).__name__}, expected an object.")
    return obj


def read_safetensors(path: Path, with_metadata: bool = False):
    """name -> tensor (and the header's str -> str metadata if asked)."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (safe_open is not a dict)
            meta = f.metadata() or {}
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        raise CorruptFileError(f"{path} is not a readable safetensors file ({e}).") from e
    return (tensors, meta) if with_metadata else tensors


def safetensors_bytes(tensors: Mapping[str, torch.Tensor], metadata: dict[str, str] | None = None) -> bytes:
    from safetensors.torch import save

    return save({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, metadata=metadata)


def read_npz(path: Path) -> dict[str, torch.Tensor]:
    """numpy archive without pickle: object arrays and pickled files are refused."""
    try:
        with np.load(str(path), allow_pickle=False) as z:
            if not hasattr(z, "files"):
                raise ValueError("not an .npz archive (a single .npy array)")
            arrays = {k: z[k] for k in z.files}
    except Exception as e:  # BadZipFile, EOFError, ValueError (pickled / object arrays), OSError
        raise CorruptFileError(f"{path} is not a readable numpy .npz archive of plain arrays ({e}).") from e
    out = {}
    for k, a in arrays.items():
        if a.dtype.kind != "f":
            raise CorruptFileError(f"{path}: array {k!r} has dtype {a.dtype}, expected floating point.")
        out[k] = torch.from_numpy(np.ascontiguousarray(a).copy())
    return out


def npz_bytes(tensors: Mapping[str, torch.Tensor]) -> bytes:
    buf = io.BytesIO()
    np.savez(buf, **{k: v.detach().cpu().float().numpy() for k, v in tensors.items()})
    return buf.getvalue()


def read_torch_state(path: Path) -> dict[str, torch.Tensor]:
    """torch.load with weights_only=True: a pickle that names any non-tensor global is refused unrun."""
    try:
        obj = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as e:  # UnpicklingError for unsafe content, RuntimeError / EOFError for corrupt files
        first = str(e).splitlines()[0] if str(e) else ""
        raise CorruptFileError(
            f"Refused to load {path}: it is not a plain tensor state dict ({type(e).__name__}: {first}). "
            "mechscope never unpickles arbitrary objects."
        ) from e
    if not isinstance(obj, dict) or not all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in obj.items()):
        raise CorruptFileError(f"{path} does not hold a name -> tensor state dict.")
    return dict(obj)


def torch_state_bytes(tensors: Mapping[str, torch.Tensor]) -> bytes:
    buf = io.BytesIO()
    torch.save({k: v.detach().cpu().contiguous().clone() for k, v in tensors.items()}, buf)
    return buf.getvalue()


# ---------------------------------------------------------------------------- checks


def expect_keys(tensors: Mapping[str, Any], required: Iterable[str], optional: Iterable[str], where: Any) -> None:
    required, optional = set(required), set(optional)
    missing = sorted(required - set(tensors))
    unexpected = sorted(set(tensors) - required - optional)
    if missing or unexpected:
        raise CorruptFileError(f"{where}: missing tensors {missing}, unexpected tensors {unexpected}.")


def shape_of(tensors: Mapping[str, torch.Tensor], name: str, ndim: int, where: Any) -> tuple[int, ...]:
    t = tensors[name]
    if t.ndim != ndim:
        raise CorruptFileError(f"{where}: {name} has shape {tuple(t.shape)}, expected {ndim} dimensions.")
    return tuple(t.shape)


def cannot(fmt: str, cfg: SAEConfig, why: str) -> UnsupportedArchitectureError:
    return UnsupportedArchitectureError(
        f"The {fmt} format cannot express this coder ({cfg.arch}, d_in {cfg.d_in}, d_out {cfg.out_dim}, "
        f"skip {cfg.skip}, apply_b_dec_to_input {cfg.apply_b_dec_to_input}): {why}. "
        "Save it as format='native' (or another format that can)."
    )


# ---------------------------------------------------------------------------- JumpReLU threshold


def threshold_to_log(threshold: torch.Tensor, where: Any = "") -> torch.Tensor:
    """Peers store the JumpReLU threshold t, the coder log(t) (float32). Pick, per latent, a float32
    log whose float32 exp is exactly t when one exists (about 70% of float32 values; otherwise the
    nearest), so encodings match bit for bit almost always. t <= 0 (ReLU for every peer) becomes
    the smallest normal float32, which differs from 0 only for pre-activations in (0, 1.2e-38]."""
    t = threshold.detach().to(torch.float32).cpu()
    if not torch.isfinite(t).all():
        raise CorruptFileError(f"{where}: the JumpReLU threshold holds NaN or inf.")
    low = t <= 0
    if low.any():
        warnings.warn(f"{where}: {int(low.sum())} JumpReLU thresholds are <= 0 (a plain ReLU for those latents); "
                      f"stored as {TINY:.3g} since the coder keeps log(threshold).", stacklevel=3)
        t = t.clamp_min(TINY)
    best = torch.log(t.double()).float()
    found = torch.exp(best) == t
    up, down = best.clone(), best.clone()
    for _ in range(8):
        up = torch.nextafter(up, torch.full_like(up, math.inf))
        down = torch.nextafter(down, torch.full_like(down, -math.inf))
        for cand in (down, up):
            hit = ~found & (torch.exp(cand) == t)
            best = torch.where(hit, cand, best)
            found |= hit
    return best


def log_to_threshold(log_threshold: torch.Tensor) -> torch.Tensor:
    """What the coder compares against: exp(log_threshold), float32."""
    return log_threshold.detach().to(torch.float32).cpu().exp()


# ---------------------------------------------------------------------------- build / prepare


def build(cfg: SAEConfig, tensors: Mapping[str, torch.Tensor], *, device=None, dtype=None,
          where: Any = "") -> SparseCoder:
    """Check names and shapes against the coder `cfg` describes, then assign (no zero-init copy).

    Weights take `dtype` (default: the file's W_enc dtype); thresholds keep their own dtype, float32
    from the foreign readers, whatever the weights' (a bf16 threshold moves by ~1%, and firing with it).
    """
    if "W_enc" not in tensors:
        raise CorruptFileError(f"{where}: no encoder weight in the file.")
    dtype = dtype or tensors["W_enc"].dtype
    if not dtype.is_floating_point:
        raise CorruptFileError(f"{where}: W_enc has dtype {dtype}, expected floating point.")
    cfg = dataclasses.replace(cfg, dtype=str(dtype).removeprefix("torch."))
    with torch.device("meta"):
        coder = SparseCoder(cfg, dtype=dtype)
    want = coder.state_dict()
    expect_keys(tensors, want, (), where)
    for name, t in want.items():
        if tuple(tensors[name].shape) != tuple(t.shape):
            raise CorruptFileError(f"{where}: {name} has shape {tuple(tensors[name].shape)}, the config implies "
                                   f"{tuple(t.shape)} (d_in {cfg.d_in}, n_latents {cfg.n_latents}, d_out {cfg.out_dim}).")
        if not tensors[name].dtype.is_floating_point:
            raise CorruptFileError(f"{where}: {name} has dtype {tensors[name].dtype}, expected floating point.")
    sd = {}
    for name in want:  # thresholds keep the dtype they come with (float32 from every foreign reader)
        keep = name in ("threshold", "log_threshold")
        sd[name] = tensors[name].to(device=device or "cpu", dtype=tensors[name].dtype if keep else dtype,
                                    copy=True).contiguous()
    coder.load_state_dict(sd, strict=True, assign=True)
    return coder


def prepare(coder: SparseCoder) -> tuple[SAEConfig, dict[str, torch.Tensor]]:
    """A folded copy's config and CPU tensors: saved files take raw activations (scales = 1)."""
    if not isinstance(coder, SparseCoder):
        raise TypeError(f"save() takes a SparseCoder, got {type(coder).__name__}.")
    c = copy.deepcopy(coder).cpu()
    c.fold_scales()
    return c.cfg, {k: v.detach().contiguous() for k, v in c.state_dict().items()}


def stash(cfg: SAEConfig) -> dict[str, Any]:
    return {"format_version": STASH_VERSION, "config": cfg.to_dict()}


def restore(cfg: SAEConfig, stashed: Any, where: Any = "") -> SAEConfig:
    """Take back what a foreign format cannot hold (hooks, provenance, batchtopk written as jumprelu)
    from our stashed config, if it still describes the same coder; the file wins on everything else."""
    if not isinstance(stashed, dict) or not isinstance(stashed.get("config"), dict):
        return cfg
    try:
        ours = SAEConfig.from_dict(dict(stashed["config"]))
    except Exception as e:  # noqa: BLE001 (a stale or hand-edited stash must not block loading)
        warnings.warn(f"{where}: ignoring the stashed mechscope config ({e}).", stacklevel=3)
        return cfg
    same = (ours.d_in, ours.n_latents, ours.out_dim, ours.skip, bool(ours.apply_b_dec_to_input)) == (
        cfg.d_in, cfg.n_latents, cfg.out_dim, cfg.skip, bool(cfg.apply_b_dec_to_input))
    arch_ok = ours.arch == cfg.arch or (cfg.arch == "jumprelu" and ours.arch in ("batchtopk", "matryoshka"))
    if not (same and arch_ok):
        warnings.warn(f"{where}: the stashed mechscope config no longer matches the file; ignoring it.", stacklevel=3)
        return cfg
    keep = {"dtype": cfg.dtype, "input_scale": cfg.input_scale, "output_scale": cfg.output_scale}
    if ours.arch == cfg.arch and cfg.k is not None:
        keep["k"] = cfg.k
    return dataclasses.replace(ours, **keep)


def layer_hook(kind: str, layer: int) -> str | None:
    """Our (TransformerLens) hook name for a site kind at a layer."""
    return {
        "resid_post": f"blocks.{layer}.hook_resid_post", "resid_pre": f"blocks.{layer}.hook_resid_pre",
        "mlp_out": f"blocks.{layer}.hook_mlp_out", "attn_out": f"blocks.{layer}.hook_attn_out",
        "mlp_in": f"blocks.{layer}.ln2.hook_normalized", "z": f"blocks.{layer}.attn.hook_z",
    }.get(kind)
