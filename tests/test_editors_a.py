"""The editor contract over every registered editor (batch editing included); FT-L, FT-M, LoRA, GRACE and WISE on tiny random Llama and GPT-2 models; one slow check on SmolLM2.

The tiny models get their (tied) embeddings scaled by 8: with tiny_lm's 0.02-std embeddings every logit
stays within about +-1.3 (the final norm fixes the hidden scale), so no edit could reach a low NLL and
"the edit holds" could not be told from noise.
"""

import copy
import math
import time

import pytest
import torch

from lifelong.edit import EDITORS as REGISTERED
from lifelong.edit import EditRequest, editor_class, editor_params
from lifelong.edit.base import EditorProtocol
from lifelong.families.lm import target_batch, target_nll, tiny_lm
from lifelong.metrics.editing import prompt_ends, prompt_ends_of

ARCHS = ("llama", "gpt2")
# Every registered editor meets the contract tests below (reset, seed, bad input, knobs, protocol); the
# four whose single edit reaches a low NLL on these random models also run test_edit_holds.
EDITORS = tuple(REGISTERED)
EDITS_ON_TINY = ("ft_l", "ft_m", "lora", "grace", "wise")
BATCH = tuple(n for n in EDITORS if editor_class(n).batch)  # editors with apply_batch
EDIT = EditRequest(prompt="The capital of France is", target_new=" Tokyo", subject="France")     # one token
EDIT2 = EditRequest(prompt="The currency of India is the", target_new=" euro", subject="India")  # one token
UNRELATED = ("She said that the weather was nice", " and")

# GRACE radius ~ a third of a key's norm (tiny Llama keys ~0.15, GPT-2 ~1.3; other tokens lie >= 0.18 / 1.7 away)
GRACE_EPS = {"llama": 0.05, "gpt2": 0.5}


def knobs(name: str, arch: str) -> dict:
    """Settings that make each editor work on a 4-layer, width-64 random model in a second or two."""
    return {
        "ft_l": dict(layer=2, lr=0.05, norm_constraint=0.5),
        "ft_m": dict(layer=2, lr=0.05, norm_constraint=0.5),
        "lora": dict(lr=0.02, steps=30),
        "grace": dict(eps=GRACE_EPS[arch]),
        # margins scaled to the tiny model's activation scores (SmolLM2 uses the paper's 5/20/10)
        "wise": dict(alpha=0.1, beta=2.0, gamma=1.5, n_prefixes=2, steps=40, lr=30.0, norm_constraint=5.0),
        "rome": dict(layer=2, v_lr=1.0, clamp_norm_factor=20.0, cov_tokens=2048, prefix_lengths=(3,), prefixes_per_length=2),
        "t_patcher": dict(max_steps=20, memory_tokens=256, memory_facts=2),
        "mend": dict(layers=(-1,), rank=8, train_steps=4, lr=1e-3, lr_lr=1e-3, edit_lr=1e-3),
        "memit": dict(layers=(1, 2), v_lr=1.0, clamp_norm_factor=20.0, cov_tokens=2048, prefix_lengths=(3,),
                      prefixes_per_length=2, mom2_update_weight=1000.0),
        # the official absolute threshold (2e-2) is above every eigenvalue of the tiny models' key covariance
        # (tiny Llama's largest is 4e-3); these leave about two thirds of the key space as the null space
        "alphaedit": dict(layers=(1, 2), v_lr=1.0, clamp_norm_factor=20.0, cov_tokens=2048, prefix_lengths=(3,),
                          prefixes_per_length=2, nullspace_threshold={"llama": 1e-4, "gpt2": 1e-3}[arch], L2=1e-3),
    }[name]


def test_every_registered_editor_has_tiny_knobs():
    """A new editor is one file and one registry line; this fails until it has settings for the tiny models."""
    for name in EDITORS:
        for arch in ARCHS:
            editor_params(name, knobs(name, arch))


