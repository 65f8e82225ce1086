"""LLaMA-Adapter: zero-init gated adaption prompts (Zhang et al., "LLaMA-Adapter: Efficient Fine-tuning of
Large Language Models with Zero-initialized Attention", ICLR 2024; arXiv:2303.16199; official code
github.com/OpenGVLab/LLaMA-Adapter, llama/model.py).

In each of the top L decoder layers l, K learnable prompt vectors P_l (K, C) go through the layer's own
frozen key and value projections; every word token's query attends to them under a softmax of their
own, scaled by a gate g_l that starts at zero, and the result is added to the layer's attention output:

    S_l   = Q_l (P_l W_k)^T / sqrt(d_head)                         (B, H, T, K)   Q_l: the tokens' queries (RoPE'd)
    out_l = Attn_l(X_l) + W_o [ g_l * softmax(S_l) (P_l W_v) ]      (B, T, C)

(the paper's S_g = [softmax(S_K) * g_l; softmax(S_{M+1})], the two softmaxes independent). With g_l = 0
the adapted model is the base model exactly: the added term is a product by zero, so the logits are
bit-identical at initialisation (tested on tiny Llama and GPT-2 models). P_l ~ N(0, 1) (the official
`nn.Embedding` init), g_l = 0. Only P_l and g_l train: L * (K * C + 1) parameters.

Where the code comes from:
- Llama and Mistral (SmolLM2 is a Llama): peft's adaption prompts (`AdaptionPromptConfig`,
  `get_peft_model`), unchanged. Queries are recomputed with RoPE, the prompt keys carry no position (as
  in the official code), grouped key/value heads are repeated; W_o is the layer's `o_proj`.
- GPT-2: written here. peft has a GPT-2 form, but it adds g_l softmax(S_l) (P_l W_v) to the attention's
  output after the output projection without passing it through W_o (its gpt2 entry has
  `o_proj_layer=None`), which is another function than the paper's. Here the term goes through `c_proj`'s
  weight (not its bias, which the word tokens' path already added: W_o (a + b) + bias = W_o a + bias + W_o b).
  The prompt and gate are parameters of the attention module itself (`transformer.h.5.attn.adaption_prompt`),
  applied by a forward hook, so the model's own parameter names do not change.

Deviations from the paper:
- The gate is g_l itself, one scalar per layer, as in peft. The official v1 code multiplies by a gate per
  head, (1, H, 1, 1), also without tanh; the later official code (llama_adapter_v2) multiplies by
  tanh(g_l). At g_l = 0 all three give 0 with the same gradient (tanh'(0) = 1), so the zero-init start
  and its first steps are the same; they part as |g_l| grows (tanh bounds the gate by 1).
- The prompts are drawn from a generator seeded by `seed` (peft draws them from the global RNG): the same
  seed gives the same adapter.
- The official code puts all prompts in one `adapter_query` embedding (L * K, C) shared by the layers'
  slices; here each layer holds its own (K, C) tensor: the same parameters.
"""

from __future__ import annotations

import math
import re

import torch
import torch.nn.functional as F
from torch import nn

from lifelong.modules.peft_wrap import bare_model

PEFT_TYPES = ("llama", "mistral")  # model types whose adaption prompts peft implements as the paper does
OWN_TYPES = ("gpt2",)              # model types written here
PROMPT, GATE = "adaption_prompt", "adaption_gate"  # the parameter names (peft's): what trains, what a patch holds


# peft's adaption prompt wraps each adapted attention module and holds the original as `.model`: inside such a
# layer, parameter names gain that hop (`model.layers.3.self_attn.model.q_proj.weight`)
_ADAPTED_HOP = re.compile(r"\.self_attn\.model\.")


def plain_parameter_name(name: str) -> str:
    """A parameter's name in the model without adaption prompts (what a weight patch is keyed by)."""
    return _ADAPTED_HOP.sub(".self_attn.", name)


def supported_types() -> tuple[str, ...]:
    return PEFT_TYPES + OWN_TYPES


