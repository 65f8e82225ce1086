"""Joint training: every task's data at once, the upper bound of continual learning (Avalanche's
JointTraining strategy; the "Joint" rows of Lopez-Paz & Ranzato, GEM, NeurIPS 2017, and of most CL tables).

    L = CE(s(x), y) over (x, y) drawn uniformly from the union of all tasks' training sets

The loop (`lifelong.loop.run_stream`, which reads `trains_jointly`) hands this method one task made of
every task's training data (`loop.joint_task_data`) and trains it for T x steps_per_task steps, the
optimizer steps the sequential methods get over the whole stream. Targets index the union of the
stream's class names (each name once). On a task-incremental stream each sample is classified among its
own task's classes (`TaskData.allowed`), the label space the sequential methods train it in; on a
class-incremental stream, among every class.

There are no intermediate models, so every row of the accuracy matrix after row 0 is the joint model's
(in that row's label spaces): forgetting is 0 by construction and Last is the figure to compare with the
continual methods' Last. In a ledger (one task per change) it is plain fine-tuning on the change's task.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from lifelong.errors import ConfigError
from lifelong.learn.common import Batch, TaskData


@dataclass(frozen=True)
class Params:
    label_smoothing: float = 0.0

    def __post_init__(self) -> None:
        if not 0.0 <= self.label_smoothing < 1.0:
            raise ConfigError(f"joint label_smoothing must be in [0, 1), got {self.label_smoothing}")


def restricted_cross_entropy(logits: torch.Tensor, targets: torch.Tensor, allowed: torch.Tensor,
                             label_smoothing: float = 0.0) -> torch.Tensor:
    """Cross-entropy of each row among its `allowed` columns only (B, C) bool: F.cross_entropy on the
    allowed columns, its label smoothing spread over them, row by row in one batched computation."""
    log_p = F.log_softmax(logits.masked_fill(~allowed, float("-inf")), dim=-1)  # (B, C), -inf where not allowed
    nll = -log_p.gather(1, targets[:, None]).squeeze(1)  # (B,)
    smooth = -log_p.masked_fill(~allowed, 0.0).sum(-1) / allowed.sum(-1)  # (B,) mean over the allowed columns
    return ((1 - label_smoothing) * nll + label_smoothing * smooth).mean()


class Joint:
    Params = Params
    trains_jointly = True  # the loop gives it every task's data as one task

    def __init__(self, params: Params):
        self.params = params

    def prepare(self, model) -> None:
        pass

    def begin_task(self, model, data: TaskData) -> None:
        pass

    def loss(self, model, batch: Batch, data: TaskData) -> tuple[torch.Tensor, dict[str, float]]:
        logits = model(batch.inputs, data.class_names)  # (B, C)
        if data.allowed is None:
            ce = F.cross_entropy(logits, batch.targets, label_smoothing=self.params.label_smoothing)
        else:
            ce = restricted_cross_entropy(logits, batch.targets, data.allowed[batch.index], self.params.label_smoothing)
        return ce, {"ce": ce.item()}

    def end_task(self, model, data: TaskData) -> None:
        pass

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        pass
