"""The untouched model on every instruction task, with and without its chat template.

The reference row for any instruction tuning of the embedded SmolLM2-135M-Instruct: each task of
data/instructions.py scored on the first `--test-items` examples of its held-out test split (seed 0
order) by greedy generation (metrics/instructions.py), from the plain Alpaca-style prompt and from the
chat template.

    OMP_NUM_THREADS=1 python benchmarks/instructions_baseline.py          # ~10 min on one thread

One torch thread. Writes benchmarks/results/instructions_baseline.json (or --out).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import torch

from lifelong.data.instructions import TASKS, load_task
from lifelong.families.lm import build_lm
from lifelong.metrics.instructions import evaluate_task

sys.path.insert(0, str(Path(__file__).resolve().parent))
from adapters_text import write_record  # noqa: E402  (the adapter benchmarks' record format)

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "benchmarks" / "results" / "instructions_baseline.json"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tasks", default=",".join(TASKS))
    parser.add_argument("--test-items", type=int, default=50)
    parser.add_argument("--model", default="embedded")
    parser.add_argument("--out", type=Path, default=OUT)
    args = parser.parse_args()
    torch.set_num_threads(1)
    started, load_before = time.time(), os.getloadavg()
    model, tok = build_lm(args.model)
    rows = []
    for name in [t.strip() for t in args.tasks.split(",") if t.strip()]:
        task = load_task(name, max_test=args.test_items, max_train=0)
        for chat in (False, True):
            t0 = time.perf_counter()
            r = evaluate_task(model, tok, task, chat=chat)
            row = {k: v for k, v in r.items() if k != "predictions"} | {"eval_seconds": time.perf_counter() - t0}
            row["samples"] = [{"reference": e.output, "prediction": p} for e, p in zip(task.test, r["predictions"][:5])]
            rows.append(row)
            extra = f"  contains {r['contains']:.3f}" if "contains" in r else ""
            print(f"{name:14s} {'chat ' if chat else 'plain'}  {task.metric} {r['score']:.3f}{extra}  "
                  f"({len(task.test)} items, {row['eval_seconds']:.0f} s)", flush=True)
    write_record(args.out, {"model": args.model, "test_items": args.test_items, "rows": rows}, started, load_before)
    return 0


if __name__ == "__main__":
    sys.exit(main())
