"""O-LoRA: orthogonal subspace learning (Wang et al., "Orthogonal Subspace Learning for Language Model
Continual Learning", Findings of EMNLP 2023; arXiv:2310.14152; code github.com/cmnfriend/O-LoRA).

Each task t trains a new LoRA (A_t, B_t) per adapted layer; the LoRAs of earlier tasks are frozen and
the new A is pushed out of their input subspaces:

    L = CE + reg_weight * sum_{s < t} sum_layers sum_{j,k} |(A_s A_t^T)[j, k]| + l2_weight * (||A_t||_F + ||B_t||_F)

with the model W = W_0 + sum_{s <= t} scale * B_s A_s in every adapted layer. A_s is flattened to
(r, in) (1x1 convolutions: (r, in, 1, 1) -> (r, in)).

One set of LoRA parameters, a fixed architecture. The official code keeps the old LoRAs, stacked into
one frozen LoRA of growing rank, beside the new one. Old LoRAs never change again, so their sum is a constant added
to W_0: here, at end_task, each layer's delta scale * B_t A_t is folded into its frozen base weight
(`base_layer.weight += get_delta_weight`, exactly peft's merge) and B_t is zeroed, so the model's
function is unchanged (up to float rounding) and W_0 + sum_{s<=t} scale * B_s A_s is what the base
layer holds. A_t itself is recorded in the method's state: the subspaces the next tasks must avoid.
At begin_task of the next task, A is drawn again as peft draws it (kaiming uniform, a = sqrt(5)) from
a generator seeded with the task index (reruns and resumes draw the same A), and B = 0: the task
starts from exactly the function the previous one ended with, and only the new A and B train. The
optimizer and the checkpoints see the same parameters for every task.

Parameters this method changes that do not train: at end_task, the `base_layer.weight` of every peft
LoRA layer (the fold). A patch of a task is therefore the change of those weights plus the LoRA
factors, not the LoRA factors alone.

Deviations from the paper:
- Setting: the paper trains T5 / LLaMA with instruction prompts on text classification as generation
  (LoRA on attention q and v); here a CLIP-style dual encoder on image classification by image-text
  logits, with the adapter config's target layers. The method itself does not depend on the setting.
- The orthogonality term, its weights and the L2 term follow the official code (uie_trainer_lora.py,
  scripts/order_*.sh): the sum of absolute entries of A_s A_t^T, reg_weight = lambda_1 = 0.5,
  l2_weight = lambda_2 = 0, the L2 term being the unsquared Frobenius norms of the new A and B.
- Old LoRAs are folded into the base weights instead of kept as modules: the same function.
- A's of the first task are drawn from the same seeded generator (the paper uses peft's draw).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from lifelong.errors import ConfigError
from lifelong.learn.common import Batch, TaskData, classification_loss

ADAPTER = "default"  # the adapter name peft's inject_adapter_in_model uses


@dataclass(frozen=True)
class Params:
    reg_weight: float = 0.5  # lambda_1: weight of the orthogonality term
    l2_weight: float = 0.0  # lambda_2: weight of the new LoRA's Frobenius norms
    label_smoothing: float = 0.0

    def __post_init__(self) -> None:
        if self.reg_weight < 0 or self.l2_weight < 0:
            raise ConfigError(f"o_lora reg_weight and l2_weight must be >= 0, got {self.reg_weight}, {self.l2_weight}")


class OLoRA:
    Params = Params
    adapter_kinds = ("lora",)
    # Frozen parameters (name suffixes) that this method changes on purpose: end_task folds each
    # task's LoRA into them. What a checkpoint or a patch of the trainable parameters alone misses.
    changes_frozen = (".base_layer.weight",)

    def __init__(self, params: Params):
        self.params = params
        # Per LoRA layer (module name): the A's of the finished tasks, stacked, (tasks * r, in).
        self.subspaces: dict[str, torch.Tensor] = {}

    def prepare(self, model) -> None:
        if not lora_layers(model):
            raise ConfigError("o_lora trains LoRA adapters: set adapter.kind: lora")

    @torch.no_grad()
    def begin_task(self, model, data: TaskData) -> None:
        layers = lora_layers(model)
        if missing := sorted(set(self.subspaces) - set(layers)):
            raise ConfigError(f"o_lora holds subspaces of LoRA layers this model lacks ({', '.join(missing[:3])}...): "
                              "the adapter config (tower, target_modules) must stay the same across tasks")
        g = torch.Generator().manual_seed(data.index)
        for layer in layers.values():
            fold(layer)  # a no-op after end_task (B = 0); keeps the function if a LoRA arrives trained
            nn.init.kaiming_uniform_(layer.lora_A[ADAPTER].weight, a=math.sqrt(5), generator=g)  # as peft
            layer.lora_B[ADAPTER].weight.zero_()
        model.clear_text_cache()

    def loss(self, model, batch: Batch, data: TaskData) -> tuple[torch.Tensor, dict[str, float]]:
        ce = classification_loss(model, batch, data, self.params.label_smoothing)
        total, logs = ce, {"ce": ce.item()}
        if self.subspaces:
            orth = orthogonality_loss(model, self.subspaces)
            total = total + self.params.reg_weight * orth
            logs["orth"] = orth.item()
        if self.params.l2_weight > 0:
            l2 = sum(p.norm() for layer in lora_layers(model).values()
                     for p in (layer.lora_A[ADAPTER].weight, layer.lora_B[ADAPTER].weight))
            total = total + self.params.l2_weight * l2
            logs["l2"] = l2.item()
        return total, logs

    @torch.no_grad()
    def end_task(self, model, data: TaskData) -> None:
        for name, layer in lora_layers(model).items():
            a = layer.lora_A[ADAPTER].weight.detach().flatten(1).clone()  # (r, in)
            old = self.subspaces.get(name)
            self.subspaces[name] = a if old is None else torch.cat([old, a])  # (tasks * r, in)
            fold(layer)
        model.clear_text_cache()

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {f"subspace.{name}": a for name, a in self.subspaces.items()}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        self.subspaces = {k.removeprefix("subspace."): v for k, v in state.items() if k.startswith("subspace.")}


def lora_layers(model: nn.Module) -> dict[str, nn.Module]:
    """The peft LoRA layers of `model` by module name (in module order: the order A's are drawn in)."""
    from peft.tuners.lora import LoraLayer  # heavy optional dependency, imported at first use

    return {name: m for name, m in model.named_modules() if isinstance(m, LoraLayer) and ADAPTER in m.lora_A}


def orthogonality_loss(model: nn.Module, subspaces: dict[str, torch.Tensor]) -> torch.Tensor:
    """sum_layers sum |A_old A_new^T|, A_old (tasks * r, in) fixed: differentiable w.r.t. the new A only."""
    layers = lora_layers(model)
    terms = []
    for name, old in subspaces.items():
        new = layers[name].lora_A[ADAPTER].weight.flatten(1)  # (r, in)
        terms.append((old.to(new) @ new.T).abs().sum())  # (tasks * r, r) overlaps
    return torch.stack(terms).sum()


@torch.no_grad()
def fold(layer: nn.Module) -> None:
    """base weight += scale * B A (peft's own delta, as its merge adds it), then B = 0: same function."""
    b = layer.lora_B[ADAPTER].weight
    if not b.any():
        return
    base = layer.get_base_layer()
    base.weight += layer.get_delta_weight(ADAPTER).to(base.weight.dtype)
    b.zero_()
