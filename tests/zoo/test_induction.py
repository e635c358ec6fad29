"""induction-2l: induction and previous-token heads form, English is learned, the folder loads back."""

from __future__ import annotations

import pytest
import torch

from mechscope import HookedTransformer, zoo
from mechscope.zoo.induction import _sotu, repeated_tokens, train_tokenizer


@pytest.fixture(scope="module")
def trained(induction_2l_folder, one_thread):
    """The default recipe, trained once per session (tests/conftest.py)."""
    return induction_2l_folder


@pytest.mark.slow
def test_induction_and_previous_token_heads_form(trained):
    model = zoo.load(trained)
    scores = zoo.induction_score(model)  # [n_layers, n_heads]
    prev = zoo.prev_token_score(model)
    assert scores.shape == prev.shape == (2, model.cfg.n_heads)
    assert scores[1].max() > 0.5  # a layer-1 induction head
    assert scores[0].max() < 0.2  # a single layer cannot do induction
    assert prev[0].max() > 0.3  # its layer-0 partner attends to the previous token
    m = model.zoo_extra["metrics"]
    torch.testing.assert_close(torch.tensor(m["induction_score"]), scores)
    assert m["switch_step"] is not None


@pytest.mark.slow
def test_it_learned_english(trained):
    m = zoo.load(trained).zoo_extra["metrics"]
    assert m["val_loss"] < m["unigram_val_loss"] - 0.5  # context helps: better than unigram by a margin


@pytest.mark.slow
def test_folder_loads_with_its_tokenizer(trained):
    model = HookedTransformer.from_pretrained(str(trained))
    tok = model.tokenizer
    assert tok is not None and len(tok) == model.cfg.d_vocab
    tokens = model.to_tokens("The state of the Union is strong.")
    assert tokens[0, 0].item() == tok.bos_token_id  # BOS is prepended, as in training
    assert model.to_string(tokens[0, 1:]) == "The state of the Union is strong."
    again = zoo.load(trained)
    x = repeated_tokens(2, 20, model.cfg.d_vocab, tok.bos_token_id, seed=3)  # [2, 41]
    with torch.no_grad():
        assert torch.equal(model(x), again(x))


def test_tokenizer_training_is_deterministic():
    docs = _sotu("train")[:30]
    a = train_tokenizer(docs, vocab_size=512, chars_per_doc=5_000)
    b = train_tokenizer(docs, vocab_size=512, chars_per_doc=5_000)
    assert a.backend_tokenizer.to_str() == b.backend_tokenizer.to_str()
    assert len(a) == 512 and a.bos_token == a.eos_token == "<|endoftext|>"


@pytest.mark.slow
def test_interrupted_run_resumes_to_the_same_weights(tmp_path, one_thread):
    # switch_score 0: the curriculum switches to prose at step 10, so the interrupt at step 17 falls
    # after the switch, and the resumed run must take the switch (and its tokenizer) from the checkpoint.
    # Same tokenizer settings as the fixture: the encoded corpus is memoised in-process.
    settings = dict(steps=40, check_every=10, switch_score=0.0, text_steps=15, checkpoint_every=10, progress=False)
    straight = zoo.train("induction-2l", tmp_path / "straight", **settings)
    out = tmp_path / "resumed"
    zoo.train("induction-2l", out, stop_after=17, **settings)
    assert (out / ".checkpoint" / "tokenizer.json").exists() and not (out / "model.safetensors").exists()
    zoo.train("induction-2l", out, **settings)
    assert (out / "model.safetensors").read_bytes() == (straight / "model.safetensors").read_bytes()
    assert (out / "tokenizer.json").read_bytes() == (straight / "tokenizer.json").read_bytes()
    assert zoo.load(out).zoo_extra["metrics"]["switch_step"] == 10
    assert zoo.load(out).zoo_extra["steps"] == 25
