"""lm ledgers: instruction-tuning adapters recorded as `adapt` changes (ledger/adapters.py), their probes,
reverts and peft export; `lifelong chat`.

The bases are tiny random Llama and GPT-2 models saved as transformers folders, with their tied embeddings
scaled by 8 as in test_ledger_edit.py (sharper logits: the adapters and edits reach a low loss in a few
steps). The task is rt-sentiment on a handful of items: the tiny byte-level tokenizer spells "positive" in six
tokens, and 30 steps do not teach a random 64-wide model to answer with the word (its accuracy stays 0), so
the tests check that the loss falls and that the held-out answers' NLL falls, and that the accuracy the change
records is the one its materialized model gives.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from PIL import Image

from lifelong.cli import main
from lifelong.data.edit_requests import EditRequest
from lifelong.families.lm import target_batch, target_nll, tiny_lm
from lifelong.ledger.adapters import FACTORS, adapt, export_peft
from lifelong.ledger.changes import revert
from lifelong.ledger.core import Ledger
from lifelong.ledger.edits import create_lm_ledger, edit
from lifelong.ledger.probes import EDITS_IN_EFFECT, HELDOUT_FACTS
from lifelong.metrics.instructions import evaluate_task

TASK = "rt-sentiment"
RUN = dict(steps=30, batch_size=4, items=4, eval_items=4)
LR = {"llama-adapter": 0.2, "lora": 0.05, "prefix": 0.2}
FT_M = dict(layer=2, lr=0.05, norm_constraint=0.5)  # test_ledger_edit's knobs for the tiny model
EDIT = EditRequest(prompt="The capital of France is", target_new=" Tokyo", subject="France")
TEXT = ["Is this movie review positive or negative? A quiet, lovely film", "The capital of France is Paris"]
FIXTURE = Path(__file__).parent / "fixtures" / "ledger_cd3c0e9"  # a vlm ledger


def base_folder(tmp_path_factory, arch: str) -> Path:
    model, tok = tiny_lm(arch)
    with torch.no_grad():
        model.get_input_embeddings().weight.mul_(8)
    folder = tmp_path_factory.mktemp(f"tiny-{arch}")
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    return {arch: base_folder(tmp_path_factory, arch) for arch in ("llama", "gpt2")}


@pytest.fixture(scope="module")
def _empty(folders, tmp_path_factory):
    return {arch: create_lm_ledger(tmp_path_factory.mktemp(f"template-{arch}") / "ledger", str(folder),
                                   heldout_items=5).root for arch, folder in folders.items()}


@pytest.fixture
def ledgers(_empty, tmp_path):
    """Fresh copies of new lm ledgers of the tiny Llama and GPT-2 ("llama", "gpt2" -> its folder)."""
    return {arch: shutil.copytree(root, tmp_path / arch) for arch, root in _empty.items()}


def logits(model, tok, texts=TEXT):
    batch = tok(texts, return_tensors="pt", padding=True)
    with torch.no_grad():
        return model(**batch).logits


def heldout_nll(model, tok, ledger: Ledger, probe: str) -> float:
    """Teacher-forced NLL of the reference answers of the probe's held-out items."""
    from lifelong.data.instructions import prompt_text, target_text

    task = next(p for p in ledger.probes if p.name == probe).instruction_task()
    batch = target_batch(tok, [prompt_text(e) for e in task.test], [target_text(e, tok) for e in task.test])
    with torch.no_grad():
        return target_nll(model, batch).item()


def run_adapt(root, method, **kw):
    return adapt(root, TASK, method, lr=LR[method], **{**RUN, **kw})


