"""The report folder: one owner (a model), one cached folder per stage, nothing mixed.

    OUT/report.json                    who made the folder (model identity) and the settings of the last run
    OUT/index.html                     the report (self-contained)
    OUT/artifacts/<stage>/stage.json   the stage's key and its small JSON result: present = stage done
    OUT/artifacts/<stage>/.stage_key   written when a stage starts: a folder with another key is stale

A stage's key is a mechscope.steps.step_key of its settings and the identity of its inputs (the model
identity and the keys of the stages it reads), so
changing --tokens re-runs the SAE stages but not the head detectors, and a second run with the
same settings only re-renders the page. Interrupted stages resume inside their folder (the harvest,
the SAE trainer and the feature pass checkpoint themselves); a folder left by an older key is
deleted before the stage runs again (it is ours: report.json says so).
"""

from __future__ import annotations

import json
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from mechscope.errors import ArtifactMismatchError
from mechscope.fileio import atomic_write_json
from mechscope.models.identity import same_model
from mechscope.steps import done, forget, mark_done
from mechscope.validate import writable_dir

REPORT_FILE = "report.json"
STAGE_FILE = "stage.json"
KEY_FILE = ".stage_key"


def check_writable(out: Path) -> None:
    """Create `out` (and parents) and prove a file can be written there, before hours of work."""
    writable_dir(out, what="report folder")


class ReportFolder:
    """OUT, claimed for one model. Refuses a folder made for another model or a folder that is not a report."""

    def __init__(self, out: str | Path, identity: dict[str, Any], *, overwrite: bool = False) -> None:
        self.out = Path(out)
        check_writable(self.out)
        self.identity = identity
        self.artifacts = self.out / "artifacts"
        meta = self.out / REPORT_FILE
        if meta.exists():
            try:
                old = json.loads(meta.read_text())["model_identity"]
            except (ValueError, KeyError, TypeError):
                old = None
            # the model by content (config + weights), never by the path string it was named with
            if not isinstance(old, dict) or same_model(old, identity) is not None:
                if not overwrite:
                    was = old.get("name") if isinstance(old, dict) else "an unreadable report.json"
                    raise ArtifactMismatchError(
                        f"{str(self.out)!r} holds a report of another model ({was}), not of {identity.get('name')}; "
                        "artifacts of two models are never mixed. Choose another --out, or pass --overwrite to "
                        "delete the old report's artifacts and rebuild.")
                self._clear()
        elif any(p.name != ".gitkeep" for p in self.out.iterdir()):
            raise ArtifactMismatchError(
                f"{str(self.out)!r} is not empty and is not a mechscope report (no {REPORT_FILE}); the report would "
                "overwrite files there. Choose an empty or new --out.")
        self.artifacts.mkdir(exist_ok=True)
        atomic_write_json(meta, {"model_identity": identity, "updated": time.strftime("%Y-%m-%d %H:%M:%S")})

    def _clear(self) -> None:
        shutil.rmtree(self.artifacts, ignore_errors=True)
        for name in ("index.html", REPORT_FILE):
            (self.out / name).unlink(missing_ok=True)

    def is_done(self, name: str, key: str) -> bool:
        """Whether stage `name` finished under `key` (its cached result can be used)."""
        return done(self.artifacts / name, key, name=STAGE_FILE) is not None

    def forget(self, name: str) -> None:
        """Make stage `name` run again next time (e.g. its output was deleted); its folder is reused."""
        forget(self.artifacts / name, name=STAGE_FILE)

    def stage(self, name: str, key: str, build: Callable[[Path], dict[str, Any]], *,
              log: Callable[[str], None] = print) -> dict[str, Any]:
        """Run build(folder) -> JSON-able result once per key; later calls return the cached result."""
        folder = self.artifacts / name
        record = done(folder, key, name=STAGE_FILE)  # None also for a damaged stage.json: rebuild the stage
        if record is not None:
            log(f"[{name}] cached ({record.seconds:.0f} s when built)")
            return record.result
        marker = folder / KEY_FILE
        if folder.exists() and (not marker.exists() or marker.read_text().strip() != key):
            shutil.rmtree(folder)  # built under other settings: stale
        folder.mkdir(parents=True, exist_ok=True)
        marker.write_text(key)
        log(f"[{name}] running")
        t0 = time.perf_counter()
        result = build(folder)
        seconds = time.perf_counter() - t0
        mark_done(folder, key, result, seconds=seconds, name=STAGE_FILE)
        log(f"[{name}] done in {seconds:.0f} s")
        return result
