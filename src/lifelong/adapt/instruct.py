"""Instruction tuning of a frozen causal LM through a small adapter: LLaMA-Adapter, LoRA or prefix tuning.

    kind            what trains                                                    from
    llama-adapter   K prompt vectors + a zero-init gate in each of the top L layers  modules/llama_adapter.py
                    (Zhang et al., ICLR 2024): L * (K * C + 1) parameters
    lora            B A beside W in `target_modules` (Hu et al., ICLR 2022), B = 0   peft LoraConfig
                    at init: rank * (in + out) per adapted matrix
    prefix          N key/value vectors per layer (Li & Liang, ACL 2021), no            peft PrefixTuningConfig
                    reparametrisation MLP: N * layers * 2 * (kv heads * head dim)

The loss is the mean NLL of the answer tokens (the prompt's are masked, -100), the answer being the
reference output plus the end-of-sequence token (data.instructions.target_text), on right-padded batches
drawn in seeded reshuffled epochs (loop.batch_order). AdamW, weight decay 0.02 and a cosine schedule
with linear warm-up over the first 10% of the steps, as LLaMA-Adapter's recipe (its lr 9e-3 is the
default for llama-adapter; prefix 1e-2 as peft's prefix-tuning example; lora 3e-3 chosen for a rank-2
adapter and short runs; none tuned here). The caller sets torch's thread count.

A prompt whose prompt + answer is longer than the model's context (families.lm.context_length) loses its
first tokens, with one warning for the run (`warn`; default warnings.warn) saying how many were cut.

A ledger records an adapter as a change (ledger/adapters.py): `train_adapter(..., init=)` continues a
LLaMA-Adapter or a prefix from the tensors of the one in effect, `module_tensors` reads them off the trained
model, `AttachedAdapter` puts recorded tensors back on a model (and takes them off again: for a prefix,
modules/prefix.py, in place and with peft's function), and `lora_weights` folds a trained LoRA into dense
weight deltas and its peft factors, taking the LoRA layers off.

`equal_budget(config, trainable)` picks, for one model shape, each kind's size nearest a parameter
budget, so that a comparison is at equal trainable parameters.
"""

from __future__ import annotations

import time
import warnings
from collections.abc import Callable
from dataclasses import asdict, dataclass, field

import torch
from safetensors.torch import save

from lifelong.data.instructions import InstructionTask, prompt_text, target_text
from lifelong.errors import ConfigError
from lifelong.families.lm import context_length, overlong, target_batch
from lifelong.loop import batch_order, check_finite, cosine_with_warmup, mean_ends
from lifelong.metrics.cost import PeakMemory
from lifelong.modules.llama_adapter import (
    OWN_TYPES,
    adaption_parameters,
    add_llama_adapter,
    plain_parameter_name,
    remove_llama_adapter,
)
from lifelong.modules.peft_wrap import bare_model
from lifelong.modules.prefix import add_prefix, prefix_key_values, remove_prefix

KINDS = ("llama-adapter", "lora", "prefix")
MODULE_KINDS = ("llama-adapter", "prefix")  # what a ledger holds as a module; a LoRA folds into the weights
PREFIX_STATE = "prompt_embeddings"  # a prefix's recorded tensor, under peft's own key (N, layers * 2 * kv dim)
DEFAULT_LR = {"llama-adapter": 9e-3, "lora": 3e-3, "prefix": 1e-2}


@dataclass(frozen=True)
class AdapterSpec:
    kind: str
    adapter_len: int = 10                 # llama-adapter: K prompt vectors per layer
    adapter_layers: int = 8               # llama-adapter: the top L layers
    rank: int = 2                         # lora
    alpha: float = 4.0                    # lora: scale alpha / rank
    target_modules: tuple[str, ...] = ("q_proj", "v_proj")  # lora (Llama names; GPT-2: ("c_attn",))
    num_virtual_tokens: int = 10          # prefix

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ConfigError(f"adapter kind {self.kind!r} is not one of {', '.join(KINDS)}")

    @classmethod
    def from_dict(cls, raw: dict) -> AdapterSpec:
        return cls(**{**raw, "target_modules": tuple(raw.get("target_modules", cls.target_modules))})


@dataclass(frozen=True)
class TrainSettings:
    steps: int = 100
    batch_size: int = 8
    lr: float | None = None               # None: DEFAULT_LR of the kind
    weight_decay: float = 0.02
    warmup: float = 0.1                   # share of the steps
    chat: bool = True                     # prompts through the tokenizer's chat template
    seed: int = 0


