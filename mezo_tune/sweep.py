"""`mezo-tune sweep`: short MeZO runs over a grid of recipe overrides, one loaded model reused across them.

Each grid point is an ordinary `train` run of the recipe with its overrides (plus `--set` and `--steps` for all):
its own directory, trajectory and metrics. The sweep directory DIR (default `<output.dir>-sweep`) holds:
    run-000-lr1e-06-eps0.001/   one run directory per grid point (trajectory.mezo, recipe.toml, metrics.jsonl, ...)
    sweep.json                  the grid and a row per finished run, rewritten after every run (the resume state)
    sweep.png                   the dev metric of every run over its steps (train loss without eval data)
    best.toml                   the resolved recipe of the best run

The model is loaded once per distinct `[model]` section (grid keys under model.* other than model.freeze load
another model; runs are executed grouped by model, numbered in grid order) and reused: before every run the base is
brought back (an adapter that `attach` injected is detached, the floating-point parameters a full-weight run wrote are
copied back from a CPU copy taken at load time). Every run records the digests of the base it starts from in its
trajectory header (`models.state_digests`, taken by `build_run` before step 0); after the run they are checked against
the ones taken at load time, so a run that did not start from the loaded bits is refused (and removed) rather than
kept. (Checking before the run as well would hash every weight a second time per run: ~0.6-1 s for 135M weights here,
more than reloading the model from a warm page cache takes.)
"""

from __future__ import annotations

import itertools
import json
import math
import re
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from .recipe import Recipe, RecipeError, load_recipe, recipe_to_dict, recipe_to_toml

STATE = "sweep.json"
CHART = "sweep.png"
BEST = "best.toml"
# Keys a grid may not vary: the sweep sets each run's output.dir.
SET_BY_SWEEP = ("output.dir",)
# Each run keeps its trajectory (KBs; `replay` rebuilds the model), not a final/ model directory, unless --set or
# --grid says output.save_final=true.
RUN_DEFAULTS = ["output.save_final=false"]


@dataclass
class Point:
    """One run of the sweep: its place in the grid, its values and its validated recipe (output.dir set)."""

    index: int
    values: dict        # grid key -> the value as the recipe holds it
    name: str           # run-000-lr1e-06-eps0.001
    recipe: Recipe

    @property
    def label(self) -> str:
        return " ".join(f"{k}={show_value(v)}" for k, v in self.values.items())

    @property
    def load_key(self) -> str:
        """What loading the model depends on: [model] without freeze (which only picks the trainable set)."""
        return json.dumps({k: v for k, v in recipe_to_dict(self.recipe)["model"].items() if k != "freeze"},
                          sort_keys=True)


@dataclass
class Plan:
    """A validated sweep: where it goes, its grid as given, and its runs in grid order."""

    recipe_path: str
    out: Path
    grid: list          # [[key, [value text, ...]], ...] as given on the command line
    sets: list
    steps: int | None
    points: list = field(default_factory=list)

    def spec(self) -> dict:
        """What makes two invocations the same sweep (sweep.json keeps it; a re-run must match it)."""
        return {"recipe": self.recipe_path, "grid": self.grid, "set": self.sets, "steps": self.steps,
                "runs": {p.name: recipe_digest(p.recipe) for p in self.points}}


def recipe_digest(recipe: Recipe) -> str:
    import hashlib

    return hashlib.blake2b(recipe_to_toml(recipe).encode(), digest_size=16).hexdigest()


def show_value(value) -> str:
    """A grid value as a person writes it: 1e-05, 0.001, lora, ["q_proj", "v_proj"]."""
    if isinstance(value, str):
        return value
    if isinstance(value, (bool, int, float)):
        return json.dumps(value) if isinstance(value, bool) else repr(value)
    return json.dumps(value)


# ---- planning: every problem before anything heavy runs ------------------------------------------------------------

def split_values(text: str) -> list[str]:
    """`1e-6,1e-5` -> ["1e-6", "1e-5"]; commas inside [...], {...} or quotes belong to one value."""
    values, depth, quote, start = [], 0, None, 0
    for i, ch in enumerate(text):
        if quote:
            quote = None if ch == quote else quote
        elif ch in "\"'":
            quote = ch
        elif ch in "[{":
            depth += 1
        elif ch in "]}":
            depth -= 1
        elif ch == "," and depth == 0:
            values.append(text[start:i].strip())
            start = i + 1
    values.append(text[start:].strip())
    return values


