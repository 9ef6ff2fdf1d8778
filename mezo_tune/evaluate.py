"""`mezo-tune eval`: score a model on a recipe's task — the base model, a model directory, or base + trajectory."""

from __future__ import annotations

from pathlib import Path

from .recipe import Recipe


def is_trajectory(spec: str) -> bool:
    from .trajectory import MAGIC

    path = Path(spec)
    if not path.is_file():
        return False
    with open(path, "rb") as f:
        return f.read(len(MAGIC)) == MAGIC


def load_for_eval(recipe: Recipe, model_spec: str | None, progress: bool = True):
    """(model, tokenizer, description) for --model: None (the recipe's model), a trajectory, a directory or an id."""
    from . import models
    from .replay import rebuild

    if model_spec and is_trajectory(model_spec):
        rebuilt = rebuild(model_spec, device=recipe.model.device, progress=progress)
        return rebuilt.model, rebuilt.tokenizer, f"{model_spec} ({rebuilt.steps} steps replayed)"
    from .adapters import is_adapter_dir, load_adapter_dir

    if model_spec and is_adapter_dir(model_spec):  # the recipe's base (quantized as it says) + the adapter
        model, tokenizer, source = models.load(recipe.model, progress)
        return load_adapter_dir(model, model_spec), tokenizer, f"{model_spec} (adapter over {recipe.model.path})"
    cfg = recipe.model if not model_spec else recipe.model.model_copy(update={"path": model_spec, "revision": None})
    model, tokenizer, source = models.load(cfg, progress)
    return model, tokenizer, cfg.path


def evaluate(recipe: Recipe, model_spec: str | None = None, data_path: str | None = None, limit: int | None = None,
             progress: bool = True, icl_shots: int = 0) -> dict:
    """Score a model on the recipe's task. `icl_shots` k > 0 puts k training rows (sampled by data.seed, the same
    for every eval row), each with its gold answer and joined by task.icl_separator, before every prompt.

    Under torchrun every process loads the model and scores its share of the rows; the metric sums are added
    across processes, so each returns the metrics of every row (distributed.py)."""
    from . import distributed

    with distributed.process_group(recipe.model.device) as world:
        return _evaluate(recipe, model_spec, data_path, limit, progress and world.main, icl_shots, world)


def _evaluate(recipe: Recipe, model_spec, data_path, limit, progress: bool, icl_shots: int, world) -> dict:
    from .data import sample_demonstrations
    from .distributed import eval_share
    from .run import RunError, load_data, load_rows, make_task

    path = data_path or recipe.data.eval or (f"{recipe.data.train} (dev_from_train = {recipe.data.dev_from_train})"
                                             if recipe.data.dev_from_train else None)
    if not path:
        raise RunError("nothing to evaluate on: the recipe has no data.eval; pass --data FILE")
    model, tokenizer, described = load_for_eval(recipe, model_spec, progress)
    task = make_task(recipe, tokenizer)
    limit = recipe.data.eval_limit if limit is None else limit
    train_rows = None
    if icl_shots or not (data_path or recipe.data.eval):
        train_rows, dev_rows = load_data(recipe, task)
    if data_path or recipe.data.eval:
        rows = load_rows(data_path or recipe.data.eval, task, limit, recipe.data.columns)
    else:
        rows = dev_rows[:limit] if limit else dev_rows
    if icl_shots:
        demos = [train_rows[i] for i in sample_demonstrations(len(train_rows), icl_shots, recipe.data.seed)]
        task.set_demonstrations(demos, recipe.task.icl_separator)
        check_icl_room(task, rows, icl_shots)
    mine, reduce = eval_share(rows, world)
    result = task.evaluate(model, mine, batch_size=recipe.mezo.batch_size, progress=progress, reduce=reduce)
    return {"model": described, "data": str(path), "task": recipe.task.type, "icl_shots": icl_shots, **result}


def check_icl_room(task, rows, shots: int) -> None:
    """Refuse an ICL evaluation whose prompts data.max_length would cut (from the left: demonstrations lost)."""
    from .run import RunError

    longest = max(len(task.tokenizer(task.format(r), add_special_tokens=True).input_ids) for r in rows)
    if longest >= task.max_length:
        raise RunError(f"--icl-shots {shots}: with the demonstrations the longest prompt is {longest} tokens, "
                       f"over data.max_length = {task.max_length}, which would cut demonstrations off; "
                       f"raise it, e.g. --set data.max_length={longest + 64}")
