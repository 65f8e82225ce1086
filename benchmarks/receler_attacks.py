"""Receler on one concept of the embedded model, then both attacks on the erased model, judged by both judges.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/receler_attacks.py \
        --model checkpoints/t2i/checkpoint.safetensors --concept bag --iterations 100

Writes benchmarks/results/receler_attacks.json: the rate (%) at which the main judge (metrics/judge.py) and
the second judge (metrics/probe_judge.py) see the concept in 32 seeded samples (25 DDIM steps, the model's
guidance) of "a photo of a <concept>" before and after `lifelong.erase` Receler (defaults but
`--iterations`), then under the textual-inversion attack (300 steps, 25 real train images; its prompts
"<concept>" and "a photo of a <concept>") and the UnlearnDiffAtk-style prefix attack (40 steps) on the erased
model, with each step's time on this machine. A smoke measurement of one concept, not the bench
(`lifelong bench erase`), which runs every method on several concepts.
"""

from __future__ import annotations

import argparse
import copy
import time
from pathlib import Path

import torch
from safetensors import safe_open

from lifelong.atomic import atomic_write_json
from lifelong.data import captioned
from lifelong.erase import build_eraser, erase_request
from lifelong.erase.attacks import adversarial_prompt_attack, textual_inversion_attack
from lifelong.families.diffusion import build_pipeline
from lifelong.metrics.judge import judge_rates, load_judge
from lifelong.metrics.probe_judge import load_probe_judge

OUT = Path(__file__).resolve().parent / "results" / "receler_attacks.json"


def _step(model: str) -> int | None:
    """The training step of a scripts/train_t2i.py checkpoint (None for other models)."""
    if not model.endswith(".safetensors"):
        return None
    with safe_open(model, "pt") as f:
        step = (f.metadata() or {}).get("step")
    return int(step) if step is not None else None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="embedded")
    parser.add_argument("--concept", default="bag")
    parser.add_argument("--iterations", type=int, default=200)
    parser.add_argument("--samples", type=int, default=32)
    parser.add_argument("--out", type=Path, default=OUT)
    args = parser.parse_args(argv)
    (concept,) = [c.name for c in captioned.find_concepts(args.concept)][:1]
    prompt = f"a photo of a {args.concept}"
    model = build_pipeline(args.model)
    judges = {"judge": load_judge(), "probe_judge": load_probe_judge()}

    def rates(images) -> dict[str, float]:
        return {name: judge_rates(j, images, [concept] * len(images))[concept] for name, j in judges.items()}

    report = {"model": args.model, "checkpoint_step": _step(args.model), "concept": concept, "prompt": prompt, "samples": args.samples,
              "threads": torch.get_num_threads(), "before": rates(model.sample(prompt, n=args.samples, seed=0))}
    erased = copy.deepcopy(model)
    t0 = time.perf_counter()
    stats = build_eraser("receler", {"iterations": args.iterations}).erase(erased, erase_request(args.concept), seed=0)
    report["receler"] = {"iterations": args.iterations, "seconds": round(time.perf_counter() - t0, 1), **stats}
    report["after"] = rates(erased.sample(prompt, n=args.samples, seed=0))
    images, _ = captioned.concept_images([concept], "train", per_concept=25, seed=0)
    t0 = time.perf_counter()
    ti = textual_inversion_attack(erased, images, seed=0)
    samples = ti.sample(erased, n=args.samples, seed=0)
    report["textual_inversion"] = {"seconds": round(time.perf_counter() - t0, 1), **ti.stats, "rates": {
        text: rates(samples[i * args.samples : (i + 1) * args.samples]) for i, text in enumerate(ti.text)}}
    t0 = time.perf_counter()
    adv = adversarial_prompt_attack(erased, None, images, prompt, seed=0)
    report["adversarial_prompt"] = {"seconds": round(time.perf_counter() - t0, 1), "prompt": adv.text[0], **adv.stats,
                                    "rates": rates(adv.sample(erased, n=args.samples, seed=0))}
    atomic_write_json(args.out, report)
    print(f"{concept}: judge/probe-judge rate {report['before']} -> Receler {report['after']}; under textual "
          f"inversion {report['textual_inversion']['rates']}; under {adv.text[0]!r} {report['adversarial_prompt']['rates']}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
