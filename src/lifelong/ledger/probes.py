"""Probe suites: what a ledger measures after every change.

A probe is one labelled test set and a score on it. For the `vlm` family the score is top-1 accuracy
(%) among the test set's own class names (task-incremental, as MTIL), so a probe of a dataset the
model never trained on measures its zero-shot ability, and the probe a `learn` change adds for its
own task measures what the change learned. Every change runs every probe registered so far; the
ledger keeps the scores before and after, which makes the interference matrix (change x probe).

For the `lm` family a probe is a `FactProbe`, scored in % with EasyEdit's token-level metrics
(`metrics/editing.py`, `score_requests`), or with an instruction task's own metric:
    edits in effect   reliability_token over every request of every edit change in effect (not
                      reverted) other than the change being recorded or reverted: whether old edits
                      survive it (absent while there are none)
    held-out facts    locality_token of `n` cloze prompts of the `locality` part of the facts, each with the base
                      model's greedy answer: the fraction of answer tokens whose argmax (teacher-forced)
                      is still the base model's, i.e. what the base model said that the edits left alone
                      (an edit of one of these very facts counts here as a loss of locality)
    an instruction    kind "instructions", registered by the first `adapt` change on a task (data/instructions.py):
    task, e.g.        its metric (accuracy, exact match or ROUGE-L, metrics/instructions.py) x 100 on a fixed
    bbc-topic         seeded subset of `test_items` items of its held-out test split, greedy answers: whether
                      a learned skill survives later edits, and each later adapter's effect on it
"""

from __future__ import annotations

import dataclasses
import json
import random
from dataclasses import asdict, dataclass, field
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import save

from lifelong.atomic import atomic_write_bytes
from lifelong.data import captioned
from lifelong.data.base import ImageDataset
from lifelong.data.edit_requests import EditRequest
from lifelong.data.edit_requests import Probe as TextProbe
from lifelong.data.instructions import InstructionTask
from lifelong.data.instructions import load_task as load_instruction_task
from lifelong.data.sources import load_source
from lifelong.edit.requests import candidate_facts, fact_prompts
from lifelong.loop import count_correct, stem_outputs
from lifelong.metrics.editing import (
    base_predictions,
    generate,
    probe_key,
    score_requests,
)
from lifelong.metrics.instructions import evaluate_task
from lifelong.metrics.judge import (
    frechet_distance,
    judge_features,
    load_judge,
    predicted_concepts,
)
from lifelong.metrics.nsfw import NUDITY_PROMPTS, load_nsfw_classifier, nsfw_rate

# The held-out zero-shot suite a new ledger gets when `lifelong init` names no probe: the test sets of
# the five mtil-mini sources, as that stream uses them.
DEFAULT_PROBES = (
    {"source": "fashion-mnist", "options": {"invert": True}},
    {"source": "mnist", "options": {"invert": True}},
    {"source": "lfw", "options": {}},
    {"source": "glyphs", "options": {"invert": True}},
    {"source": "digits", "options": {"invert": True}},
)


@dataclass(frozen=True)
class Probe:
    """One test set: `load_source(source, "test", max_items=test_items, seed=seed, **options)`."""

    name: str
    source: str
    options: dict = field(default_factory=dict)
    test_items: int | None = 500
    seed: int = 0
    origin: str = "init"  # "init", or the change that registered it ("change 3")

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, raw: dict) -> Probe:
        return cls(**raw)

    def same_data(self, other: Probe) -> bool:
        return (self.source, self.options, self.test_items, self.seed) == (other.source, other.options, other.test_items, other.seed)

    def dataset(self) -> ImageDataset:
        return _load_test_set(self.source, json.dumps(self.options, sort_keys=True), self.test_items, self.seed)


@lru_cache(maxsize=32)
def _load_test_set(source: str, options_json: str, test_items: int | None, seed: int) -> ImageDataset:
    return load_source(source, "test", max_items=test_items, seed=seed, **json.loads(options_json))


def unique_name(name: str, taken: set[str]) -> str:
    """`name`, or `name-2`, `name-3`, ... when a probe of that name exists."""
    if name not in taken:
        return name
    k = 2
    while f"{name}-{k}" in taken:
        k += 1
    return f"{name}-{k}"


@torch.no_grad()
def run_probes(model, probes: list[Probe], batch_size: int = 256) -> dict[str, float]:
    """Top-1 accuracy (%) of `model` on every probe, each among its own classes."""

    scores = {}
    for probe in probes:
        data = probe.dataset()
        inputs = stem_outputs(model, data, batch_size)  # from the disk cache after the first time
        correct = count_correct(model, inputs, torch.as_tensor(data.labels), data.class_names, batch_size)
        scores[probe.name] = 100.0 * correct / len(data)
    return scores


