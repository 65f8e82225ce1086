"""LLaMA-Adapter vs LoRA vs prefix tuning at equal trainable parameters, on a text instruction task.

The embedded SmolLM2-135M-Instruct, frozen; each adapter sized to LoRA(q_proj, v_proj, rank 2)'s
115,200 parameters (adapt.instruct.equal_budget: prefix tuning 10 virtual tokens = 115,200,
LLaMA-Adapter 10 prompts in each of the top 20 layers = 115,220), trained the same number of steps on
the same seeded batches of the task's training split with the chat template, and scored on the same
held-out test examples by greedy generation (metrics.instructions). The untouched model is scored on
them too, with and without its chat template. Per adapter: the task score, seconds per training step
(mean after the first), peak RSS during training and its rise over the start, trainable parameters,
patch bytes (the adapter's tensors as safetensors), first and last tenth of the training losses.

    OMP_NUM_THREADS=1 python benchmarks/adapters_text.py                     # rt-sentiment, ~10 min on one thread
    OMP_NUM_THREADS=1 python benchmarks/adapters_text.py --task bbc-topic --steps 200 --test-items 200

The default is short because a step is expensive on a CPU: SmolLM2-135M's forward and backward on a
batch of 4 chat prompts (~90 tokens each) take ~3-4 s on one core (~2 * 135M * 360 FLOP forward, a
third of it the 49k-word output layer), so 40 steps of 4 (160 training examples) per adapter.

One torch thread (`torch.set_num_threads(1)`) whatever the environment says. Each adapter trains on a
fresh copy of the base loaded from disk. Writes benchmarks/results/adapters_text.json (or --out).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from dataclasses import asdict
from datetime import datetime, timezone
from pathlib import Path

import torch

from lifelong.adapt.instruct import KINDS, TrainSettings, count_for, equal_budget, train_adapter
from lifelong.atomic import atomic_write_bytes
from lifelong.data.instructions import TASKS, load_task
from lifelong.families.lm import build_lm
from lifelong.metrics.instructions import evaluate_task

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "benchmarks" / "results" / "adapters_text.json"


def versions() -> dict:
    import peft
    import transformers

    return {"torch": torch.__version__, "transformers": transformers.__version__, "peft": peft.__version__,
            "python": platform.python_version()}


def write_record(out: Path, record: dict, started: float, load_before: tuple[float, ...]) -> dict:
    """`record` plus how it was made (the command, the date, wall seconds, the machine's load before and after,
    versions), written atomically as JSON to `out`; the adapter benchmarks' one record format."""
    record = {**record, "command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]),
              "date": datetime.now(timezone.utc).isoformat(timespec="seconds"), "wall_seconds": time.time() - started,
              "machine": {"cpus": os.cpu_count(), "torch_threads": torch.get_num_threads(),
                          "loadavg_before": load_before, "loadavg_after": os.getloadavg()},
              "versions": versions()}
    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(out, (json.dumps(record, indent=2) + "\n").encode())
    print(f"wrote {out} ({record['wall_seconds']:.0f} s)")
    return record


def scored(result: dict, examples, keep: int) -> dict:
    """An evaluation without the bulk of its predictions (the first `keep` beside their references)."""
    out = {k: v for k, v in result.items() if k != "predictions"}
    out["samples"] = [{"reference": e.output, "prediction": p} for e, p in zip(examples, result["predictions"][:keep])]
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--task", default="rt-sentiment", choices=TASKS)
    parser.add_argument("--kinds", default=",".join(KINDS))
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--test-items", type=int, default=80)
    parser.add_argument("--lora-rank", type=int, default=2, help="sets the budget every adapter is sized to")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--model", default="embedded")
    parser.add_argument("--out", type=Path, default=OUT)
    args = parser.parse_args()
    torch.set_num_threads(1)
    kinds = [k.strip() for k in args.kinds.split(",") if k.strip()]
    started = time.time()
    load_before = os.getloadavg()

    task = load_task(args.task, max_train=args.steps * args.batch_size, max_test=args.test_items, seed=args.seed)
    model, tok = build_lm(args.model)
    specs = equal_budget(model.config, lora_rank=args.lora_rank)
    budget = count_for(model.config, specs["lora"])
    results: dict = {"baseline": {}, "adapters": {}}
    for chat in (False, True):
        t0 = time.perf_counter()
        r = evaluate_task(model, tok, task, chat=chat)
        results["baseline"]["chat" if chat else "plain"] = scored(r, task.test, 5) | {
            "eval_seconds": time.perf_counter() - t0}
        print(f"untouched model, {'chat template' if chat else 'plain prompt '}: {task.metric} {r['score']:.3f}",
              flush=True)
    del model

    for kind in kinds:
        model, tok = build_lm(args.model)
        settings = TrainSettings(steps=args.steps, batch_size=args.batch_size, chat=True, seed=args.seed)
        t0 = time.perf_counter()
        run = train_adapter(model, tok, task, specs[kind], settings)
        train_seconds = time.perf_counter() - t0
        t0 = time.perf_counter()
        r = evaluate_task(run.model, tok, task, chat=True)
        row = run.summary() | {"train_seconds": train_seconds, "eval_seconds": time.perf_counter() - t0,
                               "budget_ratio": run.trainable / budget, "losses": run.losses}
        results["adapters"][kind] = scored(r, task.test, 5) | row
        print(f"{kind:14s} {task.metric} {r['score']:.3f}  trainable {run.trainable:,}  {run.seconds_per_step:.3f} s/step  "
              f"peak {run.peak_mb:.0f} MiB (+{run.delta_mb:.0f})  patch {run.patch_bytes:,} B  "
              f"loss {row['loss_first']:.3f} -> {row['loss_last']:.3f}", flush=True)
        del model, run

    write_record(args.out, {
        "task": args.task, "metric": task.metric, "train_items": len(task.train), "test_items": len(task.test),
        "budget": budget, "specs": {k: asdict(v) for k, v in specs.items()}, "results": results}, started, load_before)
    return 0


if __name__ == "__main__":
    sys.exit(main())
