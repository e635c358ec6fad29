"""Data flowing into models: text sources, built-in corpora, tokenization and packing."""

from mechscope.data.corpus import BUILTIN_CORPORA, builtin_corpus
from mechscope.data.harvest import HarvestConfig  # the function: mechscope.data.harvest.harvest
from mechscope.data.packing import PackedContexts, contexts, pack
from mechscope.data.sources import TextSource, text_source
from mechscope.data.stats import RunningStats
from mechscope.data.store import ActivationStore
from mechscope.data.stream import activation_stats, stream_batches

__all__ = [
    "ActivationStore",
    "HarvestConfig",
    "RunningStats",
    "activation_stats",
    "stream_batches",
    "BUILTIN_CORPORA",
    "PackedContexts",
    "TextSource",
    "builtin_corpus",
    "contexts",
    "pack",
    "text_source",
]
