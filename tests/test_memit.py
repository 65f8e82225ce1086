"""MEMIT on tiny LMs (trained on a few fact sentences, as tests/test_editors_b.py's ROME tests): a batch of
edits holds, unrelated prompts barely move, reset is exact, each layer's update is the least-squares
solution with the key covariance, and the batched value fitting gives each request what it alone gets.
The registry-wide contract (reset, seed, bad input, batch of one = one apply) is in test_editors_a.py."""

from __future__ import annotations

import copy

import pytest
import torch
from test_editors_b import assert_same_state, edit_scores, snapshot, trained_tiny_llama

from lifelong.data.edit_requests import EditRequest
from lifelong.edit.key_value import context_prefixes, fit_values, key_covariance
from lifelong.edit.memit import MEMIT
from lifelong.edit.memit import Params as MemitParams
from lifelong.families.lm import decoder_layers, ffn_out, linear_weight

# As for ROME's tiny test: the subject at the prompt's end (tiny models barely move the subject's
# representation to the last token), a larger clamp and step size for the tiny FFN outputs. Three relations,
# not two requests on one template: on the shipped tiny Llama the keys of "The capital of France is" and "The
# capital of Japan is" at layers 1-2 have cosine 1.000, and no linear update maps one key to two values.
# The settings were chosen on the shipped weights (tests/fixtures/tiny_facts_*.safetensors); edits hold there
# for v_lr 1-2 and 60-100 value steps alike.
MEMIT_TINY = MemitParams(layers=(2, 3), v_lr=1.0, v_steps=60, clamp_norm_factor=20.0, cov_tokens=2048,
                         prefix_lengths=(3,), prefixes_per_length=2, mom2_update_weight=1000.0)
REQUESTS = [EditRequest(prompt="The capital of France is", target_new=" Madrid", subject="France is"),
            EditRequest(prompt="Toronto is located in the country of", target_new=" Japan", subject="country of"),
            EditRequest(prompt="The currency of India is the", target_new=" yen", subject="India is the")]
# Prompts about no edited subject or answer: in this 12-sentence world most facts touch an edit
# ("Lyon is a city in" -> France, whose capital is edited).
# The tiny GPT-2 also moves an out-of-world sentence ("She said that the weather was": its keys at function
# words all alike), so it is held to the unrelated fact only.
UNRELATED = {"llama": ("Osaka is a city in", "She said that the weather was"), "gpt2": ("Osaka is a city in",)}


@pytest.fixture(scope="module", params=("llama", "gpt2"))
def _trained(request):
    return request.param, trained_tiny_llama(arch=request.param)


@pytest.fixture
def tiny(_trained):
    arch, (model, tok) = _trained
    return copy.deepcopy(model), tok, arch


def next_token_logprobs(model, tok, prompts) -> torch.Tensor:
    with torch.no_grad():
        return torch.stack([torch.log_softmax(model(**tok(p, add_special_tokens=False, return_tensors="pt")).logits[0, -1],
                                              -1) for p in prompts])  # (N, V)


def test_memit_batch_edits_hold_unrelated_barely_move_and_reset_is_exact(tiny):
    model, tok, arch = tiny
    unrelated = UNRELATED[arch]
    before, base = snapshot(model), next_token_logprobs(model, tok, unrelated)
    edited0 = next_token_logprobs(model, tok, [r.prompt for r in REQUESTS])
    scores0 = [edit_scores(model, tok, r) for r in REQUESTS]
    assert not any(hit for _, hit in scores0)
    editor = MEMIT(model, tok, MEMIT_TINY)
    stats = editor.apply_batch(REQUESTS)
    assert all(type(v) is float for v in stats.values()) and stats["requests"] == 3.0
    for (nll0, _), request in zip(scores0, REQUESTS):
        nll1, hit = edit_scores(model, tok, request)
        assert hit and nll1 < nll0 - 0.5, (request, nll0, nll1)   # every edited target is now the argmax
    after = next_token_logprobs(model, tok, unrelated)
    kl = (after.exp() * (after - base)).sum(-1)                    # KL(P_edited || P_0) at the next token
    edited = next_token_logprobs(model, tok, [r.prompt for r in REQUESTS])
    kl_edited = (edited.exp() * (edited - edited0)).sum(-1)
    assert torch.equal(after.argmax(-1), base.argmax(-1))          # unrelated prompts keep their answer
    assert kl.max() < 0.1 and kl_edited.min() > 3 * kl.max(), (kl, kl_edited)  # edited prompts moved far more
    assert stats["z_error_last"] < stats["z_error_first"]          # each layer took its share of the residual
    editor.reset()
    assert_same_state(model, before)
    assert torch.equal(next_token_logprobs(model, tok, unrelated), base)


