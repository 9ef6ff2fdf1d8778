"""Learning that converges (issue #15): lr schedules with warmup, n-SPSA (K directions per step), dev evals recorded
in the trajectory, `output.keep = "best"`, `replay --best` and early stopping — each replaying bit for bit.

Tiny llama of conftest.py on CPU, `mezo.compile = "off"`; runs go through the click CLI in-process.
"""

from __future__ import annotations

import math
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import tomli_w
from conftest import SENTIMENT_ROWS, write_jsonl

from mezo_tune.mezo import learning_rate
from mezo_tune.recipe import RecipeError, parse_recipe
from mezo_tune.trajectory import TrajectoryWriter, best_eval, read_trajectory
from test_train import TEMPLATE, VERBALIZER, assert_same_weights, cli, train_cli


def recipe_file(tmp_path: Path, model_dir, *, out: str = "runs/x", mezo: dict | None = None,
                output: dict | None = None, name: str = "r.toml") -> Path:
    train = write_jsonl(tmp_path / "train.jsonl", SENTIMENT_ROWS * 2)
    ev = write_jsonl(tmp_path / "eval.jsonl", SENTIMENT_ROWS)
    recipe = {
        "model": {"path": str(model_dir), "device": "cpu"},
        "data": {"train": str(train), "eval": str(ev), "max_length": 32},
        "task": {"type": "classification", "template": TEMPLATE, "verbalizer": VERBALIZER},
        "mezo": {"lr": 5e-2, "eps": 1e-2, "steps": 6, "batch_size": 2, "seed": 3, "keyframe_every": 2,
                 "compile": "off", **(mezo or {})},
        "output": {"dir": str(tmp_path / out), "checkpoint_every": 0, **(output or {})},
    }
    path = tmp_path / name
    path.write_text(tomli_w.dumps(recipe))
    return path


# ---- schedules -----------------------------------------------------------------------------------------------------

def f32(x: float) -> float:
    return float(np.float32(x))


def test_warmup_then_linear_and_constant_are_exact():
    # warmup: lr·(t+1)/W, then the schedule over the remaining steps (t = W .. steps-1)
    assert [learning_rate(t, 1e-3, 10, "linear", 1e-4, warmup_steps=4) for t in range(10)] == [
        f32(1e-3 * 1 / 4), f32(1e-3 * 2 / 4), f32(1e-3 * 3 / 4), f32(1e-3),
        *(f32(1e-3 + (1e-4 - 1e-3) * (t - 4) / 5) for t in range(4, 10))]
    assert learning_rate(9, 1e-3, 10, "linear", 1e-4, warmup_steps=4) == f32(1e-4)
    assert [learning_rate(t, 2e-5, 5, "constant", warmup_steps=2) for t in range(5)] == [
        f32(1e-5), f32(2e-5), f32(2e-5), f32(2e-5), f32(2e-5)]


def test_cosine_goes_from_lr_to_min_lr():
    etas = [learning_rate(t, 1e-3, 12, "cosine", 1e-5, warmup_steps=1) for t in range(12)]
    assert etas[0] == f32(1e-3 / 1) and etas[1] == f32(1e-3) and etas[-1] == f32(1e-5)
    # half way through the decay (t = 6 of 1..11): the mean of lr and min_lr (cos from libm: a tolerance)
    assert etas[6] == pytest.approx((1e-3 + 1e-5) / 2, rel=1e-6)
    assert all(a >= b for a, b in zip(etas[1:], etas[2:]))


BASE_RECIPE = """
[model]
path = "m"
[data]
train = "t.jsonl"
[task]
type = "classification"
verbalizer = {a = " a", b = " b"}
[mezo]
lr = 1e-3
eps = 1e-3
steps = 10
batch_size = 2
seed = 0
[output]
dir = "r"
"""


def test_bad_learning_settings_are_named_at_once():
    with pytest.raises(RecipeError) as info:
        parse_recipe(BASE_RECIPE, "x.toml", check_files=False, overrides=[
            "mezo.warmup_steps=10", "mezo.schedule=cosine", "mezo.directions=0", "output.keep=best",
            "output.select=f1", "output.patience=2"])
    assert str(info.value) == "\n".join([
        "recipe x.toml has 5 problems:",
        "  mezo.warmup_steps: must be < steps (got warmup_steps = 10, steps = 10)",
        "  mezo.directions: must be > 0 (got 0)",
        '  output.keep: choosing the best step needs eval data; set data.eval (or data.dev_from_train) or '
        'keep = "last"',
        '  output.select: a classification task reports accuracy, loss (got "f1"); set one of them or "auto"',
        "  output.patience: early stopping counts evals: set output.eval_every > 0, or patience = 0",
    ])


