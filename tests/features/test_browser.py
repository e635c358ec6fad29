"""The dashboards in a real headless Chromium: the index renders, the filter box and sortable columns
work, a feature page shows its shaded tokens and histogram, hostile tokens stay text, no console error."""

from __future__ import annotations

import time

import pytest
from tests.browser import chromium_driver, console_errors, file_url, visible_rows
from tests.features.test_dashboard import FakeTokenizer, synthetic_stats

from mechscope.features.dashboard import write_dashboards

ROWS = "table#features tbody tr"


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    stats = synthetic_stats(F=30, dead=(5,))
    expl = {100 + i: f"feature about {'zebra' if i % 7 == 0 else 'lions'} #{i}" for i in range(0, 30, 2)}
    scores = {100 + i: (i % 5) / 4 for i in range(0, 30, 3)}
    out = tmp_path_factory.mktemp("site")
    write_dashboards(stats, FakeTokenizer(), out, explanations=expl, scores=scores, title="Browser check",
                     progress=False)
    return stats, expl, out


def _column(driver, col: int) -> list[str]:
    return driver.execute_script(
        "return Array.prototype.map.call(document.querySelectorAll('table#features tbody tr'),"
        " function (r) { var c = r.cells[arguments[0]]; return c.getAttribute('data-sort'); });".replace(
            "arguments[0]", str(col)))


def _type(driver, box, text: str) -> None:
    box.clear()
    if text:
        box.send_keys(text)
    else:  # clear() fires no input event
        driver.execute_script("arguments[0].dispatchEvent(new Event('input'));", box)


def test_dashboards_in_chromium(site):
    from selenium.webdriver.common.by import By

    stats, expl, out = site
    n_live = int((stats.count > 0).sum())
    t0 = time.perf_counter()
    with chromium_driver() as driver:
        driver.get(file_url(out / "index.html"))
        assert driver.title == "Browser check"
        assert visible_rows(driver, ROWS) == n_live == 29
        assert "29 of 29 shown" in driver.find_element(By.CSS_SELECTOR, "[data-filter-count]").text
        overview = driver.find_element(By.CSS_SELECTOR, "img.fig")
        assert driver.execute_script("return arguments[0].complete && arguments[0].naturalWidth", overview) > 100

        # the filter box: explanation words, top tokens, '#latent'
        box = driver.find_element(By.CSS_SELECTOR, "input[data-filter-table='features']")
        zebra = sum("zebra" in t for t in expl.values())
        _type(driver, box, "zebra")
        assert visible_rows(driver, ROWS) == zebra == 3
        assert f"{zebra} of 29 shown" in driver.find_element(By.CSS_SELECTOR, "[data-filter-count]").text
        _type(driver, box, "ZEBRA feature")  # case-insensitive, every word must match
        assert visible_rows(driver, ROWS) == 3
        _type(driver, box, "#112")
        assert visible_rows(driver, ROWS) == 1
        assert driver.find_element(By.CSS_SELECTOR, "tr[data-key='112']").is_displayed()
        _type(driver, box, "no-such-thing")
        assert visible_rows(driver, ROWS) == 0
        _type(driver, box, "")
        assert visible_rows(driver, ROWS) == 29

        # sortable columns: max act (numeric) both ways, then latent numerically (100 < 129)
        header = driver.find_elements(By.CSS_SELECTOR, "table#features thead th")
        assert [h.text for h in header][:5] == ["latent", "explanation", "score", "density", "max act"]
        header[4].click()
        asc = [float(v) for v in _column(driver, 4)]
        assert asc == sorted(asc) and asc[0] < asc[-1]
        assert header[4].get_attribute("aria-sort") == "ascending"
        header[4].click()
        desc = [float(v) for v in _column(driver, 4)]
        assert desc == sorted(asc, reverse=True)
        header[2].click()  # score: blanks (no score) sort last
        sc = _column(driver, 2)
        filled = [float(v) for v in sc if v]
        assert filled == sorted(filled) and sc[len(filled):] == [""] * (len(sc) - len(filled))
        header[0].click()
        assert [int(v) for v in _column(driver, 0)] == sorted(int(v) for v in _column(driver, 0))
        assert console_errors(driver) == []

        # a feature page, through its link
        driver.find_element(By.CSS_SELECTOR, "a[href='features/112.html']").click()
        assert driver.title == "Latent 112"
        r = 12
        toks = driver.find_elements(By.CSS_SELECTOR, "span.tok")
        shaded = driver.find_elements(By.CSS_SELECTOR, "span.tok[style]")
        assert len(toks) > 50 and len(shaded) > 10
        maxes = driver.find_elements(By.CSS_SELECTOR, "span.tok.max")
        assert len(maxes) == int((stats.top_context[r] >= 0).sum())
        bg = driver.execute_script("return getComputedStyle(arguments[0]).backgroundColor", maxes[0])
        assert bg.startswith("rgba(230, 110, 0") or bg == "rgb(230, 110, 0)"  # the max token, fully shaded
        hist = driver.find_element(By.CSS_SELECTOR, "svg.hist")
        box_w = driver.execute_script("return arguments[0].getBoundingClientRect().width", hist)
        assert box_w > 100
        bars = driver.find_elements(By.CSS_SELECTOR, "svg.hist rect.bar")
        heights = [float(b.get_attribute("height")) for b in bars]
        assert sum(h > 0 for h in heights) == int((stats.hist[r] > 0).sum())
        # hostile tokens are shown as text and did not run
        assert driver.execute_script("return window.__pwned === undefined")
        page_text = driver.find_element(By.TAG_NAME, "body").text
        assert "<script>alert(1)</script>" in page_text and "↵" in page_text
        assert len(driver.find_elements(By.TAG_NAME, "script")) == 1
        assert console_errors(driver) == []

        # back to the index through the relative link
        driver.find_element(By.LINK_TEXT, "← all features").click()
        assert driver.title == "Browser check" and visible_rows(driver, ROWS) == 29
        assert console_errors(driver) == []
    assert time.perf_counter() - t0 < 30
