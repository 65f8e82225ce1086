"""The allocator tuning is applied once, can be turned off, and changes no number."""

import sys

import pytest
import torch

from lifelong import runtime


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc mallopt")
def test_tune_allocator_applies_once_and_is_idempotent():
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
