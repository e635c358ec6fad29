"""Circuit tasks: IOI prompts use single-token names, share one length and differ from their
corruption only where the corruption acts; every metric equals its formula on hand-built logits
and is differentiable; on the real SmolLM2 IOI has a clear positive logit difference and
" Paris" is recalled."""

from __future__ import annotations

import pytest
import torch

from mechscope.circuits import tasks
from mechscope.errors import InputError, PromptMismatchError, TokenizerError

from conftest import make_tiny_lm

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def tiny():
    """A tiny random model with the real SmolLM2 tokenizer (digits split, no BOS by default)."""
    return make_tiny_lm(0, n_layers=2).eval()


def _diff_positions(task) -> list[list[int]]:
    return [torch.nonzero(row).flatten().tolist() for row in task.clean_tokens != task.corrupted_tokens]


# ------------------------------------------------------------------------------ IOI


def test_ioi_prompts(tiny):
    tok = tiny.tokenizer
    task = tasks.ioi(tiny, 40, seed=0)
    B, T = task.clean_tokens.shape
    assert B == 40 and task.corrupted_tokens.shape == (B, T)
    assert bool((task.answer_pos == T - 1).all()) and task.attention_mask is None
    # every prompt tokenizes, on its own, to the same T tokens
    assert all(len(tok(p)["input_ids"]) == T for p in task.clean_prompts + task.corrupted_prompts)
    # names are single tokens with a leading space, at the recorded positions
    rows = torch.arange(B)
    for key, ids in (("IO", task.answers), ("S1", task.wrong_answers), ("S2", task.wrong_answers)):
        assert torch.equal(task.clean_tokens[rows, task.positions[key]], ids)
    for i in range(B):
        io, s = tok.decode([int(task.answers[i])]), tok.decode([int(task.wrong_answers[i])])
        assert io.startswith(" ") and io.strip() in tasks.IOI_NAMES and s.strip() in tasks.IOI_NAMES and io != s
        assert task.clean_prompts[i].count(s) == 2 and task.clean_prompts[i].count(io) == 1
    # several templates, both orders (ABBA: IO named first)
    assert len(task.info["templates"]) >= 6
    assert set(task.info["orders"]) == {"ABBA", "BABA"}
    abba = torch.tensor([o == "ABBA" for o in task.info["orders"]])
    assert torch.equal(task.positions["IO"] < task.positions["S1"], abba)
    # abc: only S2 changes, to a third name
    assert _diff_positions(task) == [[int(p)] for p in task.positions["S2"]]
    c = task.corrupted_tokens[rows, task.positions["S2"]]
    assert not bool(((c == task.answers) | (c == task.wrong_answers)).any())


def test_ioi_corruptions_and_determinism(tiny):
    flip = tasks.ioi(tiny, 12, corruption="flip", seed=3)
    rows = torch.arange(12)
    p = flip.positions
    assert _diff_positions(flip) == [sorted([int(p["IO"][i]), int(p["S1"][i]), int(p["S2"][i])]) for i in rows]
    assert torch.equal(flip.corrupted_tokens[rows, p["IO"]], flip.wrong_answers)
    assert torch.equal(flip.corrupted_tokens[rows, p["S2"]], flip.answers)
    xyz = tasks.ioi(tiny, 12, corruption="xyz", seed=3)
    assert torch.equal(xyz.clean_tokens, flip.clean_tokens)  # same seed, same clean prompts
    assert all(len(d) == 3 for d in _diff_positions(xyz))
    assert torch.equal(tasks.ioi(tiny, 12, seed=3).clean_tokens, flip.clean_tokens)
    assert not torch.equal(tasks.ioi(tiny, 12, seed=4).clean_tokens, flip.clean_tokens)
    baba = tasks.ioi(tiny, 6, order="BABA")
    assert set(baba.info["orders"]) == {"BABA"} and bool((baba.positions["S1"] < baba.positions["IO"]).all())


