"""How much the demo's rows move with the seed: the spread the README can promise.

Runs the demo config (`configs/demo.yaml`: mtil-mini, the embedded model) with only finetune and
finetune+lora, for several seeds, each in a fresh process with the same cache, and records Last and
max forgetting per seed with their mean and population standard deviation. The seed sets the LoRA
initialisation, the batch order and the subsampled training images.

    OMP_NUM_THREADS=1 python benchmarks/lora_spread.py --seeds 0,1,2     # ~6 min per seed on one core

Writes benchmarks/results/lora_spread.json.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "benchmarks" / "results" / "lora_spread.json"
METHODS = "methods=[finetune, {name: finetune, label: finetune+lora, adapter: {kind: lora, rank: 8, alpha: 16, tower: image}, train: {lr: 1.0e-3}}]"
METRICS = ("last", "max_forgetting", "avg", "transfer")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", default="0,1,2")
    args = parser.parse_args()
    seeds = [int(s) for s in args.seeds.split(",")]
    per_seed: dict[str, dict[int, dict]] = {}
    with tempfile.TemporaryDirectory(prefix="lora-spread-") as tmp:
        for seed in seeds:
            name = f"seed{seed}"
            cmd = [sys.executable, "-m", "lifelong.cli", "run", str(ROOT / "configs" / "demo.yaml"), METHODS,
                   f"seed={seed}", f"output_dir={tmp}", f"name={name}", "train.log_with=none", "train.checkpoints=false"]
            print(f"== seed {seed}", flush=True)
            done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
            if done.returncode != 0:
                raise SystemExit(done.stderr[-3000:])
            results = json.loads((Path(tmp) / name / "results.json").read_text())
            for label, row in results["methods"].items():
                per_seed.setdefault(label, {})[seed] = {k: row[k] for k in METRICS}
    summary = {label: {k: {"mean": statistics.fmean(r[k] for r in rows.values()),
                           "std": statistics.pstdev([r[k] for r in rows.values()]),
                           "min": min(r[k] for r in rows.values()), "max": max(r[k] for r in rows.values())}
                       for k in METRICS}
               for label, rows in per_seed.items()}
    OUT.write_text(json.dumps({"seeds": seeds, "per_seed": per_seed, "summary": summary}, indent=2) + "\n")
    for label, stats in summary.items():
        print(f"{label:14s} " + "  ".join(f"{k} {v['mean']:.1f} ± {v['std']:.1f} [{v['min']:.1f}, {v['max']:.1f}]"
                                         for k, v in stats.items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
