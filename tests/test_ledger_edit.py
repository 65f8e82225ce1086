"""lm ledgers: knowledge edits recorded as changes, probed, materialized, reverted and exported.

The base is a tiny random Llama saved as a transformers folder (the path a user's own model takes), with
its tied embeddings scaled by 8 as in test_editors_a.py, so that an edit can reach a low NLL.
"""

import dataclasses
import shutil

import pytest
import torch

from lifelong.cli import main
from lifelong.edit import EditRequest, Probe, editor_class
from lifelong.errors import ConfigError, LedgerError
from lifelong.families.lm import build_lm, tiny_lm
from lifelong.ledger.changes import learn, revert
from lifelong.ledger.core import Ledger
from lifelong.ledger.edits import create_lm_ledger, edit
from lifelong.ledger.probes import EDITS_IN_EFFECT, HELDOUT_FACTS

FT_M = dict(layer=2, lr=0.05, norm_constraint=0.5)  # test_editors_a's knobs for the tiny model
LORA = dict(lr=0.02, steps=30)
GRACE = dict(eps=0.05)  # test_editors_a's radius for the tiny Llama
PATCHER = dict(memory_tokens=128, max_steps=10)
WISE = dict(alpha=0.1, beta=2.0, gamma=1.5, n_prefixes=2, steps=40, lr=30.0, norm_constraint=5.0)  # test_editors_a's
EDIT = EditRequest(prompt="The capital of France is", target_new=" Tokyo", subject="France",
                   paraphrases=("The capital city of France is",),
                   locality=(Probe("She said that the weather was nice", ""),))  # answer: the model's own
EDIT2 = EditRequest(prompt="The currency of India is the", target_new=" euro", subject="India")
TEXT = ["The capital of France is Tokyo", "She said that the weather was nice, and they went outside"]


@pytest.fixture(scope="module")
def base_folder(tmp_path_factory):
    model, tok = tiny_lm("llama")
    with torch.no_grad():
        model.get_input_embeddings().weight.mul_(8)
    folder = tmp_path_factory.mktemp("tiny-llama")
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def _empty_ledger(base_folder, tmp_path_factory):
    return create_lm_ledger(tmp_path_factory.mktemp("template") / "ledger", str(base_folder), heldout_items=10).root


@pytest.fixture
def ledger_dir(_empty_ledger, tmp_path):
    """A fresh copy of a new lm ledger of the tiny Llama (creating one scores its held-out facts)."""
    return shutil.copytree(_empty_ledger, tmp_path / "ledger")


def logits(model, tok, texts=TEXT):
    batch = tok(texts, return_tensors="pt", padding=True)
    with torch.no_grad():
        return model(**batch).logits


def test_new_lm_ledger_has_its_probes_scored_on_the_base(ledger_dir):
    ledger = Ledger.open(ledger_dir)
    assert ledger.family == "lm" and ledger.manifest["model"]["family"] == "lm"
    assert [p.name for p in ledger.probes] == [EDITS_IN_EFFECT, HELDOUT_FACTS]
    facts = ledger.probes[1]
    assert len(facts.prompts) == len(facts.answers) == len(facts.base) == 10
    assert ledger.manifest["baseline"] == {HELDOUT_FACTS: 100.0}  # the base agrees with itself
    assert ledger.verify() == []


def test_ft_m_edit_is_one_change_with_its_requests_cost_and_probes(ledger_dir):
    n = edit(ledger_dir, "ft_m", [EDIT], FT_M)
    ledger = Ledger.open(ledger_dir)
    assert n == 1 and len(ledger.changes) == 1
    c = ledger.change(1)
    assert c["kind"] == "edit" and c["method"] == "ft_m" and c["knobs"]["lr"] == 0.05 and c["knobs"]["steps"] == 25
    assert c["requests"][0]["prompt"] == EDIT.prompt and c["requests"][0]["target_new"] == " Tokyo"
    assert c["requests"][0]["locality"][0]["answer"]  # filled with the model's own answer before the edit
    assert c["own_before"]["reliability_token"] < c["own_after"]["reliability_token"] == 1.0
    assert c["own_before"]["locality_token"] == 1.0  # judged against the model before the change
    # and by greedy generation: the edited model now says " Tokyo"; before the edit it did not
    assert c["own_before"]["reliability_gen_contains"] == 0.0 and c["own_after"]["reliability_gen_contains"] == 1.0
    assert c["own_before"]["locality_gen"] == 1.0
    assert set(c["probes_before"]) == set(c["probes_after"]) == {HELDOUT_FACTS}  # no earlier edits yet
    cost = c["cost"]
    assert cost["patch_bytes"] > 0 and cost["peak_rss_mb"] > 0 and cost["edit_seconds"] > 0
    assert cost["trainable_params"] == 64 * 128  # one down_proj (d=64, d_ff=128)
    assert all(k.startswith("delta::") for k in ledger.patch(1))
    assert ledger.verify() == []


