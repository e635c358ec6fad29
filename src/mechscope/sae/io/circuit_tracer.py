"""circuit-tracer's (0.5) transcoder layouts on disk, read into and written from a TranscoderSet.

Per-layer set (PLT, "model_kind: transcoder_set"): `config.yaml` + `layer_{i}.safetensors`, each file
    W_enc [n, d_in]  (F.linear orientation: pre = x @ W_enc.T + b_enc)   W_dec [n, d_out]
    b_enc [n]   b_dec [d_out]   activation_function.threshold [n] (JumpReLU; absent: ReLU)   W_skip [d_out, d_in]
config.yaml may list the layer files under `transcoders:` (paths relative to the config's folder here).
Cross-layer transcoder (CLT, "model_kind: cross_layer_transcoder"): per source layer i
    W_enc_{i}.safetensors: W_enc_{i} [n, d_in], b_enc_{i} [n], b_dec_{i} [d_out], threshold_{i} [n] (JumpReLU)
    W_dec_{i}.safetensors: W_dec_{i} [n, n_layers - i, d_out]   (W_dec_{i}[:, j]: written to layer i + j)
Hooks: feature_input_hook / feature_output_hook are TransformerLens names inside a block. circuit-tracer
loads TL models unprocessed (fold_ln=False) and wraps each MLP with `mlp.hook_in` / `mlp.hook_out`; GPT-2
uses hook_resid_mid -> hook_mlp_out, Llama mlp.hook_in -> mlp.hook_out, Gemma ln2.hook_normalized ->
hook_mlp_out. Our `blocks.{l}.ln2.hook_normalized` is the MLP's input (norm weight applied unless the model
was loaded with fold_ln), so "mlp.hook_in" and "ln2.hook_normalized" both map to it; "mlp.hook_out" maps to
hook_mlp_out. circuit-tracer has no TopK transcoders: only ReLU / JumpReLU (and BatchTopK, whose inference
rule is a JumpReLU) can be written.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import torch

from mechscope.errors import CorruptFileError, UnknownFormatError, UnsupportedArchitectureError
from mechscope.fileio import atomic_write_bytes
from mechscope.sae.io.common import log_to_threshold, read_safetensors, safetensors_bytes, threshold_to_log

CONFIG = "config.yaml"
KINDS = {"transcoder_set": "plt", "cross_layer_transcoder": "clt"}
LOOKED_FOR = ("mechscope: transcoders.json; circuit-tracer per-layer set: config.yaml + layer_{i}.safetensors; "
              "circuit-tracer CLT: W_enc_{i}.safetensors + W_dec_{i}.safetensors")
_TO_OURS = {"mlp.hook_in": "ln2.hook_normalized", "ln2.hook_normalized": "ln2.hook_normalized",
            "hook_resid_mid": "hook_resid_mid", "hook_mlp_out": "hook_mlp_out", "mlp.hook_out": "hook_mlp_out"}


def hook_template(name: str) -> str:
    """circuit-tracer's in-block hook name -> our template ("blocks.{l}. ..."); a full template passes through."""
    if "{l}" in name:
        return name
    return "blocks.{l}." + _TO_OURS.get(name, name)


def detect(folder: Path) -> str | None:
    """"plt" / "clt" for a circuit-tracer folder, else None."""
    if (folder / CONFIG).is_file():
        kind = _read_config(folder).get("model_kind")
        if kind not in KINDS:
            raise CorruptFileError(f"{folder}/{CONFIG} has model_kind {kind!r}; circuit-tracer knows "
                                   f"{', '.join(KINDS)}.")
        return KINDS[kind]
    if (folder / "W_enc_0.safetensors").is_file():
        return "clt"
    if (folder / "layer_0.safetensors").is_file():
        return "plt"
    return None


def _read_config(folder: Path) -> dict[str, Any]:
    import yaml

    try:
        cfg = yaml.safe_load((folder / CONFIG).read_text())
    except (OSError, yaml.YAMLError) as e:
        raise CorruptFileError(f"{folder}/{CONFIG} is not readable YAML ({e}).") from e
    if not isinstance(cfg, dict):
        raise CorruptFileError(f"{folder}/{CONFIG} is not a mapping.")
    return cfg


def _numbered(folder: Path, pattern: str) -> list[Path]:
    """folder/<pattern with {i}> for i = 0, 1, ... (CorruptFileError on a gap)."""
    rx = re.compile(re.escape(pattern).replace(r"\{i\}", r"(\d+)") + "$")
    found = {int(m.group(1)): p for p in folder.iterdir() if (m := rx.match(p.name))}
    if sorted(found) != list(range(len(found))):
        missing = min(set(range(max(found) + 1)) - set(found))
        raise CorruptFileError(f"{folder} lacks {pattern.format(i=missing)} (has {len(found)} such files).")
    return [found[i] for i in range(len(found))]


