"""The graph explorer: a self-contained page (no network), tested in headless Chromium: layout, hover labels,
click to pin, supernode grouping saved back into the graph JSON (download, and POST when served)."""

from __future__ import annotations

import json
import re
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from types import SimpleNamespace

import pytest
import torch
from fake_graph import make_graph
from tests.browser import chromium_driver, console_errors, file_url

from mechscope.circuits.graphs import (
    GraphFormatError,
    UnknownGraphError,
    explorer_html,
    feature_details,
    graph_path,
    read_graph_json,
    save_posted_graph,
    served_explorer,
    write_explorer,
    write_graph_json,
)
from mechscope.circuits.graphs.graph_json import parse_graph_json
from mechscope.errors import InputError, MechscopeError

HOSTILE_PROMPT = 'The </script><script>window.pwned=1</script> "capital" & <b>'


@pytest.fixture(scope="module")
def graph_file(tmp_path_factory):
    g = make_graph()
    g.prompt = HOSTILE_PROMPT
    g.tokens = ["The", " </script><script>window.pwned=1</script>", " <b>"]
    path = tmp_path_factory.mktemp("explorer") / "capital.json"
    return write_graph_json(g, path, labels={"1_2_2": "capital cities <i>"})


def test_page_is_self_contained_and_escaped(graph_file, tmp_path):
    html = explorer_html(graph_file)
    assert not re.search(r'<script[^>]+src=|<link[^>]+href="(?!data:)|@import|https?://(?!www\.w3\.org/2000/svg)', html)
    assert "window.pwned" in html and "</script><script>window.pwned" not in html  # inlined JSON cannot close
    assert html.count("<script") == 4  # three JSON blocks and the code, nothing injected
    out = write_explorer(graph_file, tmp_path / "g.html")
    assert out.read_text(encoding="utf-8") == html
    with pytest.raises(InputError, match=".html"):
        write_explorer(graph_file, tmp_path / "g.json")
    with pytest.raises(InputError, match="AttributionGraph"):
        explorer_html(42)


def test_feature_details_logit_effects_and_top_contexts(tiny_lm_folder):
    from tests.features.test_dashboard import synthetic_stats

    from mechscope.features.stats import logit_effects

    _, model = tiny_lm_folder
    torch.manual_seed(0)
    d = model.cfg.d_model
    W = {(s, t): torch.randn(16, d) for s in range(2) for t in range(s, 2)}  # a 2-layer CLT-like decoder set
    ts = SimpleNamespace(n_features=[16, 16], decoder=lambda s, t: W.get((s, t)))
    stats = synthetic_stats(F=16, vocab=300)
    stats.features = torch.arange(16)  # rows = latents 0..15 (the graph's layer-1 features are 2 and 7)
    det = feature_details(model, ts, make_graph(), n_logits=3, stats={1: stats})
    assert set(det) == {"0_5_1", "1_2_2", "1_7_2"}  # feature nodes only
    want = logit_effects(model, SimpleNamespace(W_dec=(W[0, 0] + W[0, 1])[5:6]))[0]  # summed over written layers
    up = det["0_5_1"]["logits_up"]
    assert len(up) == 3 and up[0][1] == pytest.approx(float(want.max()), rel=1e-5)
    assert up[0][0] == model.tokenizer.decode([int(want.argmax())])
    assert det["0_5_1"]["logits_down"][0][1] == pytest.approx(float(want.min()), rel=1e-5)
    assert "top_contexts" not in det["0_5_1"]  # no stats given for layer 0
    ctx = det["1_2_2"]["top_contexts"]
    row = int((stats.features == 2).nonzero()[0, 0])
    p = int(stats.top_pos[row, 0])
    assert len(ctx) == 3 and ctx[0]["value"] == pytest.approx(float(stats.top_values[row, 0]))
    assert ctx[0]["token"] == model.tokenizer.decode([int(stats.top_tokens[row, 0, p])])


class _Saver(BaseHTTPRequestHandler):
    """Mounts the explorer the way `mechscope serve` will: GET /graph/{name} -> served_explorer, POST /graph/{name}
    -> save_posted_graph (typed errors -> 400)."""

    folder = None
    posted: list[bytes] = []

    def do_GET(self):  # noqa: N802
        name = self.path.removeprefix("/graph/")
        try:
            page = served_explorer(self.folder, name, save_url=self.path).encode("utf-8")
        except UnknownGraphError:
            self.send_response(404)
            self.end_headers()
            return
        self.send_response(200)
        self.send_header("Content-Type", "text/html; charset=utf-8")
        self.end_headers()
        self.wfile.write(page)

    def do_POST(self):  # noqa: N802
        body = self.rfile.read(int(self.headers["Content-Length"]))
        type(self).posted.append(body)
        try:
            save_posted_graph(body, graph_path(self.folder, self.path.removeprefix("/graph/")))
            self.send_response(204)
        except MechscopeError:
            self.send_response(400)
        self.end_headers()

    def log_message(self, *a):
        pass