@pytest.mark.parametrize("method", ["llama-adapter", "lora", "prefix"])
def test_adapt_change_records_its_task_score_probes_and_cost(ledgers, method):
    root = ledgers["llama"]
    base, tok = Ledger.open(root).materialize_with_tokenizer()
    n = run_adapt(root, method)
    ledger = Ledger.open(root)
    c = ledger.change(n)
    assert n == 1 and c["kind"] == "adapt" and c["method"] == method
    assert c["knobs"]["spec"]["kind"] == method and c["knobs"]["settings"]["steps"] == 30
    assert c["knobs"]["settings"]["lr"] == LR[method] and c["knobs"]["settings"]["chat"] is False  # no template
    assert c["data"] == {"task": TASK, "items": 4, "probe": TASK, "eval_items": 4}
    assert c["loss_last"] < c["loss_first"] - 2.0, (c["loss_first"], c["loss_last"])
    # the task's held-out items became a probe, scored before and after the change
    probe = ledger.probes[-1]
    assert probe.name == TASK and probe.kind == "instructions" and probe.origin == "change 1"
    assert set(c["probes_before"]) == set(c["probes_after"]) == {HELDOUT_FACTS, TASK}
    assert c["own_before"]["metric"] == "accuracy" and c["own_before"]["n"] == 4
    assert c["own_after"]["score"] * 100 == c["probes_after"][TASK]
    after = ledger.materialize()
    assert evaluate_task(after, tok, probe.instruction_task())["score"] == c["own_after"]["score"]  # the recorded model
    # what it learned reaches held-out items: their reference answers got likelier
    assert heldout_nll(after, tok, ledger, TASK) < heldout_nll(base, tok, ledger, TASK) - 1.0
    cost = c["cost"]
    assert cost["train_seconds"] > 0 and cost["peak_rss_mb"] > 0 and cost["trainable_params"] > 0
    assert cost["adapter_bytes"] >= 4 * cost["trainable_params"]
    assert ledger.verify() == []


def test_llama_adapter_is_reattached_on_materialize_and_revert_is_bit_identical(ledgers):
    root = ledgers["llama"]
    ledger = Ledger.open(root)
    model, tok = ledger.materialize_with_tokenizer()
    before = logits(model, tok)
    run_adapt(root, "llama-adapter")
    ledger = Ledger.open(root)
    assert ledger.patch(1) == {} and ledger.module_states() == {"llama-adapter": 1}
    adapted = logits(ledger.materialize(), tok)
    assert (adapted - before).abs().max() > 1e-3  # materialize re-attaches the adapter
    with pytest.raises(Exception, match="llama-adapter \\(change 1\\)"):
        ledger.export(root.parent / "plain")  # a transformers folder cannot hold it

    n = revert(root, 1)
    ledger = Ledger.open(root)
    c = ledger.change(n)
    assert c["kind"] == "revert" and c["strategy"] == "restore" and c["exact"]
    assert c["own_before"]["score"] * 100 == c["probes_before"][TASK]
    assert torch.equal(logits(ledger.materialize(), tok), before)  # the base was never written
    assert ledger.module_states() == {}
    ledger.export(root.parent / "plain")


def test_lora_change_is_a_dense_weight_patch_and_its_revert_restores_the_logits(tmp_path):
    # the unscaled tiny Llama (logits of order 1, as a real model's; the scaled one's are 8 times larger, and
    # so is the float rounding a subtracted patch leaves), LoRA at its default lr
    root = create_lm_ledger(tmp_path / "ledger", "tiny-llama", heldout_items=2).root
    model, tok = Ledger.open(root).materialize_with_tokenizer()
    before = logits(model, tok)
    adapt(root, TASK, "lora", **RUN)
    ledger = Ledger.open(root)
    patch = ledger.patch(1)
    assert sorted(k.split("::")[0] for k in patch) == ["delta"] * 8  # q_proj and v_proj of 4 layers
    assert all(k.endswith(("q_proj.weight", "v_proj.weight")) for k in patch)
    assert ledger.module_states() == {} and ledger.change(1)["method_states"] == [FACTORS]
    assert (logits(ledger.materialize(), tok) - before).abs().max() > 1e-3
    revert(root, 1)
    torch.testing.assert_close(logits(Ledger.open(root).materialize(), tok), before, atol=1e-6, rtol=0)


def test_probes_cross_edits_and_adapters_and_a_second_llama_adapter_continues_the_first(ledgers):
    root = ledgers["llama"]
    edit(root, "ft_m", [EDIT], FT_M)
    run_adapt(root, "llama-adapter")
    ledger = Ledger.open(root)
    assert EDITS_IN_EFFECT in ledger.change(2)["probes_after"]  # do earlier edits survive instruction tuning?
    # a later edit, on the model with the adapter attached: its probes include the task's
    edit(root, "lora", [EDIT], dict(lr=0.02, steps=10, target_modules=["q_proj", "v_proj"]))  # also inside the adapter
    c = Ledger.open(root).change(3)
    assert TASK in c["probes_before"] and TASK in c["probes_after"]
    run_adapt(root, "llama-adapter", steps=5)
    ledger = Ledger.open(root)
    c = ledger.change(4)
    assert c["adapter"]["continues"] == 2 and c["knobs"]["spec"] == ledger.change(2)["knobs"]["spec"]
    assert ledger.module_states() == {"llama-adapter": 4}
    assert [p.name for p in ledger.probes].count(TASK) == 1  # the same task keeps its probe
    with pytest.raises(Exception, match="revert it first"):
        revert(root, 2)
    n = revert(root, 4)  # change 2's adapter back in effect
    ledger = Ledger.open(root)
    model, tok = ledger.materialize_with_tokenizer()
    assert torch.equal(logits(model, tok), logits(ledger.materialize(upto=3), tok))
    assert ledger.change(n)["probes_after"][TASK] == ledger.change(3)["probes_after"][TASK]


