"""ZSCL: Preventing Zero-Shot Transfer Degradation in Continual Learning of Vision-Language Models
(Zheng et al., ICCV 2023; arXiv:2303.06628; official code github.com/Thunderbeee/ZSCL).

    L = CE_ls(task logits, y) + reg_weight * (KD(Z, Z_0) + KD(Z^T, Z_0^T)) + l2_weight * ||theta - theta_start||^2

Z = logit_scale * f(r) g(c)^T (B_img, B_txt) scores a batch of reference images r against a batch of
reference texts c, both from outside the stream; Z_0 is the same from the frozen initial model (the
model at `prepare`); KD(s, t) = T^2 KL(softmax(t / T) || softmax(s / T)) per row, T = 2. Rows of Z are
each image's distribution over the texts (the image loss), rows of Z^T each text's distribution over
the images (the text loss). theta_start: the weights at the start of the task. Weight ensemble (the
official `merge_we`): theta_we starts as a copy of theta_start (n = 1) and every `ensemble_every` steps
(paper I = 100) the weights join the running mean theta_we <- (n theta_we + theta) / (n + 1); the task
ends with the model set to theta_we, so theta_start is one of the averaged weights.

The teacher never changes and the reference data are fixed, so its embeddings of every reference image
and text are computed once, at `prepare`, and each step indexes them (`cache_teacher: true`). With
`cache_teacher: false` a frozen copy of the initial model runs every step, as in the official code: it
encodes the step's reference images from raw pixels through its whole image tower (stem included) and
the step's texts through its text encoder. Both compute the same losses (tested to 1e-5; bit-identical
over the benchmark's steps on the embedded model); benchmarks/cached_teachers.py times them.

Deviations from the paper and its code:
- Reference data: `reference_images` (1000) seeded crops of real photographs and 1000 caption-like
  ImageNet class descriptions (lifelong.data.reference), not ImageNet training images and Conceptual
  Captions: neither installs offline. `reference_set: photos+openclipart` makes half the images drawings
  from Debian's openclipart-png (folders no openclipart task uses) and adds their captions to the texts
  the `reference_texts` sentences are drawn from: more diverse, still far from ImageNet's 1.2M images.
- Each step samples `reference_texts_per_step` (64) of the `reference_texts` (1000) sentences; the
  official code scores its whole caption list every step.
- Z uses the student's own embeddings of the reference texts, so the distillation reaches the text side
  too (text projection, text LoRA). The official mtil code scores the student's image embeddings
  against the *teacher's* text embeddings in both terms; there the text side gets no KD gradient.
- KD is a KL divergence (learn.common.distillation_loss); the official code takes the cross-entropy
  against the soft targets, larger by the teacher's entropy: the same gradients, a different logged value.
- Reference batches come from a generator seeded with (a seed the method draws from torch's global RNG
  at prepare, the task, the step), not from the global RNG itself: the loss is then a function of the
  method's state alone, so the state round-trips and a resumed task draws the same batches.
- Ensemble schedule: theta_start and the weights after steps 1, 1 + I, 1 + 2I, ... and after the last
  step are averaged (1000 steps, I = 100: 12 weights); the official loop (iterations 0..1000, sampling
  after the update when iteration % I == 0) averages theta_start and the weights after steps 1, 101, ...,
  1001, one step more. With LoRA the factors A and B are averaged separately (the mean of the products
  B A is not the product of the means).
- The L2 term and the ensemble cover the trainable parameters (the frozen ones never move). The L2 term
  is a sum of squares, as in the official code, but off by default (l2_weight 0): the official script
  adds it with weight 1 (`--l2 1`, for ViT-B/16 at lr 1e-5), the paper presents ZSCL as distillation
  plus weight ensemble, and a sum over all trainable parameters does not carry over to other model
  sizes and learning rates (at lr 1e-3 on the tiny test model it outweighs the task loss within a step).

The helpers below (the reference set, teacher copies, per-step batch generators) are shared with
learn/select_distill.py.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import numpy as np
import torch

from lifelong.data.reference import REFERENCE_SETS, reference_images, reference_texts
from lifelong.errors import ConfigError
from lifelong.learn.common import Batch, TaskData, classification_loss, distillation_loss
from lifelong.loop import stem_outputs


@dataclass(frozen=True)
class Params:
    label_smoothing: float = 0.2
    temperature: float = 2.0
    reg_weight: float = 1.0  # weight of KD_img + KD_txt (the paper: 1 each)
    l2_weight: float = 0.0  # sum of squares to the task-start weights (official script: --l2 1; see above)
    ensemble_every: int = 100  # I; 0 turns the weight ensemble off
    reference_images: int = 1000  # paper: ImageNet training images
    reference_batch_size: int = 64  # paper: 64 (the training batch size)
    reference_texts: int = 1000  # a seeded subset of the 1000 sentences when fewer; paper: Conceptual Captions
    reference_texts_per_step: int = 64  # the official code scores all its captions every step
    reference_seed: int = 0
    reference_set: str = "photos"  # or "photos+openclipart" (lifelong.data.reference)
    cache_teacher: bool = True

    def __post_init__(self) -> None:
        check_reference_set("zscl", self.reference_set)
        if not 0.0 <= self.label_smoothing < 1.0:
            raise ConfigError(f"zscl label_smoothing must be in [0, 1), got {self.label_smoothing} (paper: 0.2)")
        if self.temperature <= 0:
            raise ConfigError(f"zscl temperature must be positive, got {self.temperature} (paper: 2)")
        if self.reg_weight < 0 or self.l2_weight < 0:
            raise ConfigError(f"zscl reg_weight and l2_weight must be >= 0, got {self.reg_weight} and {self.l2_weight}")
        if self.ensemble_every < 0:
            raise ConfigError(f"zscl ensemble_every must be >= 0 (0 = no weight ensemble), got {self.ensemble_every} "
                              "(paper: 100)")
        check_reference_sizes("zscl", self.reference_images, self.reference_batch_size)
        if not 1 <= self.reference_texts_per_step <= self.reference_texts:
            raise ConfigError(f"zscl reference_texts_per_step must be in 1..reference_texts ({self.reference_texts}), "
                              f"got {self.reference_texts_per_step}: lower it or raise reference_texts")


class ZSCL:
    Params = Params
    adapter_kinds = ("none", "lora")

    def __init__(self, params: Params):
        self.params = params
        # The teacher (the model at prepare): its embeddings of every reference image and text
        # (cache_teacher), or its trainable weights, from which a frozen copy is rebuilt.
        self.teacher_image: torch.Tensor | None = None  # (N_ref, D)
        self.teacher_text: torch.Tensor | None = None  # (N_text, D)
        self.initial: dict[str, torch.Tensor] = {}
        self.seed = 0  # of the reference batches, drawn at prepare
        # The current task.
        self.step = 0  # loss calls so far = optimizer steps taken
        self.anchor: dict[str, torch.Tensor] = {}  # theta_start, for the L2 term
        self.ensemble: dict[str, torch.Tensor] = {}  # theta_we
        self.ensemble_count = 0
        # Rebuilt from the model on first use, never checkpointed: the seeded reference set and the
        # per-step teacher.
        self._reference: ReferenceImages | None = None
        self._reference_texts: tuple[str, ...] | None = None
        self._teacher = None

    def prepare(self, model) -> None:
        self.seed = draw_seed()
        reference, texts = self._references(model), self._texts()
        if self.params.cache_teacher:
            self.teacher_image = embed_images(model, reference.inputs)
            self.teacher_text = embed_texts(model, texts)
        else:
            self.initial = model.trainable_state()

    def begin_task(self, model, data: TaskData) -> None:
        self.step = 0
        self.anchor = model.trainable_state() if self.params.l2_weight > 0 else {}
        # merge_we's we_model: a copy of the task-start model, the first of the averaged weights
        self.ensemble = model.trainable_state() if self.params.ensemble_every else {}
        self.ensemble_count = 1 if self.params.ensemble_every else 0

    def loss(self, model, batch: Batch, data: TaskData) -> tuple[torch.Tensor, dict[str, float]]:
        p = self.params
        # The weights after `step` optimizer steps: a sample of the ensemble after steps 1, 1 + I, ...
        if p.ensemble_every and self.step >= 1 and (self.step - 1) % p.ensemble_every == 0:
            self._add_to_ensemble(model)
        generator = batch_generator(self.seed, data.index, self.step)
        self.step += 1

        ce = classification_loss(model, batch, data, p.label_smoothing)
        reference, all_texts = self._references(model), self._texts()
        image_index = torch.randperm(len(reference.inputs), generator=generator)[: p.reference_batch_size]
        text_index = torch.randperm(len(all_texts), generator=generator)[: p.reference_texts_per_step]
        texts = [all_texts[i] for i in text_index.tolist()]
        teacher_image, teacher_text = self._teacher_embeddings(model, reference, image_index, text_index, texts)
        teacher_logits = model.logit_scale * teacher_image @ teacher_text.T  # (B_img, B_txt)
        student_image = model.image_embeddings(reference.inputs[image_index])  # (B_img, D)
        student_logits = model.logit_scale * student_image @ model.text_embeddings(texts).T  # (B_img, B_txt)
        kd_image = distillation_loss(student_logits, teacher_logits, p.temperature)  # each image over the texts
        kd_text = distillation_loss(student_logits.T, teacher_logits.T, p.temperature)  # each text over the images
        loss = ce + p.reg_weight * (kd_image + kd_text)
        logs = {"ce": ce.item(), "kd_image": kd_image.item(), "kd_text": kd_text.item()}
        if self.anchor:
            l2 = sum((w - self.anchor[n]).pow(2).sum() for n, w in model.named_parameters() if n in self.anchor)
            loss = loss + p.l2_weight * l2
            logs["l2"] = l2.item()
        return loss, logs

    @torch.no_grad()
    def end_task(self, model, data: TaskData) -> None:
        if self.params.ensemble_every:
            self._add_to_ensemble(model)  # the last step's weights: no loss call sees them
            for name, w in model.named_parameters():
                if name in self.ensemble:
                    w.copy_(self.ensemble[name])
        self.anchor, self.ensemble, self.ensemble_count = {}, {}, 0

    def state_dict(self) -> dict[str, torch.Tensor]:
        state = {"step": torch.tensor(self.step), "seed": torch.tensor(self.seed),
                 "ensemble_count": torch.tensor(self.ensemble_count)}
        if self.teacher_image is not None:
            state.update(teacher_image=self.teacher_image, teacher_text=self.teacher_text)
        for prefix, tensors in (("initial", self.initial), ("anchor", self.anchor), ("ensemble", self.ensemble)):
            state.update({f"{prefix}.{k}": v for k, v in tensors.items()})
        return state

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        self.step, self.seed = int(state["step"]), int(state["seed"])
        self.ensemble_count = int(state["ensemble_count"])
        self.teacher_image, self.teacher_text = state.get("teacher_image"), state.get("teacher_text")
        self.initial, self.anchor, self.ensemble = (prefixed(state, p) for p in ("initial", "anchor", "ensemble"))
        self._teacher = None

    # -- helpers ------------------------------------------------------------------------------
    def _references(self, model) -> ReferenceImages:
        if self._reference is None:
            self._reference = load_reference_images(model, self.params.reference_images, self.params.reference_seed,
                                                    self.params.reference_set)
        return self._reference

    def _texts(self) -> tuple[str, ...]:
        if self._reference_texts is None:
            texts, n = reference_texts(self.params.reference_set), self.params.reference_texts
            if n > len(texts):
                raise ConfigError(f"zscl reference_texts is {n}, but there are {len(texts)} reference sentences: lower it")
            keep = sorted(np.random.default_rng(self.params.reference_seed).permutation(len(texts))[:n].tolist())
            self._reference_texts = tuple(texts[i] for i in keep)
        return self._reference_texts

    def _teacher_embeddings(self, model, reference, image_index, text_index, texts) -> tuple[torch.Tensor, torch.Tensor]:
        if self.params.cache_teacher:
            if self.teacher_image is None:
                raise RuntimeError("zscl: the teacher's embeddings are missing: call prepare(model) first")
            return self.teacher_image[image_index], self.teacher_text[text_index]
        if self._teacher is None:
            self._teacher = frozen_copy(model, self.initial)
        with torch.no_grad():
            image = embed_pixels(self._teacher, reference.pixels[image_index.numpy()])
            text = self._teacher.text_embeddings(texts)
        self._teacher.clear_text_cache()  # a per-step teacher encodes its texts every step
        return image, text

    def _add_to_ensemble(self, model) -> None:
        """merge_we: theta_we <- (n theta_we + theta) / (n + 1), n the number of weights averaged so far."""
        n = self.ensemble_count
        for name, w in model.named_parameters():
            if w.requires_grad:
                w = w.detach()
                self.ensemble[name] = w.clone() if n == 0 else (n * self.ensemble[name] + w) / (n + 1)
        self.ensemble_count = n + 1


# ---------------------------------------------------------------------------------------------
# Shared with Select-and-Distill: reference images, frozen teachers, per-step sampling.


@dataclass
class ReferenceImages:
    """The seeded reference photos at the model's resolution."""

    pixels: np.ndarray  # (N, R, R, 3) uint8: what a per-step teacher encodes from scratch
    inputs: torch.Tensor  # (N, ...) the frozen stem's outputs (disk-cached): the student's inputs


