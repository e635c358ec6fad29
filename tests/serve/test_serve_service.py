"""The real service: `mechscope serve` in a subprocess (uvicorn, 127.0.0.1, a free port) on a tiny model with two
saved direction monitors. Valid requests, >= 300 systematically generated malformed ones (each must get a 4xx
with a "detail" message, never a 5xx), a burst beyond the queue (429 + Retry-After, no hang), valid requests
succeeding throughout and after, and the page in headless Chromium."""

from __future__ import annotations

import json
import threading
import time

import httpx
import pytest
import torch

from browser import chromium_driver, console_errors
from service import running_service

KEY = "test-key-123"
HOOK = "blocks.1.hook_resid_post"
MAX_QUEUE, MAX_PROMPT, MAX_NEW, MAX_BODY = 2, 100, 64, 65_536
pytestmark = pytest.mark.slow  # ~45 s in all: the server's start (a subprocess importing torch) dominates


@pytest.fixture(scope="module")
def server(tiny_lm_folder, tmp_path_factory):
    """(base_url, monitor names, monitors file): the service running in its own process; stopped after the module."""
    from mechscope import monitor

    folder, model = tiny_lm_folder
    g = torch.Generator().manual_seed(0)
    v1, v2 = torch.randn(2, model.cfg.d_model, generator=g)  # [d_model] each
    ms = [monitor.DirectionMonitor("always", HOOK, v1, threshold=-1e6, action="alert"),  # fires at step 0
          monitor.DirectionMonitor("proj", "blocks.2.hook_resid_post", v2, threshold=0.0, action="record")]
    tmp = tmp_path_factory.mktemp("serve")
    mon_path = tmp / "monitors"
    monitor.save_monitors(mon_path, ms)
    args = ["--monitors", str(mon_path), "--api-key", KEY, "--max-queue", str(MAX_QUEUE), "--max-prompt-tokens",
            str(MAX_PROMPT), "--max-new-tokens", str(MAX_NEW), "--max-body-bytes", str(MAX_BODY), "--timeout", "60",
            "--threads", "1", "--log-level", "warning"]
    with running_service(folder, args, tmp) as url:
        yield url, [m.name for m in ms], str(mon_path)


def _valid(c: httpx.Client, n: int = 4) -> dict:
    r = c.post("/v1/generate", json={"prompt": "The cat sat on the", "max_new_tokens": n})
    assert r.status_code == 200, r.text
    return r.json()


