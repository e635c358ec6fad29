"""Data flowing into models: text sources, built-in corpora, tokenization and packing."""

from mechscope.data.corpus import BUILTIN_CORPORA, builtin_corpus
from mechscope.data.packing import PackedContexts, contexts, pack
from mechscope.data.sources import TextSource, text_source

__all__ = [
    "BUILTIN_CORPORA",
    "PackedContexts",
    "TextSource",
    "builtin_corpus",
    "contexts",
    "pack",
    "text_source",
]
