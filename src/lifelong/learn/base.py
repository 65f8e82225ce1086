"""The contract of a continual-learning method (each method is one file that meets it; no inheritance).

The loop (`lifelong.loop`) calls, for every task of a stream or every learn change of a ledger:

    prepare(model)                 once, after the trainable parameters are chosen
    begin_task(model, data)        before a task's first step (e.g. cache a frozen teacher's outputs)
    loss(model, batch, data)       -> (loss, {name: float}) for one batch
    end_task(model, data)          after a task's last step (e.g. Fisher, weight interpolation)
    state_dict() / load_state_dict(state)
                                   tensors to checkpoint: everything `loss` and `end_task` depend on
                                   (teacher outputs, Fisher, exemplar buffers, weight averages), so that a
                                   resumed task ends bit-identical; a ledger records it with the change and
                                   the method's next change continues from it
    eval_logits(model, inputs, class_names) -> (N, C)
                                   optional (`EvalLogits`): the method's own inference (nearest mean of
                                   exemplars, routing); else the image-text logits

A ledger records every learning method's change as an additive weight patch plus this state.
"""

from __future__ import annotations

from typing import ClassVar, Protocol, runtime_checkable

import torch

from lifelong.loop import Batch, TaskData


@runtime_checkable
class LearningMethod(Protocol):
    Params: ClassVar[type]

    def prepare(self, model) -> None: ...

    def begin_task(self, model, data: TaskData) -> None: ...

    def loss(self, model, batch: Batch, data: TaskData) -> tuple[torch.Tensor, dict[str, float]]: ...

    def end_task(self, model, data: TaskData) -> None: ...

    def state_dict(self) -> dict[str, torch.Tensor]: ...

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None: ...


@runtime_checkable
class EvalLogits(Protocol):
    """A method with its own inference at evaluation time."""

    def eval_logits(self, model, inputs: torch.Tensor, class_names: tuple[str, ...]) -> torch.Tensor: ...
