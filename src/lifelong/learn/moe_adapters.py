"""MoE-Adapters (Yu et al., CVPR 2024; arXiv:2403.11549): mixtures of adapters, one router per task.

"Boosting Continual Learning of Vision-Language Models via Mixture-of-Experts Adapters"; official code
github.com/JiazuoYu/MoE-Adapters4CL.

The model is frozen; beside each block of both towers sit E = 22 bottleneck adapters (dim 64) mixed by
a noisy top-2 router, one router per task (the modules: lifelong.modules.moe_adapter):

    L = CE(logits, y) + reg_weight * sum_blocks (cv^2(importance) + cv^2(load)),   reg_weight = 1e-2

Freezing: after each task, in every block, the `freeze_top` experts the task's training chose most often
(counts of top-k selections, the official code's choose_map) are frozen for all later tasks; the official
code freezes the top 2 per layer and tower, as here. Experts a task never chose are never frozen by it.
Distribution Discriminative Auto-Selector (DDAS): one autoencoder per task, fit on features of the task's
training images that only the frozen original model computes; at inference each image goes to

    route(x) = argmin_{t : e_t(x) <= tau_t} e_t(x)   (no such t: the original model, adapters off),

e_t(x) = mean squared reconstruction error of AE_t, tau_t = the `threshold_quantile` quantile of e_t on a
held-out `holdout` share of task t's training images (kept out of AE_t's fit). Training uses the current
task's router.

Where the adapters sit: beside each block of the trainable image trunk (EfficientNet MBConv blocks: 1x1
experts on the feature map at the block's stride; CLIP layers: beside the MLP, reading the residual
stream the MLP's LayerNorm reads, as the official x + mlp(ln_2(x)) + moe(x)) and, with `towers: both`
(the paper), beside each FFN of the text encoder (BERT: added to the FFN output before its residual and
LayerNorm; CLIP text: beside the MLP). `towers: image` leaves the text encoder as it is: faster, and its
pooled features stay cached (with `both` they are recomputed for every batch and routing).

Deviations:
- Only the trainable trunk's blocks get image adapters (the stem's outputs are cached). EfficientNet
  blocks are inverted-residual conv blocks, not transformer MLPs; their experts are per-pixel (1x1).
- Routing is per sample: the CLS token for CLIP images (as the official code), the spatial mean for
  EfficientNet feature maps, the attention-masked token mean for text (the official code routes text on
  token 0, the start token, identical for every prompt in a causal encoder: constant per task there).
- Noise comes from a generator seeded by (the run's seed, task, step), not torch's global RNG, so that
  loss() is a pure function of the method's state (the contract: equal state, equal loss; a resumed task
  draws the same noise). The run's seed enters once, through a number drawn from the global RNG in prepare.
- DDAS reads the frozen stem's output pooled over space or tokens (L2-normalised, times sqrt(d)), not a
  separate ImageNet AlexNet's conv5 map as the official code; code size min(ae_hidden, d // 2); one
  threshold per task calibrated as above, not one hand-set threshold; per image, not per test batch.
- The load-balancing loss is added to the training loss as the paper states (the released MTIL code
  computes it per layer but does not add it). Adapter dropout (0.1 there) is off: the towers always run
  in inference mode here.
- Between tasks every parameter of the method has requires_grad, so the checkpoint written after a task
  (the model's trainable state) holds frozen experts, past routers and the autoencoders; begin_task
  narrows training to the task's routers and the unfrozen experts.
"""

from __future__ import annotations

import math
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from lifelong.errors import ConfigError
from lifelong.learn.common import Batch, TaskData
from lifelong.modules.moe_adapter import MixtureOfAdapters, TaskAutoencoder, load_balancing_loss
from lifelong.modules.vpt import is_prompt_parameter


@dataclass(frozen=True)
class Params:
    towers: str = "both"  # "both" (paper) or "image" (text encoder untouched; its features stay cached)
    n_experts: int = 22
    top_k: int = 2
    bottleneck: int = 64
    adapter_scale: float = 0.1
    reg_weight: float = 1e-2  # weight of the load-balancing loss
    freeze_top: int = 2  # per block, the experts a task chose most, frozen for later tasks
    max_tasks: int = 16  # routers and autoencoders are allocated before the first task
    ae_hidden: int = 100
    ae_steps: int = 300  # full-batch (up to 256) Adam steps; the official code: 1000 minibatch iterations
    ae_lr: float = 3e-3
    holdout: float = 0.2  # share of a task's training features kept out of the AE to calibrate tau_t
    threshold_quantile: float = 0.95  # tau_t lets ~95% of the task's own unseen images through
    label_smoothing: float = 0.0

    def __post_init__(self) -> None:
        if self.towers not in ("both", "image"):
            raise ConfigError(f"moe_adapters towers must be 'both' or 'image', got {self.towers!r}")
        if not 1 <= self.top_k < self.n_experts:
            raise ConfigError(f"moe_adapters needs 1 <= top_k < n_experts, got top_k={self.top_k}, n_experts={self.n_experts}")
        if not 0 <= self.freeze_top <= self.n_experts:
            raise ConfigError(f"moe_adapters freeze_top must be in 0..n_experts, got {self.freeze_top}")
        if self.max_tasks < 1 or self.ae_steps < 1:
            raise ConfigError("moe_adapters max_tasks and ae_steps must be >= 1")
        if not (0 < self.threshold_quantile <= 1 and 0 <= self.holdout < 1):
            raise ConfigError("moe_adapters needs 0 < threshold_quantile <= 1 and 0 <= holdout < 1")


