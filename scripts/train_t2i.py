"""Train the project's embedded text-to-image diffusion model, resumably, on real captioned 32x32 images.

What it trains: the 4.6 M-parameter conditional UNet of lifelong.families.diffusion_arch (DDPM, 1000
cosine steps, epsilon prediction), conditioned on frozen all-MiniLM-L6-v2 token states, on the pool of
lifelong.data.captioned (Fashion-MNIST objects, MNIST digits, letters in type styles and ink colours,
openclipart drawings; the held-out font, clip-art category, synonyms and templates are never used).

How (defaults = the real run):
  * AdamW lr 2e-4, linear warm-up over 500 steps, then cosine decay to 10% of the peak at the last step
    (a decaying rate lets the EMA weights settle); batch 64; 20,000 steps; gradient clipping at 1.0.
  * 10% of captions are replaced by "" (the unconditional prompt) for classifier-free guidance.
  * EMA of the weights, decay min(0.999, (1 + step) / (10 + step)) (warm-up so early EMA is not stale).
  * The text encoder never runs during training: every distinct training caption is encoded once, in
    one pass, and the (n_captions, 16, 384) states are kept in memory and in lifelong.cache.
  * bf16 autocast (`--precision bf16`, default): measured 0.93 s/step against 1.78 s/step in fp32 on one
    thread of a CPU with AVX512-BF16, batch 64. On a CPU without it (AVX2 only) bf16 is emulated and about
    100 s/step: use `--precision fp32` there (a resumed run may switch precision; logged in train.log).

Exact resume: all per-step randomness (batch images, caption choice, caption dropout, timesteps, noise)
comes from a torch.Generator seeded by (seed, step), and the learning rate is a function of the step, so
a run resumed from a checkpoint reproduces the uninterrupted run bit for bit (same torch build and thread
count). The checkpoint (`<out-dir>/checkpoint.safetensors`, written atomically every --checkpoint-minutes,
on SIGTERM/SIGINT and at the end) holds model weights, EMA weights and AdamW state (exp_avg, exp_avg_sq,
step per parameter); its metadata holds the step, the config JSON, the cumulative training seconds and a
digest of the training data. Re-running the same command resumes from it automatically. A changed config
is refused, except precision and the total steps (RESUMABLE_CHANGES: said and logged); changed data, e.g.
letters rendered by another FreeType, is warned about and logged. A NaN/inf loss stops the run with an error
and leaves the last good checkpoint in place.

Devices: `--device auto` (default) trains on CUDA when there is one, else the CPU. The batches are drawn on
the CPU either way (the same per-step generator), so a run can move between a CPU and a GPU on resume (not
bit-identical then: another device's arithmetic); train.log names the device of every line.

Outputs in --out-dir (default checkpoints/t2i): train.log (a JSON line every 50 steps: step, mean loss
of the last 50, lr, grad_norm, seconds/step, cumulative elapsed seconds), samples/step_XXXXX.png (EMA
samples of fixed prompts, DDIM 25 steps, guidance 3, every --sample-every steps), and at the end
final_ema_fp16.safetensors (EMA weights in fp16, config in metadata). TensorBoard scalars go to
--project-dir (default runs/t2i) unless --log-with none.

Example (one thread, in the background; the same command continues an interrupted run):
  OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 nohup .venv/bin/python scripts/train_t2i.py > /tmp/t2i.out 2>&1 &
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import math
import signal
import sys
import time
from collections import deque
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save

from lifelong.atomic import atomic_write_bytes
from lifelong.cache import cached, content_key
from lifelong.errors import ConfigError, TrainingDivergedError
from lifelong.families import diffusion_arch as arch
from lifelong.families.diffusion import DEFAULT_ETA, TextStates, TextToImage
from lifelong.fingerprint import tensor_digest

CHECKPOINT = "checkpoint.safetensors"
FINAL = "final_ema_fp16.safetensors"
FORMAT = "lifelong-t2i-checkpoint-v1"

DEFAULT_CONFIG: dict = {
    "seed": 0,
    "total_steps": 20_000,
    "batch_size": 64,
    "lr": 2e-4,
    "lr_final_ratio": 0.1,
    "warmup_steps": 500,
    "weight_decay": 0.01,
    "caption_dropout": 0.1,
    "ema_decay": 0.999,
    "grad_clip": 1.0,
    "precision": "bf16",
    # share of each batch per kind: the clip-art pool is small, uniform sampling over images would starve it
    "kind_weights": {"object": 0.3, "digit": 0.2, "letter-style": 0.3, "clipart": 0.2},
    "unet": arch.EMBEDDED_UNET_CONFIG,
}

# Fixed monitoring prompts (all are training captions); two noise seeds each.
SAMPLE_PROMPTS = (
    "a photo of a sneaker",
    "a photo of a dress",
    "a handwritten digit 3",
    "the number seven",
    "a red letter A in serif type",
    "the letter G in calligraphic type in blue",
    "a drawing of a flower",
    "a drawing of a house",
)


@dataclass
class RunOptions:
    """How a run is observed and saved; none of it changes the trained weights."""

    checkpoint_minutes: float = 10.0
    sample_every: int = 2000  # 0: no sample grids
    log_every: int = 50
    log_with: str | None = "tensorboard"
    project_dir: str = "runs/t2i"
    progress: bool = True
    device: str = "cpu"  # "cpu", "cuda" or "auto" (cuda when there is one); the batches are drawn on the CPU either way


@dataclass
class TrainData:
    """Everything training reads, already in memory.

    images          uint8 (N, H, W, 3)
    weights         float (N,) sampling weight of each image (sums to 1)
    concept_ids     int64 (N,)
    caption_table   int64 (n_concepts, C_max): caption indices per concept, padded with 0
    caption_counts  int64 (n_concepts,): how many of a row are real
    states, masks   float32 (n_captions, T, D), int64 (n_captions, T); caption 0 is "" (unconditional)
    sample_states, sample_masks  the same for SAMPLE_PROMPTS (None: no sample grids)
    """

    images: torch.Tensor
    weights: torch.Tensor
    concept_ids: torch.Tensor
    caption_table: torch.Tensor
    caption_counts: torch.Tensor
    states: torch.Tensor
    masks: torch.Tensor
    sample_states: torch.Tensor | None = None
    sample_masks: torch.Tensor | None = None

    def digest(self) -> str:
        """SHA-256 of what training draws from: a resumed run must see the same data."""
        return tensor_digest({"images": self.images, "weights": self.weights, "concept_ids": self.concept_ids,
                              "caption_table": self.caption_table, "caption_counts": self.caption_counts,
                              "states": self.states, "masks": self.masks})


def prepare_real_data(config: dict) -> TrainData:
    """The captioned training pool and its caption states (encoded once, then from lifelong.cache)."""
    from lifelong.data import captioned

    images, concept_ids, concepts = captioned.load_pool("train")
    captions = [""]
    index = {"": 0}
    rows = []
    for concept in concepts:
        row = []
        for text in captioned.train_captions(concept):
            if text not in index:
                index[text] = len(captions)
                captions.append(text)
            row.append(index[text])
        rows.append(row)
    table = torch.zeros((len(rows), max(map(len, rows))), dtype=torch.int64)
    for i, row in enumerate(rows):
        table[i, : len(row)] = torch.tensor(row)
    counts = torch.tensor([len(r) for r in rows])

    texts = captions + list(SAMPLE_PROMPTS)
    weights_file = arch.text_encoder_dir() / "model.safetensors"
    key = content_key("t2i-captions", str(weights_file), weights_file.stat().st_size, arch.MAX_TOKENS, texts)

    def encode() -> dict[str, torch.Tensor]:
        states, masks = arch.encode_prompts(texts)
        return {"states": states, "masks": masks}

    encoded = cached("t2i-caption-states", key, encode)
    n = len(captions)

    kinds = np.array([concepts[c].kind for c in concept_ids])
    weights = np.zeros(len(kinds))
    for kind, share in config["kind_weights"].items():
        members = kinds == kind
        weights[members] = share / members.sum()
    return TrainData(
        images=torch.from_numpy(images),
        weights=torch.from_numpy(weights / weights.sum()),
        concept_ids=torch.from_numpy(concept_ids),
        caption_table=table,
        caption_counts=counts,
        states=encoded["states"][:n],
        masks=encoded["masks"][:n],
        sample_states=encoded["states"][n:],
        sample_masks=encoded["masks"][n:],
    )


# Settings a resumed run may change, said and logged. precision: the arithmetic of a step, not the recipe (bf16
# autocast is 2x faster than fp32 on a CPU with AVX512-BF16 but about 50x slower without it, emulated, so a run
# moved to another CPU may need to switch). total_steps: a run lengthened or cut short (not below the steps
# done); the learning rate follows the new schedule from the next step on.
RESUMABLE_CHANGES = {"precision", "total_steps"}


def learning_rate(config: dict, step: int) -> float:
    """Linear warm-up to `lr`, then cosine decay to `lr * lr_final_ratio` at `total_steps`."""
    peak, warmup, total = config["lr"], config["warmup_steps"], config["total_steps"]
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    floor = peak * config["lr_final_ratio"]
    return floor + (peak - floor) * 0.5 * (1 + math.cos(math.pi * progress))


def step_batch(data: TrainData, config: dict, step: int):
    """The batch of `step`, a pure function of (seed, step): x0 (B,3,H,W) in [-1,1], noise, timesteps,
    caption indices (B,) into data.states (0 = dropped to "")."""
    g = torch.Generator().manual_seed((config["seed"] << 32) + step)
    b = config["batch_size"]
    idx = torch.multinomial(data.weights, b, replacement=True, generator=g)  # (B,)
    concept = data.concept_ids[idx]
    pick = (torch.rand(b, generator=g, dtype=torch.float64) * data.caption_counts[concept]).long()
    caption = data.caption_table[concept, pick]
    dropped = torch.rand(b, generator=g) < config["caption_dropout"]
    caption = torch.where(dropped, torch.zeros_like(caption), caption)
    timesteps = torch.randint(0, arch.SCHEDULER_CONFIG["num_train_timesteps"], (b,), generator=g)
    x0 = data.images[idx].permute(0, 3, 1, 2).float() / 127.5 - 1  # (B, 3, H, W)
    noise = torch.randn(x0.shape, generator=g)
    return x0, noise, timesteps, caption


def diffusion_loss(model, alphas: torch.Tensor, data: TrainData, batch, autocast=contextlib.nullcontext):
    """Epsilon-prediction MSE of `model` on `batch` (from step_batch); `alphas` = cumulative alphas (1000,)."""
    x0, noise, timesteps, caption = batch
    a = alphas[timesteps].view(-1, 1, 1, 1)
    noisy = a.sqrt() * x0 + (1 - a).sqrt() * noise  # q(x_t | x_0), (B, 3, H, W)
    with autocast():
        pred = model(noisy, timesteps, encoder_hidden_states=data.states[caption],
                     encoder_attention_mask=data.masks[caption]).sample
    return torch.nn.functional.mse_loss(pred.float(), noise)


# --- checkpoints ----------------------------------------------------------------------------------


def save_checkpoint(path: Path, model, ema: dict, optimizer, step: int, config: dict, elapsed: float,
                    data_digest: str) -> None:
    """Model, EMA and flattened AdamW state as named tensors; step, config, elapsed seconds and the
    training data's digest as metadata."""
    tensors = {f"model.{k}": v.detach().cpu().clone() for k, v in model.state_dict().items()}
    tensors.update({f"ema.{k}": v.cpu().clone() for k, v in ema.items()})
    state = optimizer.state_dict()["state"]
    for i, (name, _) in enumerate(model.named_parameters()):
        if i in state:
            for field in ("exp_avg", "exp_avg_sq", "step"):
                tensors[f"adam.{name}.{field}"] = state[i][field].detach().cpu().clone().reshape(-1)
    metadata = {"format": FORMAT, "step": str(step), "config": json.dumps(config, sort_keys=True),
                "elapsed_seconds": repr(elapsed), "data_digest": data_digest}
    atomic_write_bytes(path, save(tensors, metadata))


