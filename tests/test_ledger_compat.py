"""A ledger written by the code before the restructuring (commit cd3c0e9) still opens, logs, verifies and reverts."""

import shutil
from pathlib import Path

import torch

import lifelong

FIXTURE = Path(__file__).parent / "fixtures" / "ledger_cd3c0e9"


def test_a_ledger_from_before_the_restructuring_opens_logs_and_reverts(tmp_path):
    root = tmp_path / "old"
    shutil.copytree(FIXTURE, root)
    ledger = lifelong.open_ledger(root)
    assert ledger.family == "vlm" and [c["kind"] for c in ledger.changes] == ["learn"]
    assert lifelong.verify(root) == 2  # both files of change 1 match their recorded SHA-256
    text = lifelong.log(root)
    assert "finetune" in text and "digits" in text
    before = ledger.changes[0]["probes_after"]["digits"]
    n = lifelong.revert(root, 1)
    reverted = lifelong.open_ledger(root)
    assert n == 2 and reverted.change(2)["reverts"] == 1 and reverted.change(2)["strategy"] == "subtract"
    # the revert's probe is scored on the base again: exactly the baseline the old code recorded
    assert reverted.change(2)["probes_after"]["digits"] == reverted.manifest["baseline"]["digits"]
    assert reverted.change(2)["probes_before"]["digits"] == before
    # the change moved no probe score, so the scores alone cannot show the revert: the weights must be the base's
    changed = lifelong.open_ledger(root).materialize(upto=1).state_dict()
    base, now = reverted.base_model().state_dict(), reverted.materialize().state_dict()
    assert any(not torch.equal(changed[k], base[k]) for k in base)  # change 1 did move weights
    for k in base:
        torch.testing.assert_close(now[k], base[k], rtol=0, atol=1e-6)
