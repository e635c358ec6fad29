"""Feature dashboards, the HTML toolkit and the Neuronpedia export: content checked against the stats,
escaping of hostile tokens, links that resolve, and no external URL anywhere."""

from __future__ import annotations

import gzip
import json
import re
import time
from html.parser import HTMLParser
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from tests.conftest import make_tiny_lm

from mechscope.errors import InputError, OutputNotWritableError
from mechscope.features import FeatureStats, feature_stats
from mechscope.features.dashboard import (
    display_token,
    explanation_map,
    score_map,
    token_texts,
    write_dashboards,
)
from mechscope.features.neuronpedia import export_neuronpedia
from mechscope.features.stats import _edges
from mechscope.sae import SAEConfig, SparseCoder
from mechscope.viz import html as H

pytestmark = pytest.mark.usefixtures("one_thread")

HOOK = "blocks.0.hook_resid_post"
T = 32
KW = dict(tokens=T * 14, context_len=T, batch_size=4, top_k=5, n_quantiles=3, hist_bins=16, seed=3, progress=False)
EXTERNAL = re.compile(r"https?://|//cdn|@import|\burl\(\s*['\"]?(?!data:)", re.I)
LINK = re.compile(r"""\b(?:href|src)\s*=\s*["']([^"']*)["']""", re.I)

# ---------------------------------------------------------------------------- shared fixtures (test_browser too)

HOSTILE = ["<script>alert(1)</script>", '"><img src=x onerror="window.__pwned=1">', "&amp;", "\n", "\t", "  ",
           "", "\x00", "a\u00e9\u4e2d", "</span><b>", "normal"]


class FakeTokenizer:
    """A duck-typed tokenizer: id i < len(HOSTILE) is a hostile/odd token, every other id is 'w{i}'."""

    def decode(self, ids, **kw):
        return "".join(HOSTILE[i] if i < len(HOSTILE) else f" w{i}" for i in ids)

    def batch_decode(self, seqs, **kw):
        return [self.decode(s) for s in seqs]

    def convert_ids_to_tokens(self, ids):
        return [self.decode([i]) for i in ids]


def synthetic_stats(F: int = 12, k: int = 4, T: int = 24, bins: int = 16, m: int = 3, n_logits: int = 5,
                    vocab: int = 200, seed: int = 0, dead: tuple[int, ...] = (5,)) -> FeatureStats:
    """A consistent hand-made FeatureStats: top contexts contain every hostile token; `dead` rows never fire."""
    g = torch.Generator().manual_seed(seed)
    count = torch.randint(5, 500, (F,), generator=g)
    top_pos = torch.randint(2, T - 2, (F, k), generator=g)
    top_tokens = torch.randint(len(HOSTILE), vocab, (F, k, T), generator=g)
    top_tokens[:, :, 1 : 1 + len(HOSTILE)] = torch.arange(len(HOSTILE))  # hostile tokens inside every context
    top_acts = torch.rand(F, k, T, generator=g) * (torch.rand(F, k, T, generator=g) < 0.4)
    top_values = torch.sort(torch.rand(F, k, generator=g) + 1.0, dim=1, descending=True).values
    top_acts.scatter_(2, top_pos[..., None], top_values[..., None])
    act_max = top_values[:, 0].clone()
    hist = torch.randint(0, 40, (F, bins), generator=g) * ((torch.arange(bins) > 6) & (torch.arange(bins) < 11))
    sample_values = torch.rand(F, bins, m, generator=g)
    sample_context = torch.where(hist[..., None] > 0, torch.randint(0, 99, (F, bins, m), generator=g), -1)
    top_context = torch.randint(0, 99, (F, k), generator=g)
    for r in dead:
        count[r] = 0
        act_max[r] = 0
        hist[r] = 0
        top_values[r] = 0
        top_context[r] = -1
        top_pos[r] = -1
        top_tokens[r] = -1
        top_acts[r] = 0
        sample_context[r] = -1
    return FeatureStats(
        features=torch.arange(100, 100 + F), n_tokens=10_000, n_contexts=400, count=count,
        act_sum=count.double() * 0.5, act_max=act_max, hist=hist, hist_edges=_edges(bins), top_values=top_values,
        top_context=top_context, top_pos=top_pos, top_tokens=top_tokens, top_acts=top_acts,
        sample_values=sample_values * (sample_context >= 0), sample_context=sample_context,
        sample_pos=torch.where(sample_context >= 0, 3, -1),
        logit_top_ids=torch.randint(0, vocab, (F, n_logits), generator=g),
        logit_top_values=torch.sort(torch.rand(F, n_logits, generator=g), 1, descending=True).values,
        logit_bottom_ids=torch.arange(F * n_logits).reshape(F, n_logits) % len(HOSTILE),
        logit_bottom_values=-torch.sort(torch.rand(F, n_logits, generator=g), 1, descending=True).values,
        meta={"settings": {"model": "fake-<model>", "hook": "blocks.1.hook_resid_post"}})


