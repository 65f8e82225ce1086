"""Editing metrics: hand-computed values on a model whose logits we choose, and on a tiny random LM."""

import math

import pytest
import torch
from torch import nn

from lifelong.data.edit_requests import EditRequest, Probe
from lifelong.families.lm import tiny_lm, tiny_tokenizer
from lifelong.metrics.editing import (
    base_predictions,
    cached_base_predictions,
    ngram_entropy,
    probe_key,
    score_requests,
    score_targets,
)


class TableLM(nn.Module):
    """A 'language model' whose next-token logits depend only on the current token: logits = table[id].
    Lets a test state exactly which token each position predicts and with what probability."""

    def __init__(self, vocab: int):
        super().__init__()
        self.table = nn.Parameter(torch.zeros(vocab, vocab))
        self.training = False

    def forward(self, input_ids, attention_mask=None, **_):
        return type("Out", (), {"logits": self.table[input_ids]})()


@pytest.fixture(scope="module")
def tok():
    return tiny_tokenizer()


def ids(tok, text):
    return tok(text, add_special_tokens=False)["input_ids"]


def test_token_accuracy_exact_and_nll_by_hand(tok):
    prompt, target = "The capital of France is", " Paris."
    p, t = ids(tok, prompt), ids(tok, target)
    assert len(t) == 2  # " Paris" and "."
    lm = TableLM(len(tok))
    with torch.no_grad():
        lm.table[p[-1], t[0]] = 5.0          # after the prompt: predicts " Paris" (right)
        lm.table[t[0], t[1] + 1] = 5.0       # after " Paris": predicts a wrong token
    (s,) = score_targets(lm, tok, [prompt], [target])
    assert s.tokens == tuple(t)
    assert s.predicted == (t[0], t[1] + 1)
    assert s.token_accuracy == 0.5 and s.exact == 0.0
    v = len(tok)
    lp_hit = 5 - math.log(math.exp(5) + v - 1)   # log softmax of the 5.0 entry
    lp_miss = -math.log(math.exp(5) + v - 1)     # a 0.0 entry next to one 5.0
    assert s.mean_nll == pytest.approx(-(lp_hit + lp_miss) / 2, rel=1e-5)


def test_score_targets_batched_equals_one_by_one():
    model, tok = tiny_lm("llama", seed=2)
    prompts = ["The capital of France is", "Hi", "Lyon is a city in the country of", "Hi"]
    targets = [" Paris", " there friend", " France", " there friend"]
    together = score_targets(model, tok, prompts, targets, batch_size=3)
    alone = [score_targets(model, tok, [p], [t], batch_size=1)[0] for p, t in zip(prompts, targets)]
    for a, b in zip(together, alone):
        assert a.tokens == b.tokens and a.predicted == b.predicted
        assert a.mean_nll == pytest.approx(b.mean_nll, abs=1e-4)


def _request(**kw):
    base = dict(prompt="The capital of France is", target_new=" Lyon", subject="France", ground_truth=" Paris",
                paraphrases=("The capital city of France is", "France has its capital in"),
                locality=(Probe("The capital of Italy is", " Rome"), Probe("Osaka is a city in", " Japan")),
                portability=(Probe("Lyon is the capital of", " France"),), relation="capital", case_id="t0")
    base.update(kw)
    return EditRequest(**base)


