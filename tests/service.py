"""`mechscope serve` in its own process for integration tests: uvicorn on 127.0.0.1 at a free port, waited for
through GET /health, stopped (and its log checked for tracebacks) on exit."""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def running_service(model: str | Path, args: list[str], log_dir: Path, start_timeout: float = 120) -> Iterator[str]:
    """Yield the base URL of `mechscope serve --model MODEL --port P *args`; fail the test if it never answers."""
    log = open(log_dir / "server.log", "w")  # noqa: SIM115 (closed below)
    for _attempt in range(2):  # a port taken between free_port and bind: one retry on another port
        port = free_port()
        cmd = [sys.executable, "-m", "mechscope.cli", "serve", "--model", str(model), "--port", str(port), *args]
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env={**os.environ, "MECHSCOPE_API_KEY": ""})
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + start_timeout
        while time.monotonic() < deadline and proc.poll() is None:
            try:
                if httpx.get(url + "/health", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                time.sleep(0.3)
        else:
            proc.kill()
            continue
        break
    else:
        log.close()
        pytest.fail("mechscope serve did not start:\n" + (log_dir / "server.log").read_text()[-3000:])
    try:
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()
        log.close()
        text = (log_dir / "server.log").read_text()
        assert "Traceback" not in text, text[-3000:]  # no request crashed anything in the server
