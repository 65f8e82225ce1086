"""Tune WISE's knobs for SmolLM2-135M on the `train` split only (never on zsre / counterfact).

    OMP_NUM_THREADS=1 taskset -c 1 .venv/bin/python scripts/tune_wise.py \\
        --cells '[{}, {"lr": 0.3}, {"lr": 1.0}]' --act-ratios 0.7 0.88 1.0     # appends to docs/wise_tuning.json

Each cell: a fresh WISE editor with the cell's knobs (the rest = Params defaults), T sequential edits of
requests `--start`..`--start + T` of the `train` split (the first 200 train MEND; these come after),
then every edit scored on the final model (lifelong protocol, `metrics/editing.py` token level). The
evaluated zsre split asks questions ("What is the capital of X?") and probes locality with cloze
prompts; `--style question` (default) rebuilds the same train requests (same facts, targets, locality
probes) with zsre's question prompts, `--style cloze` keeps build_requests("train")'s cloze prompts.

Recorded per cell, besides Rel / Gen / Loc (token):
  - `loc_extra_token`: agreement with f_0's argmax on 80 more unedited probes (the question and the
    cloze prompt of 40 train facts past the edited ones, with their true answers): the bench's 2 probes
    per request are cloze only, and a side memory that fires on any question would pass them;
  - the diagnosis: per edit the target NLL before / after (routed, as at inference), the edit and
    irrelevant activation scores; after T edits the prompts' Delta vs the threshold, the share of
    edit prompts / paraphrases / locality probes routed to the side memory, and the mean target NLL
    of the edit prompts routed vs forced through the side memory;
  - `by_act_ratio`: the same metrics for other act_ratio values. act_ratio only sets the inference
    threshold (act_ratio x the smallest edit score), so one edited model serves every value.
The file keeps every cell ever run (keyed by style, start, T and knobs); a cell already there is
skipped unless --force. s/edit is wall time on one shared CPU core: comparable within a run only.
"""

from __future__ import annotations

import argparse
import json
import random
import shlex
import sys
import time
from dataclasses import asdict
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
TRAIN_START = 200  # the first 200 train requests train MEND (edit/protocol.py TRAIN_N)
EXTRA_LOC = 40     # unedited train facts whose question + cloze prompts are extra locality probes


def train_requests(style: str, stop: int):
    """build_requests("train")[:stop], with question prompts when style == "question" (same facts, targets
    and locality probes: make_request draws the same random numbers whatever the style)."""
    from lifelong.edit import requests as R

    if style == "cloze":
        return R.build_requests("train", n=stop)
    rng = random.Random("train-0")  # as build_requests("train", seed=0)
    facts = R.candidate_facts("train")
    chosen = R._interleave(facts, rng)[:stop]
    pool = R._by_relation(facts)
    return [R.make_request(f, pool, rng, style, f"train-{i:05d}") for i, f in enumerate(chosen)]


def extra_locality(stop: int) -> list[tuple[str, str]]:
    """(prompt, true answer): the question and the cloze prompt of EXTRA_LOC train facts after `stop`."""
    from lifelong.edit import requests as R

    rng = random.Random("train-0")
    chosen = R._interleave(R.candidate_facts("train"), rng)[stop : stop + EXTRA_LOC]
    return [(R.fact_prompts(f, style)[0], f.answer) for f in chosen for style in ("question", "cloze")]


@torch.no_grad()
def routing(editor, model, tokenizer, pairs: list[tuple[str, str]]) -> list[float]:
    """Delta of each teacher-forced prompt + answer under the side memory (the best copy's score)."""
    from lifelong.families.lm import target_batch

    mem, scores = editor.memory, []
    mem.record = True
    try:
        for prompt, answer in pairs:
            b = target_batch(tokenizer, [prompt], [answer])
            model(input_ids=b["input_ids"], attention_mask=b["attention_mask"])
            scores.append(mem.route(mem.last_input)[0].item())
    finally:
        mem.record, mem.last_input = False, None
    return scores


