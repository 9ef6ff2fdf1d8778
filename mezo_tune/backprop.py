"""The backprop baseline (`[optim] type = "adamw"`): the same recipe — model, task, data, batches, steps — trained
with ordinary gradients and torch.optim.AdamW, for comparing MeZO against what backprop reaches.

It reuses [mezo] steps, batch_size, seed, schedule and min_lr (the batch of step t is the same as in a MeZO run);
[optim] lr and weight_decay replace mezo.lr. The model stays in eval mode (no dropout), so on CPU a run is
deterministic. There is no trajectory: the run directory gets `final/` (a Hugging Face directory, or a PEFT adapter
directory for an adapter run), `metrics.jsonl` and `recipe.toml`.
"""

from __future__ import annotations

import math
import sys
import time
from pathlib import Path

from .recipe import Recipe, recipe_to_toml


def train_backprop(recipe: Recipe, *, resume: bool = False, overwrite: bool = False, progress: bool = True,
                   log=lambda msg: print(msg, file=sys.stderr)) -> dict:
    """Train with backprop + AdamW as the recipe says. Returns a summary like train.train (no trajectory)."""
    import torch
    from tqdm.auto import tqdm

    from . import models
    from .data import batch_indices
    from .mezo import learning_rate, trainable_set
    from .run import Metrics, RunError, attach_adapter, fmt_eval, load_data, make_task, prepare_dir

    r = recipe
    if resume:
        raise RunError('--resume continues MeZO runs only; an optim.type = "adamw" run starts over (--overwrite)')
    out = Path(r.output.dir)
    prepare_dir(out, resume=False, overwrite=overwrite)
    if (out / "metrics.jsonl").exists() and overwrite:
        (out / "metrics.jsonl").unlink()
    torch.manual_seed(r.mezo.seed)
    model, tokenizer, _ = models.load(r.model, progress)
    if next(model.parameters()).device.type == "cpu":
        models.keep_freed_memory()  # as the MeZO loop (train.py)
    adapter = r.adapter.type != "none"
    if adapter:
        model = attach_adapter(model, r.adapter, r.mezo.seed, tokenizer)
    task = make_task(r, tokenizer)
    train_rows, eval_rows = load_data(r, task)
    trainable = trainable_set(model, r.model.freeze, adapter=adapter)
    model.requires_grad_(False)
    for p in trainable.params:
        p.requires_grad_(True)
    optimizer = torch.optim.AdamW(trainable.params, lr=r.optim.lr, weight_decay=r.optim.weight_decay)
    (out / "recipe.toml").write_text(recipe_to_toml(r))
    metrics = Metrics(out / "metrics.jsonl")
    summary: dict = {"output_dir": str(out), "optim": "adamw", "evals": []}

    def evaluate(step: int, label: str) -> None:
        if eval_rows is None:
            return
        task.grad = False
        result = task.evaluate(model, eval_rows, batch_size=r.mezo.batch_size, progress=progress)
        summary["evals"].append({"step": step, **result})
        metrics.write(step=step, eval=result)
        log(f"eval {label}: {fmt_eval(result)}")

    losses: list[float] = []
    try:
        evaluate(-1, "before training")
        bar = tqdm(total=r.mezo.steps, disable=not progress, desc="adamw", unit="step", dynamic_ncols=True)
        for t in range(r.mezo.steps):
            t0 = time.perf_counter()
            rows = [train_rows[i] for i in batch_indices(len(train_rows), r.mezo.batch_size, r.mezo.seed, t)]
            lr = learning_rate(t, r.optim.lr, r.mezo.steps, r.mezo.schedule, min(r.mezo.min_lr, r.optim.lr),
                               r.mezo.warmup_steps)
            for group in optimizer.param_groups:
                group["lr"] = lr
            task.grad = True
            loss = task.loss(model, rows)
            optimizer.zero_grad(set_to_none=True)
            if math.isfinite(loss.item()):
                loss.backward()
                optimizer.step()
            task.grad = False
            losses.append(loss.item())
            dt = time.perf_counter() - t0
            bar.set_postfix(loss=f"{loss.item():.4f}", refresh=False)
            bar.update(1)
            if (t + 1) % r.output.log_every == 0 or not math.isfinite(loss.item()):
                metrics.write(step=t, loss=loss.item(), lr=lr, skipped=not math.isfinite(loss.item()),
                              s_per_step=round(dt, 4))
            if r.output.eval_every and (t + 1) % r.output.eval_every == 0 and t + 1 < r.mezo.steps:
                evaluate(t, f"at step {t + 1}")
        bar.close()
        evaluate(r.mezo.steps - 1, "after training")
    finally:
        task.grad = False
        metrics.close()
    model.requires_grad_(False)
    if r.output.save_final:
        models.save_model(model, tokenizer, out / "final")
        summary["final"] = str(out / "final")
    summary.update(steps=r.mezo.steps, losses=losses)
    return summary
