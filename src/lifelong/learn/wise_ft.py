"""WiSE-FT: robust fine-tuning of zero-shot models (Wortsman et al., CVPR 2022; arXiv:2109.01903).

After each task the fine-tuned weights are interpolated with the zero-shot weights,
    theta <- (1 - alpha) * theta_0 + alpha * theta_ft,
and the next task starts from the interpolated model (the MTIL baseline's sequential use).

Deviation for LoRA mode: the zero-shot model is the base with a zero LoRA update (B = 0). Scaling
only B by alpha gives exactly (1 - alpha) * 0 + alpha * B A, so LoRA's A matrices are left as they are.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from lifelong.errors import ConfigError
from lifelong.learn.common import Batch, TaskData, classification_loss


@dataclass(frozen=True)
class Params:
    alpha: float = 0.5
    label_smoothing: float = 0.0

    def __post_init__(self) -> None:
        if not 0.0 <= self.alpha <= 1.0:
            raise ConfigError(f"wise_ft alpha must be in [0, 1], got {self.alpha}")


class WiSEFT:
    Params = Params

    def __init__(self, params: Params):
        self.params = params
        self.zero_shot: dict[str, torch.Tensor] = {}

    def prepare(self, model) -> None:
        self.zero_shot = model.trainable_state()

    def begin_task(self, model, data: TaskData) -> None:
        pass

    def loss(self, model, batch: Batch, data: TaskData) -> tuple[torch.Tensor, dict[str, float]]:
        ce = classification_loss(model, batch, data, self.params.label_smoothing)
        return ce, {"ce": ce.item()}

    @torch.no_grad()
    def end_task(self, model, data: TaskData) -> None:
        a = self.params.alpha
        for name, p in model.named_parameters():
            if name in self.zero_shot and ".lora_A." not in name:
                p.copy_((1 - a) * self.zero_shot[name] + a * p)

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {f"zero_shot.{k}": v for k, v in self.zero_shot.items()}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        self.zero_shot = {k.removeprefix("zero_shot."): v for k, v in state.items() if k.startswith("zero_shot.")}