class Elements(HTMLParser):
    """Every element as (tag, attrs, text directly inside it, incl. nested text)."""

    def __init__(self, html: str):
        super().__init__(convert_charrefs=True)
        self.stack: list[list] = []
        self.done: list[tuple[str, dict, str]] = []
        self.feed(html)

    def handle_starttag(self, tag, attrs):
        if tag in ("meta", "link", "img", "input", "br", "line", "rect"):
            self.done.append((tag, dict(attrs), ""))
            return
        self.stack.append([tag, dict(attrs), []])

    def handle_endtag(self, tag):
        while self.stack:
            t, a, txt = self.stack.pop()
            text = "".join(txt)
            self.done.append((t, a, text))
            if self.stack:
                self.stack[-1][2].append(text)
            if t == tag:
                break

    def handle_data(self, data):
        if self.stack:
            self.stack[-1][2].append(data)

    def find(self, tag: str, cls: str | None = None) -> list[tuple[str, dict, str]]:
        return [e for e in self.done if e[0] == tag and (cls is None or cls in (e[1].get("class") or "").split())]


@pytest.fixture(scope="module")
def real(tmp_path_factory):
    """(stats, tokenizer, out) from a tiny model + random coder, dashboards written with explanations/scores."""
    model = make_tiny_lm(0, 2)
    coder = SparseCoder(SAEConfig(arch="topk", d_in=32, n_latents=64, k=4, hook_in=HOOK)).init_weights(1)
    stats = feature_stats(model, coder, "sotu", **KW)
    out = tmp_path_factory.mktemp("dash")
    expl = [SimpleNamespace(feature=3, text="cats <script>alert('x')</script> & dogs", terms=[], source="llm", meta={}),
            SimpleNamespace(feature=9, text="the word 'zebra'", terms=[], source="llm", meta={})]
    write_dashboards(stats, model.tokenizer, out, explanations=expl, scores={3: 0.8125, 9: 0.5}, progress=False)
    return stats, model.tokenizer, out


def _all_files(out: Path) -> list[Path]:
    return sorted(p for p in out.rglob("*") if p.is_file())


# ---------------------------------------------------------------------------- dashboards on real stats


def test_pages_links_and_no_external_urls(real):
    stats, _, out = real
    live = stats.features[stats.count > 0].tolist()
    assert len(live) > 20
    pages = {int(p.stem) for p in (out / "features").glob("*.html")}
    assert pages == set(live)
    assert not [p for p in out.rglob("*") if p.name.endswith(".tmp")]  # atomic writes left no temp file
    for f in _all_files(out):
        text = f.read_text(encoding="utf-8")
        assert not EXTERNAL.search(text), (f, EXTERNAL.search(text).group())
        assert text.startswith("<!DOCTYPE html>") and '<meta charset="utf-8">' in text
        assert text.count("<script>") == 1  # only our inline script, nothing injected
        for url in LINK.findall(text):
            if url.startswith("data:") or url.startswith("#"):
                continue
            assert "://" not in url and not url.startswith("/"), url  # relative only
            assert (f.parent / url.split("#")[0]).resolve().is_file(), (f, url)


