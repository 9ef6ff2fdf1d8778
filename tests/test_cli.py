"""The command line through click's CliRunner (in-process): help, error messages and exit codes, dry-run, inspect,
eval and the data command. One subprocess checks that `mezo-tune --help` does not import torch."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import tomli_w
from click.testing import CliRunner
from conftest import SENTIMENT_ROWS, build_model, write_jsonl

from mezo_tune import __version__, models
from mezo_tune.cli import main
from mezo_tune.recipe import load_recipe, recipe_to_toml

REPO = Path(__file__).resolve().parents[1]
TEMPLATE = "Review: {text}\nSentiment:"
VERBALIZER = {"positive": " positive", "negative": " negative"}  # one token each in the test tokenizer
TINY_LLAMA_PARAMS = 28_832  # the tiny llama of conftest.py: 20 tensors, embedding and LM head tied (counted once)


def cli(*args, ok: bool = True):
    result = CliRunner().invoke(main, [str(a) for a in args])
    if ok:
        assert result.exit_code == 0, (result.output, result.exception)
    return result


def recipe_dict(model_dir, train, eval=None, out="runs/x", task="lm", steps=10, **mezo) -> dict:
    return {
        "model": {"path": str(model_dir), "device": "cpu"},
        "data": {"train": str(train), "max_length": 32, **({"eval": str(eval)} if eval else {})},
        "task": ({"type": "classification", "template": TEMPLATE, "verbalizer": VERBALIZER}
                 if task == "classification" else {"type": "lm"}),
        "mezo": {"lr": 1e-3, "eps": 1e-3, "steps": steps, "batch_size": 2, "seed": 7, "keyframe_every": 4,
                 "compile": "off", **mezo},
        "output": {"dir": str(out), "checkpoint_every": 0},
    }


def write_recipe(path: Path, recipe: dict) -> Path:
    path.write_text(tomli_w.dumps(recipe))
    return path


# ---- help and version ---------------------------------------------------------------------------------------------

COMMANDS = {
    (): "Fine-tune causal language models with MeZO",
    ("train",): "Train with MeZO as RECIPE says",
    ("replay",): "Rebuild the trained weights from the base model and TRAJECTORY",
    ("eval",): "Score a model on RECIPE's task",
    ("inspect",): "Print a trajectory's header, steps",
    ("compare",): "Compare runs by the dev metric",
    ("bench",): "Time and peak memory",
    ("data",): "Build datasets.",
    ("data", "rotten-tomatoes"): "Sentiment JSONL",
    ("data", "debates"): "Who speaks, JSONL",
}


@pytest.mark.parametrize("command", list(COMMANDS), ids=lambda c: " ".join(c) or "main")
def test_help_of_every_command(command):
    for flag in ("--help", "-h"):
        result = cli(*command, flag)
        assert result.output.startswith(f"Usage: main {' '.join(command)}".rstrip() + " ")
        assert COMMANDS[command] in " ".join(result.output.split())


def test_every_command_has_help_text():
    assert {c for c in main.commands} == {"train", "replay", "eval", "inspect", "compare", "bench", "sweep", "data"}
    assert {("data", c) for c in main.commands["data"].commands} == {("data", "rotten-tomatoes"), ("data", "debates")}


def test_version():
    assert cli("--version").output == f"mezo-tune, version {__version__}\n"


def test_help_does_not_import_torch():
    code = (
        "import sys\n"
        "from mezo_tune import cli\n"
        "try:\n"
        "    cli.main(['--help'])\n"
        "except SystemExit as e:\n"
        "    assert e.code in (0, None), e.code\n"
        "heavy = sorted(m for m in ('torch', 'transformers', 'numpy', 'safetensors') if m in sys.modules)\n"
        "print('HEAVY', heavy)\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "Usage:" in proc.stdout
    assert proc.stdout.splitlines()[-1] == "HEAVY []"


# ---- recipe, data and model errors --------------------------------------------------------------------------------

def test_recipe_errors_all_at_once_exit_2(tmp_path, tiny_model_dirs):
    recipe = recipe_dict(tiny_model_dirs(), tmp_path / "nope.jsonl")
    mezo = recipe["mezo"]
    mezo["lrr"] = mezo.pop("lr")  # a typo: unknown key, and lr is now missing
    mezo["steps"] = -1
    path = write_recipe(tmp_path / "bad.toml", recipe)
    result = cli("train", path, "-q", ok=False)
    assert result.exit_code == 2
    assert result.output == (
        f"error: recipe {path} has 4 problems:\n"
        f"  data.train: file not found: {tmp_path}/nope.jsonl\n"
        "  mezo.lrr: unknown key (did you mean 'lr'?)\n"
        "  mezo.lr: required key is missing\n"
        "  mezo.steps: must be > 0 (got -1)\n"
    )
    assert "Traceback" not in result.output
    assert isinstance(result.exception, SystemExit)

    # the same recipe problems from --dry-run and from eval; an override error comes first
    for args in (("train", path, "--dry-run"), ("eval", path, "-q")):
        again = cli(*args, ok=False)
        assert (again.exit_code, again.output) == (2, result.output)
    bad_set = cli("train", path, "--set", "steps=3", ok=False)
    assert bad_set.exit_code == 2
    assert bad_set.output.splitlines()[:2] == [
        f"error: recipe {path} has 5 problems:",
        '  override "steps=3": expected section.key=value (did you mean mezo.steps?)',
    ]


def test_missing_recipe_file(tmp_path):
    result = cli("train", tmp_path / "none.toml", ok=False)
    assert result.exit_code == 2
    assert result.output == (f"error: recipe {tmp_path}/none.toml has 1 problem:\n"
                             f"  file not found: {tmp_path}/none.toml\n")


def test_toml_syntax_error(tmp_path):
    path = tmp_path / "r.toml"
    path.write_text("[model]\npath = \n")
    result = cli("train", path, ok=False)
    assert result.exit_code == 2
    assert result.output == (f"error: recipe {path} has 1 problem:\n"
                             f"  {path}:2:8: invalid TOML: Invalid value\n")


def test_bad_jsonl_line_names_file_and_line(tmp_path, tiny_model_dirs):
    train = tmp_path / "train.jsonl"
    train.write_text('{"text": "a great film"}\n{"text": "dull"}\n{"text": oops}\n["a list"]\n')
    path = write_recipe(tmp_path / "r.toml", recipe_dict(tiny_model_dirs(), train, out=tmp_path / "out"))
    result = cli("train", path, "-q", ok=False)
    assert result.exit_code == 1
    assert result.output == (f"error: {train}:3: invalid JSON (Expecting value at column 10)\n"
                             f"{train}:4: expected a JSON object, got an array\n")
    assert "Traceback" not in result.output


def test_missing_model_path(tmp_path, lm_files, monkeypatch):
    monkeypatch.chdir(tmp_path)
    train, ev = lm_files
    path = write_recipe(tmp_path / "r.toml", recipe_dict("./no-such-model", train, ev, out=tmp_path / "out"))
    result = cli("train", path, "-q", ok=False)
    assert result.exit_code == 1
    assert result.output == ("error: model path not found: ./no-such-model (a local directory, a hub id like "
                             "'org/name', or one of embedded:smollm2-135m)\n")
    # a directory that is not a Hugging Face model
    (tmp_path / "empty").mkdir()
    path = write_recipe(tmp_path / "r2.toml", recipe_dict(tmp_path / "empty", train, ev, out=tmp_path / "out"))
    result = cli("train", path, "-q", ok=False)
    assert result.exit_code == 1
    assert result.output == (f"error: {tmp_path}/empty: directory has no config.json, so it is not a Hugging Face "
                             "model directory\n")


# ---- dry run ------------------------------------------------------------------------------------------------------

def test_tiny_llama_parameter_count():
    model = build_model("llama")
    assert sum(p.numel() for p in model.parameters()) == TINY_LLAMA_PARAMS
    assert len(list(model.parameters())) == 20


def test_dry_run_prints_recipe_and_trainable_count_without_loading_weights(tmp_path, lm_files, tiny_model_dirs,
                                                                           monkeypatch):
    # a model directory with the config only: no weights to load
    config_only = tmp_path / "config-only"
    config_only.mkdir()
    shutil.copy(tiny_model_dirs() / "config.json", config_only / "config.json")
    train, ev = lm_files
    path = write_recipe(tmp_path / "r.toml", recipe_dict(config_only, train, ev, out=tmp_path / "out"))

    def no_loading(*a, **k):
        raise AssertionError("--dry-run loaded weights")

    monkeypatch.setattr(models, "load_model", no_loading)
    monkeypatch.setattr(models, "load", no_loading)
    result = cli("train", path, "--dry-run")
    expected_recipe = recipe_to_toml(load_recipe(path)).rstrip()
    assert result.output.startswith("# resolved recipe\n" + expected_recipe + "\n\n")
    lines = result.output.splitlines()
    assert f"trainable: {TINY_LLAMA_PARAMS:,} parameters in 20 tensors (model: {TINY_LLAMA_PARAMS:,})" in lines
    assert "estimated peak memory: " in result.output
    assert not (tmp_path / "out").exists()

    # freezing the embedding (tied with the LM head) leaves 28,832 - 320*32
    result = cli("train", path, "--dry-run", "--set", 'model.freeze=["model.embed_tokens.*"]')
    n = TINY_LLAMA_PARAMS - 320 * 32
    assert f"trainable: {n:,} parameters in 19 tensors (model: {TINY_LLAMA_PARAMS:,})" in result.output.splitlines()


# ---- a trained run: inspect, eval ---------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def trained(tmp_path_factory, tiny_model_dirs):
    """A finished 10-step classification run on the tiny llama, and its replay."""
    tmp = tmp_path_factory.mktemp("trained")
    train = write_jsonl(tmp / "train.jsonl", SENTIMENT_ROWS * 2)
    ev = write_jsonl(tmp / "eval.jsonl", SENTIMENT_ROWS)
    path = write_recipe(tmp / "r.toml", recipe_dict(tiny_model_dirs(), train, ev, out=tmp / "runs/x",
                                                    task="classification", lr=5e-2, eps=1e-2))
    result = cli("train", path, "-q")
    assert result.output.startswith(f"trajectory: {tmp}/runs/x/trajectory.mezo\nfinal model: {tmp}/runs/x/final\n"
                                    "eval accuracy: ")
    cli("replay", tmp / "runs/x/trajectory.mezo", "--out", tmp / "replayed", "-q")
    return tmp, path


def test_inspect_text(trained):
    tmp, _ = trained
    traj = tmp / "runs/x/trajectory.mezo"
    lines = cli("inspect", traj).output.splitlines()
    assert lines[0] == f"trajectory  {traj}  (format 3)"
    assert lines[1].startswith(f"model       {tiny_model_path(tmp)} (digest ")
    assert lines[2] == "dtype       float32"
    assert lines[3] == f"trainable   20 tensors, {TINY_LLAMA_PARAMS:,} elements"
    assert lines[4] == "seed        7   eps 0.01   z mezo-tune/lowbias32x2 1 gaussian   rounding nearest"
    assert lines[5] == "steps       10 recorded, 0 skipped, finished (10 steps)"
    assert lines[6] == "keyframes   4 (steps -1, 3, 7, 9)"
    assert lines[8] == "file        clean (every block checksum verified)"
    # the evals before and after training, recorded in the trajectory; the best by accuracy marked
    assert re.fullmatch(r"evals       2; best accuracy 0\.\d{4} after step (-1|9) \(`replay --best`\)", lines[9])
    assert re.fullmatch(r"  after      -1   accuracy 0\.\d{4}   loss \d+\.\d{4}(   <- best)?", lines[10])
    assert re.fullmatch(r"  after       9   accuracy 0\.\d{4}   loss \d+\.\d{4}(   <- best)?", lines[11])
    assert lines[12].startswith("loss        first 10%: ")
    assert len(lines) == 13 + 10  # ten loss windows of one step


def tiny_model_path(tmp) -> str:
    return load_recipe(tmp / "r.toml").model.path


def test_inspect_json(trained):
    tmp, recipe = trained
    traj = tmp / "runs/x/trajectory.mezo"
    s = json.loads(cli("inspect", traj, "--json").output)
    assert (s["n_steps"], s["finished"], s["n_skipped"], s["problem"]) == (10, True, 0, None)
    assert s["keyframe_steps"] == [-1, 3, 7, 9]
    assert s["end"]["steps"] == 10
    assert s["header"]["recipe"] == recipe_to_toml(load_recipe(recipe))
    assert s["header"]["seed"] == 7 and s["header"]["dtype"] == "float32"
    assert len(s["loss_windows"]) == 10


def test_inspect_not_a_trajectory(tmp_path):
    junk = tmp_path / "x.mezo"
    junk.write_bytes(b"hello")
    result = cli("inspect", junk, ok=False)
    assert result.exit_code == 1
    assert result.output == (f"error: {junk}: not a mezo-tune trajectory file (it does not start with the trajectory "
                             "magic b'MEZOTRJ1'); pass the trajectory file that `mezo-tune train` wrote.\n")


def test_eval_base_trajectory_and_replayed_dir(trained):
    tmp, recipe = trained
    traj = tmp / "runs/x/trajectory.mezo"
    base = json.loads(cli("eval", recipe, "--json", "-q").output)
    from_traj = json.loads(cli("eval", recipe, "--model", traj, "--json", "-q").output)
    from_dir = json.loads(cli("eval", recipe, "--model", tmp / "replayed", "--json", "-q").output)
    final = json.loads(cli("eval", recipe, "--model", tmp / "runs/x/final", "--json", "-q").output)

    assert from_traj["model"] == f"{traj} (10 steps replayed)"
    assert from_dir["model"] == str(tmp / "replayed")
    assert base["model"] == tiny_model_path(tmp)
    for r in (base, from_traj, from_dir, final):
        assert r["n"] == len(SENTIMENT_ROWS) and r["task"] == "classification" and r["data"] == str(tmp / "eval.jsonl")
    drop = ("model",)
    same = {k: v for k, v in from_traj.items() if k not in drop}
    assert same == {k: v for k, v in from_dir.items() if k not in drop}
    assert same == {k: v for k, v in final.items() if k not in drop}
    assert base["loss"] != from_traj["loss"]  # the run changed the model

    # the eval after training recorded by the run is the same evaluation
    metrics = [json.loads(line) for line in (tmp / "runs/x/metrics.jsonl").read_text().splitlines()]
    evals = [m["eval"] for m in metrics if "eval" in m]
    assert evals[0]["loss"] == base["loss"] and evals[-1]["loss"] == from_traj["loss"]
    assert evals[-1]["accuracy"] == from_traj["accuracy"]

    text = cli("eval", recipe, "--model", tmp / "replayed", "-q").output.splitlines()
    assert text[0] == (f"{tmp}/replayed on {tmp}/eval.jsonl (8 rows): accuracy {from_dir['accuracy']:.2%} "
                       f"({from_dir['correct']}/8), loss {from_dir['loss']:.4f}")
    assert [line.split(":")[0].strip() for line in text[1:]] == ["positive", "negative"]

    limited = json.loads(cli("eval", recipe, "--limit", 3, "--json", "-q").output)
    assert limited["n"] == 3


def test_eval_without_eval_data(tmp_path, tiny_model_dirs):
    train = write_jsonl(tmp_path / "train.jsonl", SENTIMENT_ROWS)
    path = write_recipe(tmp_path / "r.toml", recipe_dict(tiny_model_dirs(), train, task="classification",
                                                         out=tmp_path / "out"))
    result = cli("eval", path, "-q", ok=False)
    assert result.exit_code == 1
    assert result.output == "error: nothing to evaluate on: the recipe has no data.eval; pass --data FILE\n"


# ---- data ---------------------------------------------------------------------------------------------------------



def test_data_rotten_tomatoes_offline(tmp_path, offline_wheel_cache):
    out = tmp_path / "rt"
    result = cli("data", "rotten-tomatoes", "--train", 20, "--eval", 10, "--test", 10, "--out", out)
    assert result.output == (f"{out}/train.jsonl: 20 rows (positive 7, negative 13)\n"
                             f"{out}/eval.jsonl: 10 rows (positive 8, negative 2)\n"
                             f"{out}/test.jsonl: 10 rows (positive 4, negative 6)\n")
    rows = [json.loads(line) for line in (out / "train.jsonl").read_text().splitlines()]
    assert len(rows) == 20 and all(set(r) == {"text", "label"} for r in rows)

    result = cli("data", "rotten-tomatoes", "--train", 4000, "--out", tmp_path / "big", ok=False)
    assert result.exit_code == 1
    assert result.output == ("error: the Rotten Tomatoes data has 4863 usable examples; 4000 + 500 + 1000 were "
                             "asked for\n")


def test_data_rotten_tomatoes_bad_option():
    result = cli("data", "rotten-tomatoes", "--train", 0, ok=False)
    assert result.exit_code == 2
    assert "Invalid value for '--train'" in result.output


def test_replay_refuses_a_non_empty_out_dir(trained, tmp_path):
    tmp, _ = trained
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "x").write_text("")
    result = cli("replay", tmp / "runs/x/trajectory.mezo", "--out", tmp_path / "busy", "-q", ok=False)
    assert result.exit_code == 1
    assert result.output == f"error: {tmp_path}/busy exists and is not empty; choose another --out or delete it\n"


# ---- regressions: bugs found while writing these tests -------------------------------------------------------------

def test_inspect_json_of_a_header_without_recipe(tmp_path):
    from mezo_tune.trajectory import TrajectoryWriter

    path = tmp_path / "h.mezo"
    TrajectoryWriter.create(path, {"seed": 1}).close()
    assert cli("inspect", path).output.startswith(f"trajectory  {path}  (format 3)\n")
    result = cli("inspect", path, "--json", ok=False)
    assert result.exit_code == 0, result.exception
    s = json.loads(result.output)
    assert (s["n_steps"], s["finished"], s["header"]["seed"]) == (0, False, 1)


def _classification_recipe(tmp_path, model_dir, verbalizer, max_length=32):
    train = write_jsonl(tmp_path / "train.jsonl", SENTIMENT_ROWS)
    recipe = recipe_dict(model_dir, train, task="classification", out=tmp_path / "out", steps=2)
    recipe["task"]["verbalizer"] = verbalizer
    recipe["data"]["max_length"] = max_length
    return write_recipe(tmp_path / "r.toml", recipe)


def test_verbalizer_words_with_the_same_tokens_is_a_clear_error(tmp_path, tiny_model_dirs):
    path = _classification_recipe(tmp_path, tiny_model_dirs(), {"positive": " positive", "negative": " positive"})
    result = cli("train", path, "-q", ok=False)
    assert isinstance(result.exception, SystemExit), result.exception  # not an uncaught ValueError
    assert result.exit_code in (1, 2)
    assert result.output.startswith("error: ")
    assert "have the same verbalizer tokens" in result.output


def test_max_length_1_is_a_recipe_error(tmp_path, tiny_model_dirs):
    path = _classification_recipe(tmp_path, tiny_model_dirs(), VERBALIZER, max_length=1)
    result = cli("train", path, "-q", ok=False)
    assert result.exit_code == 2, result.exception
    assert result.output.startswith(f"error: recipe {path} has 1 problem:\n  data.max_length: must be >= 2")
