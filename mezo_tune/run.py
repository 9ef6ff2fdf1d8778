"""Assembling a run: the recipe's model, adapter, task, data and engine (`build_run`), the trajectory header that
names them (`build_header`), the checks that a base model or data set is the one a run started from, and the run
directory (`prepare_dir`, `Metrics`). Shared by train, backprop, replay, eval, sweep and the dry run; the loop itself
is in train.py.

A run directory holds:
    trajectory.mezo   the run itself (header + one record per step; trajectory.py)
    recipe.toml       the resolved recipe, for people (the trajectory header holds the same text)
    metrics.jsonl     one JSON object per logged step / eval
    checkpoint/       the trainable tensors at a recent step (fast resume; optional)
    final/            the trained model as a Hugging Face directory, or the PEFT adapter directory of an adapter
                      run (optional)
"""

from __future__ import annotations

import errno
import json
import shutil
from dataclasses import dataclass
from pathlib import Path

from . import __version__
from .errors import RunError
from .recipe import Recipe, recipe_to_toml

TRAJECTORY = "trajectory.mezo"


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
    from .directions import Directions
    from .mezo import Mezo, trainable_set

    shard = recipe.distributed.shard_weights
    # sharded: loaded on the host, then each layer's shard moved to this process's device (sharded.shard_model)
    model_cfg = recipe.model.model_copy(update={"device": "cpu"}) if shard else recipe.model
    model, tokenizer, source = loaded or models.load(model_cfg, progress)
    base_digests = models.state_digests(model)
    if shard:
        from .sharded import ShardedMezo, shard_model

        shard_model(model, models.resolve_device(recipe.model.device))
    if recipe.adapter.type != "none":
        model = attach_adapter(model, recipe.adapter, recipe.mezo.seed, tokenizer)
    task = make_task(recipe, tokenizer)
    train_rows, eval_rows = load_data(recipe, task)
    trainable = trainable_set(model, recipe.model.freeze, adapter=recipe.adapter.type != "none")
    try:
        directions = Directions.from_recipe(recipe.mezo).resolved(len(trainable.names))
    except ValueError as e:
        raise RunError(f"[mezo] {e}: lower it, or give a layer_fraction instead") from None
    device = str(next(model.parameters()).device)
    engine_class = ShardedMezo if shard else Mezo
    engine = engine_class(model, trainable, seed=recipe.mezo.seed, eps=recipe.mezo.eps,
                          distribution=recipe.mezo.distribution, rounding=recipe.mezo.rounding,
                          use_compile=use_compile(recipe.mezo.compile, device),
                          rule=update_rule(recipe.mezo), estimator=recipe.mezo.estimator, directions=directions)
    return Run(recipe, model, tokenizer, source, task, train_rows, eval_rows, trainable, engine, base_digests)


def update_rule(mezo_cfg):
    """The update rule [mezo] chooses: adam, momentum (momentum > 0) or sgd."""
    from .mezo import AdamRule, UpdateRule

    if mezo_cfg.adam:
        return AdamRule(mezo_cfg.adam_beta1, mezo_cfg.adam_beta2, mezo_cfg.adam_eps)
    return UpdateRule(mezo_cfg.momentum, mezo_cfg.momentum_window if mezo_cfg.momentum else 1)


def estimator_header(mezo_cfg) -> dict:
    """How g comes from forwards, as the header names it (replay needs none of it: the records hold every g)."""
    if mezo_cfg.estimator == "fzoo":
        return {"name": "fzoo", "version": 1, "directions": mezo_cfg.directions,
                "g": "(l_i - l_0) / sample std of the N losses l_i, fp64, rounded to fp32", "eta": "lr / N"}
    return {"name": "spsa", "directions": mezo_cfg.directions}


def attach_adapter(model, adapter_cfg, seed: int, tokenizer):
    """The peft model for a recipe's [adapter], its initial values rebuilt from zrng, or for init = "activations"
    computed by the base model from real tokens (adapters.py)."""
    from .adapters import AdapterError, attach, init_prefix_from_activations, prefix_init_tokens

    try:
        peft_model = attach(model, adapter_cfg, seed)
        if adapter_cfg.init == "activations":
            tokens = prefix_init_tokens(tokenizer, adapter_cfg.init_text, seed, adapter_cfg.num_virtual_tokens)
            init_prefix_from_activations(peft_model, tokens)
        return peft_model
    except AdapterError as e:
        raise RunError(str(e)) from None


def restore_recorded_init(run: Run, recorded_adapter: dict | None) -> bool:
    """A resumed run whose adapter's initial values are stored in the trajectory (init "activations-v1") starts from
    those, not from a forward computed again (its last bits may differ on another CPU). True when it did."""
    from .adapters import INIT_ACTIVATIONS, AdapterError, restore_initial_values

    if not recorded_adapter or recorded_adapter.get("init") != INIT_ACTIVATIONS:
        return False
    try:
        restore_initial_values(run.model, recorded_adapter)
    except AdapterError as e:
        raise RunError(f"cannot resume: {e}") from None
    return True


def build_header(run: Run) -> dict:
    from . import zrng
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
        "z_generator": {"name": zrng.GENERATOR, "version": zrng.version_for(r.mezo.distribution),
                        "distribution": r.mezo.distribution},
        "eps": r.mezo.eps,
        "rounding": r.mezo.rounding,
        "seed": r.mezo.seed,
        "keyframe_every": r.mezo.keyframe_every,
        "estimator": estimator_header(r.mezo),
        "update_rule": run.engine.rule.header(),
        "direction": run.engine.directions.header(),
        "select": selection(r.task.type, r.output.select),
        "weights_digest": run.engine.digest_scheme,
        "initial_digest": run.engine.digest().hex(),
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

    return header(run.model, run.recipe.adapter.type, run.recipe.mezo.seed, run.recipe.adapter.init)


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
        from .trajectory import JOURNAL_SUFFIX

        for name in (TRAJECTORY, TRAJECTORY + JOURNAL_SUFFIX, "metrics.jsonl", "recipe.toml"):
            (out / name).unlink(missing_ok=True)
        for name in ("final", "checkpoint", "checkpoint.tmp", "checkpoint.old"):
            shutil.rmtree(out / name, ignore_errors=True)
    out.mkdir(parents=True, exist_ok=True)


class Metrics:
    """metrics.jsonl: appended line by line and flushed, so a crash loses at most the current line."""

    def __init__(self, path: Path):
        self.path = path
        self.file = open(path, "a", buffering=1)

    def write(self, **row) -> None:
        try:
            self.file.write(json.dumps(row, allow_nan=True) + "\n")
        except OSError as exc:
            what = "the disk is full" if exc.errno == errno.ENOSPC else f"the write failed ({exc.strerror or exc})"
            raise RunError(f"{self.path}: could not append to the metrics: {what}. The trajectory next to it keeps "
                           f"every step written so far; free space, then run `mezo-tune train --resume` to continue "
                           f"(the metrics may lose a line).") from None

    def close(self) -> None:
        try:
            self.file.close()
        except OSError:  # the line write() already reported as lost
            pass


def fmt_eval(result: dict) -> str:
    if "accuracy" in result:
        return f"accuracy {result['accuracy']:.2%} ({result['correct']}/{result['n']}), loss {result['loss']:.4f}"
    if "exact_match" in result:
        return f"exact match {result['exact_match']:.2%}, F1 {result['f1']:.2%}, loss {result['loss']:.4f}"
    return f"loss {result['loss']:.4f}, perplexity {result['perplexity']:.2f}"
