"""Replay: the training loop with the forwards replaced by recorded scalars (DESIGN.md, contract 6).

base model (verified against the trajectory header) + recorded (η_t, g_t) ──► the same `Mezo.apply_update` that
training ran ──► the trained weights, bit for bit, on any device.

Adapter runs: the base model is verified before the adapter is attached; the adapter's initial values are rebuilt
from the generator as the header says ("init": "zrng-v1", adapters.py), then the recorded updates are applied to
the adapter tensors. The result is written as a PEFT adapter directory, or with --merge as a full model directory.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path


IN_MEMORY = {"device_map": "", "max_memory": {}, "offload_dir": ""}  # [model] keys that load a base whole


class ReplayError(Exception):
    """A replay that cannot be done or that diverged, said for people."""


def apply_records(engine, records, keyframes: dict | None = None, verify: bool = False,
                  progress: bool = False) -> None:
    """Apply recorded steps in order. With verify, compare each keyframe digest and stop at the first divergence."""
    from tqdm.auto import tqdm

    last_match = None  # the last keyframe step that matched
    for rec in tqdm(records, desc="replay", unit="step", disable=not progress or len(records) < 2, leave=False):
        engine.apply_record(rec)
        if verify and keyframes and rec.step in keyframes:
            if engine.digest() != keyframes[rec.step]:
                since = "the start" if last_match is None else f"step {last_match + 1}"
                raise ReplayError(f"replay diverged: the weights after step {rec.step} differ from the keyframe "
                                  f"recorded there; the first diverging step lies between {since} and step "
                                  f"{rec.step} (the previous keyframe matched)")
            last_match = rec.step


def check_final_digest(engine, n_steps: int, keyframes: dict, end: dict | None) -> None:
    """The weights after the first n_steps steps against the digest the run recorded for them: the end block's
    when n_steps is the whole of a finished run, else the keyframe at step n_steps - 1 if there is one."""
    if end is not None and n_steps == end.get("steps"):
        recorded, where = str(end.get("digest")), f"the end block's digest after all {n_steps} steps"
    elif n_steps - 1 in keyframes:
        recorded, where = keyframes[n_steps - 1].hex(), f"the keyframe digest after step {n_steps - 1}"
    else:
        return
    got = engine.digest().hex()
    if got != recorded:
        raise ReplayError(f"replay diverged: the weights rebuilt from {n_steps} steps have digest {got}, but "
                          f"{where} is {recorded}; nothing was written. Run `mezo-tune replay --verify` to find "
                          f"the step range where the rebuild first diverges")


def _attach_recorded_adapter(model, recipe, adapter: dict):
    """The adapter the header describes, with its initial values rebuilt (zrng-v1) or copied (activations-v1) as it
    says."""
    from .adapters import INIT_ACTIVATIONS, INIT_SCHEME, INIT_STREAM, AdapterError, attach, config_dict, \
        restore_initial_values

    known_init = adapter.get("init") in (INIT_SCHEME, INIT_ACTIVATIONS)
    if not known_init or adapter.get("init_stream", INIT_STREAM) != INIT_STREAM:
        raise ReplayError(f"the trajectory's adapter was initialised as {adapter.get('init')!r}; this mezo-tune "
                          f"rebuilds {INIT_SCHEME!r} and {INIT_ACTIVATIONS!r} only: "
                          "install the version that recorded it")
    try:
        peft_model = attach(model, recipe.adapter, adapter["init_seed"])
        if adapter["init"] == INIT_ACTIVATIONS:
            restore_initial_values(peft_model, adapter)
    except AdapterError as e:
        raise ReplayError(str(e)) from None
    now = config_dict(peft_model)
    differs = sorted(k for k in set(now) | set(adapter["config"])
                     if k not in ("base_model_name_or_path", "revision", "peft_version")
                     and now.get(k) != adapter["config"].get(k))
    if differs:
        raise ReplayError(f"the adapter this peft builds differs from the recorded one in {', '.join(differs)}; "
                          f"the run was recorded with peft {adapter['config'].get('peft_version')}")
    return peft_model


@dataclass
class Rebuilt:
    model: object
    tokenizer: object
    engine: object
    header: dict
    steps: int


def best_steps(data) -> int:
    """How many records `replay --best` applies: up to the eval that scored best on dev by the run's
    output.select (recorded in the header), as `train` with output.keep = "best" keeps."""
    from .trajectory import best_eval

    best = best_eval(data.evals, data.header.get("select"))
    if best is None:
        raise ReplayError(f"--best: {data.path} records no dev evals to choose from (the run had no eval data, or "
                          "was recorded before mezo-tune kept evals in the trajectory); use --steps N")
    return best["step"] + 1


def rebuild(trajectory_path, *, base: str | None = None, steps: int | None = None, best: bool = False,
            verify: bool = False, device: str = "auto", in_memory: bool = False, progress: bool = True,
            log=lambda m: print(m, file=sys.stderr)) -> Rebuilt:
    """Load the base model named in the trajectory (or `base`), check it, and apply the recorded steps (the first
    `steps` of them, or with best those up to the dev-best eval). The base is offloaded as the run's recipe says
    ([model] device_map), unless in_memory: the updates are the same bits wherever the weights live."""
    from . import models
    from .directions import Directions
    from .mezo import Mezo, UpdateRule, trainable_set
    from .recipe import parse_recipe
    from .run import check_base, check_recorded_data, use_compile
    from .trajectory import TrajectoryError, keyframe_digest, read_trajectory

    data = read_trajectory(trajectory_path)
    header = data.header
    if data.problem:
        log(f"warning: {trajectory_path}: {data.problem}; replaying the {len(data.steps)} intact steps")
    try:
        rule = UpdateRule.from_header(header.get("update_rule"))
        directions = Directions.from_header(header.get("direction"))
    except ValueError as e:
        raise ReplayError(f"the trajectory's {e}: install the version that recorded it "
                          f"({header['tool']['version']})") from None
    if best:
        if steps is not None:
            raise ReplayError("--best and --steps both say which step to rebuild: give one of them")
        steps = best_steps(data)
    recipe = parse_recipe(header["recipe"], f"the recipe recorded in {trajectory_path}", check_files=False)
    model_cfg = recipe.model.model_copy(update={"device": device, **({"path": base} if base else {}),
                                                **(IN_MEMORY if in_memory else {})})
    model, tokenizer, source = models.load(model_cfg, progress)
    check_base(header, models.state_digests(model), model_cfg.path)
    if verify:
        check_recorded_data(header, recipe, tokenizer, log)
    adapter = header.get("adapter")
    if adapter:
        model = _attach_recorded_adapter(model, recipe, adapter)
    trainable = trainable_set(model, header["freeze"], adapter=bool(adapter))
    if trainable.header() != header["trainable"]:
        raise ReplayError(f"the trainable set of {model_cfg.path} does not match the trajectory's")
    zgen = header["z_generator"]
    from . import zrng

    if not zrng.replays(zgen["name"], zgen["version"], zgen["distribution"]):
        raise ReplayError(f"the trajectory uses z generator {zgen['name']} v{zgen['version']} "
                          f"({zgen['distribution']}); this mezo-tune has {zrng.GENERATOR} v{zrng.GENERATOR_VERSION} "
                          f"({', '.join(zrng.DISTRIBUTIONS)}): install the version that recorded it "
                          f"({header['tool']['version']})")
    device_name = str(next(model.parameters()).device)
    try:
        engine = Mezo(model, trainable, seed=header["seed"], eps=header["eps"], distribution=zgen["distribution"],
                      rounding=header["rounding"], use_compile=use_compile(recipe.mezo.compile, device_name),
                      rule=rule, directions=directions, digest=keyframe_digest(header))
    except (ValueError, TrajectoryError) as e:
        raise ReplayError(f"{e}: install the version that recorded it ({header['tool']['version']})") from None
    if engine.digest().hex() != header["initial_digest"]:
        raise ReplayError("the starting weights do not match the trajectory's initial digest")
    records = data.steps
    if steps is not None:
        if not 0 <= steps <= len(records):
            raise ReplayError(f"--steps {steps}: the trajectory holds {len(records)} steps")
        records = records[:steps]
    apply_records(engine, records, data.keyframes, verify=verify, progress=progress)
    check_final_digest(engine, len(records), data.keyframes, data.end)
    return Rebuilt(model, tokenizer, engine, header, len(records))


def replay(trajectory_path, out_dir, merge: bool = False, **kw) -> Rebuilt:
    """rebuild() and write a Hugging Face model directory, or for an adapter run a PEFT adapter directory (with
    merge: the base with the adapter merged in, as a Hugging Face model directory)."""
    from . import models

    out = Path(out_dir)
    if out.exists() and any(out.iterdir()):
        raise ReplayError(f"{out} exists and is not empty; choose another --out or delete it")
    if merge:  # refuse before the replay's work, not after
        from .trajectory import read_trajectory

        header = read_trajectory(trajectory_path).header
        if header.get("adapter") and header.get("quantization"):
            raise ReplayError(f"--merge needs an unquantized base; this run's base is {header['quantization']}. "
                              "Write the adapter directory instead (replay --out without --merge) and load it over "
                              "the base with peft")
    rebuilt = rebuild(trajectory_path, **kw)
    model = rebuilt.model
    if merge and rebuilt.header.get("adapter"):
        from .adapters import AdapterError, merged

        try:
            model = merged(model, rebuilt.header.get("quantization"))
        except AdapterError as e:
            raise ReplayError(str(e)) from None
    models.save_model(model, rebuilt.tokenizer, out)
    return rebuilt
