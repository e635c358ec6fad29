"""Harvest: exact activations, manifest, stats, early stop, dtypes, resume and every failure mode."""

from __future__ import annotations

import errno
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from mechscope.data import harvest as harvest_mod
from mechscope.data.harvest import HarvestConfig, harvest, read_manifest
from mechscope.data.packing import contexts
from mechscope.data.store import ActivationStore
from mechscope.errors import (
    CorruptFileError,
    EmptyCorpusError,
    HookNameError,
    InputError,
    StoreMismatchError,
    StoreWriteError,
    UnknownFormatError,
)

from conftest import make_tiny_lm

HOOKS = ["blocks.0.hook_resid_post", "blocks.1.hook_mlp_out"]


def small_cfg(**kw) -> HarvestConfig:
    base = dict(hooks=HOOKS, n_tokens=700, context_len=32, batch_size=4, shard_tokens=200, seed=3)
    return HarvestConfig(**(base | kw))


def store_bytes(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir()) if not p.name.startswith(".")}


@pytest.fixture(scope="module")
def model(tiny_lm_folder):
    return tiny_lm_folder[1]


@pytest.fixture(scope="module")
def store(model, tmp_path_factory):
    out = tmp_path_factory.mktemp("store")
    harvest(model, small_cfg(), out, progress=False)
    return ActivationStore.open(out, model)


def test_manifest_records_what_was_harvested(store, model):
    m = store.manifest
    assert m["complete"] and m["tokens"] == 700 == store.n_tokens
    assert m["config"]["hooks"] == HOOKS and m["hook_shapes"] == {h: [32] for h in HOOKS}
    assert m["model"]["name"] == model.cfg.model_name and len(m["model"]["config_hash"]) == 16
    assert m["source"]["context_len"] == 32 and m["source"]["prepend_bos"] is True
    assert "sotu" in json.dumps(m["source"]) and m["config"]["seed"] == 3
    # shards hold whole batches: 200 // (4 * 31) = 1 batch -> 124 rows; 700 rows -> 6 shards, last trimmed
    assert [s["rows"] for s in m["shards"]] == [124] * 5 + [80]
    assert [s["contexts"] for s in m["shards"]][:2] == [[0, 4], [4, 8]]
    assert sum(s["rows"] for s in m["shards"]) == 700


def test_rows_equal_run_with_cache_on_the_same_contexts(store, model):
    ctx = contexts("sotu", model.tokenizer, 32, seed=3)
    tokens = torch.stack([c for _, c in zip(range(8), ctx, strict=False)])  # [8, 32]
    _, cache = model.run_with_cache(tokens, names_filter=HOOKS)
    for h in HOOKS:
        want = cache[h][:, 1:].reshape(-1, 32)  # BOS position excluded
        torch.testing.assert_close(store.load(h, max_rows=248), want, rtol=0, atol=0)
    stored = list(store.contexts())
    assert [i for i, _ in stored[:8]] == list(range(8))
    assert torch.equal(torch.stack([c for _, c in stored[:8]]), tokens)


def test_token_ids_positions_and_context_ids_line_up(store):
    rows = next(store.batches(10_000, shuffle=False, with_tokens=True))
    ctx = dict(store.contexts())
    for k in (0, 1, 30, 31, 500, 699):
        c, p = int(rows["context_ids"][k]), int(rows["positions"][k])
        assert 1 <= p < 32 and int(rows["tokens"][k]) == int(ctx[c][p])


