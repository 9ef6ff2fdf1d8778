"""Recipe loading: defaults, every kind of problem (exact messages), overrides, TOML round trip."""

import subprocess
import sys
import textwrap

import pytest

from mezo_tune.recipe import (
    Recipe,
    RecipeError,
    load_recipe,
    parse_recipe,
    recipe_to_dict,
    recipe_to_toml,
)

MINIMAL_LM = """\
[model]
path = "embedded:smollm2-135m"

[data]
train = "data/train.jsonl"

[mezo]
lr = 1e-6
eps = 1e-3
steps = 1000
batch_size = 16
seed = 0

[output]
dir = "runs/demo"
"""

MINIMAL_CLASSIFICATION = MINIMAL_LM + """
[task]
type = "classification"
template = "Review: {text}\\nSentiment:"
verbalizer = { positive = " positive", negative = " negative" }
"""


@pytest.fixture(autouse=True)
def in_project(tmp_path, monkeypatch):
    """Recipe paths are relative to the working directory: run each test in a dir holding data/."""
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "train.jsonl").write_text('{"text": "hello"}\n')
    (tmp_path / "data" / "eval.jsonl").write_text('{"text": "bye"}\n')
    monkeypatch.chdir(tmp_path)
    return tmp_path


def problems_of(text, overrides=()):
    with pytest.raises(RecipeError) as info:
        parse_recipe(text, source="recipes/x.toml", overrides=overrides)
    return str(info.value)


def one_problem(line):
    return f"recipe recipes/x.toml has 1 problem:\n  {line}"


# ---------------------------------------------------------------------------------------------- valid


def test_minimal_lm_recipe_fills_defaults():
    recipe = parse_recipe(MINIMAL_LM)
    assert recipe_to_dict(recipe) == {
        "model": {
            "path": "embedded:smollm2-135m",
            "dtype": "float32",
            "quantization": "none",
            "revision": None,
            "device": "auto",
            "freeze": [],
            "trust_remote_code": False,
            "device_map": "",
            "max_memory": {},
            "offload_dir": "",
        },
        "adapter": {"type": "none", "r": 8, "alpha": 16.0, "dropout": 0.0, "target_modules": "auto",
                    "num_virtual_tokens": 5, "init": "auto", "init_text": ""},
        "data": {"train": "data/train.jsonl", "eval": None, "max_length": 256, "eval_limit": 0, "columns": {},
                 "train_k": 0, "dev_from_train": 0, "seed": 0},
        "task": {"type": "lm", "template": "{text}", "verbalizer": None, "objective": "cross_entropy",
                 "score": "sum", "answer_prefix": " ", "max_new_tokens": 32, "stop": ["\n"],
                 "icl_separator": "\n\n"},
        "optim": {"type": "mezo", "lr": 1e-5, "weight_decay": 0.0},
        "mezo": {
            "lr": 1e-6,
            "eps": 1e-3,
            "steps": 1000,
            "batch_size": 16,
            "seed": 0,
            "distribution": "gaussian",
            "rounding": "nearest",
            "schedule": "constant",
            "min_lr": 0.0,
            "warmup_steps": 0,
            "directions": 1,
            "momentum": 0.0,
            "momentum_window": 10,
            "estimator": "spsa",
            "adam": False,
            "adam_beta1": 0.9,
            "adam_beta2": 0.999,
            "adam_eps": 1e-8,
            "direction_type": "dense",
            "layer_fraction": 0.25,
            "layer_count": 0,
            "sparse_mask": "magnitude",
            "sparse_fraction": 0.25,
            "lowrank_rank": 2,
            "lowrank_v_every": 50,
            "keyframe_every": 100,
            "compile": "auto",
            "max_consecutive_skips": 10,
        },
        "output": {
            "dir": "runs/demo",
            "save_final": True,
            "log_every": 10,
            "eval_every": 0,
            "checkpoint_every": 500,
            "keep": "last",
            "select": "auto",
            "patience": 0,
            "flush_every": 16,
            "flush_seconds": 30.0,
        },
        "distributed": {"shard_weights": False},
    }


