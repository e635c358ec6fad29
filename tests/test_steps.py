"""mechscope.steps: a step's key changes with its settings and inputs only; records are atomic JSON."""

from __future__ import annotations

import json

from mechscope.steps import done, forget, mark_done, step_key


def test_key_is_stable_and_sensitive():
    a = step_key({"tokens": 10, "k": 4}, {"model": {"config_hash": "x"}})
    assert a == step_key({"k": 4, "tokens": 10}, {"model": {"config_hash": "x"}})  # key order does not matter
    assert len(a) == 16 and int(a, 16) >= 0
    assert a != step_key({"tokens": 11, "k": 4}, {"model": {"config_hash": "x"}})  # a setting
    assert a != step_key({"tokens": 10, "k": 4}, {"model": {"config_hash": "y"}})  # an input
    # settings and inputs are separate documents: moving a value from one to the other is another step
    assert step_key({"a": 1}, {}) != step_key({}, {"a": 1})


def test_done_and_mark_done(tmp_path):
    assert done(tmp_path / "s", "k1") is None  # never ran (no folder)
    rec = mark_done(tmp_path / "s", "k1", {"n": 3}, seconds=1.5)
    assert rec.result == {"n": 3}
    got = done(tmp_path / "s", "k1")
    assert got is not None and got.result == {"n": 3} and got.seconds == 1.5
    assert done(tmp_path / "s", "k2") is None  # another key: not done
    assert not list((tmp_path / "s").glob(".*.tmp"))  # written atomically, no temp file left
    (tmp_path / "s" / "step.json").write_text("{not json")
    assert done(tmp_path / "s", "k1") is None  # a damaged record: run again
    mark_done(tmp_path / "s", "k1", name="stage.json", extra_field=1)
    assert json.loads((tmp_path / "s" / "stage.json").read_text())["extra_field"] == 1
    forget(tmp_path / "s", name="stage.json")
    assert done(tmp_path / "s", "k1", name="stage.json") is None