# ---- n-SPSA: K directions per step ---------------------------------------------------------------------------------

def test_directions_record_k_scalars_per_step_and_replay_bit_equal(tmp_path, tiny_model_dirs):
    recipe = recipe_file(tmp_path, tiny_model_dirs(), mezo={"directions": 3})
    train_cli(recipe)
    traj = tmp_path / "runs/x/trajectory.mezo"
    data = read_trajectory(traj)
    assert data.header["estimator"] == {"name": "spsa", "directions": 3}
    assert [r.step for r in data.steps] == list(range(18)) and data.end["steps"] == 18
    assert {r.eta for r in data.steps} == {f32(5e-2 / 3)}  # each direction carries η/K
    # a step's K directions score the same batch at the same θ, but each has its own z: K different g's
    assert len({r.g for r in data.steps[:3]}) == 3
    assert sorted(data.keyframes) == [-1, 5, 11, 17]  # after steps 2, 4, 6: their last records
    assert [e["step"] for e in data.evals] == [-1, 17]
    cli("replay", traj, "--out", tmp_path / "rep", "--verify", "-q")
    assert_same_weights(tmp_path / "runs/x/final/model.safetensors", tmp_path / "rep/model.safetensors")


def _copy_first_records(src: Path, dst: Path, n: int, killed: bool = False) -> None:
    """A trajectory as a crash after record n - 1 leaves it: the first n records, keyframes and evals up to there;
    killed: as a SIGKILL leaves it, the records after the last block in the step journal only."""
    data = read_trajectory(src)
    evals = {e["step"]: {k: v for k, v in e.items() if k != "step"} for e in data.evals}
    dst.parent.mkdir(parents=True)
    w = TrajectoryWriter.create(dst, data.header)
    for step in (-1, *range(n)):
        if step >= 0:
            w.append_step(data.steps[step])
        if step in data.keyframes:
            w.append_keyframe(step, data.keyframes[step])
        if step in evals:
            w.append_eval(step, evals[step])
    if killed:  # the writer never closes
        os.close(w._fd)
        os.close(w._journal_fd)
    else:
        w.close()


@pytest.mark.parametrize("cut", [7, 9], ids=["inside-a-step", "at-a-step-end"])
def test_resume_inside_a_step_of_k_directions_is_bit_identical(tmp_path, tiny_model_dirs, cut):
    recipe = recipe_file(tmp_path, tiny_model_dirs(), mezo={"directions": 3})
    train_cli(recipe)
    full = read_trajectory(tmp_path / "runs/x/trajectory.mezo")

    crashed = recipe_file(tmp_path, tiny_model_dirs(), out="runs/y", mezo={"directions": 3}, name="y.toml")
    _copy_first_records(tmp_path / "runs/x/trajectory.mezo", tmp_path / "runs/y/trajectory.mezo", cut)
    train_cli(crashed, "--resume")
    resumed = read_trajectory(tmp_path / "runs/y/trajectory.mezo")
    # the recorded directions of the interrupted step were not scored again: their records come back unchanged, and
    # every later one, the keyframes, the evals and the final weights equal the uninterrupted run's
    assert resumed.steps == full.steps
    assert resumed.keyframes == full.keyframes and resumed.end == full.end
    assert [e["step"] for e in resumed.evals] == [e["step"] for e in full.evals]
    assert_same_weights(tmp_path / "runs/x/final/model.safetensors", tmp_path / "runs/y/final/model.safetensors")


# ---- dev evals in the trajectory, keep = "best", replay --best, early stopping -------------------------------------

