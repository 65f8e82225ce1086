"""The scores of one edit, computed by the same code in both environments of the EasyEdit peer benchmark.

Imported by easyedit_side.py (EasyEdit's venv: transformers 4.40) and lifelong_edit_side.py (lifelong's
venv); it needs only torch and a causal LM that takes `input_ids`. Every text comes as token ids, made once
by the driver with lifelong's tokenizer, so neither side's tokenizer enters the scores.

For a prompt x and an answer a = (t_1..t_k), one teacher-forced pass over x + a gives
    logprob(a | x) = (1/k) sum_j log p(t_j | x, t_<j)      (mean over the answer's tokens, as ROME's CounterFact)
    token_acc(a | x) = (1/k) sum_j [argmax p(. | x, t_<j) = t_j]   (EasyEdit's `rewrite_acc` convention)
and per request, on the edited model:
    rewrite_acc            token_acc(new | prompt)
    rewrite_success        [logprob(new | prompt) > logprob(true | prompt)]          (CounterFact efficacy)
    paraphrase_acc         mean over paraphrases of token_acc(new | paraphrase)
    paraphrase_success     mean over paraphrases of [logprob(new) > logprob(true)]   (CounterFact generalisation)
    neighborhood_success   mean over neighbour prompts of [logprob(their answer) > logprob(new)]
                           (CounterFact specificity: the neighbour keeps its own answer)
    neighborhood_acc       mean over neighbours of the share of argmax tokens over neighbour + answer that
                           equal the unedited model's (EasyEdit's locality convention)
    rewrite_nll            -logprob(new | prompt), a continuous score to compare the two frameworks closely
"""

from __future__ import annotations

import torch


@torch.no_grad()
def answer_pass(model, prompt: list[int], answer: list[int]) -> tuple[float, float, list[int]]:
    """(mean log-prob of the answer's tokens, their argmax accuracy, the argmax ids) after `prompt`."""
    device = next(model.parameters()).device
    ids = torch.tensor([prompt + answer], device=device)                      # (1, P + k)
    logits = model(input_ids=ids).logits[0, len(prompt) - 1: -1].float()       # (k, V): the answer's predictors
    target = torch.tensor(answer, device=device)
    logprob = torch.log_softmax(logits, -1).gather(1, target[:, None]).mean().item()
    argmax = logits.argmax(-1)
    return logprob, (argmax == target).float().mean().item(), argmax.tolist()


def neighbor_argmax(model, request: dict) -> list[list[int]]:
    """The model's argmax ids over each neighbour prompt + its answer (taken before the edit)."""
    return [answer_pass(model, p["prompt_ids"], p["answer_ids"])[2] for p in request["neighbors"]]


def score(model, request: dict, neighbors_before: list[list[int]]) -> dict:
    """The scores above for one request (the driver's record: token ids of prompt, new and true answers,
    paraphrases, neighbours) on `model` as it is now."""
    new, true = request["new_ids"], request["true_ids"]

    def success(prompt: list[int]) -> tuple[float, float, float]:
        lp_new, acc, _ = answer_pass(model, prompt, new)
        lp_true, _, _ = answer_pass(model, prompt, true)
        return float(lp_new > lp_true), acc, lp_new

    rewrite_success, rewrite_acc, lp_new = success(request["prompt_ids"])
    para = [success(p) for p in request["paraphrase_ids"]]
    neighbor_success, neighbor_acc = [], []
    for probe, before in zip(request["neighbors"], neighbors_before):
        lp_own, _, argmax = answer_pass(model, probe["prompt_ids"], probe["answer_ids"])
        lp_new_there, _, _ = answer_pass(model, probe["prompt_ids"], new)
        neighbor_success.append(float(lp_own > lp_new_there))
        neighbor_acc.append(sum(a == b for a, b in zip(argmax, before)) / len(before))
    mean = lambda xs: sum(xs) / len(xs) if xs else float("nan")  # noqa: E731
    return {"rewrite_acc": rewrite_acc, "rewrite_success": rewrite_success, "rewrite_nll": -lp_new,
            "paraphrase_acc": mean([a for _, a, _ in para]), "paraphrase_success": mean([s for s, _, _ in para]),
            "neighborhood_success": mean(neighbor_success), "neighborhood_acc": mean(neighbor_acc)}
