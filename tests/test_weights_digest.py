"""The weights digest of keyframes, end blocks and checkpoints (mezo.weights_digest, scheme mezo-tune/lowbias32-sum v1):
computed on the tensor's device, the same value for any chunking, thread count and device; any one-bit change shows;
format 2 trajectories (blake2b-256 keyframes) still replay, verify and resume.

tests/data/format2_run/ was written by mezo-tune at commit 43d00ea (format 2, before this digest existed): a tiny
Llama (hidden 16) saved there, six rows, 12 steps, keyframes every 4 steps; paths in its recipe are relative to it.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from test_train import blocks, block_bytes, cli, lm_recipe, train_cli  # noqa: F401 (lm_recipe: a fixture)

from mezo_tune import mezo
from mezo_tune.mezo import BLAKE2B_DIGEST, SUM_DIGEST, tensor_sum_hash, weights_digest
from mezo_tune.trajectory import FORMAT_VERSION, TrajectoryError, keyframe_digest, read_trajectory

FORMAT2 = Path(__file__).parent / "data" / "format2_run"
# The digest of golden_tensors() (integer-built bit patterns: no float op, the same on every machine). Changing it
# means every recorded keyframe stops verifying: bump SUM_DIGEST's version instead.
GOLDEN = "09426ce5ba62cf31f5bbcae17ffe67556276449bef90797274038b62ae7b0fee"


def _bits_tensor(n: int, word: torch.dtype, salt: int) -> torch.Tensor:
    """n words of fixed pseudo-random bits (an integer LCG), as the integer dtype `word`."""
    bits = 8 * torch.empty((), dtype=word).element_size()
    x = (torch.arange(n, dtype=torch.int64) * 2654435761 + salt * 40503) % (1 << bits)
    x = torch.where(x >= 1 << (bits - 1), x - (1 << bits), x)  # two's complement: the same bits, signed
    return x.to(word)


def golden_tensors() -> list[torch.Tensor]:
    """fp32 1009 × 3 (numel 3027, a multiple of nothing convenient), bf16 and fp16 of odd numel, fp64, fp32 scalar."""
    return [
        _bits_tensor(3027, torch.int32, 1).view(torch.float32).reshape(1009, 3),
        _bits_tensor(1013, torch.int16, 2).view(torch.bfloat16),
        _bits_tensor(7 * 11 * 13, torch.int16, 3).view(torch.float16).reshape(7, 11, 13),
        _bits_tensor(2 * 257, torch.int32, 4).view(torch.float64),
        _bits_tensor(1, torch.int32, 5).view(torch.float32).reshape(()),
    ]


def test_golden_value():
    assert weights_digest(golden_tensors()).hex() == GOLDEN


def _lowbias32(x: int) -> int:
    x ^= x >> 16
    x = (x * 0x7FEB352D) & 0xFFFFFFFF
    x ^= x >> 15
    x = (x * 0x446CA68B) & 0xFFFFFFFF
    return x ^ (x >> 16)


def _reference_sum_hash(t: torch.Tensor) -> int:
    """tensor_sum_hash in plain Python integers, from its docstring and zrng's: sum of signed32(mix(w ^ bits(i))),
    w the word's bits sign-extended to 32, bits(i) = mix(mix(lo(i) ^ k0) ^ hi(i) ^ k1), mod 2**64."""
    k0, k1 = mezo._SUM_KEY
    words = t.reshape(-1).view({2: torch.int16, 4: torch.int32, 8: torch.int32}[t.element_size()]).tolist()
    total = 0
    for i, w in enumerate(words):
        h = _lowbias32(_lowbias32((i & 0xFFFFFFFF) ^ k0) ^ (i >> 32) ^ k1)
        term = _lowbias32((w & 0xFFFFFFFF) ^ h)
        total += term - (1 << 32) if term >= 1 << 31 else term
    return total % (1 << 64)


def test_the_torch_hash_is_the_plain_integer_one():
    for t in golden_tensors():
        assert tensor_sum_hash(t) == _reference_sum_hash(t), t.dtype


