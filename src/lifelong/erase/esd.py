"""ESD: Erased Stable Diffusion (Gandikota et al., "Erasing Concepts from Diffusion Models", ICCV 2023).

Fine-tune the model so that its noise prediction for the concept c is the frozen model's prediction
guided *away* from c (negative classifier-free guidance):

    eps*(x_t, c, t) = eps0(x_t, t) - eta [eps0(x_t, c, t) - eps0(x_t, t)]
    L = || eps_theta(x_t, c, t) - eps*(x_t, c, t) ||^2

where eps0 is the frozen original and x_t is drawn from the model being trained: DDIM from pure noise,
guided by c (scale `start_guidance`), stopped after a random number of steps, so the loss is applied
where the model would go when asked for c. ESD-x trains cross-attention only (`train_method` xattn:
erases the concept when it is named, keeps the rest); ESD-u everything but cross-attention (noxattn:
erases the concept more globally, at more cost to other concepts).

Official recipe (rohitgandikota/erasing, train-esd.py): eta (`negative_guidance`) 1, `start_guidance`
3, 1000 iterations of batch 1, Adam lr 1e-5, 50 DDIM steps for x_t, one prompt drawn per iteration from
the concept's words. Here:
  - the embedded model has 4.6M parameters (SD: 860M) and was trained at lr 2e-4, so the defaults are
    lr 1e-4, 200 iterations of batch 8 (1,600 prompt draws against the official 1,000), 25 DDIM steps
    for x_t: measured on the embedded model with `lifelong bench erase`. On Stable Diffusion pass the
    official ones (`--knob lr=1e-5 --knob iterations=1000 --knob batch_size=1 --knob ddim_steps=50`).
  - x_t's timestep is the one DDIM stopped at, as the official diffusers port (esd_diffusers.py) does;
    the original LDM script queried the UNet at the DDPM timestep round(1000 k / 50) after k DDIM steps
    from noise, a noise level that matches x_t's only half way.
  - the prompts are the concept's name and a few of its training captions (the request's `prompts`):
    the embedded model learned its concepts through caption templates; official ESD draws from the
    words it is given, which may be several.
  - `start_guidance` defaults to the embedded model's sampling guidance (3, as the official).
  - x_t is drawn under bfloat16 autocast (`sample_bf16`) where bf16 is fast (a CPU with AVX512-BF16 or AMX,
    a GPU: runtime.fast_bf16; about 2x faster there, many times slower where it is emulated): it only picks where
    the loss is applied, and drawing it is most of an iteration's time; the targets and the trained
    prediction stay fp32.
  - x_t is drawn with deterministic DDIM (eta 0) as in the official code, not with the ancestral sampler
    the project samples with by default (families.diffusion.DEFAULT_ETA).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field

import torch
from torch import nn
from tqdm import tqdm

from lifelong.erase.base import EraseRequest, prompt_batch, train_only
from lifelong.loop import check_finite, mean_ends
from lifelong.runtime import fast_bf16


@dataclass(frozen=True)
class Params:
    train_method: str = "xattn"    # xattn (ESD-x) or noxattn (ESD-u)
    negative_guidance: float = 1.0  # eta
    start_guidance: float = 3.0    # guidance of the DDIM run that draws x_t
    iterations: int = 200
    batch_size: int = 8
    lr: float = 1e-4               # Adam
    ddim_steps: int = 25           # DDIM schedule x_t is drawn on (stopped after a random number of steps)
    sample_bf16: bool = field(default_factory=fast_bf16)  # draw x_t under bf16 autocast where it is fast (runtime.fast_bf16)

    def __post_init__(self):
        if self.train_method not in ("xattn", "noxattn"):
            raise ValueError(f"train_method must be xattn (ESD-x) or noxattn (ESD-u), not {self.train_method!r}")
        if self.iterations < 1 or self.batch_size < 1 or self.ddim_steps < 1 or self.lr <= 0:
            raise ValueError("iterations, batch_size, ddim_steps and lr must be positive")


class ESD:
    name = "esd"
    records = "weights"
    Params = Params

    def __init__(self, params: Params = Params()):
        self.params = params

    def erase(self, model, request: EraseRequest, seed: int = 0, progress: bool = False) -> dict[str, float]:
        from diffusers import DDIMScheduler  # heavy optional dependency, at first use

        p = self.params
        frozen = copy.deepcopy(model.unet).eval().requires_grad_(False)  # eps0
        params = train_only(model.unet, p.train_method)
        optimizer = torch.optim.Adam(params, lr=p.lr)
        sampler = DDIMScheduler.from_config(model.scheduler.config)
        sampler.set_timesteps(p.ddim_steps)
        generator = torch.Generator().manual_seed(seed)
        empty = model.encode([""])
        size, channels = model.unet.config.sample_size, model.unet.config.in_channels
        losses = []
        model.unet.train()
        for step in tqdm(range(p.iterations), desc=f"erasing {request.concept!r} (ESD-{'x' if p.train_method == 'xattn' else 'u'})",
                         unit="it", disable=not progress):
            prompts = prompt_batch(request.prompts, p.batch_size, generator)
            cond = model.encode(prompts)  # (b, T, D)
            stop = int(torch.randint(p.ddim_steps, (1,), generator=generator))  # DDIM steps before x_t
            noise = torch.randn((p.batch_size, channels, size, size), generator=generator).to(model.device)
            with torch.no_grad():
                with torch.autocast(model.device.type, dtype=torch.bfloat16, enabled=p.sample_bf16):
                    x_t = model.denoise(noise * sampler.init_noise_sigma, cond, empty, sampler, sampler.timesteps[:stop],
                                        p.start_guidance).float()
                t = sampler.timesteps[stop]
                e_0 = frozen(x_t, t, encoder_hidden_states=empty.hidden.expand(p.batch_size, -1, -1),
                             encoder_attention_mask=None if empty.mask is None else empty.mask.expand(p.batch_size, -1)).sample
                e_p = frozen(x_t, t, encoder_hidden_states=cond.hidden, encoder_attention_mask=cond.mask).sample
                target = e_0 - p.negative_guidance * (e_p - e_0)
            loss = nn.functional.mse_loss(model.noise_prediction(x_t, t, cond), target)
            check_finite(loss, "ESD", step)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            losses.append(loss.item())
        model.unet.eval().requires_grad_(False)
        start, end = mean_ends(losses)
        return {"loss_start": start, "loss_end": end, "steps": float(p.iterations),
                "trainable_params": float(sum(q.numel() for q in params))}


def esd_x(**knobs) -> ESD:
    return ESD(Params(train_method="xattn", **knobs))


def esd_u(**knobs) -> ESD:
    return ESD(Params(train_method="noxattn", **knobs))
