"""ROME: Rank-One Model Editing (Meng, Bau, Andonian, Belinkov, NeurIPS 2022, "Locating and Editing
Factual Associations in GPT").

One edit rewrites one FFN output projection W (out x in) so that the subject's key k* (the
projection's input at the subject's last token) maps to a value v* that makes the model say the
new object, while keys of other text move as little as possible (least squares under C):

    W <- W + (v* - W k*) (C^-1 k*)^T / ((C^-1 k*)^T k*),      C = E[k k^T] over a text corpus

- k*: the key averaged over the bare prompt and the prompt behind short texts that the model itself
  samples (top-5) from the paper's seed words ("The", "Therefore", ...): `prefixes_per_length` texts
  for each of `prefix_lengths`.
- v* = W k* + delta. delta is optimised (Adam, `v_steps` steps, `v_lr`) while it is added to the FFN
  output at the subject's last token of every prefixed prompt, minimising
      NLL(target) + kl_factor * KL(P_edited || P_0)[next token of "{subject} is a"]
      + v_weight_decay * ||delta|| / ||o||^2,      ||delta|| <= clamp_norm_factor * ||o||
  with o the FFN output at the subject's last token of the bare prompt (the official compute_v:
  these exact terms, the un-squared decay, the 5e-2 early stop).
- C: the uncentered second moment of the projection's inputs over `cov_tokens` tokens of a corpus,
  computed once per (model, layer, corpus, size) and cached as safetensors under
  `cache_dir()/rome/`. There is no Wikipedia offline, so the corpus is the Python Language Reference
  that ships inside every CPython (`pydoc_data.topics`: ~465k characters of English prose about
  Python, ~113k SmolLM2 tokens). It is narrower than Wikipedia; C only needs to be a reasonable
  estimate of which key directions ordinary text uses.

Defaults: EasyEdit's Llama hparams (v_lr 0.5, 25 steps, weight decay 1e-3, clamp 4, kl 0.0625) with
the paper's covariance adjustment on (EasyEdit switches it off for Llama for lack of statistics; we
have them). Layer 7 of SmolLM2's 30: ROME edits the early-middle MLP where causal tracing peaks
(GPT-2 XL 17/48; EasyEdit uses 5 for Llama-2-7B and Llama-3.2-1B). Measured on SmolLM2 (12 "The
capital of X is" facts, subject embeddings noised at 3x their std, clean MLP outputs restored at the
subject's last token over a window of 5 layers, mean gain in P(capital)): windows that include
layer 0 (centred on 0-2) restore the token itself (+0.44, the embedding-like first MLP); past them
the effect peaks at layer 7 (+0.071; layers 5, 6, 8: +0.049, +0.049, +0.046) and is below +0.002 from layer 16 on.

Deviations: 10 prefixes (5 of 5 tokens, 5 of 10) instead of 20, and C from 2e4 tokens of the Python
reference instead of 1e5 Wikipedia samples, both for CPU time (C took ~2.5 min on a busy shared core,
then is cached; a first edit with a cold cache took 87 s on a quieter one); the closed form uses the
averaged key k* on both sides (the paper's equation; the official code takes the bare prompt's key
for W k*). On SmolLM2 one edit takes 30-50 s on one shared CPU core (each of up to 25 steps is a
forward and backward pass over the 11 prompts).
"""

from __future__ import annotations

import hashlib
import json
from contextlib import contextmanager
from dataclasses import dataclass
from functools import lru_cache

import torch
import torch.nn.functional as F

from lifelong.cache import load_cached, store_cached
from lifelong.data.edit_requests import EditRequest
from lifelong.edit.base import Editor
from lifelong.families.lm import ffn_out, linear_weight, resolve_layer, target_batch, target_nll
from lifelong.fingerprint import tensor_digest

# The paper's seed words for the random prefixes (official get_context_templates).
PREFIX_SEEDS = ("The", "Therefore", "Because", "I", "You")


