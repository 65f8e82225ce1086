"""The pieces ROME and MEMIT share: an FFN output projection read as a key-value memory (Geva et al.
2021), its keys at a subject's last token, their covariance on text, and the value that makes the
model say a new object.

    key k:    the projection's input at the subject's last token (averaged over prefixed prompts)
    C:        E[k k^T] over the tokens of a text corpus, cached on disk (`key_covariances`)
    value:    h + delta, h a module's output at the subject's last token of the bare prompt and delta
              optimised while it is added there (`fit_values`; the official ROME compute_v / MEMIT
              compute_z objective, below)

`fit_values` minimises, for each request i and its own delta_i (||delta_i|| <= clamp * ||h_i||),

    NLL(target_i | prefix + prompt_i, delta_i at every prefixed prompt's subject token)
    + kl_factor * KL(P_edited || P_0)[next token after "{subject_i} is a", delta_i at its subject token]
    + weight_decay * ||delta_i|| / ||h_i||^2

with Adam (lr), stopping request i once its loss is below 5e-2 or after `steps` passes (the official
rule: the last pass only measures). Requests are optimised together, `group` at a time: every row of
the batch belongs to one request and rows do not interact, Adam is elementwise, and a request that has
stopped is held at its last delta, so each delta_i is what a run on request i alone would give (up to
float rounding of batched matrix products). Two speed-ups that change no number: the decoder blocks
below the edited one are computed once per group (`replay_lower_layers`: only delta changes between
passes), and the 49k-way output layer is applied only at the positions the loss reads.
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
from lifelong.edit.wise import replay_lower_layers
from lifelong.families.lm import decoder_layers, ffn_out, linear_weight
from lifelong.fingerprint import tensor_digest

# The papers' seed words for the random prefixes (official get_context_templates).
PREFIX_SEEDS = ("The", "Therefore", "Because", "I", "You")
STOP_LOSS = 5e-2  # the official compute_v / compute_z early stop


# ---------------------------------------------------------------------- hooks

def _hidden(output):
    """A module's output hidden states (decoder blocks of older transformers return a tuple)."""
    return output[0] if isinstance(output, tuple) else output


@contextmanager
def capture_io(module: torch.nn.Module):
    """Records the module's input and output of the next forward call(s) into a dict."""
    io: dict[str, torch.Tensor] = {}

    def hook(_module, args, output):
        io["input"], io["output"] = args[0], _hidden(output)

    handle = module.register_forward_hook(hook)
    try:
        yield io
    finally:
        handle.remove()


@contextmanager
def add_at(module: torch.nn.Module, rows: torch.Tensor, idx: torch.Tensor, vectors: torch.Tensor):
    """Adds vectors[i] ((N, D), or one (D,) vector for all) to the module's output at (rows[i], idx[i]),
    out of place, so gradients reach `vectors`."""
    def hook(_module, _args, output):
        hidden = _hidden(output)
        add = vectors.to(hidden.dtype).expand(len(rows), hidden.shape[-1])
        hidden = hidden.index_put((rows, idx), add, accumulate=True)
        return (hidden, *output[1:]) if isinstance(output, tuple) else hidden

    handle = module.register_forward_hook(hook)
    try:
        yield
    finally:
        handle.remove()


class _Stop(Exception):
    """Raised from a hook to end a forward pass once the layers of interest have run."""


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


def context_prefixes(model, tokenizer, lengths: tuple[int, ...], per_length: int, seed: int) -> list[str]:
    """"" and the sampled prefixes, each ending in ". " (the official context templates)."""
    sampled = sample_prefixes(model, tokenizer, [n for n in lengths for _ in range(per_length)], seed)
    return [""] + [s.replace("{", " ").replace("}", " ") + ". " for s in sampled]


def subject_positions(tokenizer, request: EditRequest, prefixes: list[str]) -> tuple[list[str], list[int]]:
    """Each prefix + the prompt, and the index of the subject's last token in each (in the prompt part)."""
    texts = [prefix + request.prompt for prefix in prefixes]
    return texts, [subject_last_token(tokenizer, t, request.subject, start=len(prefix))
                   for t, prefix in zip(texts, prefixes)]


