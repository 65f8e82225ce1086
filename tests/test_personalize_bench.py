"""`lifelong bench personalize` on the tiny pipeline: rows with every metric, resumed without recomputing, the
merged rows of each merge, bad configs one message. How faithful the real embedded model becomes is what the
bench itself measures."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
import torch

from lifelong.data import captioned
from lifelong.errors import ConfigError
from lifelong.families.diffusion import tiny_embedded
from lifelong.metrics.personalization import mean_pairwise_cosine
from lifelong.personalize.bench import (
    SUBJECTS,
    Measure,
    Taught,
    load_bench_config,
    merged_model,
    real_images,
    run_bench,
)
from lifelong.personalize.custom_diffusion import text_features

TINY = ["model=tiny-embedded", "n=2", "steps=2", "n_images=4", "subjects=[gothic, bug]", "merge_k=[2]",
        "knobs.ti.steps=2", "knobs.custom-diffusion={steps: 2, reg_images: 2, ddim_steps: 2}",
        "knobs.mix-of-show.steps=2"]


def test_the_bench_writes_every_metric_resumes_and_merges(tmp_path, capsys):
    config = load_bench_config(None, [f"output_dir={tmp_path}", *TINY, "methods=[ti, custom-diffusion]",
                                      "merges=[custom-diffusion, lora-add, mix-of-show]"])
    out = run_bench(config)
    rows = json.loads((out / "results.json").read_text())["rows"]
    singles = {f"{m}|{s}" for m in ("ti", "custom-diffusion", "mix-of-show") for s in ("gothic", "bug")}
    merges = {f"{m}-merge|k=2" for m in ("custom-diffusion", "lora-add", "mix-of-show")}
    assert {"base|gothic", "base|bug"} | singles | merges == set(rows)  # mix-of-show alone: what its merges drop from
    for key in singles:
        row = rows[key]
        assert set(row["subject_fidelity"]) == {"judge", "probe_judge", "judge_rate"}
        assert set(row["subject_fidelity_base"]) == set(row["subject_fidelity"]) and set(row["real_vs_real"]) == {
            "judge", "probe_judge"}
        assert {"class_rate", "subject_rate", "judge_fd_to_base"} == set(row["prior"])
        assert row["cost"]["train_seconds"] > 0 and row["cost"]["trainable_params"] > 0
        assert row["cost"]["patch_bytes"] > 0 and np.isfinite(row["cost"]["peak_rss_mb"])
        assert all(-1 <= v <= 1 for k, v in row["subject_fidelity"].items() if k != "judge_rate")
    assert rows["base|gothic"]["prior"]["judge_fd_floor"] > 0 and "judge-FD floor" in (out / "summary.md").read_text()
    assert set(rows["ti|gothic"]["prompt_fidelity"]) == {"rate", "what", "style", "ink"}  # the letter's heads too
    assert set(rows["ti|bug"]["prompt_fidelity"]) == {"rate", "what"}
    assert rows["ti|gothic"]["prompt"] == "a <vkt> letter" and rows["mix-of-show|bug"]["prompt"] == "a <bzw1> <bzw2>"
    d = 8  # the tiny text encoder's width: Textual Inversion's patch is its one row, fp32
    assert rows["ti|gothic"]["cost"]["patch_bytes"] == 4 * d
    assert rows["custom-diffusion|gothic"]["cost"]["patch_bytes"] == 4 * (
        sum(m.weight.numel() for m in tiny_embedded().cross_attention_kv().values()) + d)
    for key in merges:
        row = rows[key]
        assert row["subjects"] == ["gothic", "bug"] and set(row["concepts"]) == {"gothic", "bug"}
        for name, c in row["concepts"].items():
            alone = rows[f"{row['method']}|{name}"]
            assert c["alone"]["subject_fidelity"] == alone["subject_fidelity"]
            assert c["drop"]["judge"] == pytest.approx(alone["subject_fidelity"]["judge"]
                                                       - c["merged"]["subject_fidelity"]["judge"])
            assert set(c["drop"]) == {"judge", "probe_judge", "judge_rate", "prompt_rate"}
    fusion = rows["mix-of-show-merge|k=2"]["stats"]  # gradient fusion's own output errors: fused below the naive sum
    assert fusion["unet_error_fused"] < fusion["unet_error_sum"]
    summary = (out / "summary.md").read_text()
    assert "| ti | gothic |" in summary and "| mix-of-show | mix-of-show | 2 | bug |" in summary
    assert (out / "report.html").is_file()

    capsys.readouterr()
    run_bench(config)  # every row done: nothing is recomputed (the rows would differ in their timings)
    assert json.loads((out / "results.json").read_text())["rows"] == rows
    trained = capsys.readouterr()
    assert "step" not in trained.err and "fidelity" not in trained.out and "mean drop" not in trained.out  # no training
    (out / "concepts" / "custom-diffusion__bug.safetensors").unlink()
    del rows["custom-diffusion-merge|k=2"]
    floor = rows["base|bug"]["prior"].pop("judge_fd_floor")  # a bench from before the floor: it is added, same seeds
    results = json.loads((out / "results.json").read_text())
    results["rows"] = rows
    (out / "results.json").write_text(json.dumps(results))
    run_bench(config)  # the merge row again; its concept retaught from the same seed, the single row kept
    again = json.loads((out / "results.json").read_text())["rows"]
    trained = capsys.readouterr()
    assert trained.err.count("Custom Diffusion of <bzw>:   0%") == 1 and "<vkt>" not in trained.err
    assert again["custom-diffusion|bug"] == rows["custom-diffusion|bug"]
    assert again["base|bug"]["prior"]["judge_fd_floor"] == pytest.approx(floor)
    assert set(again) == set(rows) | {"custom-diffusion-merge|k=2"}


def test_each_merge_holds_every_concepts_tokens_and_moves_what_its_math_says():
    """On made-up concepts that moved the K/V: lora-add is W_0 + the mean delta; custom-diffusion maps a concept's
    own prompt features through the merged K/V as its own K/V does (exactly for one concept; for two, whose 10
    prompt rows overdetermine the tiny model's 8-wide K/V and share 4 positions with conflicting targets, in least
    squares: closer than lora-add's mean);
    mix-of-show fuses closer than the naive sum."""
    base = tiny_embedded()
    kv = {f"unet.{n}.weight": m.weight.detach() for n, m in base.cross_attention_kv().items()}
    g = torch.Generator().manual_seed(0)
    concepts = [Taught([t], torch.randn(1, 8, generator=g), {n: 0.1 * torch.randn(w.shape, generator=g)
                                                              for n, w in kv.items()}, f"a {t} bug")
                for t in ("<c1>", "<c2>")]
    lora_add, _ = merged_model(base, concepts, "lora-add")
    mean = dict(lora_add.named_parameters())
    assert all(torch.allclose(mean[n], w + (concepts[0].deltas[n] + concepts[1].deltas[n]) / 2) for n, w in kv.items())
    assert all(torch.equal(lora_add.token_embeddings().weight[lora_add.token_ids(c.tokens[0])[0]], c.rows[0])
               for c in concepts)

    def error(model, weights, c):  # || C_c W^T - C_c W_c^T ||^2 over the K/V, C_c: the concept prompt's features
        x = text_features(model, [c.prompt])
        weights = {n: w.detach() for n, w in weights.items()}
        return sum(float((x @ (weights[n] - w - c.deltas[n]).T).norm() ** 2) for n, w in kv.items())

    one, _ = merged_model(base, concepts[:1], "custom-diffusion")
    assert error(one, dict(one.named_parameters()), concepts[0]) < 1e-6
    two, _ = merged_model(base, concepts, "custom-diffusion")
    merged = dict(two.named_parameters())
    assert sum(error(two, merged, c) for c in concepts) < 0.9 * sum(error(two, mean, c) for c in concepts)
    _, stats = merged_model(base, concepts, "mix-of-show")
    assert stats["cross_kv_error_fused"] < stats["cross_kv_error_sum"]


def test_mean_pairwise_cosine():
    a = np.array([[1.0, 0.0], [0.0, 1.0]])
    assert mean_pairwise_cosine(a, a) == pytest.approx(0.5)
    assert mean_pairwise_cosine(a, 3 * a[:1]) == pytest.approx(0.5)
    assert mean_pairwise_cosine(a[:1], -a[:1]) == pytest.approx(-1.0)


@pytest.mark.parametrize("override, message", [
    ("methods=[ti, textual-inversion]", "unknown personalization method 'textual-inversion'"),
    ("subjects=[gothic, dog]", "subjects: unknown subject(s) dog; choose from gothic, bug"),
    ("merge_subjects=[gothic, cat]", "merge_subjects: unknown subject(s) cat"),
    ("merges=[ties]", "merges: unknown ties"),
    ("merge_k=[5]", "merge_k: [5]"),
    ("knobs.ti.stepz=3", "stepz"),
    ("colour=red", "unknown config key colour"),
])
def test_a_bad_config_fails_with_one_message(tmp_path, capsys, override, message):
    with pytest.raises(ConfigError) as e:
        load_bench_config(None, [override])
    assert message in str(e.value)
    from lifelong.cli import main

    assert main(["bench", "personalize", f"output_dir={tmp_path}", override]) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("error:") == 1, err
    assert not any(tmp_path.iterdir())  # nothing written


def test_the_quick_config_and_the_default_one():
    quick = load_bench_config(None, [], quick=True)
    assert quick.name == "personalize-bench-quick" and quick.methods == ("ti", "custom-diffusion")
    assert quick.merges == ("custom-diffusion",) and quick.n < load_bench_config(None, []).n
    assert set(SUBJECTS) >= set(load_bench_config(None, []).merge_subjects)


class Painter:
    """A stand-in for a model that draws what a letter prompt asks for from real test renders in `style`."""

    def __init__(self, style: str):
        self.style = style

    def sample(self, prompts, n=1, seed=0, steps=25, batch_size=64):
        letters = [p.split()[2] if p.startswith("the letter ") else "A" for p in prompts]
        images, _ = captioned.concept_images([f"letter/{x}/{self.style}/black" for x in dict.fromkeys(letters)], "test",
                                             per_concept=1)
        by_letter = dict(zip(dict.fromkeys(letters), images))
        return np.stack([by_letter[x] for x in letters])


def test_the_measures_see_the_subject_in_its_real_images_and_not_elsewhere():
    measure = Measure(load_bench_config(None, ["n=16"]))
    gothic, bug = SUBJECTS["gothic"], SUBJECTS["bug"]
    own = measure.fidelity(real_images(gothic, "train", 16), gothic)
    other = measure.fidelity(real_images(bug, "train", 16), gothic)
    assert own["judge_rate"] > 80 and other["judge_rate"] == 0
    assert own["judge"] > other["judge"] + 0.1 and own["probe_judge"] > other["probe_judge"] + 0.1
    right = measure.composed(Painter("gothic"), gothic, "<vkt>", "<vkt> letter")
    wrong = measure.composed(Painter("serif"), gothic, "<vkt>", "<vkt> letter")
    assert right["rate"] > 75 and min(right["what"], right["style"], right["ink"]) > 75
    assert wrong["rate"] < 10 and wrong["style"] < 10 and wrong["what"] > 75
    prior, _ = measure.prior(Painter("gothic"), gothic)  # the subject leaking into every "a letter"
    assert prior["class_rate"] == 100 and prior["subject_rate"] > 75
    prior, _ = measure.prior(Painter("serif"), gothic)
    assert prior["class_rate"] == 100 and prior["subject_rate"] < 10


def _user_folder(tmp_path, n=5):
    """n real gothic renders as PNG files of another size: a user's own folder."""
    from PIL import Image

    folder = tmp_path / "my-letters"
    folder.mkdir()
    for i, image in enumerate(real_images(SUBJECTS["gothic"], "test", n)[:n]):
        Image.fromarray(image).resize((48, 48)).save(folder / f"{i:02d}.png")
    (folder / "notes.txt").write_text("not an image")
    return folder


def test_a_users_own_folder_is_a_subject_with_fidelity_and_no_judge_rates(tmp_path, capsys):
    from lifelong.cli import main

    folder = _user_folder(tmp_path)
    out = tmp_path / "runs"
    assert main(["bench", "personalize", f"output_dir={out}", *TINY, "subjects=[bug]", "methods=[ti]", "merges=[]",
                 "--images", str(folder), "--token", "<my-style>", "--class", "letter"]) == 0
    results = json.loads((out / "personalize-bench" / "results.json").read_text())
    assert results["settings"]["subjects"] == ["bug", "user"] and len(results["settings"]["user_images_sha256"]) == 64
    row = results["rows"]["ti|user"]
    assert row["prompt"] == "a <my-style> letter"
    assert row["subject_fidelity"]["judge_rate"] is None and row["prompt_fidelity"] == {"rate": None}
    assert -1 <= row["subject_fidelity"]["judge"] <= 1 and -1 <= row["real_vs_real"]["probe_judge"] <= 1
    assert row["prior"]["class_rate"] is not None and row["prior"]["subject_rate"] is None  # "letter": judged
    assert "| ti | user |" in (out / "personalize-bench" / "summary.md").read_text()
    held_out = real_images(load_bench_config(None, [f"user_images={folder}"]).subjects_by_name()["user"], "test")
    assert len(held_out) == 1  # every fourth of the 5 readable images; the text file skipped


@pytest.mark.parametrize("files, message", [(2, "at least 4 images"), (None, "no such folder")])
def test_a_user_folder_it_cannot_use_fails_with_one_message(tmp_path, capsys, files, message):
    from lifelong.cli import main

    folder = _user_folder(tmp_path, files) if files else tmp_path / "missing"
    assert main(["bench", "personalize", f"output_dir={tmp_path / 'runs'}", "--images", str(folder)]) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("error:") == 1, err
    assert not (tmp_path / "runs").exists()


def test_rows_of_an_older_bench_are_kept_when_only_unused_new_fields_or_the_selection_changed():
    from lifelong.config import same_settings
    from lifelong.personalize.bench import SELECTION, PersonalizeBenchConfig

    current = json.loads(json.dumps(dataclasses.asdict(PersonalizeBenchConfig())))
    older = {k: v for k, v in current.items() if not k.startswith("user_")}
    assert same_settings(older, current, PersonalizeBenchConfig())
    assert not same_settings(older, {**current, "user_images": "x"}, PersonalizeBenchConfig())
    assert not same_settings({**older, "n": 4}, current, PersonalizeBenchConfig()) and not same_settings(
        None, current, PersonalizeBenchConfig())
    fewer = {**older, "methods": ["ti"], "subjects": ["bug"]}
    assert same_settings(fewer, current, PersonalizeBenchConfig(), ignore=SELECTION)
    assert not same_settings(fewer, current, PersonalizeBenchConfig())
