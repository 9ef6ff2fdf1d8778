"""Data parallel under torchrun (DESIGN.md contract 8), for real: `torchrun --standalone --nproc-per-node 2` in a
subprocess, gloo on CPU, the tiny llama of conftest.py saved with save_pretrained, OMP_NUM_THREADS=1 per rank.

One 2-process run (module fixture) is the reference: its losses against a one-process run of the same global
batches, its trajectory replayed in one process against its final weights, what rank 1 wrote and printed; a
2-process run whose rank 1 is killed part way (torchrun then stops rank 0) resumes to the same records and weights; a
resume on another number of processes is said and still replays exactly.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import CORPUS, write_jsonl
from test_train import assert_same_weights, cli, step_columns, train_cli, write_recipe

from mezo_tune import distributed
from mezo_tune.trajectory import TrajectoryError, TrajectoryWriter, journal_path, read_for_resume, read_trajectory

REPO = Path(__file__).resolve().parents[1]
# 12 steps of a batch of 3 rows: shards of 1 and 2 rows (an uneven split); evals, keyframes and checkpoints on the way
RUN = dict(steps=12, batch_size=3, eval_every=6, keyframe_every=4, checkpoint_every=4, flush_every=1,
           max_length=24)


def torchrun(*args, nproc: int = 2, cwd: Path, audit: Path | None = None, logs: Path | None = None,
             timeout: float = 120, wait: bool = True):
    """`torchrun --standalone --nproc-per-node NPROC tests/dp_audit.py ARGS` (dp_audit.py is `python -m mezo_tune`
    that records what each rank writes under cwd into AUDIT/rank<r>.json). logs: each rank's stdout and stderr in
    their own files (torchrun --redirects 3)."""
    env = {**os.environ, "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""),
           "OMP_NUM_THREADS": "1", "MEZO_AUDIT_ROOT": str(cwd), "MEZO_AUDIT_DIR": str(audit or cwd)}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
           *([f"--log-dir={logs}", "--redirects=3"] if logs else []),
           str(REPO / "tests" / "dp_audit.py"), *map(str, args)]
    if not wait:
        return subprocess.Popen(cmd, cwd=cwd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                start_new_session=True)
    return subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)


def rank_output(logs: Path, rank: int) -> str:
    """What rank `rank` printed (stdout + stderr), from torchrun's per-rank log files."""
    files = sorted(logs.rglob(f"attempt_0/{rank}/std*.log"))
    assert len(files) == 2, files
    return "".join(f.read_text() for f in files)


def two_process_run(tmp_path_factory, name: str, model_dir, run: dict, extra: str = ""):
    """`train` under torchrun with 2 processes on the CORPUS rows: (tmp dir, recipe, its output dir, audit dir, log
    dir). run: write_recipe's keys; extra: TOML appended to the recipe."""
    tmp = tmp_path_factory.mktemp(name)
    rows = [{"text": t} for t in CORPUS]
    train, ev = write_jsonl(tmp / "train.jsonl", rows * 2), write_jsonl(tmp / "eval.jsonl", rows)
    recipe = write_recipe(tmp / f"{name}.toml", model_dir, train, ev, out=tmp / f"runs/{name}", **run)
    recipe.write_text(recipe.read_text() + extra)
    audit, logs = tmp_path_factory.mktemp("audit"), tmp_path_factory.mktemp("logs")
    done = torchrun("train", recipe, "-q", cwd=tmp, audit=audit, logs=logs)
    assert done.returncode == 0, done.stderr[-3000:]
    return tmp, recipe, tmp / f"runs/{name}", audit, logs


@pytest.fixture(scope="module")
def dp_run(tmp_path_factory, tiny_model_dirs):
    """The 2-process reference run: (tmp dir, recipe, its output dir, audit dir, log dir)."""
    return two_process_run(tmp_path_factory, "dp", tiny_model_dirs("llama", "float32"), RUN)