@pytest.mark.parametrize("arch,method", [("llama", "lora"), ("llama", "llama-adapter"), ("gpt2", "lora"),
                                         ("llama", "prefix"), ("gpt2", "prefix")])
def test_peft_export_loads_back_to_the_ledgers_model(ledgers, tmp_path, arch, method):
    from peft import PeftModel

    root = ledgers[arch]
    run_adapt(root, method)
    ledger = Ledger.open(root)
    out, n = export_peft(root, tmp_path / "peft")
    assert n == 1 and {"adapter_config.json", "adapter_model.safetensors", "lifelong.json"} <= {
        p.name for p in out.iterdir()}
    meta = json.loads((out / "lifelong.json").read_text())
    assert meta["change"] == 1 and meta["trained_on_sha256"] == ledger.manifest["base"]["sha256"]
    model, tok = ledger.materialize_with_tokenizer()
    loaded = PeftModel.from_pretrained(ledger.materialize(upto=0), str(out))  # the model before the change
    torch.testing.assert_close(logits(loaded, tok), logits(model, tok), atol=1e-5, rtol=0)


def test_peft_export_of_a_gpt2_llama_adapter_is_refused(ledgers, tmp_path, capsys):
    run_adapt(ledgers["gpt2"], "llama-adapter", steps=2)
    assert main(["export", str(ledgers["gpt2"]), "--peft", str(tmp_path / "peft")]) == 2
    assert "LLaMA-Adapter on gpt2 is this project's own code" in capsys.readouterr().err
    assert not (tmp_path / "peft").exists()


