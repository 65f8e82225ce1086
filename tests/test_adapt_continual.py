"""Continual instruction tuning (adapt/continual.py) on a tiny Llama and the real task text."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from lifelong.adapt.continual import StreamSettings, lora_a, orthogonality, run_stream, with_replay
from lifelong.data.instructions import load_task
from lifelong.errors import ConfigError
from lifelong.families.lm import tiny_lm

TINY = dict(tasks=("rt-sentiment", "bbc-topic"), train_items=8, test_items=2, steps=8, batch_size=4, lr=5e-2, chat=False)


def test_the_orthogonality_term_is_the_sum_of_absolute_overlaps():
    nn = torch.nn
    adapted = nn.ModuleDict({"layer": nn.ModuleDict({"lora_A": nn.ModuleDict({"default": nn.Linear(3, 2, bias=False)})})})
    with torch.no_grad():
        adapted.layer.lora_A.default.weight.copy_(torch.tensor([[0.0, 0.0, 2.0], [1.0, -1.0, 0.0]]))  # A_2 (r, in)
    a1 = {"layer.lora_A.default.weight": torch.tensor([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]])}
    # A_1 A_2^T = [[0, 1], [0, -1]]: sum of absolute entries 2, times the weight
    assert orthogonality([a1], 0.5)(adapted).item() == pytest.approx(1.0)
    assert orthogonality([a1, a1], 0.5)(adapted).item() == pytest.approx(2.0)


def test_replay_mixes_a_share_of_earlier_examples_seeded():
    first, second = load_task("rt-sentiment", max_train=20), load_task("bbc-topic", max_train=20)
    mixed = with_replay(second, [first], 0.25, seed=3)
    assert mixed.train[:20] == second.train and len(mixed.train) == 25
    assert set(mixed.train[20:]) <= set(first.train)
    assert with_replay(second, [first], 0.25, seed=3) == mixed
    assert with_replay(second, [], 0.25, seed=3) == second


def test_bad_settings_are_refused():
    with pytest.raises(ConfigError, match="sequential, o-lora, replay"):
        StreamSettings(method="ewc")
    with pytest.raises(ConfigError, match="bbc-headlines"):
        StreamSettings(tasks=("imdb",))


@pytest.fixture(scope="module")
def streams():
    out = {}
    for method in ("sequential", "o-lora"):
        model, tok = tiny_lm("llama")
        out[method] = run_stream(model, tok, StreamSettings(method=method, reg_weight=5.0, **TINY), progress=lambda _: None)
    return out


def test_a_stream_gives_the_accuracy_matrix_and_the_metrics(streams):
    result = streams["sequential"]
    matrix = np.asarray(result["accuracy_matrix"])
    assert matrix.shape == (3, 2) and ((0 <= matrix) & (matrix <= 100)).all()
    assert set(result["metrics"]) == {"avg", "last", "forgetting", "bwt"}
    assert all(math.isfinite(v) for v in result["metrics"].values())
    assert [t["task"] for t in result["tasks"]] == ["rt-sentiment", "bbc-topic"]
    assert all(t["loss_last"] < t["loss_first"] for t in result["tasks"])


def test_o_lora_keeps_the_new_subspace_away_from_the_old_one(streams):
    """The second task's A overlaps the first's less with O-LoRA's term than without it (same seeds, same
    data): the mechanism the method rests on."""
    seq, orth = (streams[m]["tasks"][1]["overlap"] for m in ("sequential", "o-lora"))
    assert streams["sequential"]["tasks"][0]["overlap"] == 0.0
    assert orth < 0.8 * seq, (orth, seq)


def test_each_task_folds_its_lora_into_the_weights():
    model, tok = tiny_lm("llama")
    before = {n: q.detach().clone() for n, q in model.named_parameters()}
    settings = StreamSettings(method="sequential", **{**TINY, "tasks": ("rt-sentiment",)})
    run_stream(model, tok, settings, progress=lambda _: None)
    assert not lora_a(model)  # no LoRA left: the plain model, its q and v projections changed
    changed = {n for n, q in model.named_parameters() if not torch.equal(q, before[n])}
    assert changed and all(n.endswith(("q_proj.weight", "v_proj.weight")) for n in changed)
