"""ZSCL (learn/zscl.py): the cached teacher equals the per-step one, the distillation keeps the
reference image-text similarities near the initial model's, and the weight ensemble is the running mean of the
sampled weights. The method contract (trainable parameters, resume, ...) is in test_methods.py."""

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
from lifelong.learn.zscl import ZSCL, Params, embed_images, load_reference_images
from lifelong.loop import Batch, label_spaces, targets_in, train_task

# A small reference set keeps the tests fast; the method's defaults are 1000 images and 1000 texts.
SMALL = dict(reference_images=64, reference_batch_size=16, reference_texts=48, reference_texts_per_step=16)


def task_data(stream, stem, t):
    seen = tuple(n for task in stream.tasks[:t] for n in task.class_names)
    task = stream.tasks[t]
    return TaskData(t, task, stem.train[t], targets_in(stream, t, task.train.labels), label_spaces(stream)[t], seen)


def prepared(model, config):
    prepare_trainable(model, config.model, AdapterConfig())
    return model


def test_text_embeddings_average_to_the_class_embeddings(tiny_model):
    """text_embeddings is the un-templated building block of class_embeddings."""
    names = ("cat", "digit seven")
    per_name = [tiny_model.text_embeddings([t.format(n) for t in tiny_model.templates]) for n in names]  # (T, D) each
    assert all(torch.allclose(e.norm(dim=-1), torch.ones(len(e))) for e in per_name)
    expected = torch.stack([F.normalize(e.mean(0), dim=-1) for e in per_name])
    torch.testing.assert_close(tiny_model.class_embeddings(names), expected)


def test_cached_and_per_step_teachers_give_the_same_losses(tiny_model, tiny_stream, tiny_stem, tiny_config):
    """Two tasks (L2 term and ensemble on): the cached teacher outputs are the per-step teacher's, which
    runs a frozen copy of the initial model from raw pixels and raw sentences every step."""
    runs = {}
    for cache in (True, False):
        model = prepared(copy.deepcopy(tiny_model), tiny_config)
        method = ZSCL(Params(cache_teacher=cache, ensemble_every=1, l2_weight=1e-3, **SMALL))
        torch.manual_seed(0)
        method.prepare(model)
        losses = [train_task(model, method, task_data(tiny_stream, tiny_stem, t),
                             dataclasses.replace(tiny_config.train, steps_per_task=2 - t), seed=t) for t in range(2)]
        runs[cache] = (losses, model)
    (cached, model_c), (per_step, model_p) = runs[True], runs[False]
    for a, b in zip(cached, per_step):
        assert a == pytest.approx(b, abs=1e-5), (a, b)
    for (name, a), b in zip(model_c.named_parameters(), model_p.parameters()):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4, msg=name)


def test_per_step_teacher_state_round_trips(tiny_model, tiny_stream, tiny_stem, tiny_config):
    """Without caches the state holds the teacher's weights: a fresh method rebuilds the same teacher."""
    model = prepared(tiny_model, tiny_config)
    params = Params(cache_teacher=False, **SMALL)
    method = ZSCL(params)
    method.prepare(model)
    with torch.no_grad():  # the model has moved away from the teacher
        model.image_projection.weight.mul_(1.5)
    data = task_data(tiny_stream, tiny_stem, 0)
    method.begin_task(model, data)
    clone = ZSCL(params)
    clone.load_state_dict({k: v.clone() for k, v in method.state_dict().items()})
    batch = Batch(inputs=data.inputs[:8], targets=data.targets[:8], index=torch.arange(8))
    loss, logs = method.loss(model, batch, data)
    assert logs["kd_image"] > 0 and loss.item() == clone.loss(model, batch, data)[0].item()