def test_dp_losses_equal_a_one_process_run_within_fp32_reduction_order(dp_run, tmp_path):
    tmp, recipe, out, _, _ = dp_run
    one = write_recipe(tmp_path / "one.toml", *_model_and_data(recipe), out=tmp_path / "one", **RUN)
    train_cli(one)
    dp, ref = read_trajectory(out / "trajectory.mezo"), read_trajectory(tmp_path / "one/trajectory.mezo")
    a, b = dp.as_arrays(), ref.as_arrays()
    assert len(a["g"]) == len(b["g"]) == RUN["steps"] and not a["skipped"].any()
    # Same rows, same z, same weights at step 0; the losses differ only in float rounding: each rank pads its shard
    # to its own longest row (other matmul shapes, other last bits per row), and the ranks add float64 sums where one
    # process adds fp32 ones. That is a few fp32 ulps of a loss near 5.8 (one ulp: 4.8e-7, relative 8.3e-8); rtol
    # 2e-6 allows 24. (g = (L+ - L-)/2ε divides those ulps by ε = 1e-3, so g and the later weights differ more, and
    # are not compared: a DP run is reproduced by replaying its own trajectory, below.)
    for key in ("loss_plus", "loss_minus"):
        np.testing.assert_allclose(a[key], b[key], rtol=2e-6, atol=0)
    assert [e["step"] for e in dp.evals] == [e["step"] for e in ref.evals] == [-1, 5, 11]
    assert [e["n"] for e in dp.evals] == [len(CORPUS)] * 3  # every eval row scored once, over both ranks
    np.testing.assert_allclose(dp.evals[0]["loss"], ref.evals[0]["loss"], rtol=2e-6)  # same weights before step 0


def _model_and_data(recipe: Path):
    from mezo_tune.recipe import load_recipe

    r = load_recipe(str(recipe))
    return r.model.path, r.data.train, r.data.eval


def test_dp_trajectory_replays_bit_equal_in_one_process(dp_run, tmp_path):
    _, _, out, _, _ = dp_run
    result = cli("replay", out / "trajectory.mezo", "--out", tmp_path / "rep", "--verify", "-q")
    assert result.output == f"replayed {RUN['steps']} steps (every keyframe verified); wrote {tmp_path}/rep\n"
    assert_same_weights(out / "final/model.safetensors", tmp_path / "rep/model.safetensors")


def test_rank_1_writes_and_prints_nothing(dp_run):
    tmp, _, out, audit, logs = dp_run
    assert json.loads((audit / "rank1.json").read_text()) == []
    rank0 = {part for _, p in json.loads((audit / "rank0.json").read_text()) if Path(p).is_relative_to(out)
             for part in Path(p).relative_to(out).parts[:1]}
    assert {"trajectory.mezo", "metrics.jsonl", "recipe.toml", "checkpoint.tmp", "final.tmp"} <= rank0  # the audit sees
    assert sorted(p.name for p in out.iterdir()) == ["final", "metrics.jsonl", "recipe.toml", "trajectory.mezo"]
    assert rank_output(logs, 1) == ""
    printed = rank_output(logs, 0)
    assert printed.count(f"trajectory: {out}/trajectory.mezo") == 1 and "eval after training" in printed
    recorded = read_trajectory(out / "trajectory.mezo").header["recipe"]
    assert distributed.recorded_processes(recorded) == 2
    assert (out / "recipe.toml").read_text() == recorded


def test_eval_under_torchrun_scores_every_row_once(dp_run, tmp_path):
    # `mezo-tune eval` of the DP run's final weights on its lm eval set under torchrun: each rank scores its
    # share (3 of 6 rows), the sums are added; the same rows and tokens as one process, the loss to float rounding
    # (other batches, so other padding widths; a float64 sum in another order): rtol 2e-6 as for the training losses
    _, recipe, out, _, _ = dp_run
    logs = tmp_path / "logs"
    done = torchrun("eval", recipe, "--model", out / "final", "--json", "-q", cwd=tmp_path, logs=logs)
    assert done.returncode == 0, done.stderr[-3000:]
    assert rank_output(logs, 1) == ""
    dp = json.loads(rank_output(logs, 0))
    one = json.loads(cli("eval", recipe, "--model", out / "final", "--json", "-q").output)
    assert (dp["n"], dp["tokens"]) == (one["n"], one["tokens"]) == (len(CORPUS), one["tokens"])
    np.testing.assert_allclose(dp["loss"], one["loss"], rtol=2e-6)


def _rank_pid(agent: int, rank: int) -> int | None:
    """The pid of torchrun's worker `rank` (a child of the agent whose environment says RANK=rank), None before it
    has started."""
    try:
        children = Path(f"/proc/{agent}/task/{agent}/children").read_text().split()
    except OSError:
        return None
    for pid in children:
        try:
            env = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
        except OSError:
            continue
        if f"RANK={rank}".encode() in env:
            return int(pid)
    return None


