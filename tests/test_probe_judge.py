"""The second judge (metrics/probe_judge.py): the main judge's interface on another architecture, its file
round-trip, and (slow) its accuracy on real test images."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from lifelong.metrics import judge as J
from lifelong.metrics.probe_judge import ProbeJudge, load_probe_judge, save_probe_judge

LABELS = {"what": ["object/sneaker", "digit/7", "letter/A"], "style": ["serif", "sans"], "ink": ["black", "red"]}


@pytest.fixture(scope="module")
def tiny():
    """The probe on a random EfficientNet-Lite0 (no download, no shipped file), heads seeded."""
    torch.manual_seed(0)
    judge = ProbeJudge(LABELS, pretrained=False).eval()
    for head in judge.heads.values():
        torch.nn.init.normal_(head.weight, std=0.5)  # not a no-op: the heads must tell images apart
    return judge


def test_the_probe_reads_images_as_the_main_judge_does(tiny):
    images = np.random.default_rng(0).integers(0, 256, (6, 32, 32, 3), dtype=np.uint8)
    logits = tiny(J.as_input(images))
    assert list(logits) == list(J.HEADS) and logits["what"].shape == (6, 3) and logits["ink"].shape == (6, 2)
    assert J.judge_features(tiny, images).shape == (6, 1280)
    seen = J.predicted_concepts(tiny, images)
    assert all(s in ("object/sneaker", "digit/7") or s.startswith("letter/A/") for s in seen)
    names = ["object/sneaker", "digit/7", "letter/A/serif/red"] * 2
    rates = J.judge_rates(tiny, images, names)
    assert set(rates) == set(names) and all(0 <= r <= 100 for r in rates.values())
    # the trunk is frozen: train mode does not move BatchNorm statistics
    before = {k: v.clone() for k, v in tiny.trunk.state_dict().items()}
    tiny.train()
    tiny(J.as_input(images))
    tiny.eval()
    assert all(torch.equal(v, before[k]) for k, v in tiny.trunk.state_dict().items())


def test_the_probe_file_round_trips(tiny, tmp_path):
    path = save_probe_judge(tiny, tmp_path / "probe.safetensors")
    from safetensors.torch import load_file

    assert not any(k.startswith("trunk.") for k in load_file(str(path)))  # heads and standardisation only
    images = np.random.default_rng(1).integers(0, 256, (4, 32, 32, 3), dtype=np.uint8)
    loaded = ProbeJudge(LABELS, pretrained=False)
    loaded.load_state_dict(tiny.state_dict())  # the same random trunk; the file's heads must give tiny's logits
    missing, _ = loaded.load_state_dict(load_file(str(path)), strict=False)
    assert all(k.startswith("trunk.") for k in missing)
    x = J.as_input(images)
    assert all(torch.equal(loaded.eval()(x)[h], tiny(x)[h]) for h in J.HEADS)


@pytest.mark.slow
def test_the_shipped_probe_judge_is_far_above_chance_on_real_test_images():
    """~20 s: 20 real test images of each of the ~170 concepts through the EfficientNet at 64 px."""
    from lifelong.data import captioned

    judge = load_probe_judge()
    concepts = [c.name for c in captioned.all_concepts()]
    images, names = captioned.concept_images(concepts, "test", per_concept=20, seed=0)
    accuracy = J.judge_accuracy(judge, images, names)
    shuffled = list(np.random.default_rng(0).permutation(names))
    chance = np.mean(list(J.judge_rates(judge, images, shuffled).values()))
    assert accuracy["average"]["concept"] > 60 and accuracy["average"]["what"] > 75, accuracy["average"]
    assert chance < 5, chance