def test_valid_requests(server):
    url, names, _ = server
    with httpx.Client(base_url=url, timeout=60) as c:
        h = c.get("/health").json()
        assert h["status"] == "ok" and h["monitors"] == names and h["n_ctx"] == 128
        mons = c.get("/v1/monitors").json()
        assert [m["name"] for m in mons] == names and mons[0]["threshold"] == -1e6 and mons[0]["hook"] == HOOK

        body = _valid(c, 6)
        assert body["monitors"] == names and 1 <= len(body["trace"]) <= 6
        assert all(set(t["scores"]) == set(names) for t in body["trace"])
        assert [a["monitor"] for a in body["alerts"]] == ["always"] and body["alerts"][0]["index"] == 0
        assert body["text"] and body["n_tokens"] == sum(t["token"] is not None for t in body["trace"])
        one = c.post("/v1/generate", json={"prompt": "The cat", "max_new_tokens": 3, "monitors": ["proj"]}).json()
        assert all(set(t["scores"]) == {"proj"} for t in one["trace"]) and one["alerts"] == []
        none = c.post("/v1/generate", json={"prompt": "The cat", "max_new_tokens": 3, "monitors": []}).json()
        assert all(t["scores"] == {} for t in none["trace"])

        # the stream: start, one token event per step (with scores), done == the JSON response
        with c.stream("POST", "/v1/generate/stream", json={"prompt": "The cat sat on the", "max_new_tokens": 6}) as r:
            assert r.status_code == 200
            raw = r.read().decode()
        events = [(b.split("\n")[0][7:], json.loads(b.split("\n")[1][6:])) for b in raw.strip().split("\n\n")]
        kinds = [e for e, _ in events]
        assert kinds[0] == "start" and kinds[-1] == "done" and set(kinds[1:-1]) == {"token"}
        done = events[-1][1]
        assert [d for e, d in events if e == "token"] == done["trace"]
        assert done["text"] == body["text"]  # greedy: the same completion both ways

        # add / remove a monitor (API key), generate with it
        v = torch.randn(h["d_model"], generator=torch.Generator().manual_seed(3)).tolist()
        spec = {"kind": "direction", "name": "added", "hook": HOOK, "direction": v, "threshold": 0.0}
        assert c.post("/v1/monitors", json=spec).status_code == 401
        r = c.post("/v1/monitors", json=spec, headers={"X-API-Key": KEY})
        assert r.status_code == 201, r.text
        assert "added" in [m["name"] for m in c.get("/v1/monitors").json()]
        got = c.post("/v1/generate", json={"prompt": "The cat", "max_new_tokens": 2, "monitors": ["added"]}).json()
        assert set(got["trace"][0]["scores"]) == {"added"}
        assert c.delete("/v1/monitors/added", headers={"X-API-Key": KEY}).status_code == 200
        # any monitor spec (as in monitors.json), here a direction
        sp = {"spec": {"kind": "direction", "name": "spec1", "hook": HOOK, "direction": v, "threshold": 0.5,
                       "action": "alert", "window": 2}}
        r = c.post("/v1/monitors", json=sp, headers={"X-API-Key": KEY})
        assert r.status_code == 201 and r.json()["added"] == ["spec1"], r.text
        assert c.delete("/v1/monitors/spec1", headers={"X-API-Key": KEY}).status_code == 200
        # a stop monitor that fires on the prompt blocks the first token: nothing is emitted
        stop = {**spec, "name": "stopper", "threshold": -1e6, "action": "stop"}
        assert c.post("/v1/monitors", json=stop, headers={"X-API-Key": KEY}).status_code == 201
        got = c.post("/v1/generate", json={"prompt": "The cat", "max_new_tokens": 5, "monitors": ["stopper"]}).json()
        assert got["stopped_by"] == "stopper" and got["text"] == "" and got["n_tokens"] == 0
        assert got["trace"][0]["token"] is None and got["alerts"][0]["action"] == "stop"
        assert c.delete("/v1/monitors/stopper", headers={"X-API-Key": KEY}).status_code == 200
        assert [m["name"] for m in c.get("/v1/monitors").json()] == names

        m = c.get("/metrics").json()
        assert m["generations"] >= 5 and m["alerts_by_monitor"]["always"] >= 2
        assert m["latency_s"]["p50"] > 0 and m["latency_s"]["p95"] >= m["latency_s"]["p50"]