@pytest.fixture(scope="module")
def _tiny_bases():
    bases = {}
    for arch in ARCHS:
        model, tok = tiny_lm(arch)
        with torch.no_grad():
            model.get_input_embeddings().weight.mul_(8)
        bases[arch] = (model, tok)
    return bases


@pytest.fixture
def tiny(_tiny_bases):
    """A fresh copy of the tiny model of an architecture, with its tokenizer."""
    return lambda arch: (copy.deepcopy(_tiny_bases[arch][0]), _tiny_bases[arch][1])


TRAIN_EDITS = [EditRequest(prompt=f"The capital of {c} is", target_new=t, subject=c)
               for c, t in (("Germany", " Rome"), ("Italy", " Berlin"), ("Spain", " Paris"))]


def make(name, model, tok, arch, **extra):
    cls = editor_class(name)
    editor = cls(model, tok, cls.Params(**{**knobs(name, arch), **extra}))
    if cls.learns_to_edit:  # MEND trains its editor networks first
        editor.prepare(TRAIN_EDITS)
    return editor


def batch_of(tok, *pairs):
    return target_batch(tok, [p for p, _ in pairs], [t for _, t in pairs])


def logits(model, batch):
    """Teacher-forced logits; the batch declares where each prompt ends (GRACE queries there)."""
    with torch.no_grad(), prompt_ends(prompt_ends_of(batch.labels)):
        return model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits


def nll(model, batch) -> float:
    with torch.no_grad(), prompt_ends(prompt_ends_of(batch.labels)):
        return target_nll(model, batch).item()


def predicted_targets(model, batch, row=0):
    """Argmax token at each position that predicts a target token, and the target tokens."""
    out = logits(model, batch)[row]
    labels = batch.labels[row]
    return out.argmax(-1)[batch.target_mask[row]].tolist(), labels[labels != -100].tolist()


# ----------------------------------------------------------------------------- the contract, every editor

@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("name", EDITS_ON_TINY)
def test_edit_holds(tiny, name, arch):
    model, tok = tiny(arch)
    batch = batch_of(tok, (EDIT.prompt, EDIT.target_new))
    before = nll(model, batch)
    predicted, target = predicted_targets(model, batch)
    assert predicted != target  # the base model does not already say it
    stats = make(name, model, tok, arch).apply(EDIT)
    after = nll(model, batch)
    assert before > 5 and after < 0.3, (before, after)
    predicted, target = predicted_targets(model, batch)
    assert predicted == target
    assert stats and all(type(v) is float for v in stats.values()), stats


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("name", EDITORS)
def test_reset_restores_f0_bit_identically(tiny, name, arch):
    model, tok = tiny(arch)
    next(model.parameters()).requires_grad_(False)  # a caller's mix of flags comes back as it was
    flags = {n: q.requires_grad for n, q in model.named_parameters()}
    state = {k: v.clone() for k, v in model.state_dict().items()}
    modules = [(n, type(m)) for n, m in model.named_modules()]
    probe = batch_of(tok, (EDIT.prompt, EDIT.target_new), UNRELATED)
    base = logits(model, probe)

    editor = make(name, model, tok, arch)
    first = editor.apply(EDIT)
    editor.apply(EDIT2)
    assert not torch.equal(logits(model, probe), base)  # the edits did change the model
    editor.reset()

    assert [(n, type(m)) for n, m in model.named_modules()] == modules  # wrappers / adapters gone
    assert model.state_dict().keys() == state.keys()
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())
    assert {n: q.requires_grad for n, q in model.named_parameters()} == flags
    assert not model._forward_pre_hooks and not model._forward_hooks
    assert torch.equal(logits(model, probe), base)
    # and the editor itself starts over: the same first edit gives the same numbers
    assert editor.apply(EDIT) == first


