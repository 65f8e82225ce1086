"""The contract every learning method keeps (STYLE.md), run for each registered method in both the
full fine-tuning and the LoRA mode: only its own parameters train, the loss drops on a fixed batch,
its state round-trips, and the same seed gives the same numbers."""

import copy

import numpy as np
import pytest
import torch

from lifelong.config import AdapterConfig, MethodConfig
from lifelong.families import prepare_trainable
from lifelong.learn import METHODS, build_method
from lifelong.learn.common import TaskData
from lifelong.loop import Batch, label_spaces, run_stream, targets_in

MODES = {"full": AdapterConfig(), "lora": AdapterConfig(kind="lora", rank=4, alpha=8)}
KINDS = {"full": "none", "lora": "lora"}
DEFAULT_TRAINABLE = ("image_trunk.", "image_projection.", "text_projection.")


def modes_of(name: str) -> list[str]:
    """The modes a method supports: its `adapter_kinds` (default: full fine-tuning and LoRA)."""
    kinds = getattr(METHODS[name], "adapter_kinds", ("none", "lora"))
    return [mode for mode in MODES if KINDS[mode] in kinds]


CASES = [(m, mode) for m in METHODS for mode in modes_of(m)]


def task_data(stream, stem, t):
    seen = tuple(n for task in stream.tasks[:t] for n in task.class_names)
    task = stream.tasks[t]
    return TaskData(t, task, stem.train[t], targets_in(stream, t, task.train.labels), label_spaces(stream)[t], seen)


def setup(model, config, name, mode):
    prepare_trainable(model, config.model, MODES[mode])
    method = build_method(MethodConfig(name=name))
    return method


def force_nonzero_lora(model):
    # peft starts B at 0: make the adapter non-identity so tests cannot pass on a no-op adapter.
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.02)


@pytest.mark.parametrize("name,mode", CASES)
def test_only_its_own_parameters_train(name, mode, tiny_model, tiny_stream, tiny_stem, tiny_config):
    method = setup(tiny_model, tiny_config, name, mode)
    before = {n: p.detach().clone() for n, p in tiny_model.named_parameters()}
    run_stream(tiny_model, method, tiny_stream, tiny_stem, tiny_config, checkpoint_dir=None)
    # Methods that add modules (MoE-Adapters) or switch what trains do so in prepare: read it after.
    trainable = {n for n, p in tiny_model.named_parameters() if p.requires_grad}
    if mode == "lora":
        assert trainable and all("lora_" in n for n in trainable)
    else:
        allowed = getattr(method, "trainable_prefixes", DEFAULT_TRAINABLE)
        assert trainable and all(n.startswith(allowed) for n in trainable), sorted(trainable)[:5]
    after = dict(tiny_model.named_parameters())
    changed = {n for n in after if n not in before or not torch.equal(before[n], after[n])}
    assert changed, "training changed nothing"
    # O-LoRA folds each finished task's adapter into the frozen base weights it sits on, by design.
    folded = {n for n in changed if n.endswith(tuple(getattr(method, "changes_frozen", ())))}
    assert changed - folded <= trainable, f"frozen parameters changed: {sorted(changed - folded - trainable)[:5]}"


@pytest.mark.parametrize("name,mode", CASES)
def test_loss_drops_on_a_fixed_batch(name, mode, tiny_model, tiny_stream, tiny_stem, tiny_config):
    method = setup(tiny_model, tiny_config, name, mode)
    if mode == "lora":
        force_nonzero_lora(tiny_model)
    method.prepare(tiny_model)
    # Finish task 1 so that the regularisers (LwF's teacher, EWC's Fisher) are active on task 2.
    first = task_data(tiny_stream, tiny_stem, 0)
    method.begin_task(tiny_model, first)
    method.end_task(tiny_model, first)
    data = task_data(tiny_stream, tiny_stem, 1)
    method.begin_task(tiny_model, data)
    index = torch.arange(8)
    batch = Batch(inputs=data.inputs[index], targets=data.targets[index], index=index)
    params = [p for p in tiny_model.parameters() if p.requires_grad]
    opt = torch.optim.Adam(params, lr=1e-3)
    losses = []
    for _ in range(8):
        loss, logs = method.loss(tiny_model, batch, data)
        assert all(np.isfinite(v) for v in logs.values())
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    # Against the first or the second loss: Select-and-Distill's distillation is exactly 0 before the first
    # update (student = both teachers) and only exists from the second step on.
    assert losses[-1] < max(losses[0], losses[1]), losses


@pytest.mark.parametrize("name", list(METHODS))
def test_state_round_trips(name, tiny_model, tiny_stream, tiny_stem, tiny_config):
    method = setup(tiny_model, tiny_config, name, modes_of(name)[0])
    run_stream(tiny_model, method, tiny_stream, tiny_stem, tiny_config, checkpoint_dir=None)
    data = task_data(tiny_stream, tiny_stem, 1)
    method.begin_task(tiny_model, data)
    clone = build_method(MethodConfig(name=name))
    clone.load_state_dict({k: v.clone() for k, v in method.state_dict().items()})
    index = torch.arange(8)
    batch = Batch(inputs=data.inputs[index], targets=data.targets[index], index=index)
    assert method.loss(tiny_model, batch, data)[0].item() == clone.loss(tiny_model, batch, data)[0].item()


@pytest.mark.parametrize("name", list(METHODS))
def test_same_seed_same_numbers(name, tiny_model, tiny_stream, tiny_stem, tiny_config):
    results = []
    for _ in range(2):
        model = copy.deepcopy(tiny_model)
        method = setup(model, tiny_config, name, modes_of(name)[0])
        results.append(run_stream(model, method, tiny_stream, tiny_stem, tiny_config, checkpoint_dir=None))
    assert results[0].losses == results[1].losses
    np.testing.assert_array_equal(results[0].accuracy_matrix, results[1].accuracy_matrix)


