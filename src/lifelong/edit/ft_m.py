"""FT-M: constrained fine-tuning of one FFN output layer on the whole target, teacher-forced.

EasyEdit's FT-M (`objective_optimization: target_new`; Zhang et al. 2024, "A Comprehensive Study of
Knowledge Editing for Large Language Models"), with the L-inf ball of Zhu et al. 2020: minimise the
NLL of every target token after the prompt and the target tokens before it, over one layer's weights,

    W <- clip_{[W_0 - eps, W_0 + eps]}( W - lr * Adam(grad_W NLL(y_new | x)) ),   only W = W_out^l trains,
    NLL(y | x) = -(1/k) sum_j log p(t_j | x, t_<j).

Not FT-L: FT-L (`ft_l.py`, the WISE paper's and EasyEdit's `prompt_last` baseline) scores every target
token at the prompt's last position instead. Ledgers written before the two were told apart recorded
this editor as "ft_l" (their changes are weight patches and load as they are; the name in their
records means this editor).

Defaults, and why: `layer` None picks the layer two thirds of the way up (EasyEdit's FT edits
layer 21 of LLaMA-2-7B's 32): SmolLM2-135M -> layer 19 of 30, deep enough that the edit is not washed
out by 10 later blocks, shallow enough that it still changes the prompt's representation rather than
only the output distribution. `lr` 5e-4, 25 steps as in EasyEdit/ROME; `norm_constraint` 5e-3
where EasyEdit's constrained GPT-2 XL config has 5e-4: measured on SmolLM2 (layer 19), 5e-4 leaves
"The capital of France is" -> " Lyon" at NLL 6.2 and the answer " Paris"; 5e-3 reaches NLL 0.47 and
" Lyon" while "The capital of Germany is" keeps " Berlin".

Deviations: the ball is around f_0's weights for the whole lifelong run (Zhu et al.'s constraint);
EasyEdit re-centres it on the weights before each edit, so its sequential FT-M may drift without
bound. Only the weight trains (EasyEdit's GPT-2 name match also catches `c_proj.bias`). Training stops
early once the target NLL is below `stop_loss` (EasyEdit: 1e-2). `apply_batch` trains on all its
requests at once (the mean of their NLLs, EasyEdit's `batch_size` > 1); `apply(r)` is `apply_batch([r])`.

Two speed-ups that change no result (as FT-L's; the same sums in another order, so the weights agree to float
rounding): the decoder blocks below the edited one run once per edit (their input and weights are the same in
every pass), and the output layer runs only at the positions that predict a target token.
`benchmarks/ft_m_speed.py` measures them on SmolLM2 against the plain loop.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from lifelong.data.edit_requests import EditRequest
from lifelong.edit.base import Editor, fit_target
from lifelong.edit.wise import replay_lower_layers, target_only_nll
from lifelong.families.lm import ffn_out, frozen, resolve_layer, target_batch


@dataclass(frozen=True)
class Params:
    layer: int | None = None      # decoder block whose FFN output projection trains; None = 2/3 depth
    lr: float = 5e-4              # Adam
    steps: int = 25               # optimisation steps per edit
    norm_constraint: float = 5e-3  # L-inf radius around the original weights (<= 0: unconstrained)
    stop_loss: float = 1e-2       # stop once the target NLL is below this


class FTM(Editor):
    name = "ft_m"
    records = "weights"  # how a ledger records an edit: an additive weight patch
    batch = True          # apply_batch: one fine-tuning run on all requests (EasyEdit's batch_edit)
    Params = Params

    def __init__(self, model, tokenizer, params: Params) -> None:
        super().__init__(model, tokenizer, params)
        self.layer = resolve_layer(model, params.layer, 2 / 3)
        self.weight = ffn_out(model, self.layer).weight  # the Parameter itself (GPT-2: (in, out))
        self.original = self.weight.detach().clone()    # W_0, the centre of the ball and reset's target

    def apply(self, request: EditRequest) -> dict:
        return self.apply_batch([request])

    def apply_batch(self, requests: list[EditRequest]) -> dict:
        """All requests in one teacher-forced batch: the loss is the mean over requests of each one's
        target NLL, minimised for `steps` steps inside the same ball."""
        if not requests:
            raise ValueError("ft_m: apply_batch needs at least one request")
        p = self.params
        device = self.weight.device
        batch = target_batch(self.tokenizer, [r.prompt for r in requests], [r.target_new for r in requests], device)

        def project():  # back into the L-inf ball around W_0
            if p.norm_constraint > 0:
                with torch.no_grad():
                    lo, hi = self.original - p.norm_constraint, self.original + p.norm_constraint
                    self.weight.copy_(torch.clamp(self.weight, lo, hi))

        # only W trains (every flag restored after); the blocks below it see the same batch in every pass
        with frozen(self.model), replay_lower_layers(self.model, self.layer):
            self.weight.requires_grad_(True)
            try:
                with torch.no_grad():
                    loss_before = target_only_nll(self.model, batch).item()
                steps = fit_target(self.model, batch, [self.weight], lr=p.lr, steps=p.steps, stop_loss=p.stop_loss,
                                   after_step=project, loss_fn=target_only_nll)
                with torch.no_grad():
                    loss_after = target_only_nll(self.model, batch).item()
            finally:
                self.weight.grad = None
        change = (self.weight.detach() - self.original).abs().max().item()
        return {"loss_before": loss_before, "loss_after": loss_after, "steps": float(steps),
                "max_abs_change": change}

    def reset(self) -> None:
        with torch.no_grad():
            self.weight.copy_(self.original)


__all__ = ["FTM", "Params"]