def add_llama_adapter(model: nn.Module, adapter_len: int = 10, adapter_layers: int = 8, seed: int = 0) -> nn.Module:
    """Adaption prompts of `adapter_len` (K) vectors in each of the top `adapter_layers` (L) attention layers;
    every other parameter frozen. Returns the module to call: peft's model wrapping `model` for Llama and
    Mistral, `model` itself for GPT-2. The model's function is unchanged until a gate moves from 0."""
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if model_type not in supported_types():
        raise ValueError(f"LLaMA-Adapter supports model types {', '.join(supported_types())}, not {model_type!r}")
    if adapter_len < 1 or adapter_layers < 1:
        raise ValueError(f"adapter_len and adapter_layers must be >= 1, got {adapter_len}, {adapter_layers}")
    if adaption_parameters(model):
        raise ValueError("the model already holds adaption prompts: remove_llama_adapter first")
    for q in model.parameters():
        q.requires_grad_(False)
    if model_type in PEFT_TYPES:
        from peft import AdaptionPromptConfig, get_peft_model  # heavy optional dependency, imported at first use

        config = AdaptionPromptConfig(adapter_len=adapter_len, adapter_layers=adapter_layers, task_type="CAUSAL_LM")
        wrapped = get_peft_model(model, config)
    else:
        attentions = [block.attn for block in model.transformer.h]
        if adapter_layers > len(attentions):
            raise ValueError(f"adapter_layers={adapter_layers} but the model has {len(attentions)} layers")
        for attn in attentions[-adapter_layers:]:
            weight = attn.c_proj.weight
            attn.register_parameter(PROMPT, nn.Parameter(torch.empty(1, adapter_len, weight.shape[0]).to(weight)))
            attn.register_parameter(GATE, nn.Parameter(torch.zeros(1).to(weight)))
            attn.register_forward_hook(_gpt2_adaption, with_kwargs=True)
        wrapped = model
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, q in adaption_parameters(wrapped).items():  # in layer order: the draw is the same every time
            if name.endswith(PROMPT):
                q.copy_(torch.randn(q.shape, generator=g).to(q))
    return wrapped


def adaption_parameters(model: nn.Module) -> dict[str, nn.Parameter]:
    """The prompts and gates (name -> parameter), in module order; {} when the model has none."""
    return {n: q for n, q in model.named_parameters() if n.endswith((PROMPT, GATE))}


def remove_llama_adapter(model: nn.Module) -> nn.Module:
    """Take every adaption prompt off; returns the bare model (from peft's wrapper too), whose parameters
    were never written. Trainability flags are left as they are (frozen)."""
    from peft.tuners.adaption_prompt.layer import _BaseAdaptedAttention  # heavy optional dependency

    base = bare_model(model)
    for parent in list(base.modules()):
        for child_name, child in list(parent.named_children()):
            if isinstance(child, _BaseAdaptedAttention):
                setattr(parent, child_name, child.model)  # peft's wrapper -> the original attention module
    for module in base.modules():
        for key in [k for k, hook in module._forward_hooks.items() if hook is _gpt2_adaption]:
            del module._forward_hooks[key]
        for name in (PROMPT, GATE):
            if name in module._parameters:
                del module._parameters[name]
    return base


def _gpt2_adaption(attn: nn.Module, args: tuple, kwargs: dict, output: tuple) -> tuple:
    """GPT2Attention's forward hook: its output plus W_o [g * softmax(Q K_p^T / sqrt(d)) V_p]."""
    hidden = args[0] if args else kwargs["hidden_states"]  # (B, T, C): the block's ln_1 output
    out, *rest = output
    return (out + gpt2_prompt_term(attn, hidden, getattr(attn, PROMPT), getattr(attn, GATE)), *rest)


def gpt2_prompt_term(attn: nn.Module, hidden: torch.Tensor, prompt: torch.Tensor, gate: torch.Tensor) -> torch.Tensor:
    """W_o [g * softmax(Q K_p^T / sqrt(d)) V_p] of a GPT2Attention for its input `hidden` (B, T, C) and prompts
    `prompt` (1, K, C), or (B, K, C) when each sequence has its own (the multimodal adapter's)."""
    b, t, c = hidden.shape
    k_len, h, d = prompt.shape[1], attn.num_heads, attn.head_dim
    w, bias = attn.c_attn.weight, attn.c_attn.bias  # Conv1D: x @ w + bias, w (C, 3C) = [W_q | W_k | W_v]
    q = (hidden @ w[:, :c] + bias[:c]).view(b, t, h, d).transpose(1, 2)  # (B, H, T, d)
    _, k, v = (prompt @ w + bias).split(c, dim=2)  # (1 or B, K, C) each
    k = k.view(-1, k_len, h, d).transpose(1, 2)  # (1 or B, H, K, d)
    v = v.view(-1, k_len, h, d).transpose(1, 2)  # (1 or B, H, K, d)
    scores = q @ k.transpose(2, 3) / math.sqrt(d)  # (B, H, T, K)
    probs = gate * F.softmax(scores.float(), dim=-1).to(q.dtype)  # the prompts' own softmax, gated
    added = (probs @ v).transpose(1, 2).reshape(b, t, c)  # (B, T, C), heads concatenated as in the word path
    return added @ attn.c_proj.weight  # W_o without its bias
