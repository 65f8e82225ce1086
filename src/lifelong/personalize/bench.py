"""`lifelong bench personalize`: every personalization method on the same held-out subjects, judged independently.

The subjects are real images the model never saw (`SUBJECTS`, from lifelong.data.captioned's held-out pools):
"gothic", a type style (URW Gothic capitals A B C E in black ink; "gothic-red" and "gothic-blue" the same in
red and blue), and "bug", a clip-art category (openclipart bugs). Each is taught from `n_images` images of its
train split; its test split is the held-out real images. "user" is a user's own folder (`user_images`, `--images
DIR`; `user_token`, `user_class`): every fourth image (by name) is held out as its test split, the rest teach it;
the judge does not know it, so its rows have the two fidelity scores and, where the class word names concepts the
judge knows ("letter", "bug"), the class rate, but no judge rate of the subject and no prompt fidelity.

For each method and subject a fresh copy of the model is personalized (`seed`), then measured with seeded samples
(`n` per prompt set, `steps` of the model's default sampler, ancestral):

    subject fidelity   samples of the subject's prompt ("a <token> letter"; Mix-of-Show "a <tok1> <tok2>") against
                       its held-out real images: the mean pairwise cosine of the judge's features (the DINO-style
                       score) and of the embedded EfficientNet's (metrics/probe_judge.py, the CLIP-I-style score),
                       metrics/personalization.py; and the judge's rate of the subject (the style and ink, any
                       letter; or "bug"). Beside them: the base model's values for the class prompt ("a letter") and
                       real train vs real test images (the ceiling).
    prompt fidelity    the subject composed with what the judge can check: for a type style, other letters in it
                       ("the letter K in <token> type": letter, style and ink all right, and each head alone); for
                       the bug, the judge's rate of "bug" in clip-art phrasings it was not taught with ("a cartoon
                       of a <token> drawing", "a simple sketch of ..."): whether the identifier carries the subject
                       into other prompts, not an attribute. Beside it: the base model on the same prompts with the
                       plain word ("the letter K in gothic type": what the model does without personalization).
    prior preservation the class prompt without the identifier ("a letter", "a drawing"): the judge's rate of the
                       class (any letter; any clip-art), the rate of the subject leaking into it (language drift),
                       and the judge-FD between its samples and the base model's (same seeds; 0 = the same images)
    cost               training seconds, peak RSS, trainable parameters, patch bytes (what a ledger records, fp32:
                       LoRA factors, dense deltas of the other weights that moved, new token rows)

Then the multi-concept rows: for each merge in `merges` and k in `merge_k`, the first k of `merge_subjects` are
taught separately (the method `MERGES` names; the single rows' own runs) and merged into one model with the
base's weights W_0 -- custom-diffusion: Custom Diffusion's closed-form K/V merge; mix-of-show: Mix-of-Show's
gradient fusion; lora-add: W_0 + the mean of the ED-LoRA deltas (Mix-of-Show's weight-fusion baseline); the
math lives in custom_diffusion.py and mix_of_show.py, as `lifelong merge` uses it -- and each concept's subject
and prompt fidelity is measured in the merged model beside its value alone (the drop = alone - merged).

Every finished row is written to output_dir/name/results.json at once (the taught concepts a merge needs are kept
under concepts/); a rerun with the same settings skips done rows (resumable). summary.md holds the tables.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import time
from dataclasses import dataclass, field
from fnmatch import fnmatchcase
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from safetensors import safe_open
from safetensors.torch import save

from lifelong.atomic import atomic_write_bytes, atomic_write_json, atomic_write_text
from lifelong.config import from_dict, read_raw, same_settings
from lifelong.data import captioned
from lifelong.errors import ConfigError
from lifelong.families.diffusion import build_pipeline
from lifelong.metrics.cost import PeakMemory
from lifelong.metrics.judge import concept_parts, frechet_distance, judge_features, load_judge, predicted_concepts
from lifelong.metrics.personalization import mean_pairwise_cosine
from lifelong.metrics.probe_judge import load_probe_judge
from lifelong.personalize import PersonalizeRequest, build_personalizer, new_tokens, personalizer_params
from lifelong.personalize.base import MIN_IMAGES, read_images
from lifelong.personalize.custom_diffusion import default_reg_prompts, kv_parameters, merge_kv, text_features
from lifelong.personalize.mix_of_show import gradient_fusion, weight_fusion
from lifelong.report.pages import write_run_report
from lifelong.runtime import fast_bf16, versions


@dataclass(frozen=True)
class Subject:
    """A subject the embedded model never saw.

    concepts   the judge's concepts its real images are (captioned's held-out subjects)
    token      its identifier, a made-up word (DreamBooth writes it into the prompt; the others add it as a token)
    word       its plain name, for the base model's reference prompts ("gothic")
    shows      what the judge must see in a sample of it (a pattern: "letter/*/gothic/black" = any letter)
    class_shows  what a sample of the class prompt should be ("letter/*": any letter)
    composed   (prompt template, the concept the judge must see): {id} is the identifier ("<vkt>", Mix-of-Show's
               "<vkt1> <vkt2>"), {subject} the subject as the method's own prompt names it ("<vkt> letter")
    """

    name: str
    concepts: tuple[str, ...]
    token: str
    class_word: str
    word: str
    shows: str
    class_shows: str
    composed: tuple[tuple[str, str], ...]
    folder: str = ""  # a user's own subject: its images' folder (shows, class_shows may then be "": not judged)

    @property
    def class_prompt(self) -> str:
        return f"a {self.class_word}"


def _gothic(name: str, ink: str, token: str) -> Subject:
    taught, other = ("A", "B", "C", "E"), ("G", "K", "R", "S")  # the composed prompts ask for letters it was not shown
    word = "gothic" if ink == "black" else f"{ink} gothic"
    return Subject(name, tuple(f"letter/{x}/gothic/{ink}" for x in taught), token, "letter", word,
                   f"letter/*/gothic/{ink}", "letter/*",
                   tuple((f"the letter {x} in {{id}} type", f"letter/{x}/gothic/{ink}") for x in other))


SUBJECTS = {
    "gothic": _gothic("gothic", "black", "<vkt>"),
    "bug": Subject("bug", ("clipart/bug",), "<bzw>", "drawing", "bug", "clipart/bug", "clipart/*",
                   tuple((t, "clipart/bug") for t in ("a cartoon of a {subject}", "a simple sketch of a {subject}",
                                                      "clip art of a {subject}", "an illustration of a {subject}"))),
    "gothic-red": _gothic("gothic-red", "red", "<qrm>"),
    "gothic-blue": _gothic("gothic-blue", "blue", "<jxf>"),
}
USER_MIN_IMAGES = MIN_IMAGES + 1  # a user's folder: at least MIN_IMAGES to teach from and one held out
CLASS_PATTERNS = {"letter": "letter/*", "digit": "digit/*", "drawing": "clipart/*", "clip art": "clipart/*"}


def user_subject(folder: str, token: str, class_word: str) -> Subject:
    """The subject "user": a user's folder of images, taught as `token`; its class judged where the judge knows it."""
    known = CLASS_PATTERNS.get(class_word.lower()) or next(
        (c.name for c in captioned.find_concepts(class_word) if c.kind != "letter-style"), "") if class_word else ""
    return Subject("user", (), token, class_word, class_word or token, "", known, (), folder=folder)