@dataclass
class AdapterRun:
    model: torch.nn.Module                # the adapted model (peft's wrapper for lora/prefix and Llama adapters)
    spec: AdapterSpec
    settings: TrainSettings
    trainable: int
    patch_bytes: int                      # the adapter's tensors as a safetensors file
    losses: list[float] = field(default_factory=list)
    seconds_per_step: float = float("nan")  # mean over the steps after the first
    peak_mb: float = float("nan")           # peak RSS during training
    delta_mb: float = float("nan")          # peak RSS minus RSS at its start

    def summary(self) -> dict:
        first, last = mean_ends(self.losses)
        return {"spec": asdict(self.spec), "settings": asdict(self.settings), "trainable": self.trainable,
                "patch_bytes": self.patch_bytes, "seconds_per_step": self.seconds_per_step,
                "peak_mb": self.peak_mb, "delta_mb": self.delta_mb,
                "loss_first": first, "loss_last": last}


def attach(model, spec: AdapterSpec, seed: int = 0):
    """The model with the adapter of `spec` in it and every base parameter frozen; returns the module to call."""
    if spec.kind == "llama-adapter":
        return add_llama_adapter(model, spec.adapter_len, spec.adapter_layers, seed=seed)
    from peft import get_peft_model  # heavy optional dependency, imported at first use

    with torch.random.fork_rng(devices=[]):  # peft draws LoRA's A and the prefixes from the global RNG
        torch.manual_seed(seed)
        return get_peft_model(model, peft_config(spec, model.config.model_type))


def peft_config(spec: AdapterSpec, model_type: str):
    """peft's config of `spec`'s adapter on a model of `model_type`: what `attach` builds and an exported peft
    folder's adapter_config.json holds."""
    from peft import AdaptionPromptConfig, LoraConfig, PrefixTuningConfig  # heavy optional dependency

    if spec.kind == "lora":
        return LoraConfig(r=spec.rank, lora_alpha=spec.alpha, lora_dropout=0.0, bias="none",
                          target_modules=list(spec.target_modules), task_type="CAUSAL_LM",
                          fan_in_fan_out=model_type == "gpt2")
    if spec.kind == "prefix":
        return PrefixTuningConfig(num_virtual_tokens=spec.num_virtual_tokens, task_type="CAUSAL_LM")
    if model_type in OWN_TYPES:
        raise ConfigError(f"LLaMA-Adapter on {model_type} is this project's own code (peft's {model_type} form adds "
                          "the prompts' output without the attention's output projection W_o, another function): "
                          "peft cannot load it as the same model")
    return AdaptionPromptConfig(adapter_len=spec.adapter_len, adapter_layers=spec.adapter_layers, task_type="CAUSAL_LM")


def adapter_state(model) -> dict[str, torch.Tensor]:
    """The trained tensors: what a patch of this change holds."""
    return {n: q.detach().cpu().contiguous() for n, q in model.named_parameters() if q.requires_grad}


def train_adapter(model, tokenizer, task: InstructionTask, spec: AdapterSpec,
                  settings: TrainSettings = TrainSettings(), init: dict[str, torch.Tensor] | None = None,
                  warn: Callable[[str], None] | None = None,
                  regularizer: Callable[[torch.nn.Module], torch.Tensor] | None = None) -> AdapterRun:
    """Attach `spec`'s adapter to `model` (in place) and train it on `task.train` for `settings.steps` steps.

    `init`: a LLaMA-Adapter's tensors to start from (`AttachedAdapter.state_dict()` of the one this run
    continues) instead of the zero-gate start. `warn` gets the warning about prompts cut to the context.
    `regularizer(adapted)`, when given, is added to every step's loss (O-LoRA's term: adapt/continual.py)."""
    if not task.train:
        raise ConfigError(f"{task.name}: no training examples")
    lr = settings.lr if settings.lr is not None else DEFAULT_LR[spec.kind]
    adapted = attach(model, spec, seed=settings.seed)
    if init is not None and spec.kind == "prefix":
        from peft import set_peft_model_state_dict

        set_peft_model_state_dict(adapted, init)
    elif init is not None:
        load_adapter_state(model, init)
    params = [q for q in adapted.parameters() if q.requires_grad]
    prompts = [prompt_text(e, tokenizer, chat=settings.chat) for e in task.train]
    targets = [target_text(e, tokenizer) for e in task.train]
    max_length = context_length(adapted)  # a prefix takes its first positions
    cut = overlong(tokenizer, prompts, targets, max_length) if max_length else 0
    if cut:
        (warn or _warn)(f"{task.name}: {cut} of {len(prompts)} training prompt(s) with their answer are longer than the "
                        f"model's context ({max_length} tokens): each keeps its last tokens")
    device = params[0].device
    run = AdapterRun(adapted, spec, settings, sum(q.numel() for q in params), 0)

    def loss_of(idx: list[int]) -> torch.Tensor:
        batch = target_batch(tokenizer, [prompts[i] for i in idx], [targets[i] for i in idx], device, max_length)
        loss = adapted(input_ids=batch.input_ids, attention_mask=batch.attention_mask, labels=batch.labels).loss
        return loss + regularizer(adapted) if regularizer is not None else loss

    run_steps(run, adapted, params, lr, settings, len(prompts), loss_of, spec.kind)
    run.patch_bytes = len(save(adapter_state(adapted)))
    return run


