"""`lifelong run CONFIG --ledger DIR`: a config's stream run as recorded changes, one ledger per method."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import yaml

from lifelong.atomic import atomic_write_json, atomic_write_text
from lifelong.config import RunConfig, to_dict
from lifelong.data.streams import build_stream, stream_from_section, task_names, task_order
from lifelong.errors import ConfigError
from lifelong.families import ledger_families
from lifelong.learn.driver import MethodRun, check_adapters, check_run, write_results
from lifelong.ledger.changes import learn, learn_spec, resume
from lifelong.ledger.core import Ledger
from lifelong.ledger.probes import Probe, run_probes
from lifelong.metrics.continual import summarize
from lifelong.runtime import versions


def run_into_ledgers(config: RunConfig, ledger_root: Path) -> Path:
    """Like run_experiment, but every task of every method is a recorded change of a ledger,
    `ledger_root/<method label>`, whose probes are the stream's test sets: probe scores after change t
    are row t of the accuracy matrix. Interrupted? Run the same command again: tasks already in a
    ledger are skipped and an interrupted change continues from its last checkpoint."""
    check_run(config)
    check_adapters(config, config.model)
    spec = stream_from_section(config.stream)
    if config.model.family not in ledger_families():
        raise ConfigError(f"--ledger records the families {', '.join(ledger_families())}, not model.family={config.model.family}")
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
            ledger = Ledger.create(root, config.model, probes)
            ledger.record_baseline(run_probes(ledger.materialize(), ledger.probes))
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
        runs.append(MethodRun(label, [matrix], [{"tasks": [t["name"] for t in tasks], **row}], row))
    write_results(out, config, [build_stream(spec)], runs)
    return out
