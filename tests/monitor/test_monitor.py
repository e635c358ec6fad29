"""Runtime monitors on a tiny GPT-2: exact scores, one forward per step, stop / steer / alert / cancel,
window and hysteresis, batches, typed errors."""

from __future__ import annotations

import pytest
import torch

from mechscope import monitor, probes
from mechscope.errors import ArtifactMismatchError, HookNameError, InputError
from mechscope.models.interventions import Add

pytestmark = pytest.mark.usefixtures("one_thread")

HOOK = "blocks.1.hook_resid_post"
PROMPT = "the big cat sat on"
FILLERS = ["the big", "a small red", "the blue", "a", "the red big", "when mary saw the", "john gave a"]


@pytest.fixture(scope="module")
def gpt2(tiny_gpt2):
    return tiny_gpt2[2]


@pytest.fixture(scope="module")
def probe(gpt2):
    """A toy contrast: '... dog' (1) vs '... cat' (0), read at the last token."""
    texts = [f"{f} {n}" for f in FILLERS for n in ("dog", "cat")]
    labels = [1, 0] * len(FILLERS)
    return probes.fit(gpt2, texts, labels, hook=HOOK, position="last", method="diffmeans", cross_validated=False)


def at_position(model, table: dict[int, float], default: float = 0.0):
    """A FunctionMonitor fn scoring by the absolute position read (known firing times for tests)."""

    def fn(act):  # [B, T, d] -> [B, T]
        pos = model.run_state_now.positions[: act.shape[0], -act.shape[1]:]
        out = torch.full(pos.shape, default)
        for p, v in table.items():
            out = torch.where(pos == p, torch.tensor(v), out)
        return out

    return fn


def plain(model, prompt=PROMPT, n=8, **kw):
    T = model.to_tokens(prompt).shape[1]
    return model.generate(model.to_tokens(prompt), n, stop_at_eos=False, **kw)[0, T:].tolist()


def test_trace_scores_equal_the_probe_on_a_cached_run(gpt2, probe):
    v = torch.randn(64, generator=torch.Generator().manual_seed(0))
    ms = [monitor.ProbeMonitor("dog", probe, threshold=1e9),
          monitor.DirectionMonitor("dir", HOOK, v, threshold=1e9)]
    res = gpt2.generate(PROMPT, 8, monitors=ms, stop_at_eos=False)
    assert isinstance(res, monitor.MonitoredGeneration) and res.stopped_by is None
    assert res.token_ids == plain(gpt2)  # monitors change nothing
    assert len(res.trace) == 8 and res.text == gpt2.tokenizer.decode(res.token_ids)
    T = gpt2.to_tokens(PROMPT).shape[1]
    assert [t.position for t in res.trace] == list(range(T - 1, T + 7))
    full = torch.cat([gpt2.to_tokens(PROMPT)[0], torch.tensor(res.token_ids)])
    _, cache = gpt2.run_with_cache(full[None], names_filter=HOOK)
    rows = cache[HOOK][0, T - 1: T + 7]  # [8, d] the positions read by steps 0..7
    want = probe.score_activations(rows)
    got = torch.tensor([t.scores["dog"] for t in res.trace], dtype=torch.float64)
    assert torch.allclose(got, want.double(), atol=1e-5, rtol=1e-5)
    want_dir = rows @ (v / v.norm())
    assert torch.allclose(torch.tensor([t.scores["dir"] for t in res.trace]).float(), want_dir, atol=1e-5)
    assert res.alerts == [] and not any(any(t.fired.values()) for t in res.trace)
    d = res.to_dict()
    assert d["text"] == res.text and d["trace"][0]["scores"]["dog"] == res.trace[0].scores["dog"]


