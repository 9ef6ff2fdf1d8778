"""tasks.py: classification scores and losses equal hand computations, both scoring paths agree, a row's result
does not depend on its batch, the lm loss equals transformers' own, errors name file:line."""

from __future__ import annotations

import copy
import math
from types import SimpleNamespace

import pytest
import torch

from conftest import ARCHS, CORPUS, SENTIMENT_ROWS, build_model
from mezo_tune.data import DataError
from mezo_tune.tasks import ClassificationTask, LMTask, build_task, template_fields

TEMPLATE = "Review: {text}\nSentiment:"
VERBALIZER = {"positive": " positive", "negative": " negative"}  # one token each in the test tokenizer
MULTI = {"positive": " great", "negative": " terrible", "neutral": " bad"}  # 3, 8 and 2 tokens


def cls_cfg(verbalizer=VERBALIZER, template=TEMPLATE):
    return SimpleNamespace(type="classification", template=template, verbalizer=verbalizer)


LM_CFG = SimpleNamespace(type="lm", template="{text}", verbalizer=None)


@pytest.fixture(scope="module")
def models():
    return {arch: build_model(arch) for arch in ARCHS}


def direct_scores(model, tokenizer, rows, verbalizer, template=TEMPLATE):
    """Label scores by hand: one unpadded forward per (row, label), log_softmax in fp32, sum over word tokens."""
    out = []
    for row in rows:
        prompt = tokenizer(template.format(**row), add_special_tokens=True).input_ids
        scores = []
        for word in verbalizer.values():
            w = tokenizer(word, add_special_tokens=False).input_ids
            ids = torch.tensor([prompt + w])
            with torch.no_grad():
                logp = torch.log_softmax(model(input_ids=ids).logits[0].float(), dim=-1)
            scores.append(sum(logp[len(prompt) - 1 + k, t].item() for k, t in enumerate(w)))
        out.append(scores)
    return torch.tensor(out, dtype=torch.float64)


# ---------------------------------------------------------------------------------------------------------------
# classification


@pytest.mark.parametrize("arch", ARCHS)
def test_classification_equals_hand_computation(arch, models, tokenizer):
    model = models[arch]
    rows = SENTIMENT_ROWS[:2]  # different lengths: the shorter one is padded
    task = build_task(cls_cfg(), tokenizer, max_length=64)
    assert task.single_token

    expected = direct_scores(model, tokenizer, rows, VERBALIZER)
    torch.testing.assert_close(task.scores(model, rows).double(), expected, atol=1e-6, rtol=0)

    # cross-entropy of the softmax over label scores, averaged over the batch
    targets = [list(VERBALIZER).index(r["label"]) for r in rows]
    ce = [-(expected[i, t] - torch.logsumexp(expected[i], 0)).item() for i, t in enumerate(targets)]
    loss = task.loss(model, rows)
    assert loss.dtype == torch.float32 and loss.shape == ()
    assert loss.item() == pytest.approx(sum(ce) / 2, abs=1e-6)


