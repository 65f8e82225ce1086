"""The editing protocols: single edits and lifelong (sequential) editing, with their costs.

    single:    for each of N requests: f_0 -> apply(r) -> score r -> reset to f_0; report the mean.
    lifelong:  f_0 -> apply(r_1) ... apply(r_T) -> score all T requests on f_T (WISE's protocol);
               run for each T of a sweep (T = 1, 10, 100, 1000), each from f_0 again.

    batch:     f_0 -> apply_batch(r_1 .. r_B), one update -> score all B on it (MEMIT's mass editing,
               EasyEdit's batch_edit); for editors with `batch = True`, each B from f_0 again.
    unedited:  f_0 scored as it is on the same requests (the pre-edit row every table carries).

Every result names its scoring conventions (`metrics/editing.py`: `_token` EasyEdit, `_cf`
CounterFact, `_exact` teacher-forced exact match, `_gen_*` greedy generation: exact and contains) and
carries the time and the peak memory per edit. Locality is judged against f_0's own predictions (and,
for `locality_gen`, f_0's own generations), computed once per request set before any edit.
"""

from __future__ import annotations

import time
from pathlib import Path

import torch
from tqdm.auto import tqdm

from lifelong.data.edit_requests import EditRequest
from lifelong.edit import build_editor
from lifelong.edit.requests import build_requests
from lifelong.loop import finish_trackers, make_accelerator, tracker_scalars
from lifelong.metrics.cost import PeakMemory
from lifelong.metrics.editing import fluency, generation_scores, score_requests

FLUENCY_PROMPTS = 10  # generations scored for fluency after the last edit (50 tokens each)
TRAIN_N = 200  # requests of the `train` split a learned editor (MEND) trains on by default


def make_editor(method: str, model, tokenizer, knobs: dict | None, train_requests: list[EditRequest] | None = None,
                log_dir: Path | None = None, log_with: str = "tensorboard"):
    """The editor, prepared: editors that learn to edit (MEND) train on `train_requests`, by default the
    first TRAIN_N of the `train` split, whose subjects are disjoint from the evaluated splits'. The one
    place that decides it: `lifelong edit`, the ledger and the bench all build editors here.

    With `log_dir`, that training logs its loss terms, lr and grad norm through Accelerate's trackers
    (`log_with`: "tensorboard" by default, "none" off) under log_dir/<method>-prepare."""
    editor = build_editor(method, model, tokenizer, knobs)
    if editor.learns_to_edit:
        accelerator = make_accelerator(log_with=log_with if log_dir is not None else "none", log_dir=log_dir)
        if log_dir is not None and log_with != "none":
            accelerator.init_trackers(f"{method}-prepare", config=tracker_scalars({}, params=editor.params))
            editor.log = accelerator.log
        try:
            editor.prepare(train_requests if train_requests is not None else build_requests("train", n=TRAIN_N))
        finally:
            editor.log = None
            finish_trackers(accelerator)
    return editor


class OverBudget(Exception):
    """Sequential edits ran past their time budget (editors slow down as edits accumulate)."""

    def __init__(self, done: int, seconds: float):
        super().__init__(f"stopped after {done} edits, {seconds:.0f} s ({seconds / done:.2f} s per edit)")
        self.done, self.seconds = done, seconds


def apply_all(editor, requests: list[EditRequest], desc: str = "", budget_s: float | None = None,
              batch: bool = False) -> dict:
    """Apply `requests` in order (`batch`: in one `apply_batch`, for editors with batch editing); returns the
    edit time (s) and the peak RSS (MiB) over the edits. Raises OverBudget once the edits have taken more than
    `budget_s` seconds."""
    if batch:  # (an editor without batch editing raises in apply_batch; the CLI and API refuse it before loading)
        with PeakMemory() as memory:
            t0 = time.perf_counter()
            stats = editor.apply_batch(requests)
            seconds = time.perf_counter() - t0
        return {"edit_seconds_total": seconds, "seconds_per_edit": seconds / len(requests),
                "peak_rss_mb": memory.peak_mb, "batch": len(requests), "stats": stats}
    seconds = []
    with PeakMemory() as memory:
        for r in tqdm(requests, desc=desc, leave=False, disable=len(requests) < 5):
            t0 = time.perf_counter()
            editor.apply(r)
            seconds.append(time.perf_counter() - t0)
            if budget_s is not None and sum(seconds) > budget_s and len(seconds) < len(requests):
                raise OverBudget(len(seconds), sum(seconds))
    return {"edit_seconds_total": sum(seconds), "seconds_per_edit": sum(seconds) / len(seconds),
            "peak_rss_mb": memory.peak_mb}