# ---------------------------------------------------------------------- reading and fitting

def _pad(tokenizer, rows: list[list[int]], device) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded (input_ids, attention_mask), each (N, width)."""
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    width = max(map(len, rows))
    ids = torch.full((len(rows), width), pad, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, row in enumerate(rows):
        ids[i, : len(row)], mask[i, : len(row)] = torch.tensor(row), 1
    return ids.to(device), mask.to(device)


@torch.no_grad()
def read_at(model, tokenizer, modules: list[torch.nn.Module], texts: list[str], positions: list[int],
            chunk: int = 64) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(inputs (N, in), outputs (N, out)) of each module at token positions[n] of texts[n] (float32).
    `modules` in forward order: the pass stops once the last of them has run."""
    device = next(model.parameters()).device
    found: list[list[tuple[torch.Tensor, torch.Tensor]]] = [[] for _ in modules]
    for start in range(0, len(texts), chunk):
        ids, mask = _pad(tokenizer, [tokenizer(t, add_special_tokens=False)["input_ids"]
                                     for t in texts[start: start + chunk]], device)
        rows = torch.arange(len(ids), device=device)
        idx = torch.tensor(positions[start: start + chunk], device=device)

        def hook(module, args, output, _j=0):
            found[_j].append((args[0][rows, idx].float(), _hidden(output)[rows, idx].float()))
            if _j == len(modules) - 1:
                raise _Stop

        handles = [m.register_forward_hook(lambda m_, a, o, _j=j: hook(m_, a, o, _j)) for j, m in enumerate(modules)]
        try:
            model(input_ids=ids, attention_mask=mask, use_cache=False)
        except _Stop:
            pass
        finally:
            for h in handles:
                h.remove()
    return [(torch.cat([i for i, _ in parts]), torch.cat([o for _, o in parts])) for parts in found]


@dataclass(frozen=True)
class FittedValues:
    """What `fit_values` found for B requests."""

    delta: torch.Tensor       # (B, D) the optimised vectors
    init: torch.Tensor        # (B, D) the module's output at the bare prompt's subject token (h)
    nll_before: torch.Tensor  # (B,) target NLL over the prefixed prompts at delta = 0
    nll_after: torch.Tensor   # (B,) at the last measured pass
    steps: torch.Tensor       # (B,) passes made


def fit_values(model, tokenizer, module: torch.nn.Module, block: int, requests: list[EditRequest],
               prefixes: list[str], *, steps: int, lr: float, weight_decay: float, clamp_norm_factor: float,
               kl_factor: float, group: int = 16) -> FittedValues:
    """The delta per request that, added to `module`'s output (inside decoder block `block`) at the
    subject's last token, makes the model say the target (the objective in the module docstring)."""
    parts = [_fit_group(model, tokenizer, module, block, requests[i: i + group], prefixes, steps=steps, lr=lr,
                        weight_decay=weight_decay, clamp_norm_factor=clamp_norm_factor, kl_factor=kl_factor)
             for i in range(0, len(requests), group)]
    return FittedValues(*(torch.cat([getattr(p, f) for p in parts]) for f in FittedValues.__dataclass_fields__))


