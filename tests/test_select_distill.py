"""Select-and-Distill (learn/select_distill.py): the selection score, the frozen text side, the cached
teachers against per-step ones, and the dual-teacher distillation against plain fine-tuning. The
method contract (trainable parameters, resume, ...) is in test_methods.py."""

import copy
import dataclasses

import pytest
import torch
import torch.nn.functional as F

from lifelong.config import AdapterConfig
from lifelong.errors import ConfigError
from lifelong.families import prepare_trainable
from lifelong.learn.common import TaskData
from lifelong.learn.finetune import Finetune
from lifelong.learn.select_distill import Params, SelectAndDistill, selection_scores
from lifelong.learn.zscl import embed_images, load_reference_images
from lifelong.loop import Batch, label_spaces, targets_in, train_task

SMALL = dict(reference_images=64, reference_batch_size=16)  # the defaults are 1000 and 64


def task_data(stream, stem, t):
    seen = tuple(n for task in stream.tasks[:t] for n in task.class_names)
    task = stream.tasks[t]
    return TaskData(t, task, stem.train[t], targets_in(stream, t, task.train.labels), label_spaces(stream)[t], seen)


def prepared(model, config, adapter=AdapterConfig()):
    prepare_trainable(model, config.model, adapter)
    return model


def test_selection_score_is_high_where_the_teachers_disagree():
    """Rows 0-3: the previous model kept the pretrained feature (s = sigmoid(-6 * 0.2) = 0.23, distil
    from the pretrained model); rows 4-7: it moved to an orthogonal one (s ~ 1, distil from it)."""
    torch.manual_seed(0)
    pretrained = F.normalize(torch.randn(8, 16), dim=-1)
    moved = F.normalize(torch.randn(4, 16), dim=-1)
    moved = F.normalize(moved - (moved * pretrained[4:]).sum(-1, keepdim=True) * pretrained[4:], dim=-1)
    previous = torch.cat([pretrained[:4], moved])
    s = selection_scores(pretrained, previous, scale=6.0, threshold=0.2)
    torch.testing.assert_close(s[:4], torch.full((4,), torch.sigmoid(torch.tensor(-1.2)).item()))
    assert (s[4:] > 0.999).all(), s  # ||f_0 - f_prev|| = sqrt(2)


def test_selection_follows_the_models(tiny_model, tiny_stream, tiny_stem, tiny_config):
    """Through the method's caches: a task that starts from the pretrained model selects nothing; one
    that starts from a model whose image features moved selects most reference images."""
    model = prepared(tiny_model, tiny_config)
    method = SelectAndDistill(Params(**SMALL))
    method.prepare(model)
    data = task_data(tiny_stream, tiny_stem, 0)
    batch = Batch(inputs=data.inputs[:8], targets=data.targets[:8], index=torch.arange(8))
    method.begin_task(model, data)
    agree = method.loss(model, batch, data)[1]
    with torch.no_grad():  # a previous task turned the image features
        torch.manual_seed(0)
        model.image_projection.weight.copy_(torch.randn_like(model.image_projection.weight) * 0.1)
    method.begin_task(model, task_data(tiny_stream, tiny_stem, 1))
    disagree = method.loss(model, batch, data)[1]
    assert agree["selected"] == pytest.approx(torch.sigmoid(torch.tensor(-1.2)).item(), abs=1e-5), agree
    assert agree["prev_kd"] == pytest.approx(0, abs=1e-9) and agree["pretrained_kd"] == pytest.approx(0, abs=1e-9)
    assert disagree["selected"] > 0.9, disagree
    assert disagree["pretrained_kd"] > 1e-5 and disagree["prev_kd"] == pytest.approx(0, abs=1e-9)  # f = f_prev


def test_prepare_freezes_the_text_side(tiny_model, tiny_config):
    model = prepared(tiny_model, tiny_config)
    assert model.text_projection.weight.requires_grad  # the default: trainable
    SelectAndDistill(Params(**SMALL)).prepare(model)
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all(n.startswith(("image_trunk.", "image_projection.")) for n in trainable)


def test_text_only_lora_is_refused(tiny_model, tiny_config):
    model = prepared(tiny_model, tiny_config, AdapterConfig(kind="lora", rank=2, alpha=4, tower="text"))
    with pytest.raises(ConfigError, match="adapter.tower=image"):
        SelectAndDistill(Params(**SMALL)).prepare(model)


def test_cached_and_per_step_teachers_give_the_same_losses(tiny_model, tiny_stream, tiny_stem, tiny_config):
    """Two tasks, so that the previous teacher differs from the pretrained one on the second."""
    runs = {}
    for cache in (True, False):
        model = prepared(copy.deepcopy(tiny_model), tiny_config)
        method = SelectAndDistill(Params(cache_teacher=cache, **SMALL))
        torch.manual_seed(0)
        method.prepare(model)
        runs[cache] = [train_task(model, method, task_data(tiny_stream, tiny_stem, t),
                                  dataclasses.replace(tiny_config.train, steps_per_task=2), seed=t) for t in range(2)]
    for a, b in zip(runs[True], runs[False]):
        assert a == pytest.approx(b, abs=1e-5), (a, b)
    assert runs[True][1][0] > 0


def test_dual_teacher_distillation_keeps_features_near_the_teachers(tiny_model, tiny_stream, tiny_stem, tiny_config):
    """Two tasks each, same trainable parameters (text side frozen for both): after the second task the
    reference features are closer to the pretrained model's and to the task-start model's than after
    plain fine-tuning, and so is the selection-weighted sum the method minimises."""
    train = dataclasses.replace(tiny_config.train, steps_per_task=3, lr=1e-4)
    base = prepared(tiny_model, tiny_config)
    base.text_projection.requires_grad_(False)
    reference = load_reference_images(base, SMALL["reference_images"], 0).inputs
    pretrained = embed_images(base, reference)
    distances = {}
    for name, method in (("finetune", Finetune(Finetune.Params())), ("select_distill", SelectAndDistill(Params(**SMALL)))):
        model = copy.deepcopy(base)
        torch.manual_seed(0)
        method.prepare(model)
        train_task(model, method, task_data(tiny_stream, tiny_stem, 0), train, seed=0)
        previous = embed_images(model, reference)
        train_task(model, method, task_data(tiny_stream, tiny_stem, 1), train, seed=1)
        after = embed_images(model, reference)
        s = selection_scores(pretrained, previous, 6.0, 0.2)
        d_pre, d_prev = (after - pretrained).pow(2).sum(-1), (after - previous).pow(2).sum(-1)
        distances[name] = {"pretrained": d_pre.mean().item(), "previous": d_prev.mean().item(),
                           "weighted": (9 * s * d_prev + 0.5 * (1 - s) * d_pre).mean().item()}
    ft, snd = distances["finetune"], distances["select_distill"]
    assert ft["previous"] > 1e-3, distances  # fine-tuning moved the features
    for key in ("pretrained", "previous", "weighted"):
        assert snd[key] < 0.7 * ft[key], (key, distances)


@pytest.mark.parametrize("knobs,match", [
    (dict(reference_batch_size=2000), "lower reference_batch_size or raise reference_images"),
    (dict(reference_images=0), "reference_images must be >= 1"),
    (dict(prev_weight=-1.0), "paper: 9 and 0.5"),
    (dict(scale=0.0), "scale must be positive"),
    (dict(threshold=-0.1), "threshold must be >= 0"),
])
def test_invalid_params_say_how_to_fix_them(knobs, match):
    with pytest.raises(ConfigError, match=match):
        Params(**knobs)
