"""Which sampler draws the embedded text-to-image model best: judge rates of the same prompts and noise.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/t2i_samplers.py [--model checkpoints/t2i/checkpoint.safetensors]

Six prompts of four kinds, 8 seeded samples each (the same starting noise for every sampler), guidance 3;
the judge's rate (%) of the prompted concept per sampler: deterministic DDIM (eta 0) at 25 and 100 steps,
DDIM with eta 1 at 25 steps (TextToImage.sample(eta=1)), and DDPM's ancestral sampler at 25 and 100
steps. Writes benchmarks/results/t2i_samplers.json.
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
SAMPLERS = [("ddim", 25, 0.0), ("ddim", 100, 0.0), ("ddim", 25, 1.0), ("ddpm", 25, None), ("ddpm", 100, None)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="checkpoints/t2i/checkpoint.safetensors")
    parser.add_argument("--n", type=int, default=8)
    args = parser.parse_args()
    from diffusers import DDIMScheduler, DDPMScheduler

    model, judge = build_pipeline(args.model), J.load_judge()
    targets = [c for c in PROMPTS for _ in range(args.n)]
    cond = model.encode([PROMPTS[c] for c in targets])
    both = TextStates.cat([model.encode([""])[[0] * len(targets)], cond])
    noise = torch.randn((len(targets), 3, 32, 32), generator=torch.Generator().manual_seed(0))
    rows = []
    for kind, steps, eta in SAMPLERS:
        sampler = (DDIMScheduler if kind == "ddim" else DDPMScheduler).from_config(model.scheduler.config)
        sampler.set_timesteps(steps)
        generator, x, t0 = torch.Generator().manual_seed(1), noise.clone(), time.perf_counter()
        with torch.no_grad():
            for t in sampler.timesteps:
                uncond, text = model.noise_prediction(torch.cat([x, x]), t, both).chunk(2)
                guided = uncond + model.guidance * (text - uncond)
                step = sampler.step(guided, t, x, eta=eta, generator=generator) if kind == "ddim" else \
                    sampler.step(guided, t, x, generator=generator)
                x = step.prev_sample
        seen = J.predicted_concepts(judge, model.decode(x))
        rows.append({"sampler": kind, "steps": steps, "eta": eta, "seconds": time.perf_counter() - t0,
                     "judge_rate": 100.0 * float(np.mean([s == c for s, c in zip(seen, targets)]))})
        print(rows[-1], flush=True)
    out = Path(__file__).parent / "results" / "t2i_samplers.json"
    atomic_write_json(out, {"model": args.model, "n_per_prompt": args.n, "guidance": model.guidance, "rows": rows,
                            "command": "OMP_NUM_THREADS=1 .venv/bin/python benchmarks/t2i_samplers.py"})


if __name__ == "__main__":
    main()