def add_mixtures(model, p: Params) -> None:
    """Put a MixtureOfAdapters beside every block of the image trunk (and of the text encoder with
    towers: both), registered as image_trunk.moe_adapters / text_encoder.moe_adapters, and the
    autoencoders as moe_selector."""
    def mixture(d_in, d_out, pooling):
        return MixtureOfAdapters(d_in, d_out, n_experts=p.n_experts, top_k=p.top_k, bottleneck=p.bottleneck,
                                 max_tasks=p.max_tasks, pooling=pooling, scale=p.adapter_scale)

    image = nn.ModuleList()
    if model.kind == "embedded":
        for block in model.image_trunk.blocks:
            image.append(mixture(block._block_args.input_filters, block._project_conv.out_channels, "map"))
            image[-1].attach(block, block)
    else:
        for layer in model.image_trunk.layers:
            image.append(mixture(layer.mlp.fc1.in_features, layer.mlp.fc2.out_features, "first"))
            image[-1].attach(layer.layer_norm2, layer.mlp)
    model.image_trunk.moe_adapters = image
    if p.towers == "both":
        text, encoder = nn.ModuleList(), model.text_encoder
        if model.kind == "embedded":
            for layer in encoder.bert.encoder.layer:
                text.append(mixture(layer.intermediate.dense.in_features, layer.output.dense.out_features, "masked_mean"))
                text[-1].attach(layer.intermediate, layer.output.dense, encoder)
        else:
            for layer in encoder.text_model.encoder.layers:
                text.append(mixture(layer.mlp.fc1.in_features, layer.mlp.fc2.out_features, "masked_mean"))
                text[-1].attach(layer.layer_norm2, layer.mlp, encoder)
        encoder.moe_adapters = text
    d = image[0].routers[0].w_gate.shape[0]  # the stem output's channels: what the selector reads
    model.moe_selector = nn.ModuleList(TaskAutoencoder(d, min(p.ae_hidden, d // 2)) for _ in range(p.max_tasks))


def mixtures(model) -> list[MixtureOfAdapters]:
    """Every mixture of the model, image trunk first (the order of the usage and frozen rows)."""
    text = getattr(model.text_encoder, "moe_adapters", ())
    return [*model.image_trunk.moe_adapters, *text]


@contextmanager
def routed(model, task: int, noise: torch.Generator | None = None):
    """Within the block, every mixture routes with `task`'s router (noisy when a generator is given)."""
    sites, has_text = mixtures(model), hasattr(model.text_encoder, "moe_adapters")
    for site in sites:
        site.task, site.noise = task, noise
    if has_text:
        model.clear_text_cache()  # pooled text depends on the routing
    try:
        yield sites
    finally:
        for site in sites:
            site.reset()  # the original model again, and no graph left behind (deepcopy-safe)
        if has_text:
            model.clear_text_cache()


def selector_features(stem_out: torch.Tensor) -> torch.Tensor:
    """What the autoencoders read: the frozen stem's output pooled over space or tokens, L2-normalised
    and scaled by sqrt(d) (coordinates of order 1). (N, C, H, W) or (N, L, H) -> (N, d)."""
    z = stem_out.float().mean(dim=(2, 3)) if stem_out.dim() == 4 else stem_out.float().mean(dim=1)
    return F.normalize(z, dim=-1) * math.sqrt(z.shape[-1])


class MoEAdapters:
    leaves_parameters_unused = True  # experts outside the top-k get no gradient in a step (DDP must know)
    Params = Params
    adapter_kinds = ("none",)  # the method brings its own modules; the model itself stays frozen

    def __init__(self, params: Params):
        self.params = params
        self.trainable_prefixes = ("image_trunk.moe_adapters.", "text_encoder.moe_adapters.", "moe_selector.")
        self.task, self.step, self.tasks_learned, self.noise_seed = 0, 0, 0, 0
        self.usage: torch.Tensor | None = None  # (sites, E) top-k selections during the current task
        self.frozen: torch.Tensor | None = None  # (sites, E) bool
        self.thresholds = torch.full((params.max_tasks,), float("inf"))  # tau_t

    def own_modules(self, model) -> list[nn.Module]:
        return [*mixtures(model), model.moe_selector]

    def prepare(self, model) -> None:
        if any("lora_" in name or is_prompt_parameter(name) for name, _ in model.named_parameters()):
            raise ConfigError("moe_adapters brings its own adapters and freezes the model: set adapter.kind: none")
        model.requires_grad_(False)
        if not hasattr(model, "moe_selector"):
            add_mixtures(model, self.params)
        n = len(mixtures(model))
        self.usage = torch.zeros(n, self.params.n_experts)
        self.frozen = torch.zeros(n, self.params.n_experts, dtype=torch.bool)
        self.noise_seed = int(torch.randint(2**31 - 1, ()))  # the run's seed, through the global RNG
        for module in self.own_modules(model):
            module.requires_grad_(True)
        model.clear_text_cache()

    def begin_task(self, model, data: TaskData) -> None:
        if data.index >= self.params.max_tasks:
            raise ConfigError(f"moe_adapters allocated routers for max_tasks={self.params.max_tasks} tasks; task "
                              f"{data.index + 1} ({data.task.name}) needs more: set the method's max_tasks to at "
                              "least the stream's length")
        self.task, self.step = data.index, 0
        self.usage.zero_()
        for module in self.own_modules(model):
            module.requires_grad_(False)
        for i, site in enumerate(mixtures(model)):
            site.routers[self.task].requires_grad_(True)  # one router per task
            for e, expert in enumerate(site.experts):
                expert.requires_grad_(not bool(self.frozen[i, e]))

    def loss(self, model, batch: Batch, data: TaskData) -> tuple[torch.Tensor, dict[str, float]]:
        noise = torch.Generator().manual_seed(self.noise_seed * 1_000_003 + self.task * 100_003 + self.step)
        self.step += 1
        with routed(model, self.task, noise) as sites:
            logits = model(batch.inputs, data.class_names)  # (B, C)
            balance = sum(load_balancing_loss(site.gates, site.load) for site in sites)
            with torch.no_grad():
                for i, site in enumerate(sites):
                    self.usage[i] += (site.gates > 0).sum(0).to(self.usage)
        ce = F.cross_entropy(logits, batch.targets, label_smoothing=self.params.label_smoothing)
        return ce + self.params.reg_weight * balance, {"ce": ce.item(), "balance": balance.item()}

    @torch.no_grad()
    def end_task(self, model, data: TaskData) -> None:
        p, t = self.params, self.task
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.all_reduce(self.usage)  # each process counted its share of every batch
        if p.freeze_top:
            counts, experts = self.usage.topk(p.freeze_top, dim=1)  # (sites, freeze_top)
            self.frozen |= torch.zeros_like(self.frozen).scatter_(1, experts, counts > 0)  # never-chosen stay free
        z = selector_features(data.inputs)  # (N, d)
        g = torch.Generator().manual_seed(t)
        order = torch.randperm(len(z), generator=g).to(z.device)
        n_fit = len(z) - int(p.holdout * len(z)) if len(z) > 1 else len(z)
        fit, held = z[order[:n_fit]], z[order[n_fit:]]
        autoencoder = model.moe_selector[t]
        autoencoder.requires_grad_(True)
        autoencoder.fit(fit, p.ae_steps, p.ae_lr, batch_size=256, seed=t)
        errors = autoencoder.errors(held if len(held) else fit)
        self.thresholds[t] = torch.quantile(errors.float().cpu(), p.threshold_quantile)
        self.tasks_learned = max(self.tasks_learned, t + 1)
        for module in self.own_modules(model):  # see the docstring: all of it is the method's state
            module.requires_grad_(True)

    @torch.no_grad()
    def select(self, model, inputs: torch.Tensor) -> torch.Tensor:
        """(N,) the task whose router each input goes to; -1: the original model."""
        if self.tasks_learned == 0:
            return torch.full((len(inputs),), -1, dtype=torch.long, device=inputs.device)
        z = selector_features(inputs)
        errors = torch.stack([model.moe_selector[t].errors(z) for t in range(self.tasks_learned)], dim=1)  # (N, T)
        within = errors <= self.thresholds[: self.tasks_learned].to(errors)
        best_error, best = torch.where(within, errors, torch.inf).min(dim=1)
        return torch.where(torch.isfinite(best_error), best, -1)

    @torch.no_grad()
    def eval_logits(self, model, inputs: torch.Tensor, class_names: tuple[str, ...]) -> torch.Tensor:
        """(N, C) logits: each input through its selected task's router, or the original model."""
        choice = self.select(model, inputs)
        logits = model(inputs, class_names)  # the original model (every mixture off)
        for t in torch.unique(choice[choice >= 0]).tolist():
            rows = (choice == t).nonzero().squeeze(1)
            with routed(model, t):
                logits[rows] = model(inputs[rows], class_names)
        return logits

    def state_dict(self) -> dict[str, torch.Tensor]:
        state = {"task": torch.tensor(self.task), "step": torch.tensor(self.step), "thresholds": self.thresholds.clone(),
                 "tasks_learned": torch.tensor(self.tasks_learned), "noise_seed": torch.tensor(self.noise_seed)}
        if self.usage is not None:
            state.update(usage=self.usage.clone(), frozen=self.frozen.clone())
        return state

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        self.task, self.step = int(state["task"]), int(state["step"])
        self.tasks_learned, self.noise_seed = int(state["tasks_learned"]), int(state["noise_seed"])
        self.thresholds = state["thresholds"].clone()
        if "usage" in state:
            self.usage, self.frozen = state["usage"].clone(), state["frozen"].clone().bool()
