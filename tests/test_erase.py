"""Concept erasure: every eraser on a tiny text-to-image model, judged by what it does to the predictions.

On the tiny pipeline (random, but its noise prediction depends on the prompt through cross-attention) an
erasure of "a red square" must move the model's prediction for that prompt to the method's target (ESD:
the original model guided away from the prompt; Ablating Concepts and UCE: the original model's
prediction for the anchor) while the prediction for an unrelated prompt barely moves. Whether samples of
the real embedded model stop showing the concept is measured by the judge in `lifelong bench erase`.
"""

from __future__ import annotations

import copy
import dataclasses

import numpy as np
import pytest
import torch

from lifelong.erase import ERASERS, EraseRequest, build_eraser, erase_request, eraser_params
from lifelong.erase.base import unet_parameters
from lifelong.errors import ConfigError
from lifelong.families.diffusion import tiny_embedded

# Small settings for the fine-tuning erasers on the tiny model (their defaults are for the embedded one).
TINY_KNOBS = {
    "esd-x": {"iterations": 40, "batch_size": 8, "lr": 1e-2, "ddim_steps": 8},
    "esd-u": {"iterations": 40, "batch_size": 8, "lr": 5e-4, "ddim_steps": 8},
    "ac": {"steps": 60, "batch_size": 8, "lr": 1e-2, "anchor_images": 8, "ddim_steps": 8},
    "uce": {},
}
RED = EraseRequest(concept="red", prompts=("a red square",), anchor="a blue square", preserve=("a green circle",))
OTHER = "a green circle"


@pytest.fixture(scope="module")
def base():
    return tiny_embedded()


@torch.no_grad()
def predictions(model, prompt: str, seed: int = 0) -> torch.Tensor:
    """The UNet's prediction for `prompt` on fixed noisy inputs at timesteps across the schedule: (8, C, h, w)."""
    g = torch.Generator().manual_seed(seed)
    size, channels = model.unet.config.sample_size, model.unet.config.in_channels
    x_t = torch.randn((8, channels, size, size), generator=g)
    t = torch.linspace(50, 950, 8).long()
    states = model.encode([prompt] * 8)
    return model.noise_prediction(x_t, t, states)


def target(model, method: str) -> torch.Tensor:
    """What the method trains the prompt's prediction toward, computed on the original model."""
    if method in ("esd-x", "esd-u"):
        e_0, e_p = predictions(model, ""), predictions(model, RED.prompts[0])
        return e_0 - (e_p - e_0)  # eta 1
    return predictions(model, RED.anchor)


@pytest.mark.parametrize("method", list(ERASERS))
def test_the_erased_prompt_moves_to_the_methods_target(base, method):
    model = copy.deepcopy(base)
    goal = target(base, method)
    build_eraser(method, TINY_KNOBS[method]).erase(model, RED, seed=0)
    start, end = (predictions(base, RED.prompts[0]) - goal).norm(), (predictions(model, RED.prompts[0]) - goal).norm()
    assert end < 0.6 * start, f"{method}: the erased prompt's prediction moved only from {start:.3f} to {end:.3f} off its target"


def test_uce_leaves_a_preserved_prompt_where_it_was(base):
    """Locality by construction: UCE's preserve term. (The random tiny model hardly tells prompts apart,
    so the fine-tuning erasers' locality is measured on the real model, by `lifelong bench erase`.)"""
    model = copy.deepcopy(base)
    build_eraser("uce").erase(model, RED)
    moved_red = (predictions(model, RED.prompts[0]) - predictions(base, RED.prompts[0])).norm()
    moved_other = (predictions(model, OTHER) - predictions(base, OTHER)).norm()
    assert moved_other < 0.5 * moved_red, f"uce: the preserved prompt moved {moved_other:.3f}, the erased {moved_red:.3f}"


@pytest.mark.parametrize("method", list(ERASERS))
def test_an_eraser_is_seeded_and_changes_only_its_parameters(base, method):
    params = eraser_params(method, TINY_KNOBS[method])
    which = {"esd-x": "xattn", "esd-u": "noxattn", "ac": "kv", "uce": "kv"}[method]
    allowed = {f"unet.{n}" for n, _ in unet_parameters(base.unet, which)}
    patches = []
    for _ in range(2):
        model = copy.deepcopy(base)
        before = {n: p.detach().clone() for n, p in model.named_parameters()}
        stats = type(build_eraser(method))(params).erase(model, RED, seed=3)
        moved = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
        assert moved and moved <= allowed, f"{method} moved {sorted(moved - allowed)[:3]} outside its set"
        assert all(np.isfinite(v) for v in stats.values())
        patches.append({n: p.detach().clone() for n, p in model.named_parameters() if n in moved})
    assert patches[0].keys() == patches[1].keys()
    assert all(torch.equal(patches[0][n], patches[1][n]) for n in patches[0]), f"{method} is not seeded"


