"""Mix-of-Show (Gu et al., "Mix-of-Show: Decentralized Low-Rank Adaptation for Multi-Concept Customization of
Diffusion Models", NeurIPS 2023; official code github.com/TencentARC/Mix-of-Show).

One concept = one ED-LoRA (embedding-decomposed LoRA), trained alone: the identifier is two new tokens,
V = V_rand V_class (the first drawn at random, the second initialised from the class word, both learnable),
plus LoRA factors on every attention projection of the text encoder and of the UNet, trained with the
denoising loss on the subject's images under prompts that name it as "<tok1> <tok2>":

    min_{V, dW}  E || eps - eps_theta+dW(x_t, t, c(template(V))) ||^2

Several concepts are then fused layer by layer (gradient fusion): each LoRA'd layer's weight becomes the W
that maps, for every concept i, the inputs X_i (columns) that layer sees while concept i's own model runs
concept i's prompts as concept i's own weight W_i = W_0 + dW_i maps them:

    W* = argmin_W  sum_i || W X_i - W_i X_i ||^2  (+ eps || W - W_0 ||^2)
       = (sum_i W_i X_i X_i^T + eps W_0) (sum_i X_i X_i^T + eps I)^-1

in three stages, as the official script: the text encoder's layers (inputs from each concept's own text
encoder on its prompts), then the UNet's cross-attention K/V (inputs: the fused text encoder's states of
each concept's prompts), then the UNet's other LoRA'd layers (self-attention, cross-attention Q and out;
inputs recorded by forward hooks at every step of a short DDIM run of the concept's prompt through the
fused text encoder and K/V with the concept's own spatial weights).

The closed form vs the official optimisation: the official script (scripts/mixofshow_scripts/
Gradient_Fusion_EDLoRA.py) minimises the same mean squared error with L-BFGS started at W_0 (500
iterations for the text encoder and K/V, 50 for the spatial layers), without a ridge. Where the concepts'
inputs do not span a layer's input space (a few prompt tokens in a 768-wide text space), L-BFGS from W_0
never moves W off W_0 in the directions no X_i reaches: it tends to the least-squares solution nearest W_0.
The plain ridge solution (sum W_i X_i X_i^T)(sum X_i X_i^T + eps I)^-1 would instead send those directions to
zero and break the layer for every other prompt, a material difference; the eps || W - W_0 ||^2 term above
keeps W_0 there, so the closed form is the limit the official optimisation approaches (exactly W_0 off the
inputs' span, the least-squares fit on it). eps = `ridge` x the mean diagonal of sum_i X_i X_i^T.

Official recipe (options/train/EDLoRA/*.yml, mixofshow/pipelines/trainer_edlora.py, checked in the stored
copy of the repository): tokens "<name1>+<name2>", initialisers "<rand-0.013>+<class>" (a N(0, 0.013^2) row;
the class word's row); each token expands to 16 layer-wise embeddings, one per UNet cross-attention layer (P+);
LoRA rank 4 with an absolute scale alpha 1.0 on every Linear of CLIPAttention (q, k, v, out) and of the UNet's
Attention modules (to_q, to_k, to_v, to_out.0 of attn1 and attn2), A Kaiming-uniform, B zero; AdamW (weight
decay 0.01) with lr 1e-3 on the token embeddings (the gradients of every other row zeroed), 1e-5 on the text
encoder's LoRA, 1e-4 on the UNet's; the lr decays linearly to 0; 1000 iterations (500 for objects) of batch
2 x 2 GPUs; noise offset 0.01; captions "a photo of a <TOK>"-style templates (EnhanceText), random
resize-crops. Fusion: prompts "photo of a <tok1> <tok2>" and "<tok1> <tok2>" for the text encoder and K/V
(only the new tokens' and the end token's positions), one sample of 50 DDIM steps, every step recorded,
for the spatial layers. Here:
  - one embedding row per token, shared by every cross-attention layer (as Textual Inversion), not the 16
    layer-wise rows: layer-wise rows need one text-encoder pass per cross-attention layer and attention
    processors that hand each layer its own states, which every user of the pipeline's text states
    (sampling, probes, erasure, `lifelong generate`, the diffusers export) would then have to know. The
    decomposition into a random and a class token is kept.
  - the tokens are named after --token: "<my-bug>" gives "<my-bug1>" and "<my-bug2>" (the official
    "<potter1> <potter2>"); prompts name the subject "<my-bug1> <my-bug2>", without the class word. With no
    class word the second row starts at the mean row.
  - peft LoRA (`TextToImage.add_lora`, `add_text_lora`, A Kaiming-uniform as the official's), rank 4, alpha 4:
    peft scales by alpha / rank, so the scale is the official's 1.0. The text encoder's LoRA is on its
    self-attention projections (CLIP's q/k/v/out_proj, BERT's query/key/value/attention.output.dense).
  - lr 5e-3 on the two rows, 1e-4 on the text encoder's LoRA, 1e-3 on the UNet's (the official's x 5, x 10,
    x 10: the embedded model has 4.6M parameters and 32 px images; DreamBooth-LoRA here also takes 1e-3),
    `steps` 300 of batch 4, linear decay to 0, AdamW weight decay 0.01; every other embedding row restored
    after each step (holds them exactly; the official zeroes their gradients). None of these is tuned.
  - prompts: Textual Inversion's templates (textual_inversion.TEMPLATES, object and style templates as the
    official EnhanceText's) with "<tok1> <tok2>"; no noise offset (the family's `denoising_loss` has none),
    no crops or masks.
  - fusion: the closed form above instead of L-BFGS; the text encoder and K/V inputs at every real position
    of the prompts (the whole padded sequence where the pipeline reads it unmasked, as Stable Diffusion), not
    only the new tokens' positions; the spatial layers' inputs from `fusion_samples` 2 draws of `fusion_steps`
    10 DDIM steps (eta 0, no guidance, as the official), every step recorded.
"""