def test_evals_are_recorded_and_final_keeps_the_dev_best(tmp_path, tiny_model_dirs):
    # lr 1 throws the tiny model far off (dev loss 0.69 -> hundreds and more), so the best eval is the one before
    # training by a wide margin on any CPU, and final/ must hold the base weights: rebuilt by replaying 0 records
    recipe = recipe_file(tmp_path, tiny_model_dirs(), mezo={"steps": 6, "lr": 1.0},
                         output={"eval_every": 2, "keep": "best", "select": "loss"})
    out = train_cli(recipe).output
    traj = tmp_path / "runs/x/trajectory.mezo"
    data = read_trajectory(traj)
    assert data.header["select"] == {"metric": "loss", "lower_is_better": True}
    assert [e["step"] for e in data.evals] == [-1, 1, 3, 5]
    assert all(set(e) >= {"step", "accuracy", "loss", "correct", "n"} for e in data.evals)
    best = data.evals[0]
    assert best["loss"] < 1 < min(e["loss"] for e in data.evals[1:])
    assert f"best eval: loss {best['loss']:.4f} after record -1 (kept in final/)" in out
    # final/ holds the weights of the best eval, exactly as replay --best (and --steps) rebuilds them
    cli("replay", traj, "--out", tmp_path / "best", "--best", "-q")
    cli("replay", traj, "--out", tmp_path / "steps", "--steps", "0", "-q")
    assert_same_weights(tmp_path / "runs/x/final/model.safetensors", tmp_path / "best/model.safetensors")
    assert_same_weights(tmp_path / "steps/model.safetensors", tmp_path / "best/model.safetensors")
    # inspect shows the curve and marks the best
    text = cli("inspect", traj).output
    assert f"evals       4; best loss {best['loss']:.4f} after step -1 (`replay --best`)" in text
    assert [line.endswith("<- best") for line in text.splitlines() if line.startswith("  after ")] == [
        True, False, False, False]


def test_best_eval_picks_the_earliest_of_equals_and_knows_which_way_is_better():
    evals = [{"step": -1, "accuracy": 0.5, "loss": 0.7}, {"step": 3, "accuracy": 0.75, "loss": 0.6},
             {"step": 7, "accuracy": 0.75, "loss": 0.5}, {"step": 9, "accuracy": 0.6, "loss": None}]
    assert best_eval(evals, {"metric": "accuracy", "lower_is_better": False})["step"] == 3
    assert best_eval(evals, {"metric": "loss", "lower_is_better": True})["step"] == 7
    assert best_eval(evals, {"metric": "f1", "lower_is_better": False}) is None
    assert best_eval(evals, None) is None


def test_replay_best_without_evals_is_refused(tmp_path, tiny_model_dirs):
    recipe = recipe_file(tmp_path, tiny_model_dirs())
    shutil.copy(recipe, tmp_path / "r2.toml")
    text = (tmp_path / "r2.toml").read_text()
    (tmp_path / "r2.toml").write_text(text.replace(f'eval = "{tmp_path}/eval.jsonl"\n', ""))
    train_cli(tmp_path / "r2.toml")
    traj = tmp_path / "runs/x/trajectory.mezo"
    result = cli("replay", traj, "--out", tmp_path / "rep", "--best", "-q", ok=False)
    assert result.exit_code == 1
    assert result.output == (f"error: --best: {traj} records no dev evals to choose from (the run had no eval data, "
                             "or was recorded before mezo-tune kept evals in the trajectory); use --steps N\n")
    result = cli("replay", traj, "--out", tmp_path / "rep", "--best", "--steps", "2", "-q", ok=False)
    assert result.output == "error: --best and --steps both say which step to rebuild: give one of them\n"


def test_patience_stops_a_run_that_no_longer_improves(tmp_path, tiny_model_dirs):
    # lr so small that the dev accuracy cannot change: no eval improves on the first, so patience 2 stops the run
    # after its second periodic eval (step 4 of 8), and the trajectory ends there, finished and replayable
    recipe = recipe_file(tmp_path, tiny_model_dirs(), mezo={"steps": 8, "lr": 1e-9},
                         output={"eval_every": 2, "patience": 2})
    out = train_cli(recipe).output
    assert "stopped early after step 4 (output.patience)" in out
    traj = tmp_path / "runs/x/trajectory.mezo"
    data = read_trajectory(traj)
    assert len(data.steps) == 4 and data.end["steps"] == 4
    assert [e["step"] for e in data.evals] == [-1, 1, 3]
    cli("replay", traj, "--out", tmp_path / "rep", "--verify", "-q")
    assert_same_weights(tmp_path / "runs/x/final/model.safetensors", tmp_path / "rep/model.safetensors")
    result = cli("train", recipe, "-q", "--resume", ok=False)
    assert "this run already finished (4 steps)" in result.output
    assert math.isfinite(data.evals[-1]["loss"])


# ---- momentum rebuilt from the seeds -------------------------------------------------------------------------------