def load_checkpoint(path: Path, model, optimizer) -> tuple[dict, int, float, dict]:
    """Restore model and AdamW from `path`; returns (EMA tensors, step, elapsed seconds, metadata)."""
    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:
        metadata = f.metadata()
    tensors = load_file(str(path))
    model.load_state_dict({k[6:]: v for k, v in tensors.items() if k.startswith("model.")})
    ema = {k[4:]: v for k, v in tensors.items() if k.startswith("ema.")}
    opt_state = optimizer.state_dict()
    for i, (name, _) in enumerate(model.named_parameters()):
        if f"adam.{name}.step" in tensors:
            p_shape = dict(model.named_parameters())[name].shape
            opt_state["state"][i] = {
                "step": tensors[f"adam.{name}.step"].reshape(()),
                "exp_avg": tensors[f"adam.{name}.exp_avg"].reshape(p_shape),
                "exp_avg_sq": tensors[f"adam.{name}.exp_avg_sq"].reshape(p_shape),
            }
    optimizer.load_state_dict(opt_state)
    return ema, int(metadata["step"]), float(metadata["elapsed_seconds"]), metadata


def save_final(path: Path, ema: dict, config: dict, step: int) -> None:
    tensors = {k: v.to("cpu", torch.float16) for k, v in ema.items()}
    metadata = {"format": "lifelong-t2i-ema-fp16-v1", "step": str(step), "config": json.dumps(config, sort_keys=True)}
    atomic_write_bytes(path, save(tensors, metadata))


