"""Which sampler draws the embedded text-to-image model best: judge rates of the same prompts and noise.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/t2i_samplers.py [--model embedded] [--n 8]

Six prompts of four kinds, 8 seeded samples each (the same starting noise for every sampler), guidance 3;
the judge's rate (%) of the prompted concept per sampler:
  ddim         deterministic DDIM (eta 0), `TextToImage.denoise`
  ancestral    eta 1 with the noise re-derived from the clipped x0: the project's default sampler
               (families.diffusion.DEFAULT_ETA), which is DDPM's ancestral step (tests/test_diffusion.py)
  ddpm         diffusers' DDPMScheduler.step itself, as the reference for `ancestral` (its own noise draws)
at 25 steps, and the default at 50 and 100 steps. Writes benchmarks/results/t2i_samplers.json.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import torch

from lifelong.atomic import atomic_write_json
from lifelong.families.diffusion import TextStates, build_pipeline
from lifelong.metrics import judge as J

PROMPTS = {"object/sneaker": "a photo of a sneaker", "letter/A/serif/red": "the letter A in serif type in red",
           "digit/7": "the digit 7", "clipart/flower": "a drawing of a flower", "object/dress": "a photo of a dress",
           "letter/K/bold/blue": "a blue letter K in bold type"}
SAMPLERS = [("ddim", 25), ("ancestral", 25), ("ddpm", 25), ("ancestral", 50), ("ancestral", 100)]


def draw(model, kind: str, steps: int, noise: torch.Tensor, cond: TextStates, uncond: TextStates) -> torch.Tensor:
    from diffusers import DDIMScheduler, DDPMScheduler

    sampler = (DDPMScheduler if kind == "ddpm" else DDIMScheduler).from_config(model.scheduler.config)
    sampler.set_timesteps(steps)
    with torch.no_grad():
        if kind != "ddpm":
            eta = 1.0 if kind == "ancestral" else 0.0
            step_noise = torch.randn((steps, *noise.shape), generator=torch.Generator().manual_seed(1))
            return model.denoise(noise.clone(), cond, uncond, sampler, sampler.timesteps, model.guidance, eta=eta,
                                 step_noise=step_noise)
        x, generator, both = noise.clone(), torch.Generator().manual_seed(1), TextStates.cat([uncond[[0] * len(noise)], cond])
        for t in sampler.timesteps:
            pred_uncond, pred_text = model.noise_prediction(torch.cat([x, x]), t, both).chunk(2)
            x = sampler.step(pred_uncond + model.guidance * (pred_text - pred_uncond), t, x, generator=generator).prev_sample
        return x


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="embedded")
    parser.add_argument("--n", type=int, default=8)
    args = parser.parse_args()
    model, judge = build_pipeline(args.model), J.load_judge()
    targets = [c for c in PROMPTS for _ in range(args.n)]
    cond, uncond = model.encode([PROMPTS[c] for c in targets]), model.encode([""])
    noise = torch.randn((len(targets), 3, 32, 32), generator=torch.Generator().manual_seed(0))
    rows = []
    for kind, steps in SAMPLERS:
        t0 = time.perf_counter()
        seen = J.predicted_concepts(judge, model.decode(draw(model, kind, steps, noise, cond, uncond)))
        rows.append({"sampler": kind, "steps": steps, "seconds": time.perf_counter() - t0,
                     "judge_rate": 100.0 * float(np.mean([s == c for s, c in zip(seen, targets)]))})
        print(rows[-1], flush=True)
    out = Path(__file__).parent / "results" / "t2i_samplers.json"
    atomic_write_json(out, {"model": args.model, "n_per_prompt": args.n, "guidance": model.guidance, "rows": rows,
                            "threads": torch.get_num_threads(),
                            "command": f"OMP_NUM_THREADS=1 .venv/bin/python benchmarks/t2i_samplers.py --model {args.model} --n {args.n}"})


if __name__ == "__main__":
    main()
