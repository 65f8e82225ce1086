"""What iCaRL promises, checked on the tiny stream (digits, lfw, mnist; 4 training images per digit,
20 per lfw class): the exemplar memory keeps the budget and m = memory_size // classes_seen exemplars
per class, herding beats random selection, evaluation uses the nearest mean of exemplars, the
task-start teacher is cached, and the state round-trips."""

import copy

import pytest
import torch
import torch.nn.functional as F
from test_methods import MODES, task_data

from lifelong.config import MethodConfig
from lifelong.families import prepare_trainable
from lifelong.learn import build_method
from lifelong.learn.icarl import ICaRL, herding_order, image_features
from lifelong.loop import Batch, count_correct, evaluate, run_stream

BUDGET = 30  # small enough that the tiny stream's sets get cut: m = 3, then 2, then 1


def snapshot(method: ICaRL) -> dict:
    """Per exemplar set (task, label): its stem outputs in memory order, and its class names."""
    names = method.exemplar_names()
    return {key: (method.memory_inputs[rows].clone(), {names[i] for i in rows.tolist()})
            for key, rows in method.exemplar_sets().items()}


@pytest.fixture(scope="module")
def trained(_tiny_models, tiny_stream, tiny_stem, tiny_config):
    """One run_stream of iCaRL with a small budget, with the memory recorded after every task."""
    model = copy.deepcopy(_tiny_models["tiny-embedded"])
    prepare_trainable(model, tiny_config.model, MODES["full"])
    method = build_method(MethodConfig(name="icarl", params={"memory_size": BUDGET}))
    snapshots, end_task = [], method.end_task

    def recording_end_task(model, data):
        end_task(model, data)
        snapshots.append(snapshot(method))

    method.end_task = recording_end_task
    run_stream(model, method, tiny_stream, tiny_stem, tiny_config, checkpoint_dir=None)
    return model, method, snapshots


def test_memory_keeps_the_budget_and_every_seen_class(trained, tiny_stream):
    _, method, snapshots = trained
    assert len(snapshots) == len(tiny_stream.tasks)
    for t, memory in enumerate(snapshots):
        seen = {(k, y): name for k in range(t + 1) for y, name in enumerate(tiny_stream.tasks[k].class_names)}
        assert set(memory) == set(seen), f"after task {t + 1}: sets {sorted(memory)}"
        m = BUDGET // len(seen)  # the paper's m = K / classes seen: 3, 2, 1 here
        assert sum(len(inputs) for inputs, _ in memory.values()) <= BUDGET
        for (k, y), (inputs, names) in memory.items():
            available = int((torch.as_tensor(tiny_stream.tasks[k].train.labels) == y).sum())
            assert len(inputs) == min(m, available), (t, k, y)
            assert names == {seen[(k, y)]}
            if t > 0 and k < t:  # an old set is cut to the first m of its herding order (Algorithm 5)
                torch.testing.assert_close(inputs, snapshots[t - 1][(k, y)][0][:m], rtol=0, atol=0)


def test_herding_mean_is_closer_to_the_class_mean_than_random_sets(tiny_model, tiny_stream, tiny_stem):
    lfw = tiny_stream.tasks[1]
    for label, name in enumerate(lfw.class_names):  # 20 training images per class
        rows = torch.as_tensor(lfw.train.labels) == label
        features = image_features(tiny_model, tiny_stem.train[1][rows])  # (20, D): the model's phi of real images
        target = F.normalize(features.mean(0), dim=0)

        def distance(chosen):
            return float((F.normalize(features[chosen].mean(0), dim=0) - target).norm())

        m = 5
        order = herding_order(features, m)
        assert len(set(order.tolist())) == m
        g = torch.Generator().manual_seed(label)
        random_sets = sorted(distance(torch.randperm(len(features), generator=g)[:m]) for _ in range(50))
        # closer than 48 of 50 random sets of the same size, and clearly closer than the typical one
        assert distance(order) < random_sets[2], (name, distance(order), random_sets[:3])
        assert distance(order) < 0.75 * random_sets[25], (name, distance(order), random_sets[25])