@pytest.mark.parametrize("name", EDITORS)
def test_same_seed_same_numbers(tiny, name):
    runs = []
    for seed in (0, 0, 1):
        model, tok = tiny("llama")
        extra = {"seed": seed} if "seed" in editor_class(name).Params.__dataclass_fields__ else {}
        editor = make(name, model, tok, "llama", **extra)
        stats = [editor.apply(EDIT)] + ([editor.apply(EDIT2)] if seed == 0 else [])  # seed 1: is it different?
        runs.append((stats, logits(model, batch_of(tok, (EDIT.prompt, EDIT.target_new), UNRELATED))))
    assert runs[0][0] == runs[1][0] and torch.equal(runs[0][1], runs[1][1])
    if name in ("lora", "wise"):  # the seed drives LoRA's A init and WISE's gradient masks
        assert runs[0][0][0] != runs[2][0][0]


@pytest.mark.parametrize("name", EDITORS)
def test_bad_input_fails_clearly(tiny, name):
    model, tok = tiny("llama")
    editor = make(name, model, tok, "llama")
    with pytest.raises(ValueError, match="tokenizes to nothing"):
        editor.apply(EditRequest(prompt="The capital of France is", target_new="", subject="France"))
    fields = editor_class(name).Params.__dataclass_fields__
    bad_layer = {"layer": 4} if "layer" in fields else {"layers": (4,)} if "layers" in fields else None
    if bad_layer is not None:  # every editor resolves its layer the same way: one message
        with pytest.raises(ValueError, match="layer 4 out of range: the model has 4 decoder layers"):
            make(name, model, tok, "llama", **bad_layer)


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("name", BATCH)
def test_batch_reset_is_exact_and_a_batch_of_one_is_one_apply(tiny, name, arch):
    """apply_batch changes the model, reset brings f_0 back bit for bit (weights, modules, flags, hooks),
    and a batch of one request is exactly `apply` of it (numbers and logits)."""
    model, tok = tiny(arch)
    next(model.parameters()).requires_grad_(False)
    flags = {n: q.requires_grad for n, q in model.named_parameters()}
    state = {k: v.clone() for k, v in model.state_dict().items()}
    modules = [(n, type(m)) for n, m in model.named_modules()]
    probe = batch_of(tok, (EDIT.prompt, EDIT.target_new), (EDIT2.prompt, EDIT2.target_new), UNRELATED)
    base = logits(model, probe)

    editor = make(name, model, tok, arch)
    stats = editor.apply_batch([EDIT, EDIT2])
    assert stats and all(type(v) is float for v in stats.values()), stats
    assert not torch.equal(logits(model, probe), base)
    editor.reset()
    assert [(n, type(m)) for n, m in model.named_modules()] == modules
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())
    assert {n: q.requires_grad for n, q in model.named_parameters()} == flags
    assert not model._forward_pre_hooks and not model._forward_hooks
    assert torch.equal(logits(model, probe), base)

    one = editor.apply_batch([EDIT])
    after_batch = logits(model, probe)
    editor.reset()
    assert editor.apply(EDIT) == one and torch.equal(logits(model, probe), after_batch)
    with pytest.raises(ValueError, match="at least one request"):
        editor.apply_batch([])


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("name", [n for n in EDITS_ON_TINY if n in BATCH])
def test_batch_edit_holds(tiny, name, arch):
    """Two requests in one update: both targets become the argmax."""
    model, tok = tiny(arch)
    make(name, model, tok, arch).apply_batch([EDIT, EDIT2])
    for request in (EDIT, EDIT2):
        predicted, target = predicted_targets(model, batch_of(tok, (request.prompt, request.target_new)))
        assert predicted == target, (name, request)


@pytest.mark.parametrize("name", [n for n in EDITORS if n not in BATCH])
def test_editors_without_batch_refuse_apply_batch(tiny, name):
    model, tok = tiny("llama")
    with pytest.raises(NotImplementedError, match="one request at a time"):
        make(name, model, tok, "llama").apply_batch([EDIT, EDIT2])


