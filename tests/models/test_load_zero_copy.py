"""Loading a local folder in its stored dtype copies nothing that already fits, and never writes to the file.

Why it matters: a per-tensor `empty + copy_` made loading 3-8x slower than plain transformers; the
parameters are now the private (copy-on-write) file mapping itself, so an in-place edit of a weight
(process_weights, an ablation) must land in private memory, never in the user's checkpoint.
"""

from __future__ import annotations

import hashlib
import sys
from pathlib import Path

import pytest
import torch

from mechscope.models.loading import from_pretrained
from mechscope.models.native import save_pretrained


def _sha(folder: Path) -> dict[str, str]:
    return {f.name: hashlib.sha256(f.read_bytes()).hexdigest() for f in sorted(folder.glob("*.safetensors"))}


def _count_copies(monkeypatch) -> list[tuple[int, ...]]:
    """Record the shape of every Tensor.copy_ into real memory from now on (building the model on the meta
    device runs nn.Linear's initialisers, whose meta-tensor copy_ calls move no data)."""
    calls: list[tuple[int, ...]] = []
    real = torch.Tensor.copy_

    def counting(self, src, *args, **kwargs):
        if not self.is_meta:
            calls.append(tuple(self.shape))
        return real(self, src, *args, **kwargs)

    monkeypatch.setattr(torch.Tensor, "copy_", counting)
    return calls


def _mapped_ranges(folder: Path) -> list[tuple[int, int]]:
    """Address ranges of this process's mappings of the folder's safetensors files (Linux /proc)."""
    names = {str(f.resolve()) for f in folder.glob("*.safetensors")}
    ranges = []
    for line in Path("/proc/self/maps").read_text().splitlines():
        parts = line.split(maxsplit=5)
        if len(parts) == 6 and parts[5] in names:
            lo, hi = (int(x, 16) for x in parts[0].split("-"))
            ranges.append((lo, hi))
    return ranges


@pytest.mark.parametrize("family", ["tiny_gpt2", "tiny_llama"])
def test_stored_dtype_load_copies_nothing(family, request, monkeypatch):
    _, folder, _ = request.getfixturevalue(family)
    calls = _count_copies(monkeypatch)
    model = from_pretrained(str(folder), tokenizer=False)  # stored fp32, asked fp32
    assert calls == []  # Llama's fused qkv is one torch.cat (unavoidable), not a copy_
    if sys.platform.startswith("linux"):
        ranges = _mapped_ranges(folder)
        assert ranges, "the safetensors file should be memory-mapped while the model uses it"
        in_file = [n for n, p in model.named_parameters()
                   if any(lo <= p.data_ptr() < hi for lo, hi in ranges)]
        # every parameter but the concatenated qkv is the file's own memory
        want = {n for n, _ in model.named_parameters() if not (family == "tiny_llama" and "attn.qkv" in n)}
        assert set(in_file) == want


def test_dtype_conversion_still_copies_once_per_tensor(tiny_gpt2, monkeypatch):
    _, folder, model32 = tiny_gpt2
    calls = _count_copies(monkeypatch)
    model = from_pretrained(str(folder), tokenizer=False, dtype=torch.bfloat16)
    n_params = len(dict(model.named_parameters()))  # the tied unembedding is the embedding: not listed twice
    assert len(calls) == n_params
    # GPT-2's Conv1D weights keep their transposed layout whether adopted (fp32) or copied (bf16)
    for (name, p), p32 in zip(model.named_parameters(), model32.parameters(), strict=True):
        assert p.stride() == p32.stride(), name


def test_in_place_edits_never_reach_the_file(tiny_gpt2):
    hf, folder, _ = tiny_gpt2
    before = _sha(folder)
    tokens = torch.arange(4, 14)[None]
    model = from_pretrained(str(folder), tokenizer=False)
    reference = model(tokens).detach()
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(-2.0).add_(1.0)
    model.process_weights()  # folds and centres weights (partly in place)
    assert _sha(folder) == before
    again = from_pretrained(str(folder), tokenizer=False)
    assert torch.equal(again(tokens), reference)
    assert not torch.equal(model.embed.weight, again.embed.weight)


def test_native_folder_is_adopted_and_can_be_resaved_in_place(tiny_llama, tmp_path, monkeypatch):
    _, _, model = tiny_llama
    folder = save_pretrained(model, tmp_path / "native")
    calls = _count_copies(monkeypatch)
    loaded = from_pretrained(str(folder), tokenizer=False)
    assert calls == []
    before = _sha(folder)
    with torch.no_grad():
        loaded.blocks[0].mlp.down.weight.zero_()
    assert _sha(folder) == before
    # saving over the very file the parameters map is safe: the new file replaces it atomically
    save_pretrained(loaded, folder)
    tokens = torch.arange(4, 14)[None]
    assert torch.equal(from_pretrained(str(folder), tokenizer=False)(tokens), loaded(tokens))
    assert not torch.equal(loaded(tokens), model(tokens))
