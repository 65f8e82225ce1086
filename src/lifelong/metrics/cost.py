"""What a method costs: parameters it trains, peak process memory, wall-clock time.

Dependency-free (standard library only; ``count_parameters`` takes any torch ``nn.Module`` without
importing torch here).
"""

from __future__ import annotations

import os
import sys
import threading
import time
from typing import Any

from lifelong.runtime import trim_heap

__all__ = ["PeakMemory", "Stopwatch", "count_parameters"]

_MIB = 2**20


def count_parameters(module: Any) -> tuple[int, int]:
    """Return ``(trainable, total)`` element counts of ``module.parameters()``.

    A parameter shared between submodules (tied weights) is counted once, as ``parameters()``
    yields it once. Trainable = ``requires_grad``.
    """
    params = list(module.parameters())
    total = sum(p.numel() for p in params)
    trainable = sum(p.numel() for p in params if p.requires_grad)
    return trainable, total


def _rss_bytes() -> int | None:
    """Current resident set size from /proc/self/statm (Linux), or None where unavailable."""
    try:
        with open("/proc/self/statm", "rb") as f:
            resident_pages = int(f.read().split()[1])
    except (OSError, IndexError, ValueError):
        return None
    return resident_pages * os.sysconf("SC_PAGE_SIZE")


def _vm_hwm_bytes() -> int | None:
    """The kernel's peak-RSS mark (VmHWM in /proc/self/status, Linux), or None where unavailable."""
    try:
        with open("/proc/self/status", "rb") as f:
            for line in f:
                if line.startswith(b"VmHWM:"):
                    return int(line.split()[1]) * 1024  # reported in kB
    except (OSError, IndexError, ValueError):
        return None
    return None


def _ru_maxrss_bytes() -> int:
    """getrusage's ru_maxrss: the process-lifetime peak RSS (kB on Linux, bytes on macOS)."""
    import resource  # POSIX only

    value = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return value if sys.platform == "darwin" else value * 1024


class PeakMemory:
    """Peak resident memory (RSS) of this process during a ``with`` block, in MiB (2**20 bytes).

    ``ru_maxrss`` and VmHWM are high-water marks over the whole process lifetime: if the process
    once used more memory before the block, they cannot see the block's own peak. So a background
    thread samples the current RSS every ``interval_s`` (default 20 ms) from /proc/self/statm.
    A spike shorter than the interval can fall between samples; on exit, if VmHWM rose during the
    block, that rise was the block's peak and is used exactly. On entry the heap's free memory is
    returned to the system (`runtime.trim_heap`): the tuned allocator keeps freed memory, which would
    otherwise count towards the next block's baseline and peak.

    After the block: ``baseline_mb`` (RSS at entry), ``peak_mb`` (peak RSS during the block) and
    ``delta_mb`` (peak - baseline, the memory the block added). Without /proc (macOS), no sampling
    is possible without extra packages: ``peak_mb`` is then ``ru_maxrss`` at exit (process-lifetime
    peak) and ``baseline_mb`` / ``delta_mb`` are NaN. Measures host memory, not GPU memory.

        with PeakMemory() as mem:
            train_one_task(...)
        print(f"peak {mem.peak_mb:.0f} MiB (+{mem.delta_mb:.0f})")
    """

    def __init__(self, interval_s: float = 0.02) -> None:
        if interval_s <= 0:
            raise ValueError(f"interval_s must be > 0; got {interval_s}")
        self.interval_s = interval_s
        self.baseline_mb = float("nan")
        self.peak_mb = float("nan")
        self.delta_mb = float("nan")
        self._peak_bytes = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._hwm_at_entry: int | None = None

    def _sample(self) -> None:
        rss = _rss_bytes()
        if rss is not None and rss > self._peak_bytes:
            self._peak_bytes = rss

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            self._sample()

    def __enter__(self) -> PeakMemory:

        trim_heap()  # freed memory an earlier block left in the heap (runtime.tune_allocator) is not this block's
        baseline = _rss_bytes()
        self._hwm_at_entry = _vm_hwm_bytes()
        if baseline is not None:
            self._peak_bytes = baseline
            self.baseline_mb = baseline / _MIB
            self._stop.clear()
            self._thread = threading.Thread(target=self._run, name="PeakMemory", daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        if self._thread is None:  # no /proc: only the lifetime high-water mark is available
            self.peak_mb = _ru_maxrss_bytes() / _MIB
            return
        self._stop.set()
        self._thread.join()
        self._thread = None
        self._sample()
        hwm = _vm_hwm_bytes()
        if hwm is not None and self._hwm_at_entry is not None and hwm > self._hwm_at_entry:
            self._peak_bytes = max(self._peak_bytes, hwm)
        self.peak_mb = self._peak_bytes / _MIB
        self.delta_mb = self.peak_mb - self.baseline_mb


class Stopwatch:
    """Wall-clock seconds of a ``with`` block (``time.perf_counter``).

    ``elapsed`` is readable inside the block (time so far) and after it (the block's duration).
    """

    def __init__(self) -> None:
        self._start: float | None = None
        self._end: float | None = None

    def __enter__(self) -> Stopwatch:
        self._start = time.perf_counter()
        self._end = None
        return self

    def __exit__(self, *exc: object) -> None:
        self._end = time.perf_counter()

    @property
    def elapsed(self) -> float:
        if self._start is None:
            raise RuntimeError("Stopwatch was never started; use it as `with Stopwatch() as sw:`")
        end = self._end if self._end is not None else time.perf_counter()
        return end - self._start
