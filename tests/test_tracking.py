"""Training people can watch: every learn run and learn change logs to Accelerate's trackers (TensorBoard)."""

from pathlib import Path

import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from lifelong.learn.driver import load_run_config, run_experiment

TINY = ["model.name=tiny-embedded", "model.resolution=32", "model.trainable_blocks=2", "stream.name=tiny",
        "train.steps_per_task=3", "train.batch_size=8", "train.lr=1e-3", "methods=[finetune]"]


def scalars(folder: Path) -> dict[str, list[tuple[int, float]]]:
    events = EventAccumulator(str(folder))
    events.Reload()
    return {tag: [(e.step, e.value) for e in events.Scalars(tag)] for tag in events.Tags()["scalars"]}


def test_a_run_logs_loss_lr_grad_norm_and_accuracies_to_tensorboard(tmp_path):
    out = run_experiment(load_run_config(None, [*TINY, f"output_dir={tmp_path}", "name=logged"]))
    logged = scalars(out / "logs" / "finetune")
    tasks = 3  # the tiny stream
    assert [s for s, _ in logged["loss"]] == list(range(1, 3 * tasks + 1))  # one value per optimizer step
    assert all(v > 0 for _, v in logged["loss"]) and all(v > 0 for _, v in logged["grad_norm"])
    assert logged["lr"][0][1] > 0
    accuracy = [t for t in logged if t.startswith("accuracy/")]
    assert len(accuracy) == tasks and all(len(logged[t]) == tasks for t in accuracy)  # every task after every task


def test_log_with_none_writes_no_event_file(tmp_path):
    out = run_experiment(load_run_config(None, [*TINY, f"output_dir={tmp_path}", "name=quiet", "train.log_with=none"]))
    assert not list(out.rglob("events.out.tfevents.*"))


def test_a_ledger_change_logs_its_training(tmp_path):
    import lifelong

    root = tmp_path / "ledger"
    lifelong.init(root, model="tiny-embedded", resolution=32, trainable_blocks=2, probes=["digits:invert=true"],
                  probe_items=40)
    lifelong.learn(root, "digits", options={"invert": True}, train_items=64, test_items=40,
                   overrides=["train.steps_per_task=3", "train.batch_size=8"])
    logged = scalars(root / "logs" / "change_0001")
    assert [s for s, _ in logged["loss"]] == [1, 2, 3]


def test_an_editors_training_logs_to_tensorboard(tmp_path):
    """MEND learns to edit before it edits: that optimisation is logged like any training loop."""
    from lifelong.data.edit_requests import EditRequest
    from lifelong.edit.protocol import make_editor
    from lifelong.families.lm import tiny_lm

    model, tok = tiny_lm("llama")
    train = [EditRequest(prompt=f"The capital of {c} is", target_new=t, subject=c)
             for c, t in (("Germany", " Rome"), ("Italy", " Berlin"), ("Spain", " Paris"))]
    knobs = {"layers": [-1], "rank": 8, "train_steps": 5, "lr": 1e-3, "lr_lr": 1e-3, "edit_lr": 1e-3}
    editor = make_editor("mend", model, tok, knobs, train, log_dir=tmp_path / "logs")
    logged = scalars(tmp_path / "logs" / "mend-prepare")
    assert [s for s, _ in logged["loss"]] == [1, 2, 3, 4, 5]
    assert [v for _, v in logged["loss"]] == pytest.approx(editor.train_log)
    assert {"loss/edit", "loss/locality", "grad_norm", "lr"} <= set(logged)
    assert editor.log is None  # the tracker is closed once the editor is prepared
