"""The editing protocols, the T-sweep benchmark and the `lifelong edit` / `bench edit` commands, on a tiny LM."""

import json

import pytest
import torch

from lifelong.cli import main
from lifelong.edit import build_editor
from lifelong.edit.bench import load_bench_config, read_requests_file, run_bench
from lifelong.edit.protocol import lifelong, single
from lifelong.edit.requests import build_requests, save_requests
from lifelong.errors import ConfigError, DataFormatError
from lifelong.families.lm import tiny_lm
from lifelong.metrics.editing import cached_base_predictions

# tiny Llama keys have norm ~0.15 and other prompts lie >= 0.18 away (tests/test_editors_a.py); locality
# probes that are questions of the edit's own template lie closer (0.05 caught one): a radius of 0.03
# catches only the edited prompt. GRACE's value replaces the prompt's last position, so on
# multi-token targets it fixes the first target token: reliability rises, it does not reach 1.
GRACE = {"eps": 0.03, "steps": 40}


def snapshot(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


def assert_same(model, before):
    after = model.state_dict()
    assert after.keys() == before.keys()
    for k in before:
        assert torch.equal(after[k], before[k]), k


@pytest.fixture
def tiny():
    return tiny_lm("llama", seed=0)


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory):
    model, tokenizer = tiny_lm("llama", seed=0)
    folder = tmp_path_factory.mktemp("tiny-lm")
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def test_single_edits_roll_back_to_f0_and_report_costs(tiny):
    model, tokenizer = tiny
    requests = build_requests("zsre", n=3)
    base = cached_base_predictions(model, tokenizer, requests)
    from lifelong.metrics.editing import score_requests

    unedited = score_requests(model, tokenizer, requests, base)
    before = snapshot(model)
    edited = single(build_editor("grace", model, tokenizer, GRACE), model, tokenizer, requests, base)
    assert_same(model, before)  # every edit was rolled back
    assert edited["n_requests"] == 3 and edited["seconds_per_edit"] > 0 and edited["peak_rss_mb"] > 0
    assert edited["reliability_token"] > unedited["reliability_token"] + 0.1  # each edit holds (its first token)
    assert edited["locality_token"] == 1.0  # GRACE: probes outside the key's ball are untouched


def test_lifelong_judges_every_edit_on_the_final_model(tiny):
    model, tokenizer = tiny
    requests = build_requests("zsre", n=4)
    base = cached_base_predictions(model, tokenizer, requests)
    from lifelong.metrics.editing import score_requests

    unedited = score_requests(model, tokenizer, requests, base)
    before = snapshot(model)
    row = lifelong(build_editor("grace", model, tokenizer, GRACE), model, tokenizer, requests, base, with_fluency=False)
    assert row["T"] == 4 and row["n_requests"] == 4 and row["protocol"] == "lifelong"
    assert row["reliability_token"] > unedited["reliability_token"] + 0.1
    assert row["locality_token"] == 1.0
    assert_same(model, before)  # reset after the sweep point


def test_bench_writes_the_sweep_and_skips_what_exceeds_the_budget(tmp_path, tiny_folder):
    config = load_bench_config(None, [f"model={tiny_folder}", "methods=[grace, ft_m]", "T=[1, 3]", "single_n=2",
                                      f"output_dir={tmp_path}", "name=sweep", "knobs={grace: {eps: 0.05, steps: 40}}"])
    out = run_bench(config)
    results = json.loads((out / "results.json").read_text())
    assert set(results["methods"]) == {"unedited", "grace", "ft_m"}  # f_0's pre-edit rows first
    for rows in results["methods"].values():
        assert [r["T"] for r in rows["lifelong"]] == [1, 3]
        assert rows["single"]["n_requests"] == 2
        assert all("reliability_token" in r and "reliability_cf" in r and "seconds_per_edit" in r for r in rows["lifelong"])
        assert all("reliability_gen_exact" in r and "reliability_gen_contains" in r and r["locality_gen"] is not None
                   for r in rows["lifelong"])  # evaluation by generation beside the teacher-forced metrics
    pre = results["methods"]["unedited"]["lifelong"][1]
    assert pre["protocol"] == "pre-edit" and pre["locality_token"] == 1.0 and pre["locality_gen"] == 1.0
    assert "| grace | lifelong | 3 |" in (out / "summary.md").read_text()
    assert "| unedited | pre-edit | 3 |" in (out / "summary.md").read_text()
    assert (out / "metrics_vs_T.png").stat().st_size > 0

    tight = load_bench_config(None, [f"model={tiny_folder}", "methods=[grace]", "T=[1, 1000]", "single_n=1",
                                     f"output_dir={tmp_path}", "name=tight", "time_budget_s=1e-6"])
    rows = json.loads((run_bench(tight) / "results.json").read_text())["methods"]["grace"]
    assert rows["lifelong"] == [] and [s["T"] for s in rows["skipped"]] == [1, 1000]
    assert "time_budget_s" in rows["skipped"][0]["why"]