def run_steps(run, module: torch.nn.Module, params: list, lr: float, settings: TrainSettings, n_examples: int,
              loss_of: Callable[[list[int]], torch.Tensor], name: str) -> None:
    """The adapters' one training loop: AdamW on `params` with cosine warmup, `settings.steps` seeded batches of
    example indices, each step's `loss_of(indices)` checked finite; fills `run`'s losses, seconds per step (the
    first, warming up, left out) and peak memory. `module` trains in train mode and ends in eval mode."""
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=settings.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, cosine_with_warmup(max(1, round(settings.warmup * settings.steps)), settings.steps))
    times = []
    module.train()
    with PeakMemory() as mem:
        for step, idx in enumerate(batch_order(n_examples, settings.batch_size, settings.steps, settings.seed)):
            start = time.perf_counter()
            loss = loss_of(idx)
            check_finite(loss, name, step)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            times.append(time.perf_counter() - start)
            run.losses.append(loss.item())
    module.eval()
    run.seconds_per_step = sum(times[1:]) / max(1, len(times) - 1)
    run.peak_mb, run.delta_mb = mem.peak_mb, mem.delta_mb


def _warn(message: str) -> None:
    warnings.warn(message, stacklevel=3)


# ----------------------------------------------------------------------------- adapters a ledger records

def adapter_tensors(model) -> dict[str, torch.Tensor]:
    """A LLaMA-Adapter's prompts and gates, under their names in the plain model (`model.layers.5.self_attn.
    adaption_prompt`, whatever peft wrapper holds it): what a ledger's change records."""
    return {plain_parameter_name(n): q.detach().clone() for n, q in adaption_parameters(model).items()}


def load_adapter_state(model, state: dict[str, torch.Tensor]) -> None:
    """Copy recorded prompts and gates (`adapter_tensors`) into the adapter attached to `model`."""
    own = {plain_parameter_name(n): q for n, q in adaption_parameters(model).items()}
    if own.keys() != state.keys() or any(own[k].shape != state[k].shape for k in own):
        theirs = {k: tuple(v.shape) for k, v in state.items()}
        raise ConfigError(f"the recorded LLaMA-Adapter {theirs} does not fit the one attached "
                          f"{ {k: tuple(v.shape) for k, v in own.items()} }: another adapter_len / adapter_layers?")
    with torch.no_grad():
        for name, q in own.items():
            q.copy_(state[name])


class AttachedAdapter:
    """A recorded LLaMA-Adapter or prefix put back on a model, frozen (what a ledger's materialized model
    holds); `state_dict()` gives its tensors, `reset()` takes it off (the model's own parameters were never
    written)."""

    def __init__(self, model, spec: AdapterSpec, state: dict[str, torch.Tensor]):
        self.model, self.spec = model, spec
        if spec.kind == "prefix":
            if set(state) != {PREFIX_STATE}:
                raise ConfigError(f"a recorded prefix holds {PREFIX_STATE!r} alone, not {sorted(state)}")
            self.state = {PREFIX_STATE: state[PREFIX_STATE].detach().clone()}
            add_prefix(model, prefix_key_values(model, self.state[PREFIX_STATE], spec.num_virtual_tokens))
            return
        flags = [(q, q.requires_grad) for q in model.parameters()]
        add_llama_adapter(model, spec.adapter_len, spec.adapter_layers)
        load_adapter_state(model, state)
        for q, flag in flags:  # the model's trainability as it was; the adapter frozen
            q.requires_grad_(flag)
        for q in adaption_parameters(model).values():
            q.requires_grad_(False)

    def state_dict(self) -> dict[str, torch.Tensor]:
        return dict(self.state) if self.spec.kind == "prefix" else adapter_tensors(self.model)

    def reset(self) -> None:
        if self.spec.kind == "prefix":
            remove_prefix(self.model)
        else:
            remove_llama_adapter(self.model)


