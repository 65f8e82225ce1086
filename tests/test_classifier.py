"""The classifier family: the DualEncoder interface on a backbone + growing linear head, the methods
that run on it, its config checks and the runner's dispatch on model.family."""

import copy

import numpy as np
import pytest
import torch

from lifelong.config import AdapterConfig, MethodConfig, ModelConfig
from lifelong.errors import ConfigError
from lifelong.families import prepare_trainable
from lifelong.families.classifier import METHODS, build_classifier
from lifelong.learn import build_method
from lifelong.learn.driver import build_model, load_run_config
from lifelong.learn.ewc import diagonal_fisher
from lifelong.loop import compute_stem_features, run_stream

TINY_MLP = ["model.family=classifier", "model.name=mlp", "model.resolution=8", "model.hidden_sizes=[16]"]
# Class-incremental, three tasks of two digit classes each: real data that every install has.
TINY_CLASS_STREAM = {"name": "digits-ci", "scenario": "class", "seed": 0, "tasks": [
    {"source": "digits", "train_items": 40, "test_items": 20, "options": {"classes": [c, c + 1]}} for c in (0, 2, 4)]}


@pytest.fixture(scope="module")
def class_stream():
    from lifelong.data.streams import build_stream

    return build_stream(TINY_CLASS_STREAM)


def config(*overrides):
    return load_run_config(None, [*TINY_MLP, "train.steps_per_task=6", "train.batch_size=8", "train.lr=1e-2",
                              "train.checkpoints=false", *overrides])


def tiny_mlp():
    return build_classifier(ModelConfig(family="classifier", name="mlp", resolution=8, hidden_sizes=(16,)))


def test_stem_is_the_preprocessed_pixels_and_features_come_from_the_backbone():
    model = tiny_mlp()
    images = np.random.default_rng(0).integers(0, 256, (5, 12, 12, 3), dtype=np.uint8)
    stem = model.encode_stem(images)
    assert stem.shape == (5, 64)  # luminance at 8 x 8, flattened
    gray = torch.from_numpy(images).float().mean(-1)[:, None]  # (5, 1, 12, 12)
    expected = (torch.nn.functional.interpolate(gray, size=(8, 8), mode="bilinear", align_corners=False) - 127) / 128
    torch.testing.assert_close(stem, expected.flatten(1))
    assert model.features(stem).shape == (5, 16)


def test_logits_are_features_times_head_rows_plus_bias():
    model = tiny_mlp()
    x = torch.randn(4, 64)
    rows = model.class_embeddings(("a", "b", "c"))  # (3, 17): weights then bias
    expected = torch.nn.functional.linear(model.features(x), rows[:, :-1], rows[:, -1])
    torch.testing.assert_close(model.logits(x, rows), expected)
    torch.testing.assert_close(model(x, ("a", "b", "c")), expected)
    torch.testing.assert_close(model(x, rows), expected)
    # image embeddings are the normalised [f, 1]: a head row ranks them as the logits do
    emb = model.image_embeddings(x)
    assert emb.shape == (4, 17)
    assert torch.equal((emb @ rows.T).argmax(1), expected.argmax(1))


def test_head_grows_with_new_names_and_rows_are_seeded_by_their_index():
    model = tiny_mlp()
    first = model.class_embeddings(("cat", "dog")).detach().clone()
    assert model.head.shape == (2, 17)
    both = model.class_embeddings(("dog", "cow", "cat"))
    assert model.head.shape == (3, 17) and model.class_names == ["cat", "dog", "cow"]
    torch.testing.assert_close(both[0], first[1])  # known rows unchanged, in the order asked
    other = tiny_mlp()
    other.add_classes(("x", "y", "z"))
    assert torch.equal(other.head, model.head)  # same row index, same initial row, whatever its name
    assert torch.equal(tiny_mlp().backbone.layers[0].weight, model.backbone.layers[0].weight)


def test_growth_keeps_trainability_and_classes_outside_a_batch_get_no_gradient():
    model = tiny_mlp()
    model.add_classes(("a", "b"))
    model.default_trainable()
    model.add_classes(("c",))
    assert model.head.requires_grad
    model(torch.randn(3, 64), ("a", "c")).sum().backward()
    assert model.head.grad[1].abs().sum() == 0 and model.head.grad[0].abs().sum() > 0


def test_only_the_head_trains_on_the_frozen_efficientnet():
    model = build_classifier(ModelConfig(family="classifier", name="tiny-efficientnet-lite0", resolution=32))
    model.add_classes(("a", "b"))
    model.default_trainable()
    stem = model.encode_stem(np.zeros((2, 28, 28, 3), dtype=np.uint8))
    assert stem.shape == (2, 1280)
    assert [n for n, p in model.named_parameters() if p.requires_grad] == ["head"]
    assert model.stem_fingerprint() != tiny_mlp().stem_fingerprint()
    with pytest.raises(ConfigError, match="no trainable layer"):
        model.add_lora(AdapterConfig(kind="lora"))