# ----------------------------------------------------------------------------- lm ledgers

EDITS_IN_EFFECT = "edits in effect"
HELDOUT_FACTS = "held-out facts"
ANSWER_TOKENS = 3  # greedy tokens of the base model's answer to a held-out prompt


@dataclass(frozen=True)
class FactProbe:
    """A probe of an lm ledger. kind "edits": the ledger's edit requests in effect (no data of its own).
    kind "facts": `prompts` with the base model's greedy `answers` and its argmax tokens on each
    prompt + answer (`base`), against which later models are scored. kind "instructions": the first
    `test_items` items of the instruction task `task`'s test split shuffled by `seed`, prompted through the
    chat template when `chat`, scored by the task's metric."""

    name: str
    kind: str  # "edits", "facts" or "instructions"
    prompts: tuple[str, ...] = ()
    answers: tuple[str, ...] = ()
    base: tuple[tuple[int, ...], ...] = ()
    seed: int = 0
    origin: str = "init"
    task: str = ""  # instructions: the task's name (data.instructions.TASKS)
    test_items: int = 0
    chat: bool = False

    def same_data(self, other: FactProbe) -> bool:
        return (self.kind, self.task, self.test_items, self.seed, self.chat, self.prompts) == \
            (other.kind, other.task, other.test_items, other.seed, other.chat, other.prompts)

    def instruction_task(self) -> InstructionTask:
        """kind "instructions": the task with the probe's test items (and no training items)."""
        return _instruction_test(self.task, self.test_items, self.seed)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, raw: dict) -> FactProbe:
        raw = dict(raw)
        for key in ("prompts", "answers"):
            raw[key] = tuple(raw.get(key, ()))
        raw["base"] = tuple(tuple(t) for t in raw.get("base", ()))
        return cls(**raw)

    def requests(self) -> list:
        """The held-out prompts as requests whose locality probe is the prompt and its base answer."""

        return [EditRequest(prompt=p, target_new=a, subject="", locality=(TextProbe(p, a),))
                for p, a in zip(self.prompts, self.answers)]


@lru_cache(maxsize=8)
def _instruction_test(task: str, test_items: int, seed: int) -> InstructionTask:
    return load_instruction_task(task, max_train=0, max_test=test_items, seed=seed)


def instruction_probe(name: str, task: str, test_items: int, chat: bool, origin: str, seed: int = 0) -> FactProbe:
    """The probe of an instruction task's held-out items that an `adapt` change registers."""
    return FactProbe(name=name, kind="instructions", task=task, test_items=test_items, chat=chat, seed=seed,
                     origin=origin)


def heldout_facts_probe(model, tokenizer, n: int = 50, seed: int = 0) -> FactProbe:
    """`n` cloze prompts drawn (seeded) from the `locality` part of the facts (subjects that no request of
    the train, zsre or counterfact splits edits, kept for locality probes), with the base model's greedy
    answers (`ANSWER_TOKENS` tokens; prompts it answers with nothing are skipped). A ledger stores the
    prompts it drew, so ledgers created before this choice keep theirs."""

    facts = candidate_facts("locality", max_cities=2000)
    pool = [fact_prompts(f)[0] for f in random.Random(f"heldout-{seed}").sample(facts, len(facts))]
    kept, start = [], 0
    while len(kept) < n and start < len(pool):
        prompts = pool[start : start + n - len(kept)]
        start += len(prompts)
        answers = generate(model, tokenizer, prompts, max_new_tokens=ANSWER_TOKENS)
        kept += [(p, a) for p, a in zip(prompts, answers) if a.strip()]
    probe = FactProbe(name=HELDOUT_FACTS, kind="facts", prompts=tuple(p for p, _ in kept),
                      answers=tuple(a for _, a in kept), seed=seed)
    base = base_predictions(model, tokenizer, probe.requests())
    return dataclasses.replace(probe, base=tuple(tuple(base[key]) for key in _keys(probe)))


def lm_probes(model, tokenizer, heldout_items: int = 50, seed: int = 0) -> list[FactProbe]:
    """The suite a new lm ledger gets: the edits in effect, and held-out facts of its base model."""
    return [FactProbe(name=EDITS_IN_EFFECT, kind="edits"), heldout_facts_probe(model, tokenizer, heldout_items, seed)]


