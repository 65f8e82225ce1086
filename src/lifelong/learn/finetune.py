"""Sequential fine-tuning: the lower bound of continual learning.

Each task is trained with cross-entropy on its image-text logits, starting from where the previous
task ended; nothing protects earlier knowledge.  L = CE(logit_scale * cos(f(x), g(c)), y)
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from lifelong.learn.common import Batch, TaskData, classification_loss


@dataclass(frozen=True)
class Params:
    label_smoothing: float = 0.0


class Finetune:
    Params = Params

    def __init__(self, params: Params):
        self.params = params

    def prepare(self, model) -> None:
        pass

    def begin_task(self, model, data: TaskData) -> None:
        pass

    def loss(self, model, batch: Batch, data: TaskData) -> tuple[torch.Tensor, dict[str, float]]:
        ce = classification_loss(model, batch, data, self.params.label_smoothing)
        return ce, {"ce": ce.item()}

    def end_task(self, model, data: TaskData) -> None:
        pass

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        pass