def test_a_batch_edit_change_writes_every_request_in_one_update(ledger_dir, monkeypatch):
    cls = editor_class("ft_m")
    calls = []
    real = cls.apply_batch
    monkeypatch.setattr(cls, "apply", lambda self, r: pytest.fail("--batch must not edit one request at a time"))
    monkeypatch.setattr(cls, "apply_batch", lambda self, rs: calls.append(len(rs)) or real(self, rs))
    n = edit(ledger_dir, "ft_m", [EDIT, EDIT2], {**FT_M, "steps": 60}, batch=True)
    c = Ledger.open(ledger_dir).change(n)
    assert calls == [2] and c["data"]["batch"] is True
    assert c["own_after"]["reliability_token"] == 1.0 > c["own_before"]["reliability_token"]
    with pytest.raises(ConfigError, match="grace edits one request at a time; editors with batch editing: .*memit"):
        edit(ledger_dir, "grace", [EDIT], GRACE, batch=True)


def test_materialize_is_the_edited_model_and_revert_gives_f0_back(ledger_dir, base_folder):
    edited, tok = build_lm(str(base_folder))
    f0 = logits(edited, tok)
    f0_params = {k: p.clone() for k, p in edited.state_dict().items()}
    editor = editor_class("ft_m")(edited, tok, editor_class("ft_m").Params(**FT_M))
    editor.apply(EDIT)  # the same edit outside the ledger

    edit(ledger_dir, "ft_m", [EDIT], FT_M)
    ledger = Ledger.open(ledger_dir)
    torch.testing.assert_close(logits(ledger.materialize(), tok), logits(edited, tok), atol=1e-5, rtol=0)
    assert not torch.allclose(logits(ledger.materialize(), tok), f0, atol=1e-3)

    n = revert(ledger_dir, 1)
    ledger = Ledger.open(ledger_dir)
    c = ledger.change(n)
    assert c["kind"] == "revert" and c["strategy"] == "subtract" and c["exact"]
    assert c["own_after"]["reliability_token"] < c["own_before"]["reliability_token"]
    assert c["probes_after"][HELDOUT_FACTS] == 100.0
    reverted = ledger.materialize()
    for k, v in reverted.state_dict().items():
        torch.testing.assert_close(v, f0_params[k], atol=1e-6, rtol=0)
    torch.testing.assert_close(logits(reverted, tok), f0, atol=1e-5, rtol=0)
    assert ledger.verify() == []


def test_edits_in_effect_track_earlier_edits_and_a_revert_under_later_edits_is_not_exact(ledger_dir):
    edit(ledger_dir, "ft_m", [EDIT], FT_M)
    edit(ledger_dir, "ft_m", [EDIT2], FT_M)
    c = Ledger.open(ledger_dir).change(2)
    assert set(c["probes_before"]) == {EDITS_IN_EFFECT, HELDOUT_FACTS}
    assert c["probes_before"][EDITS_IN_EFFECT] == 100.0  # change 1's edit holds before change 2
    n = revert(ledger_dir, 1)
    c = Ledger.open(ledger_dir).change(n)
    assert not c["exact"]  # change 2 was made on top of change 1
    assert set(c["probes_after"]) == {EDITS_IN_EFFECT, HELDOUT_FACTS}  # in effect now: change 2's edit
    with pytest.raises(LedgerError, match="already reverted"):
        revert(ledger_dir, 1)


def test_lora_edit_is_stored_as_factors_and_reverts(ledger_dir, base_folder):
    edited, tok = build_lm(str(base_folder))
    f0 = logits(edited, tok)
    editor = editor_class("lora")(edited, tok, editor_class("lora").Params(**LORA))
    editor.apply(EDIT)

    edit(ledger_dir, "lora", [EDIT], LORA)
    ledger = Ledger.open(ledger_dir)
    kinds = {k.partition("::")[0] for k in ledger.patch(1)}
    assert kinds == {"lora_A", "lora_B", "lora_scale"}
    assert ledger.change(1)["own_after"]["reliability_token"] > ledger.change(1)["own_before"]["reliability_token"]
    # the ledger adds B @ A into W; peft computes W x + B A x: the same up to float rounding
    torch.testing.assert_close(logits(ledger.materialize(), tok), logits(edited, tok), atol=1e-4, rtol=1e-4)
    revert(ledger_dir, 1)
    torch.testing.assert_close(logits(Ledger.open(ledger_dir).materialize(), tok), f0, atol=1e-5, rtol=0)