def module_tensors(adapted, spec: AdapterSpec) -> dict[str, torch.Tensor]:
    """What a ledger records of a trained module adapter: a LLaMA-Adapter's prompts and gates
    (`adapter_tensors`), or a prefix's `prompt_embeddings` (peft's state of its prompt encoder)."""
    if spec.kind == "prefix":
        from peft import get_peft_model_state_dict

        return {PREFIX_STATE: get_peft_model_state_dict(adapted)[PREFIX_STATE].detach().clone()}
    return adapter_tensors(adapted.get_base_model() if hasattr(adapted, "get_base_model") else adapted)  # plain names


def take_off(adapted, spec: AdapterSpec):
    """The bare model out of a trained module adapter (its parameters never written): the LLaMA-Adapter's
    prompts removed, or peft's prefix wrapper dropped (it changes no module of the model it wraps)."""
    return bare_model(adapted) if spec.kind == "prefix" else remove_llama_adapter(adapted)


@torch.no_grad()
def lora_weights(adapted) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """(dense deltas, peft factors) of the LoRA in peft's model `adapted`, whose layers it then takes off.

    deltas: plain weight name -> scale * B @ A in the weight's own layout (peft's `get_delta_weight`: transposed
    for GPT-2's Conv1D). factors: peft's state dict of the adapter (`base_model.model.<module>.lora_A.weight`...),
    what `adapter_model.safetensors` of a peft folder holds."""
    from peft import get_peft_model_state_dict
    from peft.tuners.lora import LoraLayer

    deltas = {}
    for name, module in adapted.get_base_model().named_modules():
        if isinstance(module, LoraLayer):
            deltas[plain_parameter_name(f"{name}.weight")] = module.get_delta_weight("default").detach().clone()
    factors = {k: v.detach().clone() for k, v in get_peft_model_state_dict(adapted).items()}
    adapted.unload()  # the LoRA layers off: the plain modules back, their weights untouched
    return deltas, factors


def count_for(config, spec: AdapterSpec) -> int:
    """Trainable parameters of `spec` on a Llama-shaped model `config` (no model built)."""
    c, layers = config.hidden_size, config.num_hidden_layers
    head = getattr(config, "head_dim", None) or c // config.num_attention_heads
    kv = getattr(config, "num_key_value_heads", None) or config.num_attention_heads
    if spec.kind == "llama-adapter":
        return spec.adapter_layers * (spec.adapter_len * c + 1)
    if spec.kind == "prefix":
        return spec.num_virtual_tokens * layers * 2 * kv * head
    out = {"q_proj": config.num_attention_heads * head, "k_proj": kv * head, "v_proj": kv * head, "o_proj": c}
    ins = {"o_proj": config.num_attention_heads * head}
    return layers * sum(spec.rank * (ins.get(m, c) + out[m]) for m in spec.target_modules)


def equal_budget(config, lora_rank: int = 2, adapter_len: int = 10) -> dict[str, AdapterSpec]:
    """One spec per kind at LoRA(q, v, rank)'s parameter count: the prefix length and the number of
    LLaMA-Adapter layers (K = adapter_len) nearest it."""
    lora = AdapterSpec("lora", rank=lora_rank, alpha=2.0 * lora_rank)
    budget = count_for(config, lora)
    per_token = count_for(config, AdapterSpec("prefix", num_virtual_tokens=1))
    prefix = AdapterSpec("prefix", num_virtual_tokens=max(1, round(budget / per_token)))
    per_layer = count_for(config, AdapterSpec("llama-adapter", adapter_len=adapter_len, adapter_layers=1))
    layers = min(config.num_hidden_layers, max(1, round(budget / per_layer)))
    return {"llama-adapter": AdapterSpec("llama-adapter", adapter_len=adapter_len, adapter_layers=layers),
            "lora": lora, "prefix": prefix}