def parse_grid(specs, steps: int | None) -> tuple[list, list[str]]:
    """([[key, [value text, ...]], ...], problems) from the --grid options."""
    grid, problems = [], []
    if not specs:
        problems.append("--grid: no grid given; add at least one, e.g. --grid mezo.lr=1e-6,1e-5")
    for spec in specs:
        key, sep, rest = spec.partition("=")
        key = key.strip()
        if not sep or "." not in key or not all(part.strip() for part in key.split(".")):
            problems.append(f"--grid {json.dumps(spec)}: expected section.key=value,value,... "
                            "(e.g. mezo.lr=1e-6,1e-5)")
            continue
        values = split_values(rest)
        if any(k == key for k, _ in grid):
            problems.append(f"--grid {key}: given twice; list all its values in one --grid {key}=a,b,...")
        elif key in SET_BY_SWEEP:
            problems.append(f"--grid {key}: set by the sweep for each run (DIR/run-NNN-...); choose DIR with --out")
        elif key == "mezo.steps" and steps is not None:
            problems.append("--grid mezo.steps: --steps sets mezo.steps of every run; drop one of them")
        elif not any(values):
            problems.append(f"--grid {key}: no values; list them after '=', separated by commas")
        elif not all(values):
            problems.append(f"--grid {key}: an empty value in {json.dumps(rest)}; remove the extra comma")
        elif len(set(values)) != len(values):
            twice = sorted({v for v in values if values.count(v) > 1})
            problems.append(f"--grid {key}: {', '.join(twice)} listed twice")
        else:
            grid.append([key, values])
    return grid, problems


def value_at(recipe: Recipe, key: str):
    value = recipe_to_dict(recipe)
    for part in key.split("."):
        value = value.get(part) if isinstance(value, dict) else None
    return value


def run_name(index: int, values: dict) -> str:
    parts = [re.sub(r"[^A-Za-z0-9._+-]+", "_", f"{k.rsplit('.', 1)[-1]}{show_value(v)}").strip("_")
             for k, v in values.items()]
    return f"run-{index:03d}-" + "-".join(parts)[:80]


def plan_sweep(recipe_path, grid_specs, sets=(), steps: int | None = None, out: str | None = None) -> Plan:
    """Validate the recipe at every grid point (load_recipe with its overrides) and name the runs; raise RecipeError
    with every problem at once. Nothing is written."""
    grid, problems = parse_grid(list(grid_specs), steps)
    sets = list(sets)
    try:
        base = load_recipe(recipe_path, sets)
    except RecipeError as e:  # the recipe's own problems (with --set), then the grid's
        raise RecipeError(str(recipe_path), e.problems + problems) from None
    plan = Plan(str(recipe_path), Path(out or base.output.dir.rstrip("/\\") + "-sweep"), grid, sets, steps)
    steps_override = [f"mezo.steps={steps}"] if steps is not None else []
    seen = set(problems)
    if grid:  # the keys that parsed are checked too: every problem at once
        for index, combo in enumerate(itertools.product(*(values for _, values in grid))):
            overrides = (RUN_DEFAULTS + sets + [f"{key}={text}" for (key, _), text in zip(grid, combo)]
                         + steps_override)
            try:
                recipe = load_recipe(recipe_path, overrides)
            except RecipeError as e:
                for text in e.problems:
                    if text not in seen:
                        seen.add(text)
                        problems.append(f"--grid {text}")
                continue
            if recipe.optim.type != "mezo":
                text = (f'--grid optim.type: sweep runs MeZO (each run a trajectory); optim.type = '
                        f'"{recipe.optim.type}" is the backprop baseline, train it with `mezo-tune train`')
                if text not in seen:
                    seen.add(text)
                    problems.append(text)
                continue
            if problems:
                continue
            values = {key: value_at(recipe, key) for key, _ in grid}
            name = run_name(index, values)
            recipe = recipe.model_copy(update={"output": recipe.output.model_copy(
                update={"dir": str(plan.out / name)})})
            plan.points.append(Point(index, values, name, recipe))
    if problems:
        raise RecipeError(str(recipe_path), problems)
    return plan


# ---- the sweep directory --------------------------------------------------------------------------------------------

