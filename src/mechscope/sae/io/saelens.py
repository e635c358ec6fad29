"""SAELens folders: cfg.json + sae_weights.safetensors (6.x nested `metadata`; pre-6.0 flat configs).

Mapping (SAELens -> ours): standard -> relu, topk -> topk, jumprelu -> jumprelu (or our batchtopk /
matryoshka when SAELens saved a BatchTopK SAE for inference as jumprelu), gated (b_gate -> b_enc),
[jumprelu_][skip_]transcoder -> relu/jumprelu with d_out (+ W_skip [d_out, d_in]). Same tensor
orientation as ours. Traps handled: `threshold` vs our log_threshold; `apply_b_dec_to_input`;
`rescale_acts_by_decoder_norm` (folded into the weights); `normalize_activations=
expected_average_only_in` needs the scaling factor SAELens keeps outside the weights
(activation_scaler.json or the release table) and becomes input/output_scale; pre-6.0
`scaling_factor` per latent (folded into W_dec).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from mechscope.errors import CorruptFileError, InputError, UnsupportedArchitectureError
from mechscope.fileio import atomic_write_bytes, atomic_write_json
from mechscope.sae.coder import SparseCoder
from mechscope.sae.config import SAEConfig
from mechscope.sae.io.common import (
    STASH_KEY,
    cannot,
    expect_keys,
    log_to_threshold,
    prepare,
    read_json,
    read_safetensors,
    restore,
    safetensors_bytes,
    shape_of,
    stash,
    threshold_to_log,
)

CONFIG, WEIGHTS, SCALER = "cfg.json", "sae_weights.safetensors", "activation_scaler.json"
WRITES_VERSION = "6.54.12"  # the SAELens release whose layout `write` produces (and was checked against)
_TRANSCODERS = {"transcoder": ("relu", False), "skip_transcoder": ("relu", True),
                "jumprelu_transcoder": ("jumprelu", False), "jumprelu_skip_transcoder": ("jumprelu", True)}


def read(folder: Path, *, norm_scaling_factor: float | None = None) -> tuple[SAEConfig, dict[str, torch.Tensor]]:
    where = folder / WEIGHTS
    raw = read_json(folder / CONFIG)
    t = read_safetensors(where)
    meta = raw.get("metadata") if isinstance(raw.get("metadata"), dict) else {}

    def get(key: str, default: Any = None) -> Any:  # 6.x nests provenance in metadata; pre-6.0 is flat
        return meta[key] if key in meta else raw.get(key, default)

    arch = raw.get("architecture") or "standard"
    act = raw.get("activation_fn") or raw.get("activation_fn_str") or "relu"
    k = raw.get("k", (raw.get("activation_fn_kwargs") or {}).get("k"))
    if arch == "standard" and act == "topk":  # pre-6.0 topk SAEs
        arch = "topk"
    details = meta.get("training_architecture_details") or {}
    skip, d_out = False, None
    if arch == "standard":
        ours = "relu"
    elif arch in ("topk", "jumprelu", "gated"):
        ours = arch
    elif arch in _TRANSCODERS:
        ours, skip = _TRANSCODERS[arch]
    elif arch == "batchtopk":
        ours = "batchtopk"
    elif arch == "matryoshka_batchtopk":
        ours = "matryoshka"
    else:
        raise UnsupportedArchitectureError(f"{folder}: SAELens architecture {arch!r} has no mechscope equivalent "
                                           "(supported: standard, topk, jumprelu, gated, batchtopk, "
                                           "matryoshka_batchtopk, [jumprelu_][skip_]transcoder).")
    if ours == "jumprelu" and meta.get("training_architecture") in ("batchtopk", "matryoshka_batchtopk") \
            and _int(details.get("k")) is not None:  # BatchTopK saved for inference as JumpReLU
        ours = "batchtopk" if meta["training_architecture"] == "batchtopk" else "matryoshka"
        k = details["k"]

    # tensors, in our names
    enc_bias = "b_gate" if arch == "gated" else "b_enc"
    optional = {"scaling_factor", "finetuning_scaling_factor"}
    required = {"W_enc", "W_dec", "b_dec", enc_bias}
    if arch == "gated":
        required |= {"b_mag", "r_mag"}
    if ours in ("batchtopk", "matryoshka") and arch != "jumprelu":  # training checkpoints
        required.add("topk_threshold")
    if arch == "jumprelu" or arch.startswith("jumprelu_"):
        required.add("threshold" if "log_threshold" not in t else "log_threshold")
    if skip:
        required.add("W_skip")
    expect_keys(t, required, optional, where)
    d_in, n = shape_of(t, "W_enc", 2, where)
    out = {"W_enc": t["W_enc"], "b_enc": t[enc_bias], "W_dec": t["W_dec"], "b_dec": t["b_dec"]}
    for name in ("b_mag", "r_mag", "W_skip"):
        if name in t:
            out[name] = t[name]
    if arch in _TRANSCODERS:
        d_out = int(raw.get("d_out", shape_of(t, "W_dec", 2, where)[1]))

    sf = t.get("scaling_factor", t.get("finetuning_scaling_factor"))
    if sf is not None and not torch.equal(sf, torch.ones_like(sf)):  # pre-6.0: decode((f * sf) @ W_dec)
        if tuple(sf.shape) != (n,):
            raise CorruptFileError(f"{where}: scaling_factor has shape {tuple(sf.shape)}, expected ({n},).")
        out["W_dec"] = out["W_dec"] * sf.to(out["W_dec"].dtype)[:, None]

    if raw.get("rescale_acts_by_decoder_norm") and ours in ("topk", "batchtopk", "matryoshka"):
        norms = out["W_dec"].norm(dim=-1)  # encode: pre * |W_dec|; decode: (f / |W_dec|) @ W_dec
        out["W_enc"], out["b_enc"] = out["W_enc"] * norms, out["b_enc"] * norms
        out["W_dec"] = out["W_dec"] / norms[:, None]

    scale = _scale(folder, raw, get, norm_scaling_factor)
    try:
        cfg = SAEConfig(
            arch=ours, d_in=d_in, n_latents=n, d_out=d_out, skip=skip,
            k=_int(k) if ours in ("topk", "batchtopk", "matryoshka") else None,
            apply_b_dec_to_input=bool(raw.get("apply_b_dec_to_input", True)) and arch not in _TRANSCODERS,
            matryoshka_prefixes=list(details.get("matryoshka_widths") or raw.get("matryoshka_widths") or [])
            if ours == "matryoshka" else [],
            hook_in=get("hook_name", get("hook_point")), hook_out=get("hook_name_out"), model_name=get("model_name"),
            input_scale=scale, output_scale=scale,
            extra={"source_format": "saelens",
                   "saelens_cfg": {k2: v for k2, v in raw.items() if k2 != "metadata"} | {"metadata": _meta(meta)}},
        )
    except InputError as e:
        raise CorruptFileError(f"{folder}/{CONFIG} describes no valid coder: {e}") from e
    cfg = restore(cfg, meta.get(STASH_KEY), where)
    if cfg.arch == "jumprelu":
        out["log_threshold"] = t["log_threshold"].to(torch.float32) if "log_threshold" in t else \
            threshold_to_log(t["threshold"], where)  # older SAELens training checkpoints store the log
    elif cfg.arch in ("batchtopk", "matryoshka"):
        thr = t["threshold"] if "threshold" in t else t["topk_threshold"].reshape(()).expand(n)
        out["threshold"] = thr.to(torch.float32)
    return cfg, out


def _int(v: Any) -> int | None:
    return int(v) if isinstance(v, (int, float)) and float(v).is_integer() else None


def _meta(meta: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in meta.items() if k != STASH_KEY}


def _scale(folder: Path, raw: dict[str, Any], get, given: float | None) -> float:
    """SAELens's 'expected_average_only_in' scales inputs by a factor stored outside the weights."""
    norm = raw.get("normalize_activations", "none")
    norm = {True: "expected_average_only_in", False: "none", None: "none"}.get(norm, norm)
    if norm == "none":
        return 1.0
    if norm != "expected_average_only_in":
        raise UnsupportedArchitectureError(
            f"{folder}: normalize_activations={norm!r} normalises each token at run time; a mechscope coder "
            "cannot reproduce it (only a constant scale). Fold it with SAELens first if it is affine.")
    factor = given
    if factor is None and (folder / SCALER).is_file():
        factor = read_json(folder / SCALER).get("scaling_factor")
    if factor is None:
        factor = get("norm_scaling_factor", get("scaling_factor"))
    if factor is None:
        raise InputError(
            f"{folder}: this SAE was trained on activations scaled by a constant (normalize_activations="
            "'expected_average_only_in') that is not in the folder. Pass load(..., norm_scaling_factor=F) with "
            "SAELens's `norm_scaling_factor` for the release (pretrained_saes.yaml) or the trainer's "
            "activation_scaler.json `scaling_factor`; pass 1.0 to take the weights as they are (inputs pre-scaled).")
    factor = float(factor)
    if not factor > 0:
        raise InputError(f"{folder}: the activation scaling factor must be > 0, got {factor}.")
    return factor