from __future__ import annotations

import copy
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import nn
from tqdm import tqdm

from lifelong.loop import check_finite, mean_ends
from lifelong.personalize.base import PersonalizeRequest, freeze_all, image_batch, restore_rows
from lifelong.personalize.custom_diffusion import text_features
from lifelong.personalize.textual_inversion import TEMPLATES

FUSION_TEMPLATE = "photo of a {}"  # the official fusion script's TEMPLATE_SIMPLE


@dataclass(frozen=True)
class Params:
    steps: int = 300
    batch_size: int = 4
    lr: float = 1e-3              # AdamW, the UNet's LoRA
    text_lr: float = 1e-4         # the text encoder's LoRA
    embedding_lr: float = 5e-3    # the two token rows
    weight_decay: float = 1e-2
    rank: int = 4
    alpha: float = 4.0            # peft's lora_alpha: scale alpha / rank = 1, the official's absolute alpha 1.0
    rand_std: float = 0.013       # the random token's initial N(0, std^2) row (official "<rand-0.013>")

    def __post_init__(self):
        if min(self.steps, self.batch_size, self.rank) < 1 or min(self.lr, self.text_lr, self.embedding_lr) <= 0:
            raise ValueError("steps, batch_size, rank and the lrs must be positive")
        if self.weight_decay < 0 or self.rand_std < 0 or self.alpha <= 0:
            raise ValueError("weight_decay and rand_std must be >= 0, alpha > 0")


def token_pair(token: str) -> list[str]:
    """The two tokens of the identifier `token`: "<my-bug>" -> ["<my-bug1>", "<my-bug2>"], "sks" -> ["sks1", "sks2"]."""
    stem, close = (token[:-1], token[-1]) if token[-1:] in ">]})" else (token, "")
    return [f"{stem}{i}{close}" for i in (1, 2)]


class MixOfShow:
    name = "mix-of-show"
    adds_token = True
    Params = Params

    def __init__(self, params: Params = Params()):
        self.params = params

    @staticmethod
    def new_tokens(token: str) -> list[str]:
        """The vocabulary tokens this method adds for the identifier `token` (the ledger records them)."""
        return token_pair(token)

    def personalize(self, model, request: PersonalizeRequest, seed: int = 0,
                    progress: bool = False) -> dict[str, float]:
        p = self.params
        generator = torch.Generator().manual_seed(seed)
        tokens = token_pair(request.token)
        table = model.token_embeddings().weight.detach()
        class_ids = model.token_ids(request.class_word) if request.class_word else []
        class_row = table[class_ids[0]] if class_ids else table.mean(0)
        random_row = torch.randn(table.shape[1], generator=generator).to(table) * p.rand_std
        token_ids = model.add_tokens(tokens, torch.stack([random_row, class_row]))
        freeze_all(model)
        with torch.random.fork_rng(devices=[]):  # LoRA's A from the seed, the caller's generator untouched
            torch.manual_seed(seed)
            model.add_lora(rank=p.rank, alpha=p.alpha, init=True)
            model.add_text_lora(rank=p.rank, alpha=p.alpha, init=True)
        weight = model.token_embeddings().weight
        original = weight.detach().clone()
        unet_lora = [q for n, q in model.unet.named_parameters() if "lora_" in n]
        text_lora = [q for n, q in model.text_encoder.named_parameters() if "lora_" in n]
        for q in [weight, *text_lora, *unet_lora]:
            q.requires_grad_(True)
        optimizer = torch.optim.AdamW([{"params": [weight], "lr": p.embedding_lr},
                                       {"params": text_lora, "lr": p.text_lr},
                                       {"params": unet_lora, "lr": p.lr}], weight_decay=p.weight_decay)
        schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1 - step / p.steps)  # linear to 0
        x0 = model.encode_images(request.images)  # (N, C, h, w)
        words = " ".join(tokens)
        losses = []
        model.unet.train()
        try:
            for step in tqdm(range(p.steps), desc=f"ED-LoRA of {words}", unit="step", disable=not progress):
                picks = torch.randint(len(TEMPLATES), (p.batch_size,), generator=generator).tolist()
                states = model.encode([TEMPLATES[i].format(words) for i in picks])  # recomputed: the text side trains
                loss = model.denoising_loss(image_batch(x0, p.batch_size, generator), states, generator)
                check_finite(loss, "Mix-of-Show", step)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                schedule.step()
                restore_rows(weight, original, token_ids)
                losses.append(loss.item())
        finally:
            model.unet.eval()
            freeze_all(model)
            model.clear_cache()
        first, last = mean_ends(losses)
        return {"loss_start": first, "loss_end": last, "steps": float(p.steps),
                "trainable_params": float(sum(q.numel() for q in [*text_lora, *unet_lora]) + weight.shape[1] * 2)}


