"""The training loop: recipe in, trajectory (and final weights) out; `--resume` continues a run bit for bit.

A run directory holds:
    trajectory.mezo   the run itself (header + one record per step; trajectory.py)
    recipe.toml       the resolved recipe, for people (the trajectory header holds the same text)
    metrics.jsonl     one JSON object per logged step / eval
    checkpoint/       the trainable tensors at a recent step (fast resume; optional)
    final/            the trained model as a Hugging Face directory, or the PEFT adapter directory of an adapter
                      run (optional)
"""

from __future__ import annotations

import json
import math
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from . import __version__
from .recipe import Recipe, recipe_to_toml

TRAJECTORY = "trajectory.mezo"
FLUSH_EVERY = 16


class RunError(Exception):
    """A run that cannot start or go on, said for people."""


@dataclass
class Run:
    """Everything a recipe builds before the first step: model, tokenizer, task, data, engine."""

    recipe: Recipe
    model: object
    tokenizer: object
    source: object
    task: object
    train_rows: list
    eval_rows: list | None
    trainable: object
    engine: object
    base_digests: dict  # name -> digest of every base tensor, taken before any adapter is attached


def use_compile(setting: str, device: str) -> bool:
    """`auto` compiles the kernels wherever torch.compile has a backend: CUDA, or CPU with a C++ compiler."""
    if setting in ("on", "off"):
        return setting == "on"
    if device.startswith("cuda"):
        return True
    return any(shutil.which(cc) for cc in ("g++", "c++", "clang++"))


def load_rows(path, task, limit: int = 0, columns: dict | None = None) -> list[dict]:
    """Rows of a JSONL/CSV file or "hf:..." dataset, columns mapped, checked by the task (errors name file:line)."""
    from .data import read_rows

    rows, where = read_rows(path, columns, task.required_fields)
    task.check_rows(rows, str(path), where)
    return rows[:limit] if limit else rows


def load_data(recipe: Recipe, task) -> tuple[list[dict], list[dict] | None]:
    """(train rows, eval rows or None) as [data] says: a dev set taken out of train by seed (dev_from_train), then
    k rows per class sampled by seed (train_k; k rows in all for tasks without classes)."""
    from .data import sample_per_class, split_dev

    d = recipe.data
    train_rows = load_rows(d.train, task, columns=d.columns)
    eval_rows = load_rows(d.eval, task, d.eval_limit, d.columns) if d.eval else None
    if d.dev_from_train:
        keep, dev = split_dev(len(train_rows), d.dev_from_train, d.seed)
        eval_rows = [train_rows[i] for i in dev]
        eval_rows = eval_rows[: d.eval_limit] if d.eval_limit else eval_rows
        train_rows = [train_rows[i] for i in keep]
    if d.train_k:
        label_of = getattr(task, "label_of", None)
        labels = [label_of(r) if label_of else None for r in train_rows]
        train_rows = [train_rows[i] for i in sample_per_class(labels, d.train_k, d.seed, str(d.train))]
    return train_rows, eval_rows


def make_task(recipe: Recipe, tokenizer):
    """The recipe's task over this tokenizer; a verbalizer the tokenizer cannot tell apart is a RunError."""
    from .tasks import build_task

    try:
        return build_task(recipe.task, tokenizer, recipe.data.max_length)
    except ValueError as e:
        raise RunError(f"[task] {e}") from None


def build_run(recipe: Recipe, progress: bool = True, loaded: tuple | None = None) -> Run:
    """loaded: (model, tokenizer, source) of recipe.model already in memory (sweep), used instead of loading it."""
    from . import models
    from .mezo import Mezo, trainable_set

    model, tokenizer, source = loaded or models.load(recipe.model, progress)
    base_digests = models.state_digests(model)
    if recipe.adapter.type != "none":
        model = attach_adapter(model, recipe.adapter, recipe.mezo.seed)
    task = make_task(recipe, tokenizer)
    train_rows, eval_rows = load_data(recipe, task)
    trainable = trainable_set(model, recipe.model.freeze, adapter=recipe.adapter.type != "none")
    device = str(next(model.parameters()).device)
    engine = Mezo(model, trainable, seed=recipe.mezo.seed, eps=recipe.mezo.eps,
                  distribution=recipe.mezo.distribution, rounding=recipe.mezo.rounding,
                  use_compile=use_compile(recipe.mezo.compile, device))
    return Run(recipe, model, tokenizer, source, task, train_rows, eval_rows, trainable, engine, base_digests)