def read(folder: Path, *, device=None, dtype=None, input_hook: str | None = None, output_hook: str | None = None):
    """A TranscoderSet from a circuit-tracer folder. input_hook / output_hook override the config's hooks (our
    names or templates); without config.yaml they default to circuit-tracer's (hook_resid_mid -> hook_mlp_out)."""
    from mechscope.sae.transcoders import TranscoderSet

    kind = detect(folder)
    if kind is None:
        raise UnknownFormatError(f"No transcoders found in {folder}. Looked for {LOOKED_FOR}.")
    cfg = _read_config(folder) if (folder / CONFIG).is_file() else {}
    h_in = hook_template(input_hook or cfg.get("feature_input_hook") or "hook_resid_mid")
    h_out = hook_template(output_hook or cfg.get("feature_output_hook") or "hook_mlp_out")
    model_name = cfg.get("model_name")
    if kind == "plt":
        coders = [_read_layer(p, i, h_in, h_out, model_name, device, dtype)
                  for i, p in enumerate(_layer_files(folder, cfg))]
        return TranscoderSet.from_coders(coders)
    return TranscoderSet.from_clt(_read_clt(folder, h_in, h_out, model_name, device, dtype))


def _layer_files(folder: Path, cfg: dict[str, Any]) -> list[Path]:
    listed = cfg.get("transcoders")
    if not listed:
        return _numbered(folder, "layer_{i}.safetensors")
    remote = [p for p in listed if str(p).startswith("hf://")]
    if remote:
        raise UnknownFormatError(f"{folder}/{CONFIG} lists transcoders on the Hugging Face Hub ({remote[0]}); "
                                 "download them and list the local files (relative to the config) instead.")
    paths = [(folder / p) if not Path(p).is_absolute() else Path(p) for p in listed]
    missing = [p for p in paths if not p.is_file()]
    if missing:
        raise CorruptFileError(f"{folder}/{CONFIG} lists {missing[0]}, which does not exist.")
    if any(p.suffix == ".npz" for p in paths):
        raise UnsupportedArchitectureError(f"{folder}: Gemma Scope .npz transcoders: load each with "
                                           "mechscope.sae.load (format gemmascope) and use TranscoderSet.from_coders.")
    return paths


def _read_layer(path: Path, layer: int, h_in: str, h_out: str, model_name, device, dtype):
    from mechscope.sae.config import SAEConfig
    from mechscope.sae.io.common import build, expect_keys, shape_of

    t = read_safetensors(path)
    expect_keys(t, ["W_enc", "W_dec", "b_enc", "b_dec"], ["activation_function.threshold", "W_skip"], path)
    n, d_in = shape_of(t, "W_enc", 2, path)
    d_out = shape_of(t, "b_dec", 1, path)[0]
    jump = "activation_function.threshold" in t
    cfg = SAEConfig(arch="jumprelu" if jump else "relu", d_in=d_in, n_latents=n, d_out=d_out, skip="W_skip" in t,
                    apply_b_dec_to_input=False, hook_in=h_in.format(l=layer), hook_out=h_out.format(l=layer),
                    model_name=model_name, extra={"source_format": "circuit-tracer"})
    ours = {"W_enc": t["W_enc"].T.contiguous(), "W_dec": t["W_dec"], "b_enc": t["b_enc"], "b_dec": t["b_dec"]}
    if jump:
        ours["log_threshold"] = threshold_to_log(t["activation_function.threshold"], path)
    if "W_skip" in t:
        ours["W_skip"] = t["W_skip"]
    return build(cfg, ours, device=device, dtype=dtype, where=path)


def _read_clt(folder: Path, h_in: str, h_out: str, model_name, device, dtype):
    from mechscope.sae.clt import CLTConfig, CrossLayerTranscoder

    enc_files = _numbered(folder, "W_enc_{i}.safetensors")
    L = len(enc_files)
    state: dict[str, torch.Tensor] = {}
    encs, benc, bdec, thr = [], [], [], []
    for i, p in enumerate(enc_files):
        t = read_safetensors(p)
        for key in (f"W_enc_{i}", f"b_enc_{i}", f"b_dec_{i}"):
            if key not in t:
                raise CorruptFileError(f"{p} lacks {key} (has {', '.join(sorted(t))}).")
        encs.append(t[f"W_enc_{i}"].T)  # [d_in, n]
        benc.append(t[f"b_enc_{i}"])
        bdec.append(t[f"b_dec_{i}"])
        if f"threshold_{i}" in t:
            thr.append(t[f"threshold_{i}"].reshape(-1))
        dec = folder / f"W_dec_{i}.safetensors"
        if not dec.is_file():
            raise CorruptFileError(f"{folder} has {p.name} but lacks {dec.name}.")
        td = read_safetensors(dec)
        if f"W_dec_{i}" not in td:
            raise CorruptFileError(f"{dec} lacks W_dec_{i}.")
        state[f"W_dec.{i}"] = td[f"W_dec_{i}"]
    if thr and len(thr) != L:
        raise CorruptFileError(f"{folder}: threshold_i is in {len(thr)} of {L} encoder files.")
    shapes = {tuple(e.shape) for e in encs}
    if len(shapes) != 1:
        raise CorruptFileError(f"{folder}: the W_enc_i differ in shape ({sorted(shapes)}).")
    d_in, n = shapes.pop()
    state |= {"W_enc": torch.stack(encs), "b_enc": torch.stack(benc), "b_dec": torch.stack(bdec)}
    if thr:
        state["log_threshold"] = torch.stack([threshold_to_log(x, folder) for x in thr])
    cfg = CLTConfig(n_layers=L, d_in=d_in, n_features=n, d_out=int(state["b_dec"].shape[1]),
                    arch="jumprelu" if thr else "relu", input_hooks=[h_in.format(l=i) for i in range(L)],
                    output_hooks=[h_out.format(l=i) for i in range(L)], model_name=model_name,
                    extra={"source_format": "circuit-tracer"})
    return CrossLayerTranscoder.from_tensors(cfg, state, device=device, dtype=dtype, where=folder)


