"""The allocator tuning is applied once, can be turned off, and changes no number."""

import os
import subprocess
import sys

import pytest
import torch

from lifelong import runtime

# Allocates and frees a 32 MiB tensor 10 times (after 2 warm-up rounds) and prints the minor page faults
# that took: with freed memory kept in the heap the pages are reused (0 faults, or one round's 8,192 when
# the heap moves once), without it every round faults its 8,192 pages in afresh.
FAULTS = """
import resource, torch
from lifelong import runtime
runtime.tune_allocator()
for _ in range(2):
    x = torch.ones(32 << 20, dtype=torch.uint8); del x
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(10):
    x = torch.ones(32 << 20, dtype=torch.uint8); del x
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


def page_faults(env: dict) -> int:
    done = subprocess.run([sys.executable, "-c", FAULTS], capture_output=True, text=True, timeout=120,
                          env={**os.environ, "OMP_NUM_THREADS": "1", **env})
    assert done.returncode == 0, done.stderr[-2000:]
    return int(done.stdout.split()[-1])


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc mallopt")
def test_tune_allocator_removes_the_page_faults_of_reallocation():
    tuned, default = page_faults({"LIFELONG_MALLOC": ""}), page_faults({"LIFELONG_MALLOC": "default"})
    assert default > 10 * 8192 * 0.8, default  # every round faulted its pages in again
    assert tuned <= 8192 * 1.1, tuned  # the freed 32 MiB was reused from the heap (at most one round faulted)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc mallopt")
def test_tune_allocator_applies_once_and_changes_no_number():
    assert runtime.tune_allocator() is True
    assert runtime.tune_allocator() is True
    x = torch.randn(512, 512)
    torch.testing.assert_close(x @ x, (x.double() @ x.double()).float(), rtol=1e-4, atol=1e-3)


def test_tune_allocator_can_be_turned_off(monkeypatch):
    monkeypatch.setattr(runtime, "_tuned", False)
    monkeypatch.setenv("LIFELONG_MALLOC", "default")
    assert runtime.tune_allocator() is False


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="/proc and glibc")
def test_peak_memory_does_not_count_heap_an_earlier_block_left():
    from lifelong.metrics.cost import PeakMemory

    runtime.tune_allocator()
    with PeakMemory() as big:
        x = torch.ones(64 << 20, dtype=torch.uint8)  # 64 MiB, freed below: kept in the heap
        del x
    with PeakMemory() as small:
        y = torch.ones(1 << 20, dtype=torch.uint8)
        del y
    assert big.delta_mb > 48
    assert small.baseline_mb < big.peak_mb - 32  # the 64 MiB went back to the system before the second block
