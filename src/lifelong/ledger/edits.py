"""The changes of an lm ledger: knowledge edits of a causal LM, each recorded as one reversible change.

    lifelong init DIR --family lm                   base model + its probes (probes.lm_probes)
    lifelong edit --ledger DIR --method ft_l ...    one `edit` change: every request applied in order

An edit change applies its requests in sequence (the lifelong protocol) to the ledger's current model
and records: the method and its resolved knobs, the requests, the patch (or module state), the cost
(wall time, the editor's preparation and edit time, peak RSS, the numbers in the patch or state, their
bytes), the scores of its
own requests before and after (`own_before`, `own_after`: every metric of `score_requests` and, by greedy
generation after the chat template, of `generation_scores`; locality judged against the model just before
the change, whose greedy answers fill probes given without one), and the ledger's probes before and after, where "edits in effect" covers the earlier edits.

Weight editors change weights in place: ft_l, ft_m, rome, mend (dense deltas of the matrices they wrote) and
lora (peft's factors, B @ A). Their patch is additive like any other, so materialize, revert (the
negated patch) and export need nothing new.

Module editors add a module with state of its own: grace (a codebook at one layer), t_patcher
(neurons added to one FFN) and wise (side copies of one FFN projection, a router and its shard
bookkeeping). Their change records an empty patch and the editor's state after it
(`state_dict`: everything the module holds, in the change's method_state.safetensors), accumulated: a
change continues from the state of the latest change in effect of the same method, so a second grace
change adds to the first one's codebook. The model is the base plus every weight patch, then each
module editor re-attached with the state of its latest change in effect (`Ledger.materialize_with_editors`).
Such a model cannot be saved as a plain transformers folder: export is refused while one is in effect.

A revert of a weight edit subtracts its patch: exact when no later edit is in effect; with later edits in
effect it is the task-arithmetic approximation (they were made on top of it; the record says which).
A revert of a module edit puts back the state of the method's previous change in effect; a change that
later changes of the same method continued from can only be reverted after them.
"""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path

import torch

from lifelong.config import ModelConfig
from lifelong.data.edit_requests import Probe
from lifelong.edit import EDITORS, check_batch, editor_class, editor_params
from lifelong.edit.protocol import evaluate, make_editor
from lifelong.edit.requests import request_from_dict
from lifelong.errors import ConfigError, LedgerError
from lifelong.ledger.core import Ledger
from lifelong.ledger.patch import apply_patch, patch_from_model, patch_numel
from lifelong.ledger.probes import lm_probes, run_fact_probes, without_locality
from lifelong.ledger.store import LedgerLock
from lifelong.metrics.cost import PeakMemory, count_parameters
from lifelong.metrics.editing import base_generations, base_predictions, generate, score_requests

RECORDABLE = ("weights", "module")  # an editor's `records`: a weight patch, or the state of the modules it adds


def create_lm_ledger(root: str | Path, name: str = "embedded", heldout_items: int = 50, seed: int = 0,
                     weights: Path | None = None, trust_pickle: bool = False) -> Ledger:
    """A new lm ledger of the causal LM `name` (build_lm), its probes scored on the base."""
    if heldout_items < 1:
        raise ConfigError(f"held-out facts: give at least 1 prompt, got {heldout_items}")
    ledger = Ledger.create(root, ModelConfig(family="lm", name=name), [], weights=weights, trust_pickle=trust_pickle)
    model, tokenizer = ledger.materialize_with_tokenizer()
    probes = lm_probes(model, tokenizer, heldout_items, seed)
    ledger.record_baseline(run_fact_probes(model, tokenizer, probes, []), new_probes=probes)
    return ledger


def check_editor(method: str, knobs: dict | None) -> None:
    """An editor the ledger can record, with valid knobs (before any model is loaded)."""

    cls = editor_class(method)  # an unknown name fails here, listing the editors
    if cls.records not in RECORDABLE:
        recordable = [n for n in EDITORS if editor_class(n).records in RECORDABLE]
        raise LedgerError(f"{method} records its edits as {cls.records!r}, which a ledger cannot hold yet; a ledger "
                          f"records: {', '.join(recordable)} (or run `lifelong edit --method {method}` without --ledger)")
    editor_params(method, knobs)


