"""Export in the towers' native formats and loading it back: same logits, same content hash, LoRA merged."""

import copy
import json

import numpy as np
import pytest
import torch
from safetensors import safe_open

from lifelong.config import AdapterConfig, ModelConfig
from lifelong.errors import ConfigError, DataFormatError
from lifelong.families.vlm import build_vlm, export_native, merge_lora, model_fingerprint

CLASSES = ["cat", "dog", "a red car"]


def images(n=6, size=32, seed=0):
    return np.random.default_rng(seed).integers(0, 256, (n, size, size, 3), dtype=np.uint8)


@torch.no_grad()
def logits(model, x):
    return model.logits(model.encode_stem(x), model.class_embeddings(CLASSES))


@torch.no_grad()
def perturb(*modules, seed=0):
    """Stand-in for fine-tuning: noise on every parameter of the given modules."""
    g = torch.Generator().manual_seed(seed)
    for module in modules:
        for p in module.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g))


def safetensors_keys(folder):
    keys = []
    for path in folder.rglob("*.safetensors"):
        with safe_open(str(path), framework="pt") as f:
            keys += list(f.keys())
    return keys


def test_embedded_export_round_trip(tiny_model, tmp_path):
    from efficientnet_lite_pytorch import EfficientNet
    from safetensors.torch import load_file

    base_fingerprint = model_fingerprint(tiny_model)
    perturb(tiny_model.image_trunk, tiny_model.image_projection, tiny_model.text_projection)
    out = export_native(tiny_model, tmp_path / "export")

    loaded = build_vlm(ModelConfig(name=str(out), resolution=32, trainable_blocks=2))
    x = images()
    assert torch.equal(logits(loaded, x), logits(tiny_model, x))
    assert model_fingerprint(loaded) == model_fingerprint(tiny_model) != base_fingerprint
    assert loaded.templates == tiny_model.templates and float(loaded.logit_scale) == float(tiny_model.logit_scale)
    manifest = json.loads((out / "lifelong_model.json").read_text())
    assert manifest["kind"] == "embedded" and manifest["tiny"] is True and manifest["resolution"] == 32
    # The image tower loads into the package's own network, before the 1x1-conv swap as after it.
    net = EfficientNet.from_name("efficientnet-lite0", image_size=32)
    net.load_state_dict(load_file(out / "image_tower.safetensors"))
    # Another split of the same export builds too.
    assert len(build_vlm(ModelConfig(name=str(out), resolution=32, trainable_blocks=5)).image_trunk.blocks) == 5


def test_clip_export_round_trip(tiny_clip, tmp_path):
    from transformers import CLIPModel

    base_fingerprint = model_fingerprint(tiny_clip)
    perturb(tiny_clip.image_trunk, tiny_clip.image_projection)
    out = export_native(tiny_clip, tmp_path / "export")

    loaded = build_vlm(ModelConfig(name=str(out), trainable_blocks=1))
    x = images()
    assert torch.equal(logits(loaded, x), logits(tiny_clip, x))
    assert model_fingerprint(loaded) == model_fingerprint(tiny_clip) != base_fingerprint
    assert loaded.image_spec == tiny_clip.image_spec
    clip = CLIPModel.from_pretrained(out)
    assert torch.equal(clip.visual_projection.weight, tiny_clip.image_projection.weight.detach())
    assert float(clip.logit_scale.detach().exp()) == float(tiny_clip.logit_scale)


@pytest.mark.parametrize("fixture", ["tiny_model", "tiny_clip"])
def test_lora_model_exports_merged(fixture, request, tmp_path):
    model = request.getfixturevalue(fixture)
    x = images()
    base = logits(model, x)
    model.add_lora(AdapterConfig(kind="lora", rank=4, alpha=8, tower="both"))
    torch.manual_seed(0)
    with torch.no_grad():  # lora_B starts at zero: make the adapter change the outputs
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.02)
    before = logits(model, x)
    assert not torch.allclose(before, base, atol=1e-4)
    lora_names = [n for n, _ in model.named_parameters() if "lora_" in n]

    out = export_native(model, tmp_path / "export")

    config = ModelConfig(name=str(out), resolution=32, trainable_blocks=2 if fixture == "tiny_model" else 1)
    loaded = build_vlm(config)
    torch.testing.assert_close(logits(loaded, x), before, rtol=0, atol=1e-5)
    assert not [k for k in safetensors_keys(out) if "lora" in k]
    assert not [n for n in loaded.state_dict() if "lora" in n]
    # The LoRA model itself is untouched.
    assert [n for n, _ in model.named_parameters() if "lora_" in n] == lora_names
    assert torch.equal(logits(model, x), before)


def test_merge_lora_reaches_the_native_objects(tiny_model):
    from peft.tuners.tuners_utils import BaseTunerLayer

    tiny_model.add_lora(AdapterConfig(kind="lora", rank=4, alpha=8, tower="both"))
    merge_lora(tiny_model)
    for native in (tiny_model.native["net"], tiny_model.native["bert"], tiny_model):
        assert not any(isinstance(m, BaseTunerLayer) for m in native.modules())


def test_deepcopy_keeps_native_sharing_the_copied_modules(tiny_model):
    original_net = tiny_model.native["net"]
    copied = copy.deepcopy(tiny_model)
    net = copied.native["net"]
    assert net is not original_net and copied.native["bert"] is copied.text_encoder.bert
    assert net._blocks[-1] is copied.image_trunk.blocks[-1] and net._conv_head is copied.image_trunk.conv_head
    weight = copied.image_trunk.conv_head.weight
    before = original_net._conv_head.weight.detach().clone()
    with torch.no_grad():
        weight.add_(1.0)
    assert torch.equal(net._conv_head.weight, weight)
    assert torch.equal(original_net._conv_head.weight, before)
    # Not registered twice: the native objects add no state_dict entries.
    assert tiny_model.state_dict().keys() == copied.state_dict().keys()
    assert not any(k.startswith("native") for k in copied.state_dict())


def test_model_fingerprint_is_stable_across_builds():
    config = ModelConfig(name="tiny-embedded", resolution=32, trainable_blocks=2)
    assert model_fingerprint(build_vlm(config)) == model_fingerprint(build_vlm(config))


def test_export_refuses_a_non_empty_folder_and_a_foreign_manifest(tiny_model, tmp_path):
    manifest = {"family": "vlm", "kind": "embedded", "format_version": 99}
    (tmp_path / "lifelong_model.json").write_text(json.dumps(manifest))
    with pytest.raises(DataFormatError, match="format_version"):
        build_vlm(ModelConfig(name=str(tmp_path)))
    with pytest.raises(ConfigError, match="not an empty folder"):
        export_native(tiny_model, tmp_path)
