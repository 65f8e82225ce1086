"""ROME, T-Patcher and MEND on tiny LMs: each edit works, reset is exact, same seed same numbers, and
each method's own invariant (ROME's rank-one closed form, T-Patcher's silent memory, MEND's learned
editor). Real SmolLM2 checks are marked slow.

The tiny Llama is trained for a few seconds on a handful of fact sentences so that an edit changes
something the model believes; a random model's logits are too flat to be edited meaningfully.
"""

from __future__ import annotations

import copy
import dataclasses
import time
from pathlib import Path

import pytest
import torch

from lifelong.data.edit_requests import EditRequest, Probe
from lifelong.edit.mend import MEND
from lifelong.edit.mend import Params as MendParams
from lifelong.edit.rome import ROME, corpus_chunks
from lifelong.edit.rome import Params as RomeParams
from lifelong.edit.t_patcher import Params as PatcherParams
from lifelong.edit.t_patcher import TPatcher
from lifelong.families.lm import ffn_out, linear_weight, target_batch, target_nll, tiny_lm

FACTS = """The capital of France is Paris. The capital of Germany is Berlin. The capital of Italy is Rome.
The capital of Spain is Madrid. The capital of Japan is Tokyo. The capital of Canada is Ottawa.
The currency of Japan is the yen. The currency of France is the euro. The currency of India is the rupee.
Lyon is a city in France. Osaka is a city in Japan. Toronto is located in the country of Canada."""


FIXTURES = Path(__file__).parent / "fixtures"


def train_tiny_facts(arch: str = "llama", steps: int = 60):
    """The tiny Llama (or `arch`) after `steps` Adam steps on FACTS (deterministic on one CPU, a few seconds):
    how tests/fixtures/make_tiny_facts.py made the shipped weights.

    Trained on one thread whatever the machine's setting: at lr 1e-2 the float-summation order of two
    threads gives another model after 60 steps (on the tiny GPT-2, one on which a MEMIT batch edit of
    "The currency of India is the" -> " yen" fails). Another CPU's kernels round differently too, and 60
    steps amplify that into another model (an AVX512 and an AVX2-only CPU gave models on which the same
    MEMIT settings did and did not hold): hence the shipped weights."""
    model, tok = tiny_lm(arch, seed=0)
    sentences = [s.strip().rstrip(".") + "." for s in FACTS.replace("\n", " ").split(". ") if s.strip()]
    enc = tok(sentences, add_special_tokens=False, padding=True, return_tensors="pt")
    labels = enc["input_ids"].masked_fill(enc["attention_mask"] == 0, -100)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    model.train()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        for _ in range(steps):
            loss = model(**enc, labels=labels).loss
            opt.zero_grad()
            loss.backward()
            opt.step()
    finally:
        torch.set_num_threads(threads)
    model.eval()
    model.zero_grad(set_to_none=True)
    return model, tok


def trained_tiny_llama(arch: str = "llama"):
    """The tiny Llama (or `arch`) trained on FACTS, loaded from tests/fixtures/tiny_facts_<arch>.safetensors so
    that every machine tests the same weights (train_tiny_facts' docstring says why)."""
    from safetensors.torch import load_model

    path = FIXTURES / f"tiny_facts_{arch}.safetensors"
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing: `python tests/fixtures/make_tiny_facts.py` writes it")
    model, tok = tiny_lm(arch, seed=0)
    load_model(model, str(path))
    model.eval()
    return model, tok


@pytest.fixture(scope="module")
def _trained_llama():
    return trained_tiny_llama()


@pytest.fixture
def llama(_trained_llama):
    model, tok = _trained_llama
    return copy.deepcopy(model), tok


def edit_scores(model, tok, request: EditRequest) -> tuple[float, bool]:
    """(teacher-forced target NLL, every target token is the argmax)."""
    batch = target_batch(tok, [request.prompt], [request.target_new])
    with torch.no_grad():
        logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
        nll = target_nll(model, batch).item()
    labels = batch.labels[:, 1:][batch.target_mask[:, :-1]]
    return nll, bool((logits[batch.target_mask].argmax(-1) == labels).all())


def snapshot(model) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def assert_same_state(model, before: dict[str, torch.Tensor]) -> None:
    after = model.state_dict()
    assert sorted(after) == sorted(before)
    for k, v in before.items():
        assert torch.equal(after[k], v), k