# the edit prompts alone too: GRACE queries a text at its last token (the prompt's, when a prompt is read)
MODULE_TEXT = [*TEXT, "The currency of India is the euro", EDIT.prompt, EDIT2.prompt]


def own_two_edits(base_folder, method: str, knobs: dict):
    """f_0, then the editor's own model after EDIT and after EDIT2 (what the ledger must reproduce)."""
    own, tok = build_lm(str(base_folder))
    f0 = logits(own, tok, MODULE_TEXT)
    editor = editor_class(method)(own, tok, editor_class(method).Params(**knobs))
    editor.apply(EDIT)
    first = logits(own, tok, MODULE_TEXT)
    editor.apply(EDIT2)
    both = logits(own, tok, MODULE_TEXT)
    assert not torch.equal(first, f0) and not torch.equal(both, first)
    return tok, f0, first, both


def test_grace_edits_accumulate_in_one_codebook_and_revert_to_the_previous_state(ledger_dir, base_folder, tmp_path):
    tok, f0, first, both = own_two_edits(base_folder, "grace", GRACE)  # the same two edits by the editor itself
    assert torch.equal(first[1], f0[1])  # the unrelated sentence: no position falls in a key's ball

    edit(ledger_dir, "grace", [EDIT], GRACE)
    ledger = Ledger.open(ledger_dir)
    c = ledger.change(1)
    assert ledger.patch(1) == {} and c["method_states"] == ["grace"] and c["own_after"]["reliability_token"] == 1.0
    assert c["cost"]["trainable_params"] == sum(t.numel() for t in ledger.method_state("grace").values())
    assert torch.equal(logits(ledger.materialize(), tok, MODULE_TEXT), first)

    edit(ledger_dir, "grace", [EDIT2], GRACE)  # continues change 1's codebook
    ledger = Ledger.open(ledger_dir)
    assert ledger.method_state("grace")["keys"].shape[0] == 2
    assert ledger.change(2)["probes_after"][EDITS_IN_EFFECT] == 100.0  # change 1's edit still holds
    assert torch.equal(logits(ledger.materialize(), tok, MODULE_TEXT), both)
    assert torch.equal(logits(ledger.materialize(upto=1), tok, MODULE_TEXT), first)
    with pytest.raises(LedgerError, match=r"cannot: grace \(change 2\); revert"):
        ledger.export(tmp_path / "out")
    assert not (tmp_path / "out").exists()

    with pytest.raises(LedgerError, match=r"change\(s\) 2 continued from.*revert it first \(2, latest first\), "
                                          "then change 1"):
        revert(ledger_dir, 1)
    n = revert(ledger_dir, 2)
    ledger = Ledger.open(ledger_dir)
    assert ledger.change(n)["exact"] and ledger.change(n)["strategy"] == "restore" and ledger.patch(n) == {}
    assert ledger.change(n)["own_after"]["reliability_token"] < 1.0
    assert torch.equal(logits(ledger.materialize(), tok, MODULE_TEXT), first)  # the first edit only
    revert(ledger_dir, 1)
    model = Ledger.open(ledger_dir).materialize()
    assert torch.equal(logits(model, tok, MODULE_TEXT), f0) and not any(m._forward_hooks for m in model.modules())
    Ledger.open(ledger_dir).export(tmp_path / "out")  # no module in effect: the weights alone
    assert Ledger.open(ledger_dir).verify() == []


