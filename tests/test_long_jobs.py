"""Long jobs (issue 13, defects 1, 2, 3, 9, bit-rot, NaN): they never hang, resume from any leftover,
checkpoint by flag and by time, refuse other data, refuse damaged stores and NaN results."""

from __future__ import annotations

import json
import threading
from pathlib import Path

import pytest
import torch

from mechscope import cli
from mechscope.data.harvest import HarvestConfig, harvest, read_manifest
from mechscope.data.store import ActivationStore
from mechscope.errors import CheckpointMismatchError, CorruptFileError, InputError, NonFiniteError
from mechscope.sae import io as sae_io
from mechscope.sae.metrics import evaluate, splice_metrics
from mechscope.sae.train import train

H = "blocks.1.hook_resid_post"


def cfg(**kw) -> HarvestConfig:
    return HarvestConfig(**({"hooks": [H], "n_tokens": 600, "context_len": 32, "batch_size": 4, "shard_tokens": 200,
                             "seed": 5} | kw))


def store_bytes(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


def no_hang(fn, seconds: float = 60.0):
    """Run fn in a thread; fail (instead of hanging the suite) if it takes longer than `seconds`."""
    box: dict = {}

    def run():
        try:
            box["value"] = fn()
        except BaseException as e:  # noqa: BLE001 - re-raised in the test thread
            box["error"] = e

    t = threading.Thread(target=run, daemon=True)
    t.start()
    t.join(seconds)
    assert not t.is_alive(), f"hung for more than {seconds} s"
    if "error" in box:
        raise box["error"]
    return box.get("value")


@pytest.fixture(scope="module")
def model(tiny_lm_folder):
    return tiny_lm_folder[1]


@pytest.fixture(scope="module")
def store_dir(model, tmp_path_factory):
    out = tmp_path_factory.mktemp("store")
    harvest(model, cfg(), out, progress=False)
    return out


# ------------------------------------------------------------------------------ defect 1: no hang


def test_a_store_smaller_than_a_batch_is_a_typed_error_not_a_hang(model, store_dir):
    store = ActivationStore.open(store_dir, model)
    with pytest.raises(InputError, match=r"holds 600 rows, fewer than one batch of 4,096.*--batch-size"):
        no_hang(lambda: train(store, n_latents=16, k=4, steps=5, batch_size=4096, progress=False))
    with pytest.raises(InputError, match="fewer than one batch"):
        no_hang(lambda: next(store.batches(32768, drop_last=True, epochs=1 << 40)))
    assert len(list(store.batches(4096))) == 1  # a single pass keeps serving the partial batch


def test_train_sae_cli_on_a_small_store_exits_2_with_the_advice(model, store_dir, tiny_lm_folder, tmp_path, capsys):
    rc = no_hang(lambda: cli.main(["train-sae", "--model", str(tiny_lm_folder[0]), "--hook", H, "--store",
                                   str(store_dir), "--out", str(tmp_path / "sae"), "--latents", "16", "--k", "4",
                                   "--steps", "20", "--no-progress"]))
    assert rc == 2 and "lower the batch size (--batch-size)" in capsys.readouterr().err


# ------------------------------------------------------------------------------ defect 2: leftovers


def test_a_lone_temp_file_of_the_first_shard_never_blocks_the_rerun(model, store_dir, tmp_path):
    out = tmp_path / "s"
    out.mkdir()
    (out / ".shard_00000.safetensors.abc123.tmp").write_bytes(b"\0" * 1000)  # killed while writing shard 0
    harvest(model, cfg(), out, progress=False)
    assert store_bytes(out) == store_bytes(store_dir)  # cleaned, and the same bytes


def test_stale_temp_files_are_removed_on_resume_and_refusals_mention_overwrite(model, store_dir, tmp_path):
    out = tmp_path / "s"
    harvest(model, cfg(), out, progress=False)
    (out / ".manifest.json.zz.tmp").write_text("{")
    harvest(model, cfg(), out, progress=False)  # finished: reused, and the leftover is gone
    assert not list(out.glob("*.tmp"))
    with pytest.raises(Exception, match="--overwrite"):
        harvest(model, cfg(seed=6), out, progress=False)
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep")
    with pytest.raises(InputError, match="--overwrite deletes only"):
        harvest(model, cfg(), tmp_path / "mine", progress=False, overwrite=True)
    assert (tmp_path / "mine" / "notes.txt").read_text() == "keep"


# ------------------------------------------------------------------------------ bit-rot, damaged manifests


def test_bit_rot_inside_a_shard_is_detected_by_its_checksum(model, store_dir, tmp_path):
    import shutil

    out = tmp_path / "s"
    shutil.copytree(store_dir, out)
    assert all(len(e["sha256"]) == 64 for e in read_manifest(out)["shards"])
    shard = out / "shard_00001.safetensors"
    data = bytearray(shard.read_bytes())
    data[-5] ^= 0x10  # one flipped bit in the last activation, same size
    shard.write_bytes(bytes(data))
    store = ActivationStore.open(out, model)
    with pytest.raises(CorruptFileError, match="checksum"):
        store.load(H)
    with pytest.raises(CorruptFileError, match="checksum"):
        list(ActivationStore.open(out, model).batches(64))
    with pytest.raises(CorruptFileError, match="--overwrite"):
        ActivationStore.open(out, model).verify()


@pytest.mark.parametrize("damage", ["drop:shards", "drop:tokens", "drop:config", "drop:shard.bytes", "stats"])
def test_a_damaged_store_is_a_corrupt_file_error_never_a_key_error(store_dir, tmp_path, damage):
    import shutil

    out = tmp_path / "s"
    shutil.copytree(store_dir, out)
    if damage == "stats":
        (out / "stats.safetensors").unlink()
    else:
        m = json.loads((out / "manifest.json").read_text())
        key = damage.split(":")[1]
        if key == "shard.bytes":
            del m["shards"][0]["bytes"]
        else:
            del m[key]
        (out / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(CorruptFileError, match="re-harvest it .*--overwrite"):
        ActivationStore.open(out)


# ------------------------------------------------------------------------------ defect 3 and 9: checkpoints


def test_train_sae_checkpoints_by_flag_and_by_time(monkeypatch):
    seen = {}

    def fake_train(source, **kw):
        seen.update(kw)
        raise InputError("stop here")

    import sys

    monkeypatch.setattr(sys.modules["mechscope.sae.train"], "train", fake_train)
    monkeypatch.setattr("mechscope.models.loading.load_model", lambda *a, **k: None)
    base = ["train-sae", "--hook", H, "--out", "x", "--checkpoint-dir", "c"]
    assert cli.main(base + ["--checkpoint-every", "50"]) == 2
    assert seen["checkpoint_every"] == 50 and seen["checkpoint_seconds"] == 300
    cli.main(base + ["--checkpoint-seconds", "0"])
    assert seen["checkpoint_seconds"] is None


def test_timed_checkpoints_come_before_the_step_interval(tmp_path, monkeypatch):
    x = torch.randn(512, 8, generator=torch.Generator().manual_seed(0))
    clock = iter(range(0, 10_000, 7))  # every step "takes" 7 s of wall time
    monkeypatch.setattr("mechscope.training.time.monotonic", lambda: next(clock))
    train(x, n_latents=16, k=2, steps=30, batch_size=64, checkpoint_dir=tmp_path, checkpoint_every=1000,
          checkpoint_seconds=20, stop_after=10, progress=False)
    assert json.loads((tmp_path / "state.json").read_text())["step"] == 10
    assert not list(tmp_path.glob("*.tmp"))


def test_stale_checkpoint_temp_files_are_removed_by_the_next_save(tmp_path):
    x = torch.randn(512, 8, generator=torch.Generator().manual_seed(0))
    tmp_path.mkdir(exist_ok=True)
    (tmp_path / ".step-00000005.safetensors.q1.tmp").write_bytes(b"\0" * 4096)
    train(x, n_latents=16, k=2, steps=10, batch_size=64, checkpoint_dir=tmp_path, checkpoint_every=5, progress=False)
    assert not list(tmp_path.glob("*.tmp"))


def test_resume_refuses_another_store_naming_both(model, store_dir, tmp_path):
    other = tmp_path / "other"
    harvest(model, cfg(seed=9), other, progress=False)
    a, b = ActivationStore.open(store_dir, model), ActivationStore.open(other, model)
    ckpt = tmp_path / "ckpt"
    train(a, n_latents=16, k=2, steps=20, batch_size=64, checkpoint_dir=ckpt, checkpoint_every=5, stop_after=5,
          progress=False)
    with pytest.raises(CheckpointMismatchError) as err:
        train(b, n_latents=16, k=2, steps=20, batch_size=64, checkpoint_dir=ckpt, checkpoint_every=5,
              progress=False)
    msg = str(err.value)
    assert str(store_dir) in msg and str(other) in msg and "seed 5" in msg and "seed 9" in msg


def test_resume_accepts_the_same_store_in_another_folder(model, store_dir, tmp_path):
    import shutil

    moved = tmp_path / "moved"
    shutil.copytree(store_dir, moved)
    ckpt = tmp_path / "ckpt"
    kw = dict(n_latents=16, k=2, steps=10, batch_size=64, checkpoint_dir=ckpt, checkpoint_every=5, progress=False)
    train(ActivationStore.open(store_dir, model), stop_after=5, **kw)
    resumed = train(ActivationStore.open(moved, model), **kw)
    straight = train(ActivationStore.open(store_dir, model), n_latents=16, k=2, steps=10, batch_size=64,
                     progress=False)
    assert torch.equal(resumed.W_dec, straight.W_dec)


def test_resume_refuses_other_tensors():
    x = torch.randn(512, 8, generator=torch.Generator().manual_seed(0))
    y = torch.randn(512, 8, generator=torch.Generator().manual_seed(1))  # other data, same shape
    import tempfile

    with tempfile.TemporaryDirectory() as d:
        train(x, n_latents=16, k=2, steps=10, batch_size=64, checkpoint_dir=d, stop_after=5, progress=False)
        with pytest.raises(CheckpointMismatchError, match="tensors x"):
            train(y, n_latents=16, k=2, steps=10, batch_size=64, checkpoint_dir=d, progress=False)


# ------------------------------------------------------------------------------ NaN is an error, not a number


@pytest.fixture(scope="module")
def coder(model, store_dir):
    return train(ActivationStore.open(store_dir, model), n_latents=16, k=2, steps=10, batch_size=64, progress=False)


def test_an_sae_with_nan_weights_is_refused(coder, model, store_dir):
    import copy

    bad = copy.deepcopy(coder)
    with torch.no_grad():
        bad.W_dec[3, 1] = float("nan")
    with pytest.raises(NonFiniteError, match="NaN/inf weights.*W_dec"):
        evaluate(bad, ActivationStore.open(store_dir, model), n_tokens=200)
    with pytest.raises(NonFiniteError, match="NaN/inf weights"):
        splice_metrics(bad, model, n_contexts=2)


def test_a_store_with_nan_rows_is_refused(coder, model):
    x = torch.randn(300, coder.cfg.d_in, generator=torch.Generator().manual_seed(1))
    x[17, 4] = float("nan")
    with pytest.raises(NonFiniteError, match="contain NaN/inf.*1 of"):
        evaluate(coder, x, n_tokens=300)


def test_eval_sae_cli_exits_2_on_nan_weights(coder, tiny_lm_folder, store_dir, tmp_path, capsys):
    import copy

    bad = copy.deepcopy(coder)
    with torch.no_grad():
        bad.b_enc.fill_(float("nan"))
    sae_io.save(bad, tmp_path / "bad")
    rc = cli.main(["eval-sae", str(tmp_path / "bad"), "--model", str(tiny_lm_folder[0]), "--store", str(store_dir),
                   "--eval-tokens", "200", "--eval-contexts", "2"])
    err = capsys.readouterr()
    assert rc == 2 and "NaN/inf weights" in err.err and "FVE" not in err.out
