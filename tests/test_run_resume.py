"""A stopped `lifelong run` continues: finished (method, order) rows are kept, a changed setting trains again."""

import json

from lifelong.learn import driver
from lifelong.learn.driver import load_run_config, run_experiment

TINY = ["model.name=tiny-embedded", "model.resolution=32", "model.trainable_blocks=2", "stream.name=tiny",
        "train.steps_per_task=3", "train.batch_size=8", "train.lr=1e-3", "methods=[finetune, lwf]",
        "train.log_with=none"]


def test_a_rerun_keeps_finished_rows_and_retrains_what_changed(tmp_path, monkeypatch):
    out = run_experiment(load_run_config(None, [*TINY, f"output_dir={tmp_path}", "name=r"]))
    first = json.loads((out / "results.json").read_text())["methods"]
    assert (out / "rows" / "lwf" / "order_1.json").is_file()

    trained = []
    real = driver.run_stream
    monkeypatch.setattr(driver, "run_stream", lambda *a, **k: trained.append(a[1]) or real(*a, **k))
    # the run stopped during lwf: its row is gone, finetune's is kept
    (out / "rows" / "lwf" / "order_1.json").unlink()
    again = json.loads((run_experiment(load_run_config(None, [*TINY, f"output_dir={tmp_path}", "name=r"]))
                        / "results.json").read_text())["methods"]
    assert [type(m).__name__ for m in trained] == ["LwF"]
    assert again["finetune"]["accuracy_matrix"] == first["finetune"]["accuracy_matrix"]
    assert again["lwf"]["accuracy_matrix"] == first["lwf"]["accuracy_matrix"]  # retrained from the same seed

    trained.clear()  # another step count is another measurement: nothing is kept
    run_experiment(load_run_config(None, [*TINY, f"output_dir={tmp_path}", "name=r", "train.steps_per_task=2"]))
    assert len(trained) == 2


def test_finished_writes_the_measured_methods_and_trains_nothing(tmp_path, monkeypatch, capsys):
    """`lifelong run CONFIG --finished`: the results of the methods whose every order is measured, nothing
    trained, the rest named; with none measured, one message and exit 2."""
    from lifelong.cli import main

    config = [*TINY, f"output_dir={tmp_path}", "name=r", "orders=2"]
    out = run_experiment(load_run_config(None, config))
    full = json.loads((out / "results.json").read_text())["methods"]
    (out / "rows" / "lwf" / "order_2.json").unlink()  # stopped during lwf's second order

    def no_training(*args, **kwargs):
        raise AssertionError("--finished trained a row")

    monkeypatch.setattr(driver, "run_stream", no_training)
    cfg = tmp_path / "r.yaml"
    cfg.write_text(f"name: r\noutput_dir: {tmp_path}\norders: 2\n")
    assert main(["run", str(cfg), *TINY, "--finished"]) == 0
    printed = capsys.readouterr().out
    assert "not in the results" in printed and "lwf" in printed.split("not in the results")[1]
    kept = json.loads((out / "results.json").read_text())["methods"]
    assert list(kept) == ["finetune"] and kept["finetune"]["per_order"] == full["finetune"]["per_order"]
    for f in (out / "rows").rglob("*.json"):
        f.unlink()
    assert main(["run", str(cfg), *TINY, "--finished"]) == 2
    assert "has every task order measured" in capsys.readouterr().err


def test_jobs_trains_every_row_once_in_workers_and_matches_one_process(tmp_path):
    """`lifelong run --jobs 2`: two worker processes share the rows (each trained by exactly one), the results
    equal a one-process run's at the workers' thread count, and the per-invocation claims are cleaned up."""
    import torch

    from lifelong.learn.jobs import run_jobs

    config = [*TINY, "orders=2", "methods=[finetune, lwf, ewc]"]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the workers' count on a 2-core machine: float reductions split the same way
    try:
        one = run_experiment(load_run_config(None, [*config, f"output_dir={tmp_path / 'one'}", "name=r"]))
    finally:
        torch.set_num_threads(threads)
    cfg = load_run_config(None, [*config, f"output_dir={tmp_path / 'jobs'}", "name=r"])
    out = run_jobs(cfg, 2, poll_seconds=0.2)
    logs = [(out / "logs" / f"worker_{n}.log").read_text() for n in (1, 2)]
    seen = [log.count("== ") for log in logs]
    # each row trained by one worker; the other skips it as claimed, or as kept when the row is already written
    skipped = [log.count("another worker trains it") + log.count("kept from") for log in logs]
    trained = [log.count("   Avg ") - log.count("kept from") for log in logs]  # a kept row prints its Avg too
    assert seen == [6, 6] and sum(skipped) == 6 and sum(trained) == 6
    assert not (out / "claims").exists()  # a claim holds for one invocation only
    expect = json.loads((one / "results.json").read_text())["methods"]
    got = json.loads((out / "results.json").read_text())["methods"]
    assert list(got) == list(expect)
    for name in expect:
        assert [o["accuracy_matrix"] for o in got[name]["per_order"]] == \
            [o["accuracy_matrix"] for o in expect[name]["per_order"]]


def test_a_claim_is_taken_once(tmp_path):
    assert driver.claim(tmp_path / "lwf" / "order_1")
    assert not driver.claim(tmp_path / "lwf" / "order_1")


def test_a_failed_worker_is_reported_with_its_log(tmp_path):
    import pytest

    from lifelong.errors import WorkerError
    from lifelong.learn.jobs import run_jobs

    cfg = load_run_config(None, [*TINY, f"output_dir={tmp_path}", "name=r", f"model.name={tmp_path / 'no-such-model'}"])
    with pytest.raises(WorkerError, match="2 of 2 workers failed") as raised:
        run_jobs(cfg, 2, poll_seconds=0.2)
    assert "worker_1.log" in str(raised.value) and "no-such-model" in str(raised.value)
    assert not (tmp_path / "r" / "claims").exists()