def test_registry_builds_every_editor_with_its_metadata():
    from lifelong.errors import ConfigError

    for name in EDITORS:
        cls = editor_class(name)
        assert cls.name == name and cls.records in ("weights", "module") and isinstance(cls.learns_to_edit, bool)
        assert isinstance(cls.batch, bool) and callable(cls.apply_batch)
        assert isinstance(cls(*tiny_lm("llama"), editor_params(name, knobs(name, "llama"))), EditorProtocol)
        if cls.records == "module":  # the ledger records these by their state
            assert callable(getattr(cls, "state_dict", None)) and callable(getattr(cls, "load_state_dict", None))
        with pytest.raises(ConfigError, match="valid keys"):
            editor_params(name, {"not_a_knob": 1})


def test_ft_m_respects_the_norm_constraint(tiny):
    from lifelong.families.lm import ffn_out

    model, tok = tiny("llama")
    w0 = ffn_out(model, 2).weight.detach().clone()
    editor = make("ft_m", model, tok, "llama", norm_constraint=0.01)
    editor.apply(EDIT)
    editor.apply(EDIT2)  # the ball is around f_0's weights for the whole run, not per edit
    change = (ffn_out(model, 2).weight - w0).abs().max().item()
    assert 0.009 < change <= 0.01 + 1e-7


@pytest.mark.parametrize("arch", ARCHS)
def test_ft_m_speedups_change_no_number(tiny, arch):
    """FT-M's edit with the lower blocks replayed and the output layer at the target positions only equals the
    plain loop (every block, every logit) on the same batch."""
    from lifelong.edit.base import fit_target
    from lifelong.families.lm import ffn_out

    model, tok = tiny(arch)
    plain = copy.deepcopy(model)
    editor = make("ft_m", model, tok, arch, norm_constraint=0.5)
    requests = [EDIT, EditRequest(prompt="Yes I think that " + EDIT2.prompt, target_new=" euro and yen", subject="India")]
    stats = editor.apply_batch(requests)
    p, w = editor.params, ffn_out(plain, editor.layer).weight
    w0 = w.detach().clone()
    batch = target_batch(tok, [r.prompt for r in requests], [r.target_new for r in requests], w.device)
    for q in plain.parameters():
        q.requires_grad_(q is w)

    def project():
        with torch.no_grad():
            w.copy_(torch.clamp(w, w0 - p.norm_constraint, w0 + p.norm_constraint))

    steps = fit_target(plain, batch, [w], lr=p.lr, steps=p.steps, stop_loss=p.stop_loss, after_step=project)
    assert stats["steps"] == steps > 0
    torch.testing.assert_close(ffn_out(model, editor.layer).weight, w, atol=1e-5, rtol=1e-4)
    with torch.no_grad():
        assert stats["loss_after"] == pytest.approx(target_nll(plain, batch).item(), abs=1e-4)
    assert all(q.requires_grad for q in model.parameters())  # every flag back


def test_ft_l_ball_is_around_the_weights_before_each_edit(tiny):
    """EasyEdit's clamp: each edit stays within eps of the weights it started from, so two edits may
    move a weight up to 2 eps from f_0."""
    from lifelong.families.lm import ffn_out

    model, tok = tiny("llama")
    w0 = ffn_out(model, 2).weight.detach().clone()
    editor = make("ft_l", model, tok, "llama", norm_constraint=0.01)
    first = editor.apply(EDIT)
    w1 = ffn_out(model, 2).weight.detach().clone()
    second = editor.apply(EDIT2)
    assert 0.009 < first["max_abs_change"] <= 0.01 + 1e-7 and 0.009 < second["max_abs_change"] <= 0.01 + 1e-7
    assert (ffn_out(model, 2).weight - w1).abs().max().item() <= 0.01 + 1e-7
    assert 0.01 + 1e-4 < (ffn_out(model, 2).weight - w0).abs().max().item() <= 0.02 + 1e-6