def test_momentum_weights_sum_to_one_and_are_portable():
    from mezo_tune.mezo import UpdateRule

    rule = UpdateRule(0.9, 4)
    total = 1 + 0.9 + 0.81 + 0.9 * 0.9 * 0.9
    assert rule.weights == tuple(f32(p / total) for p in (1.0, 0.9, 0.9 * 0.9, 0.9 * 0.9 * 0.9))
    assert UpdateRule().weights == (1.0,) and UpdateRule().header() == {"name": "sgd"}
    assert UpdateRule.from_header(rule.header()) == rule
    with pytest.raises(ValueError, match="this mezo-tune knows sgd, momentum v1 and adam v1"):
        UpdateRule.from_header({"name": "lion"})


def test_momentum_equals_its_formula_on_the_weights():
    """Three records by hand: θ_3 = θ_0 - Σ_r Σ_k fp32(η_r·w_k)·g_{r-k}·z_{r-k}, applied oldest first."""
    from conftest import build_model

    from mezo_tune.mezo import Mezo, UpdateRule, applied_scale, trainable_set

    records = [{"step": r, "eta": f32(1e-3), "g": g, "skipped": False} for r, g in enumerate((0.5, -2.0, 1.25))]
    rule = UpdateRule(0.5, 2)
    a, b = build_model("llama"), build_model("llama")
    engine = Mezo(a, trainable_set(a), seed=4, eps=1e-3, rule=rule)
    for rec in records:
        engine.apply_record(rec)
    by_hand = Mezo(b, trainable_set(b), seed=4, eps=1e-3)
    for r, rec in enumerate(records):
        for j in range(max(0, r - 1), r + 1):
            by_hand.apply_update(j, applied_scale(f32(rec["eta"] * rule.weights[r - j]), records[j]["g"]))
    assert engine.digest() == by_hand.digest()


def test_momentum_replays_and_resumes_from_a_checkpoint_bit_for_bit(tmp_path, tiny_model_dirs):
    from types import SimpleNamespace

    from mezo_tune.replay import rebuild
    from mezo_tune.train import save_checkpoint

    mezo = {"steps": 8, "momentum": 0.9, "momentum_window": 4}
    train_cli(recipe_file(tmp_path, tiny_model_dirs(), mezo=mezo))
    traj = tmp_path / "runs/x/trajectory.mezo"
    data = read_trajectory(traj)
    assert data.header["update_rule"] == {"name": "momentum", "version": 1, "beta": 0.9, "window": 4}
    cli("replay", traj, "--out", tmp_path / "rep", "--verify", "-q")
    assert_same_weights(tmp_path / "runs/x/final/model.safetensors", tmp_path / "rep/model.safetensors")

    # A crash after record 5 with a checkpoint after record 3: resume loads the checkpoint, rebuilds the window of
    # records 0..3 that momentum reads (without applying them again) and replays 4..5. Without that window record 4's
    # update would miss three terms and the keyframe after step 6 would not match.
    crashed = recipe_file(tmp_path, tiny_model_dirs(), out="runs/y", mezo=mezo, name="y.toml")
    _copy_first_records(traj, tmp_path / "runs/y/trajectory.mezo", 6)
    at_3 = rebuild(traj, steps=4, progress=False, log=lambda m: None)
    save_checkpoint(tmp_path / "runs/y", SimpleNamespace(trainable=at_3.engine.trainable, engine=at_3.engine), 3)
    out = cli("train", crashed, "-q", "--resume").output
    assert "(checkpoint at step 3, replaying 2 steps)" in out
    assert read_trajectory(tmp_path / "runs/y/trajectory.mezo").steps == data.steps
    assert_same_weights(tmp_path / "runs/x/final/model.safetensors", tmp_path / "runs/y/final/model.safetensors")


def test_momentum_window_longer_than_the_run_is_refused():
    with pytest.raises(RecipeError) as info:
        parse_recipe(BASE_RECIPE, "x.toml", check_files=False,
                     overrides=["mezo.momentum=0.9", "mezo.momentum_window=11", "mezo.momentum_window=11"])
    assert str(info.value) == ("recipe x.toml has 1 problem:\n  mezo.momentum_window: must not be longer than the run "
                               "(got momentum_window = 11, steps × directions = 10)")
    with pytest.raises(RecipeError, match=r"mezo.momentum: must be < 1 \(got 1.0\)"):
        parse_recipe(BASE_RECIPE, "x.toml", check_files=False, overrides=["mezo.momentum=1.0"])