@pytest.mark.parametrize("layers", [(2,), (1, 2)])
def test_memit_update_solves_the_covariance_weighted_least_squares(tiny, layers):
    """Delta_l (lambda C_l + K K^T) = R_l K^T for each layer, with C_l computed here from the corpus: an
    update that drops or mis-scales the covariance fails."""
    model, tok, arch = tiny
    params = MemitParams(**{**MEMIT_TINY.__dict__, "layers": layers})
    weights0 = [linear_weight(ffn_out(model, layer)).detach().clone() for layer in layers]
    covs = [key_covariance(model, tok, layer, params.corpus, params.cov_tokens).double() for layer in layers]  # of f_0
    editor = MEMIT(model, tok, params)
    editor.apply_batch(REQUESTS)
    for j, (layer, cov) in enumerate(zip(layers, covs)):
        K, R, delta = (t.double() for t in (editor.last_keys[j], editor.last_residuals[j], editor.last_updates[j]))
        lhs = delta @ (params.mom2_update_weight * cov + K.T @ K)
        rhs = R.T @ K
        assert torch.allclose(lhs, rhs, atol=1e-6 * rhs.abs().max().item()), (lhs - rhs).abs().max()
        change = linear_weight(ffn_out(model, layer)).detach() - weights0[j]
        assert torch.allclose(change, editor.last_updates[j].float(), atol=1e-5 * change.abs().max().item())
        assert torch.linalg.matrix_rank(change).item() <= len(REQUESTS)


def test_fit_values_together_equals_one_at_a_time(tiny, monkeypatch):
    """The B deltas optimised in one batch (rows of different lengths, requests that stop at different
    steps) equal those of B separate runs: rows never interact, Adam is elementwise, a stopped request
    keeps its delta. (The tiny models cannot reach the official 5e-2 stop: a stop at loss 1 here.)"""
    from lifelong.edit import key_value

    monkeypatch.setattr(key_value, "STOP_LOSS", 1.0)
    model, tok, arch = tiny
    prefixes = context_prefixes(model, tok, (3,), 2, seed=0)
    layer = 2
    block = decoder_layers(model)[layer]
    kw = dict(steps=40, lr=1.0, weight_decay=1e-3, clamp_norm_factor=20.0, kl_factor=0.0625)
    together = fit_values(model, tok, block, layer, REQUESTS, prefixes, **kw)
    alone = [fit_values(model, tok, block, layer, [r], prefixes, **kw) for r in REQUESTS]
    assert len(set(together.steps.tolist())) > 1, together.steps   # they did stop at different passes
    for i, one in enumerate(alone):
        assert together.steps[i] == one.steps[0]
        assert torch.allclose(together.delta[i], one.delta[0], rtol=1e-3, atol=1e-3 * one.delta[0].norm().item())
        assert torch.allclose(together.init[i], one.init[0], atol=1e-5)
        assert together.nll_after[i] == pytest.approx(one.nll_after[0].item(), rel=1e-3, abs=1e-4)
    # a group size that splits the batch changes nothing either
    split = fit_values(model, tok, block, layer, REQUESTS, prefixes, group=2, **kw)
    assert torch.equal(split.steps, together.steps)
    assert torch.allclose(split.delta, together.delta, rtol=1e-3, atol=1e-3 * together.delta.norm().item())