def test_t_patcher_edit_round_trips_beside_a_weight_edit(ledger_dir, base_folder, tmp_path):
    request = dataclasses.replace(EDIT, locality=())  # the ledger fills a locality answer, which T-Patcher trains on
    own, tok = build_lm(str(base_folder))  # a T-Patcher edit, then an FT-L edit on top, by the editors themselves
    f0 = logits(own, tok, MODULE_TEXT)
    patcher = editor_class("t_patcher")(own, tok, editor_class("t_patcher").Params(**PATCHER))
    patcher.apply(request)
    patched = logits(own, tok, MODULE_TEXT)
    editor_class("ft_m")(own, tok, editor_class("ft_m").Params(**FT_M)).apply(EDIT2)

    edit(ledger_dir, "t_patcher", [request], PATCHER)
    ledger = Ledger.open(ledger_dir)
    assert ledger.patch(1) == {} and set(ledger.method_state("t_patcher")) == {"layer", "keys", "biases", "values",
                                                                                 "edit_memory"}
    assert torch.equal(logits(ledger.materialize(), tok, MODULE_TEXT), patched)
    edit(ledger_dir, "ft_m", [EDIT2], FT_M)  # recorded with the plain parameter names while the neurons are on
    ledger = Ledger.open(ledger_dir)
    assert all(k.startswith("delta::model.layers.2.") for k in ledger.patch(2))
    torch.testing.assert_close(logits(ledger.materialize(), tok, MODULE_TEXT), logits(own, tok, MODULE_TEXT),
                               atol=1e-5, rtol=0)
    with pytest.raises(LedgerError, match=r"cannot: t_patcher \(change 1\)"):
        ledger.export(tmp_path / "out")

    n = revert(ledger_dir, 1)  # no later t_patcher change: allowed, not exact (change 2 was made on top)
    ledger = Ledger.open(ledger_dir)
    assert not ledger.change(n)["exact"] and ledger.module_states() == {}
    exported, _ = build_lm(str(ledger.export(tmp_path / "out")))  # the weights alone: base + FT-L's patch
    torch.testing.assert_close(logits(exported, tok, MODULE_TEXT), logits(ledger.materialize(), tok, MODULE_TEXT),
                               atol=0, rtol=0)
    assert not torch.equal(logits(exported, tok, MODULE_TEXT), f0)


def test_wise_edits_accumulate_in_one_side_memory_and_revert_to_the_previous_state(ledger_dir, base_folder, tmp_path):
    tok, f0, first, both = own_two_edits(base_folder, "wise", WISE)  # the same two edits by the editor itself

    edit(ledger_dir, "wise", [EDIT], WISE)
    ledger = Ledger.open(ledger_dir)
    c = ledger.change(1)
    assert ledger.patch(1) == {} and c["method_states"] == ["wise"] and c["own_after"]["reliability_token"] == 1.0
    assert c["cost"]["trainable_params"] == sum(t.numel() for t in ledger.method_state("wise").values())
    model = ledger.materialize()
    assert torch.equal(logits(model, tok, MODULE_TEXT), first)  # the edit prompt and the unrelated sentences
    assert [n for n, _ in model.named_parameters()] == [n for n, _ in build_lm(str(base_folder))[0].named_parameters()]

    edit(ledger_dir, "wise", [EDIT2], WISE)  # continues change 1's shard
    ledger = Ledger.open(ledger_dir)
    assert int(ledger.method_state("wise")["edits_in_shard"]) == 2
    assert ledger.change(2)["probes_after"][EDITS_IN_EFFECT] == 100.0  # change 1's edit still holds
    assert torch.equal(logits(ledger.materialize(), tok, MODULE_TEXT), both)
    assert torch.equal(logits(ledger.materialize(upto=1), tok, MODULE_TEXT), first)
    with pytest.raises(LedgerError, match=r"cannot: wise \(change 2\); revert"):
        ledger.export(tmp_path / "out")
    with pytest.raises(LedgerError, match=r"change\(s\) 2 continued from"):
        revert(ledger_dir, 1)
    with pytest.raises(LedgerError, match="wise: the side memory sits at layer 3.*give layer=3.*changes in effect"):
        edit(ledger_dir, "wise", [EDIT2], dict(WISE, layer=0))
    assert len(Ledger.open(ledger_dir).changes) == 2

    n = revert(ledger_dir, 2)
    ledger = Ledger.open(ledger_dir)
    assert ledger.change(n)["exact"] and ledger.change(n)["strategy"] == "restore" and ledger.patch(n) == {}
    assert torch.equal(logits(ledger.materialize(), tok, MODULE_TEXT), first)  # the first edit only
    edit(ledger_dir, "ft_m", [EDIT2], FT_M)  # recorded with the plain parameter names while the side memory is on
    assert all(k.startswith("delta::model.layers.2.") for k in Ledger.open(ledger_dir).patch(n + 1))
    revert(ledger_dir, n + 1)
    revert(ledger_dir, 1)
    model = Ledger.open(ledger_dir).materialize()
    torch.testing.assert_close(logits(model, tok, MODULE_TEXT), f0, atol=1e-5, rtol=0)  # ft_m's: subtracted
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in model.modules())
    assert Ledger.open(ledger_dir).verify() == []