def test_uce_without_its_erase_term_changes_nothing(base):
    """UCE's work is its erase term: with erase_scale 0 the closed form gives back the original weights."""
    model = copy.deepcopy(base)
    build_eraser("uce", {"erase_scale": 0.0}).erase(model, RED)
    assert torch.allclose(predictions(model, RED.prompts[0]), predictions(base, RED.prompts[0]), atol=1e-5)


def test_uce_maps_the_erased_states_onto_the_anchors(base):
    """The closed form's defining property: for every edited projection W, W c_i ~ W_old c*_i on the erased
    prompt's (aligned) token states, while W c_j ~ W_old c_j on the preserved prompt's."""
    from lifelong.erase.uce import _aligned_states

    model = copy.deepcopy(base)
    build_eraser("uce", {"lamb": 1e-3, "preserve_scale": 1.0}).erase(model, RED)
    c, c_star = _aligned_states(base, RED.prompts[0], RED.anchor, "all")
    keep = _aligned_states(base, OTHER, OTHER, "all")[0]
    old, new = base.cross_attention_kv(), model.cross_attention_kv()
    for name in old:
        w_old, w = old[name].weight.detach(), new[name].weight.detach()
        assert torch.allclose(c @ w.T, c_star @ w_old.T, atol=0.05 * float((c_star @ w_old.T).abs().max()))
        assert torch.allclose(keep @ w.T, keep @ w_old.T, atol=0.05 * float((keep @ w_old.T).abs().max()))


def test_esd_targets_the_negatively_guided_prediction(base):
    """ESD's eta: with eta 0 the erased prompt goes to the unconditional prediction, with eta 1 beyond it
    (away from the prompt): the two runs must end on different sides."""
    e_0 = predictions(base, "")
    ends = {}
    for eta in (0.0, 1.0):
        model = copy.deepcopy(base)
        build_eraser("esd-x", {**TINY_KNOBS["esd-x"], "negative_guidance": eta}).erase(model, RED, seed=0)
        ends[eta] = predictions(model, RED.prompts[0])
    direction = predictions(base, RED.prompts[0]) - e_0  # toward the prompt
    assert float(((ends[1.0] - ends[0.0]) * direction).sum()) < 0  # eta 1 ends further from the prompt


def test_uce_erases_several_concepts_at_once(base):
    model = copy.deepcopy(base)
    red = dataclasses.replace(RED, preserve=())
    green = dataclasses.replace(red, concept="green", prompts=("a green square",))
    build_eraser("uce").erase(model, red, requests=[red, green])
    goal = predictions(base, RED.anchor)
    for prompt in ("a red square", "a green square"):
        start, end = (predictions(base, prompt) - goal).norm(), (predictions(model, prompt) - goal).norm()
        assert end < 0.6 * start, prompt


# --- requests and knobs -----------------------------------------------------------------------------------

def test_a_request_names_the_concepts_the_judge_knows():
    r = erase_request("Sneaker")
    assert r.judged == ("object/sneaker",) and r.prompts[0] == "Sneaker" and "a photo of a sneaker" in r.prompts
    assert "sandal" in r.preserve and "sneaker" not in r.preserve
    assert r.anchor == "a piece of clothing"
    style = erase_request("calligraphic")
    assert len(style.judged) == 32 and all("/calligraphic/" in c for c in style.judged)
    assert erase_request("zzz", judge=False).judged == ()


@pytest.mark.parametrize("concept, anchor, message", [
    ("", None, "the concept is empty"),
    ("zzz", None, "--no-judge"),
    ("sneaker", "sneaker", "the concept itself"),
])
def test_bad_requests_say_what_to_do(concept, anchor, message):
    with pytest.raises(ConfigError, match=message):
        erase_request(concept, anchor)


def test_knobs_are_checked_and_a_variant_keeps_its_own():
    with pytest.raises(ConfigError, match="iterationz"):
        eraser_params("esd-x", {"iterationz": 3})
    with pytest.raises(ConfigError, match="fixes train_method"):
        eraser_params("esd-x", {"train_method": "noxattn"})
    with pytest.raises(ConfigError, match="unknown erasure method"):
        eraser_params("esd", {})
    assert eraser_params("esd-u").train_method == "noxattn"


# --- the ledger: `lifelong init --family diffusion`, `lifelong erase`, revert, export -----------------------

LEDGER_PROBES = ["--probe", "object/sneaker", "--probe", "digit/7", "--probe-items", "2"]


