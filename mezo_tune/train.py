"""The training loop: recipe in, trajectory (and final weights) out; `--resume` continues a run bit for bit.

What a run is made of (model, task, data, engine, header) is assembled in run.py; this module is the loop, its
checkpoints and the resume checks.

Under torchrun (distributed.py) every process runs this same loop on the same run; each scores its shard of every
batch and eval set, and the losses and eval sums are added across processes, so every process applies the same
updates. Only rank 0 writes files (trajectory, metrics, recipe copy, checkpoints, final/) or prints.
"""

from __future__ import annotations

import json
import math
import shutil
import sys
import time
from pathlib import Path

from . import distributed
from .recipe import OutputConfig, Recipe
from .run import (TRAJECTORY, Metrics, Run, RunError, adapter_header, build_header, build_run, check_base,
                  check_same_data, fmt_eval, prepare_dir, restore_recorded_init)

FLUSH_EVERY = OutputConfig.model_fields["flush_every"].default  # steps per trajectory block unless the recipe says


def save_checkpoint(out: Path, run: Run, step: int) -> None:
    """The trainable tensors after `step`, replaced atomically (a crash leaves the previous checkpoint)."""
    from safetensors.torch import save_file

    tmp, final, old = out / "checkpoint.tmp", out / "checkpoint", out / "checkpoint.old"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    state, scalars = run.engine.rule_state()  # the update rule's own state (Adam's moments), if it keeps one
    tensors = {n: p.detach().to("cpu").contiguous() for n, p in
               [*zip(run.trainable.names, run.trainable.params), *state.items()]}
    save_file(tensors, tmp / "trainable.safetensors", metadata={"step": str(step)})
    (tmp / "meta.json").write_text(json.dumps({"step": step, "digest": run.engine.digest().hex(),
                                               **({"rule_state": scalars} if scalars else {})}))
    shutil.rmtree(old, ignore_errors=True)
    if final.exists():
        final.rename(old)
    tmp.rename(final)
    shutil.rmtree(old, ignore_errors=True)


def recover_checkpoint(out: Path) -> None:
    """After a crash between save_checkpoint's two renames, checkpoint.old is the checkpoint: put it back."""
    if not (out / "checkpoint").exists() and (out / "checkpoint.old").exists():
        (out / "checkpoint.old").rename(out / "checkpoint")


def load_checkpoint(out: Path, run: Run, last_step: int) -> int:
    """Load checkpoint/ if it is usable for resuming up to last_step; returns the step it holds, or -1."""
    import torch
    from safetensors.torch import load_file

    ckpt = out / "checkpoint"
    try:
        meta = json.loads((ckpt / "meta.json").read_text())
        if meta["step"] > last_step:
            return -1
        tensors = load_file(ckpt / "trainable.safetensors")
        run.engine.load_rule_state(tensors, meta.get("rule_state"))
    except (OSError, ValueError, KeyError):  # unreadable, or without the rule's state: replay from the base
        return -1
    with torch.no_grad():
        for n, p in zip(run.trainable.names, run.trainable.params):
            p.copy_(tensors[n])
    if run.engine.digest().hex() != meta["digest"]:
        raise RunError(f"{ckpt} is corrupt (its digest does not match); delete it and resume again "
                       "(the run is rebuilt from the base model and the trajectory)")
    return meta["step"]


class NoFiles:
    """What a rank other than 0 has instead of a trajectory writer and metrics file: every call does nothing."""

    def __getattr__(self, name):
        return lambda *args, **kwargs: None


def batch_loss(run: Run, rows: list[dict], world: distributed.World):
    """(loss_fn, reduce) for Mezo.step on a batch: its mean loss in one process; under torchrun, this rank's (loss
    sum, count) over its shard, and the all-reduce that turns both signs' into the global batch's means."""
    if not world.parallel:
        return (lambda: run.task.loss(run.model, rows)), None
    mine = distributed.shard(rows, world)
    return (lambda: run.task.loss_sums(run.model, mine)), distributed.global_losses


