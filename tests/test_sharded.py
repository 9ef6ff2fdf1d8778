"""Sharded weights under torchrun (DESIGN.md contract 8; sharded.py), for real: `torchrun --standalone
--nproc-per-node 2`, gloo on CPU, FSDP2 fully_shard, the tiny llama of conftest.py with a vocabulary of 321 so that
the tied embedding's rows split unevenly (161 on rank 0, 160 on rank 1).

tests/shard_probe.py checks the engine against one process, tensor by tensor (z, perturbation, restore, update,
digest, forwards); a 2-process training run (module fixture) replays in one process to its final weights bit for bit,
its losses equal a one-process run's to float rounding, and a sharded resume replays the run from the base model.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import CORPUS, save_tiny
from test_distributed import rank_output, torchrun, two_process_run
from test_train import assert_same_weights, cli, step_columns, train_cli, write_recipe

from mezo_tune import zrng
from mezo_tune.trajectory import read_trajectory

REPO = Path(__file__).resolve().parents[1]
RUN = dict(steps=8, batch_size=3, eval_every=4, keyframe_every=2, flush_every=1, max_length=24)
SHARD = "\n[distributed]\nshard_weights = true\n"


def chunk_rows(rows: int, ranks: int) -> list[tuple[int, int]]:
    """(first row, rows) of each rank's shard, split as FSDP2 splits dim 0 (torch.chunk: ceil(rows / N) per rank)."""
    per = -(-rows // ranks)
    return [(min(r * per, rows), max(0, min(per, rows - r * per))) for r in range(ranks)]


@pytest.mark.parametrize("shape,ranks", [((321, 32), 2), ((321, 32), 3), ((5, 7), 4), ((1 << 12, 1 << 10), 3)])
def test_shard_z_is_the_slice_of_the_whole_tensors_z(shape, ranks):
    # The z a rank draws for its rows (zrng keyed at the shard's first global index) is, bit for bit, the same elements
    # of the whole tensor's z (contract 2), for uneven shards, an empty one ((5, 7) on 4 ranks: 2, 2, 1, 0 rows) and
    # shards that start inside one of zrng's 2**22-element chunks ((4096, 1024) on 3 ranks: 1366 rows of 1024).
    width, numel = shape[1], shape[0] * shape[1]
    whole = zrng.z_for(5, 9, "model.embed_tokens.weight", numel)
    shards = []
    for first, rows in chunk_rows(shape[0], ranks):
        offset, n = first * width, rows * width
        part = torch.cat([zrng.z_for(5, 9, "model.embed_tokens.weight", b - a, offset=offset + a)
                          for a, b in zrng.chunks(n)]) if n else torch.empty(0)
        assert torch.equal(part, whole[offset: offset + n])
        shards.append(part)
    assert torch.equal(torch.cat(shards), whole)


def test_shards_draw_perturb_update_and_digest_as_one_process(tmp_path):
    done = torchrun_probe(tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    found = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    embedding = "model.embed_tokens.weight"
    assert [f["offsets"][embedding] for f in found] == [[161, 0], [160, 161 * 32]]  # rows held, first flat index
    assert [f["offsets"]["model.norm.weight"] for f in found] == [[16, 0], [16, 16]]
    checks = ("z", "perturbed", "restored", "updated", "stochastic", "digest_before", "digest_after")
    for f in found:
        assert {k: f[k] for k in checks} == dict.fromkeys(checks, True)
        assert f["forwards"] == [True] * 4  # +, -, + again (FSDP's root weights regathered each time), after update


def torchrun_probe(out: Path):
    """tests/shard_probe.py under `torchrun --nproc-per-node 2`, writing rank<r>.json into out."""
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "PROBE_OUT": str(out)}
    return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
                           str(REPO / "tests" / "shard_probe.py")], cwd=out, env=env, capture_output=True, text=True,
                          timeout=180)


