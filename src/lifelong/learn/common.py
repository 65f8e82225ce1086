"""What every learning method sees of a task, and the math several methods share."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from lifelong.data.base import Task


@dataclass
class TaskData:
    """One task as the training loop hands it to a method.

    inputs: the frozen stem's outputs for the task's training images (cached, never recomputed).
    targets: each image's index into `class_names`, the label space the task trains on (the task's
    own classes when task-incremental; every class seen so far when class-incremental).
    seen_class_names: the label spaces of the tasks before this one, for distillation on old classes.
    """

    index: int
    task: Task
    inputs: torch.Tensor
    targets: torch.Tensor
    class_names: tuple[str, ...]
    seen_class_names: tuple[str, ...]


def process_share(batch: dict, drawn: torch.Tensor) -> torch.Tensor:
    """This process's share of samples a method draws for the whole batch (e.g. replayed exemplars).

    Under several processes the loop gives each process an equal share of every global batch and sets
    `batch["share"] = (rank, world)`. Whatever a method draws per step must be drawn for the global
    batch (the same draw in every process: seeded by task and step) and split the same way; else
    every process would replay the same samples and the run would differ from one process.
    """
    rank, world = batch.get("share", (0, 1))
    return drawn[rank::world]


def global_batch_size(batch: dict) -> int:
    """The size of the global batch this process's share belongs to."""
    return len(batch["inputs"]) * batch.get("share", (0, 1))[1]


def classification_loss(model, batch: dict, data: TaskData, label_smoothing: float = 0.0) -> torch.Tensor:
    """Cross-entropy of image-text logits over the task's label space."""
    logits = model(batch["inputs"], data.class_names)  # (B, C)
    return F.cross_entropy(logits, batch["targets"], label_smoothing=label_smoothing)


def distillation_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """Hinton et al. 2015: T^2 * KL(softmax(teacher / T) || softmax(student / T)), mean over the batch."""
    t = temperature
    teacher = F.log_softmax(teacher_logits / t, dim=-1)
    student = F.log_softmax(student_logits / t, dim=-1)
    return F.kl_div(student, teacher, log_target=True, reduction="batchmean") * t * t


@torch.no_grad()
def batched_logits(model, inputs: torch.Tensor, class_names: tuple[str, ...], batch_size: int = 512) -> torch.Tensor:
    class_emb = model.class_embeddings(class_names)
    return torch.cat([model.logits(inputs[i : i + batch_size], class_emb) for i in range(0, len(inputs), batch_size)])