# ---- the loop ------------------------------------------------------------------------------------------------------

def train(recipe: Recipe, *, resume: bool = False, overwrite: bool = False, progress: bool = True,
          log=lambda msg: print(msg, file=sys.stderr), loaded: tuple | None = None) -> dict:
    """Train as the recipe says, in this process or, under torchrun, data parallel over all of its processes (only
    rank 0 writes and prints). Returns a summary (steps, losses, evals, paths)."""
    world = distributed.world_from_env()
    if recipe.optim.type == "adamw":  # the backprop baseline: no trajectory, a normal checkpoint
        if world.parallel:
            raise RunError("optim.type = \"adamw\" (the backprop baseline) runs in one process; start it without "
                           "torchrun")
        if recipe.model.device_map:
            raise RunError("optim.type = \"adamw\" (the backprop baseline) keeps gradients and moments beside every "
                           "weight, so it cannot train an offloaded model; remove [model] device_map, or train with "
                           "MeZO (optim.type = \"mezo\")")
        from .backprop import train_backprop

        return train_backprop(recipe, resume=resume, overwrite=overwrite, progress=progress, log=log)
    if recipe.distributed.shard_weights and not world.parallel:
        raise RunError("distributed.shard_weights = true splits the weights over the processes torchrun starts: run "
                       "`torchrun --nproc-per-node N -m mezo_tune train ...` with N > 1, or set shard_weights = false")
    if world.parallel and recipe.mezo.batch_size < world.size:
        raise RunError(f"mezo.batch_size = {recipe.mezo.batch_size} is smaller than the {world.size} processes "
                       f"torchrun started: every process scores a share of each batch, so use --nproc-per-node "
                       f"{recipe.mezo.batch_size} or fewer, or a larger batch")
    with distributed.process_group(recipe.model.device) as world:
        if not world.main:
            progress, log = False, lambda msg: None
        return train_mezo(recipe, world, resume=resume, overwrite=overwrite, progress=progress, log=log,
                          loaded=loaded)


