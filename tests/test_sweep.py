"""`mezo-tune sweep`: a grid of short runs over one loaded model, each bit-equal to its own `train`; validation before
anything is written; resuming after a kill; refusing another grid in the same directory.

Tiny models of conftest.py on CPU, a few steps each; recipes from test_train's `lm_recipe` / `write_recipe`."""

from __future__ import annotations

import importlib.util
import json
import os
import re
from pathlib import Path

import pytest
from test_train import blocks, cli, lm_recipe, train_cli, write_recipe  # noqa: F401 (lm_recipe is a fixture)

from mezo_tune import sweep as sweep_mod, trajectory
from mezo_tune.recipe import load_recipe
from mezo_tune.replay import rebuild
from mezo_tune.trajectory import read_trajectory


HAVE_MATPLOTLIB = importlib.util.find_spec("matplotlib") is not None


def progress_lines(output: str) -> list[str]:
    return [line for line in output.splitlines() if re.match(r"run \d+/\d+: ", line)]


def end_digest(traj) -> str:
    return read_trajectory(traj).end["digest"]


def independent_digest(recipe: Path, tmp_path: Path, name: str, *overrides: str) -> str:
    """The end digest of an ordinary `train` of the recipe with these overrides (its own process state, own load)."""
    out = tmp_path / "alone" / name
    sets = [a for o in (*overrides, f"output.dir={out}") for a in ("--set", o)]
    train_cli(recipe, *sets)
    return end_digest(out / "trajectory.mezo")


@pytest.fixture
def cls_recipe(tmp_path, sentiment_files, tiny_model_dirs):
    train, ev = sentiment_files
    return write_recipe(tmp_path / "cls.toml", tiny_model_dirs("llama", "float32"), train, ev,
                        out=tmp_path / "runs" / "cls", task="classification", steps=20, eval_every=2)