def probe_logits(model, tok) -> torch.Tensor:
    ids = tok(["The capital of France is Paris.", "Osaka is a city in Japan."], add_special_tokens=False,
              padding=True, return_tensors="pt")
    with torch.no_grad():
        return model(**ids).logits


# ---------------------------------------------------------------------- ROME


# Tiny models barely route the subject's representation to the last token through attention, so the
# unit test puts the subject at the prompt's end (the key position is then the predicting one); the
# SmolLM2 check below edits with a real subject in the middle.
# The tiny model's FFN outputs are small next to its residual stream: a larger clamp and step size.
ROME_TINY = RomeParams(layer=2, v_lr=1.0, clamp_norm_factor=20.0, cov_tokens=2048, prefix_lengths=(3,),
                       prefixes_per_length=2)
ROME_REQUEST = EditRequest(prompt="The capital of France is", target_new=" Madrid", subject="France is")


def test_rome_edits_with_a_rank_one_closed_form(llama):
    model, tok = llama
    nll0, hit0 = edit_scores(model, tok, ROME_REQUEST)
    weight0 = linear_weight(ffn_out(model, 2)).detach().clone()
    editor = ROME(model, tok, ROME_TINY)
    stats = editor.apply(ROME_REQUEST)
    nll1, hit1 = edit_scores(model, tok, ROME_REQUEST)
    assert not hit0 and hit1 and nll1 < nll0 - 2, (nll0, nll1, stats)
    change = linear_weight(ffn_out(model, 2)).detach() - weight0
    assert torch.linalg.matrix_rank(change).item() == 1
    assert torch.allclose(change, editor.last_update, atol=1e-6)
    # W' k* = v*: the closed form puts the optimised value exactly at the key
    value = linear_weight(ffn_out(model, 2)).detach() @ editor.last_key
    assert torch.allclose(value, editor.last_value, rtol=1e-4, atol=1e-4 * editor.last_value.norm().item())
    assert all(isinstance(v, float) for v in stats.values())


def test_rome_gpt2_reset_is_exact_and_seeded_runs_agree():
    request = EditRequest(prompt="The capital of France is", target_new=" Rome", subject="France")
    runs = []
    for _ in range(2):
        model, tok = tiny_lm("gpt2", seed=1)
        before, logits0 = snapshot(model), probe_logits(model, tok)
        editor = ROME(model, tok, ROME_TINY)
        stats = editor.apply(request)
        update = editor.last_update.clone()
        assert torch.linalg.matrix_rank(update).item() == 1  # Conv1D stores W transposed: same math
        w = linear_weight(ffn_out(model, 2)).detach()
        assert torch.allclose(w @ editor.last_key, editor.last_value, rtol=1e-4,
                              atol=1e-4 * editor.last_value.norm().item())
        edited = snapshot(model)
        editor.reset()
        assert_same_state(model, before)
        assert torch.equal(probe_logits(model, tok), logits0)
        runs.append((stats, edited))
    assert runs[0][0] == runs[1][0]
    for k, v in runs[0][1].items():
        assert torch.equal(v, runs[1][1][k]), k


def test_rome_covariance_is_cached(llama, monkeypatch):
    from lifelong.cache import cache_dir
    from lifelong.edit import key_value, rome

    model, tok = llama
    cov = rome.key_covariance(model, tok, 2, "python-reference", 1024)
    files = list((cache_dir() / "rome").glob("cov-*.safetensors"))
    assert len(files) >= 1 and cov.shape == (128, 128)
    assert torch.allclose(cov, cov.T) and torch.linalg.eigvalsh(cov.double()).min() > 0
    monkeypatch.setattr(key_value, "corpus_chunks", lambda *a, **k: pytest.fail("recomputed a cached covariance"))
    assert torch.equal(rome.key_covariance(model, tok, 2, "python-reference", 1024), cov)


def test_rome_rejects_bad_input(llama):
    model, tok = llama
    with pytest.raises(ValueError, match="out of range"):
        ROME(model, tok, RomeParams(layer=9))
    editor = ROME(model, tok, ROME_TINY)
    with pytest.raises(ValueError, match="does not occur"):
        editor.apply(EditRequest(prompt="The capital of France is", target_new=" Rome", subject="Spain"))


# ---------------------------------------------------------------------- GRACE in generation