def test_the_value_does_not_depend_on_the_chunking(monkeypatch):
    tensors = golden_tensors()
    for chunk in (1, 7, 1000, 1 << 20):
        monkeypatch.setitem(mezo._SUM_CHUNK, "cpu", chunk)
        assert weights_digest(tensors).hex() == GOLDEN, chunk


def test_shards_with_their_offsets_add_up_to_the_whole():
    """Contract 8: a rank holding elements a..b of a tensor hashes them at their global indices."""
    t = golden_tensors()[0].reshape(-1)
    parts = [(0, 1), (1, 1000), (1000, 1001), (1001, 3027)]
    total = sum(tensor_sum_hash(t[a:b], offset=a) for a, b in parts) % (1 << 64)
    assert total == tensor_sum_hash(t)
    assert sum(tensor_sum_hash(t[a:b]) for a, b in parts) % (1 << 64) != total  # the index is part of every term


def test_a_view_hashes_as_its_values_in_row_major_order():
    t = golden_tensors()[0]
    view = t.t().contiguous().t()  # the same values, column-major storage
    assert not view.is_contiguous() and torch.equal(view.view(torch.int32), t.view(torch.int32))  # NaN bits too
    assert weights_digest([view]) == weights_digest([t])


def _flip(t: torch.Tensor, index: int, bit: int) -> torch.Tensor:
    word = {2: torch.int16, 4: torch.int32, 8: torch.int64}[t.element_size()]
    w = t.clone().view(word).reshape(-1)
    w[index] ^= (1 << bit) if bit < 8 * t.element_size() - 1 else torch.iinfo(word).min  # the sign bit, signed
    return w.view(t.dtype).reshape(t.shape)


@pytest.mark.parametrize("which", range(5))
def test_every_one_bit_flip_of_the_first_and_last_element_changes_it(which):
    tensors = golden_tensors()
    t = tensors[which]
    before = weights_digest(tensors)
    seen = {before}
    for index in {0, t.numel() - 1}:
        for bit in range(8 * t.element_size()):
            flipped = weights_digest(tensors[:which] + [_flip(t, index, bit)] + tensors[which + 1:])
            assert flipped not in seen, (index, bit)
            seen.add(flipped)


def test_one_bit_flips_at_random_places_change_it():
    g = torch.Generator().manual_seed(0)
    tensors = golden_tensors()
    before = weights_digest(tensors)
    for _ in range(200):
        which = int(torch.randint(len(tensors), (), generator=g))
        t = tensors[which]
        index = int(torch.randint(t.numel(), (), generator=g))
        bit = int(torch.randint(8 * t.element_size(), (), generator=g))
        assert weights_digest(tensors[:which] + [_flip(t, index, bit)] + tensors[which + 1:]) != before


def test_order_shape_and_dtype_are_part_of_it():
    a, b = golden_tensors()[:2]
    assert weights_digest([a, b]) != weights_digest([b, a])  # the trainable set is an ordered list
    swapped = a.clone().reshape(-1)
    swapped[[0, 1]] = swapped[[1, 0]]
    assert weights_digest([swapped.reshape(a.shape)]) != weights_digest([a])  # elements are hashed at their index
    assert weights_digest([a.reshape(3, 1009)]) != weights_digest([a])
    assert weights_digest([a.view(torch.int32)]) != weights_digest([a])


def test_the_old_scheme_is_blake2b_of_the_bytes():
    import hashlib

    t = golden_tensors()[1]
    expected = hashlib.blake2b(f"{t.dtype}{tuple(t.shape)}".encode() + t.view(torch.uint8).numpy().tobytes(),
                               digest_size=32).digest()
    assert weights_digest([t], BLAKE2B_DIGEST) == expected


def test_an_unknown_scheme_is_refused():
    with pytest.raises(ValueError, match=r"weights digest \{'name': 'sha3', 'version': 1\} is unknown"):
        weights_digest([], {"name": "sha3", "version": 1})


