"""Report helpers: table formatting, PNG figures, the site's HTML pieces and atomic writes."""

import json
import math
import os
import stat

import numpy as np
import pytest

from lifelong.atomic import atomic_write_bytes, atomic_write_json, atomic_write_text
from lifelong.report import site
from lifelong.report.plots import plot_accuracy_matrices, plot_metric_bars
from lifelong.report.table import format_table

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"

ROWS = [
    {"method": "finetune", "transfer": 44.6, "last": 77.3, "steps": 1000},
    {"method": "zscl", "transfer": float("nan"), "last": 83.612, "steps": 100},
    {"method": "lwf", "last": None, "steps": 20},  # "transfer" missing
]
COLUMNS = [
    ("method", "Method", ""),
    ("transfer", "Transfer", ".1f"),
    ("last", "Last", ".2f"),
    ("steps", "Steps", "d"),
]

A = np.array([[50.0, 60.0, 70.0], [90.0, 65.0, 74.0], [92.0, 95.0, 58.0], [70.0, 85.0, 99.0]])
B = np.array([[40.0, 90.0, 30.0], [60.0, 85.0, 25.0], [55.0, 70.0, 35.0], [50.0, 65.0, 10.0]])


# ---------------------------------------------------------------- table


def test_format_table_fixed_width():
    text = format_table(ROWS, COLUMNS)
    assert text.splitlines() == [
        "Method    Transfer   Last  Steps",
        "--------  --------  -----  -----",
        "finetune      44.6  77.30   1000",
        "zscl             -  83.61    100",
        "lwf              -      -     20",
    ]


def test_format_table_markdown():
    text = format_table(ROWS, COLUMNS, markdown=True)
    assert text.splitlines() == [
        "| Method   | Transfer |  Last | Steps |",
        "| -------- | -------: | ----: | ----: |",
        "| finetune |     44.6 | 77.30 |  1000 |",
        "| zscl     |        - | 83.61 |   100 |",
        "| lwf      |        - |     - |    20 |",
    ]


def test_format_table_markdown_escapes_pipes_and_callable_fmt():
    rows = [{"name": "a|b", "x": 0.5}]
    text = format_table(rows, [("name", "Name", ""), ("x", "Pct", lambda v: f"{100 * v:.0f}%")], markdown=True)
    assert "a\\|b" in text
    assert "50%" in text


def test_format_table_needs_columns():
    with pytest.raises(ValueError):
        format_table(ROWS, [])


# ---------------------------------------------------------------- plots


def _assert_png(path):
    data = path.read_bytes()
    assert data[:8] == PNG_MAGIC
    assert len(data) > 1000


def test_plot_accuracy_matrices(tmp_path):
    out = plot_accuracy_matrices({"finetune": A, "zscl": B}, ["aircraft", "dtd", "eurosat"], tmp_path / "heat.png")
    assert out == tmp_path / "heat.png"
    _assert_png(out)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["heat.png"]  # no temp file left


def test_plot_accuracy_matrices_rejects_mismatched_tasks(tmp_path):
    with pytest.raises(ValueError, match="2 task names"):
        plot_accuracy_matrices({"finetune": A}, ["a", "b"], tmp_path / "x.png")
    with pytest.raises(ValueError, match=r"\(T \+ 1, T\)"):
        plot_accuracy_matrices({"finetune": A[1:]}, ["a", "b", "c"], tmp_path / "x.png")
    assert not (tmp_path / "x.png").exists()


def test_plot_metric_bars(tmp_path):
    out = plot_metric_bars(ROWS, ["transfer", "last"], tmp_path / "sub" / "bars.png")
    _assert_png(out)


# ---------------------------------------------------------------- html


