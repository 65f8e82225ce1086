"""One experiment: a config's methods over its stream, written to runs/<name>/.

The stream is loaded and the frozen image stem is run over every image once; every method then
starts from a fresh copy of the same pretrained model and reuses those stem outputs.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import os
import platform
import subprocess
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path

import numpy as np
import torch
import yaml
from safetensors.torch import load_file, save

from lifelong.config import AdapterConfig, RunConfig, resolve_stream, to_dict
from lifelong.data.base import ImageDataset, Stream
from lifelong.data.streams import build_stream
from lifelong.families.vlm import DualEncoder, build_vlm
from lifelong.learn import build_method
from lifelong.loop import StemFeatures, run_stream
from lifelong.metrics.continual import METRIC_DOCS, average_incremental_accuracy, summarize
from lifelong.metrics.cost import PeakMemory, count_parameters
from lifelong.report.io import atomic_write_bytes, atomic_write_json, atomic_write_text

TABLE_COLUMNS = [
    ("method", "method", ""),
    ("transfer", "Transfer", ".1f"),
    ("avg", "Avg", ".1f"),
    ("last", "Last", ".1f"),
    ("max_forgetting", "max forgetting", ".1f"),
    ("chaudhry_forgetting", "forgetting (Chaudhry)", ".1f"),
    ("zero_shot_degradation", "ZS degradation", ".1f"),
    ("bwt", "BWT", ".1f"),
    ("trainable_params", "trainable params", ","),
    ("train_seconds", "time (s)", ".0f"),
    ("peak_rss_mb", "peak RSS (MiB)", ".0f"),
]
INCREMENTAL_COLUMNS = [("avg_incremental_accuracy", "avg incr. acc", ".1f"), ("final_seen_accuracy", "A_T", ".1f")]


@dataclass
class MethodRun:
    label: str
    accuracy_matrix: np.ndarray
    row: dict  # the table row: metrics and costs


def cache_dir() -> Path:
    return Path(os.environ.get("LIFELONG_CACHE", Path.home() / ".cache" / "lifelong"))


def stem_outputs(model: DualEncoder, dataset: ImageDataset, batch_size: int = 256) -> torch.Tensor:
    """The frozen stem's outputs for a dataset, from the disk cache when this exact stem saw it before."""
    path = cache_dir() / "stem" / f"{model.stem_fingerprint()}-{dataset.fingerprint[:16]}.safetensors"
    if path.is_file():
        try:
            return load_file(str(path))["stem"]
        except Exception:  # a damaged cache file is recomputed, never trusted
            pass
    # Contiguous, as a cached copy loads: the conv stem returns channels-last tensors, and the trunk's
    # kernels round differently on those, so a cold and a warm cache would give different numbers.
    out = model.encode_stem(dataset.images, batch_size).contiguous()
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(path, save({"stem": out}))
    return out


def compute_stem_features(model: DualEncoder, stream: Stream, batch_size: int) -> StemFeatures:
    from tqdm.auto import tqdm

    train, test = [], []
    for task in tqdm(stream.tasks, desc="stem features", leave=False):
        train.append(stem_outputs(model, task.train, batch_size))
        test.append(stem_outputs(model, task.test, batch_size))
    return StemFeatures(train, test)


def prepare_trainable(model: DualEncoder, config: RunConfig, adapter: AdapterConfig) -> None:
    if adapter.kind == "lora":
        model.add_lora(adapter)
    else:
        model.default_trainable(config.model.train_text_projection)


def run_experiment(config: RunConfig) -> Path:
    """Run every configured method on the stream; write results, tables and figures; return the run dir."""
    out = Path(config.output_dir) / config.name
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / "config.yaml", yaml.safe_dump(to_dict(config), sort_keys=False))
    atomic_write_json(out / "versions.json", versions())

    stream = build_stream(resolve_stream(config.stream))
    base = build_vlm(config.model)
    stem = compute_stem_features(base, stream, config.train.eval_batch_size)
    atomic_write_json(out / "data.json", describe_stream(stream))

    runs = []
    for mc in config.methods:
        label = mc.display_name
        print(f"== {label}: {len(stream.tasks)} tasks x {config.train.steps_per_task} steps")
        model = copy.deepcopy(base)
        prepare_trainable(model, config, mc.adapter or config.adapter)
        method = build_method(mc)
        with PeakMemory() as memory:
            result = run_stream(model, method, stream, stem, config, out / "checkpoints" / label)
        trainable, total = count_parameters(model)
        row = {"method": label, **summarize(result.accuracy_matrix)}
        if stream.scenario == "class":
            row["avg_incremental_accuracy"], row["final_seen_accuracy"] = average_incremental_accuracy(result.seen_accuracy)
        row.update(trainable_params=trainable, total_params=total, train_seconds=result.train_seconds,
                   eval_seconds=result.eval_seconds, peak_rss_mb=memory.peak_mb)
        runs.append(MethodRun(label, result.accuracy_matrix, row))
        print(f"   Avg {row['avg']:.1f}  Last {row['last']:.1f}  max forgetting {row['max_forgetting']:.1f}  "
              f"ZS degradation {row['zero_shot_degradation']:.1f}  ({result.train_seconds:.0f} s)")
    write_results(out, config, stream, runs)
    return out


