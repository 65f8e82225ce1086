"""Speed of the embedded text-to-image model on this CPU: the training step and sampling, against the peak.

- Training step (batch 64, the embedded UNet of families/diffusion_arch.py): seconds per step in fp32 and
  under bf16 autocast, measured side by side in one process (alternating blocks, so load on the machine
  hits both alike); FLOPs per step counted as 3x the forward's (torch's FlopCounterMode on one forward).
- Sampling: images per second at 25 DDIM steps with classifier-free guidance (two UNet evaluations per
  step), batch 64, bf16 autocast as the training run uses; the prompts' text-encoder states are computed
  once and cached (TextToImage.encode), so sampling time is the UNet's.
- The peak: matmul GFLOP/s of a 2048x2048 product (fp32, and bf16 for the bf16 rows) on the same thread
  count, measured in this run.

    OMP_NUM_THREADS=1 python benchmarks/t2i_speed.py      # writes benchmarks/results/t2i_speed.json
"""

from __future__ import annotations

import json
import os
import statistics
import time
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode

from lifelong.families import diffusion_arch as arch
from lifelong.families.diffusion import build_pipeline
from lifelong.runtime import versions

OUT = Path(__file__).parent / "results" / "t2i_speed.json"
BATCH, BLOCKS, STEPS_PER_BLOCK = 64, 3, 3


def matmul_peak_gflops(n: int = 2048, repeats: int = 5, dtype=torch.float32) -> float:
    a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
    a @ b
    best = min(_timed(lambda: a @ b) for _ in range(repeats))
    return 2 * n**3 / best / 1e9


def _timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def training_step_factory(precision: str):
    torch.manual_seed(0)
    unet = arch.build_unet(arch.EMBEDDED_UNET_CONFIG).train()
    optimizer = torch.optim.AdamW(unet.parameters(), lr=1e-4)
    alphas = arch.build_noise_scheduler().alphas_cumprod
    g = torch.Generator().manual_seed(0)
    x0 = torch.rand((BATCH, 3, 32, 32), generator=g) * 2 - 1
    states = torch.randn((BATCH, 16, 384), generator=g)
    mask = torch.ones((BATCH, 16), dtype=torch.int64)

    def step() -> None:
        t = torch.randint(0, 1000, (BATCH,), generator=g)
        noise = torch.randn(x0.shape, generator=g)
        a = alphas[t].view(-1, 1, 1, 1)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16"):
            pred = unet(a.sqrt() * x0 + (1 - a).sqrt() * noise, t, encoder_hidden_states=states,
                        encoder_attention_mask=mask).sample
        loss = torch.nn.functional.mse_loss(pred.float(), noise)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    def forward_flops() -> int:
        with FlopCounterMode(display=False) as counter, torch.no_grad():
            unet(x0, torch.zeros(BATCH, dtype=torch.long), encoder_hidden_states=states, encoder_attention_mask=mask)
        return counter.get_total_flops()

    return step, forward_flops


def main() -> None:
    threads = torch.get_num_threads()
    peak = matmul_peak_gflops()
    bf16_peak = matmul_peak_gflops(dtype=torch.bfloat16)
    steps = {p: training_step_factory(p) for p in ("fp32", "bf16")}
    for step, _ in steps.values():
        step()  # warm-up
    times: dict[str, list[float]] = {p: [] for p in steps}
    for _ in range(BLOCKS):  # alternating blocks: the machine's load hits both precisions alike
        for p, (step, _) in steps.items():
            times[p].extend(_timed(step) for _ in range(STEPS_PER_BLOCK))
    step_flops = 3 * steps["fp32"][1]()
    training = {p: {"seconds_per_step": statistics.median(t), "gflops_per_s": step_flops / statistics.median(t) / 1e9}
                for p, t in times.items()}
    for p, row in training.items():
        row["fraction_of_matmul_peak"] = row["gflops_per_s"] / (peak if p == "fp32" else bf16_peak)

    # The shipped weights, else the training run's current EMA weights: the speed is the same.
    checkpoint = Path("checkpoints/t2i/checkpoint.safetensors")
    weights = "embedded" if not checkpoint.is_file() else str(checkpoint)
    sampling = None
    try:
        pipe = build_pipeline(weights)
    except Exception as e:  # noqa: BLE001 - no weights yet: the step time stands alone
        sampling = {"skipped": str(e)}
    if sampling is None:
        prompts = ["a photo of a sneaker"]
        pipe.encode(prompts + [""])  # cached: the text encoder runs once
        with torch.autocast("cpu", dtype=torch.bfloat16):
            pipe.sample(prompts, n=BATCH, seed=0, steps=2, batch_size=BATCH)  # warm-up
            seconds = _timed(lambda: pipe.sample(prompts, n=BATCH, seed=0, steps=25, batch_size=BATCH))
        sampling = {"weights": weights, "images": BATCH, "ddim_steps": 25, "unet_evaluations_per_step": 2, "seconds": seconds,
                    "images_per_second": BATCH / seconds}
    record = {"threads": threads, "omp_num_threads": os.environ.get("OMP_NUM_THREADS"), "batch": BATCH,
              "fp32_matmul_peak_gflops": peak, "bf16_matmul_peak_gflops": bf16_peak, "training_step_gflop": step_flops / 1e9, "training": training,
              "bf16_speedup": training["fp32"]["seconds_per_step"] / training["bf16"]["seconds_per_step"],
              "sampling": sampling, "versions": versions()}
    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.write_text(json.dumps(record, indent=2) + "\n")
    print(json.dumps({k: v for k, v in record.items() if k != "versions"}, indent=2))


if __name__ == "__main__":
    main()
