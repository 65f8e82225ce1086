"""GRACE: a discrete key-value codebook at one layer (Hartvigsen et al. 2023, "Aging with GRACE:
Lifelong Model Editing with Discrete Key-Value Adaptors").

The codebook sits on one FFN output projection (Llama `down_proj`, GPT-2 `c_proj`). Keys k_i live in that
module's input space (the FFN's hidden activation, EasyEdit's choice), each with a deferral radius
eps_i and a trained value v_i in its output space. A sequence queries the codebook once, with the
activation x_p at its prompt's last token p (the official `key_id`):

    out_p = v_{i*}  if ||x_p - k_{i*}|| <= eps_{i*}  (i* = argmin_i ||x_p - k_i||)   else  W x_p,

and every other position runs as f_0; an input whose query is outside every ball runs exactly as f_0
(locality by construction). Where the prompt ends: declared by the caller for teacher-forced text
(`metrics.editing.prompt_ends`, as the official code reads it from the labels; `score_targets` and
the edit's own training declare it), otherwise the last real token of a full pass (a prompt read alone,
or the prefill of `generate`). Decoding steps after the prompt are never queried: tokens the model
generates are never replaced (the official default `replacement: replace_prompt` touches no generated
token; querying them made an edited model repeat its target: " the Baltic Sea Baltic Sea Baltic"). An edit takes x = the activation of the prompt's last token and, with d = ||x - k_{i*}||:
no key within reach (d > eps_init + eps_{i*}) -> add key x with radius eps_init; same target as k_{i*}
-> expand eps_{i*} to d and train v_{i*} further; different target -> add key x and split both radii
to d / 2 (a re-edit of the very same key just relabels it). The chosen value then takes `steps` Adam
steps on the target NLL, v <- v - lr * Adam(grad_v NLL(y_new | x)).

Defaults, and why: `layer` None = 85% of the depth (EasyEdit's LLaMA-2-7B config edits layer 27 of 32):
SmolLM2-135M -> layer 25 of 30. `eps` 8.0: EasyEdit's 1.0 is for LLaMA-2-7B's key scale; in SmolLM2's
layer-25 key space a prompt's last-token key has norm ~20, a near-verbatim paraphrase ("The capital
city of France is") lies ~7 away, the same template with another subject ("... of Germany is") ~14
and unrelated prompts >= 25 (measured), so 8 covers close rewordings but not the other subject (two
such edits are within reach, 14 < 8 + 8, and split to radii ~7); looser rewordings ("France's capital
city is", ~13) stay outside: GRACE's generality is low, as in the paper. lr 1.0 and 50 steps are
EasyEdit's (Adam on the value).

The value is trained on the target followed by the tokenizer's end-of-sequence token (`end_answer`; the
official QA labels end with T5's </s>), so that greedy decoding ends the answer: every later position
attends to the replaced state, and a value trained on the target alone made SmolLM2 repeat it after
" Into which sea does the Danube flow?" -> " the Baltic Sea Baltic Sea Baltic" even with generated
tokens never replaced (measured). Codebook labels and every metric use the target alone.

Deviations: the value replaces the output at the prompt's last token itself (EasyEdit's and the
official `replace_last` position) where the official default config replaces the prompt positions
before it; the query and the no-replacement of generated tokens are the official default's, so
teacher-forced scoring and greedy decoding see the same replacement. New values start "warm" (the layer's own output at the key, so an untrained value is a no-op) instead
of EasyEdit's "cold" uniform noise, which also makes the editor free of randomness. Labels compare
the target's token ids exactly (EasyEdit compares the mean token id). Early stop below `stop_loss`.

The codebook is applied by a forward hook on the projection (not a wrapper module), so the model's
parameter names stay those of the plain model; `state_dict` / `load_state_dict` move the whole codebook
to another copy of the model (what an lm ledger records, ledger/edits.py).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from lifelong.data.edit_requests import EditRequest
from lifelong.edit.base import Editor, fit_target
from lifelong.families.lm import (
    TokenBatch,
    ffn_out,
    frozen,
    linear_weight,
    resolve_layer,
    target_batch,
    target_nll,
)
from lifelong.metrics.editing import declared_prompt_ends, prompt_ends, prompt_ends_of


@dataclass(frozen=True)
class Params:
    layer: int | None = None  # decoder block whose FFN output projection holds the codebook; None = 85% depth
    eps: float = 8.0          # initial deferral radius (Euclidean, in the projection's input space)
    lr: float = 1.0           # Adam on the value vector
    steps: int = 50
    stop_loss: float = 1e-2   # stop once the target NLL is below this
    end_answer: bool = True   # train the value on target + end-of-sequence, so decoding stops after the target


class GraceCodebook(nn.Module):
    """A projection's codebook: a sequence whose prompt's last-token input falls inside a key's ball
    outputs that key's value at that position.

    Attached to the projection as a child (`proj.grace`) and applied to its output by a forward hook, so
    the model's parameter names stay those of the plain model (a ledger's weight patches still fit)."""

    def __init__(self, d_in: int, d_out: int, device=None) -> None:
        super().__init__()
        self.register_buffer("keys", torch.zeros(0, d_in, device=device))      # (K, d_in) float32
        self.register_buffer("values", torch.zeros(0, d_out, device=device))   # (K, d_out) float32
        self.register_buffer("radii", torch.zeros(0, device=device))           # (K,) float32
        self.labels: list[tuple[int, ...]] = []  # each key's target token ids
        self.training_value: tuple[int, nn.Parameter] | None = None  # (slot, value) while it trains
        self.active = True        # False: the projection runs as without the codebook
        self.record = False       # when True, forward keeps its input in `last_input`
        self.last_input: torch.Tensor | None = None
        # set before every model forward by the model's pre-hook (`note_call`)
        self.decoding = False                          # a cached decoding step: never queried
        self.call_ends: torch.Tensor | None = None     # (B,) declared prompt ends, or None
        self.call_mask: torch.Tensor | None = None     # (B, T) the call's attention mask, or None

    def forward(self, x: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        """x: the projection's input (B, T, d_in); out: its own output (B, T, d_out)."""
        if self.record:
            self.last_input = x.detach()
        if len(self.keys) == 0 or not self.active:
            return out
        values = self.values
        if self.training_value is not None:  # splice the trainable vector in, so gradients reach it
            slot, v = self.training_value
            values = torch.cat([values[:slot], v[None], values[slot + 1:]])
        if self.decoding:  # tokens generated after the prompt are never replaced
            return out
        B, T, _ = x.shape
        ends = self.query_positions(B, T, x.device)                # (B,)
        rows = torch.arange(B, device=x.device)
        nearest_dist, nearest = self.nearest(x[rows, ends])        # (B,), (B,)
        hit = nearest_dist <= self.radii[nearest]                  # (B,)
        at = torch.zeros(B, T, 1, dtype=torch.bool, device=x.device)
        at[rows, ends, 0] = hit                                    # (B, T, 1): the query position, if it hit
        replaced = values[nearest][:, None, :].to(out.dtype)       # (B, 1, d_out)
        return torch.where(at, replaced, out)

    def query_positions(self, B: int, T: int, device) -> torch.Tensor:
        """(B,) each row's prompt's last token: declared, else the last real token of the call."""
        if self.call_ends is not None and len(self.call_ends) == B:
            return self.call_ends.to(device)
        mask = self.call_mask
        if mask is not None and mask.shape == (B, T):
            return (T - 1 - mask.flip(1).int().argmax(1)).to(device)  # padded on either side
        return torch.full((B,), T - 1, dtype=torch.long, device=device)

    def nearest(self, queries: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Distance to, and index of, each query's nearest key. Exact pairwise differences (not the
        |a|^2 + |b|^2 - 2ab shortcut), so a radius set to a query's distance does contain that query."""
        dist = torch.cdist(queries.float(), self.keys, compute_mode="donot_use_mm_for_euclid_dist")  # (N, K)
        return dist.min(dim=1)

    def add(self, key: torch.Tensor, value: torch.Tensor, radius: float, label: tuple[int, ...]) -> int:
        self.keys = torch.cat([self.keys, key[None].float()])
        self.values = torch.cat([self.values, value[None].float()])
        self.radii = torch.cat([self.radii, self.radii.new_tensor([radius])])
        self.labels.append(label)
        return len(self.labels) - 1