# --- gradient fusion ------------------------------------------------------------------------------------------

def fusion_prompts(tokens: list[str]) -> list[str]:
    """The prompts of a concept whose identifier is `tokens` that fusion runs (the official script's)."""
    words = " ".join(tokens)
    return [FUSION_TEMPLATE.format(words), words]


@torch.no_grad()
def fuse(w0: torch.Tensor, finetuned: list[torch.Tensor], grams: list[torch.Tensor],
         ridge: float = 1e-6) -> torch.Tensor:
    """The fused weight of one layer: W = (sum_i W_i G_i + eps W_0)(sum_i G_i + eps I)^-1 with G_i = X_i X_i^T
    (in, in) the Gram matrix of concept i's inputs, W_i (out, in) its own weight, eps = `ridge` x the mean
    diagonal of sum_i G_i (the module docstring). In float64; returned in W_0's dtype."""
    g = sum(gi.double() for gi in grams)  # (in, in)
    eps = ridge * float(g.diagonal().mean())
    if eps <= 0:  # no concept's input reached the layer: nothing to fit
        return w0.clone()
    a = sum(w.double() @ gi.double() for w, gi in zip(finetuned, grams)) + eps * w0.double()  # (out, in)
    w = torch.linalg.solve(g + eps * torch.eye(len(g), dtype=g.dtype), a.T).T  # G + eps I is symmetric
    return w.to(w0.dtype)


