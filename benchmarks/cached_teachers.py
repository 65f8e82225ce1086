"""Cached teachers: the training step of zscl and select_distill with the teachers' outputs cached
(`cache_teacher: true`, the default) against teachers that run every step (`cache_teacher: false`,
as the papers' code does), side by side in one run.

    python benchmarks/cached_teachers.py                    # the embedded model, 112 px, 3 trainable blocks
    python benchmarks/cached_teachers.py --model tiny-embedded --resolution 32 --blocks 2 --steps 5   # a quick check

Both configurations of a method start from fresh copies of the same prepared model (trunk +
projections trainable, as the runner sets them), with the method's default knobs (1000 reference
images, reference batch 64; ZSCL: 1000 reference texts, 64 per step) and the same seed, so they draw
the same reference batches and compute the same numbers (checked: the losses are compared step by
step; the record holds the largest difference). Training data: the cached stem outputs of the first `--train-items`
images of one mtil-mini task (default fashion-mnist), batches in the loop's order.

A step is what the training loop does per batch: the method's loss, backward, gradient clipping
(train.grad_clip), AdamW step, zero_grad. What a step with cached teachers does beyond plain
fine-tuning: the student's forward and backward on the reference batch (and for ZSCL the student's
text projection of the step's sentences: the frozen text encoder's features of the class names and of
all reference texts are cached in the model before the copies are made, for every configuration, so
that only the teachers differ). What a per-step teacher adds on top: for ZSCL, the frozen initial model's whole
image tower (stem included: preprocessing, conv stem, the frozen blocks, the trunk, the projection)
on the reference images' raw pixels and its text encoder on the step's sentences; for
Select-and-Distill, the image towers of both teachers (pretrained and previous). That teacher work is
timed separately (`teacher_ms`, a wrapper around the method's teacher call), so the figures show where
the time goes.

Interleaving: for each method the three step kinds (finetune, cached, per step) alternate step by
step, their order rotating every step, so machine noise hits all alike. The first `--warmup` steps
are dropped; figures are medians over the next `--steps`; the speed-up is the median of the per-step
ratios per-step / cached, with a bootstrap 95% confidence interval. Reference-set preparation
(stem outputs of the reference images, the teachers' cached embeddings) happens once per method
before the timed steps and is reported separately (`prepare_s`). torch's thread count is left at its
default. Results go to benchmarks/results/ as JSON (atomic write), every timed step included.

Exit status: non-zero only on an error, never for missing the target.
"""

from __future__ import annotations

import argparse
import copy
import datetime
import os
import shlex
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from loop_overhead import machine, median_ci, quartiles  # noqa: E402  (the sibling benchmark's helpers)

from lifelong.atomic import atomic_write_json  # noqa: E402
from lifelong.config import MethodConfig, to_dict  # noqa: E402
from lifelong.data.reference import reference_texts  # noqa: E402
from lifelong.data.streams import PRESETS, build_stream  # noqa: E402
from lifelong.errors import ConfigError, LifelongError  # noqa: E402
from lifelong.families import prepare_trainable  # noqa: E402
from lifelong.families.vlm import build_vlm  # noqa: E402
from lifelong.learn import build_method  # noqa: E402
from lifelong.learn.common import TaskData  # noqa: E402
from lifelong.learn.driver import load_run_config  # noqa: E402
from lifelong.learn.finetune import Finetune  # noqa: E402
from lifelong.loop import (  # noqa: E402
    batch_order,
    compute_stem_features,  # noqa: E402
    targets_in,
)
from lifelong.metrics.cost import count_parameters  # noqa: E402
from lifelong.runtime import versions  # noqa: E402

TARGET = 3.0  # per-step teacher / cached teacher, per training step
RESULTS = Path(__file__).resolve().parent / "results"
METHODS = ("zscl", "select_distill")
TEACHER_CALL = {"zscl": "_teacher_embeddings", "select_distill": "_teacher_features"}


class Side:
    """One configuration: a model copy, its method and its optimizer. `teacher_call` names the method's
    teacher function, wrapped to time it."""

    def __init__(self, model, method, data: TaskData, config, teacher_call: str | None = None):
        self.model, self.method, self.data = model, method, data
        self.grad_clip = config.train.grad_clip
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(self.params, lr=config.train.lr, weight_decay=config.train.weight_decay)
        self.step_ms: list[float] = []
        self.teacher_ms: list[float] = []
        self.losses: list[float] = []
        self._teacher_seconds = 0.0
        if teacher_call is not None:
            original = getattr(method, teacher_call)

            def timed(*args):
                start = time.perf_counter()
                out = original(*args)
                self._teacher_seconds += time.perf_counter() - start
                return out

            setattr(method, teacher_call, timed)  # an instance attribute: the method's own code is unchanged

    def step(self, index: torch.Tensor) -> None:
        self._teacher_seconds = 0.0
        start = time.perf_counter()
        batch = {"inputs": self.data.inputs[index], "targets": self.data.targets[index], "index": index}
        loss, _ = self.method.loss(self.model, batch, self.data)
        loss.backward()
        if self.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(self.params, self.grad_clip)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.step_ms.append(1e3 * (time.perf_counter() - start))
        self.teacher_ms.append(1e3 * self._teacher_seconds)
        self.losses.append(loss.item())


