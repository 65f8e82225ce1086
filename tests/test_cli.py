"""The `lifelong` command end to end on the tiny stream, and every bad input a user can give it:
each fails before any work, with exit code 2 and a message that says what to do."""

import csv
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from lifelong.cli import CONFIG_DIR, main
from lifelong.learn import METHODS
from lifelong.learn.finetune import Finetune

TINY = CONFIG_DIR / "tiny.yaml"
FAST = ["train.steps_per_task=3", "train.batch_size=8"]


def run_cli(*args):
    """The command in a fresh process, as a user runs it (exit code and stderr as the shell sees them)."""
    return subprocess.run([sys.executable, "-m", "lifelong.cli", *map(str, args)], capture_output=True, text=True,
                          timeout=300)


def test_run_writes_the_whole_run_folder(tmp_path, capsys):
    assert main(["run", str(TINY), f"output_dir={tmp_path}", "methods=[finetune,lwf]", *FAST]) == 0
    out = tmp_path / "tiny"
    for name in ("config.yaml", "versions.json", "data.json", "results.json", "accuracy_matrix.csv", "summary.md",
                 "accuracy_matrices.png", "report.html"):
        assert (out / name).is_file() and (out / name).stat().st_size > 0, name

    results = json.loads((out / "results.json").read_text())
    assert set(results["methods"]) == {"finetune", "lwf"}
    tasks = [t["name"] for t in results["stream"]["tasks"]]
    assert tasks == ["digits", "lfw", "mnist"]
    matrices = {m: np.array(r["accuracy_matrix"]) for m, r in results["methods"].items()}
    for m in matrices.values():
        assert m.shape == (4, 3) and ((0 <= m) & (m <= 100)).all()
    # Row 0 is the zero-shot model, the same for every method.
    np.testing.assert_array_equal(matrices["finetune"][0], matrices["lwf"][0])
    row = results["methods"]["finetune"]
    assert row["trainable_params"] > 0 and row["train_seconds"] > 0
    assert row["last"] == pytest.approx(matrices["finetune"][-1].mean())

    with open(out / "accuracy_matrix.csv") as f:
        lines = list(csv.reader(f))
    assert lines[0] == ["method", "after", *tasks] and len(lines) == 1 + 2 * 4
    versions = json.loads((out / "versions.json").read_text())
    assert versions["packages"]["torch"].startswith("2.13.0")
    assert "steps_per_task: 3" in (out / "config.yaml").read_text()

    for t in (1, 2, 3):  # per-task checkpoints, loadable as plain tensors
        state = load_file(out / "checkpoints" / "finetune" / f"task_{t}.safetensors")
        assert any(k.startswith("model.image_trunk.") for k in state)
    table = capsys.readouterr().out
    assert "Transfer" in table and "ZS degradation" in table and "lwf" in table


def test_same_config_same_numbers(tmp_path):
    for name in ("a", "b"):
        assert main(["run", str(TINY), f"output_dir={tmp_path}", f"name={name}", "methods=[lwf]", *FAST]) == 0
    a, b = (json.loads((tmp_path / n / "results.json").read_text())["methods"]["lwf"] for n in ("a", "b"))
    assert a["accuracy_matrix"] == b["accuracy_matrix"]


def test_help_teaches_every_command():
    for args in (["--help"], ["run", "--help"], ["demo", "--help"], ["methods", "--help"], ["streams", "--help"]):
        result = run_cli(*args)
        assert result.returncode == 0, result.stderr
        assert "usage: lifelong" in result.stdout
    assert "lifelong run configs/demo.yaml" in run_cli("--help").stdout
    listing = run_cli("methods").stdout
    assert all(name in listing for name in METHODS) and "reg_weight=" in listing
    assert "mtil-mini" in run_cli("streams").stdout


def test_unknown_config_key_fails_before_any_work(tmp_path):
    config = tmp_path / "bad.yaml"
    config.write_text(TINY.read_text().replace("train:", "trian:"))
    result = run_cli("run", config, f"output_dir={tmp_path / 'runs'}")
    assert result.returncode == 2
    assert "trian" in result.stderr and "train" in result.stderr and "stream" in result.stderr
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "runs").exists(), "a bad config must fail before writing anything"

    result = run_cli("run", TINY, "train.stepz=3", f"output_dir={tmp_path / 'runs'}")
    assert result.returncode == 2 and "steps_per_task" in result.stderr