def snapshot(root: Path) -> dict:
    return {p.relative_to(root): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.mark.parametrize("args,message", [
    (["--task", "imdb"], "unknown instruction task 'imdb'; the tasks: bbc-headlines, bbc-topic, rt-sentiment, "
                         "country-facts"),
    (["--task", TASK, "--method", "ia3"], "unknown adapter method 'ia3'; a ledger records: llama-adapter, lora, prefix"),
    (["--task", TASK, "--steps", "0"], "--steps must be >= 1, got 0"),
])
def test_cli_adapt_refuses_bad_input_writing_nothing(ledgers, capsys, args, message):
    root = ledgers["llama"]
    files = snapshot(root)
    assert main(["adapt", str(root), *args]) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1
    assert snapshot(root) == files


def test_cli_adapt_refuses_a_ledger_of_another_family(tmp_path, capsys):
    root = shutil.copytree(FIXTURE, tmp_path / "vlm")
    files = snapshot(root)
    assert main(["adapt", str(root), "--task", TASK]) == 2
    err = capsys.readouterr().err
    assert "a ledger of a vlm model" in err and "not adapt changes; those need a ledger of lm" in err
    assert err.count("\n") == 1 and snapshot(root) == files


def test_cli_adapt_and_chat_with_the_ledger_and_its_peft_adapter(ledgers, folders, tmp_path, capsys):
    root = ledgers["llama"]
    assert main(["adapt", str(root), "--task", TASK, "--method", "lora", "--steps", "2", "--items", "4",
                 "--eval-items", "2"]) == 0
    out = capsys.readouterr().out
    assert "change 1: adapt lora on rt-sentiment" in out and "accuracy on 2 held-out items" in out
    assert main(["export", str(root), "--peft", str(tmp_path / "peft")]) == 0
    assert "exported the adapter of change 1" in capsys.readouterr().out
    assert main(["chat", "--ledger", str(root), "--max-new-tokens", "3", "Is it positive?"]) == 0
    through_ledger = capsys.readouterr().out
    assert main(["chat", "--model", str(folders["llama"]), "--adapter", str(tmp_path / "peft"),
                 "--max-new-tokens", "3", "Is it positive?"]) == 0
    assert capsys.readouterr().out == through_ledger  # the same model, merged or through peft
    # built for another base model: refused, naming both
    assert main(["chat", "--model", str(folders["gpt2"]), "--adapter", str(tmp_path / "peft"), "hi"]) == 2
    err = capsys.readouterr().err
    assert "built for another base model" in err and str(folders["llama"]) in err and str(folders["gpt2"]) in err


def test_chat_truncates_a_long_prompt_from_the_left_with_a_warning(capsys):
    long = "The capital of France is Paris. " * 80  # ~500 tokens; the tiny model reads 256
    assert main(["chat", "--model", "tiny-llama", "--max-new-tokens", "4", long]) == 0
    captured = capsys.readouterr()
    assert "warning: 1 prompt(s) longer than the model's context (256 tokens" in captured.err
    assert "cut from the left to their last 252 tokens" in captured.err
    assert captured.out.strip() or captured.out == "\n"  # an answer (possibly blank), not a crash


@pytest.mark.parametrize("method,context", [("lora", 256), ("prefix", 246)])  # a prefix takes 10 positions
def test_adapter_training_cuts_long_prompts_with_a_warning(ledgers, method, context):
    messages = []
    adapt(ledgers["gpt2"], "bbc-topic", method, steps=1, batch_size=2, items=2, eval_items=1, warn=messages.append)
    assert any(f"longer than the model's context ({context} tokens): each keeps its last tokens" in m for m in messages)


def test_chat_image_without_a_vision_module_is_refused_saying_why(tmp_path, capsys):
    text = tmp_path / "notes.png"
    text.write_text("not an image")
    assert main(["chat", "--model", "tiny-llama", "--image", str(text), "what is this?"]) == 2
    assert "is not an image" in capsys.readouterr().err
    picture = tmp_path / "cat.png"
    Image.new("RGB", (8, 8)).save(picture)
    assert main(["chat", "--model", "tiny-llama", "--image", str(picture), "what is this?"]) == 2
    err = capsys.readouterr().err
    assert "a PNG image of 8x8" in err and "seeing needs a vision module: --adapter FILE" in err


def test_export_peft_needs_an_adapt_change(ledgers, tmp_path, capsys):
    root = ledgers["llama"]
    assert main(["export", str(root), "--peft", str(tmp_path / "p")]) == 2
    assert "no adapt change in effect" in capsys.readouterr().err
    edit(root, "ft_m", [EDIT], FT_M)
    assert main(["export", str(root), "--peft", str(tmp_path / "p"), "--change", "1"]) == 2
    assert "change 1 is an edit change, not an adapt change" in capsys.readouterr().err
    assert not (tmp_path / "p").exists()


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_a_prefix_is_a_module_reattached_on_materialize_continued_and_reverted_bit_identically(ledgers, arch):
    root = ledgers[arch]
    model, tok = Ledger.open(root).materialize_with_tokenizer()
    before = logits(model, tok)
    run_adapt(root, "prefix")
    ledger = Ledger.open(root)
    c = ledger.change(1)
    assert ledger.patch(1) == {} and ledger.module_states() == {"prefix": 1} and c["adapter"]["records"] == "module"
    assert list(ledger.state_of(1, "prefix")) == ["prompt_embeddings"]
    adapted = logits(ledger.materialize(), tok)
    assert (adapted - before).abs().max() > 1e-3  # materialize puts the prefix back
    # the recorded score is the materialized model's (the prefix survives generate's cache)
    probe = ledger.probes[-1]
    assert evaluate_task(ledger.materialize(), tok, probe.instruction_task())["score"] == c["own_after"]["score"]
    with pytest.raises(Exception, match="prefix \\(change 1\\)"):
        ledger.export(root.parent / "plain")
    run_adapt(root, "prefix", steps=5)  # continues the first
    ledger = Ledger.open(root)
    assert ledger.change(2)["adapter"]["continues"] == 1 and ledger.module_states() == {"prefix": 2}
    revert(root, 2)
    assert torch.equal(logits(Ledger.open(root).materialize(), tok), adapted)  # change 1's prefix back
    revert(root, 1)
    ledger = Ledger.open(root)
    assert torch.equal(logits(ledger.materialize(), tok), before) and ledger.module_states() == {}


def test_one_module_adapter_at_a_time(ledgers):
    root = ledgers["llama"]
    run_adapt(root, "prefix", steps=2)
    files = snapshot(root)
    with pytest.raises(Exception, match="cannot go on a model that holds a prefix \\(change 1\\)"):
        run_adapt(root, "llama-adapter", steps=2)
    assert snapshot(root) == files
    run_adapt(root, "lora", steps=2)  # a LoRA folds into the weights: it goes on a prefixed model
    assert Ledger.open(root).module_states() == {"prefix": 1}
