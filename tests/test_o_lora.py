"""O-LoRA on the tiny stream with LoRA adapters: the orthogonality term keeps a new task's A out of
the old tasks' subspaces, folding a task's LoRA into the base weights keeps the model's function, the
old tasks' contributions stay frozen while the next task trains, and the state round-trips."""

import copy
import dataclasses

import pytest
import torch
from test_methods import MODES, task_data

from lifelong.config import MethodConfig
from lifelong.errors import ConfigError
from lifelong.families import prepare_trainable
from lifelong.learn import build_method
from lifelong.learn.o_lora import ADAPTER, lora_layers, orthogonality_loss
from lifelong.loop import Batch, train_task

RANK = MODES["lora"].rank


def olora(model, config, **params):
    prepare_trainable(model, config.model, MODES["lora"])
    method = build_method(MethodConfig(name="o_lora", params=params))
    method.prepare(model)
    return method


def base_weights(model):
    return {name: layer.get_base_layer().weight.detach().clone() for name, layer in lora_layers(model).items()}


def all_logits(model, stream, stem):
    with torch.no_grad():
        return [model(stem.test[t], task.class_names) for t, task in enumerate(stream.tasks)]


def overlap(subspaces):
    """sum over layers of |A_1 A_2^T| for the first two recorded tasks."""
    return sum(float((a[:RANK] @ a[RANK : 2 * RANK].T).abs().sum()) for a in subspaces.values())


def test_new_subspace_is_pushed_orthogonal_to_the_old(tiny_model, tiny_stream, tiny_stem, tiny_config):
    method = olora(tiny_model, tiny_config)
    first = task_data(tiny_stream, tiny_stem, 0)
    method.begin_task(tiny_model, first)  # task 1's subspace: its seeded A (training it would only cost time)
    method.end_task(tiny_model, first)
    second = task_data(tiny_stream, tiny_stem, 1)
    train = dataclasses.replace(tiny_config.train, steps_per_task=10, lr=2e-3)
    found = {}
    for weight in (0.0, 0.5):  # the same task-1 state and the same seeded A_2 at the start
        model, m = copy.deepcopy(tiny_model), build_method(MethodConfig(name="o_lora", params={"reg_weight": weight}))
        m.load_state_dict(method.state_dict())
        train_task(model, m, second, train, seed=1)
        assert all(a.shape[0] == 2 * RANK for a in m.subspaces.values())
        found[weight] = overlap(m.subspaces)
    assert found[0.5] < 0.4 * found[0.0], found  # about 0.2 here: A_2 barely moves without the term


def test_folding_keeps_the_function(tiny_model, tiny_stream, tiny_stem, tiny_config):
    method = olora(tiny_model, tiny_config)
    first = task_data(tiny_stream, tiny_stem, 0)
    method.begin_task(tiny_model, first)
    plain = all_logits(tiny_model, tiny_stream, tiny_stem)
    with torch.no_grad():  # a trained-looking, clearly non-zero LoRA, so that the fold is not a no-op
        for n, p in tiny_model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.05)
    deltas = {name: layer.get_delta_weight(ADAPTER).detach().clone() for name, layer in lora_layers(tiny_model).items()}
    before, base = all_logits(tiny_model, tiny_stream, tiny_stem), base_weights(tiny_model)
    assert max(float((b - p).abs().max()) for b, p in zip(before, plain)) > 1e-3  # the LoRA changes the function

    method.end_task(tiny_model, first)  # fold: base += scale * B A, B = 0
    for name, w in base_weights(tiny_model).items():
        torch.testing.assert_close(w, base[name] + deltas[name])
        assert deltas[name].abs().max() > 1e-3
    assert all(not layer.lora_B[ADAPTER].weight.any() for layer in lora_layers(tiny_model).values())
    second = task_data(tiny_stream, tiny_stem, 1)
    a_before = {n: p.detach().clone() for n, p in tiny_model.named_parameters() if "lora_A" in n}
    method.begin_task(tiny_model, second)  # a fresh A (seeded by the task index), B = 0
    a_after = {n: p.detach().clone() for n, p in tiny_model.named_parameters() if "lora_A" in n}
    assert all(not torch.equal(a_before[n], a_after[n]) for n in a_before)
    for end, start in zip(before, all_logits(tiny_model, tiny_stream, tiny_stem)):
        torch.testing.assert_close(start, end, atol=1e-5, rtol=0)
    method.begin_task(tiny_model, second)  # the same index draws the same A: reruns and resumes agree
    assert all(torch.equal(p, a_after[n]) for n, p in tiny_model.named_parameters() if "lora_A" in n)


