"""Text sources: documents (str) streamed lazily from files, folders, built-in corpora, Python
iterables and Hugging Face datasets.

A `TextSource` is re-iterable (every `iter()` starts again from the first document) and never holds
the whole corpus in memory, so a harvest can resume by re-reading it. `describe()` returns JSON that
activation-store manifests record, so every tensor on disk says which text produced it.

Splits never depend on order or seed: a document belongs to "validation" when a hash of its name
(relative path, or `path:line` / `#index` for multi-document files and lists) is 0 mod 20 (~5%).
"""

from __future__ import annotations

import gzip
import hashlib
import json
import os
import random
import zlib
from array import array
from collections.abc import Iterable, Iterator, Mapping, Sequence, Set
from pathlib import Path
from typing import Any, BinaryIO

from mechscope.errors import (
    CorpusNotFoundError,
    CorruptFileError,
    EmptyCorpusError,
    InputError,
    MissingDependencyError,
    UnknownFormatError,
)

SPLITS = ("train", "validation", "all")
VALIDATION_EVERY = 20  # 1 in 20 names goes to validation
# Longest suffixes first so that "x.jsonl.gz" is not taken for ".gz".
FORMATS = (".jsonl.gz", ".txt.gz", ".jsonl", ".json", ".txt", ".md", ".py")
_ONE_DOC_FORMATS = (".txt.gz", ".txt", ".md", ".py")  # the whole file is one document
_SKIP_DIRS = {"__pycache__"}


# ----------------------------------------------------------------------------- helpers


def split_of(name: str) -> str:
    """'validation' for ~1 in 20 names, else 'train'. A hash of the name alone, so membership never
    changes with iteration order, seed, or which other documents exist."""
    h = int.from_bytes(hashlib.sha1(name.encode("utf-8")).digest()[:8], "big")
    return "validation" if h % VALIDATION_EVERY == 0 else "train"


def _in_split(name: str, split: str) -> bool:
    return split == "all" or split_of(name) == split


def check_split(split: str) -> str:
    """Validate a split name (a typed error instead of silently yielding nothing)."""
    if split not in SPLITS:
        raise InputError(f"Unknown split {split!r}; choose one of {', '.join(SPLITS)}.")
    return split


def format_of(name: str) -> str | None:
    """The supported format (one of FORMATS) that a file name ends with, else None."""
    lower = name.lower()
    return next((f for f in FORMATS if lower.endswith(f)), None)


def _fingerprint(pairs: Iterable[tuple[str, int]]) -> str:
    """sha1 over sorted (name, size) pairs: cheap (no reading) and stable across machines."""
    h = hashlib.sha1()
    for name, size in sorted(pairs):
        h.update(f"{name}\0{size}\n".encode())
    return h.hexdigest()


def _decode(data: bytes, where: str) -> str:
    """UTF-8 (a leading BOM dropped), line endings normalised to '\\n'."""
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise CorruptFileError(
            f"{where} is not valid UTF-8 (byte {e.start}); re-encode it as UTF-8."
        ) from None
    if text.startswith("\ufeff"):
        text = text[1:]
    if "\r" in text:
        text = text.replace("\r\n", "\n").replace("\r", "\n")
    return text


def _open_binary(path: Path) -> BinaryIO:
    return gzip.open(path, "rb") if path.name.lower().endswith(".gz") else open(path, "rb")


def _read_bytes(path: Path) -> bytes:
    try:
        with _open_binary(path) as f:
            return f.read()
    except (OSError, EOFError, zlib.error) as e:
        raise CorruptFileError(f"Cannot read {path}: {e}") from None


def _text_of(obj: Any, field: str, where: str) -> str:
    """The document in one JSON record: a bare string, or obj[field]; None counts as empty."""
    if isinstance(obj, str):
        return obj
    if isinstance(obj, Mapping):
        if field not in obj:
            keys = ", ".join(repr(k) for k in list(obj)[:20])
            raise InputError(
                f"{where}: no field {field!r}; keys present: [{keys}]. Pass field=... to choose one."
            )
        value = obj[field]
        if value is None:
            return ""
        if not isinstance(value, str):
            raise InputError(f"{where}: field {field!r} holds {type(value).__name__}, not text.")
        return value
    raise InputError(
        f"{where}: expected a string or an object with field {field!r}, got {type(obj).__name__}."
    )