@dataclass(frozen=True)
class Params:
    layer: int = 7                 # which FFN output projection to rewrite (negative counts from the end)
    v_steps: int = 25              # Adam steps on delta
    v_lr: float = 0.5
    v_weight_decay: float = 1e-3
    clamp_norm_factor: float = 4.0
    kl_factor: float = 0.0625
    prefix_lengths: tuple[int, ...] = (5, 10)   # tokens per sampled prefix, one group per length
    prefixes_per_length: int = 5
    mom2_adjustment: bool = True   # False: C = I (plain least-norm rank-one update)
    corpus: str = "python-reference"
    cov_tokens: int = 20_000
    seed: int = 0


class ROME(Editor):
    name = "rome"
    records = "weights"  # how a ledger records an edit: an additive weight patch
    Params = Params

    def __init__(self, model, tokenizer, params: Params = Params()) -> None:
        super().__init__(model, tokenizer, params)
        self.layer = resolve_layer(model, params.layer, 0.25)
        self.module = ffn_out(model, self.layer)
        self.original = linear_weight(self.module).detach().clone()  # (out, in): reset copies it back
        self._prefixes: list[str] | None = None
        self._cov: torch.Tensor | None = None
        # The last edit's closed-form pieces, for inspection and tests.
        self.last_key = self.last_value = self.last_update = None

    # ------------------------------------------------------------------ the edit

    def apply(self, request: EditRequest) -> dict:
        p, tok = self.params, self.tokenizer
        device = linear_weight(self.module).device
        texts = [prefix + request.prompt for prefix in self.prefixes()]
        idxs = [subject_last_token(tok, text, request.subject, start=len(text) - len(request.prompt))
                for text in texts]
        batch = target_batch(tok, texts, [request.target_new] * len(texts), device)
        rows = torch.arange(len(texts), device=device)
        idx = torch.tensor(idxs, device=device)

        with torch.no_grad(), capture_io(self.module) as io:
            self.model(input_ids=batch.input_ids, attention_mask=batch.attention_mask)
        key = io["input"][rows, idx].float().mean(0)   # k*: (in,)
        out0 = io["output"][0, idxs[0]].float()        # o: FFN output at the bare prompt's subject token

        kl_text = f"{request.subject} is a"
        kl_ids = torch.tensor([tok(kl_text, add_special_tokens=False)["input_ids"]], device=device)
        kl_idx = subject_last_token(tok, kl_text, request.subject)
        with torch.no_grad():
            kl_init = torch.log_softmax(self.model(input_ids=kl_ids).logits[0, kl_idx].float(), -1)

        delta = torch.zeros_like(out0, requires_grad=True)
        opt = torch.optim.Adam([delta], lr=p.v_lr)
        max_norm = p.clamp_norm_factor * out0.norm()
        nll_first = nll = None
        steps = 0
        for step in range(p.v_steps):
            with add_at(self.module, rows, idx, delta):
                nll = target_nll(self.model, batch)
            with add_at(self.module, torch.zeros(1, dtype=torch.long, device=device),
                        torch.tensor([kl_idx], device=device), delta):
                kl_now = torch.log_softmax(self.model(input_ids=kl_ids).logits[0, kl_idx].float(), -1)
            # F.kl_div(a, b, log_target) = sum exp(b) (b - a): KL(edited || original), as the official code
            kl = p.kl_factor * F.kl_div(kl_init, kl_now, log_target=True, reduction="sum")
            decay = p.v_weight_decay * delta.norm() / out0.norm() ** 2
            loss = nll + kl + decay
            nll_first = nll.item() if nll_first is None else nll_first
            steps = step + 1
            if loss.item() < 5e-2 or step == p.v_steps - 1:
                break
            (grad,) = torch.autograd.grad(loss, [delta])  # only delta: the model's .grad stays untouched
            delta.grad = grad
            opt.step()
            with torch.no_grad():  # project back into the L2 ball
                if delta.norm() > max_norm:
                    delta.mul_(max_norm / delta.norm())

        delta = delta.detach()
        weight = linear_weight(self.module)
        value = weight.detach().float() @ key + delta                   # v* = W k* + delta
        u = self.covariance_solve(key) if p.mom2_adjustment else key   # C^-1 k*
        update = torch.outer(value - weight.detach().float() @ key, u) / (u @ key)  # (out, in), rank one
        with torch.no_grad():
            weight.add_(update.to(weight.dtype))
        self.last_key, self.last_value, self.last_update = key, value, update
        return {"nll_before": float(nll_first), "nll_v": float(nll.item()), "steps": float(steps),
                "delta_norm": float(delta.norm()), "update_norm": float(update.norm())}

    def reset(self) -> None:
        with torch.no_grad():
            linear_weight(self.module).copy_(self.original)
        self.last_key = self.last_value = self.last_update = None

    # ------------------------------------------------------------------ pieces

    def prefixes(self) -> list[str]:
        """"" and the sampled prefixes, each ending in ". " (sampled once per editor, seeded)."""
        if self._prefixes is None:
            p = self.params
            lengths = [n for n in p.prefix_lengths for _ in range(p.prefixes_per_length)]
            sampled = sample_prefixes(self.model, self.tokenizer, lengths, p.seed)
            self._prefixes = [""] + [s.replace("{", " ").replace("}", " ") + ". " for s in sampled]
        return self._prefixes

    def covariance_solve(self, key: torch.Tensor) -> torch.Tensor:
        if self._cov is None:
            self._cov = key_covariance(self.model, self.tokenizer, self.layer, self.params.corpus,
                                       self.params.cov_tokens)
        return torch.linalg.solve(self._cov.double(), key.double()).float()