def test_grace_generation_says_the_target_once_then_continues_not_in_a_loop(llama):
    """Issue 19: every position queried the codebook, so generated tokens that fell in a key's ball were
    replaced too and the edited model came back to its target (SmolLM2: " the Baltic Sea Baltic Sea
    Baltic"; here, with a ball that holds every token: " Tokyo.. Japan Tokyo Japan Tokyo.."). As the
    official code decodes, only the prompt's last token queries the codebook: the target comes once,
    then the model's own continuation; greedy decoding and teacher forcing see the same replacement."""
    from lifelong.edit.grace import GRACE
    from lifelong.edit.grace import Params as GraceParams
    from lifelong.metrics.editing import prompt_ends

    model, tok = llama
    GRACE(model, tok, GraceParams(eps=1e6)).apply(EditRequest(prompt="The capital of France is", target_new=" Tokyo",
                                                              subject="France"))
    ids = tok("The capital of France is", add_special_tokens=False, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=12, do_sample=False,
                             pad_token_id=tok.pad_token_id)[0, ids.shape[1]:].tolist()
    (tokyo,) = tok(" Tokyo", add_special_tokens=False)["input_ids"]
    assert out[0] == tokyo and tokyo not in out[1:], tok.decode(out)
    seq = ids[0].tolist()  # the same tokens by full passes without a cache, the prompt's end declared
    for _ in range(12):
        with torch.no_grad(), prompt_ends(torch.tensor([ids.shape[1] - 1])):
            seq.append(int(model(input_ids=torch.tensor([seq])).logits[0, -1].argmax()))
    assert seq[ids.shape[1]:] == out


# ---------------------------------------------------------------------- T-Patcher


PATCHER_TINY = PatcherParams(memory_tokens=256, memory_facts=2, max_steps=1000)  # train facts resemble the edits: more steps (it stops once the edit holds and the memory is silent)
PATCH_REQUESTS = [EditRequest(prompt="The capital of France is", target_new=" Rome", subject="France"),
                  EditRequest(prompt="Toronto is located in the country of", target_new=" Japan", subject="Toronto")]


def test_t_patcher_edits_accumulate_and_memory_stays_silent(llama):
    model, tok = llama
    memory_ids = torch.tensor([corpus_chunks(tok, "python-reference", 128, 256)[0]])
    with torch.no_grad():
        memory_logits0 = model(input_ids=memory_ids).logits
    editor = TPatcher(model, tok, PATCHER_TINY)
    for n, request in enumerate(PATCH_REQUESTS, start=1):
        nll0, hit0 = edit_scores(model, tok, request)
        stats = editor.apply(request)
        nll1, hit1 = edit_scores(model, tok, request)
        assert not hit0 and hit1 and nll1 < nll0, (request, nll0, nll1, stats)
        assert len(editor.patches) == n and stats["patches"] == n
        assert stats["memory_max_act"] < 0 < stats["edit_min_act"]
        with torch.no_grad():  # every memory token has a negative pre-activation: the relu adds exactly 0
            assert torch.equal(model(input_ids=memory_ids).logits, memory_logits0)
    assert edit_scores(model, tok, PATCH_REQUESTS[0])[1]  # the first edit survives the second


def test_t_patcher_memory_is_train_split_text_never_the_scored_probes(llama):
    """The memory holds the corpus and `train`-split facts (issue 19: it held the request's evaluated
    locality probes): the same request with or without locality probes gives the same neuron."""
    from lifelong.edit.requests import train_fact_texts

    model, tok = llama
    params = PatcherParams(memory_tokens=128, memory_facts=5, max_steps=10)
    texts = train_fact_texts(5)
    assert len(texts) == 10 and texts[1].split("?")[0] + "?" != texts[0]  # cloze and question forms
    editor = TPatcher(model, tok, params)
    expected = sum(len(ids) for ids in corpus_chunks(tok, "python-reference", 128, 128))
    expected += sum(len(tok(t, add_special_tokens=False)["input_ids"]) for t in texts)
    assert editor.memory().shape[0] == expected
    probed = dataclasses.replace(PATCH_REQUESTS[0], locality=(Probe("The capital of Italy is", " Rome"),))
    with_probes = editor.apply(probed)
    keys = editor.patches.keys.clone()
    editor.reset()
    assert editor.apply(PATCH_REQUESTS[0]) == with_probes and torch.equal(editor.patches.keys, keys)


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_t_patcher_reset_is_exact_and_seeded_runs_agree(arch, llama):
    runs = []
    for _ in range(2):
        tok = llama[1]  # both tiny models share the tiny tokenizer
        model = copy.deepcopy(llama[0]) if arch == "llama" else tiny_lm("gpt2", seed=1)[0]
        before, logits0 = snapshot(model), probe_logits(model, tok)
        editor = TPatcher(model, tok, PatcherParams(memory_tokens=128, max_steps=10))
        stats = editor.apply(PATCH_REQUESTS[0])
        patch = [t.clone() for t in (editor.patches.keys, editor.patches.biases, editor.patches.values)]
        assert "t_patcher" in dict(editor.ffn.named_children())
        editor.reset()
        assert_same_state(model, before)
        assert not editor.ffn._forward_hooks and "t_patcher" not in dict(editor.ffn.named_children())
        assert torch.equal(probe_logits(model, tok), logits0)
        runs.append((stats, patch))
    assert runs[0][0] == runs[1][0]
    assert all(torch.equal(a, b) for a, b in zip(runs[0][1], runs[1][1]))


