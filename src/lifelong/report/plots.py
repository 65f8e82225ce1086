"""Figures for reports: accuracy-matrix heatmaps and grouped metric bars, saved as PNG atomically.

Uses matplotlib's object API with the Agg canvas (``Figure`` + ``FigureCanvasAgg``), never pyplot:
no global backend switch, no figure registry to leak, safe in a headless process or a thread.
"""

from __future__ import annotations

import io
import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.colors import Normalize
from matplotlib.figure import Figure

from lifelong.atomic import atomic_write_bytes
from lifelong.metrics.continual import validate_accuracy_matrix

__all__ = ["plot_accuracy_matrices", "plot_metric_bars"]

_CMAP = "viridis"


def _save_png(fig: Figure, path: str | os.PathLike[str]) -> Path:
    FigureCanvasAgg(fig)  # attaches the Agg canvas to fig
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=120)
    return atomic_write_bytes(path, buf.getvalue())


def plot_accuracy_matrices(
    matrices: Mapping[str, np.ndarray],
    task_names: Sequence[str],
    path: str | os.PathLike[str],
) -> Path:
    """One heatmap per method, side by side, on a shared 0-100 colour scale; returns the PNG path.

    Each matrix has shape (T + 1, T) with T = len(task_names): rows "zero-shot", "after <task 1>",
    ..., columns the task datasets in training order. Every cell is annotated with its value.
    """
    if not matrices:
        raise ValueError("plot_accuracy_matrices needs at least one matrix")
    T = len(task_names)
    checked = {}
    for method, acc in matrices.items():
        a = validate_accuracy_matrix(acc)
        if a.shape[1] != T:
            raise ValueError(f"matrix for {method!r} has {a.shape[1]} tasks but {T} task names were given")
        checked[method] = a

    row_labels = ["zero-shot"] + [f"after {name}" for name in task_names]
    n = len(checked)
    cell = 0.55 + 0.1 * max(len(name) for name in task_names) / 4  # wider cells for long names
    fig = Figure(figsize=(n * (cell * T + 0.8) + 2.2, 0.5 * (T + 1) + 2.0), layout="constrained")
    axes = fig.subplots(1, n, squeeze=False)[0]
    norm = Normalize(vmin=0.0, vmax=100.0)
    cmap = None
    image = None
    for k, (ax, (method, a)) in enumerate(zip(axes, checked.items())):
        image = ax.imshow(a, cmap=_CMAP, norm=norm, aspect="auto")  # (T + 1, T)
        cmap = image.get_cmap()
        for t in range(T + 1):
            for j in range(T):
                r, g, b, _ = cmap(norm(a[t, j]))
                luminance = 0.299 * r + 0.587 * g + 0.114 * b
                ax.text(j, t, f"{a[t, j]:.1f}", ha="center", va="center", fontsize=8,
                        color="black" if luminance > 0.5 else "white")
        ax.set_title(method)
        ax.set_xticks(range(T), labels=list(task_names), rotation=45, ha="right")
        ax.set_yticks(range(T + 1), labels=row_labels if k == 0 else [""] * (T + 1))
        ax.axhline(0.5, color="white", linewidth=1.5)  # zero-shot row apart from training steps
    fig.colorbar(image, ax=list(axes), label="accuracy (%)", shrink=0.9)
    return _save_png(fig, path)


def plot_metric_bars(
    rows: Sequence[Mapping[str, Any]],
    metrics: Sequence[str],
    path: str | os.PathLike[str],
    *,
    label_key: str = "method",
    title: str = "",
) -> Path:
    """Grouped bar chart: one group per metric, one bar per row (method); returns the PNG path.

    ``rows`` are the same dicts as the results table (``row[label_key]`` names the bar); a missing
    or NaN value leaves a gap labelled "-".
    """
    if not rows or not metrics:
        raise ValueError("plot_metric_bars needs at least one row and one metric")
    labels = [str(row.get(label_key, f"row {i}")) for i, row in enumerate(rows)]
    values = np.array(
        [[_as_float(row.get(m)) for m in metrics] for row in rows], dtype=np.float64
    )  # (methods, metrics)

    n_rows, n_metrics = values.shape
    width = 0.8 / n_rows
    x = np.arange(n_metrics)
    fig = Figure(figsize=(max(4.0, 1.2 + n_metrics * (0.4 + 0.35 * n_rows)), 3.8), layout="constrained")
    ax = fig.subplots()
    for i, label in enumerate(labels):
        offsets = x - 0.4 + width * (i + 0.5)
        bars = ax.bar(offsets, np.nan_to_num(values[i], nan=0.0), width, label=label)
        texts = ["-" if math.isnan(v) else f"{v:.1f}" for v in values[i]]
        ax.bar_label(bars, labels=texts, fontsize=7, padding=1)
    ax.set_xticks(x, labels=list(metrics))
    ax.axhline(0.0, color="black", linewidth=0.8)
    ax.legend(fontsize=8, ncols=min(n_rows, 4), loc="upper center", bbox_to_anchor=(0.5, -0.12))
    if title:
        ax.set_title(title)
    return _save_png(fig, path)


def _as_float(value: Any) -> float:
    return float("nan") if value is None else float(value)
