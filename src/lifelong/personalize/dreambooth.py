"""DreamBooth (Ruiz et al., "DreamBooth: Fine Tuning Text-to-Image Diffusion Models for Subject-Driven
Generation", CVPR 2023), and its LoRA variant.

The UNet is fine-tuned on the subject's images x with the prompt "a [V] [class]" ([V] a rare identifier),
plus class-specific prior preservation on images x_pr the frozen model drew from "a [class]" beforehand:

    L = E || eps - eps_theta(x_t, t, "a [V] [class]") ||^2  +  lambda E || eps' - eps_theta(x'_t, t', "a [class]") ||^2

The second term keeps what the model draws for the class (against language drift and overfitting);
`prior_loss_weight` lambda = 0 turns it off (registered as dreambooth-no-prior: the paper's ablation, which
draws no class images).

Official recipe (diffusers examples/dreambooth/train_dreambooth.py, the reference implementation the
authors point to; train_dreambooth_lora.py for LoRA): identifier "sks", `num_class_images` 100 (paper:
~1000) drawn by the frozen pipeline, `prior_loss_weight` 1, instance and class examples in one batch
(the loss split in two halves), AdamW lr 5e-6 (LoRA: 1e-4, rank 4 on the UNet's attention projections),
400-800 steps of batch 1-2, text encoder frozen by default. Here:
  - the identifier is the request's token written into the prompt as is (no new embedding: the paper
    relies on a token with a weak prior; a made-up word such as "<my-style>" tokenizes into existing
    pieces, which `personalize` names when the word itself names a known concept).
  - `class_images` 32 drawn with 25-step DDIM at the model's guidance; `steps` 200 of batch 4 + 4, Adam lr
    1e-4 for the full UNet (the embedded model has 4.6M parameters and was trained at 2e-4), 1e-3 for LoRA;
    no weight decay, no flips.
  - LoRA (`lora=True`, registered as dreambooth-lora): peft LoRA through `TextToImage.add_lora` on every
    attention projection (to_q, to_k, to_v, to_out.0) of the UNet, rank 4, alpha = rank, A drawn from the
    seed; the ledger records its factors.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from tqdm import tqdm

from lifelong.loop import check_finite, mean_ends
from lifelong.personalize.base import PersonalizeRequest, class_images, freeze_all, image_batch


@dataclass(frozen=True)
class Params:
    steps: int = 200
    batch_size: int = 4            # subject images per step (as many class images join them)
    lr: float = 1e-4               # Adam; 1e-3 suits LoRA
    prior_loss_weight: float = 1.0  # lambda; 0 = no prior preservation
    class_images: int = 32
    ddim_steps: int = 25           # for drawing the class images
    lora: bool = False
    rank: int = 4
    alpha: float = 4.0

    def __post_init__(self):
        if min(self.steps, self.batch_size, self.class_images, self.ddim_steps, self.rank) < 1 or self.lr <= 0:
            raise ValueError("steps, batch_size, class_images, ddim_steps, rank and lr must be positive")
        if self.prior_loss_weight < 0:
            raise ValueError("prior_loss_weight must be >= 0")


class DreamBooth:
    name = "dreambooth"
    adds_token = False
    Params = Params

    def __init__(self, params: Params = Params()):
        self.params = params

    def personalize(self, model, request: PersonalizeRequest, seed: int = 0, progress: bool = False) -> dict[str, float]:
        p = self.params
        prior = p.prior_loss_weight > 0
        if prior and not request.class_word:
            raise ValueError("DreamBooth's prior preservation needs the subject's class (--class letter), or "
                             "prior_loss_weight=0")
        generator = torch.Generator().manual_seed(seed)
        x_class = class_images(model, request.class_prompt, p.class_images, seed, p.ddim_steps) if prior else None
        freeze_all(model)
        if p.lora:
            with torch.random.fork_rng(devices=[]):  # LoRA's A from the seed, the caller's generator untouched
                torch.manual_seed(seed)
                model.add_lora(rank=p.rank, alpha=p.alpha)
            params = [q for n, q in model.unet.named_parameters() if "lora_" in n]
        else:
            params = list(model.unet.parameters())
        for q in params:
            q.requires_grad_(True)
        optimizer = torch.optim.Adam(params, lr=p.lr)
        x0 = model.encode_images(request.images)  # (N, C, h, w)
        instance = model.encode([request.instance_prompt] * p.batch_size)
        klass = model.encode([request.class_prompt] * p.batch_size) if prior else None
        losses, prior_losses = [], []
        model.unet.train()
        for step in tqdm(range(p.steps), desc=f"DreamBooth{'-LoRA' if p.lora else ''} of {request.token}", unit="step",
                         disable=not progress):
            loss = model.denoising_loss(image_batch(x0, p.batch_size, generator), instance, generator)
            if prior:
                prior_loss = model.denoising_loss(image_batch(x_class, p.batch_size, generator), klass, generator)
                prior_losses.append(prior_loss.item())
                total = loss + p.prior_loss_weight * prior_loss
            else:
                total = loss
            check_finite(total, "DreamBooth", step)
            optimizer.zero_grad(set_to_none=True)
            total.backward()
            optimizer.step()
            losses.append(loss.item())
        model.unet.eval().requires_grad_(False)
        first, last = mean_ends(losses)
        stats = {"loss_start": first, "loss_end": last, "steps": float(p.steps),
                 "trainable_params": float(sum(q.numel() for q in params))}
        if prior_losses:
            stats["prior_loss_start"], stats["prior_loss_end"] = mean_ends(prior_losses)
        return stats
