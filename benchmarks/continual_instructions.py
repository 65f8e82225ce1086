"""Continual instruction tuning on the embedded SmolLM2-135M-Instruct: sequential LoRA vs O-LoRA vs replay.

Three real-text tasks in order (rt-sentiment, bbc-topic, country-facts), a fresh rank-2 LoRA on q_proj and
v_proj per task, 40 steps of 4 examples each, folded into the weights after its task (adapt/continual.py).
After every task the model answers 40 held-out items of every task through its chat template: the
accuracy matrix (row 0 the untouched model) and Avg, Last, forgetting (Chaudhry), BWT. Same seeds, data
and steps for the three methods; O-LoRA's lambda_1 0.5 (official), replay 25% of the task's count.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/continual_instructions.py [--methods sequential o-lora replay]

Each method's result is written to benchmarks/results/continual_instructions.json as soon as it is done; a
rerun with the same settings skips the methods already there.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time
from pathlib import Path

import torch

from lifelong.adapt.continual import METHODS, StreamSettings, run_stream
from lifelong.atomic import atomic_write_json
from lifelong.families.lm import build_lm
from lifelong.runtime import versions

OUT = Path(__file__).parent / "results" / "continual_instructions.json"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--methods", nargs="+", choices=METHODS, default=list(METHODS))
    parser.add_argument("--steps", type=int, default=StreamSettings.steps)
    parser.add_argument("--test-items", type=int, default=StreamSettings.test_items)
    parser.add_argument("--out", type=Path, default=OUT)
    args = parser.parse_args()
    torch.set_num_threads(1)
    base = dataclasses.asdict(StreamSettings(steps=args.steps, test_items=args.test_items))
    done = json.loads(args.out.read_text()) if args.out.is_file() else {}
    if done.get("settings") != base:
        done = {"settings": base, "results": {}}
    for method in args.methods:
        if method in done["results"]:
            continue
        model, tok = build_lm("embedded")
        settings = StreamSettings(method=method, steps=args.steps, test_items=args.test_items)
        done["results"][method] = run_stream(model, tok, settings, progress=lambda line: print(f"[{method}] {line}", flush=True))
        done.update(command="OMP_NUM_THREADS=1 .venv/bin/python benchmarks/continual_instructions.py",
                    date=time.strftime("%Y-%m-%d"), versions=versions())
        atomic_write_json(args.out, done)
        print(method, done["results"][method]["metrics"], flush=True)
    for method, result in done["results"].items():
        m = result["metrics"]
        print(f"{method:10s} Avg {m['avg']:5.1f}  Last {m['last']:5.1f}  forgetting {m['forgetting']:5.1f}  "
              f"BWT {m['bwt']:6.1f}  overlap {[round(t['overlap'], 3) for t in result['tasks']]}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