@pytest.fixture(scope="module")
def erased_ledger(tmp_path_factory):
    """A tiny diffusion ledger with one UCE erasure of "sneaker" (the real judge scores its probes)."""
    from lifelong.cli import main

    root = tmp_path_factory.mktemp("t2i") / "ledger"
    assert main(["init", str(root), "--family", "diffusion", "--model", "tiny-embedded", *LEDGER_PROBES]) == 0
    assert main(["erase", str(root), "--concept", "sneaker", "--method", "uce"]) == 0
    return root


def test_an_erasure_is_a_recorded_change_probed_before_and_after(erased_ledger):
    from lifelong.api import log
    from lifelong.ledger.core import Ledger

    ledger = Ledger.open(erased_ledger)
    change = ledger.change(1)
    assert change["kind"] == "erase" and change["method"] == "uce" and change["data"]["task"] == "object/sneaker"
    assert change["request"]["judged"] == ["object/sneaker"] and "a photo of a sneaker" in change["request"]["prompts"]
    assert set(change["probes_after"]) == set(change["probes_before"]) == {"object/sneaker", "digit/7", "judge-FD"}
    assert change["probes_before"] == ledger.manifest["baseline"]
    patch = ledger.patch(1)
    assert patch and all(".attn2.to_" in key for key in patch)  # UCE writes the cross-attention K/V only
    text = log(erased_ledger, matrix=True)
    assert "erase" in text and "judge rate" in text and "judge-FD" in text
    assert (erased_ledger / "report.html").is_file()


def test_revert_brings_back_the_base_weights_and_scores(erased_ledger, tmp_path):
    import shutil

    from lifelong.cli import main
    from lifelong.ledger.core import Ledger

    root = tmp_path / "ledger"
    shutil.copytree(erased_ledger, root)
    assert main(["revert", str(root), "1"]) == 0
    ledger = Ledger.open(root)
    revert = ledger.change(2)
    assert revert["kind"] == "revert" and revert["exact"]
    base, now = ledger.base_model(), ledger.materialize()
    for (name, p), q in zip(base.named_parameters(), now.parameters()):
        assert torch.allclose(p, q, atol=1e-6), name
    # the same seeded samples: judge rates equal, the judge-FD up to float rounding of the subtracted patch
    assert revert["probes_after"] == pytest.approx(ledger.manifest["baseline"], rel=1e-3, abs=1e-3)


def test_the_erased_model_exports_as_a_pipeline_that_loads_back(erased_ledger, tmp_path):
    from lifelong.api import export
    from lifelong.families.diffusion import build_pipeline
    from lifelong.ledger.core import Ledger

    out = export(erased_ledger, tmp_path / "exported")
    loaded, current = build_pipeline(str(out)), Ledger.open(erased_ledger).materialize()
    assert torch.allclose(predictions(loaded, "a sneaker"), predictions(current, "a sneaker"), atol=1e-5)


def test_generate_samples_the_ledgers_current_model(erased_ledger, tmp_path):
    from lifelong.api import generate

    erased, _ = generate("a sneaker", n=2, steps=2, ledger=erased_ledger, out=tmp_path / "a.png")
    base, _ = generate("a sneaker", n=2, steps=2, model="tiny-embedded", out=tmp_path / "b.png")
    assert erased.shape == base.shape and not np.array_equal(erased, base)


@pytest.mark.parametrize("args, message", [
    (["--concept", "zzz"], "--no-judge"),
    (["--concept", "sneaker", "--method", "ac", "--anchor", "sneaker"], "the concept itself"),
    (["--concept", "  "], "the concept is empty"),
    (["--concept", "sneaker", "iterationz=3", "--method", "esd-x"], "iterationz"),
])
def test_bad_erasures_are_one_message_exit_2_and_write_nothing(erased_ledger, capsys, args, message):
    from lifelong.cli import main

    manifest = (erased_ledger / "ledger.json").read_bytes()
    assert main(["erase", str(erased_ledger), *args]) == 2
    assert message in capsys.readouterr().err
    assert (erased_ledger / "ledger.json").read_bytes() == manifest


def test_erasing_needs_a_diffusion_ledger(tmp_path, capsys):
    import shutil

    from lifelong.cli import main

    root = tmp_path / "vlm"
    shutil.copytree("tests/fixtures/ledger_cd3c0e9", root)
    assert main(["erase", str(root), "--concept", "sneaker"]) == 2
    assert "--family diffusion" in capsys.readouterr().err
    assert main(["init", str(tmp_path / "new"), "--family", "diffusion", "--model", "tiny-embedded",
                 "--probe", "object/unicorn"]) == 2
    assert "not concepts the judge knows" in capsys.readouterr().err and not (tmp_path / "new").exists()
