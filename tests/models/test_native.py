"""Native model folders (zoo models, processed models): save_pretrained -> from_pretrained is exact."""

from __future__ import annotations

import json

import pytest
import torch

from mechscope import HookedTransformer, ModelConfig
from mechscope.errors import CorruptFileError

from conftest import make_tiny_lm


def attn_only_model(seed: int = 0) -> HookedTransformer:
    cfg = ModelConfig(d_model=32, n_layers=2, n_heads=4, d_head=8, d_mlp=0, d_vocab=50, n_ctx=16, attn_only=True)
    return HookedTransformer(cfg).init_weights(seed)


def test_attn_only_blocks_have_no_mlp_and_decompose_exactly():
    m = attn_only_model()
    assert not any("mlp" in n or "resid_mid" in n or "ln2" in n for n in m.hook_names)
    tokens = torch.randint(0, 50, (2, 10), generator=torch.Generator().manual_seed(0))
    _, cache = m.run_with_cache(tokens)
    parts = cache.decompose_resid()  # embed, pos_embed, attn_out of each layer
    assert parts.shape[0] == 4
    torch.testing.assert_close(parts.sum(0), cache["blocks.1.hook_resid_post"], rtol=0, atol=1e-5)


def test_init_weights_is_deterministic():
    a, b, c = attn_only_model(0), attn_only_model(0), attn_only_model(1)
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values(), strict=True))
    assert not torch.equal(a.W_E, c.W_E)


@pytest.mark.parametrize("process", [False, True])
def test_save_and_reload_is_exact(tmp_path, process):
    m = attn_only_model()
    if process:
        m.process_weights()
    m.save_pretrained(tmp_path, extra={"recipe": "test"})
    back = HookedTransformer.from_pretrained(str(tmp_path))
    tokens = torch.randint(0, 50, (2, 10), generator=torch.Generator().manual_seed(0))
    assert torch.equal(m(tokens), back(tokens))
    assert back.cfg.processing == m.cfg.processing and back.cfg.attn_only
    assert json.loads((tmp_path / "config.json").read_text())["mechscope_extra"] == {"recipe": "test"}
    assert not any(p.name.endswith(".tmp") for p in tmp_path.iterdir())


def test_tokenizer_and_tied_embeddings_round_trip(tmp_path):
    m = make_tiny_lm(0)
    m.save_pretrained(tmp_path)
    back = HookedTransformer.from_pretrained(str(tmp_path))
    assert back.unembed.weight is back.embed.weight
    assert back.to_tokens("The capital of France").tolist() == m.to_tokens("The capital of France").tolist()
    assert torch.equal(m("Hello there"), back("Hello there"))


def test_corrupt_native_folders_are_refused(tmp_path):
    from safetensors.torch import load_file, save_file

    m = attn_only_model()
    m.save_pretrained(tmp_path)
    sd = load_file(tmp_path / "model.safetensors")
    sd.pop("blocks.1.attn.o.weight")
    save_file(sd, tmp_path / "model.safetensors")
    with pytest.raises(CorruptFileError, match="blocks.1.attn.o.weight"):
        HookedTransformer.from_pretrained(str(tmp_path))
    cfg = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps(cfg | {"format_version": 99}))
    with pytest.raises(CorruptFileError, match="newer mechscope"):
        HookedTransformer.from_pretrained(str(tmp_path))
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(CorruptFileError, match="not valid JSON"):
        HookedTransformer.from_pretrained(str(tmp_path))
