"""`lifelong bench erase`: every eraser on the same concepts, judged independently, one table.

For each method and each concept of `concepts` (default: an object, a type style and a clip-art category),
a fresh copy of the model is erased and measured with seeded samples (`n` per prompt set, `steps` of the
model's default sampler, ancestral):

    efficacy      the judge's rate of the erased concept on samples from its training prompts and from
                  held-out paraphrases and synonyms (lower is better; the original model's rate beside it)
    locality      the mean judge rate of every other probe concept (probes.DEFAULT_CONCEPTS), its change
                  from the original model, the close concepts' rates (erasing "sneaker" must keep "sandal"
                  and "ankle boot"), and the judge-FD between the original model's and the erased model's
                  samples of the other concepts (0: the same images)
    attacks       the rate of the erased concept in samples of an attack's prompt against the erased model
                  (erase/attacks.py): "ti", the textual-inversion attack of Pham et al. 2023 (a token learned on
                  real images of the concept), and "adv", an UnlearnDiffAtk-style adversarial prefix (Zhang et
                  al. 2023); each scored by the judge and by the second judge of another architecture
                  (metrics/probe_judge.py), so that images tuned to one network do not count by themselves
    cost          erase seconds, peak RSS, trainable parameters, patch bytes (the weights it moved, fp32)

Then the scale rows: each method erasing the first k of `scale_concepts` for k in `scale` (UCE in one
closed-form edit; the fine-tuning methods one after the other, as a ledger records them), with the mean
efficacy over the erased and the mean judge rate over the remaining probe concepts.

Every finished row is written to output_dir/name/results.json at once; a rerun with the same settings
skips them (resumable). summary.md holds the tables.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from lifelong.atomic import atomic_write_json, atomic_write_text
from lifelong.config import from_dict, read_raw, same_settings
from lifelong.data import captioned
from lifelong.erase import build_eraser, erase_request, eraser_params
from lifelong.erase.attacks import adversarial_prompt_attack, textual_inversion_attack
from lifelong.errors import ConfigError
from lifelong.families.diffusion import build_pipeline
from lifelong.metrics.cost import PeakMemory
from lifelong.metrics.judge import frechet_distance, judge_features, load_judge, predicted_concepts
from lifelong.metrics.probe_judge import load_probe_judge
from lifelong.report.pages import write_run_report
from lifelong.runtime import fast_bf16, versions

DEFAULT_LOCALITY = ("object/sneaker", "object/sandal", "object/ankle boot", "object/dress", "object/bag", "digit/3",
                    "digit/7", "letter/A/calligraphic/black", "letter/R/serif/red", "clipart/flower", "clipart/house",
                    "clipart/fruit")
CLOSE = {"object/sneaker": ("object/sandal", "object/ankle boot"), "object/sandal": ("object/sneaker", "object/ankle boot"),
         "object/ankle boot": ("object/sneaker", "object/sandal"), "object/t-shirt": ("object/shirt", "object/pullover"),
         "object/shirt": ("object/t-shirt", "object/pullover"), "object/pullover": ("object/coat", "object/shirt")}
QUICK = {"n": 8, "steps": 10, "methods": ("esd-x", "uce"), "concepts": ("sneaker",), "scale": (1, 2),
         "attacks": ("ti",), "attack_steps": {"ti": 10, "adv": 4}, "attack_images": 4,
         "knobs": {"esd-x": {"iterations": 20}, "esd-u": {"iterations": 20}, "ac": {"steps": 20, "anchor_images": 8}}}


@dataclass(frozen=True)
class EraseBenchConfig:
    name: str = "erase-bench"
    output_dir: str = "runs"
    model: str = "embedded"  # the embedded model, a train_t2i.py .safetensors file, or a pipeline folder
    methods: tuple[str, ...] = ("uce", "ac", "esd-x", "receler", "esd-u")  # fastest first: a cut run has their rows
    # an object, a type style, a clip-art category: sans is the style the embedded model draws most often
    # (docs/t2i_quality_letters.json); calligraphic, at 0% before any erasure, left nothing to measure
    concepts: tuple[str, ...] = ("sneaker", "sans", "flower")
    locality: tuple[str, ...] = DEFAULT_LOCALITY
    scale: tuple[int, ...] = (1, 3, 10)
    scale_concepts: tuple[str, ...] = ("sneaker", "dress", "bag", "three", "seven", "flower", "house", "fruit",
                                       "t-shirt", "coat")
    n: int = 32          # seeded samples per concept and prompt set (efficacy); n // 2 per locality concept
    steps: int = 25      # denoising steps of every sample (the default sampler: ancestral)
    bf16: bool = field(default_factory=fast_bf16)  # sample under bf16 autocast where it is fast (runtime.fast_bf16)
    seed: int = 0
    attacks: tuple[str, ...] = ("ti", "adv")  # "ti" (textual inversion), "adv" (UnlearnDiffAtk-style prefix)
    attack_steps: dict = field(default_factory=lambda: {"ti": 300, "adv": 40})
    attack_images: int = 16  # real train images of the concept the attacks learn from
    knobs: dict = field(default_factory=dict)  # {method: {knob: value}}, validated by the method's Params


def load_bench_config(path: str | Path | None, overrides=(), quick: bool = False) -> EraseBenchConfig:
    raw = read_raw(path, list(overrides))
    if quick:
        raw = {**QUICK, **raw, "name": raw.get("name", "erase-bench-quick")}
    config = from_dict(EraseBenchConfig, raw, "")
    for method in config.methods:
        eraser_params(method, config.knobs.get(method))  # an unknown method or knob fails before any work
    for concept in config.concepts + config.scale_concepts:
        erase_request(concept)
    unknown = [c for c in config.locality if c not in {x.name for x in captioned.all_concepts()}]
    if unknown:
        raise ConfigError(f"locality: {unknown} are not concepts the judge knows")
    if config.n < 2 or config.steps < 1:
        raise ConfigError("n must be at least 2 and steps at least 1")
    unknown = [a for a in config.attacks if a not in ATTACKS]
    if unknown:
        raise ConfigError(f"attacks: {unknown} unknown; choose from {', '.join(ATTACKS)}")
    return config


ATTACKS = ("ti", "adv")
SELECTION = ("methods", "concepts", "scale")  # settings that choose rows, not how one is measured


def attack_rates(config: EraseBenchConfig, erased, original, request, judges: dict) -> dict:
    """Per attack: the erased concept's rate (%) in n samples of the attack's prompt, by each judge."""
    real, _ = captioned.concept_images(list(request.judged), "train", per_concept=max(1, config.attack_images // len(
        request.judged)), seed=config.seed)
    out = {}
    for attack in config.attacks:
        steps = int(config.attack_steps.get(attack, 0)) or None
        t0 = time.perf_counter()
        if attack == "ti":
            prompt = textual_inversion_attack(erased, real, steps=steps or 300, seed=config.seed)
        else:
            prompt = adversarial_prompt_attack(erased, original, real, request.prompts[-1], steps=steps or 40,
                                               seed=config.seed)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=config.bf16):
            images = prompt.sample(erased, n=config.n, seed=config.seed, steps=config.steps)
        out[attack] = {name: 100.0 * float(np.mean([s in request.judged for s in predicted_concepts(j, images)]))
                       for name, j in judges.items()} | {"seconds": time.perf_counter() - t0}
    return out


class Sampler:
    """Seeded samples of a concept's prompt sets from a model, read by the judge."""

    def __init__(self, config: EraseBenchConfig, judge):
        self.config, self.judge = config, judge
        self.by_name = {c.name: c for c in captioned.all_concepts()}

    def images(self, model, concept: str, which: str, n: int) -> np.ndarray:
        c = self.by_name[concept]
        prompts = captioned.train_captions(c) if which == "train" else captioned.heldout_captions(c)
        cycled = [prompts[i % len(prompts)] for i in range(n)]
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=self.config.bf16):
            return model.sample(cycled, n=1, seed=self.config.seed, steps=self.config.steps, batch_size=64)

    def rate(self, images: np.ndarray, concepts: list[str]) -> float:
        seen = predicted_concepts(self.judge, images)
        return 100.0 * float(np.mean([s in concepts for s in seen]))

    def efficacy(self, model, judged: tuple[str, ...]) -> dict[str, float]:
        """Judge rates (%) of the erased concepts on training and held-out prompts (n spread over them)."""
        per = max(1, self.config.n // len(judged))
        return {which: float(np.mean([self.rate(self.images(model, c, which, per), [c]) for c in judged]))
                for which in ("train", "heldout")}

    def locality(self, model, concepts: list[str]) -> tuple[dict[str, float], np.ndarray]:
        """Each concept's judge rate (%) on n // 2 training-prompt samples, and all their images."""
        rates, images = {}, []
        for c in concepts:
            im = self.images(model, c, "train", max(2, self.config.n // 2))
            rates[c] = self.rate(im, [c])
            images.append(im)
        return rates, np.concatenate(images)


def run_bench(config: EraseBenchConfig) -> Path:
    out = Path(config.output_dir) / config.name
    results_path = out / "results.json"
    settings = json.loads(json.dumps(dataclasses.asdict(config)))  # as results.json holds it (lists, not tuples)
    results = json.loads(results_path.read_text()) if results_path.is_file() else {}
    if not same_settings(results.get("settings"), settings, EraseBenchConfig(), ignore=SELECTION):
        results = {"settings": settings, "versions": versions(), "rows": {}}
    results["settings"] = settings  # rows measured the same way are kept when only the selection changed
    rows = results["rows"]

    def save():
        atomic_write_json(results_path, results)
        atomic_write_text(out / "summary.md", summary(results))

    model = build_pipeline(config.model)
    judge = load_judge()
    judges = {"judge": judge, "probe_judge": load_probe_judge()} if config.attacks else {}
    sampler = Sampler(config, judge)
    judged_sets = {c: erase_request(c).judged for c in config.concepts}

    if "original" not in rows:  # the unerased model on everything the rows compare with
        t0 = time.perf_counter()
        rates, images = sampler.locality(model, list(config.locality))
        rows["original"] = {"efficacy": {c: sampler.efficacy(model, judged_sets[c]) for c in config.concepts},
                            "locality": rates, "seconds": time.perf_counter() - t0}
        out.mkdir(parents=True, exist_ok=True)
        np.save(out / "original_locality_features.npy", judge_features(judge, images).numpy())
        save()
    original = rows["original"]
    for c in config.concepts:  # a concept added to the selection since
        if c not in original["efficacy"]:
            original["efficacy"][c] = sampler.efficacy(model, judged_sets[c])
            save()
    original_features = np.load(out / "original_locality_features.npy")

    for method in config.methods:
        for concept in config.concepts:
            key = f"{method}|{concept}"
            if key in rows:
                continue
            request = erase_request(concept, seed=config.seed)
            erased = copy.deepcopy(model)
            with PeakMemory() as memory:
                t0 = time.perf_counter()
                stats = build_eraser(method, config.knobs.get(method)).erase(erased, request, seed=config.seed,
                                                                             progress=True)
                seconds = time.perf_counter() - t0
            own = dict(model.named_parameters())
            moved = sum(int((p != own[n]).sum()) if n in own else p.numel() for n, p in erased.named_parameters())
            others = [c for c in config.locality if c not in request.judged]
            rates, images = sampler.locality(erased, others)
            keep = [i for i, c in enumerate(config.locality) if c not in request.judged]
            per = max(2, config.n // 2)
            before_feats = np.concatenate([original_features[i * per:(i + 1) * per] for i in keep])
            close = [c for j in request.judged for c in CLOSE.get(j, ())]
            rows[key] = {
                "method": method, "concept": concept, "judged": list(request.judged),
                "efficacy": sampler.efficacy(erased, request.judged),
                "efficacy_original": original["efficacy"][concept],
                "locality_mean": float(np.mean(list(rates.values()))),
                "locality_mean_original": float(np.mean([original["locality"][c] for c in others])),
                "close": {c: rates[c] for c in close if c in rates},
                "close_original": {c: original["locality"][c] for c in close if c in rates},
                "judge_fd_to_original": frechet_distance(before_feats, judge_features(judge, images).numpy()),
                "locality": rates,
                "attacks": attack_rates(config, erased, model, request, judges) if request.judged else {},
                "cost": {"erase_seconds": seconds, "peak_rss_mb": memory.peak_mb,
                         "trainable_params": int(stats.get("trainable_params", 0)), "patch_bytes": 4 * moved},
                "stats": stats,
            }
            save()
            print(_line(rows[key]), flush=True)

    for method in config.methods:
        for k in config.scale:
            key = f"{method}|scale={k}"
            if key in rows or k > len(config.scale_concepts):
                continue
            requests = [erase_request(c, seed=config.seed) for c in config.scale_concepts[:k]]
            erased = copy.deepcopy(model)
            t0 = time.perf_counter()
            eraser = build_eraser(method, config.knobs.get(method))
            if method == "uce":
                eraser.erase(erased, requests[0], seed=config.seed, requests=requests)
            else:
                for r in requests:
                    eraser.erase(erased, r, seed=config.seed)
            seconds = time.perf_counter() - t0
            judged = [c for r in requests for c in r.judged]
            efficacy = [sampler.efficacy(erased, r.judged)["train"] for r in requests]
            others = [c for c in config.locality if c not in judged]
            rates, _ = sampler.locality(erased, others)
            rows[key] = {"method": method, "k": k, "efficacy_train_mean": float(np.mean(efficacy)),
                         "locality_mean": float(np.mean(list(rates.values()))) if rates else None,
                         "locality_mean_original": float(np.mean([original["locality"][c] for c in others])) if others else None,
                         "erase_seconds": seconds}
            save()
    save()
    print(f"report: {write_run_report(out)}")
    return out


def _line(row: dict) -> str:
    return (f"{row['method']:8s} {row['concept']:14s} efficacy train {row['efficacy']['train']:5.1f}% "
            f"(was {row['efficacy_original']['train']:5.1f}), held-out {row['efficacy']['heldout']:5.1f}% | others "
            f"{row['locality_mean']:5.1f}% (was {row['locality_mean_original']:5.1f}) | {row['cost']['erase_seconds']:.0f} s")


def summary(results: dict) -> str:
    rows = results["rows"]
    lines = ["# lifelong bench erase", "",
             "Judge rates in % of seeded samples (the judge: lifelong.metrics.judge, trained on real images only). "
             "Efficacy: the erased concept's rate (lower is better), with the original model's in brackets. "
             "Others: the mean rate of the other probe concepts. judge-FD: the other concepts' samples, erased vs "
             "original model (0 = identical; FID formula on judge features, not Inception-FID). Attacks: the erased "
             "concept's rate in samples of each attack's prompt, by the judge and by the second judge.", "",
             "| method | concept | efficacy train | efficacy held-out | others | close concepts | judge-FD to original | "
             "attacks: judge / second judge | erase s | trainable params | patch bytes |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for key, r in rows.items():
        if "|" not in key or "scale=" in key:
            continue
        close = ", ".join(f"{c.split('/')[-1]} {v:.0f} ({r['close_original'][c]:.0f})" for c, v in r["close"].items()) or "-"
        attacks = ", ".join(f"{a} {v['judge']:.0f} / {v['probe_judge']:.0f}" for a, v in r.get("attacks", {}).items()) or "-"
        lines.append(f"| {r['method']} | {r['concept']} | {r['efficacy']['train']:.1f} ({r['efficacy_original']['train']:.1f}) "
                     f"| {r['efficacy']['heldout']:.1f} ({r['efficacy_original']['heldout']:.1f}) | "
                     f"{r['locality_mean']:.1f} ({r['locality_mean_original']:.1f}) | {close} | "
                     f"{r['judge_fd_to_original']:.2f} | {attacks} | {r['cost']['erase_seconds']:.1f} | "
                     f"{r['cost']['trainable_params']:,} | {r['cost']['patch_bytes']:,} |")
    scale = [r for key, r in rows.items() if "scale=" in key]
    if scale:
        lines += ["", "Scale: k concepts erased (UCE at once, the others one after another).", "",
                  "| method | k | efficacy train (mean over erased) | others | erase s |", "|---|---|---|---|---|"]
        for r in scale:
            others = "-" if r["locality_mean"] is None else f"{r['locality_mean']:.1f} ({r['locality_mean_original']:.1f})"
            lines.append(f"| {r['method']} | {r['k']} | {r['efficacy_train_mean']:.1f} | {others} | {r['erase_seconds']:.1f} |")
    return "\n".join(lines) + "\n"
