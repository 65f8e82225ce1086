"""Knowledge-editing metrics, in the two conventions the field uses (both reported, both named).

f_0 is the model before editing, f_T the model after T edits. A request r has a prompt x, a new target
y (`target_new`), the old answer o (`ground_truth`, may be empty), paraphrases x', locality probes
(x_loc, a_loc) and portability probes (x_port, y_port). Every target is teacher-forced after its prompt;
t_1..t_k are its tokens and argmax_j = argmax f(x, t_<j) is the model's prediction of t_j.

Convention `token` (EasyEdit, token-level teacher-forced accuracy):
    acc(x, y)            = (1/k) sum_j 1[argmax_j = t_j]
    reliability_token    = mean_r acc(x_r, y_r)
    generality_token     = mean_r mean_{x'} acc(x', y_r)
    portability_token    = mean_r mean_port acc(x_port, y_port)
    locality_token       = mean_r mean_loc (1/k) sum_j 1[argmax_j f_T(x_loc, a_loc) = argmax_j f_0(x_loc, a_loc)]
  Locality compares f_T's predicted tokens with f_0's on the same teacher-forced text x_loc + a_loc
  (EasyEdit stores f_0's `locality_output` before editing and compares token lists after), so a_loc
  only fixes the text; f_0's predictions come from `base_predictions`, computed once per request set.

Convention `cf` (CounterFact / ROME, probability comparison). As in ROME's `test_batch_prediction`,
"probability" is the length-normalised NLL(x, y) = -(1/k) sum_j log p(t_j | x, t_<j):
    reliability_cf (efficacy score)      = mean_r 1[NLL(x_r, y_r) < NLL(x_r, o_r)]
    generality_cf  (paraphrase score)    = mean_r mean_{x'} 1[NLL(x', y_r) < NLL(x', o_r)]
    locality_cf    (neighborhood score)  = mean_r mean_loc 1[NLL(x_loc, a_loc) < NLL(x_loc, y_r)]
  i.e. on a locality prompt its own (true) answer a_loc must stay more likely than the edit's new
  target. Only requests with a `ground_truth` count for reliability_cf/generality_cf; probes whose
  answer equals y_r are skipped.

Convention `exact` (teacher-forced exact match): 1[argmax_j = t_j for every j]. For a model whose
computation does not depend on how the text came about, greedy decoding emits t_1..t_k exactly when this
holds; an editor that routes or replaces by position (WISE's routing score over the whole sequence,
GRACE's prompt-end query) can differ between the two, so generation is measured by itself:

Convention `gen` (greedy generation; `generation_scores`): the edited model decodes greedily, k + `slack`
new tokens, after the prompt as plain text, or, with `chat` and a tokenizer that has a chat template,
after the prompt as the user's turn (the answer is then the assistant's reply). With norm(s) = lower
case, whitespace collapsed, surrounding punctuation stripped, and c the decoded continuation:
    *_gen_exact      = 1[norm(c) starts with norm(y), followed by a word boundary]
    *_gen_contains   = 1[norm(y) occurs in norm(c) as whole words]
    locality_gen     = 1[f_T's continuation of x_loc = f_0's] (same length: k_loc + slack tokens)
  for reliability (x, y_new), generality (x', y_new) and portability (x_port, y_port).

Fluency (ROME/MEMIT): n-gram entropy of free generations,
    H_n = -sum_g f(g) log2 f(g) over the frequencies f of the text's word n-grams,
    fluency = mean_texts mean(2/3 * H_2, 4/3 * H_3).
  Deviation: words come from a regex tokenizer (\\w+ | single punctuation) instead of nltk's
  word_tokenize; generation is greedy by default (ROME samples top-k=5), so numbers are deterministic.

Means are taken within a request first (over its paraphrases/probes), then over requests.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
import warnings
from collections import Counter
from collections.abc import Callable
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass

import torch

from lifelong.cache import load_cached_json, store_cached_json
from lifelong.data.edit_requests import EditRequest
from lifelong.families.lm import lm_fingerprint, target_batch

METRIC_DOCS = {
    "reliability_token": "EasyEdit: mean token accuracy of target_new after the edit prompt (teacher-forced)",
    "generality_token": "EasyEdit: mean token accuracy of target_new after each paraphrase",
    "locality_token": "EasyEdit: fraction of locality-answer tokens whose argmax equals f_0's argmax",
    "portability_token": "EasyEdit: mean token accuracy of each portability answer",
    "reliability_exact": "teacher-forced: every target_new token is the argmax after the prompt",
    "generality_exact": "teacher-forced: every target_new token is the argmax after each paraphrase",
    "portability_exact": "teacher-forced: every answer token is the argmax after each portability prompt",
    "reliability_cf": "CounterFact efficacy score: NLL(target_new) < NLL(ground_truth) on the prompt",
    "generality_cf": "CounterFact paraphrase score: NLL(target_new) < NLL(ground_truth) on paraphrases",
    "locality_cf": "CounterFact neighborhood score: NLL(probe answer) < NLL(target_new) on locality prompts",
    "fluency_ngram_entropy": "ROME: mean of 2/3*H2 and 4/3*H3 word n-gram entropies (bits) of generations",
    "reliability_gen_exact": "greedy generation after the prompt starts with target_new (normalised text)",
    "reliability_gen_contains": "greedy generation after the prompt contains target_new (whole words)",
    "generality_gen_exact": "greedy generation after each paraphrase starts with target_new",
    "generality_gen_contains": "greedy generation after each paraphrase contains target_new",
    "portability_gen_exact": "greedy generation after each portability prompt starts with its answer",
    "portability_gen_contains": "greedy generation after each portability prompt contains its answer",
    "locality_gen": "greedy generation after each locality prompt is f_0's, token for token",
}


# ----------------------------------------------------------------------------- teacher-forced scoring

@dataclass(frozen=True)
class TargetScore:
    """One (prompt, target) pair under teacher forcing."""

    tokens: tuple[int, ...]      # the target's tokens t_1..t_k
    predicted: tuple[int, ...]   # argmax_j at each target position
    mean_nll: float              # -(1/k) sum_j log p(t_j | prompt, t_<j)

    @property
    def token_accuracy(self) -> float:
        return sum(p == t for p, t in zip(self.predicted, self.tokens)) / len(self.tokens)

    @property
    def exact(self) -> float:
        return float(self.predicted == self.tokens)


def _device(model) -> torch.device:
    return next(model.parameters()).device


# Where each row's prompt ends while a teacher-forced batch (prompt + target) runs. Editors that act at
# the prompt's last token read it (GRACE; the official code takes it from the labels' -100 count): the
# model alone cannot tell a prompt from the target that follows it.
_PROMPT_ENDS: ContextVar[torch.Tensor | None] = ContextVar("prompt_ends", default=None)


@contextmanager
def prompt_ends(ends: torch.Tensor):
    """Declare (B,) indices of each row's last prompt token for the forward passes inside."""
    token = _PROMPT_ENDS.set(ends)
    try:
        yield
    finally:
        _PROMPT_ENDS.reset(token)


