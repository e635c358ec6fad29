"""A tiny toolkit for static, self-contained HTML pages (feature dashboards, the one-page report).

    body = section("Features", filter_box("feats") + table(["latent", "density"], rows, sortable=True, id="feats"))
    write_page("out/index.html", page("My SAE", body))

Why this shape: a page must open from a folder, a zip or an air-gapped machine exactly as it was written,
so everything is inline: CSS and JS in the document, images as `data:` URIs, links relative. No CDN, no web
font, no http(s) reference anywhere (tests grep for them). Everything that is not markup we wrote goes
through `esc`; a cell or fragment that IS markup is passed as `Markup` (a str subclass) so "escape or not"
is decided by type, not by remembering. The two scripts (click-to-sort tables, a filter box) are inert
without the markup they look for, never throw on odd cells, and are included in every page.
"""

from __future__ import annotations

import base64
import html as _html
import math
import os
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any, NamedTuple

from mechscope.errors import InputError, OutputNotWritableError
from mechscope.fileio import atomic_write_bytes

__all__ = ["BASE_CSS", "FILTER_JS", "SORT_JS", "Cell", "Markup", "esc", "figure_img", "filter_box", "fmt_num",
           "page", "png_data_uri", "section", "table", "write_page"]

_PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


class Markup(str):
    """A string that already is safe HTML: `table`, `section` and `page` insert it unescaped."""


class Cell(NamedTuple):
    """A table cell with an explicit sort key (e.g. shown as '1.2e-3', sorted as 0.0012) and attributes."""

    content: Any  # str (escaped), Markup (as is) or a number (formatted with fmt_num)
    sort: float | str | None = None
    title: str | None = None


# C0 controls other than tab/newline/CR/form feed are parse errors in HTML (NUL even changes meaning)
_CONTROLS = {c: "\ufffd" for c in (*range(0x00, 0x09), 0x0B, *range(0x0E, 0x20), 0x7F)}


def esc(s: Any) -> str:
    """Escape text for HTML content and (double-quoted) attribute values; control characters HTML forbids
    become U+FFFD. Markup passes through."""
    if isinstance(s, Markup):
        return str(s)
    return _html.escape("" if s is None else str(s), quote=True).translate(_CONTROLS)


def fmt_num(x: Any, digits: int = 4) -> str:
    """A compact, honest number: ints as is, floats to `digits` significant digits, NaN/None as '—'."""
    if x is None:
        return "—"
    if isinstance(x, bool):
        return str(x)
    if isinstance(x, int):
        return str(x)
    try:
        v = float(x)
    except (TypeError, ValueError):
        return str(x)
    if not math.isfinite(v):
        return "—"
    return f"{v:.{digits}g}"


def png_data_uri(png: bytes) -> str:
    """'data:image/png;base64,...' for an <img src> (bytes must be a PNG)."""
    if not isinstance(png, (bytes, bytearray)) or not bytes(png[:8]) == _PNG_MAGIC:
        raise InputError("png_data_uri needs PNG bytes (starting with the PNG signature); render the figure first, "
                         "e.g. with figure_img(fig, alt).")
    return "data:image/png;base64," + base64.b64encode(bytes(png)).decode("ascii")


def figure_img(fig: Any, alt: str, *, width: int | None = None, cls: str = "fig") -> Markup:
    """An inline <img> from PNG bytes, a mechscope Plot (has .png) or a matplotlib Figure (rendered with Agg,
    under the library's fixed plot style, so no window and no user rcParams)."""
    if isinstance(fig, (bytes, bytearray)):
        png = bytes(fig)
    elif isinstance(getattr(fig, "png", None), (bytes, bytearray)):
        png = bytes(fig.png)
    elif hasattr(fig, "savefig") and hasattr(fig, "canvas"):
        from matplotlib.backends.backend_agg import FigureCanvasAgg

        from mechscope.viz.plots import render_png

        if not isinstance(fig.canvas, FigureCanvasAgg):
            FigureCanvasAgg(fig)
        png = render_png(fig)
    else:
        raise InputError(f"figure_img takes PNG bytes, a Plot or a matplotlib Figure, got {type(fig).__name__}.")
    w = f' width="{int(width)}"' if width else ""
    return Markup(f'<img class="{esc(cls)}" src="{png_data_uri(png)}" alt="{esc(alt)}"{w}>')


def _cell(v: Any, tag: str = "td") -> str:
    title = None
    sort = None
    if isinstance(v, Cell):
        v, sort, title = v.content, v.sort, v.title
    if isinstance(v, (int, float)) and not isinstance(v, bool):
        if sort is None:
            sort = float(v) if math.isfinite(float(v)) else ""
        text = esc(fmt_num(v))
    else:
        text = esc(v)
    attrs = ""
    if sort is not None:
        attrs += f' data-sort="{esc(sort)}"'
    if title is not None:
        attrs += f' title="{esc(title)}"'
    return f"<{tag}{attrs}>{text}</{tag}>"