def test_distillation_keeps_the_reference_distributions_of_the_initial_model(tiny_model, tiny_stream, tiny_stem,
                                                                             tiny_config):
    """Distillation alone (no ensemble, no L2): after a task, each reference image's distribution over
    the reference texts, and each text's over the images, stay closer to the initial model's than after
    plain fine-tuning. That is what the KD terms hold, not the embeddings' position: the text projection
    trains too and can turn the joint space, and a softmax ignores a shift of all of a row's logits."""
    train = dataclasses.replace(tiny_config.train, steps_per_task=6, lr=3e-4)
    data = task_data(tiny_stream, tiny_stem, 0)
    base = prepared(tiny_model, tiny_config)
    reference = load_reference_images(base, SMALL["reference_images"], 0)
    texts = ZSCL(Params(**SMALL))._texts()
    with torch.no_grad():
        before = embed_images(base, reference.inputs) @ base.text_embeddings(texts).T  # (N_img, N_txt) cosines

    kl_image, kl_text = {}, {}
    for name, method in (("finetune", Finetune(Finetune.Params())),
                         ("zscl", ZSCL(Params(ensemble_every=0, l2_weight=0.0, label_smoothing=0.0, **SMALL)))):
        model = copy.deepcopy(base)
        torch.manual_seed(0)
        method.prepare(model)
        train_task(model, method, data, train, seed=0)
        with torch.no_grad():
            after = embed_images(model, reference.inputs) @ model.text_embeddings(texts).T
            for kl, dim in ((kl_image, -1), (kl_text, 0)):
                teacher = F.log_softmax(base.logit_scale * before, dim=dim)
                student = F.log_softmax(model.logit_scale * after, dim=dim)
                kl[name] = F.kl_div(student, teacher, log_target=True, reduction="sum").item() / before.shape[dim]
    assert kl_image["finetune"] > 1e-3 and kl_text["finetune"] > 1e-3, (kl_image, kl_text)  # the task moved the model
    assert kl_image["zscl"] < 0.5 * kl_image["finetune"], kl_image
    assert kl_text["zscl"] < 0.5 * kl_text["finetune"], kl_text


def test_weight_ensemble_is_the_running_mean_of_the_sampled_weights(tiny_model, tiny_stream, tiny_stem, tiny_config):
    """4 steps, I = 2: the task ends at the mean of theta_start (the official merge_we starts from a copy of
    the task-start model) and the weights after steps 1, 3 and 4 (the last)."""

    class Recorder:
        """Records the weights each loss call sees (after `step` updates) and those before end_task."""

        def __init__(self, method):
            self.method, self.seen = method, []

        def loss(self, model, batch, data):
            self.seen.append(model.trainable_state())
            return self.method.loss(model, batch, data)

        def begin_task(self, model, data):
            self.method.begin_task(model, data)

        def end_task(self, model, data):
            self.seen.append(model.trainable_state())
            self.method.end_task(model, data)

    model = prepared(tiny_model, tiny_config)
    method = ZSCL(Params(ensemble_every=2, **SMALL))
    method.prepare(model)
    recorder = Recorder(method)
    train_task(model, recorder, task_data(tiny_stream, tiny_stem, 0),
               dataclasses.replace(tiny_config.train, steps_per_task=4), seed=0)
    assert len(recorder.seen) == 5  # the weights after 0, 1, ..., 4 steps
    sampled = [recorder.seen[s] for s in (0, 1, 3, 4)]
    after = model.trainable_state()
    assert after.keys() == sampled[0].keys()
    moved = False
    for name, w in after.items():
        torch.testing.assert_close(w, torch.stack([s[name] for s in sampled]).mean(0), atol=1e-6, rtol=1e-5, msg=name)
        moved |= not torch.equal(w, recorder.seen[4][name])
    assert moved, "the ensemble equals the last weights: nothing was averaged"


@pytest.mark.parametrize("knobs,match", [
    (dict(reference_batch_size=2000), "lower reference_batch_size or raise reference_images"),
    (dict(reference_texts=10, reference_texts_per_step=64), "reference_texts_per_step must be in 1..reference_texts"),
    (dict(ensemble_every=-1), "0 = no weight ensemble"),
    (dict(temperature=0.0), "temperature must be positive"),
    (dict(label_smoothing=1.0), r"label_smoothing must be in \[0, 1\)"),
])
def test_invalid_params_say_how_to_fix_them(knobs, match):
    with pytest.raises(ConfigError, match=match):
        Params(**knobs)


def test_too_many_reference_texts_fail_at_prepare(tiny_model, tiny_config):
    with pytest.raises(ConfigError, match="reference sentences: lower it"):
        ZSCL(Params(reference_texts=5000, **{k: v for k, v in SMALL.items() if k != "reference_texts"})).prepare(tiny_model)