def declared_prompt_ends() -> torch.Tensor | None:
    return _PROMPT_ENDS.get()


def prompt_ends_of(labels: torch.Tensor) -> torch.Tensor:
    """(B,) last prompt position of a `target_batch` (labels -100 on the prompt, then the target)."""
    return (labels != -100).int().argmax(1) - 1


@torch.no_grad()
def score_targets(model, tokenizer, prompts: list[str], targets: list[str], batch_size: int = 32) -> list[TargetScore]:
    """Teacher-forced scores of every `prompt + target` pair (duplicates computed once, batches built
    from pairs of similar length). The model's train/eval mode is left as it was."""
    if len(prompts) != len(targets):
        raise ValueError(f"score_targets: {len(prompts)} prompts but {len(targets)} targets")
    unique = list(dict.fromkeys(zip(prompts, targets)))
    lengths = {pair: len(tokenizer(pair[0] + pair[1], add_special_tokens=False)["input_ids"]) for pair in unique}
    unique.sort(key=lengths.__getitem__)
    device, done = _device(model), {}
    was_training = model.training
    model.eval()
    try:
        for start in range(0, len(unique), batch_size):
            chunk = unique[start : start + batch_size]
            batch = target_batch(tokenizer, [p for p, _ in chunk], [t for _, t in chunk], device)
            mask = batch.target_mask                                # (B, L): logits that predict a target token
            labels = batch.labels[:, 1:][mask[:, :-1]]              # (N,) the tokens they predict, N in the batch
            with prompt_ends(prompt_ends_of(batch.labels)):
                logits, mask = _target_logits(model, batch.input_ids, batch.attention_mask, mask)
            picked = logits[mask].float()                              # (N, V)
            logp = torch.log_softmax(picked, dim=-1).gather(-1, labels.unsqueeze(-1)).squeeze(-1)
            argmax = picked.argmax(-1)
            counts = mask.sum(1).tolist()
            offsets = [0]
            for c in counts:
                offsets.append(offsets[-1] + c)
            labels, argmax, logp = labels.tolist(), argmax.tolist(), logp.tolist()
            for i, pair in enumerate(chunk):
                a, b = offsets[i], offsets[i + 1]
                done[pair] = TargetScore(tuple(labels[a:b]), tuple(argmax[a:b]), -sum(logp[a:b]) / (b - a))
    finally:
        model.train(was_training)
    return [done[pair] for pair in zip(prompts, targets)]