def test_index_matches_stats(real):
    stats, _, out = real
    doc = Elements((out / "index.html").read_text(encoding="utf-8"))
    rows = [e for e in doc.find("tr") if "data-key" in e[1]]
    assert len(rows) == int((stats.count > 0).sum())
    cells = [e for e in doc.done if e[0] == "td"]
    n_cols = 7
    assert len(cells) == n_cols * len(rows)
    row_of = {f: r for r, f in enumerate(stats.features.tolist())}
    for i, (_, attrs, _) in enumerate(rows):
        latent = int(attrs["data-key"])
        r = row_of[latent]
        c = cells[i * n_cols : (i + 1) * n_cols]
        assert float(c[0][1]["data-sort"]) == latent
        assert float(c[3][1]["data-sort"]) == pytest.approx(float(stats.density[r]), rel=1e-12)
        assert c[3][2] == f"{float(stats.density[r]):.3g}"
        assert float(c[4][1]["data-sort"]) == pytest.approx(float(stats.act_max[r]), rel=1e-6)
        assert float(c[5][1]["data-sort"]) == pytest.approx(float(stats.mean_act[r]), rel=1e-6)
    by_key = {int(a["data-key"]): a for _, a, _ in rows}
    assert "zebra" in by_key[9]["data-search"] and "cats" in by_key[3]["data-search"]
    html = (out / "index.html").read_text(encoding="utf-8")
    assert "cats &lt;script&gt;alert(&#x27;x&#x27;)&lt;/script&gt; &amp; dogs" in html
    assert 'data-sort="0.8125"' in html
    imgs = doc.find("img")
    assert len(imgs) == 1 and imgs[0][1]["src"].startswith("data:image/png;base64,")  # the density overview


def test_feature_page_matches_stats(real):
    """Every number and token on a page against the stats; token text against a naive per-id decode."""
    stats, tok, out = real
    T_ = stats.top_tokens.shape[-1]
    for r in (3, 9, int(stats.count.argmax())):
        latent = int(stats.features[r])
        html = (out / "features" / f"{latent}.html").read_text(encoding="utf-8")
        assert f"({int(stats.count[r])} of {stats.n_tokens} tokens)" in html
        valid = (stats.top_context[r] >= 0).nonzero().flatten().tolist()
        chunks = [c.split("</div>")[0] for c in html.split('<div class="ex">')[1:]]
        assert len(chunks) == len(valid) > 0
        vmax = float(stats.act_max[r])
        for j, chunk in zip(valid, chunks):
            p = int(stats.top_pos[r, j])
            assert f"#{j + 1} · act {float(stats.top_values[r, j]):.4g} · context {int(stats.top_context[r, j])}, " \
                   f"pos {p}" in chunk
            spans = Elements(chunk).find("span", "tok")
            got_pos = []
            for _, attrs, text in spans:
                m = re.search(r"· id (\d+) · pos (\d+) · act (\S+)$", attrs["title"])
                t, pos, act = int(m.group(1)), int(m.group(2)), m.group(3)
                got_pos.append(pos)
                assert t == int(stats.top_tokens[r, j, pos])
                assert text == display_token(tok.decode([t]))
                v = float(stats.top_acts[r, j, pos])
                assert act == f"{v:.4g}"
                if v > 0:
                    assert attrs["style"] == f"background:rgba(230,110,0,{min(1.0, v / vmax):.2f})"
                else:
                    assert "style" not in attrs
                assert ("max" in attrs["class"].split()) == (pos == p)
            assert got_pos == list(range(max(0, p - 24), min(T_, p + 9)))  # the default (24, 8) window
        # histogram table: one row per occupied bin, with its count and its share
        table_html = html[html.index('id="hist-table"'):].split("</table>")[0]
        cells = re.findall(r"<td(?: [^>]*)?>([^<]*)</td>", table_html)
        nz = (stats.hist[r] > 0).nonzero().flatten().tolist()
        assert [int(c) for c in cells[1::5]] == [int(stats.hist[r, b]) for b in nz]
        assert [float(c.rstrip("%")) for c in cells[2::5]] == pytest.approx(
            [100 * int(stats.hist[r, b]) / int(stats.count[r]) for b in nz], abs=0.051)
        for b, vals in zip(nz, cells[3::5]):  # the samples of each bin, largest first
            want = sorted(v for v, c in zip(stats.sample_values[r, b].tolist(), stats.sample_context[r, b].tolist())
                          if c >= 0)[::-1]
            assert vals == ", ".join(f"{v:.4g}" for v in want)
        # logit tables: decoded tokens and values, in order
        for ids, vals, head in ((stats.logit_top_ids, stats.logit_top_values, "promoted token"),
                                (stats.logit_bottom_ids, stats.logit_bottom_values, "suppressed token")):
            part = html[html.index(head):].split("</table>")[0]
            got = [float(v) for v in re.findall(r'<td data-sort="([^"]+)">', part)]
            assert got == pytest.approx(vals[r].tolist(), rel=1e-6)
            chips = Elements(part).find("span", "chip")
            assert [c[2] for c in chips] == [display_token(tok.decode([int(i)])) for i in ids[r]]