def test_monitors_share_the_one_forward_per_step(gpt2, probe):
    calls = []
    counter = [("hook_embed", lambda a, hook: calls.append(a.shape[1]))]
    gpt2.generate(PROMPT, 6, stop_at_eos=False, fwd_hooks=counter)
    baseline, calls[:] = list(calls), []
    ms = [monitor.ProbeMonitor("p", probe, threshold=1e9),
          monitor.DirectionMonitor("d", HOOK, torch.ones(64), threshold=1e9),
          monitor.FunctionMonitor("f", "blocks.0.hook_resid_post", lambda a: a.norm(dim=-1), threshold=1e9)]
    res = gpt2.generate(PROMPT, 6, monitors=ms, stop_at_eos=False, fwd_hooks=counter)
    assert calls == baseline and len(calls) == 6  # the prompt's forward + 5 single-token forwards (KV cache)
    assert calls[1:] == [1] * 5 and len(res.trace) == 6


def test_stop_blocks_the_token_of_the_step_that_fires(gpt2):
    # a direction that fires on the prompt: the prompt's own last activation
    _, cache = gpt2.run_with_cache(PROMPT, names_filter=HOOK)
    a = cache[HOOK][0, -1]
    m = monitor.DirectionMonitor("self", HOOK, a, threshold=0.5 * float(a.norm()), action="stop")
    res = gpt2.generate(PROMPT, 8, monitors=[m], stop_at_eos=False)
    assert res.text == "" and res.token_ids == [] and res.stopped_by == "self"
    assert len(res.trace) == 1 and res.trace[0].token is None and res.trace[0].token_id is None
    assert res.trace[0].fired["self"] and res.trace[0].actions == ["stop:self"]
    assert [(al.monitor, al.index, al.action) for al in res.alerts] == [("self", 0, "stop")]
    # firing at step 3 emits exactly the first 3 tokens of the plain generation
    T = gpt2.to_tokens(PROMPT).shape[1]
    late = monitor.FunctionMonitor("late", HOOK, at_position(gpt2, {T - 1 + 3: 5.0}), threshold=1.0, action="stop")
    res = gpt2.generate(PROMPT, 8, monitors=[late], stop_at_eos=False)
    assert res.token_ids == plain(gpt2)[:3] and res.stopped_by == "late" and len(res.trace) == 4
    assert res.trace[3].token is None and res.trace[2].token is not None


def test_window_and_hysteresis(gpt2):
    T = gpt2.to_tokens(PROMPT).shape[1]
    p0 = T - 1
    seq = [0, 2, 2, 0.5, 2, 0, 2, 2]  # scores read at steps 0..7
    fn = at_position(gpt2, {p0 + i: s for i, s in enumerate(seq)})
    seen = []
    ms = [monitor.FunctionMonitor("plain", HOOK, fn, threshold=1.0, action="alert", on_alert=seen.append),
          monitor.FunctionMonitor("hyst", HOOK, fn, threshold=1.0, hysteresis=0.8),
          monitor.FunctionMonitor("win", HOOK, fn, threshold=1.5, window=2)]
    res = gpt2.generate(PROMPT, 8, monitors=ms, stop_at_eos=False)
    fired = {n: [i for i, t in enumerate(res.trace) if t.fired[n]] for n in ("plain", "hyst", "win")}
    assert fired["plain"] == [1, 4, 6]  # re-armed each time the score went back to <= 1
    assert fired["hyst"] == [1, 6]  # 0.5 is not <= 1 - 0.8, so step 4 does not fire again
    assert fired["win"] == [2, 7]  # rolling means: 0, 1, 2, 1.25, 1.25, 1, 1, 2
    assert [t.scores["win"] for t in res.trace] == pytest.approx([0, 1, 2, 1.25, 1.25, 1, 1, 2])
    assert [al.index for al in res.alerts] == [1, 4, 6] and seen == res.alerts  # record-only: no alerts
    assert res.trace[1].actions == ["alert:plain"] and res.stopped_by is None


