"""The judge (lifelong.metrics.judge): the Frechet distance's formula, the judge rate's definition, the
saved file, and scripts/train_judge.py's training step.

Unit tests build tiny judges from constructor arguments; a judge's reading is forced by setting its heads'
weights to 0 and their biases to a one-hot, so the rate's definition is tested on a real instance. The
shipped judge's accuracy on the real test images is the `slow` test."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import numpy as np
import pytest
import scipy.linalg
import torch

from lifelong.errors import DataNotFoundError
from lifelong.metrics import judge as J

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "train_judge.py"
LABELS = {"what": ["object/sneaker", "digit/7", "letter/A", "letter/B", "clipart/bug"],
          "style": ["serif", "sans", "gothic"], "ink": ["black", "red", "blue"]}


@pytest.fixture(scope="module")
def script():
    spec = importlib.util.spec_from_file_location("train_judge", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def tiny_judge(seed: int = 0) -> J.Judge:
    torch.manual_seed(seed)
    return J.Judge(LABELS, width=4, feature_dim=8).eval()


def force(judge: J.Judge, what: str, style: str, ink: str) -> J.Judge:
    """Make every head output one label, whatever the image."""
    with torch.no_grad():
        for head, label in zip(J.HEADS, (what, style, ink)):
            layer = judge.heads[head]
            layer.weight.zero_()
            layer.bias.copy_(10 * torch.nn.functional.one_hot(torch.tensor(judge.labels[head].index(label)),
                                                              len(judge.labels[head])).float())
    return judge


def exact_moments(n: int, mean: np.ndarray, cov: np.ndarray, seed: int) -> np.ndarray:
    """n samples whose sample mean and (ddof 1) covariance are exactly `mean` and `cov`."""
    x = np.random.default_rng(seed).standard_normal((n, len(mean)))
    x -= x.mean(0)
    x = x @ np.linalg.inv(np.linalg.cholesky(np.cov(x, rowvar=False))).T  # whitened: cov = I
    return x @ np.linalg.cholesky(cov).T + mean


# --- the Frechet distance --------------------------------------------------------------------------------


def test_frechet_distance_of_a_set_with_itself_is_zero():
    feats = np.random.default_rng(0).standard_normal((300, 16)) @ np.random.default_rng(1).standard_normal((16, 16))
    assert J.frechet_distance(feats, feats) == pytest.approx(0.0, abs=1e-6)
    assert J.frechet_distance(torch.from_numpy(feats).float(), torch.from_numpy(feats).float()) == pytest.approx(0.0, abs=1e-6)


def test_frechet_distance_matches_the_closed_form_for_diagonal_gaussians():
    mu_a, mu_b = np.array([0.0, 1.0, -2.0, 0.5]), np.array([1.0, 1.0, 0.0, 0.0])
    var_a, var_b = np.array([1.0, 4.0, 0.25, 2.0]), np.array([9.0, 1.0, 0.25, 0.5])
    # ||mu_a - mu_b||^2 + sum_i (sqrt(var_a_i) - sqrt(var_b_i))^2 = 5.25 + (4 + 1 + 0 + 0.5)
    expected = ((mu_a - mu_b) ** 2).sum() + ((np.sqrt(var_a) - np.sqrt(var_b)) ** 2).sum()
    assert expected == pytest.approx(10.75)
    assert J.frechet_distance_from_moments(mu_a, np.diag(var_a), mu_b, np.diag(var_b)) == pytest.approx(expected, abs=1e-9)
    a = exact_moments(200, mu_a, np.diag(var_a), seed=0)
    b = exact_moments(150, mu_b, np.diag(var_b), seed=1)
    assert J.frechet_distance(a, b) == pytest.approx(expected, abs=1e-6)


def test_frechet_distance_is_symmetric_and_agrees_with_scipy_sqrtm():
    rng = np.random.default_rng(3)
    a = rng.standard_normal((400, 12)) @ rng.standard_normal((12, 12))
    b = rng.standard_normal((300, 12)) @ rng.standard_normal((12, 12)) + 0.3
    forward, backward = J.frechet_distance(a, b), J.frechet_distance(b, a)
    assert forward == pytest.approx(backward, rel=1e-9)
    cov_a, cov_b = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    cross = scipy.linalg.sqrtm(cov_a @ cov_b).real  # the reference FID implementation's route
    reference = ((a.mean(0) - b.mean(0)) ** 2).sum() + np.trace(cov_a + cov_b - 2 * cross)
    assert forward == pytest.approx(reference, rel=1e-6)


def test_frechet_distance_refuses_mismatched_or_tiny_sets():
    with pytest.raises(ValueError):
        J.frechet_distance(np.zeros((5, 3)), np.zeros((5, 4)))
    with pytest.raises(ValueError):
        J.frechet_distance(np.zeros((1, 3)), np.zeros((5, 3)))


# --- reading images ------------------------------------------------------------------------------------


def test_a_letter_counts_only_when_letter_style_and_ink_all_match():
    images = np.full((6, 32, 32, 3), 255, np.uint8)
    prompted = ["letter/A/serif/red"] * 3 + ["letter/B/serif/red", "letter/A/sans/red", "letter/A/serif/blue"]
    judge = force(tiny_judge(), "letter/A", "serif", "red")
    assert J.predicted_concepts(judge, images) == ["letter/A/serif/red"] * 6
    rates = J.judge_rates(judge, images, prompted)
    assert rates == {"letter/A/serif/red": 100.0, "letter/B/serif/red": 0.0, "letter/A/sans/red": 0.0,
                     "letter/A/serif/blue": 0.0}
    # one head wrong is enough to miss
    for what, style, ink in [("letter/B", "serif", "red"), ("letter/A", "gothic", "red"), ("letter/A", "serif", "black")]:
        assert J.judge_rates(force(tiny_judge(), what, style, ink), images[:1], prompted[:1]) == {"letter/A/serif/red": 0.0}


def test_non_letter_concepts_are_judged_by_the_what_head_alone():
    images = np.random.default_rng(0).random((4, 3, 32, 32)).astype(np.float32)  # float NCHW in [0, 1]
    judge = force(tiny_judge(), "clipart/bug", "gothic", "blue")
    assert J.judge_rates(judge, images, ["clipart/bug", "clipart/bug", "digit/7", "object/sneaker"]) == {
        "clipart/bug": 100.0, "digit/7": 0.0, "object/sneaker": 0.0}
    with pytest.raises(ValueError, match="no what label"):
        J.judge_rates(judge, images, ["clipart/dragon"] * 4)
    with pytest.raises(ValueError, match="concepts for"):
        J.judge_rates(judge, images, ["clipart/bug"])


def test_judge_accuracy_reports_each_head_and_the_averages():
    images = np.full((4, 32, 32, 3), 255, np.uint8)
    names = ["letter/A/serif/red", "letter/A/sans/red", "digit/7", "clipart/bug"]
    result = J.judge_accuracy(force(tiny_judge(), "letter/A", "serif", "red"), images, names)
    assert result["per_concept"]["letter/A/sans/red"] == {"concept": 0.0, "what": 100.0, "style": 0.0, "ink": 100.0}
    assert result["per_concept"]["digit/7"] == {"concept": 0.0, "what": 0.0}
    assert result["average"] == {"concept": 25.0, "what": 50.0, "style": 50.0, "ink": 100.0}
    assert result["average_by_kind"] == {"letter": 50.0, "digit": 0.0, "clipart": 0.0}


def test_uint8_nhwc_and_float_inputs_read_alike():
    pixels = np.random.default_rng(0).integers(0, 256, (3, 32, 32, 3), dtype=np.uint8)
    judge = tiny_judge()
    from_uint8 = J.judge_features(judge, pixels)
    assert from_uint8.shape == (3, 8)
    as_float = pixels.astype(np.float32) / 255
    assert torch.allclose(from_uint8, J.judge_features(judge, as_float))  # float NHWC
    assert torch.allclose(from_uint8, J.judge_features(judge, torch.from_numpy(as_float).permute(0, 3, 1, 2)))
    with pytest.raises(ValueError):
        J.as_input(np.zeros((3, 32, 32), np.uint8))


def test_save_and_load_round_trip_in_fp16(tmp_path):
    judge = tiny_judge(seed=5)
    path = J.save_judge(judge, tmp_path / "judge.safetensors", {"training": {"seed": 5}})
    loaded = J.load_judge(path)
    assert loaded.labels == judge.labels and loaded.config == judge.config
    x = np.random.default_rng(0).integers(0, 256, (4, 32, 32, 3), dtype=np.uint8)
    assert torch.allclose(J.judge_features(loaded, x), J.judge_features(judge, x), atol=2e-2)
    with pytest.raises(DataNotFoundError, match="scripts/train_judge.py"):
        J.load_judge(tmp_path / "absent.safetensors")


def test_default_labels_cover_every_concept_and_the_heldout_subjects():
    from lifelong.data import captioned

    labels = J.default_labels()
    assert "clipart/bug" in labels["what"] and "gothic" in labels["style"]
    assert len(labels["what"]) == 10 + 10 + len(captioned.LETTERS) + len(captioned.CLIPART_CATEGORIES) + 1
    assert labels["ink"] == list(captioned.INK_COLOURS)
    judge = J.Judge(labels, width=4, feature_dim=8)
    every = captioned.training_concepts() + [c for s in captioned.HELDOUT_SUBJECTS for c in captioned.heldout_subject_concepts(s)]
    targets = J.concept_targets(judge, every)
    assert (targets[:, 0] >= 0).all()
    letters = torch.tensor([c.kind == "letter-style" for c in every])
    assert (targets[letters, 1:] >= 0).all() and (targets[~letters, 1:] == J.IGNORE).all()


# --- training ------------------------------------------------------------------------------------------


def synthetic_pool(n_per: int = 16):
    """Images whose concept is visible: a bright square at a concept-specific place, letters in their ink."""
    rng = np.random.default_rng(0)
    names, images = [], []
    inks = {"black": (20, 20, 20), "red": (205, 30, 30), "blue": (35, 60, 205)}
    concepts = ["object/sneaker", "digit/7", "clipart/bug", "letter/A/serif/red", "letter/B/sans/blue"]
    for k, name in enumerate(concepts):
        for _ in range(n_per):
            image = np.full((32, 32, 3), 255, np.uint8)
            colour = inks[name.split("/")[3]] if name.startswith("letter") else (0, 0, 0)
            image[4 + 5 * k: 10 + 5 * k, 4:28] = colour
            images.append(np.clip(image.astype(int) + rng.integers(-10, 10, image.shape), 0, 255).astype(np.uint8))
            names.append(name)
    return np.stack(images), names


def test_training_lowers_the_loss_and_is_deterministic(script):
    images, names = synthetic_pool()
    config = dict(script.DEFAULT_CONFIG, steps=30, batch_size=16, warmup_steps=3, lr=1e-2, width=8, feature_dim=16,
                  kind_weights={"object": 0.25, "digit": 0.25, "clipart": 0.25, "letter": 0.25})
    judge, losses = script.train(images, names, config, labels=LABELS, log_every=0)
    assert np.mean(losses[-5:]) < 0.5 * np.mean(losses[:5])
    again, losses_again = script.train(images, names, config, labels=LABELS, log_every=0)
    assert losses == losses_again
    assert all(torch.equal(a, b) for a, b in zip(judge.state_dict().values(), again.state_dict().values()))


def test_one_judge_loss_step_on_a_fixed_batch_lowers_it():
    images, names = synthetic_pool(n_per=4)
    judge = tiny_judge().train()
    x, targets = J.as_input(images), J.concept_targets(judge, names)
    optimizer = torch.optim.SGD(judge.parameters(), lr=0.05)
    before = J.judge_loss(judge, x, targets)
    before.backward()
    optimizer.step()
    assert J.judge_loss(judge, x, targets).item() < before.item()


def test_sampling_gives_each_kind_its_share_and_each_concept_of_a_kind_an_equal_one(script):
    names = ["object/a"] * 30 + ["object/b"] * 10 + ["digit/1"] * 5
    weights = script.sampling_weights(names, {"object": 0.8, "digit": 0.2}).numpy()
    assert weights[:30].sum() == pytest.approx(0.4) and weights[30:40].sum() == pytest.approx(0.4)
    assert weights[40:].sum() == pytest.approx(0.2)
    with pytest.raises(ValueError, match="no kind_weights entry"):
        script.sampling_weights(names + ["clipart/x"], {"object": 0.8, "digit": 0.2})


# --- the shipped judge ---------------------------------------------------------------------------------


@pytest.mark.slow
def test_the_shipped_judge_reads_real_test_images_far_above_chance(script):
    try:
        judge = J.load_judge()
        images, names = script.load_real("test")
    except DataNotFoundError as e:
        pytest.skip(str(e))
    result = J.judge_accuracy(judge, images, names)
    n_concepts = len(set(names))
    assert result["average"]["concept"] > 80.0 > 100.0 / n_concepts
    assert result["average"]["what"] > 85.0 and result["average"]["ink"] > 95.0
    # real-vs-real judge-FD is small next to the distance between two different kinds of image
    feats = J.judge_features(judge, images).numpy()
    kinds = np.asarray([n.split("/")[0] for n in names])
    digit_rows = np.flatnonzero(kinds == "digit")
    half_a, half_b = script.stratified_halves([names[i] for i in digit_rows], np.random.default_rng(0))
    digits, objects = feats[digit_rows], feats[kinds == "object"][:1000]
    assert J.frechet_distance(digits[half_a], digits[half_b]) < 0.1 * J.frechet_distance(digits, objects)