def _fit_group(model, tokenizer, module, block, requests, prefixes, *, steps, lr, weight_decay, clamp_norm_factor,
               kl_factor) -> FittedValues:
    device = next(model.parameters()).device
    n_req, n_pre = len(requests), len(prefixes)
    # Rows: for each request its n_pre prefixed prompts + target (teacher-forced), then one
    # "{subject} is a" row per request for the KL term.
    rows, labels, where, owner = [], [], [], []   # token ids; label per position; delta positions; request
    for i, r in enumerate(requests):
        target = tokenizer(r.target_new, add_special_tokens=False)["input_ids"]
        if not target:
            raise ValueError(f"target {r.target_new!r} tokenizes to nothing")
        texts, idxs = subject_positions(tokenizer, r, prefixes)
        for text, idx in zip(texts, idxs):
            prompt = tokenizer(text, add_special_tokens=False)["input_ids"]
            rows.append(prompt + target)
            labels.append([-100] * len(prompt) + target)
            where.append(idx)
            owner.append(i)
    kl_idx = []
    for i, r in enumerate(requests):
        text = f"{r.subject} is a"
        rows.append(tokenizer(text, add_special_tokens=False)["input_ids"])
        kl_idx.append(subject_last_token(tokenizer, text, r.subject))
        labels.append([-100] * len(rows[-1]))
        where.append(kl_idx[-1])
        owner.append(i)
    ids, mask = _pad(tokenizer, rows, device)                                   # (N, T)
    label_t = torch.full_like(ids, -100)
    for n, lab in enumerate(labels):
        label_t[n, : len(lab)] = torch.tensor(lab, device=device)
    read = torch.zeros_like(mask, dtype=torch.bool)                             # positions the loss reads
    read[:, :-1] = label_t[:, 1:] != -100                                       # predict a target token
    n_rewrite = n_req * n_pre
    read[torch.arange(n_rewrite, len(rows), device=device), torch.tensor(kl_idx, device=device)] = True
    targets = label_t[:n_rewrite, 1:][read[:n_rewrite, :-1]]                    # (n_target,) row-major
    target_row = read[:n_rewrite].nonzero()[:, 0]                               # (n_target,) its row
    n_target = len(targets)
    row_idx = torch.arange(len(rows), device=device)
    pos_idx = torch.tensor(where, device=device)
    owner_t = torch.tensor(owner, device=device)

    def keep_read(_module, args):  # the output layer only where the loss reads
        return (args[0][read],)                                                  # (B, T, D) -> (n_read, D)

    dim = _hidden_size(model, module)
    delta = torch.zeros(n_req, dim, device=device, requires_grad=True)
    opt = torch.optim.Adam([delta], lr=lr)
    active = torch.ones(n_req, dtype=torch.bool, device=device)
    nll_before = nll_after = kl_init = init = None
    made = torch.zeros(n_req, device=device)
    head = model.get_output_embeddings().register_forward_pre_hook(keep_read)
    try:
        with replay_lower_layers(model, block), torch.enable_grad():
            for step in range(steps):
                with capture_io(module) as io, add_at(module, row_idx, pos_idx, delta[owner_t]):
                    logits = model(input_ids=ids, attention_mask=mask, use_cache=False).logits.float()  # (n_read, V)
                if init is None:  # h: the output at the bare prompt (prefix "") of each request, before delta
                    bare = torch.arange(0, n_rewrite, n_pre, device=device)
                    init = io["output"][bare, pos_idx[bare]].detach().float()   # (B, D)
                token_nll = F.cross_entropy(logits[:n_target], targets, reduction="none")
                per_row = token_nll.new_zeros(n_rewrite).index_add(0, target_row, token_nll)
                per_row = per_row / read[:n_rewrite].sum(1)
                nll = per_row.view(n_req, n_pre).mean(1)                                     # (B,)
                kl_now = torch.log_softmax(logits[n_target:], -1)                            # (B, V)
                if kl_init is None:
                    kl_init = kl_now.detach()
                    nll_before = nll.detach().clone()
                # KL(P_edited || P_0) per request, as the official F.kl_div(init, now, log_target=True)
                kl = (kl_now.exp() * (kl_now - kl_init)).sum(-1)
                decay = weight_decay * delta.norm(dim=1) / init.norm(dim=1) ** 2
                loss = nll + kl_factor * kl + decay                                          # (B,)
                done = active & ((loss.detach() < STOP_LOSS) | torch.tensor(step == steps - 1))
                nll_after = torch.where(done, nll.detach(), nll_after if nll_after is not None else nll.detach())
                made = torch.where(done, torch.full_like(made, step + 1), made)
                active = active & ~done
                if not active.any():
                    break
                held = delta.detach().clone()
                (grad,) = torch.autograd.grad(loss[active].sum(), [delta])  # only delta: model .grad untouched
                delta.grad = grad
                opt.step()
                with torch.no_grad():
                    delta[~active] = held[~active]  # stopped requests keep the delta they were measured at
                    max_norm = clamp_norm_factor * init.norm(dim=1)                          # (B,)
                    scale = (max_norm / delta.norm(dim=1).clamp_min(1e-12)).clamp(max=1.0)  # into the L2 ball
                    delta.mul_(scale.unsqueeze(1))
    finally:
        head.remove()
    return FittedValues(delta=delta.detach(), init=init, nll_before=nll_before, nll_after=nll_after, steps=made)