def _shuffled(items: Sequence[Any], seed: int | None, salt: str = "") -> list[Any]:
    """A deterministic permutation (random.Random seeded with a str is hashed with sha512, so it does
    not depend on PYTHONHASHSEED)."""
    items = list(items)
    if seed is not None:
        random.Random(f"{seed}:{salt}").shuffle(items)
    return items


# ----------------------------------------------------------------------------- sources


class TextSource:
    """Re-iterable stream of documents. Subclasses implement `_documents()`; iteration skips empty and
    whitespace-only documents and raises EmptyCorpusError at the end if nothing was yielded (a stream
    cannot know earlier)."""

    kind = "text"

    def __init__(self, name: str, *, split: str = "all", seed: int | None = None, field: str | None = None):
        self.name = name
        self.split = check_split(split)
        if seed is not None and not isinstance(seed, int):
            raise InputError(f"seed must be an int or None, got {type(seed).__name__}.")
        self.seed = seed
        self.field = field

    def _documents(self) -> Iterator[str]:
        raise NotImplementedError

    def __iter__(self) -> Iterator[str]:
        n = 0
        for doc in self._documents():
            if not doc or doc.isspace():  # isspace stops at the first non-space: no copy, O(1) for prose
                continue
            n += 1
            yield doc
        if n == 0:
            raise EmptyCorpusError(
                f"Text source {self.name!r} (split {self.split!r}) has no non-empty documents."
            )

    @property
    def num_documents(self) -> int | None:
        """Number of documents (empty ones included) when known without reading; else None."""
        return None

    def fingerprint(self) -> str | None:
        """A cheap content fingerprint, or None when it would need reading everything."""
        return None

    def describe(self) -> dict[str, Any]:
        """JSON-able description recorded in activation-store manifests."""
        return {
            "kind": self.kind,
            "name": self.name,
            "field": self.field,
            "split": self.split,
            "seed": self.seed,
            "num_documents": self.num_documents,
            "fingerprint": self.fingerprint(),
        }

    def __repr__(self) -> str:
        n = self.num_documents
        return f"{type(self).__name__}({self.name!r}, split={self.split!r}, seed={self.seed}" + (
            f", {n} documents)" if n is not None else ")"
        )