@pytest.mark.parametrize("name", list(METHODS))
def test_a_resumed_task_ends_bit_identical(name, tiny_model, tiny_stream, tiny_stem, tiny_config, tmp_path):
    """Stop a task after 3 of 6 steps, continue from the saved TrainState in a fresh model and method
    object: every loss and parameter equals the uninterrupted run's (the method's state_dict is complete)."""
    import dataclasses

    from lifelong.loop import train_task

    train = dataclasses.replace(tiny_config.train, steps_per_task=6)
    method = setup(tiny_model, tiny_config, name, modes_of(name)[0])
    method.prepare(tiny_model)
    train_task(tiny_model, method, task_data(tiny_stream, tiny_stem, 0), train, seed=0)
    start_model, start_method = copy.deepcopy(tiny_model), copy.deepcopy(method)
    data = task_data(tiny_stream, tiny_stem, 1)
    saved = {}
    losses = train_task(tiny_model, method, data, train, seed=1, checkpoint_every=3,
                        on_checkpoint=lambda state: saved.setdefault(len(state.meta["losses"]), state.to_bytes()))
    (tmp_path / "state.safetensors").write_bytes(saved[3])
    torch.manual_seed(12345)  # the RNG must come from the checkpoint, not from wherever it stands
    resumed = train_task(start_model, start_method, data, train, seed=1, resume_from=tmp_path / "state.safetensors")
    assert resumed == losses
    expected = dict(tiny_model.named_parameters())
    for n, p in start_model.named_parameters():
        assert torch.equal(p, expected[n]), n
    # The next task starts from the same method state too.
    third = task_data(tiny_stream, tiny_stem, 2)
    for m, meth in ((tiny_model, method), (start_model, start_method)):
        meth.begin_task(m, third)
    index = torch.arange(8)
    batch = Batch(inputs=third.inputs[index], targets=third.targets[index], index=index)
    assert method.loss(tiny_model, batch, third)[0].item() == start_method.loss(start_model, batch, third)[0].item()


def test_methods_from_the_same_model_share_the_zero_shot_row(tiny_model, tiny_stream, tiny_stem, tiny_config,
                                                            monkeypatch, tmp_path):
    """Row 0 is read from the disk cache when the same model was scored the same way before: a second method
    from the same model reuses it (and its matrix equals a run without the cache); a LoRA model, whose state
    differs, is evaluated anew. A row planted in the cache is what gets reported."""
    from lifelong import loop
    from lifelong.cache import cache_dir

    monkeypatch.setenv("LIFELONG_CACHE", str(tmp_path / "cache"))  # this test counts the cache's entries
    evaluations = []
    real_evaluate = loop.evaluate
    monkeypatch.setattr(loop, "evaluate", lambda *a, **k: evaluations.append(a[3]) or real_evaluate(*a, **k))

    def fresh(mode="full"):
        model = copy.deepcopy(tiny_model)
        prepare_trainable(model, tiny_config.model, MODES[mode])
        return model

    run_stream(fresh(), build_method(MethodConfig(name="finetune")), tiny_stream, tiny_stem, tiny_config, None)
    assert evaluations.count(0) == 1 and len(list((cache_dir() / "zero_shot").iterdir())) == 1
    shared = run_stream(fresh(), build_method(MethodConfig(name="lwf")), tiny_stream, tiny_stem, tiny_config, None)
    assert evaluations.count(0) == 1  # row 0 came from the cache
    alone = run_stream(fresh(), build_method(MethodConfig(name="lwf")), tiny_stream, tiny_stem, tiny_config, None,
                       reuse_zero_shot=False)
    np.testing.assert_array_equal(shared.accuracy_matrix, alone.accuracy_matrix)
    run_stream(fresh("lora"), build_method(MethodConfig(name="finetune")), tiny_stream, tiny_stem, tiny_config, None)
    assert len(list((cache_dir() / "zero_shot").iterdir())) == 2

    (entry,) = [f for f in (cache_dir() / "zero_shot").iterdir() if f.stat().st_mtime_ns == min(
        g.stat().st_mtime_ns for g in (cache_dir() / "zero_shot").iterdir())]
    from lifelong.cache import store_cached

    store_cached("zero_shot", entry.stem, {"row": torch.full((len(tiny_stream.tasks),), 42.0, dtype=torch.float64)})
    planted = run_stream(fresh(), build_method(MethodConfig(name="finetune")), tiny_stream, tiny_stem, tiny_config, None)
    assert (planted.accuracy_matrix[0] == 42.0).all()


def test_lora_initialisation_depends_on_the_seed_only(tiny_model, tiny_config):
    """The demo's LoRA row moved by points between runs of the same code: peft drew LoRA's A matrices from
    whatever state the global generator was left in. Now the same seed gives the same adapter."""
    import copy

    from lifelong.families import prepare_trainable

    def lora_weights(seed: int, noise_before: int):
        model = copy.deepcopy(tiny_model)
        torch.rand(noise_before)  # earlier work in the process moved the global generator
        prepare_trainable(model, tiny_config.model, MODES["lora"], seed=seed)
        return {n: p.detach().clone() for n, p in model.named_parameters() if "lora_A" in n}

    a, b, c = lora_weights(0, 1), lora_weights(0, 1000), lora_weights(1, 1)
    assert a and all(torch.equal(a[k], b[k]) for k in a)
    assert any(not torch.equal(a[k], c[k]) for k in a)