def test_histogram_svg_bars(real):
    stats, _, out = real
    r = int(stats.count.argmax())
    html = (out / "features" / f"{int(stats.features[r])}.html").read_text(encoding="utf-8")
    bars = re.findall(r'<rect class="bar"[^>]*height="([\d.]+)"><title>\[([^,]+), ([^)]+)\): (\d+)</title>', html)
    counts = [int(c) for *_, c in bars]
    nz = (stats.hist[r] > 0).nonzero().flatten().tolist()
    a, b = nz[0], nz[-1] + 1
    start = [lo for _, lo, _, _ in bars].index(f"{float(stats.hist_edges[a]):.3g}")
    assert counts[start : start + b - a] == stats.hist[r, a:b].tolist()
    assert sum(counts) == int(stats.hist[r].sum()) == int(stats.count[r])
    assert len(bars) >= 8 and counts[0] == 0 == counts[-1]  # padded with empty bins: the range is visible
    top = max(counts)
    for (h, *_), c in zip(bars, counts):
        assert float(h) == pytest.approx(126 * c / top, abs=0.06)  # plot height = 170 - margins (10 + 34)


# ---------------------------------------------------------------------------- hostile inputs (synthetic stats)


def test_escaping_of_tokens_and_explanations(tmp_path):
    stats = synthetic_stats()
    expl = {100: "<b>bold</b> & <script>x()</script>", 101: 'say "hi"'}
    write_dashboards(stats, FakeTokenizer(), tmp_path, explanations=expl, progress=False, title="T <i>x</i>")
    for f in _all_files(tmp_path):
        text = f.read_text(encoding="utf-8")
        assert "<script>alert" not in text and "<img src=x" not in text and "<b>bold" not in text
        assert "</span><b>" not in text and "\x00" not in text and "<i>x</i>" not in text
        assert text.count("<script>") == 1
        assert not EXTERNAL.search(text)
    page = (tmp_path / "features" / "100.html").read_text(encoding="utf-8")
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in page
    assert "&quot;&gt;&lt;img src=x onerror=&quot;window.__pwned=1&quot;&gt;" in page
    assert "&amp;amp;" in page  # the token "&amp;" shown literally
    assert ">↵</span>" in page and ">⇥</span>" in page and ">∅</span>" in page and ">\\x00</span>" in page
    assert ">  </span>" in page  # spaces kept (white-space: pre)
    assert "aé中" in page  # UTF-8 kept as is
    assert "&lt;b&gt;bold&lt;/b&gt; &amp; &lt;script&gt;x()&lt;/script&gt;" in page
    index = (tmp_path / "index.html").read_text(encoding="utf-8")
    assert "<title>T &lt;i&gt;x&lt;/i&gt;</title>" in index and "fake-&lt;model&gt;" in index
    assert not (tmp_path / "features" / "105.html").exists()  # dead latent: no page by default