def test_ft_l_scores_every_target_token_at_the_last_prompt_position(tiny):
    """FT-L's loss by hand: log-softmax of the logits after the prompt, at each target token, averaged;
    it reads the prompt alone (no teacher forcing), unlike FT-M's target NLL."""
    from lifelong.edit.ft_l import prompt_last_nll

    model, tok = tiny("llama")
    prompt, target = "The capital of France is", " Tokyo Tower"
    p, t = (tok(x, add_special_tokens=False)["input_ids"] for x in (prompt, target))
    assert len(t) > 1
    with torch.no_grad():
        logp = torch.log_softmax(model(input_ids=torch.tensor([p])).logits[0, -1], -1)
        loss = prompt_last_nll(model, torch.tensor([p]), torch.tensor(t))
        assert loss.item() == pytest.approx(-sum(logp[i].item() for i in t) / len(t), rel=1e-5)
        assert loss.item() != pytest.approx(target_nll(model, batch_of(tok, (prompt, target))).item(), rel=1e-3)
    editor = make("ft_l", model, tok, "llama", norm_constraint=0.0, steps=40)
    stats = editor.apply(EditRequest(prompt=prompt, target_new=target, subject="France"))
    # two tokens share one distribution: the loss cannot fall below log 2, so every step runs
    assert stats["steps"] == 40.0 and math.log(len(t)) - 1e-4 <= stats["loss_after"] < stats["loss_before"]


# ----------------------------------------------------------------------------- GRACE

@pytest.mark.parametrize("arch", ARCHS)
def test_grace_leaves_far_inputs_exactly_alone(tiny, arch):
    model, tok = tiny(arch)
    edited, far = batch_of(tok, (EDIT.prompt, EDIT.target_new)), batch_of(tok, UNRELATED)
    base_edited, base_far = logits(model, edited), logits(model, far)
    make("grace", model, tok, arch).apply(EDIT)
    assert not torch.equal(logits(model, edited), base_edited)
    assert torch.equal(logits(model, far), base_far)  # no token of it falls in the key's ball


def test_grace_codebook_add_expand_split(tiny):
    model, tok = tiny("llama")
    probe = make("grace", model, tok, "llama", eps=100.0)
    probe.apply(EDIT)
    d = probe.apply(EDIT2)["nearest_distance"]
    assert d > 0
    same_answer = EditRequest(prompt=EDIT2.prompt, target_new=EDIT.target_new, subject="India")

    # far apart (d > eps + eps): a second key with the initial radius
    model, tok = tiny("llama")
    grace = make("grace", model, tok, "llama", eps=0.3 * d)
    grace.apply(EDIT)
    grace.apply(EDIT2)
    assert grace.codebook.radii.tolist() == pytest.approx([0.3 * d] * 2)
    # within reach, same answer: no new key, the ball grows to cover the new query
    model, tok = tiny("llama")
    grace = make("grace", model, tok, "llama", eps=0.7 * d)
    grace.apply(EDIT)
    grace.apply(same_answer)
    assert len(grace.codebook.labels) == 1 and grace.codebook.radii.tolist() == pytest.approx([d], rel=1e-5)
    assert predicted_targets(model, batch_of(tok, (same_answer.prompt, same_answer.target_new)))[0] == \
        tok(" Tokyo", add_special_tokens=False)["input_ids"]
    # within reach, conflicting answer: a new key and both radii split to d / 2
    model, tok = tiny("llama")
    grace = make("grace", model, tok, "llama", eps=0.7 * d)
    grace.apply(EDIT)
    stats = grace.apply(EDIT2)
    assert stats["split"] == 1.0 and grace.codebook.radii.tolist() == pytest.approx([d / 2] * 2, rel=1e-5)
    for request in (EDIT, EDIT2):  # both edits hold after the split
        predicted, target = predicted_targets(model, batch_of(tok, (request.prompt, request.target_new)))
        assert predicted == target


