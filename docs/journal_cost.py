"""Time what the step journal adds to a step: the time TrajectoryWriter.append_step spends on it over many steps
(its record's write, and the truncation after each block of 16), as it is (no fsync) and with an fsync of the journal
after every step (mezo_tune.trajectory.JOURNAL_FSYNC).

    OMP_NUM_THREADS=1 PYTHONPATH=$PWD python docs/journal_cost.py [--dir /tmp] [--steps 2000] [--repeat 5]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np

from mezo_tune import trajectory
from mezo_tune.trajectory import StepRecord, TrajectoryWriter


def records(n: int) -> list[StepRecord]:
    rng = np.random.default_rng(0)
    g, lp, lm = (rng.standard_normal((3, n)) * [[1e-2], [0.05], [0.05]] + [[0], [2.5], [2.5]]).astype(np.float32)
    return [StepRecord(t, float(g[t]), float(np.float32(1e-6)), float(lp[t]), float(lm[t]), False) for t in range(n)]


def journal_seconds(where: Path, recs: list[StepRecord], fsync: bool) -> tuple[float, float]:
    """(seconds spent on the journal per step: its record's write and its share of the truncation after each block,
    seconds per append_step in all, blocks included), timed around the writer's two journal calls."""
    trajectory.JOURNAL_FSYNC = fsync
    path = where / "cost.mezo"
    path.unlink(missing_ok=True)
    writer = TrajectoryWriter.create(path, {"seed": 0}, flush_every=16)
    spent = [0.0]

    def timed(method):
        def call(*args):
            t0 = time.perf_counter()
            method(*args)
            spent[0] += time.perf_counter() - t0
        return call

    writer._journal_append, writer._journal_truncate = timed(writer._journal_append), timed(writer._journal_truncate)
    t0 = time.perf_counter()
    for rec in recs:
        writer.append_step(rec)
    total = time.perf_counter() - t0
    writer.close()
    return spent[0] / len(recs), total / len(recs)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dir", type=Path, default=None, help="where to write (default: a temporary directory)")
    ap.add_argument("--steps", type=int, default=2000)
    ap.add_argument("--repeat", type=int, default=5)
    args = ap.parse_args()
    recs = records(args.steps)
    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        print(f"{args.steps} steps in {tmp}, blocks of 16 (each written + fsynced); median of {args.repeat}:")
        for fsync in (False, True):
            runs = [journal_seconds(Path(tmp), recs, fsync) for _ in range(args.repeat)]
            journal, total = (statistics.median(x) for x in zip(*runs))
            print(f"  {'journal + fsync' if fsync else 'journal':15s} {journal * 1e6:7.1f} µs per step "
                  f"(append_step in all, blocks included: {total * 1e6:.1f} µs)")
    trajectory.JOURNAL_FSYNC = False


if __name__ == "__main__":
    main()