def first_items_stream(task_source: str, train_items: int):
    """The mtil-mini task of that source, alone, with its first `train_items` training images."""
    tasks = [t for t in PRESETS["mtil-mini"]["tasks"] if t["source"] == task_source]
    if not tasks:
        valid = ", ".join(t["source"] for t in PRESETS["mtil-mini"]["tasks"])
        raise ConfigError(f"--task {task_source!r} is not a task of mtil-mini; valid: {valid}")
    task = {**tasks[0], "train_items": train_items, "test_items": 16}  # the test split is never used
    return build_stream({"name": f"bench-{task_source}", "scenario": "task", "seed": 0, "tasks": [task]})


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     epilog="Overrides are key.path=value pairs of the run config (lifelong/config.py).")
    parser.add_argument("--model", default="embedded", help="model.name (default: embedded; tiny-embedded for a quick check)")
    parser.add_argument("--resolution", type=int, help="model.resolution (default: the config's, 112)")
    parser.add_argument("--blocks", type=int, help="model.trainable_blocks (default: the config's, 3)")
    parser.add_argument("--batch-size", type=int, help="train.batch_size (default: the config's, 32)")
    parser.add_argument("--task", default="fashion-mnist", help="the mtil-mini task to train on (default: fashion-mnist)")
    parser.add_argument("--train-items", type=int, default=320, help="training images of the task (default: 320)")
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    parser.add_argument("--steps", type=int, default=30, help="timed steps of each configuration (default: 30)")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps of each before them (default: 3)")
    parser.add_argument("--out", type=Path, help="results file (default: results/cached_teachers.json for the "
                        "embedded model, results/cached_teachers_<model>.json otherwise)")
    parser.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="run-config overrides, e.g. train.grad_clip=0")
    args = parser.parse_args(argv)
    if args.steps < 1 or args.warmup < 0 or args.train_items < 1:
        parser.error("--steps and --train-items must be positive and --warmup non-negative")
    return args