def test_missing_dataset_says_how_to_install(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("LIFELONG_FASHION_MNIST_DIR", str(tmp_path / "none"))
    assert main(["run", str(TINY), f"output_dir={tmp_path}", "stream.name=split-fashion-mnist"]) == 2
    assert "apt-get install dataset-fashion-mnist" in capsys.readouterr().err


def _imagefolder(root: Path, classes: dict[str, int]) -> None:
    rng = np.random.default_rng(0)
    for name, n in classes.items():
        (root / name).mkdir(parents=True)
        for i in range(n):
            Image.fromarray(rng.integers(0, 256, (24, 24, 3), dtype=np.uint8)).save(root / name / f"{i}.png")


def _imagefolder_config(tmp_path: Path, root: Path) -> Path:
    config = tmp_path / "mine.yaml"
    config.write_text(f"""# lifelong run mine.yaml
name: mine
output_dir: {tmp_path / 'runs'}
model: {{name: tiny-embedded, resolution: 32, trainable_blocks: 2}}
stream:
  name: mine
  scenario: task
  tasks:
    - {{source: imagefolder, options: {{root: {root}}}}}
    - {{source: digits, train_items: 20, test_items: 10}}
train: {{steps_per_task: 2, batch_size: 4}}
methods: [finetune]
""")
    return config


def test_users_own_imagefolder_runs(tmp_path):
    _imagefolder(tmp_path / "data", {"red apple": 6, "green pear": 6})
    assert main(["run", str(_imagefolder_config(tmp_path, tmp_path / "data"))]) == 0
    data = json.loads((tmp_path / "runs" / "mine" / "data.json").read_text())
    assert sorted(data["tasks"][0]["classes"]) == ["green pear", "red apple"]


@pytest.mark.parametrize("defect", ["empty class folder", "unreadable image"])
def test_malformed_imagefolder_names_the_file(defect, tmp_path, capsys):
    root = tmp_path / "data"
    _imagefolder(root, {"cat": 4, "dog": 4})
    if defect == "empty class folder":
        (root / "bird").mkdir()
        culprit = root / "bird"
    else:
        culprit = root / "dog" / "broken.png"
        culprit.write_bytes(b"\x89PNG this is not really a png")
    assert main(["run", str(_imagefolder_config(tmp_path, root))]) == 2
    assert str(culprit) in capsys.readouterr().err


class ExplodesOnTask2(Finetune):
    """Fault injection: a method whose loss turns NaN in the second task."""

    def loss(self, model, batch, data):
        loss, logs = super().loss(model, batch, data)
        return (loss * float("nan") if data.index == 1 else loss), logs


def test_nan_loss_stops_with_a_clear_message_and_keeps_the_last_good_checkpoint(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(METHODS, "finetune", ExplodesOnTask2)
    code = main(["run", str(TINY), f"output_dir={tmp_path}", "methods=[finetune]", *FAST])
    assert code == 2
    err = capsys.readouterr().err
    checkpoint = tmp_path / "tiny" / "checkpoints" / "finetune" / "task_1.safetensors"
    assert "loss is nan at task 2" in err and str(checkpoint) in err and "train.lr" in err
    state = load_file(checkpoint)  # intact and loadable
    assert all(torch.isfinite(v).all() for v in state.values())
    assert not (tmp_path / "tiny" / "checkpoints" / "finetune" / "task_2.safetensors").exists()


def test_orders_runs_every_cyclic_order_and_reports_mean_and_std(tmp_path, capsys):
    assert main(["run", str(TINY), f"output_dir={tmp_path}", "methods=[finetune]", "orders=3", *FAST]) == 0
    out = tmp_path / "tiny"
    results = json.loads((out / "results.json").read_text())
    assert results["orders"] == [["digits", "lfw", "mnist"], ["lfw", "mnist", "digits"], ["mnist", "digits", "lfw"]]
    row = results["methods"]["finetune"]
    per_order = row["per_order"]
    assert [o["tasks"] for o in per_order] == results["orders"]
    for metric in ("transfer", "avg", "last", "max_forgetting", "zero_shot_degradation"):
        values = np.array([o[metric] for o in per_order])
        assert row[metric] == pytest.approx(values.mean()) and row[f"{metric}_std"] == pytest.approx(values.std())
    # The zero-shot row is the same model on the same test sets, only in another column order.
    zero_shot = [dict(zip(o["tasks"], o["accuracy_matrix"][0])) for o in per_order]
    assert zero_shot[0] == zero_shot[1] == zero_shot[2]
    assert (out / "accuracy_matrix_order_3.csv").is_file() and (out / "metrics.png").is_file()
    assert "±" in capsys.readouterr().out
    assert main(["run", str(TINY), f"output_dir={tmp_path}", "orders=4"]) == 2  # the stream has 3 tasks