def load_reference_images(model, n: int, seed: int, reference_set: str = "photos") -> ReferenceImages:
    dataset = reference_images(n, model.image_spec.resolution, seed, reference_set)
    return ReferenceImages(dataset.images, stem_outputs(model, dataset))


def check_reference_set(method: str, reference_set: str) -> None:
    if reference_set not in REFERENCE_SETS:
        raise ConfigError(f"{method} reference_set must be one of {', '.join(REFERENCE_SETS)}, got {reference_set!r}")


def check_reference_sizes(method: str, n: int, batch_size: int) -> None:
    if n < 1:
        raise ConfigError(f"{method} reference_images must be >= 1, got {n} (default 1000; the paper uses 100k ImageNet images)")
    if not 1 <= batch_size <= n:
        raise ConfigError(f"{method} reference_batch_size must be in 1..reference_images ({n}), got {batch_size}: "
                          "lower reference_batch_size or raise reference_images")


@torch.no_grad()
def embed_images(model, inputs: torch.Tensor, batch_size: int = 256) -> torch.Tensor:
    """(N, D) normalised image embeddings of stem outputs, in batches."""
    return torch.cat([model.image_embeddings(inputs[i : i + batch_size]) for i in range(0, len(inputs), batch_size)])


@torch.no_grad()
def embed_texts(model, texts: tuple[str, ...], batch_size: int = 256) -> torch.Tensor:
    """(N, D) normalised text embeddings of raw sentences, in batches."""
    return torch.cat([model.text_embeddings(texts[i : i + batch_size]) for i in range(0, len(texts), batch_size)])