def train_mezo(recipe: Recipe, world: distributed.World, *, resume: bool, overwrite: bool, progress: bool, log,
               loaded: tuple | None) -> dict:
    """Train with MeZO as the recipe says (see train).

    Step t (0-based) runs `mezo.directions` = K two-point estimates and writes K trajectory records, numbered
    t·K .. t·K + K - 1 (Mezo.step); keyframes, checkpoints and evals after step t name its last record, t·K + K - 1.
    With K = 1 (the default) records and steps are the same thing.

    loaded: see build_run; the caller restores the base weights afterwards (an adapter is attached to it in place)."""
    from dataclasses import asdict

    import torch
    from tqdm.auto import tqdm

    from . import models
    from .data import batch_indices
    from .mezo import learning_rate
    from .replay import apply_records
    from .trajectory import StepRecord, TrajectoryError, TrajectoryWriter, best_eval, read_for_resume, read_trajectory

    r = recipe
    out = Path(r.output.dir)
    sharded = r.distributed.shard_weights  # sharded.py: no checkpoints (resume replays), evals on every rank
    if world.main or resume:  # resume: only checks that there is a run
        prepare_dir(out, resume, overwrite)
    if resume and r.output.save_final and not (out / "final").exists():
        finished = read_trajectory(out / TRAJECTORY)
        if finished.end is not None:  # killed while writing final/: the trajectory has it all
            if not world.main:
                return {}
            return export_finished(r, finished, progress, log)
    if loaded is None and models.resolve_device(r.model.device) == "cpu" and not r.model.device_map:
        from .estimate import startup_memory_warning

        warning = startup_memory_warning(r)
        if warning:
            log(warning)
    run = build_run(r, progress, loaded)
    if next(run.model.parameters()).device.type == "cpu":
        models.keep_freed_memory()  # no page faults per step (models.py)
    header = build_header(run)
    header["recipe"] = distributed.mark_recipe(header["recipe"], world)
    traj_path = out / TRAJECTORY
    summary: dict = {"output_dir": str(out), "trajectory": str(traj_path)}
    K = r.mezo.directions
    select = header["select"]
    metric = select["metric"]

    def last_record(t: int) -> int:
        """The record that ends step t (-1 for t = -1: before any step)."""
        return (t + 1) * K - 1

    def eval_due(t: int) -> bool:
        return t == -1 or bool(r.output.eval_every and (t + 1) % r.output.eval_every == 0 and t + 1 < r.mezo.steps)

    evals: list[dict] = []
    recorded: list[dict] = []  # records of the first step that a resumed trajectory already holds
    if resume:
        if world.main:
            writer, data = TrajectoryWriter.open_for_resume(traj_path, flush_every=r.output.flush_every,
                                                                 flush_seconds=r.output.flush_seconds, log=log)
            recover_checkpoint(out)
        world.barrier()  # rank 0 has cut a damaged tail: the others now read the same intact records ...
        if not world.main:
            writer, data = NoFiles(), read_for_resume(traj_path)
        world.barrier()  # ... and the same journal, before rank 0 moves its steps into a block and empties it
        if restore_recorded_init(run, data.header.get("adapter")):
            header["adapter"] = adapter_header(run)  # the entry that holds the restored values
        check_resumable(data.header, header)
        use_recorded_digest(run.engine, data)
        check_same_data(data.header, run.train_rows, run.eval_rows, r.data)
        check_base(data.header, run.base_digests, r.model.path)
        start, partial = divmod(len(data.steps), K)
        whole = start * K  # records of whole steps: applied now; a partial step's are reused by Mezo.step
        from_ckpt = -1 if sharded else load_checkpoint(out, run, whole - 1)
        unit = "step" if K == 1 else "record"
        todo = [rec for rec in data.steps[:whole] if rec.step > from_ckpt]
        log(f"resuming {traj_path} after step {start - 1}"
            + (f" and {partial} of its {K} directions" if partial else "")
            + (f" (checkpoint at {unit} {from_ckpt}, replaying {len(todo)} {unit}s)" if from_ckpt >= 0
               else f" (replaying {len(todo)} {unit}s from the base model)")
            + (f"; {unit}s {len(data.steps) - data.from_journal}-{len(data.steps) - 1} recovered from the step "
               f"journal" if data.from_journal else "")
            + (f"; cut off a damaged tail: {data.problem}" if data.problem else "")
            + (f"; {data.journal_note}" if data.journal_note else ""))
        recorded_n = distributed.recorded_processes(data.header["recipe"])
        if recorded_n != world.size:
            log(f"note: this run was trained by {recorded_n} process{'es' if recorded_n > 1 else ''} and resumes on "
                f"{world.size}: the batches are the same (chosen by seed and step), but their losses are now summed "
                f"in another order, so the steps from here may differ in their last bits from an uninterrupted "
                f"{recorded_n}-process run. The trajectory stays exact: replay rebuilds this run bit for bit")
        run.engine.remember(data.steps[: from_ckpt + 1][-run.engine.rule.window:])  # the momentum window before them
        apply_records(run.engine, todo, data.keyframes, verify=True, progress=progress)
        recorded = [asdict(rec) for rec in data.steps[whole:]]
        evals = list(data.evals)
        # The crash may have fallen after a step's records but before its keyframe or eval: write them now, as the
        # uninterrupted run did (the weights are those after that step, exactly).
        if start and not partial and start % r.mezo.keyframe_every == 0 and whole - 1 not in data.keyframes:
            writer.append_keyframe(whole - 1, run.engine.digest())
        keyframes_done = set(data.keyframes)
    elif world.main:
        (out / "recipe.toml").write_text(header["recipe"])
        writer = TrajectoryWriter.create(traj_path, header, flush_every=r.output.flush_every,
                                         flush_seconds=r.output.flush_seconds, log=log)
        writer.append_keyframe(-1, bytes.fromhex(header["initial_digest"]))
        start = 0
        keyframes_done = {-1}
    else:
        writer, start, keyframes_done = NoFiles(), 0, {-1}
    metrics = Metrics(out / "metrics.jsonl") if world.main else NoFiles()
    summary["evals"] = evals

    def evaluate(t: int, label: str) -> None:
        """Score the weights after step t on the eval rows; recorded in the trajectory and metrics.jsonl."""
        if run.eval_rows is None:
            return
        run.engine.flush()  # the step's update, if it was left for the next step's perturbed forward
        rows, reduce = (run.eval_rows, None) if sharded else distributed.eval_share(run.eval_rows, world)
        result = run.task.evaluate(run.model, rows, batch_size=r.mezo.batch_size, progress=progress, reduce=reduce)
        step = last_record(t)
        writer.append_eval(step, result)
        evals.append({"step": step, **result})
        metrics.write(step=step, eval=result)
        log(f"eval {label}: {fmt_eval(result)}")

    if not recorded and eval_due(start - 1) and not any(e["step"] == last_record(start - 1) for e in evals):
        evaluate(start - 1, "before training" if start == 0 else f"at step {start}")
    n = len(run.train_rows)
    bar = tqdm(total=r.mezo.steps, initial=start, disable=not progress, desc="mezo", unit="step",
               dynamic_ncols=True)
    recent: list[float] = []
    skipped_in_a_row: list[dict] = []  # the latest records, all skipped
    last_keyframe = (-1, b"")  # (record, digest): the end reuses it when the last step had a keyframe
    stopped = r.mezo.steps
    # each step's update is fused into the next step's first perturbed forward where it can be (Mezo.apply_update);
    # evals, checkpoints and the end flush it first
    run.engine.defer_updates = True
    try:
        for t in range(start, r.mezo.steps):
            t0 = time.perf_counter()
            rows = [run.train_rows[i] for i in batch_indices(n, r.mezo.batch_size, r.mezo.seed, t)]
            eta = learning_rate(t, r.mezo.lr, r.mezo.steps, r.mezo.schedule, r.mezo.min_lr, r.mezo.warmup_steps)
            loss_fn, reduce = batch_loss(run, rows, world)
            try:
                new = run.engine.step(t, eta, loss_fn, K, recorded, reduce)
            except torch.cuda.OutOfMemoryError:
                from .estimate import cuda_oom_message

                raise RunError(cuda_oom_message(r, t, str(next(run.model.parameters()).device), traj_path)) from None
            recs, recorded = recorded + new, []
            for rec in new:
                writer.append_step(StepRecord(**rec))
            if (t + 1) % r.mezo.keyframe_every == 0:
                last_keyframe = (last_record(t), run.engine.digest())
                writer.append_keyframe(*last_keyframe)
            if world.main and not sharded and r.output.checkpoint_every and (t + 1) % r.output.checkpoint_every == 0:
                writer.flush()  # the checkpoint never runs ahead of the intact trajectory
                run.engine.flush()
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
        run.engine.flush()
        n_records = stopped * K
        final_digest = last_keyframe[1] if last_keyframe[0] == n_records - 1 else run.engine.digest()
        if n_records - 1 not in keyframes_done and last_keyframe[0] != n_records - 1:
            writer.append_keyframe(n_records - 1, final_digest)
        if not any(e["step"] == n_records - 1 for e in evals):
            evaluate(stopped - 1, "after training")
        writer.finish(n_records, final_digest)
    finally:
        bar.close()
        stopping = sys.exc_info()[1]
        try:
            writer.close()  # the pending steps: on a full disk this may fail too
        except TrajectoryError as exc:
            if stopping is None:
                raise
            log(f"error: {exc}")  # and the error that stopped the run follows
        metrics.close()
    summary.update(steps=stopped, records=n_records, digest=final_digest.hex())
    if stopped < r.mezo.steps:
        summary["stopped_early"] = stopped
    best = best_eval(evals, select)
    if best is not None:
        summary.update(best=best, select=select)
    state = None
    if r.output.save_final and sharded:
        from .sharded import full_state

        state = full_state(run.model)  # every rank sends its shards; rank 0 gets the whole tensors
    if r.output.save_final and world.main:
        model, tokenizer = run.model, run.tokenizer
        if r.output.keep == "best" and best is not None and best["step"] != n_records - 1:
            log(f"final/ holds the dev-best weights: after record {best['step']} ({metric} {best[metric]:.4f}); "
                f"rebuilding them from the trajectory")
            run = model = None  # free the trained weights before the rebuild loads the base again
            from .replay import rebuild

            model = rebuild(traj_path, steps=best["step"] + 1, verify=True, device=r.model.device,
                            progress=progress, log=log).model
            state = None
        save_final(model, tokenizer, out, state)
        summary["final"] = str(out / "final")
        summary["kept"] = r.output.keep
    if world.main:
        shutil.rmtree(out / "checkpoint", ignore_errors=True)
    return summary


