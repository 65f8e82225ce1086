"""The methods' losses and end-of-task updates, composed exactly as their papers and official code write
them, each checked against an independent computation: a method that drops or rescales a term, leaves
samples out or overwrites what it should accumulate fails here (issue 18's mutations: LwF returning
`ce + 0 * kd`, replay leaving the replayed samples out of its loss, EWC overwriting its Fisher)."""

import copy
import dataclasses
import zlib

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from test_methods import MODES, task_data
from test_replay import fake_task

from lifelong.config import MethodConfig
from lifelong.data.streams import build_stream
from lifelong.families import prepare_trainable
from lifelong.learn import build_method
from lifelong.learn.ewc import diagonal_fisher
from lifelong.learn.joint import restricted_cross_entropy
from lifelong.loop import Batch, compute_stem_features, evaluate, joint_task_data, old_label_spaces, run_stream


def kl(student_logits, teacher_logits, t=2.0):
    """T^2 KL(softmax(teacher / T) || softmax(student / T)), mean over rows, written out."""
    p = F.softmax(teacher_logits / t, dim=-1)
    return (p * (p.log() - F.log_softmax(student_logits / t, dim=-1))).sum(-1).mean() * t * t


def nudge(model, scale=0.05, seed=0):
    """Move every trainable weight a little, so that a student differs from its teacher."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(scale * torch.randn(p.shape, generator=g) * p.abs().mean().clamp(min=1e-3))


def first_batch(data, n=8):
    index = torch.arange(n)
    return Batch(inputs=data.inputs[index], targets=data.targets[index], index=index)


# -- LwF -----------------------------------------------------------------------------------------
def test_lwf_adds_one_weighted_distillation_term_per_old_head(tiny_model, tiny_stream, tiny_stem, tiny_config):
    """Task 3 (mnist) after digits and lfw: loss = CE + reg_weight * (KD_digits + KD_lfw), each KD a softmax
    over that head's own names; the student scores every name once (digits' names are mnist's own)."""
    prepare_trainable(tiny_model, tiny_config.model, MODES["full"])
    method = build_method(MethodConfig(name="lwf", params={"reg_weight": 3.0}))
    data = dataclasses.replace(task_data(tiny_stream, tiny_stem, 2), old_label_spaces=old_label_spaces(tiny_stream, 2))
    heads = data.old_label_spaces
    assert len(heads) == 2 and heads[0] == data.class_names  # digits and mnist share "zero".."nine"
    teacher = copy.deepcopy(tiny_model)
    method.begin_task(tiny_model, data)
    nudge(tiny_model)
    batch = first_batch(data)

    seen = []
    real_forward = type(tiny_model).forward
    tiny_model.forward = lambda x, names: seen.append(tuple(names)) or real_forward(tiny_model, x, names)
    loss, logs = method.loss(tiny_model, batch, data)
    del tiny_model.forward
    assert len(seen) == 1 and len(seen[0]) == len(set(seen[0])) == 12  # one pass, each name once

    with torch.no_grad():
        ce = F.cross_entropy(tiny_model(batch.inputs, data.class_names), batch.targets)
        kds = [kl(tiny_model(batch.inputs, h), teacher(batch.inputs, h)) for h in heads]
    assert all(k > 1e-5 for k in kds), kds
    # one forward over all 12 names vs one per head: other matmul shapes, so float rounding differs (2e-4
    # relative on an AVX2-only CPU); a missing, merged or unweighted term moves it by far more
    torch.testing.assert_close(torch.tensor(logs["kd"]), sum(kds), rtol=1e-3, atol=1e-7)
    torch.testing.assert_close(loss.detach(), ce + 3.0 * sum(kds), rtol=1e-4, atol=1e-6)


def test_lwf_class_incremental_has_one_head_over_the_old_classes(tiny_model, tiny_config):
    stream = build_stream({"name": "ci", "scenario": "class", "tasks": [
        {"source": "digits", "train_items": 20, "test_items": 10, "options": {"classes": [0, 1, 2]}},
        {"source": "digits", "train_items": 20, "test_items": 10, "options": {"classes": [3, 4]}}]})
    assert old_label_spaces(stream, 1) == (("zero", "one", "two"),)