def test_ioi_from_a_tokenizer_and_user_templates(tiny):
    one = ["Then, {S} and {IO} went to the {PLACE}. {S} gave a {OBJECT} to",
           "Later, {S} and {IO} went to the {PLACE}. {S} gave a {OBJECT} to"]
    task = tasks.ioi(tiny.tokenizer, 4, templates=one, names=["Mary", "John", "Alice", "Xqzxqzxq"])
    assert task.device == torch.device("cpu") and sorted(task.info["templates"]) == sorted(one)
    assert "Xqzxqzxq" not in task.info["names"]  # not a single token: dropped
    with pytest.raises(PromptMismatchError, match="different token lengths"):
        tasks.ioi(tiny, 4, templates=[one[0], "While {S} and {IO} were having a long lunch at the {PLACE}, {S} said to"])
    with pytest.raises(InputError, match="needs one"):
        tasks.ioi(tiny, 4, templates=["Then, {S} and {IO} went home. Then they said to"])
    with pytest.raises(InputError, match="slots are"):
        tasks.ioi(tiny, 4, templates=["Then, {S} and {IO} met {WHO}. {S} gave it to"])
    with pytest.raises(InputError, match="Unknown IOI corruption"):
        tasks.ioi(tiny, 4, corruption="abb")
    with pytest.raises(TokenizerError, match="single tokens"):
        tasks.ioi(tiny, 4, names=["Mary", "Xqzxqzxq", "Yqzyqzyq"])


def test_logit_diff_metric_is_the_formula_and_differentiable(tiny):
    task = tasks.ioi(tiny, 5)
    B, T = task.clean_tokens.shape
    logits = torch.randn(B, T, tiny.cfg.d_vocab, requires_grad=True)
    rows = torch.arange(B)
    want = logits[rows, T - 1, task.answers] - logits[rows, T - 1, task.wrong_answers]
    torch.testing.assert_close(task.metric_per_prompt(logits), want)
    task.metric(logits).backward()
    grad = logits.grad
    assert torch.equal(grad[rows, T - 1, task.answers], torch.full((B,), 1 / B))
    assert grad.abs().sum() == pytest.approx(2.0)  # +1/B and -1/B per row, nothing elsewhere
    with pytest.raises(InputError, match="metric needs the logits"):
        task.metric(logits[:, :-1])


def test_baseline_runs_the_model(tiny):
    task = tasks.ioi(tiny, 4)
    base = task.baseline(tiny)
    with torch.no_grad():
        assert base.clean == pytest.approx(float(task.metric(tiny(task.clean_tokens))), abs=1e-5)
        assert base.corrupted == pytest.approx(float(task.metric(tiny(task.corrupted_tokens))), abs=1e-5)


# ------------------------------------------------------------------------------ other tasks


def test_factual_recall(tiny):
    task = tasks.factual_recall(tiny)
    tok = tiny.tokenizer
    assert len(task) >= 20 and task.clean_prompts[0] == "The capital of France is"
    assert tok.decode([int(task.answers[0])]) == " Paris"
    assert _diff_positions(task) == [[int(p)] for p in task.positions["subject"]]
    assert not bool((task.answers == task.wrong_answers).any())
    lang = tasks.factual_recall(tiny, 3, relation="language")
    assert len(lang) == 3 and lang.clean_prompts[0] == "The official language of France is"
    with pytest.raises(InputError, match="relations: capital, language"):
        tasks.factual_recall(tiny, relation="currency")


