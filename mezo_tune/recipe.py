"""Recipes: TOML files describing a run, validated before anything heavy is imported.

This module owns the recipe schema (one pydantic model per TOML section), `--set section.key=value`
overrides, and turning every problem in a recipe into one message for a person: all problems at once,
in schema order, each naming the key and what to change. It imports no torch or transformers, so
`mezo-tune --help` stays fast. Paths in a recipe are relative to the current working directory.
"""

from __future__ import annotations

import difflib
import json
import re
import string
import tomllib
import types
import typing
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Annotated, Any, Literal

import tomli_w
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    StrictBool,
    StrictFloat,
    StrictInt,
    StrictStr,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)
from pydantic_core import PydanticCustomError

from .data import parse_hf_spec

__all__ = [
    "DataConfig",
    "MezoConfig",
    "ModelConfig",
    "OptimConfig",
    "OutputConfig",
    "Recipe",
    "RecipeError",
    "TaskConfig",
    "AdapterConfig",
    "load_recipe",
    "parse_recipe",
    "recipe_to_dict",
    "recipe_to_toml",
]


class RecipeError(Exception):
    """Everything wrong with one recipe; `str(e)` is the message to show the user."""

    def __init__(self, source: str, problems: list[str]):
        self.source = source
        self.problems = list(problems)
        count = len(self.problems)
        header = f"recipe {source} has {count} problem{'' if count == 1 else 's'}:"
        super().__init__("\n".join([header, *(f"  {p}" for p in self.problems)]))


# --------------------------------------------------------------------------------------------------
# Schema. Scalars are strict (a TOML string is never silently read as a number); ints are accepted
# where floats are expected because `lr = 1` is what a person means.

NonEmptyStr = Annotated[StrictStr, Field(min_length=1)]
PositiveInt = Annotated[StrictInt, Field(gt=0)]
NonNegativeInt = Annotated[StrictInt, Field(ge=0)]
PositiveFloat = Annotated[StrictFloat, Field(gt=0, allow_inf_nan=False)]
Fraction = Annotated[StrictFloat, Field(gt=0, le=1, allow_inf_nan=False)]  # in (0, 1]

_DEVICE = re.compile(r"auto|cpu|cuda(:\d+)?")
DEVICE_MAP_STRATEGIES = ("auto", "balanced", "balanced_low_0", "sequential")  # accelerate's, for a device_map string
_MAP_DEVICE = re.compile(r"cpu|disk|cuda(:\d+)?|\d+")  # where a device_map table puts a module
_MEMORY_KEY = re.compile(r"cpu|cuda:\d+|\d+")  # what max_memory limits: CPU RAM or one GPU
_MEMORY_SIZE = re.compile(r"\d+(\.\d+)?\s*(B|KB|MB|GB|TB|KiB|MiB|GiB|TiB)", re.IGNORECASE)
# Set while a recipe file is being validated: the loader reports cross-field problems itself, one
# line per key, even when other fields of the same section are broken.
_LOADER_CONTEXT = {"mezo_tune.recipe.loader": True}


def _from_loader(info: ValidationInfo) -> bool:
    return bool(info.context) and bool(info.context.get("mezo_tune.recipe.loader"))


def _raise_problems(problems: list[tuple[str, str]]) -> None:
    if problems:
        message = "; ".join(f"{key}: {text}" for key, text in problems)
        raise PydanticCustomError("recipe_check", "{message}", {"message": message})


