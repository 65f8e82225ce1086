"""Peer benchmark: the same continual-learning experiment in Avalanche and in lifelong, side by side.

    bash benchmarks/peers/setup.sh                 # once: lifelong's venv and Avalanche's own
    .venv/bin/python benchmarks/peers/run.py       # every backbone x method x seed, both frameworks

One settings file (settings.yaml) holds the experiment: Split Fashion-MNIST (5 tasks, class-incremental),
two backbones (an MLP on pixels; a frozen EfficientNet-Lite0 with a linear head), four methods (naive,
EWC, LwF, replay), their hyperparameters and the seeds. This driver
1. loads every task's images with lifelong's loader and writes them, with the global labels, to
   data_<backbone>.npz, and the initial weights lifelong's builder makes to init_<backbone>.npz, both
   read by Avalanche's side (so both frameworks train the same arrays from the same weights);
2. runs each (backbone, method, seed) once per framework, each run a fresh process (lifelong_side.py in
   this venv, avalanche_side.py in Avalanche's), alternating which framework goes first from one method
   to the next, so that a change in machine load hits both;
3. checks that both sides saw the same data (fingerprints) and the same initial model (logits on 8 test
   images), computes the metrics of every accuracy matrix with lifelong.metrics.continual, and writes
   benchmarks/results/peers.json (command, machine, versions, settings, every run, the comparison:
   per row, each side's medians over the seeds and the per-seed speed-ups as median, min and max).

Times: `wall` is the whole process (interpreter start, imports, everything); `experiment` starts after
the imports (torch, the framework) and covers loading the data, preprocessing (lifelong: the frozen stem's
outputs, into an empty cache), building the model, training and every evaluation. Speed-up = Avalanche's
time / lifelong's. Peak RSS is each process's own high-water mark (ru_maxrss), imports included.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import yaml

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent.parent
FRAMEWORKS = ("lifelong", "avalanche")
AVALANCHE_PYTHON = HERE / ".venv-avalanche" / "bin" / "python"


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--settings", type=Path, default=HERE / "settings.yaml")
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "peers.json")
    ap.add_argument("--frameworks", default=",".join(FRAMEWORKS), help="comma-separated: lifelong,avalanche")
    ap.add_argument("--backbones", default="", help="comma-separated subset of the settings' backbones")
    ap.add_argument("--methods", default="", help="comma-separated subset of the settings' methods")
    ap.add_argument("--seeds", default="", help="comma-separated seeds instead of the settings' (e.g. 1,2,3,4)")
    ap.add_argument("--avalanche-python", type=Path, default=AVALANCHE_PYTHON)
    ap.add_argument("--work-dir", type=Path, default=None, help="where the shared arrays and per-run JSON go (default: a temp dir)")
    args = ap.parse_args(argv)

    settings = yaml.safe_load(args.settings.read_text())
    frameworks = [f for f in args.frameworks.split(",") if f]
    unknown = sorted(set(frameworks) - set(FRAMEWORKS))
    if unknown:
        raise SystemExit(f"unknown framework(s) {unknown}; valid: {', '.join(FRAMEWORKS)}")
    if "avalanche" in frameworks and not args.avalanche_python.is_file():
        raise SystemExit(f"Avalanche's environment is missing ({args.avalanche_python}): run `bash benchmarks/peers/setup.sh`")
    backbones = pick(args.backbones, settings["backbones"], "backbone")
    methods = pick(args.methods, settings["methods"], "method")
    work = args.work_dir or Path(tempfile.mkdtemp(prefix="lifelong-peers-"))
    work.mkdir(parents=True, exist_ok=True)
    if args.seeds:
        settings["seeds"] = [int(x) for x in args.seeds.split(",")]
    settings_file = work / "settings.yaml"
    settings_file.write_text(yaml.safe_dump(settings, sort_keys=False))  # what both sides read

    started = time.time()
    load_before = os.getloadavg()
    fingerprints = {b: write_shared_inputs(settings, b, work) for b in backbones}
    runs = []
    for backbone in backbones:
        for seed in settings["seeds"]:
            for i, method in enumerate(methods):
                order = frameworks if i % 2 == 0 else frameworks[::-1]
                for framework in order:
                    runs.append(run_one(framework, settings_file, work, backbone, method, seed, args.avalanche_python))
                    r = runs[-1]
                    print(f"{backbone:>18} {method:>6} seed {seed} {framework:>9}: wall {r['wall_seconds']:6.1f} s, experiment "
                          f"{r['seconds']['experiment']:6.1f} s, final accuracy {r['final_accuracy']:5.1f}, peak RSS "
                          f"{r['peak_rss_mb']:5.0f} MiB", flush=True)
    results = {
        "command": command_line(),
        "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        "total_seconds": time.time() - started,
        "machine": machine(load_before),
        "versions": {"lifelong": lifelong_versions(),
                     "avalanche": next((r["versions"] for r in runs if r["framework"] == "avalanche"), None)},
        "settings": settings,
        "definitions": DEFINITIONS,
        "checks": checks(runs, fingerprints),
        "runs": runs,
    }
    results["comparison"], results["summary"] = compare(runs, backbones, methods)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    tmp = args.out.with_suffix(".tmp")
    tmp.write_text(json.dumps(results, indent=1) + "\n")
    tmp.replace(args.out)
    print(table(results))
    print(f"\n{results['total_seconds'] / 60:.1f} min in all; written: {args.out}")
    if args.work_dir is None:
        shutil.rmtree(work, ignore_errors=True)
    return results


DEFINITIONS = {
    "final_accuracy": "mean over tasks j of a[T, j] (percent; equal test sets per task, so the accuracy on all 10 classes)",
    "forgetting_avalanche": "Avalanche's StreamForgetting: mean_{j<T} (a[j, j] - a[T, j]), accuracy when last trained minus final",
    "forgetting_chaudhry": "Chaudhry et al. 2018: mean_{j<T} (max_{l=j..T-1} a[l, j] - a[T, j])",
    "speedup": "Avalanche's seconds / lifelong's seconds (> 1: lifelong is faster)",
    "wall_seconds": "the whole process: interpreter start, imports, data, model, training, evaluation",
    "experiment_seconds": "after the imports: data loading, preprocessing (lifelong: frozen-stem outputs into an empty cache), model, training, every evaluation",
    "experiment_cpu_seconds": "the CPU time (user + system, time.process_time) of the experiment: one thread, so the work done, less sensitive than wall time to other jobs on the core",
    "row_0": "a[0, j], before any training. Avalanche's IncrementalClassifier masks classes not trained yet (-1000), so its row 0 and a[t, j] for j > t are not comparable with lifelong's (which scores an untrained task among its own and the seen classes); no metric here uses them",
}


def pick(selection: str, available: dict, what: str) -> list[str]:
    names = [s for s in selection.split(",") if s] or list(available)
    unknown = sorted(set(names) - set(available))
    if unknown:
        raise SystemExit(f"unknown {what}(s) {unknown}; in the settings: {', '.join(available)}")
    return names


def write_shared_inputs(settings: dict, backbone: str, work: Path) -> list[list[str]]:
    """data_<backbone>.npz (raw images, global labels, per task) and init_<backbone>.npz (initial
    trainable weights), from lifelong's loader and builder; returns the tasks' data fingerprints."""
    sys.path.insert(0, str(HERE))
    from lifelong_side import run_config

    from lifelong.data.streams import build_stream
    from lifelong.learn.driver import build_model

    config = run_config(settings, backbone, "naive", settings["seeds"][0])
    stream = build_stream(config.stream)
    arrays, offset = {"n_tasks": np.array(len(stream.tasks))}, 0
    for t, task in enumerate(stream.tasks):
        arrays[f"train_images_{t}"], arrays[f"train_labels_{t}"] = task.train.images, task.train.labels + offset
        arrays[f"test_images_{t}"], arrays[f"test_labels_{t}"] = task.test.images, task.test.labels + offset
        arrays[f"class_names_{t}"], arrays[f"name_{t}"] = np.array(task.class_names), np.array(task.name)
        offset += len(task.class_names)
    np.savez(work / f"data_{backbone}.npz", **arrays)
    model = build_model(config.model, stream)
    np.savez(work / f"init_{backbone}.npz",
             **{n: p.detach().numpy() for n, p in model.named_parameters() if not n.startswith("stem.")})
    return [[t.train.fingerprint, t.test.fingerprint] for t in stream.tasks]


def run_one(framework: str, settings_file: Path, work: Path, backbone: str, method: str, seed: int,
            avalanche_python: Path) -> dict:
    python = sys.executable if framework == "lifelong" else str(avalanche_python)
    script = HERE / f"{framework}_side.py"
    threads = str(yaml.safe_load(settings_file.read_text())["threads"])
    env = {**os.environ, "OMP_NUM_THREADS": threads, "MKL_NUM_THREADS": threads, "TQDM_DISABLE": "1",
           "PYTHONWARNINGS": "ignore"}
    log = work / f"{framework}-{backbone}-{method}-{seed}.log"
    load = os.getloadavg()[0]
    t0 = time.perf_counter()
    with open(log, "w") as f:
        done = subprocess.run([python, str(script), str(settings_file), str(work), backbone, method, str(seed)],
                              stdout=f, stderr=subprocess.STDOUT, env=env, cwd=ROOT)
    wall = time.perf_counter() - t0
    if done.returncode != 0:
        tail = log.read_text()[-3000:]
        raise SystemExit(f"{framework} {backbone} {method} seed {seed} failed (exit {done.returncode}):\n{tail}")
    record = json.loads((work / f"{framework}-{backbone}-{method}-{seed}.json").read_text())
    matrix = np.array(record["accuracy_matrix"])
    from lifelong.metrics.continual import avalanche_forgetting, chaudhry_forgetting, last

    record.update(wall_seconds=wall, load_average_1min=load, final_accuracy=last(matrix),
                  forgetting_avalanche=avalanche_forgetting(matrix), forgetting_chaudhry=chaudhry_forgetting(matrix))
    return record


def checks(runs: list[dict], fingerprints: dict) -> dict:
    """Same data and same initial model on both sides."""
    same_data = all(r["data_fingerprints"] == fingerprints[r["backbone"]] for r in runs if r["framework"] == "lifelong")
    gaps = []
    for r in runs:
        peer = [p for p in runs if p["framework"] != r["framework"] and (p["backbone"], p["method"], p["seed"]) ==
                (r["backbone"], r["method"], r["seed"])]
        if peer and r["framework"] == "lifelong":
            gaps.append(float(np.abs(np.array(r["initial_logits"]) - np.array(peer[0]["initial_logits"])).max()))
    return {"data_fingerprints_match_lifelong_loader": same_data,
            "initial_logits_max_abs_difference": max(gaps) if gaps else None}


def compare(runs: list[dict], backbones: list[str], methods: list[str]) -> tuple[list[dict], dict]:
    """Per backbone x method, over the seeds: each side's median cost and metrics, and the per-seed
    speed-ups (Avalanche's run / lifelong's run of the same seed) and accuracy gaps as median, min and max."""
    rows = []
    for backbone in backbones:
        for method in methods:
            side = {}
            for framework in FRAMEWORKS:
                mine = [r for r in runs if (r["framework"], r["backbone"], r["method"]) == (framework, backbone, method)]
                if mine:
                    side[framework] = {
                        "wall_seconds": spread(r["wall_seconds"] for r in mine),
                        "experiment_seconds": spread(r["seconds"]["experiment"] for r in mine),
                        "experiment_cpu_seconds": spread(r["seconds"]["experiment_cpu"] for r in mine),
                        "peak_rss_mb": max(r["peak_rss_mb"] for r in mine),
                        "final_accuracy": spread(r["final_accuracy"] for r in mine),
                        "forgetting_avalanche": spread(r["forgetting_avalanche"] for r in mine),
                        "forgetting_chaudhry": spread(r["forgetting_chaudhry"] for r in mine),
                        "seeds": sorted(r["seed"] for r in mine),
                    }
            row = {"backbone": backbone, "method": method, **side}
            pairs = [(a, ll) for ll in runs for a in runs
                     if (ll["framework"], a["framework"]) == ("lifelong", "avalanche")
                     and (ll["backbone"], ll["method"]) == (backbone, method)
                     and (a["backbone"], a["method"], a["seed"]) == (backbone, method, ll["seed"])]
            if pairs:
                row.update(
                    speedup_wall=spread(a["wall_seconds"] / ll["wall_seconds"] for a, ll in pairs),
                    speedup_experiment=spread(a["seconds"]["experiment"] / ll["seconds"]["experiment"] for a, ll in pairs),
                    speedup_experiment_cpu=spread(a["seconds"]["experiment_cpu"] / ll["seconds"]["experiment_cpu"]
                                                  for a, ll in pairs),
                    accuracy_gap_per_seed=spread(ll["final_accuracy"] - a["final_accuracy"] for a, ll in pairs),
                    # equal accuracy "over seeds": the gap between the two sides' median final accuracies
                    accuracy_gap=side["lifelong"]["final_accuracy"]["median"] - side["avalanche"]["final_accuracy"]["median"],
                    shortest_run_experiment_seconds=min(min(a["seconds"]["experiment"], ll["seconds"]["experiment"])
                                                        for a, ll in pairs),
                    shortest_run_wall_seconds=min(min(a["wall_seconds"], ll["wall_seconds"]) for a, ll in pairs),
                    seeds=len(pairs),
                )
            rows.append(row)
    summary = {}
    paired = [r for r in rows if "speedup_wall" in r]
    for key in ("speedup_wall", "speedup_experiment", "speedup_experiment_cpu"):
        per = {b: geomean(r[key]["median"] for r in paired if r["backbone"] == b) for b in backbones}
        summary[key] = {"geometric_mean_of_medians": geomean(r[key]["median"] for r in paired) if paired else None,
                        "per_backbone": per}
    if paired:
        summary["max_abs_accuracy_gap"] = max(abs(r["accuracy_gap"]) for r in paired)
        summary["target"] = ("lifelong >= 2x faster (median over seeds of the per-seed speed-up) at equal final "
                             "accuracy (the two sides' median final accuracies within 1 point)")
        for key in ("speedup_experiment", "speedup_experiment_cpu"):
            summary[f"meeting_target_by_{key}"] = sum(r[key]["median"] >= 2 and abs(r["accuracy_gap"]) <= 1 for r in paired)
            summary[f"at_2x_by_{key}"] = sum(r[key]["median"] >= 2 for r in paired)
        summary["rows"] = len(paired)
        summary["shortest_run_experiment_seconds"] = min(r["shortest_run_experiment_seconds"] for r in paired)
        summary["shortest_run_wall_seconds"] = min(r["shortest_run_wall_seconds"] for r in paired)
    return rows, summary


def command_line() -> str:
    script = Path(sys.argv[0]).resolve()
    shown = script.relative_to(ROOT) if script.is_relative_to(ROOT) else script
    return " ".join(["python", str(shown), *sys.argv[1:]])


def spread(values) -> dict:
    """Median, min and max of the values (one per seed), and the values themselves."""
    values = [float(v) for v in values]
    return {"median": float(np.median(values)), "min": min(values), "max": max(values), "values": values}


def geomean(values) -> float | None:
    values = [v for v in values if v is not None]
    return float(math.exp(np.mean(np.log(values)))) if values else None


def table(results: dict) -> str:
    """A markdown table, one row per backbone x method: medians over the seeds, [min-max] for the
    speed-ups and accuracies; each cost and metric cell is lifelong / Avalanche."""
    head = ("| backbone | method | seeds | experiment CPU (s) | **speed-up (CPU)** [min-max] | experiment (s) | "
            "speed-up (experiment) [min-max] | wall (s) | peak RSS (MiB) | final accuracy [min-max] | "
            "forgetting (Avalanche) | forgetting (Chaudhry) |")
    lines = [head, "|" + "---|" * 2 + "--:|" * 10]

    def pair(row, key, digits=1):
        return " / ".join(f"{row[f][key]['median']:.{digits}f}" if isinstance(row[f][key], dict) else f"{row[f][key]:.0f}"
                          for f in FRAMEWORKS)

    def ratio(s):
        return f"{s['median']:.2f}x [{s['min']:.2f}-{s['max']:.2f}]"

    for row in results["comparison"]:
        if "speedup_wall" not in row:
            continue
        acc = " / ".join(f"{row[f]['final_accuracy']['median']:.1f} [{row[f]['final_accuracy']['min']:.1f}-"
                         f"{row[f]['final_accuracy']['max']:.1f}]" for f in FRAMEWORKS)
        lines.append(f"| {row['backbone']} | {row['method']} | {row['seeds']} | {pair(row, 'experiment_cpu_seconds')} | "
                     f"**{ratio(row['speedup_experiment_cpu'])}** | {pair(row, 'experiment_seconds')} | "
                     f"{ratio(row['speedup_experiment'])} | {pair(row, 'wall_seconds')} | {pair(row, 'peak_rss_mb')} | {acc} | "
                     f"{pair(row, 'forgetting_avalanche')} | {pair(row, 'forgetting_chaudhry')} |")
    return "\n".join(lines)


def machine(load_before) -> dict:
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor()) if Path("/proc/cpuinfo").exists() else platform.processor()
    return {"cpu": cpu, "logical_cpus": os.cpu_count(), "cpus_this_process_may_use": sorted(os.sched_getaffinity(0)),
            "platform": platform.platform(), "python": platform.python_version(),
            "load_average_before": load_before, "load_average_after": os.getloadavg()}


def lifelong_versions() -> dict:
    from importlib import metadata

    sha = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, cwd=ROOT).stdout.strip()
    dirty = bool(subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], capture_output=True, text=True,
                                cwd=ROOT).stdout.strip())
    return {"git_sha": sha, "git_dirty": dirty,
            **{p: metadata.version(p) for p in ("lifelong", "torch", "numpy", "accelerate", "efficientnet-lite-pytorch")}}


if __name__ == "__main__":
    main()