@torch.no_grad()
def embed_pixels(model, pixels: np.ndarray) -> torch.Tensor:
    """(N, D) normalised image embeddings of raw uint8 images through the whole image tower, stem included.
    The stem's output is made contiguous, as the stem cache stores it: the trunk rounds differently on the
    conv stem's channels-last output, and this way a per-step teacher gives the cached numbers exactly."""
    return model.image_embeddings(model.encode_stem(pixels).contiguous())


def frozen_copy(model, weights: dict[str, torch.Tensor]):
    """A frozen copy of `model` holding `weights` (a trainable_state) instead of its own: a teacher that
    runs every step. Built from tensors, so a resumed run needs nothing beyond the method's state."""
    teacher = copy.deepcopy(model)
    teacher.requires_grad_(False)
    params = dict(teacher.named_parameters())
    with torch.no_grad():
        for name, w in weights.items():
            params[name].copy_(w)
    for w in teacher.parameters():
        w.grad = None
    teacher.clear_text_cache()
    return teacher


def draw_seed() -> int:
    """A seed for a stream's reference batches, from torch's global RNG (so the run's seed decides it)."""
    return int(torch.randint(0, 2**31, ()).item())


def batch_generator(seed: int, task: int, step: int) -> torch.Generator:
    """The generator of one step's reference batch: a function of the method's state and the task alone."""
    return torch.Generator().manual_seed(((seed * 1_000_003 + task) * 1_000_003 + step) % 2**63)


def prefixed(state: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    return {k.removeprefix(f"{prefix}."): v for k, v in state.items() if k.startswith(f"{prefix}.")}
