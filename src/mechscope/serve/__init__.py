"""`mechscope serve`: a local HTTP service for monitored generation (FastAPI + uvicorn, the `serve` extra).

    from mechscope.serve import ServeConfig, create_app, run_server
    app = create_app(model, monitors, ServeConfig(api_key="secret", max_queue=4))   # an ASGI app
    run_server(app, host="127.0.0.1", port=8000)                                     # blocks

FastAPI is imported only when an app is made, so `import mechscope` never needs the extra; without it
`create_app` raises MissingDependencyError saying what to install.
"""

from __future__ import annotations

from mechscope.errors import MissingDependencyError
from mechscope.serve.config import ServeConfig

__all__ = ["ServeConfig", "create_app", "run_server", "serve"]

_HINT = 'mechscope serve needs FastAPI and uvicorn: pip install "mechscope[serve]" (or: pip install fastapi uvicorn).'


def _require(module: str):
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError as e:
        raise MissingDependencyError(f"{_HINT} ({e})") from None


def create_app(model, monitors=(), config=None, generate_fn=None):
    """The FastAPI app serving `model` with `monitors` (see mechscope.serve.app.create_app)."""
    _require("fastapi")
    from mechscope.serve.app import create_app as make

    return make(model, monitors, config, generate_fn)


def run_server(app, host: str = "127.0.0.1", port: int = 8000, log_level: str = "info") -> None:
    """Serve `app` with uvicorn until interrupted (one process, one event loop)."""
    uvicorn = _require("uvicorn")
    uvicorn.run(app, host=host, port=port, log_level=log_level, timeout_graceful_shutdown=5)


def serve(model_name: str, *, host: str = "127.0.0.1", port: int = 8000, monitors_file: str | None = None,
          config=None, device=None, log_level: str = "info") -> None:
    """Load a model (and a monitors file) and serve it: what `mechscope serve` runs."""
    _require("fastapi")
    _require("uvicorn")
    from mechscope.models.loading import load_model

    model = load_model(model_name, device=device)
    monitors = []
    if monitors_file is not None:
        from mechscope import monitor

        monitors = list(monitor.load_monitors(monitors_file, model))
    run_server(create_app(model, monitors, config), host=host, port=port, log_level=log_level)
