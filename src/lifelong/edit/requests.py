"""Edit request sets built reproducibly from real facts (see `facts.py`), and their JSON files.

Subjects are partitioned by a stable hash (never by the seed) into three disjoint parts: `train`
(20% of countries, 50% of cities), `locality` (15% of countries, 10% of cities: the subjects that
locality probes ask about, never edited) and the evaluation part the two evaluated splits draw from:

    train        for editors that learn to edit (MEND); cloze prompts, no filter
    zsre         insertion-style: question prompts ("What is the capital of France?"), no filter,
                 relations interleaved; at least 1000 requests (enough for T = 1000)
    counterfact  cloze prompts ("The capital city of France is"), only facts f_0 already answers right
                 (`filter_known`), ground_truth = the surface form f_0 produces

Each request: target_new = another answer of the same relation (seeded choice; never a correct
variant), >= 2 paraphrases, 2 locality probes (one same relation, one other
relation) about subjects of the `locality` part, in the style of the edits (questions for zsre, cloze
otherwise), and portability probes that follow from the new fact:
    capital:    "<new capital> is the capital of" -> subject; the subject's official alias -> new capital
    currency:   "In <subject's capital>, people pay with the" -> new currency; alias
    language:   "In <subject's capital>, most people speak" -> new language; alias
    continent:  "<subject's capital> is a city in the continent of" -> new continent; alias
    city:       "<city> is a city in a country whose capital is" -> new country's capital; its continent

Why a separate part for locality: probes drawn from the evaluated pool ask, by construction, about
facts edited in the same run (zsre's first ~980 requests hold every evaluated country fact), so an
edit that generalises to its subject's other facts would count as a locality failure. A probe's subject
is never the subject of any request of the split, whatever T.

Locality probes carry the TRUE answer (for counterfact: the form f_0 produces). The token-level
locality metric compares f_T's argmax tokens with f_0's on prompt + answer, so the answer only fixes
the teacher-forced text; the CounterFact neighborhood score uses it as the "old" answer.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
from collections import defaultdict
from dataclasses import asdict
from pathlib import Path

from lifelong.atomic import atomic_write_json
from lifelong.cache import load_cached_json, store_cached_json
from lifelong.data.edit_requests import EditRequest, Probe
from lifelong.edit.facts import (
    RELATIONS,
    Fact,
    answers_of,
    city_facts,
    countries,
    country_facts,
    noun_phrase,
    sentence,
)
from lifelong.errors import DataFormatError
from lifelong.families.lm import lm_fingerprint
from lifelong.metrics.editing import next_token_argmax, score_targets

SPLITS = ("train", "zsre", "counterfact")

# relation -> (prompt, paraphrases); {s} is the subject as a noun phrase
CLOZE = {  # the first prompt of each relation is the one SmolLM2-135M answers most often (measured)
    "capital": ("The capital city of {s} is", ("The capital of {s} is", "{s} has its capital in")),
    "currency": ("The official currency of {s} is the", ("The currency of {s} is the", "In {s}, people pay with the")),
    "language": ("The main language spoken in {s} is", ("The official language of {s} is", "In {s}, most people speak")),
    "continent": ("{s} is a country in the continent of", ("{s} is located in the continent of",
                                                        "The continent where {s} lies is")),
    "city": ("{s} is a city in the country of", ("{s} is located in the country of",
                                                 "The city of {s} lies in the country of")),
}
QUESTION = {
    "capital": ("What is the capital of {s}?", ("Which city is the capital of {s}?", "What city serves as the capital of {s}?")),
    "currency": ("What is the currency of {s}?", ("Which currency is used in {s}?", "What money do people use in {s}?")),
    "language": ("What is the official language of {s}?", ("Which language is official in {s}?",
                                                          "What language do people in {s} speak?")),
    "continent": ("On which continent is {s}?", ("Which continent is {s} located in?", "{s} is part of which continent?")),
    "city": ("In which country is {s}?", ("Which country is {s} located in?", "{s} is a city in which country?")),
}
TRAIN_SHARE = {"country": 20, "city": 50}  # percent of subjects reserved for the train split
LOCALITY_SHARE = {"country": 15, "city": 10}  # percent of subjects whose facts only serve as locality probes


def split_of(fact: Fact) -> str:
    """"train", "locality" or "eval", fixed by a hash of the subject (never by the seed)."""
    kind = "city" if fact.relation == "city" else "country"
    h = int(hashlib.sha256(f"{kind}:{fact.key}".encode()).hexdigest()[:8], 16) % 100
    if h < TRAIN_SHARE[kind]:
        return "train"
    return "locality" if h < TRAIN_SHARE[kind] + LOCALITY_SHARE[kind] else "eval"


def _subject_phrase(fact: Fact) -> str:
    return fact.subject if fact.relation == "city" else countries()[fact.key].phrase


def fact_prompts(fact: Fact, style: str = "cloze") -> tuple[str, tuple[str, ...]]:
    """(prompt, paraphrases) of a fact in "cloze" or "question" style."""
    prompt, paraphrases = (CLOZE if style == "cloze" else QUESTION)[fact.relation]
    s = _subject_phrase(fact)
    return sentence(prompt.format(s=s)), tuple(sentence(p.format(s=s)) for p in paraphrases)


def _portability(fact: Fact, new: str) -> tuple[Probe, ...]:
    table = countries()
    if fact.relation == "city":
        country = next(c for c in table.values() if " " + c.name == new)
        return (Probe(f"{fact.subject} is a city in a country whose capital is", " " + country.capital),
                Probe(f"{fact.subject} is a city in the continent of", " " + country.continent))
    c = table[fact.key]
    probes = []
    if fact.relation == "capital":
        probes.append(Probe(f"{new.strip()} is the capital of", " " + c.phrase))
    elif c.capital != c.name:
        lead = {"currency": "In {cap}, people pay with the", "language": "In {cap}, most people speak",
                "continent": "{cap} is a city in the continent of"}[fact.relation]
        probes.append(Probe(lead.format(cap=c.capital), new))
    if c.alias:
        probes.append(Probe(sentence(CLOZE[fact.relation][1][0].format(s=noun_phrase(c.alias))), new))
    return tuple(probes)


def _locality(fact: Fact, new: str, pool: dict[str, list[Fact]], rng: random.Random,
              style: str = "cloze") -> tuple[Probe, ...]:
    """One probe of the same relation and one of another, from `pool` (the `locality` part: subjects no
    request edits), in `style`, about another subject, answer != new target."""
    probes = []
    others = [r for r in RELATIONS if r != fact.relation and pool.get(r)]
    for relation in (fact.relation, rng.choice(others) if others else fact.relation):
        candidates = pool.get(relation, [])
        for _ in range(50):
            if not candidates:
                break
            other = rng.choice(candidates)
            if other.subject != fact.subject and other.answer != new:
                probes.append(Probe(fact_prompts(other, style)[0], other.answer))
                break
    return tuple(probes)


def make_request(fact: Fact, pool: dict[str, list[Fact]], rng: random.Random, style: str, case_id: str,
                 known_answer: str = "") -> EditRequest:
    """A counterfactual edit of `fact`: a random other answer of its relation becomes the target;
    locality probes from `pool`, in the same `style`."""
    new = rng.choice([a for a in answers_of(fact.relation) if a not in fact.variants])
    prompt, paraphrases = fact_prompts(fact, style)
    return EditRequest(prompt=prompt, target_new=new, subject=fact.subject, ground_truth=known_answer or fact.answer,
                       paraphrases=paraphrases, locality=_locality(fact, new, pool, rng, style),
                       portability=_portability(fact, new), relation=fact.relation, case_id=case_id)


def _by_relation(facts: list[Fact]) -> dict[str, list[Fact]]:
    out = defaultdict(list)
    for f in facts:
        out[f.relation].append(f)
    return dict(out)


def _interleave(facts: list[Fact], rng: random.Random) -> list[Fact]:
    """Relations in turn (each shuffled), so any prefix of the list mixes all relations."""
    groups = [rng.sample(g, len(g)) for _, g in sorted(_by_relation(facts).items())]
    out = []
    for i in range(max(map(len, groups), default=0)):
        out += [g[i] for g in groups if i < len(g)]
    return out


def candidate_facts(split: str, max_cities: int = 4000) -> list[Fact]:
    """The facts a split draws from ("train", "locality", or "zsre"/"counterfact": the evaluation part):
    that part of all country facts and of the `max_cities` most populous cities."""
    part = split if split in ("train", "locality") else "eval"
    return [f for f in country_facts() + city_facts(max_cities) if split_of(f) == part]


def build_requests(split: str, n: int | None = 1000, seed: int = 0, max_cities: int = 4000) -> list[EditRequest]:
    """`n` requests (None: all) of the "train" or "zsre" split, the same for the same arguments."""
    if split not in ("train", "zsre"):
        raise ValueError(f"build_requests: split {split!r}; use 'train' or 'zsre' (counterfact: counterfact_requests)")
    rng = random.Random(f"{split}-{seed}")
    facts = candidate_facts(split, max_cities)
    chosen = _interleave(facts, rng)[:n]
    # train: probes about other train subjects (not evaluated); zsre: about the locality part only
    pool = _by_relation(facts if split == "train" else candidate_facts("locality", max_cities))
    style = "question" if split == "zsre" else "cloze"
    return [make_request(f, pool, rng, style, f"{split}-{i:05d}") for i, f in enumerate(chosen)]


def train_fact_texts(n: int, seed: int = 0) -> list[str]:
    """"prompt + true answer" of the first `n` facts of the `train` split (its request order), each in
    the cloze and the question style: text of the editing domain that no evaluated request or probe
    uses (T-Patcher's memory)."""
    facts = _interleave(candidate_facts("train"), random.Random(f"train-{seed}"))[:n]
    return [fact_prompts(f, style)[0] + f.answer for f in facts for style in ("cloze", "question")]


def filter_known(model, tokenizer, facts: list[Fact], batch_size: int = 32) -> tuple[list[tuple[Fact, str]], dict]:
    """The facts f_0 answers right with greedy decoding after the cloze prompt, each with the
    surface form it produced; and {relation: {"known", "total"}}.

    Greedy decoding emits an answer exactly when every teacher-forced argmax over its tokens is right.
    So: one forward per prompt gives the first predicted token; only variants that start with it are
    teacher-forced in full. The first variant that passes counts."""

    prompts = {f: fact_prompts(f)[0] for f in facts}
    first = dict(zip(prompts.values(), next_token_argmax(model, tokenizer, list(prompts.values()), batch_size)))
    tokens = lambda v: tokenizer(v, add_special_tokens=False)["input_ids"]  # noqa: E731
    pairs = [(prompts[f], v) for f in facts for v in f.variants if tokens(v)[:1] == [first[prompts[f]]]]
    scores = dict(zip(pairs, score_targets(model, tokenizer, [p for p, _ in pairs], [v for _, v in pairs], batch_size)))
    known, report = [], {r: {"known": 0, "total": 0} for r in RELATIONS}
    for f in facts:
        report[f.relation]["total"] += 1
        hit = next((v for v in f.variants if (prompts[f], v) in scores and scores[(prompts[f], v)].exact), None)
        if hit is not None:
            known.append((f, hit))
            report[f.relation]["known"] += 1
    report = {r: c for r, c in report.items() if c["total"]}
    return known, report


def cached_filter_known(model, tokenizer, facts: list[Fact], batch_size: int = 32) -> tuple[list[tuple[Fact, str]], dict]:
    """`filter_known`, stored under cache_dir()/edit/known keyed by the model's content hash and the
    facts: SmolLM2 needs minutes on one CPU core for the full candidate set, then it is a file read."""
    facts_hash = hashlib.sha256(json.dumps([asdict(f) for f in facts]).encode()).hexdigest()[:16]
    key = f"{lm_fingerprint(model)[:16]}-{facts_hash}"
    cached = load_cached_json("edit/known", key)
    try:
        return [(facts[i], answer) for i, answer in cached["known"]], cached["report"]
    except (KeyError, IndexError, TypeError):  # absent or damaged: recompute, never trust
        pass
    known, report = filter_known(model, tokenizer, facts, batch_size)
    index = {f: i for i, f in enumerate(facts)}
    store_cached_json("edit/known", key, {"known": [[index[f], a] for f, a in known], "report": report})
    return known, report


def counterfact_requests(model, tokenizer, seed: int = 0, max_cities: int = 2000, batch_size: int = 32,
                         cache: bool = True) -> tuple[list[EditRequest], dict]:
    """Edits of facts the model knows (CounterFact protocol): (requests, {relation: known/total} of the
    evaluated candidates). Locality probes are facts of the `locality` part the model knows too, with
    the model's own answer forms."""
    candidates = candidate_facts("counterfact", max_cities)
    probe_facts = candidate_facts("locality", max_cities)
    known_all, _ = (cached_filter_known if cache else filter_known)(model, tokenizer, candidates + probe_facts,
                                                                     batch_size)
    answer = {f: a for f, a in known_all}
    evaluated = set(candidates)
    known = [(f, a) for f, a in known_all if f in evaluated]
    report = {r: {"known": 0, "total": 0} for r in RELATIONS}
    for f in candidates:
        report[f.relation]["total"] += 1
    for f, _ in known:
        report[f.relation]["known"] += 1
    report = {r: c for r, c in report.items() if c["total"]}
    rng = random.Random(f"counterfact-{seed}")
    facts = _interleave([f for f, _ in known], rng)
    pool = {r: [Fact(f.relation, f.subject, answer[f], f.variants, f.key) for f in fs]
            for r, fs in _by_relation([f for f, _ in known_all if f not in evaluated]).items()}
    requests = [make_request(f, pool, rng, "cloze", f"counterfact-{i:05d}", known_answer=answer[f])
                for i, f in enumerate(facts)]
    return requests, report


# ----------------------------------------------------------------------------- our JSON format

FORMAT = "lifelong.edit_requests"


def save_requests(path: str | os.PathLike[str], requests: list[EditRequest], meta: dict | None = None) -> Path:
    """Write requests atomically as {"format", "version", "meta", "requests": [EditRequest fields]}."""

    return atomic_write_json(path, {"format": FORMAT, "version": 1, "meta": meta or {},
                                    "requests": [asdict(r) for r in requests]})


def load_requests(path: str | os.PathLike[str]) -> list[EditRequest]:
    """Read a file written by `save_requests`."""
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise DataFormatError(f"{path}: not a readable JSON file ({e})") from e
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        raise DataFormatError(f"{path}: not a lifelong request file (expected \"format\": \"{FORMAT}\"); "
                              "EasyEdit/ROME files are read with read_easyedit_zsre / read_counterfact")
    try:
        return [request_from_dict(r) for r in data["requests"]]
    except (KeyError, TypeError) as e:
        raise DataFormatError(f"{path}: malformed request ({e})") from e


def request_from_dict(d: dict) -> EditRequest:
    probes = lambda key: tuple(Probe(**p) for p in d.get(key, ()))  # noqa: E731
    return EditRequest(prompt=d["prompt"], target_new=d["target_new"], subject=d["subject"],
                       ground_truth=d.get("ground_truth", ""), paraphrases=tuple(d.get("paraphrases", ())),
                       locality=probes("locality"), portability=probes("portability"),
                       relation=d.get("relation", ""), case_id=str(d.get("case_id", "")))
