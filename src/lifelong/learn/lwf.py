"""Learning without Forgetting (Li & Hoiem, ECCV 2016 / TPAMI 2017; arXiv:1606.09282), as Avalanche's LwF
plugin runs it: one distillation term per old head.

    L = CE(new task) + reg_weight * sum_k T^2 * KL(softmax(y_k / T) || softmax(y^_k / T)),  T = 2

k runs over the heads of the old tasks; y_k are the logits of the model at the start of the task (the
teacher) over head k's classes on the *current* task's images, recorded before training the task, and y^_k
the current model's. For a dual encoder a head is a label space of class-name text embeddings:

- task-incremental (Li & Hoiem's multi-head setting; Avalanche's per-task-label loop): one term per old
  task, each a softmax over that task's own class names. Two tasks with the same names (MNIST's and
  digits' "zero".."nine") are two heads with the same outputs, so their term counts twice, as two heads
  with identical outputs would in the paper.
- class-incremental (a single growing head; Avalanche's active units): one term over every class seen
  before.

The student scores the current classes and every old class in one pass of the image tower, each name
once (the union is de-duplicated), and each head's term reads its columns from that one matrix. On the
first task there is no old head and the loss is plain CE.

The teacher is frozen and the images are fixed, so its logits are computed once per task (one pass over
the task's cached stem outputs) instead of on every step.

Deviations: KL divergence (Hinton et al. 2015, with its T^2 factor) where Li & Hoiem write a modified
cross-entropy: the same gradients, a value lower by the teacher's entropy. Avalanche's LwF has no T^2:
its `alpha` is reg_weight * T^2 here. Where a caller gives only the concatenated old class names
(`TaskData.old_label_spaces` empty), they form one head, each name once. The MTIL
paper's "LwF" row is a different recipe: `lwf_mtil`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from lifelong.errors import ConfigError
from lifelong.learn.common import Batch, TaskData, batched_logits, distillation_loss


@dataclass(frozen=True)
class Params:
    temperature: float = 2.0
    reg_weight: float = 1.0
    label_smoothing: float = 0.0

    def __post_init__(self) -> None:
        if self.temperature <= 0:
            raise ConfigError(f"lwf temperature must be > 0 (Li & Hoiem: 2), got {self.temperature}")
        if self.reg_weight < 0:
            raise ConfigError(f"lwf reg_weight must be >= 0, got {self.reg_weight}")


def old_heads(data: TaskData) -> tuple[tuple[str, ...], ...]:
    """The old tasks' heads: `old_label_spaces`, else all old class names as one head (each name once)."""
    if data.old_label_spaces:
        return data.old_label_spaces
    return (tuple(dict.fromkeys(data.seen_class_names)),) if data.seen_class_names else ()


def scored_names(data: TaskData, heads) -> tuple[tuple[str, ...], torch.Tensor, list[torch.Tensor]]:
    """(every name the student scores, each once; the current classes' columns; per head, its columns)."""
    column = {n: i for i, n in enumerate(dict.fromkeys(data.class_names + tuple(n for h in heads for n in h)))}
    current = torch.tensor([column[n] for n in data.class_names])
    return tuple(column), current, [torch.tensor([column[n] for n in head]) for head in heads]


class LwF:
    Params = Params

    def __init__(self, params: Params):
        self.params = params
        self.teacher_logits: torch.Tensor | None = None  # (N_train, sum_k C_k): the heads' columns side by side

    def prepare(self, model) -> None:
        pass

    def begin_task(self, model, data: TaskData) -> None:
        heads = old_heads(data)
        if not heads:
            self.teacher_logits = None
            return
        names, _, columns = scored_names(data, heads)
        teacher = batched_logits(model, data.inputs, names)  # (N, U)
        self.teacher_logits = torch.cat([teacher[:, c] for c in columns], dim=1)

    def loss(self, model, batch: Batch, data: TaskData) -> tuple[torch.Tensor, dict[str, float]]:
        p = self.params
        heads = old_heads(data)
        names, current, columns = scored_names(data, heads)
        logits = model(batch.inputs, names)  # (B, U): one pass scores the new and the old classes
        ce = F.cross_entropy(logits[:, current], batch.targets, label_smoothing=p.label_smoothing)
        if self.teacher_logits is None or not heads:
            return ce, {"ce": ce.item()}
        teacher = self.teacher_logits[batch.index]  # (B, sum_k C_k)
        kd, start = logits.new_zeros(()), 0
        for c in columns:  # one term per old head
            kd = kd + distillation_loss(logits[:, c], teacher[:, start : start + len(c)], p.temperature)
            start += len(c)
        return ce + p.reg_weight * kd, {"ce": ce.item(), "kd": kd.item()}

    def end_task(self, model, data: TaskData) -> None:
        self.teacher_logits = None

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {} if self.teacher_logits is None else {"teacher_logits": self.teacher_logits}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        self.teacher_logits = state.get("teacher_logits")
