"""What the methods are for, checked on the tiny stream: EWC's Fisher is the real per-sample
quantity, EWC holds weights near the previous task's, WiSE-FT interpolates exactly, LwF's teacher is
the model at the start of the task."""

import copy

import numpy as np
import torch
import torch.nn.functional as F
from test_methods import MODES, task_data

from lifelong.config import MethodConfig
from lifelong.families import prepare_trainable
from lifelong.learn import build_method
from lifelong.learn.ewc import diagonal_fisher
from lifelong.loop import Batch, run_stream


def test_vectorised_fisher_matches_a_per_sample_loop(tiny_model, tiny_stream, tiny_stem, tiny_config):
    prepare_trainable(tiny_model, tiny_config.model, MODES["full"])
    data = task_data(tiny_stream, tiny_stem, 0)
    x, y = data.inputs[:4], data.targets[:4]
    fast = diagonal_fisher(tiny_model, x, y, data.class_names, "exact", chunk=3)
    params = {n: p for n, p in tiny_model.named_parameters() if p.requires_grad}
    slow = {n: torch.zeros_like(p) for n, p in params.items()}
    for i in range(len(x)):
        log_p = F.log_softmax(tiny_model(x[i : i + 1], data.class_names), dim=-1)[0]
        for c in range(len(data.class_names)):
            grads = torch.autograd.grad(log_p[c], list(params.values()), retain_graph=True)
            for (n, _), g in zip(params.items(), grads):
                slow[n] += log_p[c].exp().detach() * g.pow(2) / len(x)
    for n in params:
        torch.testing.assert_close(fast[n], slow[n], rtol=1e-4, atol=1e-9)
    assert sum(float(f.sum()) for f in fast.values()) > 0


def fisher_drift(model, method, anchor):
    """What EWC promises to keep small: the Fisher-weighted squared distance from the anchor."""
    return sum(float((method.fishers[0][n] * (p.detach() - anchor[n]).pow(2)).sum()) for n, p in model.named_parameters() if n in anchor)


def test_ewc_keeps_weights_closer_to_the_previous_task(tiny_model, tiny_stream, tiny_stem, tiny_config):
    drifts = {}
    for weight in (0.0, 1e5):
        model = copy.deepcopy(tiny_model)
        prepare_trainable(model, tiny_config.model, MODES["full"])
        method = build_method(MethodConfig(name="ewc", params={"reg_weight": weight}))
        method.prepare(model)
        first = task_data(tiny_stream, tiny_stem, 0)
        method.end_task(model, first)  # Fisher and anchor at the start point
        anchor = model.trainable_state()
        second = task_data(tiny_stream, tiny_stem, 1)
        opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-3)
        index = torch.arange(16)
        batch = Batch(inputs=second.inputs[index], targets=second.targets[index], index=index)
        for _ in range(30):
            loss, _ = method.loss(model, batch, second)
            opt.zero_grad()
            loss.backward()
            opt.step()
        drifts[weight] = fisher_drift(model, method, anchor)
    assert 0 < drifts[1e5] < 0.1 * drifts[0.0], drifts


def test_wise_ft_alpha_zero_returns_to_zero_shot(tiny_model, tiny_stream, tiny_stem, tiny_config):
    prepare_trainable(tiny_model, tiny_config.model, MODES["full"])
    zero_shot = tiny_model.trainable_state()
    method = build_method(MethodConfig(name="wise_ft", params={"alpha": 0.0}))
    result = run_stream(tiny_model, method, tiny_stream, tiny_stem, tiny_config, checkpoint_dir=None)
    for n, p in tiny_model.trainable_state().items():
        torch.testing.assert_close(p, zero_shot[n])
    for row in result.accuracy_matrix[1:]:
        np.testing.assert_allclose(row, result.accuracy_matrix[0])


def test_wise_ft_interpolates_halfway(tiny_model, tiny_stream, tiny_stem, tiny_config):
    prepare_trainable(tiny_model, tiny_config.model, MODES["full"])
    method = build_method(MethodConfig(name="wise_ft", params={"alpha": 0.5}))
    method.prepare(tiny_model)
    zero_shot = tiny_model.trainable_state()
    with torch.no_grad():
        for p in tiny_model.parameters():
            if p.requires_grad:
                p.add_(1.0)
    method.end_task(tiny_model, task_data(tiny_stream, tiny_stem, 0))
    for n, p in tiny_model.trainable_state().items():
        torch.testing.assert_close(p, zero_shot[n] + 0.5)


def test_lwf_teacher_is_the_model_at_task_start(tiny_model, tiny_stream, tiny_stem, tiny_config):
    prepare_trainable(tiny_model, tiny_config.model, MODES["full"])
    method = build_method(MethodConfig(name="lwf"))
    data = task_data(tiny_stream, tiny_stem, 1)
    method.begin_task(tiny_model, data)
    with torch.no_grad():
        expected = tiny_model(data.inputs, data.seen_class_names)
    torch.testing.assert_close(method.teacher_logits, expected)
    # and at the start, student == teacher: the distillation term is zero
    index = torch.arange(8)
    batch = Batch(inputs=data.inputs[index], targets=data.targets[index], index=index)
    _, logs = method.loss(tiny_model, batch, data)
    assert abs(logs["kd"]) < 1e-6
