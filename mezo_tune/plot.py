"""`mezo-tune inspect --plot`: the loss curve of a trajectory (L+, L-, their smoothed mean) and, when the run
directory holds a metrics.jsonl, the evaluations recorded during training. matplotlib is optional (extra `plot`)
and imported only here."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np


def _smooth(values: np.ndarray, window: int) -> np.ndarray:
    """Trailing mean over `window` steps (shorter at the start); non-finite values are left out."""
    finite = np.isfinite(values)
    sums = np.cumsum(np.where(finite, values, 0.0))
    counts = np.cumsum(finite)
    lo = np.maximum(np.arange(len(values)) - window, -1)
    win_sums = sums - np.where(lo >= 0, sums[np.maximum(lo, 0)], 0.0)
    win_counts = counts - np.where(lo >= 0, counts[np.maximum(lo, 0)], 0)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(win_counts > 0, win_sums / np.maximum(win_counts, 1), np.nan)


def read_evals(metrics_path: Path) -> list[dict]:
    """The {"step", "eval"} lines of a metrics.jsonl; a torn last line (a crash mid-write) is skipped."""
    evals = []
    for line in metrics_path.read_text().splitlines():
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(row, dict) and isinstance(row.get("eval"), dict):
            evals.append(row)
    return evals


def pyplot():
    """matplotlib.pyplot drawing to files (no display needed), or a RunError that says how to install it."""
    from .run import RunError

    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise RunError("--plot needs matplotlib: pip install 'mezo-tune[plot]' (or pip install matplotlib)") from None
    return plt


def save(fig, out_path) -> Path:
    """Write the figure (PNG, or any format matplotlib infers from the name), creating its folder; close it."""
    out = Path(out_path)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=100)
    pyplot().close(fig)
    return out


def plot_trajectory(data, out_path) -> Path:
    """Write a PNG (or any format matplotlib infers from the name) of the run's curves; returns its path."""
    plt = pyplot()
    arr = data.as_arrays()
    steps = arr["step"]
    lp, lm = arr["loss_plus"].astype(np.float64), arr["loss_minus"].astype(np.float64)
    mean = (lp + lm) / 2
    metrics = Path(data.path).parent / "metrics.jsonl"
    evals = read_evals(metrics) if metrics.is_file() else []

    fig, ax = plt.subplots(figsize=(9, 5))
    ax.plot(steps, lp, lw=0.5, alpha=0.35, label="L+")
    ax.plot(steps, lm, lw=0.5, alpha=0.35, label="L−")
    window = max(1, len(steps) // 50)
    ax.plot(steps, _smooth(mean, window), lw=1.8, label=f"(L+ + L−)/2, mean of {window} steps")
    ax.set_xlabel("step")
    ax.set_ylabel("training loss")
    if evals:
        eval_steps = [e["step"] for e in evals]
        ax.plot(eval_steps, [e["eval"].get("loss", np.nan) for e in evals], "o--", label="eval loss")
        metric = next((k for k in ("accuracy", "f1", "exact_match") if k in evals[0]["eval"]), None)
        if metric:
            ax2 = ax.twinx()
            ax2.plot(eval_steps, [e["eval"].get(metric, np.nan) for e in evals], "s-", color="black",
                     label=f"eval {metric}")
            ax2.set_ylabel(f"eval {metric}")
            ax2.legend(loc="upper right")
    ax.legend(loc="upper left" if evals else "best")
    ax.set_title(Path(data.path).name)
    fig.tight_layout()
    return save(fig, out_path)
