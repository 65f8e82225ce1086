"""The report page of a results folder: what `lifelong run` and the benches write, read back from its files.

A results folder is recognised by its results.json:
    learn        `lifelong run` (a "stream" and, per method, an "accuracy_matrix"): the metrics table, each
                 method's accuracy matrix as a heatmap (rows: the model after each task), the figures
    edit-bench   `lifelong bench edit` (per method, "lifelong" rows by T): every row, and each headline metric
                 against T (method x T)
    erase-bench  `lifelong bench erase` ("settings" and "rows"): every row
    personalize-bench  `lifelong bench personalize` (the same, and "bench": "personalize"): every row
    results      anything else with a results.json: its rows of scalars
Every PNG in the folder is embedded, and summary.md is shown as written.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from lifelong.atomic import atomic_write_text
from lifelong.errors import DataFormatError
from lifelong.metrics.continual import METRIC_DOCS
from lifelong.report import site
from lifelong.report.table import Column

__all__ = ["LEARN_COLUMNS", "INCREMENTAL_COLUMNS", "Page", "results_page", "write_run_report"]

LEARN_COLUMNS: list[Column] = [
    ("method", "method", ""),
    ("transfer", "Transfer", ".1f"),
    ("avg", "Avg", ".1f"),
    ("last", "Last", ".1f"),
    ("max_forgetting", "max forgetting", ".1f"),
    ("chaudhry_forgetting", "forgetting (Chaudhry)", ".1f"),
    ("zero_shot_degradation", "ZS degradation", ".1f"),
    ("bwt", "BWT", ".1f"),
    ("trainable_params", "trainable params", ","),
    ("train_seconds", "time (s)", ".0f"),
    ("peak_rss_mb", "peak RSS (MiB)", ".0f"),
]
INCREMENTAL_COLUMNS: list[Column] = [("avg_incremental_accuracy", "avg incr. acc", ".1f"),
                                     ("final_seen_accuracy", "A_T", ".1f")]

# The headline metrics of an edit bench drawn against T (EasyEdit's token-level convention, as the bench's figure).
EDIT_METRICS = ("reliability_token", "generality_token", "locality_token", "portability_token")


@dataclass
class Page:
    """One page of the site: its file name, title, kind, key numbers (for the index) and HTML body sections."""

    name: str
    title: str
    kind: str
    key_numbers: str
    sections: list[str] = field(default_factory=list)

    def html(self, index: str | None = "index.html") -> str:
        return site.page(self.title, *self.sections, index=index)


def _read_results(folder: Path) -> dict:
    path = folder / "results.json"
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise DataFormatError(f"{folder}: no results.json (a run folder of `lifelong run` or a bench, or a ledger "
                              "made by `lifelong init`)") from None
    except json.JSONDecodeError as e:
        raise DataFormatError(f"{path}: not JSON ({e})") from None


def _figures_section(folder: Path) -> str:
    """Every PNG of the folder, each file read once (a file that is not a PNG is left out)."""
    pngs = ((p, p.read_bytes()) for p in sorted(folder.glob("*.png")))
    figures = [site.figure(data, p.stem) for p, data in pngs if data[:8] == b"\x89PNG\r\n\x1a\n"]
    return site.section("Figures", *figures) if figures else ""


def _summary(folder: Path) -> str:
    path = folder / "summary.md"
    if not path.is_file():
        return ""
    return site.section("summary.md", f"<pre>{site.esc(path.read_text())}</pre>")


def _learn(folder: Path, results: dict) -> Page:
    methods = results["methods"]
    rows = [{"method": label, **{k: v for k, v in m.items() if not isinstance(v, (list, dict))}}
            for label, m in methods.items()]
    stream = results.get("stream", {})
    tasks = [t["name"] for t in stream.get("tasks", [])]
    columns = LEARN_COLUMNS[:-3] + (INCREMENTAL_COLUMNS if stream.get("scenario") == "class" else []) + LEARN_COLUMNS[-3:]
    columns = [c for c in columns if any(c[0] in r for r in rows)]
    orders = results.get("orders") or [tasks]
    note = (f"Stream {stream.get('name', '?')} ({stream.get('scenario', '?')}-incremental), tasks {', '.join(tasks)}; "
            f"{len(orders)} task order(s), metrics the mean over them. Accuracies in percent.")
    matrices = []
    for label, m in methods.items():
        matrix = np.asarray(m["accuracy_matrix"], dtype=float)
        names = orders[0] if len(orders[0]) == matrix.shape[1] else [f"task {j + 1}" for j in range(matrix.shape[1])]
        row_labels = ["zero-shot"] + [f"after {t}" for t in names[: matrix.shape[0] - 1]]
        matrices.append(f"<h3>{site.esc(label)}</h3>" + site.heatmap(row_labels, names, matrix,
                                                                     table_id=f"matrix-{label}"))
    docs = "".join(f"<li><b>{site.esc(k)}</b>: {site.esc(v)}</li>" for k, v in METRIC_DOCS.items())
    best = max(rows, key=lambda r: r.get("last", -math.inf))
    key = f"{len(rows)} method(s) on {stream.get('name', '?')}; best Last {best.get('last', float('nan')):.1f} ({best['method']})"
    return Page(folder.name, f"run {results.get('name', folder.name)}", "learn", key, [
        site.section("Methods", site.table(rows, columns, table_id="metrics"), note=note),
        site.section("Accuracy matrices", *matrices,
                     note="Row i: the model after task i (row 0: before training); column j: accuracy (%) on task j."),
        _figures_section(folder),
        site.section("Metric definitions", f"<ul>{docs}</ul>"),
    ])


def _edit_bench(folder: Path, results: dict) -> Page:
    rows = []
    for method, m in results["methods"].items():
        for protocol in ("single", "lifelong", "batch"):
            entries = m.get(protocol) or []
            for row in [entries] if isinstance(entries, dict) else entries:
                rows.append({"method": method, **row, "protocol": row.get("protocol", protocol)})
    flat, columns = site.flat_rows(rows)
    # the T of every row of the sweep (the unedited model's rows there are labelled "pre-edit")
    by_t = sorted({r["T"] for m in results["methods"].values() for r in m.get("lifelong") or [] if "T" in r})
    curves = []
    for metric in EDIT_METRICS:
        methods = [m for m in results["methods"] if any(metric in r for r in results["methods"][m].get("lifelong", []))]
        if not methods or not by_t:
            continue
        values = np.full((len(methods), len(by_t)), np.nan)
        for i, m in enumerate(methods):
            for r in results["methods"][m]["lifelong"]:
                if r.get(metric) is not None:
                    values[i, by_t.index(r["T"])] = r[metric]
        curves.append(f"<h3>{site.esc(metric)}</h3>"
                      + site.heatmap(methods, [f"T={t}" for t in by_t], values, fmt=".3f", table_id=f"vs-T-{metric}"))
    key = f"{len(results['methods'])} editor row set(s), T up to {max(by_t) if by_t else '-'}"
    return Page(folder.name, f"edit bench {folder.name}", "edit-bench", key, [
        site.section("Metrics against T", *curves,
                     note="Each editor after T sequential edits, every edit judged on the final model (EasyEdit's "
                          "token-level scores, 0-1)."),
        site.section("Every row", site.table(flat, columns, table_id="rows")),
        _figures_section(folder),
        _summary(folder),
    ])


def _rows_page(folder: Path, results: dict, kind: str, rows: list[dict]) -> Page:
    flat, columns = site.flat_rows(rows)
    return Page(folder.name, f"{kind} {folder.name}", kind, f"{len(rows)} row(s)", [
        site.section("Rows", site.table(flat, columns, table_id="rows")),
        _figures_section(folder),
        _summary(folder),
    ])


def results_page(folder: str | os.PathLike[str]) -> Page:
    """The page of a results folder (see the module docstring for the kinds)."""
    folder = Path(folder)
    results = _read_results(folder)
    methods = results.get("methods")
    if isinstance(methods, dict) and methods and all("accuracy_matrix" in m for m in methods.values()):
        return _learn(folder, results)
    if isinstance(methods, dict) and "requests" in results:
        return _edit_bench(folder, results)
    if "settings" in results and isinstance(results.get("rows"), dict):  # "bench": which (the erase bench names none)
        kind = f"{results.get('bench', 'erase')}-bench"
        return _rows_page(folder, results, kind, [{"row": k, **v} for k, v in results["rows"].items()])
    rows = [{"row": k, **v} for k, v in results.items() if isinstance(v, dict)]
    return _rows_page(folder, results, "results", rows or [results])


def write_run_report(folder: str | os.PathLike[str]) -> Path:
    """FOLDER/report.html: the folder's page on its own (what `lifelong report` puts in its site)."""
    return atomic_write_text(Path(folder) / "report.html", results_page(folder).html(index=None))