class FileSource(TextSource):
    """Documents from a list of files under one root: .txt/.md/.py (and .txt.gz) are one document
    each; .jsonl(.gz) holds one JSON object (or string) per line; .json holds a list of them.

    With a seed, the file order is shuffled, and so are the documents inside each .json/.jsonl file
    (a plain .jsonl is indexed by line offsets; a gzipped one cannot be, and refuses a seed)."""

    kind = "files"

    def __init__(
        self,
        root: Path,
        files: Sequence[str],
        sizes: Sequence[int],
        *,
        name: str,
        kind: str = "files",
        split: str = "all",
        seed: int | None = None,
        field: str = "text",
        extra: dict[str, Any] | None = None,
    ):
        has_json = any(format_of(f) in (".jsonl", ".jsonl.gz", ".json") for f in files)
        super().__init__(name, split=split, seed=seed, field=field if has_json else None)
        self.kind = kind
        self.root = Path(root)
        self.files = list(files)
        self._field = field
        self._fingerprint = _fingerprint(zip(self.files, sizes))
        self._extra = dict(extra or {})
        if seed is not None:
            gz = [f for f in self.files if format_of(f) == ".jsonl.gz"]
            if gz:
                raise InputError(
                    f"Cannot shuffle the lines of gzipped {gz[0]!r} without reading it all into memory; "
                    "decompress it (gunzip) or pass seed=None."
                )

    @property
    def num_documents(self) -> int | None:
        if all(format_of(f) in _ONE_DOC_FORMATS for f in self.files):
            return sum(_in_split(f, self.split) for f in self.files)
        return None

    def fingerprint(self) -> str | None:
        return self._fingerprint

    def describe(self) -> dict[str, Any]:
        path = self.root / self.files[0] if self.kind == "file" else self.root
        return {**super().describe(), "path": str(path), **self._extra}

    def _documents(self) -> Iterator[str]:
        for rel in _shuffled(self.files, self.seed):
            fmt = format_of(rel)
            path = self.root / rel
            if fmt in _ONE_DOC_FORMATS:
                if _in_split(rel, self.split):
                    yield _decode(_read_bytes(path), str(path))
            elif fmt == ".json":
                yield from self._json_docs(path, rel)
            elif self.seed is not None:
                yield from self._jsonl_shuffled(path, rel)
            else:
                yield from self._jsonl_docs(path, rel)

    def _json_docs(self, path: Path, rel: str) -> Iterator[str]:
        try:
            items = json.loads(_decode(_read_bytes(path), str(path)))
        except json.JSONDecodeError as e:
            raise CorruptFileError(f"{path}: invalid JSON at line {e.lineno} ({e.msg}).") from None
        if not isinstance(items, list):
            raise InputError(
                f"{path}: a .json source must hold a list of strings or objects, not a {type(items).__name__}. "
                "For one object per line, use .jsonl."
            )
        for i in _shuffled(range(len(items)), self.seed, rel):
            if _in_split(f"{rel}#{i}", self.split):
                yield _text_of(items[i], self._field, f"{path} item {i}")

    def _parse_line(self, raw: bytes, path: Path, lineno: int) -> str:
        where = f"{path} line {lineno}"
        try:
            obj = json.loads(_decode(raw, where))
        except json.JSONDecodeError as e:
            raise CorruptFileError(f"{where}: invalid JSON ({e.msg}).") from None
        return _text_of(obj, self._field, where)

    def _jsonl_docs(self, path: Path, rel: str) -> Iterator[str]:
        try:
            with _open_binary(path) as f:
                for lineno, raw in enumerate(f, start=1):
                    if raw.strip() and _in_split(f"{rel}:{lineno}", self.split):
                        yield self._parse_line(raw, path, lineno)
        except (EOFError, zlib.error, gzip.BadGzipFile) as e:
            raise CorruptFileError(f"Cannot read {path}: {e}") from None

    def _jsonl_shuffled(self, path: Path, rel: str) -> Iterator[str]:
        offsets, linenos = array("q"), array("q")  # 16 bytes per line, not the lines themselves
        with open(path, "rb") as f:
            pos = 0
            for lineno, raw in enumerate(f, start=1):
                if raw.strip() and _in_split(f"{rel}:{lineno}", self.split):
                    offsets.append(pos)
                    linenos.append(lineno)
                pos += len(raw)
            for i in _shuffled(range(len(offsets)), self.seed, rel):
                f.seek(offsets[i])
                yield self._parse_line(f.readline(), path, linenos[i])


class SequenceSource(TextSource):
    """An in-memory sequence of strings (a list, a tuple): re-iterable, shufflable."""

    kind = "sequence"

    def __init__(self, docs: Sequence[str], *, split: str = "all", seed: int | None = None):
        super().__init__(f"<{type(docs).__name__} of {len(docs)} documents>", split=split, seed=seed)
        self.docs = docs

    @property
    def num_documents(self) -> int | None:
        if self.split == "all":
            return len(self.docs)
        return sum(_in_split(f"#{i}", self.split) for i in range(len(self.docs)))

    def fingerprint(self) -> str | None:
        h = hashlib.sha1()  # already in memory, so hashing the text itself is cheap enough
        for doc in self.docs:
            h.update(hashlib.sha1(str(doc).encode("utf-8", "surrogatepass")).digest())
        return h.hexdigest()

    def _documents(self) -> Iterator[str]:
        for i in _shuffled(range(len(self.docs)), self.seed):
            if _in_split(f"#{i}", self.split):
                doc = self.docs[i]
                if not isinstance(doc, str):
                    raise InputError(f"Document {i} is a {type(doc).__name__}, not str.")
                yield doc