def user_images_digest(folder: str, size: int = 32) -> str:
    import hashlib

    images, _ = read_images(folder, size, min_images=USER_MIN_IMAGES)
    return hashlib.sha256(np.ascontiguousarray(images).tobytes()).hexdigest()


SELECTION = ("methods", "subjects", "merges", "merge_k")  # settings that choose rows, not how one is measured
# merge -> the personalization method whose separately taught concepts it merges
MERGES = {"custom-diffusion": "custom-diffusion", "lora-add": "mix-of-show", "mix-of-show": "mix-of-show"}
QUICK = {"n": 4, "steps": 10, "methods": ("ti", "custom-diffusion"), "merges": ("custom-diffusion",), "merge_k": (2,),
         "knobs": {"ti": {"steps": 20}, "custom-diffusion": {"steps": 20, "reg_images": 4, "ddim_steps": 5}}}


@dataclass(frozen=True)
class PersonalizeBenchConfig:
    name: str = "personalize-bench"
    output_dir: str = "runs"
    model: str = "embedded"  # the embedded model, a train_t2i.py .safetensors file, or a pipeline folder
    methods: tuple[str, ...] = ("ti", "custom-diffusion", "mix-of-show", "dreambooth-lora", "dreambooth")  # fastest first
    subjects: tuple[str, ...] = ("gothic", "bug")
    merges: tuple[str, ...] = ("custom-diffusion", "lora-add", "mix-of-show")
    merge_k: tuple[int, ...] = (2,)  # (2, 4) adds the 4-concept merges: two more subjects taught per merged method
    merge_subjects: tuple[str, ...] = ("gothic", "bug", "gothic-red", "gothic-blue")  # a k-merge takes the first k
    n_images: int = 8    # real train images a subject is taught from
    n: int = 16          # seeded samples per prompt set (subject, composed, class)
    steps: int = 25      # denoising steps of every sample (the default sampler: ancestral)
    bf16: bool = field(default_factory=fast_bf16)  # sample under bf16 autocast where it is fast (runtime.fast_bf16)
    seed: int = 0
    knobs: dict = field(default_factory=dict)  # {method: {knob: value}}, validated by the method's Params
    user_images: str = ""  # a folder of 4-20 images of a user's own subject: adds the subject "user"
    user_token: str = "<my-subject>"  # its identifier (a made-up word)
    user_class: str = ""  # its class word ("letter", "dog"): the class prompt, a new token's initializer

    def subjects_by_name(self) -> dict[str, Subject]:
        """SUBJECTS, and "user" when a folder is given."""
        if not self.user_images:
            return dict(SUBJECTS)
        return {**SUBJECTS, "user": user_subject(self.user_images, self.user_token, self.user_class)}