@torch.no_grad()
def next_token_argmax(model, tokenizer, prompts: list[str], batch_size: int = 32) -> list[int]:
    """argmax of the next-token distribution after each prompt (one forward per batch, logits only at
    each row's last real position)."""
    unique = sorted(dict.fromkeys(prompts), key=lambda p: len(tokenizer(p, add_special_tokens=False)["input_ids"]))
    device, done = _device(model), {}
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (tokenizer.eos_token_id or 0)
    was_training = model.training
    model.eval()
    try:
        for start in range(0, len(unique), batch_size):
            chunk = unique[start : start + batch_size]
            rows = [tokenizer(p, add_special_tokens=False)["input_ids"] for p in chunk]
            width = max(map(len, rows))
            input_ids = torch.full((len(rows), width), pad, dtype=torch.long)
            attention = torch.zeros((len(rows), width), dtype=torch.long)
            mask = torch.zeros((len(rows), width), dtype=torch.bool)
            for i, row in enumerate(rows):  # right-padded, as in target_batch
                input_ids[i, : len(row)] = torch.tensor(row)
                attention[i, : len(row)] = 1
                mask[i, len(row) - 1] = True
            logits, mask = _target_logits(model, input_ids.to(device), attention.to(device), mask.to(device))
            for p, tok_id in zip(chunk, logits[mask].argmax(-1).tolist()):
                done[p] = tok_id
    finally:
        model.train(was_training)
    return [done[p] for p in prompts]


def _target_logits(model, input_ids, attention_mask, mask):
    """Logits only at the columns where some row has a target (the LM head over a 49k vocabulary is a
    fifth of SmolLM2's compute); models whose forward lacks `logits_to_keep` compute all columns."""
    cols = mask.any(0).nonzero().squeeze(1)                            # (C,)
    try:
        logits = model(input_ids=input_ids, attention_mask=attention_mask, logits_to_keep=cols).logits
    except TypeError:
        return model(input_ids=input_ids, attention_mask=attention_mask).logits, mask
    if logits.shape[1] != len(cols):  # ignored by a wrapper: full logits came back
        return logits, mask
    return logits, mask[:, cols]                                       # (B, C, V), (B, C)


# ----------------------------------------------------------------------------- f_0's locality predictions

def probe_key(prompt: str, answer: str) -> str:
    return f"{prompt}\u241f{answer}"


def base_predictions(model, tokenizer, requests: list[EditRequest], batch_size: int = 32) -> dict[str, list[int]]:
    """f_0's argmax tokens on every locality probe's teacher-forced text, keyed by `probe_key`.
    Compute it on the unedited model, once per request set (see `cached_base_predictions`)."""
    pairs = list(dict.fromkeys((p.prompt, p.answer) for r in requests for p in r.locality))
    scores = score_targets(model, tokenizer, [p for p, _ in pairs], [a for _, a in pairs], batch_size)
    return {probe_key(p, a): list(s.predicted) for (p, a), s in zip(pairs, scores)}