def evaluate(model, tokenizer, requests: list[EditRequest], base: dict, base_gen: dict | None = None,
             chat: bool = False) -> dict:
    """Every teacher-forced metric and, with `base_gen` (f_0's `base_generations`), every generation
    metric of `model` on `requests`."""
    with torch.no_grad():
        scores = score_requests(model, tokenizer, requests, base)
        if base_gen is not None:
            scores.update(generation_scores(model, tokenizer, requests, base_gen, chat=chat))
    return scores


def unedited(model, tokenizer, requests: list[EditRequest], base: dict, base_gen: dict | None = None,
             chat: bool = False, with_fluency: bool = True) -> dict:
    """f_0 scored as it is on `requests`: the pre-edit row (its reliability is what the edits start from)."""
    scores = evaluate(model, tokenizer, requests, base, base_gen, chat)
    if with_fluency:
        with torch.no_grad():
            scores["fluency_ngram_entropy"] = fluency(model, tokenizer, [r.prompt for r in requests[:FLUENCY_PROMPTS]])
    return {"protocol": "pre-edit", "T": len(requests), **scores, "seconds_per_edit": 0.0, "peak_rss_mb": 0.0}


def lifelong(editor, model, tokenizer, requests: list[EditRequest], base: dict, *, with_fluency: bool = True,
             budget_s: float | None = None, base_gen: dict | None = None, chat: bool = False) -> dict:
    """T = len(requests) sequential edits, every one judged on the final model; the model is reset after
    (also when the edits run past `budget_s` and OverBudget is raised). With `base_gen`, the generation
    metrics too (greedy decoding, after the chat template when `chat`)."""
    try:
        cost = apply_all(editor, requests, desc=f"{editor.name} T={len(requests)}", budget_s=budget_s)
    except OverBudget:
        editor.reset()
        raise
    scores = evaluate(model, tokenizer, requests, base, base_gen, chat)
    if with_fluency:
        with torch.no_grad():
            scores["fluency_ngram_entropy"] = fluency(model, tokenizer, [r.prompt for r in requests[:FLUENCY_PROMPTS]])
    editor.reset()
    return {"protocol": "lifelong", "T": len(requests), **scores, **cost}


def batch(editor, model, tokenizer, requests: list[EditRequest], base: dict, *, with_fluency: bool = True,
          base_gen: dict | None = None, chat: bool = False) -> dict:
    """B = len(requests) edits written in one `apply_batch`, every one judged on the model after it; the
    model is reset after. Time per edit is the batch's time over B."""
    with PeakMemory() as memory:
        t0 = time.perf_counter()
        try:
            editor.apply_batch(requests)
        except BaseException:
            editor.reset()
            raise
        seconds = time.perf_counter() - t0
    scores = evaluate(model, tokenizer, requests, base, base_gen, chat)
    if with_fluency:
        with torch.no_grad():
            scores["fluency_ngram_entropy"] = fluency(model, tokenizer, [r.prompt for r in requests[:FLUENCY_PROMPTS]])
    editor.reset()
    return {"protocol": "batch", "T": len(requests), **scores, "edit_seconds_total": seconds,
            "seconds_per_edit": seconds / len(requests), "peak_rss_mb": memory.peak_mb}


def single(editor, model, tokenizer, requests: list[EditRequest], base: dict, base_gen: dict | None = None,
           chat: bool = False) -> dict:
    """Each request edited alone on f_0 (reset in between); metrics averaged over the requests."""
    rows, costs = [], []
    for r in tqdm(requests, desc=f"{editor.name} single", leave=False):
        costs.append(apply_all(editor, [r]))
        rows.append(evaluate(model, tokenizer, [r], base, base_gen, chat))
        editor.reset()
    metrics = {k: _mean([row[k] for row in rows]) for k in rows[0] if k != "n_requests"}
    return {"protocol": "single", "T": 1, "n_requests": len(requests), **metrics,
            "seconds_per_edit": _mean([c["seconds_per_edit"] for c in costs]),
            "peak_rss_mb": max(c["peak_rss_mb"] for c in costs)}


def _mean(values: list) -> float | None:
    values = [v for v in values if v is not None]
    return sum(values) / len(values) if values else None