def test_lora_adapts_the_backbone_and_the_head_still_trains():
    model = tiny_mlp()
    model.add_classes(("a", "b"))
    model.add_lora(AdapterConfig(kind="lora", rank=2, alpha=4))
    trainable = sorted(n for n, p in model.named_parameters() if p.requires_grad)
    assert "head" in trainable and all("lora_" in n for n in trainable if n != "head")
    with pytest.raises(ConfigError, match="not linear layers"):
        tiny_mlp().add_lora(AdapterConfig(kind="lora", target_modules=("nope",)))


def test_ewc_fisher_reaches_the_head_through_the_class_rows():
    model = tiny_mlp()
    model.add_classes(("a", "b", "c"))
    model.default_trainable()
    x, y = torch.randn(6, 64), torch.tensor([0, 1, 0, 1, 0, 1])
    fisher = diagonal_fisher(model, x, y, ("a", "b"), mode="empirical")
    assert fisher["head"][:2].sum() > 0 and fisher["head"][2].sum() == 0  # class c is not in the label space
    assert fisher["backbone.layers.0.weight"].sum() > 0


@pytest.mark.parametrize("name", METHODS)
def test_every_supported_method_learns_a_class_incremental_stream(name, class_stream):
    cfg = config(f"methods=[{name}]")
    model = build_model(cfg.model, class_stream)
    stem = compute_stem_features(model, class_stream, 64)
    prepare_trainable(model, cfg.model, cfg.adapter)
    stem_before = copy.deepcopy(model.stem.state_dict())
    head_before = model.head.detach().clone()
    method = build_method(cfg.methods[0] if name != "icarl" else MethodConfig(name="icarl", params={"memory_size": 12}))
    result = run_stream(model, method, class_stream, stem, cfg, checkpoint_dir=None)
    assert result.accuracy_matrix.shape == (4, 3)
    assert not torch.equal(model.head, head_before)
    assert all(torch.equal(v, model.stem.state_dict()[k]) for k, v in stem_before.items())
    # every task is learned when it is trained (well above chance among the classes seen so far)
    for t in range(3):
        assert result.accuracy_matrix[t + 1, t] > 100 / (2 * (t + 1)) + 10, (name, result.accuracy_matrix)


def test_config_checks_name_the_family_knobs_and_methods():
    with pytest.raises(ConfigError, match="model.family='lm' does not learn tasks .* learning families: vlm, classifier"):
        load_run_config(None, ["model.family=lm"])
    with pytest.raises(ConfigError, match="model.family='cnn' is not a model family; valid: vlm, classifier, lm"):
        load_run_config(None, ["model.family=cnn"])
    with pytest.raises(ConfigError, match="valid for family classifier: mlp, efficientnet-lite0"):
        load_run_config(None, ["model.family=classifier"])  # name left at the vlm default, embedded
    with pytest.raises(ConfigError, match="hidden_sizes applies to model.family=classifier"):
        load_run_config(None, ["model.hidden_sizes=[8]"])
    with pytest.raises(ConfigError, match="mlp classifier only"):
        load_run_config(None, ["model.family=classifier", "model.name=efficientnet-lite0", "model.hidden_sizes=[8]"])
    with pytest.raises(ConfigError, match="trainable_blocks applies to model.family=vlm only"):
        load_run_config(None, [*TINY_MLP, "model.trainable_blocks=1"])
    with pytest.raises(ConfigError, match="'zscl' does not run on model.family=classifier"):
        load_run_config(None, [*TINY_MLP, "methods=[finetune, zscl]"])
    with pytest.raises(ConfigError, match="positive widths"):
        load_run_config(None, [*TINY_MLP, "model.hidden_sizes=[0]"])
    assert load_run_config(None, [*TINY_MLP, "model.hidden_sizes=[]"]).model.hidden_sizes == ()


def test_run_experiment_dispatches_on_the_family(tmp_path):
    from lifelong.learn.driver import run_experiment

    cfg = config("methods=[finetune, replay]", f"output_dir={tmp_path}", "name=clf")
    cfg = type(cfg)(**{**cfg.__dict__, "stream": TINY_CLASS_STREAM})
    out = run_experiment(cfg)
    import json

    results = json.loads((out / "results.json").read_text())
    assert set(results["methods"]) == {"finetune", "replay"}
    assert results["methods"]["replay"]["trainable_params"] == 64 * 16 + 16 + 6 * 17