def cached_base_predictions(model, tokenizer, requests: list[EditRequest], batch_size: int = 32) -> dict[str, list[int]]:
    """`base_predictions`, stored under cache_dir()/edit/base_predictions keyed by the model's content
    hash and the probes' text: the second call for the same model and probes reads the file."""
    probes = sorted({probe_key(p.prompt, p.answer) for r in requests for p in r.locality})
    probe_hash = hashlib.sha256(json.dumps(probes).encode()).hexdigest()[:16]
    key = f"{lm_fingerprint(model)[:16]}-{probe_hash}"
    cached = load_cached_json("edit/base_predictions", key)
    if isinstance(cached, dict) and set(cached) == set(probes):
        return cached
    predictions = base_predictions(model, tokenizer, requests, batch_size)
    store_cached_json("edit/base_predictions", key, predictions)
    return predictions


# ----------------------------------------------------------------------------- fluency

_WORD = re.compile(r"\w+|[^\w\s]")


def ngram_entropy(text: str, ns: tuple[int, ...] = (2, 3), weights: tuple[float, ...] = (2 / 3, 4 / 3)) -> float:
    """mean_n weight_n * H_n, H_n = -sum_g f(g) log2 f(g) over the word n-grams g of `text` (ROME).
    A text with fewer than n words contributes H_n = 0."""
    words = _WORD.findall(text)
    terms = []
    for n, w in zip(ns, weights, strict=True):
        counts = Counter(tuple(words[i : i + n]) for i in range(len(words) - n + 1))
        total = sum(counts.values())
        h = -sum(c / total * math.log2(c / total) for c in counts.values()) if total else 0.0
        terms.append(w * h)
    return sum(terms) / len(terms)


def as_chat(tokenizer, prompt: str) -> str:
    """`prompt` as the user's turn of the tokenizer's chat template, ready for the assistant's reply;
    the prompt itself when the tokenizer has no template."""
    if not getattr(tokenizer, "chat_template", None):
        return prompt
    return tokenizer.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                         add_generation_prompt=True)


@torch.no_grad()
def generate(model, tokenizer, prompts: list[str], max_new_tokens: int = 50, batch_size: int = 16,
             top_k: int | None = None, seed: int = 0, chat: bool = False, tokens: bool = False,
             max_length: int | None = None, warn: Callable[[str], None] | None = None) -> list:
    """Continuations of `prompts` (greedy, or top-k sampling under `seed`), left-padded batches; with
    `chat`, each prompt is the user's turn of the chat template (`as_chat`). `tokens`: token ids instead
    of text (the continuation stops at the end-of-sequence token). With `max_length` (the model's context,
    families.lm.context_length), a prompt longer than `max_length - max_new_tokens` tokens keeps only its last
    ones, and `warn` (default: warnings.warn) says how many were cut."""
    device, out = _device(model), []
    texts = [as_chat(tokenizer, p) for p in prompts] if chat else list(prompts)
    limit = None if max_length is None else max_length - max_new_tokens
    if limit is not None:
        if limit < 1:
            raise ValueError(f"max_new_tokens={max_new_tokens} leaves no room for a prompt in a context of {max_length}")
        cut = sum(len(tokenizer(t, add_special_tokens=False)["input_ids"]) > limit for t in texts)
        if cut:
            (warn or _warn)(f"{cut} prompt(s) longer than the model's context ({max_length} tokens, {max_new_tokens} of "
                            f"them kept for the answer): cut from the left to their last {limit} tokens")
    side, truncation_side = tokenizer.padding_side, tokenizer.truncation_side
    tokenizer.padding_side = tokenizer.truncation_side = "left"
    was_training = model.training
    model.eval()
    try:
        torch.manual_seed(seed)
        for start in range(0, len(texts), batch_size):
            enc = tokenizer(texts[start : start + batch_size], return_tensors="pt", padding=True,
                            add_special_tokens=False, truncation=limit is not None, max_length=limit).to(device)
            ids = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=top_k is not None, top_k=top_k,
                                 pad_token_id=tokenizer.pad_token_id)
            new = ids[:, enc["input_ids"].shape[1]:]
            if tokens:
                eos = tokenizer.eos_token_id
                out += [row[: row.index(eos)] if eos in row else row for row in new.tolist()]
            else:
                out += tokenizer.batch_decode(new, skip_special_tokens=True)
    finally:
        tokenizer.padding_side, tokenizer.truncation_side = side, truncation_side
        model.train(was_training)
    return out


