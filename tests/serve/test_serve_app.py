"""The service's pieces in-process (fastapi TestClient, a stand-in generate function): the per-request timeout,
error isolation, the bounded queue and its Retry-After, the missing-extra error. The real server, real monitors,
the malformed-request sweep and the page are in test_serve_service.py."""

from __future__ import annotations

import sys
import threading
import time
from types import SimpleNamespace

import pytest
import torch

from mechscope.errors import InputError, MissingDependencyError
from mechscope.serve.engine import Engine, Job, QueueFullError, QueueTimeoutError

from conftest import make_tiny_lm


@pytest.fixture(scope="module")
def model():
    return make_tiny_lm(0)


def fake_generate(delay: float = 0.0, fail_on: str | None = None, crash_on: str | None = None):
    """A stand-in for model.generate(monitors=, on_token=) that honours the on_token contract."""

    def gen(prompt, max_new_tokens, monitors, on_token):
        if fail_on and fail_on in prompt:
            raise InputError("planted input error")
        if crash_on and crash_on in prompt:
            raise RuntimeError("planted crash")
        trace, stopped = [], None
        for i in range(max_new_tokens):
            time.sleep(delay)
            t = SimpleNamespace(index=i, position=3 + i, token_id=i, token=f" w{i}",
                                scores={m.name: float(i) for m in monitors}, fired={}, actions=[])
            trace.append(t)
            if on_token(t) is False:
                stopped = "cancelled"
                break
        return SimpleNamespace(text="".join(t.token for t in trace), trace=trace, alerts=[], stopped_by=stopped)

    return gen


def client(model, gen, **cfg):
    from fastapi.testclient import TestClient

    from mechscope.serve import ServeConfig, create_app

    return TestClient(create_app(model, [], ServeConfig(**cfg), generate_fn=gen))


def test_timeout_cuts_generation_at_a_token(model):
    c = client(model, fake_generate(delay=0.05), timeout_s=0.3)
    t0 = time.monotonic()
    r = c.post("/v1/generate", json={"prompt": "the cat", "max_new_tokens": 100})
    assert time.monotonic() - t0 < 3.0  # 100 tokens would take >= 5 s
    body = r.json()
    assert r.status_code == 200 and body["timed_out"] and body["stopped_by"] == "timeout"
    assert 1 <= body["n_tokens"] < 50  # ~6 at 0.05 s a token; fewer on a stalled machine
    assert c.get("/metrics").json()["timeouts"] == 1


def test_one_requests_error_does_not_touch_the_next(model):
    c = client(model, fake_generate(fail_on="boom", crash_on="crash"))
    r = c.post("/v1/generate", json={"prompt": "boom", "max_new_tokens": 3})
    assert r.status_code == 422 and "planted input error" in r.json()["detail"]
    r = c.post("/v1/generate", json={"prompt": "crash", "max_new_tokens": 3})  # a bug: 500 for it alone
    assert r.status_code == 500 and "planted crash" in r.json()["detail"]
    r = c.post("/v1/generate", json={"prompt": "the cat", "max_new_tokens": 3})
    assert r.status_code == 200 and r.json()["n_tokens"] == 3
    m = c.get("/metrics").json()
    assert m["generation_errors"] == 1 and m["generations"] == 1


def test_engine_bounded_queue_and_queue_timeout():
    gate = threading.Event()

    def blocked(prompt, n, monitors, on_token):
        gate.wait(10)
        return prompt

    eng = Engine(blocked, max_queue=2, timeout_s=30)
    far = time.monotonic() + 30
    futs = [eng.submit(Job(f"p{i}", 1, [], far)) for i in range(3)]  # 1 running + 2 waiting
    with pytest.raises(QueueFullError) as e:
        eng.submit(Job("p3", 1, [], far))
    assert 1 <= e.value.retry_after <= 60 and eng.metrics.rejected == 1
    late = None
    gate.set()
    assert [f.result(10) for f in futs] == ["p0", "p1", "p2"]
    late = eng.submit(Job("late", 1, [], time.monotonic() - 1))  # its deadline passed before it started
    with pytest.raises(QueueTimeoutError):
        late.result(10)
    t0 = time.monotonic()
    while eng.pending and time.monotonic() - t0 < 2:  # released by a done-callback, just after the result
        time.sleep(0.01)
    assert eng.pending == 0
    eng.close()


