"""Process settings that make training on a CPU faster without changing any number.

`tune_allocator`: glibc's malloc returns large freed blocks to the kernel (mmap'd allocations above a
dynamic threshold, and heap trimming), so every training step's activation and gradient tensors are
page-faulted in afresh: on the demo's training step that was 1.8M minor page faults per 60 steps and
~30% of the step time (benchmarks/cpu_efficiency.py records it). Keeping freed memory in the heap
removes it; the cost is that the process holds on to its peak heap (`trim_heap` gives it back, as
`metrics.cost.PeakMemory` does before every measured block). The same effect as starting
Python with MALLOC_MMAP_THRESHOLD_/MALLOC_TRIM_THRESHOLD_ set, applied from inside the process.
Linux/glibc only (elsewhere a no-op); `LIFELONG_MALLOC=default` turns it off.
"""

from __future__ import annotations

import ctypes
import os
import platform
import subprocess
import sys
from importlib import metadata
from pathlib import Path

M_TRIM_THRESHOLD, M_TOP_PAD, M_MMAP_THRESHOLD = -1, -2, -3  # glibc's mallopt parameters
_tuned = False


def tune_allocator(mmap_threshold: int = 1 << 30, trim_threshold: int = 1 << 30, top_pad: int = 256 << 20) -> bool:
    """Serve allocations up to `mmap_threshold` bytes from the heap and keep up to `trim_threshold`
    bytes of freed heap; returns whether the settings were applied (once per process)."""
    global _tuned
    if _tuned:
        return True
    if not sys.platform.startswith("linux") or os.environ.get("LIFELONG_MALLOC", "") == "default":
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:  # not glibc (e.g. musl)
        return False
    ok = all(libc.mallopt(param, value) == 1 for param, value in
             ((M_MMAP_THRESHOLD, mmap_threshold), (M_TRIM_THRESHOLD, trim_threshold), (M_TOP_PAD, top_pad)))
    _tuned = ok
    return ok


def trim_heap() -> None:
    """Return the heap's free memory to the system (glibc malloc_trim); a no-op elsewhere."""
    if not sys.platform.startswith("linux"):
        return
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def fast_bf16(device: str = "cpu") -> bool:
    """Whether bfloat16 autocast makes matmuls faster on `device` rather than slower: a CUDA GPU that
    supports bf16, or a CPU with bf16 instructions (AVX512-BF16 or AMX). Elsewhere PyTorch emulates bf16: on
    an AVX2-only AMD EPYC it was many times slower than fp32 for the embedded text-to-image UNet (as
    scripts/train_t2i.py's docstring records for training), so sampling defaults fall back to fp32 there."""
    if device.startswith("cuda"):
        import torch

        return torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    try:
        flags = Path("/proc/cpuinfo").read_text().split()
    except OSError:  # not Linux: macOS arm64 has bf16 in recent PyTorch builds, the rest is unknown
        return platform.machine() == "arm64"
    return "avx512_bf16" in flags or "amx_bf16" in flags


def versions() -> dict:
    """Python, platform, git SHA and the versions of the libraries a result depends on (saved with every run)."""
    packages = ["torch", "transformers", "peft", "accelerate", "safetensors", "numpy", "lifelong"]
    found = {}
    for name in packages:
        try:
            found[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            found[name] = None
    try:
        sha = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True,
                             cwd=Path(__file__).parent, timeout=5).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        sha = None
    return {"python": platform.python_version(), "platform": platform.platform(), "git_sha": sha, "packages": found}
