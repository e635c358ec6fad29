"""ServeConfig: the service's limits, one dataclass for the Python API and `mechscope serve`'s options.

No FastAPI here, so the CLI can build its parser (and check the options) without the `serve` extra.
"""

from __future__ import annotations

from dataclasses import dataclass

from mechscope.options import option
from mechscope.validate import count, finite_float, positive_int


@dataclass
class ServeConfig:
    """Limits and settings of one service (checked on construction: typed InputError)."""

    api_key: str | None = option(None, help="key required in the X-API-Key header to add / remove monitors "
                                             "(CLI default: $MECHSCOPE_API_KEY; without one these are open)")
    max_queue: int = option(8, help="requests that may wait behind the running one; more get 429 + Retry-After")
    timeout_s: float = option(60.0, flag="--timeout", help="seconds per request, queue wait included; generation "
                                                           "is cut at the next token")
    max_prompt_tokens: int = option(512, help="longer prompts get 422")
    max_new_tokens: int = option(256, help="the most a request may ask for (also bounded by the model's context)")
    max_body_bytes: int = option(1 << 20, help="larger request bodies get 413")
    graphs: str | None = option(None, help="folder of graph files written by `mechscope graph`: each served as an "
                                           "explorer page at /graph/{name} (pins and supernodes saved back by POST)")

    def __post_init__(self) -> None:
        if self.api_key is not None and (not isinstance(self.api_key, str) or not self.api_key):
            from mechscope.errors import InputError

            raise InputError("api_key must be a non-empty string (or None for no key).")
        self.max_queue = count("max_queue", self.max_queue, flag="--max-queue")
        self.timeout_s = finite_float("timeout_s", self.timeout_s, positive=True, flag="--timeout")
        for name in ("max_prompt_tokens", "max_new_tokens", "max_body_bytes"):
            setattr(self, name, positive_int(name, getattr(self, name), flag="--" + name.replace("_", "-")))
        if self.graphs is not None:
            from pathlib import Path

            from mechscope.errors import InputError

            if not Path(self.graphs).is_dir():
                raise InputError(f"--graphs {self.graphs!r} is not a folder; give the --out folder of `mechscope graph`.")
