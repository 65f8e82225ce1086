"""Receler: Reliable Concept Erasing of Text-to-Image Diffusion Models via Lightweight Erasers (Huang et al. 2023).

A lightweight eraser E_l after each cross-attention layer (modules/eraser_adapter.py: o_l <- o_l + E_l(o_l)),
trained with ESD's target, a concept-localized regulariser and adversarial prompts; the UNet stays frozen:

    eps*(x_t, c) = eps0(x_t) - eta [eps0(x_t, c) - eps0(x_t)]               ESD's target, eps0 = the model
                                                                             without the new erasers
    L_erase = || eps_E(x_t, [c; P_adv]) - eps*(x_t, c) ||^2                  on the prompt with the
                                                                             adversarial embeddings
    L_reg   = mean_l  sum_{hw} mean_C (E_l(o_l) * (1 - M))^2 / sum_{hw}(1 - M)
    L       = L_erase + lambda L_reg
    P_adv   = argmin_P || eps_E(x_t, [c; P]) - eps0(x_t, c) ||^2              (Adam lr 0.1, wd 0.1), alternated:
                                                                             `adversarial_iters` steps of P, then
                                                                             one step of the erasers

M is the concept's binarised cross-attention mask: eps0's attention probabilities on the concept's tokens,
averaged over heads, tokens and the layers of one resolution, min-max normalised per image and
thresholded at `mask_threshold`, resized (nearest) to every layer's resolution. The regulariser keeps the
erasers silent outside where the concept is drawn (locality); the adversarial prompt embeddings, put in
place of the text encoder's states after the prompt's last token, look for a prompt that brings the
concept back, and the erasers learn to erase under it (robustness).

Official recipe (jasper0314-huang/Receler, train_receler.py): eraser rank 128, 500 iterations of batch 1,
Adam lr 3e-4, 50 adversarial iterations per iteration, 16 adversarial embeddings per concept word
(initialised uniform in [0, 1)), lambda (`concept_reg_weight`) 0.1, mask threshold 0.1, mask from the
16x16 maps of SD's 64x64 latents, start guidance 3, eta 1, 50 DDIM steps. Here:
  - the adversarial embeddings reach the UNet. In the official code `emb_n[:, advrs_indices, :].data =
    advrs_prompt_embs[idx].data` writes into the copy that advanced indexing returns, so emb_n keeps the
    plain prompt's states: its attack steps take the gradient at the positions the embeddings should
    occupy but never use them, and the erasers train on the plain prompt. Here they are written in
    (`_with_adversary`), as the paper describes.
  - defaults for the embedded model (4.6M-parameter UNet, CPU): 200 iterations of batch 8 as ESD here
    (1,600 prompt draws against the official 500), 4 adversarial iterations per iteration (official 50),
    25 DDIM steps: 4.4 s per iteration on one CPU thread (`lifelong erase DIR --concept sneaker --method
    receler`, 15 min). Rank 128 as official (182k parameters, 4.0% of the embedded UNet; 3.7% of SD's).
    On Stable Diffusion pass the official ones: `iterations=500 batch_size=1 adversarial_iters=50
    ddim_steps=50`.
  - as many adversarial embeddings as fit: the embedded model reads 16 text positions, so a prompt of n
    tokens gets min(16, 15 - n) (positions after its last word token, its [SEP] included, as the
    official overwrites CLIP's end token; they are unmasked so the UNet reads them).
  - the mask's tokens are the concept's own (its name's tokens where they occur in the prompt, else every
    word token of the prompt; the official prompt is the concept word itself), its resolution the
    cross-attention resolution nearest to the sample size / 4 (SD: 64 / 4 = 16, the official's).
  - x_t's timestep is the one DDIM stopped at, as in esd.py here (the official draws a DDPM timestep in
    the DDIM step's interval).
  - with `adversarial_iters` 0 the erasers train on the plain prompt each iteration (the official loop
    would never take an eraser step).

The change is new modules, not a weight patch (`records = "module"`): a ledger stores the eraser sets in
the change's method_state.safetensors and re-attaches them on materialize; revert takes them off (the
UNet is then bit-identical to before); export is refused while they are in effect (a diffusers
UNet2DConditionModel folder has no place for them), saying to revert or export an earlier change.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from lifelong.erase.base import EraseRequest, prompt_batch
from lifelong.families.diffusion import TextStates
from lifelong.loop import check_finite
from lifelong.modules.eraser_adapter import (
    AttachedErasers,
    add_erasers,
    cross_attention_layers,
    eraser_sets,
    eraser_state,
    load_erasers,
)


@dataclass(frozen=True)
class Params:
    rank: int = 128                 # eraser bottleneck width (official eraser_rank)
    iterations: int = 200
    batch_size: int = 8
    lr: float = 3e-4                # Adam, erasers
    negative_guidance: float = 1.0  # eta
    start_guidance: float = 3.0     # guidance of the DDIM run that draws x_t
    ddim_steps: int = 25
    reg_weight: float = 0.1         # lambda (official concept_reg_weight)
    mask_threshold: float = 0.1
    adversarial_iters: int = 4      # attack steps per eraser step (official 50)
    adversarial_tokens: int = 16    # at most this many adversarial embeddings per prompt (as fit)
    adversarial_lr: float = 0.1

    def __post_init__(self):
        if self.rank < 1 or self.iterations < 1 or self.batch_size < 1 or self.ddim_steps < 1 or self.lr <= 0:
            raise ValueError("rank, iterations, batch_size, ddim_steps and lr must be positive")
        if self.adversarial_iters < 0 or self.adversarial_tokens < 0 or self.reg_weight < 0:
            raise ValueError("adversarial_iters, adversarial_tokens and reg_weight must be >= 0")
        if not 0 <= self.mask_threshold <= 1:
            raise ValueError("mask_threshold is a fraction of the normalised attention, in [0, 1]")


class Receler:
    name = "receler"
    records = "module"
    Params = Params

    def __init__(self, params: Params = Params()):
        self.params = params

    @staticmethod
    def state(model) -> dict[str, torch.Tensor]:
        """Every eraser set attached to `model` (this change's and the earlier ones it was trained on top of)."""
        return eraser_state(model.unet)

    @staticmethod
    def attach(model, state: dict[str, torch.Tensor]) -> AttachedErasers:
        """Put the eraser sets of `state` back on a model that has none; `.reset()` takes them off again."""
        load_erasers(model.unet, state)
        return AttachedErasers(model.unet)

    def erase(self, model, request: EraseRequest, seed: int = 0, progress: bool = False) -> dict[str, float]:
        """Add one eraser set to `model` and train it to erase `request`; the UNet's own weights stay."""
        from diffusers import DDIMScheduler  # heavy optional dependency, at first use

        p = self.params
        generator = torch.Generator().manual_seed(seed)
        model.unet.requires_grad_(False)
        erasers = add_erasers(model.unet, p.rank, seed=seed)  # name -> AdapterEraser (up = 0: no change yet)
        params = [q for e in erasers.values() for q in e.parameters()]
        for q in params:
            q.requires_grad_(True)
        optimizer = torch.optim.Adam(params, lr=p.lr)
        sampler = DDIMScheduler.from_config(model.scheduler.config)
        sampler.set_timesteps(p.ddim_steps)
        empty = model.encode([""])
        prompts = tuple(dict.fromkeys(request.prompts))
        layout = {q: _prompt_layout(model, q, request.concept, p.adversarial_tokens) for q in prompts}
        width = empty.hidden.shape[-1]
        adversary = {q: nn.Parameter(torch.rand((len(layout[q][1]), width), generator=generator).to(model.device))
                     for q in prompts if len(layout[q][1])}
        adv_optimizer = (torch.optim.Adam(adversary.values(), lr=p.adversarial_lr, weight_decay=0.1)
                         if adversary and p.adversarial_iters else None)
        outputs: dict[str, torch.Tensor] = {}
        hooks = [e.register_forward_hook(_capture(outputs, name)) for name, e in erasers.items()]
        size, channels = model.unet.config.sample_size, model.unet.config.in_channels
        losses, regs, attacks = [], [], []
        try:
            for step in tqdm(range(p.iterations), desc=f"erasing {request.concept!r} (Receler)", unit="it",
                             disable=not progress):
                batch = prompt_batch(prompts, p.batch_size, generator)
                cond = model.encode(batch)  # (b, T, D)
                stop = int(torch.randint(p.ddim_steps, (1,), generator=generator))
                noise = torch.randn((p.batch_size, channels, size, size), generator=generator).to(model.device)
                with torch.no_grad():
                    model.unet.eval()  # x_t from the model being trained, new erasers included
                    x_t = model.denoise(noise * sampler.init_noise_sigma, cond, empty, sampler, sampler.timesteps[:stop],
                                        p.start_guidance)
                    t = sampler.timesteps[stop]
                    with _disabled(erasers):  # eps0: the model without this change's erasers
                        e_0 = model.noise_prediction(x_t, t, empty[[0] * p.batch_size])
                        with _attention_probs(model.unet) as probs:
                            e_p = model.noise_prediction(x_t, t, cond)
                    masks = concept_masks(probs, [layout[q][0] for q in batch], p.mask_threshold, size)
                    target = e_0 - p.negative_guidance * (e_p - e_0)
                model.unet.train()
                for inner in range(max(p.adversarial_iters, 1)):
                    states = _with_adversary(cond, batch, layout, adversary)
                    e_n = model.noise_prediction(x_t, t, states)
                    last = inner == max(p.adversarial_iters, 1) - 1
                    if adv_optimizer is not None:  # the attack: bring the concept back through the erasers
                        used = [adversary[q] for q in dict.fromkeys(batch) if q in adversary]
                        loss_adv = F.mse_loss(e_n, e_p)
                        grads = torch.autograd.grad(loss_adv, used, retain_graph=last)
                        for q, g in zip(used, grads):
                            q.grad = g
                        adv_optimizer.step()
                        adv_optimizer.zero_grad(set_to_none=True)
                        attacks.append(loss_adv.item())
                    if last:  # the erasers' step, on the prompt with the adversarial embeddings
                        reg = concept_regulariser(outputs, masks)
                        loss = F.mse_loss(e_n, target) + p.reg_weight * reg
                        check_finite(loss, "Receler", step)
                        optimizer.zero_grad(set_to_none=True)
                        loss.backward()
                        optimizer.step()
                        losses.append(loss.item())
                        regs.append(reg.item())
        finally:
            for h in hooks:
                h.remove()
            model.unet.eval().requires_grad_(False)
        k = max(1, len(losses) // 10)
        stats = {"loss_start": sum(losses[:k]) / k, "loss_end": sum(losses[-k:]) / k, "reg_end": sum(regs[-k:]) / k,
                 "steps": float(p.iterations), "eraser_sets": float(eraser_sets(model.unet)),
                 "trainable_params": float(sum(q.numel() for q in params))}
        if attacks:
            stats["adversarial_loss_end"] = sum(attacks[-k:]) / k
        return stats


# --- pieces -------------------------------------------------------------------------------------------------

def _capture(outputs: dict, name: str):
    def hook(module, args, output):
        outputs[name] = output  # E_l(o_l), (B, HW, C), with its graph
    return hook


class _disabled:
    """The erasers of this change switched off (the official DisableEraser): eps0 is the model before it."""

    def __init__(self, erasers: dict):
        self.erasers = list(erasers.values())

    def __enter__(self):
        for e in self.erasers:
            e.enabled = False

    def __exit__(self, *exc):
        for e in self.erasers:
            e.enabled = True


class _attention_probs:
    """Record every cross-attention layer's attention probabilities (B, heads, HW, T) during a forward pass.

    Computed from the layer's inputs as diffusers' Attention computes them (to_q, to_k, the prepared mask,
    `get_attention_scores`), whatever attention processor the layer runs with."""

    def __init__(self, unet: nn.Module):
        self.layers = cross_attention_layers(unet)
        self.probs: dict[str, torch.Tensor] = {}
        self.handles = []

    def __enter__(self) -> dict[str, torch.Tensor]:
        for name, attn in self.layers.items():
            self.handles.append(attn.register_forward_hook(self._hook(name), with_kwargs=True))
        return self.probs

    def __exit__(self, *exc):
        for h in self.handles:
            h.remove()

    def _hook(self, name: str):
        def hook(attn, args, kwargs, output):
            hidden = args[0] if args else kwargs["hidden_states"]  # (B, HW, C)
            context = kwargs.get("encoder_hidden_states")
            if context is None:
                return
            if attn.norm_cross:
                context = attn.norm_encoder_hidden_states(context)
            b, t = hidden.shape[0], context.shape[1]
            mask = kwargs.get("attention_mask")
            mask = attn.prepare_attention_mask(mask, t, b) if mask is not None else None
            query, key = attn.head_to_batch_dim(attn.to_q(hidden)), attn.head_to_batch_dim(attn.to_k(context))
            probs = attn.get_attention_scores(query, key, mask)  # (B * heads, HW, T)
            self.probs[name] = probs.view(b, -1, *probs.shape[1:])  # (B, heads, HW, T)
        return hook


def concept_masks(probs: dict[str, torch.Tensor], token_positions: list[torch.Tensor], threshold: float,
                  sample_size: int) -> dict[str, torch.Tensor]:
    """M per cross-attention layer, (B, 1, r, r) at its resolution r (the official `get_mask`): attention on
    each image's concept tokens, averaged over heads and tokens, then over the layers at the resolution
    nearest sample_size / 4; min-max normalised per image, >= threshold -> 1; resized nearest to each r."""
    maps, resolution = {}, {}
    for name, p in probs.items():
        r = int(round(p.shape[2] ** 0.5))
        resolution[name] = r
        maps[name] = torch.stack([p[i][:, :, pos].mean(-1).mean(0) for i, pos in enumerate(token_positions)])  # (B, HW)
    chosen = min(set(resolution.values()), key=lambda r: (abs(r - sample_size / 4), -r))
    avg = torch.stack([m for n, m in maps.items() if resolution[n] == chosen]).mean(0)  # (B, r*r)
    avg = avg.view(len(avg), chosen, chosen)  # (B, r, r), row-major as the UNet's (h w) flattening
    low = avg.flatten(1).min(1).values.view(-1, 1, 1)
    high = avg.flatten(1).max(1).values.view(-1, 1, 1)
    mask = ((avg - low) / (high - low + 1e-12) >= threshold).float().unsqueeze(1)  # (B, 1, r, r)
    return {name: F.interpolate(mask, size=(r, r)) for name, r in resolution.items()}  # nearest, as official


def concept_regulariser(outputs: dict[str, torch.Tensor], masks: dict[str, torch.Tensor]) -> torch.Tensor:
    """L_reg: mean over layers of sum_{hw} mean_C (E_l(o_l) (1 - M))^2 / sum(1 - M) (the official formula)."""
    terms = []
    for name, e in outputs.items():
        outside = 1 - masks[name]  # (B, 1, r, r)
        b, _, r, _ = outside.shape
        e = e.transpose(1, 2).reshape(b, -1, r, r)  # (B, C, r, r)
        terms.append(((e * outside) ** 2).mean(1).sum() / (outside.sum() + 1e-9))
    return torch.stack(terms).mean()


def _prompt_layout(model, prompt: str, concept: str, max_adversarial: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(the concept's token positions in the prompt, the positions the adversarial embeddings take)."""
    tok = model.tokenizer
    ids = tok(prompt, truncation=True, max_length=tok.model_max_length)["input_ids"]
    words = ids[1:-1]  # without the start and end tokens
    name = tok(concept, add_special_tokens=False)["input_ids"]
    positions = list(range(1, 1 + len(words)))
    for s in range(len(words) - len(name) + 1):
        if name and words[s : s + len(name)] == name:
            positions = list(range(1 + s, 1 + s + len(name)))
            break
    if not positions:  # an empty prompt: the start token
        positions = [0]
    first = 1 + len(words)  # the end token's position: the adversarial embeddings start there
    room = max(0, min(max_adversarial, tok.model_max_length - first))
    return torch.tensor(positions), torch.arange(first, first + room)


def _with_adversary(cond, batch: list[str], layout: dict, adversary: dict):
    """The prompts' states with each prompt's adversarial embeddings in place (and read: mask 1 there)."""
    if not adversary:
        return cond
    hidden, mask = [], []
    for i, q in enumerate(batch):
        h = cond.hidden[i]  # (T, D)
        m = None if cond.mask is None else cond.mask[i]
        if q in adversary:
            where = layout[q][1]
            s, n = int(where[0]), len(where)
            h = torch.cat([h[:s], adversary[q], h[s + n:]])
            if m is not None:
                m = torch.cat([m[:s], torch.ones(n, dtype=m.dtype, device=m.device), m[s + n:]])
        hidden.append(h)
        mask.append(m)
    return TextStates(torch.stack(hidden), None if cond.mask is None else torch.stack(mask))
