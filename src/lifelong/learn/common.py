"""What every learning method sees of a task, and the math several methods share."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from lifelong.loop import Batch, TaskData, process_share  # noqa: F401 - the names methods share


def classification_loss(model, batch: Batch, data: TaskData, label_smoothing: float = 0.0) -> torch.Tensor:
    """Cross-entropy of image-text logits over the task's label space."""
    logits = model(batch.inputs, data.class_names)  # (B, C)
    return F.cross_entropy(logits, batch.targets, label_smoothing=label_smoothing)


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
