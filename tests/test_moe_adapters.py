"""MoE-Adapters on the tiny model: noisy top-2 routing picks two experts per input, the load-balancing
loss is zero only for balanced routing, the experts a task chose most are frozen for the next task,
and the auto-selector sends images of a learned task to that task's router and images from elsewhere
to the untouched original model."""

import copy
import dataclasses
from types import SimpleNamespace

import pytest
import torch
from test_methods import task_data

from lifelong.config import MethodConfig
from lifelong.data.base import Task
from lifelong.data.reference import reference_images
from lifelong.data.sources import load_source
from lifelong.errors import ConfigError
from lifelong.learn import build_method
from lifelong.learn.common import TaskData
from lifelong.learn.moe_adapters import mixtures, routed
from lifelong.loop import Batch, train_task
from lifelong.modules.moe_adapter import NoisyTopKRouter, load_balancing_loss


def moe(model, **params):
    method = build_method(MethodConfig(name="moe_adapters", params=params))
    method.prepare(model)
    with torch.no_grad():  # experts start as no-ops (W_up = 0): make them act, so no test passes on a no-op
        for site in mixtures(model):
            for expert in site.experts:
                expert.up.weight.normal_(0, 0.05)
    return method


def source_task(model, index, source, n_train):
    train = load_source(source, "train", max_items=n_train)
    test = load_source(source, "test", max_items=40)
    task = Task(source, train, test, tuple(range(len(train.class_names))))
    data = TaskData(index, task, model.encode_stem(train.images), torch.as_tensor(train.labels), train.class_names, ())
    return data, model.encode_stem(test.images)


def expert_weights(model):
    return {n: p.detach().clone() for n, p in model.named_parameters() if ".experts." in n}


@pytest.fixture(scope="module")
def digits_then_lfw(_tiny_models, tiny_config):
    """The tiny model and method after digits (200 images), and after digits then lfw (140 images)."""
    model = copy.deepcopy(_tiny_models["tiny-embedded"])
    original = copy.deepcopy(model)
    method = moe(model)
    digits, digits_test = source_task(model, 0, "digits", 200)
    lfw, lfw_test = source_task(model, 1, "lfw", 140)
    train = dataclasses.replace(tiny_config.train, steps_per_task=6)
    train_task(model, method, digits, train, seed=0)
    first = SimpleNamespace(model=copy.deepcopy(model), method=copy.deepcopy(method))
    train_task(model, method, lfw, train, seed=1)
    return SimpleNamespace(original=original, first=first, model=model, method=method, digits=digits, lfw=lfw,
                           digits_test=digits_test, lfw_test=lfw_test,
                           photos=model.encode_stem(reference_images(100, 32).images))


def test_noisy_top2_router_picks_exactly_two_experts():
    torch.manual_seed(0)
    router = NoisyTopKRouter(16, 22)
    with torch.no_grad():
        router.w_gate.normal_()
        router.w_noise.normal_()
    x = torch.randn(64, 16)
    for noise in (None, torch.randn(64, 22)):
        gates, load = router(x, top_k=2, noise=noise)
        assert ((gates > 0).sum(1) == 2).all()
        torch.testing.assert_close(gates.sum(1), torch.ones(64))
        assert load.shape == (22,)


def test_every_block_routes_each_input_to_two_experts(digits_then_lfw):
    s = digits_then_lfw
    x = s.digits_test[:12]
    for noise in (None, torch.Generator().manual_seed(0)):
        with torch.no_grad(), routed(s.model, 1, noise) as sites:
            s.model(x, s.digits.class_names)
            rows = [site.gates for site in sites]
        assert len(rows) == 2 + 2  # two trunk blocks, two BERT layers
        for gates in rows:  # images (12) or class prompts (10 classes x 2 templates)
            assert ((gates > 0).sum(1) == 2).all()


def test_load_balancing_loss_is_zero_only_for_balanced_routing():
    balanced = torch.tensor([[0.5, 0.5, 0, 0], [0, 0, 0.5, 0.5], [0.5, 0, 0, 0.5], [0, 0.5, 0.5, 0]])
    assert load_balancing_loss(balanced, (balanced > 0).sum(0).float()).item() == 0.0
    skewed = torch.tensor([[0.6, 0.4, 0, 0], [0.5, 0.5, 0, 0], [0.7, 0, 0.3, 0], [0.5, 0.5, 0, 0]])
    assert load_balancing_loss(skewed, (skewed > 0).sum(0).float()).item() > 0.1
    # With noise the load is a smooth probability, so the loss trains the router.
    torch.manual_seed(0)
    router = NoisyTopKRouter(8, 6)
    gates, load = router(torch.randn(32, 8), top_k=2, noise=torch.randn(32, 6))
    load_balancing_loss(gates, load).backward()
    assert router.w_gate.grad.abs().sum() > 0 and router.w_noise.grad.abs().sum() > 0


