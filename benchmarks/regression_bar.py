"""The regression bar of a restructuring: the same numbers before and after.

Runs, for two commits, each in its own git worktree with its own empty cache, on the same machine and
thread count: (1) the demo (`configs/demo.yaml`: every method on mtil-mini with the embedded model) and
(2) the editing bench's single-edit protocol and its lifelong protocol at T = 10 for every editor on
SmolLM2. Then compares every accuracy-matrix entry and metric of the demo, and every metric of each
editor's single-edit and T = 10 rows, exactly (`==` on the recorded floats).

    OMP_NUM_THREADS=1 python benchmarks/regression_bar.py --before cd3c0e9 --after HEAD [--parts demo,edit]
    python benchmarks/regression_bar.py --before X --after Y --compare edit before.json after.json   # saved runs

Writes benchmarks/results/regression_bar.json: per part, the differing entries (empty when identical),
each run's wall time and both commits' SHA. Exits 1 when anything differs. The demo takes about 10 min
per commit on one core; the edit part about 30 min per commit.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "benchmarks" / "results" / "regression_bar.json"
EDIT_OVERRIDES = ["T=[10]", "single_n=10", "time_budget_s=100000"]
# What the comparison ignores: costs (times, memory) and where files went.
COSTS = {"train_seconds", "eval_seconds", "peak_rss_mb", "seconds_per_edit", "edit_seconds", "prepare_seconds",
         "wall_seconds", "peak_rss_mb_std", "train_seconds_std", "eval_seconds_std", "seconds", "ledger",
         "edit_seconds_total"}


def git(*args: str) -> str:
    return subprocess.run(["git", *args], cwd=ROOT, check=True, capture_output=True, text=True).stdout.strip()


def run_part(part: str, tree: Path, work: Path, name: str) -> tuple[dict, float]:
    env = {**os.environ, "PYTHONPATH": str(tree / "src"), "LIFELONG_CACHE": str(work / "cache"), "HF_HUB_OFFLINE": "1"}
    if part == "demo":
        args = ["run", str(tree / "src" / "lifelong" / "configs" / "demo.yaml"), f"output_dir={work}", f"name={name}"]
    else:
        args = ["bench", "edit", str(tree / "configs" / "edit_bench.yaml"), *EDIT_OVERRIDES, f"output_dir={work}",
                f"name={name}"]
    start = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "lifelong.cli", *args], cwd=tree, env=env, capture_output=True,
                          text=True)
    seconds = time.perf_counter() - start
    if done.returncode != 0:
        raise SystemExit(f"{part} at {tree} failed:\n{done.stderr[-3000:]}")
    return json.loads((work / name / "results.json").read_text()), seconds


def differences(a, b, where: str = "") -> list[str]:
    """Every leaf where the two results differ, costs and paths left out."""
    if isinstance(a, dict) and isinstance(b, dict):
        out = []
        for key in sorted(set(a) | set(b)):
            if key in COSTS or key in ("versions", "git_sha", "output_dir"):
                continue
            if key not in a or key not in b:
                out.append(f"{where}.{key}: only in {'after' if key in b else 'before'}")
            else:
                out.extend(differences(a[key], b[key], f"{where}.{key}"))
        return out
    if isinstance(a, list) and isinstance(b, list):
        if len(a) != len(b):
            return [f"{where}: {len(a)} vs {len(b)} items"]
        return [d for i, (x, y) in enumerate(zip(a, b)) for d in differences(x, y, f"{where}[{i}]")]
    return [] if a == b else [f"{where}: {a!r} -> {b!r}"]


def comparable(part: str, results: dict) -> dict:
    if part == "demo":
        return {label: {k: v for k, v in m.items() if k != "per_order"} for label, m in results["methods"].items()}
    return results.get("methods", results)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--before", required=True)
    parser.add_argument("--after", default="HEAD")
    parser.add_argument("--parts", default="demo,edit", help="comma-separated: demo, edit")
    parser.add_argument("--compare", nargs=3, metavar=("PART", "BEFORE_JSON", "AFTER_JSON"),
                        help="only compare two results.json files of a part already run (no runs)")
    args = parser.parse_args()
    if args.compare:
        part, before, after = args.compare
        diff = differences(comparable(part, json.loads(Path(before).read_text())),
                           comparable(part, json.loads(Path(after).read_text())))
        print("\n".join(diff) or f"{part}: identical")
        return 1 if diff else 0
    shas = {side: git("rev-parse", ref) for side, ref in (("before", args.before), ("after", args.after))}
    record = {"commits": shas, "threads": os.environ.get("OMP_NUM_THREADS"), "parts": {}}
    if OUT.is_file():
        previous = json.loads(OUT.read_text())
        if previous.get("commits") == shas:
            record["parts"] = previous.get("parts", {})
    with tempfile.TemporaryDirectory(prefix="regression-bar-") as tmp:
        tmp = Path(tmp)
        trees = {}
        for side, sha in shas.items():
            trees[side] = tmp / side
            git("worktree", "add", "--detach", str(trees[side]), sha)
        try:
            for part in args.parts.split(","):
                results, seconds = {}, {}
                for side in ("before", "after"):
                    print(f"== {part} at {side} ({shas[side][:9]})", flush=True)
                    results[side], seconds[side] = run_part(part, trees[side], tmp / f"{side}-{part}", f"{part}-{side}")
                diff = differences(comparable(part, results["before"]), comparable(part, results["after"]))
                record["parts"][part] = {"identical": not diff, "differences": diff, "seconds": seconds,
                                         "compared": sorted(comparable(part, results["after"]))}
                print(f"   {part}: {'identical' if not diff else f'{len(diff)} differences'}", flush=True)
                OUT.parent.mkdir(parents=True, exist_ok=True)
                OUT.write_text(json.dumps(record, indent=2) + "\n")
        finally:
            for tree in trees.values():
                git("worktree", "remove", "--force", str(tree))
    return 0 if all(p["identical"] for p in record["parts"].values()) else 1


if __name__ == "__main__":
    sys.exit(main())
