"""`mezo-tune eval --lm-eval-tasks`: score the model `mezo-tune eval` loads on lm-evaluation-harness tasks.

The model is loaded exactly as for the recipe's own task (`evaluate.load_for_eval`: the recipe's base, a model
directory, a PEFT adapter directory over the base, or base + trajectory replayed in memory), wrapped in lm-eval's
Hugging Face wrapper (`HFLM(pretrained=<the model>, tokenizer=...)`) and handed to `lm_eval.simple_evaluate`; nothing
is written to disk. Task names are lm-eval's own (e.g. `hellaswag`, which `datasets` may download) or those of task
YAML files in the directories given as `include` (`TaskManager(include_path=...)`).

lm-eval is an optional dependency (`pip install 'mezo-tune[lm-eval]'`), imported here only when asked for.
"""

from __future__ import annotations

import io
import logging
import sys
from collections.abc import Iterable
from contextlib import contextmanager, redirect_stderr
from pathlib import Path

from .recipe import Recipe

INSTALL_HINT = "pip install 'mezo-tune[lm-eval]'"


def import_lm_eval():
    """(lm_eval, HFLM, TaskManager), or a RunError saying how to install them."""
    from .run import RunError

    try:
        import lm_eval
        from lm_eval.models.huggingface import HFLM
        from lm_eval.tasks import TaskManager
    except ImportError as e:
        raise RunError(f"--lm-eval-tasks needs lm-evaluation-harness with its Hugging Face backend: {INSTALL_HINT} "
                       f"(import failed: {e})") from None
    return lm_eval, HFLM, TaskManager


def lm_eval_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("lm_eval")
    except PackageNotFoundError:
        return "unknown"


def split_names(spec: str | Iterable[str]) -> list[str]:
    """'a,b , c' (or several such strings) -> ['a', 'b', 'c'], in order, without repeats."""
    parts = [spec] if isinstance(spec, str) else list(spec)
    names: list[str] = []
    for part in parts:
        for name in part.split(","):
            if name.strip() and name.strip() not in names:
                names.append(name.strip())
    return names


def evaluate_lm_eval(recipe: Recipe, tasks: str | Iterable[str], model_spec: str | None = None,
                     include: Iterable[str | Path] = (), limit: int | None = None, num_fewshot: int | None = None,
                     batch_size: int | None = None, progress: bool = True) -> dict:
    """Score the model (as `mezo-tune eval --model` names it) on lm-eval `tasks`.

    `limit` N > 0 scores only the first N documents of each task; `num_fewshot` None keeps each task's own setting;
    `batch_size` defaults to the recipe's mezo.batch_size. Returns {"model", "lm_eval", "limit", "num_fewshot",
    "tasks": {name: {"n": documents scored, "metrics": {"acc": ..., "acc_stderr": ..., ...}}}}; a metric computed
    through an lm-eval filter other than "none" is named "metric,filter"."""
    from .evaluate import load_for_eval
    from .run import RunError

    lm_eval, HFLM, TaskManager = import_lm_eval()
    names = split_names(tasks)
    if not names:
        raise RunError("--lm-eval-tasks names no task")
    include_dirs = [Path(d).expanduser() for d in include]
    for d in include_dirs:
        if not d.is_dir():
            raise RunError(f"--lm-eval-include {d}: not a directory (it should hold lm-eval task YAML files)")
    include_path = [str(d.resolve()) for d in include_dirs]
    task_manager = None
    if include_path:  # indexing lm-eval's own ~14,000 task YAMLs takes seconds: skip it when the user's dirs suffice
        only_included = TaskManager(include_path=include_path, include_defaults=False)
        if _self_contained(names, only_included):
            task_manager = only_included
    task_manager = task_manager or TaskManager(include_path=include_path or None)
    names = resolve_names(names, task_manager, include_dirs)

    model, tokenizer, described = load_for_eval(recipe, model_spec, progress)
    with _quiet(not progress), _without_provenance():
        with _silenced("lm_eval.models.huggingface"):  # "pretrained is not a str": passing a model is what we mean
            lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size or recipe.mezo.batch_size)
        try:
            out = lm_eval.simple_evaluate(model=lm, tasks=names, num_fewshot=num_fewshot, limit=limit or None,
                                          task_manager=task_manager, log_samples=False)
        except FileNotFoundError as e:  # mostly a task's local data: say where relative paths start
            raise RunError(f"lm-eval: {e} (a relative data_files path in a task YAML is resolved against the current "
                           f"directory, {Path.cwd()}, not the YAML's)") from None
    return summarize(out, described, limit=limit or None, num_fewshot=num_fewshot)


@contextmanager
def _without_provenance():
    """simple_evaluate records the environment (torch's collect_env: `pip list`, nvidia-smi, ... in subprocesses, for
    seconds) and `git describe` of the current directory (printing "fatal: not a git repository" outside one) into a
    result we do not print: skip both while it runs."""
    import lm_eval.evaluator as evaluator

    saved = {name: getattr(evaluator, name) for name in ("add_env_info", "get_git_commit_hash")
             if hasattr(evaluator, name)}
    stubs = {"add_env_info": lambda storage: None, "get_git_commit_hash": lambda: None}
    for name in saved:
        setattr(evaluator, name, stubs[name])
    try:
        yield
    finally:
        for name, fn in saved.items():
            setattr(evaluator, name, fn)


