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

Deviations: only the weight trains (EasyEdit's GPT-2 name match also catches `c_proj.bias`). `apply`
edits one request; `apply_batch` trains on several at once (EasyEdit's `batch_size`; the loss is the
mean over requests of each one's loss), the ball around the weights before the batch.

Two speed-ups that change no number: the decoder blocks below the edited one run once per edit (their
input and weights are the same in every pass), and the output layer runs only at the last prompt position.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from lifelong.data.edit_requests import EditRequest
from lifelong.edit.base import Editor
from lifelong.edit.wise import replay_lower_layers
from lifelong.families.lm import ffn_out, frozen, resolve_layer


@dataclass(frozen=True)
class Params:
    layer: int | None = None      # decoder block whose FFN output projection trains; None = 2/3 depth
    lr: float = 5e-4              # Adam
    steps: int = 25               # optimisation steps per edit
    norm_constraint: float = 5e-3  # L-inf radius around the weights before each edit (<= 0: unconstrained)
    stop_loss: float = 1e-2       # no step, and stop, once the loss is below this


def prompt_last_nll(model, input_ids: torch.Tensor, targets: torch.Tensor,
                    attention_mask: torch.Tensor | None = None, last: torch.Tensor | None = None,
                    target_rows: torch.Tensor | None = None) -> torch.Tensor:
    """-(1/k) sum_j log p(t_j | prompt): every target token scored at the prompt's last position.
    One prompt: input_ids (1, P), targets (k,). A batch: input_ids and attention_mask (B, P) right-padded,
    last (B,) each prompt's last position, targets (N,) all target tokens and target_rows (N,) the row of
    each; the loss is then the mean over prompts of each one's mean. The output layer (49k-way on SmolLM2)
    runs only at the last positions: the loss reads no other logits."""
    rows = torch.arange(len(input_ids), device=input_ids.device)
    if last is None:
        last = torch.full_like(rows, input_ids.shape[1] - 1)

    def keep_last(_module, args):
        return (args[0][rows, last],)                                   # (B, P, D) -> (B, D)

    hook = model.get_output_embeddings().register_forward_pre_hook(keep_last)
    try:
        logits = model(input_ids=input_ids, attention_mask=attention_mask).logits.float()  # (B, V) next-token logits
    finally:
        hook.remove()
    if target_rows is None:
        return -torch.log_softmax(logits[0], dim=-1)[targets].mean()
    token_lp = torch.log_softmax(logits, dim=-1)[target_rows, targets]                       # (N,)
    per_row = token_lp.new_zeros(len(rows)).index_add(0, target_rows, token_lp) / torch.bincount(target_rows)
    return -per_row.mean()


class FTL(Editor):
    name = "ft_l"
    records = "weights"  # how a ledger records an edit: an additive weight patch
    batch = True          # apply_batch: one fine-tuning run on all requests (EasyEdit's batch_size > 1)
    Params = Params

    def __init__(self, model, tokenizer, params: Params) -> None:
        super().__init__(model, tokenizer, params)
        self.layer = resolve_layer(model, params.layer, 2 / 3)
        self.weight = ffn_out(model, self.layer).weight  # the Parameter itself (GPT-2: (in, out))
        self.original = self.weight.detach().clone()    # W_0, reset's target

    def apply(self, request: EditRequest) -> dict:
        return self.apply_batch([request])

    def apply_batch(self, requests: list[EditRequest]) -> dict:
        """All requests at once: the mean over requests of each one's prompt-last loss (one request: the
        loss of `prompt_last_nll` on it alone, the same numbers)."""
        if not requests:
            raise ValueError("ft_l: apply_batch needs at least one request")
        p = self.params
        device = self.weight.device
        prompts, targets = [], []
        for request in requests:
            prompt = self.tokenizer(request.prompt, add_special_tokens=False)["input_ids"]
            target = self.tokenizer(request.target_new, add_special_tokens=False)["input_ids"]
            if not target:
                raise ValueError(f"target {request.target_new!r} tokenizes to nothing")
            if not prompt:
                raise ValueError(f"empty prompt in {request!r}")
            prompts.append(prompt)
            targets.append(target)
        if len(requests) == 1:  # no padding: exactly the single-prompt pass
            args = (torch.tensor(prompts, device=device), torch.tensor(targets[0], device=device))  # (1, P), (k,)
        else:
            width = max(map(len, prompts))
            ids = torch.zeros((len(prompts), width), dtype=torch.long)
            mask = torch.zeros((len(prompts), width), dtype=torch.long)
            for i, row in enumerate(prompts):
                ids[i, : len(row)], mask[i, : len(row)] = torch.tensor(row), 1   # right-padded (B, P)
            last = torch.tensor([len(row) - 1 for row in prompts])
            rows = torch.tensor([i for i, t in enumerate(targets) for _ in t])
            args = (ids.to(device), torch.tensor([x for t in targets for x in t], device=device), mask.to(device),
                    last.to(device), rows.to(device))
        start = self.weight.detach().clone()                         # W_s: this edit's ball is around it
        opt = torch.optim.Adam([self.weight], lr=p.lr)
        steps = 0
        # every other parameter frozen (flags restored after); the blocks below the edited one see the same
        # prompts in every pass and do not change, so they run once (`replay_lower_layers`)
        with frozen(self.model), replay_lower_layers(self.model, self.layer):
            self.weight.requires_grad_(True)
            try:
                with torch.no_grad():
                    loss_before = prompt_last_nll(self.model, *args).item()
                for _ in range(p.steps):
                    loss = prompt_last_nll(self.model, *args)
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
                    loss_after = prompt_last_nll(self.model, *args).item()
            finally:
                self.weight.grad = None
        return {"loss_before": loss_before, "loss_after": loss_after, "steps": float(steps),
                "max_abs_change": (self.weight.detach() - start).abs().max().item()}

    def reset(self) -> None:
        with torch.no_grad():
            self.weight.copy_(self.original)


__all__ = ["FTL", "Params", "prompt_last_nll"]