def write(coder: SparseCoder, folder: Path) -> Path:
    cfg, sd = prepare(coder)
    apply_b = bool(cfg.apply_b_dec_to_input)
    transcoder = cfg.is_transcoder or cfg.skip or cfg.out_dim != cfg.d_in
    if transcoder and apply_b:
        raise cannot("SAELens", cfg, "its transcoders never subtract b_dec from the input")
    if transcoder and cfg.arch not in ("relu", "jumprelu"):
        raise cannot("SAELens", cfg, "its transcoders are ReLU or JumpReLU only")
    tensors = {"W_enc": sd["W_enc"], "W_dec": sd["W_dec"], "b_dec": sd["b_dec"]}
    tensors["b_gate" if cfg.arch == "gated" else "b_enc"] = sd["b_enc"]
    meta = dict((cfg.extra.get("saelens_cfg") or {}).get("metadata") or {})
    meta.update(sae_lens_version=WRITES_VERSION, sae_lens_training_version=meta.get("sae_lens_training_version",
                                                                                    WRITES_VERSION),
                model_name=cfg.model_name, hook_name=cfg.hook_in, hook_head_index=meta.get("hook_head_index"))
    out: dict[str, Any] = {"d_in": cfg.d_in, "d_sae": cfg.n_latents, "dtype": cfg.dtype, "device": "cpu",
                           "apply_b_dec_to_input": apply_b, "normalize_activations": "none",
                           "reshape_activations": (cfg.extra.get("saelens_cfg") or {}).get("reshape_activations",
                                                                                          "none")}
    if cfg.arch == "gated":
        tensors.update(b_mag=sd["b_mag"], r_mag=sd["r_mag"])
        arch = "gated"
    elif cfg.arch == "topk":
        arch = "topk"
        out.update(k=cfg.k, rescale_acts_by_decoder_norm=False)
    elif cfg.arch in ("jumprelu", "batchtopk", "matryoshka"):
        arch = "jumprelu"  # SAELens saves BatchTopK SAEs for inference exactly so
        tensors["threshold"] = log_to_threshold(sd["log_threshold"]) if cfg.arch == "jumprelu" else sd["threshold"]
        if cfg.arch != "jumprelu":
            meta["training_architecture"] = "batchtopk" if cfg.arch == "batchtopk" else "matryoshka_batchtopk"
            meta["training_architecture_details"] = {"k": cfg.k, **({"matryoshka_widths": cfg.matryoshka_prefixes}
                                                                    if cfg.arch == "matryoshka" else {})}
    else:
        arch = "standard"
    if transcoder:
        arch = {"standard": "transcoder", "jumprelu": "jumprelu_transcoder"}[arch]
        if cfg.skip:
            arch = arch.replace("transcoder", "skip_transcoder")
            tensors["W_skip"] = sd["W_skip"]
        out["d_out"] = cfg.out_dim
        if cfg.hook_out is not None:
            meta["hook_name_out"] = cfg.hook_out
    meta[STASH_KEY] = stash(cfg)
    out.update(architecture=arch, metadata=meta)
    folder.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(folder / WEIGHTS, safetensors_bytes(tensors))
    atomic_write_json(folder / CONFIG, out)
    return folder