def test_streamed_events_match_the_json_response(model):
    import json

    c = client(model, fake_generate())
    with c.stream("POST", "/v1/generate/stream", json={"prompt": "the cat", "max_new_tokens": 4}) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        raw = r.read().decode()
    events = [(b.split("\n")[0][len("event: "):], json.loads(b.split("\n")[1][len("data: "):]))
              for b in raw.strip().split("\n\n")]
    assert [e for e, _ in events] == ["start", "token", "token", "token", "token", "done"]
    assert [d["token"] for e, d in events if e == "token"] == [t["token"] for t in events[-1][1]["trace"]]
    api = c.get("/openapi.json").json()  # the hand-parsed bodies are still documented
    body = api["paths"]["/v1/generate/stream"]["post"]["requestBody"]["content"]["application/json"]["schema"]
    assert set(body["properties"]) == {"prompt", "max_new_tokens", "monitors"} and body["required"] == ["prompt"]


def test_without_the_extra_a_typed_error(model, monkeypatch, capsys):
    from mechscope.cli import main
    from mechscope.serve import create_app

    monkeypatch.setitem(sys.modules, "fastapi", None)  # import fastapi now raises ImportError
    with pytest.raises(MissingDependencyError, match=r"mechscope\[serve\]"):
        create_app(model)
    assert main(["serve", "--model", "nonexistent-model", "--port", "0"]) == 2
    assert "mechscope[serve]" in capsys.readouterr().err


@pytest.mark.parametrize("argv", [["--port", "70000"], ["--max-queue", "-1"], ["--timeout", "0"],
                                  ["--max-new-tokens", "0"]])
def test_cli_serve_refuses_bad_options(argv, capsys):
    from mechscope.cli import main

    assert main(["serve", "--model", "nonexistent-model", *argv]) == 2
    assert "mechscope: error:" in capsys.readouterr().err


def test_inline_direction_monitor_validation(model):
    """POST /v1/monitors with an inline direction: shape, hook and key checks, before anything is added."""
    c = client(model, fake_generate(), api_key="k")
    key = {"X-API-Key": "k"}
    d = model.cfg.d_model
    base = {"kind": "direction", "name": "dir", "hook": "blocks.1.hook_resid_post", "threshold": 0.5}
    for body, status in [({**base, "direction": [1.0] * (d + 1)}, 422),
                         ({**base, "direction": [0.0] * d}, 422),
                         ({**base, "hook": "blocks.9.hook_resid_post", "direction": [1.0] * d}, 422),
                         ({**base, "hook": "blocks.1.attn.hook_q", "direction": [1.0] * d}, 422),
                         ({**base, "direction": [1.0] * d, "action": "explode"}, 422)]:
        r = c.post("/v1/monitors", json=body, headers=key)
        assert r.status_code == status and r.json()["detail"], (body, r.json())
    assert c.get("/v1/monitors").json() == []
    v = torch.randn(d, generator=torch.Generator().manual_seed(0)).tolist()
    assert c.post("/v1/monitors", json={**base, "direction": v}).status_code == 401
    r = c.post("/v1/monitors", json={**base, "direction": v}, headers=key)
    assert r.status_code == 201 and r.json()["added"] == ["dir"]
    assert c.post("/v1/monitors", json={**base, "direction": v}, headers=key).status_code == 409
    assert [m["name"] for m in c.get("/v1/monitors").json()] == ["dir"]
    assert c.delete("/v1/monitors/dir", headers=key).json()["monitors"] == []