def table(headers: Sequence[Any] | None, rows: Iterable[Sequence[Any]], *, sortable: bool = False,
          id: str | None = None, row_attrs: Sequence[Mapping[str, Any]] | None = None, cls: str = "") -> Markup:
    """A <table>. Cells: str (escaped), Markup (inserted as is), numbers (formatted, sorted numerically) or
    Cell(content, sort, title). sortable: clicking a header sorts by it (numbers numerically, else text).
    headers None: no header row (a key-value table; the first cell of each row becomes a <th>).
    row_attrs: per-row attributes (e.g. {"data-search": ...} for the filter box)."""
    classes = " ".join(c for c in (cls, "sortable" if sortable else "") if c)
    tab = ' tabindex="0"' if sortable else ""
    tid = f' id="{esc(id)}"' if id else ""
    tcls = f' class="{esc(classes)}"' if classes else ""
    out = [f"<table{tid}{tcls}>"]
    if headers is not None:
        out.append("<thead><tr>" + "".join(f'<th scope="col"{tab}>{esc(h)}</th>' for h in headers) + "</tr></thead>")
    out.append("<tbody>")
    for i, r in enumerate(rows):
        if headers is not None and len(r) != len(headers):
            raise InputError(f"table row {i} has {len(r)} cells for {len(headers)} headers.")
        attrs = ""
        if row_attrs is not None:
            attrs = "".join(f' {esc(k)}="{esc(v)}"' for k, v in row_attrs[i].items())
        cells = [_cell(r[0], "th")] + [_cell(v) for v in r[1:]] if headers is None and len(r) else [_cell(v) for v in r]
        out.append(f"<tr{attrs}>" + "".join(cells) + "</tr>")
    out.append("</tbody></table>")
    return Markup("".join(out))


def section(title: str, html: str, id: str | None = None) -> Markup:
    """<section><h2>title</h2>html</section>; `html` is inserted as is (build it with these helpers)."""
    sid = f' id="{esc(id)}"' if id else ""
    return Markup(f"<section{sid}><h2>{esc(title)}</h2>{html}</section>")


def filter_box(table_id: str, placeholder: str = "Filter rows…") -> Markup:
    """A text box hiding the rows of table `table_id` that do not contain every typed word (matched against
    a row's data-search attribute, or its text). '#12' matches the row whose data-key is exactly 12."""
    t = esc(table_id)
    return Markup(f'<div class="filter"><input type="search" class="filter-box" data-filter-table="{t}" '
                  f'placeholder="{esc(placeholder)}" aria-label="{esc(placeholder)}"> '
                  f'<span class="filter-count" data-filter-count="{t}"></span></div>')


BASE_CSS = """
:root { --fg:#1d232a; --muted:#5d6873; --line:#d9dee3; --bg:#ffffff; --head:#f3f5f7; --accent:#1f5fa8; }
* { box-sizing: border-box; }
body { font: 14px/1.45 system-ui, -apple-system, "Segoe UI", Roboto, "DejaVu Sans", sans-serif; color: var(--fg);
       background: var(--bg); margin: 0 auto; padding: 1rem 1.5rem 3rem; max-width: 1200px; }
h1 { font-size: 1.5rem; margin: .4rem 0 .6rem; } h2 { font-size: 1.15rem; margin: 1.6rem 0 .5rem;
       border-bottom: 1px solid var(--line); padding-bottom: .2rem; }
a { color: var(--accent); } .muted { color: var(--muted); } nav { margin: .3rem 0 .8rem; } nav a { margin-right: 1rem; }
table { border-collapse: collapse; margin: .4rem 0; font-size: 13px; }
th, td { border: 1px solid var(--line); padding: .25rem .5rem; text-align: left; vertical-align: top; }
th { background: var(--head); font-weight: 600; }
table.sortable th { cursor: pointer; user-select: none; white-space: nowrap; }
table.sortable th[aria-sort="ascending"]::after { content: " ▲"; }
table.sortable th[aria-sort="descending"]::after { content: " ▼"; }
td[data-sort] { font-variant-numeric: tabular-nums; }
.filter { margin: .5rem 0; } .filter-box { width: 24rem; max-width: 100%; padding: .35rem .5rem; font-size: 14px; }
.filter-count { color: var(--muted); margin-left: .5rem; }
img.fig { max-width: 100%; height: auto; display: block; margin: .4rem 0; }
code, .mono, .tok, .toks { font-family: ui-monospace, "DejaVu Sans Mono", Menlo, Consolas, monospace; }
.note { color: var(--muted); font-size: 12.5px; }
"""

