"""`mezo-tune compare`: runs side by side by the dev metric they recorded, against the forward passes they spent.

Forward passes, not steps, are the cost that matters for zeroth-order training: a step of n-SPSA with K directions
costs 2K forwards, a plain MeZO step 2, an FZOO step with N directions N + 1. Everything is read from the trajectories
(header and recorded evals), so a comparison needs no model and no rerun. With a baseline (e.g. plain MeZO), each run
also says when it first reached the baseline's final dev value, in forward passes and as a fraction of the baseline's
total.
"""

from __future__ import annotations

from pathlib import Path

from .trajectory import best_eval, read_trajectory


def forwards_per_record(header: dict) -> float:
    """Forward passes one trajectory record stands for, by the header's estimator (evaluations not counted)."""
    estimator = header.get("estimator") or {"name": "spsa"}
    if estimator["name"] == "spsa":  # two-point: L+ and L- per direction, one record per direction
        return 2.0
    if estimator["name"] == "fzoo":  # one-sided: l_i per direction, and the step's shared l_0
        return (estimator["directions"] + 1) / estimator["directions"]
    raise ValueError(f"estimator {estimator['name']!r}: compare does not know its forward passes")


def optimizer_label(header: dict) -> str:
    """A short description of a run's optimizer: estimator, update rule, directions, lr and schedule (not the seed,
    so that runs differing only in their seed share a label and are averaged)."""
    import tomllib

    recipe = tomllib.loads(header.get("recipe") or "").get("mezo", {})
    estimator = header.get("estimator") or {"name": "spsa", "directions": 1}
    parts = [estimator["name"] if estimator.get("directions", 1) == 1
             else f"{estimator['name']} K={estimator['directions']}"]
    rule = header.get("update_rule") or {"name": "sgd"}
    if rule["name"] != "sgd":
        parts.append(rule["name"] + _numbers(rule))
    direction = header.get("direction") or {"name": "dense"}
    if direction["name"] != "dense":
        parts.append(direction["name"] + _numbers(direction))
    if "lr" in recipe:
        parts.append(f"lr {recipe['lr']:g} {recipe.get('schedule', 'constant')}")
    return ", ".join(parts)


def _numbers(entry: dict) -> str:
    return "".join(f" {k}={v}" for k, v in entry.items()
                   if k not in ("name", "version") and isinstance(v, (int, float)))


def trained_label(header: dict) -> str:
    """What a run trains: its adapter, or the number of trainable weights (all of them, or those `freeze` left)."""
    adapter = header.get("adapter")
    count = sum(_elements(t["shape"]) for t in header.get("trainable") or [])
    what = f"{count:,} weights"
    if adapter:
        return f"{adapter['type']}, {what}"
    return what + (" (freeze)" if header.get("freeze") else "")


def _elements(shape) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


def summarize_run(path, metric: str | None = None) -> dict:
    """One run: its label, optimizer, forwards spent and its dev curves [(forwards, value)]: `curve` by `metric`
    (default: the one the run selected its best step by), `curves` by every metric the evals recorded (accuracy and
    loss for classification)."""
    from .recipe import LOWER_IS_BETTER

    data = read_trajectory(path)
    header = data.header
    select = header.get("select") or {"metric": "loss", "lower_is_better": True}
    if metric is not None:
        if not any(metric in e for e in data.evals):
            recorded = sorted({k for e in data.evals for k, v in e.items() if k != "step" and isinstance(v, float)})
            raise ValueError(f"{path}: its evals recorded no {metric!r} (they have: {', '.join(recorded) or 'none'})")
        select = {"metric": metric, "lower_is_better": metric in LOWER_IS_BETTER}
    per = forwards_per_record(header)
    records = len(data.steps)
    curves: dict[str, list] = {}
    for e in data.evals:
        for metric, value in e.items():
            if metric != "step" and isinstance(value, float):  # counts (correct, n) are ints
                curves.setdefault(metric, []).append(((e["step"] + 1) * per, value))
    curve = curves.get(select["metric"], [])
    best = best_eval(data.evals, select)
    return {"run": Path(path).parent.name, "trajectory": str(path), "optimizer": optimizer_label(header),
            "trains": trained_label(header), "seed": header.get("seed"),
            "metric": select["metric"], "lower_is_better": select["lower_is_better"], "records": records,
            "forwards": records * per, "curve": curve, "curves": curves,
            "best": None if best is None else {"forwards": (best["step"] + 1) * per, "value": best[select["metric"]]},
            "final": curve[-1][1] if curve else None}


def seed_groups(runs: list[dict]) -> list[dict]:
    """Runs that differ only in their seed (same optimizer, same trained weights, evals at the same forwards), as
    one line each: the mean, min and max of every metric over the seeds at each eval. A run alone is a group of one."""
    groups: dict[tuple, list[dict]] = {}
    for r in runs:
        key = (r["optimizer"], r["trains"], tuple(f for f, _ in r["curve"]))
        groups.setdefault(key, []).append(r)
    out = []
    for (optimizer, trains, _), members in groups.items():
        metrics = set.intersection(*(set(m["curves"]) for m in members))
        lines = {}
        for metric in sorted(metrics):
            xs = [f for f, _ in members[0]["curves"][metric]]
            if any([f for f, _ in m["curves"][metric]] != xs for m in members):
                continue
            columns = list(zip(*([v for _, v in m["curves"][metric]] for m in members)))
            lines[metric] = [(x, sum(c) / len(c), min(c), max(c)) for x, c in zip(xs, columns)]
        out.append({"optimizer": optimizer, "trains": trains, "runs": [m["run"] for m in members],
                    "seeds": [m["seed"] for m in members], "lines": lines})
    return out


