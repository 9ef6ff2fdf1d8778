"""Fault injection: `mezo-tune train` killed with SIGKILL at seeded random moments, resumed each time, ends
bit-identical to an uninterrupted run (weights and every trajectory block); the steps each kill cost are counted."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

from conftest import CORPUS, write_jsonl
from test_train import REPO, assert_same_weights, block_bytes, train_cli, write_recipe

from mezo_tune.trajectory import TrajectoryError, read_trajectory

STEPS = 60
KILLS = 3


def _intact_steps(traj: Path) -> int:
    try:
        return len(read_trajectory(traj).steps)
    except TrajectoryError:  # not created yet, or its header not yet whole
        return -1


def _logged_steps(metrics: Path, skip: int = 0) -> list[int]:
    """The steps a process finished, from metrics.jsonl after its first `skip` lines (log_every = 1: one line per
    step, flushed)."""
    if not metrics.exists():
        return []
    lines = metrics.read_text().splitlines()[skip:]
    return [json.loads(line)["step"] for line in lines if line.endswith("}") and '"loss"' in line]


def test_sigkill_at_random_moments_then_resume_is_bit_identical(tmp_path, tiny_model_dirs):
    rows = [{"text": t} for t in CORPUS]
    train = write_jsonl(tmp_path / "train.jsonl", rows * 2)
    kw = dict(steps=STEPS, keyframe_every=10, checkpoint_every=15, max_length=24, log_every=1)
    model = tiny_model_dirs("llama", "float32")
    killed = write_recipe(tmp_path / "killed.toml", model, train, out=tmp_path / "killed", **kw)
    ref = write_recipe(tmp_path / "ref.toml", model, train, out=tmp_path / "ref", **kw)
    traj, metrics = tmp_path / "killed/trajectory.mezo", tmp_path / "killed/metrics.jsonl"
    env = {**os.environ, "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    rng = random.Random(13)
    lost = []
    for kill in range(KILLS):
        before = max(_intact_steps(traj), 0)
        logged = len(metrics.read_text().splitlines()) if metrics.exists() else 0
        target = rng.randint(1, 14)  # kill once this process has finished this many steps ...
        jitter = rng.uniform(0, 0.03)  # ... and then this many seconds later: anywhere inside a step or a write
        cmd = [sys.executable, "-m", "mezo_tune.cli", "train", str(killed), "-q"] + (["--resume"] if kill else [])
        proc = subprocess.Popen(cmd, cwd=tmp_path, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        try:
            deadline = time.monotonic() + 120
            while proc.poll() is None and len(_logged_steps(metrics, logged)) < target and time.monotonic() < deadline:
                time.sleep(0.002)
            time.sleep(jitter)
            assert proc.poll() is None, f"the run ended before kill {kill}: {proc.stderr.read().decode()[-2000:]}"
            proc.send_signal(signal.SIGKILL)
        finally:
            proc.wait()
            proc.stderr.close()
        assert proc.returncode == -signal.SIGKILL
        data = read_trajectory(traj)
        done = _logged_steps(metrics, logged)
        assert data.end is None and len(done) >= target and done[0] == before
        # a kill between a step's block reaching the file and its metrics line leaves the log one step behind
        lost.append(max(0, done[-1] + 1 - len(data.steps)))
    train_cli(killed, "--resume")
    train_cli(ref)

    assert_same_weights(tmp_path / "ref/final/model.safetensors", tmp_path / "killed/final/model.safetensors")
    assert block_bytes(traj) == block_bytes(tmp_path / "ref/trajectory.mezo")
    assert read_trajectory(traj).end == read_trajectory(tmp_path / "ref/trajectory.mezo").end
    print(f"\nsigkill: {KILLS} kills, steps lost per kill {lost} (at most {max(lost)}; the file gets a block every 16 steps and at each checkpoint)")