def attach_adapter(model, adapter_cfg, seed: int):
    """The peft model for a recipe's [adapter], its initial values rebuilt from zrng (adapters.py)."""
    from .adapters import AdapterError, attach

    try:
        return attach(model, adapter_cfg, seed)
    except AdapterError as e:
        raise RunError(str(e)) from None


def build_header(run: Run) -> dict:
    from . import zrng
    from .mezo import weights_digest

    r = run.recipe
    return {
        "tool": {"name": "mezo-tune", "version": __version__},
        "base_model": {
            **run.source.identity(),
            "digest": combined_digest(run.base_digests),
            "tensors": run.base_digests,
        },
        "dtype": r.model.dtype,
        "quantization": None if r.model.quantization == "none" else r.model.quantization,
        "trainable": run.trainable.header(),
        "freeze": list(r.model.freeze),
        "adapter": adapter_header(run),
        "z_generator": {"name": zrng.GENERATOR, "version": zrng.GENERATOR_VERSION,
                        "distribution": r.mezo.distribution},
        "eps": r.mezo.eps,
        "rounding": r.mezo.rounding,
        "seed": r.mezo.seed,
        "keyframe_every": r.mezo.keyframe_every,
        "initial_digest": weights_digest(run.trainable.params).hex(),
        "recipe": recipe_to_toml(r),
    }


def adapter_header(run: Run) -> dict | None:
    if run.recipe.adapter.type == "none":
        return None
    from .adapters import header

    return header(run.model, run.recipe.adapter.type, run.recipe.mezo.seed)


def combined_digest(digests: dict[str, str]) -> str:
    import hashlib

    return hashlib.blake2b(json.dumps(digests, sort_keys=True).encode(), digest_size=16).hexdigest()


def check_base(header: dict, base_digests: dict[str, str], what: str) -> None:
    """Refuse a base model whose weights differ from the ones the run started from, naming what differs."""
    recorded = header["base_model"]["tensors"]
    if recorded == base_digests:
        return
    missing = [n for n in recorded if n not in base_digests]
    extra = [n for n in base_digests if n not in recorded]
    changed = [n for n in recorded if n in base_digests and recorded[n] != base_digests[n]]
    parts = []
    for label, names in (("differ", changed), ("are missing", missing), ("are unexpected", extra)):
        if names:
            shown = ", ".join(names[:5]) + (f" and {len(names) - 5} more" if len(names) > 5 else "")
            parts.append(f"{len(names)} tensor{'s' if len(names) != 1 else ''} {label} ({shown})")
    raise RunError(f"the base model {what} is not the one this run started from: {'; '.join(parts)}. "
                   f"The trajectory was recorded on {header['base_model']['path']} "
                   f"(revision {header['base_model'].get('revision')}, dtype {header['dtype']}, "
                   f"digest {header['base_model']['digest']}).")


# ---- run directory -------------------------------------------------------------------------------------------------

def prepare_dir(out: Path, resume: bool, overwrite: bool) -> None:
    traj = out / TRAJECTORY
    if resume:
        if not traj.exists():
            raise RunError(f"nothing to resume: {traj} does not exist (start the run without --resume)")
        return
    if traj.exists() or (out / "final").exists():
        if not overwrite:
            raise RunError(f"output dir {out} holds another run ({TRAJECTORY}); use --resume to continue it, "
                           f"--overwrite to replace it, or set output.dir to a new directory")
        for name in (TRAJECTORY, "metrics.jsonl", "recipe.toml"):
            (out / name).unlink(missing_ok=True)
        for name in ("final", "checkpoint", "checkpoint.tmp", "checkpoint.old"):
            shutil.rmtree(out / name, ignore_errors=True)
    out.mkdir(parents=True, exist_ok=True)


def save_checkpoint(out: Path, run: Run, step: int) -> None:
    """The trainable tensors after `step`, replaced atomically (a crash leaves the previous checkpoint)."""
    from safetensors.torch import save_file

    tmp, final, old = out / "checkpoint.tmp", out / "checkpoint", out / "checkpoint.old"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    tensors = {n: p.detach().to("cpu").contiguous() for n, p in zip(run.trainable.names, run.trainable.params)}
    save_file(tensors, tmp / "trainable.safetensors", metadata={"step": str(step)})
    (tmp / "meta.json").write_text(json.dumps({"step": step, "digest": run.engine.digest().hex()}))
    shutil.rmtree(old, ignore_errors=True)
    if final.exists():
        final.rename(old)
    tmp.rename(final)
    shutil.rmtree(old, ignore_errors=True)


