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
    from .recipe import selection

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
        "estimator": {"name": "spsa", "directions": r.mezo.directions},
        "update_rule": {"name": "sgd"},
        "select": selection(r.task.type, r.output.select),
        "initial_digest": weights_digest(run.trainable.params).hex(),
        "recipe": recipe_to_toml(r),
        "data": data_header(run.train_rows, run.eval_rows),
    }


def rows_digest(rows: list[dict] | None) -> str | None:
    """blake2b-128 of rows (after loading and sampling) as JSON: what a run trained or evaluated on."""
    if rows is None:
        return None
    import hashlib

    text = json.dumps(rows, sort_keys=True, ensure_ascii=False, default=str)
    return hashlib.blake2b(text.encode(), digest_size=16).hexdigest()


def data_header(train_rows: list[dict], eval_rows: list[dict] | None) -> dict:
    return {"train_rows_digest": rows_digest(train_rows), "eval_rows_digest": rows_digest(eval_rows)}


def check_same_data(recorded: dict, train_rows: list[dict], eval_rows: list[dict] | None, data_cfg) -> None:
    """Refuse rows that differ from the ones a run recorded, naming the file. A trajectory written before data
    digests were recorded has none, and is not checked."""
    if "data" not in recorded:
        return
    now = data_header(train_rows, eval_rows)
    for key, what, path in (("train_rows_digest", "training", data_cfg.train),
                            ("eval_rows_digest", "eval", data_cfg.eval or data_cfg.train)):
        if recorded["data"].get(key) != now[key]:
            raise RunError(f"the {what} rows read from {path} are not the ones this run was recorded with (rows "
                           f"digest {now[key]}, recorded {recorded['data'].get(key)}): the data changed since the "
                           f"run started. Put back the data the run used, or start a new run in a new output.dir")


