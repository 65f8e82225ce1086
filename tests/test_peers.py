"""The peer benchmark (benchmarks/peers/): its lifelong side runs end to end on a tiny setting through the
driver, and, where Avalanche's environment exists, both sides see the same data and the same model."""

import importlib.util
import json
import sys
from pathlib import Path

import pytest
import yaml

PEERS = Path(__file__).resolve().parent.parent / "benchmarks" / "peers"
TINY = {
    "stream": "split-fashion-mnist", "seeds": [0], "threads": 1,
    "train": {"batch_size": 10, "eval_batch_size": 64, "lr": 1.0e-3, "weight_decay": 0.0},
    "backbones": {"mlp": {"train_items": 20, "test_items": 10, "epochs": 1, "resolution": 8, "hidden_sizes": [16]}},
    "methods": {"naive": {}, "ewc": {"ewc_lambda": 10.0}, "lwf": {"alpha": 1.0, "temperature": 2.0}, "replay": {"mem_size": 8}},
}


def driver():
    spec = importlib.util.spec_from_file_location("peers_run", PEERS / "run.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def fashion_mnist_or_skip():
    from lifelong.data.builtin import fashion_mnist_dir

    if not (fashion_mnist_dir() / "t10k-labels-idx1-ubyte.gz").is_file():
        pytest.skip(f"Fashion-MNIST is not installed in {fashion_mnist_dir()} (make setup installs it)")


def run(tmp_path, *args):
    settings = tmp_path / "settings.yaml"
    settings.write_text(yaml.safe_dump(TINY))
    out = tmp_path / "peers.json"
    driver().main(["--settings", str(settings), "--out", str(out), "--work-dir", str(tmp_path / "work"), *args])
    return json.loads(out.read_text())


def test_the_shared_settings_translate_into_valid_lifelong_configs():
    sys.path.insert(0, str(PEERS))
    from lifelong_side import run_config

    settings = yaml.safe_load((PEERS / "settings.yaml").read_text())
    for backbone in settings["backbones"]:
        for method in settings["methods"]:
            config = run_config(settings, backbone, method, 0)
            assert config.model.family == "classifier" and config.train.grad_clip == 0
    ewc = run_config(settings, "mlp", "ewc", 0).methods[0].params
    assert ewc["reg_weight"] == 2 * settings["methods"]["ewc"]["ewc_lambda"]  # Avalanche has no 1/2
    lwf = run_config(settings, "mlp", "lwf", 0).methods[0].params
    assert lwf["reg_weight"] == settings["methods"]["lwf"]["alpha"] / settings["methods"]["lwf"]["temperature"] ** 2


def test_the_lifelong_side_runs_through_the_driver(tmp_path):
    fashion_mnist_or_skip()
    results = run(tmp_path, "--frameworks", "lifelong", "--methods", "naive,replay")
    assert [(r["framework"], r["method"]) for r in results["runs"]] == [("lifelong", "naive"), ("lifelong", "replay")]
    for r in results["runs"]:
        assert len(r["accuracy_matrix"]) == 6 and len(r["accuracy_matrix"][0]) == 5
        assert 0 <= r["final_accuracy"] <= 100 and r["peak_rss_mb"] > 0 and r["seconds"]["experiment_cpu"] > 0
    assert results["checks"]["data_fingerprints_match_lifelong_loader"]
    assert "speedup_wall" not in results["comparison"][0]  # one framework: nothing to compare
    assert results["command"].startswith("python")


@pytest.mark.slow  # two interpreters with torch, one with Avalanche: about a minute
@pytest.mark.skipif(not (PEERS / ".venv-avalanche" / "bin" / "python").is_file(),
                    reason="Avalanche's environment benchmarks/peers/.venv-avalanche is absent (bash benchmarks/peers/setup.sh makes it)")
def test_both_sides_train_the_same_model_on_the_same_data(tmp_path):
    fashion_mnist_or_skip()
    results = run(tmp_path, "--methods", "replay")
    assert results["checks"]["initial_logits_max_abs_difference"] < 1e-4
    assert results["checks"]["data_fingerprints_match_lifelong_loader"]
    row = results["comparison"][0]
    assert row["speedup_wall"]["median"] > 0 and abs(row["accuracy_gap"]) <= 100
    assert results["versions"]["avalanche"]["avalanche-lib"] == "0.6.0"
