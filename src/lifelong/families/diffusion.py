"""The `diffusion` family: a text-to-image model as one `TextToImage`, whatever the checkpoint.

It offers what erasure and personalization need: the cross-attention K/V projections
(`cross_attention_kv`, changed by UCE and Ablating Concepts), the token embeddings (`token_embeddings`,
trained by Textual Inversion), prompt states (`encode`, kept in memory for fixed prompts), the UNet's
prediction and training loss (`noise_prediction`, `denoising_loss`), seeded sampling (`sample`), LoRA
through peft (`add_lora` on the UNet, `add_text_lora` on the text encoder's attention projections) and a
diffusers export (`export`). `build_pipeline(name)` builds "embedded"
(the project's pixel-space model of diffusion_arch: src/lifelong/assets/t2i_ema_fp16.safetensors, else
the checkpoints/t2i/final_ema_fp16.safetensors scripts/train_t2i.py writes), a train_t2i.py .safetensors
file (its EMA weights), a StableDiffusionPipeline folder (an `export` too) or hub id, and "tiny-embedded" /
"tiny-sd" (random, for tests).

Which diffusers classes: `UNet2DConditionModel` predicts the noise (or v); `AutoencoderKL` maps images
to latents and back (Stable Diffusion; None for the embedded model, whose x is the image in [-1, 1]);
`DDIMScheduler` noises for training and samples with classifier-free guidance,
eps = eps("") + g (eps(prompt) - eps("")), by default with eta 1 and the noise re-derived from the clipped
x0 (`DEFAULT_ETA`): DDPM's ancestral sampler on the DDIM timesteps, with every step's noise drawn up front
so that a seed gives the same images in any batch size. Deterministic DDIM (eta 0) draws the embedded model
badly: on six prompts x 8 seeds at 25 steps the judge saw the prompted concept in 4% of DDIM's samples and in
46% of DDPM's (benchmarks/results/t2i_samplers.json); a small, short-trained model's noise predictions
leave residual texture that only fresh noise at each step washes out. The embedded model reads its 16 text positions through an
attention mask over the padding, as it was trained; Stable Diffusion reads all 77 unmasked, as diffusers does.
"""

from __future__ import annotations

import copy
import json
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file
from tokenizers.pre_tokenizers import ByteLevel
from torch import nn
from tqdm import tqdm

from lifelong.assets import PACKAGE_ASSETS
from lifelong.atomic import atomic_write_json
from lifelong.config import ModelConfig
from lifelong.errors import ConfigError, DataNotFoundError
from lifelong.families import diffusion_arch as arch
from lifelong.fingerprint import tensor_digest

EMBEDDED_ASSET = PACKAGE_ASSETS / "t2i_ema_fp16.safetensors"
TRAINING_DIR = Path("checkpoints/t2i")  # scripts/train_t2i.py's default --out-dir, relative to where it runs
# The safetensors formats train_t2i.py writes -> the prefix of the EMA weights inside.
T2I_FORMATS = {"lifelong-t2i-checkpoint-v1": "ema.", "lifelong-t2i-ema-fp16-v1": ""}
EMBEDDED_GUIDANCE = 3.0  # the scale train_t2i.py's sample grids use
SD_GUIDANCE = 7.5  # StableDiffusionPipeline's default
DEFAULT_ETA = 1.0  # ancestral sampling (DDPM's posterior noise at each DDIM step); 0: deterministic DDIM
EXPORT_MANIFEST = "lifelong_t2i.json"  # what diffusers' folder does not say: the text mask, the default guidance
LORA_TARGETS = ("to_q", "to_k", "to_v", "to_out.0")  # every attention projection, self and cross
# The text encoder's self-attention projections: CLIP's (Stable Diffusion) and BERT's (the embedded model's MiniLM).
TEXT_LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "out_proj", "query", "key", "value", "attention.output.dense")
HUB_ID = re.compile(r"^[\w.-]+/[\w.-]+$")


@dataclass(frozen=True)
class TextStates:
    """What cross-attention reads for a batch of prompts."""

    hidden: torch.Tensor  # (B, T, D) the text encoder's last hidden states
    mask: torch.Tensor | None  # (B, T) 1 on real tokens; None: every position is read (Stable Diffusion)

    def __getitem__(self, rows) -> TextStates:
        return TextStates(self.hidden[rows], None if self.mask is None else self.mask[rows])

    @staticmethod
    def cat(parts: list[TextStates]) -> TextStates:
        mask = None if parts[0].mask is None else torch.cat([p.mask for p in parts])
        return TextStates(torch.cat([p.hidden for p in parts]), mask)