# ---------------------------------------------------------------------- hooks

@contextmanager
def capture_io(module: torch.nn.Module):
    """Records the module's input and output of the next forward call(s) into a dict."""
    io: dict[str, torch.Tensor] = {}

    def hook(_module, args, output):
        io["input"], io["output"] = args[0], output

    handle = module.register_forward_hook(hook)
    try:
        yield io
    finally:
        handle.remove()


@contextmanager
def add_at(module: torch.nn.Module, rows: torch.Tensor, idx: torch.Tensor, vector: torch.Tensor):
    """Adds `vector` to the module's output at (rows[i], idx[i]) for every i."""
    def hook(_module, _args, output):
        mask = torch.zeros(output.shape[:2], dtype=output.dtype, device=output.device)  # (B, T)
        mask[rows, idx] = 1
        return output + mask.unsqueeze(-1) * vector.to(output.dtype)

    handle = module.register_forward_hook(hook)
    try:
        yield
    finally:
        handle.remove()


class _Stop(Exception):
    """Raised from a hook to end a forward pass once the layer of interest has run."""


# ---------------------------------------------------------------------- subject and prefixes

def subject_last_token(tokenizer, text: str, subject: str, start: int = 0) -> int:
    """Index of the subject's last token in `text` tokenized without special tokens (as in
    `target_batch`), the subject being its first occurrence at or after character `start`."""
    begin = text.find(subject, start) if subject else -1
    if begin < 0:
        raise ValueError(f"subject {subject!r} does not occur in {text[start:]!r}")
    end = begin + len(subject)
    if getattr(tokenizer, "is_fast", False):
        offsets = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)["offset_mapping"]
        hits = [i for i, (a, b) in enumerate(offsets) if a < end and b > begin]  # tokens overlapping it
        if hits:
            return hits[-1]
    # Slow tokenizers: the subject's last token is the last token of the text cut after the subject.
    return len(tokenizer(text[:end], add_special_tokens=False)["input_ids"]) - 1


@torch.no_grad()
def sample_prefixes(model, tokenizer, lengths: list[int], seed: int, top_k: int = 5) -> list[str]:
    """One text per entry of `lengths`: a seed word continued by that many top-k sampled tokens."""
    device = next(model.parameters()).device
    generator = torch.Generator().manual_seed(seed)
    texts = []
    for i, n in enumerate(lengths):
        ids = tokenizer(PREFIX_SEEDS[i % len(PREFIX_SEEDS)], add_special_tokens=False)["input_ids"]
        ids = torch.tensor([ids], device=device)
        for _ in range(n):
            logits = model(input_ids=ids).logits[0, -1].float().cpu()
            top = torch.topk(logits, top_k)
            choice = torch.multinomial(torch.softmax(top.values, -1), 1, generator=generator)
            ids = torch.cat([ids, top.indices[choice].view(1, 1).to(device)], dim=1)
        texts.append(" ".join(tokenizer.decode(ids[0], skip_special_tokens=True).split()))
    return texts