def save_sample_grid(path: Path, model, ema: dict, data: TrainData) -> None:
    """EMA samples of SAMPLE_PROMPTS (2 noise seeds each): one PNG, 2 rows x 8 columns, each image at 2x."""
    from PIL import Image

    # the sampler `lifelong generate` uses, on the EMA weights and the cached caption states
    # on the CPU whatever the training device (a few seconds): the noise and sampler are the CPU ones
    cpu_ema = {k: v.cpu() for k, v in ema.items()}
    pipeline = TextToImage(None, None, arch.ema_copy(model, cpu_ema).cpu(), arch.build_sampler(), text_attention_mask=True)
    n = data.sample_states.shape[0]
    noise, step_noise = pipeline.draw_noise(2 * n, 1234, 25, DEFAULT_ETA)
    cond = TextStates(data.sample_states.repeat(2, 1, 1), data.sample_masks.repeat(2, 1))  # (2n, T, D)
    images = pipeline.sample_states(cond, TextStates(data.states[:1], data.masks[:1]), noise, steps=25, guidance=3.0,
                                    batch_size=2 * n, eta=DEFAULT_ETA, step_noise=step_noise)  # (2n, H, W, 3)
    h, w = images.shape[1:3]
    grid = images.reshape(2, n, h, w, 3).transpose(0, 2, 1, 3, 4).reshape(2 * h, n * w, 3)
    image = Image.fromarray(grid).resize((n * w * 2, 2 * h * 2), Image.NEAREST)
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", optimize=True)
    atomic_write_bytes(path, buffer.getvalue())


