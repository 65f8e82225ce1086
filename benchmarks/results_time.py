"""`make results` from nothing, timed: every row of configs/mtil_all.yaml trained into an empty folder.

    python benchmarks/results_time.py                            # the whole run (the 90-minute target)
    python benchmarks/results_time.py --config configs/demo.yaml # any run config
    python benchmarks/results_time.py --jobs 1                   # one process with every thread

`make results` keeps the committed rows and trains only the missing ones, so it says nothing about how long
the run takes. This runs the same command (`lifelong run CONFIG --jobs N output_dir=TMP`; N = 2 as `make results`)
with no rows to start from,
and records the child's wall time, user/system CPU time and peak RSS (getrusage), the machine (CPUs, torch
threads, load average before and after: a loaded machine makes the figure an upper bound), each method's
train and eval seconds summed over its orders, each order's row (metrics and seconds), and the run's summary.md,
so that the numbers can be compared with the committed table. The target is `--target-minutes` (90, issue 18); missing it is recorded, not an error.

Results: benchmarks/results/results_time.json (atomic write). Exit status: non-zero only on an error.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from loop_overhead import machine  # noqa: E402  (benchmarks/ is not a package)

from lifelong.atomic import atomic_write_json  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", type=Path, default=ROOT / "configs" / "mtil_all.yaml")
    parser.add_argument("--target-minutes", type=float, default=90.0)
    parser.add_argument("--jobs", type=int, default=2, help="worker processes, as `lifelong run --jobs` (make results: 2)")
    parser.add_argument("--keep", type=Path, metavar="DIR", help="also copy the timed run's rows/ into DIR/rows (e.g. "
                        "benchmarks/runs/mtil-all, so that `make results` writes the table of the timed run)")
    parser.add_argument("--out", type=Path, default=RESULTS / "results_time.json")
    args = parser.parse_args(argv)
    load_before = os.getloadavg()
    started = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    with tempfile.TemporaryDirectory(prefix="results-time-") as tmp:
        cmd = [sys.executable, "-m", "lifelong.cli", "run", str(args.config), "--jobs", str(args.jobs),
               f"output_dir={tmp}"]
        before = resource.getrusage(resource.RUSAGE_CHILDREN)
        t0 = time.perf_counter()
        log = Path(tmp) / "run.log"  # progress bars over 90 minutes: to a file, not into this process's memory
        with log.open("w") as err:
            proc = subprocess.run(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=err)
        wall = time.perf_counter() - t0
        after = resource.getrusage(resource.RUSAGE_CHILDREN)
        if proc.returncode != 0:
            raise SystemExit(f"the run failed ({proc.returncode}):\n{log.read_text()[-3000:]}")
        (run_dir,) = [p for p in Path(tmp).iterdir() if (p / "results.json").exists()]
        results = json.loads((run_dir / "results.json").read_text())
        summary_md = (run_dir / "summary.md").read_text()
        if args.keep is not None:
            shutil.rmtree(args.keep / "rows", ignore_errors=True)
            shutil.copytree(run_dir / "rows", args.keep / "rows")
    methods = {}
    for label, m in results["methods"].items():
        rows = m["per_order"]
        methods[label] = {"orders": len(rows),
                          "train_seconds": sum(r["train_seconds"] for r in rows),
                          "eval_seconds": sum(r["eval_seconds"] for r in rows),
                          # each order's row without its matrix: what a later run or the demo is compared with
                          "per_order": [{k: v for k, v in r.items() if k != "accuracy_matrix"} for r in rows]}
    record = {
        "command": " ".join(["python", "benchmarks/results_time.py", *(argv if argv is not None else sys.argv[1:])]),
        "config": str(args.config.relative_to(ROOT) if args.config.is_absolute() else args.config),
        "started": started,
        "machine": machine(),
        "jobs": args.jobs,
        "load_average_before": load_before,
        "load_average_after": os.getloadavg(),
        "wall_seconds": wall,
        "wall_minutes": wall / 60,
        "user_seconds": after.ru_utime - before.ru_utime,
        "system_seconds": after.ru_stime - before.ru_stime,
        "peak_rss_mb": after.ru_maxrss / 1024,  # the largest single process (one worker), not their sum
        "target_minutes": args.target_minutes,
        "within_target": wall / 60 <= args.target_minutes,
        "methods": methods,
        "summary_md": summary_md,
    }
    atomic_write_json(args.out, record)
    print(f"{record['config']}: {wall / 60:.1f} min wall ({record['user_seconds'] / 60:.1f} min user CPU), "
          f"target {args.target_minutes:.0f} min: {'met' if record['within_target'] else 'MISSED'}; "
          f"load average before {load_before[0]:.2f}, after {record['load_average_after'][0]:.2f}")
    for label, m in methods.items():
        print(f"  {label:16s} {m['orders']} orders  train {m['train_seconds']:7.1f} s  eval {m['eval_seconds']:6.1f} s")
    print(f"-> {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
