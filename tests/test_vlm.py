"""The vlm family: transformers CLIP models by local path (the hub code path, offline), the stem
cache, LoRA on either tower, and the embedded default's assets."""

import numpy as np
import pytest
import torch

from lifelong.config import AdapterConfig, ModelConfig
from lifelong.errors import ConfigError, DataNotFoundError
from lifelong.families.vlm import build_vlm, minilm_dir, tiny_clip_config


@pytest.fixture(scope="module")
def clip_dir(tmp_path_factory):
    """A tiny random CLIPModel saved with save_pretrained, as a user's local checkpoint would be."""
    from transformers import AutoTokenizer, CLIPImageProcessor, CLIPModel

    path = tmp_path_factory.mktemp("clip")
    torch.manual_seed(1)
    CLIPModel(tiny_clip_config()).save_pretrained(path)
    AutoTokenizer.from_pretrained(minilm_dir()).save_pretrained(path)
    CLIPImageProcessor(image_mean=[0.5, 0.5, 0.5], image_std=[0.25, 0.25, 0.25]).save_pretrained(path)
    return path


def images(n=6, size=28, seed=0):
    return np.random.default_rng(seed).integers(0, 256, (n, size, size, 3), dtype=np.uint8)


def test_clip_from_local_path_matches_transformers(clip_dir):
    from transformers import AutoTokenizer, CLIPModel

    model = build_vlm(ModelConfig(name=str(clip_dir), trainable_blocks=1))
    assert model.image_spec.mean == (127.5, 127.5, 127.5) and model.image_spec.resolution == 32
    ref = CLIPModel.from_pretrained(clip_dir).eval()
    tok = AutoTokenizer.from_pretrained(clip_dir)
    x = images()
    pixels = model.preprocess(x)
    with torch.no_grad():
        ours = model.logits(model.encode_stem(x), model.class_embeddings(["cat", "dog"]))
        t = tok(["a photo of a cat.", "a photo of a dog."], padding=True, return_tensors="pt")
        theirs = ref(input_ids=t["input_ids"], attention_mask=t["attention_mask"], pixel_values=pixels).logits_per_image
    torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-4)


def test_missing_clip_path_says_how_to_fix(tmp_path):
    with pytest.raises(DataNotFoundError, match="save_pretrained"):
        build_vlm(ModelConfig(name=str(tmp_path / "no-such-model")))


def test_trainable_blocks_out_of_range(tiny_clip):
    with pytest.raises(ConfigError, match="trainable_blocks must be in 1..3"):
        build_vlm(ModelConfig(name="tiny-clip", trainable_blocks=7))


def test_stem_plus_trunk_equals_the_whole_tower(tiny_model):
    """Splitting the tower for the cache must not change what it computes."""
    from efficientnet_lite_pytorch import EfficientNet

    net = EfficientNet.from_name("efficientnet-lite0", image_size=32).eval()
    # The whole network with the split model's weights, under the package's own names.
    split = len(tiny_model.image_stem.blocks)
    state = {}
    for prefix, module in (("stem", tiny_model.image_stem), ("trunk", tiny_model.image_trunk)):
        for k, v in module.state_dict().items():
            head, rest = k.split(".", 1)
            if head == "blocks":
                i, rest = rest.split(".", 1)
                state[f"_blocks.{int(i) + (split if prefix == 'trunk' else 0)}.{rest}"] = v
            else:
                state[f"_{head}.{rest}"] = v
    missing, unexpected = net.load_state_dict(state, strict=False)
    assert set(missing) == {"_fc.weight", "_fc.bias"} and not unexpected  # the classifier is not part of the tower
    x = images(4)
    pixels = tiny_model.preprocess(x)
    with torch.no_grad():
        whole = net.extract_features(pixels).mean(dim=(2, 3))
        split = tiny_model.image_trunk(tiny_model.encode_stem(x))
    torch.testing.assert_close(split, whole)


@pytest.mark.parametrize("tower", ["image", "text", "both"])
def test_lora_on_either_tower_trains_only_lora(tower, tiny_model, tiny_clip):
    for model in (tiny_model, tiny_clip):
        model.add_lora(AdapterConfig(kind="lora", rank=2, tower=tower))
        trainable = [n for n, p in model.named_parameters() if p.requires_grad]
        assert trainable and all("lora_" in n for n in trainable)
        assert any(n.startswith("image_trunk") for n in trainable) == (tower != "text")
        assert any(n.startswith("text_encoder") for n in trainable) == (tower != "image")
        logits = model(model.encode_stem(images(2)), ("cat", "dog"))
        logits.sum().backward()
        assert all(p.grad is not None for p in model.parameters() if p.requires_grad)


def test_lora_bad_target_lists_layer_names(tiny_model):
    with pytest.raises(ConfigError, match="match no layer"):
        tiny_model.add_lora(AdapterConfig(kind="lora", target_modules=("nonexistent",)))


def test_text_cache_used_only_while_text_tower_frozen(tiny_model):
    tiny_model.default_trainable(True)
    tiny_model.class_embeddings(("cat", "dog"))
    assert len(tiny_model._text_cache) == 2 * len(tiny_model.templates)
    tiny_model.add_lora(AdapterConfig(kind="lora", rank=2, tower="text"))
    assert not tiny_model._text_cache
    tiny_model.class_embeddings(("cat", "dog"))
    assert not tiny_model._text_cache  # a trainable text tower is never served from the cache


def test_stem_fingerprint_depends_on_weights_and_resolution(tiny_model):
    fp = tiny_model.stem_fingerprint()
    other = build_vlm(ModelConfig(name="tiny-embedded", resolution=64, trainable_blocks=2))
    assert other.stem_fingerprint() != fp
    with torch.no_grad():
        next(tiny_model.image_stem.parameters()).add_(1.0)
    assert tiny_model.stem_fingerprint() != fp


@pytest.mark.slow
def test_embedded_model_names_real_photos():
    """The real default: EfficientNet-Lite0 + MiniLM + fitted heads, zero-shot on scikit-image photos."""
    from skimage import data

    model = build_vlm(ModelConfig())
    photos = np.stack([np.asarray(__import__("PIL.Image").Image.fromarray(getattr(data, n)()).convert("RGB").resize((112, 112)))
                       for n in ("chelsea", "coffee", "rocket")])
    with torch.no_grad():
        logits = model(model.encode_stem(photos), ("cat", "cup of coffee", "rocket"))
    assert logits.argmax(-1).tolist() == [0, 1, 2]
