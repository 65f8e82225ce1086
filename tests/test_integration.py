"""Integration on the real embedded model and real data (select with `pytest -m slow`; ~2-4 min).

What a user relies on: the default model is zero-shot above chance where the issue says it should be,
a task's accuracy goes up when it is learned, and the class-incremental stream runs end to end."""

import json

import numpy as np
import pytest

from lifelong.cli import CONFIG_DIR, main

pytestmark = pytest.mark.slow


def test_demo_stream_learns_and_measures(tmp_path):
    code = main(["run", str(CONFIG_DIR / "demo.yaml"), f"output_dir={tmp_path}", "train.steps_per_task=30",
                 "methods=[finetune]"])
    assert code == 0
    results = json.loads((tmp_path / "demo" / "results.json").read_text())
    tasks = [t["name"] for t in results["stream"]["tasks"]]
    acc = np.array(results["methods"]["finetune"]["accuracy_matrix"])
    zero_shot = dict(zip(tasks, acc[0]))
    assert zero_shot["fashion-mnist"] >= 18.0, zero_shot  # 10 classes: chance is 10%; measured 21.8
    learned = np.diag(acc[1:])  # a[t, t]: each task right after learning it
    assert learned.mean() > acc[0].mean() + 15.0, (learned, acc[0])


def test_class_incremental_stream_runs(tmp_path):
    code = main(["run", str(CONFIG_DIR / "split_fashion_mnist.yaml"), f"output_dir={tmp_path}",
                 "train.steps_per_task=20", "methods=[finetune,lwf]"])
    assert code == 0
    results = json.loads((tmp_path / "split-fashion-mnist" / "results.json").read_text())
    for row in results["methods"].values():
        assert 0 < row["final_seen_accuracy"] <= 100
        assert len(row["accuracy_matrix"]) == 6
