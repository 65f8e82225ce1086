"""A self-contained HTML site over runs and ledgers: `lifelong report` writes it, each ledger keeps its page.

Every page is one HTML file with its CSS, its script and its images inline (PNG data URIs), so a folder of
pages works offline, from `file://`, and can be mailed. Pages link to each other by relative file names.

What this module draws, from plain data (the callers in `ledger.views` and `api` gather it):
    `table`      a sortable table: click a header to sort by it (numbers by value, text by text); every
                 numeric cell carries its full-precision value in `data-value`, the text shows it formatted, and
                 every header names its row key in `data-key`
    `heatmap`    a matrix as a table whose cells are coloured by value (or by a change, diverging around 0),
                 with the raw numbers in the cells and in `data-value`
    `strip`      a row of uint8 images (N, H, W, 3) as one PNG, drawn pixelated at a readable size
    `page`       the document around sections, with a link back to the index
    `flat_rows`  nested results (a bench's results.json) as table rows of scalars
"""

from __future__ import annotations

import base64
import html
import io
import math
import numbers
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from lifelong.report.table import Column, format_cell, is_missing, is_numeric_column

__all__ = ["esc", "figure", "flat_rows", "heatmap", "page", "png_data_uri", "section", "strip", "table"]

_CSS = """
body { font-family: system-ui, sans-serif; margin: 1.5em auto; max-width: 1300px; padding: 0 1em; color: #222; }
h1 { font-size: 1.5em; } h2 { font-size: 1.2em; margin-top: 2em; } h3 { font-size: 1em; }
nav { font-size: 0.9em; margin-bottom: 1em; }
table { border-collapse: collapse; margin: 0.8em 0; font-size: 0.85em; }
th, td { padding: 0.25em 0.6em; border-bottom: 1px solid #ddd; vertical-align: top; }
th { background: #f4f4f4; text-align: left; }
table.sortable th { cursor: pointer; user-select: none; }
table.sortable th[aria-sort="ascending"]::after { content: " \\25B2"; }
table.sortable th[aria-sort="descending"]::after { content: " \\25BC"; }
td.num { text-align: right; font-variant-numeric: tabular-nums; }
table.heat td { text-align: center; font-variant-numeric: tabular-nums; min-width: 4em; }
table.heat td small { display: block; opacity: 0.8; }
img.strip { image-rendering: pixelated; display: block; }
figure { margin: 1em 0; } figure img { max-width: 100%; } figcaption, .note { color: #555; font-size: 0.85em; }
pre { background: #f8f8f8; padding: 0.8em; overflow-x: auto; font-size: 0.8em; }
""".strip()

# Click a header of a sortable table: sort its rows by that column (numbers by data-value), again to reverse.
_SCRIPT = """
document.querySelectorAll("table.sortable").forEach(function (table) {
  table.querySelectorAll("th").forEach(function (th, col) {
    th.addEventListener("click", function () {
      var asc = th.getAttribute("aria-sort") !== "ascending";
      table.querySelectorAll("th").forEach(function (h) { h.removeAttribute("aria-sort"); });
      th.setAttribute("aria-sort", asc ? "ascending" : "descending");
      var body = table.tBodies[0], rows = Array.prototype.slice.call(body.rows);
      function key(row) {
        var cell = row.cells[col], v = cell ? cell.getAttribute("data-value") : null;
        return v === null ? (cell ? cell.textContent : "") : parseFloat(v);
      }
      rows.sort(function (a, b) {
        var x = key(a), y = key(b), nx = typeof x === "number" && !isNaN(x), ny = typeof y === "number" && !isNaN(y);
        if (nx !== ny) { return nx ? -1 : 1; }  /* missing values last, whichever the direction */
        var c = nx ? x - y : String(x).localeCompare(String(y));
        return asc ? c : -c;
      });
      rows.forEach(function (r) { body.appendChild(r); });
    });
  });
});
""".strip()