def load_bench_config(path: str | Path | None, overrides=(), quick: bool = False) -> PersonalizeBenchConfig:
    raw = read_raw(path, list(overrides))
    if quick:
        raw = {**QUICK, **raw, "name": raw.get("name", "personalize-bench-quick")}
    if raw.get("user_images") and "user" not in raw.get("subjects", PersonalizeBenchConfig.subjects):
        raw["subjects"] = [*raw.get("subjects", PersonalizeBenchConfig.subjects), "user"]
    config = from_dict(PersonalizeBenchConfig, raw, "")
    if config.user_images:
        read_images(config.user_images, 32, min_images=USER_MIN_IMAGES)  # a folder it cannot use fails before any work
        if not config.user_token.strip() or any(c.isspace() for c in config.user_token):
            raise ConfigError(f"user_token {config.user_token!r}: one made-up word without spaces, e.g. '<my-subject>'")
    known = config.subjects_by_name()
    for method in dict.fromkeys([*config.methods, *config.knobs]):
        personalizer_params(method, config.knobs.get(method))  # an unknown method or knob fails before any work
    for key in ("subjects", "merge_subjects"):
        unknown = [s for s in getattr(config, key) if s not in known]
        if unknown:
            hint = "" if config.user_images else " (\"user\" needs user_images=DIR, --images DIR)"
            raise ConfigError(f"{key}: unknown subject(s) {', '.join(unknown)}; choose from {', '.join(known)}{hint}")
    unknown = [m for m in config.merges if m not in MERGES]
    if unknown:
        raise ConfigError(f"merges: unknown {', '.join(unknown)}; choose from {', '.join(MERGES)}")
    wrong = [k for k in config.merge_k if not 2 <= k <= len(config.merge_subjects)] if config.merges else []
    if wrong:
        raise ConfigError(f"merge_k: {wrong} must be between 2 and the {len(config.merge_subjects)} merge_subjects")
    if config.n < 2 or config.steps < 1 or config.n_images < MIN_IMAGES:
        raise ConfigError(f"n must be at least 2, steps at least 1 and n_images at least {MIN_IMAGES}")
    return config


# --- the subject's images and what a personalized model holds -------------------------------------------------