def test_minimal_classification_recipe():
    recipe = parse_recipe(MINIMAL_CLASSIFICATION)
    assert recipe.task.type == "classification"
    assert recipe.task.template == "Review: {text}\nSentiment:"
    assert recipe.task.verbalizer == {"positive": " positive", "negative": " negative"}


def test_full_recipe_with_every_key(in_project):
    path = in_project / "full.toml"
    path.write_text(textwrap.dedent("""\
        [model]
        path = "HuggingFaceTB/SmolLM2-135M"
        dtype = "bfloat16"
        revision = "main"
        device = "cuda:1"
        freeze = ["lm_head*", "*.embed_tokens.*"]

        [data]
        train = "data/train.jsonl"
        eval = "data/eval.jsonl"
        max_length = 128
        eval_limit = 50

        [task]
        type = "lm"
        template = "{text}"

        [mezo]
        lr = 1e-5
        eps = 1e-3
        steps = 20
        batch_size = 4
        seed = 9223372036854775807
        distribution = "rademacher"
        rounding = "stochastic"
        schedule = "linear"
        min_lr = 1e-7
        keyframe_every = 5
        compile = "off"

        [output]
        dir = "runs/full"
        save_final = false
        log_every = 1
        eval_every = 10
        checkpoint_every = 0
        """))
    recipe = load_recipe(path)
    assert recipe.model.freeze == ("lm_head*", "*.embed_tokens.*")
    assert recipe.model.device == "cuda:1"
    assert recipe.mezo.seed == 2**63 - 1
    assert recipe.data.eval == "data/eval.jsonl"


def test_int_accepted_where_a_float_is_expected():
    recipe = parse_recipe(MINIMAL_LM.replace("lr = 1e-6", "lr = 1"))
    assert recipe.mezo.lr == 1.0 and isinstance(recipe.mezo.lr, float)


def test_recipe_is_frozen():
    recipe = parse_recipe(MINIMAL_LM)
    with pytest.raises(Exception):
        recipe.mezo.lr = 1.0


# ---------------------------------------------------------------------------------------- one problem


def test_missing_key():
    assert problems_of(MINIMAL_LM.replace("lr = 1e-6\n", "")) == one_problem(
        "mezo.lr: required key is missing"
    )


def test_missing_section():
    text = MINIMAL_LM.replace("[output]\ndir = \"runs/demo\"\n", "")
    assert problems_of(text) == one_problem("output: required section is missing")


def test_section_that_is_not_a_table():
    text = 'output = "runs"\n' + MINIMAL_LM.replace('[output]\ndir = "runs/demo"\n', "")
    assert problems_of(text) == one_problem('output: expected a table (got "runs")')


def test_wrong_type():
    assert problems_of(MINIMAL_LM.replace("steps = 1000", 'steps = "ten"')) == one_problem(
        'mezo.steps: expected an integer (got "ten")'
    )


@pytest.mark.parametrize(
    "line, problem",
    [
        ("steps = 1.5", "mezo.steps: expected an integer (got 1.5)"),
        ('lr = "1e-5"', 'mezo.lr: expected a number (got "1e-5")'),
        ("lr = inf", "mezo.lr: must be a finite number (got inf)"),
        ("lr = true", "mezo.lr: expected a number (got true)"),
    ],
)
def test_wrong_types_in_mezo(line, problem):
    key = line.split(" =")[0]
    default = {"steps": "steps = 1000", "lr": "lr = 1e-6"}[key]
    assert problems_of(MINIMAL_LM.replace(default, line)) == one_problem(problem)


