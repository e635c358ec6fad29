"""Loading paths: local folders of any name, .bin via weights_only, shards, dtype, no pickle."""

from __future__ import annotations

import json
import os
import pickle

import pytest
import torch

from mechscope.errors import CorruptFileError
from mechscope.models.loading import from_hf, from_pretrained

from parity import logprob_diff


class _Exploit:
    """Unpickling this would create a file: proof that code ran."""

    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_malicious_pickle_is_refused(tiny_gpt2, tmp_path):
    _, folder, _ = tiny_gpt2
    (tmp_path / "config.json").write_text((folder / "config.json").read_text())
    marker = tmp_path / "pwned"
    with open(tmp_path / "pytorch_model.bin", "wb") as f:
        pickle.dump({"transformer.wte.weight": _Exploit(str(marker))}, f)
    with pytest.raises(CorruptFileError, match="never unpickles"):
        from_pretrained(str(tmp_path))
    assert not marker.exists()
    # the same attack inside torch's zip format is refused too
    torch.save({"x": _Exploit(str(marker))}, tmp_path / "pytorch_model.bin")
    with pytest.raises(CorruptFileError):
        from_pretrained(str(tmp_path))
    assert not marker.exists()


def test_plain_bin_checkpoint_loads_with_weights_only(tiny_gpt2, tmp_path):
    hf, folder, model = tiny_gpt2
    (tmp_path / "config.json").write_text((folder / "config.json").read_text())
    torch.save(hf.state_dict(), tmp_path / "pytorch_model.bin")
    loaded = from_pretrained(str(tmp_path), tokenizer=False)
    tokens = torch.arange(4, 14)[None]
    assert torch.equal(loaded(tokens), model(tokens))


def test_any_folder_name_and_sharded_safetensors(tiny_gpt2, tmp_path):
    hf, _, model = tiny_gpt2
    odd = tmp_path / "my weird model name (v2)"
    hf.save_pretrained(odd, max_shard_size="20KB")  # many shards + index
    assert (odd / "model.safetensors.index.json").exists()
    loaded = from_pretrained(str(odd))
    tokens = torch.arange(4, 14)[None]
    assert torch.equal(loaded(tokens), model(tokens))


def test_from_hf_matches_from_pretrained(tiny_gpt2):
    hf, _, model = tiny_gpt2
    converted = from_hf(hf)
    assert logprob_diff(hf, converted, 64, "left") < 1e-4
    tokens = torch.arange(4, 14)[None]
    assert torch.equal(converted(tokens), model(tokens))
    # weights are copies in our layout: editing ours leaves the HF model untouched
    with torch.no_grad():
        converted.blocks[0].mlp.up.weight.zero_()
        converted.embed.weight.zero_()  # stored untransposed: the easy one to share by mistake
    assert hf.transformer.h[0].mlp.c_fc.weight.abs().sum() > 0
    assert hf.transformer.wte.weight.abs().sum() > 0


def test_loads_straight_into_dtype_and_ties(tiny_gpt2):
    _, folder, _ = tiny_gpt2
    model = from_pretrained(str(folder), dtype=torch.bfloat16)
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    assert not any(p.is_meta for p in model.parameters())
    assert not any(b.is_meta for b in model.buffers())
    assert model.unembed.weight is model.embed.weight  # tied as in the checkpoint: one copy
    assert model(torch.arange(4, 10)[None]).dtype == torch.bfloat16


def test_tl_shaped_weight_views_share_storage(tiny_llama):
    _, _, model = tiny_llama
    c = model.cfg
    attn = model.blocks[0].attn
    assert attn.W_Q.shape == (c.n_heads, c.d_model, c.d_head)
    assert attn.W_K.shape == (c.n_kv_heads, c.d_model, c.d_head)
    assert attn.W_O.shape == (c.n_heads, c.d_head, c.d_model)
    assert model.W_U.shape == (c.d_model, c.d_vocab)
    assert model.W_in.shape == (c.n_layers, c.d_model, c.d_mlp)
    assert attn.W_Q.data_ptr() == attn.qkv.weight.data_ptr()  # a view, not a copy


def test_bos_follows_tokenizer_default_and_is_explicit(tiny_gpt2):
    _, _, model = tiny_gpt2
    bos = model.tokenizer.bos_token_id
    assert model.default_prepend_bos()
    assert model.to_tokens("the cat")[0, 0].item() == bos
    assert model.to_tokens("the cat", prepend_bos=False)[0, 0].item() != bos
    assert model.to_tokens("the cat", prepend_bos=True).shape[1] == 3
    assert model.to_str_tokens("the cat") == ["<s>", "the", "cat"]
    tokens, mask = model.to_tokens(["the cat sat", "a dog"], padding_side="left", return_mask=True)
    assert mask.tolist() == [[1, 1, 1, 1], [0, 1, 1, 1]]
    assert model.to_string(tokens[1, 1:]) == "<s> a dog"


def test_config_json_roundtrip(tiny_llama):
    from mechscope.models.config import ModelConfig

    _, _, model = tiny_llama
    again = ModelConfig.from_dict(json.loads(model.cfg.to_json()))
    assert again == model.cfg
