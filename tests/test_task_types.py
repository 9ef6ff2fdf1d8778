"""The paper's task types: multiple choice and generation scores equal hand computations on a 2-row batch, SQuAD
EM/F1 on known strings, classification precision/recall/confusion, metric objectives trained by MeZO, in-context
demonstrations."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from conftest import SENTIMENT_ROWS, build_model
from mezo_tune.data import DataError
from mezo_tune.mezo import Mezo, trainable_set
from mezo_tune.tasks import build_task, exact_match, normalize_answer, token_f1

MC_ROWS = [{"context": "a great film", "choices": ["positive", "negative"], "answer": 0},
           {"context": "dull and long", "choices": ["good", "bad", "ugly thing"], "answer": "bad"}]
GEN_ROWS = [{"context": "capital?", "answers": ["Paris", "paris city"]}, {"context": "the best", "answer": "a dog"}]
VERBALIZER = {"positive": " positive", "negative": " negative"}


def cfg(type, **kw):
    return SimpleNamespace(type=type, **kw)


@pytest.fixture(scope="module")
def model():
    return build_model("llama")


def continuation_logprobs(model, prompt: list[int], cont: list[int]) -> list[float]:
    """By hand: one unpadded forward over prompt + continuation, fp32 log_softmax, the continuation's tokens."""
    with torch.no_grad():
        logp = torch.log_softmax(model(input_ids=torch.tensor([prompt + cont])).logits[0].float(), dim=-1)
    return [logp[len(prompt) - 1 + k, t].item() for k, t in enumerate(cont)]


# ---- multiple choice ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("score", ["sum", "mean"])
def test_multiple_choice_equals_hand_computation(score, model, tokenizer):
    task = build_task(cfg("multiple_choice", template="Q: {context}\nA:", score=score), tokenizer, 64)
    expected = []
    for row in MC_ROWS:
        prompt = tokenizer(f"Q: {row['context']}\nA:").input_ids
        lps = [continuation_logprobs(model, prompt, tokenizer(" " + c, add_special_tokens=False).input_ids)
               for c in row["choices"]]
        expected.append(torch.tensor([sum(lp) if score == "sum" else sum(lp) / len(lp) for lp in lps]))
    got = task.scores(model, MC_ROWS)
    for g, e in zip(got, expected):
        torch.testing.assert_close(g.double(), e.double(), atol=1e-5, rtol=1e-6)
    ce = [-(e[t] - torch.logsumexp(e, 0)).item() for e, t in zip(expected, (0, 1))]
    loss = task.loss(model, MC_ROWS)
    assert loss.dtype == torch.float32 and loss.item() == pytest.approx(sum(ce) / 2, abs=1e-5)
    result = task.evaluate(model, MC_ROWS, batch_size=1)
    correct = sum(int(torch.argmax(e)) == t for e, t in zip(expected, (0, 1)))
    assert result["n"] == 2 and result["correct"] == correct and result["loss"] == pytest.approx(loss.item(), abs=1e-5)


def test_multiple_choice_row_errors(tokenizer):
    task = build_task(cfg("multiple_choice"), tokenizer, 64)
    rows = [{"context": "x", "choices": ["a", "b"], "answer": 2},
            {"context": "x", "choices": ["a"], "answer": 0},
            {"context": "x", "choices": '["a", "b"]', "answer": "1"},
            {"context": "x", "choices": ["a", "b"], "answer": "c"},
            {"context": "x"}]
    with pytest.raises(DataError) as e:
        task.check_rows(rows, "mc.jsonl")
    assert str(e.value) == ("mc.jsonl:1: answer 2 is not an index into the 2 choices\n"
                            "mc.jsonl:2: choices must be a list of at least 2 non-empty strings, got ['a']\n"
                            "mc.jsonl:4: answer 'c' is neither a choice index nor one of the choices\n"
                            "mc.jsonl:5: missing fields 'choices', 'answer'")


# ---- generation ----------------------------------------------------------------------------------------------------

def test_generation_loss_is_ce_on_answer_tokens(model, tokenizer):
    task = build_task(cfg("generation", template="Q: {context}\nA:", max_new_tokens=4, stop=["\n"]), tokenizer, 64)
    nll, count = 0.0, 0
    for row, answer in zip(GEN_ROWS, ("Paris", "a dog")):
        prompt = tokenizer(f"Q: {row['context']}\nA:").input_ids
        target = tokenizer(" " + answer, add_special_tokens=False).input_ids + [tokenizer.eos_token_id]
        lp = continuation_logprobs(model, prompt, target)
        nll -= sum(lp)
        count += len(lp)
    loss = task.loss(model, GEN_ROWS)
    assert loss.dtype == torch.float32 and loss.item() == pytest.approx(nll / count, abs=1e-5)


def test_generation_greedy_decoding_and_stop(model, tokenizer):
    task = build_task(cfg("generation", template="Q: {context}\nA:", max_new_tokens=6, stop=[]), tokenizer, 64)
    texts = []
    for row in GEN_ROWS:  # greedy by hand: argmax, no cache
        ids = tokenizer(f"Q: {row['context']}\nA:").input_ids
        new = []
        for _ in range(6):
            with torch.no_grad():
                nxt = int(model(input_ids=torch.tensor([ids + new])).logits[0, -1].argmax())
            if nxt == tokenizer.eos_token_id:
                break
            new.append(nxt)
        texts.append(tokenizer.decode(new, skip_special_tokens=True))
    assert task.generate(model, GEN_ROWS) == [t.strip() for t in texts]
    stop = texts[0].strip()[1:2] or "x"
    task.stop = (stop,)
    assert task.generate(model, GEN_ROWS[:1])[0] == texts[0][: texts[0].index(stop)].strip()
    result = task.evaluate(model, GEN_ROWS)
    assert set(result) == {"exact_match", "f1", "n", "loss"} and result["n"] == 2