def test_other_wrong_types():
    text = MINIMAL_LM.replace('path = "embedded:smollm2-135m"', 'path = "m"\nfreeze = "lm_head*"')
    text = text.replace('dir = "runs/demo"', 'dir = "runs/demo"\nsave_final = "yes"')
    assert problems_of(text) == (
        "recipe recipes/x.toml has 2 problems:\n"
        '  model.freeze: expected a list (got "lm_head*")\n'
        '  output.save_final: expected true or false (got "yes")'
    )


def test_literal():
    text = MINIMAL_LM.replace('path = "embedded:smollm2-135m"', 'path = "m"\ndtype = "fp16"')
    assert problems_of(text) == one_problem(
        'model.dtype: must be one of float32, float16, bfloat16 (got "fp16")'
    )


def test_device():
    text = MINIMAL_LM.replace('path = "embedded:smollm2-135m"', 'path = "m"\ndevice = "gpu"')
    assert problems_of(text) == one_problem('model.device: must be auto, cpu, cuda or cuda:N (got "gpu")')


@pytest.mark.parametrize(
    "old, new, problem",
    [
        ("steps = 1000", "steps = -1", "mezo.steps: must be > 0 (got -1)"),
        ("eps = 1e-3", "eps = 0.0", "mezo.eps: must be > 0 (got 0.0)"),
        ("seed = 0", "seed = -1", "mezo.seed: must be >= 0 (got -1)"),
        ("seed = 0", "seed = 9223372036854775808", "mezo.seed: must be < 2**63 (got 9223372036854775808)"),
        ("seed = 0", "seed = 0\nmin_lr = -1e-9", "mezo.min_lr: must be >= 0 (got -1e-09)"),
        ('train = "data/train.jsonl"', 'train = "data/train.jsonl"\neval_limit = -1',
         "data.eval_limit: must be >= 0 (got -1)"),
        ('train = "data/train.jsonl"', 'train = "data/train.jsonl"\nmax_length = 0',
         "data.max_length: must be >= 2 (got 0)"),
        ('dir = "runs/demo"', 'dir = "runs/demo"\ncheckpoint_every = -5',
         "output.checkpoint_every: must be >= 0 (got -5)"),
        ('dir = "runs/demo"', 'dir = ""', "output.dir: must not be empty"),
    ],
)
def test_bounds(old, new, problem):
    assert old in MINIMAL_LM
    assert problems_of(MINIMAL_LM.replace(old, new)) == one_problem(problem)


def test_unknown_key_with_suggestion():
    text = MINIMAL_LM.replace("lr = 1e-6", "lr = 1e-6\nlrr = 1e-5")
    assert problems_of(text) == one_problem("mezo.lrr: unknown key (did you mean 'lr'?)")


def test_unknown_key_without_suggestion():
    text = MINIMAL_LM.replace("lr = 1e-6", "lr = 1e-6\nnesterov = true")
    assert problems_of(text) == one_problem("mezo.nesterov: unknown key")


def test_unknown_section():
    assert problems_of(MINIMAL_LM + "\n[mezzo]\nlr = 1\n") == one_problem(
        "mezzo: unknown section (did you mean 'mezo'?)"
    )
    assert problems_of(MINIMAL_LM + "\n[wandb]\nproject = \"x\"\n") == one_problem("wandb: unknown section")


def test_key_written_before_any_section():
    text = "lr = 1e-6\n" + MINIMAL_LM.replace("lr = 1e-6\n", "")
    assert problems_of(text) == (
        "recipe recipes/x.toml has 2 problems:\n"
        "  mezo.lr: required key is missing\n"
        "  lr: key outside any section (did you mean to put it under [mezo]?)"
    )


def test_train_file_missing():
    text = MINIMAL_LM.replace("data/train.jsonl", "data/x.jsonl")
    assert problems_of(text) == one_problem("data.train: file not found: data/x.jsonl")


def test_eval_file_missing_and_directory():
    text = MINIMAL_LM.replace('train = "data/train.jsonl"', 'train = "data"\neval = "data/nope.jsonl"')
    assert problems_of(text) == (
        "recipe recipes/x.toml has 2 problems:\n"
        "  data.train: not a file: data\n"
        "  data.eval: file not found: data/nope.jsonl"
    )


