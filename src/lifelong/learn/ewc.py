"""Elastic Weight Consolidation (Kirkpatrick et al., PNAS 2017; arXiv:1612.00796), online form
(Schwarz et al., ICML 2018, "Progress & Compress").

L = CE + sum_i (reg_weight / 2) * F_i * (theta_i - theta*_i)^2

F is the diagonal Fisher information at the end of the previous task: the expected squared gradient
of the log-likelihood per sample, F_i = E_x E_{y ~ p_theta(y|x)} [(d log p_theta(y|x) / d theta_i)^2],
over the task's training images. The expectation over y is exact (a sum over the task's classes
weighted by the model's probabilities), not a sample; `fisher: empirical` uses the true labels
instead. Per-sample gradients are vectorised with torch.func (vmap over grad), never a Python loop
over samples. Across tasks F accumulates as F <- decay * F + F_task (decay = 1: the sum of per-task
penalties, as in the original EWC; decay < 1: online EWC), and theta* is the latest task's end point.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch.func import functional_call, grad, vmap

from lifelong.errors import ConfigError
from lifelong.learn.common import TaskData, classification_loss


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

    def loss(self, model, batch: dict, data: TaskData) -> tuple[torch.Tensor, dict[str, float]]:
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


def diagonal_fisher(model, inputs: torch.Tensor, targets: torch.Tensor, class_names: tuple[str, ...],
                    mode: str = "exact", chunk: int = 32) -> dict[str, torch.Tensor]:
    """Mean over samples of squared per-sample log-likelihood gradients, for every trainable parameter.

    The image side is vectorised with vmap(grad) over a pure function of (image parameters, class
    embeddings E, one stem output). Text-side parameters reach the loss only through E (C, D): their
    per-sample gradients are the vector-Jacobian products of the per-sample dlogp/dE, batched in one
    backward pass (`is_grads_batched`), so the text encoder runs once per chunk, not once per sample.
    """
    trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
    # the class side (a dual encoder's text tower, a classifier's head) reaches the logits through E only
    text_names = [n for n in trainable if n.startswith(model.class_side_prefixes)]
    image = {n: p.detach() for n, p in trainable.items() if n not in text_names}
    frozen = {n: p.detach() for n, p in model.named_parameters() if n not in image}
    buffers = dict(model.named_buffers())

    def log_prob(p, class_emb, x, y):
        logits = functional_call(model, (p, frozen, buffers), (x.unsqueeze(0), class_emb))  # (1, C)
        return F.log_softmax(logits, dim=-1)[0].gather(0, y.unsqueeze(0)).squeeze(0)

    per_sample_grad = vmap(grad(log_prob, argnums=(0, 1)), in_dims=(None, None, 0, 0))
    fisher = {n: torch.zeros_like(p) for n, p in trainable.items()}
    class_emb = model.class_embeddings(class_names)  # (C, D), once, with the graph to text parameters
    for i in range(0, len(inputs), chunk):
        x = inputs[i : i + chunk]
        if mode == "empirical":
            weighted = [(targets[i : i + chunk], torch.ones(len(x)))]
        else:
            with torch.no_grad():
                probs = F.softmax(model(x, class_emb), dim=-1)  # (B, C)
            weighted = [(torch.full((len(x),), c), probs[:, c]) for c in range(len(class_names))]
        for y, w in weighted:
            g_image, g_emb = per_sample_grad(image, class_emb.detach(), x, y)  # g_emb: (B, C, D)
            for n, g in g_image.items():
                fisher[n] += torch.einsum("b,b...->...", w, g.pow(2))
            if text_names:
                g_text = torch.autograd.grad(class_emb, [trainable[n] for n in text_names], grad_outputs=g_emb,
                                             is_grads_batched=True, retain_graph=True, allow_unused=True)
                for n, g in zip(text_names, g_text):
                    if g is not None:
                        fisher[n] += torch.einsum("b,b...->...", w, g.pow(2))
    return {n: f / len(inputs) for n, f in fisher.items()}
