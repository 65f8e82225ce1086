"""What every knowledge editor shares: the request, the editor contract, the teacher-forced batch.

An editor changes a causal LM in place so that `prompt + target_new` becomes the model's continuation,
one request at a time (the lifelong protocol calls `apply` T times in sequence, judging only the final
model), and `reset` returns the model to exactly f_0 (the single-edit protocol rolls back between edits).

    Editor(model, tokenizer, params)     wraps/remembers what it will change; nothing is edited yet
    prepare(train_requests)              optional, once: editors that learn to edit (MEND) train here,
                                         on requests disjoint from the evaluated ones
    apply(request) -> dict               one edit; returns stats (loss, steps, ...) as floats
    apply_batch(requests) -> dict        editors with `batch = True`: one update from all requests at once
                                         (EasyEdit's batch_edit; MEMIT's mass editing); others refuse
    reset()                              back to f_0, bit-identical (tests check it)

Requests follow EasyEdit's field names where one exists (prompt, target_new, ground_truth, subject,
rephrase_prompt(s), locality, portability) so users can bring ZsRE/CounterFact files unchanged.
"""

from __future__ import annotations

from typing import ClassVar, Protocol, runtime_checkable

import torch

from lifelong.data.edit_requests import EditRequest
from lifelong.families.lm import target_nll


@runtime_checkable
class EditorProtocol(Protocol):
    """The contract every registered editor meets (tests/test_editors_a.py checks each one in `EDITORS`).

    `records` says how the ledger records its edits: "weights" (the weights it changed, as an additive
    patch) or "module" (the modules it adds, through `state_dict`/`load_state_dict`, which re-attach
    them to a fresh model bit-identically). `learns_to_edit`: `prepare` trains on held-out requests.
    `batch`: `apply_batch(requests)` makes one update from all of them (for these editors `apply(r)` is
    `apply_batch([r])`).
    """

    name: ClassVar[str]
    Params: ClassVar[type]
    records: ClassVar[str]
    learns_to_edit: ClassVar[bool]
    batch: ClassVar[bool]

    def prepare(self, train_requests: list[EditRequest]) -> None: ...

    def apply(self, request: EditRequest) -> dict: ...

    def apply_batch(self, requests: list[EditRequest]) -> dict: ...

    def reset(self) -> None: ...


class Editor:
    """Base class: subclasses set `name`, `Params`, `records` and implement `apply` and `reset`
    (module editors also `state_dict`/`load_state_dict`)."""

    name: ClassVar[str] = ""
    Params: ClassVar[type]
    records: ClassVar[str] = "weights"
    learns_to_edit: ClassVar[bool] = False
    batch: ClassVar[bool] = False  # True: apply_batch makes one update from many requests
    layer: int  # the decoder layer it edits, set by every editor's constructor
    # Set by make_editor while `prepare` trains: log(values, step) to the run's trackers (None: not logged).
    log = None

    def __init__(self, model: torch.nn.Module, tokenizer, params) -> None:
        self.model, self.tokenizer, self.params = model, tokenizer, params

    def prepare(self, train_requests: list[EditRequest]) -> None:  # noqa: B027 - optional hook
        """Learned editors train here; others need nothing."""

    def apply(self, request: EditRequest) -> dict:
        raise NotImplementedError

    def apply_batch(self, requests: list[EditRequest]) -> dict:
        """One update from all `requests` (editors with `batch = True` override this)."""
        raise NotImplementedError(f"{self.name} edits one request at a time (no batch editing); "
                                  "apply the requests in sequence")

    def reset(self) -> None:
        raise NotImplementedError

    def check_state_layer(self, state: dict[str, torch.Tensor], holder: str) -> None:
        """A module editor's saved state (`state_dict`) continues only at the layer it was made at."""
        layer = int(state["layer"])
        if layer != self.layer:
            raise ValueError(f"{self.name}: the {holder} sits at layer {layer}, this editor edits layer {self.layer} "
                             f"(give layer={layer} to continue it)")


def fit_target(model, batch: dict[str, torch.Tensor], params: list[torch.Tensor], *, lr: float, steps: int,
               stop_loss: float, after_step=None, loss_fn=target_nll) -> int:
    """Adam on `params` to lower the target NLL of `batch` (`loss_fn(model, batch)`): at most `steps` updates,
    stopping as soon as the loss is below `stop_loss`; `after_step()` runs after every update (e.g. a
    projection back into a norm ball). Returns the number of updates made."""
    opt = torch.optim.Adam(params, lr=lr)
    for step in range(steps):
        loss = loss_fn(model, batch)
        if loss.item() < stop_loss:
            return step  # this pass only measured
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if after_step is not None:
            after_step()
    return steps
