"""Data-parallel training under torchrun: 2 CPU ranks (gloo) train exactly like 1 process with the same
global batch: same loss / FVE / L0 / dead curves (within 1e-5) and weights, for TopK (fused kernel,
AuxK active), BatchTopK (global selection) and ReLU+L1, through a checkpoint written by rank 0 and
resumed by both ranks."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from mechscope.errors import InputError
from mechscope.sae import distributed

sys.path.insert(0, str(Path(__file__).parent))
import ddp_worker  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("ddp")
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR",
                                                           "MASTER_PORT")}
    env["OMP_NUM_THREADS"] = "1"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           str(Path(__file__).parent / "ddp_worker.py"), str(out)]
    r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    return out


def test_two_ranks_train_like_one_process(two_ranks):
    one = ddp_worker.run(two_ranks, None)  # single process, uninterrupted, same global batch
    got = json.loads((two_ranks / "log.json").read_text())
    weights = load_file(str(two_ranks / "weights.safetensors"))
    assert len(got["logs"]) == len(one) == 3
    for i, (coder, log) in enumerate(zip(one, got["logs"], strict=True)):
        ref = coder.cfg.extra["train_log"]
        assert log["step"] == ref["step"] == list(range(24))
        for key in ("loss", "fve", "l0", "dead_fraction"):
            diff = max(abs(a - b) for a, b in zip(log[key], ref[key], strict=True))
            assert diff <= 1e-5, f"coder {i} ({ddp_worker.SPECS[i]['arch']}) {key}: max diff {diff:.2e}"
        for k, v in coder.state_dict().items():
            torch.testing.assert_close(weights[f"{i}.{k}"], v, rtol=1e-4, atol=1e-5, msg=f"coder {i} {k}")
    # AuxK really ran on the topk coder (latents died within the short window)
    assert max(one[0].cfg.extra["train_log"]["dead_fraction"]) > 0
    assert got["stats"][0]["dead_fraction"] == pytest.approx(one[0].cfg.extra["train_stats"]["dead_fraction"])
    # rank 0 alone wrote the checkpoint, and it records the world size
    state = json.loads((two_ranks / "ckpt" / "state.json").read_text())
    assert state["data"]["world_size"] == 2 and state["step"] == 24


def test_uneven_global_batch_is_refused():
    with pytest.raises(InputError, match="divide evenly over 2 ranks"):
        distributed.shard(255, distributed.Group(0, 2, torch.device("cpu")))
    assert distributed.shard(256, distributed.Group(1, 2, torch.device("cpu"))) == slice(128, 256)


def test_single_process_is_untouched():
    assert distributed.setup() is None and distributed.active() is None
    y = torch.randn(50, 7)
    assert torch.equal(distributed.batch_total_variance(y), torch.dot((y - y.mean(0)).view(-1),
                                                                      (y - y.mean(0)).view(-1)))