def malformed_requests(mon_file: str) -> list[tuple[str, str, dict, bytes | None, int | None]]:
    """(method, path, headers, body, expected status or None for any 4xx), generated field by field."""
    J = {"Content-Type": "application/json"}
    K = {**J, "X-API-Key": KEY}
    out: list = []
    gen_paths = ("/v1/generate", "/v1/generate/stream")

    def body(d) -> bytes:
        return json.dumps(d).encode()

    # bad JSON (400), on every endpoint that takes a body
    bad_json = [b"{", b"}", b"{'prompt': 'x'}", b'{"prompt": "x",}', b'{"prompt": x}', b'{"prompt" "x"}', b"nul",
                b'{"prompt": "x"', b'{"prompt": "x"}}', b"\xff\xfe\x00", b'{"prompt": "\xff"}', b"[" * 5000 + b"]" * 5000,
                b'{"a": ' * 3000 + b"1" + b"}" * 3000, b"NaNx", b'{"prompt": "x", "max_new_tokens": 01}', b"\x00",
                b'{"prompt": "x" /* c */}', b"True", b'"unterminated', b"{}{}", b"   ", b""]
    for p in (*gen_paths, "/v1/monitors"):
        out += [("POST", p, K, b, None) for b in bad_json]  # 400 (a deep array may parse: then 422)
    # valid JSON but not an object (422)
    for p in (*gen_paths, "/v1/monitors"):
        for v in ([], 1, "x", None, True, [{"prompt": "x"}], 1.5):
            out.append(("POST", p, K, body(v), 422))
    # wrong types / values, field by field (422), unknown monitors (404)
    prompts = [None, 1, 1.5, True, [], {}, ["x"], "", {"text": "x"}]
    news = [None, "5", 5.5, True, False, [], {}, -1, 0, -(10**9), 10**9, 10**30, "NaN", MAX_NEW + 1, "1e3"]
    monitors = ["always", 1, [1], [None], {}, [["always"]], [True], [{"name": "always"}], "all"]
    for p in gen_paths:
        out += [("POST", p, J, body({"prompt": v, "max_new_tokens": 2}), 422) for v in prompts]
        out += [("POST", p, J, body({"prompt": "The cat", "max_new_tokens": v}), 422) for v in news]
        out += [("POST", p, J, b'{"prompt": "The cat", "max_new_tokens": 1e400}', 422)]
        out += [("POST", p, J, body({"prompt": "The cat", "max_new_tokens": 2, "monitors": v}), 422)
                for v in monitors]
        out += [("POST", p, J, body({"prompt": "The cat", "max_new_tokens": 2, "monitors": v}), 404)
                for v in (["nope"], ["always", "nope"], ["ALWAYS"], ["always "], [""])]
        out += [("POST", p, J, body({"prompt": "The cat", "max_new_tokens": 2, "monitors": ["always", "always"]}),
                 422)]
        # missing / unknown fields
        for d in ({}, {"max_new_tokens": 2}, {"monitors": []}, {"prompt": "x", "max_tokens": 2},
                  {"Prompt": "x"}, {"prompt": "x", "temperature": 0.5}, {"prompt": "x", "stream": True}):
            out.append(("POST", p, J, body(d), 422))
        # huge prompts (under the body limit, over the token limit), prompt + new over the context
        for words in (MAX_PROMPT + 1, 3 * MAX_PROMPT, 2000):
            out.append(("POST", p, J, body({"prompt": " cat" * words, "max_new_tokens": 2}), 422))
        out.append(("POST", p, J, body({"prompt": " cat" * (MAX_PROMPT - 10), "max_new_tokens": MAX_NEW}), 422))
        # text that cannot be tokenized: a lone surrogate
        out.append(("POST", p, J, b'{"prompt": "\\ud800 cat", "max_new_tokens": 2}', 422))
    # wrong content types (415)
    for p in (*gen_paths, "/v1/monitors"):
        for ct in ("text/plain", "application/x-www-form-urlencoded", "multipart/form-data; boundary=x",
                   "application/xml", "application/jsonx", "text/json", "", None):
            h = {"X-API-Key": KEY} | ({} if ct is None else {"Content-Type": ct})
            out.append(("POST", p, h, b'{"prompt": "The cat", "max_new_tokens": 2}', 415))
    # oversized bodies (413): declared length, and a chunked body without a length (the generator case below)
    for p in (*gen_paths, "/v1/monitors"):
        out.append(("POST", p, K, body({"prompt": "x" * (MAX_BODY + 10), "max_new_tokens": 2}), 413))
        out.append(("POST", p, K, "CHUNKED", 413))
    # unknown routes (404) and wrong methods (405)
    for m in ("GET", "POST", "PUT", "DELETE", "PATCH"):
        for p in ("/v1/generat", "/v2/generate", "/v1/monitors/a/b", "/admin", "/v1/generate/stream/x",
                  "/v1", "/health/x", "/metrics.json"):
            out.append((m, p, K, None, 404))
    for m, p in (("GET", "/v1/generate"), ("PUT", "/v1/generate"), ("DELETE", "/v1/generate"),
                 ("GET", "/v1/generate/stream"), ("POST", "/health"), ("DELETE", "/health"), ("POST", "/metrics"),
                 ("PUT", "/v1/monitors"), ("PATCH", "/v1/monitors"), ("DELETE", "/v1/monitors"),
                 ("POST", "/"), ("PUT", "/"), ("GET", "/v1/monitors/always"), ("POST", "/v1/monitors/always")):
        out.append((m, p, K, None, 405))
    # the API key on mutating endpoints (401)
    for h in (J, {**J, "X-API-Key": ""}, {**J, "X-API-Key": KEY + "x"}, {**J, "X-API-Key": KEY.upper()},
              {**J, "Authorization": f"Bearer {KEY}"}):
        out.append(("POST", "/v1/monitors", h, body({"file": mon_file}), 401))
        out.append(("DELETE", "/v1/monitors/always", h, None, 401))
    # monitor specs (with the key): 422 bad spec, 404 unknown file / name, 409 duplicate
    good = {"kind": "direction", "name": "n1", "hook": HOOK, "direction": [1.0] * 32, "threshold": 1.0}
    specs = [({}, 422), ({"kind": "direction"}, 422), ({**good, "kind": "probe"}, 422),
             ({**good, "direction": [1.0] * 31}, 422), ({**good, "direction": [0.0] * 32}, 422),
             ({**good, "direction": []}, 422), ({**good, "direction": ["a"] * 32}, 422),
             ({**good, "direction": 1.0}, 422), ({**good, "threshold": "high"}, 422), ({**good, "threshold": None}, 422),
             ({**good, "hook": "blocks.99.hook_resid_post"}, 422), ({**good, "hook": "nonsense"}, 422),
             ({**good, "action": "explode"}, 422), ({**good, "action": "steer"}, 422), ({**good, "window": 0}, 422),
             ({**good, "hysteresis": -1.0}, 422), ({**good, "name": ""}, 422), ({**good, "extra": 1}, 422),
             ({**good, "file": mon_file}, 422), ({"file": mon_file, "name": "x"}, 422),
             ({"file": "/nonexistent/monitors"}, 404), ({"file": mon_file, "names": ["zzz"]}, 404),
             ({"file": mon_file}, 409), ({**good, "name": "always"}, 409), ({"file": ""}, 422), ({"file": 3}, 422)]
    sgood = {"kind": "direction", "name": "s1", "hook": HOOK, "direction": [1.0] * 32, "threshold": 1.0}
    specs += [({"spec": {**sgood, "hook": "blocks.0.mlp.hook_post"}}, 422),  # width 64 != 32: the trial run
              ({"spec": {**sgood, "kind": "probe", "probe": "/nonexistent/probe"}}, 422),
              ({"spec": {**sgood, "kind": "feature", "sae": "/nonexistent/sae", "latents": [1]}}, 422),
              ({"spec": {**sgood, "kind": "nope"}}, 422), ({"spec": {}}, 422), ({"spec": {"kind": "direction"}}, 422),
              ({"spec": {**sgood, "direction": "vec"}}, 422), ({"spec": {**sgood, "threshold": "x"}}, 422),
              ({"spec": {**sgood, "hook": "nonsense"}}, 422), ({"spec": {**sgood, "action": "steer"}}, 422),
              ({"spec": "x"}, 422), ({"spec": [sgood]}, 422), ({"spec": sgood, "file": mon_file}, 422),
              ({"spec": sgood, "name": "x"}, 422), ({"spec": {**sgood, "name": "always"}}, 409)]
    out += [("POST", "/v1/monitors", K, body(s), st) for s, st in specs]
    out.append(("POST", "/v1/monitors", K, b'{"kind": "direction", "name": "n", "hook": "' + HOOK.encode()
                + b'", "direction": [1.0], "threshold": NaN}', 422))
    for name in ("nope", "ALWAYS", "always%20", "x" * 300):
        out.append(("DELETE", f"/v1/monitors/{name}", K, None, 404))
    return out