def _wait(fn, timeout=10.0):
    t0 = time.time()
    while time.time() - t0 < timeout:
        v = fn()
        if v:
            return v
        time.sleep(0.05)
    return fn()


def test_explorer_in_chromium(graph_file, tmp_path):
    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.common.by import By

    gf = read_graph_json(graph_file)
    # feature details as `mechscope graph` inlines them: logit effects and top activating contexts (<b> stays text)
    details = {"1_2_2": {"logits_up": [[" Paris", 2.5]], "logits_down": [[" Lyon", -1.0]],
                         "top_contexts": [{"before": "the seat of government in", "token": " Rome",
                                           "after": " <b>is old", "value": 3.25}]}}
    page = write_explorer(graph_file, tmp_path / "graph.html", title="Explorer check", details=details)
    with chromium_driver() as driver:
        driver.get(file_url(page))
        assert driver.title == "Explorer check"
        assert console_errors(driver) == []
        assert driver.execute_script("return window.pwned === undefined")  # the hostile prompt stayed text
        assert HOSTILE_PROMPT in driver.find_element(By.ID, "prompt").text
        circles = driver.find_elements(By.CSS_SELECTOR, "circle.node")
        assert len(circles) == len(gf.nodes) == 9
        # layout: logits above features above embeddings (SVG y grows downwards); x follows the position
        y = {c.get_attribute("data-id"): float(c.get_attribute("cy")) for c in circles}
        x = {c.get_attribute("data-id"): float(c.get_attribute("cx")) for c in circles}
        assert y["3_42_2"] < y["1_2_2"] < y["0_5_1"] < y["E_464_0"]
        assert x["E_464_0"] < x["E_3139_1"] < x["E_1287_2"]
        # with nothing hovered, the clicked node defaults to the target logit: its 3 input edges are drawn
        edges = driver.find_elements(By.CSS_SELECTOR, "#edges path")
        assert sorted(e.get_attribute("data-source") for e in edges) == ["1_2_2", "1_7_2", "E_464_0"]
        # a click on the background drops the focus: the strongest edges are drawn, up to --max-edges
        driver.execute_script("document.getElementById('graph').dispatchEvent(new MouseEvent('click', {bubbles: true}))")
        assert len(driver.find_elements(By.CSS_SELECTOR, "#edges path")) == len(gf.links)
        box = driver.find_element(By.ID, "max-edges")
        driver.execute_script("arguments[0].value = '3'; arguments[0].dispatchEvent(new Event('change'))", box)
        widths = [float(e.get_attribute("stroke-width")) for e in driver.find_elements(By.CSS_SELECTOR, "#edges path")]
        assert len(widths) == 3 and widths[0] == max(widths) == 4.3  # |weight| 3.0 = the largest: full width
        # hover: the tooltip shows the label (HTML-escaped), activation and influence
        node = driver.find_element(By.CSS_SELECTOR, "circle[data-id='1_2_2']")
        ActionChains(driver).move_to_element(node).perform()
        tip = driver.find_element(By.ID, "tooltip")
        assert _wait(lambda: tip.is_displayed())
        assert "capital cities <i>" in tip.text and "activation 0.750" in tip.text and "influence 0.700" in tip.text
        assert "top activations:" in tip.text and "the seat of government in Rome <b>is old (3.25)" in tip.text
        assert tip.find_element(By.CSS_SELECTOR, "li.ctx mark").text == "Rome"  # the top token is highlighted
        assert 'promotes: " Paris" 2.50' in tip.text and 'suppresses: " Lyon" -1.00' in tip.text
        hovered = {(e.get_attribute("data-source"), e.get_attribute("data-target"))
                   for e in driver.find_elements(By.CSS_SELECTOR, "#edges path")}
        assert hovered == {("0_5_1", "1_2_2"), ("0_0_2", "1_2_2"), ("1_2_2", "3_42_2"), ("1_2_2", "3_17_2")}
        # click to pin two nodes, then group them into a named supernode
        node.click()
        driver.find_element(By.CSS_SELECTOR, "circle[data-id='1_7_2']").click()
        pinned = [li.get_attribute("data-id") for li in driver.find_elements(By.CSS_SELECTOR, "#pinned li")]
        assert pinned == ["1_2_2", "1_7_2"]
        assert "pinned" in node.get_attribute("class")
        driver.find_element(By.ID, "sn-name").send_keys("capital")
        driver.find_element(By.ID, "group").click()
        assert [li.get_attribute("data-name") for li in driver.find_elements(By.CSS_SELECTOR, "#supernodes li")] == \
            ["capital"]
        assert driver.find_elements(By.CSS_SELECTOR, "#pinned li") == []
        exported = driver.execute_script("return JSON.stringify(window.explorer.exportJSON())")
        back = parse_graph_json(exported)  # the saved state is a valid graph file ...
        assert back.supernodes == {"capital": ["1_2_2", "1_7_2"]}  # ... with the grouping in qParams
        assert back.nodes == gf.nodes and back.links == gf.links
        driver.find_element(By.ID, "download").click()
        assert _wait(lambda: "downloaded capital.json" in driver.find_element(By.ID, "status").text)
        assert not driver.find_element(By.ID, "save").is_displayed()  # no server to save to from file://
        assert console_errors(driver) == []


