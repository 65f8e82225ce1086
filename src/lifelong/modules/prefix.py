"""Prefix tuning put on a causal LM in place: recorded key/value prefixes in every attention layer.

Prefix tuning (Li & Liang, "Prefix-Tuning: Optimizing Continuous Prompts for Generation", ACL 2021;
arXiv:2101.00190) gives every layer l N trained key and value vectors that each token attends to before
the sequence's own:

    Attn_l(X) = softmax(Q [P_l^K ; K(X)]^T / sqrt(d) + M) [P_l^V ; V(X)]        M: 0 on the prefix, causal after

Training goes through peft (`PrefixTuningConfig`, no reparametrisation MLP: `adapt.instruct`), whose model
wraps the LM and feeds the prefixes as the past key/values of a cache. A ledger needs the prefix on the
model it materializes, in place, surviving `generate`: `add_prefix` does that without peft's wrapper, with
the same function as peft's model:

- the keys and values are peft's own (`PeftModel.get_prompt` of a wrapper built once from the recorded
  `prompt_embeddings` and dropped), so their layout is peft's for every architecture it supports;
- an attention function registered with transformers (`AttentionInterface`, over its SDPA) prepends them,
  per layer, to the keys and values the layer computed, and opens the mask on them; the model's cache never
  holds them, so `generate`'s cache positions and masks stay those of the bare model;
- positions are shifted by N as under peft, where the prefix fills the first N cache positions (real
  tokens then sit at N, N + 1, ...; RoPE rotates queries by them, GPT-2 adds their position embeddings):
  a forward pre-hook on the decoder adds N to the position ids (it computes them as the model would first).

`remove_prefix` takes all of it off; the model's parameters are never written. Tested: logits and greedy
generations equal peft's model on tiny Llama and GPT-2 models (tests/test_prefix_ledger.py).
"""

from __future__ import annotations

import torch
from torch import nn

from lifelong.modules.peft_wrap import bare_model

IMPLEMENTATION = "lifelong_prefix"
KEYS, VALUES = "lifelong_prefix_keys", "lifelong_prefix_values"  # buffers of each attention module


def prefix_key_values(model: nn.Module, prompt_embeddings: torch.Tensor, num_virtual_tokens: int
                      ) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Per decoder layer, (keys, values) of shape (1, kv heads, N, head dim): peft's prefix of a
    `PrefixTuningConfig(num_virtual_tokens=N)` whose prompt encoder holds `prompt_embeddings` (N, layers * 2 *
    kv heads * head dim), as peft's model feeds them (`get_prompt`). `model` is left as it was."""
    from peft import PrefixTuningConfig, get_peft_model, set_peft_model_state_dict  # heavy optional dependency

    config = PrefixTuningConfig(num_virtual_tokens=num_virtual_tokens, task_type="CAUSAL_LM", inference_mode=True)
    wrapped = get_peft_model(model, config)
    try:
        set_peft_model_state_dict(wrapped, {"prompt_embeddings": prompt_embeddings})
        with torch.no_grad():
            cache = wrapped.get_prompt(batch_size=1)
        layers = [(layer.keys, layer.values) for layer in cache.layers] if hasattr(cache, "layers") \
            else [tuple(kv) for kv in cache]
        return [(k.detach().clone(), v.detach().clone()) for k, v in layers]
    finally:  # a prompt-learning wrapper leaves the model's modules alone; only its marks come off
        bare_model(wrapped)


def attention_modules(model: nn.Module) -> list[nn.Module]:
    """The self-attention module of each decoder layer (Llama-like: `model.layers[i].self_attn`; GPT-2:
    `transformer.h[i].attn`)."""
    decoder = model.base_model
    layers = decoder.layers if hasattr(decoder, "layers") else decoder.h
    return [layer.self_attn if hasattr(layer, "self_attn") else layer.attn for layer in layers]


def add_prefix(model: nn.Module, key_values: list[tuple[torch.Tensor, torch.Tensor]]) -> None:
    """Put `key_values` (`prefix_key_values`) on `model` in place; `remove_prefix` takes them off."""
    if has_prefix(model):
        raise ValueError("the model already holds a prefix: remove_prefix first")
    attentions = attention_modules(model)
    if len(attentions) != len(key_values):
        raise ValueError(f"a prefix of {len(key_values)} layers for a model of {len(attentions)}")
    _register()
    for attn, (k, v) in zip(attentions, key_values):
        attn.register_buffer(KEYS, k, persistent=False)
        attn.register_buffer(VALUES, v, persistent=False)
    config = model.config
    config._lifelong_attn_before = config._attn_implementation
    config._attn_implementation = IMPLEMENTATION
    decoder = model.base_model
    decoder._lifelong_prefix_hook = decoder.register_forward_pre_hook(_shift_positions, with_kwargs=True)
    decoder._lifelong_prefix_len = key_values[0][0].shape[2]