# -- replay --------------------------------------------------------------------------------------
class NameModel(torch.nn.Module):
    """Logits = inputs . e_name, with e_name a fixed random vector per class name."""

    def forward(self, inputs, names):
        rows = [torch.randn(inputs.shape[1], generator=torch.Generator().manual_seed(zlib.crc32(n.encode())))
                for n in names]
        return inputs @ torch.stack(rows).T


@pytest.mark.parametrize("scenario", ["class", "task"])
def test_replay_loss_is_one_mean_over_the_batch_and_the_replayed_samples(scenario):
    """Chaudhry et al. / Avalanche: CE averaged over B u R; a replayed sample of a class outside the current
    label space is scored among its own task's classes (task-incremental)."""
    method = build_method(MethodConfig(name="replay", params={"memory_size": 40, "replay_batch": 6}))
    seen, old = (), []
    for t in range(2):
        d = fake_task(t, 2, 10, seen if scenario == "class" else ())
        method.end_task(None, d)
        old.append(d)
        seen = d.class_names
    current = fake_task(2, 2, 10, seen if scenario == "class" else ())
    method.begin_task(None, current)
    batch = first_batch(current)
    replay = method.replay_indices(current.index, 6)  # the rows the next loss call draws

    model = NameModel()
    loss, _ = method.loss(model, batch, current)
    total = F.cross_entropy(model(batch.inputs, current.class_names), batch.targets, reduction="sum")
    for k, y, x in zip(method.tasks[replay].tolist(), method.targets[replay].tolist(), method.inputs[replay]):
        name = method.label_spaces[k][y]
        space, target = ((current.class_names, current.class_names.index(name)) if name in current.class_names
                         else (method.label_spaces[k], y))
        total = total + F.cross_entropy(model(x[None], space), torch.tensor([target]), reduction="sum")
    torch.testing.assert_close(loss, total / (len(batch.inputs) + 6))
    current_only = F.cross_entropy(model(batch.inputs, current.class_names), batch.targets)
    assert abs(loss.item() - current_only.item()) > 1e-3  # the replayed samples weigh in


# -- EWC -----------------------------------------------------------------------------------------
def assert_fisher_close(actual, expected):
    """Fishers summed in another order round differently: atol relative to the largest entry."""
    torch.testing.assert_close(actual, expected, rtol=1e-4, atol=1e-5 * float(expected.abs().max()) + 1e-30)


def fisher_of(model, data):
    return diagonal_fisher(model, data.inputs, data.targets, data.class_names, "exact", 32)


def two_tasks_of_ewc(model, stream, stem, config, **params):
    """EWC's end_task after task 1, a move, end_task after task 2: (method, [F_1, F_2], [theta*_1, theta*_2])."""
    prepare_trainable(model, config.model, MODES["full"])
    method = build_method(MethodConfig(name="ewc", params={"fisher_samples": 1000, **params}))
    fishers, anchors = [], []
    for t in range(2):
        data = task_data(stream, stem, t)
        nudge(model, seed=t)
        fishers.append(fisher_of(model, data))
        anchors.append(model.trainable_state())
        method.end_task(model, data)
    return method, fishers, anchors


def test_online_ewc_accumulates_decay_times_the_old_fisher_plus_the_new(tiny_model, tiny_stream, tiny_stem, tiny_config):
    method, (f1, f2), (_, a2) = two_tasks_of_ewc(tiny_model, tiny_stream, tiny_stem, tiny_config, mode="online", decay=0.5)
    assert len(method.fishers) == 1
    for n in f1:
        assert_fisher_close(method.fishers[0][n], 0.5 * f1[n] + f2[n])
        assert torch.equal(method.anchors[0][n], a2[n])  # the latest task's end point
    assert any(float((f1[n] - f2[n]).abs().max()) > 1e-8 for n in f1)  # the two Fishers differ