def test_explorer_saves_to_the_server(graph_file, tmp_path):
    """Served (the `GET /graph/{name}` route of `mechscope serve`), the page POSTs the updated graph JSON, which is
    validated and written back over the graph file."""
    import shutil

    from selenium.webdriver.common.by import By

    folder = tmp_path / "served"
    folder.mkdir()
    shutil.copy(graph_file, folder / "capital.json")
    (folder / "capital.details.json").write_text(json.dumps({"0_5_1": {"logits_up": [[" Paris", 1.5]]}}))
    _Saver.folder, _Saver.posted = folder, []
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Saver)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        with chromium_driver() as driver:
            driver.get(f"http://127.0.0.1:{server.server_port}/graph/capital")
            assert "promotes" in driver.execute_script(
                "window.explorer.state.clicked = '0_5_1'; window.explorer.render();"
                "return document.getElementById('clicked').textContent;")  # details from capital.details.json
            driver.execute_script("window.explorer.togglePin('0_5_1'); window.explorer.togglePin('E_3139_1');"
                                  "window.explorer.groupPinned('France');")
            driver.find_element(By.ID, "save").click()
            assert _wait(lambda: _Saver.posted)
            assert _wait(lambda: driver.find_element(By.ID, "status").text == "saved")
            assert console_errors(driver) == []
    finally:
        server.shutdown()
        server.server_close()
    saved = read_graph_json(folder / "capital.json")  # written back by save_posted_graph
    assert saved.supernodes == {"France": ["0_5_1", "E_3139_1"]}
    assert saved.metadata["prompt"] == HOSTILE_PROMPT and saved.nodes == read_graph_json(graph_file).nodes


def test_serving_helpers_refuse_bad_requests(graph_file, tmp_path):
    import shutil

    shutil.copy(graph_file, tmp_path / "capital.json")
    for name in ("../capital", "a/b", "", "nope"):
        with pytest.raises(UnknownGraphError):
            graph_path(tmp_path, name)
    doc = json.loads((tmp_path / "capital.json").read_text())
    doc["links"][0]["weight"] = 99.0
    with pytest.raises(InputError, match="only pins"):
        save_posted_graph(json.dumps(doc), tmp_path / "capital.json")
    with pytest.raises(GraphFormatError):
        save_posted_graph(b"{not json", tmp_path / "capital.json")
    assert json.loads((tmp_path / "capital.json").read_text())["links"][0]["weight"] != 99.0  # untouched


def test_explorer_opens_a_circuit_tracer_file(tmp_path):
    """A file written by circuit-tracer 0.5 itself (fixtures/), ambiguous ids included, opens without errors."""
    from pathlib import Path

    from selenium.webdriver.common.by import By

    ct = Path(__file__).with_name("fixtures") / "circuit_tracer_graph.json"
    page = write_explorer(ct, tmp_path / "ct.html")
    with chromium_driver() as driver:
        driver.get(file_url(page))
        assert len(driver.find_elements(By.CSS_SELECTOR, "circle.node")) == 57
        assert len(driver.find_elements(By.CSS_SELECTOR, "#edges path")) > 0  # the target logit's inputs
        assert console_errors(driver) == []
