"""mechscope.training: seeded steps, schedules, the identity-checked checkpoint, and bit-exact resumes of
the three users (a zoo recipe, the SAE trainer, the tuned lens) after a simulated kill."""

from __future__ import annotations

import hashlib
import json
import math

import pytest
import torch

from mechscope.errors import CheckpointMismatchError, CorruptFileError, InputError
from mechscope.training import (
    Checkpoint,
    EpochOrder,
    ModuleAndOptimizer,
    Progress,
    scheduled_lr,
    step_generator,
    train_loop,
)

pytestmark = pytest.mark.usefixtures("one_thread")


class Killed(BaseException):
    """A simulated kill: nothing in the training code catches it."""


def _old_generator(package: str, stream: str, seed: int, step: int) -> torch.Generator:
    """The per-package generators step_generator replaced (mechscope.zoo / mechscope.sae salts)."""
    digest = hashlib.sha256(f"mechscope.{package}:{stream}:{seed}:{step}".encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") >> 1)


def test_step_generator_keeps_the_old_streams():
    for package, stream in (("zoo", "data"), ("zoo", "tuned-lens-epoch"), ("sae", "epoch"), ("sae", "resample")):
        new = torch.rand(5, generator=step_generator(7, 3, f"{package}:{stream}"))
        assert torch.equal(new, torch.rand(5, generator=_old_generator(package, stream, 7, 3)))
    a, b = (torch.rand(4, generator=step_generator(0, s, "zoo:data")) for s in (0, 1))
    assert not torch.equal(a, b)


def test_epoch_order():
    order = EpochOrder(10, 3, seed=1, stream="t", drop_last=True)  # 3 batches per epoch, 1 row left over
    first = torch.cat([order.rows(s) for s in range(3)])
    assert len(set(first.tolist())) == 9 and torch.equal(order.rows(3), order.permutation(1)[:3])
    endless = EpochOrder(10, 4, seed=1, stream="t", drop_last=False)
    served = torch.cat([endless.rows(s) for s in range(5)])  # 20 rows: exactly two epochs
    assert sorted(served[:10].tolist()) == list(range(10)) == sorted(served[10:].tolist())
    assert torch.equal(served[8:12], endless.rows(2))  # step 2 spans the epoch boundary
    with pytest.raises(InputError, match="larger than"):
        EpochOrder(2, 3, seed=0, stream="t", drop_last=True)


def test_scheduled_lr():
    assert [scheduled_lr(s, 1.0, warmup=4) for s in (0, 1, 3, 50)] == [0.25, 0.5, 1.0, 1.0]
    lin = dict(warmup=10, decay="linear", steps=100, decay_steps=20)
    assert scheduled_lr(79, 1.0, **lin) == 1.0 and scheduled_lr(90, 1.0, **lin) == pytest.approx(0.5)
    assert scheduled_lr(99, 2.0, **lin) == pytest.approx(0.1)
    cos = dict(decay="cosine", steps=100, decay_steps=50)
    assert scheduled_lr(75, 1.0, **cos) == pytest.approx(0.5) and scheduled_lr(99, 1.0, **cos) < 0.002
    assert scheduled_lr(99, 1.0, decay="constant", steps=100, decay_steps=50) == 1.0
    with pytest.raises(InputError, match="decay"):
        scheduled_lr(0, 1.0, decay="exponential")


def _toy() -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    torch.manual_seed(0)
    model = torch.nn.Linear(3, 2)
    opt = torch.optim.AdamW(model.parameters(), lr=0.1)
    model(torch.randn(4, 3)).square().sum().backward()
    opt.step()  # Adam state exists
    return model, opt


def test_checkpoint_round_trips_exactly_and_refuses_another_identity(tmp_path):
    model, opt = _toy()
    ident = {"config": {"lr": 0.1, "width": 2}, "model": {"name": "toy"}, "data": {"sha": "ab"}}
    ckpt = Checkpoint(tmp_path / "ck", ident)
    assert ckpt.load() is None and ckpt.step() is None
    tensors, _ = ModuleAndOptimizer(model, opt).checkpoint_state()
    rng = torch.get_rng_state()
    ckpt.save(5, tensors, log={"loss": [1.5, 0.25]}, extra={"note": [1, 2]}, rng=True)
    ckpt.save(7, tensors, log={"loss": [1.5, 0.25, 0.125]}, extra={"note": [1, 2]}, rng=True)
    assert sorted(p.name for p in (tmp_path / "ck").iterdir()) == ["state.json", "step-00000007.safetensors"]
    torch.rand(3)  # moves the RNG on
    saved = Checkpoint(tmp_path / "ck", json.loads(json.dumps(ident))).load()
    assert saved is not None and saved.step == 7 and saved.log == {"loss": [1.5, 0.25, 0.125]}
    assert saved.extra == {"note": [1, 2]}
    fresh = torch.nn.Linear(3, 2)
    fresh_opt = torch.optim.AdamW(fresh.parameters(), lr=0.1)
    run = ModuleAndOptimizer(fresh, fresh_opt)
    run.restore(saved)
    for k, v in model.state_dict().items():
        assert torch.equal(fresh.state_dict()[k], v)
    for (ka, a), (kb, b) in zip(opt.state_dict()["state"].items(), fresh_opt.state_dict()["state"].items(),
                                strict=True):
        assert ka == kb and all(torch.equal(torch.as_tensor(a[k]), torch.as_tensor(b[k])) for k in a)
    from mechscope.training import restore_rng

    restore_rng(saved)
    assert torch.equal(torch.get_rng_state(), rng)
    # another config, model or data: refused with a typed error naming what differs and how to start over
    for change in ({"config": {"lr": 0.2, "width": 2}}, {"model": {"name": "other"}}, {"data": {"sha": "cd"}}):
        with pytest.raises(CheckpointMismatchError, match="delete that folder") as e:
            Checkpoint(tmp_path / "ck", {**ident, **change}).load()
        key = next(iter(change))
        assert key in str(e.value) and "saved" in str(e.value)
    assert isinstance(e.value, InputError)
    (tmp_path / "ck" / "step-00000007.safetensors").write_bytes(b"truncated")
    with pytest.raises(CorruptFileError, match="delete"):
        ckpt.load()


def test_train_loop_checkpoints_by_wall_time(tmp_path):
    model, opt = _toy()
    ckpt = Checkpoint(tmp_path, {"x": 1})

    def step_fn(step: int, log: dict) -> float:
        log.setdefault("seen", []).append(step)
        return 0.0

    state, finished = train_loop(ModuleAndOptimizer(model, opt), checkpoint=ckpt, steps=5, step_fn=step_fn,
                                 every=100, every_seconds=0.0, progress=False, stop_after=None)
    assert finished and state.step == 5 and ckpt.step() == 4  # every step by time; none after the last
    state, _ = train_loop(ModuleAndOptimizer(model, opt), checkpoint=ckpt, steps=5, step_fn=step_fn, every=100,
                          progress=False)
    assert state.log["seen"] == [0, 1, 2, 3, 4] and isinstance(state, Progress)


# ------------------------------------------------------------------------------ bit-exact resumes


def _kill_after(monkeypatch, owner, name: str, calls: int) -> None:
    real = getattr(owner, name)
    count = {"n": 0}

    def wrapped(*args, **kwargs):
        count["n"] += 1
        if count["n"] > calls:
            raise Killed
        return real(*args, **kwargs)

    monkeypatch.setattr(owner, name, wrapped)


def test_zoo_recipe_resumes_bit_exactly_after_a_kill(tmp_path, monkeypatch):
    from mechscope import zoo
    from mechscope.zoo.tms import ToyModel

    kw = dict(steps=120, checkpoint_every=50, progress=False)
    straight = zoo.load(zoo.train("tms", tmp_path / "straight", **kw))
    with monkeypatch.context() as m:
        _kill_after(m, ToyModel, "loss", 73)  # killed during step 73; the last checkpoint is step 50
        with pytest.raises(Killed):
            zoo.train("tms", tmp_path / "killed", **kw)
    assert json.loads((tmp_path / "killed" / ".checkpoint" / "state.json").read_text())["step"] == 50
    resumed = zoo.load(zoo.train("tms", tmp_path / "killed", **kw))
    for k, v in straight.state_dict().items():
        assert torch.equal(resumed.state_dict()[k], v), k


def test_sae_trainer_resumes_bit_exactly_after_a_kill(tmp_path, monkeypatch):
    from mechscope.sae.synthetic import synthetic_data
    from mechscope.sae.train import train
    from mechscope.sae.trainer import Trainer

    data = synthetic_data(2048, d=8, n_features=16, p_active=0.1, seed=0).x  # [2048, 8]
    kw = dict(arch="topk", k=2, n_latents=32, steps=20, batch_size=128, dead_window_tokens=256, progress=False,
              log_every=1)
    straight = train(data, **kw)
    with monkeypatch.context() as m:
        _kill_after(m, Trainer, "step", 11)
        with pytest.raises(Killed):
            train(data, checkpoint_dir=tmp_path, checkpoint_every=4, **kw)
    assert Checkpoint(tmp_path, {}).step() == 8
    resumed = train(data, checkpoint_dir=tmp_path, checkpoint_every=4, **kw)
    assert resumed.cfg.extra["train_log"] == straight.cfg.extra["train_log"]
    for k, v in straight.state_dict().items():
        assert torch.equal(resumed.state_dict()[k], v), k
    with pytest.raises(CheckpointMismatchError, match=r"configs\[0\]\.k"):
        train(data, checkpoint_dir=tmp_path, **{**kw, "k": 3})


def test_tuned_lens_resumes_bit_exactly_after_a_kill(tmp_path, monkeypatch):
    from mechscope import HookedTransformer, ModelConfig
    from mechscope.circuits import lens as lens_module
    from mechscope.circuits.lens import TunedLens

    cfg = ModelConfig(d_model=16, n_layers=2, n_heads=2, d_head=8, d_mlp=32, d_vocab=50, n_ctx=32,
                      normalization="LN", positional="learned", act_fn="gelu", model_name="small")
    model = HookedTransformer(cfg).init_weights(0, std=0.3)
    data = torch.randint(0, 50, (24, 16), generator=torch.Generator().manual_seed(0))  # [24, 16]
    kw = dict(steps=7, batch_size=5, seed=3, progress=False)  # 35 contexts of 24: crosses an epoch
    straight = TunedLens.train(model, data, **kw)
    with monkeypatch.context() as m:
        _kill_after(m, lens_module, "_train_step", 5)
        with pytest.raises(Killed):
            TunedLens.train(model, data, checkpoint_dir=tmp_path, checkpoint_every=2, **kw)
    resumed = TunedLens.train(model, data, checkpoint_dir=tmp_path, checkpoint_every=2, **kw)
    assert torch.equal(resumed.weight, straight.weight) and torch.equal(resumed.bias, straight.bias)
    assert resumed.train_log["loss"] == straight.train_log["loss"] and math.isfinite(resumed.train_log["loss"][-1])