def _warn(message: str) -> None:
    warnings.warn(message, stacklevel=3)


def fluency(model, tokenizer, prompts: list[str], max_new_tokens: int = 50, **kwargs) -> float:
    """ROME's fluency: mean n-gram entropy of the model's generations from `prompts`."""
    texts = generate(model, tokenizer, prompts, max_new_tokens, **kwargs)
    return sum(ngram_entropy(t) for t in texts) / len(texts)


# ----------------------------------------------------------------------------- evaluation by generation

def _norm(text: str) -> str:
    return " ".join(text.lower().split()).strip(" .,;:!?\"'")


def gen_exact(continuation: str, target: str) -> float:
    """1 when the normalised continuation starts with the normalised target at a word boundary."""
    c, y = _norm(continuation), _norm(target)
    return float(bool(y) and c.startswith(y) and (len(c) == len(y) or not c[len(y)].isalnum()))


def gen_contains(continuation: str, target: str) -> float:
    """1 when the normalised target occurs in the normalised continuation as whole words."""
    y = _norm(target)
    return float(bool(y) and re.search(rf"(?<!\w){re.escape(y)}(?!\w)", _norm(continuation)) is not None)


def _greedy(model, tokenizer, pairs: list[tuple[str, str]], slack: int, chat: bool, batch_size: int,
            tokens: bool = False) -> dict[tuple[str, str], object]:
    """(prompt, answer) -> the greedy continuation of prompt, k + slack tokens (k = the answer's tokens);
    pairs of equal k are decoded together."""
    by_length: dict[int, list[tuple[str, str]]] = {}
    for pair in dict.fromkeys(pairs):
        k = len(tokenizer(pair[1], add_special_tokens=False)["input_ids"])
        by_length.setdefault(k, []).append(pair)
    out = {}
    for k, group in sorted(by_length.items()):
        prompts = list(dict.fromkeys(p for p, _ in group))
        texts = dict(zip(prompts, generate(model, tokenizer, prompts, max_new_tokens=k + slack, batch_size=batch_size,
                                           chat=chat, tokens=tokens)))
        out.update({pair: texts[pair[0]] for pair in group})
    return out


def base_generations(model, tokenizer, requests: list[EditRequest], slack: int = 5, chat: bool = False,
                     batch_size: int = 16) -> dict[str, list[int]]:
    """f_0's greedy continuations (token ids) of every locality probe, keyed by `probe_key`: what
    `locality_gen` compares f_T's with. Compute it on the unedited model, once per request set."""
    pairs = [(p.prompt, p.answer) for r in requests for p in r.locality]
    done = _greedy(model, tokenizer, pairs, slack, chat, batch_size, tokens=True)
    return {probe_key(p, a): list(ids) for (p, a), ids in done.items()}


def generation_scores(model, tokenizer, requests: list[EditRequest], base_gen: dict[str, list[int]] | None = None,
                      slack: int = 5, chat: bool = False, batch_size: int = 16, per_request: bool = False) -> dict:
    """The `gen` convention of the module docstring for `model` on `requests` (means within a request,
    then over requests; None where no request defines a metric). `base_gen` (`base_generations` of f_0)
    adds `locality_gen`; `chat` decodes after the chat template when the tokenizer has one."""
    if not requests:
        raise ValueError("generation_scores: no requests to score")
    pairs = []
    for r in requests:
        pairs += [(x, r.target_new) for x in (r.prompt, *r.paraphrases)]
        pairs += [(p.prompt, p.answer) for p in r.portability]
    texts = _greedy(model, tokenizer, pairs, slack, chat, batch_size)
    local = _greedy(model, tokenizer, [(p.prompt, p.answer) for r in requests for p in r.locality], slack, chat,
                    batch_size, tokens=True) if base_gen is not None else {}
    rows = []
    for r in requests:
        row = {}
        for name, probes in (("reliability", [(r.prompt, r.target_new)]),
                             ("generality", [(x, r.target_new) for x in r.paraphrases]),
                             ("portability", [(p.prompt, p.answer) for p in r.portability])):
            row[f"{name}_gen_exact"] = _mean([gen_exact(texts[pair], pair[1]) for pair in probes])
            row[f"{name}_gen_contains"] = _mean([gen_contains(texts[pair], pair[1]) for pair in probes])
        if base_gen is not None:
            row["locality_gen"] = _mean([float(list(local[(p.prompt, p.answer)]) == base_gen[probe_key(p.prompt, p.answer)])
                                         for p in r.locality])
        rows.append(row)
    result = {k: _mean([row[k] for row in rows if row[k] is not None]) for k in rows[0]}
    result["gen_chat"] = float(bool(chat and getattr(tokenizer, "chat_template", None)))  # the convention used
    if per_request:
        result["per_request_gen"] = rows
    return result