@torch.no_grad()
def run_fact_probes(model, tokenizer, probes: list[FactProbe], edits: list) -> dict[str, float]:
    """Every probe's score (%) on `model`; `edits` are the requests in effect ("edits in effect" is left
    out when there are none)."""

    scores = {}
    for probe in probes:
        if probe.kind == "edits" and edits:  # reliability only: the prompts with their new targets
            bare = [dataclasses.replace(r, paraphrases=(), locality=(), portability=(), ground_truth="") for r in edits]
            scores[probe.name] = 100.0 * score_requests(model, tokenizer, bare, None)["reliability_token"]
        elif probe.kind == "facts":
            base = {key: list(tokens) for key, tokens in zip(_keys(probe), probe.base)}
            scores[probe.name] = 100.0 * score_requests(model, tokenizer, probe.requests(), base)["locality_token"]
        elif probe.kind == "instructions":
            scores[probe.name] = 100.0 * evaluate_task(model, tokenizer, probe.instruction_task(), chat=probe.chat)["score"]
    return scores


def without_locality(requests: list) -> list:
    """The requests without locality probes (those need the predictions of the model before the edit)."""
    return [dataclasses.replace(r, locality=()) for r in requests]


def _keys(probe: FactProbe) -> list[str]:

    return [probe_key(p, a) for p, a in zip(probe.prompts, probe.answers)]


# ----------------------------------------------------------------------------- diffusion ledgers

# The concepts a new diffusion ledger probes when `lifelong init` names none: every kind, and the close
# objects (sneaker, sandal, ankle boot) that an erasure of one of them must keep.
DEFAULT_CONCEPTS = ("object/sneaker", "object/sandal", "object/ankle boot", "object/dress", "object/bag", "digit/3",
                    "digit/7", "letter/A/calligraphic/black", "letter/R/serif/red", "clipart/flower",
                    "clipart/house", "clipart/fruit")
JUDGE_FD = "judge-FD"
NSFW = "nsfw"  # the probe name (and `--probe` value) of the NSFW probe
REAL_PER_CONCEPT = 200  # real test images per concept behind the judge-FD probe


@dataclass(frozen=True)
class ConceptProbe:
    """A probe of a diffusion ledger.

    kind "concept": one image per prompt in `prompts` (DDIM, `steps`, the model's default guidance, all
    noise drawn from `seed`), scored by the judge (lifelong.metrics.judge): the % of images in which it sees
    the concept in `targets` (the concept each prompt names). The same seed every time, so two models'
    scores differ only by their weights.
    kind "frechet": the judge-FD (FID-style Frechet distance on the judge's penultimate features, not
    Inception-FID) between the images of every concept probe and up to REAL_PER_CONCEPT real test images of
    each of their concepts: how far the generated distribution is from the real one (lower is closer).
    kind "nsfw": one image per prompt as for "concept", scored by the open_nsfw classifier (metrics/nsfw.py):
    the % it calls NSFW. For erasing nudity from a Stable Diffusion model (`lifelong init --probe nsfw`,
    `lifelong erase --concept nudity --nsfw`); its samples are never kept for the report."""

    name: str
    kind: str  # "concept", "frechet" or "nsfw"
    prompts: tuple[str, ...] = ()
    targets: tuple[str, ...] = ()
    seed: int = 0
    steps: int = 25
    origin: str = "init"

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, raw: dict) -> ConceptProbe:
        return cls(**{**raw, "prompts": tuple(raw.get("prompts", ())), "targets": tuple(raw.get("targets", ()))})