class TextToImage(nn.Module):
    """Tokenizer + text encoder + UNet + DDIM scheduler (+ VAE for latent models). The text encoder and
    VAE are frozen; the UNet's parameters train unless `add_lora` freezes them.

    An nn.Module over its networks, so that a ledger's patches name parameters as `unet.<name>` and
    `text_encoder.<name>` (`named_parameters`, `state_dict`) like any other model's."""

    def __init__(self, tokenizer, text_encoder: nn.Module, unet: nn.Module, scheduler, vae: nn.Module | None = None,
                 *, text_attention_mask: bool = False, guidance: float = SD_GUIDANCE):
        super().__init__()
        self.tokenizer, self.scheduler = tokenizer, scheduler
        self.text_encoder, self.unet, self.vae = text_encoder, unet, vae
        self.text_attention_mask = text_attention_mask
        self.guidance = guidance  # the default classifier-free guidance scale of `sample`
        self._states: dict[str, TextStates] = {}  # prompt -> its (1, T, D) states while the text encoder is frozen
        for frozen in (text_encoder, vae):
            if frozen is not None:
                frozen.eval().requires_grad_(False)
        unet.eval()

    @property
    def device(self) -> torch.device:
        return self.unet.device

    def train(self, mode: bool = True) -> TextToImage:
        """Only the UNet switches mode: the frozen text encoder and VAE stay in eval (no dropout)."""
        self.training = mode
        self.unet.train(mode)
        return self

    # -- where the layers are

    def cross_attention_kv(self) -> dict[str, nn.Linear]:
        """The text-side key and value projections of every cross-attention layer (diffusers' `attn2.to_k`,
        `attn2.to_v`), by module name; under LoRA, the wrapped base Linear."""
        return {name: getattr(module, "base_layer", module) for name, module in self.unet.named_modules()
                if name.endswith(("attn2.to_k", "attn2.to_v"))}

    def token_embeddings(self) -> nn.Embedding:
        """The text encoder's input token embeddings (vocabulary x width)."""
        return self.text_encoder.get_input_embeddings()

    def token_ids(self, text: str) -> list[int]:
        """The ids `text` tokenizes to, without the special tokens around it."""
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    @torch.no_grad()
    def add_tokens(self, tokens: list[str], embeddings: torch.Tensor | None = None,
                   initializers: list[str] | None = None) -> list[int]:
        """Add `tokens` to the tokenizer's vocabulary and one row each to the text encoder's token embeddings
        (Textual Inversion's placeholder, Custom Diffusion's modifier token); returns their ids. A row is
        `embeddings[i]` (K, D) when given, else the embedding of the first token of `initializers[i]` (the
        papers' initializer word), else the mean row. The text encoder stays frozen; cached states are dropped."""
        if embeddings is not None and len(embeddings) != len(tokens):
            raise ValueError(f"{len(tokens)} tokens but {len(embeddings)} embedding rows")
        rows = self.token_embeddings().weight
        sources = []
        for i in range(len(tokens)):
            if embeddings is not None:
                sources.append(embeddings[i].to(rows.dtype))
            elif initializers and self.token_ids(initializers[i]):
                sources.append(rows[self.token_ids(initializers[i])[0]].clone())
            else:
                sources.append(rows.mean(0))
        self.tokenizer.add_tokens(list(tokens))
        ids = [self.token_ids(t) for t in tokens]
        if any(len(i) != 1 for i in ids):
            raise ConfigError(f"the tokenizer did not take {tokens} as single tokens (it reads them as {ids})")
        ids = [i[0] for i in ids]
        if max(ids) >= len(rows):
            with torch.random.fork_rng(devices=[]):  # its random init of the new rows (overwritten) leaves the caller's generator alone
                self.text_encoder.resize_token_embeddings(max(ids) + 1, mean_resizing=False)
        weight = self.token_embeddings().weight
        for i, row in zip(ids, sources):
            weight[i] = row
        self.text_encoder.requires_grad_(False)  # a resized embedding comes back trainable
        self.clear_cache()
        return ids

    @property
    def image_size(self) -> int:
        """The side of the square images the model draws and trains on (pixels)."""
        size = self.unet.config.sample_size
        if self.vae is not None:
            size *= 2 ** (len(self.vae.config.block_out_channels) - 1)
        return size

    # -- text, noise, loss

    def encode(self, prompts: list[str]) -> TextStates:
        """The states of `prompts`: (B, T, D), T = the tokenizer's model_max_length (16 embedded, 77 SD).

        While no text-encoder parameter trains, each prompt is encoded once and kept in memory (the ""
        of guidance, a concept's prompts, probe prompts). While one trains (Textual Inversion), states
        are recomputed with gradients and the memory is dropped. After changing a frozen text encoder's
        weights in place, call `clear_cache()`."""
        if any(p.requires_grad for p in self.text_encoder.parameters()):
            self._states.clear()
            return self._run_text_encoder(prompts)
        missing = list(dict.fromkeys(p for p in prompts if p not in self._states))
        if missing:
            with torch.no_grad():
                fresh = self._run_text_encoder(missing)
            self._states.update({p: fresh[i : i + 1] for i, p in enumerate(missing)})
        return TextStates.cat([self._states[p] for p in prompts])

    def clear_cache(self) -> None:
        self._states.clear()

    def _run_text_encoder(self, prompts: list[str]) -> TextStates:
        tokens = self.tokenizer(list(prompts), padding="max_length", truncation=True,
                                max_length=self.tokenizer.model_max_length, return_tensors="pt")
        mask = tokens["attention_mask"].to(self.device) if self.text_attention_mask else None  # (B, T)
        hidden = self.text_encoder(input_ids=tokens["input_ids"].to(self.device), attention_mask=mask).last_hidden_state
        return TextStates(hidden, mask)

    def noise_prediction(self, x_t: torch.Tensor, t, states: TextStates) -> torch.Tensor:
        """The UNet's output (B, C, h, w) for noisy x_t at timestep(s) t (a scalar or (B,)): the noise, or v
        for a v-prediction model (`scheduler.config.prediction_type`)."""
        return self.unet(x_t, t, encoder_hidden_states=states.hidden, encoder_attention_mask=states.mask).sample

    def encode_images(self, images) -> torch.Tensor:
        """Clean x0 (B, C, h, w) of uint8 images (B, H, W, 3): the pixels in [-1, 1] for the embedded
        model; for a latent model the VAE's mean latent (not a draw), times its scaling factor."""
        x = torch.as_tensor(np.asarray(images)).to(self.device).permute(0, 3, 1, 2).float() / 127.5 - 1  # (B, 3, H, W)
        if self.vae is None:
            return x
        with torch.no_grad():
            return self.vae.encode(x).latent_dist.mode() * self.vae.config.scaling_factor  # (B, 4, H/f, W/f)

    def decode(self, x0: torch.Tensor) -> np.ndarray:
        """uint8 images (B, H, W, 3) of clean x0 (B, C, h, w)."""
        with torch.no_grad():
            if self.vae is not None:
                x0 = self.vae.decode(x0 / self.vae.config.scaling_factor).sample  # (B, 3, H, W)
            return ((x0.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()

    def denoising_loss(self, x0: torch.Tensor, states: TextStates, generator: torch.Generator | None = None):
        """The DDPM training loss: MSE between the UNet's output on x_t ~ q(x_t | x0) and its target (the
        noise, or v), at timesteps drawn uniformly from the training schedule."""
        b = x0.shape[0]
        t = torch.randint(0, self.scheduler.config.num_train_timesteps, (b,), generator=generator).to(self.device)
        noise = torch.randn(x0.shape, generator=generator).to(self.device)
        x_t = self.scheduler.add_noise(x0, noise, t)
        v = self.scheduler.config.prediction_type == "v_prediction"
        target = self.scheduler.get_velocity(x0, noise, t) if v else noise
        return nn.functional.mse_loss(self.noise_prediction(x_t, t, states).float(), target.float())

    # -- sampling

    def draw_noise(self, count: int, seed: int, steps: int, eta: float) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The starting noise (count, C, h, w) and, for eta > 0, every step's noise (steps, count, C, h, w), in that
        order from one CPU generator seeded with `seed`."""
        size, channels = self.unet.config.sample_size, self.unet.config.in_channels
        generator = torch.Generator().manual_seed(seed)
        noise = torch.randn((count, channels, size, size), generator=generator)
        return noise, (torch.randn((steps, *noise.shape), generator=generator) if eta > 0 else None)

    @torch.no_grad()
    def sample(self, prompts: str | list[str], n: int = 1, seed: int = 0, steps: int = 25,
               guidance: float | None = None, batch_size: int = 16, progress: bool = False,
               eta: float | None = None) -> np.ndarray:
        """`n` images per prompt, uint8 (len(prompts) * n, H, W, 3), prompt-major, with classifier-free
        guidance (`guidance`, default `self.guidance`), in batches of `batch_size`. `eta` (default
        DEFAULT_ETA, 1: ancestral sampling, DDPM's noise at every step) 0 is deterministic DDIM.

        All noise, the starting noise and (eta > 0) every step's, is drawn first, on the CPU, from a
        generator seeded with `seed`: a seed gives the same images on every call (on another device or batch
        size, the same up to float rounding)."""
        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        eta = DEFAULT_ETA if eta is None else eta
        check_sampling(prompts, n, steps, guidance, eta)
        noise, step_noise = self.draw_noise(len(prompts) * n, seed, steps, eta)
        cond = self.encode(prompts)[torch.arange(len(prompts)).repeat_interleave(n)]  # (N, T, D)
        return self.sample_states(cond, self.encode([""]), noise, steps, guidance, batch_size, progress, eta, step_noise)

    @torch.no_grad()
    def sample_states(self, cond: TextStates, uncond: TextStates, noise: torch.Tensor, steps: int = 25,
                      guidance: float | None = None, batch_size: int = 16, progress: bool = False, eta: float = 0.0,
                      step_noise: torch.Tensor | None = None) -> np.ndarray:
        """Sampling from the starting `noise` (N, C, h, w) with classifier-free guidance between the prompt
        states `cond` (N rows) and the empty prompt's `uncond` (1 row): uint8 (N, H, W, 3). With eta > 0,
        `step_noise` (steps, N, C, h, w) is each step's added noise (`draw_noise` draws both). What `sample`
        runs after encoding; the training script calls it with its cached caption states."""
        if eta > 0 and (step_noise is None or step_noise.shape[:2] != (steps, len(noise))):
            raise ValueError(f"eta {eta} needs step_noise of shape ({steps}, {len(noise)}, C, h, w)")
        from diffusers import DDIMScheduler  # heavy optional dependency, at first use

        guidance = self.guidance if guidance is None else guidance
        sampler = DDIMScheduler.from_config(self.scheduler.config)  # a fresh one: set_timesteps changes its state
        sampler.set_timesteps(steps)
        was_training = self.unet.training
        self.unet.eval()
        images = []
        batches = range(0, len(noise), batch_size)
        bar = tqdm(total=steps * len(batches), desc="denoising", unit="step", disable=not progress)
        for start in batches:
            x = noise[start : start + batch_size].to(self.device) * sampler.init_noise_sigma
            b = len(x)
            extra = step_noise[:, start : start + b] if eta > 0 else None
            x = self.denoise(x, cond[start : start + b], uncond, sampler, sampler.timesteps, guidance, bar.update, eta, extra)
            images.append(self.decode(x))
        bar.close()
        self.unet.train(was_training)
        return np.concatenate(images)

    def denoise(self, x: torch.Tensor, cond: TextStates, uncond: TextStates, sampler, timesteps, guidance: float,
                after_step=None, eta: float = 0.0, step_noise: torch.Tensor | None = None) -> torch.Tensor:
        """Steps of the DDIM `sampler` (set_timesteps done) at `timesteps` (a prefix of sampler.timesteps to stop
        early, as ESD does to draw its x_t) from x (b, C, h, w), with classifier-free guidance between `cond`
        (b rows) and `uncond` (1 row); with eta > 0, step i adds `step_noise[i]` (b, C, h, w) scaled by DDIM's
        sigma. Gradients flow only if the caller enables them.

        The noise direction is re-derived from the clipped x0 (`use_clipped_model_output`), so x0 and the noise
        agree: with eta 1 each step is then exactly DDPM's ancestral step (posterior mean from the clipped x0,
        variance `fixed_small`), tested against `DDPMScheduler.step`; diffusers' DDIM otherwise mixes the clipped
        x0 with the unclipped noise."""
        b = len(x)
        both = TextStates.cat([uncond[[0] * b], cond])  # (2b, T, D): "" then the prompts
        for i, t in enumerate(timesteps):
            pred = self.noise_prediction(sampler.scale_model_input(torch.cat([x, x]), t), t, both)  # (2b, C, h, w)
            pred_uncond, pred_text = pred.chunk(2)
            guided = pred_uncond + guidance * (pred_text - pred_uncond)
            noise = step_noise[i].to(x.device) if eta > 0 else None
            x = sampler.step(guided, t, x, eta=eta, use_clipped_model_output=True, variance_noise=noise).prev_sample
            if after_step is not None:
                after_step()
        return x

    # -- adapters and export

    def add_lora(self, rank: int = 4, alpha: float = 4.0, targets: tuple[str, ...] = LORA_TARGETS,
                 init: str | bool = "gaussian") -> None:
        """LoRA (peft, through diffusers' `add_adapter`) on the UNet's modules named `targets`, initialised
        as diffusers' LoRA training scripts do (`init` "gaussian": A Gaussian, B zero; True: peft's default, A
        Kaiming-uniform, B zero); afterwards only LoRA parameters train."""
        from peft import LoraConfig  # heavy optional dependency, imported at first use

        names = [name for name, _ in self.unet.named_modules()]
        unmatched = [t for t in targets if not any(n == t or n.endswith("." + t) for n in names)]
        if unmatched:
            raise ConfigError(f"LoRA targets {unmatched} match no UNet module; its attention projections are "
                              f"{', '.join(LORA_TARGETS)} (self-attention attn1, cross-attention attn2)")
        self.unet.requires_grad_(False)
        self.unet.add_adapter(LoraConfig(r=rank, lora_alpha=alpha, init_lora_weights=init,
                                         target_modules=list(targets)))

    def text_attention_projections(self) -> dict[str, nn.Linear]:
        """The text encoder's self-attention projections (TEXT_LORA_TARGETS: query, key, value, output), by module
        name in the text encoder; under LoRA, the wrapped base Linear."""
        return {name: getattr(module, "base_layer", module) for name, module in self.text_encoder.named_modules()
                if any(name == t or name.endswith("." + t) for t in TEXT_LORA_TARGETS)}

    def add_text_lora(self, rank: int = 4, alpha: float = 4.0, init: str | bool = True) -> None:
        """LoRA (peft, through transformers' `add_adapter`) on every self-attention projection of the text encoder
        (`text_attention_projections`), A Kaiming-uniform and B zero by default; afterwards only those LoRA
        parameters of the text encoder train, and `encode` recomputes the states while they do (freeze the text
        encoder again and `clear_cache()` after training)."""
        from peft import LoraConfig  # heavy optional dependency, imported at first use

        names = list(self.text_attention_projections())
        targets = [t for t in TEXT_LORA_TARGETS if any(n == t or n.endswith("." + t) for n in names)]
        if not targets:
            raise ConfigError(f"the text encoder ({type(self.text_encoder).__name__}) has none of the attention "
                              f"projections LoRA is put on ({', '.join(TEXT_LORA_TARGETS)})")
        self.text_encoder.requires_grad_(False)
        self.text_encoder.add_adapter(LoraConfig(r=rank, lora_alpha=alpha, init_lora_weights=init,
                                                 target_modules=targets))
        self.clear_cache()

    def export(self, folder: str | Path) -> Path:
        """A StableDiffusionPipeline folder (model_index.json, unet/, text_encoder/, tokenizer/, scheduler/,
        vae/ for latent models) plus lifelong_t2i.json, into a new or empty folder; LoRA is merged in.
        `build_pipeline(folder)` loads it back; so does diffusers (pass vae=None for the embedded model,
        whose images need no VAE: sample it here, the pipeline's __call__ assumes one)."""
        from diffusers import DDIMScheduler, StableDiffusionPipeline  # heavy optional dependency, at first use

        out = Path(folder)
        if out.exists() and (not out.is_dir() or any(out.iterdir())):
            raise ConfigError(f"cannot export into {out}: it exists and is not an empty folder")
        unet = self.unet
        if getattr(unet, "peft_config", None):  # merge into a copy: the live model keeps its LoRA
            unet = copy.deepcopy(unet)
            unet.fuse_lora()
            unet.unload_lora()
        # The pipeline's constructor would force steps_offset=1 and clip_sample off (with a warning each); the
        # pixel-space model samples with clip_sample on: its own scheduler is saved over the pipeline's.
        scheduler = DDIMScheduler.from_config(self.scheduler.config, steps_offset=1, clip_sample=False)
        StableDiffusionPipeline(vae=self.vae, text_encoder=self.text_encoder, tokenizer=self.tokenizer, unet=unet,
                                scheduler=scheduler, safety_checker=None, feature_extractor=None,
                                requires_safety_checker=False).save_pretrained(out)
        self.scheduler.save_pretrained(out / "scheduler")
        atomic_write_json(out / EXPORT_MANIFEST, {"text_attention_mask": self.text_attention_mask,
                                                  "guidance": self.guidance})
        return out


def check_sampling(prompts: list[str], n: int, steps: int, guidance: float | None, eta: float = DEFAULT_ETA) -> None:
    """Refuse what `sample` cannot draw, with the flag `lifelong generate` takes for it."""
    if not prompts or any(not p.strip() for p in prompts):
        raise ConfigError("the prompt is empty: say what to draw, e.g. --prompt 'a photo of a sneaker'")
    if n < 1:
        raise ConfigError(f"-n {n}: the number of images must be at least 1")
    if steps < 1:
        raise ConfigError(f"--steps {steps}: the number of denoising steps must be at least 1 (25 is usual)")
    if guidance is not None and guidance < 0:
        raise ConfigError(f"--guidance {guidance}: the guidance scale must be >= 0 (0: the unconditional model, "
                          "1: the prompt alone, above 1: further toward the prompt)")
    if not 0 <= eta <= 1:
        raise ConfigError(f"--eta {eta}: DDIM's eta is in [0, 1] (0: deterministic DDIM, 1: ancestral, DDPM's noise "
                          "at every step, the default)")


# ---------------------------------------------------------------------------------------------
# Builders


def build_pipeline(name: str) -> TextToImage:
    """The model called `name` (see the module docstring)."""
    builders = {"embedded": embedded, "tiny-embedded": tiny_embedded, "tiny-sd": tiny_sd}
    if name in builders:
        return builders[name]()
    path = Path(name).expanduser()
    if name.endswith(".safetensors"):
        if not path.is_file():
            raise ConfigError(f"model {name!r}: no such file")
        return embedded(path)
    if path.is_dir():
        return from_folder(path)
    if HUB_ID.match(name):
        return from_folder(download(name))
    raise ConfigError(f"model {name!r} is none of: embedded, a scripts/train_t2i.py .safetensors file, a diffusers "
                      "StableDiffusionPipeline folder, a hub id (owner/name), tiny-embedded, tiny-sd")


def embedded(weights: Path | None = None) -> TextToImage:
    """The project's model: the UNet of train_t2i.py's `weights` (default `embedded_weights()`) reading
    all-MiniLM-L6-v2's masked token states, sampled with DDIM on the training betas (clip_sample on)."""
    from transformers import AutoModel, AutoTokenizer  # heavy optional dependency, imported at first use

    weights = weights or embedded_weights()
    unet = unet_from_safetensors(weights)
    tokenizer = AutoTokenizer.from_pretrained(arch.text_encoder_dir(), model_max_length=arch.MAX_TOKENS)
    text_encoder = AutoModel.from_pretrained(arch.text_encoder_dir())
    if unet.config.cross_attention_dim != text_encoder.config.hidden_size:
        raise ConfigError(f"the UNet in {weights} reads {unet.config.cross_attention_dim}-dim text states, not "
                          f"all-MiniLM-L6-v2's {text_encoder.config.hidden_size} (a test run's checkpoint?)")
    return TextToImage(tokenizer, text_encoder, unet, arch.build_sampler(), text_attention_mask=True,
                       guidance=EMBEDDED_GUIDANCE)


def embedded_weights() -> Path:
    """The shipped EMA weights, else those train_t2i.py wrote at its end; neither: how to finish the training."""
    final = TRAINING_DIR / "final_ema_fp16.safetensors"
    for path in (EMBEDDED_ASSET, final):
        if path.is_file():
            return path
    checkpoint, reached = TRAINING_DIR / "checkpoint.safetensors", ""
    if checkpoint.is_file():
        meta = _metadata(checkpoint)
        total = json.loads(meta["config"])["total_steps"]
        reached = (f" It has reached step {meta['step']} of {total} ({checkpoint}); `--model {checkpoint}` samples "
                   "its current EMA weights meanwhile.")
    raise DataNotFoundError(
        f"the embedded text-to-image model is still being trained by scripts/train_t2i.py: neither {EMBEDDED_ASSET} "
        f"nor {final} exists.{reached} Continue the training from the project root with `OMP_NUM_THREADS=1 "
        ".venv/bin/python scripts/train_t2i.py` (it resumes from its checkpoint and writes the final weights at "
        "the end).")


def unet_from_safetensors(path: Path):
    """The UNet of a train_t2i.py file (a checkpoint or the final fp16 file) holding its EMA weights, in fp32."""

    meta = _metadata(path)
    if meta.get("format") not in T2I_FORMATS:
        raise ConfigError(f"{path} is not a checkpoint of scripts/train_t2i.py (its format is {meta.get('format')!r}, "
                          f"not one of {', '.join(T2I_FORMATS)})")
    prefix = T2I_FORMATS[meta["format"]]
    state = {k[len(prefix):]: v.float() for k, v in load_file(path).items() if k.startswith(prefix)}
    with torch.random.fork_rng(devices=[]):  # the random init (overwritten) leaves the caller's generator alone
        unet = arch.build_unet(json.loads(meta["config"])["unet"])
    unet.load_state_dict(state)
    return unet


def _metadata(path: Path) -> dict[str, str]:

    try:
        with safe_open(str(path), "pt") as f:
            return f.metadata() or {}
    except SafetensorError as e:
        raise ConfigError(f"{path} is not a readable safetensors file ({e})") from e


def from_folder(folder: Path) -> TextToImage:
    """A StableDiffusionPipeline folder (a hub snapshot, a save_pretrained folder, an `export`)."""
    from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel  # heavy optional dependency, at first use
    from transformers import AutoModel, AutoTokenizer  # heavy optional dependency, imported at first use

    index_file = folder / "model_index.json"
    if not index_file.is_file():
        raise ConfigError(f"{folder} is not a diffusers pipeline folder (it has no model_index.json); the diffusion "
                          "family loads StableDiffusionPipeline folders (save_pretrained, or `lifelong` exports)")
    index = json.loads(index_file.read_text())
    if index.get("_class_name") != "StableDiffusionPipeline":
        raise ConfigError(f"{folder} holds a {index.get('_class_name')}; the diffusion family loads "
                          "StableDiffusionPipeline folders")
    manifest = json.loads((folder / EXPORT_MANIFEST).read_text()) if (folder / EXPORT_MANIFEST).is_file() else {}
    vae = AutoencoderKL.from_pretrained(folder, subfolder="vae") if index.get("vae", [None])[0] else None
    # As StableDiffusionPipeline does: latents are not bounded to [-1, 1], so no clipping of the x0 estimate.
    clip = {} if vae is None else {"clip_sample": False}
    return TextToImage(AutoTokenizer.from_pretrained(folder / "tokenizer"),
                       AutoModel.from_pretrained(folder / "text_encoder"),
                       UNet2DConditionModel.from_pretrained(folder, subfolder="unet"),
                       DDIMScheduler.from_pretrained(folder, subfolder="scheduler", **clip), vae,
                       text_attention_mask=manifest.get("text_attention_mask", False),
                       guidance=manifest.get("guidance", SD_GUIDANCE))


def download(hub_id: str) -> Path:
    """The local snapshot of the hub's pipeline `hub_id` (diffusers' own download and cache)."""
    from diffusers import StableDiffusionPipeline  # heavy optional dependency, at first use

    try:
        return Path(StableDiffusionPipeline.download(hub_id))
    except OSError as e:
        raise ConfigError(
            f"model {hub_id!r} is not a local folder and could not be fetched from the Hugging Face hub (no network, "
            f"or no such pipeline: {str(e).splitlines()[0][:200]}). Where there is network, save it to a folder with "
            f"`python -c \"from diffusers import StableDiffusionPipeline as P; P.from_pretrained('{hub_id}')"
            f".save_pretrained('DIR')\"` and pass the folder: --model DIR") from e


def tiny_embedded() -> TextToImage:
    """The embedded model's design at toy size (random, seed 0): the tiny UNet of diffusion_arch, a
    1-layer 8-wide BERT behind all-MiniLM-L6-v2's tokenizer, pixel space, masked text. For tests only."""
    from transformers import AutoTokenizer, BertConfig, BertModel  # heavy optional dependency, imported at first use

    tokenizer = AutoTokenizer.from_pretrained(arch.text_encoder_dir(), model_max_length=arch.MAX_TOKENS)
    unet_config = arch.tiny_unet_config()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        unet = arch.build_unet(unet_config)
        text_encoder = BertModel(BertConfig(vocab_size=tokenizer.vocab_size, num_hidden_layers=1, num_attention_heads=2,
                                            hidden_size=unet_config["cross_attention_dim"], intermediate_size=16,
                                            max_position_embeddings=arch.MAX_TOKENS))
    return TextToImage(tokenizer, text_encoder, unet, arch.build_sampler(), text_attention_mask=True,
                       guidance=EMBEDDED_GUIDANCE)


def tiny_sd() -> TextToImage:
    """A Stable-Diffusion-shaped pipeline at toy size (random, seed 0), as diffusers' own pipeline tests
    build theirs: 4-channel 8x8 latents, a 2-level VAE (16x16 images), a 2-layer CLIP text model and a
    character-level CLIP tokenizer (16 positions), SD's scaled-linear betas. For tests only."""
    from diffusers import (  # heavy optional dependency, imported at first use
        AutoencoderKL,
        DDIMScheduler,
        UNet2DConditionModel,
    )
    from transformers import (  # heavy optional dependency, imported at first use
        CLIPTextConfig,
        CLIPTextModel,
        CLIPTokenizer,
    )

    # Every byte-level character, alone and word-final ("</w>"): any text tokenizes, one token a character.
    alphabet = sorted(ByteLevel.alphabet())
    vocab = {token: i for i, token in enumerate(["<|startoftext|>", "<|endoftext|>", *alphabet,
                                                 *(c + "</w>" for c in alphabet)])}
    tokenizer = CLIPTokenizer(vocab=vocab, merges=[], model_max_length=16)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        unet = UNet2DConditionModel(sample_size=8, in_channels=4, out_channels=4, block_out_channels=(8, 16),
                                    layers_per_block=1, down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
                                    up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), cross_attention_dim=16,
                                    attention_head_dim=2, norm_num_groups=4)
        vae = AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(8, 16),
                            down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
                            norm_num_groups=4)
        text_encoder = CLIPTextModel(CLIPTextConfig(vocab_size=len(vocab), hidden_size=16, intermediate_size=32,
                                                    num_hidden_layers=2, num_attention_heads=2,
                                                    max_position_embeddings=16, bos_token_id=0, eos_token_id=1,
                                                    pad_token_id=1))
    scheduler = DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False,
                              set_alpha_to_one=False, steps_offset=1)
    return TextToImage(tokenizer, text_encoder, unet, scheduler, vae)


# ---------------------------------------------------------------------------------------------
# The registry's functions


def build(config: ModelConfig, class_names: tuple[str, ...] = ()) -> tuple[TextToImage, object]:
    pipeline = build_pipeline(config.name)
    return pipeline, pipeline.tokenizer


def fingerprint(model: TextToImage) -> str:
    """SHA-256 of the UNet's and the text encoder's state (name, dtype, shape, bytes of every tensor)."""
    state = {f"unet.{k}": v for k, v in model.unet.state_dict().items()}
    state.update({f"text_encoder.{k}": v for k, v in model.text_encoder.state_dict().items()})
    return tensor_digest(state, b"diffusion")


def validate_config(model: ModelConfig, methods: tuple[str, ...]) -> None:
    """The image-classifier knobs of ModelConfig do not apply; no learning method runs on this family."""
    default = ModelConfig()
    for key in ("resolution", "trainable_blocks", "train_text_projection", "hidden_sizes"):
        if getattr(model, key) != getattr(default, key):
            raise ConfigError(f"model.{key} applies to the image-classifying families, not model.family=diffusion")
    if methods:
        raise ConfigError(f"{', '.join(methods)}: no learning method runs on model.family=diffusion (it generates)")
