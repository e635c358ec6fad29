"""Alignment verification: catch a planted behaviour from the inside (see checks, scenarios, page)."""

from mechscope.verify import checks, scenarios

__all__ = ["checks", "scenarios"]