def test_separate_ewc_keeps_one_fisher_and_anchor_per_task(tiny_model, tiny_stream, tiny_stem, tiny_config):
    method, fishers, anchors = two_tasks_of_ewc(tiny_model, tiny_stream, tiny_stem, tiny_config, reg_weight=10.0)
    assert len(method.fishers) == len(method.anchors) == 2
    for kept, expected in zip(method.fishers, fishers):
        for n in expected:
            assert_fisher_close(kept[n], expected[n])
    for kept, expected in zip(method.anchors, anchors):
        assert all(torch.equal(kept[n], expected[n]) for n in expected)
    # the penalty is the sum of both tasks' penalties, each around its own anchor
    data = task_data(tiny_stream, tiny_stem, 2)
    nudge(tiny_model, seed=2)
    batch = first_batch(data)
    loss, logs = method.loss(tiny_model, batch, data)
    params = dict(tiny_model.named_parameters())
    with torch.no_grad():
        penalty = sum(float((f[n] * (params[n] - a[n]).pow(2)).sum()) for f, a in zip(fishers, anchors) for n in f)
        ce = F.cross_entropy(tiny_model(batch.inputs, data.class_names), batch.targets)
    assert penalty > 0
    assert logs["penalty"] == pytest.approx(penalty, rel=1e-4)
    assert loss.item() == pytest.approx(ce.item() + 10.0 / 2 * penalty, rel=1e-4)
    # a state round trip keeps both pairs
    clone = build_method(MethodConfig(name="ewc", params={"reg_weight": 10.0}))
    clone.load_state_dict(method.state_dict())
    assert len(clone.fishers) == 2 and clone.loss(tiny_model, batch, data)[0].item() == loss.item()


# -- WiSE-FT -------------------------------------------------------------------------------------
@pytest.mark.parametrize("anchor,expected", [("previous", 0.2 * 0.8 + 0.8 * 1.8), ("zero_shot", 0.8 * 1.8)])
def test_wise_ft_interpolates_against_its_anchor(anchor, expected, tiny_model, tiny_stream, tiny_stem, tiny_config):
    """Two tasks, each moving every weight by +1 before end_task, alpha 0.8. previous (MTIL: the task-start
    model): theta_0 + 0.8, then 0.2 (theta_0 + 0.8) + 0.8 (theta_0 + 1.8). zero_shot: 0.2 theta_0 + 0.8 (theta_0 + 1.8)."""
    prepare_trainable(tiny_model, tiny_config.model, MODES["full"])
    method = build_method(MethodConfig(name="wise_ft", params={"anchor": anchor}))
    assert method.params.alpha == 0.8
    method.prepare(tiny_model)
    zero_shot = tiny_model.trainable_state()
    for t in range(2):
        data = task_data(tiny_stream, tiny_stem, t)
        method.begin_task(tiny_model, data)
        with torch.no_grad():
            for p in tiny_model.parameters():
                if p.requires_grad:
                    p.add_(1.0)
        method.end_task(tiny_model, data)
    for n, p in tiny_model.trainable_state().items():
        torch.testing.assert_close(p, zero_shot[n] + expected, rtol=1e-5, atol=1e-5)


# -- LwF as MTIL runs it -------------------------------------------------------------------------
@pytest.mark.parametrize("task", [0, 1])
def test_lwf_mtil_is_ce_plus_image_and_text_distillation_from_the_task_start_model(task, tiny_model, tiny_stream,
                                                                                  tiny_stem, tiny_config):
    """CE with label smoothing 0.2 + KD(Z, Z_prev) + KD(Z^T, Z_prev^T) on the task's images x its class names,
    the teacher's class embeddings on both sides; from the first task on (against the zero-shot model)."""
    prepare_trainable(tiny_model, tiny_config.model, MODES["full"])
    method = build_method(MethodConfig(name="lwf_mtil", params={"reg_weight": 2.0}))
    data = task_data(tiny_stream, tiny_stem, task)
    teacher = copy.deepcopy(tiny_model)
    method.begin_task(tiny_model, data)
    nudge(tiny_model, scale=0.3)
    batch = first_batch(data)
    loss, logs = method.loss(tiny_model, batch, data)
    with torch.no_grad():
        scale = tiny_model.logit_scale
        text = teacher.class_embeddings(data.class_names)
        student = scale * tiny_model.image_embeddings(batch.inputs) @ text.T
        teacher_logits = scale * teacher.image_embeddings(batch.inputs) @ text.T
        ce = F.cross_entropy(tiny_model(batch.inputs, data.class_names), batch.targets, label_smoothing=0.2)
        kd_image, kd_text = kl(student, teacher_logits), kl(student.T, teacher_logits.T)
    assert kd_image > 1e-6 and kd_text > 1e-6
    assert logs["kd_image"] == pytest.approx(kd_image.item(), rel=1e-3)
    assert logs["kd_text"] == pytest.approx(kd_text.item(), rel=1e-3)
    assert loss.item() - ce.item() == pytest.approx(2.0 * (kd_image + kd_text).item(), rel=1e-3)