@torch.no_grad()
def forced_side_nll(editor, model, tokenizer, pairs: list[tuple[str, str]]) -> float:
    """Mean target NLL with every sequence sent through the shard in training (routing bypassed)."""
    from lifelong.families.lm import target_batch, target_nll

    mem = editor.memory
    mem.editing = True
    try:
        return sum(target_nll(model, target_batch(tokenizer, [p], [a])).item() for p, a in pairs) / len(pairs)
    finally:
        mem.editing, mem.edit_scores = False, None


def evaluate(editor, model, tokenizer, requests, base, extra, extra_base) -> dict:
    from lifelong.metrics.editing import score_requests, score_targets

    out = {k: v for k, v in score_requests(model, tokenizer, requests, base).items() if isinstance(v, float)}
    post = score_targets(model, tokenizer, [p for p, _ in extra], [a for _, a in extra])
    agree = [sum(a == b for a, b in zip(s.predicted, pre)) / len(pre) for s, pre in zip(post, extra_base)]
    out["loc_extra_token"] = sum(agree) / len(agree)
    return out


def run_cell(model, tokenizer, knobs: dict, requests, base, extra, extra_base, act_ratios) -> dict:
    from lifelong.edit import build_editor
    from lifelong.metrics.editing import score_targets

    editor = build_editor("wise", model, tokenizer, knobs)
    edits, start = [], time.perf_counter()
    for r in requests:
        stats = editor.apply(r)
        edits.append({k: round(stats[k], 3) for k in ("loss_before", "loss_after", "steps", "edit_score",
                                                        "irrelevant_score", "threshold")})
    seconds = time.perf_counter() - start
    mem = editor.memory
    row = {"knobs": knobs, "params": asdict(editor.params),
           "seconds_per_edit": seconds / len(requests), **evaluate(editor, model, tokenizer, requests, base, extra, extra_base)}

    prompts = [(r.prompt, r.target_new) for r in requests]
    paraphrases = [(x, r.target_new) for r in requests for x in r.paraphrases]
    local = [(p.prompt, p.answer) for r in requests for p in r.locality]
    d_prompt, d_para, d_loc, d_extra = (routing(editor, model, tokenizer, s) for s in (prompts, paraphrases, local, extra))
    routed = lambda ds: sum(d > mem.threshold for d in ds) / len(ds)  # noqa: E731
    row["diagnosis"] = {
        "threshold": mem.threshold, "min_edit_score": editor.min_edit_score,
        "delta_prompt": [round(d, 1) for d in d_prompt], "delta_loc_mean": sum(d_loc) / len(d_loc),
        "delta_loc_max": max(d_loc), "delta_extra_max": max(d_extra),
        "routed_prompt": routed(d_prompt), "routed_paraphrase": routed(d_para), "routed_loc": routed(d_loc),
        "routed_extra": routed(d_extra),
        "prompt_nll_routed": sum(s.mean_nll for s in score_targets(model, tokenizer, *zip(*prompts))) / len(prompts),
        "prompt_nll_side": forced_side_nll(editor, model, tokenizer, prompts),
        "edits": edits,
    }
    row["by_act_ratio"] = {}
    for ratio in act_ratios:  # the threshold alone changes: same edited side memory
        mem.threshold = ratio * editor.min_edit_score
        row["by_act_ratio"][str(ratio)] = {
            **evaluate(editor, model, tokenizer, requests, base, extra, extra_base),
            "routed_prompt": routed(d_prompt), "routed_paraphrase": routed(d_para), "routed_loc": routed(d_loc),
            "routed_extra": routed(d_extra)}
    editor.reset()
    return row