def concept_probe(name: str, concepts, n: int = 16, seed: int = 0, steps: int = 25, origin: str = "init") -> ConceptProbe:
    """A probe of `n` images of the concepts called `concepts` (round robin), each from one of that
    concept's training captions (cycled)."""
    by_name = {c.name: c for c in captioned.all_concepts()}
    unknown = [c for c in concepts if c not in by_name]
    if unknown:
        raise ValueError(f"{', '.join(map(repr, unknown))}: not concepts the judge knows (e.g. "
                         f"{', '.join(DEFAULT_CONCEPTS[:4])}; `lifelong.data.captioned.all_concepts()` lists them)")
    captions = {c: captioned.train_captions(by_name[c]) for c in concepts}
    targets = [concepts[i % len(concepts)] for i in range(n)]
    prompts = [captions[t][(i // len(concepts)) % len(captions[t])] for i, t in enumerate(targets)]
    return ConceptProbe(name=name, kind="concept", prompts=tuple(prompts), targets=tuple(targets), seed=seed,
                        steps=steps, origin=origin)


def nsfw_probe(name: str = NSFW, prompts: tuple[str, ...] = NUDITY_PROMPTS, n: int = 16, seed: int = 0,
               steps: int = 25, origin: str = "init") -> ConceptProbe:
    """A probe of `n` images of `prompts` (cycled) scored by the NSFW classifier."""
    return ConceptProbe(name=name, kind="nsfw", prompts=tuple(prompts[i % len(prompts)] for i in range(n)), seed=seed,
                        steps=steps, origin=origin)


def concept_probes(concepts=DEFAULT_CONCEPTS, n: int = 16, seed: int = 0, steps: int = 25) -> list[ConceptProbe]:
    """A probe per concept (named by it), then the judge-FD over all of them; the name `nsfw` is the NSFW probe."""
    names = list(dict.fromkeys(concepts))
    probes = [concept_probe(name, (name,), n, seed, steps) for name in names if name != NSFW]
    judged = [ConceptProbe(name=JUDGE_FD, kind="frechet", seed=seed)] if probes else []
    return probes + judged + ([nsfw_probe(n=n, seed=seed, steps=steps)] if NSFW in names else [])


def concept_probe_images(model, probe: ConceptProbe, batch_size: int = 64):
    """The probe's seeded samples from `model`: uint8 (len(prompts), H, W, 3)."""
    return model.sample(list(probe.prompts), n=1, seed=probe.seed, steps=probe.steps, batch_size=batch_size)


@torch.no_grad()
def run_concept_probes(model, probes: list[ConceptProbe], judge=None, keep: Path | None = None) -> dict[str, float]:
    """Every probe's score on the text-to-image `model`: judge rates (%) and the judge-FD. With `keep`, the first
    SAMPLES_KEPT images of each concept probe are also written there (`save_probe_samples`), for the report."""
    judge = judge if judge is not None else load_judge()
    scores, images, targets = {}, [], []
    for probe in (p for p in probes if p.kind == "concept"):
        generated = concept_probe_images(model, probe)
        seen = predicted_concepts(judge, generated)
        scores[probe.name] = 100.0 * float(np.mean([s == t for s, t in zip(seen, probe.targets)]))
        images.append(generated)
        targets += probe.targets
    if keep is not None:
        concept = [p for p in probes if p.kind == "concept"]
        save_probe_samples(keep, {p.name: im[:SAMPLES_KEPT] for p, im in zip(concept, images)})
    nsfw = [p for p in probes if p.kind == "nsfw"]
    if nsfw:
        classifier = load_nsfw_classifier()
        for probe in nsfw:
            scores[probe.name] = nsfw_rate(concept_probe_images(model, probe), classifier)
    for probe in (p for p in probes if p.kind == "frechet"):
        if images:
            real, _ = captioned.concept_images(list(dict.fromkeys(targets)), "test", per_concept=REAL_PER_CONCEPT,
                                               seed=probe.seed)
            scores[probe.name] = frechet_distance(judge_features(judge, real), judge_features(judge, np.concatenate(images)))
    return scores


SAMPLES_KEPT = 8  # images of each concept probe a diffusion ledger keeps per state, for its report


def samples_path(root: Path, n: int | None) -> Path:
    """Where a diffusion ledger keeps the probe samples of the base (`n` None) or of the model after change n: a
    view for the report, derived from the recorded history (the seeds make them again), not part of it."""
    return Path(root) / "samples" / ("base.safetensors" if n is None else f"change_{n:04d}.safetensors")


def save_probe_samples(path: Path, samples: dict[str, np.ndarray]) -> None:
    """{probe name: uint8 (N, H, W, 3)} as one safetensors file (written atomically)."""
    tensors = {f"probe_{i}": torch.from_numpy(np.ascontiguousarray(im)) for i, im in enumerate(samples.values())}
    metadata = {"probes": json.dumps(list(samples))}
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(path, save(tensors, metadata))


def load_probe_samples(path: Path) -> dict[str, np.ndarray]:
    """What `save_probe_samples` wrote ({} when there is no such file: a ledger made before samples were kept)."""
    if not Path(path).is_file():
        return {}
    with safe_open(str(path), framework="pt") as f:
        names = json.loads(f.metadata()["probes"])
        return {name: f.get_tensor(f"probe_{i}").numpy() for i, name in enumerate(names)}


# The probe classes by a family's `probe_kind`: what a ledger of that family registers and runs.
PROBE_KINDS = {"images": Probe, "facts": FactProbe, "images-generated": ConceptProbe}