def load_checkpoint(out: Path, run: Run, last_step: int) -> int:
    """Load checkpoint/ if it is usable for resuming up to last_step; returns the step it holds, or -1."""
    import torch
    from safetensors.torch import load_file

    ckpt = out / "checkpoint"
    if not ckpt.exists() and (out / "checkpoint.old").exists():  # a crash between the two renames
        (out / "checkpoint.old").rename(ckpt)
    try:
        meta = json.loads((ckpt / "meta.json").read_text())
        if meta["step"] > last_step:
            return -1
        tensors = load_file(ckpt / "trainable.safetensors")
    except (OSError, ValueError, KeyError):
        return -1
    with torch.no_grad():
        for n, p in zip(run.trainable.names, run.trainable.params):
            p.copy_(tensors[n])
    if run.engine.digest().hex() != meta["digest"]:
        raise RunError(f"{ckpt} is corrupt (its digest does not match); delete it and resume again "
                       "(the run is rebuilt from the base model and the trajectory)")
    return meta["step"]


class Metrics:
    """metrics.jsonl: appended line by line and flushed, so a crash loses at most the current line."""

    def __init__(self, path: Path):
        self.file = open(path, "a", buffering=1)

    def write(self, **row) -> None:
        self.file.write(json.dumps(row, allow_nan=True) + "\n")

    def close(self) -> None:
        self.file.close()


def fmt_eval(result: dict) -> str:
    if "accuracy" in result:
        return f"accuracy {result['accuracy']:.2%} ({result['correct']}/{result['n']}), loss {result['loss']:.4f}"
    if "exact_match" in result:
        return f"exact match {result['exact_match']:.2%}, F1 {result['f1']:.2%}, loss {result['loss']:.4f}"
    return f"loss {result['loss']:.4f}, perplexity {result['perplexity']:.2f}"


# ---- the loop ------------------------------------------------------------------------------------------------------

