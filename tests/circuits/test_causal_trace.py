"""Causal tracing: the batched trace equals the one-forward-per-restoration loop; its invariants; averages; errors."""

import json

import pytest
import torch
from tests.conftest import make_word_tokenizer

from mechscope import HookedTransformer, ModelConfig, circuits
from mechscope.circuits.causal_trace import (
    BUCKETS,
    CausalTrace,
    bucket_positions,
    embedding_std,
    find_subject,
)
from mechscope.circuits.facts import FACTS, known_facts
from mechscope.errors import InputError, SubjectNotFoundError

PROMPT = "the big red dog sat on the mat and ran to the"
SUBJECT = "big red dog"
ATOL = 1e-5


def _word_model(positional: str, add_bos: bool, seed: int) -> HookedTransformer:
    tok = make_word_tokenizer(add_bos=add_bos)
    extra = dict(normalization="RMS", positional="rotary", gated_mlp=True, act_fn="silu", n_kv_heads=2)
    if positional == "learned":
        extra = dict(normalization="LN", positional="learned", act_fn="gelu_new", n_kv_heads=4)
    cfg = ModelConfig(d_model=32, n_layers=6, n_heads=4, d_head=8, d_mlp=64, d_vocab=len(tok), n_ctx=32,
                      model_name=f"tiny-trace-{positional}", **extra)
    return HookedTransformer(cfg, tokenizer=tok).init_weights(seed, std=0.3)


@pytest.fixture(scope="module")
def llama6(one_thread):
    """6 layers, rotary, BOS prepended (the subject starts at position 2: the keys/values prefix is reused)."""
    return _word_model("rotary", add_bos=True, seed=0)


@pytest.fixture(scope="module")
def gpt6(one_thread):
    """6 layers, learned positions, no BOS (the subject starts at position 1)."""
    return _word_model("learned", add_bos=False, seed=1)


@pytest.mark.parametrize("kind,window", [("resid", None), ("mlp", 3), ("attn", None), ("resid", 2)])
def test_batched_equals_loop(llama6, kind, window):
    kw = dict(kind=kind, samples=3, window=window, seed=3)
    ref = circuits.causal_trace(llama6, PROMPT, SUBJECT, batched=False, **kw)
    assert ref.effects.abs().max() > 1e-3  # the comparison is about real effects, not zeros
    for batch_size in (None, 7):  # 7 rows: restorations split over several forwards, a partial sample group
        got = circuits.causal_trace(llama6, PROMPT, SUBJECT, batch_size=batch_size, **kw)
        assert got.effects.shape == (6, len(got.tokens))
        torch.testing.assert_close(got.effects, ref.effects, atol=ATOL, rtol=0)
        assert got.p_corrupted == pytest.approx(ref.p_corrupted, abs=ATOL)


def test_batched_equals_loop_learned_positions_no_bos(gpt6):
    for kind in ("mlp", "resid"):  # mlp: the default window 10 is clipped to the 6 layers
        ref = circuits.causal_trace(gpt6, "big red dog sat on the mat and", "big red dog", kind, samples=2,
                                    batched=False)
        got = circuits.causal_trace(gpt6, "big red dog sat on the mat and", "big red dog", kind, samples=2)
        assert got.subject_range == (0, 3)
        assert ref.effects.abs().max() > 1e-3
        torch.testing.assert_close(got.effects, ref.effects, atol=ATOL, rtol=0)


def test_trace_invariants(llama6):
    t = circuits.causal_trace(llama6, PROMPT, SUBJECT, "resid", samples=4)
    L, T = t.effects.shape
    s0, s1 = t.subject_range
    assert t.tokens[s0:s1] == ["big", "red", "dog"] and t.tokens[0] == "<s>"
    assert t.target == int(llama6(PROMPT)[0, -1].argmax())  # no target: the model's own greedy answer
    assert t.p_clean > t.p_corrupted + 0.05  # the noise hides the subject
    assert bool((t.effects[:, :s0] == 0).all())  # nothing to restore before the subject
    # restoring the whole last residual of the last token gives back the clean answer exactly
    assert t.restored[L - 1, T - 1] == pytest.approx(t.p_clean, abs=1e-5)
    # the last layer's residual at other positions reaches no later computation: no effect
    assert t.effects[L - 1, : T - 1].abs().max() < 1e-6
    torch.testing.assert_close(t.effects, t.restored - t.p_corrupted)
    assert t.noise_std == pytest.approx(3 * embedding_std(llama6))


