"""ActivationCache (placeholder; being written)."""
from __future__ import annotations


class ActivationCache(dict):
    def __init__(self, store, model, has_batch_dim=True):
        super().__init__(store)
        self.model = model
        self.has_batch_dim = has_batch_dim