# ----------------------------------------------------------------------------- the entry point

def _mean(values: list[float]) -> float | None:
    return sum(values) / len(values) if values else None


def score_requests(model, tokenizer, requests: list[EditRequest], base: dict[str, list[int]] | None,
                   batch_size: int = 32, with_fluency: bool = False, per_request: bool = False) -> dict:
    """All metrics of the module docstring for `model` (f_T) on `requests`.

    `base` is `base_predictions(f_0, ...)` for these requests (needed when any request has locality
    probes). Returns {metric: mean or None when no request defines it, n_requests, [per_request]}.
    """
    if not requests:
        raise ValueError("score_requests: no requests to score")
    pairs: list[tuple[str, str]] = []
    for r in requests:
        pairs.append((r.prompt, r.target_new))
        pairs += [(x, r.target_new) for x in r.paraphrases]
        pairs += [(p.prompt, p.answer) for p in r.portability]
        for p in r.locality:
            pairs.append((p.prompt, p.answer))
            if p.answer != r.target_new:
                pairs.append((p.prompt, r.target_new))
        if r.ground_truth:
            pairs += [(x, r.ground_truth) for x in (r.prompt, *r.paraphrases)]
    scores = dict(zip(pairs, score_targets(model, tokenizer, [p for p, _ in pairs], [t for _, t in pairs], batch_size)))

    rows = []
    for r in requests:
        s = lambda x, y: scores[(x, y)]  # noqa: E731
        row = {
            "reliability_token": s(r.prompt, r.target_new).token_accuracy,
            "reliability_exact": s(r.prompt, r.target_new).exact,
            "generality_token": _mean([s(x, r.target_new).token_accuracy for x in r.paraphrases]),
            "generality_exact": _mean([s(x, r.target_new).exact for x in r.paraphrases]),
            "portability_token": _mean([s(p.prompt, p.answer).token_accuracy for p in r.portability]),
            "portability_exact": _mean([s(p.prompt, p.answer).exact for p in r.portability]),
            "locality_token": _mean([_agreement(s(p.prompt, p.answer).predicted, _base(base, p)) for p in r.locality]),
            "reliability_cf": None, "generality_cf": None,
            "locality_cf": _mean([float(s(p.prompt, p.answer).mean_nll < s(p.prompt, r.target_new).mean_nll)
                                  for p in r.locality if p.answer != r.target_new]),
        }
        if r.ground_truth:
            won = lambda x: float(s(x, r.target_new).mean_nll < s(x, r.ground_truth).mean_nll)  # noqa: E731
            row["reliability_cf"] = won(r.prompt)
            row["generality_cf"] = _mean([won(x) for x in r.paraphrases])
        rows.append(row)

    result = {k: _mean([row[k] for row in rows if row[k] is not None]) for k in rows[0]}
    if with_fluency:
        result["fluency_ngram_entropy"] = fluency(model, tokenizer, [r.prompt for r in requests])
    result["n_requests"] = len(requests)
    if per_request:
        result["per_request"] = rows
    return result


def _base(base: dict[str, list[int]] | None, probe) -> tuple[int, ...]:
    key = probe_key(probe.prompt, probe.answer)
    if base is None or key not in base:
        raise KeyError(f"no f_0 prediction for locality probe {probe.prompt!r}: compute "
                       "base_predictions(unedited_model, tokenizer, requests) before editing and pass it as `base`")
    return tuple(base[key])


def _agreement(post: tuple[int, ...], pre: tuple[int, ...]) -> float:
    if len(post) != len(pre):
        raise ValueError("locality: f_0 and f_T predictions cover different numbers of tokens (another tokenizer?)")
    return sum(a == b for a, b in zip(post, pre)) / len(pre)