def test_empty_eval_means_no_eval():
    recipe = parse_recipe(MINIMAL_LM.replace('train = "data/train.jsonl"', 'train = "data/train.jsonl"\neval = ""'))
    assert recipe.data.eval is None


def test_classification_needs_verbalizer():
    text = MINIMAL_LM + '\n[task]\ntype = "classification"\n'
    assert problems_of(text) == one_problem(
        'task.verbalizer: required when type = "classification": a table of label = "word", with at least 2 labels'
    )


def test_classification_needs_two_labels():
    text = MINIMAL_LM + '\n[task]\ntype = "classification"\nverbalizer = { yes = " yes" }\n'
    assert problems_of(text) == one_problem("task.verbalizer: classification needs at least 2 labels (got 1)")


def test_verbalizer_words_must_not_be_empty():
    text = MINIMAL_LM + '\n[task]\ntype = "classification"\nverbalizer = { yes = " yes", no = "" }\n'
    assert problems_of(text) == one_problem("task.verbalizer.no: must not be empty")


def test_lm_must_not_have_verbalizer():
    text = MINIMAL_LM + '\n[task]\nverbalizer = { a = " a", b = " b" }\n'
    assert problems_of(text) == one_problem(
        'task.verbalizer: is only used by classification; remove it or set type = "classification" (type is "lm")'
    )


@pytest.mark.parametrize(
    "template, problem",
    [
        ("{text", "task.template: not a valid template: expected '}' before end of string"),
        ("hello", 'task.template: has no {field}, so every example would be the same text (e.g. "{text}")'),
        ("{} {0}", "task.template: fields must be named after columns of the data rows, like {text} (got {})"),
    ],
)
def test_bad_template(template, problem):
    assert problems_of(MINIMAL_LM + f'\n[task]\ntemplate = "{template}"\n') == one_problem(problem)


def test_min_lr_above_lr():
    text = MINIMAL_LM.replace("seed = 0", 'seed = 0\nschedule = "linear"\nmin_lr = 1e-5')
    assert problems_of(text) == one_problem("mezo.min_lr: must be <= lr (got min_lr = 1e-05, lr = 1e-06)")


def test_eval_every_needs_eval_data():
    text = MINIMAL_LM.replace('dir = "runs/demo"', 'dir = "runs/demo"\neval_every = 50')
    assert problems_of(text) == one_problem(
        "output.eval_every: periodic eval needs eval data; set data.eval or set eval_every = 0"
    )


def test_toml_syntax_error_names_file_line_and_column(in_project):
    path = in_project / "bad.toml"
    path.write_text('[model]\npath = "m"\n\n[mezo]\nlr = \n')
    with pytest.raises(RecipeError) as info:
        load_recipe(path)
    assert str(info.value) == f"recipe {path} has 1 problem:\n  {path}:5:6: invalid TOML: Invalid value"


def test_recipe_file_not_found():
    with pytest.raises(RecipeError) as info:
        load_recipe("recipes/none.toml")
    assert str(info.value) == "recipe recipes/none.toml has 1 problem:\n  file not found: recipes/none.toml"


# ------------------------------------------------------------------------------------ many problems


def test_every_problem_at_once_in_schema_order(in_project):
    path = in_project / "recipes" / "x.toml"
    path.parent.mkdir()
    path.write_text(textwrap.dedent("""\
        [output]
        dir = "runs/demo"

        [mezo]
        steps = -1
        lr = 1e-6
        lrr = 1e-5
        eps = 1e-3
        batch_size = 16
        seed = 0

        [data]
        train = "data/x.jsonl"

        [model]
        path = "m"
        """))
    with pytest.raises(RecipeError) as info:
        load_recipe("recipes/x.toml")
    assert str(info.value) == (
        "recipe recipes/x.toml has 3 problems:\n"
        "  data.train: file not found: data/x.jsonl\n"
        "  mezo.lrr: unknown key (did you mean 'lr'?)\n"
        "  mezo.steps: must be > 0 (got -1)"
    )
    assert info.value.source == "recipes/x.toml"
    assert info.value.problems == [
        "data.train: file not found: data/x.jsonl",
        "mezo.lrr: unknown key (did you mean 'lr'?)",
        "mezo.steps: must be > 0 (got -1)",
    ]