def _kill_rank_1_part_way(recipe: Path, cwd: Path, traj: Path, at_least: int) -> str:
    """Start a 2-process run and SIGKILL rank 1 once `at_least` steps are on disk; torchrun then stops rank 0 (it
    waits for rank 1 in the step's all-reduce). Returns what torchrun printed."""
    proc = torchrun("train", recipe, "-q", cwd=cwd, wait=False)
    try:
        deadline = time.monotonic() + 120
        while proc.poll() is None and time.monotonic() < deadline:
            try:
                if len(read_trajectory(traj).steps) >= at_least:
                    break
            except TrajectoryError:
                pass
            time.sleep(0.01)
        rank1 = _rank_pid(proc.pid, 1)
        if proc.poll() is not None or rank1 is None:
            pytest.fail(f"the run ended before rank 1 was killed: {proc.stderr.read().decode()[-3000:]}")
        os.kill(rank1, signal.SIGKILL)
        stderr = proc.communicate(timeout=120)[1].decode()
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    assert proc.returncode != 0
    data = read_trajectory(traj)
    assert data.end is None and at_least <= len(data.steps) < RUN["steps"], len(data.steps)
    return stderr


@pytest.fixture(scope="module")
def killed_dp_run(dp_run, tmp_path_factory):
    """The reference recipe in another output dir, its 2-process run stopped by killing rank 1 after >= 5 steps (a
    checkpoint after step 3 in place, steps 4.. to replay)."""
    tmp, recipe, _, _, _ = dp_run
    killed = tmp_path_factory.mktemp("killed")
    text = recipe.read_text().replace(str(tmp / "runs/dp"), str(killed / "run"))
    (killed / "dp.toml").write_text(text)
    stderr = _kill_rank_1_part_way(killed / "dp.toml", killed, killed / "run/trajectory.mezo", at_least=5)
    assert "Signal 9 (SIGKILL)" in stderr  # torchrun names the rank that died
    return killed


def test_killed_dp_run_resumes_bit_identical(dp_run, killed_dp_run, tmp_path):
    _, _, ref, _, _ = dp_run
    work = tmp_path / "w"
    shutil.copytree(killed_dp_run, work)
    (work / "dp.toml").write_text((work / "dp.toml").read_text().replace(str(killed_dp_run), str(work)))
    logs = tmp_path / "logs"
    done = torchrun("train", work / "dp.toml", "-q", "--resume", cwd=work, logs=logs)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "resuming" in rank_output(logs, 0) and "note:" not in rank_output(logs, 0)  # same number of processes
    assert rank_output(logs, 1) == ""
    assert step_columns(work / "run/trajectory.mezo") == step_columns(ref / "trajectory.mezo")
    assert read_trajectory(work / "run/trajectory.mezo").keyframes == read_trajectory(ref / "trajectory.mezo").keyframes
    assert_same_weights(work / "run/final/model.safetensors", ref / "final/model.safetensors")


def test_a_dp_resume_takes_the_journaled_steps_on_every_rank(dp_run, killed_dp_run, tmp_path):
    """Rank 0 killed after steps 5..7 reached the step journal only: every rank takes them from there (rank 1 reads
    the journal that rank 0 keeps), so both go on at step 8 together, to the uninterrupted run's records."""
    _, _, ref, _, _ = dp_run
    work = tmp_path / "w"
    shutil.copytree(killed_dp_run, work)
    (work / "dp.toml").write_text((work / "dp.toml").read_text().replace(str(killed_dp_run), str(work)))
    traj = work / "run/trajectory.mezo"
    writer, data = TrajectoryWriter.open_for_resume(traj, flush_every=16)
    assert len(data.steps) == 5
    for rec in read_trajectory(ref / "trajectory.mezo").steps[5:8]:  # this run's records (it is the same run)
        writer.append_step(rec)
    os.close(writer._fd)  # killed: the writer never closes, steps 5..7 are in the journal only
    os.close(writer._journal_fd)
    assert os.path.getsize(journal_path(traj)) == 20 + 3 * 29
    logs = tmp_path / "logs"
    # blocks of 16 from here, so the recovered steps stay pending (in rank 0's journal) while rank 1 reads
    done = torchrun("train", work / "dp.toml", "-q", "--resume", "--set", "output.flush_every=16", cwd=work, logs=logs)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "steps 5-7 recovered from the step journal" in rank_output(logs, 0) and rank_output(logs, 1) == ""
    assert step_columns(traj) == step_columns(ref / "trajectory.mezo")
    assert read_trajectory(traj).keyframes == read_trajectory(ref / "trajectory.mezo").keyframes
    assert_same_weights(work / "run/final/model.safetensors", ref / "final/model.safetensors")
    assert not os.path.exists(journal_path(traj))


def test_resume_on_another_number_of_processes_is_said_and_replays_exactly(killed_dp_run, tmp_path):
    work = tmp_path / "w"
    shutil.copytree(killed_dp_run, work)
    (work / "dp.toml").write_text((work / "dp.toml").read_text().replace(str(killed_dp_run), str(work)))
    result = train_cli(work / "dp.toml", "--resume")  # one process, in this one
    assert ("note: this run was trained by 2 processes and resumes on 1: the batches are the same (chosen by seed "
            "and step), but their losses are now summed in another order") in result.output
    data = read_trajectory(work / "run/trajectory.mezo")
    assert len(data.steps) == RUN["steps"] and data.end is not None
    replayed = cli("replay", work / "run/trajectory.mezo", "--out", tmp_path / "rep", "--verify", "-q")
    assert "every keyframe verified" in replayed.output
    assert_same_weights(work / "run/final/model.safetensors", tmp_path / "rep/model.safetensors")


