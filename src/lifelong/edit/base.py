"""What every knowledge editor shares: the request, the editor contract, the teacher-forced batch.

An editor changes a causal LM in place so that `prompt + target_new` becomes the model's continuation,
one request at a time (the lifelong protocol calls `apply` T times in sequence, judging only the final
model), and `reset` returns the model to exactly f_0 (the single-edit protocol rolls back between edits).

    Editor(model, tokenizer, params)     wraps/remembers what it will change; nothing is edited yet
    prepare(train_requests)              optional, once: editors that learn to edit (MEND) train here,
                                         on requests disjoint from the evaluated ones
    apply(request) -> dict               one edit; returns stats (loss, steps, ...) as floats
    reset()                              back to f_0, bit-identical (tests check it)

Requests follow EasyEdit's field names where one exists (prompt, target_new, ground_truth, subject,
rephrase_prompt(s), locality, portability) so users can bring ZsRE/CounterFact files unchanged.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch


@dataclass(frozen=True)
class Probe:
    """A prompt and the answer it is scored against (for locality: the base model's own answer)."""

    prompt: str
    answer: str


@dataclass(frozen=True)
class EditRequest:
    prompt: str            # "The capital of France is"
    target_new: str        # " Lyon" (a leading space where the tokenizer needs one)
    subject: str           # "France": ROME locates the subject's last token in the prompt
    ground_truth: str = ""  # " Paris" ("" when unknown, e.g. zsRE insertion)
    paraphrases: tuple[str, ...] = ()          # generality prompts, same target
    locality: tuple[Probe, ...] = ()           # unrelated prompts whose answers must not change
    portability: tuple[Probe, ...] = ()        # consequences of the new fact
    relation: str = ""     # "capital", "currency", ... (for reports)
    case_id: str = ""


class Editor:
    """Base class: subclasses set `name`, `Params` and implement `apply` and `reset`."""

    name: ClassVar[str] = ""
    Params: ClassVar[type]

    def __init__(self, model: torch.nn.Module, tokenizer, params) -> None:
        self.model, self.tokenizer, self.params = model, tokenizer, params

    def prepare(self, train_requests: list[EditRequest]) -> None:  # noqa: B027 - optional hook
        """Learned editors train here; others need nothing."""

    def apply(self, request: EditRequest) -> dict:
        raise NotImplementedError

    def reset(self) -> None:
        raise NotImplementedError

    def check_state_layer(self, state: dict[str, torch.Tensor], holder: str) -> None:
        """A module editor's saved state (`state_dict`) continues only at the layer it was made at."""
        layer = int(state["layer"])
        if layer != self.layer:
            raise ValueError(f"{self.name}: the {holder} sits at layer {layer}, this editor edits layer {self.layer} "
                             f"(give layer={layer} to continue it)")


def target_batch(tokenizer, prompts: list[str], targets: list[str], device=None) -> dict[str, torch.Tensor]:
    """Teacher-forced batch of `prompt + target`: input_ids, attention_mask, and labels that are -100
    everywhere except the target tokens (so a causal-LM loss is the target's NLL). Right-padded.
    `target_mask[i, j]` marks the positions whose *logits* predict target tokens (labels shifted)."""
    ids, labels = [], []
    for prompt, target in zip(prompts, targets, strict=True):
        p = tokenizer(prompt, add_special_tokens=False)["input_ids"]
        t = tokenizer(target, add_special_tokens=False)["input_ids"]
        if not t:
            raise ValueError(f"target {target!r} tokenizes to nothing")
        ids.append(p + t)
        labels.append([-100] * len(p) + t)
    width = max(map(len, ids))
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (tokenizer.eos_token_id or 0)
    input_ids = torch.full((len(ids), width), pad, dtype=torch.long)
    attention = torch.zeros((len(ids), width), dtype=torch.long)
    label_t = torch.full((len(ids), width), -100, dtype=torch.long)
    for i, (row, lab) in enumerate(zip(ids, labels)):
        input_ids[i, : len(row)] = torch.tensor(row)
        attention[i, : len(row)] = 1
        label_t[i, : len(lab)] = torch.tensor(lab)
    target_mask = torch.zeros_like(attention, dtype=torch.bool)
    target_mask[:, :-1] = label_t[:, 1:] != -100
    batch = {"input_ids": input_ids, "attention_mask": attention, "labels": label_t, "target_mask": target_mask}
    return {k: v.to(device) for k, v in batch.items()} if device is not None else batch


def fit_target(model, batch: dict[str, torch.Tensor], params: list[torch.Tensor], *, lr: float, steps: int,
               stop_loss: float, after_step=None) -> int:
    """Adam on `params` to lower the target NLL of `batch`: at most `steps` updates, stopping as soon as
    the loss is below `stop_loss`; `after_step()` runs after every update (e.g. a projection back into
    a norm ball). Returns the number of updates made."""
    opt = torch.optim.Adam(params, lr=lr)
    for step in range(steps):
        loss = target_nll(model, batch)
        if loss.item() < stop_loss:
            return step  # this pass only measured
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if after_step is not None:
            after_step()
    return steps


def target_nll(model, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Mean negative log-likelihood of the target tokens (per request, then averaged)."""
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    logp = torch.log_softmax(logits[:, :-1].float(), dim=-1)
    labels = batch["labels"][:, 1:]
    mask = labels != -100
    token_lp = logp.gather(-1, labels.clamp_min(0).unsqueeze(-1)).squeeze(-1) * mask
    return -(token_lp.sum(1) / mask.sum(1)).mean()