def esc(text: Any) -> str:
    return html.escape(str(text))


def _is_number(value: Any) -> bool:
    return isinstance(value, numbers.Number) and not isinstance(value, bool)


def table(rows: Sequence[Mapping[str, Any]], columns: Sequence[Column], *, table_id: str = "",
          links: Mapping[str, str] | None = None) -> str:
    """A sortable table of `rows` under `columns` ((key, header, fmt) as `report.table`); `links` maps a
    cell's text in the first column to a page to link it to."""
    numeric = [is_numeric_column(rows, key) for key, _, _ in columns]
    head = "".join(f'<th data-key="{esc(key)}">{esc(header)}</th>' for key, header, _ in columns)
    body = []
    for row in rows:
        cells = []
        for i, ((key, _, fmt), num) in enumerate(zip(columns, numeric)):
            value = row.get(key)
            text = esc(format_cell(value, fmt))
            if i == 0 and links and str(value) in links:
                text = f'<a href="{esc(links[str(value)])}">{text}</a>'
            if num and not is_missing(value):
                cells.append(f'<td class="num" data-value="{float(value)!r}">{text}</td>')
            else:
                cells.append(f'<td class="num">{text}</td>' if num else f"<td>{text}</td>")
        body.append("<tr>" + "".join(cells) + "</tr>")
    ident = f' id="{esc(table_id)}"' if table_id else ""
    return (f'<table class="sortable"{ident}>\n<thead><tr>{head}</tr></thead>\n<tbody>\n' + "\n".join(body)
            + "\n</tbody>\n</table>")


def _mix(a: tuple[int, int, int], b: tuple[int, int, int], t: float) -> str:
    t = min(1.0, max(0.0, t))
    return "rgb({},{},{})".format(*(round(x + (y - x) * t) for x, y in zip(a, b)))


_WHITE, _BLUE, _RED = (255, 255, 255), (49, 130, 189), (222, 45, 38)


def heatmap(row_labels: Sequence[str], col_labels: Sequence[str], values: np.ndarray, *, deltas: np.ndarray | None = None,
            fmt: str = ".1f", table_id: str = "", titles: np.ndarray | None = None) -> str:
    """`values` (rows x cols; NaN: not measured) as a coloured table. Without `deltas` the colour is the value
    (white at the matrix's minimum, blue at its maximum). With them each cell also shows its change in brackets,
    and the colour is that change: blue up, red down, as deep as the largest change of its column (columns may
    be in different units). `titles` (same shape, optional) become each cell's tooltip."""
    values = np.asarray(values, dtype=float)
    finite = values[np.isfinite(values)]
    lo, hi = (float(finite.min()), float(finite.max())) if finite.size else (0.0, 1.0)
    if deltas is not None:
        deltas = np.asarray(deltas, dtype=float)
        moved = np.where(np.isfinite(deltas), np.abs(deltas), 0.0)
        scales = moved.max(axis=0) if moved.size else np.zeros(len(col_labels))
    head = "<th></th>" + "".join(f"<th>{esc(c)}</th>" for c in col_labels)
    body = []
    for i, label in enumerate(row_labels):
        cells = [f"<th>{esc(label)}</th>"]
        for j in range(len(col_labels)):
            v = values[i, j]
            if not math.isfinite(v):
                cells.append('<td class="missing">-</td>')
                continue
            title = f' title="{esc(titles[i, j])}"' if titles is not None and titles[i, j] else ""
            extra, delta_attr, colour = "", "", _mix(_WHITE, _BLUE, (v - lo) / (hi - lo) if hi > lo else 0.5)
            if deltas is not None:
                d = deltas[i, j]
                colour = "#fff"
                if math.isfinite(d):
                    extra = f"<small>({format(d, '+' + fmt)})</small>"
                    delta_attr = f' data-delta="{float(d)!r}"'
                    if scales[j] > 0:
                        colour = _mix(_WHITE, _BLUE if d >= 0 else _RED, abs(d) / scales[j])
            cells.append(f'<td style="background:{colour}" data-value="{float(v)!r}"{delta_attr}{title}>'
                         f"{format(v, fmt)}{extra}</td>")
        body.append("<tr>" + "".join(cells) + "</tr>")
    ident = f' id="{esc(table_id)}"' if table_id else ""
    return (f'<table class="heat"{ident}>\n<thead><tr>{head}</tr></thead>\n<tbody>\n' + "\n".join(body)
            + "\n</tbody>\n</table>")


