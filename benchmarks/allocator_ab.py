"""The allocator tuning (lifelong/runtime.py) against glibc's own settings, interleaved in one process.

    OMP_NUM_THREADS=1 taskset -c 0 python benchmarks/allocator_ab.py [--steps 40]

Separate runs of cpu_efficiency.py with and without the tuning are far apart in time on a shared
machine, and the load changes between them. Here the demo's training step (as in cpu_efficiency.py)
alternates between the two settings in blocks of `--block` steps, in one process on one model: before
an "off" block glibc's heap thresholds are set to its initial values (mmap threshold, trim threshold
and top pad 128 KiB; this turns off its dynamic threshold, so it is close to, not exactly, an untouched
process), before an "on" block to the tuned ones. The first 2 steps of a block (the heap settling into
the setting) are not counted. Recorded per setting: the median step time and the minor page faults per
step; the ratio is the median of the per-block ratios off / on. Linux/glibc only.

Results: benchmarks/results/allocator_ab.json (atomic write). Exit status: non-zero only on an error.
"""

from __future__ import annotations

import argparse
import ctypes
import datetime
import resource
import shlex
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from cpu_efficiency import demo_step  # noqa: E402  (benchmarks/ is not a package)
from loop_overhead import machine  # noqa: E402

from lifelong.atomic import atomic_write_json  # noqa: E402
from lifelong.loop import batch_order  # noqa: E402
from lifelong.runtime import (  # noqa: E402
    M_MMAP_THRESHOLD,
    M_TOP_PAD,
    M_TRIM_THRESHOLD,
    versions,  # noqa: E402
)

RESULTS = Path(__file__).resolve().parent / "results"
SETTINGS = {"off": (128 << 10, 128 << 10, 128 << 10), "on": (1 << 30, 1 << 30, 256 << 20)}  # mmap, trim, top pad


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--blocks", type=int, default=8, help="blocks per setting (default 8)")
    parser.add_argument("--block", type=int, default=6, help="steps per block, the first 2 not counted (default 6)")
    parser.add_argument("--out", type=Path, default=RESULTS / "allocator_ab.json")
    args = parser.parse_args(argv)
    libc = ctypes.CDLL("libc.so.6")

    def use(setting: str) -> None:
        mmap, trim, pad = SETTINGS[setting]
        for param, value in ((M_MMAP_THRESHOLD, mmap), (M_TRIM_THRESHOLD, trim), (M_TOP_PAD, pad)):
            if libc.mallopt(param, value) != 1:
                raise SystemExit(f"mallopt({param}, {value}) failed")

    config, _model, data, train_step = demo_step()
    order = batch_order(len(data.inputs), config.train.batch_size, 2 * args.blocks * args.block + 4, seed=0)

    def step(index) -> tuple[float, int]:
        faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        t0 = time.perf_counter()
        train_step(index)
        return time.perf_counter() - t0, resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults

    for i in range(4):  # warm-up, both settings
        use("off" if i % 2 else "on")
        step(order[i])
    seconds = {"off": [], "on": []}
    faults = {"off": [], "on": []}
    block_medians = {"off": [], "on": []}
    k = 4
    for b in range(2 * args.blocks):
        setting = "off" if b % 2 == 0 else "on"
        use(setting)
        times = []
        for j in range(args.block):
            s, f = step(order[k])
            k += 1
            if j >= 2:
                times.append(s)
                faults[setting].append(f)
        seconds[setting] += times
        block_medians[setting].append(statistics.median(times))
    ratios = [a / b for a, b in zip(block_medians["off"], block_medians["on"])]
    summary = {k: {"median_ms": 1e3 * statistics.median(v), "faults_per_step": statistics.mean(faults[k])}
               for k, v in seconds.items()}
    summary["ratio_off_over_on"] = statistics.median(ratios)
    for k in ("off", "on"):
        print(f"{k:3s}: median {summary[k]['median_ms']:.1f} ms per step, {summary[k]['faults_per_step']:.0f} minor page faults per step")
    print(f"off / on: {summary['ratio_off_over_on']:.3f} (median of {len(ratios)} block pairs)")
    atomic_write_json(args.out, {
        "command": "python " + " ".join(shlex.quote(a) for a in [sys.argv[0], *(argv if argv is not None else sys.argv[1:])]),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "machine": machine(), "versions": versions(), "settings_bytes": SETTINGS,
        "summary": summary, "seconds": seconds, "faults": faults,
    })
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