def test_trace_is_seeded_and_noise_scales(llama6):
    a = circuits.causal_trace(llama6, PROMPT, SUBJECT, "mlp", samples=2, seed=5, window=2)
    b = circuits.causal_trace(llama6, PROMPT, SUBJECT, "mlp", samples=2, seed=5, window=2)
    c = circuits.causal_trace(llama6, PROMPT, SUBJECT, "mlp", samples=2, seed=6, window=2)
    assert torch.equal(a.effects, b.effects) and a.p_corrupted == b.p_corrupted
    assert not torch.equal(a.effects, c.effects)
    tiny = circuits.causal_trace(llama6, PROMPT, SUBJECT, "resid", samples=2, noise_std=1e-6)
    assert abs(tiny.p_corrupted - tiny.p_clean) < 1e-4  # no noise, no corruption


def test_layers_subset_matches_full(llama6):
    full = circuits.causal_trace(llama6, PROMPT, SUBJECT, "attn", samples=2, window=3)
    part = circuits.causal_trace(llama6, PROMPT, SUBJECT, "attn", samples=2, window=3, layers=[1, 4])
    assert part.layers == [1, 4] and part.effects.shape[0] == 2
    torch.testing.assert_close(part.effects, full.effects[[1, 4]], atol=ATOL, rtol=0)
    assert part.peak[0] in (1, 4)


def test_targets(llama6):
    t = circuits.causal_trace(llama6, PROMPT, SUBJECT, "resid", samples=1, target="mat")
    assert t.target_str == "mat" and t.note is None
    multi = circuits.causal_trace(llama6, PROMPT, SUBJECT, "resid", samples=1, target="mat house")
    assert multi.target == t.target and "2 tokens" in multi.note and "first token" in multi.note
    by_id = circuits.causal_trace(llama6, PROMPT, SUBJECT, "resid", samples=1, target=t.target)
    torch.testing.assert_close(by_id.effects, t.effects)


def test_errors(llama6):
    with pytest.raises(SubjectNotFoundError, match=r"'blue cat'.*tokens are.*'red'"):
        circuits.causal_trace(llama6, PROMPT, "blue cat")
    with pytest.raises(InputError, match="Empty prompt"):
        circuits.causal_trace(llama6, "  ", "dog")
    with pytest.raises(InputError, match="kind"):
        circuits.causal_trace(llama6, PROMPT, SUBJECT, kind="mlp_out")
    with pytest.raises(InputError, match="window"):
        circuits.causal_trace(llama6, PROMPT, SUBJECT, kind="mlp", window=0)
    with pytest.raises(InputError, match="samples"):
        circuits.causal_trace(llama6, PROMPT, SUBJECT, samples=0)
    with pytest.raises(InputError, match="layers"):
        circuits.causal_trace(llama6, PROMPT, SUBJECT, layers=[6])
    with pytest.raises(InputError, match="outside the vocabulary"):
        circuits.causal_trace(llama6, PROMPT, SUBJECT, target=10_000)


def test_find_subject_on_a_bpe_tokenizer():
    from tests.conftest import make_tiny_lm

    m = make_tiny_lm(0, n_layers=1)
    toks = m.prepare("The Eiffel Tower is located in the city of")[0][0]
    assert find_subject(m, toks, "The Eiffel Tower") == (0, 4)  # 'The', ' E', 'iffel', ' Tower'
    assert find_subject(m, toks, "Eiffel") == (1, 3)
    assert find_subject(m, toks, "city") == (8, 9)


def _fake(effects, subject_range, kind="mlp"):
    L, T = effects.shape
    return CausalTrace("p", "s", kind, 10, ["t"] * T, [0] * T, subject_range, 0, "x", effects, effects, 1.0, 0.0,
                       1.0, 1, 0, None, list(range(L)))


