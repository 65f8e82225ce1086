"""A single self-contained HTML report: results table, embedded PNG figures, notes.

Nothing is linked: figures are base64 data URIs and the CSS is inline, so the file can be mailed
or attached to an issue as is.
"""

from __future__ import annotations

import base64
import html
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from lifelong.atomic import atomic_write_text
from lifelong.report.table import Column, format_cell, is_numeric_column

__all__ = ["render_html_report", "write_html_report"]

_PNG_MAGIC = b"\x89PNG\r\n\x1a\n"

_CSS = """
body { font-family: system-ui, sans-serif; margin: 2em auto; max-width: 1200px; color: #222; }
h1 { font-size: 1.5em; }
table { border-collapse: collapse; margin: 1em 0; font-size: 0.9em; }
th, td { padding: 0.3em 0.8em; border-bottom: 1px solid #ddd; }
th { background: #f4f4f4; text-align: left; }
td.num { text-align: right; font-variant-numeric: tabular-nums; }
figure { margin: 1.5em 0; }
figure img { max-width: 100%; }
figcaption { color: #666; font-size: 0.85em; }
.notes { color: #444; }
""".strip()


def _html_table(rows: Sequence[Mapping[str, Any]], columns: Sequence[Column]) -> str:
    numeric = [is_numeric_column(rows, key) for key, _, _ in columns]
    head = "".join(f"<th>{html.escape(header)}</th>" for _, header, _ in columns)
    body = []
    for row in rows:
        tds = "".join(
            ('<td class="num">' if num else "<td>") + html.escape(format_cell(row.get(key), fmt)) + "</td>"
            for (key, _, fmt), num in zip(columns, numeric)
        )
        body.append(f"<tr>{tds}</tr>")
    return f"<table>\n<thead><tr>{head}</tr></thead>\n<tbody>\n" + "\n".join(body) + "\n</tbody>\n</table>"


def _figure(image: Path) -> str:
    data = image.read_bytes()
    if not data.startswith(_PNG_MAGIC):
        raise ValueError(f"{image} is not a PNG file; only PNG figures can be embedded")
    encoded = base64.b64encode(data).decode("ascii")
    caption = html.escape(image.stem)
    return (
        f'<figure><img alt="{caption}" src="data:image/png;base64,{encoded}">'
        f"<figcaption>{caption}</figcaption></figure>"
    )


def render_html_report(
    title: str,
    table_rows: Sequence[Mapping[str, Any]],
    columns: Sequence[Column],
    images: Sequence[str | os.PathLike[str]] = (),
    notes: str = "",
) -> str:
    """The report as an HTML string (see ``write_html_report``)."""
    notes_html = "".join(
        f'<p class="notes">{html.escape(p.strip())}</p>' for p in notes.split("\n\n") if p.strip()
    )
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en">',
        f'<head><meta charset="utf-8"><title>{html.escape(title)}</title><style>\n{_CSS}\n</style></head>',
        "<body>",
        f"<h1>{html.escape(title)}</h1>",
        _html_table(table_rows, columns),
        *(_figure(Path(p)) for p in images),
        notes_html,
        "</body>",
        "</html>",
    ]
    return "\n".join(part for part in parts if part) + "\n"


def write_html_report(
    path: str | os.PathLike[str],
    title: str,
    table_rows: Sequence[Mapping[str, Any]],
    columns: Sequence[Column],
    images: Sequence[str | os.PathLike[str]],
    notes: str = "",
) -> Path:
    """Write one self-contained HTML file atomically and return its path.

    ``table_rows``/``columns`` are those of ``format_table`` (missing or NaN shows as "-");
    ``images`` are PNG files, embedded as base64 data URIs in order; ``notes`` is plain text
    (escaped; blank lines separate paragraphs).
    """
    return atomic_write_text(path, render_html_report(title, table_rows, columns, images, notes))
