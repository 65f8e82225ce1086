"""LwF as the MTIL benchmark runs it (Zheng et al., ICCV 2023, the "LwF" row of their Table 1; official code
github.com/Thunderbeee/ZSCL, `mtil/scripts/lwf.sh`): ZSCL's distillation with the previous model as the
teacher and the current task's own images and class names as the reference data.

    L = CE_ls(logits, y) + reg_weight * (KD(Z, Z_prev) + KD(Z^T, Z_prev^T)),
    Z = logit_scale * f(x) g_prev(c)^T,  Z_prev = logit_scale * f_prev(x) g_prev(c)^T   (B, C)

x: the step's images of the current task; c: the current task's class names; f, f_prev: the image
embeddings of the model being trained and of the model at the start of the task (for the first task the
zero-shot model: the script's first call has no `--ref-model`, so the teacher is the pretrained CLIP);
g_prev: the teacher's class-name embeddings, used on both sides as in the official code (so the KD terms
reach the image side only). KD(s, t) = T^2 KL(softmax(t / T) || softmax(s / T)) per row, T = 2: rows of Z
are each image's distribution over the classes (`--image_loss`), rows of Z^T each class's distribution
over the batch's images (`--text_loss`). Label smoothing 0.2 (`--ls 0.2`).

Unlike Li & Hoiem's LwF (`lwf`), the distillation is on the *current* task's classes, not the old tasks'
heads, and it is active from task 1 on (against the zero-shot model).

The teacher never changes within a task and the images are fixed, so its image embeddings of every
training image and its class-name embeddings are computed once per task.

Deviations from the official script:
- The KD images are the step's own training batch; the official code draws a second batch from the same
  training set through a separate loader (the same distribution, one forward pass fewer here).
- `--fair` adds 5,000 ImageNet images (100 classes x 50) and their class names to every task's training
  set in the official script, to match iCaRL's extra data; no ImageNet here, so the tasks are trained on
  their own data only.
- KL divergence, where the official code takes the cross-entropy against the soft targets (larger by the
  teacher's entropy): the same gradients, a different logged value.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from lifelong.errors import ConfigError
from lifelong.learn.common import Batch, TaskData, distillation_loss


@dataclass(frozen=True)
class Params:
    label_smoothing: float = 0.2  # --ls 0.2
    temperature: float = 2.0
    reg_weight: float = 1.0  # on KD_img + KD_txt (the script: 1 each)

    def __post_init__(self) -> None:
        if not 0.0 <= self.label_smoothing < 1.0:
            raise ConfigError(f"lwf_mtil label_smoothing must be in [0, 1), got {self.label_smoothing} (MTIL: 0.2)")
        if self.temperature <= 0:
            raise ConfigError(f"lwf_mtil temperature must be positive, got {self.temperature} (MTIL: 2)")
        if self.reg_weight < 0:
            raise ConfigError(f"lwf_mtil reg_weight must be >= 0, got {self.reg_weight}")


class LwFMTIL:
    Params = Params

    def __init__(self, params: Params):
        self.params = params
        self.teacher_image: torch.Tensor | None = None  # (N_train, D): f_prev of every training image
        self.teacher_text: torch.Tensor | None = None  # (C, D): g_prev of the task's class names

    def prepare(self, model) -> None:
        pass

    @torch.no_grad()
    def begin_task(self, model, data: TaskData) -> None:
        self.teacher_text = model.class_embeddings(data.class_names).detach().clone()
        self.teacher_image = torch.cat([model.image_embeddings(data.inputs[i : i + 256])
                                        for i in range(0, len(data.inputs), 256)])

    def loss(self, model, batch: Batch, data: TaskData) -> tuple[torch.Tensor, dict[str, float]]:
        if self.teacher_image is None:
            raise RuntimeError("lwf_mtil: the teacher's embeddings are missing: call begin_task first")
        p = self.params
        image = model.image_embeddings(batch.inputs)  # (B, D): one pass for the CE and the KD
        logits = model.logit_scale * image @ model.class_embeddings(data.class_names).T  # (B, C)
        ce = F.cross_entropy(logits, batch.targets, label_smoothing=p.label_smoothing)
        student = model.logit_scale * image @ self.teacher_text.T  # (B, C)
        teacher = model.logit_scale * self.teacher_image[batch.index] @ self.teacher_text.T  # (B, C)
        kd_image = distillation_loss(student, teacher, p.temperature)  # each image over the classes
        kd_text = distillation_loss(student.T, teacher.T, p.temperature)  # each class over the images
        loss = ce + p.reg_weight * (kd_image + kd_text)
        return loss, {"ce": ce.item(), "kd_image": kd_image.item(), "kd_text": kd_text.item()}

    def end_task(self, model, data: TaskData) -> None:
        self.teacher_image = self.teacher_text = None

    def state_dict(self) -> dict[str, torch.Tensor]:
        if self.teacher_image is None:
            return {}
        return {"teacher_image": self.teacher_image, "teacher_text": self.teacher_text}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        self.teacher_image, self.teacher_text = state.get("teacher_image"), state.get("teacher_text")