def cell_key(style: str, start: int, T: int, knobs: dict) -> str:
    """The cell's identity; `m<N>`: the N unrelated texts of WISE's margin memory (IRRELEVANT_TEXTS)."""
    from lifelong.edit.wise import IRRELEVANT_TEXTS

    return f"{style}:{start}:{T}:m{len(IRRELEVANT_TEXTS)}:{json.dumps(knobs, sort_keys=True)}"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter,
                                 epilog=__doc__.split("\n\n", 2)[2])
    ap.add_argument("--cells", default="[{}]", help="JSON list of knob dicts, one per cell (default: [{}] = Params defaults)")
    ap.add_argument("--T", type=int, default=10, help="sequential edits per cell (default 10)")
    ap.add_argument("--start", type=int, default=TRAIN_START, help="first train request (default 200: after MEND's)")
    ap.add_argument("--style", choices=("question", "cloze"), default="question",
                    help="prompt style of the edits (question = zsre's; default)")
    ap.add_argument("--act-ratios", type=float, nargs="*", default=[0.7, 0.88, 1.0],
                    help="inference thresholds also scored on each edited model (default 0.7 0.88 1.0)")
    ap.add_argument("--out", default=str(ROOT / "docs" / "wise_tuning.json"))
    ap.add_argument("--force", action="store_true", help="rerun cells already in --out")
    args = ap.parse_args(argv)
    if args.start < TRAIN_START:
        ap.error(f"--start {args.start} overlaps MEND's training requests (the first {TRAIN_START} of train)")

    from lifelong.atomic import atomic_write_json
    from lifelong.edit.wise import IRRELEVANT_TEXTS
    from lifelong.families.lm import build_lm
    from lifelong.metrics.editing import cached_base_predictions, score_targets

    cells = json.loads(args.cells)
    out = Path(args.out)
    record = json.loads(out.read_text()) if out.is_file() else {"cells": {}}
    model, tokenizer = build_lm("embedded")
    torch.manual_seed(0)
    requests = train_requests(args.style, args.start + args.T)[args.start :]
    base = cached_base_predictions(model, tokenizer, requests)
    extra = extra_locality(args.start + args.T)
    extra_base = [s.predicted for s in score_targets(model, tokenizer, [p for p, _ in extra], [a for _, a in extra])]
    command = "OMP_NUM_THREADS=1 taskset -c 1 .venv/bin/python scripts/tune_wise.py " + " ".join(map(shlex.quote, sys.argv[1:] if argv is None else argv))
    for knobs in cells:
        key = cell_key(args.style, args.start, args.T, knobs)
        if key in record["cells"] and not args.force:
            print(f"{key}: in {out}, skipped (--force reruns)")
            continue
        row = run_cell(model, tokenizer, knobs, requests, base, extra, extra_base, args.act_ratios)
        row.update(style=args.style, start=args.start, T=args.T, irrelevant_texts=len(IRRELEVANT_TEXTS), command=command)
        record["cells"][key] = row
        record["protocol"] = ("lifelong: T sequential edits of train requests [start, start + T), all scored on the "
                              "final model; token-level metrics (metrics/editing.py); never zsre/counterfact")
        atomic_write_json(out, record)
        d = row["diagnosis"]
        print(f"{key}: rel {row['reliability_token']:.2f} gen {row['generality_token']:.2f} loc {row['locality_token']:.2f} "
              f"loc_extra {row['loc_extra_token']:.2f} | thr {d['threshold']:.1f} routed prompt {d['routed_prompt']:.2f} "
              f"loc {d['routed_loc']:.2f} extra {d['routed_extra']:.2f} | prompt NLL routed {d['prompt_nll_routed']:.2f} "
              f"side {d['prompt_nll_side']:.2f} | {row['seconds_per_edit']:.1f} s/edit", flush=True)
        for ratio, m in row["by_act_ratio"].items():
            print(f"    act_ratio {ratio}: rel {m['reliability_token']:.2f} gen {m['generality_token']:.2f} "
                  f"loc {m['locality_token']:.2f} loc_extra {m['loc_extra_token']:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