def summarize(sides: dict[str, Side], timed: slice) -> dict:
    finetune, cached, per_step = (sides[k] for k in ("finetune", "cached", "per_step"))
    ratios = [a / b for a, b in zip(per_step.step_ms[timed], cached.step_ms[timed])]
    ratio = statistics.median(ratios)
    med = {k: statistics.median(s.step_ms[timed]) for k, s in sides.items()}
    diffs = [abs(a - b) for a, b in zip(cached.losses, per_step.losses)]
    return {
        "finetune_ms_per_step": med["finetune"],
        "cached_ms_per_step": med["cached"],
        "per_step_ms_per_step": med["per_step"],
        "speedup": ratio,
        "speedup_ci95": median_ci(ratios),
        "speedup_quartiles": quartiles(ratios),
        "speedup_of_means": sum(per_step.step_ms[timed]) / sum(cached.step_ms[timed]),
        "teacher_ms_per_step": {"cached": statistics.median(cached.teacher_ms[timed]),
                                "per_step": statistics.median(per_step.teacher_ms[timed])},
        "target_speedup": TARGET,
        "target_met": ratio >= TARGET,
        "losses_max_abs_diff": max(diffs),
        "losses_first_abs_diff": diffs[0],
    }


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    overrides = [f"model.name={args.model}", "train.checkpoints=false"]
    overrides += [f"model.resolution={args.resolution}"] * (args.resolution is not None)
    overrides += [f"model.trainable_blocks={args.blocks}"] * (args.blocks is not None)
    overrides += [f"train.batch_size={args.batch_size}"] * (args.batch_size is not None)
    config = load_run_config(None, overrides + args.overrides)

    stream = first_items_stream(args.task, args.train_items)
    task = stream.tasks[0]
    base = build_vlm(config.model)
    stem = compute_stem_features(base, stream, config.train.eval_batch_size)
    prepare_trainable(base, config.model, config.adapter)
    with torch.no_grad():  # the frozen text tower's cache, warm for every copy: the class names, the reference texts
        base.class_embeddings(task.class_names)
        base.text_embeddings(reference_texts())
    data = TaskData(0, task, stem.train[0], targets_in(stream, 0, task.train.labels), task.class_names, ())
    order = batch_order(len(data.inputs), config.train.batch_size, args.warmup + args.steps, seed=0)
    timed = slice(args.warmup, args.warmup + args.steps)
    trainable, total = count_parameters(base)
    print(f"{config.model.name} @ {config.model.resolution} px, {config.model.trainable_blocks} trainable blocks "
          f"({trainable:,} of {total:,} parameters), batch {config.train.batch_size}, task {task.name} "
          f"({len(task.train)} images); {args.warmup} warm-up + {args.steps} timed steps of each configuration, "
          f"interleaved; {torch.get_num_threads()} torch threads")

    load_before = os.getloadavg()
    results, steps_ms = {}, {}
    for name in args.methods:
        sides, prepare_s = {"finetune": Side(copy.deepcopy(base), Finetune(Finetune.Params()), data, config)}, {}
        for label, cache in (("cached", True), ("per_step", False)):
            model = copy.deepcopy(base)
            method = build_method(MethodConfig(name=name, params={"cache_teacher": cache}))
            torch.manual_seed(0)  # the same reference batches on both sides
            start = time.perf_counter()
            method.prepare(model)
            method.begin_task(model, data)
            prepare_s[label] = time.perf_counter() - start
            sides[label] = Side(model, method, data, config, TEACHER_CALL[name])
        print(f"\n{name}: prepare + begin_task took {prepare_s['cached']:.1f} s with cached teachers (reference stem "
              f"outputs, the teachers' embeddings), {prepare_s['per_step']:.1f} s with per-step teachers")
        kinds = list(sides)
        for step, index in enumerate(order):
            for k in range(len(kinds)):  # the order rotates every step
                sides[kinds[(step + k) % len(kinds)]].step(index)
        summary = summarize(sides, timed)
        summary["prepare_s"] = prepare_s
        results[name] = summary
        steps_ms[name] = {k: {"step": s.step_ms[timed], "teacher": s.teacher_ms[timed]} for k, s in sides.items()}

        print(f"{'':10} {'ms/step':>9} {'(p25-p75)':>19} {'teacher ms':>11}")
        for label, side in sides.items():
            q = quartiles(side.step_ms[timed])
            print(f"{label:10} {q[1]:9.1f} {f'({q[0]:.1f}-{q[2]:.1f})':>19} {statistics.median(side.teacher_ms[timed]):11.1f}")
        ci = summary["speedup_ci95"]
        print(f"speed-up per step / cached: {summary['speedup']:.2f}x (median of {args.steps} paired steps, 95% CI "
              f"{ci[0]:.2f}-{ci[1]:.2f}; ratio of means {summary['speedup_of_means']:.2f}); target >= {TARGET:.1f}x: "
              f"{'MET' if summary['target_met'] else 'NOT MET'}")
        print(f"losses cached vs per step: first step differs by {summary['losses_first_abs_diff']:.2e}, "
              f"at most {summary['losses_max_abs_diff']:.2e} over {len(order)} steps")
    load_after = os.getloadavg()

    out = args.out or RESULTS / ("cached_teachers.json" if config.model.name == "embedded"
                                 else f"cached_teachers_{config.model.name}.json")
    record = {
        "benchmark": "cached_teachers",
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": shlex.join(["python", *sys.argv] if argv is None else ["python", "benchmarks/cached_teachers.py", *argv]),
        "summary": results,
        "method": {
            "configurations": "finetune (CE only), the method with cache_teacher=true, with cache_teacher=false; "
                              "the method's default knobs otherwise",
            "timed_step": "method.loss, backward, clip_grad_norm_ (if train.grad_clip > 0), AdamW.step, zero_grad",
            "teacher_ms": "time inside the method's teacher call (cache: indexing; per step: the teachers' forward passes)",
            "interleaving": "one step of each configuration per round, the order rotating every round",
            "not_timed": "prepare and begin_task (reported as prepare_s), the first warmup steps",
            "aggregate": "ms: median over timed steps; speed-up: median of per-step per_step/cached, bootstrap 95% CI",
            "warmup_steps": args.warmup,
            "timed_steps": args.steps,
        },
        "steps_ms": steps_ms,
        "model": {"trainable_params": trainable, "total_params": total},
        "task": {"name": task.name, "train_items": len(task.train), "classes": len(task.class_names)},
        "config": to_dict(config),
        "machine": {**machine(), "loadavg_1_5_15_before": load_before, "loadavg_1_5_15_after": load_after},
        "versions": versions(),
    }
    atomic_write_json(out, record)
    print(f"\nwrote {out}")
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except LifelongError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(e.exit_code)
