"""Replay: the training loop with the forwards replaced by recorded scalars (DESIGN.md, contract 6).

base model (verified against the trajectory header) + recorded (η_t, g_t) ──► the same `Mezo.apply_update` that
training ran ──► the trained weights, bit for bit, on any device.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path


class ReplayError(Exception):
    """A replay that cannot be done or that diverged, said for people."""


def apply_records(engine, records, keyframes: dict | None = None, verify: bool = False,
                  progress: bool = False) -> None:
    """Apply recorded steps in order. With verify, compare each keyframe digest and stop at the first divergence."""
    from tqdm.auto import tqdm

    from .mezo import update_scale

    last_match = None  # the last keyframe step that matched
    for rec in tqdm(records, desc="replay", unit="step", disable=not progress or len(records) < 2, leave=False):
        if not rec.skipped:
            engine.apply_update(rec.step, update_scale(rec.eta, rec.g))
        if verify and keyframes and rec.step in keyframes:
            if engine.digest() != keyframes[rec.step]:
                since = "the start" if last_match is None else f"step {last_match + 1}"
                raise ReplayError(f"replay diverged: the weights after step {rec.step} differ from the keyframe "
                                  f"recorded there; the first diverging step lies between {since} and step "
                                  f"{rec.step} (the previous keyframe matched)")
            last_match = rec.step


@dataclass
class Rebuilt:
    model: object
    tokenizer: object
    engine: object
    header: dict
    steps: int


def rebuild(trajectory_path, *, base: str | None = None, steps: int | None = None, verify: bool = False,
            device: str = "auto", progress: bool = True, log=lambda m: print(m, file=sys.stderr)) -> Rebuilt:
    """Load the base model named in the trajectory (or `base`), check it, and apply the recorded steps."""
    from . import models
    from .mezo import Mezo, trainable_set, weights_digest
    from .recipe import parse_recipe
    from .train import check_base, use_compile
    from .trajectory import read_trajectory

    data = read_trajectory(trajectory_path)
    header = data.header
    if data.problem:
        log(f"warning: {trajectory_path}: {data.problem}; replaying the {len(data.steps)} intact steps")
    recipe = parse_recipe(header["recipe"], f"the recipe recorded in {trajectory_path}", check_files=False)
    model_cfg = recipe.model.model_copy(update={"device": device, **({"path": base} if base else {})})
    model, tokenizer, source = models.load(model_cfg, progress)
    check_base(header, models.state_digests(model), model_cfg.path)
    trainable = trainable_set(model, header["freeze"])
    if trainable.header() != header["trainable"]:
        raise ReplayError(f"the trainable set of {model_cfg.path} does not match the trajectory's")
    if weights_digest(trainable.params).hex() != header["initial_digest"]:
        raise ReplayError("the starting weights do not match the trajectory's initial digest")
    zgen = header["z_generator"]
    from . import zrng

    if (zgen["name"], zgen["version"]) != (zrng.GENERATOR, zrng.GENERATOR_VERSION):
        raise ReplayError(f"the trajectory uses z generator {zgen['name']} v{zgen['version']}; this mezo-tune has "
                          f"{zrng.GENERATOR} v{zrng.GENERATOR_VERSION}: install the version that recorded it "
                          f"({header['tool']['version']})")
    device_name = str(next(model.parameters()).device)
    engine = Mezo(model, trainable, seed=header["seed"], eps=header["eps"], distribution=zgen["distribution"],
                  rounding=header["rounding"], use_compile=use_compile(recipe.mezo.compile, device_name))
    records = data.steps
    if steps is not None:
        if not 0 <= steps <= len(records):
            raise ReplayError(f"--steps {steps}: the trajectory holds {len(records)} steps")
        records = records[:steps]
    apply_records(engine, records, data.keyframes, verify=verify, progress=progress)
    return Rebuilt(model, tokenizer, engine, header, len(records))


def replay(trajectory_path, out_dir, **kw) -> Rebuilt:
    """rebuild() and write a Hugging Face model directory."""
    from . import models

    out = Path(out_dir)
    if out.exists() and any(out.iterdir()):
        raise ReplayError(f"{out} exists and is not empty; choose another --out or delete it")
    rebuilt = rebuild(trajectory_path, **kw)
    models.save_model(rebuilt.model, rebuilt.tokenizer, out)
    return rebuilt