def test_bench_batch_protocol_rows_per_B(tmp_path, tiny_folder):
    """batch_sizes: each batch editor writes the first B requests in one update from f_0 and is scored on
    all B (a row per B, f_0 left as it was); an editor without batch editing says so; f_0 has a pre-edit
    row for every B; a rerun reuses the measured rows."""
    memit = {"layers": [0, 1], "cov_tokens": 512, "prefix_lengths": [2], "prefixes_per_length": 1, "v_steps": 3}
    overrides = [f"model={tiny_folder}", "methods=[ft_m, memit, grace]", "T=[1]", "single_n=0", "batch_sizes=[2, 3]",
                 f"output_dir={tmp_path}", "name=batch", "generation=false",
                 "knobs={grace: {eps: 0.03, steps: 5}, ft_m: {steps: 3}, memit: " + json.dumps(memit) + "}"]
    out = run_bench(load_bench_config(None, overrides))
    results = json.loads((out / "results.json").read_text())
    for method in ("ft_m", "memit"):
        rows = results["methods"][method]["batch"]
        assert [(r["protocol"], r["T"]) for r in rows] == [("batch", 2), ("batch", 3)]
        assert all(r["seconds_per_edit"] == pytest.approx(r["edit_seconds_total"] / r["T"]) for r in rows)
        assert all(0 <= r["reliability_token"] <= 1 and r["locality_token"] is not None for r in rows)
    grace = results["methods"]["grace"]
    assert grace["batch"] == [] and "no batch editing" in grace["skipped"][0]["why"]
    assert [r["T"] for r in results["methods"]["unedited"]["lifelong"]] == [1, 2, 3]
    table = (out / "summary.md").read_text()
    assert "| memit | batch | 3 |" in table and "| grace | batch | B | skipped" in table
    with pytest.raises(ConfigError, match="batch_sizes must list positive"):
        load_bench_config(None, ["batch_sizes=[0]"])


def test_batch_protocol_leaves_f0(tiny):
    from lifelong.edit.protocol import batch

    model, tok = tiny
    requests = build_requests("zsre", n=3)
    base = cached_base_predictions(model, tok, requests)
    before = snapshot(model)
    editor = build_editor("ft_m", model, tok, {"layer": 2, "lr": 0.05, "steps": 3})
    row = batch(editor, model, tok, requests, base, with_fluency=False)
    assert row["protocol"] == "batch" and row["T"] == 3 and row["n_requests"] == 3
    assert_same(model, before)


def test_bench_config_errors_name_the_fix():
    with pytest.raises(ConfigError, match="not an editor; valid: ft_l"):
        load_bench_config(None, ["methods=[kn]"])
    with pytest.raises(ConfigError, match=r"knobs\.grace\.epsilon.*eps"):
        load_bench_config(None, ["methods=[grace]", "knobs={grace: {epsilon: 1}}"])
    with pytest.raises(ConfigError, match="split='wiki'"):
        load_bench_config(None, ["split=wiki"])
    with pytest.raises(ConfigError, match="knobs for mnd, which is not an editor"):
        load_bench_config(None, ["methods=[grace]", "knobs={mnd: {train_steps: 1}}"])


def test_the_shipped_config_pins_one_mend_training_and_still_runs_one_method():
    from pathlib import Path

    from lifelong.edit.bench import EditBenchConfig

    path = Path(__file__).resolve().parent.parent / "configs" / "edit_bench.yaml"
    shipped = load_bench_config(path)
    assert shipped.knobs["mend"]["train_steps"] == 100 and "ft_l" in shipped.methods and "ft_m" in shipped.methods
    assert set(EditBenchConfig().methods) == set(shipped.methods)
    assert load_bench_config(path, ["methods=[grace]"]).methods == ("grace",)