def edit(root: str | Path, method: str, requests: list, knobs: dict | None = None,
         train_requests: list | None = None, batch: bool = False) -> int:
    """Record one edit change: `requests` applied in order by `method` to the current model (`batch`: in one
    `apply_batch`); its id."""

    if not requests:
        raise ConfigError("an edit change needs at least one request")
    check_editor(method, knobs)
    if batch:
        check_batch(method)
    root = Path(root)
    Ledger.open(root).require_operation("edit")
    with LedgerLock(root, "lifelong edit"):
        ledger = Ledger.open(root)
        t_start = time.perf_counter()
        model, tokenizer, attached = ledger.materialize_with_editors()
        requests = with_answers(model, tokenizer, requests)
        base = base_predictions(model, tokenizer, requests)  # f_{k-1}: what the edits' locality is judged against
        base_gen = base_generations(model, tokenizer, requests, chat=True)
        earlier = edits_in_effect(ledger)
        own_before = evaluate(model, tokenizer, requests, base, base_gen, chat=True)
        before = run_fact_probes(model, tokenizer, ledger.probes, earlier)

        params = {k: p.detach().clone() for k, p in model.named_parameters()}
        with PeakMemory() as memory:
            t0 = time.perf_counter()
            editor = make_editor(method, model, tokenizer, knobs, train_requests, log_dir=root / "logs")
            if method in attached:  # continue the codebook / neurons of the method's latest change
                continue_from(attached.pop(method), editor)
            t1 = time.perf_counter()
            stats = [editor.apply_batch(requests)] if batch else [editor.apply(r) for r in requests]
            t2 = time.perf_counter()
        if editor.records == "module":
            patch, states = {}, {method: editor.state_dict()}
            editor.reset()  # then the recorded state on f_{k-1}, so the scores are of the recorded model
            editor.load_state_dict(states[method])
            size = sum(t.numel() for t in states[method].values())
        else:
            patch, states = patch_from_model(model, params), {}
            editor.reset()  # f_{k-1} again (bit-identical, the editors' contract); then the recorded patch on it,
            apply_patch(model, patch, where=f"change {ledger.next_id()}")  # so the scores are of the recorded model
            size = patch_numel(patch)

        own_after = evaluate(model, tokenizer, requests, base, base_gen, chat=True)
        after = run_fact_probes(model, tokenizer, ledger.probes, earlier)
        record = {
            "id": ledger.next_id(),
            "kind": "edit",
            "method": method,
            "label": method,
            "knobs": dataclasses.asdict(editor.params),
            "data": {"task": summary(requests), "requests": len(requests), "batch": batch},
            "requests": [dataclasses.asdict(r) for r in requests],
            "edit_stats": stats,
            "own_before": own_before,
            "own_after": own_after,
            "probes_before": before,
            "probes_after": after,
            "cost": {"prepare_seconds": t1 - t0, "edit_seconds": t2 - t1, "train_seconds": t2 - t0,
                     "wall_seconds": time.perf_counter() - t_start, "peak_rss_mb": memory.peak_mb,
                     "trainable_params": size, "total_params": count_parameters(model)[1]},
        }
        return ledger.commit(record, patch, states)


def revert_edit(ledger: Ledger, n: int, strategy: str) -> int:
    """Record a change that takes edit change `n` out (the caller holds the lock); its id.

    A weight edit: its negated patch. A module edit: the method's state of its previous change in effect
    (none: the module is taken off), refused while later changes of the method that continued from it
    are in effect (`Ledger.take_out`)."""
    change = ledger.change(n)
    t_start = time.perf_counter()
    model, tokenizer, attached = ledger.materialize_with_editors()
    target = requests_of(change)
    others = edits_in_effect(ledger, exclude=n)
    own_before = _score(model, tokenizer, target)
    before = run_fact_probes(model, tokenizer, ledger.probes, others)
    with PeakMemory() as memory:
        patch, how, exact = ledger.take_out(n, model, tokenizer, attached, strategy, "an edit")
    after = run_fact_probes(model, tokenizer, ledger.probes, others)
    record = revert_record(ledger, n, how, exact, (own_before, _score(model, tokenizer, target)), (before, after),
                           model, time.perf_counter() - t_start, memory.peak_mb)
    return ledger.commit(record, patch, {})


# ----------------------------------------------------------------------------- pieces

def revert_record(ledger: Ledger, n: int, how: str, exact: bool, own: tuple[dict, dict], probes: tuple[dict, dict],
                  model, wall_seconds: float, peak_mb: float) -> dict:
    """The record of an lm ledger's revert of change `n` (an edit or an adapt change): `how` it was taken out
    ("restore": the method's previous state back in effect; "subtract": the negated patch), `exact` (False: later
    changes in effect were made on top of change n), its own scores and the probes, each (before, after)."""
    return {
        "id": ledger.next_id(),
        "kind": "revert",
        "reverts": n,
        "strategy": how,
        "replayed": [],
        "exact": exact,
        "method": "-",
        "label": "-",
        "data": {"task": f"change {n}", "classes": []},
        "own_before": own[0],
        "own_after": own[1],
        "probes_before": probes[0],
        "probes_after": probes[1],
        "cost": {"train_seconds": 0.0, "wall_seconds": wall_seconds, "peak_rss_mb": peak_mb,
                 "trainable_params": 0, "total_params": count_parameters(model)[1]},
    }


def continue_from(old, new) -> None:
    """Move a module editor's state from `old` (re-attached by materialize) to `new` (this change's knobs)."""
    state = old.state_dict()
    old.reset()
    try:
        new.load_state_dict(state)
    except ValueError as e:
        raise LedgerError(f"{e}: the {new.name} changes in effect hold one {new.name} state, which this change "
                          "continues") from None


def requests_of(change: dict) -> list:

    return [request_from_dict(r) for r in change["requests"]]


def edits_in_effect(ledger: Ledger, exclude: int | None = None) -> list:
    """The requests of every edit change not reverted (and not `exclude`), in order."""
    gone = ledger.reverted_ids() | {exclude}
    return [r for c in ledger.changes if c["kind"] == "edit" and c["id"] not in gone for r in requests_of(c)]


def with_answers(model, tokenizer, requests: list) -> list:
    """Locality probes given without an answer get the model's own greedy answer (3 tokens): the text
    their locality is scored on (`lifelong edit --locality PROMPT`)."""

    missing = [p.prompt for r in requests for p in r.locality if not p.answer]
    if not missing:
        return requests
    answers = dict(zip(missing, generate(model, tokenizer, missing, max_new_tokens=3)))
    return [dataclasses.replace(r, locality=tuple(Probe(p.prompt, p.answer or answers[p.prompt]) for p in r.locality))
            for r in requests]


def summary(requests: list) -> str:
    """What the log shows for an edit change's requests."""
    if len(requests) > 1:
        return f"{len(requests)} requests"
    r = requests[0]
    prompt = r.prompt if len(r.prompt) <= 32 else r.prompt[:29] + "..."
    return f"{prompt!r} -> {r.target_new.strip()!r}"


def _score(model, tokenizer, requests: list) -> dict:
    """score_requests without locality (judged against the model before a change; here unknown)."""

    with torch.no_grad():
        return score_requests(model, tokenizer, without_locality(requests), None)