def test_stats_match_the_stored_rows(store):
    for h in HOOKS:
        x = store.load(h).double()
        st = store.stats(h)
        torch.testing.assert_close(st["mean"].double(), x.mean(0), rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(st["var"].double(), x.var(0, correction=0), rtol=1e-4, atol=1e-6)
        assert st["count"] == 700
        assert st["mean_norm"] == pytest.approx(float(x.norm(dim=1).mean()), rel=1e-9)
        assert st["total_variance"] == pytest.approx(float((x - x.mean(0)).square().sum(1).mean()), rel=1e-6)
        assert st["norm_scale"] == pytest.approx(32**0.5 / st["mean_norm"])


def test_forward_stops_after_the_last_needed_layer(model, tmp_path):
    calls = []
    model.add_hook("blocks.2.hook_resid_pre", lambda x, hook: calls.append(1))
    try:
        harvest(model, small_cfg(hooks=["blocks.0.hook_resid_post"], n_tokens=100), tmp_path, progress=False)
    finally:
        model.reset_hooks()
    assert calls == []


def test_bf16_storage_and_keep_bos(model, tmp_path):
    s32 = ActivationStore.harvest(model, HOOKS[:1], 200, tmp_path / "a", progress=False, context_len=32,
                                  exclude_bos=False)
    s16 = ActivationStore.harvest(model, HOOKS[:1], 200, tmp_path / "b", progress=False, context_len=32,
                                  exclude_bos=False, dtype="bfloat16")
    a, b = s32.load(HOOKS[0]), s16.load(HOOKS[0])
    assert b.dtype == torch.bfloat16 and torch.equal(a.to(torch.bfloat16), b)
    pos = next(s32.batches(200, shuffle=False, with_tokens=True))["positions"]
    assert pos[0] == 0 and pos[32] == 0  # BOS positions kept


def test_a_finished_store_is_reused_and_overwrite_replaces_it(model, tmp_path):
    harvest(model, small_cfg(n_tokens=100), tmp_path, progress=False)
    before = store_bytes(tmp_path)
    harvest(model, small_cfg(n_tokens=100), tmp_path, progress=False)
    assert store_bytes(tmp_path) == before
    with pytest.raises(StoreMismatchError, match="hooks|n_tokens"):
        harvest(model, small_cfg(n_tokens=150), tmp_path, progress=False)
    harvest(model, small_cfg(n_tokens=150), tmp_path, progress=False, overwrite=True)
    assert read_manifest(tmp_path)["tokens"] == 150


def test_store_from_another_model_is_refused(store, tmp_path):
    other = make_tiny_lm(seed=1)
    with pytest.raises(StoreMismatchError, match="weights_fingerprint"):
        ActivationStore.open(store.folder, other)
    with pytest.raises(StoreMismatchError):
        harvest(other, small_cfg(), store.folder, progress=False)  # resume with another model
    ActivationStore.open(store.folder)  # without a model: no check


def test_bad_input_gives_typed_errors(model, tmp_path):
    with pytest.raises(HookNameError, match="Did you mean"):
        harvest(model, small_cfg(hooks=["blocks.0.hook_resid_pots"]), tmp_path / "a", progress=False)
    with pytest.raises(InputError, match="query"):
        harvest(model, small_cfg(hooks=["blocks.0.attn.hook_pattern"]), tmp_path / "a", progress=False)
    with pytest.raises(InputError):
        HarvestConfig(hooks=[], n_tokens=10)
    with pytest.raises(InputError, match="dtype"):
        HarvestConfig(hooks=HOOKS, n_tokens=10, dtype="int8")
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    with pytest.raises(EmptyCorpusError):
        harvest(model, small_cfg(corpus=str(empty)), tmp_path / "b", progress=False)
    bad = tmp_path / "data.parquet"
    bad.write_bytes(b"PAR1")
    with pytest.raises(UnknownFormatError):
        harvest(model, small_cfg(corpus=str(bad)), tmp_path / "c", progress=False)
    (tmp_path / "notastore").mkdir()
    (tmp_path / "notastore" / "x.txt").write_text("keep me")
    with pytest.raises(InputError, match="not an activation store"):
        harvest(model, small_cfg(), tmp_path / "notastore", progress=False)
    assert (tmp_path / "notastore" / "x.txt").read_text() == "keep me"


def test_truncated_shard_is_detected(model, tmp_path):
    harvest(model, small_cfg(n_tokens=400), tmp_path, progress=False)
    shard = tmp_path / "shard_00001.safetensors"
    shard.write_bytes(shard.read_bytes()[:-100])
    store = ActivationStore.open(tmp_path, model)
    with pytest.raises(CorruptFileError, match="truncated"):
        store.verify()
    with pytest.raises(CorruptFileError, match="truncated"):
        list(store.batches(64))


def test_full_disk_keeps_what_was_written_and_resumes(model, tmp_path, monkeypatch):
    clean = tmp_path / "clean"
    harvest(model, small_cfg(), clean, progress=False)
    out = tmp_path / "full"
    real, calls = harvest_mod.atomic_write_bytes, []

    def full_after_two_shards(path, data):
        if Path(path).name.startswith("shard_"):
            calls.append(path)
            if len(calls) == 3:
                raise OSError(errno.ENOSPC, "No space left on device")
        real(path, data)

    monkeypatch.setattr(harvest_mod, "atomic_write_bytes", full_after_two_shards)
    with pytest.raises(StoreWriteError, match="free some space"):
        harvest(model, small_cfg(), out, progress=False)
    m = read_manifest(out)
    assert len(m["shards"]) == 2 and not m["complete"]
    assert not (out / "shard_00002.safetensors").exists()
    for name in ("shard_00000.safetensors", "shard_00001.safetensors"):
        assert (out / name).read_bytes() == (clean / name).read_bytes()
    with pytest.raises(CorruptFileError, match="unfinished"):
        ActivationStore.open(out)
    monkeypatch.setattr(harvest_mod, "atomic_write_bytes", real)
    harvest(model, small_cfg(), out, progress=False)
    assert store_bytes(out) == store_bytes(clean)


def test_stats_are_recomputed_if_a_crash_left_them_ahead(model, tmp_path):
    clean, out = tmp_path / "clean", tmp_path / "out"
    harvest(model, small_cfg(), clean, progress=False)
    harvest(model, small_cfg(n_tokens=700), out, progress=False)
    m = read_manifest(out)  # rewind the manifest to 2 shards: stats.safetensors now says 6
    m["shards"], m["complete"] = m["shards"][:2], False
    m["tokens"], m["contexts"], m["stats"] = sum(s["rows"] for s in m["shards"]), m["shards"][-1]["contexts"][1], {}
    (out / "manifest.json").write_text(json.dumps(m, indent=2, sort_keys=True) + "\n")
    harvest(model, small_cfg(), out, progress=False)
    assert store_bytes(out) == store_bytes(clean)


def _harvest_cmd(folder: Path, out: Path) -> list[str]:
    return [sys.executable, "-m", "mechscope.cli", "harvest", "--model", str(folder), "--hooks", ",".join(HOOKS),
            "--tokens", "30000", "--out", str(out), "--context-len", "64", "--batch-size", "4",
            "--shard-tokens", "500", "--seed", "1", "--no-progress"]


def test_killed_harvest_resumes_to_byte_identical_shards(tiny_lm_folder, tmp_path):
    folder = tiny_lm_folder[0]
    env = os.environ | {"OMP_NUM_THREADS": "1"}
    clean, killed = tmp_path / "clean", tmp_path / "killed"
    subprocess.run(_harvest_cmd(folder, clean), check=True, env=env, capture_output=True)
    proc = subprocess.Popen(_harvest_cmd(folder, killed), env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE)
    deadline = time.time() + 120
    while time.time() < deadline:
        try:
            if len(read_manifest(killed)["shards"]) >= 3:
                break
        except (CorruptFileError, FileNotFoundError, KeyError):
            pass
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    m = read_manifest(killed)
    assert not m["complete"] and 3 <= len(m["shards"]) < len(read_manifest(clean)["shards"])
    subprocess.run(_harvest_cmd(folder, killed), check=True, env=env, capture_output=True)
    assert not any(p.name.endswith(".tmp") for p in killed.iterdir())
    assert store_bytes(killed) == store_bytes(clean)