@pytest.mark.parametrize("arch", ARCHS)
def test_grace_state_round_trips_to_a_fresh_model_and_continues(tiny, arch):
    """load_state_dict on a fresh model: the same logits bit for bit, and a further edit continues the
    codebook exactly as the editor that made it would; reset is still f_0."""
    model, tok = tiny(arch)
    probe = batch_of(tok, (EDIT.prompt, EDIT.target_new), UNRELATED)
    base = logits(model, probe)
    grace = make("grace", model, tok, arch)
    assert grace.state_dict()["keys"].shape[0] == 0  # nothing yet
    grace.apply(EDIT)
    state = grace.state_dict()
    assert state["keys"].shape[0] == 1 and int(state["layer"]) == grace.layer

    fresh, _ = tiny(arch)
    again = make("grace", fresh, tok, arch)
    again.load_state_dict(state)
    assert torch.equal(logits(fresh, probe), logits(model, probe))
    grace.apply(EDIT2)
    again.apply(EDIT2)
    assert again.codebook.labels == grace.codebook.labels
    assert all(torch.equal(a, b) for a, b in zip(again.state_dict().values(), grace.state_dict().values()))
    assert torch.equal(logits(fresh, probe), logits(model, probe))
    again.load_state_dict(state)  # replaces the codebook: back to one edit
    assert len(again.codebook.labels) == 1
    again.reset()
    assert torch.equal(logits(fresh, probe), base)
    assert "grace" not in dict(again.original.named_children()) and not again.original._forward_hooks
    with pytest.raises(ValueError, match="give layer="):
        make("grace", fresh, tok, arch, layer=0).load_state_dict(state)


def test_grace_reedit_of_the_same_prompt_takes_the_new_answer(tiny):
    model, tok = tiny("llama")
    grace = make("grace", model, tok, "llama")
    grace.apply(EDIT)
    grace.apply(EditRequest(prompt=EDIT.prompt, target_new=" euro", subject="France"))
    assert len(grace.codebook.labels) == 1
    predicted, target = predicted_targets(model, batch_of(tok, (EDIT.prompt, " euro")))
    assert predicted == target


# ----------------------------------------------------------------------------- WISE

def test_wise_unrelated_input_stays_below_threshold_and_unchanged(tiny):
    model, tok = tiny("llama")
    edited, far = batch_of(tok, (EDIT.prompt, EDIT.target_new)), batch_of(tok, UNRELATED)
    base_edited, base_far = logits(model, edited), logits(model, far)
    wise = make("wise", model, tok, "llama")
    wise.apply(EDIT)
    wise.apply(EDIT2)
    memory = wise.memory
    memory.record = True
    logits(model, far)
    score, _ = memory.route(memory.last_input)
    memory.record = False
    assert score.item() < memory.threshold  # learned: unrelated text does not pass the routing threshold
    assert torch.equal(logits(model, far), base_far)
    assert not torch.equal(logits(model, edited), base_edited)


@pytest.mark.parametrize("arch", ARCHS)
def test_wise_routing_uses_the_side_memory_only_above_threshold(tiny, arch):
    model, tok = tiny(arch)
    probe = batch_of(tok, UNRELATED, (EDIT.prompt, EDIT.target_new))
    base = logits(model, probe)
    wise = make("wise", model, tok, arch)
    wise.apply(EDIT)
    memory = wise.memory
    memory.record = True
    logits(model, probe)
    memory.record = False
    score = memory.route(memory.last_input)[0]  # (2,) per sequence, padding excluded
    memory.threshold = (score[0] - 1e-4).item()      # the unrelated row just passes
    routed = logits(model, probe)
    memory.threshold = (score[0] + 1e-4).item()      # and now just fails
    unrouted = logits(model, probe)
    assert not torch.equal(routed[0], base[0]) and torch.equal(unrouted[0], base[0])


