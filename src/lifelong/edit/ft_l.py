"""FT-L: constrained fine-tuning of one FFN output layer, the target scored at the prompt's last position.

Zhu et al. 2020, "Modifying Memories in Transformer Models", as the FT-L baseline of ROME, EasyEdit
(`objective_optimization: prompt_last`) and the WISE paper: one layer's weights are trained so that the
next-token distribution right after the prompt puts its mass on the target's tokens, all of them at that
one position, and the change is clamped to an L-inf ball of radius eps,

    L(W) = -(1/k) sum_j log p(t_j | x)          (every target token t_1..t_k at the last prompt position)
    W <- clip_{[W_s - eps, W_s + eps]}( W - lr * Adam(grad_W L) ),   only W = W_out^l trains,

with W_s the weights when this edit started (EasyEdit's `execute_ft` clamps around the weights it found).
The prompt alone is the input; the target is never teacher-forced. For a one-token target this is the
target's NLL; for k > 1 tokens the loss cannot fall below log k (k tokens share one distribution), so a
multi-token edit runs every step. FT-M (`ft_m.py`) is the teacher-forced objective over every target token.

Defaults, and why: `layer` None = 2/3 of the depth (EasyEdit edits layer 21 of LLaMA-2-7B's 32:
SmolLM2-135M -> layer 19 of 30); lr 5e-4 and 25 steps as EasyEdit's FT configs; a step is taken only
while the loss is >= `stop_loss` 1e-2 and training stops once it is below (EasyEdit's rule); weight
decay 0. `norm_constraint` 5e-3 as `ft_m`'s measured SmolLM2 value (EasyEdit's constrained GPT-2 XL
config has 5e-4; its current Llama configs turn the constraint off: give <= 0).

Deviations: only the weight trains (EasyEdit's GPT-2 name match also catches `c_proj.bias`); requests are
edited one at a time (EasyEdit batches them in `batch_size` when several are given to one call).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from lifelong.data.edit_requests import EditRequest
from lifelong.edit.base import Editor
from lifelong.families.lm import ffn_out, frozen, resolve_layer


@dataclass(frozen=True)
class Params:
    layer: int | None = None      # decoder block whose FFN output projection trains; None = 2/3 depth
    lr: float = 5e-4              # Adam
    steps: int = 25               # optimisation steps per edit
    norm_constraint: float = 5e-3  # L-inf radius around the weights before each edit (<= 0: unconstrained)
    stop_loss: float = 1e-2       # no step, and stop, once the loss is below this


def prompt_last_nll(model, input_ids: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """-(1/k) sum_j log p(t_j | prompt): every target token scored at the prompt's last position.
    input_ids: (1, P) the prompt; targets: (k,) the target's token ids."""
    logits = model(input_ids=input_ids).logits[0, -1].float()      # (V,) the next-token logits after the prompt
    return -torch.log_softmax(logits, dim=-1)[targets].mean()


class FTL(Editor):
    name = "ft_l"
    records = "weights"  # how a ledger records an edit: an additive weight patch
    Params = Params

    def __init__(self, model, tokenizer, params: Params) -> None:
        super().__init__(model, tokenizer, params)
        self.layer = resolve_layer(model, params.layer, 2 / 3)
        self.weight = ffn_out(model, self.layer).weight  # the Parameter itself (GPT-2: (in, out))
        self.original = self.weight.detach().clone()    # W_0, reset's target

    def apply(self, request: EditRequest) -> dict:
        p = self.params
        device = self.weight.device
        prompt = self.tokenizer(request.prompt, add_special_tokens=False)["input_ids"]
        target = self.tokenizer(request.target_new, add_special_tokens=False)["input_ids"]
        if not target:
            raise ValueError(f"target {request.target_new!r} tokenizes to nothing")
        if not prompt:
            raise ValueError(f"empty prompt in {request!r}")
        input_ids = torch.tensor([prompt], device=device)            # (1, P)
        targets = torch.tensor(target, device=device)                # (k,)
        start = self.weight.detach().clone()                         # W_s: this edit's ball is around it
        opt = torch.optim.Adam([self.weight], lr=p.lr)
        steps = 0
        with frozen(self.model):  # every other parameter frozen, flags restored after
            self.weight.requires_grad_(True)
            try:
                with torch.no_grad():
                    loss_before = prompt_last_nll(self.model, input_ids, targets).item()
                for _ in range(p.steps):
                    loss = prompt_last_nll(self.model, input_ids, targets)
                    if loss.item() < p.stop_loss:
                        break
                    opt.zero_grad(set_to_none=True)
                    loss.backward()
                    opt.step()
                    steps += 1
                    if p.norm_constraint > 0:
                        with torch.no_grad():
                            self.weight.copy_(torch.clamp(self.weight, start - p.norm_constraint,
                                                          start + p.norm_constraint))
                with torch.no_grad():
                    loss_after = prompt_last_nll(self.model, input_ids, targets).item()
            finally:
                self.weight.grad = None
        return {"loss_before": loss_before, "loss_after": loss_after, "steps": float(steps),
                "max_abs_change": (self.weight.detach() - start).abs().max().item()}

    def reset(self) -> None:
        with torch.no_grad():
            self.weight.copy_(self.original)


__all__ = ["FTL", "Params", "prompt_last_nll"]
