"""T-Patcher (Huang, Shen, Zhang, Zhou, Rong, Xiong, ICLR 2023, "Transformer-Patcher: One Mistake
Worth One Neuron").

Each edit adds one neuron (key k, bias b, value v) to an FFN (the last one by default); the neurons
accumulate over sequential edits and the base weights never change:

    FFN'(x) = FFN(x) + sum_i relu(x . k_i + b_i) v_i

Only the new neuron trains (Adam), on
    L = NLL(target | prompt) + act_weight * L_act + memory_weight * (L_gap + L_silent)
    L_act    = mean top-5 exp(act_margin - a(x_e))                (fire on the edit's positions)
    L_gap    = mean top-1000 exp(a(x_m) - a(x_e) + gap_margin)    (edit activations above memory ones)
    L_silent = mean top-1000 exp(a(x_m) - memory_margin)          (memory activations below -3)
with a(x) = x . k + b the pre-activation, x_e the FFN inputs at the positions that predict the target,
and x_m a memory of FFN inputs of other text: `memory_tokens` tokens of the corpus that ROME's
covariance uses (the Python reference shipped with CPython), the prompts and true answers of
`memory_facts` facts of the `train` split (cloze and question style: the official memory is the
training data's inputs), and every earlier edit's x_e (the paper's memory update, so a new neuron stays
silent on old edits). Never the request's locality probes: those are what the edit is scored on.
Losses, margins (3 and -3), weights (1 and 5), top-k and the key init k = x_e / ||x_e||^2 (activation
1 on the edit) follow the official code's defaults; training stops once the target is the argmax at
every position, every edit activation is above `act_margin` and every memory activation below 0, or
after `max_steps`.

Deviations: the neuron's activation is a ReLU whatever the model's own activation (SiLU-gated for
Llama), so a neuron whose pre-activation is negative adds exactly 0 (a memory input gives the base
model's output bit for bit); value init 0 (the paper draws it at random), scaled by `amplify` as the
paper's amplification factor; memory of 2000 corpus tokens and 100 train facts (2 x 100 texts) instead of 40000 training-set
states (the memory's FFN inputs cost a forward pass through the model on one CPU core).

`state_dict` / `load_state_dict` move the neurons and the edit memory to another copy of the model (what
an lm ledger records, ledger/edits.py).
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import nn

from lifelong.data.edit_requests import EditRequest
from lifelong.edit.base import Editor
from lifelong.edit.key_value import corpus_chunks
from lifelong.edit.requests import train_fact_texts
from lifelong.families.lm import decoder_layers, resolve_layer, target_batch, target_nll_from_logits


@dataclass(frozen=True)
class Params:
    layer: int = -1                # which FFN receives the neurons (-1: the last, as in the paper)
    lr: float = 1e-2
    weight_decay: float = 0.01     # Adam's L2 term, as the official optimizer
    max_steps: int = 100
    act_weight: float = 1.0        # alc
    memory_weight: float = 5.0     # mlc
    act_margin: float = 0.0        # act_margin_val
    gap_margin: float = 3.0        # margin_val1
    memory_margin: float = -3.0    # margin_val2
    act_top_k: int = 5
    memory_top_k: int = 1000
    amplify: float = 10.0          # v = amplify * v_raw (amplify_con)
    memory_tokens: int = 2000
    memory_facts: int = 100        # `train`-split facts (cloze + question text) in the memory
    corpus: str = "python-reference"
    seed: int = 0


class PatchNeurons(nn.Module):
    """The added neurons of one FFN: relu(x K^T + b) V, frozen ones in buffers plus at most one that
    is being trained. Attached to the FFN as a child (`ffn.t_patcher`) and added to its output by a
    forward hook, so the FFN's own module paths stay as they were."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.register_buffer("keys", torch.zeros(0, width))    # (n, d)
        self.register_buffer("biases", torch.zeros(0))         # (n,)
        self.register_buffer("values", torch.zeros(0, width))  # (n, d)
        self.new: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None  # (k, b, v) in training

    def __len__(self) -> int:
        return self.keys.shape[0]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        keys, biases, values = self.keys, self.biases, self.values
        if self.new is not None:
            k, b, v = self.new
            keys, biases, values = (torch.cat([keys, k[None]]), torch.cat([biases, b[None]]),
                                    torch.cat([values, v[None]]))
        act = torch.relu(x @ keys.T.to(x.dtype) + biases.to(x.dtype))  # (B, T, n)
        return act @ values.to(x.dtype)                                # (B, T, d)

    def add(self, k: torch.Tensor, b: torch.Tensor, v: torch.Tensor) -> None:
        self.keys = torch.cat([self.keys, k.detach()[None]])
        self.biases = torch.cat([self.biases, b.detach()[None]])
        self.values = torch.cat([self.values, v.detach()[None]])


