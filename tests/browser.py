"""A real headless Chromium for tests of generated HTML (dashboards, the report), offline and hermetic.

    with chromium_driver() as driver:
        driver.get(file_url(path))
        ...
        assert console_errors(driver) == []

The system chromium + chromedriver are used explicitly (`Service(CHROMEDRIVER)`), so selenium-manager
never tries to download a browser or a driver. The browser gets a fresh profile in a temp folder and
flags that turn off its own network chatter (updates, sync, safe-browsing lists, QUIC), so a test page
that tried to fetch anything would fail loudly instead of being masked by background traffic.
No /usr/bin/chromium: the test is skipped, unless MECHSCOPE_REQUIRE_BROWSER=1 (CI), where it fails; a chromium
without chromedriver or without selenium fails (a broken setup should not pass as "skipped").
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

CHROMIUM = "/usr/bin/chromium"
CHROMEDRIVER = "/usr/bin/chromedriver"


def _no_browser() -> None:
    """Skip when there is no chromium at all (unless MECHSCOPE_REQUIRE_BROWSER=1: then fail)."""
    why = f"{CHROMIUM} is not installed"
    if os.environ.get("MECHSCOPE_REQUIRE_BROWSER") == "1":
        pytest.fail(f"MECHSCOPE_REQUIRE_BROWSER=1 but {why}.")
    pytest.skip(why)


def file_url(path: str | os.PathLike) -> str:
    """file:// URL of a local file (absolute, percent-encoded)."""
    return Path(path).resolve().as_uri()


@contextmanager
def chromium_driver(width: int = 1280, height: int = 900, page_load_timeout: float = 20.0) -> Iterator:
    """A headless Chromium WebDriver with browser console logging on; quit (and its profile removed) on exit."""
    if not os.path.exists(CHROMIUM):
        _no_browser()
    # a browser without its driver or without selenium is a broken setup, not a missing browser: fail
    if not os.path.exists(CHROMEDRIVER):
        pytest.fail(f"{CHROMIUM} is installed but {CHROMEDRIVER} is not; install the chromium-driver package.")
    try:
        from selenium import webdriver
        from selenium.webdriver.chrome.service import Service
    except ImportError:
        pytest.fail(f"{CHROMIUM} is installed but the selenium package is not; pip install selenium.")
    profile = tempfile.mkdtemp(prefix="mechscope-chromium-")
    opts = webdriver.ChromeOptions()
    opts.binary_location = CHROMIUM
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 "--no-first-run", "--no-default-browser-check", "--disable-quic", "--disable-extensions",
                 "--disable-default-apps", "--metrics-recording-only", "--safebrowsing-disable-auto-update",
                 f"--user-data-dir={profile}", f"--window-size={width},{height}"):
        opts.add_argument(flag)
    opts.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = None
    try:
        driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=opts)
        driver.set_page_load_timeout(page_load_timeout)
        yield driver
    finally:
        if driver is not None:
            driver.quit()
        shutil.rmtree(profile, ignore_errors=True)


def console_entries(driver) -> list[dict]:
    """Every browser console entry since the last call (the log is drained by reading it)."""
    return list(driver.get_log("browser"))


def console_errors(driver) -> list[dict]:
    """The SEVERE browser console entries since the last call (JS errors, failed loads)."""
    return [e for e in console_entries(driver) if e.get("level") == "SEVERE"]


def visible_rows(driver, css: str) -> int:
    """How many elements matching `css` are displayed (e.g. 'table#features tbody tr')."""
    return int(driver.execute_script(
        "return Array.prototype.filter.call(document.querySelectorAll(arguments[0]),"
        " function (e) { return e.offsetParent !== null && getComputedStyle(e).display !== 'none'; }).length;",
        css))


def wait_for_text(driver, text: str, timeout: float = 30.0) -> str:
    """The page's source once it contains `text` (case-insensitive), polling: on a loaded machine a navigation
    can report done while the new document is still empty. Returns the last source seen (the assertion is
    the caller's)."""
    import time

    deadline = time.monotonic() + timeout
    while True:
        src = driver.page_source or ""
        if text.lower() in src.lower() or time.monotonic() > deadline:
            return src
        time.sleep(0.2)
