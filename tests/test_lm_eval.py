"""The lm-evaluation-harness bridge (`mezo-tune eval --lm-eval-tasks`): a local task (tests/data/lm_eval/: 4 JSONL
documents, each a 2- or 3-way multiple choice) on tiny random Llamas, its acc and acc_norm checked against those
computed here from the model's own log-likelihoods; and the clean error when lm-eval is not installed. Nothing is
downloaded: the task reads a local file."""

from __future__ import annotations

import importlib.util
import json
import os
import sys
from pathlib import Path

import pytest
import tomli_w
import torch
from click.testing import CliRunner
from conftest import CORPUS, save_tiny, write_jsonl

from mezo_tune.cli import main

os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

TASK_DIR = Path(__file__).resolve().parent / "data" / "lm_eval"
TASK = "mezo_tiny_choice"
ROWS = [json.loads(line) for line in (TASK_DIR / "tiny_choice.jsonl").read_text().splitlines()]

needs_lm_eval = pytest.mark.skipif(importlib.util.find_spec("lm_eval") is None,
                                   reason="lm-eval is not installed (pip install 'mezo-tune[lm-eval]')")


def cli(*args, ok: bool = True):
    result = CliRunner().invoke(main, [str(a) for a in args])
    if ok:
        assert result.exit_code == 0, (result.output, result.exception)
    return result


@pytest.fixture(scope="module")
def models(tmp_path_factory, tiny_model_dirs):
    """Two tiny random Llamas (seeds 0 and 2: their scores differ) saved as Hugging Face directories."""
    return {0: tiny_model_dirs("llama", "float32"),
            2: save_tiny(tmp_path_factory.mktemp("lm-eval-seed2"), seed=2)}


@pytest.fixture
def recipe(tmp_path, models, monkeypatch):
    """A recipe over the seed-0 model; the working directory is the task's (its data_files path is relative) and
    `datasets` caches into tmp_path."""
    train = write_jsonl(tmp_path / "train.jsonl", [{"text": t} for t in CORPUS])
    path = tmp_path / "recipe.toml"
    path.write_text(tomli_w.dumps({
        "model": {"path": str(models[0]), "device": "cpu"},
        "data": {"train": str(train), "max_length": 32},
        "task": {"type": "lm"},
        "mezo": {"lr": 1e-3, "eps": 1e-3, "steps": 1, "batch_size": 3, "seed": 0, "compile": "off"},
        "output": {"dir": str(tmp_path / "run")},
    }))
    monkeypatch.chdir(TASK_DIR)
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    if importlib.util.find_spec("datasets") is not None:
        import datasets

        monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "hf-datasets")
    return path


def hand_correct(model_dir: Path, adapter_dir: Path | None = None) -> dict[str, list[bool]]:
    """The task's per-document acc and acc_norm, computed here: for each choice, the sum of log p(choice tokens |
    context) (context and context + " " + choice tokenized whole, the choice's tokens those after the context's, as
    lm-eval does for a causal model); acc: its argmax is the gold one; acc_norm: the argmax of the sum / characters."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    if adapter_dir is not None:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, str(adapter_dir)).eval()
    tok = AutoTokenizer.from_pretrained(model_dir)
    correct = {"acc": [], "acc_norm": []}
    for row in ROWS:
        n_context = len(tok.encode(row["context"]))
        lls = []
        for choice in row["choices"]:
            ids = tok.encode(f"{row['context']} {choice}")
            with torch.no_grad():
                logp = model(torch.tensor([ids])).logits[0].log_softmax(-1)
            lls.append(sum(logp[i - 1, ids[i]].item() for i in range(n_context, len(ids))))
        norm = [ll / len(choice) for ll, choice in zip(lls, row["choices"])]
        correct["acc"].append(lls.index(max(lls)) == row["label"])
        correct["acc_norm"].append(norm.index(max(norm)) == row["label"])
    return correct


def hand_metrics(model_dir: Path, n: int | None = None, adapter_dir: Path | None = None) -> dict[str, float]:
    """acc and acc_norm over the first n documents (all for None)."""
    return {k: sum(v[:n]) / len(v[:n]) for k, v in hand_correct(model_dir, adapter_dir).items()}


@needs_lm_eval
def test_local_task_accuracy_equals_hand_computed(recipe, models):
    from mezo_tune.lm_eval_bridge import evaluate_lm_eval
    from mezo_tune.recipe import load_recipe

    assert hand_correct(models[0]) == {"acc": [True, False, False, False], "acc_norm": [False] * 4}
    # the scores of each prefix of the documents pin down every document's result
    for limit in (1, 2, None):
        result = evaluate_lm_eval(load_recipe(recipe), TASK, include=[TASK_DIR], limit=limit, progress=False)
        assert result["model"] == str(models[0]) and result["limit"] == limit and result["num_fewshot"] is None
        assert set(result["tasks"]) == {TASK}
        task = result["tasks"][TASK]
        assert task["n"] == (limit or len(ROWS))
        assert {k: task["metrics"][k] for k in ("acc", "acc_norm")} == hand_metrics(models[0], limit)
        if limit == 1:  # lm-eval's stderr of one document is "N/A": left out
            assert set(task["metrics"]) == {"acc", "acc_norm"}
        else:
            assert set(task["metrics"]) == {"acc", "acc_stderr", "acc_norm", "acc_norm_stderr"}
            assert task["metrics"]["acc_stderr"] > 0 and task["metrics"]["acc_norm_stderr"] >= 0


@needs_lm_eval
def test_cli_json_model_limit_and_table(recipe, models):
    args = ("eval", recipe, "--lm-eval-tasks", TASK, "--lm-eval-include", TASK_DIR, "-q")
    out = json.loads(cli(*args, "--json").output)
    metrics = out["tasks"][TASK]["metrics"]
    assert {k: metrics[k] for k in ("acc", "acc_norm")} == hand_metrics(models[0])
    # --model: another model directory is the one scored
    other = json.loads(cli(*args, "--model", models[2], "--json").output)
    assert other["model"] == str(models[2])
    assert {k: other["tasks"][TASK]["metrics"][k] for k in ("acc", "acc_norm")} == hand_metrics(models[2])
    assert other["tasks"][TASK]["metrics"]["acc"] != metrics["acc"]
    # --limit: the first N documents of each task
    limited = json.loads(cli(*args, "--limit", 3, "--json").output)
    assert limited["limit"] == 3 and limited["tasks"][TASK]["n"] == 3
    assert {k: limited["tasks"][TASK]["metrics"][k] for k in ("acc", "acc_norm")} == hand_metrics(models[0], 3)
    # the table (and, with -q, nothing else: no progress bars, no lm-eval log lines)
    assert cli(*args).output == (
        f"{models[0]} on lm-eval {out['lm_eval']} tasks:\n"
        f"  task              n  metric     value   stderr\n"
        f"  {TASK}  4  acc       {metrics['acc']:.4f}  ±{metrics['acc_stderr']:.4f}\n"
        f"  {TASK}  4  acc_norm  {metrics['acc_norm']:.4f}  ±{metrics['acc_norm_stderr']:.4f}\n")


@needs_lm_eval
def test_adapter_dir_over_the_recipe_base(recipe, models, tmp_path):
    """--model ADAPTER_DIR: the recipe's base with the PEFT adapter (a LoRA with random, non-zero weights)."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    base = AutoModelForCausalLM.from_pretrained(models[0], dtype=torch.float32)
    lora = LoraConfig(r=4, lora_alpha=32, target_modules=["q_proj", "v_proj", "o_proj"], init_lora_weights=False)
    get_peft_model(base, lora).save_pretrained(tmp_path / "adapter")  # seed 0: changes the scores
    out = json.loads(cli("eval", recipe, "--model", tmp_path / "adapter", "--lm-eval-tasks", TASK,
                         "--lm-eval-include", TASK_DIR, "-q", "--json").output)
    assert out["model"] == f"{tmp_path / 'adapter'} (adapter over {models[0]})"
    metrics = {k: out["tasks"][TASK]["metrics"][k] for k in ("acc", "acc_norm")}
    assert metrics == hand_metrics(models[0], adapter_dir=tmp_path / "adapter") != hand_metrics(models[0])