def test_greater_than_digit_mode(tiny):
    task = tasks.greater_than(tiny, 16, seed=1)
    tok = tiny.tokenizer
    assert task.info["mode"] == "digit"  # SmolLM2 splits numbers into digits
    assert [tok.decode([int(t)]) for t in task.year_tokens] == [str(d) for d in range(10)]
    B, T = task.clean_tokens.shape
    for i, (noun, cc, yy) in enumerate(task.info["rows"]):
        assert task.clean_prompts[i] == f"The {noun} lasted from the year {cc}{yy:02d} to the year {cc}"
        assert yy % 10 == 9 and 1 <= yy // 10 <= 8
        assert task.greater[i].tolist() == [d > yy // 10 for d in range(10)]
    assert all(len(d) == 1 for d in _diff_positions(task))  # only the start year's tens digit
    # all probability on digit 9 (always a later year) gives +1; on digit 0, -1
    logits = torch.full((B, T, tiny.cfg.d_vocab), -1e4)
    logits[:, -1, task.year_tokens[9]] = 0.0
    torch.testing.assert_close(task.metric_per_prompt(logits), torch.ones(B))
    logits[:, -1, task.year_tokens[0]] = 50.0
    torch.testing.assert_close(task.metric_per_prompt(logits), -torch.ones(B))


def test_greater_than_two_digit_mode():
    """A tokenizer with one token per two-digit number (GPT-2 style) gets the paper's design."""
    from tokenizers import Regex, Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = "The lasted from the year to war".split() + [f"{i:02d}" for i in range(100)] + ["17"]
    tk = Tokenizer(models.WordLevel({w: i for i, w in enumerate(["<unk>", *dict.fromkeys(words)])}, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Whitespace(),
                                                pre_tokenizers.Split(Regex(r"\d\d"), behavior="isolated")])
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, unk_token="<unk>")
    task = tasks.greater_than(tok, 8, seed=0)
    assert task.info["mode"] == "two_digit" and len(task.year_tokens) == 100
    yy = torch.tensor([y for _, _, y in task.info["rows"]])
    assert torch.equal(task.greater, torch.arange(100)[None] > yy[:, None])
    assert all(p.endswith("from the year 1701 to the year 17") for p in task.corrupted_prompts)


def test_induction_task(tiny):
    task = tasks.induction(tiny, 3, seq_len=6, seed=0)
    clean, corrupted = task.clean_tokens, task.corrupted_tokens
    assert clean.shape == corrupted.shape == (3, 13)
    assert torch.equal(clean[:, 1:7], clean[:, 7:]) and torch.equal(corrupted[:, 7:], clean[:, 7:])
    assert not bool(torch.isin(corrupted[:, 1:7], clean[:, 1:7]).any())  # nothing to copy from
    assert torch.equal(task.answer_pos[0], torch.arange(7, 12)) and torch.equal(task.answers, clean[:, 2:7])
    # a model that predicts the next token perfectly gets log-prob 0
    logits = torch.full((3, 13, tiny.cfg.d_vocab), -1e4)
    logits[:, :-1].scatter_(-1, clean[:, 1:, None], 0.0)
    torch.testing.assert_close(task.metric(logits), torch.tensor(0.0))
    with torch.no_grad():
        logp = tiny(clean).log_softmax(-1)
    want = torch.stack([logp[:, p, clean[:, p + 1]].diagonal() for p in range(7, 12)], 1).mean(1)
    with torch.no_grad():
        torch.testing.assert_close(task.metric_per_prompt(tiny(clean)), want)


# ------------------------------------------------------------------------------ the real SmolLM2


@pytest.fixture(scope="module")
def smollm2():
    from mechscope import HookedTransformer

    return HookedTransformer.from_pretrained("smollm2")


@pytest.mark.slow
def test_smollm2_ioi_factual_recall_and_greater_than(smollm2):
    ioi = tasks.ioi(smollm2, 16, seed=0)
    with torch.no_grad():
        per_prompt = ioi.metric_per_prompt(smollm2(ioi.clean_tokens))
    assert per_prompt.mean() > 2.0  # measured 4.05; the corrupted (ABC) prompts give 0.32
    assert (per_prompt > 0).float().mean() >= 0.75
    facts = tasks.factual_recall(smollm2, 4)  # France, Germany, Italy, Spain
    with torch.no_grad():
        logits = smollm2(facts.clean_tokens)
    assert smollm2.tokenizer.decode([int(logits[0, -1].argmax())]) == " Paris"
    assert facts.metric(logits) > 0
    gt = tasks.greater_than(smollm2, 8)
    base = gt.baseline(smollm2)
    assert base.clean > base.corrupted  # measured 0.94 vs -0.89 on 32 prompts