@torch.no_grad()
def weight_fusion(w0: dict[str, torch.Tensor], deltas: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """The weight-fusion baseline of Mix-of-Show's paper and code (Weight_Fusion_EDLoRA.py): every layer some
    delta names at W = W_0 + (1/k) sum_i dW_i (a concept that did not move a layer adds 0 there). `w0` name ->
    W_0, `deltas[i]` name -> dW_i; returns name -> W for every layer of the deltas."""
    names = sorted(set().union(*deltas))
    return {n: w0[n] + sum(d[n] for d in deltas if n in d) / len(deltas) for n in names}


def output_error(w: torch.Tensor, target: torch.Tensor, gram: torch.Tensor) -> float:
    """|| W X - W_i X ||_F^2 from the Gram matrix G = X X^T: tr((W - W_i) G (W - W_i)^T)."""
    d = (w - target).double()
    return float(((d @ gram.double()) * d).sum())


@contextmanager
def recorded_inputs(modules: dict[str, nn.Module]):
    """While open, every input the `modules` (name -> module) receive, name -> list of (..., in) tensors."""
    inputs = {name: [] for name in modules}

    def hook(name):
        return lambda module, args, output: inputs[name].append(args[0].detach().float())

    handles = [module.register_forward_hook(hook(name)) for name, module in modules.items()]
    try:
        yield inputs
    finally:
        for handle in handles:
            handle.remove()


def gram(rows: torch.Tensor) -> torch.Tensor:
    """X X^T (in, in) of input rows (n, in), in float64."""
    rows = rows.double()
    return rows.T @ rows


@torch.no_grad()
def text_grams(model, modules: dict[str, nn.Module], prompts: list[str]) -> dict[str, torch.Tensor]:
    """The Gram matrices of the inputs the text encoder's `modules` see while encoding `prompts`, at the
    positions cross-attention reads (the real tokens under a text mask, else all)."""
    model.clear_cache()
    with recorded_inputs(modules) as inputs:
        states = model.encode(list(prompts))
    grams = {}
    for name, seen in inputs.items():
        x = torch.cat(seen)  # (B, T, in)
        rows = x[states.mask.bool()] if states.mask is not None else x.reshape(-1, x.shape[-1])
        grams[name] = gram(rows)
    return grams


@torch.no_grad()
def denoising_grams(model, modules: dict[str, nn.Module], prompt: str, samples: int, steps: int,
                    seed: int) -> dict[str, torch.Tensor]:
    """The Gram matrices of the inputs the UNet's `modules` see at every step of `samples` deterministic DDIM
    runs of `steps` steps from seeded noise, conditioned on `prompt` alone (no guidance, as the official)."""
    sampler = copy.deepcopy(model.scheduler)
    sampler.set_timesteps(steps)
    noise, _ = model.draw_noise(samples, seed, steps, eta=0.0)
    x = noise.to(model.device) * sampler.init_noise_sigma  # (samples, C, h, w)
    states = model.encode([prompt] * samples)
    with recorded_inputs(modules) as inputs:
        for t in sampler.timesteps:
            pred = model.noise_prediction(sampler.scale_model_input(x, t), t, states)
            x = sampler.step(pred, t, x).prev_sample
    return {name: gram(torch.cat([s.reshape(-1, s.shape[-1]) for s in seen])) for name, seen in inputs.items()}


@torch.no_grad()
def gradient_fusion(model, deltas: list[dict[str, torch.Tensor]], tokens: list[list[str]], steps: int = 10,
                    samples: int = 2, ridge: float = 1e-6, seed: int = 0) -> tuple[dict[str, torch.Tensor], dict]:
    """Fuse the concepts whose weight deltas are `deltas[i]` (parameter name -> dW_i (out, in) of a Linear
    layer) and whose identifiers are `tokens[i]` (their tokens are in `model`'s vocabulary). On entry every
    parameter some delta names holds W_0 (the weights without any of the concepts); on return it holds the
    fused W. Returns (name -> fused W, statistics: per stage, the relative output error
    sqrt(sum_i ||(W - W_i) X_i||^2 / sum_i ||W_i X_i||^2) on the inputs the fusion used, for the fused W, for
    the naive sum W_0 + sum_i dW_i and for the official weight-fusion baseline W_0 + mean_i dW_i)."""
    params = dict(model.named_parameters())
    names = sorted(set().union(*deltas))
    missing = [n for n in names if n not in params or params[n].dim() != 2]
    if missing:
        raise ValueError(f"gradient fusion fuses Linear weights of the model; not {missing[:3]}")
    w0 = {n: params[n].detach().clone() for n in names}
    own = [{n: w0[n] + d[n] if n in d else w0[n] for n in names} for d in deltas]  # W_i
    kv = {f"unet.{name}.weight" for name in model.cross_attention_kv()}
    stages = {"text_encoder": [n for n in names if n.startswith("text_encoder.")],
              "cross_kv": [n for n in names if n in kv],
              "unet": [n for n in names if n.startswith("unet.") and n not in kv]}
    other = sorted(set(names) - {n for stage in stages.values() for n in stage})
    if other:
        raise ValueError(f"gradient fusion fuses text-encoder and UNet layers; not {other[:3]}")
    modules = {n: model.get_submodule(n.removesuffix(".weight")) for n in names}

    def load(layers: list[str], weights: dict[str, torch.Tensor]) -> None:
        for n in layers:
            params[n].copy_(weights[n])
        model.clear_cache()

    fused, stats = {}, {}
    for stage, layers in stages.items():
        if not layers:
            continue
        grams = []  # grams[i][n]: concept i's X X^T at layer n
        for i, concept in enumerate(tokens):
            prompts = fusion_prompts(concept)
            if stage == "text_encoder":
                load(layers, own[i])
                grams.append(text_grams(model, {n: modules[n] for n in layers}, prompts))
            elif stage == "cross_kv":  # the fused text encoder's states of concept i's prompts
                g = gram(text_features(model, prompts))
                grams.append({n: g for n in layers})
            else:
                load(layers, own[i])
                grams.append(denoising_grams(model, {n: modules[n] for n in layers}, prompts[0], samples, steps,
                                             seed + i))
        for n in layers:
            fused[n] = fuse(w0[n], [w[n] for w in own], [g[n] for g in grams], ridge)
        load(layers, fused)
        mean_dw = {n: w0[n] + sum(w[n] - w0[n] for w in own) / len(own) for n in layers}
        summed = {n: w0[n] + sum(w[n] - w0[n] for w in own) for n in layers}
        scale = sum(output_error(torch.zeros_like(w[n]), w[n], g[n]) for w, g in zip(own, grams) for n in layers)
        for label, weights in (("fused", fused), ("sum", summed), ("mean", mean_dw)):
            err = sum(output_error(weights[n], w[n], g[n]) for w, g in zip(own, grams) for n in layers)
            stats[f"{stage}_error_{label}"] = (err / max(scale, 1e-30)) ** 0.5
        stats[f"{stage}_layers"] = float(len(layers))
    return fused, stats