def test_cross_field_problems_reported_alongside_field_problems():
    text = MINIMAL_LM.replace("seed = 0", "seed = -3\nmin_lr = 1.0").replace("steps = 1000", "steps = 0")
    text += '\n[task]\ntype = "classification"\n'
    text = text.replace('path = "embedded:smollm2-135m"', 'pth = "m"')
    assert problems_of(text) == (
        "recipe recipes/x.toml has 6 problems:\n"
        "  model.pth: unknown key (did you mean 'path'?)\n"
        "  model.path: required key is missing\n"
        '  task.verbalizer: required when type = "classification": a table of label = "word", with at least 2 labels\n'
        "  mezo.steps: must be > 0 (got 0)\n"
        "  mezo.seed: must be >= 0 (got -3)\n"
        "  mezo.min_lr: must be <= lr (got min_lr = 1.0, lr = 1e-06)"
    )


def test_empty_recipe_lists_required_sections():
    assert problems_of("") == (
        "recipe recipes/x.toml has 4 problems:\n"
        "  model: required section is missing\n"
        "  data: required section is missing\n"
        "  mezo: required section is missing\n"
        "  output: required section is missing"
    )


# ---------------------------------------------------------------------------------------- overrides


def test_override_float():
    assert parse_recipe(MINIMAL_LM, overrides=["mezo.lr=1e-5"]).mezo.lr == 1e-5


def test_override_int_bool_and_spaces():
    recipe = parse_recipe(MINIMAL_LM, overrides=["mezo.steps = 20", "output.save_final=false"])
    assert recipe.mezo.steps == 20
    assert recipe.output.save_final is False


def test_override_string_fallback():
    recipe = parse_recipe(MINIMAL_LM, overrides=["model.path=/some/dir", "model.device=cuda:0", "model.dtype=bfloat16"])
    assert recipe.model.path == "/some/dir"
    assert recipe.model.device == "cuda:0"
    assert recipe.model.dtype == "bfloat16"


def test_override_text_key_keeps_text_that_looks_like_a_number():
    recipe = parse_recipe(MINIMAL_LM, overrides=["output.dir=2024", 'model.revision="v1.0"'])
    assert recipe.output.dir == "2024"
    assert recipe.model.revision == "v1.0"


def test_override_inline_table():
    recipe = parse_recipe(MINIMAL_LM, overrides=['task.type=classification', 'task.verbalizer={a=" a", b=" b"}'])
    assert recipe.task.verbalizer == {"a": " a", "b": " b"}


def test_override_nested_key():
    recipe = parse_recipe(MINIMAL_CLASSIFICATION, overrides=['task.verbalizer.positive=" good"'])
    assert recipe.task.verbalizer == {"positive": " good", "negative": " negative"}


def test_override_list():
    assert parse_recipe(MINIMAL_LM, overrides=['model.freeze=["lm_head*"]']).model.freeze == ("lm_head*",)


def test_override_adds_missing_section_and_key():
    text = MINIMAL_LM.replace('[output]\ndir = "runs/demo"\n', "")
    assert parse_recipe(text, overrides=["output.dir=runs/x"]).output.dir == "runs/x"


def test_override_value_is_validated():
    assert problems_of(MINIMAL_LM, overrides=["mezo.lr=fast"]) == one_problem(
        'mezo.lr: expected a number (got "fast")'
    )


def test_override_unknown_key():
    assert problems_of(MINIMAL_LM, overrides=["mezo.lrr=1e-5"]) == one_problem(
        "mezo.lrr: unknown key (did you mean 'lr'?)"
    )


