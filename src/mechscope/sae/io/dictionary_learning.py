"""saprmarks/dictionary_learning: `trainer_i/ae.pt` (a pickled state dict) + config.json.

ae.pt is read ONLY with torch.load(weights_only=True): a pickle naming anything but tensors is
refused before it runs. The class is `config.json["trainer"]["dict_class"]` (else guessed from
the tensor names). Mapping: nn.Linear weights are [out, in], so encoder.weight [n, d] and
decoder.weight [d, n] are transposed into W_enc [d, n] / W_dec [n, d]. AutoEncoder subtracts its
`bias` (= b_dec) before encoding; AutoEncoderNew has a decoder.bias and subtracts nothing;
JumpReluAutoEncoder does not subtract b_dec; AutoEncoderTopK / BatchTopKSAE subtract b_dec;
BatchTopKSAE and MatryoshkaBatchTopKSAE hold ONE scalar `threshold` buffer, broadcast to our
per-latent threshold (group_sizes -> matryoshka prefixes); GatedAutoEncoder: gate_bias -> b_enc,
mag_bias -> b_mag, decoder_bias -> b_dec. Raw weights are kept (AutoEncoder.from_pretrained's
default decoder normalisation rescales latents; we do not).
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import torch

from mechscope.errors import CorruptFileError, InputError
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
    prepare,
    read_json,
    read_torch_state,
    restore,
    shape_of,
    stash,
    threshold_to_log,
    torch_state_bytes,
)

WEIGHTS, CONFIG = "ae.pt", "config.json"
_LINEAR = {"encoder.weight", "encoder.bias", "decoder.weight"}
_KEYS = {  # dict_class -> (required, optional) tensor names
    "AutoEncoder": (_LINEAR | {"bias"}, set()),
    "AutoEncoderNew": (_LINEAR | {"decoder.bias"}, set()),
    "AutoEncoderTopK": (_LINEAR | {"b_dec"}, {"k", "threshold"}),
    "BatchTopKSAE": (_LINEAR | {"b_dec"}, {"k", "threshold"}),
    "JumpReluAutoEncoder": ({"W_enc", "b_enc", "W_dec", "b_dec", "threshold"}, set()),
    "MatryoshkaBatchTopKSAE": ({"W_enc", "b_enc", "W_dec", "b_dec", "k", "threshold", "group_sizes"}, set()),
    "GatedAutoEncoder": ({"encoder.weight", "decoder.weight", "decoder_bias", "gate_bias", "mag_bias", "r_mag"},
                         set()),
}


def _guess(keys: set[str], where: Path) -> str:
    if "group_sizes" in keys:
        return "MatryoshkaBatchTopKSAE"
    if "gate_bias" in keys:
        return "GatedAutoEncoder"
    if "W_enc" in keys:
        return "JumpReluAutoEncoder"
    if "bias" in keys:
        return "AutoEncoder"
    if "decoder.bias" in keys:
        return "AutoEncoderNew"
    raise InputError(f"{where}: cannot tell AutoEncoderTopK from BatchTopKSAE without the trainer's config.json "
                     "(trainer.dict_class); put it next to ae.pt.")


def _hook(trainer: dict[str, Any]) -> str | None:
    m = re.fullmatch(r"(resid_post|resid_pre|mlp_out|attn_out)_layer_?(\d+)", str(trainer.get("submodule_name")))
    return layer_hook(m.group(1), int(m.group(2))) if m else None


def read(path: Path) -> tuple[SAEConfig, dict[str, torch.Tensor]]:
    folder = path if path.is_dir() else path.parent
    where = folder / WEIGHTS if path.is_dir() else path
    t = read_torch_state(where)
    conf = read_json(folder / CONFIG) if (folder / CONFIG).is_file() else {}
    trainer = conf.get("trainer") if isinstance(conf.get("trainer"), dict) else {}
    cls = trainer.get("dict_class") or _guess(set(t), where)
    if cls not in _KEYS:
        raise CorruptFileError(f"{where}: dictionary_learning class {cls!r} is not supported "
                               f"(supported: {', '.join(_KEYS)}).")
    required, optional = _KEYS[cls]
    expect_keys(t, required, optional, where)
    linear = "encoder.weight" in t
    if linear:
        n, d_in = shape_of(t, "encoder.weight", 2, where)
        out = {"W_enc": t["encoder.weight"].T.contiguous(), "W_dec": t["decoder.weight"].T.contiguous()}
    else:
        d_in, n = shape_of(t, "W_enc", 2, where)
        out = {"W_enc": t["W_enc"], "W_dec": t["W_dec"], "b_enc": t["b_enc"], "b_dec": t["b_dec"]}
    k = int(t["k"].item()) if "k" in t else trainer.get("k")
    prefixes: list[int] = []
    apply_b = True
    if cls == "AutoEncoder":
        arch = "relu"
        out.update(b_enc=t["encoder.bias"], b_dec=t["bias"])
    elif cls == "AutoEncoderNew":
        arch, apply_b = "relu", False
        out.update(b_enc=t["encoder.bias"], b_dec=t["decoder.bias"])
    elif cls == "GatedAutoEncoder":
        arch = "gated"
        out.update(b_enc=t["gate_bias"], b_dec=t["decoder_bias"], b_mag=t["mag_bias"], r_mag=t["r_mag"])
    elif cls == "JumpReluAutoEncoder":
        arch, apply_b = "jumprelu", False
    else:  # the TopK family
        arch = {"AutoEncoderTopK": "topk", "BatchTopKSAE": "batchtopk", "MatryoshkaBatchTopKSAE": "matryoshka"}[cls]
        if linear:
            out.update(b_enc=t["encoder.bias"], b_dec=t["b_dec"])
        if arch == "matryoshka":
            prefixes = torch.cumsum(t["group_sizes"].reshape(-1).long(), 0).tolist()
    layer_extra = {"source_format": "dictionary_learning", "dictionary_learning_class": cls,
                   "dictionary_learning_config": {k2: v for k2, v in conf.items() if k2 != STASH_KEY}}
    if arch == "topk" and "threshold" in t:
        layer_extra["dictionary_learning_threshold"] = float(t["threshold"].reshape(-1)[0])
    try:
        cfg = SAEConfig(arch=arch, d_in=d_in, n_latents=n, k=int(k) if k is not None and arch in (
            "topk", "batchtopk", "matryoshka") else None, apply_b_dec_to_input=apply_b,
            matryoshka_prefixes=prefixes, hook_in=_hook(trainer),
            model_name=trainer.get("lm_name"), extra=layer_extra)
    except InputError as e:
        raise CorruptFileError(f"{where}: {e}") from e
    cfg = restore(cfg, conf.get(STASH_KEY), where)
    if arch == "jumprelu":
        out["log_threshold"] = threshold_to_log(t["threshold"], where)
    elif arch in ("batchtopk", "matryoshka"):
        thr = t.get("threshold", torch.tensor(-1.0))
        if thr.numel() != 1:
            raise CorruptFileError(f"{where}: {cls} has a scalar threshold, got shape {tuple(thr.shape)}.")
        out["threshold"] = thr.to(torch.float32).reshape(()).expand(n).clone()
    return cfg, out


def write(coder: SparseCoder, folder: Path) -> Path:
    cfg, sd = prepare(coder)
    if cfg.skip or cfg.out_dim != cfg.d_in or cfg.is_transcoder:
        raise cannot("dictionary_learning", cfg, "its dictionaries are plain autoencoders")
    a, apply_b = cfg.arch, bool(cfg.apply_b_dec_to_input)
    enc_w, dec_w = sd["W_enc"].T.contiguous(), sd["W_dec"].T.contiguous()
    if a == "relu":
        cls = "AutoEncoder" if apply_b else "AutoEncoderNew"
        t = {"encoder.weight": enc_w, "encoder.bias": sd["b_enc"], "decoder.weight": dec_w,
             "bias" if apply_b else "decoder.bias": sd["b_dec"]}
    elif a == "jumprelu":
        if apply_b:
            raise cannot("dictionary_learning", cfg, "its JumpReluAutoEncoder never subtracts b_dec from the input")
        cls = "JumpReluAutoEncoder"
        t = {"W_enc": sd["W_enc"], "b_enc": sd["b_enc"], "W_dec": sd["W_dec"], "b_dec": sd["b_dec"],
             "threshold": log_to_threshold(sd["log_threshold"])}
    else:
        if not apply_b:
            raise cannot("dictionary_learning", cfg, f"its {a} dictionaries always subtract b_dec from the input")
        if a == "gated":
            cls = "GatedAutoEncoder"
            t = {"encoder.weight": enc_w, "decoder.weight": dec_w, "decoder_bias": sd["b_dec"],
                 "gate_bias": sd["b_enc"], "mag_bias": sd["b_mag"], "r_mag": sd["r_mag"]}
        else:
            thr = sd.get("threshold")
            if thr is None:
                thr = torch.tensor(float(cfg.extra.get("dictionary_learning_threshold", -1.0)))
            elif not torch.equal(thr, thr[:1].expand_as(thr)):
                raise cannot("dictionary_learning", cfg, "its BatchTopK threshold is one scalar, this coder's "
                                                         "differs across latents")
            k, thr = torch.tensor(cfg.k, dtype=torch.int32), thr.reshape(-1)[0].to(torch.float32).clone()
            if a == "matryoshka":
                cls = "MatryoshkaBatchTopKSAE"
                p = [0, *cfg.matryoshka_prefixes]
                t = {"W_enc": sd["W_enc"], "b_enc": sd["b_enc"], "W_dec": sd["W_dec"], "b_dec": sd["b_dec"], "k": k,
                     "threshold": thr, "group_sizes": torch.tensor([b - a_ for a_, b in zip(p, p[1:])])}
            else:
                cls = "AutoEncoderTopK" if a == "topk" else "BatchTopKSAE"
                t = {"encoder.weight": enc_w, "encoder.bias": sd["b_enc"], "decoder.weight": dec_w,
                     "b_dec": sd["b_dec"], "k": k, "threshold": thr}
    prev = cfg.extra.get("dictionary_learning_config") or {}
    trainer = {**(prev.get("trainer") or {}), "dict_class": cls, "activation_dim": cfg.d_in,
               "dict_size": cfg.n_latents, "lm_name": cfg.model_name}
    if cfg.k is not None:
        trainer["k"] = cfg.k
    layer, rest = split_hook_name(cfg.hook_in or "")
    if layer is not None and rest in ("hook_resid_post", "hook_resid_pre", "hook_mlp_out", "hook_attn_out"):
        trainer.update(layer=layer, submodule_name=f"{rest.removeprefix('hook_')}_layer_{layer}")
    folder.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(folder / WEIGHTS, torch_state_bytes(t))
    atomic_write_json(folder / CONFIG, {**prev, "trainer": trainer, STASH_KEY: stash(cfg)})
    return folder
