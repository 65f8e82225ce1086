"""LLaMA-Adapter (modules/llama_adapter.py) on tiny Llama and GPT-2 models built from configs.

The zero-init test alone would pass for an adapter that does nothing, so every other test first moves
the gates off zero (as peft's tests force non-identity init) and checks the layer against the paper's
equation written out independently here.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

from lifelong.families.lm import tiny_lm
from lifelong.modules.llama_adapter import (
    GATE,
    PROMPT,
    adaption_parameters,
    add_llama_adapter,
    remove_llama_adapter,
)

ARCHS = ("llama", "gpt2")
K, L = 3, 2  # prompt length, adapted layers (of 4)


def inputs(tokenizer):
    return tokenizer(["The capital of France is", "A quick brown fox jumps over"], return_tensors="pt", padding=True)


def open_gates(model, value: float = 0.7) -> None:
    with torch.no_grad():
        for name, q in adaption_parameters(model).items():
            if name.endswith(GATE):
                q.fill_(value)


@pytest.mark.parametrize("arch", ARCHS)
def test_logits_bit_identical_at_init_and_not_after(arch):
    model, tok = tiny_lm(arch)
    enc = inputs(tok)
    with torch.no_grad():
        base = model(**enc).logits.clone()
    adapted = add_llama_adapter(model, adapter_len=K, adapter_layers=L)
    with torch.no_grad():
        assert torch.equal(adapted(**enc).logits, base)  # g = 0: exactly the base
        open_gates(adapted)
        assert (adapted(**enc).logits - base).abs().max() > 1e-3  # the prompts do reach the output


@pytest.mark.parametrize("arch", ARCHS)
def test_only_prompts_and_gates_train(arch):
    model, _ = tiny_lm(arch)
    d, layers = model.config.hidden_size, model.config.num_hidden_layers
    adapted = add_llama_adapter(model, adapter_len=K, adapter_layers=L)
    trainable = {n: q for n, q in adapted.named_parameters() if q.requires_grad}
    assert trainable.keys() == adaption_parameters(adapted).keys()
    assert sum(q.numel() for q in trainable.values()) == L * (K * d + 1)
    # the top L layers, not the bottom ones
    top = {str(i) for i in range(layers - L, layers)}
    assert {next(p for p in n.split(".") if p.isdigit()) for n in trainable} == top
    assert all(q.abs().sum() == 0 for n, q in trainable.items() if n.endswith(GATE))


def _reference_llama(attn, hidden, cos, sin, prompt, gate):
    """W_o [g softmax(Q K_p^T / sqrt(d)) V_p] for one LlamaAttention, from the paper (queries RoPE'd, prompt
    keys without position, key/value heads repeated for grouped-query attention)."""
    b, t, _ = hidden.shape
    h, d = attn.config.num_attention_heads, attn.head_dim
    kv = attn.config.num_key_value_heads
    q = attn.q_proj(hidden).view(b, t, h, d).transpose(1, 2)
    q, _ = apply_rotary_pos_emb(q, q, cos, sin)
    k = attn.k_proj(prompt[0]).view(-1, kv, d).transpose(0, 1).repeat_interleave(h // kv, dim=0)  # (H, K, d)
    v = attn.v_proj(prompt[0]).view(-1, kv, d).transpose(0, 1).repeat_interleave(h // kv, dim=0)
    probs = torch.softmax(torch.einsum("bhtd,hkd->bhtk", q, k) / math.sqrt(d), dim=-1)
    heads = torch.einsum("bhtk,hkd->bthd", gate * probs, v).reshape(b, t, h * d)
    return attn.o_proj(heads)


def _reference_gpt2(attn, hidden, prompt, gate):
    b, t, c = hidden.shape
    h, d = attn.num_heads, attn.head_dim
    q, _, _ = attn.c_attn(hidden).split(c, dim=2)
    _, k, v = attn.c_attn(prompt[0]).split(c, dim=1)
    q = q.view(b, t, h, d).transpose(1, 2)
    k, v = k.view(-1, h, d).transpose(0, 1), v.view(-1, h, d).transpose(0, 1)  # (H, K, d)
    probs = torch.softmax(torch.einsum("bhtd,hkd->bhtk", q, k) / math.sqrt(d), dim=-1)
    heads = torch.einsum("bhtk,hkd->bthd", gate * probs, v).reshape(b, t, c)
    return F.linear(heads, attn.c_proj.weight.T)  # W_o, without the bias the word path already added


@pytest.mark.parametrize("arch", ARCHS)
def test_adapted_attention_is_the_papers_equation(arch):
    """The top adapted layer's output = the frozen attention's output + the gated prompt term, computed
    here from the equation (peft's code for Llama, ours for GPT-2)."""
    model, tok = tiny_lm(arch)
    adapted = add_llama_adapter(model, adapter_len=K, adapter_layers=L)
    open_gates(adapted, 0.9)
    layer = model.model.layers[-1].self_attn if arch == "llama" else model.transformer.h[-1].attn
    inner = layer.model if arch == "llama" else layer  # peft wraps the Llama attention; GPT-2's is hooked
    seen = {}

    def keep_inputs(module, args, kwargs):
        seen["args"], seen["kwargs"] = args, dict(kwargs)

    def keep_output(module, args, kwargs, output):
        seen["out"] = output[0]

    handles = [inner.register_forward_pre_hook(keep_inputs, with_kwargs=True),
               layer.register_forward_hook(keep_output, with_kwargs=True)]
    with torch.no_grad():
        adapted(**inputs(tok), use_cache=False)  # no cache: the captured inputs can run again
        for handle in handles:
            handle.remove()
        args, kwargs = seen["args"], seen["kwargs"]
        hidden = args[0] if args else kwargs["hidden_states"]
        prompt, gate = getattr(layer, PROMPT), getattr(layer, GATE)
        if arch == "llama":
            base_out = inner(*args, **kwargs)[0]
            term = _reference_llama(inner, hidden, *kwargs["position_embeddings"], prompt, gate)
        else:
            hooks = dict(inner._forward_hooks)
            inner._forward_hooks.clear()  # the frozen attention alone
            base_out = inner(*args, **kwargs)[0]
            inner._forward_hooks.update(hooks)
            term = _reference_gpt2(inner, hidden, prompt, gate)
    assert term.abs().max() > 1e-3
    torch.testing.assert_close(seen["out"], base_out + term, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("arch", ARCHS)
def test_training_lowers_the_loss_and_moves_the_gates(arch):
    model, tok = tiny_lm(arch)
    enc = inputs(tok)
    labels = enc["input_ids"].masked_fill(enc["attention_mask"] == 0, -100)
    adapted = add_llama_adapter(model, adapter_len=K, adapter_layers=L)
    params = list(adaption_parameters(adapted).values())
    opt = torch.optim.Adam(params, lr=5e-2)
    losses = []
    for _ in range(20):
        loss = adapted(**enc, labels=labels).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 0.05
    assert all(q.abs().sum() > 0 for n, q in adaption_parameters(adapted).items() if n.endswith(GATE))
    assert all(q.grad is None for n, q in adapted.named_parameters() if not n.endswith((PROMPT, GATE)))


@pytest.mark.parametrize("arch", ARCHS)
def test_seeded_and_removable(arch):
    model, tok = tiny_lm(arch)
    enc = inputs(tok)
    names = [n for n, _ in model.named_parameters()]
    with torch.no_grad():
        base = model(**enc).logits.clone()
    first = {n: q.detach().clone() for n, q in adaption_parameters(add_llama_adapter(model, K, L, seed=5)).items()}
    model = remove_llama_adapter(model)
    again = add_llama_adapter(model, K, L, seed=5)
    assert all(torch.equal(first[n], q) for n, q in adaption_parameters(again).items())
    other = add_llama_adapter(remove_llama_adapter(again), K, L, seed=6)
    assert not all(torch.equal(first[n], q) for n, q in adaption_parameters(other).items())
    open_gates(other)
    bare = remove_llama_adapter(other)
    assert [n for n, _ in bare.named_parameters()] == names
    with torch.no_grad():
        assert torch.equal(bare(**enc).logits, base)


@pytest.mark.parametrize("arch", ARCHS)
def test_generation_with_the_cache_matches_without(arch):
    """Greedy decoding with the KV cache (queries of new tokens only, at their positions) gives the same
    tokens as recomputing the whole sequence each step: the prompts' term is position-correct."""
    model, tok = tiny_lm(arch)
    tok.padding_side = "left"
    enc = tok(["The capital of France is"], return_tensors="pt")
    adapted = add_llama_adapter(model, adapter_len=K, adapter_layers=L)
    open_gates(adapted, 2.0)
    with torch.no_grad():
        cached = adapted.generate(**enc, max_new_tokens=6, do_sample=False, use_cache=True)
        uncached = adapted.generate(**enc, max_new_tokens=6, do_sample=False, use_cache=False)
    assert torch.equal(cached, uncached)


def test_refuses_an_unsupported_model_and_a_second_adapter():
    from transformers import BertConfig, BertModel

    with pytest.raises(ValueError, match="model types"):
        add_llama_adapter(BertModel(BertConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                                               intermediate_size=32)))
    model, _ = tiny_lm("gpt2")
    add_llama_adapter(model, K, L)
    with pytest.raises(ValueError, match="already holds"):
        add_llama_adapter(model, K, L)
    with pytest.raises(ValueError, match="adapter_layers"):
        add_llama_adapter(tiny_lm("gpt2")[0], K, 9)


@pytest.mark.slow
def test_embedded_smollm2_starts_exactly_at_the_base():
    """The real SmolLM2-135M-Instruct (grouped-query attention, 9 heads over 3 KV heads) through peft's code."""
    from lifelong.families.lm import build_lm

    model, tok = build_lm("embedded")
    enc = tok(["The capital of France is"], return_tensors="pt")
    with torch.no_grad():
        base = model(**enc).logits.clone()
        adapted = add_llama_adapter(model, adapter_len=10, adapter_layers=20)
        assert sum(q.numel() for q in adaption_parameters(adapted).values()) == 20 * (10 * 576 + 1)
        assert torch.equal(adapted(**enc).logits, base)
        open_gates(adapted, 0.5)
        assert not torch.equal(adapted(**enc).logits, base)