# ---------------------------------------------------------------------- corpus and covariance

@lru_cache(maxsize=4)
def corpus_documents(name: str) -> tuple[str, ...]:
    """Real English text that ships offline. "python-reference": the Python Language Reference
    topics bundled with CPython (`pydoc_data.topics`), in sorted topic order."""
    if name == "python-reference":
        from pydoc_data.topics import topics  # a 1 MB data module, read only when ROME/T-Patcher build their corpus

        return tuple(topics[k] for k in sorted(topics))
    raise ValueError(f"unknown corpus {name!r}; available: python-reference")


def corpus_chunks(tokenizer, name: str, chunk_len: int, max_tokens: int) -> list[list[int]]:
    """Token-id chunks of at most `chunk_len` (shorter than 8 dropped) until `max_tokens` in all."""
    chunks, total = [], 0
    for doc in corpus_documents(name):
        ids = tokenizer(doc, add_special_tokens=False, verbose=False)["input_ids"]
        for i in range(0, len(ids), chunk_len):
            piece = ids[i: i + chunk_len][: max_tokens - total]
            if len(piece) >= 8:
                chunks.append(piece)
                total += len(piece)
            if total >= max_tokens:
                return chunks
    return chunks


def corpus_hash(name: str) -> str:
    return hashlib.sha256("\x00".join(corpus_documents(name)).encode()).hexdigest()[:12]


def model_fingerprint(model: torch.nn.Module, exclude: tuple[torch.Tensor, ...] = ()) -> str:
    """SHA-256 of the model class, config and every state tensor's bytes (the key of cached statistics),
    skipping the tensors in `exclude` (those an editor changes, when the statistic does not read them)."""

    skip = {t.data_ptr() for t in exclude}
    prefix = type(model).__name__.encode() + json.dumps(model.config.to_dict(), sort_keys=True, default=str).encode()
    return tensor_digest({n: t for n, t in model.state_dict().items() if t.data_ptr() not in skip}, prefix)


def key_covariance(model, tokenizer, layer: int, corpus: str, n_tokens: int,
                   chunk_len: int = 128, batch_size: int = 16) -> torch.Tensor:
    """C = E[k k^T] of FFN `layer`'s output-projection inputs over `n_tokens` corpus tokens (in x in),
    read from / written to the disk cache. The cache key hashes every weight except the projection
    itself: the keys are its inputs, so they (and C) do not change when ROME edits it."""
    module = ffn_out(model, layer)
    weight = linear_weight(module)
    device = weight.device
    fingerprint = model_fingerprint(model, exclude=(module.weight,))[:16]
    key = f"{fingerprint}-L{layer}-{corpus}-{corpus_hash(corpus)}-{n_tokens}"
    cached = load_cached("rome", f"cov-{key}")
    if cached is not None:
        return cached["cov"].to(device)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    chunks = corpus_chunks(tokenizer, corpus, chunk_len, n_tokens)
    cov = torch.zeros(weight.shape[1], weight.shape[1], dtype=torch.float64, device=device)
    count = 0

    def stop_after(_module, args, _output):
        raise _Stop(args[0])

    handle = module.register_forward_hook(stop_after)  # the layers above the edited one never run
    try:
        for i in range(0, len(chunks), batch_size):
            group = chunks[i: i + batch_size]
            width = max(map(len, group))
            ids = torch.full((len(group), width), pad, dtype=torch.long)
            mask = torch.zeros((len(group), width), dtype=torch.long)
            for j, c in enumerate(group):
                ids[j, : len(c)], mask[j, : len(c)] = torch.tensor(c), 1
            try:
                with torch.no_grad():
                    model(input_ids=ids.to(device), attention_mask=mask.to(device))
            except _Stop as stop:
                keys = stop.args[0][mask.to(device).bool()].float()  # (tokens, in)
                cov += (keys.T @ keys).double()
                count += keys.shape[0]
    finally:
        handle.remove()
    if count == 0:
        raise ValueError(f"corpus {corpus!r} gave no tokens for the key covariance")
    cov = (cov / count).float()
    store_cached("rome", f"cov-{key}", {"cov": cov})
    return cov.to(device)