def png_data_uri(png: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(png).decode("ascii")


def strip(images: np.ndarray, alt: str, scale: int = 2) -> str:
    """uint8 images (N, H, W, 3) side by side as one inline PNG, drawn `scale` times their size, pixelated."""
    from PIL import Image  # noqa: PLC0415 - only pages with samples need it

    images = np.asarray(images)
    if images.ndim != 4 or images.shape[-1] != 3 or images.dtype != np.uint8:
        raise ValueError(f"a strip takes uint8 images (N, H, W, 3), got {images.dtype} {images.shape}")
    n, h, w, _ = images.shape
    row = np.concatenate(list(images), axis=1) if n else np.zeros((h, 0, 3), np.uint8)
    buf = io.BytesIO()
    Image.fromarray(row).save(buf, format="PNG")
    return (f'<img class="strip" alt="{esc(alt)}" width="{n * w * scale}" height="{h * scale}" '
            f'src="{png_data_uri(buf.getvalue())}">')


def figure(png: bytes, caption: str) -> str:
    return (f'<figure><img alt="{esc(caption)}" src="{png_data_uri(png)}">'
            f"<figcaption>{esc(caption)}</figcaption></figure>")


def section(title: str, *parts: str, note: str = "") -> str:
    note_html = f'<p class="note">{esc(note)}</p>' if note else ""
    return f"<section><h2>{esc(title)}</h2>{note_html}\n" + "\n".join(p for p in parts if p) + "\n</section>"


def page(title: str, *sections: str, index: str | None = "index.html") -> str:
    """One HTML document; `index` is the link back to the site's index (None: this is the index)."""
    nav = f'<nav><a href="{esc(index)}">&larr; all runs and ledgers</a></nav>' if index else ""
    return "\n".join([
        "<!DOCTYPE html>", '<html lang="en">',
        f'<head><meta charset="utf-8"><title>{esc(title)}</title><style>\n{_CSS}\n</style></head>',
        "<body>", nav, f"<h1>{esc(title)}</h1>", *sections, f"<script>\n{_SCRIPT}\n</script>", "</body>", "</html>",
    ]) + "\n"


def _flatten(value: Any, prefix: str, out: dict) -> None:
    if isinstance(value, Mapping):
        for k, v in value.items():
            _flatten(v, f"{prefix}.{k}" if prefix else str(k), out)
    elif _is_number(value) or isinstance(value, str) or value is None:
        out[prefix] = value
    # lists (matrices, per-order copies, images' features) are not table cells


def flat_rows(rows: Sequence[Mapping[str, Any]], max_columns: int = 40) -> tuple[list[dict], list[Column]]:
    """Nested result rows as flat rows ("efficacy.train" keys) of scalars, with columns in first-seen order
    (the first `max_columns`: a table wider than that is not read)."""
    flat = []
    for row in rows:
        out: dict = {}
        _flatten(row, "", out)
        flat.append(out)
    keys = list(dict.fromkeys(k for row in flat for k in row))[:max_columns]
    columns = [(k, k, _fmt(flat, k)) for k in keys]
    return flat, columns


def _fmt(rows: Sequence[Mapping[str, Any]], key: str) -> str:
    values = [r[key] for r in rows if _is_number(r.get(key))]
    if values and all(isinstance(v, numbers.Integral) for v in values):
        return ","
    return ".4g" if values else ""