# -- joint ---------------------------------------------------------------------------------------
def test_restricted_cross_entropy_is_cross_entropy_among_each_rows_allowed_classes():
    g = torch.Generator().manual_seed(0)
    logits, targets = torch.randn(6, 7, generator=g), torch.tensor([0, 2, 4, 5, 6, 1])
    allowed = torch.zeros(6, 7, dtype=torch.bool)
    spaces = [[0, 1, 2], [0, 1, 2], [3, 4, 5, 6], [3, 4, 5, 6], [3, 4, 5, 6], [1, 5]]
    for i, cols in enumerate(spaces):
        allowed[i, cols] = True
    expected = torch.stack([F.cross_entropy(logits[i, cols][None], torch.tensor([cols.index(int(targets[i]))]),
                                            label_smoothing=0.2) for i, cols in enumerate(spaces)]).mean()
    torch.testing.assert_close(restricted_cross_entropy(logits, targets, allowed, 0.2), expected)


def test_joint_trains_once_on_every_tasks_data(tiny_model, tiny_stream, tiny_stem, tiny_config):
    data = joint_task_data(tiny_stream, tiny_stem)
    assert len(data.inputs) == sum(len(t.train) for t in tiny_stream.tasks)
    assert len(data.class_names) == len(set(data.class_names)) == 12  # digits' and mnist's names once
    start = 0
    for task in tiny_stream.tasks:  # every target names its sample's class, among its own task's classes only
        rows = slice(start, start + len(task.train))
        assert [data.class_names[i] for i in data.targets[rows]] == [task.class_names[y] for y in task.train.labels]
        assert {data.class_names[i] for i in data.allowed[rows][0].nonzero().flatten()} == set(task.class_names)
        start += len(task.train)
    prepare_trainable(tiny_model, tiny_config.model, MODES["full"])
    result = run_stream(tiny_model, build_method(MethodConfig(name="joint")), tiny_stream, tiny_stem, tiny_config, None)
    T = len(tiny_stream.tasks)
    assert [len(losses) for losses in result.losses] == [T * tiny_config.train.steps_per_task]
    for row in result.accuracy_matrix[2:]:  # one model: every row after 0 is its evaluation
        np.testing.assert_array_equal(row, result.accuracy_matrix[1])


# -- class-incremental scoring -------------------------------------------------------------------
def test_class_incremental_tasks_ahead_are_scored_among_the_classes_up_to_their_own(tiny_model):
    """An unchanged model gets the same a[t, j] for every t <= j + 1 (row 0 included): a task not learned yet
    is scored among the classes of tasks 1..j, as right after it is learned, so zero-shot degradation and
    transfer measure the model, not the label space growing."""
    stream = build_stream({"name": "ci", "scenario": "class", "tasks": [
        {"source": "digits", "train_items": 10, "test_items": 60, "options": {"classes": [c, c + 1]}} for c in (0, 2, 4, 6)]})
    stem = compute_stem_features(tiny_model, stream, 64)
    rows = [evaluate(tiny_model, stream, stem, t, 64)[0] for t in range(len(stream.tasks) + 1)]
    for j in range(len(stream.tasks)):
        assert len({rows[t][j] for t in range(j + 2)}) == 1, [rows[t][j] for t in range(j + 2)]
    # the label spaces do differ: a learned task is scored among every class seen since
    assert rows[0][0] != rows[4][0] or rows[0][1] != rows[4][1]
