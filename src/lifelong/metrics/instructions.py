"""Scores of instruction-following answers (data/instructions.py's tasks), from greedy generations.

    exact_match(p, A) = 1[ norm(first_line(p)) in {norm(a) : a in A} ]           SQuAD's EM (Rajpurkar et al.
        2016): norm lower-cases, drops punctuation, the articles a/an/the and extra white space.
    contains(p, A)    = 1[ some norm(a) occurs as whole words in norm(first_line(p)) ]   the lenient convention
        (an answer inside a sentence counts: "The capital of Peru is Lima." -> Lima); reported beside EM.
    accuracy(p, y)    = 1[ choice(p) == y ],  choice(p) = the label of `choices` whose normalised form occurs
        first in norm(p) as a whole word ("Sport." -> sport; "It is positive" -> positive); none: wrong.
    rouge_l(p, r)     = F1 of the longest common subsequence of the tokens of first_line(p) and r (Lin 2004),
        computed by Google's `rouge-score` (`RougeScorer(["rougeL"], use_stemmer=True)`), the package and
        settings the summarisation papers report.

A task's score is the mean over its test examples, in [0, 1]. `evaluate_task` generates each answer
greedily (metrics.editing.generate, left-padded batches) from the prompt of data.instructions.prompt_text,
plain or through the chat template, so the untouched model is scored both ways. A prompt longer than the
model's context (less the answer's tokens) keeps its last tokens, with a warning.
"""

from __future__ import annotations

import re
import string
from functools import lru_cache

from lifelong.data.instructions import Example, InstructionTask, prompt_text
from lifelong.errors import DataNotFoundError
from lifelong.families.lm import context_length
from lifelong.metrics.editing import generate

MAX_NEW_TOKENS = {"rouge_l": 24, "accuracy": 12, "exact_match": 12}  # enough for a headline / a label / a name


def normalize(text: str) -> str:
    """SQuAD's answer normalisation: lower case, no punctuation, no articles, single spaces."""
    text = "".join(ch for ch in text.lower() if ch not in set(string.punctuation))
    return " ".join(re.sub(r"\b(a|an|the)\b", " ", text).split())


def first_line(text: str) -> str:
    return next((line for line in text.strip().splitlines() if line.strip()), "")


def exact_match(prediction: str, answers: tuple[str, ...]) -> float:
    return float(normalize(first_line(prediction)) in {normalize(a) for a in answers})


def contains(prediction: str, answers: tuple[str, ...]) -> float:
    words = f" {normalize(first_line(prediction))} "
    return float(any(f" {normalize(a)} " in words for a in answers if normalize(a)))


def predicted_choice(prediction: str, choices: tuple[str, ...]) -> str | None:
    """The choice whose normalised form occurs first in the normalised prediction (whole words); None if none does."""
    words = f" {normalize(prediction)} "
    found = [(words.find(f" {normalize(c)} "), c) for c in choices]
    found = [(at, c) for at, c in found if at >= 0]
    return min(found)[1] if found else None


def accuracy(prediction: str, label: str, choices: tuple[str, ...]) -> float:
    return float(predicted_choice(prediction, choices) == label)


@lru_cache(maxsize=1)
def _rouge_scorer():
    try:
        from rouge_score import rouge_scorer  # optional dependency, imported at first use
    except ImportError as e:
        raise DataNotFoundError(f"ROUGE-L needs rouge-score: pip install rouge-score==0.1.2 ({e})") from e
    return rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)


def rouge_l(prediction: str, reference: str) -> float:
    return _rouge_scorer().score(reference, first_line(prediction))["rougeL"].fmeasure


def score(task: InstructionTask, example: Example, prediction: str) -> float:
    if task.metric == "rouge_l":
        return rouge_l(prediction, example.output)
    if task.metric == "accuracy":
        return accuracy(prediction, example.output, task.choices)
    if task.metric == "exact_match":
        return exact_match(prediction, example.answers)
    raise ValueError(f"unknown metric {task.metric!r}")


def evaluate_task(model, tokenizer, task: InstructionTask, chat: bool = False, batch_size: int = 16,
                  max_new_tokens: int | None = None, examples: tuple[Example, ...] | None = None, warn=None) -> dict:
    """The model's mean score on `examples` (default the task's test split), with each prediction. A prompt
    longer than the model's context keeps its last tokens (metrics.editing.generate; `warn` says so)."""
    examples = task.test if examples is None else examples
    if not examples:
        raise ValueError(f"{task.name}: no examples to evaluate")
    prompts = [prompt_text(e, tokenizer, chat=chat) for e in examples]
    predictions = generate(model, tokenizer, prompts, max_new_tokens=max_new_tokens or MAX_NEW_TOKENS[task.metric],
                           batch_size=batch_size, max_length=context_length(model), warn=warn)
    scores = [score(task, e, p) for e, p in zip(examples, predictions)]
    result = {"task": task.name, "metric": task.metric, "chat": chat, "n": len(scores),
              "score": sum(scores) / len(scores)}
    if task.metric == "exact_match":
        result["contains"] = sum(contains(p, e.answers) for e, p in zip(examples, predictions)) / len(examples)
    return result | {"predictions": predictions}
