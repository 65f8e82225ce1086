"""The learn driver: a config's methods over its stream (`lifelong run`), written to runs/<name>/.

The stream is loaded and the frozen image stem is run over every image once; every method then
starts from a fresh copy of the same pretrained model and reuses those stem outputs. The ledger's
learn changes (`lifelong learn`) and `lifelong run --ledger` go through the same pieces: `check_run`,
`build_model`, `prepare_trainable`, `build_method` and the one loop (`lifelong.loop`).

A stopped run continues: every finished (method, task order) row is written to rows/<method>/order_<k>.json
with the settings and data it was measured under, and a rerun of the same config keeps it.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import yaml

from lifelong.atomic import atomic_write_json, atomic_write_text
from lifelong.config import ModelConfig, RunConfig, load_config, method_train, to_dict
from lifelong.data.base import Stream
from lifelong.data.streams import build_stream, stream_from_section, task_order
from lifelong.errors import ConfigError
from lifelong.families import FAMILIES, get_family, prepare_trainable, vlm
from lifelong.learn import METHODS, build_method, method_params
from lifelong.loop import compute_stem_features, make_accelerator, run_stream
from lifelong.metrics.continual import METRIC_DOCS, average_incremental_accuracy, summarize
from lifelong.metrics.cost import PeakMemory, count_parameters
from lifelong.report.pages import INCREMENTAL_COLUMNS, LEARN_COLUMNS, write_run_report
from lifelong.report.plots import plot_accuracy_matrices, plot_metric_bars
from lifelong.report.table import format_table
from lifelong.runtime import versions


@dataclass
class MethodRun:
    label: str
    matrices: list[np.ndarray]  # one accuracy matrix per task order
    orders: list[dict]  # per order: its task names and metrics
    row: dict  # the table row: metrics (mean over orders) and costs


def build_model(config: ModelConfig, stream: Stream):
    """The model of `config.family` (the registry's builder); a classifier gets a head row per class of the stream."""
    model, _ = get_family(config.family).build(config, tuple(stream.class_names))
    return model


def run_experiment(config: RunConfig, finished_only: bool = False, claims: Path | None = None) -> Path:
    """Run every configured method on the stream; write results, tables and figures; return the run dir.

    `finished_only`: train nothing; the results hold the methods whose every task order is already in rows/
    (same settings and data), and the others are listed as missing. `claims`: run as one of several worker
    processes (`lifelong run --jobs`, lifelong.learn.jobs): train only the rows this process claims first in
    that folder, write those rows, and leave the results to the process that started the workers."""
    check_run(config)
    check_adapters(config, config.model)
    # Under `accelerate launch` every process trains (DDP) and evaluates its share; one writes and prints.
    main = make_accelerator().is_main_process
    say = print if main else (lambda *a, **k: None)
    out = Path(config.output_dir) / config.name
    if main:
        out.mkdir(parents=True, exist_ok=True)
        atomic_write_text(out / "config.yaml", yaml.safe_dump(to_dict(config), sort_keys=False))
        atomic_write_json(out / "versions.json", versions())

    streams = ordered_streams(config)
    base = build_model(config.model, streams[0])
    stems = [None if finished_only else compute_stem_features(base, stream, config.train.eval_batch_size)
             for stream in streams]
    if main:
        atomic_write_json(out / "data.json", describe_stream(streams[0]))

    runs, missing = [], []
    for mc in config.methods:
        label = mc.display_name
        mconfig = dataclasses.replace(config, train=method_train(config, mc))  # the method's own train overrides
        rows, matrices = [], []
        for r, (stream, stem) in enumerate(zip(streams, stems)):
            which = f", order {r + 1}/{len(streams)}: {' -> '.join(t.name for t in stream.tasks)}" if len(streams) > 1 else ""
            say(f"== {label}: {len(stream.tasks)} tasks x {mconfig.train.steps_per_task} steps, lr {mconfig.train.lr:g}{which}")
            done_file = out / "rows" / label / f"order_{r + 1}.json"
            settings = row_settings(mconfig, mc, stream)
            row, matrix = finished_row(done_file, settings)
            if row is not None:
                say(f"   kept from {done_file} (same settings and data; delete it to train again)")
            elif finished_only:
                say(f"   not measured yet ({done_file}): {label} is left out of the results")
                break
            elif claims is not None and not claim(claims / label / f"order_{r + 1}"):
                say("   another worker trains it")
                continue
            else:
                model = copy.deepcopy(base)
                prepare_trainable(model, config.model, mc.adapter or config.adapter, seed=config.seed)
                method = build_method(mc)
                checkpoints = out / "checkpoints" / label / (f"order_{r + 1}" if len(streams) > 1 else "")
                with PeakMemory() as memory:
                    result = run_stream(model, method, stream, stem, mconfig, checkpoints, log_dir=out / "logs",
                                        log_name=f"{label}" + (f"/order_{r + 1}" if len(streams) > 1 else ""))
                trainable, total = count_parameters(model)
                row = {"tasks": [t.name for t in stream.tasks], **summarize(result.accuracy_matrix)}
                if stream.scenario == "class":
                    row["avg_incremental_accuracy"], row["final_seen_accuracy"] = average_incremental_accuracy(result.seen_accuracy)
                row.update(trainable_params=trainable, total_params=total, train_seconds=result.train_seconds,
                           eval_seconds=result.eval_seconds, peak_rss_mb=memory.peak_mb)
                matrix = result.accuracy_matrix
                if main:
                    atomic_write_json(done_file, {"settings": settings, "row": row, "accuracy_matrix": matrix.tolist()})
            rows.append(row)
            matrices.append(matrix)
            say(f"   Avg {row['avg']:.1f}  Last {row['last']:.1f}  max forgetting {row['max_forgetting']:.1f}  "
                  f"ZS degradation {row['zero_shot_degradation']:.1f}  ({row['train_seconds']:.0f} s)")
        if len(rows) < len(streams):
            missing.append(label)
            continue
        runs.append(MethodRun(label, matrices, rows, aggregate(label, rows)))
    if claims is not None:
        return out
    if missing:
        say(f"\nnot in the results (a task order not measured yet; `lifelong run` without --finished trains them): "
            f"{', '.join(missing)}")
    if not runs:
        raise ConfigError(f"no method of {config.name} has every task order measured in {out / 'rows'} yet")
    if main:
        write_results(out, config, streams, runs, processes=make_accelerator().num_processes)
    return out


def claim(path: Path) -> bool:
    """True for the one process that creates `path` first (an exclusive create: atomic on a local file system)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
    except FileExistsError:
        return False
    os.write(fd, str(os.getpid()).encode())
    os.close(fd)
    return True


def row_settings(config: RunConfig, method, stream: Stream) -> dict:
    """What one (method, task order) row depends on: the run's settings but its name and output place, the
    method's section, and the fingerprints of the ordered tasks' data."""
    settings = {k: v for k, v in to_dict(config).items() if k not in ("name", "output_dir", "methods", "orders")}
    return {**settings, "method": to_dict(method),
            "tasks": [[t.name, t.train.fingerprint, t.test.fingerprint] for t in stream.tasks]}


def finished_row(path: Path, settings: dict) -> tuple[dict | None, np.ndarray | None]:
    """The row and accuracy matrix a stopped `lifelong run` already measured under the same settings, if any."""
    if not path.is_file():
        return None, None
    stored = json.loads(path.read_text())
    if stored.get("settings") != json.loads(json.dumps(settings)):
        return None, None
    return stored["row"], np.asarray(stored["accuracy_matrix"], dtype=float)


def ordered_streams(config: RunConfig) -> list[Stream]:
    """The stream in `config.orders` cyclic orders of its task order (same tasks, same data)."""
    spec = stream_from_section(config.stream)
    base = task_order(spec)
    if config.orders > len(base):
        raise ConfigError(f"orders={config.orders}, but the stream has {len(base)} tasks: at most {len(base)} cyclic orders")
    return [build_stream(dataclasses.replace(spec, order=tuple(base[r:] + base[:r]), rotation=0))
            for r in range(config.orders)]


def aggregate(label: str, rows: list[dict]) -> dict:
    """One table row from the per-order rows: metric means (with `<name>_std`), mean time, peak memory."""
    row = {"method": label}
    for key in rows[0]:
        values = [r[key] for r in rows]
        if key == "tasks":
            continue
        if key == "peak_rss_mb":
            row[key] = max(values)
        elif key in ("trainable_params", "total_params"):
            row[key] = values[0]
        else:
            row[key] = float(np.mean(values))
            if key in METRIC_DOCS or key in ("avg_incremental_accuracy", "final_seen_accuracy"):
                row[f"{key}_std"] = float(np.std(values))
    row["orders"] = len(rows)
    return row


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
    return LEARN_COLUMNS[:-3] + (INCREMENTAL_COLUMNS if stream.scenario == "class" else []) + LEARN_COLUMNS[-3:]


def write_results(out: Path, config: RunConfig, streams: list[Stream], runs: list[MethodRun], processes: int = 1) -> None:
    """results.json, accuracy_matrix.csv, summary.md, the figures and report.html; print the table.

    With several orders the table shows each metric as mean +- std over the orders (population std).
    """
    stream = streams[0]
    results = {
        "name": config.name,
        "processes": processes,  # how many processes trained it (accelerate launch --num_processes)
        "stream": describe_stream(stream),
        "orders": [[t.name for t in s.tasks] for s in streams],
        "metric_definitions": METRIC_DOCS,
        "accuracy_unit": "percent top-1",
        "std": "population standard deviation over the task orders (ddof = 0)",
        "methods": {r.label: {"accuracy_matrix": r.matrices[0].tolist(), **r.row,
                              "per_order": [{**o, "accuracy_matrix": m.tolist()} for o, m in zip(r.orders, r.matrices)]}
                    for r in runs},
    }
    atomic_write_json(out / "results.json", results)
    for k, ordered in enumerate(streams):  # one CSV per task order: accuracy_matrix.csv, accuracy_matrix_order_2.csv, ...
        names = [t.name for t in ordered.tasks]
        lines = ["method,after," + ",".join(names)]
        for r in runs:
            for t, acc_row in enumerate(r.matrices[k]):
                after = "zero-shot" if t == 0 else names[t - 1]
                lines.append(f"{r.label},{after}," + ",".join(f"{a:.2f}" for a in acc_row))
        atomic_write_text(out / ("accuracy_matrix.csv" if k == 0 else f"accuracy_matrix_order_{k + 1}.csv"), "\n".join(lines) + "\n")

    columns = columns_for(stream)
    rows = [r.row for r in runs]
    if len(streams) > 1:
        columns = [(key, header, _mean_std(key, fmt)) if f"{key}_std" in rows[0] else (key, header, fmt)
                   for key, header, fmt in columns]
        rows = [{**row, **{k: (row[k], row[f"{k}_std"]) for k in row if f"{k}_std" in row}} for row in rows]
    table = format_table(rows, columns)
    task_names = [t.name for t in stream.tasks]
    plot_accuracy_matrices({r.label: r.matrices[0] for r in runs}, task_names, out / "accuracy_matrices.png")
    bar_metrics = ["transfer", "avg", "last", "max_forgetting", "zero_shot_degradation"]
    plot_metric_bars([r.row for r in runs], bar_metrics, out / "metrics.png", title=f"mean over {len(streams)} task order(s)")
    orders_note = (f"; {len(streams)} cyclic task orders, mean +- std over them" if len(streams) > 1 else "")
    summary = (
        f"# {config.name}\n\nStream `{stream.name}` ({stream.scenario}-incremental): {', '.join(task_names)}{orders_note}; "
        f"model `{config.model.name}`; {config.train.steps_per_task} steps/task.\n\n"
        + format_table(rows, columns, markdown=True)
        + "\n\nAccuracies in percent; metric definitions in results.json (`metric_definitions`).\n"
    )
    atomic_write_text(out / "summary.md", summary)
    write_run_report(out)
    print(table)
    print(f"\nwrote {out}/ (results.json, accuracy_matrix.csv, summary.md, accuracy_matrices.png, metrics.png, report.html)")
    print(f"report: {out / 'report.html'}")


def _mean_std(key: str, fmt: str):
    def cell(value) -> str:
        mean, std = value
        return f"{format(mean, fmt)} ± {format(std, fmt)}"

    return cell


def load_run_config(path: str | Path | None, overrides: list[str] | tuple[str, ...] = ()) -> RunConfig:
    """A run config from YAML + `a.b=c` overrides, checked against the registries before any work starts."""
    config = load_config(path, overrides)
    check_run(config)
    return config


def check_run(config: RunConfig) -> None:
    """Checks that need the registries: the family, its knobs, the methods and their knobs, the stream."""
    if not config.methods:
        raise ConfigError("methods is empty: name at least one of " + ", ".join(METHODS))
    for i, m in enumerate(config.methods):
        if m.name not in METHODS:
            raise ConfigError(f"methods.{i}.name={m.name!r} is not a method; valid: {', '.join(METHODS)}")
        method_params(m, f"methods.{i}")
    family = get_family(config.model.family)
    if "learn" not in family.operations:
        raise ConfigError(f"model.family={config.model.family!r} does not learn tasks (it takes: "
                          f"{', '.join(sorted(family.operations))}); learning families: "
                          f"{', '.join(n for n, f in FAMILIES.items() if 'learn' in f.operations)}")
    family.validate(config.model, tuple(m.name for m in config.methods))
    stream_from_section(config.stream)


def check_adapters(config: RunConfig, model: ModelConfig) -> None:
    """Adapter kinds the model cannot take, refused before any work (building the model would find them only
    after the stem features or the probes). `model`: the run's, or a ledger's (its learn config names none)."""
    adapters = [config.adapter] + [m.adapter for m in config.methods if m.adapter is not None]
    if model.family == "vlm" and any(a.kind == "vpt" for a in adapters) and vlm.has_cnn_tower(model):
        raise ConfigError(vlm.VPT_ON_CNN)