def test_generation_answers_layouts(tokenizer):
    task = build_task(cfg("generation"), tokenizer, 64)
    assert task.answers_of({"answers": {"text": ["x", "y"], "answer_start": [0, 3]}}) == ["x", "y"]
    assert task.answers_of({"answer": "z"}) == ["z"]
    with pytest.raises(DataError) as e:
        task.check_rows([{"context": "c"}], "g.jsonl")
    assert str(e.value) == "g.jsonl:1: missing field 'answers' (a list) or 'answer' (a string)"


@pytest.mark.parametrize("prediction, answers, em, f1", [
    ("The Eiffel Tower!", ["eiffel tower"], 1.0, 1.0),
    ("  an   apple, a pear ", ["apple pear"], 1.0, 1.0),
    ("Paris France", ["Paris"], 0.0, 2 / 3),
    ("in the year 1999", ["1999", "year 1999"], 0.0, 0.8),
    ("", ["x"], 0.0, 0.0),
    ("the", ["a"], 1.0, 1.0),  # both normalise to nothing
    ("cat cat dog", ["cat dog dog"], 0.0, 2 / 3),
])
def test_exact_match_and_f1(prediction, answers, em, f1):
    assert exact_match(prediction, answers) == em
    assert token_f1(prediction, answers) == pytest.approx(f1)


def test_normalize_answer():
    assert normalize_answer("The  Cat's   hat, AN apple.") == "cats hat apple"


# ---- classification: precision, recall, confusion --------------------------------------------------------------

def test_classification_precision_recall_confusion(model, tokenizer):
    task = build_task(cfg("classification", template="Review: {text}\nSentiment:", verbalizer=VERBALIZER),
                      tokenizer, 64)
    predicted = task.scores(model, SENTIMENT_ROWS).argmax(dim=1).tolist()
    truth = [list(VERBALIZER).index(r["label"]) for r in SENTIMENT_ROWS]
    result = task.evaluate(model, SENTIMENT_ROWS, batch_size=3)
    matrix = [[sum(t == i and p == j for t, p in zip(truth, predicted)) for j in range(2)] for i in range(2)]
    assert result["confusion"] == {"labels": ["positive", "negative"], "matrix": matrix}
    for k, label in enumerate(VERBALIZER):
        c = result["per_class"][label]
        tp = matrix[k][k]
        col = matrix[0][k] + matrix[1][k]
        assert c["precision"] == (tp / col if col else None)
        assert c["recall"] == tp / sum(matrix[k])


# ---- objectives ----------------------------------------------------------------------------------------------------

def test_accuracy_objective_is_minus_accuracy(model, tokenizer):
    c = cfg("classification", template="Review: {text}\nSentiment:", verbalizer=VERBALIZER, objective="accuracy")
    task = build_task(c, tokenizer, 64)
    accuracy = task.evaluate(model, SENTIMENT_ROWS)["accuracy"]
    assert task.loss(model, SENTIMENT_ROWS).item() == -accuracy
    with pytest.raises(ValueError, match="objective 'f1' is not available for this task"):
        build_task(SimpleNamespace(**{**vars(c), "objective": "f1"}), tokenizer, 64)


def test_f1_objective_on_generation(model, tokenizer):
    task = build_task(cfg("generation", max_new_tokens=3, objective="f1"), tokenizer, 64)
    preds = task.generate(model, GEN_ROWS)
    expected = -sum(token_f1(p, task.answers_of(r)) for p, r in zip(preds, GEN_ROWS)) / 2
    assert task.loss(model, GEN_ROWS).item() == pytest.approx(expected)


def test_mezo_lowers_a_non_differentiable_objective(tokenizer):
    """Accuracy is piecewise constant; MeZO still trains on it when eps is large enough to flip predictions."""
    model = build_model("llama")
    c = cfg("classification", template="Review: {text}\nSentiment:", verbalizer=VERBALIZER, objective="accuracy")
    task = build_task(c, tokenizer, 64)
    engine = Mezo(model, trainable_set(model), seed=3, eps=0.1, distribution="gaussian", rounding="nearest",
                  use_compile=False)
    before = task.loss(model, SENTIMENT_ROWS).item()
    for t in range(30):
        engine.step(t, 0.5, lambda: task.loss(model, SENTIMENT_ROWS))
    after = task.loss(model, SENTIMENT_ROWS).item()
    assert before == -0.5 and after < before


# ---- in-context demonstrations -------------------------------------------------------------------------------------

def test_demonstrations_are_formatted_with_gold_answers(tokenizer):
    cls = build_task(cfg("classification", template="R: {text} S:", verbalizer=VERBALIZER), tokenizer, 64)
    cls.set_demonstrations(SENTIMENT_ROWS[:2], " | ")
    assert cls.format({"text": "ok"}) == ("R: a great film with a warm heart S: positive | "
                                          "R: dull, long and badly acted S: negative | R: ok S:")
    mc = build_task(cfg("multiple_choice", template="Q: {context} A:"), tokenizer, 64)
    mc.set_demonstrations(MC_ROWS, "\n")
    assert mc.format({"context": "c"}) == "Q: a great film A: positive\nQ: dull and long A: bad\nQ: c A:"
    gen = build_task(cfg("generation", template="Q: {context} A:"), tokenizer, 64)
    gen.set_demonstrations(GEN_ROWS[:1], "\n\n")
    assert gen.format({"context": "c"}) == "Q: capital? A: Paris\n\nQ: c A:"
