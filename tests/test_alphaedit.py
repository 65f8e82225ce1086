"""AlphaEdit on tiny random LMs: every update lies in the null space of the preserved keys (so text whose keys
span C's large eigen-directions reads the same values), the remembered keys of earlier batches hold the next
batch back from moving them, and the solve is the official one. The registry-wide contract (reset, seed, bad
input, batch of one = one apply) is in test_editors_a.py, with its tiny knobs."""

from __future__ import annotations

import copy

import pytest
import torch
from test_editors_a import EDIT, EDIT2, knobs

from lifelong.data.edit_requests import EditRequest
from lifelong.edit.alpha_edit import AlphaEdit
from lifelong.edit.alpha_edit import Params as AlphaParams
from lifelong.edit.memit import MEMIT
from lifelong.edit.memit import Params as MemitParams
from lifelong.families.lm import tiny_lm

EDIT3 = EditRequest(prompt="The language of Brazil is", target_new=" Dutch", subject="Brazil")


@pytest.fixture(scope="module")
def _bases():
    bases = {}
    for arch in ("llama", "gpt2"):
        model, tok = tiny_lm(arch)
        with torch.no_grad():
            model.get_input_embeddings().weight.mul_(8)
        bases[arch] = (model, tok)
    return bases


def editor(bases, arch, cls=AlphaEdit, **extra):
    model, tok = copy.deepcopy(bases[arch][0]), bases[arch][1]
    params = (AlphaParams if cls is AlphaEdit else MemitParams)(**{**knobs(cls.name, arch), **extra})
    return cls(model, tok, params)


def kept_directions(ed, j: int) -> torch.Tensor:
    """The eigenvectors of layer j's key covariance at or above the threshold: what the preserved keys span."""
    U, S, _ = torch.linalg.svd(ed.covariances()[j].double())
    return U[:, S >= ed.params.nullspace_threshold]


@pytest.mark.parametrize("arch", ("llama", "gpt2"))
def test_every_update_is_blind_to_the_preserved_key_directions(_bases, arch):
    ed = editor(_bases, arch)
    ed.apply_batch([EDIT, EDIT2])
    memit = editor(_bases, arch, MEMIT)
    memit.apply_batch([EDIT, EDIT2])
    for j in range(len(ed.layers)):
        kept = kept_directions(ed, j)
        assert 0 < kept.shape[1] < kept.shape[0]  # the test is not vacuous: both spaces are there
        update = ed.last_updates[j]
        assert update.norm() > 0
        assert (update @ kept).norm() / update.norm() < 1e-8  # (Delta P) k = 0 for k in C's kept span
        # MEMIT's soft penalty moves them a little (5e-3 of its update on tiny Llama), not nothing
        assert (memit.last_updates[j] @ kept).norm() / memit.last_updates[j].norm() > 1e-4


def test_the_layer_update_is_the_official_solve(_bases):
    ed = editor(_bases, "llama")
    torch.manual_seed(0)
    K, R = torch.randn(128, 3, dtype=torch.float64), torch.randn(64, 3, dtype=torch.float64)
    ed.cache[0] = (lambda k: k @ k.T)(torch.randn(128, 2, dtype=torch.float64))
    P = ed.projections()[0]
    official = torch.linalg.solve(P @ (K @ K.T + ed.cache[0]) + ed.params.L2 * torch.eye(128, dtype=torch.float64),
                                  P @ K @ R.T)  # AlphaEdit_main.py's upd_matrix, (in, D); W is (D, in) here
    assert torch.allclose(ed.layer_update(0, K, R, ed.covariances()[0]), official.T, atol=1e-10)


def test_remembered_keys_hold_the_next_batch_back_from_moving_earlier_edits(_bases):
    """After batch A, cache_c holds A's keys; batch B's update then moves A's keys less than it does with the
    cache forgotten (the official sequential editing), and reset forgets it."""
    moved = {}
    for remember in (True, False):
        ed = editor(_bases, "llama")
        ed.apply_batch([EDIT, EDIT2])
        keys_a = [k.double() for k in ed.last_keys]
        assert all(c is not None for c in ed.cache)
        if not remember:
            ed.cache = [None] * len(ed.layers)
        ed.apply_batch([EDIT3])
        moved[remember] = sum(float((u @ k.T).norm()) for u, k in zip(ed.last_updates, keys_a))
    assert moved[True] < 0.5 * moved[False], moved
    ed.reset()
    assert ed.cache == [None] * len(ed.layers)


def test_a_threshold_below_every_eigenvalue_is_refused_with_the_fix(_bases):
    ed = editor(_bases, "llama", nullspace_threshold=1e-12)
    with pytest.raises(ValueError, match="no eigenvalue of layer 1's key covariance is below nullspace_threshold=1e-12"):
        ed.apply_batch([EDIT])