class IterableSource(TextSource):
    """Any other iterable of strings. A one-shot iterator (e.g. a generator) works once; a second
    iteration raises InputError instead of silently yielding nothing."""

    kind = "iterable"

    def __init__(self, docs: Iterable[str], *, split: str = "all", seed: int | None = None):
        self.one_shot = iter(docs) is docs
        if seed is not None:
            raise InputError(
                "Cannot shuffle a streamed iterable (its documents are not known up front); "
                "pass a list, or seed=None."
            )
        super().__init__(f"<{type(docs).__name__}>", split=split, seed=seed)
        self.docs = docs
        self._consumed = False

    def _documents(self) -> Iterator[str]:
        if self.one_shot:
            if self._consumed:
                raise InputError(
                    f"Text source {self.name} is a one-shot iterator (e.g. a generator) that was already "
                    "consumed; pass a list or a file to iterate more than once."
                )
            self._consumed = True
        for i, doc in enumerate(self.docs):
            if not isinstance(doc, str):
                raise InputError(f"Document {i} is a {type(doc).__name__}, not str.")
            if _in_split(f"#{i}", self.split):
                yield doc


def is_hf_dataset(obj: Any) -> bool:
    """A `datasets.Dataset` / `IterableDataset` (checked by module, so `datasets` is never imported)."""
    return any(c.__module__.split(".")[0] == "datasets" for c in type(obj).__mro__)


class HFSource(TextSource):
    """A Hugging Face `datasets.Dataset` or `IterableDataset`; rows are dicts, text in `field`.
    The dataset object is already one split, so no name-hash split is applied."""

    kind = "hf"

    def __init__(
        self,
        dataset: Any,
        *,
        field: str = "text",
        seed: int | None = None,
        name: str | None = None,
        config: str | None = None,
        split: str | None = None,
    ):
        info = getattr(dataset, "info", None)
        name = (
            name or getattr(info, "dataset_name", None) or getattr(info, "builder_name", None) or "<dataset>"
        )
        super().__init__(name, seed=seed, field=field)
        self.split = str(split if split is not None else getattr(dataset, "split", None) or "all")
        self.config = config if config is not None else getattr(info, "config_name", None)
        self.dataset = dataset.shuffle(seed=seed) if seed is not None else dataset

    @property
    def num_documents(self) -> int | None:
        try:
            return len(self.dataset)
        except TypeError:  # IterableDataset
            return None

    def fingerprint(self) -> str | None:
        fp = getattr(self.dataset, "_fingerprint", None)
        return fp if isinstance(fp, str) else None

    def describe(self) -> dict[str, Any]:
        return {**super().describe(), "config": self.config}

    def _documents(self) -> Iterator[str]:
        for i, row in enumerate(self.dataset):
            yield _text_of(row, self.field or "text", f"{self.name} row {i}")


def hf_source(spec: str, *, field: str = "text", split: str = "train", seed: int | None = None) -> HFSource:
    """'hf:NAME[:CONFIG]' -> a streamed Hugging Face dataset (needs the optional `datasets` package)."""
    parts = spec[3:].split(":", 1)
    name, config = parts[0], (parts[1] if len(parts) > 1 else None)
    if not name:
        raise InputError(f"Bad dataset spec {spec!r}; write 'hf:NAME' or 'hf:NAME:CONFIG'.")
    try:
        import datasets
    except ImportError:
        raise MissingDependencyError(
            f"Reading {spec!r} needs the Hugging Face datasets package: pip install datasets"
        ) from None
    ds = datasets.load_dataset(name, config, split=split, streaming=True)
    return HFSource(ds, field=field, seed=seed, name=name, config=config, split=split)


def _list_folder(folder: Path) -> tuple[list[str], list[int], dict[str, int]]:
    """Supported files under `folder`, recursively, as sorted posix paths relative to it, with sizes.
    Hidden files/folders and __pycache__ are skipped; unknown extensions are counted, for messages."""
    files, sizes, unknown = [], [], {}
    for dirpath, dirnames, filenames in os.walk(folder):
        dirnames[:] = [d for d in dirnames if not d.startswith(".") and d not in _SKIP_DIRS]
        for fn in filenames:
            if fn.startswith("."):
                continue
            path = Path(dirpath, fn)
            if format_of(fn) is None:
                ext = "".join(path.suffixes[-2:]) or "(none)"
                unknown[ext] = unknown.get(ext, 0) + 1
                continue
            files.append(path.relative_to(folder).as_posix())
            sizes.append(path.stat().st_size)
    order = sorted(range(len(files)), key=files.__getitem__)
    return [files[i] for i in order], [sizes[i] for i in order], unknown