def test_bad_overrides_reported_with_other_problems():
    assert problems_of(MINIMAL_LM, overrides=["mezo.lr", "lr=1e-5", "mezo.=3", "mezo.steps=0"]) == (
        "recipe recipes/x.toml has 4 problems:\n"
        '  override "mezo.lr": expected section.key=value\n'
        '  override "lr=1e-5": expected section.key=value (did you mean mezo.lr?)\n'
        '  override "mezo.=3": expected section.key=value\n'
        "  mezo.steps: must be > 0 (got 0)"
    )


def test_override_into_a_value_that_is_not_a_table():
    assert problems_of(MINIMAL_LM, overrides=["mezo.lr.x=1"]) == one_problem(
        'override "mezo.lr.x=1": mezo.lr is not a table'
    )


def test_load_recipe_applies_overrides(in_project):
    path = in_project / "r.toml"
    path.write_text(MINIMAL_LM)
    assert load_recipe(path, overrides=["mezo.seed=7"]).mezo.seed == 7


# ---------------------------------------------------------------------------------------- round trip


@pytest.mark.parametrize("text", [MINIMAL_LM, MINIMAL_CLASSIFICATION])
def test_recipe_to_toml_round_trip(text):
    recipe = parse_recipe(
        text, overrides=['model.freeze=["lm_head*"]', "model.revision=main", "data.eval=data/eval.jsonl"]
    )
    resolved = recipe_to_toml(recipe)
    assert 'keyframe_every = 100' in resolved  # defaults are written out
    again = parse_recipe(resolved)
    assert again == recipe
    assert recipe_to_toml(again) == resolved


def test_recipe_to_toml_leaves_out_unset_optionals():
    resolved = recipe_to_toml(parse_recipe(MINIMAL_LM))
    assert "revision" not in resolved and "eval =" not in resolved and "verbalizer" not in resolved
    assert parse_recipe(resolved) == parse_recipe(MINIMAL_LM)


# ------------------------------------------------------------------------------------- construction


def test_direct_construction_still_checks_cross_fields():
    with pytest.raises(ValueError, match="min_lr: must be <= lr"):
        Recipe(
            model={"path": "m"},
            data={"train": "t"},
            mezo=dict(lr=1e-6, eps=1e-3, steps=1, batch_size=1, seed=0, min_lr=1.0),
            output={"dir": "o"},
        )


def test_module_imports_no_torch():
    code = "import sys, mezo_tune.recipe; assert 'torch' not in sys.modules and 'transformers' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)


# ---------------------------------------------------------------------------------------------- tasks, data, optim


def test_new_task_types_data_and_optim_keys():
    text = MINIMAL_LM.replace('train = "data/train.jsonl"', 'train = "data/train.jsonl"\n'
                              'columns = { context = "question", answers = "gold" }\ntrain_k = 16\nseed = 3')
    text += '\n[task]\ntype = "generation"\nobjective = "f1"\nmax_new_tokens = 8\nstop = ["\\n", "."]\n'
    recipe = parse_recipe(text)
    assert recipe.task.template == "{context}" and recipe.task.stop == ("\n", ".")
    assert recipe.data.columns == {"context": "question", "answers": "gold"} and recipe.data.train_k == 16
    mc = parse_recipe(MINIMAL_LM + '\n[task]\ntype = "multiple_choice"\nscore = "mean"\n\n[optim]\ntype = "adamw"\n'
                      'lr = 1e-4\nweight_decay = 0.01\n')
    assert (mc.task.template, mc.task.score, mc.optim.type, mc.optim.lr) == ("{context}", "mean", "adamw", 1e-4)
    assert parse_recipe(recipe_to_toml(mc)) == mc


