"""LoRA editing: fit a low-rank adapter to the edit (Hu et al. 2022, "LoRA"; EasyEdit's LoRA editor).

Frozen W plus a trainable rank-r update on each target module,

    h = W x + (alpha / r) * B A x,   A, B <- Adam(grad_{A,B} NLL(y_new | x)),   B_0 = 0, A_0 ~ Kaiming.

The adapter is the real `peft` one (`get_peft_model`, which injects LoRA layers into the model in
place). It appears at the first `apply`; later edits keep training the same adapter (the lifelong
protocol); `reset` unloads it without merging, which puts the original modules back (their weights were
never written), so f_0 returns bit-identically, and the next `apply` starts a fresh adapter.

Defaults, and why: `target_modules` () = the FFN output projection of every decoder layer, found via
`families.lm.ffn_out` so that one default works for Llama and GPT-2 (EasyEdit's LLaMA config uses
q_proj/v_proj and lists up/down_proj as the alternative; facts are usually located in FFNs); or give
module-name suffixes (peft's matching), e.g. ("q_proj", "v_proj"). rank 8, alpha 32, lr 5e-3 and 70
steps are EasyEdit's LLaMA-2-7B values; SmolLM2-135M reaches the edit in fewer, hence `stop_loss`.

Deviations: lora_dropout 0 (EasyEdit 0.1) so that an edit is a deterministic function of the seed; A is
initialised from a generator seeded by `seed` (peft draws it from the global RNG); a fresh Adam per edit
(as EasyEdit); early stop once the target NLL is below `stop_loss`. `apply_batch` fits the adapter
to all its requests at once (the mean of their NLLs); `apply(r)` is `apply_batch([r])`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from lifelong.data.edit_requests import EditRequest
from lifelong.edit.base import Editor, fit_target
from lifelong.families.lm import decoder_layers, ffn_out, is_transposed, target_batch, target_nll
from lifelong.modules.peft_wrap import bare_model


@dataclass(frozen=True)
class Params:
    target_modules: tuple[str, ...] = ()  # () = every layer's FFN output projection
    rank: int = 8
    alpha: float = 32.0                   # LoRA scale alpha / rank
    lr: float = 5e-3
    steps: int = 70
    stop_loss: float = 1e-2               # stop once the target NLL is below this
    seed: int = 0


class LoRAEdit(Editor):
    name = "lora"
    records = "weights"  # how a ledger records an edit: an additive weight patch
    batch = True          # apply_batch: one adapter fit on all requests
    Params = Params

    def __init__(self, model, tokenizer, params: Params) -> None:
        if params.rank < 1:
            raise ValueError(f"rank must be >= 1, got {params.rank}")
        super().__init__(model, tokenizer, params)
        self.peft_model = None  # created by the first apply
        # get_peft_model freezes every base parameter; reset gives the caller's flags back
        self.flags = {n: q.requires_grad for n, q in model.named_parameters()}

    def _target_modules(self) -> list[str]:
        if self.params.target_modules:
            return list(self.params.target_modules)
        wanted = {id(ffn_out(self.model, layer)) for layer in range(len(decoder_layers(self.model)))}
        return [name for name, module in self.model.named_modules() if id(module) in wanted]

    def _inject(self) -> None:
        from peft import LoraConfig, get_peft_model  # heavy optional dependency, imported at first use

        # GPT-2's Conv1D stores weights (in, out); peft must be told, or it warns and guesses
        config = LoraConfig(r=self.params.rank, lora_alpha=self.params.alpha, lora_dropout=0.0,
                            target_modules=self._target_modules(), bias="none",
                            fan_in_fan_out=is_transposed(ffn_out(self.model, 0)))
        self.peft_model = get_peft_model(self.model, config)  # injects into self.model in place
        # deterministic A (B stays 0, so the adapter starts as an exact no-op); same init as peft's
        g = torch.Generator().manual_seed(self.params.seed)
        with torch.no_grad():
            for name, q in sorted(self._adapter_parameters(), key=lambda nq: nq[0]):
                if "lora_A" in name:
                    bound = 1 / math.sqrt(q.shape[1])  # kaiming_uniform(a=sqrt(5)) on (r, in)
                    q.copy_(torch.empty(q.shape).uniform_(-bound, bound, generator=g).to(q))

    def _adapter_parameters(self) -> list[tuple[str, torch.nn.Parameter]]:
        return [(n, q) for n, q in self.model.named_parameters() if "lora_" in n]

    def apply(self, request: EditRequest) -> dict:
        return self.apply_batch([request])

    def apply_batch(self, requests: list[EditRequest]) -> dict:
        """The adapter fitted to all requests at once (mean of their target NLLs)."""
        if not requests:
            raise ValueError("lora: apply_batch needs at least one request")
        p = self.params
        batch = target_batch(self.tokenizer, [r.prompt for r in requests], [r.target_new for r in requests])
        if self.peft_model is None:
            self._inject()
        adapter = [q for _, q in self._adapter_parameters()]
        batch = batch.to(adapter[0].device)
        with torch.no_grad():
            loss_before = target_nll(self.model, batch).item()
        steps = fit_target(self.model, batch, adapter, lr=p.lr, steps=p.steps, stop_loss=p.stop_loss)
        for q in adapter:
            q.grad = None
        with torch.no_grad():
            loss_after = target_nll(self.model, batch).item()
        return {"loss_before": loss_before, "loss_after": loss_after, "steps": float(steps),
                "adapter_parameters": float(sum(q.numel() for q in adapter))}

    def reset(self) -> None:
        if self.peft_model is not None:
            self.peft_model.unload()  # swaps every LoRA layer for its untouched base layer
            self.peft_model = None
            bare_model(self.model)  # and peft's marks off the model it wrapped
        for n, q in self.model.named_parameters():
            q.requires_grad_(self.flags[n])