def save_final(model, tokenizer, out: Path, state: dict | None = None) -> None:
    """out/final, written as final.tmp and renamed (an older final/, e.g. of a resumed run, moved aside first): a kill
    during the export leaves no final/ (never a torn one), and `--resume` then rebuilds it from the finished
    trajectory (export_finished). state: the weights to write instead of the model's own (a sharded model's, gathered
    by sharded.full_state)."""
    from . import models

    tmp, final, old = out / "final.tmp", out / "final", out / "final.old"
    shutil.rmtree(tmp, ignore_errors=True)
    models.save_model(model, tokenizer, tmp, state)
    shutil.rmtree(old, ignore_errors=True)
    if final.exists():
        final.rename(old)
    tmp.rename(final)
    shutil.rmtree(old, ignore_errors=True)


def export_finished(r: Recipe, data, progress: bool, log) -> dict:
    """`--resume` of a run whose trajectory is finished but whose final/ is missing (killed during the export):
    final/ rebuilt from the trajectory, the weights training ended with (or, with output.keep = "best", the dev-best
    ones), checked against the recorded digest before they are written."""
    from .replay import rebuild
    from .trajectory import best_eval, discard_journal

    out = Path(r.output.dir)
    discard_journal(data.path)  # killed between the end block and its removal: the end block has every step
    best = best_eval(data.evals, data.header.get("select")) if r.output.keep == "best" else None
    steps = best["step"] + 1 if best else data.end["steps"]
    log(f"the run finished ({data.end['steps']} records) but final/ was not written: rebuilding it from "
        f"{data.path} ({steps} records)")
    rebuilt = rebuild(data.path, steps=steps, device=r.model.device, progress=progress, log=log)
    save_final(rebuilt.model, rebuilt.tokenizer, out)
    shutil.rmtree(out / "checkpoint", ignore_errors=True)
    return {"output_dir": str(out), "trajectory": data.path, "steps": data.end["steps"] // r.mezo.directions,
            "records": data.end["steps"], "digest": data.end["digest"], "final": str(out / "final"),
            "kept": r.output.keep, "evals": data.evals}


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


def use_recorded_digest(engine, data) -> None:
    """A resumed trajectory goes on with the weights digest its keyframes use (blake2b-256 in a format 1 or 2
    file), and so do the checkpoints it is resumed from."""
    from .trajectory import TrajectoryError, keyframe_digest

    try:
        engine.use_digest(keyframe_digest(data))
    except (ValueError, TrajectoryError) as e:
        raise RunError(f"cannot resume {data.path}: {e}") from None


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