# --- the loop -------------------------------------------------------------------------------------


class _StopRequest:
    """Turns SIGTERM/SIGINT into a flag the loop checks after each step (then checkpoints and exits)."""

    def __init__(self):
        self.signal: int | None = None
        self._previous = {}

    def __enter__(self):
        for sig in (signal.SIGTERM, signal.SIGINT):
            self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, _frame):
        self.signal = signum

    def __exit__(self, *exc):
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


def train(config: dict, out_dir: str | Path, stop_after: int | None = None, data: TrainData | None = None,
          options: RunOptions | None = None) -> int:
    """Train (or resume) to config["total_steps"]; returns the step reached.

    `stop_after`: stop after this many steps in this call (checkpoint written), as a kill would; used by
    tests and for short trial runs. `data`: the training data (default: the real captioned pool).
    """
    from accelerate import Accelerator
    from tqdm import tqdm

    options = options or RunOptions()
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    ckpt_path = out_dir / CHECKPOINT
    config = json.loads(json.dumps(config))  # the JSON form is the identity compared on resume
    data = data if data is not None else prepare_real_data(config)
    data_digest = data.digest()

    if options.device == "cuda" and not torch.cuda.is_available():
        raise ConfigError("--device cuda: no CUDA device here (use --device auto or cpu)")
    accelerator = Accelerator(
        cpu=options.device == "cpu" or not torch.cuda.is_available(),
        mixed_precision="bf16" if config["precision"] == "bf16" else "no",
        log_with=None if options.log_with in (None, "none") else options.log_with,
        project_dir=options.project_dir,
    )
    torch.manual_seed(config["seed"])
    model = arch.build_unet(config["unet"])
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=config["lr"], weight_decay=config["weight_decay"])
    noise_scheduler = arch.build_noise_scheduler()
    alphas = noise_scheduler.alphas_cumprod  # (1000,)

    step, elapsed_before = 0, 0.0
    ema = {k: v.detach().clone() for k, v in model.state_dict().items()}
    if ckpt_path.exists():
        ema, step, elapsed_before, metadata = load_checkpoint(ckpt_path, model, optimizer)
        saved = json.loads(metadata["config"])
        differing = sorted(k for k in set(saved) | set(config) if saved.get(k) != config.get(k))
        if set(differing) - RESUMABLE_CHANGES:
            raise ConfigError(f"{ckpt_path} was trained with a different config ({', '.join(differing)}): "
                              f"rerun with the same settings to resume, or choose another --out-dir")
        if config["total_steps"] < step:
            raise ConfigError(f"--steps {config['total_steps']}: {ckpt_path} has already trained {step} steps")
        for key in differing:  # how the steps are computed, not what is trained: allowed, said and logged
            warning = {"step": step, "event": f"{key}_changed", "checkpoint": saved.get(key), "now": config[key]}
            print(f"warning: resuming with {key} {config[key]!r} (the checkpoint's steps used {saved.get(key)!r}); "
                  "not bit-identical to an uninterrupted run", file=sys.stderr)
            with open(out_dir / "train.log", "a") as log:
                log.write(json.dumps(warning) + "\n")
        if metadata["data_digest"] != data_digest:
            # e.g. another Pillow/FreeType renders the letters differently: training goes on, but no longer
            # bit-identical to the uninterrupted run. Said on stderr and recorded in train.log.
            warning = {"step": step, "event": "data_changed", "checkpoint_data": metadata["data_digest"],
                       "data": data_digest}
            print(f"warning: the training data differ from the checkpoint's ({warning}); resuming anyway, "
                  f"not bit-identical to an uninterrupted run", file=sys.stderr)
            with open(out_dir / "train.log", "a") as log:
                log.write(json.dumps(warning) + "\n")
        print(f"resuming from {ckpt_path} at step {step} ({elapsed_before / 3600:.2f} h trained)", file=sys.stderr)
    # Several processes (accelerate launch): every process draws the same global batch (a function of the
    # step) and trains on every world-th item of it; DDP averages the gradients, so the update is the one
    # process's update up to float rounding. One process: its share is the whole batch.
    rank, world = accelerator.process_index, accelerator.num_processes
    if config["batch_size"] % world:
        raise ConfigError(f"--batch-size {config['batch_size']} must be a multiple of the {world} processes")
    main_process = accelerator.is_main_process
    model, optimizer = accelerator.prepare(model, optimizer)  # model and AdamW state onto the device
    unwrapped = accelerator.unwrap_model(model)
    device = accelerator.device
    ema = {k: v.to(device) for k, v in ema.items()}
    alphas = alphas.to(device)
    on_device = replace(data, states=data.states.to(device), masks=data.masks.to(device))
    if options.log_with not in (None, "none"):
        accelerator.init_trackers("t2i", config={k: v if isinstance(v, (int, float, str)) else json.dumps(v)
                                                 for k, v in config.items()})

    total = config["total_steps"]
    end = total if stop_after is None else min(total, step + stop_after)
    session_start = last_save = time.monotonic()
    losses: deque[float] = deque(maxlen=options.log_every)
    window_start, window_steps = time.monotonic(), 0
    progress = tqdm(total=total, initial=step, disable=not options.progress, mininterval=30, unit="step")

    def elapsed() -> float:
        return elapsed_before + time.monotonic() - session_start

    def checkpoint() -> None:
        if main_process:  # the processes hold identical weights, EMA and optimizer state
            save_checkpoint(ckpt_path, unwrapped, ema, optimizer, step, config, elapsed(), data_digest)

    with _StopRequest() as stop:
        while step < end:
            lr = learning_rate(config, step)
            for group in optimizer.param_groups:
                group["lr"] = lr
            share = tuple(t[rank::world].to(device) for t in step_batch(data, config, step))
            loss = diffusion_loss(model, alphas, on_device, share, accelerator.autocast)
            if not torch.isfinite(loss):
                kept = f"the last good checkpoint {ckpt_path} is kept" if ckpt_path.exists() else "no checkpoint yet"
                raise TrainingDivergedError(
                    f"loss became {loss.item()} at step {step}; {kept}. The same settings draw the same batches "
                    f"and would diverge again: start over in a new --out-dir with a lower --lr or --precision fp32.")
            accelerator.backward(loss)
            grad_norm = float(accelerator.clip_grad_norm_(model.parameters(), config["grad_clip"]))
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            decay = min(config["ema_decay"], (1 + step) / (10 + step))
            with torch.no_grad():
                for name, p in unwrapped.named_parameters():
                    ema[name].lerp_(p.detach(), 1 - decay)
            step += 1
            losses.append(loss.item())
            window_steps += 1
            progress.update(1)

            if step % options.log_every == 0 and main_process:
                now = time.monotonic()
                record = {"step": step, "loss": sum(losses) / len(losses), "lr": lr, "grad_norm": grad_norm,
                          "sec_per_step": (now - window_start) / window_steps, "elapsed_seconds": elapsed(),
                          "processes": world, "items_per_process": len(share[0]), "device": device.type}
                with open(out_dir / "train.log", "a") as log:
                    log.write(json.dumps(record) + "\n")
                accelerator.log({k: v for k, v in record.items() if k not in ("step", "processes", "items_per_process")},
                                step=step)
                progress.set_postfix(loss=f"{record['loss']:.4f}", s_per_step=f"{record['sec_per_step']:.2f}")
                window_start, window_steps = now, 0
            if options.sample_every and step % options.sample_every == 0 and data.sample_states is not None and main_process:
                save_sample_grid(out_dir / "samples" / f"step_{step:05d}.png", unwrapped, ema, data)
                window_start = time.monotonic()  # keep sampling time out of seconds/step
            if stop.signal is not None:
                checkpoint()
                print(f"signal {stop.signal}: checkpoint at step {step} written to {ckpt_path}", file=sys.stderr)
                break
            if time.monotonic() - last_save >= options.checkpoint_minutes * 60:
                checkpoint()
                last_save = time.monotonic()
    progress.close()
    if step == end:
        checkpoint()
    if step >= total and main_process:
        save_final(out_dir / FINAL, ema, config, step)
    accelerator.end_training()
    return step


