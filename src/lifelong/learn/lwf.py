"""Learning without Forgetting (Li & Hoiem, ECCV 2016; arXiv:1606.09282).

L = CE(new task) + reg_weight * T^2 * KL(softmax(y_old / T) || softmax(y_hat_old / T)), T = 2,
where y_old are the previous model's logits for the old tasks' classes on the *current* task's
images, recorded before training the task, and y_hat_old the current model's.

For a dual encoder the old tasks' "heads" are their class-name text embeddings, so the old outputs
are the image-text logits over all classes seen before this task. On the first task there is no old
head and the loss is plain CE.

The teacher is frozen and the images are fixed, so its logits are computed once per task (one pass
over the task's cached stem outputs) instead of on every step as a per-step teacher would.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from lifelong.learn.common import Batch, TaskData, batched_logits, classification_loss, distillation_loss


@dataclass(frozen=True)
class Params:
    temperature: float = 2.0
    reg_weight: float = 1.0
    label_smoothing: float = 0.0


class LwF:
    Params = Params

    def __init__(self, params: Params):
        self.params = params
        self.teacher_logits: torch.Tensor | None = None  # (N_train, C_old) for the current task

    def prepare(self, model) -> None:
        pass

    def begin_task(self, model, data: TaskData) -> None:
        old = data.seen_class_names
        self.teacher_logits = batched_logits(model, data.inputs, old) if old else None

    def loss(self, model, batch: Batch, data: TaskData) -> tuple[torch.Tensor, dict[str, float]]:
        if self.teacher_logits is None:
            ce = classification_loss(model, batch, data, self.params.label_smoothing)
            return ce, {"ce": ce.item()}
        # One pass of the image tower scores the new and the old classes together.
        n_new = len(data.class_names)
        logits = model(batch.inputs, data.class_names + data.seen_class_names)
        ce = F.cross_entropy(logits[:, :n_new], batch.targets, label_smoothing=self.params.label_smoothing)
        kd = distillation_loss(logits[:, n_new:], self.teacher_logits[batch.index], self.params.temperature)
        return ce + self.params.reg_weight * kd, {"ce": ce.item(), "kd": kd.item()}

    def end_task(self, model, data: TaskData) -> None:
        self.teacher_logits = None

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {} if self.teacher_logits is None else {"teacher_logits": self.teacher_logits}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        self.teacher_logits = state.get("teacher_logits")
