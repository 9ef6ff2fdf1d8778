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
    """A short description of a run's optimizer: estimator, update rule, lr and schedule."""
    import tomllib

    recipe = tomllib.loads(header.get("recipe") or "").get("mezo", {})
    estimator = header.get("estimator") or {"name": "spsa", "directions": 1}
    parts = [estimator["name"] if estimator.get("directions", 1) == 1
             else f"{estimator['name']} K={estimator['directions']}"]
    rule = header.get("update_rule") or {"name": "sgd"}
    if rule["name"] != "sgd":
        parts.append(rule["name"] + "".join(f" {k}={v}" for k, v in rule.items()
                                            if k not in ("name", "version") and isinstance(v, (int, float))))
    if "lr" in recipe:
        parts.append(f"lr {recipe['lr']:g} {recipe.get('schedule', 'constant')}")
    return ", ".join(parts)


def summarize_run(path) -> dict:
    """One run: its label, optimizer, forwards spent and its dev curve [(forwards, value)] by the selected metric."""
    data = read_trajectory(path)
    header = data.header
    select = header.get("select") or {"metric": "loss", "lower_is_better": True}
    per = forwards_per_record(header)
    records = len(data.steps)
    curve = [((e["step"] + 1) * per, e[select["metric"]]) for e in data.evals
             if isinstance(e.get(select["metric"]), (int, float))]
    best = best_eval(data.evals, select)
    return {"run": Path(path).parent.name, "trajectory": str(path), "optimizer": optimizer_label(header),
            "metric": select["metric"], "lower_is_better": select["lower_is_better"], "records": records,
            "forwards": records * per, "curve": curve,
            "best": None if best is None else {"forwards": (best["step"] + 1) * per, "value": best[select["metric"]]},
            "final": curve[-1][1] if curve else None}


def compare(paths, baseline: str | None = None) -> dict:
    """Every run's summary; with a baseline (one of the paths, or another trajectory), the target (the baseline's
    final dev value) and, per run, the forwards at which it first reached it and that as a fraction of the
    baseline's total forwards."""
    runs = [summarize_run(p) for p in paths]
    metrics = {r["metric"] for r in runs}
    if len(metrics) > 1:
        raise ValueError(f"the runs select on different metrics ({', '.join(sorted(metrics))}); compare like with like")
    result: dict = {"runs": runs}
    if baseline is not None:
        base = next((r for r in runs if Path(r["trajectory"]).resolve() == Path(baseline).resolve()), None)
        base = base or summarize_run(baseline)
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

    head = ["run", "optimizer", "forwards", f"start {metric}", f"best {metric} (at forwards)", f"final {metric}"]
    if "target" in result:
        t = result["target"]
        head.append(f"reached {fmt(t['value'])} ({t['run']}'s final)")
    lines = [" | ".join(head), " | ".join("---" for _ in head)]
    for r in runs:
        start = r["curve"][0][1] if r["curve"] and r["curve"][0][0] == 0 else None
        best = "-" if r["best"] is None else f"{fmt(r['best']['value'])} ({r['best']['forwards']:.0f})"
        row = [r["run"], r["optimizer"], f"{r['forwards']:.0f}", fmt(start), best, fmt(r["final"])]
        if "target" in result:
            got = r["reached_target"]
            row.append("never" if got is None else f"{got['forwards']:.0f} ({got['of_baseline']:.2f} of its forwards)")
        lines.append(" | ".join(row))
    return "\n".join(lines)


def plot_comparison(result: dict, png) -> Path:
    """The dev metric of every run against forward passes (the baseline's final value dashed)."""
    from .plot import pyplot, save

    plt = pyplot()
    fig, ax = plt.subplots(figsize=(9, 5))
    for r in result["runs"]:
        if r["curve"]:
            xs, ys = zip(*r["curve"])
            ax.plot(xs, ys, "o-", ms=3, label=f"{r['run']}: {r['optimizer']}")
    if "target" in result:
        ax.axhline(result["target"]["value"], ls="--", color="gray", lw=1,
                   label=f"{result['target']['run']}'s final")
    metric = result["runs"][0]["metric"] if result["runs"] else ""
    ax.set_xlabel("forward passes (training; evaluations not counted)")
    ax.set_ylabel(f"dev {metric}")
    ax.legend(fontsize=8)
    fig.tight_layout()
    return save(fig, png)