@needs_lm_eval
def test_user_errors_are_one_line(recipe, tmp_path, monkeypatch):
    """An unknown task, a missing --lm-eval-include directory, a task's data file not found: exit 1, one line."""
    import lm_eval.tasks

    class IncludedTasksOnly(lm_eval.tasks.TaskManager):  # indexing lm-eval's own ~14,000 task YAMLs takes seconds
        def __init__(self, *a, include_defaults=True, **k):
            super().__init__(*a, include_defaults=False, **k)

    monkeypatch.setattr(lm_eval.tasks, "TaskManager", IncludedTasksOnly)
    result = cli("eval", recipe, "--lm-eval-tasks", f"{TASK},no_such_task", "--lm-eval-include", TASK_DIR, ok=False)
    assert result.exit_code == 1
    assert result.output.startswith("error: unknown lm-eval task(s): no_such_task: neither lm-eval's own nor in ")
    result = cli("eval", recipe, "--lm-eval-tasks", TASK, "--lm-eval-include", tmp_path / "nope", ok=False)
    assert result.exit_code == 1
    assert result.output == f"error: --lm-eval-include {tmp_path / 'nope'}: not a directory (it should hold lm-eval " \
                            f"task YAML files)\n"
    monkeypatch.chdir(tmp_path)  # the task's data_files path is relative to the working directory
    result = cli("eval", recipe, "--lm-eval-tasks", TASK, "--lm-eval-include", TASK_DIR, "-q", ok=False)
    assert result.exit_code == 1
    assert result.output == (f"error: lm-eval: Unable to find '{tmp_path / 'tiny_choice.jsonl'}' (a relative "
                             f"data_files path in a task YAML is resolved against the current directory, {tmp_path}, "
                             f"not the YAML's)\n")


def test_clean_error_without_lm_eval(recipe, monkeypatch):
    """With lm_eval unimportable: one line naming the extra to install, exit code 1, no model loaded."""
    for name in [m for m in sys.modules if m == "lm_eval" or m.startswith("lm_eval.")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "lm_eval", None)  # `import lm_eval` raises ImportError

    from mezo_tune import evaluate

    def no_loading(*a, **k):
        raise AssertionError("the model must not be loaded when lm-eval is missing")

    monkeypatch.setattr(evaluate, "load_for_eval", no_loading)
    result = cli("eval", recipe, "--lm-eval-tasks", TASK, ok=False)
    assert result.exit_code == 1
    assert result.output.startswith("error: --lm-eval-tasks needs lm-evaluation-harness with its Hugging Face "
                                    "backend: pip install 'mezo-tune[lm-eval]' (import failed: ")
    assert len(result.output.splitlines()) == 1


def test_lm_eval_options_exclude_data(recipe):
    result = cli("eval", recipe, "--lm-eval-tasks", TASK, "--data", TASK_DIR / "tiny_choice.jsonl", ok=False)
    assert result.exit_code == 2 and "--data scores the recipe's task; it does not go with --lm-eval-tasks" in \
        result.output
    result = cli("eval", recipe, "--lm-eval-include", TASK_DIR, ok=False)
    assert result.exit_code == 2 and "--lm-eval-include needs --lm-eval-tasks" in result.output
