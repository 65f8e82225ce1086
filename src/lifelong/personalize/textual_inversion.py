"""Textual Inversion (Gal et al., "An Image is Worth One Word: Personalizing Text-to-Image Generation
using Textual Inversion", ICLR 2023; arXiv 2208.01618).

One new token S* is added to the vocabulary; its embedding v* is the only thing that learns, with the
model's own denoising loss on the subject's images x and prompts from neutral templates holding S*:

    v* = argmin_v  E_{x, eps, t, template} || eps - eps_theta(x_t, t, c_theta(template.format(S*); v)) ||^2

Everything else (UNet, text encoder, the other rows of the embedding table) stays frozen, so the model's
behaviour on every prompt without S* is bit-identical. The text encoder runs with gradients while v*
trains: `TextToImage.encode` recomputes the states whenever a text-encoder parameter requires grad.

Official recipe (diffusers examples/textual_inversion/textual_inversion.py, which the authors' LDM code
matches in the loss): `imagenet_templates_small` for objects ("a photo of a {}", ...) or
`imagenet_style_templates_small` for styles ("a painting in the style of {}", ...), v* initialised from a
one-token initializer word, AdamW (weight decay 1e-2) at lr 5e-4 scaled by batch x accumulation
(`--scale_lr`), 3000 steps of batch 1 x 4 accumulation (paper: 5000 steps, batch 4 x 2 GPUs, lr 5e-3),
every row but v*'s restored after each step (`index_no_updates`), random horizontal flips. Here:
  - the templates are a short list that mixes the object and the style templates, each with S* alone
    (the class word is not in the prompt, as in the paper); `initializer` defaults to the request's class
    word (its first token), else the mean embedding row.
  - `steps` 300 of batch 8, lr 5e-3 unscaled (CPU: the embedded model has 4.6M parameters and 32 px
    images); no flips (letters and digits are not mirror-symmetric).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from tqdm import tqdm

from lifelong.loop import check_finite, mean_ends
from lifelong.personalize.base import (
    PersonalizeRequest,
    freeze_all,
    image_batch,
    restore_rows,
)

# From diffusers' imagenet_templates_small and imagenet_style_templates_small (a few of each).
TEMPLATES = (
    "a photo of a {}", "a rendering of a {}", "a cropped photo of the {}", "the photo of a {}",
    "a close-up photo of a {}", "a good photo of the {}", "a photo of one {}", "a rendition of a {}",
    "a painting in the style of {}", "a rendering in the style of {}", "a picture in the style of {}",
    "{}",
)


@dataclass(frozen=True)
class Params:
    steps: int = 300
    batch_size: int = 8
    lr: float = 5e-3
    weight_decay: float = 1e-2  # AdamW, as diffusers' script (on the whole table; the other rows are restored)
    initializer: str = ""       # "" = the request's class word

    def __post_init__(self):
        if self.steps < 1 or self.batch_size < 1 or self.lr <= 0 or self.weight_decay < 0:
            raise ValueError("steps, batch_size and lr must be positive, weight_decay >= 0")


class TextualInversion:
    name = "ti"
    adds_token = True
    Params = Params

    def __init__(self, params: Params = Params()):
        self.params = params

    def personalize(self, model, request: PersonalizeRequest, seed: int = 0, progress: bool = False) -> dict[str, float]:
        p = self.params
        generator = torch.Generator().manual_seed(seed)
        (token_id,) = model.add_tokens([request.token], initializers=[p.initializer or request.class_word])
        freeze_all(model)
        weight = model.token_embeddings().weight
        original = weight.detach().clone()
        weight.requires_grad_(True)  # the table is one Parameter; rows other than v* are put back after each step
        optimizer = torch.optim.AdamW([weight], lr=p.lr, weight_decay=p.weight_decay)
        x0 = model.encode_images(request.images)  # (N, C, h, w)
        losses = []
        try:
            for step in tqdm(range(p.steps), desc=f"textual inversion of {request.token}", unit="step", disable=not progress):
                picks = torch.randint(len(TEMPLATES), (p.batch_size,), generator=generator).tolist()
                states = model.encode([TEMPLATES[i].format(request.token) for i in picks])  # recomputed: v* trains
                loss = model.denoising_loss(image_batch(x0, p.batch_size, generator), states, generator)
                check_finite(loss, "Textual Inversion", step)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                restore_rows(weight, original, [token_id])
                losses.append(loss.item())
        finally:
            weight.requires_grad_(False)
            model.clear_cache()
        first, last = mean_ends(losses)
        return {"loss_start": first, "loss_end": last, "steps": float(p.steps), "trainable_params": float(weight.shape[1])}