def read_state(out: Path) -> dict | None:
    try:
        return json.loads((out / STATE).read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as e:
        from .run import RunError

        raise RunError(f"{out / STATE} cannot be read ({e}); pass --overwrite to start the sweep again") from None


def write_state(out: Path, state: dict) -> None:
    tmp = out / (STATE + ".tmp")
    tmp.write_text(json.dumps(state, indent=2, allow_nan=True) + "\n")
    tmp.replace(out / STATE)


def prepare_sweep_dir(plan: Plan, overwrite: bool) -> dict:
    """The rows of runs a previous invocation of this same sweep finished ({name: row}); a different sweep in DIR is
    refused, or removed with overwrite (its run directories, sweep.json, sweep.png, best.toml)."""
    import shutil

    from .run import RunError

    old = read_state(plan.out)
    spec = plan.spec()
    same = old is not None and {k: v for k, v in old.get("spec", {}).items() if k != "recipe"} == {
        k: v for k, v in spec.items() if k != "recipe"}  # the recipe's path may be spelled differently
    if old is not None and not same:
        if not overwrite:
            was, now = old.get("spec", {}), spec
            what = ("a different grid" if was.get("grid") != now["grid"] else
                    "the same grid over a different recipe (the recipe file, --set or --steps changed)")
            shown = " ".join(f"--grid {k}={','.join(v)}" for k, v in was.get("grid", []))
            raise RunError(f"{plan.out} holds {what}: {shown or 'unknown'} (its {STATE}); pass --overwrite to "
                           f"replace it, or --out DIR to sweep into another directory")
        for name in set(old.get("spec", {}).get("runs", {})) | {p.name for p in plan.points}:
            shutil.rmtree(plan.out / name, ignore_errors=True)
        for name in (STATE, CHART, BEST):
            (plan.out / name).unlink(missing_ok=True)
        old = None
    elif old is not None and overwrite:
        for p in plan.points:
            shutil.rmtree(plan.out / p.name, ignore_errors=True)
        old = None
    plan.out.mkdir(parents=True, exist_ok=True)
    return {row["name"]: row for row in (old or {}).get("rows", [])}


# ---- the model, loaded once and brought back before every run -------------------------------------------------------

class LoadedBase:
    """A model loaded for one [model] section, with what it takes to give every run the same starting bits."""

    def __init__(self, point: Point, progress: bool, keep_copy: bool):
        from . import models

        t0 = time.perf_counter()
        self.key = point.load_key
        self.loaded = models.load(point.recipe.model, progress)
        model = self.loaded[0]
        self.digests = models.state_digests(model)
        # A full-weight run writes the floating-point parameters in place: keep a CPU copy to copy back (adapter
        # runs never write the base, so a sweep of adapter runs keeps none). Offloaded ones: their stored weights.
        self.saved = ({n: p.detach().to("cpu", copy=True) for n, p in self.weights().items()}
                      if keep_copy else None)
        self.load_s = time.perf_counter() - t0
        self.adapter_attached = False  # set by the caller when a run attaches one

    def restore(self) -> float:
        """Bring the base back to the loaded bits; returns the seconds it took."""
        import torch

        t0 = time.perf_counter()
        model = self.loaded[0]
        if self.adapter_attached:
            from .adapters import detach

            detach(model)
            self.adapter_attached = False
        if self.saved is not None:
            with torch.no_grad():
                for n, p in self.weights().items():
                    p.copy_(self.saved[n])
        return time.perf_counter() - t0

    def weights(self) -> dict:
        """name -> where each floating-point parameter of the base is stored (an offloaded one: its store)."""
        from .mezo import offloaded_weights

        model = self.loaded[0]
        stored = offloaded_weights(model)
        return {n: stored.get(n, p) for n, p in model.named_parameters() if p.is_floating_point()}

    def check_started_from(self, point: Point) -> None:
        """Refuse (and remove) a run whose trajectory header records a base other than the one loaded."""
        import shutil

        from .run import TRAJECTORY, RunError
        from .trajectory import read_trajectory

        run_dir = Path(point.recipe.output.dir)
        recorded = read_trajectory(run_dir / TRAJECTORY).header["base_model"]["tensors"]
        if recorded != self.digests:
            changed = [n for n in self.digests if recorded.get(n) != self.digests[n]]
            shutil.rmtree(run_dir)
            raise RunError(f"run {point.name} did not start from the loaded base ({len(changed)} tensors differ, "
                           f"e.g. {', '.join(changed[:3])}): the reused model was not brought back; its directory "
                           "was removed. This is a bug: please report it")


# ---- running -------------------------------------------------------------------------------------------------------

def run_status(point: Point) -> str:
    """"done" (the trajectory has its end block), "resume" (a trajectory without one) or "new"; a trajectory of
    another recipe (a run directory that sweep.json does not account for) is refused."""
    from .run import TRAJECTORY, RunError
    from .trajectory import read_trajectory

    traj = Path(point.recipe.output.dir) / TRAJECTORY
    if not traj.exists():
        return "new"
    data = read_trajectory(traj)
    if data.header.get("recipe") != recipe_to_toml(point.recipe):
        raise RunError(f"{traj} is a run of another recipe than this sweep's {point.label}; pass --overwrite to "
                       "replace it, or --out DIR to sweep into another directory")
    return "done" if data.end is not None else "resume"


def evals_from_metrics(run_dir: Path) -> list[dict]:
    """The evals a run wrote into its metrics.jsonl (all its sessions), one per step, the last one written winning."""
    from .plot import read_evals

    path = run_dir / "metrics.jsonl"
    by_step = {row["step"]: {"step": row["step"], **row["eval"]} for row in (read_evals(path) if path.exists()
                                                                           else [])}
    return [by_step[s] for s in sorted(by_step)]


def train_loss_at_end(point: Point) -> float | None:
    """Mean of (L+ + L-)/2 over the run's last output.log_every finite steps."""
    import numpy as np

    from .run import TRAJECTORY
    from .trajectory import read_trajectory

    arr = read_trajectory(Path(point.recipe.output.dir) / TRAJECTORY).as_arrays()
    mean = (arr["loss_plus"].astype(np.float64) + arr["loss_minus"]) / 2
    mean = mean[np.isfinite(mean)][-point.recipe.output.log_every:]
    return float(mean.mean()) if len(mean) else None


def make_row(point: Point, evals: list[dict], wall_s: float | None, resumed: bool) -> dict:
    from .run import TRAJECTORY

    metric = "accuracy" if evals and "accuracy" in evals[0] else ("loss" if evals else None)
    kept = [{"step": e["step"], "loss": e["loss"], **({"accuracy": e["accuracy"]} if "accuracy" in e else {})}
            for e in evals]
    row = {"run": point.index, "name": point.name, "values": point.values, "metric": metric,
           "final": kept[-1][metric] if metric else None, "best": None, "best_step": None,
           "train_loss": train_loss_at_end(point), "wall_s": None if wall_s is None else round(wall_s, 3),
           "resumed": resumed, "trajectory": str(Path(point.recipe.output.dir) / TRAJECTORY), "evals": kept}
    finite = [e for e in kept if metric and math.isfinite(e[metric])]
    if finite:  # the first of the best
        best = (max if metric == "accuracy" else min)(finite, key=lambda e: e[metric])
        row["best"], row["best_step"] = best[metric], best["step"]
    return row


def pick_best(rows: list[dict]) -> tuple[dict, str]:
    """(the best row, what it was picked by): final dev accuracy (ties: lower dev loss), else lowest final dev loss;
    runs without eval data by their train loss at the end. Ties go to the first run."""
    def finite(x, bad):
        return x if x is not None and math.isfinite(x) else bad

    if all(r["metric"] == "accuracy" for r in rows):
        return (min(rows, key=lambda r: (-finite(r["final"], -math.inf), finite(r["evals"][-1]["loss"], math.inf),
                                         r["run"])), "final dev accuracy (ties: lower dev loss)")
    if all(r["metric"] for r in rows):
        return min(rows, key=lambda r: (finite(r["evals"][-1]["loss"], math.inf), r["run"])), "final dev loss"
    return (min(rows, key=lambda r: (finite(r["train_loss"], math.inf), r["run"])),
            "train loss at the end (no eval data)")


def run_sweep(plan: Plan, *, overwrite: bool = False, progress: bool = True, max_runs: int | None = None,
              log=lambda msg: print(msg, file=sys.stderr)) -> dict:
    """Run (or resume) every run of the plan, then write sweep.json, sweep.png and best.toml; returns sweep.json's
    content. max_runs: stop after training that many runs (the rest stay to do, as after a kill)."""
    import gc

    from .train import train

    rows = prepare_sweep_dir(plan, overwrite)
    state = {"spec": plan.spec(), "out": str(plan.out), "rows": []}

    def save() -> None:
        state["rows"] = [rows[p.name] for p in plan.points if p.name in rows]
        write_state(plan.out, state)

    save()
    first_of = {}
    for p in plan.points:
        first_of.setdefault(p.load_key, p.index)
    order = sorted(plan.points, key=lambda p: first_of[p.load_key])  # one load per model; stable within it
    base, trained, timing = None, 0, {"loads": [], "restores": []}
    for k, point in enumerate(order, 1):
        status = run_status(point)
        if status == "done":
            log(f"run {k}/{len(order)}: {point.label} (finished before: kept)")
            if point.name not in rows:  # finished, but killed before sweep.json was written
                rows[point.name] = make_row(point, evals_from_metrics(Path(point.recipe.output.dir)), None, False)
                save()
            continue
        if max_runs is not None and trained >= max_runs:
            break
        log(f"run {k}/{len(order)}: {point.label}" + (" (resuming)" if status == "resume" else ""))
        if base is None or base.key != point.load_key:
            base = None
            gc.collect()
            keep = any(p.recipe.adapter.type == "none" for p in plan.points if p.load_key == point.load_key)
            base = LoadedBase(point, progress, keep)
            timing["loads"].append(round(base.load_s, 3))
        else:
            timing["restores"].append(round(base.restore(), 3))
        base.adapter_attached = point.recipe.adapter.type != "none"
        t0 = time.perf_counter()
        summary = train(point.recipe, resume=status == "resume", progress=progress, loaded=base.loaded, log=log)
        wall = time.perf_counter() - t0
        base.check_started_from(point)
        evals = summary["evals"] if status == "new" else evals_from_metrics(Path(point.recipe.output.dir))
        rows[point.name] = make_row(point, evals, wall, status == "resume")
        trained += 1
        save()
    state["model_seconds"] = timing
    done = [rows[p.name] for p in plan.points if p.name in rows]
    state["complete"] = len(done) == len(plan.points)
    if state["complete"]:
        best, by = pick_best(done)
        state["best"] = {"name": best["name"], "values": best["values"], "by": by, "recipe": str(plan.out / BEST)}
        (plan.out / BEST).write_text(recipe_to_toml(next(p.recipe for p in plan.points if p.name == best["name"])))
        try:
            plot_sweep(done, plan.out / CHART)
            state["chart"] = str(plan.out / CHART)
        except ImportError:
            log(f"matplotlib is not installed: no {CHART} (pip install matplotlib)")
    save()
    return state


# ---- output --------------------------------------------------------------------------------------------------------

def format_table(state: dict) -> str:
    """One line per finished run: grid values, final and best dev metric, train loss, wall time, trajectory."""
    rows = state["rows"]
    keys = [k for k, _ in state["spec"]["grid"]]

    def num(x, metric=None):
        if x is None:
            return "-"
        return f"{x:.2%}" if metric == "accuracy" else f"{x:.4f}"

    head = ["run", *keys, "final dev", "best dev (after steps)", "train loss", "wall s", "trajectory"]
    body = [[str(r["run"]), *(show_value(r["values"][k]) for k in keys),
             (f"{r['metric']} " if r["metric"] else "") + num(r["final"], r["metric"]),
             num(r["best"], r["metric"]) + (f" ({r['best_step'] + 1})" if r["best_step"] is not None else ""),
             num(r["train_loss"]), "-" if r["wall_s"] is None else f"{r['wall_s']:.1f}", r["trajectory"]]
            for r in rows]
    widths = [max(len(line[i]) for line in [head, *body]) for i in range(len(head))]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(line, widths)).rstrip() for line in [head, *body]]
    if not state.get("complete"):
        lines.append(f"{len(rows)} of {len(state['spec']['runs'])} runs finished; run the same command again to "
                     "go on")
    elif "best" in state:
        b = state["best"]
        lines.append(f"best: {b['name']} by {b['by']}; its recipe: {b['recipe']}")
    lines.append(f"wrote {Path(state['out']) / STATE}" + (f", {state['chart']}" if "chart" in state else ""))
    return "\n".join(lines)


def plot_sweep(rows: list[dict], png: Path) -> None:
    """The dev metric of every run after each eval (x: steps done), or, without eval data, each run's train loss."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    from .trajectory import read_trajectory

    fig, ax = plt.subplots(figsize=(9, 5))
    metric = rows[0]["metric"] if all(r["metric"] == rows[0]["metric"] for r in rows) else "loss"
    for r in rows:
        label = f"{r['run']}: " + " ".join(f"{k.rsplit('.', 1)[-1]}={show_value(v)}" for k, v in r["values"].items())
        if r["metric"]:
            ax.plot([e["step"] + 1 for e in r["evals"]], [e[metric] for e in r["evals"]], "o-", label=label)
        else:
            arr = read_trajectory(r["trajectory"]).as_arrays()
            ax.plot(arr["step"] + 1, (arr["loss_plus"].astype(np.float64) + arr["loss_minus"]) / 2, lw=1, label=label)
    ax.set_xlabel("steps done")
    ax.set_ylabel(f"dev {metric}" if rows[0]["metric"] else "train loss (L+ + L−)/2")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=7)
    ax.set_title("mezo-tune sweep")
    fig.tight_layout()
    fig.savefig(png, dpi=100)
    plt.close(fig)
