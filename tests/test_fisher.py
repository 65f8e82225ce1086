"""The closed-form per-layer Fisher (learn/fisher.py) equals the torch.func vmap one, which
tests/test_behaviour.py checks against a per-sample loop: on every layer kind the models train
(pointwise, depthwise and strided convolutions, BatchNorm, Linear with and without a sequence axis,
LayerNorm, peft LoRA factors, a classifier's head rows)."""

import pytest
import torch
from test_methods import MODES, force_nonzero_lora, task_data

from lifelong.families import prepare_trainable
from lifelong.learn.fisher import closed_form_layers, diagonal_fisher


def assert_same_fisher(model, x, y, class_names, mode):
    fast = diagonal_fisher(model, x, y, class_names, mode, chunk=3, method="closed_form")
    reference = diagonal_fisher(model, x, y, class_names, mode, chunk=3, method="vmap")
    assert fast.keys() == reference.keys()
    # atol scaled to the largest Fisher entry of the model (1e-10 was absolute: with 2 threads one entry of
    # about 3e-7 rounded 1.8e-10 apart)
    scale = max(float(r.abs().max()) for r in reference.values())
    for n in reference:
        torch.testing.assert_close(fast[n], reference[n], rtol=1e-4, atol=1e-6 * scale)
    assert all(float(f.sum()) > 0 for f in fast.values())  # every trainable parameter gets a Fisher


@pytest.mark.parametrize("mode", ["exact", "empirical"])
@pytest.mark.parametrize("adapter", ["full", "lora"])
def test_closed_form_fisher_matches_vmap_on_the_embedded_model(tiny_model, tiny_stream, tiny_stem, tiny_config, mode, adapter):
    prepare_trainable(tiny_model, tiny_config.model, MODES[adapter])
    if adapter == "lora":
        force_nonzero_lora(tiny_model)
    data = task_data(tiny_stream, tiny_stem, 0)
    image = [n for n, p in tiny_model.named_parameters() if p.requires_grad and not n.startswith(tiny_model.class_side_prefixes)]
    assert closed_form_layers(tiny_model, image) is not None  # the fast path covers it
    assert_same_fisher(tiny_model, data.inputs[:5], data.targets[:5], data.class_names, mode)


def test_closed_form_fisher_matches_vmap_on_a_clip_trunk(tiny_clip, tiny_config):
    tiny_clip.default_trainable(train_text_projection=True)
    pixels = torch.randn(4, 3, tiny_clip.image_spec.resolution, tiny_clip.image_spec.resolution)
    with torch.no_grad():
        x = tiny_clip.image_stem(pixels)
    names = ("cat", "dog", "bird")
    assert_same_fisher(tiny_clip, x, torch.tensor([0, 2, 1, 0]), names, "exact")


def test_layers_without_a_closed_form_fall_back_to_vmap(tiny_model, tiny_stream, tiny_stem, tiny_config):
    prepare_trainable(tiny_model, tiny_config.model, MODES["full"])
    extra = torch.nn.Parameter(torch.zeros(()))
    tiny_model.image_trunk.register_parameter("free_scalar", extra)  # a parameter outside any layer kind
    image = [n for n, p in tiny_model.named_parameters() if p.requires_grad and not n.startswith(tiny_model.class_side_prefixes)]
    assert closed_form_layers(tiny_model, image) is None
    with pytest.raises(ValueError, match="vmap"):
        data = task_data(tiny_stream, tiny_stem, 0)
        diagonal_fisher(tiny_model, data.inputs[:2], data.targets[:2], data.class_names, method="closed_form")


@pytest.mark.parametrize("frozen_backbone", [False, True])
@pytest.mark.parametrize("mode", ["exact", "empirical"])
def test_closed_form_fisher_matches_vmap_on_a_two_class_mlp(mode, frozen_backbone):
    """The peer benchmark's cases: Linear layers without a sequence axis, 2 classes per task, the
    class side a classifier's head rows; and a frozen backbone, where only the head trains."""
    from test_classifier import tiny_mlp

    model = tiny_mlp()
    model.add_classes(("a", "b", "c"))
    model.default_trainable()
    if frozen_backbone:  # only the head trains (the peer benchmark's frozen feature extractor)
        model.backbone.requires_grad_(False)
    x, y = torch.randn(7, 64), torch.tensor([0, 1, 0, 1, 1, 0, 1])
    assert_same_fisher(model, x, y, ("a", "b"), mode)