def has_prefix(model: nn.Module) -> bool:
    return hasattr(model.base_model, "_lifelong_prefix_hook")


def prefix_length(model: nn.Module) -> int:
    """N, the positions the model's prefix takes (0 without one): its context is N tokens shorter. The prefix
    is one put on by `add_prefix`, or that of peft's prefix-tuning wrapper (what `adapt.instruct` trains)."""
    peft = getattr(model, "active_peft_config", None)
    if peft is not None and str(getattr(peft, "peft_type", "")).endswith("PREFIX_TUNING"):
        return peft.num_virtual_tokens
    return getattr(getattr(model, "base_model", None), "_lifelong_prefix_len", 0)


def remove_prefix(model: nn.Module) -> None:
    """Take the prefix off: the attention implementation, the position shift and the buffers as before."""
    decoder = model.base_model
    if not hasattr(decoder, "_lifelong_prefix_hook"):
        return
    decoder._lifelong_prefix_hook.remove()
    del decoder._lifelong_prefix_hook, decoder._lifelong_prefix_len
    model.config._attn_implementation = model.config._lifelong_attn_before
    del model.config._lifelong_attn_before
    for attn in attention_modules(model):
        for name in (KEYS, VALUES):
            attn._buffers.pop(name, None)


def _shift_positions(decoder: nn.Module, args: tuple, kwargs: dict):
    """The decoder's position ids, as it would compute them, plus the prefix length (peft's positions)."""
    if len(args) > 1:
        raise TypeError("the prefixed decoder takes input_ids alone by position (as transformers' LM heads call it)")
    if args:  # GPT-2's LM head passes input_ids by position
        kwargs, args = {**kwargs, "input_ids": args[0]}, ()
    n = decoder._lifelong_prefix_len
    positions = kwargs.get("position_ids")
    if positions is None:
        x = kwargs.get("input_ids") if kwargs.get("input_ids") is not None else kwargs["inputs_embeds"]
        cache_position = kwargs.get("cache_position")
        if cache_position is None:
            past = kwargs.get("past_key_values")
            start = past.get_seq_length() if past is not None else 0
            cache_position = torch.arange(start, start + x.shape[1], device=x.device)
        positions = cache_position.unsqueeze(0)
    return args, {**kwargs, "position_ids": positions + n}


def _prefix_attention(module: nn.Module, query, key, value, attention_mask, **kwargs):
    """SDPA over [prefix ; the layer's keys and values], the prefix visible to every query."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    pk, pv = getattr(module, KEYS), getattr(module, VALUES)
    batch, n, q_len, kv_len = key.shape[0], pk.shape[2], query.shape[2], key.shape[2]
    key = torch.cat([pk.to(key.dtype).expand(batch, -1, -1, -1), key], dim=2)
    value = torch.cat([pv.to(value.dtype).expand(batch, -1, -1, -1), value], dim=2)
    if attention_mask is None:
        if q_len > 1:  # the causal pattern SDPA would have applied, made explicit, bottom-right aligned
            causal = torch.ones(q_len, kv_len, dtype=torch.bool, device=query.device).tril(kv_len - q_len)
            attention_mask = torch.cat([causal.new_ones(q_len, n), causal], dim=1)[None, None]
    else:
        mask = attention_mask[..., -kv_len:] if attention_mask.shape[-1] > kv_len else attention_mask
        shape = (*mask.shape[:-1], n)
        opened = torch.ones(shape, dtype=torch.bool, device=mask.device) if mask.dtype == torch.bool \
            else torch.zeros(shape, dtype=mask.dtype, device=mask.device)
        attention_mask = torch.cat([opened, mask], dim=-1)
    kwargs["is_causal"] = False  # the mask says it all
    return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)


def _register() -> None:
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register(IMPLEMENTATION, _prefix_attention)
    AttentionMaskInterface.register(IMPLEMENTATION, sdpa_mask)
