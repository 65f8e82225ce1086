"""Elastic Weight Consolidation (Kirkpatrick et al., PNAS 2017; arXiv:1612.00796), online form
(Schwarz et al., ICML 2018, "Progress & Compress").

L = CE + sum_i (reg_weight / 2) * F_i * (theta_i - theta*_i)^2

F is the diagonal Fisher information at the end of the previous task: the expected squared gradient
of the log-likelihood per sample, F_i = E_x E_{y ~ p_theta(y|x)} [(d log p_theta(y|x) / d theta_i)^2],
over the task's training images. The expectation over y is exact (a sum over the task's classes
weighted by the model's probabilities), not a sample; `fisher: empirical` uses the true labels
instead. Per-sample gradients come in closed form per layer from one batched backward pass per class
(`learn/fisher.py`; torch.func vmap for layers without one), never a Python loop over samples. Across
tasks F accumulates as F <- decay * F + F_task (decay = 1: the sum of per-task penalties, as in the
original EWC; decay < 1: online EWC), and theta* is the latest task's end point.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from lifelong.errors import ConfigError
from lifelong.learn.common import Batch, TaskData, classification_loss
from lifelong.learn.fisher import diagonal_fisher


@dataclass(frozen=True)
class Params:
    reg_weight: float = 1000.0
    decay: float = 1.0
    fisher: str = "exact"  # "exact" (expectation under the model) or "empirical" (true labels)
    fisher_samples: int = 256
    fisher_chunk: int = 32
    label_smoothing: float = 0.0

    def __post_init__(self) -> None:
        if self.fisher not in ("exact", "empirical"):
            raise ConfigError(f"ewc fisher must be 'exact' or 'empirical', got {self.fisher!r}")


class EWC:
    Params = Params

    def __init__(self, params: Params):
        self.params = params
        self.fisher: dict[str, torch.Tensor] = {}
        self.anchor: dict[str, torch.Tensor] = {}

    def prepare(self, model) -> None:
        pass

    def begin_task(self, model, data: TaskData) -> None:
        pass

    def loss(self, model, batch: Batch, data: TaskData) -> tuple[torch.Tensor, dict[str, float]]:
        ce = classification_loss(model, batch, data, self.params.label_smoothing)
        if not self.fisher:
            return ce, {"ce": ce.item()}
        penalty = sum(
            (self.fisher[n] * (p - self.anchor[n]).pow(2)).sum() for n, p in model.named_parameters() if n in self.fisher
        )
        return ce + self.params.reg_weight / 2 * penalty, {"ce": ce.item(), "penalty": penalty.item()}

    def end_task(self, model, data: TaskData) -> None:
        g = torch.Generator().manual_seed(data.index)
        n = min(self.params.fisher_samples, len(data.inputs))
        idx = torch.randperm(len(data.inputs), generator=g)[:n]
        fisher = diagonal_fisher(model, data.inputs[idx], data.targets[idx], data.class_names,
                                 self.params.fisher, self.params.fisher_chunk)
        for name, f in fisher.items():
            self.fisher[name] = self.params.decay * self.fisher.get(name, torch.zeros_like(f)) + f
        self.anchor = model.trainable_state()

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {**{f"fisher.{k}": v for k, v in self.fisher.items()}, **{f"anchor.{k}": v for k, v in self.anchor.items()}}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        self.fisher = {k.removeprefix("fisher."): v for k, v in state.items() if k.startswith("fisher.")}
        self.anchor = {k.removeprefix("anchor."): v for k, v in state.items() if k.startswith("anchor.")}