# ---------------------------------------------------------------------------- writing


def _ct_hook(hook: str) -> str:
    """Our blocks.{l}.<name> -> circuit-tracer's in-block name (the MLP input is mlp.hook_in for their
    wrapped TL models; resid_mid and mlp_out keep their names)."""
    name = hook.split(".", 2)[2] if hook.startswith("blocks.") else hook
    return {"ln2.hook_normalized": "mlp.hook_in"}.get(name, name)


def write(ts, folder: Path) -> Path:
    """Write `ts` in circuit-tracer's layout (config.yaml + layer files). UnsupportedArchitectureError for what
    circuit-tracer cannot express (TopK / gated / matryoshka features, a CLT skip path, per-layer hooks that
    differ in more than the layer index)."""
    import yaml

    ins = {h.replace(f"blocks.{i}.", "blocks.{l}.", 1) for i, h in enumerate(ts.input_hooks)}
    outs = {h.replace(f"blocks.{i}.", "blocks.{l}.", 1) for i, h in enumerate(ts.output_hooks)}
    if len(ins) != 1 or len(outs) != 1:
        raise UnsupportedArchitectureError("circuit-tracer needs one input and one output hook name for every "
                                           "layer; these transcoders use several.")
    folder.mkdir(parents=True, exist_ok=True)
    kind = "cross_layer_transcoder" if ts.cross_layer else "transcoder_set"
    if ts.cross_layer:
        _write_clt(ts.clt, folder)
    else:
        for i, c in enumerate(ts.coders):
            atomic_write_bytes(folder / f"layer_{i}.safetensors", safetensors_bytes(_layer_tensors(c, i), None))
    config = {"model_kind": kind, "model_name": ts.model_name,
              "feature_input_hook": _ct_hook(ts.input_hooks[0]), "feature_output_hook": _ct_hook(ts.output_hooks[0])}
    atomic_write_bytes(folder / CONFIG, yaml.safe_dump(config, sort_keys=False).encode())
    return folder


def _layer_tensors(coder, layer: int) -> dict[str, torch.Tensor]:
    import copy

    c = copy.deepcopy(coder).fold_scales()
    arch = c.cfg.arch
    if arch not in ("relu", "jumprelu", "batchtopk"):
        raise UnsupportedArchitectureError(
            f"Layer {layer} is a {arch} transcoder; circuit-tracer reads ReLU and JumpReLU transcoders only "
            "(train with arch='jumprelu' to export, or keep mechscope's own format).")
    t = {"W_enc": c.W_enc.detach().T.contiguous(), "W_dec": c.W_dec.detach(), "b_enc": c.b_enc.detach(),
         "b_dec": c.b_dec.detach()}
    if arch == "jumprelu":
        t["activation_function.threshold"] = log_to_threshold(c.log_threshold.detach())
    elif arch == "batchtopk":  # relu(pre) * (pre > t) with t >= 0 is pre * (pre > t)
        t["activation_function.threshold"] = c.threshold.detach().clamp_min(0).to(c.W_enc.dtype)
    if c.cfg.skip:
        t["W_skip"] = c.W_skip.detach()
    return t


def _write_clt(clt, folder: Path) -> None:
    import copy

    c = copy.deepcopy(clt).fold_scales()
    if c.cfg.arch not in ("relu", "jumprelu") or c.cfg.skip:
        raise UnsupportedArchitectureError(
            f"circuit-tracer reads ReLU / JumpReLU CLTs without a skip path; this one is {c.cfg.arch}"
            f"{' with skip' if c.cfg.skip else ''} (keep mechscope's own format).")
    for i in range(c.cfg.n_layers):
        enc = {f"W_enc_{i}": c.W_enc[i].detach().T.contiguous(), f"b_enc_{i}": c.b_enc[i].detach(),
               f"b_dec_{i}": c.b_dec[i].detach()}
        if c.cfg.arch == "jumprelu":
            enc[f"threshold_{i}"] = log_to_threshold(c.log_threshold[i].detach())
        atomic_write_bytes(folder / f"W_enc_{i}.safetensors", safetensors_bytes(enc, None))
        atomic_write_bytes(folder / f"W_dec_{i}.safetensors",
                           safetensors_bytes({f"W_dec_{i}": c.W_dec[i].detach()}, None))


__all__ = ["CONFIG", "LOOKED_FOR", "detect", "hook_template", "read", "write"]