def path_source(
    path: str | os.PathLike, *, field: str = "text", split: str = "all", seed: int | None = None
) -> FileSource:
    """A file or folder on disk (see FORMATS)."""
    path = Path(path).expanduser()
    supported = ", ".join(FORMATS)
    if path.is_dir():
        files, sizes, unknown = _list_folder(path)
        if not files:
            skipped = ", ".join(f"{ext} ({n})" for ext, n in sorted(unknown.items()))
            raise EmptyCorpusError(
                f"Folder {path} holds no readable text files"
                + (f" (skipped unsupported: {skipped})" if skipped else "")
                + f". Supported formats: {supported}."
            )
        if sum(sizes) == 0:
            raise EmptyCorpusError(f"Every file under {path} is empty.")
        return FileSource(
            path, files, sizes, name=str(path), kind="folder", split=split, seed=seed, field=field
        )
    if path.is_file():
        if format_of(path.name) is None:
            raise UnknownFormatError(
                f"Cannot read text from {path.name!r} (format {''.join(path.suffixes) or 'unknown'}). "
                f"Supported formats: {supported}, a folder of them, a built-in corpus, 'hf:NAME', "
                "or a list of strings (convert other formats to .jsonl)."
            )
        size = path.stat().st_size
        if size == 0:
            raise EmptyCorpusError(f"File {path} is empty.")
        return FileSource(
            path.parent, [path.name], [size], name=str(path), kind="file", split=split, seed=seed, field=field
        )
    raise CorpusNotFoundError(
        f"No such file or folder: {str(path)!r}. A text source is a path ({supported}), a folder of them, "
        "a built-in corpus name (see mechscope.data.BUILTIN_CORPORA), 'hf:NAME[:CONFIG]', or a list of "
        "strings (to use a single text, pass [text])."
    )


def text_source(
    spec: Any,
    *,
    field: str = "text",
    split: str | None = None,
    seed: int | None = None,
) -> TextSource:
    """Turn anything that holds text into a TextSource.

    spec: a TextSource (returned as is); a built-in corpus name ("sotu", "python-stdlib", or the
    aliases "prose", "code"; a name wins over a same-named local path, write "./sotu" for the path);
    "hf:NAME[:CONFIG]"; a path to a file or folder (.txt/.md/.py = one document per file,
    .jsonl = one per line, .json = a list, .txt.gz / .jsonl.gz streamed); a `datasets` Dataset or
    IterableDataset; a list/tuple of str (re-iterable); or any other iterable of str (a generator works once).
    field: the key holding the text in JSON records and dataset rows.
    split: "train", "validation" or "all". None means "train" for built-in corpora and hf: datasets
    (their natural default) and "all" for your own files and iterables (so nothing is silently dropped).
    seed: shuffle the document order deterministically (sources whose documents are known up front).
    """
    if isinstance(spec, TextSource):
        if seed is not None or split is not None:
            raise InputError("spec is already a TextSource; set seed and split when creating it.")
        return spec
    if isinstance(spec, (str, os.PathLike)):
        from mechscope.data.corpus import ALIASES, BUILTIN_CORPORA, builtin_corpus

        if isinstance(spec, str) and spec.startswith("hf:"):
            return hf_source(spec, field=field, split=split or "train", seed=seed)
        if isinstance(spec, str) and (spec in BUILTIN_CORPORA or spec in ALIASES):
            return builtin_corpus(spec, split=split or "train", seed=seed)
        return path_source(spec, field=field, split=split or "all", seed=seed)
    if is_hf_dataset(spec):
        return HFSource(spec, field=field, seed=seed, split=split)
    if isinstance(spec, (bytes, bytearray)):
        raise InputError("Text sources take str documents; decode bytes first.")
    if isinstance(spec, (Set, Mapping)):
        raise InputError(f"A {type(spec).__name__} has no stable order; pass a list (e.g. sorted(...)).")
    if isinstance(spec, Sequence):
        return SequenceSource(spec, split=split or "all", seed=seed)
    if isinstance(spec, Iterable):
        return IterableSource(spec, split=split or "all", seed=seed)
    raise InputError(
        f"Cannot read text from a {type(spec).__name__}. Pass a path, a built-in corpus name, 'hf:NAME', "
        "a datasets Dataset, or a list of strings."
    )
