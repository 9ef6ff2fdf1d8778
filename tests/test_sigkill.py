"""Fault injection: `mezo-tune train` killed with SIGKILL at seeded random moments, resumed each time, ends
bit-identical to an uninterrupted run (weights and every trajectory block); the steps each kill cost are counted.

The first test kills from outside at random times (mostly inside forwards and updates); the second kills from inside
(tests/fault_injection.py) during an update, a trajectory append, a checkpoint save and the final export. The full
measurement, 20 kills, is `python tests/fault_injection.py` (README, "Reliability")."""

from __future__ import annotations

import json
import random
from pathlib import Path

import fault_injection
from conftest import CORPUS, write_jsonl
from test_train import assert_same_weights, block_bytes, kill_train_when, train_cli, write_recipe

from mezo_tune.trajectory import read_for_resume, read_trajectory

STEPS = 60
KILLS = 3


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
    rng = random.Random(13)
    lost = []
    for kill in range(KILLS):
        before = len(read_for_resume(traj).steps) if kill else 0  # where the resume goes on
        logged = len(metrics.read_text().splitlines()) if metrics.exists() else 0
        target = rng.randint(1, 14)  # kill once this process has finished this many steps ...
        jitter = rng.uniform(0, 0.03)  # ... and then this many seconds later: anywhere inside a step or a write
        kill_train_when(killed, tmp_path, lambda: len(_logged_steps(metrics, logged)) >= target,
                        *(["--resume"] if kill else []), delay=jitter)
        data = read_for_resume(traj)  # the file's intact steps and the journal's that continue them
        done = _logged_steps(metrics, logged)
        assert data.end is None and len(done) >= target and done[0] == before
        # a kill between a step's journal record and its metrics line leaves the log one step behind the journal
        lost.append(max(0, done[-1] + 1 - len(data.steps)))
    train_cli(killed, "--resume")
    train_cli(ref)

    assert_same_weights(tmp_path / "ref/final/model.safetensors", tmp_path / "killed/final/model.safetensors")
    assert block_bytes(traj) == block_bytes(tmp_path / "ref/trajectory.mezo")
    assert read_trajectory(traj).end == read_trajectory(tmp_path / "ref/trajectory.mezo").end
    assert max(lost) == 0  # a step's journal record is written before its metrics line
    assert not (tmp_path / "killed/trajectory.mezo.journal").exists()  # finished
    print(f"\nsigkill: {KILLS} kills, steps lost per kill {lost} (the step journal holds the steps not yet in a "
          f"block)")


def test_sigkill_inside_an_update_an_append_a_checkpoint_and_the_export(tmp_path):
    recipe_for, sizes = fault_injection.tiny_setup(tmp_path, steps=30)
    ref = fault_injection.reference(recipe_for, tmp_path)
    kills = fault_injection.draw_kills(5, 13, **sizes)[1:]  # [0], inside a forward: the test above hits those
    assert [k.phase for k in kills] == ["update", "append", "checkpoint", "export"]
    lost = []
    for kill in kills:
        r = fault_injection.inject(kill, recipe_for, ref, tmp_path / kill.phase)
        assert all(r["same"].values()), (kill, r["same"])
        assert r["lost"] == 0, (kill, r)
        lost.append(r["lost"])
    print(f"\nsigkill inside: {', '.join(f'{k.phase} ({k.where()}): {n} lost' for k, n in zip(kills, lost))}")


def test_a_kill_between_blocks_loses_no_step_and_resume_is_bit_identical(tmp_path):
    """Killed inside step 13's forward: steps 0..9 are in a block (the keyframe after step 9 closed it), 10..12 only
    in the step journal. The resume takes them from there (not scoring them again), and ends as the uninterrupted
    run: the same records, keyframes, evals, blocks and weights; the journal is gone."""
    from mezo_tune.recipe import load_recipe
    from mezo_tune.train import train

    recipe_for, _ = fault_injection.tiny_setup(tmp_path, steps=30)
    ref = fault_injection.reference(recipe_for, tmp_path)
    out = tmp_path / "killed/run"
    (tmp_path / "killed").mkdir()
    recipe = recipe_for(tmp_path / "killed/recipe.toml", out)
    kill = fault_injection.Kill("forward", 13 * 1000 + 2, 0.5)
    assert fault_injection.run_killed(recipe, kill, tmp_path / "kill.json") == 13
    traj = out / "trajectory.mezo"
    assert len(read_trajectory(traj).steps) == 10 and len(read_for_resume(traj).steps) == 13
    messages = []
    train(load_recipe(recipe), resume=True, progress=False, log=messages.append)
    assert messages[0] == (f"resuming {traj} after step 12 (replaying 13 steps from the base model); steps 10-12 "
                           f"recovered from the step journal")
    got = fault_injection.outcome(out)
    assert {k: got[k] == ref[k] for k in ref} == {k: True for k in ref}
    assert not (out / "trajectory.mezo.journal").exists()