def _send(c: httpx.Client, req) -> httpx.Response:
    method, path, headers, content, _ = req
    if content == "CHUNKED":  # no Content-Length: the limit is enforced while reading
        def chunks():
            for _ in range(20):
                yield b'{"prompt": "' + b"x" * 8192
        return c.request(method, path, headers=headers, content=chunks())
    return c.request(method, path, headers=headers, content=content)


def test_malformed_requests_get_4xx_with_detail(server):
    url, names, mon_file = server
    reqs = malformed_requests(mon_file)
    assert len(reqs) >= 300, len(reqs)
    bad = []
    with httpx.Client(base_url=url, timeout=30) as c:
        for i, req in enumerate(reqs):
            r = _send(c, req)
            try:
                detail = r.json().get("detail")
            except (ValueError, AttributeError):
                detail = None
            expect = req[4]
            ok = 400 <= r.status_code < 500 and isinstance(detail, str) and detail.strip()
            if not ok or (expect is not None and r.status_code != expect):
                bad.append((req[0], req[1], str(req[3])[:80], expect, r.status_code, r.text[:200]))
            if i % 40 == 0:  # valid requests keep succeeding throughout
                _valid(c, 2)
        assert [m["name"] for m in c.get("/v1/monitors").json()] == names  # nothing was added or removed
        _valid(c, 3)
        m = c.get("/metrics").json()
    assert not bad, f"{len(bad)} of {len(reqs)} malformed requests were mishandled:\n" + "\n".join(map(str, bad[:30]))
    assert not any(s.startswith("5") for s in m["requests_by_status"]), m["requests_by_status"]


