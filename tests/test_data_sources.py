"""Data sources: CSV with line numbers, the column mapping (CSV and JSONL), the hf: spec (parsing only, never a
download), per-class k-shot sampling, dev splits and in-context demonstrations, all deterministic by seed."""

from __future__ import annotations

from pathlib import Path

import pytest

from mezo_tune.data import (
    DataError,
    parse_hf_spec,
    read_csv,
    read_rows,
    sample_demonstrations,
    sample_per_class,
    split_dev,
)


def write(path: Path, text: str) -> Path:
    path.write_text(text, encoding="utf-8")
    return path


def test_csv_rows_and_lines(tmp_path):
    p = write(tmp_path / "x.csv", 'review,sentiment\n"good, really",pos\n\n"two\nlines",neg\nok,pos\n')
    rows, lines = read_csv(p)
    assert rows == [{"review": "good, really", "sentiment": "pos"}, {"review": "two\nlines", "sentiment": "neg"},
                    {"review": "ok", "sentiment": "pos"}]
    assert lines == [2, 4, 6]


def test_csv_malformed_rows_name_file_and_line(tmp_path):
    p = write(tmp_path / "x.csv", "text,label\na,pos\nb\nc,neg,extra\n")
    with pytest.raises(DataError) as e:
        read_csv(p)
    assert str(e.value) == f"{p}:3: 1 field, the header has 2\n{p}:4: 3 fields, the header has 2"
    with pytest.raises(DataError, match=r"x2.csv:1: the header names column 'a' more than once"):
        read_csv(write(tmp_path / "x2.csv", "a,a\n1,2\n"))
    with pytest.raises(DataError, match=r"x3.csv: no rows$"):
        read_csv(write(tmp_path / "x3.csv", "a,b\n"))


@pytest.mark.parametrize("suffix", ["csv", "jsonl"])
def test_column_mapping(tmp_path, suffix):
    if suffix == "csv":
        p = write(tmp_path / "x.csv", "review,sentiment\ngreat,positive\nbad,negative\n")
    else:
        p = write(tmp_path / "x.jsonl", '{"review": "great", "sentiment": "positive"}\n'
                                        '{"review": "bad", "sentiment": "negative"}\n')
    rows, where = read_rows(p, {"text": "review", "label": "sentiment"}, ("text", "label"))
    assert [(r["text"], r["label"]) for r in rows] == [("great", "positive"), ("bad", "negative")]
    first = 2 if suffix == "csv" else 1
    assert where == [f"{p}:{first}", f"{p}:{first + 1}"]
    with pytest.raises(DataError) as e:
        read_rows(p, {"text": "body"}, ("text", "label"))
    assert str(e.value).splitlines()[0] == f"{p}:{first}: missing column 'body' (for 'text') named in data.columns"


def test_task_errors_name_csv_lines(tmp_path, tokenizer):
    from types import SimpleNamespace

    from mezo_tune.tasks import build_task

    p = write(tmp_path / "x.csv", "text,label\ngreat,positive\nmeh,neutral\n")
    task = build_task(SimpleNamespace(type="classification", template="{text}",
                                      verbalizer={"positive": " positive", "negative": " negative"}), tokenizer, 32)
    rows, where = read_rows(p, {}, task.required_fields)
    with pytest.raises(DataError) as e:
        task.check_rows(rows, str(p), where)
    assert str(e.value) == f"{p}:3: label 'neutral' is not in the verbalizer (positive, negative)"


def test_hf_spec_parsing():
    assert parse_hf_spec("hf:imdb:train") == ("imdb", None, "train")
    assert parse_hf_spec("hf:glue:sst2:validation[:500]") == ("glue", "sst2", "validation[:500]")
    for bad in ("hf:imdb", "hf::train", "hf:a:b:c:d", "imdb:train"):
        with pytest.raises(ValueError, match="is not a Hugging Face dataset spec; write hf:NAME:SPLIT"):
            parse_hf_spec(bad)


def test_per_class_sampling_is_deterministic():
    labels = ["a", "b"] * 10 + ["c"] * 5
    first = sample_per_class(labels, 3, seed=0)
    assert first == sample_per_class(labels, 3, seed=0) == sorted(first)
    assert sorted(labels[i] for i in first) == ["a"] * 3 + ["b"] * 3 + ["c"] * 3
    assert first != sample_per_class(labels, 3, seed=1)
    assert first == [1, 2, 4, 7, 12, 13, 20, 22, 24]  # pinned: blake2b order, stable across platforms
    assert sample_per_class([None] * 10, 4, seed=0) == sorted(sample_per_class([None] * 10, 4, seed=0))
    assert len(sample_per_class([None] * 10, 4, seed=0)) == 4
    with pytest.raises(DataError) as e:
        sample_per_class(labels, 6, seed=0, what="data/t.jsonl")
    assert str(e.value) == "data.train_k = 6, but data/t.jsonl has only 5 rows with label 'c'"


def test_dev_split_is_deterministic():
    train, dev = split_dev(20, 5, seed=0)
    assert (train, dev) == split_dev(20, 5, seed=0)
    assert sorted(train + dev) == list(range(20)) and len(dev) == 5 and dev == sorted(dev)
    assert dev != split_dev(20, 5, seed=1)[1]
    assert dev == [11, 12, 13, 18, 19]  # pinned
    with pytest.raises(DataError, match=r"^data.dev_from_train = 20 leaves no training rows \(data.train has 20\)$"):
        split_dev(20, 20, seed=0)


def test_demonstrations_are_deterministic():
    assert sample_demonstrations(10, 3, seed=0) == sample_demonstrations(10, 3, seed=0)
    assert len(set(sample_demonstrations(10, 3, seed=0))) == 3
    with pytest.raises(DataError, match="--icl-shots 11 asks for more demonstrations than the 10 training rows"):
        sample_demonstrations(10, 11, seed=0)