def compare(paths, baseline: str | None = None, metric: str | None = None) -> dict:
    """Every run's summary by `metric` (default: the metric the runs selected on); with a baseline (one of the
    paths, or another trajectory), the target (the baseline's final dev value) and, per run, the forwards at which
    it first reached it and that as a fraction of the baseline's total forwards."""
    runs = [summarize_run(p, metric) for p in paths]
    metrics = {r["metric"] for r in runs}
    if len(metrics) > 1:
        raise ValueError(f"the runs select on different metrics ({', '.join(sorted(metrics))}); compare like with like")
    result: dict = {"runs": runs, "groups": seed_groups(runs)}
    if baseline is not None:
        base = next((r for r in runs if Path(r["trajectory"]).resolve() == Path(baseline).resolve()), None)
        base = base or summarize_run(baseline, metric)
        if base["final"] is None:
            raise ValueError(f"{baseline}: the baseline recorded no dev evaluation")
        sign = -1 if base["lower_is_better"] else 1
        result["target"] = {"run": base["run"], "value": base["final"], "forwards": base["forwards"]}
        for r in runs:
            reached = next((f for f, v in r["curve"] if f > 0 and sign * v >= sign * base["final"]), None)
            r["reached_target"] = None if reached is None else {
                "forwards": reached, "of_baseline": reached / base["forwards"]}
    return result


def format_comparison(result: dict) -> str:
    runs = result["runs"]
    metric = runs[0]["metric"] if runs else "metric"
    pct = metric in ("accuracy", "f1", "exact_match")

    def fmt(v):
        return "-" if v is None else (f"{v:.1%}" if pct else f"{v:.4f}")

    head = ["run", "optimizer", "trains", "forwards", f"start {metric}", f"best {metric} (at forwards)",
            f"final {metric}"]
    if "target" in result:
        t = result["target"]
        head.append(f"reached {fmt(t['value'])} ({t['run']}'s final)")
    lines = [" | ".join(head), " | ".join("---" for _ in head)]
    for r in runs:
        start = r["curve"][0][1] if r["curve"] and r["curve"][0][0] == 0 else None
        best = "-" if r["best"] is None else f"{fmt(r['best']['value'])} ({r['best']['forwards']:.0f})"
        row = [r["run"], r["optimizer"], r["trains"], f"{r['forwards']:.0f}", fmt(start), best, fmt(r["final"])]
        if "target" in result:
            got = r["reached_target"]
            row.append("never" if got is None else f"{got['forwards']:.0f} ({got['of_baseline']:.2f} of its forwards)")
        lines.append(" | ".join(row))
    for g in result.get("groups", []):
        line = g["lines"].get(metric)
        if len(g["runs"]) > 1 and line:
            best = max(line, key=lambda p: -p[1] if runs[0]["lower_is_better"] else p[1])
            lines.append(f"mean of {len(g['runs'])} seeds ({', '.join(g['runs'])}): {g['optimizer']}, {g['trains']}: "
                         f"best {fmt(best[1])} at {best[0]:.0f} forwards, final {fmt(line[-1][1])} "
                         f"(seeds {fmt(line[-1][2])} to {fmt(line[-1][3])})")
    return "\n".join(lines)


def plot_comparison(result: dict, png) -> Path:
    """One panel per recorded dev metric (the selected one first, then e.g. loss) against forward passes: a line per
    optimizer, the mean over runs that differ only in their seed with their min-max range shaded; the baseline's
    final value dashed."""
    from .plot import pyplot, save

    plt = pyplot()
    groups = result.get("groups") or seed_groups(result["runs"])
    selected = result["runs"][0]["metric"] if result["runs"] else ""
    metrics = sorted({m for g in groups for m in g["lines"]}, key=lambda m: (m != selected, m))
    fig, axes = plt.subplots(1, max(1, len(metrics)), figsize=(6.5 * max(1, len(metrics)), 5), squeeze=False)
    for ax, metric in zip(axes[0], metrics):
        for g in groups:
            if metric not in g["lines"]:
                continue
            xs, mean, low, high = zip(*g["lines"][metric])
            seeds = f" (mean of {len(g['runs'])} seeds)" if len(g["runs"]) > 1 else f" ({g['runs'][0]})"
            (line,) = ax.plot(xs, mean, "o-", ms=3, label=f"{g['optimizer']}; {g['trains']}{seeds}")
            if len(g["runs"]) > 1:
                ax.fill_between(xs, low, high, color=line.get_color(), alpha=0.15)
        if "target" in result and metric == selected:
            ax.axhline(result["target"]["value"], ls="--", color="gray", lw=1,
                       label=f"{result['target']['run']}'s final")
        ax.set_xlabel("forward passes (training; evaluations not counted)")
        ax.set_ylabel(f"dev {metric}")
    axes[0][0].legend(fontsize=7)
    fig.tight_layout()
    return save(fig, png)