def test_sweep_2x2_rows_best_and_bit_equal_runs(cls_recipe, tmp_path):
    result = cli("sweep", cls_recipe, "--grid", "mezo.lr=1e-3,1e-2", "--grid", "mezo.eps=1e-3,1e-2",
                 "--steps", "3", "--set", "mezo.seed=3", "-q")
    out = tmp_path / "runs" / "cls-sweep"  # <output.dir>-sweep
    names = ["run-000-lr0.001-eps0.001", "run-001-lr0.001-eps0.01", "run-002-lr0.01-eps0.001",
             "run-003-lr0.01-eps0.01"]
    chart = ["sweep.png"] if HAVE_MATPLOTLIB else []  # optional: without it, no chart (and a note)
    assert sorted(p.name for p in out.iterdir()) == sorted(names + ["best.toml", "sweep.json", *chart])
    for k, label in enumerate(["mezo.lr=0.001 mezo.eps=0.001", "mezo.lr=0.001 mezo.eps=0.01",
                               "mezo.lr=0.01 mezo.eps=0.001", "mezo.lr=0.01 mezo.eps=0.01"], 1):
        assert f"run {k}/4: {label}\n" in result.output

    state = json.loads((out / "sweep.json").read_text())
    rows = state["rows"]
    assert [r["name"] for r in rows] == names
    assert [r["values"] for r in rows] == [{"mezo.lr": lr, "mezo.eps": eps} for lr in (1e-3, 1e-2)
                                           for eps in (1e-3, 1e-2)]
    assert state["complete"] is True
    assert state["model_seconds"]["loads"] and len(state["model_seconds"]["loads"]) == 1  # one load, 3 reuses
    assert len(state["model_seconds"]["restores"]) == 3
    for r in rows:
        run_dir = out / r["name"]
        recipe = load_recipe(run_dir / "recipe.toml")  # --set and --steps apply to every run; no final/ by default
        assert (recipe.mezo.seed, recipe.mezo.steps, recipe.output.save_final) == (3, 3, False)
        assert (recipe.mezo.lr, recipe.mezo.eps) == (r["values"]["mezo.lr"], r["values"]["mezo.eps"])
        assert sorted(p.name for p in run_dir.iterdir()) == ["metrics.jsonl", "recipe.toml", "trajectory.mezo"]
        # the row holds what the run's own files say
        assert r["trajectory"] == str(run_dir / "trajectory.mezo")
        assert read_trajectory(r["trajectory"]).end == {"digest": end_digest(r["trajectory"]), "steps": 3}
        evals = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
        evals = [{"step": e["step"], "loss": e["eval"]["loss"], "accuracy": e["eval"]["accuracy"]}
                 for e in evals if "eval" in e]
        assert [e["step"] for e in evals] == [-1, 1, 2]  # before, at step 2 (eval_every), after the 3rd
        assert r["evals"] == evals and r["metric"] == "accuracy" and r["final"] == evals[-1]["accuracy"]
        best = max(evals, key=lambda e: e["accuracy"])  # the first of the best
        assert (r["best"], r["best_step"]) == (best["accuracy"], best["step"])
        losses = [(s.loss_plus + s.loss_minus) / 2 for s in read_trajectory(r["trajectory"]).steps]
        assert r["train_loss"] == pytest.approx(sum(losses) / 3, rel=1e-6)  # float32 losses summed in float64
        assert r["wall_s"] > 0 and r["resumed"] is False
        # one line of the table per run: its number, values and trajectory
        assert any(line.split()[:3] == [str(r["run"]), *(str(v) for v in r["values"].values())]
                   and line.endswith(r["trajectory"]) for line in result.output.splitlines())
    expected_best = min(rows, key=lambda r: (-r["final"], r["evals"][-1]["loss"], r["run"]))
    assert state["best"]["name"] == expected_best["name"]
    assert (out / "best.toml").read_text() == (out / expected_best["name"] / "recipe.toml").read_text()
    assert f"best: {expected_best['name']} by final dev accuracy (ties: lower dev loss); its recipe: " \
           f"{out / 'best.toml'}\n" in result.output
    if HAVE_MATPLOTLIB:
        assert (out / "sweep.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    else:
        assert "matplotlib is not installed: no sweep.png (pip install matplotlib)\n" in result.output

    # each run replays bit-equal, and equals an ordinary train of the same overrides (the reused model was restored)
    for r in rows:
        rebuilt = rebuild(r["trajectory"], device="cpu", progress=False, log=lambda m: None)
        assert rebuilt.engine.digest().hex() == end_digest(r["trajectory"]), r["name"]
        assert independent_digest(cls_recipe, tmp_path, r["name"], "mezo.steps=3", "mezo.seed=3",
                                  *(f"{k}={v}" for k, v in r["values"].items())) == end_digest(r["trajectory"])


def test_sweep_over_adapter_type_reuses_the_model_bit_exactly(lm_recipe, tmp_path):
    """LoRA, full-weight and prefix runs follow each other on one model (each kind after each other kind): LoRA is
    detached, full-weight writes are copied back, prefix tuning leaves the model as it was."""
    recipe = lm_recipe(steps=3)
    cli("sweep", recipe, "--grid", "mezo.lr=1e-3,1e-2", "--grid", "adapter.type=lora,none,prefix", "--out",
        tmp_path / "sw", "-q")
    state = json.loads((tmp_path / "sw" / "sweep.json").read_text())
    assert [r["name"] for r in state["rows"]] == [f"run-00{i}-lr{lr}-type{kind}" for i, (lr, kind) in enumerate(
        (lr, kind) for lr in ("0.001", "0.01") for kind in ("lora", "none", "prefix"))]
    assert len(state["model_seconds"]["loads"]) == 1
    assert state["best"]["by"] == "final dev loss"
    for r in state["rows"]:
        sets = [f"{k}={v}" for k, v in r["values"].items()]
        assert independent_digest(recipe, tmp_path, r["name"], *sets) == end_digest(r["trajectory"]), r["name"]


def test_grid_problems_exit_2_all_at_once_and_nothing_written(lm_recipe, tmp_path):
    recipe = lm_recipe()
    result = cli("sweep", recipe, "--grid", "mezo.lrr=1e-3,1e-2", "--out", tmp_path / "sw", ok=False)
    assert result.exit_code == 2
    assert result.output == (f"error: recipe {recipe} has 1 problem:\n"
                             "  --grid mezo.lrr: unknown key (did you mean 'lr'?)\n")
    result = cli("sweep", recipe, "--grid", "mezo.eps=1e-3,-1", "--grid", "mezo.lr=", "--grid", "output.dir=a,b",
                 "--grid", "mezo.seed=1,1", "--grid", "mezo.min_lr=0.5", "--out", tmp_path / "sw", ok=False)
    assert result.exit_code == 2
    assert result.output == (
        f"error: recipe {recipe} has 5 problems:\n"
        "  --grid mezo.lr: no values; list them after '=', separated by commas\n"
        "  --grid output.dir: set by the sweep for each run (DIR/run-NNN-...); choose DIR with --out\n"
        "  --grid mezo.seed: 1 listed twice\n"
        "  --grid mezo.min_lr: must be <= lr (got min_lr = 0.5, lr = 0.001)\n"
        "  --grid mezo.eps: must be > 0 (got -1)\n")
    result = cli("sweep", recipe, "--grid", "mezo.eps=1e-3,-1", "--grid", "mezo.min_lr=0,0.5", ok=False)
    assert result.exit_code == 2
    assert result.output == (f"error: recipe {recipe} has 2 problems:\n"  # in grid order: (1e-3, 0.5) first
                             "  --grid mezo.min_lr: must be <= lr (got min_lr = 0.5, lr = 0.001)\n"
                             "  --grid mezo.eps: must be > 0 (got -1)\n")
    result = cli("sweep", recipe, ok=False)
    assert (result.exit_code, result.output) == (
        2, f"error: recipe {recipe} has 1 problem:\n"
           "  --grid: no grid given; add at least one, e.g. --grid mezo.lr=1e-6,1e-5\n")
    assert not (tmp_path / "sw").exists() and not (tmp_path / "runs").exists()


def test_interrupted_sweep_resumes_without_redoing_finished_runs(lm_recipe, tmp_path):
    recipe = lm_recipe(steps=6)
    args = ["sweep", recipe, "--grid", "mezo.lr=1e-3,1e-2,3e-2", "--out", tmp_path / "sw", "-q"]
    plan = sweep_mod.plan_sweep(recipe, ["mezo.lr=1e-3,1e-2,3e-2"], out=str(tmp_path / "sw"))
    first = sweep_mod.run_sweep(plan, progress=False, max_runs=2, log=lambda m: None)  # then "killed"
    assert [r["name"] for r in first["rows"]] == ["run-000-lr0.001", "run-001-lr0.01"]
    assert first["complete"] is False and not (tmp_path / "sw" / "best.toml").exists()
    traj0, traj1 = (tmp_path / "sw" / n / "trajectory.mezo" for n in ("run-000-lr0.001", "run-001-lr0.01"))
    digest1 = end_digest(traj1)
    # run 1 was killed before its last steps block: cut the file there (the end block and keyframe go with it)
    last_steps = [off for off, btype, _ in blocks(traj1) if btype == trajectory._TYPE_STEPS][-1]
    os.truncate(traj1, last_steps)
    assert read_trajectory(traj1).end is None
    mtime0 = traj0.stat().st_mtime_ns

    result = cli(*args)
    assert "run 1/3: mezo.lr=0.001 (finished before: kept)\n" in result.output
    assert "run 2/3: mezo.lr=0.01 (resuming)\n" in result.output
    assert "run 3/3: mezo.lr=0.03\n" in result.output
    assert traj0.stat().st_mtime_ns == mtime0  # not redone
    assert end_digest(traj1) == digest1  # resumed bit-identical to the uninterrupted run
    state = json.loads((tmp_path / "sw" / "sweep.json").read_text())
    assert [(r["name"], r["resumed"]) for r in state["rows"]] == [
        ("run-000-lr0.001", False), ("run-001-lr0.01", True), ("run-002-lr0.03", False)]
    assert state["rows"][0] == first["rows"][0]  # the finished run's row is kept as it was
    assert state["complete"] is True and (tmp_path / "sw" / "best.toml").exists()

    again = cli(*args)  # all finished: nothing is trained again
    assert again.output.count("(finished before: kept)") == 3
    assert traj0.stat().st_mtime_ns == mtime0


def test_another_grid_in_the_same_directory_is_refused_unless_overwrite(lm_recipe, tmp_path):
    recipe = lm_recipe(steps=2)
    cli("sweep", recipe, "--grid", "mezo.lr=1e-3,1e-2", "--out", tmp_path / "sw", "-q")
    result = cli("sweep", recipe, "--grid", "mezo.lr=1e-3,3e-2", "--out", tmp_path / "sw", "-q", ok=False)
    assert result.exit_code == 1
    assert result.output == (f"error: {tmp_path / 'sw'} holds a different grid: --grid mezo.lr=1e-3,1e-2 (its "
                             "sweep.json); pass --overwrite to replace it, or --out DIR to sweep into another "
                             "directory\n")
    result = cli("sweep", recipe, "--grid", "mezo.lr=1e-3,1e-2", "--steps", "1", "--out", tmp_path / "sw", "-q",
                 ok=False)
    assert "holds the same grid over a different recipe (the recipe file, --set or --steps changed)" in result.output
    (tmp_path / "sw" / "sweep.json").rename(tmp_path / "sweep.json.away")  # its runs, but no record of the sweep
    result = cli("sweep", recipe, "--grid", "mezo.lr=1e-3,1e-2", "--steps", "1", "--out", tmp_path / "sw", "-q",
                 ok=False)
    assert result.output.splitlines()[-1] == (
        f"error: {tmp_path / 'sw' / 'run-000-lr0.001' / 'trajectory.mezo'} is a run of another recipe than this "
        "sweep's mezo.lr=0.001; pass --overwrite to replace it, or --out DIR to sweep into another directory")
    cli("sweep", recipe, "--grid", "mezo.lr=1e-3,3e-2", "--out", tmp_path / "sw", "-q", "--overwrite")
    assert sorted(p.name for p in (tmp_path / "sw").iterdir()) == [
        "best.toml", "run-000-lr0.001", "run-001-lr0.03", "sweep.json", *(["sweep.png"] if HAVE_MATPLOTLIB else [])]


def test_a_run_that_did_not_start_from_the_loaded_base_is_refused(lm_recipe, tmp_path, monkeypatch):
    """Without the restore, run 1 starts from run 0's trained weights: its header's base digests say so."""
    recipe = lm_recipe(steps=2)
    monkeypatch.setattr(sweep_mod.LoadedBase, "restore", lambda self: 0.0)
    result = cli("sweep", recipe, "--grid", "mezo.lr=1e-2,1e-3", "--out", tmp_path / "sw", "-q", ok=False)
    assert result.exit_code == 1
    lines = result.output.splitlines()
    assert progress_lines(result.output) == ["run 1/2: mezo.lr=0.01", "run 2/2: mezo.lr=0.001"]
    assert lines[-1].startswith("error: run run-001-lr0.001 did not start from the loaded base (")
    assert lines[-1].endswith("the reused model was not brought back; its directory was removed. This is a bug: "
                              "please report it")
    assert sorted(p.name for p in (tmp_path / "sw").iterdir()) == ["run-000-lr0.01", "sweep.json"]


def test_a_grid_over_the_model_loads_each_model_once(lm_recipe, tmp_path):
    """model.dtype changes what is loaded: the runs go grouped by model (numbered in grid order), two loads."""
    recipe = lm_recipe(steps=2)
    result = cli("sweep", recipe, "--grid", "mezo.lr=1e-3,1e-2", "--grid", "model.dtype=float32,bfloat16", "--out",
                 tmp_path / "sw", "-q")
    assert progress_lines(result.output) == [
        "run 1/4: mezo.lr=0.001 model.dtype=float32", "run 2/4: mezo.lr=0.01 model.dtype=float32",
        "run 3/4: mezo.lr=0.001 model.dtype=bfloat16", "run 4/4: mezo.lr=0.01 model.dtype=bfloat16"]
    state = json.loads((tmp_path / "sw" / "sweep.json").read_text())
    assert len(state["model_seconds"]["loads"]) == 2 and len(state["model_seconds"]["restores"]) == 2
    assert [r["name"] for r in state["rows"]] == ["run-000-lr0.001-dtypefloat32", "run-001-lr0.001-dtypebfloat16",
                                                  "run-002-lr0.01-dtypefloat32", "run-003-lr0.01-dtypebfloat16"]
    last = state["rows"][3]  # trained on the reloaded model, after a reuse of it
    assert independent_digest(recipe, tmp_path, last["name"], "mezo.lr=0.01", "model.dtype=bfloat16") == \
        end_digest(last["trajectory"])