def test_old_tasks_stay_frozen_while_the_next_one_trains(tiny_model, tiny_stream, tiny_stem, tiny_config):
    method = olora(tiny_model, tiny_config)
    short = dataclasses.replace(tiny_config.train, steps_per_task=2)
    train_task(tiny_model, method, task_data(tiny_stream, tiny_stem, 0), short, seed=0)
    after_first, subspace = base_weights(tiny_model), {k: v.clone() for k, v in method.state_dict().items()}
    seen, deltas = [], {}

    def at_step(state):  # called after every optimizer step, the last one before end_task
        seen.append(base_weights(tiny_model))
        deltas.update({n: l.get_delta_weight(ADAPTER).detach().clone() for n, l in lora_layers(tiny_model).items()})

    train_task(tiny_model, method, task_data(tiny_stream, tiny_stem, 1), tiny_config.train, seed=1,
               checkpoint_every=1, on_checkpoint=at_step)
    assert len(seen) == tiny_config.train.steps_per_task
    for weights in seen:  # the folded task-1 model does not move within task 2
        assert all(torch.equal(weights[n], after_first[n]) for n in after_first)
    trainable = {n for n, p in tiny_model.named_parameters() if p.requires_grad}
    assert trainable and all(".lora_" in n for n in trainable)
    for name, w in base_weights(tiny_model).items():  # after task 2: the old model plus task 2's LoRA only
        torch.testing.assert_close(w, after_first[name] + deltas[name])
    for k, v in subspace.items():  # task 1's recorded A is untouched, task 2's is appended
        assert torch.equal(method.state_dict()[k][:RANK], v)


def test_orthogonality_term_reaches_only_the_new_A(tiny_model, tiny_stream, tiny_stem, tiny_config):
    method = olora(tiny_model, tiny_config)
    first = task_data(tiny_stream, tiny_stem, 0)
    method.begin_task(tiny_model, first)
    method.end_task(tiny_model, first)
    method.begin_task(tiny_model, task_data(tiny_stream, tiny_stem, 1))
    with torch.no_grad():
        for n, p in tiny_model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.05)
    orth = orthogonality_loss(tiny_model, method.subspaces)
    orth.backward()
    for n, p in tiny_model.named_parameters():
        if "lora_A" in n:
            assert p.grad is not None and p.grad.abs().sum() > 0, n
        else:
            assert p.grad is None, n
    assert all(not a.requires_grad and a.grad is None for a in method.subspaces.values())


def test_state_round_trips_and_needs_lora(tiny_model, tiny_stream, tiny_stem, tiny_config):
    full = copy.deepcopy(tiny_model)
    method = olora(tiny_model, tiny_config, reg_weight=0.7, l2_weight=0.01)
    short = dataclasses.replace(tiny_config.train, steps_per_task=2)
    for t in range(2):
        train_task(tiny_model, method, task_data(tiny_stream, tiny_stem, t), short, seed=t)
    state = method.state_dict()
    assert state and all(isinstance(v, torch.Tensor) for v in state.values())
    assert all(v.shape[0] == 2 * RANK for v in state.values())
    clone = build_method(MethodConfig(name="o_lora", params={"reg_weight": 0.7, "l2_weight": 0.01}))
    clone.load_state_dict({k: v.clone() for k, v in state.items()})
    third = task_data(tiny_stream, tiny_stem, 2)
    method.begin_task(tiny_model, third)
    index = torch.arange(8)
    batch = Batch(inputs=third.inputs[index], targets=third.targets[index], index=index)
    loss, logs = method.loss(tiny_model, batch, third)
    assert logs["orth"] > 0 and logs["l2"] > 0
    assert loss.item() == clone.loss(tiny_model, batch, third)[0].item()

    prepare_trainable(full, tiny_config.model, MODES["full"])
    with pytest.raises(ConfigError, match="adapter.kind: lora"):
        build_method(MethodConfig(name="o_lora")).prepare(full)
    with pytest.raises(ConfigError):
        build_method(MethodConfig(name="o_lora", params={"reg_weight": -1.0}))