def train(recipe: Recipe, *, resume: bool = False, overwrite: bool = False, progress: bool = True,
          log=lambda msg: print(msg, file=sys.stderr), loaded: tuple | None = None) -> dict:
    """Train with MeZO as the recipe says. Returns a summary (steps, losses, evals, paths).

    loaded: see build_run; the caller restores the base weights afterwards (an adapter is attached to it in place)."""
    if recipe.optim.type == "adamw":  # the backprop baseline: no trajectory, a normal checkpoint
        from .backprop import train_backprop

        return train_backprop(recipe, resume=resume, overwrite=overwrite, progress=progress, log=log)
    from tqdm.auto import tqdm

    from . import models
    from .data import batch_indices
    from .mezo import learning_rate
    from .replay import apply_records
    from .trajectory import StepRecord, TrajectoryWriter

    r = recipe
    out = Path(r.output.dir)
    prepare_dir(out, resume, overwrite)
    run = build_run(r, progress, loaded)
    header = build_header(run)
    traj_path = out / TRAJECTORY
    summary: dict = {"output_dir": str(out), "trajectory": str(traj_path)}

    if resume:
        writer, data = TrajectoryWriter.open_for_resume(traj_path, flush_every=FLUSH_EVERY)
        check_resumable(data.header, header)
        check_base(data.header, run.base_digests, r.model.path)
        done = len(data.steps)
        from_ckpt = load_checkpoint(out, run, done - 1)
        todo = [rec for rec in data.steps if rec.step > from_ckpt]
        log(f"resuming {traj_path} after step {done - 1}"
            + (f" (checkpoint at step {from_ckpt}, replaying {len(todo)} steps)" if from_ckpt >= 0
               else f" (replaying {len(todo)} steps from the base model)")
            + (f"; cut off a damaged tail: {data.problem}" if data.problem else ""))
        apply_records(run.engine, todo, data.keyframes, verify=True, progress=progress)
        if done and done % r.mezo.keyframe_every == 0 and (done - 1) not in data.keyframes:
            writer.append_keyframe(done - 1, run.engine.digest())  # the crash fell between a block and its keyframe
        start = done
        keyframes_done = set(data.keyframes)
    else:
        (out / "recipe.toml").write_text(recipe_to_toml(r))
        writer = TrajectoryWriter.create(traj_path, header, flush_every=FLUSH_EVERY)
        writer.append_keyframe(-1, bytes.fromhex(header["initial_digest"]))
        start = 0
        keyframes_done = {-1}

    metrics = Metrics(out / "metrics.jsonl")
    evals = summary["evals"] = []

    def evaluate(step: int, label: str) -> None:
        if run.eval_rows is None:
            return
        result = run.task.evaluate(run.model, run.eval_rows, batch_size=r.mezo.batch_size, progress=progress)
        evals.append({"step": step, **result})
        metrics.write(step=step, eval=result)
        log(f"eval {label}: {fmt_eval(result)}")

    if start == 0:
        evaluate(-1, "before training")
    n = len(run.train_rows)
    bar = tqdm(total=r.mezo.steps, initial=start, disable=not progress, desc="mezo", unit="step",
               dynamic_ncols=True)
    recent: list[float] = []
    last_keyframe = (-1, b"")  # (step, digest): the end reuses it when the last step had a keyframe
    try:
        for t in range(start, r.mezo.steps):
            t0 = time.perf_counter()
            rows = [run.train_rows[i] for i in batch_indices(n, r.mezo.batch_size, r.mezo.seed, t)]
            eta = learning_rate(t, r.mezo.lr, r.mezo.steps, r.mezo.schedule, r.mezo.min_lr)
            rec = run.engine.step(t, eta, lambda: run.task.loss(run.model, rows))
            writer.append_step(StepRecord(**rec))
            if (t + 1) % r.mezo.keyframe_every == 0:
                last_keyframe = (t, run.engine.digest())
                writer.append_keyframe(*last_keyframe)
            if r.output.checkpoint_every and (t + 1) % r.output.checkpoint_every == 0:
                writer.flush()  # the checkpoint never runs ahead of the intact trajectory
                save_checkpoint(out, run, t)
            dt = time.perf_counter() - t0
            loss = (rec["loss_plus"] + rec["loss_minus"]) / 2
            if math.isfinite(loss):
                recent = (recent + [loss])[-r.output.log_every:]
            bar.set_postfix(loss=f"{sum(recent) / max(len(recent), 1):.4f}", s_step=f"{dt:.2f}",
                            refresh=False)
            bar.update(1)
            if rec["skipped"]:
                log(f"step {t}: non-finite loss (L+={rec['loss_plus']}, L-={rec['loss_minus']}); step skipped")
            if (t + 1) % r.output.log_every == 0 or rec["skipped"]:
                metrics.write(step=t, loss=loss, loss_plus=rec["loss_plus"], loss_minus=rec["loss_minus"],
                              g=rec["g"], lr=eta, skipped=rec["skipped"], s_per_step=round(dt, 4))
            if r.output.eval_every and (t + 1) % r.output.eval_every == 0 and t + 1 < r.mezo.steps:
                evaluate(t, f"at step {t + 1}")
        bar.close()
        final_digest = last_keyframe[1] if last_keyframe[0] == r.mezo.steps - 1 else run.engine.digest()
        if r.mezo.steps - 1 not in keyframes_done and r.mezo.steps % r.mezo.keyframe_every != 0:
            writer.append_keyframe(r.mezo.steps - 1, final_digest)
        writer.finish(r.mezo.steps, final_digest)
        evaluate(r.mezo.steps - 1, "after training")
    finally:
        bar.close()
        writer.close()
        metrics.close()
    if r.output.save_final:
        models.save_model(run.model, run.tokenizer, out / "final")
        summary["final"] = str(out / "final")
    shutil.rmtree(out / "checkpoint", ignore_errors=True)
    summary.update(steps=r.mezo.steps, digest=final_digest.hex())
    return summary


def check_resumable(recorded: dict, now: dict) -> None:
    """A resumed run must be the same run: same training recipe (steps may grow), trainable set and generator."""
    from .recipe import parse_recipe

    old = parse_recipe(recorded["recipe"], "the recorded recipe", check_files=False)
    new = parse_recipe(now["recipe"], "the recipe", check_files=False)
    problems = []
    if old.model != new.model:
        problems.append("[model] differs")
    if old.adapter != new.adapter:
        problems.append("[adapter] differs")
    if old.task != new.task:
        problems.append("[task] differs")
    data_keys = ("train", "max_length", "columns", "train_k", "dev_from_train", "seed")
    if any(getattr(old.data, k) != getattr(new.data, k) for k in data_keys):
        problems.append("[data] train/max_length differ")
    old_m, new_m = old.mezo.model_dump(), new.mezo.model_dump()
    if old.mezo.schedule == "constant":
        old_m.pop("steps"), new_m.pop("steps")
    diff = [k for k in old_m if old_m[k] != new_m[k] and k != "compile"]
    if diff:
        problems.append(f"[mezo] {', '.join(diff)} differ")
    for key in ("trainable", "z_generator", "adapter"):
        if recorded.get(key) != now.get(key):
            problems.append(f"{key} differs")
    if problems:
        raise RunError("cannot resume: this recipe is not the one the run was started with ("
                       + "; ".join(problems) + "). Resume with the recipe in the run directory (recipe.toml).")