def test_burst_beyond_the_queue_gets_429_not_a_hang(server):
    url = server[0]
    n = 16
    results: list = [None] * n
    barrier = threading.Barrier(n)

    def one(i):
        with httpx.Client(base_url=url, timeout=60) as c:
            barrier.wait()
            t0 = time.monotonic()
            r = c.post("/v1/generate", json={"prompt": "The cat sat on the", "max_new_tokens": MAX_NEW})
            results[i] = (r.status_code, r.headers.get("retry-after"), time.monotonic() - t0, r.json())

    threads = [threading.Thread(target=one, args=(i,)) for i in range(n)]
    t0 = time.monotonic()
    for t in threads:
        t.start()
    for t in threads:
        t.join(90)
    assert all(not t.is_alive() for t in threads), "a burst request hung"
    statuses = [r[0] for r in results]
    assert set(statuses) <= {200, 429}, statuses
    assert statuses.count(200) >= 1 and statuses.count(429) >= n - (MAX_QUEUE + 1) - 4, statuses
    for status, retry, dt, body in results:
        if status == 429:
            assert retry is not None and int(retry) >= 1 and "queue is full" in body["detail"]
            assert dt < 5.0  # refused at once, not after waiting
        else:
            assert body["n_tokens"] >= 1
    assert time.monotonic() - t0 < 90
    with httpx.Client(base_url=url, timeout=60) as c:
        _valid(c, 4)  # and after
        m = c.get("/metrics").json()
        assert m["rejected_queue_full"] >= statuses.count(429) and m["queue"]["pending"] == 0


def test_page_in_headless_chromium(server):
    url = server[0]
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import Select, WebDriverWait

    with chromium_driver() as driver:
        driver.get(url + "/")
        WebDriverWait(driver, 20).until(lambda d: len(d.find_elements(By.CSS_SELECTOR, "input.monitor")) == 2)
        box = driver.find_element(By.ID, "prompt")
        box.clear()
        box.send_keys("The cat sat on the")
        n = driver.find_element(By.ID, "max-tokens")
        n.clear()
        n.send_keys("8")
        driver.find_element(By.ID, "generate").click()
        WebDriverWait(driver, 60).until(lambda d: d.find_element(By.ID, "output").get_attribute("data-done") == "1")
        toks = driver.find_elements(By.CSS_SELECTOR, "#output span.tok")
        assert 1 <= len(toks) <= 8
        colours = [t.value_of_css_property("background-color") for t in toks]
        assert all(c not in ("rgba(0, 0, 0, 0)", "transparent") for c in colours), colours
        assert "fired" in toks[0].get_attribute("class")  # 'always' fires at the first step
        alerts = driver.find_elements(By.CSS_SELECTOR, "#alerts li.alert")
        assert len(alerts) == 1 and "always" in alerts[0].text
        assert "tokens in" in driver.find_element(By.ID, "status").text
        Select(driver.find_element(By.ID, "colour-by")).select_by_value("proj")  # recolour by one monitor
        recoloured = [t.value_of_css_property("background-color") for t in toks]
        assert recoloured != colours and len(set(recoloured)) > 1, recoloured  # 'proj' scores vary per token
        assert console_errors(driver) == []