def test_evaluation_uses_the_nearest_mean_of_exemplars(tiny_model, tiny_stream, tiny_stem, tiny_config):
    prepare_trainable(tiny_model, tiny_config.model, MODES["full"])
    method = build_method(MethodConfig(name="icarl"))
    first = task_data(tiny_stream, tiny_stem, 0)
    method.begin_task(tiny_model, first)
    method.end_task(tiny_model, first)  # the budget holds all 40 digits images
    digits, lfw = tiny_stream.tasks[0], tiny_stream.tasks[1]
    x = tiny_stem.test[0]

    with torch.no_grad():
        image = tiny_model.image_embeddings(x)
        members = method.memory_inputs[method.memory_targets == 3]
        mean = F.normalize(tiny_model.image_embeddings(members).mean(0), dim=0)
    nme = method.eval_logits(tiny_model, x, digits.class_names)
    torch.testing.assert_close(nme[:, 3], tiny_model.logit_scale * image @ mean)
    # lfw's names have no exemplars: their scores are the zero-shot image-text logits
    with torch.no_grad():
        plain_lfw = tiny_model(tiny_stem.test[1], lfw.class_names)
    torch.testing.assert_close(method.eval_logits(tiny_model, tiny_stem.test[1], lfw.class_names), plain_lfw)

    # evaluation counts exactly the NME predictions as correct, not those of the image-text logits
    predicted = nme.argmax(-1)
    assert count_correct(tiny_model, x, predicted, digits.class_names, 7, method) == len(x)
    assert count_correct(tiny_model, x, predicted, digits.class_names, 7) < len(x)
    with_nme, _ = evaluate(tiny_model, tiny_stream, tiny_stem, 1, 64, method)
    plain, _ = evaluate(tiny_model, tiny_stream, tiny_stem, 1, 64)
    labels = torch.as_tensor(digits.test.labels)
    assert with_nme[0] == 100.0 * int((predicted == labels).sum()) / len(labels)
    assert with_nme[1] == plain[1]


def test_teacher_is_cached_at_task_start(tiny_model, tiny_stream, tiny_stem, tiny_config):
    prepare_trainable(tiny_model, tiny_config.model, MODES["full"])
    method = build_method(MethodConfig(name="icarl"))
    first, second = task_data(tiny_stream, tiny_stem, 0), task_data(tiny_stream, tiny_stem, 1)
    method.begin_task(tiny_model, first)
    method.end_task(tiny_model, first)
    method.begin_task(tiny_model, second)
    with torch.no_grad():
        torch.testing.assert_close(method.teacher_memory_logits, tiny_model(method.memory_inputs, first.class_names))
        torch.testing.assert_close(method.teacher_logits, tiny_model(second.inputs, first.class_names))
    index = torch.arange(8)
    batch = Batch(inputs=second.inputs[index], targets=second.targets[index], index=index)
    _, logs = method.loss(tiny_model, batch, second)
    assert abs(logs["kd"]) < 1e-6  # student == teacher at the start, also on the replayed exemplars
    assert method.replay_step == 1


def test_state_round_trips_the_memory(trained, tiny_stream, tiny_stem):
    model, method, _ = trained
    clone = build_method(MethodConfig(name="icarl", params={"memory_size": BUDGET}))
    clone.load_state_dict({k: v.clone() for k, v in method.state_dict().items()})
    assert snapshot(clone).keys() == snapshot(method).keys()
    for key, (inputs, names) in snapshot(method).items():
        assert torch.equal(snapshot(clone)[key][0], inputs) and snapshot(clone)[key][1] == names
    assert clone.label_spaces == method.label_spaces and clone.mean_names == method.mean_names
    for a, b in zip(method.state_dict().items(), clone.state_dict().items()):
        assert a[0] == b[0] and torch.equal(a[1], b[1]), a[0]
    names = tiny_stream.tasks[2].class_names
    assert torch.equal(method.eval_logits(model, tiny_stem.test[2], names), clone.eval_logits(model, tiny_stem.test[2], names))