_SUBPROCESS = """
import torch
from mezo_tune.mezo import weights_digest
torch.manual_seed(0)
t = torch.randn(3_000_003)
print(torch.get_num_threads(), weights_digest([t, t.to(torch.bfloat16)]).hex())
"""


def test_the_same_value_with_one_and_two_threads():
    torch.manual_seed(0)
    t = torch.randn(3_000_003)
    here = weights_digest([t, t.to(torch.bfloat16)]).hex()
    for threads in ("1", "2"):
        env = {**os.environ, "OMP_NUM_THREADS": threads, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
        out = subprocess.run([sys.executable, "-c", _SUBPROCESS], env=env, capture_output=True, text=True, check=True)
        assert out.stdout.split() == [threads, here]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device: the CPU-vs-CUDA comparison needs one")
def test_cuda_gives_the_cpu_value():
    tensors = golden_tensors()
    assert weights_digest([t.to("cuda") for t in tensors]).hex() == GOLDEN
    torch.manual_seed(0)
    big = torch.randn(40_000_001)  # several CUDA chunks, one of them partial
    assert tensor_sum_hash(big.to("cuda")) == tensor_sum_hash(big)


# ---- trajectories ---------------------------------------------------------------------------------------------------

def test_the_scheme_of_each_format():
    """trajectory.py knows which scheme a file holds; mezo.py computes it (the same name and version)."""
    assert keyframe_digest({"format_version": 1}) == keyframe_digest({"format_version": 2}) == BLAKE2B_DIGEST
    assert keyframe_digest({"format_version": 3, "weights_digest": SUM_DIGEST}) == SUM_DIGEST
    with pytest.raises(TrajectoryError, match=r"^the trajectory header's weights_digest is None, not "):
        keyframe_digest({"format_version": 3})


def test_a_new_run_names_its_digest(tmp_path, lm_recipe):
    train_cli(lm_recipe(steps=4))
    data = read_trajectory(tmp_path / "runs/x/trajectory.mezo")
    assert data.header["format_version"] == FORMAT_VERSION == 3
    assert keyframe_digest(data) == data.header["weights_digest"] == SUM_DIGEST


@pytest.fixture
def format2_run(tmp_path, monkeypatch) -> Path:
    """A copy of tests/data/format2_run, the working directory (its recipe's paths are relative)."""
    run = tmp_path / "format2"
    shutil.copytree(FORMAT2, run)
    monkeypatch.chdir(run)
    return run


def test_a_format2_trajectory_replays_and_verifies(format2_run):
    data = read_trajectory(format2_run / "trajectory.mezo")
    assert data.header["format_version"] == 2 and "weights_digest" not in data.header
    assert keyframe_digest(data) == BLAKE2B_DIGEST and sorted(data.keyframes) == [-1, 3, 7, 11]
    result = cli("replay", "trajectory.mezo", "--out", "rep", "--verify", "-q")
    assert result.output == "replayed 12 steps (every keyframe verified); wrote rep\n"


def test_a_format2_trajectory_resumes_with_its_own_digests(format2_run):
    """Cut after the keyframe of step 7 (the run was killed there), resume: the file goes on as format 2 with
    blake2b-256 keyframes, byte-identical to the run that wrote it uninterrupted."""
    (format2_run / "run").mkdir()
    traj = shutil.move(format2_run / "trajectory.mezo", format2_run / "run" / "trajectory.mezo")
    whole, buf = block_bytes(traj), traj.read_bytes()
    keyframe_ends = {int.from_bytes(buf[off + 7 : off + 15], "little", signed=True): off + 7 + length + 4
                     for off, btype, length in blocks(traj) if btype == ord("K")}
    traj.write_bytes(buf[: keyframe_ends[7]])
    assert len(read_trajectory(traj).steps) == 8
    train_cli(format2_run / "recipe.toml", "--resume")
    assert block_bytes(traj) == whole
