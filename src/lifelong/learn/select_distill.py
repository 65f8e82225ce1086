"""Select and Distill: Selective Dual-Teacher Knowledge Transfer for Continual Learning on
Vision-Language Models (Yu et al., ECCV 2024; arXiv:2403.09296; official code github.com/chu0802/SnD).

    L = CE + prev_weight * mean_i[s_i ||f(r_i) - f_prev(r_i)||^2] + pretrained_weight * mean_i[(1 - s_i) ||f(r_i) - f_0(r_i)||^2],
    s_i = sigmoid(scale * (||f_0(r_i) - f_prev(r_i)|| - threshold))

f, f_prev, f_0: the L2-normalised image embeddings of the model being trained, of the model at the
start of the task (the previous teacher) and of the initial model (the pretrained teacher), on a batch
of unlabeled reference images r_i from outside the stream. Where the two teachers disagree the image
carries knowledge learned on earlier tasks, so it is distilled from the previous model; where they
agree, from the pretrained one. Paper defaults: prev_weight 9, pretrained_weight 0.5, scale 6,
threshold 0.2. Only the image encoder trains: `prepare` freezes the text side (text projection, any
text LoRA). On the first task f_prev = f_0.

The teachers are frozen and the reference images fixed, so f_0 of every reference image is computed
once at `prepare`, f_prev once at `begin_task`, and each step indexes them (`cache_teacher: true`);
s follows from the two caches. With `cache_teacher: false` both teachers (frozen copies) encode each
step's reference images from raw pixels through the whole image tower, stem included, as the official
code does. Both compute the same losses (tested to 1e-5); benchmarks/cached_teachers.py times them.

Deviations from the paper and its code:
- Reference images: `reference_images` (1000) seeded crops of real photographs
  (lifelong.data.reference), not 100k ImageNet training images; batches of 64 as in the official config.
  `reference_set: photos+openclipart`: half of them openclipart drawings from folders no task uses.
- The distillation terms are per-sample means of s_i d_i, as the paper writes them. The official code
  multiplies a (B, 1) score column by a (B,) distance row, so its mean is mean(s) * mean(d).
- Reference batches come from a generator seeded with (a seed drawn from torch's global RNG at
  prepare, the task, the step), as in learn/zscl.py: the loss depends on the method's state alone.
- Label smoothing 0 (the official config); the paper's optimiser (AdamW, lr 1e-5, weight decay 5e-4,
  cosine, 1000 iterations, batch 32) is the run config's `train` section, not a method knob.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from lifelong.errors import ConfigError
from lifelong.learn.common import Batch, TaskData, classification_loss
from lifelong.learn.zscl import (
    ReferenceImages,
    batch_generator,
    check_reference_set,
    check_reference_sizes,
    draw_seed,
    embed_images,
    embed_pixels,
    frozen_copy,
    load_reference_images,
    prefixed,
)


@dataclass(frozen=True)
class Params:
    prev_weight: float = 9.0  # on the previous teacher's term (official ratio_prev)
    pretrained_weight: float = 0.5  # on the pretrained teacher's term (official ratio_pretrained)
    scale: float = 6.0
    threshold: float = 0.2
    label_smoothing: float = 0.0
    reference_images: int = 1000  # paper: 100k ImageNet training images
    reference_batch_size: int = 64
    reference_seed: int = 0
    reference_set: str = "photos"  # or "photos+openclipart" (lifelong.data.reference)
    cache_teacher: bool = True

    def __post_init__(self) -> None:
        check_reference_set("select_distill", self.reference_set)
        if self.prev_weight < 0 or self.pretrained_weight < 0:
            raise ConfigError(f"select_distill prev_weight and pretrained_weight must be >= 0, got {self.prev_weight} "
                              f"and {self.pretrained_weight} (paper: 9 and 0.5)")
        if self.scale <= 0:
            raise ConfigError(f"select_distill scale must be positive, got {self.scale} (paper: 6)")
        if self.threshold < 0:
            raise ConfigError(f"select_distill threshold must be >= 0 (a distance between unit vectors, 0..2), "
                              f"got {self.threshold} (paper: 0.2)")
        if not 0.0 <= self.label_smoothing < 1.0:
            raise ConfigError(f"select_distill label_smoothing must be in [0, 1), got {self.label_smoothing}")
        check_reference_sizes("select_distill", self.reference_images, self.reference_batch_size)


def selection_scores(pretrained: torch.Tensor, previous: torch.Tensor, scale: float, threshold: float) -> torch.Tensor:
    """s_i = sigmoid(scale * (||f_0(r_i) - f_prev(r_i)|| - threshold)), (N, D) x 2 -> (N,): near 1 where the
    teachers disagree (distil from the previous model), near 0 where they agree (from the pretrained one)."""
    return torch.sigmoid(scale * ((pretrained - previous).norm(dim=-1) - threshold))


class SelectAndDistill:
    Params = Params
    adapter_kinds = ("none", "lora")

    def __init__(self, params: Params):
        self.params = params
        self.trainable_prefixes = ("image_trunk.", "image_projection.")
        # f_0 and f_prev of every reference image (cache_teacher), or the teachers' trainable weights.
        self.pretrained_features: torch.Tensor | None = None  # (N_ref, D)
        self.previous_features: torch.Tensor | None = None  # (N_ref, D)
        self.initial: dict[str, torch.Tensor] = {}
        self.previous: dict[str, torch.Tensor] = {}
        self.seed = 0  # of the reference batches, drawn at prepare
        self.step = 0
        # Rebuilt from the model on first use, never checkpointed.
        self._reference: ReferenceImages | None = None
        self._teachers = None  # (pretrained, previous) frozen copies when not cache_teacher

    def prepare(self, model) -> None:
        # The text side stays as pretrained: the class embeddings are the frozen classifier.
        model.text_projection.requires_grad_(False)
        model.text_encoder.requires_grad_(False)
        if not any(w.requires_grad for w in model.parameters()):
            raise ConfigError("select_distill trains the image encoder only and freezes the text side, so nothing "
                              "would train: with LoRA set adapter.tower=image (or both)")
        self.seed = draw_seed()
        reference = self._references(model)
        if self.params.cache_teacher:
            self.pretrained_features = embed_images(model, reference.inputs)
        else:
            self.initial = model.trainable_state()

    def begin_task(self, model, data: TaskData) -> None:
        self.step = 0
        if self.params.cache_teacher:
            self.previous_features = embed_images(model, self._references(model).inputs)
        else:
            self.previous, self._teachers = model.trainable_state(), None

    def loss(self, model, batch: Batch, data: TaskData) -> tuple[torch.Tensor, dict[str, float]]:
        p = self.params
        generator = batch_generator(self.seed, data.index, self.step)
        self.step += 1
        ce = classification_loss(model, batch, data, p.label_smoothing)
        reference = self._references(model)
        index = torch.randperm(len(reference.inputs), generator=generator)[: p.reference_batch_size]
        features = model.image_embeddings(reference.inputs[index])  # (B, D)
        pretrained, previous = self._teacher_features(model, reference, index)
        s = selection_scores(pretrained, previous, p.scale, p.threshold)  # (B,)
        prev_kd = (s * (features - previous).pow(2).sum(-1)).mean()
        pretrained_kd = ((1 - s) * (features - pretrained).pow(2).sum(-1)).mean()
        loss = ce + p.prev_weight * prev_kd + p.pretrained_weight * pretrained_kd
        return loss, {"ce": ce.item(), "prev_kd": prev_kd.item(), "pretrained_kd": pretrained_kd.item(),
                      "selected": s.mean().item()}

    def end_task(self, model, data: TaskData) -> None:
        self._teachers = None

    def state_dict(self) -> dict[str, torch.Tensor]:
        state = {"step": torch.tensor(self.step), "seed": torch.tensor(self.seed)}
        if self.pretrained_features is not None:
            state["pretrained_features"] = self.pretrained_features
        if self.previous_features is not None:
            state["previous_features"] = self.previous_features
        for prefix, tensors in (("initial", self.initial), ("previous", self.previous)):
            state.update({f"{prefix}.{k}": v for k, v in tensors.items()})
        return state

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        self.step, self.seed = int(state["step"]), int(state["seed"])
        self.pretrained_features = state.get("pretrained_features")
        self.previous_features = state.get("previous_features")
        self.initial, self.previous = prefixed(state, "initial"), prefixed(state, "previous")
        self._teachers = None

    # -- helpers ------------------------------------------------------------------------------
    def _references(self, model) -> ReferenceImages:
        if self._reference is None:
            self._reference = load_reference_images(model, self.params.reference_images, self.params.reference_seed,
                                                    self.params.reference_set)
        return self._reference

    def _teacher_features(self, model, reference: ReferenceImages, index: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(f_0, f_prev) of the reference images `index`, each (B, D)."""
        if self.params.cache_teacher:
            if self.pretrained_features is None or self.previous_features is None:
                raise RuntimeError("select_distill: the teachers' features are missing: call prepare and begin_task first")
            return self.pretrained_features[index], self.previous_features[index]
        if self._teachers is None:
            self._teachers = (frozen_copy(model, self.initial), frozen_copy(model, self.previous))
        pixels = reference.pixels[index.numpy()]
        return embed_pixels(self._teachers[0], pixels), embed_pixels(self._teachers[1], pixels)