def test_selection_caps_and_errors(tmp_path):
    stats = synthetic_stats()
    with pytest.warns(UserWarning, match="max_pages=3"):
        write_dashboards(stats, FakeTokenizer(), tmp_path / "cap", max_pages=3, progress=False)
    top3 = stats.features[stats.count.argsort(descending=True, stable=True)[:3]].tolist()
    assert {int(p.stem) for p in (tmp_path / "cap" / "features").glob("*.html")} == set(top3)
    # an explicit dead latent gets an honest page
    write_dashboards(stats, FakeTokenizer(), tmp_path / "dead", features=[105, 100], progress=False)
    dead = (tmp_path / "dead" / "features" / "105.html").read_text(encoding="utf-8")
    assert "never fired" in dead and 'class="ex"' not in dead
    with pytest.raises(InputError, match=r"\[7\]"):
        write_dashboards(stats, FakeTokenizer(), tmp_path / "x", features=[7], progress=False)
    with pytest.raises(InputError, match="max_pages"):
        write_dashboards(stats, FakeTokenizer(), tmp_path / "x", features=[100, 101], max_pages=1, progress=False)
    with pytest.raises(InputError, match="context_window"):
        write_dashboards(stats, FakeTokenizer(), tmp_path / "x", context_window=(3,), progress=False)
    blocker = tmp_path / "file"
    blocker.write_text("")
    with pytest.raises(OutputNotWritableError):
        write_dashboards(stats, FakeTokenizer(), blocker, progress=False)
    # no logit effects (e.g. a transcoder): an explanatory note instead of tables
    stats.logit_top_ids = stats.logit_bottom_ids = None
    stats.meta["logit_effects_note"] = "this coder writes an MLP hidden layer"
    write_dashboards(stats, FakeTokenizer(), tmp_path / "nolog", features=[100], progress=False)
    assert "this coder writes an MLP hidden layer" in (tmp_path / "nolog" / "features" / "100.html").read_text()


def test_input_normalisation():
    objs = [SimpleNamespace(feature=4, text="a"), {"feature": 5, "text": "b"}]
    assert explanation_map(objs) == {4: "a", 5: "b"}
    assert explanation_map({"6": SimpleNamespace(text="c")}) == {6: "c"}
    assert explanation_map(None) == {} and score_map(None) == {}
    det = SimpleNamespace(features=torch.tensor([1, 2]), balanced_accuracy=torch.tensor([0.75, 0.5]))
    assert score_map(det) == {1: 0.75, 2: 0.5}
    assert score_map({"3": 1}) == {3: 1.0}
    with pytest.raises(InputError, match="explanations"):
        explanation_map([1, 2])
    with pytest.raises(InputError, match="scores"):
        score_map([0.5])


def test_token_texts_and_display(real):
    _, tok, _ = real
    ids = [198, 216, 111, 1]  # 'Ċ' = '\n', 'Ġ' = ' ', '¡' = the lone byte 0xa1, <|im_start|>
    plain = token_texts(tok, ids + [-1, 198])
    assert plain == {i: tok.decode([i]) for i in ids}
    assert "\ufffd" in plain[111]
    readable = token_texts(tok, ids, readable=True)
    assert readable[111] == "\\xa1"  # its byte, not U+FFFD
    assert readable[198] == "\n" and display_token(readable[198]) == "↵"
    assert display_token("a\tb\x01") == "a⇥b\\x01" and display_token("") == "∅"
    assert token_texts(None, [5]) == {5: "⟨5⟩"}


def test_render_speed(tmp_path):
    """300 pages (k=10, 64-token contexts, real-sized vocab ids) well inside the budget of 30 s per 500."""
    stats = synthetic_stats(F=300, k=10, T=64, bins=32, m=4, n_logits=10, vocab=20_000, dead=())
    t = time.perf_counter()
    write_dashboards(stats, FakeTokenizer(), tmp_path, progress=False)
    dt = time.perf_counter() - t
    assert len(list((tmp_path / "features").glob("*.html"))) == 300
    assert dt < 18.0, dt


# ---------------------------------------------------------------------------- the HTML toolkit