def test_a_batch_smaller_than_the_processes_is_refused(dp_run, tmp_path, monkeypatch):
    _, recipe, _, _, _ = dp_run
    for key, value in {"WORLD_SIZE": "4", "RANK": "0", "LOCAL_RANK": "0", "LOCAL_WORLD_SIZE": "4"}.items():
        monkeypatch.setenv(key, value)  # what torchrun --nproc-per-node 4 tells each process; no group is started
    result = train_cli(recipe, "--set", f"output.dir={tmp_path / 'x'}", ok=False)
    assert result.exit_code == 1
    assert result.output == ("error: mezo.batch_size = 3 is smaller than the 4 processes torchrun started: every "
                             "process scores a share of each batch, so use --nproc-per-node 3 or fewer, or a larger "
                             "batch\n")
    assert not (tmp_path / "x").exists()


def test_shards_split_the_batch_in_order_and_evenly():
    rows = list(range(7))
    shards = [distributed.shard(rows, distributed.World(r, 3)) for r in range(3)]
    assert shards == [[0, 1], [2, 3], [4, 5, 6]]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA: asks torchrun for one process more than GPUs")
def test_more_processes_than_gpus_is_refused(dp_run, tmp_path):
    tmp, recipe, _, _, _ = dp_run
    n = torch.cuda.device_count() + 1
    (tmp_path / "gpu.toml").write_text(recipe.read_text().replace('device = "cpu"', 'device = "cuda"')
                                       .replace(str(tmp / "runs/dp"), str(tmp_path / "run")))
    done = torchrun("train", tmp_path / "gpu.toml", "-q", nproc=n, cwd=tmp_path)
    assert done.returncode != 0
    count = n - 1
    assert (f"error: torchrun started {n} processes on this node but torch sees {count} CUDA "
            f"device{'s' if count != 1 else ''}: one GPU per process, so use --nproc-per-node {count} or fewer"
            in done.stderr)


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_a_rank_lost_without_torchrun_is_said_and_the_run_resumes_bit_identical(dp_run, tmp_path):
    """Two processes started by hand, as a scheduler without torchrun's agent does (nobody stops the survivor): rank 1
    is killed after a few steps; rank 0's next all-reduce fails and it says so, the trajectory stays valid, and a
    torchrun --resume ends with the uninterrupted run's records and weights."""
    tmp, recipe, ref, _, _ = dp_run
    work = tmp_path / "w"
    work.mkdir()
    (work / "dp.toml").write_text(recipe.read_text().replace(str(tmp / "runs/dp"), str(work / "run")))
    traj = work / "run/trajectory.mezo"
    port = _free_port()
    procs = []
    for rank in (0, 1):
        env = {**os.environ, "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""),
               "OMP_NUM_THREADS": "1", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "WORLD_SIZE": "2",
               "RANK": str(rank), "LOCAL_RANK": str(rank), "LOCAL_WORLD_SIZE": "2"}
        procs.append(subprocess.Popen([sys.executable, "-m", "mezo_tune", "train", str(work / "dp.toml"), "-q"],
                                      cwd=work, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and procs[0].poll() is None:
            if traj.exists() and len(read_for_resume(traj).steps) >= 3:
                break
            time.sleep(0.01)
        assert procs[0].poll() is None and procs[1].poll() is None, "the run ended before rank 1 was killed"
        procs[1].kill()
        out, err = procs[0].communicate(timeout=120)
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
            p.wait()
    assert procs[0].returncode == 1, err[-3000:]
    last = err.splitlines()[-1]
    assert last.startswith("error: another process of this launch stopped answering ("), err[-3000:]
    assert last.endswith("); the steps finished until then are in the trajectory and its step journal: start the "
                         "same launch again with --resume"), err[-3000:]
    assert "Traceback" not in err
    assert read_trajectory(traj).end is None
    done = torchrun("train", work / "dp.toml", "-q", "--resume", cwd=work)
    assert done.returncode == 0, done.stderr[-3000:]
    assert step_columns(traj) == step_columns(ref / "trajectory.mezo")
    assert read_trajectory(traj).keyframes == read_trajectory(ref / "trajectory.mezo").keyframes
    assert_same_weights(work / "run/final/model.safetensors", ref / "final/model.safetensors")