def real_images(subject: Subject, split: str, n: int | None = None, seed: int = 0, size: int = 32) -> np.ndarray:
    """uint8 (N, size, size, 3) real images of the subject from `split`: all, or about `n` spread over its concepts
    (a user's folder: every fourth image by name is "test", the others "train", read at `size`)."""
    if subject.folder:
        images, _ = read_images(subject.folder, size, min_images=USER_MIN_IMAGES)
        test = np.arange(len(images)) % 4 == 3
        return images[test if split == "test" else ~test][:n]
    per = None if n is None else max(1, n // len(subject.concepts))
    images, _ = captioned.concept_images(list(subject.concepts), split, per_concept=per, seed=seed)
    return at_size(images, size)


def at_size(images: np.ndarray, size: int) -> np.ndarray:
    if images.shape[1] == size:
        return images
    return np.stack([np.asarray(Image.fromarray(x).resize((size, size), Image.Resampling.LANCZOS)) for x in images])


@dataclass
class Taught:
    """One concept taught alone: its tokens and their embedding rows (K, D), the dense delta of every other weight
    it moved (plain parameter names, LoRA folded in), and the instance prompt it answers to."""

    tokens: list[str]
    rows: torch.Tensor
    deltas: dict[str, torch.Tensor]
    prompt: str

    def save(self, path: Path) -> None:
        tensors = {"rows": self.rows.contiguous(), **{f"delta::{n}": d.contiguous() for n, d in self.deltas.items()}}
        atomic_write_bytes(path, save(tensors, {"tokens": json.dumps(self.tokens), "prompt": self.prompt}))

    @classmethod
    def load(cls, path: Path) -> Taught:
        with safe_open(str(path), "pt") as f:
            meta, tensors = f.metadata(), {k: f.get_tensor(k) for k in f.keys()}
        return cls(json.loads(meta["tokens"]), tensors.pop("rows"),
                   {k.removeprefix("delta::"): v for k, v in tensors.items()}, meta["prompt"])


@torch.no_grad()
def plain_weights(model) -> dict[str, torch.Tensor]:
    """Every weight of `model` under the name the model without adapters gives it, peft LoRA folded in
    (W + scale * B A, peft's own `get_delta_weight`)."""
    out = {name.replace(".base_layer.", "."): p.detach() for name, p in model.named_parameters() if "lora_" not in name}
    for name, module in model.named_modules():
        if hasattr(module, "base_layer") and hasattr(module, "get_delta_weight") and getattr(module, "lora_A", None):
            key = f"{name}.weight".replace(".base_layer.", ".")
            out[key] = module.base_layer.weight.detach() + module.get_delta_weight("default")
    return out


@torch.no_grad()
def taught_concept(model, base_weights: dict[str, torch.Tensor], tokens: list[str], prompt: str) -> tuple[Taught, int]:
    """(what the personalized `model` holds beyond the base, the number of values a ledger would record for it)."""
    table = model.token_embeddings().weight.detach()
    after = plain_weights(model)
    deltas = {n: after[n] - w for n, w in base_weights.items()
              if after[n].shape == w.shape and not torch.equal(after[n], w)}  # the token table grew: its rows, below
    ids = [model.token_ids(t)[0] for t in tokens]
    rows = table[ids].clone() if ids else torch.zeros((0, table.shape[1]))
    lora = {name for name, _ in model.named_parameters() if "lora_" in name}
    lora_layers = {n.split(".lora_")[0] + ".weight" for n in lora}
    numel = (sum(p.numel() for name, p in model.named_parameters() if name in lora)
             + sum(d.numel() for n, d in deltas.items() if n not in lora_layers) + rows.numel())
    return Taught(tokens, rows, deltas, prompt), numel


@torch.no_grad()
def merged_model(base, concepts: list[Taught], merge: str) -> tuple[object, dict]:
    """A copy of `base` holding every concept's tokens and its weights merged by `merge`; (model, statistics)."""
    model = copy.deepcopy(base)
    model.add_tokens([t for c in concepts for t in c.tokens], torch.cat([c.rows for c in concepts]))
    params = dict(model.named_parameters())
    deltas = [c.deltas for c in concepts]
    stats: dict = {}
    if merge == "lora-add":
        names = sorted(set().union(*deltas))
        for name, w in weight_fusion({n: params[n].detach().clone() for n in names}, deltas).items():
            params[name].copy_(w)
    elif merge == "mix-of-show":
        _, stats = gradient_fusion(model, deltas, [c.tokens for c in concepts])  # leaves the fused W in the model
    else:  # custom-diffusion: its closed-form merge of the cross-attention K/V
        kv = kv_parameters(model)
        other = sorted(set().union(*deltas) - set(kv))
        if other:
            raise ValueError(f"Custom Diffusion's merge merges cross-attention K/V only; the concepts moved {other[:3]}")
        w0 = {n: w.detach().clone() for n, w in kv.items()}
        finetuned = [{n: w0[n] + d[n] if n in d else w0[n] for n in w0} for d in deltas]
        targets = [text_features(model, [c.prompt]) for c in concepts]
        for name, w in merge_kv(w0, finetuned, targets, text_features(model, list(default_reg_prompts()))).items():
            kv[name].copy_(w.to(kv[name].dtype))
    model.clear_cache()
    return model, stats


# --- measuring ---------------------------------------------------------------------------------------------------

def identifier(tokens: list[str], subject: Subject) -> tuple[str, str]:
    """({id}, {subject}) of a method's prompts: its token(s), and the subject as its instance prompt names it
    (a method that names the subject by several tokens of its own, Mix-of-Show's, drops the class word)."""
    if len(tokens) > 1:
        words = " ".join(tokens)
        return words, words
    return subject.token, f"{subject.token} {subject.class_word}"


def rate(seen: list[str], pattern: str) -> float | None:
    """The judge's rate (%) of `pattern` in `seen`; None for a pattern the judge cannot check ("")."""
    if not pattern:
        return None
    return 100.0 * float(np.mean([fnmatchcase(s, pattern) for s in seen]))


class Measure:
    """Seeded samples of a model, read by the two judges."""

    def __init__(self, config: PersonalizeBenchConfig):
        self.config = config
        self.judge, self.probe = load_judge(), load_probe_judge()
        self._real_features: dict = {}

    def sample(self, model, prompts: list[str], seed: int | None = None) -> np.ndarray:
        cycled = [prompts[i % len(prompts)] for i in range(self.config.n)]
        seed = self.config.seed if seed is None else seed
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=self.config.bf16):
            return model.sample(cycled, n=1, seed=seed, steps=self.config.steps, batch_size=64)

    def features(self, images: np.ndarray) -> dict[str, np.ndarray]:
        return {"judge": judge_features(self.judge, images).numpy(),
                "probe_judge": judge_features(self.probe, images).numpy()}

    def real_features(self, subject: Subject) -> dict[str, np.ndarray]:
        if subject.name not in self._real_features:  # (one user subject per bench: its folder is in the settings)
            self._real_features[subject.name] = self.features(real_images(subject, "test"))
        return self._real_features[subject.name]

    def fidelity(self, images: np.ndarray, subject: Subject) -> dict[str, float]:
        """Subject fidelity of `images`: the mean pairwise cosine with the held-out real images on each judge's
        features, and the judge's rate of the subject (%)."""
        mine, real = self.features(images), self.real_features(subject)
        return {k: mean_pairwise_cosine(mine[k], real[k]) for k in mine} | {
            "judge_rate": rate(predicted_concepts(self.judge, images), subject.shows)}

    def composed(self, model, subject: Subject, ident: str, phrase: str) -> dict[str, float]:
        """Prompt fidelity (%): the judge sees exactly the composed concept; and each of its parts (what, style, ink).
        A subject the judge does not know (a user's) has none: {"rate": None}."""
        if not subject.composed:
            return {"rate": None}
        prompts = [t.format(id=ident, subject=phrase) for t, _ in subject.composed]
        wanted = [subject.composed[i % len(prompts)][1] for i in range(self.config.n)]
        seen = predicted_concepts(self.judge, self.sample(model, prompts))
        out = {"rate": 100.0 * float(np.mean([s == w for s, w in zip(seen, wanted)]))}
        for part, head in enumerate(("what", "style", "ink")):  # a letter's parts; the others have only "what"
            pairs = [(concept_parts(s)[part], concept_parts(w)[part]) for s, w in zip(seen, wanted)]
            if any(w is not None for _, w in pairs):
                out[head] = 100.0 * float(np.mean([s == w for s, w in pairs]))
        return out

    def prior(self, model, subject: Subject) -> tuple[dict[str, float], np.ndarray]:
        """The class prompt's samples: the judge's rate (%) of the class and of the subject leaking into it, and
        the samples."""
        images = self.sample(model, [subject.class_prompt])
        seen = predicted_concepts(self.judge, images)
        return {"class_rate": rate(seen, subject.class_shows), "subject_rate": rate(seen, subject.shows)}, images

    def concept(self, model, subject: Subject, tokens: list[str]) -> dict:
        """Subject and prompt fidelity of a personalized model whose identifier for `subject` is `tokens`."""
        ident, phrase = identifier(tokens, subject)
        return {"prompt": f"a {phrase}", "subject_fidelity": self.fidelity(self.sample(model, [f"a {phrase}"]), subject),
                "prompt_fidelity": self.composed(model, subject, ident, phrase)}


