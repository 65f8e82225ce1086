"""Load times that unit tests used to bound with wall-clock limits (which fail on a loaded machine):
parsing Fashion-MNIST, building the tiny stream, building the tiny tokenizer. Median of 5 runs each.

    python benchmarks/load_times.py      # writes benchmarks/results/load_times.json
"""

from __future__ import annotations

import json
import statistics
import time
from pathlib import Path

from lifelong.data import builtin
from lifelong.data.sources import load_source
from lifelong.data.streams import build_stream
from lifelong.families.lm import tiny_tokenizer
from lifelong.runtime import versions

TARGETS_S = {"fashion_mnist_parse": 2.0, "tiny_stream": 1.0, "tiny_tokenizer": 2.0}


def fashion_mnist_parse() -> None:
    builtin._parse_fashion_mnist.cache_clear()
    load_source("fashion-mnist", "train")
    load_source("fashion-mnist", "test")


def median_seconds(fn, runs: int = 5) -> float:
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    results = {
        "fashion_mnist_parse": median_seconds(fashion_mnist_parse),
        "tiny_stream": median_seconds(lambda: build_stream("tiny")),
        "tiny_tokenizer": median_seconds(tiny_tokenizer),
    }
    record = {"median_seconds": results, "targets_seconds": TARGETS_S,
              "within_target": {k: results[k] < TARGETS_S[k] for k in results}, "versions": versions()}
    out = Path(__file__).parent / "results" / "load_times.json"
    out.write_text(json.dumps(record, indent=2) + "\n")
    for k, v in results.items():
        print(f"{k:22s} {v:6.3f} s  (target < {TARGETS_S[k]} s)")


if __name__ == "__main__":
    main()
