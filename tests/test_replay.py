"""Experience replay: the buffer stays within its size, keeps every seen class (or task) in balanced
shares, and every step mixes the current batch with `replay_batch` buffer samples."""

import pytest
import torch

from lifelong.config import MethodConfig
from lifelong.data.base import ImageDataset, Task
from lifelong.learn import build_method
from lifelong.learn.common import TaskData
from lifelong.learn.replay import group_shares
from lifelong.loop import Batch


def fake_task(index: int, classes: int, per_class: int, seen: tuple[str, ...]) -> TaskData:
    """A class-incremental task: `classes` new classes, `per_class` samples each, 4-d stem outputs."""
    names = tuple(f"c{index}_{k}" for k in range(classes))
    labels = torch.arange(classes).repeat_interleave(per_class)
    images = torch.zeros((len(labels), 1, 1, 3), dtype=torch.uint8).numpy()
    dataset = ImageDataset(f"t{index}", "train", images, labels.numpy(), names)
    task = Task(f"t{index}", dataset, dataset, tuple(range(len(seen), len(seen) + classes)))
    inputs = torch.randn(len(labels), 4) + labels[:, None].float()
    return TaskData(index, task, inputs, labels + len(seen), seen + names, seen)


def fill(method, tasks=4, classes=2, per_class=30):
    seen, data = (), []
    for t in range(tasks):
        d = fake_task(t, classes, per_class, seen)
        method.begin_task(None, d)
        method.end_task(None, d)
        seen = d.class_names
        data.append(d)
    return data


@pytest.mark.parametrize("policy", ["experience", "class"])
@pytest.mark.parametrize("size", [7, 20, 500])
def test_buffer_never_exceeds_its_size_and_holds_every_seen_class(policy, size):
    method = build_method(MethodConfig(name="replay", params={"memory_size": size, "policy": policy}))
    seen, total = (), 0
    for t in range(4):
        d = fake_task(t, 2, 30, seen)
        method.end_task(None, d)
        seen, total = d.class_names, total + len(d.inputs)
        assert len(method.inputs) == min(size, total)
        names = {method.label_spaces[k][y] for k, y in zip(method.tasks.tolist(), method.targets.tolist())}
        if policy == "class" and size >= 2 * (t + 1):
            assert names == set(seen)  # one sample or more of every class seen so far
        if policy == "experience" and size >= t + 1:
            assert set(method.tasks.tolist()) == set(range(t + 1))  # of every task seen so far
        groups = method.tasks.tolist() if policy == "experience" else list(zip(method.tasks.tolist(), method.targets.tolist()))
        counts = sorted(groups.count(g) for g in set(groups))
        assert counts[-1] - counts[0] <= 1 or size >= total  # balanced shares


def test_group_shares_spread_the_remainder_over_the_first_groups():
    assert group_shares(200, 3) == [67, 67, 66]
    assert sum(group_shares(7, 4)) == 7


def test_every_step_mixes_the_batch_with_replay_batch_buffer_samples():
    method = build_method(MethodConfig(name="replay", params={"memory_size": 40, "replay_batch": 5}))
    data = fill(method, tasks=2)
    current = fake_task(2, 2, 30, data[-1].class_names)
    method.begin_task(None, current)

    seen_sizes = []

    class Recorder(torch.nn.Module):
        def forward(self, inputs, names):
            seen_sizes.append((len(inputs), names))
            return inputs[:, :1].repeat(1, len(names)) * 0 + torch.arange(len(names), dtype=torch.float)

    index = torch.arange(8)
    batch = Batch(inputs=current.inputs[index], targets=current.targets[index], index=index)
    loss, _ = method.loss(Recorder(), batch, current)
    assert seen_sizes[0][0] == 8 + 5
    assert seen_sizes[0][1] == current.class_names  # class-incremental: every replayed class is a current class
    assert torch.isfinite(loss)
    # the draw is a function of (seed, task, step): a state round trip draws the same rows
    clone = build_method(MethodConfig(name="replay", params={"memory_size": 40, "replay_batch": 5}))
    clone.load_state_dict(method.state_dict())
    assert torch.equal(clone.replay_indices(2, 5), method.replay_indices(2, 5))
    assert not torch.equal(method.replay_indices(2, 5), method.replay_indices(3, 5))


def test_first_task_is_plain_cross_entropy_and_defaults_replay_a_full_batch():
    method = build_method(MethodConfig(name="replay"))
    first = fake_task(0, 2, 10, ())
    sizes = []

    class Recorder(torch.nn.Module):
        def forward(self, inputs, names):
            sizes.append(len(inputs))
            return torch.zeros(len(inputs), len(names), requires_grad=True)

    index = torch.arange(6)
    method.loss(Recorder(), Batch(inputs=first.inputs[index], targets=first.targets[index], index=index), first)
    method.end_task(None, first)
    second = fake_task(1, 2, 10, first.class_names)
    method.loss(Recorder(), Batch(inputs=second.inputs[index], targets=second.targets[index], index=index), second)
    assert sizes == [6, 12]


def test_bad_knobs_are_errors():
    from lifelong.errors import ConfigError

    for params in ({"memory_size": 0}, {"replay_batch": -1}, {"policy": "reservoir"}):
        with pytest.raises(ConfigError):
            build_method(MethodConfig(name="replay", params=params))
