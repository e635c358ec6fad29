"""ActivationStore serving: shuffled, seeded, complete batches from disk or straight from the model."""

from __future__ import annotations

import pytest
import torch

from mechscope.data.harvest import HarvestConfig, harvest
from mechscope.data.store import ActivationStore
from mechscope.data.stream import stream_batches
from mechscope.errors import HookNameError, InputError

HOOKS = ["blocks.0.hook_resid_post", "blocks.1.hook_mlp_out"]
CFG = dict(hooks=HOOKS, n_tokens=3000, context_len=32, batch_size=4, shard_tokens=250, seed=0)


@pytest.fixture(scope="module")
def model(tiny_lm_folder):
    return tiny_lm_folder[1]


@pytest.fixture(scope="module")
def store(model, tmp_path_factory):
    out = tmp_path_factory.mktemp("store")
    harvest(model, HarvestConfig(**CFG), out, progress=False)
    return ActivationStore.open(out, model)


def served(store, **kw):
    return list(store.batches(64, with_tokens=True, buffer_rows=512, chunk_rows=8, **kw))


def key_of(batch) -> list[tuple[int, int]]:
    return list(zip(batch["context_ids"].tolist(), batch["positions"].tolist(), strict=True))


def test_one_epoch_serves_every_row_exactly_once(store):
    batches = served(store)
    keys = [k for b in batches for k in key_of(b)]
    assert len(keys) == store.n_tokens == 3000 and len(set(keys)) == 3000
    assert all(b[HOOKS[0]].shape == (64, 32) for b in batches[:-1]) and batches[-1][HOOKS[0]].shape[0] == 3000 % 64
    assert len(served(store, drop_last=True)) == 3000 // 64
    # the activation travels with its token: row values equal the unshuffled store's
    flat = store.load(HOOKS[1])
    index = {k: i for i, k in enumerate(key_of(next(store.batches(10**6, shuffle=False, with_tokens=True))))}
    b = batches[3]
    rows = torch.tensor([index[k] for k in key_of(b)])
    assert torch.equal(b[HOOKS[1]], flat[rows])


def test_same_seed_same_batches_other_seed_other_batches(store):
    a, b, c = served(store, seed=5), served(store, seed=5), served(store, seed=6)
    assert all(torch.equal(x[HOOKS[0]], y[HOOKS[0]]) for x, y in zip(a, b, strict=True))
    assert key_of(a[0]) != key_of(c[0])
    e1, e2 = [list(store.batches(64, hooks=HOOKS[0], seed=0, epochs=2, chunk_rows=8))[i] for i in (0, 47)]
    assert not torch.equal(e1, e2)  # the second epoch is shuffled differently


def test_batches_have_no_sequence_order_correlation(store):
    order = torch.cat([b["context_ids"] for b in served(store)]).double()  # harvest order of served rows
    rank = torch.arange(len(order), dtype=torch.float64)
    r = torch.corrcoef(torch.stack([order.argsort().argsort().double(), rank]))[0, 1]
    assert abs(r) < 0.2, r  # Spearman correlation between serving order and corpus order
    # neighbouring rows rarely come from the same context (in harvest order they nearly always do)
    same_ctx = (order[1:] == order[:-1]).double().mean()
    assert same_ctx < 0.1, same_ctx
    per_batch = [len(set(b["context_ids"].tolist())) for b in served(store)[:-1]]
    assert min(per_batch) > 16  # a batch of 64 rows spans many contexts (in harvest order: 3)


def test_unshuffled_is_harvest_order_and_hook_selection(store):
    b = next(store.batches(100, shuffle=False, hooks=HOOKS[1]))
    assert isinstance(b, torch.Tensor) and torch.equal(b, store.load(HOOKS[1])[:100])
    d = next(store.batches(8, hooks=[HOOKS[0]], dtype=torch.float16))
    assert set(d) == {HOOKS[0]} and d[HOOKS[0]].dtype == torch.float16
    with pytest.raises(HookNameError):
        next(store.batches(8, hooks="blocks.2.hook_resid_post"))
    with pytest.raises(InputError):
        next(store.batches(0))


def test_stream_from_model_matches_the_store_and_is_seeded(model, store):
    cfg = HarvestConfig(**CFG)
    a = list(stream_batches(model, cfg, 64, buffer_tokens=800, seed=1, with_tokens=True))
    b = list(stream_batches(model, cfg, 64, buffer_tokens=800, seed=1, with_tokens=True))
    assert all(torch.equal(x[HOOKS[0]], y[HOOKS[0]]) for x, y in zip(a, b, strict=True))
    keys = [k for x in a for k in key_of(x)]
    assert len(keys) == 3000 and set(keys) == {k for x in served(store) for k in key_of(x)}
    flat = {k: v for x in served(store) for k, v in zip(key_of(x), x[HOOKS[1]], strict=True)}
    for x in a[:3]:
        for k, v in zip(key_of(x), x[HOOKS[1]], strict=True):
            assert torch.equal(v, flat[k])
    order = torch.tensor([c for c, _ in keys], dtype=torch.float64)
    assert (order[1:] == order[:-1]).double().mean() < 0.1  # mixed, not in corpus order
    single = next(stream_batches(model, HarvestConfig(**(CFG | {"hooks": HOOKS[:1]})), 16, buffer_tokens=200))
    assert isinstance(single, torch.Tensor) and single.shape == (16, 32)


def test_activation_stats_without_disk_match_the_store(model, store):
    from mechscope.data.stream import activation_stats

    stats = activation_stats(model, HarvestConfig(**CFG))
    for h in HOOKS:
        want = store.stats(h)
        assert stats[h].count == 3000
        torch.testing.assert_close(stats[h].mean.float(), want["mean"], rtol=1e-5, atol=1e-6)
        assert stats[h].summary()["mean_norm"] == pytest.approx(want["mean_norm"], rel=1e-9)