@pytest.fixture(scope="module")
def sharded_run(tmp_path_factory):
    """The 2-process sharded run: (tmp dir, recipe, its output dir, audit dir, log dir)."""
    model = save_tiny(tmp_path_factory.mktemp("model") / "model", "llama", torch.float32, vocab_size=321)
    return two_process_run(tmp_path_factory, "shard", model, {**RUN, "checkpoint_every": 2}, SHARD)


def test_sharded_trajectory_replays_bit_equal_in_one_process(sharded_run, tmp_path):
    # final/ holds the shards gathered by rank 0; replay rebuilds them in one process, and --verify checks every
    # keyframe digest (summed over the shards during training) against the unsharded weights
    _, _, out, _, _ = sharded_run
    result = cli("replay", out / "trajectory.mezo", "--out", tmp_path / "rep", "--verify", "-q")
    assert result.output == f"replayed {RUN['steps']} steps (every keyframe verified); wrote {tmp_path}/rep\n"
    assert_same_weights(out / "final/model.safetensors", tmp_path / "rep/model.safetensors")


def test_sharded_losses_equal_a_one_process_run_within_fp32_reduction_order(sharded_run, tmp_path):
    tmp, recipe, out, _, _ = sharded_run
    one = tmp_path / "one.toml"
    one.write_text(recipe.read_text().replace(SHARD, "").replace(str(out), str(tmp_path / "one")))
    train_cli(one)
    a, b = (read_trajectory(p).as_arrays() for p in (out / "trajectory.mezo", tmp_path / "one/trajectory.mezo"))
    assert len(a["g"]) == len(b["g"]) == RUN["steps"] and not a["skipped"].any()
    # The gathered perturbed weights are one process's, bit for bit (shard_probe.py: the same logits). The batch is
    # split over the ranks as in data parallel: each rank pads its rows to its own longest one and the ranks add
    # float64 sums where one process adds fp32 ones, a few fp32 ulps of a loss near 5.8 (one ulp: 4.8e-7, relative
    # 8.3e-8); rtol 2e-6 allows 24. g divides them by 2ε, so later weights differ in their last bits, and are compared
    # through the run's own replay (above).
    for key in ("loss_plus", "loss_minus"):
        np.testing.assert_allclose(a[key], b[key], rtol=2e-6, atol=0)
    # evals score every row on every rank: the same rows in the same batches as one process
    sharded_evals = read_trajectory(out / "trajectory.mezo").evals
    one_evals = read_trajectory(tmp_path / "one/trajectory.mezo").evals
    assert [e["n"] for e in sharded_evals] == [len(CORPUS)] * 3
    assert sharded_evals[0] == one_evals[0]  # the base weights: the same forwards, the same bits


def test_rank_1_writes_and_prints_nothing_and_no_checkpoint_is_kept(sharded_run):
    _, _, out, audit, logs = sharded_run
    assert json.loads((audit / "rank1.json").read_text()) == []
    assert rank_output(logs, 1) == ""
    written = {part for _, p in json.loads((audit / "rank0.json").read_text()) if Path(p).is_relative_to(out)
               for part in Path(p).relative_to(out).parts[:1]}
    assert {"trajectory.mezo", "metrics.jsonl", "recipe.toml", "final.tmp"} <= written  # the audit sees rank 0
    assert "checkpoint.tmp" not in written  # checkpoint_every = 2 is not used: a resume replays from the base
    assert sorted(p.name for p in out.iterdir()) == ["final", "metrics.jsonl", "recipe.toml", "trajectory.mezo"]