def fd_floor(measure: Measure, model, subject: Subject, features: np.ndarray) -> float:
    """The judge-FD between the base model's class-prompt samples and its own at other seeds: what the judge-FD to
    base of a row reads for a model whose class samples merely changed seeds (n samples make FD biased upward)."""
    other = measure.sample(model, [subject.class_prompt], seed=measure.config.seed + 10_000)
    return frechet_distance(features, judge_features(measure.judge, other).numpy())


# --- the bench ---------------------------------------------------------------------------------------------------

def run_bench(config: PersonalizeBenchConfig) -> Path:
    out = Path(config.output_dir) / config.name
    results_path = out / "results.json"
    settings = json.loads(json.dumps(dataclasses.asdict(config)))  # as results.json holds it (lists, not tuples)
    if config.user_images:  # a changed folder is another subject: its rows are not reused
        settings["user_images_sha256"] = user_images_digest(config.user_images)
    results = json.loads(results_path.read_text()) if results_path.is_file() else {}
    if not same_settings(results.get("settings"), settings, PersonalizeBenchConfig(), ignore=SELECTION):
        results = {"bench": "personalize", "settings": settings, "versions": versions(), "rows": {}}
    results["settings"] = settings  # rows measured the same way are kept when only the selection changed
    rows = results["rows"]

    def save_rows():
        atomic_write_json(results_path, results)
        atomic_write_text(out / "summary.md", summary(results))

    model = build_pipeline(config.model)
    base_weights = {n: w.clone() for n, w in plain_weights(model).items()}
    measure = Measure(config)
    subjects = config.subjects_by_name()
    merged_subjects = list(config.merge_subjects[: max(config.merge_k)]) if config.merges and config.merge_k else []
    needed = [*config.subjects, *[s for s in merged_subjects if s not in config.subjects]]

    for name in needed:  # the base model on everything the rows compare with
        key = f"base|{name}"
        features = out / f"base_class_features_{name}.npy"
        subject = subjects[name]
        if key in rows and features.is_file():
            if "judge_fd_floor" not in rows[key]["prior"]:  # a row of a bench from before the floor was measured
                rows[key]["prior"]["judge_fd_floor"] = fd_floor(measure, model, subject, np.load(features))
                save_rows()
            continue
        t0 = time.perf_counter()
        prior, class_images = measure.prior(model, subject)
        train = measure.features(real_images(subject, "train", config.n_images, config.seed))
        real = measure.real_features(subject)
        rows[key] = {"subject": name, "class_prompt": subject.class_prompt,
                     "subject_fidelity": measure.fidelity(class_images, subject),
                     "real_vs_real": {k: mean_pairwise_cosine(train[k], real[k]) for k in train},
                     "prompt_fidelity": measure.composed(model, subject, subject.word, subject.word),
                     "prior": prior, "seconds": time.perf_counter() - t0}
        out.mkdir(parents=True, exist_ok=True)
        np.save(features, judge_features(measure.judge, class_images).numpy())
        rows[key]["prior"]["judge_fd_floor"] = fd_floor(measure, model, subject, np.load(features))
        save_rows()

    def single(method: str, name: str, keep: bool) -> None:
        """The row method|name (a fresh copy of the model taught the subject); `keep`: save what it taught for merges."""
        key, path = f"{method}|{name}", out / "concepts" / f"{method}__{name}.safetensors"
        if key in rows and (path.is_file() or not keep):
            return
        subject = subjects[name]
        personalizer = build_personalizer(method, config.knobs.get(method))
        images = real_images(subject, "train", config.n_images, config.seed, size=model.image_size)
        request = PersonalizeRequest(images, subject.token, subject.class_word)
        taught = copy.deepcopy(model)
        with PeakMemory() as memory:
            t0 = time.perf_counter()
            stats = personalizer.personalize(taught, request, seed=config.seed, progress=True)
            seconds = time.perf_counter() - t0
        tokens = new_tokens(personalizer, subject.token)
        concept, numel = taught_concept(taught, base_weights, tokens, f"a {identifier(tokens, subject)[1]}")
        if keep:
            concept.save(path)
        if key in rows:  # the row was there, its concept file was not (a merge needs it again)
            return
        prior, class_images = measure.prior(taught, subject)
        base = rows[f"base|{name}"]
        rows[key] = {
            "method": method, "subject": name, "n_images": len(images),
            **measure.concept(taught, subject, tokens),
            "subject_fidelity_base": base["subject_fidelity"], "real_vs_real": base["real_vs_real"],
            "prompt_fidelity_base": base["prompt_fidelity"],
            "prior": prior | {"judge_fd_to_base": frechet_distance(np.load(out / f"base_class_features_{name}.npy"),
                                                                   judge_features(measure.judge, class_images).numpy())},
            "prior_base": base["prior"],
            "cost": {"train_seconds": seconds, "peak_rss_mb": memory.peak_mb,
                     "trainable_params": int(stats.get("trainable_params", 0)), "patch_bytes": 4 * numel},
            "stats": stats,
        }
        save_rows()
        print(_line(rows[key]), flush=True)

    merged_methods = {MERGES[m] for m in config.merges}
    for method in config.methods:
        for name in config.subjects:
            single(method, name, keep=method in merged_methods and name in merged_subjects)

    for merge in config.merges:
        method = MERGES[merge]
        for k in config.merge_k:
            key = f"{merge}-merge|k={k}"
            if key in rows:
                continue
            names = merged_subjects[:k]
            for name in names:
                single(method, name, keep=True)
            concepts = [Taught.load(out / "concepts" / f"{method}__{name}.safetensors") for name in names]
            with PeakMemory() as memory:
                t0 = time.perf_counter()
                merged, stats = merged_model(model, concepts, merge)
                seconds = time.perf_counter() - t0
            per = {}
            for name, concept in zip(names, concepts):
                now = measure.concept(merged, subjects[name], concept.tokens)
                alone = rows[f"{method}|{name}"]
                per[name] = {"merged": {k: now[k] for k in ("subject_fidelity", "prompt_fidelity")},
                             "alone": {k: alone[k] for k in ("subject_fidelity", "prompt_fidelity")},
                             "drop": {**{m: _minus(alone["subject_fidelity"][m], v) for m, v in now["subject_fidelity"].items()},
                                      "prompt_rate": _minus(alone["prompt_fidelity"]["rate"], now["prompt_fidelity"]["rate"])}}
            rows[key] = {"merge": merge, "method": method, "k": k, "subjects": names, "concepts": per,
                         "mean_drop": {m: _mean([c["drop"][m] for c in per.values()]) for m in
                                       ("judge", "probe_judge", "judge_rate", "prompt_rate")},
                         "cost": {"merge_seconds": seconds, "peak_rss_mb": memory.peak_mb}, "stats": stats}
            save_rows()
            print(f"{merge}-merge of {', '.join(names)}: mean drop " + ", ".join(
                f"{m} {_fmt(v, '.3g')}" for m, v in rows[key]["mean_drop"].items()), flush=True)
    save_rows()
    print(f"report: {write_run_report(out)}")
    return out


