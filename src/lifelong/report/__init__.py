"""Reports: atomic file writes, results tables, figures and a self-contained HTML page.

``io``: ``atomic_write_bytes`` / ``atomic_write_text`` / ``atomic_write_json``.
``table``: ``format_table`` (terminal or Markdown). ``html``: ``write_html_report``.
``plots`` (imports matplotlib, so not imported here): ``plot_accuracy_matrices``, ``plot_metric_bars``.
"""

from lifelong.report.io import atomic_write_bytes, atomic_write_json, atomic_write_text
from lifelong.report.table import format_table

__all__ = ["atomic_write_bytes", "atomic_write_json", "atomic_write_text", "format_table"]