def synthetic_tiny_data() -> TrainData:
    """24 16x16 images of 3 concepts (a coloured square each), 2 captions per concept + "" (index 0), with
    random caption states of the tiny UNet's width: training runs in seconds, no text encoder loaded."""
    g = torch.Generator().manual_seed(0)
    concept_ids = torch.arange(24) % 3
    images = torch.full((24, 16, 16, 3), 255, dtype=torch.uint8)
    for i, c in enumerate(concept_ids.tolist()):
        x, y = torch.randint(0, 8, (2,), generator=g).tolist()
        images[i, y : y + 8, x : x + 8, c] = 0
    n_captions, tokens, dim = 7, 4, arch.tiny_unet_config()["cross_attention_dim"]
    masks = torch.ones((n_captions, tokens), dtype=torch.int64)
    masks[0, 1:] = 0
    return TrainData(images=images, weights=torch.full((24,), 1 / 24, dtype=torch.float64), concept_ids=concept_ids,
                     caption_table=torch.tensor([[1, 2], [3, 4], [5, 6]]), caption_counts=torch.tensor([2, 2, 2]),
                     states=torch.randn((n_captions, tokens, dim), generator=g), masks=masks)


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """The module docstring as written, and every option's default."""


def parse_args(argv=None) -> tuple[dict, argparse.Namespace]:
    d = DEFAULT_CONFIG
    parser = argparse.ArgumentParser(
        description=__doc__,
        epilog="Run it again with the same arguments to resume from <out-dir>/checkpoint.safetensors; "
               "changing a training setting (lr, batch, seed, ...) is refused on resume; precision and --steps may change.",
        formatter_class=_HelpFormatter,
    )
    parser.add_argument("--out-dir", default="checkpoints/t2i", help="checkpoint, train.log, samples, final weights")
    parser.add_argument("--steps", type=int, default=d["total_steps"], help="total optimizer steps of the run")
    parser.add_argument("--batch-size", type=int, default=d["batch_size"], help="images per optimizer step")
    parser.add_argument("--lr", type=float, default=d["lr"], help="peak AdamW learning rate")
    parser.add_argument("--warmup", type=int, default=d["warmup_steps"], help="linear warm-up steps")
    parser.add_argument("--seed", type=int, default=d["seed"], help="model init and every per-step draw")
    parser.add_argument("--precision", choices=("bf16", "fp32"), default=d["precision"],
                        help="bf16 autocast (about 1.9x faster on this CPU) or full fp32")
    parser.add_argument("--caption-dropout", type=float, default=d["caption_dropout"],
                        help='share of captions replaced by "" (unconditional) for classifier-free guidance')
    parser.add_argument("--ema-decay", type=float, default=d["ema_decay"],
                        help="EMA decay after warm-up; the samples and final weights are the EMA ones")
    parser.add_argument("--checkpoint-minutes", type=float, default=10.0, help="checkpoint interval (wall clock)")
    parser.add_argument("--sample-every", type=int, default=2000, help="steps between EMA sample grids; 0: none")
    parser.add_argument("--log-every", type=int, default=50, help="steps between train.log lines")
    parser.add_argument("--log-with", choices=("tensorboard", "none"), default="tensorboard",
                        help="Accelerate tracker for the train.log scalars")
    parser.add_argument("--project-dir", default="runs/t2i", help="TensorBoard event files")
    parser.add_argument("--stop-after", type=int, default=None,
                        help="stop (with a checkpoint) after this many steps of this session: trial runs")
    parser.add_argument("--no-progress", action="store_true", help="no tqdm bar")
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto",
                        help="where the steps run (auto: CUDA when there is one); the batches are drawn on the CPU "
                        "either way, so a run may move between devices on resume (not bit-identical then)")
    parser.add_argument("--synthetic-tiny", action="store_true",
                        help="not a real run: the tiny UNet on a tiny synthetic pool (coloured squares, random caption "
                        "states), for the multi-process test")
    args = parser.parse_args(argv)
    config = dict(d, total_steps=args.steps, batch_size=args.batch_size, lr=args.lr, warmup_steps=args.warmup,
                  seed=args.seed, precision=args.precision, caption_dropout=args.caption_dropout,
                  ema_decay=args.ema_decay)
    return config, args


def main(argv=None) -> int:
    config, args = parse_args(argv)
    options = RunOptions(checkpoint_minutes=args.checkpoint_minutes, sample_every=args.sample_every,
                         log_every=args.log_every, log_with=args.log_with, project_dir=args.project_dir,
                         progress=not args.no_progress, device=args.device)
    try:
        data = None
        if args.synthetic_tiny:
            config, data = dict(config, unet=arch.tiny_unet_config()), synthetic_tiny_data()
        step = train(config, args.out_dir, stop_after=args.stop_after, data=data, options=options)
    except (ConfigError, TrainingDivergedError) as e:
        print(f"error: {e}", file=sys.stderr)
        return e.exit_code
    print(f"stopped at step {step} of {config['total_steps']}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