def test_wise_shards_merge_with_ties_and_edits_survive(tiny):
    model, tok = tiny("llama")
    far = batch_of(tok, UNRELATED)
    base_far = logits(model, far)
    wise = make("wise", model, tok, "llama", shard_size=1, num_shards=2)
    first, second = wise.apply(EDIT), wise.apply(EDIT2)
    assert first["merged"] == 0.0 and second["merged"] == 1.0
    assert wise.memory.side is not None and wise.memory.pending == [] and wise.memory.current is None
    # the two shards trained under different random masks: their deltas barely overlap
    for request in (EDIT, EDIT2):
        predicted, target = predicted_targets(model, batch_of(tok, (request.prompt, request.target_new)))
        assert predicted == target
    assert torch.equal(logits(model, far), base_far)
    wise.apply(EditRequest(prompt="The capital of Japan is", target_new=" Paris", subject="Japan"))
    assert len(wise.memory.copies()) == 2  # the merged memory and the new shard in progress


@pytest.mark.parametrize("arch", ARCHS)
def test_wise_state_round_trips_to_a_fresh_model_and_continues(tiny, arch):
    """load_state_dict on a fresh model: the same logits bit for bit, and further edits (filling the shard,
    drawing the next shard's mask, merging) continue exactly as the editor that made the first; reset is f_0."""
    model, tok = tiny(arch)
    probe = batch_of(tok, (EDIT.prompt, EDIT.target_new), UNRELATED, (EDIT2.prompt, EDIT2.target_new))
    base = logits(model, probe)
    modules = [(n, type(m)) for n, m in model.named_modules()]
    names = [n for n, _ in model.named_parameters()]
    wise = make("wise", model, tok, arch, shard_size=2, num_shards=2)
    assert not bool(wise.state_dict()["installed"])  # nothing yet
    wise.apply(EDIT)
    assert [n for n, _ in model.named_parameters()] == names  # a hook, not a wrapper: the plain names
    state = wise.state_dict()
    assert int(state["layer"]) == wise.layer and state["current"].shape[0] == 1 and int(state["edits_in_shard"]) == 1

    fresh, _ = tiny(arch)
    again = make("wise", fresh, tok, arch, shard_size=2, num_shards=2)
    again.load_state_dict(state)
    assert torch.equal(logits(fresh, probe), logits(model, probe))
    more = (EDIT2, EditRequest(prompt="The capital of Japan is", target_new=" Paris", subject="Japan"),
            EditRequest(prompt="The capital of Italy is", target_new=" Berlin", subject="Italy"))
    for request in more:  # the shard fills and is parked, a new shard draws its mask, the two merge
        assert again.apply(request) == wise.apply(request)
        assert torch.equal(logits(fresh, probe), logits(model, probe))
    assert wise.memory.side is not None and wise.memory.current is None
    done = wise.state_dict()
    assert all(torch.equal(a, b) for a, b in zip(again.state_dict().values(), done.values()))

    third, _ = tiny(arch)  # a merged memory round trips too
    other = make("wise", third, tok, arch, shard_size=2, num_shards=2)
    other.load_state_dict(done)
    assert torch.equal(logits(third, probe), logits(model, probe))
    again.load_state_dict(state)  # replaces the memory: back to one edit
    assert len(again.memory.copies()) == 1 and again.memory.side is None
    again.reset()
    assert torch.equal(logits(fresh, probe), base)
    assert [(n, type(m)) for n, m in fresh.named_modules()] == modules
    assert not again.original._forward_hooks and not fresh._forward_pre_hooks
    with pytest.raises(ValueError, match="give layer="):
        make("wise", fresh, tok, arch, layer=0).load_state_dict(state)
    with pytest.raises(ValueError, match="shard_size=1, num_shards=2 cannot continue it"):
        make("wise", fresh, tok, arch, shard_size=1, num_shards=2).load_state_dict(state)


def test_ties_merge_trims_elects_and_averages_the_agreeing():
    from lifelong.edit.wise import ties_merge

    base = torch.zeros(1, 4)
    a, b = torch.tensor([[3.0, -1.0, 0.0, 2.0]]), torch.tensor([[1.0, 2.0, -4.0, 0.0]])
    # no trim: signs of the sum (+, +, -, +); entry 1 keeps only b's +2 (a's -1 disagrees)
    assert ties_merge(base, [a, b], density=1.0).tolist() == [[2.0, 2.0, -4.0, 2.0]]
    # keep each delta's top half: a -> (3, 0, 0, 2), b -> (0, 2, -4, 0)
    assert ties_merge(base + 1, [a + 1, b + 1], density=0.5).tolist() == [[4.0, 3.0, -3.0, 3.0]]