def _hidden_size(model, module) -> int:
    if module in list(decoder_layers(model)):
        return model.get_input_embeddings().weight.shape[1]
    return linear_weight(module).shape[0]


# ---------------------------------------------------------------------- corpus and covariance

@lru_cache(maxsize=4)
def corpus_documents(name: str) -> tuple[str, ...]:
    """Real English text that ships offline. "python-reference": the Python Language Reference
    topics bundled with CPython (`pydoc_data.topics`), in sorted topic order."""
    if name == "python-reference":
        from pydoc_data.topics import topics  # a 1 MB data module, read only when an editor builds its corpus

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


def key_covariance(model, tokenizer, layer: int, corpus: str, n_tokens: int) -> torch.Tensor:
    """C = E[k k^T] of FFN `layer`'s output-projection inputs (in x in); see `key_covariances`."""
    return key_covariances(model, tokenizer, [layer], corpus, n_tokens)[0]


def key_covariances(model, tokenizer, layers: list[int], corpus: str, n_tokens: int,
                    chunk_len: int = 128, batch_size: int = 16) -> list[torch.Tensor]:
    """C_l = E[k k^T] of each FFN `layer`'s output-projection inputs over `n_tokens` corpus tokens, read
    from / written to the disk cache (namespace "rome"), the missing ones in one pass over the corpus that
    stops after the deepest. Each cache key hashes every weight except that layer's projection itself:
    the keys are its inputs, so they (and C) do not change when ROME edits it."""
    modules = {layer: ffn_out(model, layer) for layer in layers}
    device = linear_weight(modules[layers[0]]).device
    keys = {layer: (f"{model_fingerprint(model, exclude=(m.weight,))[:16]}-L{layer}-{corpus}-{corpus_hash(corpus)}"
                    f"-{n_tokens}") for layer, m in modules.items()}
    covs: dict[int, torch.Tensor] = {}
    for layer in layers:
        cached = load_cached("rome", f"cov-{keys[layer]}")
        if cached is not None:
            covs[layer] = cached["cov"].to(device)
    missing = sorted(set(layers) - set(covs))
    if missing:
        covs.update(_covariances(model, tokenizer, {layer: modules[layer] for layer in missing}, corpus, n_tokens,
                                 chunk_len, batch_size))
        for layer in missing:
            store_cached("rome", f"cov-{keys[layer]}", {"cov": covs[layer].cpu()})
    return [covs[layer].to(device) for layer in layers]


def _covariances(model, tokenizer, modules: dict[int, torch.nn.Module], corpus: str, n_tokens: int, chunk_len: int,
                 batch_size: int) -> dict[int, torch.Tensor]:
    device = next(model.parameters()).device
    chunks = corpus_chunks(tokenizer, corpus, chunk_len, n_tokens)
    sums = {layer: torch.zeros(linear_weight(m).shape[1], linear_weight(m).shape[1], dtype=torch.float64,
                               device=device) for layer, m in modules.items()}
    last = max(modules)
    count = 0
    mask = None

    def hook(_module, args, _output, _layer=0):
        keys = args[0][mask.bool()].float()  # (tokens, in)
        sums[_layer] += (keys.T @ keys).double()
        if _layer == last:
            raise _Stop  # the layers above the deepest never run

    handles = [m.register_forward_hook(lambda m_, a, o, _l=layer: hook(m_, a, o, _l)) for layer, m in modules.items()]
    try:
        for i in range(0, len(chunks), batch_size):
            ids, mask = _pad(tokenizer, chunks[i: i + batch_size], device)
            try:
                with torch.no_grad():
                    model(input_ids=ids, attention_mask=mask, use_cache=False)
            except _Stop:
                count += int(mask.sum())
    finally:
        for h in handles:
            h.remove()
    if count == 0:
        raise ValueError(f"corpus {corpus!r} gave no tokens for the key covariance")
    return {layer: (s / count).float() for layer, s in sums.items()}