def check_recorded_data(header: dict, recipe: Recipe, tokenizer, log) -> None:
    """`replay --verify`: the data files the recorded recipe names, when they can be read here, against the digests
    in the header."""
    if "data" not in header:
        return
    paths = [p for p in (recipe.data.train, recipe.data.eval) if p]
    unreadable = [p for p in paths if not Path(p).is_file()]
    if unreadable:
        log(f"note: the run's data was not checked ({', '.join(unreadable)} cannot be read here)")
        return
    train_rows, eval_rows = load_data(recipe, make_task(recipe, tokenizer))
    check_same_data(header, train_rows, eval_rows, recipe.data)


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

    Step t (0-based) runs `mezo.directions` = K two-point estimates and writes K trajectory records, numbered
    t·K .. t·K + K - 1 (Mezo.step); keyframes, checkpoints and evals after step t name its last record, t·K + K - 1.
    With K = 1 (the default) records and steps are the same thing.

    loaded: see build_run; the caller restores the base weights afterwards (an adapter is attached to it in place)."""
    if recipe.optim.type == "adamw":  # the backprop baseline: no trajectory, a normal checkpoint
        from .backprop import train_backprop

        return train_backprop(recipe, resume=resume, overwrite=overwrite, progress=progress, log=log)
    from dataclasses import asdict

    from tqdm.auto import tqdm

    from . import models
    from .data import batch_indices
    from .mezo import learning_rate
    from .replay import apply_records
    from .trajectory import StepRecord, TrajectoryWriter, best_eval

    r = recipe
    out = Path(r.output.dir)
    prepare_dir(out, resume, overwrite)
    run = build_run(r, progress, loaded)
    header = build_header(run)
    traj_path = out / TRAJECTORY
    summary: dict = {"output_dir": str(out), "trajectory": str(traj_path)}
    K = r.mezo.directions
    select = header["select"]
    metric = select["metric"]

    def last_record(t: int) -> int:
        return (t + 1) * K - 1

    def eval_due(t: int) -> bool:
        return t == -1 or bool(r.output.eval_every and (t + 1) % r.output.eval_every == 0 and t + 1 < r.mezo.steps)

    metrics = Metrics(out / "metrics.jsonl") if resume else None
    evals: list[dict] = []
    recorded: list[dict] = []  # records of the first step that a resumed trajectory already holds
    if resume:
        writer, data = TrajectoryWriter.open_for_resume(traj_path, flush_every=FLUSH_EVERY)
        check_resumable(data.header, header)
        check_same_data(data.header, run.train_rows, run.eval_rows, r.data)
        check_base(data.header, run.base_digests, r.model.path)
        start, partial = divmod(len(data.steps), K)
        whole = start * K  # records of whole steps: applied now; a partial step's are reused by Mezo.step
        from_ckpt = load_checkpoint(out, run, whole - 1)
        unit = "step" if K == 1 else "record"
        todo = [rec for rec in data.steps[:whole] if rec.step > from_ckpt]
        log(f"resuming {traj_path} after step {start - 1}"
            + (f" and {partial} of its {K} directions" if partial else "")
            + (f" (checkpoint at {unit} {from_ckpt}, replaying {len(todo)} {unit}s)" if from_ckpt >= 0
               else f" (replaying {len(todo)} {unit}s from the base model)")
            + (f"; cut off a damaged tail: {data.problem}" if data.problem else ""))
        apply_records(run.engine, todo, data.keyframes, verify=True, progress=progress)
        recorded = [asdict(rec) for rec in data.steps[whole:]]
        evals = list(data.evals)
        # The crash may have fallen after a step's records but before its keyframe or eval: write them now, as the
        # uninterrupted run did (the weights are those after that step, exactly).
        if start and not partial and start % r.mezo.keyframe_every == 0 and whole - 1 not in data.keyframes:
            writer.append_keyframe(whole - 1, run.engine.digest())
        keyframes_done = set(data.keyframes)
    else:
        (out / "recipe.toml").write_text(recipe_to_toml(r))
        writer = TrajectoryWriter.create(traj_path, header, flush_every=FLUSH_EVERY)
        writer.append_keyframe(-1, bytes.fromhex(header["initial_digest"]))
        start = 0
        keyframes_done = {-1}
        metrics = Metrics(out / "metrics.jsonl")
    summary["evals"] = evals

    def evaluate(t: int, label: str) -> None:
        """Score the weights after step t on the eval rows; recorded in the trajectory and metrics.jsonl."""
        if run.eval_rows is None:
            return
        result = run.task.evaluate(run.model, run.eval_rows, batch_size=r.mezo.batch_size, progress=progress)
        step = -1 if t < 0 else last_record(t)
        writer.append_eval(step, result)
        evals.append({"step": step, **result})
        metrics.write(step=step, eval=result)
        log(f"eval {label}: {fmt_eval(result)}")

    if not recorded and eval_due(start - 1) and not any(e["step"] == (-1 if start == 0 else last_record(start - 1))
                                                       for e in evals):
        evaluate(start - 1, "before training" if start == 0 else f"at step {start}")
    n = len(run.train_rows)
    bar = tqdm(total=r.mezo.steps, initial=start, disable=not progress, desc="mezo", unit="step",
               dynamic_ncols=True)
    recent: list[float] = []
    skipped_in_a_row: list[dict] = []  # the latest records, all skipped
    last_keyframe = (-1, b"")  # (record, digest): the end reuses it when the last step had a keyframe
    stopped = r.mezo.steps
    try:
        for t in range(start, r.mezo.steps):
            t0 = time.perf_counter()
            rows = [run.train_rows[i] for i in batch_indices(n, r.mezo.batch_size, r.mezo.seed, t)]
            eta = learning_rate(t, r.mezo.lr, r.mezo.steps, r.mezo.schedule, r.mezo.min_lr, r.mezo.warmup_steps)
            new = run.engine.step(t, eta, lambda: run.task.loss(run.model, rows), K, recorded)
            recs, recorded = recorded + new, []
            for rec in new:
                writer.append_step(StepRecord(**rec))
            if (t + 1) % r.mezo.keyframe_every == 0:
                last_keyframe = (last_record(t), run.engine.digest())
                writer.append_keyframe(*last_keyframe)
            if r.output.checkpoint_every and (t + 1) % r.output.checkpoint_every == 0:
                writer.flush()  # the checkpoint never runs ahead of the intact trajectory
                save_checkpoint(out, run, last_record(t))
            dt = time.perf_counter() - t0
            losses = [(rec["loss_plus"] + rec["loss_minus"]) / 2 for rec in recs]
            loss = sum(losses) / len(losses)
            if math.isfinite(loss):
                recent = (recent + [loss])[-r.output.log_every:]
            bar.set_postfix(loss=f"{sum(recent) / max(len(recent), 1):.4f}", s_step=f"{dt:.2f}",
                            refresh=False)
            bar.update(1)
            skipped = [rec for rec in recs if rec["skipped"]]
            for rec in skipped:
                log(f"step {t}: {skip_reason(rec)}; " + ("step skipped" if K == 1 else f"record {rec['step']} skipped"))
            if (t + 1) % r.output.log_every == 0 or skipped:
                g = recs[0]["g"] if K == 1 else [rec["g"] for rec in recs]
                metrics.write(step=t, loss=loss, loss_plus=recs[0]["loss_plus"], loss_minus=recs[0]["loss_minus"],
                              g=g, lr=eta, skipped=bool(skipped), s_per_step=round(dt, 4))
            for rec in recs:
                skipped_in_a_row = skipped_in_a_row + [rec] if rec["skipped"] else []
            if r.mezo.max_consecutive_skips and len(skipped_in_a_row) >= r.mezo.max_consecutive_skips:
                raise RunError(skip_diagnosis(skipped_in_a_row, traj_path))  # `finally` flushes the trajectory
            if eval_due(t):
                evaluate(t, f"at step {t + 1}")
                if r.output.patience and _evals_since_best(evals, select) >= r.output.patience:
                    best = best_eval(evals, select)
                    log(f"early stop after step {t + 1}: dev {metric} has not improved for {r.output.patience} "
                        f"evals (best {best[metric]:.4f}, after record {best['step']})")
                    stopped = t + 1
                    break
        bar.close()
        n_records = stopped * K
        final_digest = last_keyframe[1] if last_keyframe[0] == n_records - 1 else run.engine.digest()
        if n_records - 1 not in keyframes_done and last_keyframe[0] != n_records - 1:
            writer.append_keyframe(n_records - 1, final_digest)
        if not any(e["step"] == n_records - 1 for e in evals):
            evaluate(stopped - 1, "after training")
        writer.finish(n_records, final_digest)
    finally:
        bar.close()
        writer.close()
        metrics.close()
    summary.update(steps=stopped, records=n_records, digest=final_digest.hex())
    if stopped < r.mezo.steps:
        summary["stopped_early"] = stopped
    best = best_eval(evals, select)
    if best is not None:
        summary.update(best=best, select=select)
    if r.output.save_final:
        model, tokenizer = run.model, run.tokenizer
        if r.output.keep == "best" and best is not None and best["step"] != n_records - 1:
            log(f"final/ holds the dev-best weights: after record {best['step']} ({metric} {best[metric]:.4f}); "
                f"rebuilding them from the trajectory")
            run = model = None  # free the trained weights before the rebuild loads the base again
            from .replay import rebuild

            model = rebuild(traj_path, steps=best["step"] + 1, verify=True, device=r.model.device,
                            progress=progress, log=log).model
        models.save_model(model, tokenizer, out / "final")
        summary["final"] = str(out / "final")
        summary["kept"] = r.output.keep
    shutil.rmtree(out / "checkpoint", ignore_errors=True)
    return summary


def _evals_since_best(evals: list[dict], select: dict) -> int:
    """How many evals came after the best one (early stopping's patience counter)."""
    from .trajectory import best_eval

    best = best_eval(evals, select)
    return len(evals) - 1 - evals.index(best)


def skip_reason(rec: dict) -> str:
    """Why a recorded step was skipped: a loss that is not finite, or an update scale c = fp32(η·g) that
    overflowed."""
    if math.isfinite(rec["loss_plus"]) and math.isfinite(rec["loss_minus"]):
        return f"update scale c = lr * g overflows float32 (lr={rec['eta']:.3g}, g={rec['g']:.3g})"
    return f"non-finite loss (L+={rec['loss_plus']}, L-={rec['loss_minus']})"


def skip_diagnosis(skipped: list[dict], traj_path: Path, shown: int = 5) -> str:
    """Why a run stopped after mezo.max_consecutive_skips skipped steps in a row, and what to do."""
    lines = [f"step {rec['step']}: {skip_reason(rec)}" for rec in skipped[-shown:]]
    if len(skipped) > shown:
        lines.insert(0, f"({len(skipped) - shown} earlier skipped steps not shown)")
    return (f"stopped after {len(skipped)} skipped steps in a row (steps {skipped[0]['step']}-{skipped[-1]['step']}; "
            f"mezo.max_consecutive_skips = {len(skipped)}):\n  " + "\n  ".join(lines) + "\n"
            f"The weights have probably overflowed, or the batches hold rows the model cannot score: try a smaller "
            f"mezo.lr or mezo.eps, check the training data, or set mezo.max_consecutive_skips = 0 to never stop. "
            f"{traj_path} is intact up to step {skipped[-1]['step']}: `mezo-tune inspect` shows it, and "
            f"`mezo-tune train --resume` continues it.")


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
    diff = [k for k in old_m if old_m[k] != new_m[k] and k not in ("compile", "max_consecutive_skips")]
    if diff:
        problems.append(f"[mezo] {', '.join(diff)} differ")
    for key in ("trainable", "z_generator", "adapter"):
        if recorded.get(key) != now.get(key):
            problems.append(f"{key} differs")
    if problems:
        raise RunError("cannot resume: this recipe is not the one the run was started with ("
                       + "; ".join(problems) + "). Resume with the recipe in the run directory (recipe.toml).")