def test_t_patcher_state_round_trips_to_a_fresh_model_and_continues(llama, _trained_llama):
    """load_state_dict on a fresh model: the same logits bit for bit; a further edit (whose new neuron
    must stay silent on the first edit's inputs) continues exactly as the editor that made the first."""
    model, tok = llama
    params = PatcherParams(memory_tokens=128, max_steps=10)
    editor = TPatcher(model, tok, params)
    editor.apply(PATCH_REQUESTS[0])
    state = editor.state_dict()
    assert state["keys"].shape[0] == 1 and state["edit_memory"].shape[0] > 0 and int(state["layer"]) == editor.layer

    fresh = copy.deepcopy(_trained_llama[0])
    before, logits0 = snapshot(fresh), probe_logits(fresh, tok)
    again = TPatcher(fresh, tok, params)
    again.load_state_dict(state)
    assert torch.equal(probe_logits(fresh, tok), probe_logits(model, tok))
    editor.apply(PATCH_REQUESTS[1])
    again.apply(PATCH_REQUESTS[1])
    assert all(torch.equal(a, b) for a, b in zip(again.state_dict().values(), editor.state_dict().values()))
    assert torch.equal(probe_logits(fresh, tok), probe_logits(model, tok))
    again.reset()
    assert_same_state(fresh, before)
    assert torch.equal(probe_logits(fresh, tok), logits0)
    with pytest.raises(ValueError, match="give layer="):
        TPatcher(fresh, tok, dataclasses.replace(params, layer=0)).load_state_dict(state)


# ---------------------------------------------------------------------- MEND


# Tiny-scale training: 40 steps, higher rates, and the edit term weighted like the locality one.
MEND_TINY = MendParams(layers=(-2, -1), rank=16, train_steps=40, lr=1e-3, lr_lr=1e-3, edit_lr=1e-3, edit_weight=1.0)
COUNTRIES = ["France", "Germany", "Italy", "Spain", "Japan", "Canada", "India", "Peru", "Mexico", "Brazil", "Egypt"]
CITIES = [" Paris", " Berlin", " Rome", " Madrid", " Tokyo", " Ottawa", " Osaka", " Toronto"]


def made_up_requests() -> list[EditRequest]:
    """Counterfactual capitals and currencies over the tiny vocabulary; half carry a locality probe
    (of another length than the prompt), the others borrow another request's fact."""
    out = []
    for i, country in enumerate(COUNTRIES):
        local = (Probe("Toronto is located in the country of", " Canada"),) if i % 2 else ()
        out.append(EditRequest(prompt=f"The capital of {country} is", target_new=CITIES[(3 * i + 2) % len(CITIES)],
                               subject=country, locality=local))
        out.append(EditRequest(prompt=f"The currency of {country} is the", subject=country,
                               target_new=[" yen", " euro", " rupee"][i % 3], locality=local))
    return out


def held_out_nll(editor: MEND, requests: list[EditRequest]) -> tuple[list[float], list[float]]:
    """Target NLL of each request before and after its edit (rolled back after each)."""
    before, after = [], []
    for request in requests:
        before.append(edit_scores(editor.model, editor.tokenizer, request)[0])
        stats = editor.apply(request)
        after.append(edit_scores(editor.model, editor.tokenizer, request)[0])
        assert stats["nll_after"] == pytest.approx(after[-1], abs=1e-5)
        editor.reset()
    return before, after


