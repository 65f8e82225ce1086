"""`lifelong demo` at two commits, one after the other on this machine: the before/after of the CPU work.

    OMP_NUM_THREADS=1 taskset -c 0 python benchmarks/demo_time.py --before d7ab931 --after HEAD

Each commit is checked out into a temporary git worktree and its demo (configs/demo.yaml: 5 methods x 5
tasks x 100 steps on mtil-mini, embedded model) runs as `python -m lifelong.cli run` with that
worktree's sources first on PYTHONPATH, this venv's packages, and the shared stem cache (warm: the
venv set-up and the cold stem cache of `make demo` are not timed). Recorded per run: wall time,
user/system CPU time, minor page faults and peak RSS of the child process (getrusage), each method's
table row (train and eval seconds included) from the run's results.json and the run's summary.md, so
that the numbers can be compared too. `--rounds 2` alternates before/after twice (machine noise hits both alike).

Results: benchmarks/results/demo_time.json (atomic write). Exit status: non-zero only on an error.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import resource
import shlex
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


def git(*args: str) -> str:
    return subprocess.run(["git", *args], cwd=ROOT, check=True, capture_output=True, text=True).stdout.strip()


def run_demo(worktree: Path, out_dir: Path, name: str) -> dict:
    env = {**os.environ, "PYTHONPATH": str(worktree / "src")}
    cmd = [sys.executable, "-m", "lifelong.cli", "run", str(worktree / "src/lifelong/configs/demo.yaml"),
           f"name={name}", f"output_dir={out_dir}"]
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, env=env, cwd=worktree, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if proc.returncode != 0:
        raise SystemExit(f"{name} failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    results = json.loads((out_dir / name / "results.json").read_text())
    return {
        "wall_seconds": wall,
        "user_seconds": after.ru_utime - before.ru_utime,
        "system_seconds": after.ru_stime - before.ru_stime,
        "minor_page_faults": after.ru_minflt - before.ru_minflt,
        "peak_rss_mb": after.ru_maxrss / 1024,
        # each method's table row (metrics, seconds, peak RSS) without its per-order matrices
        "methods": {label: {k: v for k, v in m.items() if k != "per_order"} for label, m in results["methods"].items()},
        "summary_md": (out_dir / name / "summary.md").read_text(),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--before", required=True, help="commit of the 'before' run")
    parser.add_argument("--after", default="HEAD", help="commit of the 'after' run (default HEAD)")
    parser.add_argument("--rounds", type=int, default=1, help="before/after pairs, alternating (default 1)")
    parser.add_argument("--out", type=Path, default=RESULTS / "demo_time.json")
    args = parser.parse_args(argv)
    revs = {"before": git("rev-parse", args.before), "after": git("rev-parse", args.after)}
    runs: dict[str, list[dict]] = {"before": [], "after": []}
    with tempfile.TemporaryDirectory(prefix="demo-time-") as tmp:
        tmp = Path(tmp)
        trees = {}
        for label, sha in revs.items():
            trees[label] = tmp / label
            git("worktree", "add", "--detach", str(trees[label]), sha)
        try:
            for r in range(args.rounds):
                for label in ("before", "after"):
                    print(f"round {r + 1}/{args.rounds}: {label} ({revs[label][:10]}) ...", flush=True)
                    run = run_demo(trees[label], tmp / "runs", f"demo-{label}-{r}")
                    runs[label].append(run)
                    print(f"  {run['wall_seconds']:.0f} s wall, {run['system_seconds']:.0f} s system, "
                          f"{run['minor_page_faults']:,} minor page faults", flush=True)
        finally:
            for tree in trees.values():
                git("worktree", "remove", "--force", str(tree))
    best = {label: min(r["wall_seconds"] for r in rs) for label, rs in runs.items()}
    result = {
        "command": "python " + " ".join(shlex.quote(a) for a in [sys.argv[0], *(argv if argv is not None else sys.argv[1:])]),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "machine": machine(),
        "revisions": revs,
        "runs": runs,
        "summary": {"before_wall_seconds": best["before"], "after_wall_seconds": best["after"],
                    "speedup": best["before"] / best["after"]},
    }
    atomic_write_json(args.out, result)
    print(f"before {best['before']:.0f} s, after {best['after']:.0f} s: {best['before'] / best['after']:.2f}x; wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