def run_into_ledgers(config: RunConfig, ledger_root: Path) -> Path:
    """Like run_experiment, but every task of every method is a recorded change of a ledger,
    `ledger_root/<method label>`, whose probes are the stream's test sets: probe scores after change t
    are row t of the accuracy matrix. Interrupted? Run the same command again: tasks already in a
    ledger are skipped and an interrupted change continues from its last checkpoint."""
    from lifelong.data.streams import task_order, task_names
    from lifelong.errors import ConfigError
    from lifelong.ledger.changes import learn, learn_spec, resume
    from lifelong.ledger.core import Ledger
    from lifelong.ledger.probes import Probe

    spec = resolve_stream(config.stream)
    if spec.scenario != "task":
        raise ConfigError(f"--ledger records task-incremental streams (each probe among its own classes); "
                          f"stream {spec.name} is {spec.scenario}-incremental")
    out = Path(config.output_dir) / config.name
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / "config.yaml", yaml.safe_dump(to_dict(config), sort_keys=False))
    atomic_write_json(out / "versions.json", versions())
    names = task_names(spec.tasks)
    order = task_order(spec)
    tasks = [{"source": spec.tasks[i].source, "options": dict(spec.tasks[i].options), "name": names[i],
              "train_items": spec.tasks[i].train_items, "test_items": spec.tasks[i].test_items,
              "seed": spec.seed + i} for i in order]  # the subsample seeds build_stream uses
    probes = [Probe(name=t["name"], source=t["source"], options=t["options"], test_items=t["test_items"], seed=t["seed"])
              for t in tasks]
    runs = []
    for mc in config.methods:
        label = mc.display_name
        root = ledger_root / label
        if not (root / "ledger.json").exists():
            from lifelong.ledger.probes import run_probes

            ledger = Ledger.create(root, config.model, probes)
            ledger.record_baseline(run_probes(ledger.base_model(), ledger.probes))
        if (root / "pending" / "change.json").exists():
            resume(root)
        one = dataclasses.replace(config, methods=(mc,))
        for t, task in enumerate(tasks):
            done = len(Ledger.open(root).changes)
            if t < done:
                continue
            print(f"== {label}: task {t + 1}/{len(tasks)} {task['name']} -> ledger {root}")
            learn(root, learn_spec(one, task, checkpoint_every=10))
        ledger = Ledger.open(root)
        changes = ledger.changes[: len(tasks)]
        matrix = np.array([[ledger.manifest["baseline"][p.name] for p in probes]] +
                          [[c["probes_after"][p.name] for p in probes] for c in changes])
        row = {"method": label, **summarize(matrix),
               "trainable_params": max(c["cost"]["trainable_params"] for c in changes),
               "total_params": changes[0]["cost"]["total_params"],
               "train_seconds": sum(c["cost"]["train_seconds"] for c in changes),
               "peak_rss_mb": max(c["cost"]["peak_rss_mb"] for c in changes),
               "patch_bytes": sum(c["cost"]["patch_bytes"] for c in changes), "ledger": str(root)}
        runs.append(MethodRun(label, matrix, row))
    stream = build_stream(spec)
    write_results(out, config, stream, runs)
    return out


def describe_stream(stream: Stream) -> dict:
    return {
        "name": stream.name,
        "scenario": stream.scenario,
        "tasks": [
            {"name": t.name, "classes": list(t.class_names), "train_items": len(t.train), "test_items": len(t.test),
             "train_fingerprint": t.train.fingerprint, "test_fingerprint": t.test.fingerprint}
            for t in stream.tasks
        ],
    }


def columns_for(stream: Stream) -> list[tuple[str, str, str]]:
    return TABLE_COLUMNS[:-3] + (INCREMENTAL_COLUMNS if stream.scenario == "class" else []) + TABLE_COLUMNS[-3:]


def write_results(out: Path, config: RunConfig, stream: Stream, runs: list[MethodRun]) -> None:
    from lifelong.report.html import write_html_report
    from lifelong.report.plots import plot_accuracy_matrices
    from lifelong.report.table import format_table

    task_names = [t.name for t in stream.tasks]
    results = {
        "name": config.name,
        "stream": describe_stream(stream),
        "metric_definitions": METRIC_DOCS,
        "accuracy_unit": "percent top-1",
        "methods": {r.label: {"accuracy_matrix": r.accuracy_matrix.tolist(), **r.row} for r in runs},
    }
    atomic_write_json(out / "results.json", results)
    lines = ["method,after," + ",".join(task_names)]
    for r in runs:
        for t, acc_row in enumerate(r.accuracy_matrix):
            after = "zero-shot" if t == 0 else task_names[t - 1]
            lines.append(f"{r.label},{after}," + ",".join(f"{a:.2f}" for a in acc_row))
    atomic_write_text(out / "accuracy_matrix.csv", "\n".join(lines) + "\n")

    columns = columns_for(stream)
    rows = [r.row for r in runs]
    table = format_table(rows, columns)
    figure = plot_accuracy_matrices({r.label: r.accuracy_matrix for r in runs}, task_names, out / "accuracy_matrices.png")
    summary = (
        f"# {config.name}\n\nStream `{stream.name}` ({stream.scenario}-incremental): {', '.join(task_names)}; "
        f"model `{config.model.name}`; {config.train.steps_per_task} steps/task.\n\n"
        + format_table(rows, columns, markdown=True)
        + "\n\nAccuracies in percent; metric definitions in results.json (`metric_definitions`).\n"
    )
    atomic_write_text(out / "summary.md", summary)
    write_html_report(out / "report.html", f"lifelong: {config.name}", rows, columns, [figure],
                      notes="; ".join(f"{k}: {v}" for k, v in METRIC_DOCS.items()))
    print(table)
    print(f"\nwrote {out}/ (results.json, accuracy_matrix.csv, summary.md, accuracy_matrices.png, report.html)")


def versions() -> dict:
    packages = ["torch", "transformers", "peft", "accelerate", "safetensors", "numpy", "lifelong"]
    found = {}
    for name in packages:
        try:
            found[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            found[name] = None
    try:
        sha = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True,
                             cwd=Path(__file__).parent, timeout=5).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        sha = None
    return {"python": platform.python_version(), "platform": platform.platform(), "git_sha": sha, "packages": found}