@pytest.mark.parametrize("arch", ARCHS)
def test_multi_token_words_equal_hand_computation(arch, models, tokenizer):
    task = build_task(cls_cfg(MULTI), tokenizer, max_length=64)
    assert not task.single_token
    rows = SENTIMENT_ROWS[:3]
    torch.testing.assert_close(task.scores(models[arch], rows).double(),
                               direct_scores(models[arch], tokenizer, rows, MULTI), atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("arch", ARCHS)
def test_single_token_and_general_paths_agree(arch, models, tokenizer):
    fast = ClassificationTask(tokenizer, 64, VERBALIZER, TEMPLATE)
    general = ClassificationTask(tokenizer, 64, VERBALIZER, TEMPLATE, force_general=True)
    assert fast.single_token and not general.single_token
    torch.testing.assert_close(fast.scores(models[arch], SENTIMENT_ROWS), general.scores(models[arch], SENTIMENT_ROWS),
                               atol=1e-6, rtol=1e-6)
    assert fast.loss(models[arch], SENTIMENT_ROWS).item() == pytest.approx(
        general.loss(models[arch], SENTIMENT_ROWS).item(), abs=1e-6)


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("verbalizer", [VERBALIZER, MULTI], ids=["single", "multi"])
def test_logits_to_keep_gives_identical_scores(arch, verbalizer, models, tokenizer):
    model = models[arch]
    seen = []
    handle = model.register_forward_pre_hook(lambda m, a, kw: seen.append(kw.get("logits_to_keep")), with_kwargs=True)
    try:
        kept = ClassificationTask(tokenizer, 64, verbalizer, TEMPLATE).scores(model, SENTIMENT_ROWS)
        full = ClassificationTask(tokenizer, 64, verbalizer, TEMPLATE, use_logits_to_keep=False).scores(
            model, SENTIMENT_ROWS)
    finally:
        handle.remove()
    assert isinstance(seen[0], torch.Tensor) and seen[0].ndim == 1 and seen[1] is None
    assert torch.equal(kept, full)


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("verbalizer", [VERBALIZER, MULTI], ids=["single", "multi"])
def test_row_alone_equals_row_in_batch(arch, verbalizer, models, tokenizer):
    model = models[arch]
    task = build_task(cls_cfg(verbalizer), tokenizer, max_length=64)
    batch = task.scores(model, SENTIMENT_ROWS)
    for i, row in enumerate(SENTIMENT_ROWS):
        # multi-token scores are sums (about -45 here): compare to 1e-6 relative, a few float32 ulps
        torch.testing.assert_close(task.scores(model, [row])[0], batch[i], atol=1e-6, rtol=1e-6)


def test_loss_is_bit_identical_on_repeat(models, tokenizer):
    for verbalizer in (VERBALIZER, MULTI):
        task = build_task(cls_cfg(verbalizer), tokenizer, max_length=64)
        first = task.loss(models["llama"], SENTIMENT_ROWS)
        assert all(torch.equal(first, task.loss(models["llama"], SENTIMENT_ROWS)) for _ in range(3))
    lm = build_task(LM_CFG, tokenizer, max_length=64)
    rows = [{"text": t} for t in CORPUS]
    first = lm.loss(models["gpt2"], rows)
    assert all(torch.equal(first, lm.loss(models["gpt2"], rows)) for _ in range(3))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_loss_is_fp32_for_half_models(dtype, tokenizer):
    model = build_model("llama", dtype)
    for cfg in (cls_cfg(), cls_cfg(MULTI), LM_CFG):
        task = build_task(cfg, tokenizer, max_length=64)
        rows = SENTIMENT_ROWS[:3]
        loss = task.loss(model, rows)
        assert loss.dtype == torch.float32 and math.isfinite(loss.item())


def test_classification_evaluate(models, tokenizer):
    model = models["llama"]
    task = build_task(cls_cfg(), tokenizer, max_length=64)
    scores = task.scores(model, SENTIMENT_ROWS)
    predicted = scores.argmax(dim=1).tolist()
    labels = list(VERBALIZER)
    truth = [labels.index(r["label"]) for r in SENTIMENT_ROWS]
    result = task.evaluate(model, SENTIMENT_ROWS, batch_size=3, progress=True)
    correct = sum(p == t for p, t in zip(predicted, truth))
    assert result["n"] == 8 and result["correct"] == correct and result["accuracy"] == correct / 8
    counts = {lab: {"n": sum(t == k for t in truth), "correct": sum(p == t == k for p, t in zip(predicted, truth)),
                    "predicted": sum(p == k for p in predicted)} for k, lab in enumerate(labels)}
    assert {lab: {k: c[k] for k in ("n", "correct", "predicted")} for lab, c in result["per_class"].items()} == counts
    assert result["loss"] == pytest.approx(task.loss(model, SENTIMENT_ROWS).item(), abs=1e-6)


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("verbalizer", [VERBALIZER, MULTI], ids=["single", "multi"])
def test_icl_demonstrations_computed_once_score_as_in_full(arch, verbalizer, models, tokenizer):
    """evaluate() computes the demonstrations' keys and values once; each batch then runs only its own tokens.
    Scores match the full forward up to float rounding, and the predictions are the same."""
    model = models[arch]
    task = build_task(cls_cfg(verbalizer), tokenizer, max_length=512)
    task.set_demonstrations(SENTIMENT_ROWS[:3])
    full = task.scores(model, SENTIMENT_ROWS)  # outside evaluate(): every prompt runs in full
    task.share_prefix(model, SENTIMENT_ROWS)
    assert task._shared is not None and task._shared.length > 30
    assert task._shared.covers([task.prompt_ids(r) for r in SENTIMENT_ROWS])
    shared = torch.cat([task.scores(model, SENTIMENT_ROWS[:5]), task.scores(model, SENTIMENT_ROWS[5:])])
    torch.testing.assert_close(shared, full, rtol=0, atol=1e-4)
    assert task.predict(shared) == task.predict(full)
    result = task.evaluate(model, SENTIMENT_ROWS, batch_size=3)
    assert task._shared is None  # dropped when evaluate() returns: the model may change afterwards
    labels = [task.label_of(r) for r in SENTIMENT_ROWS]
    assert result["correct"] == sum(p == t for p, t in zip(task.predict(full), labels))


def test_icl_shared_prefix_is_the_prompts_common_tokens(models, tokenizer):
    task = build_task(cls_cfg(), tokenizer, max_length=512)
    task.set_demonstrations(SENTIMENT_ROWS[:2])
    task.share_prefix(models["llama"], SENTIMENT_ROWS[2:4])
    a, b = (task.prompt_ids(r) for r in SENTIMENT_ROWS[2:4])
    n = task._shared.length
    assert a[:n] == b[:n] and a[n] != b[n]
    assert not task._shared.covers([a[1:]]) and not task._shared.covers([a[:n]])  # another start; no token of its own
    task._shared = None
    task.share_prefix(models["llama"], SENTIMENT_ROWS[2:3])  # one row: all but its last token are shared
    assert task._shared.length == len(a) - 1
    task._shared = None


def test_ties_go_to_first_label():
    assert ClassificationTask.predict(torch.tensor([[1.0, 1.0, 0.0], [0.0, 2.0, 2.0], [-1.0, -3.0, -0.5]])) == [0, 1, 2]


def test_prompt_is_cut_from_the_left(tokenizer):
    task = build_task(cls_cfg(MULTI), tokenizer, max_length=12)  # longest word: 8 tokens -> 4 prompt tokens
    row = {"text": "the quick brown fox jumps over the lazy dog", "label": "positive"}
    full = tokenizer(TEMPLATE.format(**row)).input_ids
    assert task.prompt_ids(row) == full[-4:]


def test_long_prompts_still_score(models, tokenizer):
    task = build_task(cls_cfg(), tokenizer, max_length=8)
    assert task.scores(models["opt"], SENTIMENT_ROWS).shape == (8, 2)


def test_required_fields(tokenizer):
    assert build_task(cls_cfg(template="{title}: {text}"), tokenizer, 64).required_fields == ("title", "text", "label")
    assert build_task(cls_cfg(template=None), tokenizer, 64).required_fields == ("text", "label")
    assert build_task(LM_CFG, tokenizer, 64).required_fields == ("text",)


def test_label_not_in_verbalizer(tokenizer):
    task = build_task(cls_cfg(), tokenizer, 64)
    rows = SENTIMENT_ROWS[:6] + [{"text": "meh", "label": "neutral"}]
    with pytest.raises(DataError) as e:
        task.check_rows(rows, "data/x.jsonl")
    assert str(e.value) == "data/x.jsonl:7: label 'neutral' is not in the verbalizer (positive, negative)"


def test_check_rows_lists_every_problem(tokenizer):
    task = build_task(cls_cfg(template="{title}: {text}"), tokenizer, 64)
    rows = [{"title": "A", "text": "b", "label": "positive"},
            {"text": "b", "label": "positive"},
            {"title": "A", "text": "b"},
            {"title": "A", "text": "b", "label": 1},
            {"label": "negative"}]
    with pytest.raises(DataError) as e:
        task.check_rows(rows, "data/x.jsonl")
    assert str(e.value) == ("data/x.jsonl:2: missing field 'title' (used by the template)\n"
                            "data/x.jsonl:3: missing field 'label'\n"
                            "data/x.jsonl:4: label 1 is not in the verbalizer (positive, negative)\n"
                            "data/x.jsonl:5: missing fields 'title', 'text' (used by the template)")


def test_integer_labels_match_string_keys(models, tokenizer):
    task = build_task(cls_cfg({"0": " negative", "1": " positive"}), tokenizer, 64)
    rows = [{"text": "fine", "label": 1}, {"text": "bad", "label": "0"}]
    task.check_rows(rows, "x")
    assert [task.label_of(r) for r in rows] == [1, 0]


def test_bad_verbalizers(tokenizer):
    with pytest.raises(ValueError, match="tokenizes to no tokens"):
        build_task(cls_cfg({"positive": "", "negative": " negative"}), tokenizer, 64)
    with pytest.raises(ValueError, match="same verbalizer tokens"):
        build_task(cls_cfg({"positive": " negative", "negative": " negative"}), tokenizer, 64)
    with pytest.raises(ValueError, match="needs a verbalizer"):
        build_task(cls_cfg(None), tokenizer, 64)
    with pytest.raises(ValueError, match="no room for a prompt"):
        build_task(cls_cfg(MULTI), tokenizer, 8)
    with pytest.raises(ValueError, match="unknown task type 'mc'"):
        build_task(SimpleNamespace(type="mc", template=None, verbalizer=None), tokenizer, 64)


def test_template_fields():
    assert template_fields("{title}: {text} ({meta[year]}) {text}") == ("title", "text", "meta")
    with pytest.raises(ValueError, match="positional field"):
        template_fields("Review: {}")


# ---------------------------------------------------------------------------------------------------------------
# pad token


def test_pad_falls_back_to_eos(models, tokenizer):
    tok = copy.deepcopy(tokenizer)
    tok.pad_token = None
    assert tok.pad_token_id is None and tok.eos_token_id == 1
    task = build_task(cls_cfg(), tok, 64)
    assert task.pad_id == 1
    ref = build_task(cls_cfg(), tokenizer, 64)
    torch.testing.assert_close(task.scores(models["llama"], SENTIMENT_ROWS),
                               ref.scores(models["llama"], SENTIMENT_ROWS), atol=1e-6, rtol=0)


def test_no_pad_no_eos_is_an_error():
    tok = SimpleNamespace(pad_token_id=None, eos_token_id=None)
    with pytest.raises(ValueError, match="^the tokenizer has neither a pad token nor an eos token; "):
        LMTask(tok, 64)


# ---------------------------------------------------------------------------------------------------------------
# lm


@pytest.mark.parametrize("arch", ARCHS)
def test_lm_loss_equals_transformers_loss(arch, models, tokenizer):
    model = models[arch]
    task = build_task(LM_CFG, tokenizer, max_length=64)
    for text in CORPUS:
        ids = torch.tensor([tokenizer(text).input_ids])
        with torch.no_grad():
            expected = model(input_ids=ids, labels=ids).loss
        assert task.loss(model, [{"text": text}]).item() == pytest.approx(expected.item(), abs=1e-6)


@pytest.mark.parametrize("arch", ARCHS)
def test_lm_row_alone_equals_row_in_batch(arch, models, tokenizer):
    model = models[arch]
    task = build_task(LM_CFG, tokenizer, max_length=64)
    rows = [{"text": t} for t in CORPUS]
    sums, counts = task.loss_terms(model, rows)
    for i, row in enumerate(rows):
        alone = task.loss(model, [row])
        assert (sums[i] / counts[i]).item() == pytest.approx(alone.item(), abs=1e-6)
        assert counts[i].item() == len(tokenizer(row["text"]).input_ids) - 1
    # the batch loss is the mean over all predicted tokens, not the mean of row means
    assert task.loss(model, rows).item() == pytest.approx((sums.sum() / counts.sum()).item(), abs=0)


def test_lm_truncates_to_max_length(models, tokenizer):
    task = build_task(LM_CFG, tokenizer, max_length=5)
    row = {"text": CORPUS[4]}
    ids = torch.tensor([tokenizer(row["text"]).input_ids[:5]])
    with torch.no_grad():
        expected = models["llama"](input_ids=ids, labels=ids).loss.item()
    assert task.loss(models["llama"], [row]).item() == pytest.approx(expected, abs=1e-6)


def test_lm_evaluate(models, tokenizer):
    model = models["llama"]
    task = build_task(LM_CFG, tokenizer, max_length=64)
    rows = [{"text": t} for t in CORPUS]
    result = task.evaluate(model, rows, batch_size=4, progress=True)
    tokens = sum(len(tokenizer(t).input_ids) - 1 for t in CORPUS)
    assert result["n"] == 6 and result["tokens"] == tokens
    assert result["loss"] == pytest.approx(task.loss(model, rows).item(), abs=1e-6)
    assert result["perplexity"] == pytest.approx(math.exp(result["loss"]))


def test_lm_check_rows(tokenizer):
    task = build_task(SimpleNamespace(type="lm", template="{title}\n{text}", verbalizer=None), tokenizer, 64)
    with pytest.raises(DataError) as e:
        task.check_rows([{"title": "a", "text": "b"}, {"text": "x"}], "data/lm.jsonl")
    assert str(e.value) == "data/lm.jsonl:2: missing field 'title' (used by the template)"
    short = build_task(LM_CFG, tokenizer, 64)
    with pytest.raises(DataError, match="^data/lm.jsonl:1: the text is shorter than 2 tokens"):
        short.check_rows([{"text": ""}, {"text": "fine text"}], "data/lm.jsonl")
