"""Kill-and-rerun: a harvest or an SAE training SIGKILLed at an exact point, then rerun, ends with the
very bytes of an uninterrupted run, and leaves no temp file behind.

The kill points are hit deterministically with the test-only fault hook MECHSCOPE_TEST_KILL_AT
(mechscope/faults.py): `write:<file>` dies with that file's bytes in its temp file (not yet renamed),
`step:<s>` dies after training step s, before anything of it is saved.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from mechscope.data.harvest import HarvestConfig, harvest

H = "blocks.1.hook_resid_post"
HARVEST = ["--hooks", H, "--tokens", "1200", "--context-len", "32", "--batch-size", "4", "--shard-tokens", "200",
           "--seed", "2", "--no-progress"]


def _env(kill_at: str | None = None) -> dict[str, str]:
    env = os.environ | {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join(sys.path)}
    env.pop("MECHSCOPE_TEST_KILL_AT", None)
    if kill_at:
        env["MECHSCOPE_TEST_KILL_AT"] = kill_at
    return env


def _cli(*args: str, kill_at: str | None = None) -> subprocess.CompletedProcess:
    proc = subprocess.run([sys.executable, "-m", "mechscope.cli", *args], env=_env(kill_at), capture_output=True,
                          text=True, timeout=300)
    if kill_at is None:
        assert proc.returncode == 0, proc.stderr[-3000:]
    else:
        assert proc.returncode == -signal.SIGKILL, f"not killed at {kill_at}: rc {proc.returncode}\n{proc.stderr[-3000:]}"
    return proc


def folder_bytes(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def temp_files(*folders: Path) -> list[str]:
    return [str(p) for f in folders if f.exists() for p in f.rglob("*.tmp")]


@pytest.fixture(scope="module")
def model_folder(tiny_lm_folder):
    return tiny_lm_folder[0]


@pytest.fixture(scope="module")
def clean_store(model_folder, tmp_path_factory):
    out = tmp_path_factory.mktemp("clean") / "store"
    _cli("harvest", "--model", str(model_folder), "--out", str(out), *HARVEST)
    return out


@pytest.mark.parametrize("kill_at", [
    "write:shard_00000.safetensors",  # during the first shard write: no manifest yet, a lone temp file
    "write:stats.safetensors",  # first shard renamed, its stats being written, no manifest yet
    "write:shard_00004.safetensors",  # mid-run
    "write:manifest.json@3",  # during the third manifest write
])
def test_killed_harvest_reruns_to_the_same_bytes(model_folder, clean_store, tmp_path, kill_at):
    out = tmp_path / "store"
    _cli("harvest", "--model", str(model_folder), "--out", str(out), *HARVEST, kill_at=kill_at)
    assert temp_files(out), "the kill should leave a temp file behind (the point under test)"
    _cli("harvest", "--model", str(model_folder), "--out", str(out), *HARVEST)
    assert not temp_files(out)
    assert folder_bytes(out) == folder_bytes(clean_store)


# ------------------------------------------------------------------------------ train-sae


@pytest.fixture(scope="module")
def store(model_folder, tmp_path_factory):
    from mechscope import HookedTransformer

    out = tmp_path_factory.mktemp("sae-store")
    model = HookedTransformer.from_pretrained(str(model_folder))
    harvest(model, HarvestConfig(hooks=[H], n_tokens=2000, context_len=32, batch_size=8, shard_tokens=600, seed=1),
            out, progress=False)
    return out


def _train_args(model_folder: Path, store: Path, out: Path, ckpt: Path) -> list[str]:
    return ["train-sae", "--model", str(model_folder), "--hook", H, "--store", str(store), "--out", str(out),
            "--latents", "32", "--k", "4", "--steps", "60", "--batch-size", "64", "--checkpoint-dir", str(ckpt),
            "--checkpoint-every", "20", "--eval-tokens", "256", "--eval-contexts", "2", "--no-progress"]


@pytest.fixture(scope="module")
def clean_sae(model_folder, store, tmp_path_factory):
    root = tmp_path_factory.mktemp("clean-sae")
    _cli(*_train_args(model_folder, store, root / "sae", root / "ckpt"))
    return root


SLOW = pytest.mark.slow  # two train-sae processes each (~10 s idle, 30 s on a busy 2-core machine)


@pytest.mark.parametrize("kill_at", [
    "step:47",  # mid-run, after the checkpoint at step 40
    pytest.param("step:7", marks=SLOW),  # before the first checkpoint (step 20): the rerun starts over
    pytest.param("write:step-00000040.safetensors", marks=SLOW),  # while writing the second checkpoint
    pytest.param("write:sae.safetensors", marks=SLOW),  # trained, while saving the coder
])
def test_killed_train_sae_reruns_to_the_same_bytes(model_folder, store, clean_sae, tmp_path, kill_at):
    out, ckpt = tmp_path / "sae", tmp_path / "ckpt"
    _cli(*_train_args(model_folder, store, out, ckpt), kill_at=kill_at)
    if kill_at.startswith("write:"):
        assert temp_files(out, ckpt), "the kill should leave a temp file behind (the point under test)"
    _cli(*_train_args(model_folder, store, out, ckpt))
    assert not temp_files(out, ckpt)
    assert folder_bytes(out) == folder_bytes(clean_sae / "sae")
    assert checkpoint_contents(ckpt) == checkpoint_contents(clean_sae / "ckpt")


def checkpoint_contents(folder: Path) -> dict[str, bytes]:
    """state.json's bytes and the bytes of every tensor of the final checkpoint but the torch RNG state: a
    fresh process does not start from a fixed global RNG state (two uninterrupted runs differ there too),
    and no result depends on it (the coder's bytes are compared whole)."""
    from safetensors.torch import load_file

    out = {"state.json": (folder / "state.json").read_bytes()}
    files = list(folder.glob("step-*.safetensors"))
    assert len(files) == 1, files
    for k, v in load_file(files[0]).items():
        if k != "rng/torch":
            out[f"{files[0].name}:{k}"] = v.numpy().tobytes()
    return out