SORT_JS = r"""
(function () {
  function key(td) {
    if (!td) return "";
    var v = td.getAttribute("data-sort");
    return v === null ? (td.textContent || "").trim() : v;
  }
  function isNum(s) { return s !== "" && isFinite(Number(s)); }
  function sortBy(table, col, th) {
    var body = table.tBodies && table.tBodies[0];
    if (!body) return;
    var asc = th.getAttribute("aria-sort") !== "ascending";
    var rows = Array.prototype.slice.call(body.rows);
    var keys = rows.map(function (r) { return key(r.cells[col]); });
    var numeric = keys.every(function (k) { return k === "" || isNum(k); });
    var idx = rows.map(function (r, i) { return i; });
    idx.sort(function (a, b) {
      var x = keys[a], y = keys[b], c;
      if (numeric) {
        if (x === "" || y === "") { c = (x === "") - (y === ""); return c || a - b; }  // blanks last
        c = Number(x) - Number(y);
      } else {
        c = x.localeCompare(y, undefined, {numeric: true, sensitivity: "base"});
      }
      return (asc ? c : -c) || a - b;
    });
    var frag = document.createDocumentFragment();
    idx.forEach(function (i) { frag.appendChild(rows[i]); });
    body.appendChild(frag);
    Array.prototype.forEach.call(th.parentNode.children, function (h) { h.removeAttribute("aria-sort"); });
    th.setAttribute("aria-sort", asc ? "ascending" : "descending");
  }
  function init() {
    Array.prototype.forEach.call(document.querySelectorAll("table.sortable"), function (table) {
      var head = table.tHead && table.tHead.rows[0];
      if (!head) return;
      Array.prototype.forEach.call(head.cells, function (th, col) {
        th.addEventListener("click", function () { sortBy(table, col, th); });
        th.addEventListener("keydown", function (e) {
          if (e.key === "Enter" || e.key === " ") { e.preventDefault(); sortBy(table, col, th); }
        });
      });
    });
  }
  if (document.readyState === "loading") document.addEventListener("DOMContentLoaded", init); else init();
})();
"""

FILTER_JS = r"""
(function () {
  function apply(box) {
    var table = document.getElementById(box.getAttribute("data-filter-table") || "");
    if (!table || !table.tBodies || !table.tBodies[0]) return;
    var words = (box.value || "").toLowerCase().split(/\s+/).filter(function (w) { return w.length > 0; });
    var rows = table.tBodies[0].rows, shown = 0;
    for (var i = 0; i < rows.length; i++) {
      var r = rows[i];
      var hay = (r.getAttribute("data-search") || r.textContent || "").toLowerCase();
      var key = r.getAttribute("data-key");
      var ok = words.every(function (w) {
        if (w.charAt(0) === "#" && w.length > 1 && key !== null) return key === w.slice(1);
        return hay.indexOf(w) !== -1;
      });
      r.style.display = ok ? "" : "none";
      if (ok) shown++;
    }
    var count = document.querySelector('[data-filter-count="' + box.getAttribute("data-filter-table") + '"]');
    if (count) count.textContent = shown + " of " + rows.length + " shown";
  }
  function init() {
    Array.prototype.forEach.call(document.querySelectorAll("input[data-filter-table]"), function (box) {
      box.addEventListener("input", function () { apply(box); });
      apply(box);
    });
  }
  if (document.readyState === "loading") document.addEventListener("DOMContentLoaded", init); else init();
})();
"""


def page(title: str, body_html: str, *, css: str = BASE_CSS, js: str = "") -> str:
    """A complete UTF-8 HTML document with everything inline. The sort and filter scripts are always
    included (inert without sortable tables / filter boxes); `js` is appended after them. The empty data:
    favicon stops browsers from requesting /favicon.ico."""
    script = SORT_JS + FILTER_JS + (js or "")
    if "</script" in script.lower():
        raise InputError("page(js=...) must not contain '</script'; it would end the inline script early.")
    if "</style" in css.lower():
        raise InputError("page(css=...) must not contain '</style'.")
    return ("<!DOCTYPE html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\">\n"
            "<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">\n"
            "<meta name=\"generator\" content=\"mechscope\">\n<link rel=\"icon\" href=\"data:,\">\n"
            f"<title>{esc(title)}</title>\n<style>{css}</style>\n</head>\n<body>\n{body_html}\n"
            f"<script>{script}</script>\n</body>\n</html>\n")


def write_page(path: str | os.PathLike, html: str) -> Path:
    """Write `html` (UTF-8) atomically, creating parent folders; OS errors become OutputNotWritableError.
    Thread-safe: writing many pages from a small thread pool overlaps their fsyncs."""
    p = Path(path)
    try:
        p.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise OutputNotWritableError(f"Cannot create the folder {str(p.parent)!r} for {p.name}: {e}. Choose a "
                                     "writable output folder.") from e
    try:
        atomic_write_bytes(p, html.encode("utf-8"))
    except OSError as e:
        raise OutputNotWritableError(f"Cannot write {str(p)!r}: {e}. Choose a writable output folder "
                                     "(or free disk space).") from e
    return p