@pytest.mark.parametrize("arch", ARCHS)
def test_wise_speedups_change_no_number(tiny, arch):
    from lifelong.edit.wise import replay_lower_layers, target_only_nll
    from lifelong.families.lm import decoder_layers

    model, tok = tiny(arch)
    batch = batch_of(tok, (EDIT.prompt, EDIT.target_new), ("Yes I think that " + EDIT2.prompt, EDIT2.target_new))
    with torch.no_grad():
        full = target_nll(model, batch)
        assert torch.allclose(target_only_nll(model, batch), full, atol=1e-5)
        with replay_lower_layers(model, 3):
            first, again = target_only_nll(model, batch), target_only_nll(model, batch)
    assert torch.equal(first, again) and torch.allclose(first, full, atol=1e-5)
    assert all("forward" not in vars(block) for block in decoder_layers(model))  # class forward is back


# ----------------------------------------------------------------------------- SmolLM2 (issue 6 acceptance)

@pytest.mark.slow
@pytest.mark.parametrize("name", ("wise", "grace"))
def test_smollm2_one_edit_moves_prompt_and_paraphrase_not_locality(name):
    """One edit makes SmolLM2-135M answer " Lyon" for the prompt and a paraphrase; unrelated prompts
    (another capital, a planet) keep the base model's answers."""
    from lifelong.edit import build_editor
    from lifelong.families.lm import build_lm

    model, tok = build_lm("embedded")
    prompt, paraphrase = "The capital of France is", "The capital city of France is"
    locality = ("The capital of Germany is", "The largest planet in the solar system is")

    def answer(text, n=3):
        ids = tok(text, add_special_tokens=False, return_tensors="pt")["input_ids"]
        with torch.no_grad():
            out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=n,
                                 do_sample=False, pad_token_id=tok.pad_token_id)
        return tok.decode(out[0, ids.shape[1]:])

    base = {text: answer(text) for text in (prompt, paraphrase, *locality)}
    assert base[prompt].startswith(" Paris") and base[paraphrase].startswith(" Paris")
    editor = build_editor(name, model, tok)
    start = time.perf_counter()
    stats = editor.apply(EditRequest(prompt=prompt, target_new=" Lyon", subject="France",
                                     paraphrases=(paraphrase,)))
    seconds = time.perf_counter() - start
    print(f"\n{name}: one edit on SmolLM2-135M took {seconds:.1f} s; {stats}")
    assert answer(prompt, 1) == " Lyon" and answer(paraphrase, 1) == " Lyon"
    assert all(answer(text) == base[text] for text in locality)
    editor.reset()
    assert answer(prompt) == base[prompt]


@pytest.mark.slow
def test_smollm2_grace_answer_is_not_a_loop():
    """Issue 19, as a new user tried it: `lifelong edit --method grace` on "Into which sea does the Danube
    flow?" -> "the Baltic Sea" answered " the Baltic Sea Baltic Sea Baltic Sea Baltic". Now the target once,
    then the answer ends."""
    from lifelong.edit import build_editor
    from lifelong.families.lm import build_lm
    from lifelong.metrics.editing import generate

    model, tok = build_lm("embedded")
    prompt = "Into which sea does the Danube flow?"
    build_editor("grace", model, tok).apply(EditRequest(prompt=prompt, target_new=" the Baltic Sea", subject="Danube"))
    (answer,) = generate(model, tok, [prompt], max_new_tokens=12)
    print(f"\nGRACE on SmolLM2: {prompt!r} -> {answer!r}")
    assert answer.startswith(" the Baltic Sea") and "Baltic" not in answer[len(" the Baltic Sea"):]