def test_bucket_positions_and_average():
    assert bucket_positions((1, 4), 9) == [[1], [2], [3], [4], [5, 6, 7], [8]]
    assert bucket_positions((2, 3), 4) == [[2], [], [2], [], [], [3]]  # one-token subject right before the end
    a = _fake(torch.arange(18.0).reshape(2, 9), (1, 4))
    b = _fake(torch.ones(2, 4), (2, 3))
    avg = circuits.average_traces([a, b])
    assert avg.effects.shape == (2, len(BUCKETS)) and avg.counts == [2, 1, 2, 1, 1, 2] and avg.n_facts == 2
    torch.testing.assert_close(avg.effects[0], torch.tensor([1.0, 2.0, 2.0, 4.0, 6.0, 4.5]))
    assert avg.peak == (1, "further tokens", pytest.approx(15.0))  # only fact a has further tokens: mean(14..16)
    assert avg.peak_in("last token") == (1, pytest.approx((17 + 1) / 2))
    assert avg.peak_in("first subject token") == (1, pytest.approx(5.5))
    with pytest.raises(InputError, match="different kinds"):
        circuits.average_traces([a, _fake(torch.ones(2, 4), (2, 3), kind="resid")])
    with pytest.raises(InputError, match="non-empty"):
        circuits.average_traces([])


def test_save_and_plot(llama6, tmp_path):
    t = circuits.causal_trace(llama6, PROMPT, SUBJECT, "mlp", samples=1, window=2)
    png, js = t.save(tmp_path)
    assert png.read_bytes().startswith(b"\x89PNG") and png.with_suffix(".json").exists()
    d = json.loads(js.read_text())
    assert d["subject_range"] == [2, 5] and len(d["effects"]) == 6 and d["peak"]["layer"] == t.peak[0]
    avg = circuits.average_traces([t, t])
    png, js = avg.save(tmp_path)
    assert png.name == "average_mlp.png" and json.loads(js.read_text())["n_facts"] == 2


def test_facts_list(llama6):
    assert len(FACTS) >= 60
    assert all(f.subject in f.prompt and f.answer.startswith(" ") for f in FACTS)
    kept = known_facts(llama6, FACTS[:8])
    assert all(f in FACTS[:8] for f in kept)


def test_cli_trace(tiny_lm_folder, tmp_path, capsys):
    from mechscope.cli import main

    folder, _ = tiny_lm_folder
    out = tmp_path / "trace"
    rc = main(["trace", "The Eiffel Tower is located in the city of", "--subject", "The Eiffel Tower", "--kind",
               "mlp", "--samples", "2", "--model", str(folder), "--out", str(out)])
    assert rc == 0
    assert (out / "trace_mlp.png").exists() and (out / "trace_mlp.json").exists()
    assert json.loads((out / "trace_mlp.trace.json").read_text())["subject_range"] == [0, 4]
    assert "peak indirect effect" in capsys.readouterr().out
    rc = main(["trace", "The Eiffel Tower is located in the city of", "--subject", "Big Ben", "--model",
               str(folder), "--out", str(out)])
    assert rc == 2 and "not found in the prompt" in capsys.readouterr().err


@pytest.mark.slow
def test_smollm2_trace_finds_the_fact():
    torch.set_num_threads(1)
    m = HookedTransformer.from_pretrained("smollm2")
    t = circuits.causal_trace(m, "The Eiffel Tower is located in the city of", subject="The Eiffel Tower",
                              kind="resid", samples=2, layers=[*range(0, 30, 4), 29])
    assert t.target_str == " Paris" and t.p_clean > 0.4 and t.p_corrupted < 0.5 * t.p_clean
    # the clean last-layer residual at the last token restores the answer; a strong effect exists on the subject
    assert t.effects[-1, -1] > 0.8 * (t.p_clean - t.p_corrupted)
    assert t.effects[:4, 0:4].max() > 0.3 * (t.p_clean - t.p_corrupted)
