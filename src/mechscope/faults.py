"""Test-only fault injection: kill this process at a named point, to test resuming from that exact kill.

Kill-and-rerun tests need to stop a harvest or a training at a precise moment (half-way through
writing the first shard, between a shard and its manifest, before the first checkpoint), which
timing a SIGKILL from outside cannot hit reliably. Setting the environment variable

    MECHSCOPE_TEST_KILL_AT=<point>[@<n>]

makes the process SIGKILL itself the n-th time (default: the first) it reaches `<point>`. Points:
`write:<file name>` (a file's bytes are in its temp file, not yet renamed: see
mechscope.fileio.atomic_write_bytes) and `step:<s>` (training has run s steps; nothing of step s is
saved yet). Never set it outside tests: the process dies without cleaning up, on purpose.
"""

from __future__ import annotations

import os
import signal

ENV = "MECHSCOPE_TEST_KILL_AT"
_seen: dict[str, int] = {}


def kill_point(point: str) -> None:
    """SIGKILL this process if MECHSCOPE_TEST_KILL_AT names `point` (and this is its n-th visit)."""
    want = os.environ.get(ENV)
    if not want:
        return
    name, _, nth = want.partition("@")
    if name != point:
        return
    _seen[point] = _seen.get(point, 0) + 1
    if _seen[point] == int(nth or 1):
        os.kill(os.getpid(), signal.SIGKILL)


__all__ = ["ENV", "kill_point"]