def test_request_files_in_three_formats(tmp_path):
    ours = tmp_path / "ours.json"
    save_requests(ours, build_requests("zsre", n=2))
    assert len(read_requests_file(ours)) == 2
    zsre = tmp_path / "zsre.json"
    zsre.write_text(json.dumps([{"subject": "Watts Humphrey", "src": "What university did Watts Humphrey attend?",
                                 "pred": "Trinity College", "rephrase": "What university did Watts Humphrey take part in?",
                                 "alt": "University of Michigan", "answers": ["Illinois Institute of Technology"],
                                 "loc": "nq question: who played desmond doss father in hacksaw ridge",
                                 "loc_ans": "Hugo Weaving", "cond": "Trinity College >> University of Michigan || What university did Watts Humphrey attend?"}]))
    (r,) = read_requests_file(zsre)
    assert r.target_new.strip() == "University of Michigan" and r.paraphrases
    cf = tmp_path / "cf.json"
    cf.write_text(json.dumps([{"case_id": 0, "requested_rewrite": {"prompt": "The mother tongue of {} is", "subject": "Danielle Darrieux",
                               "target_new": {"str": "English"}, "target_true": {"str": "French"}},
                               "paraphrase_prompts": ["Danielle Darrieux, a native speaker of"],
                               "neighborhood_prompts": ["The mother tongue of Léon Blum is"]}]))
    (r,) = read_requests_file(cf)
    assert r.prompt == "The mother tongue of Danielle Darrieux is" and r.ground_truth.strip() == "French"
    bad = tmp_path / "bad.json"
    bad.write_text("[{\"question\": 1}]")
    with pytest.raises(DataFormatError, match="neither a lifelong request file"):
        read_requests_file(bad)


def test_edit_command_shows_before_and_after(tiny_folder, capsys):
    code = main(["edit", "--model", str(tiny_folder), "--method", "grace", "--prompt", "The capital of France is",
                 "--target", "Lyon", "--locality", "The capital of Spain is", "eps=0.05", "steps=40"])
    out = capsys.readouterr().out
    assert code == 0
    assert "before:" in out and "after:" in out and "locality_token 1.00" in out
    before = [line.split("before:")[1].strip() for line in out.splitlines() if "before:" in line]
    after = [line.split("after:")[1].strip() for line in out.splitlines() if "after:" in line]
    assert after[0] != before[0] and after[1] == before[1]  # the edit prompt changed, the locality prompt did not


def test_edit_command_bad_input_exits_2(tiny_folder, capsys):
    assert main(["edit", "--model", str(tiny_folder), "--prompt", "The capital of France is"]) == 2
    assert "--target" in capsys.readouterr().err
    assert main(["edit", "--model", str(tiny_folder), "--method", "grace", "--prompt", "x is", "--target", "y", "radius=3"]) == 2
    assert "eps" in capsys.readouterr().err
    assert main(["bench", "edit", "--methods", "kn"]) == 2


def test_edits_past_the_budget_stop_and_leave_f0(tiny):
    from lifelong.edit.protocol import OverBudget

    model, tokenizer = tiny
    requests = build_requests("zsre", n=3)
    base = cached_base_predictions(model, tokenizer, requests)
    before = snapshot(model)
    with pytest.raises(OverBudget) as e:
        lifelong(build_editor("grace", model, tokenizer, GRACE), model, tokenizer, requests, base, budget_s=0.0)
    assert e.value.done == 1 and "per edit" in str(e.value)
    assert_same(model, before)


def test_a_rerun_continues_the_sweep(tmp_path, tiny_folder, capsys):
    common = [f"model={tiny_folder}", "methods=[grace]", "single_n=1", f"output_dir={tmp_path}", "name=resume",
              "knobs={grace: {eps: 0.05, steps: 40}}"]
    run_bench(load_bench_config(None, common + ["T=[1]"]))
    first = json.loads((tmp_path / "resume" / "results.json").read_text())["methods"]["grace"]
    capsys.readouterr()
    run_bench(load_bench_config(None, common + ["T=[1, 2]"]))
    assert "T=1 (earlier run)" in capsys.readouterr().out
    second = json.loads((tmp_path / "resume" / "results.json").read_text())["methods"]["grace"]
    assert second["lifelong"][0] == first["lifelong"][0] and [r["T"] for r in second["lifelong"]] == [1, 2]


def test_edit_command_prepares_a_learned_editor(tiny_folder, capsys):
    """MEND trains on the `train` split by default (it used to get no training requests and fail)."""
    code = main(["edit", "--model", str(tiny_folder), "--method", "mend", "--prompt", "The capital of France is",
                 "--target", "Lyon", "train_steps=2"])
    assert code == 0 and "mend: 1 edit(s)" in capsys.readouterr().out