def test_html_toolkit(tmp_path):
    t = H.table(["name", "value"], [["<x>", 0.00123], [H.Markup("<b>ok</b>"), H.Cell("big", sort=7, title='"t"')]],
                sortable=True, id="t1")
    assert "&lt;x&gt;" in t and "<b>ok</b>" in t and 'data-sort="0.00123"' in t and 'title="&quot;t&quot;"' in t
    assert 'class="sortable"' in t and 'id="t1"' in t
    with pytest.raises(InputError, match="row 0"):
        H.table(["a", "b"], [[1]])
    kv = H.table(None, [["k", 1]])
    assert "<thead>" not in kv and "<th>k</th>" in kv
    with pytest.raises(InputError, match="PNG"):
        H.png_data_uri(b"GIF89a")
    from matplotlib.figure import Figure

    fig = Figure(figsize=(2, 1))
    fig.add_subplot().plot([0, 1], [1, 0])
    img = H.figure_img(fig, 'a "plot"')
    assert img.startswith('<img class="fig" src="data:image/png;base64,iVBORw0KGgo') and 'alt="a &quot;plot&quot;"' in img
    assert H.figure_img(b"\x89PNG\r\n\x1a\nrest", "x").count("data:image/png;base64,") == 1
    doc = H.page("A <b>", H.section("S & T", H.filter_box("t1") + t, id="s"), js="var ok = 1;")
    assert "<title>A &lt;b&gt;</title>" in doc and "<h2>S &amp; T</h2>" in doc and "var ok = 1;" in doc
    assert not EXTERNAL.search(doc)
    with pytest.raises(InputError, match="script"):
        H.page("x", "", js="</script><script>")
    p = H.write_page(tmp_path / "a" / "b" / "p.html", doc)
    assert p.read_text(encoding="utf-8") == doc
    assert H.fmt_num(float("nan")) == "—" and H.fmt_num(3) == "3" and H.fmt_num(0.000123456) == "0.0001235"
    (tmp_path / "ro").write_text("")
    with pytest.raises(OutputNotWritableError):
        H.write_page(tmp_path / "ro" / "x.html", doc)


# ---------------------------------------------------------------------------- Neuronpedia export

FEATURE_KEYS = {"modelId": str, "layer": str, "index": str, "maxActApprox": float, "frac_nonzero": float,
                "freq_hist_data_bar_heights": list, "freq_hist_data_bar_values": list, "pos_str": list,
                "pos_values": list, "neg_str": list, "neg_values": list, "hasVector": bool, "hookName": str,
                "neuron_alignment_indices": list, "correlated_features_indices": list,
                "logits_hist_data_bar_heights": list, "decoder_weights_dist": list}
ACT_KEYS = {"id": str, "tokens": list, "values": list, "maxValue": float, "maxValueTokenIndex": int,
            "minValue": float, "index": str, "layer": str, "modelId": str, "dataIndex": str,
            "qualifyingTokenIndex": int, "binMin": float, "binMax": float, "binContains": float, "dfaValues": list}


def _jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in gzip.decompress(path.read_bytes()).decode("utf-8").splitlines()]