def test_steer_acts_from_the_next_token_on(gpt2):
    T = gpt2.to_tokens(PROMPT).shape[1]
    k = 2  # fires at step 2, reading position T - 1 + 2; steering starts at the next token's position
    vec = torch.randn(64, generator=torch.Generator().manual_seed(1)) * 20
    steer = Add(HOOK, vec)
    m = monitor.FunctionMonitor("s", HOOK, at_position(gpt2, {T - 1 + k: 5.0}), threshold=1.0, action="steer",
                                steer=steer)
    res = gpt2.generate(PROMPT, 8, monitors=[m], stop_at_eos=False)
    want = plain(gpt2, interventions=[Add(HOOK, vec, positions=slice(T + k, None))])
    assert res.token_ids == want and want != plain(gpt2)
    assert res.token_ids[: k + 1] == plain(gpt2)[: k + 1]
    assert res.trace[k].actions == ["steer:s"] and steer.positions is None  # the user's object is untouched


def test_on_token_streams_and_cancels(gpt2):
    seen = []

    def on_token(t):
        seen.append(t.index)
        return t.index < 2  # False at step 2: cancel

    res = gpt2.generate(PROMPT, 8, on_token=on_token, stop_at_eos=False)
    assert seen == [0, 1, 2] and res.stopped_by == "cancelled" and res.token_ids == plain(gpt2)[:3]


def test_a_batch_of_prompts_gives_what_each_gives_alone(gpt2, probe):
    prompts = ["the big cat sat on", "a dog", "when mary went to the store"]
    ms = lambda: [monitor.ProbeMonitor("p", probe, threshold=0.0, action="stop")]  # noqa: E731
    batch = gpt2.generate(prompts, 6, monitors=ms(), stop_at_eos=False)
    assert isinstance(batch, list) and len(batch) == 3
    for p, r in zip(prompts, batch):
        alone = gpt2.generate(p, 6, monitors=ms(), stop_at_eos=False)
        assert r.token_ids == alone.token_ids and r.stopped_by == alone.stopped_by
        assert r.prompt == p and [t.position for t in r.trace] == [t.position for t in alone.trace]
        assert [t.scores["p"] for t in r.trace] == pytest.approx([t.scores["p"] for t in alone.trace], abs=1e-5)


def test_bad_input_is_a_typed_error(gpt2, probe, tiny_llama):
    with pytest.raises(InputError, match="threshold must be a finite number"):
        monitor.DirectionMonitor("d", HOOK, torch.ones(64), threshold="high")
    with pytest.raises(InputError, match="threshold"):
        monitor.ProbeMonitor("d", probe, threshold=float("nan"))
    with pytest.raises(InputError, match="action"):
        monitor.DirectionMonitor("d", HOOK, torch.ones(64), action="explode")
    with pytest.raises(InputError, match="steer="):
        monitor.DirectionMonitor("d", HOOK, torch.ones(64), action="steer")
    with pytest.raises(InputError, match="window"):
        monitor.DirectionMonitor("d", HOOK, torch.ones(64), window=0)
    with pytest.raises(InputError, match="unique"):
        gpt2.generate(PROMPT, 2, monitors=[monitor.DirectionMonitor("d", HOOK, torch.ones(64))] * 2)
    with pytest.raises(HookNameError):
        gpt2.generate(PROMPT, 2, monitors=[monitor.DirectionMonitor("d", "blocks.9.hook_resid_post", torch.ones(64))])
    with pytest.raises(InputError, match="width"):
        gpt2.generate(PROMPT, 2, monitors=[monitor.DirectionMonitor("d", HOOK, torch.ones(7))])
    with pytest.raises(ArtifactMismatchError, match="probe"):  # a probe of another model (same hook and width)
        tiny_llama[2].generate(PROMPT, 2, monitors=[monitor.ProbeMonitor("p", probe)])
    with pytest.raises(InputError, match="prompt string"):
        gpt2.generate(gpt2.to_tokens(PROMPT), 2, monitors=[])
