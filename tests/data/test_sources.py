"""Text sources: every kind of input, splits, seeds, and a typed error for every way to get it wrong."""

from __future__ import annotations

import gzip
import json
import sys

import pytest

from mechscope.data import TextSource, text_source
from mechscope.data.sources import HFSource, split_of
from mechscope.errors import (
    CorpusNotFoundError,
    CorruptFileError,
    EmptyCorpusError,
    InputError,
    MissingDependencyError,
    UnknownFormatError,
)


def write_jsonl(path, rows, opener=open):
    with opener(path, "wt", encoding="utf-8") as f:
        for row in rows:
            f.write((row if isinstance(row, str) else json.dumps(row)) + "\n")


def test_txt_file_is_one_document_with_normalised_newlines(tmp_path):
    (tmp_path / "a.txt").write_bytes(b"\xef\xbb\xbfline one\r\nline two\rthree\n")
    src = text_source(tmp_path / "a.txt")
    assert list(src) == ["line one\nline two\nthree\n"]
    assert list(src) == list(src)  # re-iterable
    d = src.describe()
    assert d["kind"] == "file" and d["num_documents"] == 1 and d["split"] == "all"
    assert d["path"] == str(tmp_path / "a.txt")
    json.dumps(d)
    fp = d["fingerprint"]
    (tmp_path / "a.txt").write_text("something much longer than before")
    assert text_source(tmp_path / "a.txt").describe()["fingerprint"] != fp


def test_gzipped_txt_and_jsonl(tmp_path):
    with gzip.open(tmp_path / "a.txt.gz", "wt", encoding="utf-8") as f:
        f.write("hello gz")
    assert list(text_source(str(tmp_path / "a.txt.gz"))) == ["hello gz"]
    write_jsonl(tmp_path / "b.jsonl.gz", [{"text": "x"}, {"text": "y"}], opener=gzip.open)
    assert list(text_source(tmp_path / "b.jsonl.gz")) == ["x", "y"]


def test_jsonl_field_selection_and_errors(tmp_path):
    p = tmp_path / "d.jsonl"
    write_jsonl(
        p, [{"body": "first", "text": "no"}, "", {"body": "second"}, '"a bare string"', {"body": None}]
    )
    assert list(text_source(p, field="body")) == ["first", "second", "a bare string"]
    with pytest.raises(InputError, match=r"line 3: no field 'text'; keys present: \['body'\]"):
        list(text_source(p))
    write_jsonl(p, [{"text": "ok"}, {"text": 3}])
    with pytest.raises(InputError, match=r"line 2: field 'text' holds int"):
        list(text_source(p))
    write_jsonl(p, [{"text": "ok"}, {"text": "ok"}, '{"text": "broken'])
    with pytest.raises(CorruptFileError, match=r"line 3: invalid JSON"):
        list(text_source(p))


def test_json_list_of_strings_or_objects(tmp_path):
    p = tmp_path / "d.json"
    p.write_text(json.dumps(["a", {"text": "b"}, {"text": "  "}]))
    assert list(text_source(p)) == ["a", "b"]
    p.write_text(json.dumps({"text": "a"}))
    with pytest.raises(InputError, match="list of strings or objects"):
        list(text_source(p))
    p.write_text("[1, 2")
    with pytest.raises(CorruptFileError, match="invalid JSON"):
        list(text_source(p))


def test_folder_recursion_sorting_and_skipping(tmp_path):
    (tmp_path / "sub" / "deep").mkdir(parents=True)
    (tmp_path / ".git").mkdir()
    (tmp_path / "b.txt").write_text("B")
    (tmp_path / "a.md").write_text("A")
    (tmp_path / "sub" / "c.py").write_text("C")
    (tmp_path / "sub" / "deep" / "d.json").write_text(json.dumps(["D1", "D2"]))
    write_jsonl(tmp_path / "sub" / "a.jsonl", [{"text": "J"}])
    (tmp_path / "data.parquet").write_bytes(b"PAR1")
    (tmp_path / ".git" / "x.txt").write_text("hidden")
    src = text_source(tmp_path)
    # sorted relative paths: a.md, b.txt, sub/a.jsonl, sub/c.py, sub/deep/d.json
    assert list(src) == ["A", "B", "J", "C", "D1", "D2"]
    d = src.describe()
    assert d["kind"] == "folder" and d["field"] == "text" and d["num_documents"] is None


def test_empty_corpora(tmp_path):
    (tmp_path / "only.parquet").write_bytes(b"PAR1")
    with pytest.raises(EmptyCorpusError, match=r"no readable text files.*\.parquet \(1\).*\.jsonl"):
        text_source(tmp_path)
    (tmp_path / "empty.txt").write_text("")
    with pytest.raises(EmptyCorpusError, match="empty"):
        text_source(tmp_path / "empty.txt")  # eager: nothing to stream
    with pytest.raises(EmptyCorpusError, match="empty"):
        text_source(tmp_path)
    (tmp_path / "blank.txt").write_text(" \n\t\n")
    src = text_source(tmp_path)  # not known until read
    with pytest.raises(EmptyCorpusError, match="no non-empty documents"):
        list(src)
    with pytest.raises(EmptyCorpusError):
        list(text_source(["", "   "]))
    assert issubclass(EmptyCorpusError, InputError)