def test_objective_must_fit_the_task_type():
    assert problems_of(MINIMAL_LM + '\n[task]\nobjective = "accuracy"\n') == one_problem(
        'task.objective: "accuracy" is not available for type = "lm" (use cross_entropy)')
    assert problems_of(MINIMAL_CLASSIFICATION + 'objective = "f1"\n') == one_problem(
        'task.objective: "f1" is not available for type = "classification" (use cross_entropy or accuracy)')
    assert problems_of(MINIMAL_LM + '\n[task]\nobjective = "bleu"\n') == one_problem(
        'task.objective: must be one of cross_entropy, accuracy, f1 (got "bleu")')


def test_backprop_needs_a_differentiable_objective():
    text = MINIMAL_CLASSIFICATION + 'objective = "accuracy"\n\n[optim]\ntype = "adamw"\n'
    assert problems_of(text) == one_problem(
        'optim.type: backprop needs a differentiable loss; task.objective = "accuracy" trains only with MeZO '
        '(set optim.type = "mezo" or task.objective = "cross_entropy")')
    assert problems_of(MINIMAL_LM + '\n[optim]\ntype = "sgd"\nlr = 0\n') == (
        "recipe recipes/x.toml has 2 problems:\n"
        '  optim.type: must be one of mezo, adamw (got "sgd")\n'
        "  optim.lr: must be > 0 (got 0)")


def test_new_task_and_data_key_errors():
    text = MINIMAL_LM.replace('train = "data/train.jsonl"', 'train = "data/train.jsonl"\ntrain_k = -1\n'
                              'columns = { text = "" }')
    text += '\n[task]\ntype = "multiple_choice"\nscore = "max"\nmax_new_tokens = 0\n'
    assert problems_of(text) == (
        "recipe recipes/x.toml has 4 problems:\n"
        "  data.columns.text: must not be empty\n"
        "  data.train_k: must be >= 0 (got -1)\n"
        '  task.score: must be one of sum, mean (got "max")\n'
        "  task.max_new_tokens: must be > 0 (got 0)")


def test_dev_from_train_excludes_data_eval_and_serves_eval_every():
    with_eval = MINIMAL_LM.replace('train = "data/train.jsonl"',
                                   'train = "data/train.jsonl"\neval = "data/eval.jsonl"\ndev_from_train = 5')
    assert problems_of(with_eval) == one_problem(
        "data.dev_from_train: takes the eval set out of data.train, but data.eval is set too; "
        "remove data.eval or set dev_from_train = 0")
    dev = MINIMAL_LM.replace('train = "data/train.jsonl"', 'train = "data/train.jsonl"\ndev_from_train = 5')
    assert parse_recipe(dev.replace('dir = "runs/demo"', 'dir = "runs/demo"\neval_every = 50')).output.eval_every == 50


def test_hf_dataset_spec_is_parsed_not_downloaded():
    recipe = parse_recipe(MINIMAL_LM.replace('"data/train.jsonl"', '"hf:imdb:train"'))
    assert recipe.data.train == "hf:imdb:train"
    assert problems_of(MINIMAL_LM.replace('"data/train.jsonl"', '"hf:imdb"')) == one_problem(
        "data.train: 'hf:imdb' is not a Hugging Face dataset spec; write hf:NAME:SPLIT or hf:NAME:CONFIG:SPLIT, "
        "e.g. hf:imdb:train or hf:glue:sst2:validation")


def test_fzoo_draws_rademacher_unless_the_recipe_says_otherwise():
    """FZOO's paper draws ±1 directions: its default; SPSA keeps Gaussian; an explicit choice is kept."""
    fzoo = MINIMAL_LM.replace("lr = 1e-6", 'lr = 1e-6\nestimator = "fzoo"\ndirections = 4')
    assert parse_recipe(fzoo).mezo.distribution == "rademacher"
    assert parse_recipe(MINIMAL_LM).mezo.distribution == "gaussian"
    assert parse_recipe(fzoo.replace("directions = 4", 'directions = 4\ndistribution = "gaussian"')
                        ).mezo.distribution == "gaussian"