def test_the_experts_a_task_chose_most_are_frozen_for_the_next(digits_then_lfw):
    s = digits_then_lfw
    usage, frozen = s.first.method.usage, s.first.method.frozen  # after digits
    for i in range(len(usage)):
        top = set(usage[i].topk(2).indices.tolist())
        assert set(frozen[i].nonzero().squeeze(1).tolist()) == top
    before, after = expert_weights(s.first.model), expert_weights(s.model)
    sites = [f"image_trunk.moe_adapters.{i}" for i in range(2)] + [f"text_encoder.moe_adapters.{i}" for i in range(2)]
    changed_free = 0
    for i, site in enumerate(sites):
        for e in range(frozen.shape[1]):
            names = [n for n in before if n.startswith(f"{site}.experts.{e}.")]
            same = all(torch.equal(before[n], after[n]) for n in names)
            if frozen[i, e]:
                assert same, f"frozen expert {site}.{e} changed during lfw"
            changed_free += not same
    assert changed_free > 0, "lfw trained no expert"
    old_router = {n: p for n, p in s.first.model.named_parameters() if ".routers.0." in n}
    assert all(torch.equal(p, dict(s.model.named_parameters())[n]) for n, p in old_router.items())


def test_unseen_images_go_to_the_untouched_original_model(digits_then_lfw):
    s = digits_then_lfw
    model, method = s.first.model, s.first.method  # only digits learned
    # The tiny model's random features set the bar: photos (colour, natural) are easier to tell apart
    # from digits than lfw's grey faces.
    for images, names, share in ((s.photos, ("cat", "coffee", "rocket"), 0.8), (s.lfw_test, s.lfw.class_names, 0.7)):
        choice = method.select(model, images)
        assert (choice == -1).float().mean() >= share, choice
        away = choice == -1
        with torch.no_grad():
            assert torch.equal(method.eval_logits(model, images, names)[away], s.original(images, names)[away])
    own = method.select(model, s.digits_test)
    assert (own == 0).float().mean() >= 0.9, own
    with torch.no_grad():  # and the adapters do act on the digits they take
        routed_logits = method.eval_logits(model, s.digits_test, s.digits.class_names)[own == 0]
        assert not torch.equal(routed_logits, s.original(s.digits_test, s.digits.class_names)[own == 0])


def test_each_learned_task_goes_to_its_own_router(digits_then_lfw):
    s = digits_then_lfw
    assert (s.method.select(s.model, s.digits_test) == 0).float().mean() >= 0.7
    assert (s.method.select(s.model, s.lfw_test) == 1).float().mean() >= 0.7
    away = s.method.select(s.model, s.photos) == -1  # what is still routed away stays zero-shot
    names = ("cat", "coffee", "rocket")
    with torch.no_grad():
        assert torch.equal(s.method.eval_logits(s.model, s.photos, names)[away], s.original(s.photos, names)[away])


def test_image_tower_only_leaves_the_text_encoder_and_its_cache(tiny_model, tiny_stream, tiny_stem, tiny_config):
    original = copy.deepcopy(tiny_model)
    method = moe(tiny_model, towers="image")
    train = dataclasses.replace(tiny_config.train, steps_per_task=2)
    train_task(tiny_model, method, task_data(tiny_stream, tiny_stem, 0), train, seed=0)
    assert not hasattr(tiny_model.text_encoder, "moe_adapters") and tiny_model._text_frozen()
    names = tiny_stream.tasks[0].class_names
    with torch.no_grad():
        assert torch.equal(tiny_model.class_embeddings(names), original.class_embeddings(names))


def test_clip_towers_route_and_train(tiny_clip, tiny_stream):
    task = tiny_stream.tasks[0]
    images = task.train.images[:12]
    data = TaskData(0, task, tiny_clip.encode_stem(images), torch.as_tensor(task.train.labels[:12]), task.class_names, ())
    method = moe(tiny_clip)
    method.begin_task(tiny_clip, data)
    batch = Batch(inputs=data.inputs, targets=data.targets, index=torch.arange(12))
    loss, logs = method.loss(tiny_clip, batch, data)
    loss.backward()
    assert logs["balance"] > 0
    grads = [p.grad for n, p in tiny_clip.named_parameters() if ".routers.0." in n]
    assert grads and all(g is not None and g.abs().sum() > 0 for g in grads)
    method.end_task(tiny_clip, data)
    assert method.eval_logits(tiny_clip, data.inputs, task.class_names).shape == (12, len(task.class_names))


def test_a_stream_longer_than_max_tasks_fails_clearly(tiny_model, tiny_stream, tiny_stem):
    method = moe(tiny_model, max_tasks=1)
    with pytest.raises(ConfigError, match="max_tasks"):
        method.begin_task(tiny_model, task_data(tiny_stream, tiny_stem, 1))


def test_a_copied_model_routes_through_its_own_experts(tiny_model):
    moe(tiny_model)
    clone = copy.deepcopy(tiny_model)
    for block, site in zip(clone.image_trunk.blocks, clone.image_trunk.moe_adapters):
        assert all(hook.__self__ is site for hook in block._forward_hooks.values())