def test_score_requests_on_table_lm_by_hand(tok):
    r = _request()
    lm = TableLM(len(tok))
    last = lambda text: ids(tok, text)[-1]  # noqa: E731
    lyon, paris = ids(tok, " Lyon"), ids(tok, " Paris")
    with torch.no_grad():
        # the edit prompt and the first paraphrase end in " is": both predict Lyon's first token
        lm.table[last(r.prompt), lyon[0]] = 3.0
        for a, b in zip(lyon, lyon[1:]):
            lm.table[a, b] = 3.0
    base = base_predictions(TableLM(len(tok)), tok, [r])  # f_0 predicts token 0 everywhere
    out = score_requests(lm, tok, [r], base, per_request=True)
    row = out["per_request"][0]
    assert row["reliability_token"] == 1.0 and row["reliability_exact"] == 1.0
    # paraphrase 1 ends in " is" (same last token) -> right; paraphrase 2 ends in " in" -> first token wrong
    p2 = "France has its capital in"
    exp2 = (0 + (len(lyon) - 1)) / len(lyon) if last(p2) != last(r.prompt) else 1.0
    assert row["generality_token"] == pytest.approx((1.0 + exp2) / 2)
    assert row["reliability_cf"] == 1.0  # Lyon's NLL below Paris's after the prompt
    # locality: the edit moved predictions after " is" (Italy probe ends in " is") away from f_0's token 0
    rome = ids(tok, " Rome")
    moved = sum(1 for tkn in [last("The capital of Italy is")] + rome[:-1] if lm.table[tkn].argmax() != 0)
    loc_italy = 1 - moved / len(rome)
    osaka_moved = sum(1 for tkn in [last("Osaka is a city in")] + ids(tok, " Japan")[:-1] if lm.table[tkn].argmax() != 0)
    loc_osaka = 1 - osaka_moved / len(ids(tok, " Japan"))
    assert row["locality_token"] == pytest.approx((loc_italy + loc_osaka) / 2)
    assert out["n_requests"] == 1 and set(out) >= {"reliability_token", "generality_cf", "locality_cf", "portability_token"}
    assert paris != lyon


def test_locality_token_is_one_for_the_unedited_model_and_cf_defined():
    model, tok = tiny_lm("gpt2", seed=0)
    reqs = [_request(), _request(prompt="Osaka is a city in", target_new=" France", subject="Osaka",
                                 ground_truth=" Japan", locality=(Probe("The capital of France is", " Paris"),),
                                 case_id="t1")]
    base = base_predictions(model, tok, reqs)
    out = score_requests(model, tok, reqs, base)
    assert out["locality_token"] == 1.0
    for key in ("reliability_cf", "generality_cf", "locality_cf"):
        assert 0.0 <= out[key] <= 1.0
    assert 0 <= out["reliability_token"] <= 1 and 0 <= out["portability_token"] <= 1


def test_missing_base_prediction_says_what_to_do():
    model, tok = tiny_lm("llama")
    with pytest.raises(KeyError, match="base_predictions"):
        score_requests(model, tok, [_request()], base={})


def test_requests_without_ground_truth_have_no_cf_reliability():
    model, tok = tiny_lm("llama")
    r = _request(ground_truth="", locality=())
    out = score_requests(model, tok, [r], base=None)
    assert out["reliability_cf"] is None and out["generality_cf"] is None and out["locality_token"] is None
    assert out["reliability_token"] is not None


def test_cached_base_predictions_round_trip():
    model, tok = tiny_lm("llama", seed=5)
    reqs = [_request()]
    first = cached_base_predictions(model, tok, reqs)
    assert first == base_predictions(model, tok, reqs)
    assert set(first) == {probe_key(p.prompt, p.answer) for p in reqs[0].locality}
    assert cached_base_predictions(model, tok, reqs) == first


def test_ngram_entropy_by_hand():
    # 4 words -> 3 distinct bigrams (H2 = log2 3), 2 distinct trigrams (H3 = 1)
    assert ngram_entropy("a b c d") == pytest.approx((2 / 3 * math.log2(3) + 4 / 3 * 1.0) / 2)
    # "a a a a": one bigram, one trigram -> 0
    assert ngram_entropy("a a a a") == 0.0
    # punctuation is a word: "a , a ," -> bigrams (a,)(,a)(a,) -> H2 of (2/3, 1/3); trigrams 2 distinct -> 1
    h2 = -(2 / 3 * math.log2(2 / 3) + 1 / 3 * math.log2(1 / 3))
    assert ngram_entropy("a, a,") == pytest.approx((2 / 3 * h2 + 4 / 3) / 2)
    assert ngram_entropy("") == 0.0


def test_fluency_runs_on_tiny_model():
    model, tok = tiny_lm("llama")
    out = score_requests(model, tok, [_request(locality=())], base=None, with_fluency=True)
    assert out["fluency_ngram_entropy"] >= 0.0


def test_next_token_argmax_matches_teacher_forcing():
    from lifelong.metrics.editing import next_token_argmax

    model, tok = tiny_lm("gpt2", seed=4)
    prompts = ["The capital of France is", "Hi", "Lyon is a city in the country of"]
    firsts = next_token_argmax(model, tok, prompts, batch_size=2)
    scored = score_targets(model, tok, prompts, [" Paris"] * 3)
    assert firsts == [s.predicted[0] for s in scored]
