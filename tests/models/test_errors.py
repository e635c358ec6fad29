"""Bad input gives a typed mechscope error whose message says what was wrong and what to do."""

from __future__ import annotations

import json

import pytest
import torch

from mechscope.errors import (
    ContextLengthError,
    CorruptFileError,
    HookNameError,
    InputError,
    MechscopeError,
    ModelNotFoundError,
    NonFiniteError,
    UnsupportedArchitectureError,
)
from mechscope.models.loading import from_pretrained


def test_unknown_hook_name(tiny_gpt2):
    _, _, model = tiny_gpt2
    with pytest.raises(HookNameError, match=r"Unknown hook name 'blocks.1.hook_mlp_output'.*blocks.1.hook_mlp_out"):
        model.add_hook("blocks.1.hook_mlp_output", lambda x, hook: x)
    assert issubclass(HookNameError, MechscopeError)


def test_unsupported_architecture_names_supported_ones(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "t5", "architectures": ["T5ForConditionalGeneration"],
                                                      "d_model": 8, "num_layers": 1, "num_heads": 1}))
    with pytest.raises(UnsupportedArchitectureError, match=r"T5ForConditionalGeneration.*Supported:.*LlamaForCausalLM"):
        from_pretrained(str(tmp_path))


@pytest.mark.parametrize(
    "tokens, match",
    [
        (torch.zeros(1, 2, 3, dtype=torch.long), r"shape \[batch, pos\]"),
        (torch.zeros(1, 4), "integer tensor"),
        (torch.full((1, 4), 10_000), r"Token ids must be in \[0, 64\)"),
        (torch.full((1, 4), -1), r"Token ids must be in"),
        (torch.zeros(1, 0, dtype=torch.long), "Empty input"),
        ([1, 2, 3], "text or a LongTensor"),
    ],
)
def test_bad_tokens(tiny_gpt2, tokens, match):
    _, _, model = tiny_gpt2
    with pytest.raises(InputError, match=match):
        model(tokens)


def test_empty_text(tiny_gpt2):
    _, _, model = tiny_gpt2
    with pytest.raises(InputError, match="Empty prompt"):
        model("", prepend_bos=False)
    with pytest.raises(InputError):
        model([])


def test_too_long_sequence(tiny_gpt2):
    _, _, model = tiny_gpt2
    with pytest.raises(ContextLengthError, match=r"exceeds the model's context of 32.*truncate"):
        model(torch.ones(1, 33, dtype=torch.long))
    with pytest.raises(ContextLengthError):
        model.generate(torch.ones(1, 30, dtype=torch.long), 5)
    tokens = model.to_tokens(" ".join(["cat"] * 40), truncate=True)
    assert tokens.shape[1] == 32


def test_mismatched_attention_mask(tiny_gpt2):
    _, _, model = tiny_gpt2
    tokens = torch.ones(2, 5, dtype=torch.long)
    with pytest.raises(InputError, match=r"attention_mask must have shape \(2, 5\)"):
        model(tokens, attention_mask=torch.ones(2, 4, dtype=torch.long))
    with pytest.raises(InputError, match="only 0 and 1"):
        model(tokens, attention_mask=torch.full((2, 5), 2))
    with pytest.raises(InputError, match="no real token"):
        model(tokens, attention_mask=torch.tensor([[1, 1, 1, 1, 1], [0, 0, 0, 0, 0]]))


def test_nan_check_is_opt_in(tiny_gpt2):
    _, _, model = tiny_gpt2
    nan_hook = [("blocks.0.hook_resid_mid", lambda x, hook: x * float("nan"))]
    out = model.run_with_hooks(torch.ones(1, 4, dtype=torch.long), fwd_hooks=nan_hook)  # off: no raise
    assert torch.isnan(out).all()
    model.check_finite = True
    try:
        with pytest.raises(NonFiniteError, match="NaN or inf"):
            model.run_with_hooks(torch.ones(1, 4, dtype=torch.long), fwd_hooks=nan_hook)
    finally:
        model.check_finite = False


def test_missing_and_corrupt_weight_files(tiny_gpt2, tmp_path):
    _, folder, _ = tiny_gpt2
    (tmp_path / "config.json").write_text((folder / "config.json").read_text())
    with pytest.raises(ModelNotFoundError, match="No weights"):
        from_pretrained(str(tmp_path))
    data = (folder / "model.safetensors").read_bytes()
    (tmp_path / "model.safetensors").write_bytes(data[: len(data) // 2])  # truncated download
    with pytest.raises(CorruptFileError, match="safetensors"):
        from_pretrained(str(tmp_path))


def test_missing_tensor_is_named(tiny_gpt2, tmp_path):
    from safetensors.torch import load_file, save_file

    _, folder, _ = tiny_gpt2
    (tmp_path / "config.json").write_text((folder / "config.json").read_text())
    sd = load_file(str(folder / "model.safetensors"))
    sd.pop("transformer.h.1.mlp.c_fc.weight")
    save_file(sd, str(tmp_path / "model.safetensors"))
    with pytest.raises(CorruptFileError, match="h.1.mlp.c_fc.weight"):
        from_pretrained(str(tmp_path))


def test_wrong_tensor_shape_is_named(tiny_gpt2, tmp_path):
    from safetensors.torch import load_file, save_file

    _, folder, _ = tiny_gpt2
    cfg = json.loads((folder / "config.json").read_text())
    cfg["n_inner"] = 300  # config disagrees with the weights
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    save_file(load_file(str(folder / "model.safetensors")), str(tmp_path / "model.safetensors"))
    with pytest.raises(CorruptFileError, match=r"mlp.up.weight has shape"):
        from_pretrained(str(tmp_path))


def test_unknown_model_name_offline():
    with pytest.raises(ModelNotFoundError, match=r"hf download some-org/some-model"):
        from_pretrained("some-org/some-model")
    with pytest.raises(ModelNotFoundError, match="built-in"):
        from_pretrained("not-a-model-anywhere")