def test_closing_a_stream_stops_its_generation(model):
    """A client that goes away mid-stream frees the worker at the next token (real uvicorn, in a thread)."""
    import httpx
    import uvicorn

    from mechscope.serve import ServeConfig, create_app

    app = create_app(model, [], ServeConfig(), generate_fn=fake_generate(delay=0.05))  # 100 tokens: 5 s
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning"))
    th = threading.Thread(target=server.run, daemon=True)
    th.start()
    try:
        t0 = time.monotonic()
        while not server.started and time.monotonic() - t0 < 30:
            time.sleep(0.05)
        port = server.servers[0].sockets[0].getsockname()[1]
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=30) as c:
            with c.stream("POST", "/v1/generate/stream", json={"prompt": "the cat", "max_new_tokens": 100}) as r:
                for line in r.iter_lines():
                    if line.startswith("event: token"):
                        break
            t0 = time.monotonic()
            while app.state.engine.pending and time.monotonic() - t0 < 5:
                time.sleep(0.02)
            assert app.state.engine.pending == 0 and time.monotonic() - t0 < 2.5
            assert c.post("/v1/generate", json={"prompt": "the cat", "max_new_tokens": 2}).status_code == 200
    finally:
        server.should_exit = True
        th.join(10)


def test_cli_serve_options_are_serveconfig():
    """`mechscope serve`'s limit options come from ServeConfig (one default, written once)."""
    from mechscope.cli import _parser
    from mechscope.options import config_from_args
    from mechscope.serve import ServeConfig

    sub = next(a for a in _parser()._actions if a.dest == "command").choices["serve"]
    assert config_from_args(ServeConfig, sub.parse_args([])) == ServeConfig()
    args = sub.parse_args(["--model", "m", "--port", "9", "--timeout", "2.5", "--max-queue", "0", "--api-key", "k"])
    assert config_from_args(ServeConfig, args) == ServeConfig(api_key="k", timeout_s=2.5, max_queue=0)
    with pytest.raises(InputError, match="max_new_tokens"):
        ServeConfig(max_new_tokens=0)


def test_graph_explorer_is_served_and_saves_back(model, tmp_path):
    """--graphs DIR: /graph lists the graphs, /graph/{name} is the explorer page, POST saves pins / supernodes
    (API key checked), and unknown names, other graphs and a server without --graphs get a 4xx with detail."""
    import json
    import shutil
    from pathlib import Path

    src = Path(__file__).parents[1] / "circuits" / "graphs" / "fixtures" / "circuit_tracer_graph.json"
    shutil.copy(src, tmp_path / "g1.json")
    c = client(model, fake_generate(), graphs=str(tmp_path), api_key="k")
    assert c.get("/graph").json() == {"graphs": ["g1"]}
    page = c.get("/graph/g1")
    assert page.status_code == 200 and "<html" in page.text.lower()
    assert 'src="http' not in page.text and 'href="http' not in page.text  # inline assets only
    doc = json.loads(src.read_text())
    ids = [n["node_id"] for n in doc["nodes"]][:2]
    doc["qParams"]["supernodes"] = [["my group", *ids]]
    body = json.dumps(doc)
    assert c.post("/graph/g1", content=body, headers={"Content-Type": "application/json"}).status_code == 401
    r = c.post("/graph/g1", content=body, headers={"Content-Type": "application/json", "X-API-Key": "k"})
    assert r.status_code == 204, r.text
    assert json.loads((tmp_path / "g1.json").read_text())["qParams"]["supernodes"] == [["my group", *ids]]
    doc["nodes"] = doc["nodes"][1:]  # another graph: refused, the file keeps its content
    r = c.post("/graph/g1", content=json.dumps(doc), headers={"Content-Type": "application/json", "X-API-Key": "k"})
    assert r.status_code == 422 and "detail" in r.json()
    for bad in ("nope", "..%2Fetc"):
        r = c.get(f"/graph/{bad}")
        assert 400 <= r.status_code < 500 and "detail" in r.json()
    r = client(model, fake_generate()).get("/graph/g1")
    assert r.status_code == 404 and "--graphs" in r.json()["detail"]
    with pytest.raises(InputError, match="--graphs"):
        from mechscope.serve import ServeConfig

        ServeConfig(graphs=str(tmp_path / "missing"))
