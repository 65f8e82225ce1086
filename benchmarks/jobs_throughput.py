"""`lifelong run --jobs 2` against one process, side by side: the same rows, wall time of the whole command.

    python benchmarks/jobs_throughput.py                # finetune on mtil-mini, 2 task orders (2 rows), both ways
    python benchmarks/jobs_throughput.py --repeats 2    # each way twice, alternating

One process gets every core as threads (`--jobs 1`); `--jobs 2` runs two workers with cores/2 threads each,
one row each. Each command trains into its own empty temporary folder (nothing kept) and is timed whole
(start-up, stem features, training, evaluation, figures). Runs alternate, so that load drifts hit both ways.
The rows' metrics are recorded too: they can differ in the last digits between thread counts.

Results: benchmarks/results/jobs_throughput.json (atomic write).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from loop_overhead import machine  # noqa: E402  (benchmarks/ is not a package)

from lifelong.atomic import atomic_write_json  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ["name=jobs", "orders=2", "methods=[finetune]", "train.log_with=none"]


def timed(jobs: int) -> tuple[float, dict]:
    with tempfile.TemporaryDirectory(prefix="jobs-") as tmp:
        cmd = [sys.executable, "-m", "lifelong.cli", "run", str(ROOT / "configs" / "demo.yaml"), "--jobs", str(jobs),
               *CONFIG, f"output_dir={tmp}"]
        t0 = time.perf_counter()
        proc = subprocess.run(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        wall = time.perf_counter() - t0
        if proc.returncode != 0:
            raise SystemExit(f"--jobs {jobs} failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
        results = json.loads((Path(tmp) / "jobs" / "results.json").read_text())
    rows = [{k: o[k] for k in ("avg", "last", "max_forgetting", "train_seconds")}
            for o in results["methods"]["finetune"]["per_order"]]
    return wall, {"rows": rows}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "jobs_throughput.json")
    args = parser.parse_args(argv)
    load_before = os.getloadavg()
    runs = {1: [], 2: []}
    for _ in range(args.repeats):
        for jobs in (1, 2):
            wall, detail = timed(jobs)
            runs[jobs].append({"wall_seconds": wall, **detail})
            print(f"--jobs {jobs}: {wall:.1f} s")
    one, two = (statistics.median(r["wall_seconds"] for r in runs[j]) for j in (1, 2))
    record = {"command": " ".join(["python", "benchmarks/jobs_throughput.py", *(argv if argv is not None else sys.argv[1:])]),
              "config": "configs/demo.yaml " + " ".join(CONFIG), "machine": machine(),
              "load_average_before": load_before, "load_average_after": os.getloadavg(),
              "runs": {f"jobs_{j}": r for j, r in runs.items()},
              "median_wall_seconds": {"jobs_1": one, "jobs_2": two}, "speedup": one / two}
    atomic_write_json(args.out, record)
    print(f"median: --jobs 1 {one:.1f} s, --jobs 2 {two:.1f} s: {one / two:.2f}x -> {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