def _minus(a: float | None, b: float | None) -> float | None:
    return None if a is None or b is None else a - b


def _mean(values: list) -> float | None:
    kept = [v for v in values if v is not None]
    return float(np.mean(kept)) if kept else None


def _fmt(value: float | None, spec: str) -> str:
    """`value` formatted, or "-" where the judge could not check it (a user's subject)."""
    return "-" if value is None else format(value, spec)


def _line(row: dict) -> str:
    f, p, c = row["subject_fidelity"], row["prior"], row["cost"]
    return (f"{row['method']:16s} {row['subject']:11s} fidelity judge {f['judge']:.3f} (class "
            f"{row['subject_fidelity_base']['judge']:.3f}), subject {_fmt(f['judge_rate'], '5.1f')}% | prompt "
            f"{_fmt(row['prompt_fidelity']['rate'], '5.1f')}% | class {_fmt(p['class_rate'], '5.1f')}% (was "
            f"{_fmt(row['prior_base']['class_rate'], '5.1f')}), FD {p['judge_fd_to_base']:.2f} | {c['train_seconds']:.0f} s")


def summary(results: dict) -> str:
    rows = results["rows"]
    lines = ["# lifelong bench personalize", "",
             "Subject fidelity: mean pairwise cosine between samples of the subject's prompt and its held-out real "
             "images, on the judge's features (DINO-style) and the embedded EfficientNet's (CLIP-I-style), with the "
             "base model's class-prompt samples in brackets (real train vs test images: the ceiling, below); subject: "
             "the judge's rate (%) of the subject in those samples. Prompt: the judge's rate (%) of the composed "
             "concept (a type style: other letters in it; the bug: other clip-art phrasings), the base model with the "
             "plain word in brackets. Class: the judge's rate (%) of the class in samples of the class prompt (base in "
             "brackets), leak: the subject's rate there, judge-FD: those samples vs the base model's (FID formula on "
             "judge features, not Inception-FID).", "",
             "| method | subject | fidelity judge | fidelity EfficientNet | subject % | prompt % | class % | leak % | "
             "judge-FD to base | train s | peak RSS MiB | trainable params | patch bytes |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for key, r in rows.items():
        if key.startswith("base|") or "-merge|" in key:
            continue
        f, fb, p, pb, c = r["subject_fidelity"], r["subject_fidelity_base"], r["prior"], r["prior_base"], r["cost"]
        lines.append(f"| {r['method']} | {r['subject']} | {f['judge']:.3f} ({fb['judge']:.3f}) | {f['probe_judge']:.3f} "
                     f"({fb['probe_judge']:.3f}) | {_fmt(f['judge_rate'], '.1f')} ({_fmt(fb['judge_rate'], '.1f')}) | "
                     f"{_fmt(r['prompt_fidelity']['rate'], '.1f')} ({_fmt(r['prompt_fidelity_base']['rate'], '.1f')}) | "
                     f"{_fmt(p['class_rate'], '.1f')} ({_fmt(pb['class_rate'], '.1f')}) | "
                     f"{_fmt(p['subject_rate'], '.1f')} ({_fmt(pb['subject_rate'], '.1f')}) | "
                     f"{p['judge_fd_to_base']:.2f} | {c['train_seconds']:.1f} | {c['peak_rss_mb']:.0f} | "
                     f"{c['trainable_params']:,} | {c['patch_bytes']:,} |")
    floors = [(k.split("|")[1], r["prior"]["judge_fd_floor"]) for k, r in rows.items()
              if k.startswith("base|") and "judge_fd_floor" in r["prior"]]
    if floors:
        lines += ["", "judge-FD floor (the base model's class samples against its own at other seeds, the same n): " +
                  "; ".join(f"{s} {v:.2f}" for s, v in floors) + "."]
    ceilings = [(k.split("|")[1], r["real_vs_real"]) for k, r in rows.items() if k.startswith("base|")]
    if ceilings:
        lines += ["", "Real train vs real test images (the ceiling of subject fidelity): " + "; ".join(
            f"{s} judge {v['judge']:.3f}, EfficientNet {v['probe_judge']:.3f}" for s, v in ceilings) + "."]
    merges = [r for k, r in rows.items() if "-merge|" in k]
    if merges:
        lines += ["", "Multi-concept: each concept taught alone, then merged with the others; per concept its value in "
                  "the merged model, alone in brackets.", "",
                  "| merge | of | k | concept | fidelity judge | fidelity EfficientNet | subject % | prompt % | merge s |",
                  "|---|---|---|---|---|---|---|---|---|"]
        for r in merges:
            for name, c in r["concepts"].items():
                m, a = c["merged"], c["alone"]
                lines.append(f"| {r['merge']} | {r['method']} | {r['k']} | {name} | "
                             f"{m['subject_fidelity']['judge']:.3f} ({a['subject_fidelity']['judge']:.3f}) | "
                             f"{m['subject_fidelity']['probe_judge']:.3f} ({a['subject_fidelity']['probe_judge']:.3f}) | "
                             f"{_fmt(m['subject_fidelity']['judge_rate'], '.1f')} "
                             f"({_fmt(a['subject_fidelity']['judge_rate'], '.1f')}) | "
                             f"{_fmt(m['prompt_fidelity']['rate'], '.1f')} ({_fmt(a['prompt_fidelity']['rate'], '.1f')}) | "
                             f"{r['cost']['merge_seconds']:.1f} |")
    return "\n".join(lines) + "\n"