class TPatcher(Editor):
    name = "t_patcher"
    records = "module"  # how a ledger records an edit: the state of the modules it adds
    Params = Params

    def __init__(self, model, tokenizer, params: Params = Params()) -> None:
        super().__init__(model, tokenizer, params)
        self.layer = resolve_layer(model, params.layer, 1.0)
        self.ffn = decoder_layers(model)[self.layer].mlp
        self.patches: PatchNeurons | None = None
        self._hook = None
        # FFN inputs the neurons must stay silent on: the corpus's (computed once, kept across resets)
        # and every applied edit's (cleared by reset).
        self._corpus_memory: torch.Tensor | None = None  # (M, d)
        self._edit_memory: list[torch.Tensor] = []        # (P_i, d) each
        self._device = next(model.parameters()).device

    # ------------------------------------------------------------------ the edit

    def apply(self, request: EditRequest) -> dict:
        p = self.params
        self._attach()
        memory = self.memory()
        batch = target_batch(self.tokenizer, [request.prompt], [request.target_new], self._device)
        x_edit = self.ffn_inputs_at_targets(batch)                     # (P, d): positions predicting the target
        labels = batch.labels[:, 1:][batch.target_mask[:, :-1]]  # (P,)

        mean = x_edit.float().mean(0)
        k = nn.Parameter((mean / mean.norm() ** 2).to(x_edit.dtype))       # a(mean x_e) = 1 at the start
        b = nn.Parameter(torch.zeros((), dtype=x_edit.dtype, device=self._device))
        v_raw = nn.Parameter(torch.zeros_like(k))
        opt = torch.optim.Adam([k, b, v_raw], lr=p.lr, weight_decay=p.weight_decay)

        nll_first = None
        steps = 0
        try:
            for step in range(p.max_steps + 1):
                self.patches.new = (k, b, p.amplify * v_raw)
                logits = self.model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
                nll = target_nll_from_logits(logits, batch.labels)
                a_edit, a_mem = x_edit @ k + b, memory @ k + b                # (P,), (M,)
                nll_first = nll.item() if nll_first is None else nll_first
                correct = bool((logits[batch.target_mask].argmax(-1) == labels).all())
                if (correct and a_edit.min() > p.act_margin and a_mem.max() < 0) or step == p.max_steps:
                    break
                act_loss = top_k_mean(torch.exp(p.act_margin - a_edit), p.act_top_k)
                gap_loss = top_k_mean(torch.exp(a_mem[:, None] - a_edit[None, :] + p.gap_margin), p.memory_top_k)
                silent_loss = top_k_mean(torch.exp(a_mem - p.memory_margin), p.memory_top_k)
                loss = nll + p.act_weight * act_loss + p.memory_weight * (gap_loss + silent_loss)
                # Only the new neuron's gradients: the model's .grad stays untouched, and autograd
                # skips every weight gradient of the base model (most of a backward pass).
                grads = torch.autograd.grad(loss, [k, b, v_raw])
                for param, grad in zip((k, b, v_raw), grads):
                    param.grad = grad
                opt.step()
                steps = step + 1
        finally:
            self.patches.new = None
        self.patches.add(k, b, p.amplify * v_raw)
        # The paper's memory update: later neurons must stay silent on this edit's inputs too.
        self._edit_memory.append(x_edit.detach())
        return {"nll_before": float(nll_first), "nll_after": float(nll.item()), "steps": float(steps),
                "edit_min_act": float(a_edit.detach().min()), "memory_max_act": float(a_mem.detach().max()),
                "patches": float(len(self.patches))}

    def reset(self) -> None:
        """Removes every neuron, the hook and the attached module: the FFN is exactly the original."""
        if self._hook is not None:
            self._hook.remove()
            del self.ffn.t_patcher
        self._hook, self.patches = None, None
        self._edit_memory = []  # earlier edits leave the memory too

    # ------------------------------------------------------------------ state (a ledger records it)

    def state_dict(self) -> dict[str, torch.Tensor]:
        """The neurons (keys, biases, values; none before the first edit), their layer, and the earlier
        edits' FFN inputs the next neuron must stay silent on: `load_state_dict` on an editor of a fresh
        model gives a model that answers bit-identically, and later edits continue as this editor would."""
        width = self.model.config.hidden_size
        empty = torch.zeros(0, width)
        patches = self.patches
        return {
            "layer": torch.tensor(self.layer),
            "keys": patches.keys.detach().cpu().clone() if patches is not None else empty,
            "biases": patches.biases.detach().cpu().clone() if patches is not None else torch.zeros(0),
            "values": patches.values.detach().cpu().clone() if patches is not None else empty,
            "edit_memory": torch.cat(self._edit_memory).detach().cpu() if self._edit_memory else empty,  # (P, d)
        }

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        """Replace the neurons (if any) by those `state` holds; later edits continue from them."""
        self.check_state_layer(state, "neuron set")
        self.reset()
        if len(state["keys"]) == 0:
            return
        self._attach()
        for name in ("keys", "biases", "values"):
            setattr(self.patches, name, state[name].to(self._device).clone())
        memory = state["edit_memory"]
        self._edit_memory = [memory.to(self._device).clone()] if len(memory) else []

    # ------------------------------------------------------------------ pieces

    def _attach(self) -> None:
        if self._hook is not None:
            return
        width = self.model.config.hidden_size  # GPT-2's config maps it to n_embd
        param = next(self.ffn.parameters())
        self.patches = PatchNeurons(width).to(device=param.device, dtype=param.dtype)
        self.ffn.t_patcher = self.patches
        # the hook reads the module it runs on (not self), so a deep copy of the model keeps its own neurons
        self._hook = self.ffn.register_forward_hook(lambda m, args, out: out + m.t_patcher(args[0]))

    def ffn_inputs_at_targets(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """(P, d): the FFN's inputs at the positions whose logits predict target tokens. Patches never
        change them (they act after this FFN), so the current model gives the base model's inputs."""
        with self._capture_input() as seen, torch.no_grad():
            self.model(input_ids=batch.input_ids, attention_mask=batch.attention_mask)
        return seen["x"][batch.target_mask]

    def ffn_inputs_at_tokens(self, token_lists: list[list[int]]) -> list[torch.Tensor]:
        """The FFN's inputs at every token of each sequence, one forward per sequence (no padding)."""
        out = []
        with self._capture_input() as seen, torch.no_grad():
            for ids in token_lists:
                self.model(input_ids=torch.tensor([ids], device=self._device))
                out.append(seen["x"][0])
        return out

    @contextmanager
    def _capture_input(self):
        seen: dict[str, torch.Tensor] = {}
        handle = self.ffn.register_forward_hook(lambda _m, args, _out: seen.__setitem__("x", args[0]))
        try:
            yield seen
        finally:
            handle.remove()

    def memory(self) -> torch.Tensor:
        """(M, d): FFN inputs at every token of `memory_tokens` corpus tokens and of `memory_facts` train
        facts' texts, then earlier edits'."""
        if self._corpus_memory is None:
            p = self.params
            chunks = corpus_chunks(self.tokenizer, p.corpus, 128, p.memory_tokens)
            chunks += [self.tokenizer(t, add_special_tokens=False)["input_ids"] for t in train_fact_texts(p.memory_facts)]
            self._corpus_memory = torch.cat(self.ffn_inputs_at_tokens(chunks))
        return torch.cat([self._corpus_memory, *self._edit_memory])


def top_k_mean(values: torch.Tensor, k: int) -> torch.Tensor:
    """Mean of the k largest entries (the official `top{k}_exp` losses)."""
    flat = values.reshape(-1)
    return torch.topk(flat, min(k, flat.numel())).values.mean()