def test_cut_sharded_run_resumes_bit_identical(sharded_run, tmp_path):
    # The finished run's trajectory cut in the middle (what a crash leaves behind): `--resume` on 2 processes cuts the
    # damaged tail, replays the intact records onto each rank's shards from the base model (sharded runs keep no
    # checkpoint), checking the keyframes, and trains the rest: the same records and weights as the uninterrupted run.
    _, recipe, out, _, _ = sharded_run
    work = tmp_path / "run"
    shutil.copytree(out, work)
    traj = work / "trajectory.mezo"
    data = traj.read_bytes()
    header_end = 8 + 4 + int.from_bytes(data[8:12], "little") + 4  # magic, header length, header, its checksum
    traj.write_bytes(data[: (header_end + len(data)) // 2])  # half of the blocks after the header
    intact = len(read_trajectory(traj).steps)
    assert 0 < intact < RUN["steps"]
    (tmp_path / "shard.toml").write_text(recipe.read_text().replace(str(out), str(work)))
    logs = tmp_path / "logs"
    done = torchrun("train", tmp_path / "shard.toml", "-q", "--resume", cwd=tmp_path, logs=logs)
    assert done.returncode == 0, done.stderr[-3000:]
    assert (f"resuming {traj} after step {intact - 1} (replaying {intact} steps from the base model); cut off a "
            f"damaged tail" in rank_output(logs, 0))
    assert rank_output(logs, 1) == ""
    assert step_columns(traj) == step_columns(out / "trajectory.mezo")
    assert read_trajectory(traj).keyframes == read_trajectory(out / "trajectory.mezo").keyframes
    assert_same_weights(work / "final/model.safetensors", out / "final/model.safetensors")


def test_sharded_weights_without_torchrun_is_refused(sharded_run, tmp_path):
    _, recipe, _, _, _ = sharded_run
    result = train_cli(recipe, "--set", f"output.dir={tmp_path / 'x'}", ok=False)
    assert result.exit_code == 1
    assert result.output == ("error: distributed.shard_weights = true splits the weights over the processes torchrun "
                             "starts: run `torchrun --nproc-per-node N -m mezo_tune train ...` with N > 1, or set "
                             "shard_weights = false\n")
    assert not (tmp_path / "x").exists()


def test_what_sharded_weights_cannot_train_is_named(sharded_run):
    from mezo_tune.recipe import RecipeError, load_recipe

    _, recipe, _, _, _ = sharded_run
    with pytest.raises(RecipeError) as e:
        load_recipe(recipe, ["adapter.type=lora", "mezo.adam=true"])
    assert e.value.problems[-2:] == [
        'distributed.shard_weights: shards full weights; an adapter (adapter.type = "lora") is small enough to train '
        'data parallel: set shard_weights = false',
        "distributed.shard_weights: cannot keep Adam's moments (mezo.adam = true) per shard yet: use mezo.momentum, "
        "or shard_weights = false"]
    with pytest.raises(RecipeError) as e:
        load_recipe(recipe, ["mezo.direction_type=sparse"])
    assert e.value.problems == ['distributed.shard_weights: draws z with the dense or layerwise generator only '
                                '(mezo.direction_type = "sparse")']
    assert load_recipe(recipe, ["mezo.direction_type=layerwise"]).distributed.shard_weights
    with pytest.raises(RecipeError) as e:
        load_recipe(recipe, ["model.device_map=auto"])
    assert e.value.problems[-1] == ("distributed.shard_weights: shards weights held in memory; offloading "
                                    "(model.device_map) is one process's alternative: set one of them")


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 CUDA GPUs: one shard per GPU, nccl")
def test_sharded_cuda_run_replays_bit_equal_in_one_process(sharded_run, tmp_path):
    tmp, recipe, out, _, _ = sharded_run
    gpu = tmp_path / "gpu.toml"
    gpu.write_text(recipe.read_text().replace('device = "cpu"', 'device = "cuda"')
                   .replace(str(out), str(tmp_path / "run")))
    done = torchrun("train", gpu, "-q", cwd=tmp_path, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    result = cli("replay", tmp_path / "run/trajectory.mezo", "--out", tmp_path / "rep", "--verify", "--device", "cuda",
                 "-q")
    assert "every keyframe verified" in result.output
    assert_same_weights(tmp_path / "run/final/model.safetensors", tmp_path / "rep/model.safetensors")
