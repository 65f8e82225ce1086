"""What logging to TensorBoard costs the training loop: the same run with `train.log_with=tensorboard` and
`train.log_with=none`, as whole processes, alternated in pairs so that load on the machine hits both alike.

The run is the tiny config at 100 steps per task (3 tasks, finetune): steps of a few milliseconds, where a
per-step cost shows most; on the demo's 0.2 s steps it is smaller still. CPU time (user + system) of each
child process, median over the pairs and the median of the pairwise ratios.

    OMP_NUM_THREADS=1 python benchmarks/tracking_overhead.py --pairs 4   # writes results/tracking_overhead.json
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "benchmarks" / "results" / "tracking_overhead.json"
RUN = ["run", str(ROOT / "configs" / "tiny.yaml"), "train.steps_per_task=100", "methods=[finetune]",
       "train.checkpoints=false"]


def cpu_seconds(args: list[str]) -> float:
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    subprocess.run([sys.executable, "-m", "lifelong.cli", *args], cwd=ROOT, check=True, capture_output=True)
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    return (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pairs", type=int, default=4)
    args = parser.parse_args()
    times: dict[str, list[float]] = {"tensorboard": [], "none": []}
    with tempfile.TemporaryDirectory(prefix="tracking-overhead-") as tmp:
        for i in range(args.pairs + 1):  # the first pair warms the caches and is not counted
            for mode in times:
                seconds = cpu_seconds([*RUN, f"output_dir={tmp}", f"name={mode}-{i}", f"train.log_with={mode}"])
                if i:
                    times[mode].append(seconds)
    ratios = [a / b for a, b in zip(times["tensorboard"], times["none"])]
    record = {"command": "lifelong " + " ".join(RUN) + " train.log_with={tensorboard,none}", "pairs": args.pairs,
              "cpu_seconds": times, "median_cpu_seconds": {k: statistics.median(v) for k, v in times.items()},
              "median_ratio_tensorboard_over_none": statistics.median(ratios), "ratios": ratios}
    OUT.write_text(json.dumps(record, indent=2) + "\n")
    print(json.dumps({k: record[k] for k in ("median_cpu_seconds", "median_ratio_tensorboard_over_none", "ratios")},
                     indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
