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
    fluency,
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


# ----------------------------------------------------------------------------- every metric pinned by hand

class GreedyTableLM(TableLM):
    """TableLM with greedy `generate` (logits of the last token only), for the generation metrics."""

    def generate(self, input_ids, attention_mask=None, max_new_tokens=1, do_sample=False, **_):
        ids = input_ids
        for _ in range(max_new_tokens):
            ids = torch.cat([ids, self.table[ids[:, -1]].argmax(-1, keepdim=True)], dim=1)
        return ids


def _tables(tok):
    """f_0 and f_T (the model after the edit France -> Lyon): logits[next] = table[current token].
    Only the rows after " is" and after " " (Lyon's first token) differ; every entry not set is 0, so
    an argmax over an unset row is token 0."""
    t = lambda text: ids(tok, text)  # noqa: E731
    (is_,), (in_,), (of,), (the,), (q,) = t(" is"), t(" in"), t(" of"), t(" the"), t("Which city?")[-1:]
    space, lyon = t(" Lyon")
    (paris,), (japan,), (france,), (dot,) = t(" Paris"), t(" Japan"), t(" France"), t(".")
    shared = {in_: {paris: 3.0, japan: 2.5}, of: {france: 2.0}, q: {paris: 2.0}, paris: {dot - 1: 2.0},
              the: {japan: 5.0}, lyon: {is_: 1.0}}
    f0 = {**shared, is_: {paris: 2.0}}
    fT = {**shared, is_: {space: 4.0, paris: 2.0}, space: {lyon: 4.0}}
    out = []
    for rows in (f0, fT):
        lm = GreedyTableLM(len(tok))
        with torch.no_grad():
            for a, row in rows.items():
                for b, v in row.items():
                    lm.table[a, b] = v
        out.append(lm)
    return out


def _pinned_request():
    return EditRequest(
        prompt="The capital of France is", target_new=" Lyon", subject="France", ground_truth=" Paris",
        paraphrases=("The capital city of France is", "France has its capital in"),
        locality=(Probe("The capital of Italy is", " Rome"), Probe("Osaka lies in the", " Japan"),
                  Probe("Which city?", " Lyon"), Probe("Osaka is a city in", " Japan")),
        portability=(Probe("Lyon is the capital of", " France"), Probe("Which city?", " Paris.")))


def _nll(lm, tok, prompt, target):
    """-(1/k) sum_j log softmax(table[previous token])[t_j], read off the table (not score_targets)."""
    seq = ids(tok, prompt) + ids(tok, target)
    k = len(ids(tok, target))
    rows = [lm.table[a].detach() for a in seq[-k - 1 : -1]]
    return -sum((row[b] - torch.logsumexp(row, 0)).item() for row, b in zip(rows, seq[-k:])) / k


def test_every_editing_metric_pinned_on_a_table_model(tok):
    """Each metric's value worked out by hand (issue 19: a flipped locality_cf, exact scores computed as
    token accuracy, or a broken cf/portability/fluency formula passed the suite). Per position, f_T predicts:
      " is" -> " " (Lyon's first token; f_0: " Paris");  " " -> "Lyon" (f_0: token 0);  " in" -> " Paris";
      " of" -> " France";  "?" -> " Paris";  " Paris" -> the token before ".";  " the" -> " Japan"."""
    f0, fT = _tables(tok)
    r = _pinned_request()
    base = base_predictions(f0, tok, [r])
    row = score_requests(fT, tok, [r], base, per_request=True)["per_request"][0]

    # the CounterFact comparisons below, checked on NLLs read off the table
    nll = lambda x, y: _nll(fT, tok, x, y)  # noqa: E731
    assert nll(r.prompt, " Lyon") < nll(r.prompt, " Paris")                      # efficacy: won
    assert nll(r.paraphrases[1], " Lyon") > nll(r.paraphrases[1], " Paris")      # " in": the old answer wins
    assert nll("The capital of Italy is", " Rome") > nll("The capital of Italy is", " Lyon")  # the edit broke it
    assert nll("Osaka lies in the", " Japan") < nll("Osaka lies in the", " Lyon")
    assert nll("Osaka is a city in", " Japan") < nll("Osaka is a city in", " Lyon")

    assert row == pytest.approx({
        "reliability_token": 1.0, "reliability_exact": 1.0,
        # paraphrase 1 ends in " is" (both tokens right); 2 ends in " in": " Paris" instead of " ", then "Lyon"
        "generality_token": (1.0 + 0.5) / 2, "generality_exact": (1.0 + 0.0) / 2,
        # " France" right; " Paris." -> " Paris" right, then the token before "." instead of "."
        "portability_token": (1.0 + 0.5) / 2, "portability_exact": (1.0 + 0.0) / 2,
        # f_T vs f_0 argmaxes: Italy " is" differs (0); " the" same (1); "?" same, " " differs (1/2); " in" same (1)
        "locality_token": (0.0 + 1.0 + 0.5 + 1.0) / 4,
        "reliability_cf": 1.0, "generality_cf": (1.0 + 0.0) / 2,
        # Italy lost, the two Osaka probes kept; "Which city?" -> " Lyon" is the new target itself: skipped
        "locality_cf": 2 / 3,
    })
    unedited = score_requests(f0, tok, [r], base)
    assert unedited["locality_token"] == 1.0 and unedited["reliability_exact"] == 0.0

    # a second request whose prompt ends in " in": " Paris" instead of " ", then "Lyon" right
    r2 = EditRequest(prompt="France has its capital in", target_new=" Lyon", subject="France", ground_truth=" Paris")
    both = score_requests(fT, tok, [r, r2], base, per_request=True)
    assert both["per_request"][1] == {"reliability_token": 0.5, "reliability_exact": 0.0, "reliability_cf": 0.0,
                                      "generality_token": None, "generality_exact": None, "generality_cf": None,
                                      "portability_token": None, "portability_exact": None,
                                      "locality_token": None, "locality_cf": None}
    # means over the requests that define a metric (each request's own mean first)
    assert both["reliability_token"] == 0.75 and both["reliability_exact"] == 0.5 and both["reliability_cf"] == 0.5
    assert both["generality_exact"] == 0.5 and both["locality_cf"] == pytest.approx(2 / 3) and both["n_requests"] == 2

    # fluency: greedy from " is" cycles " " Lyon " is": the text " Lyon is Lyon is" -> words Lyon is Lyon is
    h2 = -(2 / 3 * math.log2(2 / 3) + 1 / 3 * math.log2(1 / 3))  # bigrams (Lyon,is) x2, (is,Lyon)
    h3 = 1.0                                                    # trigrams (Lyon,is,Lyon), (is,Lyon,is)
    assert fluency(fT, tok, [r.prompt], max_new_tokens=6) == pytest.approx((2 / 3 * h2 + 4 / 3 * h3) / 2)


