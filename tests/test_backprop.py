"""End to end through the CLI: the AdamW backprop baseline (loss goes down, deterministic on CPU), CSV data with a
column mapping, k-shot sampling and a dev split, eval with in-context demonstrations, and inspect --plot."""

from __future__ import annotations

import json

import pytest
from conftest import SENTIMENT_ROWS, write_jsonl
from test_cli import cli, recipe_dict, write_recipe


def test_adamw_baseline_lowers_loss_and_is_deterministic(tmp_path, tiny_model_dirs):
    train = write_jsonl(tmp_path / "train.jsonl", SENTIMENT_ROWS * 2)
    ev = write_jsonl(tmp_path / "eval.jsonl", SENTIMENT_ROWS)
    outs = []
    for name in ("a", "b"):
        recipe = recipe_dict(tiny_model_dirs(), train, ev, out=tmp_path / name, task="classification", steps=8)
        recipe["optim"] = {"type": "adamw", "lr": 1e-2}
        result = cli("train", write_recipe(tmp_path / f"{name}.toml", recipe), "-q")
        assert "trajectory:" not in result.output and f"final model: {tmp_path / name}/final" in result.output
        outs.append(tmp_path / name)
    a, b = outs
    assert not (a / "trajectory.mezo").exists()
    assert (a / "final" / "model.safetensors").read_bytes() == (b / "final" / "model.safetensors").read_bytes()
    metrics = [[{k: v for k, v in json.loads(line).items() if k != "s_per_step"}
                for line in (d / "metrics.jsonl").read_text().splitlines()] for d in (a, b)]
    assert metrics[0] == metrics[1]  # the same losses and evals, bit for bit
    evals = [m["eval"] for m in metrics[0] if "eval" in m]
    assert evals[-1]["loss"] < evals[0]["loss"]


def test_csv_columns_train_k_dev_split_and_icl_eval(tmp_path, tiny_model_dirs):
    lines = ["review,sentiment"] + [f'"{r["text"]}",{r["label"]}' for r in SENTIMENT_ROWS * 3]
    train = tmp_path / "train.csv"
    train.write_text("\n".join(lines) + "\n")
    recipe = recipe_dict(tiny_model_dirs(), train, out=tmp_path / "run", task="classification", steps=2)
    recipe["data"].update(columns={"text": "review", "label": "sentiment"}, train_k=4, dev_from_train=6, seed=1)
    path = write_recipe(tmp_path / "r.toml", recipe)
    cli("train", path, "-q")
    evals = [json.loads(line)["eval"] for line in (tmp_path / "run/metrics.jsonl").read_text().splitlines()
             if "eval" in json.loads(line)]
    assert evals[0]["n"] == 6 and set(evals[0]["per_class"]) == {"positive", "negative"}

    cut = cli("eval", path, "-q", "--icl-shots", 2, ok=False)  # max_length 32 would cut the demonstrations off
    assert cut.exit_code == 1
    assert cut.output.startswith("error: --icl-shots 2: with the demonstrations the longest prompt is 68 tokens")
    assert "over data.max_length = 32, which would cut demonstrations off; raise it, e.g. --set" in cut.output
    zero = json.loads(cli("eval", path, "--json", "-q").output)
    roomy = ("--set", "data.max_length=256")
    two = json.loads(cli("eval", path, *roomy, "--json", "-q", "--icl-shots", 2).output)
    again = json.loads(cli("eval", path, *roomy, "--json", "-q", "--icl-shots", 2).output)
    assert zero["n"] == two["n"] == 6 and two["icl_shots"] == 2 and two == again
    assert two["loss"] != zero["loss"]
    assert set(two["confusion"]) == {"labels", "matrix"}
    text = cli("eval", path, "-q").output.splitlines()
    assert "precision" in text[1] or "recall" in text[1]


def test_inspect_plot_writes_png(tmp_path, tiny_model_dirs):
    pytest.importorskip("matplotlib")
    train = write_jsonl(tmp_path / "train.jsonl", SENTIMENT_ROWS)
    ev = write_jsonl(tmp_path / "eval.jsonl", SENTIMENT_ROWS[:4])
    recipe = recipe_dict(tiny_model_dirs(), train, ev, out=tmp_path / "run", task="classification", steps=6)
    recipe["output"].update(log_every=1, eval_every=3)
    cli("train", write_recipe(tmp_path / "r.toml", recipe), "-q")
    png = tmp_path / "plots" / "curve.png"
    cli("inspect", tmp_path / "run/trajectory.mezo", "--plot", png)
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
