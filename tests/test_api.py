"""The Python API (`import lifelong`) and the CLI's refusals of bad input, on tiny models."""

import re
import shutil
from pathlib import Path

import pytest

import lifelong
from lifelong.cli import main
from lifelong.errors import ConfigError, LedgerCorruptError

README = Path(__file__).parents[1] / "README.md"
TINY = dict(model="tiny-embedded", resolution=32, trainable_blocks=2, probes=["digits:invert=true"], probe_items=40)


def readme_example() -> str:
    return re.search(r"```python\n(import lifelong\n.*?)```", README.read_text(), re.S).group(1)


def run_readme_example(tmp_path, monkeypatch, block: str) -> None:
    monkeypatch.chdir(tmp_path)
    namespace: dict = {}
    exec(compile(block, "README.md", "exec"), namespace)  # noqa: S102 - the project's own README
    ledger = namespace["ledger"]
    assert [c["kind"] for c in ledger.changes] == ["learn", "revert"]
    assert (tmp_path / "exported" / "lifelong_model.json").is_file()


def test_the_readme_python_example_runs_on_the_tiny_model(tmp_path, monkeypatch):
    """The README's `import lifelong` block, with the embedded model swapped for the tiny one (seconds)."""
    block = readme_example()
    assert 'model="embedded"' in block
    run_readme_example(tmp_path, monkeypatch, block.replace(
        'model="embedded"', 'model="tiny-embedded", resolution=32, trainable_blocks=2'))


@pytest.mark.slow
def test_the_readme_python_example_runs_as_written(tmp_path, monkeypatch):
    run_readme_example(tmp_path, monkeypatch, readme_example())


def test_init_with_an_unknown_family_lists_the_registry(tmp_path, capsys):
    assert main(["init", str(tmp_path / "x"), "--family", "cnn"]) == 2
    assert "--family 'cnn' is not a family a ledger holds; valid: vlm, lm" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()


@pytest.mark.parametrize("command", [
    ["learn", "{root}", "--task", "digits", "--method", "ewc", "methods.0.fisher=bogus"],
    ["learn", "{root}", "--task", "digits", "--method", "lwf", "methods.0.temperatur=2"],
])
def test_a_bad_method_knob_is_one_message_and_exit_2(tmp_path, capsys, command):
    root = tmp_path / "led"
    lifelong.init(root, **TINY)
    code = main([c.format(root=root) for c in command])
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("error: ") and "Traceback" not in err
    assert lifelong.open_ledger(root).changes == [] and not (root / "pending").exists()


def test_a_bad_editor_knob_is_one_message_and_exit_2(capsys):
    code = main(["edit", "--prompt", "The capital of France is", "--target", "Lyon", "--method", "wise", "mask_ratio=3"])
    err = capsys.readouterr().err
    assert code == 2 and "mask_ratio must be in (0, 1], got 3" in err and "Traceback" not in err


@pytest.mark.parametrize("command, message", [
    (["edit", "--prompt", "The capital of France is", "--target", "Lyon", "--method", "grace", "--batch"],
     "--batch: grace edits one request at a time; editors with batch editing: ft_l, ft_m, lora, mend, memit, alphaedit"),
    (["bench", "erase", "--batch", "10"], "--T, --split and --batch belong to `bench edit`"),
])
def test_batch_editing_is_refused_where_it_does_not_apply_before_any_model_loads(command, message, capsys):
    code = main(command)
    err = capsys.readouterr().err
    assert code == 2 and message in err and "Traceback" not in err


def test_export_refuses_a_ledger_that_verify_refuses(tmp_path):
    root = tmp_path / "led"
    lifelong.init(root, **TINY)
    lifelong.learn(root, "digits", options={"invert": True}, train_items=64, test_items=40,
                   overrides=["train.steps_per_task=2", "train.batch_size=8", "adapter.kind=lora", "adapter.rank=2"])
    state = root / "changes" / "0001" / "method_state.safetensors"
    shutil.copy(root / "changes" / "0001" / "patch.safetensors", state)  # a change file replaced
    with pytest.raises(LedgerCorruptError, match="method_state.safetensors"):
        lifelong.verify(root)
    with pytest.raises(LedgerCorruptError, match="cannot export, files fail verification"):
        lifelong.export(root, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_an_image_folder_with_one_image_per_class_is_refused_before_anything_is_written(tmp_path):
    from PIL import Image

    folder = tmp_path / "birds"
    for name in ("robin", "wren"):
        (folder / name).mkdir(parents=True)
        Image.new("RGB", (16, 16), (200, 10, 10)).save(folder / name / "a.png")
    root = tmp_path / "led"
    lifelong.init(root, **TINY)
    with pytest.raises(lifelong.errors.DataFormatError, match="at least 2 images .* too few: robin \\(1\\), wren \\(1\\)"):
        lifelong.learn(root, "imagefolder", options={"root": str(folder)})
    assert lifelong.open_ledger(root).changes == [] and not (root / "pending").exists()


def test_an_image_folder_task_is_named_after_its_folder(tmp_path):
    from PIL import Image

    folder = tmp_path / "my_birds"
    for name in ("robin", "wren"):
        (folder / name).mkdir(parents=True)
        for i in range(4):
            Image.new("RGB", (16, 16), (60 * i, 10, 200 if name == "wren" else 10)).save(folder / name / f"{i}.png")
    root = tmp_path / "led"
    lifelong.init(root, **TINY)
    n = lifelong.learn(root, "imagefolder", options={"root": str(folder), "size": 32}, overrides=[
        "train.steps_per_task=2", "train.batch_size=4", "adapter.kind=lora", "adapter.rank=2"])
    ledger = lifelong.open_ledger(root)
    assert ledger.change(n)["data"]["task"] == "my_birds" and "my_birds" in [p.name for p in ledger.probes]


def test_learn_refuses_overrides_of_the_fixed_model(tmp_path):
    with pytest.raises(ConfigError, match="a ledger's model is fixed"):
        lifelong.learn(tmp_path, "digits", overrides=["model.name=embedded"])


def test_bench_edit_batch_flag_is_the_batch_protocol(monkeypatch):
    import lifelong.cli as cli

    seen = []
    monkeypatch.setattr(cli, "run_bench", seen.append)
    assert main(["bench", "edit", "--methods", "memit,ft_m", "--T", "1", "--batch", "10,100"]) == 0
    assert seen[0].batch_sizes == (10, 100) and seen[0].T == (1,) and seen[0].methods == ("memit", "ft_m")