def test_generation_scores_pinned_on_a_table_model(tok):
    """Greedy decoding of f_T, by hand (row by row of the table, k + 5 tokens, token 0 = end of text):
      prompt "... is"      -> " Lyon is Lyon is"       exact 1, contains 1
      paraphrase "... in"  -> " Paris-"                 exact 0, contains 0
      "... capital of"     -> " France"                 exact 1 (" France"), contains 1
      "Which city?"        -> " Paris-"                 " Paris." normalised is "paris": exact 1, contains 1
    locality: f_0 and f_T continue "Italy is" differently (" Paris-" / " Lyon is ..."), the three others alike."""
    from lifelong.metrics.editing import base_generations, gen_contains, gen_exact, generation_scores

    f0, fT = _tables(tok)
    r = _pinned_request()
    base = base_generations(f0, tok, [r])
    out = generation_scores(fT, tok, [r], base, per_request=True)
    assert out["per_request_gen"][0] == {
        "reliability_gen_exact": 1.0, "reliability_gen_contains": 1.0,
        "generality_gen_exact": 0.5, "generality_gen_contains": 0.5,
        "portability_gen_exact": 1.0, "portability_gen_contains": 1.0,
        "locality_gen": 0.75}
    assert out["gen_chat"] == 0.0  # the tiny tokenizer has no chat template
    unedited = generation_scores(f0, tok, [r], base)
    assert unedited["locality_gen"] == 1.0 and unedited["reliability_gen_exact"] == 0.0

    # the two matches on text
    assert gen_exact(" Lyon, of course", " Lyon") == 1.0 and gen_exact(" Lyons", " Lyon") == 0.0
    assert gen_contains(" It is Lyon.", " Lyon") == 1.0 and gen_exact(" It is Lyon.", " Lyon") == 0.0
    assert gen_contains(" Lyonnais", " Lyon") == 0.0 and gen_contains(" the  SOUTH america", "South America") == 1.0


def test_generation_uses_the_chat_template_when_asked(tok):
    """With `chat`, the prompt is the user's turn and the answer the assistant's reply."""
    import copy

    from lifelong.metrics.editing import as_chat, generation_scores

    chat_tok = copy.deepcopy(tok)
    chat_tok.chat_template = "{% for m in messages %}Q: {{ m['content'] }}{% endfor %}{% if add_generation_prompt %} A:{% endif %}"
    assert as_chat(chat_tok, "Which city?") == "Q: Which city? A:" and as_chat(tok, "Which city?") == "Which city?"
    lm = GreedyTableLM(len(tok))
    (colon,), (lyon,) = ids(tok, ":")[-1:], ids(tok, "Lyon")
    with torch.no_grad():  # after "A:" the model says "Lyon"; after "?" it says nothing useful
        lm.table[colon, lyon] = 5.0
    r = EditRequest(prompt="Which city?", target_new="Lyon", subject="x")
    assert generation_scores(lm, chat_tok, [r], chat=True)["reliability_gen_exact"] == 1.0
    assert generation_scores(lm, chat_tok, [r], chat=False)["reliability_gen_exact"] == 0.0
    assert generation_scores(lm, chat_tok, [r], chat=True)["gen_chat"] == 1.0
