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
