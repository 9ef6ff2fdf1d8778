"""`mezo-tune compare`: runs side by side by their recorded dev metric against forward passes (issue #15's chart).
Everything is read from the trajectories; tiny llama of conftest.py, runs through the CLI in-process."""

from __future__ import annotations

import json
import math

from test_learning import recipe_file
from test_train import cli, train_cli

from mezo_tune.trajectory import read_trajectory


def test_compare_counts_forward_passes_and_when_the_baseline_was_reached(tmp_path, tiny_model_dirs):
    model = tiny_model_dirs()
    plain = recipe_file(tmp_path, model, out="runs/plain", output={"eval_every": 2}, name="plain.toml")
    nspsa = recipe_file(tmp_path, model, out="runs/k2", mezo={"directions": 2}, output={"eval_every": 2},
                        name="k2.toml")
    train_cli(plain)
    train_cli(nspsa)
    a, b = tmp_path / "runs/plain/trajectory.mezo", tmp_path / "runs/k2/trajectory.mezo"
    result = json.loads(cli("compare", a, b, "--baseline", a, "--json", "--plot", tmp_path / "c.png").output)
    assert (tmp_path / "c.png").stat().st_size > 0
    plain_run, k2_run = result["runs"]
    # 6 steps: plain MeZO 2 forwards a step, 2 directions 4 (each record is one direction: 2 forwards)
    assert (plain_run["forwards"], k2_run["forwards"]) == (12, 24)
    assert plain_run["optimizer"] == "spsa, lr 0.05 constant" and k2_run["optimizer"] == "spsa K=2, lr 0.05 constant"
    evals = read_trajectory(b).evals
    assert k2_run["curve"] == [[(e["step"] + 1) * 2, e["accuracy"]] for e in evals]
    assert [f for f, _ in k2_run["curve"]] == [0, 8, 16, 24]
    assert result["target"] == {"run": "plain", "value": plain_run["final"], "forwards": 12}
    # the baseline reaches its own final value at the latest when it ends
    assert plain_run["reached_target"]["forwards"] <= 12
    assert plain_run["curves"]["loss"] == [[(e["step"] + 1) * 2, e["loss"]] for e in read_trajectory(a).evals]
    table = cli("compare", a, b, "--baseline", a).output
    assert table.splitlines()[0] == ("run | optimizer | trains | forwards | start accuracy | "
                                     f"best accuracy (at forwards) | final accuracy | "
                                     f"reached {plain_run['final']:.1%} (plain's final)")
    weights = sum(math.prod(t["shape"]) for t in read_trajectory(a).header["trainable"])
    assert table.splitlines()[2].startswith(f"plain | spsa, lr 0.05 constant | {weights:,} weights | 12 | ")
    by_loss = json.loads(cli("compare", a, b, "--baseline", a, "--metric", "loss", "--json").output)
    assert by_loss["runs"][0]["curve"] == plain_run["curves"]["loss"] and by_loss["runs"][0]["lower_is_better"]
    assert by_loss["target"]["value"] == plain_run["curves"]["loss"][-1][1]
    unknown = cli("compare", a, "--metric", "f1", ok=False)
    assert unknown.exit_code == 2
    assert f"{a}: its evals recorded no 'f1' (they have: accuracy, loss)" in unknown.output


def test_compare_averages_runs_that_differ_only_in_their_seed(tmp_path, tiny_model_dirs):
    model = tiny_model_dirs()
    paths = []
    for seed in (0, 1):
        recipe = recipe_file(tmp_path, model, out=f"runs/s{seed}", mezo={"seed": seed}, output={"eval_every": 3},
                             name=f"s{seed}.toml")
        train_cli(recipe)
        paths.append(tmp_path / f"runs/s{seed}/trajectory.mezo")
    other = recipe_file(tmp_path, model, out="runs/k2", mezo={"directions": 2}, output={"eval_every": 3},
                        name="k2.toml")
    train_cli(other)
    result = json.loads(cli("compare", *paths, tmp_path / "runs/k2/trajectory.mezo", "--json",
                            "--plot", tmp_path / "c.png").output)
    assert (tmp_path / "c.png").stat().st_size > 0
    seeds, k2 = result["groups"]
    assert (seeds["runs"], seeds["seeds"], k2["runs"]) == (["s0", "s1"], [0, 1], ["k2"])
    runs = [read_trajectory(p).evals for p in paths]
    for metric in ("accuracy", "loss"):
        values = [[e[metric] for e in evals] for evals in runs]
        assert seeds["lines"][metric] == [[(e["step"] + 1) * 2, (a + b) / 2, min(a, b), max(a, b)]
                                          for e, a, b in zip(runs[0], *values)]
    table = cli("compare", *paths).output.splitlines()
    assert table[-1].startswith("mean of 2 seeds (s0, s1): spsa, lr 0.05 constant, ")


def test_compare_refuses_runs_that_select_on_different_metrics(tmp_path, tiny_model_dirs):
    model = tiny_model_dirs()
    acc = recipe_file(tmp_path, model, out="runs/acc", output={"eval_every": 3}, name="a.toml")
    loss = recipe_file(tmp_path, model, out="runs/loss", output={"eval_every": 3, "select": "loss"}, name="l.toml")
    train_cli(acc)
    train_cli(loss)
    result = cli("compare", tmp_path / "runs/acc/trajectory.mezo", tmp_path / "runs/loss/trajectory.mezo", ok=False)
    assert result.exit_code == 2
    assert "the runs select on different metrics (accuracy, loss); compare like with like" in result.output