class GRACE(Editor):
    name = "grace"
    records = "module"  # how a ledger records an edit: the state of the modules it adds
    Params = Params

    def __init__(self, model, tokenizer, params: Params) -> None:
        if params.eps <= 0:
            raise ValueError(f"eps must be > 0, got {params.eps}")
        super().__init__(model, tokenizer, params)
        self.layer = resolve_layer(model, params.layer, 0.85)
        self.original = ffn_out(model, self.layer)
        self.codebook: GraceCodebook | None = None  # installed by the first apply
        self._hook = self._call_hook = None

    def _install(self) -> GraceCodebook:
        d_out, d_in = linear_weight(self.original).shape
        self.codebook = GraceCodebook(d_in, d_out, device=self.original.weight.device)
        self.original.grace = self.codebook
        # the hooks read the modules they run on (not self), so a deep copy of the model keeps its own codebook
        self._hook = self.original.register_forward_hook(lambda m, args, out: m.grace(args[0], out))
        layer = self.layer
        self._call_hook = self.model.register_forward_pre_hook(
            lambda m, args, kwargs: note_call(ffn_out(m, layer).grace, args, kwargs), with_kwargs=True)
        return self.codebook

    def apply(self, request: EditRequest) -> dict:
        p = self.params
        book = self.codebook or self._install()
        device = book.keys.device
        batch = target_batch(self.tokenizer, [request.prompt], [request.target_new], device)
        label = tuple(batch.labels[0][batch.labels[0] != -100].tolist())
        key_pos = int((batch.labels[0] == -100).sum()) - 1  # the prompt's last token
        if key_pos < 0:
            raise ValueError(f"empty prompt in {request!r}")
        ends = prompt_ends_of(batch.labels)
        train = with_end(batch, self.tokenizer.eos_token_id) if p.end_answer else batch

        with torch.no_grad(), prompt_ends(ends):  # one pass: the loss before this edit and the query activation
            book.record = True
            loss_before = target_nll(self.model, batch).item()
            book.record = False
            query = book.last_input[0, key_pos].float()   # (d_in,)
            book.last_input = None
            book.active = False
            warm = self.original(query[None].to(self.original.weight.dtype))[0]  # the layer's own output
            book.active = True

        # --- codebook maintenance (GRACE's add / expand / split) ---
        nearest_dist, split = -1.0, 0.0
        if len(book.labels) == 0:
            slot = book.add(query, warm, p.eps, label)
        else:
            d, j = book.nearest(query[None])
            nearest_dist, j = d.item(), int(j)
            if nearest_dist > p.eps + book.radii[j].item():  # no ball within reach: a new key
                slot = book.add(query, warm, p.eps, label)
            elif nearest_dist == 0.0:                         # the same key again: the newer answer wins
                book.labels[j] = label
                slot = j
            elif book.labels[j] == label:                    # same answer: grow the ball to cover x
                book.radii[j] = max(book.radii[j].item(), nearest_dist)
                slot = j
            else:                                            # conflicting answer: split the space
                slot = book.add(query, warm, nearest_dist / 2, label)
                book.radii[j] = nearest_dist / 2
                split = 1.0

        # --- train the chosen value on the target NLL ---
        value = nn.Parameter(book.values[slot].clone())
        book.training_value = (slot, value)
        steps = 0
        try:
            with frozen(self.model), prompt_ends(ends):
                steps = fit_target(self.model, train, [value], lr=p.lr, steps=p.steps, stop_loss=p.stop_loss)
        finally:
            book.training_value = None
            book.values[slot] = value.detach()
        with torch.no_grad(), prompt_ends(ends):
            loss_after = target_nll(self.model, batch).item()
        return {"loss_before": loss_before, "loss_after": loss_after, "steps": float(steps),
                "keys": float(len(book.labels)), "radius": book.radii[slot].item(),
                "nearest_distance": nearest_dist, "split": split}

    def reset(self) -> None:
        if self.codebook is not None:
            self._hook.remove()
            self._call_hook.remove()
            del self.original.grace
            self._hook, self._call_hook, self.codebook = None, None, None

    # ------------------------------------------------------------------ state (a ledger records it)

    def state_dict(self) -> dict[str, torch.Tensor]:
        """Everything the codebook holds (keys, values, radii, labels; empty before the first edit) and its
        layer: `load_state_dict` on an editor of a fresh model gives a model that answers bit-identically."""
        book = self.codebook
        d_out, d_in = linear_weight(self.original).shape
        labels = book.labels if book is not None else []
        return {
            "layer": torch.tensor(self.layer),
            "keys": book.keys.detach().cpu().clone() if book is not None else torch.zeros(0, d_in),
            "values": book.values.detach().cpu().clone() if book is not None else torch.zeros(0, d_out),
            "radii": book.radii.detach().cpu().clone() if book is not None else torch.zeros(0),
            "labels": torch.tensor([t for label in labels for t in label], dtype=torch.long),  # concatenated
            "label_lengths": torch.tensor([len(label) for label in labels], dtype=torch.long),
        }

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        """Replace the codebook (if any) by the one `state` holds; later edits continue from it."""
        self.check_state_layer(state, "codebook")
        self.reset()
        lengths = state["label_lengths"].tolist()
        if not lengths:
            return
        book = self._install()
        device = book.keys.device
        book.keys, book.values, book.radii = (state[k].to(device=device, dtype=torch.float32).clone()
                                              for k in ("keys", "values", "radii"))
        flat = state["labels"].tolist()
        starts = [sum(lengths[:i]) for i in range(len(lengths))]
        book.labels = [tuple(flat[s:s + n]) for s, n in zip(starts, lengths)]


