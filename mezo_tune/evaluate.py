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
    cfg = recipe.model if not model_spec else recipe.model.model_copy(update={"path": model_spec, "revision": None})
    model, tokenizer, source = models.load(cfg, progress)
    return model, tokenizer, cfg.path


def evaluate(recipe: Recipe, model_spec: str | None = None, data_path: str | None = None, limit: int | None = None,
             progress: bool = True) -> dict:
    from .train import RunError, load_rows, make_task

    path = data_path or recipe.data.eval
    if not path:
        raise RunError("nothing to evaluate on: the recipe has no data.eval; pass --data FILE")
    model, tokenizer, described = load_for_eval(recipe, model_spec, progress)
    task = make_task(recipe, tokenizer)
    rows = load_rows(path, task, recipe.data.eval_limit if limit is None else limit)
    result = task.evaluate(model, rows, batch_size=recipe.mezo.batch_size, progress=progress)
    return {"model": described, "data": str(path), "task": recipe.task.type, **result}
