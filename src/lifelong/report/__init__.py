"""Reports: atomic file writes, results tables, figures and a self-contained HTML page.

Atomic writes live in ``lifelong.atomic`` (a base utility); re-exported here.
``table``: ``format_table`` (terminal or Markdown). ``html``: ``write_html_report``.
``plots`` (imports matplotlib, so not imported here): ``plot_accuracy_matrices``, ``plot_metric_bars``.
"""

from lifelong.atomic import atomic_write_bytes, atomic_write_json, atomic_write_text
from lifelong.report.table import format_table

__all__ = ["atomic_write_bytes", "atomic_write_json", "atomic_write_text", "format_table"]