class _Section(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class ModelConfig(_Section):
    path: NonEmptyStr
    dtype: Literal["float32", "float16", "bfloat16"] = "float32"
    quantization: Literal["none", "8bit", "4bit"] = "none"
    revision: StrictStr | None = None
    device: StrictStr = "auto"
    freeze: tuple[StrictStr, ...] = ()
    trust_remote_code: StrictBool = False
    device_map: StrictStr | dict[StrictStr, StrictStr | StrictInt] = ""
    max_memory: dict[StrictStr, StrictStr | StrictInt] = {}
    offload_dir: StrictStr = ""

    @field_validator("device_map")
    @classmethod
    def _known_device_map(cls, value):
        if isinstance(value, str):
            if value and value not in DEVICE_MAP_STRATEGIES:
                raise PydanticCustomError(
                    "recipe_device_map", 'must be "" (no offload), one of {choices}, or a table of module name = '
                    '"cpu" | "disk" | "cuda:N" (got {got})',
                    {"choices": ", ".join(f'"{c}"' for c in DEVICE_MAP_STRATEGIES), "got": _show(value)})
            return value
        bad = [f"{k} = {_show(v)}" for k, v in value.items()
               if not _MAP_DEVICE.fullmatch(str(v)) or (isinstance(v, int) and v < 0)]
        if not value or bad:
            raise PydanticCustomError(
                "recipe_device_map", 'a table must put each module on "cpu", "disk", "cuda" or "cuda:N" (got {got})',
                {"got": ", ".join(bad) or "an empty table"})
        return value

    @field_validator("max_memory")
    @classmethod
    def _known_memory(cls, value):
        bad = [f"{k} = {_show(v)}" for k, v in value.items()
               if not _MEMORY_KEY.fullmatch(k) or not (_MEMORY_SIZE.fullmatch(v) if isinstance(v, str) else v > 0)]
        if bad:
            raise PydanticCustomError(
                "recipe_max_memory", 'must be a table of "cpu" | "cuda:N" = a size such as "20GiB" or a number of '
                'bytes (got {got})', {"got": ", ".join(bad)})
        return value

    @field_validator("revision")
    @classmethod
    def _empty_revision_is_default(cls, value: str | None) -> str | None:
        return value or None

    @field_validator("device")
    @classmethod
    def _known_device(cls, value: str) -> str:
        if not _DEVICE.fullmatch(value):
            raise PydanticCustomError(
                "recipe_device", "must be auto, cpu, cuda or cuda:N (got {got})", {"got": _show(value)}
            )
        return value


def _quantization_problems(quantization: str, adapter_type: str) -> list[tuple[str, str]]:
    if quantization != "none" and adapter_type == "none":
        return [("quantization", f'full-weight MeZO cannot train a quantized base (quantization = "{quantization}"): '
                 'train an adapter on it ([adapter] type = "lora" or "prefix"), or load the base unquantized '
                 '(quantization = "none" with dtype = "bfloat16", "float16" or "float32")')]
    return []


def _offload_problems(device_map, max_memory: dict, offload_dir: str, device: str, quantization: str,
                      adapter_type: str) -> list[tuple[str, str]]:
    """What [model] offloading (device_map, max_memory, offload_dir) cannot be combined with."""
    if not device_map:
        return [(key, "needs device_map (it only says how accelerate offloads)")
                for key, value in (("max_memory", max_memory), ("offload_dir", offload_dir)) if value]
    if quantization != "none":
        return [("device_map", f'cannot offload a quantized base (quantization = "{quantization}"): bitsandbytes\' '
                 'quantized weights stay on the one device they were quantized on, accelerate cannot store them on '
                 'disk or load them back per forward. Drop device_map (the quantized base is small), or load the '
                 'base unquantized (quantization = "none") and offload it for full-weight training')]
    problems = []
    if adapter_type != "none":
        problems.append(("device_map", f'cannot train an adapter ({adapter_type}) on an offloaded base: peft creates '
                         'the adapter tensors of an offloaded layer on the meta device, where they hold no values. '
                         'Offload for full-weight training ([adapter] type = "none"), or load the base in memory '
                         'for the adapter'))
    if isinstance(device_map, dict) and max_memory:
        problems.append(("max_memory", "limits the memory a device_map strategy (\"auto\", ...) may fill; a "
                         "device_map table places every module itself: give one or the other"))
    if device != "auto":
        problems.append(("device", f'is "{device}", but device_map places the modules: leave device out'))
    return problems


def _adapter_init_problems(adapter_type: str, init: str, init_text: str) -> list[tuple[str, str]]:
    if init == "activations" and adapter_type != "prefix":
        return [("init", f'"activations" starts prefix tuning\'s virtual tokens from real tokens; this adapter is '
                         f'{adapter_type!r} (use "auto" or "zrng")')]
    if init_text and init != "activations":
        return [("init_text", 'is the text whose activations start the prefix: it needs init = "activations"')]
    return []


class AdapterConfig(_Section):
    """[adapter]: a peft adapter trained instead of the base weights (LoRA or prefix tuning), or none."""

    type: Literal["none", "lora", "prefix"] = "none"
    r: PositiveInt = 8
    alpha: PositiveFloat = 16.0
    dropout: Annotated[StrictFloat, Field(ge=0, lt=1, allow_inf_nan=False)] = 0.0
    target_modules: StrictStr | tuple[NonEmptyStr, ...] = "auto"
    num_virtual_tokens: PositiveInt = 5
    init: Literal["auto", "zrng", "activations"] = "auto"
    init_text: StrictStr = ""

    @model_validator(mode="after")
    def _init_fits_type(self, info: ValidationInfo) -> AdapterConfig:
        if not _from_loader(info):
            _raise_problems(_adapter_init_problems(self.type, self.init, self.init_text))
        return self

    @field_validator("target_modules", mode="before")
    @classmethod
    def _auto_or_names(cls, value: Any) -> Any:
        ok = value == "auto" or (isinstance(value, (list, tuple)) and value
                                 and all(isinstance(v, str) and v for v in value))
        if not ok:
            raise PydanticCustomError(
                "recipe_target_modules", 'must be "auto" or a non-empty list of module names, e.g. '
                '["q_proj", "v_proj"] (got {got})', {"got": _show(value)})
        return tuple(value) if isinstance(value, list) else value


class DataConfig(_Section):
    train: NonEmptyStr
    eval: StrictStr | None = None
    max_length: Annotated[StrictInt, Field(ge=2)] = 256
    eval_limit: NonNegativeInt = 0
    columns: dict[NonEmptyStr, NonEmptyStr] = {}
    train_k: NonNegativeInt = 0
    dev_from_train: NonNegativeInt = 0
    seed: Annotated[StrictInt, Field(ge=0, lt=2**63)] = 0

    @field_validator("eval")
    @classmethod
    def _empty_eval_is_none(cls, value: str | None) -> str | None:
        return value or None


def _template_problem(template: str) -> str | None:
    try:
        fields = [name for _, name, _, _ in string.Formatter().parse(template) if name is not None]
    except ValueError as exc:
        return f"not a valid template: {exc}"
    if not fields:
        return 'has no {field}, so every example would be the same text (e.g. "{text}")'
    for name in fields:
        if name == "" or name.isdigit():
            return "fields must be named after columns of the data rows, like {text} (got {" + name + "})"
    return None


def _task_problems(task_type: str, verbalizer: Mapping[str, str] | None) -> list[tuple[str, str]]:
    if task_type == "classification":
        if verbalizer is None:
            return [("verbalizer", 'required when type = "classification": a table of label = "word", '
                     'with at least 2 labels')]
        if len(verbalizer) < 2:
            return [("verbalizer", f"classification needs at least 2 labels (got {len(verbalizer)})")]
    elif verbalizer is not None:
        return [("verbalizer", f'is only used by classification; remove it or set type = "classification" '
                 f'(type is "{task_type}")')]
    return []


_OBJECTIVES = {"lm": ("cross_entropy",), "classification": ("cross_entropy", "accuracy"),
               "multiple_choice": ("cross_entropy", "accuracy"), "generation": ("cross_entropy", "accuracy", "f1")}


def _objective_problems(task_type: str, objective: str) -> list[tuple[str, str]]:
    allowed = _OBJECTIVES.get(task_type, ("cross_entropy",))
    if objective not in allowed:
        return [("objective", f'"{objective}" is not available for type = "{task_type}" '
                 f'(use {" or ".join(allowed)})')]
    return []


class TaskConfig(_Section):
    type: Literal["lm", "classification", "multiple_choice", "generation"] = "lm"
    template: StrictStr = "{text}"
    verbalizer: dict[NonEmptyStr, NonEmptyStr] | None = None
    objective: Literal["cross_entropy", "accuracy", "f1"] = "cross_entropy"
    score: Literal["sum", "mean"] = "sum"
    answer_prefix: StrictStr = " "
    max_new_tokens: PositiveInt = 32
    stop: tuple[StrictStr, ...] = ("\n",)
    icl_separator: StrictStr = "\n\n"

    @model_validator(mode="before")
    @classmethod
    def _template_default_for_type(cls, data: Any) -> Any:
        if isinstance(data, dict) and "template" not in data and data.get("type") in ("multiple_choice", "generation"):
            data = {**data, "template": "{context}"}
        return data

    @field_validator("template")
    @classmethod
    def _valid_template(cls, value: str) -> str:
        problem = _template_problem(value)
        if problem:
            raise PydanticCustomError("recipe_template", "{problem}", {"problem": problem})
        return value

    @model_validator(mode="after")
    def _type_matches_verbalizer(self, info: ValidationInfo) -> TaskConfig:
        if not _from_loader(info):
            _raise_problems(_task_problems(self.type, self.verbalizer) + _objective_problems(self.type, self.objective))
        return self


def _mezo_problems(lr: float, min_lr: float) -> list[tuple[str, str]]:
    if min_lr > lr:
        return [("min_lr", f"must be <= lr (got min_lr = {_show(min_lr)}, lr = {_show(lr)})")]
    return []


def _warmup_problems(warmup_steps: int, steps: int) -> list[tuple[str, str]]:
    if warmup_steps >= steps:
        return [("warmup_steps", f"must be < steps (got warmup_steps = {warmup_steps}, steps = {steps})")]
    return []


def _momentum_problems(momentum: float, window: int, steps: int, directions: int) -> list[tuple[str, str]]:
    if momentum and window > steps * directions:
        return [("momentum_window", f"must not be longer than the run (got momentum_window = {window}, "
                                    f"steps × directions = {steps * directions})")]
    return []


def _optimizer_problems(estimator: str, directions: int, adam: bool, momentum: float,
                        rounding: str, direction_type: str) -> list[tuple[str, str]]:
    """Estimator and update-rule choices that do not go together (DESIGN.md contract 7)."""
    found = []
    if estimator == "fzoo" and directions < 2:
        found.append(("directions", f"the fzoo estimator divides by the spread of its N losses, which needs "
                                    f"directions = N >= 2 (got {directions})"))
    if adam and momentum:
        found.append(("adam", f"adam keeps its own first moment: set momentum = 0 (got {_show(momentum)}) or "
                              f"adam = false"))
    if adam and direction_type != "dense":
        found.append(("adam", f'adam updates every element from its moments: it needs direction_type = "dense" '
                              f'(got {_show(direction_type)}) or adam = false'))
    if adam and rounding != "nearest":
        found.append(("adam", f'adam rounds to nearest: set rounding = "nearest" (got {_show(rounding)}) '
                              'or adam = false'))
    return found


def _direction_problems(direction_type: str, rounding: str) -> list[tuple[str, str]]:
    if rounding == "stochastic" and direction_type in ("sparse", "lowrank"):
        return [("rounding", f'"stochastic" is not available with direction_type = "{direction_type}" (its z is '
                             'formed outside the fused kernels); use "nearest", or dense or layerwise directions')]
    return []


class MezoConfig(_Section):
    lr: PositiveFloat
    eps: PositiveFloat
    steps: PositiveInt
    batch_size: PositiveInt
    seed: Annotated[StrictInt, Field(ge=0, lt=2**63)]
    distribution: Literal["gaussian", "rademacher", "rademacher32"] = "gaussian"
    rounding: Literal["nearest", "stochastic"] = "nearest"
    schedule: Literal["constant", "linear", "cosine"] = "constant"
    min_lr: Annotated[StrictFloat, Field(ge=0, allow_inf_nan=False)] = 0.0
    warmup_steps: NonNegativeInt = 0
    directions: PositiveInt = 1
    momentum: Annotated[StrictFloat, Field(ge=0, lt=1, allow_inf_nan=False)] = 0.0
    momentum_window: PositiveInt = 10
    estimator: Literal["spsa", "fzoo"] = "spsa"
    adam: StrictBool = False
    adam_beta1: Annotated[StrictFloat, Field(ge=0, lt=1, allow_inf_nan=False)] = 0.9
    adam_beta2: Annotated[StrictFloat, Field(ge=0, lt=1, allow_inf_nan=False)] = 0.999
    adam_eps: Annotated[StrictFloat, Field(gt=0, allow_inf_nan=False)] = 1e-8
    direction_type: Literal["dense", "layerwise", "sparse", "lowrank"] = "dense"
    layer_fraction: Fraction = 0.25
    layer_count: NonNegativeInt = 0
    sparse_mask: Literal["magnitude", "random"] = "magnitude"
    sparse_fraction: Fraction = 0.25
    lowrank_rank: Literal[1, 2, 4, 8, 16] = 2  # powers of two <= 16 keep U Vᵀ / r exact (directions.py)
    lowrank_v_every: PositiveInt = 50
    keyframe_every: PositiveInt = 100
    compile: Literal["auto", "on", "off"] = "auto"
    max_consecutive_skips: NonNegativeInt = 10

    @model_validator(mode="before")
    @classmethod
    def _fzoo_draws_rademacher(cls, data: Any) -> Any:
        """FZOO's directions are Rademacher (±1, Dang et al. 2025): its default, where the recipe names no
        distribution; an explicit `distribution = "gaussian"` is kept."""
        if isinstance(data, dict) and data.get("estimator") == "fzoo" and "distribution" not in data:
            data = {**data, "distribution": "rademacher"}
        return data

    @model_validator(mode="after")
    def _min_lr_below_lr(self, info: ValidationInfo) -> MezoConfig:
        if not _from_loader(info):
            _raise_problems(_mezo_problems(self.lr, self.min_lr) + _warmup_problems(self.warmup_steps, self.steps)
                            + _momentum_problems(self.momentum, self.momentum_window, self.steps, self.directions)
                            + _optimizer_problems(self.estimator, self.directions, self.adam, self.momentum,
                                                  self.rounding, self.direction_type)
                            + _direction_problems(self.direction_type, self.rounding))
        return self


class OptimConfig(_Section):
    """[optim]: MeZO (the default) or the backprop baseline, AdamW, over the same steps, batches and seed."""

    type: Literal["mezo", "adamw"] = "mezo"
    lr: PositiveFloat = 1e-5
    weight_decay: Annotated[StrictFloat, Field(ge=0, allow_inf_nan=False)] = 0.0


def _optim_problems(optim_type: str, objective: str) -> list[tuple[str, str]]:
    if optim_type == "adamw" and objective != "cross_entropy":
        return [("type", f'backprop needs a differentiable loss; task.objective = "{objective}" trains only with '
                 'MeZO (set optim.type = "mezo" or task.objective = "cross_entropy")')]
    return []


class OutputConfig(_Section):
    dir: NonEmptyStr
    save_final: StrictBool = True
    log_every: PositiveInt = 10
    eval_every: NonNegativeInt = 0
    checkpoint_every: NonNegativeInt = 500
    keep: Literal["last", "best"] = "last"
    select: StrictStr = "auto"
    patience: NonNegativeInt = 0
    flush_every: Annotated[StrictInt, Field(ge=1, le=65536)] = 16
    flush_seconds: Annotated[StrictFloat, Field(ge=0, allow_inf_nan=False)] = 30.0


# The dev metrics each task type reports (tasks.py), the first one being what `output.select = "auto"` means.
TASK_METRICS = {"classification": ("accuracy", "loss"), "multiple_choice": ("accuracy", "loss"),
                "generation": ("exact_match", "f1", "loss"), "lm": ("loss", "perplexity")}
LOWER_IS_BETTER = ("loss", "perplexity")


def selection(task_type: str, select: str) -> dict:
    """What `output.select` chooses by, as the trajectory header records it: the metric (auto: accuracy, exact match
    or loss, by task) and whether lower is better."""
    metric = TASK_METRICS[task_type][0] if select == "auto" else select
    return {"metric": metric, "lower_is_better": metric in LOWER_IS_BETTER}


def _selection_problems(task_type: str, keep: str, select: str, patience: int, eval_every: int,
                        has_eval: bool) -> list[tuple[str, str]]:
    found = []
    if select != "auto" and select not in TASK_METRICS[task_type]:
        found.append(("select", f"a {task_type} task reports {', '.join(TASK_METRICS[task_type])} "
                                f"(got {_show(select)}); set one of them or \"auto\""))
    if keep == "best" and not has_eval:
        found.append(("keep", 'choosing the best step needs eval data; set data.eval (or data.dev_from_train) '
                              'or keep = "last"'))
    if patience and not eval_every:
        found.append(("patience", "early stopping counts evals: set output.eval_every > 0, or patience = 0"))
    return found


def _eval_problems(eval_path: str | None, eval_every: int, dev_from_train: int = 0) -> list[tuple[str, str]]:
    if eval_every > 0 and eval_path is None and not dev_from_train:
        return [("eval_every", "periodic eval needs eval data; set data.eval or set eval_every = 0")]
    return []


def _dev_problems(eval_path: str | None, dev_from_train: int) -> list[tuple[str, str]]:
    if dev_from_train and eval_path is not None:
        return [("dev_from_train", "takes the eval set out of data.train, but data.eval is set too; "
                 "remove data.eval or set dev_from_train = 0")]
    return []


class DistributedConfig(_Section):
    """[distributed]: how a torchrun launch splits the run (data parallel needs no key)."""

    shard_weights: StrictBool = False


def _shard_problems(shard_weights: bool, adapter_type: str, adam: bool, direction_type: str,
                    optim_type: str, device_map: Any) -> list[tuple[str, str]]:
    """What sharded weights (sharded.py) cannot train: only full weights, dense or layer-wise z, SGD or momentum,
    in memory (not offloaded)."""
    if not shard_weights:
        return []
    found = []
    if adapter_type != "none":
        found.append(f'shards full weights; an adapter (adapter.type = "{adapter_type}") is small enough to train '
                     f'data parallel: set shard_weights = false')
    if optim_type != "mezo":
        found.append('is for MeZO; the backprop baseline (optim.type = "adamw") runs in one process')
    if adam:
        found.append("cannot keep Adam's moments (mezo.adam = true) per shard yet: use mezo.momentum, or "
                     "shard_weights = false")
    if direction_type in ("sparse", "lowrank"):
        found.append(f'draws z with the dense or layerwise generator only (mezo.direction_type = "{direction_type}")')
    if device_map:
        found.append("shards weights held in memory; offloading (model.device_map) is one process's alternative: "
                     "set one of them")
    return [("shard_weights", text) for text in found]


class Recipe(_Section):
    model: ModelConfig
    adapter: AdapterConfig = AdapterConfig()
    data: DataConfig
    task: TaskConfig = TaskConfig()
    mezo: MezoConfig
    optim: OptimConfig = OptimConfig()
    output: OutputConfig
    distributed: DistributedConfig = DistributedConfig()

    @model_validator(mode="after")
    def _eval_data_for_eval_every(self, info: ValidationInfo) -> Recipe:
        if not _from_loader(info):
            _raise_problems([(f"output.{k}", t) for k, t in _eval_problems(self.data.eval, self.output.eval_every,
                                                                             self.data.dev_from_train)]
                            + [(f"data.{k}", t) for k, t in _dev_problems(self.data.eval, self.data.dev_from_train)]
                            + [(f"optim.{k}", t) for k, t in _optim_problems(self.optim.type, self.task.objective)]
                            + [(f"output.{k}", t) for k, t in _selection_problems(
                                self.task.type, self.output.keep, self.output.select, self.output.patience,
                                self.output.eval_every, self.data.eval is not None or bool(self.data.dev_from_train))])
        return self

    @model_validator(mode="after")
    def _adapter_for_quantized_base(self, info: ValidationInfo) -> Recipe:
        if not _from_loader(info):
            m = self.model
            _raise_problems([(f"model.{k}", t)
                             for k, t in _quantization_problems(m.quantization, self.adapter.type)
                             + _offload_problems(m.device_map, m.max_memory, m.offload_dir, m.device,
                                                 m.quantization, self.adapter.type)]
                            + [(f"distributed.{k}", t) for k, t in _shard_problems(
                                self.distributed.shard_weights, self.adapter.type, self.mezo.adam,
                                self.mezo.direction_type, self.optim.type, m.device_map)])
        return self


_SECTIONS: dict[str, type[_Section]] = {
    "model": ModelConfig,
    "adapter": AdapterConfig,
    "data": DataConfig,
    "task": TaskConfig,
    "mezo": MezoConfig,
    "optim": OptimConfig,
    "output": OutputConfig,
    "distributed": DistributedConfig,
}
_REQUIRED_SECTIONS = [name for name, field in Recipe.model_fields.items() if field.is_required()]


# --------------------------------------------------------------------------------------------------
# Loading.


def load_recipe(path: str | Path, overrides: Sequence[str] = ()) -> Recipe:
    """Read a TOML recipe, apply `section.key=value` overrides, validate; raise RecipeError with every problem."""
    source = str(path)
    try:
        text = Path(path).read_text(encoding="utf-8")
    except FileNotFoundError:
        raise RecipeError(source, [f"file not found: {source}"]) from None
    except (OSError, UnicodeDecodeError) as exc:
        raise RecipeError(source, [f"cannot read {source}: {exc}"]) from None
    return parse_recipe(text, source=source, overrides=overrides)


def parse_recipe(text: str, source: str = "<recipe>", overrides: Sequence[str] = (),
                 check_files: bool = True) -> Recipe:
    """Validate recipe TOML text (with overrides applied); raise RecipeError with every problem.

    check_files=False skips the data files' existence (a recipe recorded in a trajectory, replayed elsewhere)."""
    problems = _Problems()
    try:
        raw: dict[str, Any] | None = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        problems.add(_OVERRIDE_RANK, _toml_syntax_problem(source, exc))
        raw = None
    for override in overrides:
        _apply_override(raw, override, problems)
    if raw is None:
        raise RecipeError(source, problems.sorted())

    try:
        recipe = Recipe.model_validate(raw, context=_LOADER_CONTEXT)
    except ValidationError as exc:
        recipe = None
        for error in exc.errors():
            problems.add(_rank(error["loc"]), _describe(error, raw))
        bad = {tuple(error["loc"][:2]) for error in exc.errors()}
    else:
        bad = set()

    for section, key, text_ in _cross_field_problems(raw, bad, check_files):
        problems.add(_rank((section, key)), f"{section}.{key}: {text_}")

    if problems:
        raise RecipeError(source, problems.sorted())
    assert recipe is not None
    return recipe


def recipe_to_dict(recipe: Recipe) -> dict[str, Any]:
    """The fully resolved recipe as plain data (lists, dicts, None for absent optionals); JSON-ready."""
    return recipe.model_dump(mode="json")


def recipe_to_toml(recipe: Recipe) -> str:
    """The fully resolved recipe as TOML text; `parse_recipe` of it gives back an equal Recipe.

    TOML has no null, so optional keys that are unset (revision, eval, verbalizer) are left out.
    """
    return tomli_w.dumps(_drop_none(recipe_to_dict(recipe)))


def _drop_none(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _drop_none(v) for k, v in value.items() if v is not None}
    return value


# --------------------------------------------------------------------------------------------------
# Problems, kept in schema order: (section rank, key rank) then the order they were found in.

_OVERRIDE_RANK = (-1, -1)
_SECTION_RANK = -2  # "mezo: required section is missing" comes before the section's keys
_UNKNOWN_KEY_RANK = -1  # unknown keys are listed at the top of their section


class _Problems:
    def __init__(self) -> None:
        self._items: list[tuple[tuple[int, int], int, str]] = []

    def add(self, rank: tuple[int, int], text: str) -> None:
        self._items.append((rank, len(self._items), text))

    def sorted(self) -> list[str]:
        return [text for _, _, text in sorted(self._items)]

    def __bool__(self) -> bool:
        return bool(self._items)


def _rank(loc: Sequence[Any]) -> tuple[int, int]:
    names = list(_SECTIONS)
    if not loc or loc[0] not in _SECTIONS:
        return (len(names), 0)  # unknown sections and stray top-level keys come last
    section = loc[0]
    if len(loc) == 1:
        return (names.index(section), _SECTION_RANK)
    keys = list(_SECTIONS[section].model_fields)
    if loc[1] not in keys:
        return (names.index(section), _UNKNOWN_KEY_RANK)
    return (names.index(section), keys.index(loc[1]))


def _toml_syntax_problem(source: str, exc: tomllib.TOMLDecodeError) -> str:
    message = str(exc)
    match = re.search(r"\s*\(at line (\d+), column (\d+)\)$", message)
    if match:
        reason = message[: match.start()]
        return f"{source}:{match.group(1)}:{match.group(2)}: invalid TOML: {reason}"
    return f"{source}: invalid TOML: {message}"


def _show(value: Any) -> str:
    """A value as the user would write it in TOML: strings in double quotes, true/false, numbers as is."""
    if isinstance(value, bool):
        text = "true" if value else "false"
    elif isinstance(value, str):
        text = json.dumps(value, ensure_ascii=False)
    elif isinstance(value, (int, float)):
        text = repr(value)
    elif isinstance(value, Mapping):
        text = "{" + ", ".join(f"{k} = {_show(v)}" for k, v in value.items()) + "}"
    elif isinstance(value, (list, tuple)):
        text = "[" + ", ".join(_show(v) for v in value) + "]"
    else:
        text = str(value)
    return text if len(text) <= 80 else text[:77] + "..."


def _label(loc: Sequence[Any]) -> str:
    label = ""
    for part in loc:
        if isinstance(part, int):
            label += f"[{part}]"
        else:
            label += f".{part}" if label else str(part)
    return label


_TYPE_WORDS = {
    "int_type": "an integer",
    "float_type": "a number",
    "string_type": "a string",
    "bool_type": "true or false",
    "list_type": "a list",
    "tuple_type": "a list",
    "dict_type": "a table",
    "model_type": "a table",
    "model_attributes_type": "a table",
}


def _describe(error: Mapping[str, Any], raw: Mapping[str, Any]) -> str:
    loc = tuple(error["loc"])
    kind = error["type"]
    got = error.get("input")
    ctx = error.get("ctx") or {}
    is_label = bool(loc) and loc[-1] == "[key]"  # a verbalizer label (a dict key) rather than its word
    if is_label:
        loc = loc[:-2]  # the offending key itself is the input; name the table it sits in
    where = _label(loc)

    if kind == "missing":
        if len(loc) == 1:
            return f"{where}: required section is missing"
        return f"{where}: required key is missing"
    if kind == "extra_forbidden":
        return f"{where}: {_unknown(loc, raw)}"
    if kind in _TYPE_WORDS:
        return f"{where}: expected {_TYPE_WORDS[kind]} (got {_show(got)})"
    if kind == "literal_error":
        choices = ", ".join(_literal_choices(loc)) or ctx.get("expected", "")
        return f"{where}: must be one of {choices} (got {_show(got)})"
    if kind in ("greater_than", "greater_than_equal", "less_than", "less_than_equal"):
        op, bound = {
            "greater_than": (">", ctx.get("gt")),
            "greater_than_equal": (">=", ctx.get("ge")),
            "less_than": ("<", ctx.get("lt")),
            "less_than_equal": ("<=", ctx.get("le")),
        }[kind]
        if isinstance(bound, float) and bound.is_integer():
            bound = int(bound)  # "must be > 0", not "> 0.0"
        bound_text = "2**63" if bound == 2**63 else _show(bound)
        return f"{where}: must be {op} {bound_text} (got {_show(got)})"
    if kind == "finite_number":
        return f"{where}: must be a finite number (got {_show(got)})"
    if kind == "string_too_short":
        return f"{where}: {'labels ' if is_label else ''}must not be empty"
    if kind == "recipe_check":  # only reachable when a Recipe is validated outside the loader
        return f"{where}: {ctx.get('message', error['msg'])}"
    if kind.startswith("recipe_"):
        return f"{where}: {error['msg']}"
    return f"{where}: {error['msg']} (got {_show(got)})"


def _unknown(loc: Sequence[Any], raw: Mapping[str, Any]) -> str:
    if len(loc) == 1:
        name = str(loc[0])
        homes = [s for s, model in _SECTIONS.items() if name in model.model_fields]
        if homes and not isinstance(raw.get(name), dict):
            return f"key outside any section (did you mean to put it under [{homes[0]}]?)"
        return "unknown section" + _did_you_mean(name, list(_SECTIONS))
    return "unknown key" + _did_you_mean(str(loc[-1]), list(_SECTIONS[loc[0]].model_fields))


def _did_you_mean(name: str, known: list[str]) -> str:
    close = difflib.get_close_matches(name, known, n=1)
    return f" (did you mean '{close[0]}'?)" if close else ""


def _field_annotation(section: str, key: str) -> Any:
    model = _SECTIONS.get(section)
    field = model.model_fields.get(key) if model else None
    return field.annotation if field else None


def _literal_choices(loc: Sequence[Any]) -> list[str]:
    if len(loc) != 2:
        return []
    annotation = _field_annotation(str(loc[0]), str(loc[1]))
    if typing.get_origin(annotation) is Literal:
        return [str(choice) for choice in typing.get_args(annotation)]
    return []


def _is_string_key(section: str, key: str) -> bool:
    """True for keys whose value is text (paths, names, choices), where `--set k=2024` means "2024"."""
    annotation = _field_annotation(section, key)
    if annotation is None:
        return False
    is_union = typing.get_origin(annotation) in (typing.Union, types.UnionType)
    options = typing.get_args(annotation) if is_union else (annotation,)
    if any(typing.get_origin(option) in (tuple, list) for option in options):
        return False  # text or a list (adapter.target_modules): a TOML list is meant as a list
    for option in options:
        if typing.get_origin(option) is Annotated:
            option = typing.get_args(option)[0]
        if typing.get_origin(option) is Literal:
            option = type(typing.get_args(option)[0])
        if option is str:
            return True
    return False


# --------------------------------------------------------------------------------------------------
# Cross-field checks on the raw recipe, run even when other keys of the section are broken; a check
# is skipped when a key it reads is itself invalid (that key already has its own problem).

_MISSING_VALUE = object()


def _good_value(raw: Mapping[str, Any], bad: set[tuple], section: str, key: str) -> Any:
    """The key's value if it validated (or its default if absent), else _MISSING_VALUE."""
    if (section,) in bad or (section, key) in bad:
        return _MISSING_VALUE
    table = raw.get(section, {})
    if not isinstance(table, dict):
        return _MISSING_VALUE
    if key in table:
        value = table[key]
        if key in ("revision", "eval") and value == "":
            return None
        return value
    field = _SECTIONS[section].model_fields[key]
    return _MISSING_VALUE if field.is_required() else field.get_default(call_default_factory=True)


def _cross_field_problems(raw: Mapping[str, Any], bad: set[tuple],
                          check_files: bool = True) -> list[tuple[str, str, str]]:
    found: list[tuple[str, str, str]] = []

    def good(section: str, key: str) -> Any:
        return _good_value(raw, bad, section, key)

    for key in ("train", "eval"):
        path = good("data", key)
        if isinstance(path, str) and path.startswith("hf:"):  # a Hugging Face dataset: check the spec only
            try:
                parse_hf_spec(path)
            except ValueError as exc:
                found.append(("data", key, str(exc)))
        elif isinstance(path, str) and check_files:
            if not Path(path).exists():
                found.append(("data", key, f"file not found: {path}"))
            elif not Path(path).is_file():
                found.append(("data", key, f"not a file: {path}"))

    task_type, verbalizer = good("task", "type"), good("task", "verbalizer")
    if _MISSING_VALUE not in (task_type, verbalizer):
        found += [("task", k, t) for k, t in _task_problems(task_type, verbalizer)]
    objective = good("task", "objective")
    if _MISSING_VALUE not in (task_type, objective):
        found += [("task", k, t) for k, t in _objective_problems(task_type, objective)]
    optim_type = good("optim", "type")
    if _MISSING_VALUE not in (optim_type, objective):
        found += [("optim", k, t) for k, t in _optim_problems(optim_type, objective)]

    lr, min_lr = good("mezo", "lr"), good("mezo", "min_lr")
    if _MISSING_VALUE not in (lr, min_lr):
        found += [("mezo", k, t) for k, t in _mezo_problems(lr, min_lr)]
    for check, keys in ((_warmup_problems, ("warmup_steps", "steps")),
                        (_momentum_problems, ("momentum", "momentum_window", "steps", "directions")),
                        (_optimizer_problems, ("estimator", "directions", "adam", "momentum", "rounding",
                                               "direction_type")),
                        (_direction_problems, ("direction_type", "rounding"))):
        values = [good("mezo", k) for k in keys]
        if _MISSING_VALUE not in values:
            found += [("mezo", k, t) for k, t in check(*values)]

    quantization, adapter_type = good("model", "quantization"), good("adapter", "type")
    if _MISSING_VALUE not in (quantization, adapter_type):
        found += [("model", k, t) for k, t in _quantization_problems(quantization, adapter_type)]
    offload = [good("model", k) for k in ("device_map", "max_memory", "offload_dir", "device")]
    if _MISSING_VALUE not in (*offload, quantization, adapter_type):
        found += [("model", k, t) for k, t in _offload_problems(*offload, quantization, adapter_type)]
    init = [adapter_type, good("adapter", "init"), good("adapter", "init_text")]
    if _MISSING_VALUE not in init:
        found += [("adapter", k, t) for k, t in _adapter_init_problems(*init)]

    shard = [good("distributed", "shard_weights"), adapter_type, good("mezo", "adam"), good("mezo", "direction_type"),
             optim_type, good("model", "device_map")]
    if _MISSING_VALUE not in shard:
        found += [("distributed", k, t) for k, t in _shard_problems(*shard)]

    eval_path, eval_every, dev = good("data", "eval"), good("output", "eval_every"), good("data", "dev_from_train")
    if _MISSING_VALUE not in (eval_path, dev):
        found += [("data", k, t) for k, t in _dev_problems(eval_path, dev)]
    if _MISSING_VALUE not in (eval_path, eval_every, dev):
        found += [("output", k, t) for k, t in _eval_problems(eval_path, eval_every, dev)]
    selection = [task_type, good("output", "keep"), good("output", "select"), good("output", "patience"), eval_every]
    if _MISSING_VALUE not in (*selection, eval_path, dev):
        found += [("output", k, t) for k, t in _selection_problems(*selection, eval_path is not None or bool(dev))]
    return found


# --------------------------------------------------------------------------------------------------
# Overrides: `section.key=value`, the value read as TOML (`1e-5`, `["a*"]`, `{a = " a"}`), or as plain
# text when it is not TOML (`/some/dir`) or when the key holds text (`output.dir=2024` is "2024").


def _parse_override_value(text: str) -> Any:
    try:
        parsed = tomllib.loads(f"value = {text}")
    except tomllib.TOMLDecodeError:
        return text
    if set(parsed) != {"value"} or not isinstance(parsed["value"], (str, int, float, bool, list, dict)):
        return text  # dates, or text that smuggled in a second key: take it literally
    return parsed["value"]


def _apply_override(raw: dict[str, Any] | None, override: str, problems: _Problems) -> None:
    name, sep, value_text = override.partition("=")
    parts = [part.strip() for part in name.split(".")]
    if not sep or len(parts) < 2 or not all(parts):
        hint = ""
        key = name.strip()
        homes = [s for s, model in _SECTIONS.items() if key in model.model_fields]
        if sep and len(parts) == 1 and homes:
            hint = f" (did you mean {homes[0]}.{key}?)"
        problems.add(_OVERRIDE_RANK, f"override {json.dumps(override)}: expected section.key=value{hint}")
        return
    if raw is None:
        return  # the file did not parse; the override's format was still worth checking
    value: Any = _parse_override_value(value_text.strip())
    if len(parts) == 2 and not isinstance(value, str) and _is_string_key(parts[0], parts[1]):
        value = value_text.strip()
    table = raw
    for depth, part in enumerate(parts[:-1]):
        child = table.setdefault(part, {})
        if not isinstance(child, dict):
            where = ".".join(parts[: depth + 1])
            problems.add(_OVERRIDE_RANK, f"override {json.dumps(override)}: {where} is not a table")
            return
        table = child
    table[parts[-1]] = value