@contextmanager
def _silenced(logger_name: str):
    logger = logging.getLogger(logger_name)
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)


@contextmanager
def _quiet(quiet: bool):
    """quiet: lm-eval's and datasets' progress bars and log lines (all on stderr) are held back, and shown only if
    the evaluation fails unexpectedly (not with a RunError, which says what is wrong in one line)."""
    from .run import RunError

    if not quiet:
        yield
        return
    held = io.StringIO()
    try:
        with redirect_stderr(held):
            yield
    except RunError:
        raise
    except BaseException:
        sys.stderr.write(held.getvalue())
        raise


def resolve_names(names: list[str], task_manager, include_dirs: list[Path]) -> list[str]:
    """Each name as lm-eval knows it (a task, group or tag), a glob pattern over those ("mmlu_*"), or a task YAML
    file; a RunError naming every one that is none of these."""
    from .run import RunError

    resolved: list[str] = []
    for name in names:
        resolved += [m for m in _matches(name, task_manager) if m not in resolved]
    if unknown := _unknown(names, task_manager):
        where = ", ".join(str(d) for d in include_dirs)
        raise RunError(f"unknown lm-eval task(s): {', '.join(unknown)}: neither lm-eval's own nor "
                       + (f"in {where}" if where else "in a --lm-eval-include DIR of task YAML files")
                       + " (`lm-eval ls tasks` lists lm-eval's own)")
    return resolved


def _matches(name: str, task_manager) -> list[str]:
    if name in task_manager.all_tasks or (name.endswith((".yaml", ".yml")) and Path(name).is_file()):
        return [name]
    return task_manager.match_tasks([name]) if any(c in name for c in "*?[") else []


def _self_contained(names: Iterable[str], task_manager, seen: set[str] | None = None) -> bool:
    """Whether every name is a task, tag or group in `task_manager`'s index, and so are the groups' members."""
    seen = set() if seen is None else seen
    index = getattr(task_manager, "task_index", None)  # lm-eval 0.4.13's index; elsewhere: no shortcut
    if index is None:
        return False
    for name in names:
        entry = index.get(name)
        if entry is None:
            return False
        if name in seen:
            continue
        seen.add(name)
        members = (entry.cfg or {}).get("task") if entry.kind.name == "GROUP" else None
        members = [members] if isinstance(members, str) else members or []
        if not _self_contained([m for m in members if isinstance(m, str)], task_manager, seen):
            return False
    return True


def _unknown(names: list[str], task_manager) -> list[str]:
    return [name for name in names if not _matches(name, task_manager)]


def summarize(out: dict, described: str, limit: int | None = None, num_fewshot: int | None = None) -> dict:
    """The part of simple_evaluate's result worth printing: per task (and group) its metrics and sample count."""
    n_samples = out.get("n-samples", {})
    tasks = {}
    for name, res in out["results"].items():
        metrics = {}
        for key, value in res.items():
            if key == "alias" or "," not in key:
                continue
            metric, _, filt = key.partition(",")
            if value in ("N/A", None):  # lm-eval's "no stderr for this metric"
                continue
            metrics[metric if filt == "none" else key] = value
        counts = n_samples.get(name, {})
        tasks[name] = {"n": counts.get("effective", counts.get("original")), "metrics": metrics}
    return {"model": described, "lm_eval": lm_eval_version(), "limit": limit, "num_fewshot": num_fewshot,
            "tasks": tasks}


def format_table(result: dict) -> str:
    """One line per (task, metric): name, documents, metric, value and its standard error where lm-eval gives one."""
    rows = [("task", "n", "metric", "value", "stderr")]
    for name, t in result["tasks"].items():
        for metric, value in t["metrics"].items():
            if metric.split(",")[0].endswith("_stderr"):
                continue
            stderr_key = metric.replace(",", "_stderr,", 1) if "," in metric else f"{metric}_stderr"
            stderr = t["metrics"].get(stderr_key)
            rows.append((name, "" if t["n"] is None else str(t["n"]), metric, _fmt(value),
                         "" if stderr is None else f"±{_fmt(stderr)}"))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = [f"{result['model']} on lm-eval {result['lm_eval']} tasks"
             + (f" (at most {result['limit']} documents per task)" if result["limit"] else "")
             + (f", {result['num_fewshot']}-shot" if result["num_fewshot"] is not None else "") + ":"]
    for r in rows:
        lines.append("  " + "  ".join(c.ljust(w) if i in (0, 2) else c.rjust(w)
                                      for i, (c, w) in enumerate(zip(r, widths))).rstrip())
    return "\n".join(lines)


def _fmt(value) -> str:
    return f"{value:.4f}" if isinstance(value, float) else str(value)