def test_bad_input_fails_clearly_and_records_nothing(ledger_dir, tmp_path, tiny_config, monkeypatch):
    import lifelong.ledger.edits as edits

    with pytest.raises(ConfigError, match="unknown editor 'nope'; available: ft_l, ft_m"):
        edit(ledger_dir, "nope", [EDIT])
    monkeypatch.setattr(edits, "RECORDABLE", ("weights",))  # an editor's kind of record the ledger cannot hold
    with pytest.raises(LedgerError, match="wise records its edits as 'module', which a ledger cannot hold yet; a "
                                          "ledger records: ft_l, ft_m, lora, mend, rome"):
        edit(ledger_dir, "wise", [EDIT])
    monkeypatch.undo()
    with pytest.raises(ConfigError, match="editor wise: "):  # a knob's own check is a user error, not a traceback
        edit(ledger_dir, "wise", [EDIT], {"mask_ratio": 2.0})
    with pytest.raises(ConfigError, match="unknown"):
        edit(ledger_dir, "ft_m", [EDIT], {"lrr": 1.0})
    with pytest.raises(LedgerError, match="ledger of a lm model: it takes `lifelong adapt`, `lifelong edit` changes, not learn changes"):
        learn(ledger_dir, {"kind": "learn"})
    assert Ledger.open(ledger_dir).changes == []

    vlm = Ledger.create(tmp_path / "vlm", tiny_config.model, []).root
    with pytest.raises(LedgerError, match="ledger of a vlm model: it takes `lifelong learn` changes, not edit changes"):
        edit(vlm, "ft_m", [EDIT], FT_M)

    edit(ledger_dir, "ft_m", [EDIT], FT_M)
    with pytest.raises(LedgerError, match="subtracting its patch"):
        revert(ledger_dir, 1, strategy="replay")


def test_cli_init_edit_log_revert_export(base_folder, tmp_path, capsys):
    root, out = tmp_path / "led", tmp_path / "exported"
    assert main(["init", str(root), "--family", "lm", "--model", str(base_folder), "--probe-items", "5"]) == 0
    assert "held-out facts" in capsys.readouterr().out
    knobs = [f"{k}={v}" for k, v in FT_M.items()]
    assert main(["edit", "--ledger", str(root), "--method", "ft_m", "--prompt", EDIT.prompt, "--target", "Tokyo",
                 "--paraphrase", EDIT.paraphrases[0], *knobs]) == 0
    shown = capsys.readouterr().out
    assert "change 1: edit ft_m on 'The capital of France is' -> 'Tokyo'" in shown
    assert "reliability_token" in shown and "held-out facts" in shown
    assert main(["log", str(root), "--matrix"]) == 0
    shown = capsys.readouterr().out
    assert "lm model" in shown and "edit" in shown and "token-level accuracy" in shown
    assert main(["export", str(root), str(out)]) == 0
    exported, tok = build_lm(str(out))
    torch.testing.assert_close(logits(exported, tok), logits(Ledger.open(root).materialize(), tok), atol=0, rtol=0)
    assert main(["revert", str(root), "1"]) == 0
    assert "revert of change 1 (subtract)" in capsys.readouterr().out

    assert main(["edit", "--ledger", str(root), "--model", "embedded", "--prompt", "a b", "--target", "c"]) == 2
    assert main(["edit", "--ledger", str(root), "--prompt", "a b", "--target", "c", "stepz=3"]) == 2  # default wise
    assert "unknown" in capsys.readouterr().err
    assert main(["init", str(tmp_path / "l2"), "--family", "lm", "--probe", "mnist"]) == 2
    assert len(Ledger.open(root).changes) == 2


def test_a_ledger_that_recorded_ft_l_before_the_rename_still_opens_logs_and_reverts(ledger_dir, base_folder):
    """Ledgers written before FT-M and FT-L were told apart name FT-M's edits "ft_l" (issue 19): a weight
    patch needs no editor to load, so they open, materialize, log and revert as they did."""
    import json

    edit(ledger_dir, "ft_m", [EDIT], FT_M)
    manifest = ledger_dir / "ledger.json"
    raw = json.loads(manifest.read_text())
    raw["changes"][0]["method"] = raw["changes"][0]["label"] = "ft_l"  # as the old code wrote it
    manifest.write_text(json.dumps(raw))
    ledger = Ledger.open(ledger_dir)
    assert ledger.change(1)["method"] == "ft_l" and ledger.verify() == []
    edited, tok = build_lm(str(base_folder))
    f0 = logits(edited, tok)
    editor_class("ft_m")(edited, tok, editor_class("ft_m").Params(**FT_M)).apply(EDIT)
    torch.testing.assert_close(logits(ledger.materialize(), tok), logits(edited, tok), atol=1e-5, rtol=0)
    from lifelong.ledger.views import format_change, format_log

    assert "ft_l" in format_log(ledger) and "ft_l" in format_change(ledger, 1)
    revert(ledger_dir, 1)
    torch.testing.assert_close(logits(Ledger.open(ledger_dir).materialize(), tok), f0, atol=1e-5, rtol=0)