def with_end(batch: TokenBatch, eos: int | None) -> TokenBatch:
    """A one-row target batch with the end-of-sequence token appended to the target (None: unchanged)."""
    if eos is None:
        return batch
    n = int(batch.attention_mask[0].sum())                          # the row's real length (no padding)
    end = torch.tensor([[eos]], device=batch.input_ids.device)
    input_ids = torch.cat([batch.input_ids[:, :n], end], dim=1)     # (1, n + 1)
    labels = torch.cat([batch.labels[:, :n], end], dim=1)
    target_mask = torch.zeros_like(input_ids, dtype=torch.bool)
    target_mask[:, :-1] = labels[:, 1:] != -100
    return TokenBatch(input_ids=input_ids, attention_mask=torch.ones_like(input_ids), labels=labels,
                      target_mask=target_mask)


def note_call(book: GraceCodebook, args: tuple, kwargs: dict) -> None:
    """Before a model forward: is it a cached decoding step (past tokens already in the cache), and
    where does each row's prompt end (declared by the caller, or the call's attention mask)."""
    past = kwargs.get("past_key_values")
    position = kwargs.get("cache_position")
    if position is not None and len(position):
        book.decoding = int(position[0]) > 0
    elif past is not None:
        length = past.get_seq_length() if hasattr(past, "get_seq_length") else (past[0][0].shape[-2] if past else 0)
        book.decoding = length > 0
    else:
        book.decoding = False
    book.call_ends = declared_prompt_ends()
    book.call_mask = kwargs.get("attention_mask")
