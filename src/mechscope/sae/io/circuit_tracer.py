"""circuit-tracer's transcoder layouts on disk (read side; filled in below)."""

from __future__ import annotations

from pathlib import Path

from mechscope.errors import UnknownFormatError


def read(folder: Path, *, device=None, dtype=None):
    raise UnknownFormatError(f"No transcoders found in {folder}: looked for transcoders.json (mechscope).")
