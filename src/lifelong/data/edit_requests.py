"""Knowledge-edit requests: what an editor is asked to change and the prompts that judge it.

Fields follow EasyEdit's names where one exists (prompt, target_new, ground_truth, subject,
rephrase_prompt(s), locality, portability), so users can bring ZsRE/CounterFact files unchanged.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Probe:
    """A prompt and the answer it is scored against (for locality: the base model's own answer)."""

    prompt: str
    answer: str


@dataclass(frozen=True)
class EditRequest:
    prompt: str            # "The capital of France is"
    target_new: str        # " Lyon" (a leading space where the tokenizer needs one)
    subject: str           # "France": ROME locates the subject's last token in the prompt
    ground_truth: str = ""  # " Paris" ("" when unknown, e.g. zsRE insertion)
    paraphrases: tuple[str, ...] = ()          # generality prompts, same target
    locality: tuple[Probe, ...] = ()           # unrelated prompts whose answers must not change
    portability: tuple[Probe, ...] = ()        # consequences of the new fact
    relation: str = ""     # "capital", "currency", ... (for reports)
    case_id: str = ""
