"""A corpus of malformed recipes (tests/data/bad_recipes.json): each one, through the CLI, exits with code 2 and
names its problem with its key, without a traceback.

Each case starts from the file's valid "base" recipe and changes it: "set" ({"section.key": value}) and "drop"
(["section.key" or "section"]) edit the data before it is written as TOML; "raw_replace" ([old, new]),
"raw_prepend", "raw_append" and "raw_bytes_append" (hex) edit the TOML text; "overrides" are `--set` arguments.
"expect" lists problem lines, each of which the output must hold exactly.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import tomli_w
from click.testing import CliRunner

from mezo_tune.cli import main

CORPUS = json.loads((Path(__file__).parent / "data" / "bad_recipes.json").read_text())


def recipe_bytes(case: dict) -> bytes:
    recipe = copy.deepcopy(CORPUS["base"])
    for dotted, value in case.get("set", {}).items():
        section, _, key = dotted.partition(".")
        if key:
            recipe.setdefault(section, {})[key] = value
        else:
            recipe[section] = value
    for dotted in case.get("drop", []):
        section, _, key = dotted.partition(".")
        del (recipe[section] if key else recipe)[key or section]
    text = tomli_w.dumps(recipe)
    if "raw_replace" in case:
        old, new = case["raw_replace"]
        assert old in text, (case["name"], text)
        text = text.replace(old, new, 1)
    text = case.get("raw_prepend", "") + text + case.get("raw_append", "")
    return text.encode() + bytes.fromhex(case.get("raw_bytes_append", ""))


def test_the_corpus_is_large_and_named_uniquely():
    names = [case["name"] for case in CORPUS["cases"]]
    assert len(names) >= 50 and len(set(names)) == len(names)
    assert all(case["expect"] for case in CORPUS["cases"])


def test_the_base_recipe_is_valid(tmp_path, monkeypatch):
    from mezo_tune.recipe import load_recipe

    monkeypatch.chdir(tmp_path)
    for name in ("train.jsonl", "eval.jsonl"):
        (tmp_path / name).write_text('{"text": "a fine film", "label": "positive"}\n')
    (tmp_path / "ok.toml").write_bytes(recipe_bytes({"name": "base"}))
    assert load_recipe("ok.toml").mezo.lr == 1e-6


@pytest.mark.parametrize("case", CORPUS["cases"], ids=lambda case: case["name"])
def test_malformed_recipe_exits_2_naming_the_problem(case, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    for name in ("train.jsonl", "eval.jsonl"):
        (tmp_path / name).write_text('{"text": "a fine film", "label": "positive"}\n')
    (tmp_path / "bad.toml").write_bytes(recipe_bytes(case))
    args = ["train", "bad.toml", "--dry-run"] + [a for o in case.get("overrides", []) for a in ("--set", o)]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 2, (result.output, result.exception)
    assert "Traceback" not in result.output and isinstance(result.exception, SystemExit)
    assert result.output.startswith("error: recipe bad.toml has "), result.output
    lines = [line.strip() for line in result.output.splitlines()]
    for expected in case["expect"]:
        assert expected in lines, result.output
