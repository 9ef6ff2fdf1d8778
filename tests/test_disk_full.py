"""A disk that really fills up (issue #13): a run whose output directory lives on a small tmpfs stops with a clear
message when the disk is full, its trajectory intact; after space is freed (the tmpfs is remounted larger) `--resume`
finishes bit-identical to an uninterrupted run. tests/test_trajectory.py fakes the full disk at the writer; this is
the real thing, where a tmpfs can be mounted (root, or CAP_SYS_ADMIN, on Linux); elsewhere it is skipped, saying why."""

from __future__ import annotations

import subprocess
import sys

import pytest
from test_train import assert_same_weights, block_bytes, step_columns, train_cli, write_recipe

from mezo_tune.trajectory import read_trajectory


@pytest.fixture
def small_disk(tmp_path):
    """(a 16 KiB tmpfs at tmp_path/disk, unmounted afterwards; grow(size), which remounts it with more room)."""
    mnt = tmp_path / "disk"
    mnt.mkdir()
    if not sys.platform.startswith("linux"):
        pytest.skip("a tmpfs needs Linux")
    try:
        made = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=16k", "tmpfs", str(mnt)], capture_output=True,
                              text=True)
    except OSError as exc:
        pytest.skip(f"cannot run mount: {exc}")
    if made.returncode:
        pytest.skip(f"cannot mount a small tmpfs here (needs root or CAP_SYS_ADMIN): {made.stderr.strip()}")

    def grow(size: str) -> None:
        subprocess.run(["mount", "-o", f"remount,size={size}", str(mnt)], check=True)

    try:
        yield mnt, grow
    finally:
        subprocess.run(["umount", str(mnt)], check=True)


def test_a_full_disk_stops_the_run_and_resume_finishes_it_bit_identical(small_disk, tmp_path, lm_files,
                                                                        tiny_model_dirs):
    disk, grow = small_disk
    train, _ = lm_files
    model = tiny_model_dirs("llama", "float32")
    # a block per step (~50 bytes) so the 16 KiB fill up within a few hundred steps; no metrics lines, no checkpoint,
    # so the trajectory is what fills the disk
    kw = dict(steps=400, keyframe_every=50, flush_every=1, flush_seconds=0.0, log_every=1000)
    ref = write_recipe(tmp_path / "ref.toml", model, train, out=tmp_path / "ref", **kw)
    train_cli(ref)
    recipe = write_recipe(tmp_path / "full.toml", model, train, out=disk / "run", save_final=False, **kw)
    traj = disk / "run/trajectory.mezo"
    result = train_cli(recipe, ok=False)
    data = read_trajectory(traj)
    assert result.exit_code == 1
    assert data.problem is None and data.end is None and 0 < len(data.steps) < 400
    last = len(data.steps) - 1
    print(f"disk full after step {last}: trajectory {traj.stat().st_size} bytes")
    assert result.output.endswith(
        f"error: {traj}: could not append to the trajectory: the disk is full. The trajectory is intact up to step "
        f"{last}; free space, then run `mezo-tune train --resume` to continue from there.\n")
    assert data.steps == read_trajectory(tmp_path / "ref/trajectory.mezo").steps[: last + 1]

    grow("8m")
    resumed = write_recipe(tmp_path / "resume.toml", model, train, out=disk / "run", **kw)
    out = train_cli(resumed, "--resume").output
    assert f"resuming {traj} after step {last} (replaying {last + 1} steps from the base model)" in out
    assert block_bytes(traj) == block_bytes(tmp_path / "ref/trajectory.mezo")
    assert step_columns(traj) == step_columns(tmp_path / "ref/trajectory.mezo")
    assert_same_weights(disk / "run/final/model.safetensors", tmp_path / "ref/final/model.safetensors")


def test_a_disk_filled_by_the_metrics_stops_the_run_and_resume_finishes_it(small_disk, tmp_path, lm_files,
                                                                           tiny_model_dirs):
    """Here metrics.jsonl (a line per step) fills the disk while the steps wait in one trajectory block: the run stops
    naming metrics.jsonl; the pending steps are written if they still fit (else that is reported too)."""
    disk, grow = small_disk
    train, _ = lm_files
    model = tiny_model_dirs("llama", "float32")
    kw = dict(steps=400, keyframe_every=1000, flush_every=65536, flush_seconds=0.0, log_every=1)
    train_cli(write_recipe(tmp_path / "ref.toml", model, train, out=tmp_path / "ref", **kw))
    recipe = write_recipe(tmp_path / "full.toml", model, train, out=disk / "run", save_final=False, **kw)
    traj = disk / "run/trajectory.mezo"
    result = train_cli(recipe, ok=False)
    assert result.exit_code == 1
    assert result.output.endswith(
        f"error: {disk / 'run/metrics.jsonl'}: could not append to the metrics: the disk is full. The trajectory next "
        f"to it keeps every step written so far; free space, then run `mezo-tune train --resume` to continue (the "
        f"metrics may lose a line).\n")
    data = read_trajectory(traj)
    assert data.problem is None and data.end is None
    if not data.steps:  # the pending steps did not fit either
        assert (f"error: {traj}: could not append to the trajectory: the disk is full. The trajectory is intact but "
                f"holds no steps yet; free space, then run `mezo-tune train --resume` to continue from there.\n"
                ) in result.output
    print(f"metrics full; trajectory holds {len(data.steps)} steps")
    grow("8m")
    train_cli(write_recipe(tmp_path / "resume.toml", model, train, out=disk / "run", **kw), "--resume")
    assert step_columns(traj) == step_columns(tmp_path / "ref/trajectory.mezo")
    assert read_trajectory(traj).keyframes == read_trajectory(tmp_path / "ref/trajectory.mezo").keyframes
    assert_same_weights(disk / "run/final/model.safetensors", tmp_path / "ref/final/model.safetensors")