def test_site_page_is_self_contained_and_escapes(tmp_path):
    heat = plot_accuracy_matrices({"finetune": A}, ["a", "b", "c"], tmp_path / "heat.png")
    text = site.page("Run <1>", site.section("Methods & more", site.table(ROWS, COLUMNS, table_id="m")),
                     site.figure(heat.read_bytes(), "heat"), index=None)
    assert text.startswith("<!DOCTYPE html>")
    for value in ("finetune", "44.6", "83.61", "1000", '<th data-key="transfer">Transfer</th>'):
        assert value in text
    assert '<td class="num">-</td>' in text  # NaN / missing: no data-value, sorted last
    assert 'data-value="83.612"' in text  # the full value behind the formatted one
    assert text.count("data:image/png;base64,") == 1
    assert "Run &lt;1&gt;" in text and "Methods &amp; more" in text
    assert "src=\"http" not in text and "<link" not in text


def test_heatmap_cells_hold_values_and_changes():
    values = np.array([[50.0, 1.5], [40.0, np.nan]])
    deltas = np.array([[np.nan, np.nan], [-10.0, np.nan]])
    text = site.heatmap(["base", "after 1"], ["acc", "fd"], values, deltas=deltas, table_id="h")
    assert 'data-value="40.0" data-delta="-10.0"' in text and "(-10.0)" in text
    assert text.count('class="missing"') == 1
    assert "rgb(222,45,38)" in text  # the largest fall of its column: full red


def test_strip_checks_its_images():
    assert site.strip(np.zeros((3, 4, 4, 3), np.uint8), "x", scale=2).startswith('<img class="strip" alt="x" width="24"')
    with pytest.raises(ValueError, match="uint8 images"):
        site.strip(np.zeros((3, 4, 4), np.float32), "x")


def test_flat_rows_flattens_nested_results():
    rows, columns = site.flat_rows([{"method": "esd", "efficacy": {"train": 3.0, "held": 5.0}, "images": [1, 2]}])
    assert rows == [{"method": "esd", "efficacy.train": 3.0, "efficacy.held": 5.0}]
    assert [c[0] for c in columns] == ["method", "efficacy.train", "efficacy.held"]


# ---------------------------------------------------------------- atomic writes


def test_atomic_write_roundtrip(tmp_path):
    p = atomic_write_bytes(tmp_path / "a" / "b.bin", b"\x00\x01")
    assert p.read_bytes() == b"\x00\x01"
    atomic_write_text(tmp_path / "t.txt", "héllo\n")
    assert (tmp_path / "t.txt").read_text(encoding="utf-8") == "héllo\n"
    atomic_write_json(tmp_path / "m.json", {"avg": 80.5, "bwt": float("nan")})
    loaded = json.loads((tmp_path / "m.json").read_text())
    assert loaded["avg"] == 80.5 and math.isnan(loaded["bwt"])


def test_atomic_write_replaces_and_keeps_mode(tmp_path):
    p = tmp_path / "f.txt"
    p.write_text("old")
    os.chmod(p, 0o640)
    atomic_write_text(p, "new")
    assert p.read_text() == "new"
    assert stat.S_IMODE(p.stat().st_mode) == 0o640
    assert sorted(x.name for x in tmp_path.iterdir()) == ["f.txt"]


def test_atomic_write_json_failure_keeps_old_file(tmp_path):
    p = tmp_path / "results.json"
    atomic_write_json(p, {"avg": 1.0})
    before = p.read_bytes()
    with pytest.raises(TypeError):
        atomic_write_json(p, {"avg": object()})
    assert p.read_bytes() == before
    assert sorted(x.name for x in tmp_path.iterdir()) == ["results.json"]


def test_atomic_write_failure_during_write_cleans_up(tmp_path, monkeypatch):
    p = tmp_path / "f.bin"
    p.write_bytes(b"old")

    def broken_replace(src, dst):
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", broken_replace)
    with pytest.raises(OSError, match="disk full"):
        atomic_write_bytes(p, b"new")
    assert p.read_bytes() == b"old"
    assert sorted(x.name for x in tmp_path.iterdir()) == ["f.bin"]
