"""Results tables as plain text: fixed-width for the terminal, or a GitHub Markdown pipe table.

A column is ``(key, header, fmt)``: the row dict key, the header text, and a format spec for
``format(value, fmt)`` (``".2f"``, ``"d"``, ``""``) or a callable ``value -> str``. A missing key,
``None`` or NaN shows as ``-``. Numeric columns are right-aligned, others left-aligned.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Mapping, Sequence
from typing import Any, Callable, Union

__all__ = ["Column", "MISSING", "format_cell", "format_table", "is_missing", "is_numeric_column"]

Column = tuple[str, str, Union[str, Callable[[Any], str]]]
MISSING = "-"


def is_missing(value: Any) -> bool:
    """True for None and NaN (float or numpy scalar)."""
    if value is None:
        return True
    try:
        return math.isnan(value)
    except TypeError:
        return False


def _is_number(value: Any) -> bool:
    return isinstance(value, numbers.Number) and not isinstance(value, bool)


def format_cell(value: Any, fmt: str | Callable[[Any], str]) -> str:
    """One cell's text: ``-`` for missing values, else ``fmt(value)`` or ``format(value, fmt)``."""
    if is_missing(value):
        return MISSING
    if callable(fmt):
        return fmt(value)
    return format(value, fmt)


def is_numeric_column(rows: Sequence[Mapping[str, Any]], key: str) -> bool:
    """True when every present, non-missing value under ``key`` is a number (right-align it)."""
    present = [r[key] for r in rows if key in r and not is_missing(r[key])]
    return bool(present) and all(_is_number(v) for v in present)


def format_table(
    rows: Sequence[Mapping[str, Any]],
    columns: Sequence[Column],
    *,
    markdown: bool = False,
) -> str:
    """Render ``rows`` under ``columns`` as a fixed-width table, or a Markdown pipe table.

        method    transfer  last
        --------  --------  ----
        finetune     44.60  77.3
        zscl             -  83.6
    """
    if not columns:
        raise ValueError("format_table needs at least one column")
    headers = [header for _, header, _ in columns]
    cells = [[format_cell(row.get(key), fmt) for key, _, fmt in columns] for row in rows]
    right = [is_numeric_column(rows, key) for key, _, _ in columns]

    if markdown:
        cells = [[c.replace("|", "\\|") for c in line] for line in cells]
        headers = [h.replace("|", "\\|") for h in headers]
    widths = [max([len(h)] + [len(line[i]) for line in cells]) for i, h in enumerate(headers)]
    if markdown:
        widths = [max(w, 3) for w in widths]  # a rule needs at least "---"

    def pad(text: str, i: int) -> str:
        return text.rjust(widths[i]) if right[i] else text.ljust(widths[i])

    if markdown:
        rules = [("-" * (w - 1) + ":") if r else ("-" * w) for w, r in zip(widths, right)]
        lines = [headers, rules] + cells
        return "\n".join(
            "| " + " | ".join(pad(c, i) if k != 1 else c for i, c in enumerate(line)) + " |"
            for k, line in enumerate(lines)
        )
    lines = [headers, ["-" * w for w in widths]] + cells
    return "\n".join("  ".join(pad(c, i) for i, c in enumerate(line)).rstrip() for line in lines)
