"""Multi-process training through Accelerate (DDP, gloo on CPU) agrees with one process.

The same tiny config runs as one process and under `accelerate launch --multi_gpu --num_processes 2`
(Accelerate's torchrun launcher; with no GPU it runs DDP over gloo on the CPU). Every process takes
half of each global batch and DDP averages the gradients, so the training is the same up to float
rounding; the run itself checks, after every task, that both processes hold bit-identical weights
and method state (exemplar memories, Fisher, teacher outputs) and fails otherwise.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

BIN = Path(sys.executable).parent
# Agreement within float rounding: Adam turns rounding-level differences of near-zero gradients into
# whole-lr steps, so the measure is the relative difference of the total weight update, not max |diff|.
UPDATE_TOLERANCE = 0.05
ACCURACY_TOLERANCE = 5.0  # points: one test item of the tiny tasks (20 items)


def run(tmp_path: Path, name: str, methods: str, processes: int) -> dict:
    args = [str(BIN / "lifelong"), "run", "configs/tiny.yaml", f"output_dir={tmp_path}", f"name={name}", f"methods={methods}"]
    if processes > 1:
        args = [str(BIN / "accelerate"), "launch", "--multi_gpu", f"--num_processes={processes}", "--num_machines=1",
                "--mixed_precision=no", "--dynamo_backend=no", "--main_process_port=0", *args]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(args, cwd=Path(__file__).parents[1], env=env, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads((tmp_path / name / "results.json").read_text())


def relative_update_difference(tmp_path: Path, label: str, tasks: int) -> float:
    """||update_2 - update_1|| / ||update_1||, the updates measured from the weights after task 1."""
    first = load_file(tmp_path / "one" / "checkpoints" / label / "task_1.safetensors")
    one = load_file(tmp_path / "one" / "checkpoints" / label / f"task_{tasks}.safetensors")
    two = load_file(tmp_path / "two" / "checkpoints" / label / f"task_{tasks}.safetensors")
    keys = [k for k in one if k.startswith("model.") and k in first]
    u1 = torch.cat([(one[k] - first[k]).flatten().float() for k in keys])
    u2 = torch.cat([(two[k] - first[k]).flatten().float() for k in keys])
    assert u1.norm() > 0, f"{label}: the weights did not move after task 1; the comparison would be empty"
    return float((u2 - u1).norm() / u1.norm())


def check_agreement(tmp_path: Path, methods: list[str]) -> None:
    spec = "[" + ", ".join(methods) + "]"
    one, two = run(tmp_path, "one", spec, 1), run(tmp_path, "two", spec, 2)
    assert (one["processes"], two["processes"]) == (1, 2), "the second run did not train on two processes"
    for label in one["methods"]:
        a, b = one["methods"][label], two["methods"][label]
        diff = max(abs(x - y) for ra, rb in zip(a["accuracy_matrix"], b["accuracy_matrix"]) for x, y in zip(ra, rb))
        assert diff <= ACCURACY_TOLERANCE, (label, a["accuracy_matrix"], b["accuracy_matrix"])
        assert relative_update_difference(tmp_path, label, len(a["accuracy_matrix"][0])) < UPDATE_TOLERANCE, label


def test_two_processes_agree_with_one(tmp_path):
    """finetune, EWC (Fisher in end_task) and iCaRL (a herded exemplar memory)."""
    check_agreement(tmp_path, ["finetune", "ewc", "icarl"])
    one = load_file(tmp_path / "one" / "checkpoints" / "icarl" / "task_3.safetensors")
    two = load_file(tmp_path / "two" / "checkpoints" / "icarl" / "task_3.safetensors")
    memory = [k for k in one if k.startswith("method.memory.")]
    assert memory, "iCaRL's checkpoint holds no exemplar memory"
    for k in memory:  # herding picks the same exemplars in both runs
        assert torch.equal(one[k], two[k]), k


@pytest.mark.slow
def test_every_method_agrees_across_processes(tmp_path):
    from lifelong.learn import METHODS

    check_agreement(tmp_path, [m for m in METHODS if m not in ("o_lora",)] + ["{name: o_lora, adapter: {kind: lora}}"])