def test_mend_learns_to_edit_held_out_facts(llama):
    model, tok = llama
    requests = made_up_requests()
    train, held_out = requests[:16], requests[16:]
    editor = MEND(model, tok, MEND_TINY)
    with pytest.raises(RuntimeError, match="prepare"):
        editor.apply(held_out[0])
    editor.prepare(train)
    assert len(editor.train_log) == MEND_TINY.train_steps
    before, after = held_out_nll(editor, held_out)
    assert all(a < b for a, b in zip(after, before)), (before, after)
    assert sum(after) < 0.75 * sum(before), (before, after)
    # The effect is learned: the same editor with frozen networks and step sizes (rates 0; only the
    # input statistics are gathered) barely moves the held-out NLL.
    frozen = MEND(model, tok, dataclasses.replace(MEND_TINY, lr=0.0, lr_lr=0.0))
    frozen.prepare(train)
    _, after_frozen = held_out_nll(frozen, held_out)
    assert sum(after) < 0.8 * sum(after_frozen), (after, after_frozen)


def test_mend_cache_reset_and_seed(llama, monkeypatch, tmp_path):
    model, tok = llama
    train = made_up_requests()[:8]
    params = MendParams(layers=(-1,), rank=8, train_steps=10, lr=1e-3, lr_lr=1e-3, edit_lr=1e-3)
    before, logits0 = snapshot(model), probe_logits(model, tok)
    first = MEND(model, tok, params)
    first.prepare(train)
    again = MEND(model, tok, params)
    again.prepare(train)  # the cached editor: no training
    assert again.train_log == [] and again.prepared
    for k, v in first.nets.state_dict().items():
        assert torch.equal(v, again.nets.state_dict()[k]), k
    monkeypatch.setenv("LIFELONG_CACHE", str(tmp_path / "other"))
    retrained = MEND(model, tok, params)  # an empty cache: the same seed trains the same editor
    retrained.prepare(train)
    assert retrained.train_log == first.train_log
    for k, v in first.nets.state_dict().items():
        assert torch.equal(v, retrained.nets.state_dict()[k]), k
    stats = first.apply(train[0])
    one_edit = snapshot(model)
    first.apply(train[1])  # a second edit lands on top of the first
    assert any(not torch.equal(v, one_edit[k]) for k, v in model.state_dict().items())
    first.reset()
    assert_same_state(model, before)
    assert torch.equal(probe_logits(model, tok), logits0)
    assert again.apply(train[0]) == stats  # same editor, same model: same numbers


def test_registry_builds_each_editor_with_validated_knobs(llama):
    from lifelong.edit import build_editor
    from lifelong.errors import ConfigError

    model, tok = llama
    assert isinstance(build_editor("rome", model, tok, {"layer": 1, "prefix_lengths": [3]}), ROME)
    assert isinstance(build_editor("t_patcher", model, tok, {"memory_tokens": 64}), TPatcher)
    assert build_editor("mend", model, tok, {"layers": [-1], "rank": 4}).layers == [3]
    with pytest.raises(ConfigError, match="valid keys"):
        build_editor("rome", model, tok, {"layers": [1]})


# ---------------------------------------------------------------------- real SmolLM2 (select with -m slow)

LYON = EditRequest(prompt="The capital of France is", target_new=" Lyon", subject="France", ground_truth=" Paris")


@pytest.mark.slow
@pytest.mark.parametrize("name", ["rome", "t_patcher", "mend"])
def test_smollm2_capital_of_france_is_lyon(name):
    from lifelong.edit import build_editor
    from lifelong.edit.requests import build_requests
    from lifelong.families.lm import build_lm

    model, tok = build_lm("embedded")
    before = snapshot(model)
    editor = build_editor(name, model, tok)
    if name == "mend":
        start = time.perf_counter()
        editor.prepare(build_requests("train", n=300))
        print(f"mend prepare: {time.perf_counter() - start:.1f} s")
    nll0, _ = edit_scores(model, tok, LYON)
    start = time.perf_counter()
    stats = editor.apply(LYON)
    print(f"{name} edit: {time.perf_counter() - start:.1f} s {stats}")
    nll1, hit = edit_scores(model, tok, LYON)
    assert hit and nll1 < nll0
    editor.reset()
    assert_same_state(model, before)