def test_unknown_format_and_missing_path(tmp_path):
    (tmp_path / "x.bin").write_bytes(b"\0\1")
    with pytest.raises(UnknownFormatError, match=r"'x.bin'.*Supported formats: .*\.jsonl\.gz.*\.txt"):
        text_source(tmp_path / "x.bin")
    with pytest.raises(CorpusNotFoundError, match="No such file or folder") as e:
        text_source(tmp_path / "nope.txt")
    assert isinstance(e.value, FileNotFoundError)
    with pytest.raises(CorpusNotFoundError, match=r"pass \[text\]"):
        text_source("The quick brown fox.")


def test_invalid_utf8_is_a_corrupt_file(tmp_path):
    (tmp_path / "bad.txt").write_bytes(b"ok \xff\xfe not utf8")
    with pytest.raises(CorruptFileError, match="not valid UTF-8"):
        list(text_source(tmp_path / "bad.txt"))


def test_seed_shuffles_document_order_deterministically(tmp_path):
    for i in range(30):
        (tmp_path / f"{i:02d}.txt").write_text(f"doc {i}")
    natural = list(text_source(tmp_path))
    assert natural == [f"doc {i}" for i in range(30)]
    s1 = list(text_source(tmp_path, seed=1))
    assert s1 == list(text_source(tmp_path, seed=1)) and s1 != natural and sorted(s1) == sorted(natural)
    assert list(text_source(tmp_path, seed=2)) != s1
    docs = [f"d{i}" for i in range(30)]
    l1 = list(text_source(docs, seed=1))
    assert l1 == list(text_source(docs, seed=1)) != docs and sorted(l1) == sorted(docs)
    assert text_source(docs, seed=1).describe()["seed"] == 1


def test_seed_shuffles_lines_of_jsonl(tmp_path):
    p = tmp_path / "d.jsonl"
    write_jsonl(p, [{"text": f"line {i}"} for i in range(40)])
    s1 = list(text_source(p, seed=7))
    assert s1 == list(text_source(p, seed=7)) != list(text_source(p))
    assert sorted(s1) == sorted(text_source(p))
    write_jsonl(tmp_path / "d.jsonl.gz", [{"text": "x"}], opener=gzip.open)
    with pytest.raises(InputError, match="gunzip"):
        text_source(tmp_path / "d.jsonl.gz", seed=1)


def test_one_shot_generator_second_iteration_is_an_error():
    src = text_source(d for d in ["a", "b"])
    assert list(src) == ["a", "b"]
    with pytest.raises(InputError, match="one-shot iterator"):
        list(src)
    with pytest.raises(InputError, match="Cannot shuffle"):
        text_source((d for d in ["a"]), seed=0)


def test_sequences_and_bad_iterables():
    src = text_source(("x", "y"))
    assert list(src) == list(src) == ["x", "y"]
    assert src.describe()["num_documents"] == 2
    with pytest.raises(InputError, match="Document 1 is a int"):
        list(text_source(["a", 1]))
    with pytest.raises(InputError, match="no stable order"):
        text_source({"a", "b"})
    with pytest.raises(InputError, match="Cannot read text from a int"):
        text_source(3)
    src = text_source(["a"])
    assert text_source(src) is src
    with pytest.raises(InputError, match="already a TextSource"):
        text_source(src, seed=1)


def test_split_by_name_hash_partitions(tmp_path):
    docs = [f"document number {i}" for i in range(200)]
    train, val = list(text_source(docs, split="train")), list(text_source(docs, split="validation"))
    assert sorted(train + val) == sorted(docs) and not set(train) & set(val) and 0 < len(val) < 30
    assert [split_of(f"#{i}") == "validation" for i in range(200)].count(True) == len(val)
    p = tmp_path / "d.jsonl"
    write_jsonl(p, [{"text": d} for d in docs])
    jt, jv = list(text_source(p, split="train")), list(text_source(p, split="validation"))
    assert sorted(jt + jv) == sorted(docs) and jv
    assert set(text_source(p, split="validation", seed=3)) == set(jv)  # split ignores the seed
    with pytest.raises(InputError, match="Unknown split 'test'"):
        text_source(docs, split="test")


def test_hf_dataset_needs_datasets(monkeypatch):
    monkeypatch.setitem(sys.modules, "datasets", None)  # import fails even where it is installed
    with pytest.raises(MissingDependencyError, match="pip install datasets") as e:
        text_source("hf:stas/openwebtext-10k")
    assert isinstance(e.value, ImportError)


class Dataset:
    """Just enough of datasets.Dataset: iterable rows, len, shuffle, info."""

    __module__ = "datasets.arrow_dataset"

    def __init__(self, rows):
        self.rows, self.split, self._fingerprint = rows, "train", "abc123"

    def __iter__(self):
        return iter(self.rows)

    def __len__(self):
        return len(self.rows)

    def shuffle(self, seed):
        return Dataset(self.rows[::-1])


def test_hf_dataset_object():
    ds = Dataset([{"text": "a", "id": 1}, {"text": "b", "id": 2}])
    src = text_source(ds)
    assert isinstance(src, HFSource) and isinstance(src, TextSource)
    assert list(src) == ["a", "b"]
    assert list(text_source(ds, seed=0)) == ["b", "a"]
    d = src.describe()
    assert (
        d["kind"] == "hf"
        and d["num_documents"] == 2
        and d["fingerprint"] == "abc123"
        and d["split"] == "train"
    )
    with pytest.raises(InputError, match=r"row 0: no field 'content'; keys present: \['text', 'id'\]"):
        list(text_source(ds, field="content"))