def test_neuronpedia_export(real, tmp_path):
    stats, tok, _ = real
    expl = [SimpleNamespace(feature=3, text="cats", source="llm:test"), SimpleNamespace(feature=9, text="zebra")]
    folder = export_neuronpedia(stats, tok, tmp_path, model_id="tiny-lm", source_id="0-res-mechscope",
                                explanations=expl, batch_size=40)
    assert folder == tmp_path / "tiny-lm" / "0-res-mechscope"
    feats = _jsonl(folder / "features" / "batch-0.jsonl.gz") + _jsonl(folder / "features" / "batch-1.jsonl.gz")
    live = stats.features[stats.count > 0].tolist()
    assert [int(f["index"]) for f in feats] == live
    edges = stats.hist_edges
    for f in feats:
        for k, typ in FEATURE_KEYS.items():
            assert isinstance(f[k], typ), (k, f[k])
        r = int(f["index"])  # features are 0..63 here: row == latent
        assert f["modelId"] == "tiny-lm" and f["layer"] == "0-res-mechscope" and f["hookName"] == HOOK
        assert f["maxActApprox"] == float(stats.act_max[r])
        assert f["frac_nonzero"] == pytest.approx(float(stats.density[r]), rel=1e-12)
        assert sum(f["freq_hist_data_bar_heights"]) == int(stats.count[r])
        nz = (stats.hist[r] > 0).nonzero().flatten()
        a, b = int(nz[0]), int(nz[-1]) + 1
        assert f["freq_hist_data_bar_heights"] == stats.hist[r, a:b].double().tolist()
        for v, lo, hi in zip(f["freq_hist_data_bar_values"], edges[a:b].tolist(), edges[a + 1 : b + 1].tolist()):
            assert lo < v < hi
        assert f["pos_str"] == [tok.decode([i]) for i in stats.logit_top_ids[r].tolist()]
        assert f["pos_values"] == stats.logit_top_values[r].tolist()
        assert f["neg_str"] == [tok.decode([i]) for i in stats.logit_bottom_ids[r].tolist()]
        assert f["neg_values"] == stats.logit_bottom_values[r].tolist() and f["neg_values"][0] < 0
    acts = _jsonl(folder / "activations" / "batch-0.jsonl.gz") + _jsonl(folder / "activations" / "batch-1.jsonl.gz")
    assert len(acts) == int((stats.top_context[stats.count > 0] >= 0).sum())
    assert len({a["id"] for a in acts}) == len(acts) and all(len(a["id"]) == 25 for a in acts)
    seen: dict[int, int] = {}
    for a in acts:
        for k, typ in ACT_KEYS.items():
            assert isinstance(a[k], typ), (k, a[k])
        r = int(a["index"])
        j = seen.get(r, 0)
        seen[r] = j + 1
        assert a["dataIndex"] == str(int(stats.top_context[r, j]))
        assert a["qualifyingTokenIndex"] == int(stats.top_pos[r, j])
        assert a["values"] == stats.top_acts[r, j].tolist()
        assert a["tokens"] == [tok.decode([i]) for i in stats.top_tokens[r, j].tolist()]
        assert a["values"][a["qualifyingTokenIndex"]] == float(stats.top_values[r, j])
        assert a["maxValue"] == max(a["values"]) == a["values"][a["maxValueTokenIndex"]]
        assert a["minValue"] == min(a["values"]) and a["binMax"] == float(stats.act_max[r])
    ex = _jsonl(folder / "explanations" / "batch-0.jsonl.gz")
    assert [(e["index"], e["description"], e["notes"]) for e in ex] == [("3", "cats", "llm:test"), ("9", "zebra", None)]
    src = json.loads((folder / "source.jsonl").read_text())
    assert src["id"] == "0-res-mechscope" and src["setName"] == "res-mechscope"
    assert src["num_prompts"] == stats.n_contexts and src["num_tokens_in_prompt"] == T
    # ids are stable across exports (a re-import replaces rather than duplicates)
    again = export_neuronpedia(stats, tok, tmp_path / "again", model_id="tiny-lm", source_id="0-res-mechscope",
                               features=[3], explanations={3: "cats"})
    a3 = _jsonl(again / "activations" / "batch-0.jsonl.gz")
    assert [x["id"] for x in a3] == [x["id"] for x in acts if x["index"] == "3"]
    for bad in ({"model_id": "../up"}, {"source_id": "res-mechscope"}, {"source_id": "0-a/b"}):
        with pytest.raises(InputError):
            export_neuronpedia(stats, tok, tmp_path, **{"model_id": "m", "source_id": "0-s", **bad})


def test_quantile_samples_show_their_text(real):
    """Each histogram sample is shown with the text around it (from FeatureStats.sample_tokens), the sampled
    token outlined, like the top examples."""
    stats, tok, out = real
    assert stats.sample_tokens is not None
    before = stats.meta["sample_window"][0]
    r = int(stats.count.argmax())
    html = (out / "features" / f"{int(stats.features[r])}.html").read_text(encoding="utf-8")
    chunks = [c.split("</div>")[0] for c in html.split('<div class="ex sample">')[1:]]
    ok = (stats.sample_context[r] >= 0).nonzero().tolist()
    assert len(chunks) == len(ok) > 1
    shown = set()
    for chunk in chunks:
        spans = Elements(chunk).find("span", "tok")
        marked = [attrs for _, attrs, _ in spans if "max" in attrs["class"].split()]
        assert len(marked) == 1  # the sampled token
        shown.add(re.search(r"context (\d+), pos (\d+)", chunk).groups())
        ids = [int(re.search(r"· id (\d+) ·", attrs["title"]).group(1)) for _, attrs, _ in spans]
        c, p = (int(v) for v in re.search(r"context (\d+), pos (\d+)", chunk).groups())
        b, m = next((b, m) for b, m in ok if int(stats.sample_context[r, b, m]) == c
                    and int(stats.sample_pos[r, b, m]) == p)
        assert ids == [t for t in stats.sample_tokens[r, b, m].tolist() if t >= 0]
        assert int(re.search(r"· id (\d+) ·", marked[0]["title"]).group(1)) == \
            int(stats.sample_tokens[r, b, m, before])
    assert len(shown) == len(ok)
