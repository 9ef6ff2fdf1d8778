"""Damaged trajectories, generated: truncations, bit flips, inflated length fields, swapped blocks.

read_trajectory either raises TrajectoryError naming the file, or returns the intact steps only (a prefix of the
undamaged run's records, keyframes among the run's own) with `.problem` naming the byte offset where the damage
starts; no other exception, and no allocation of what a length field claims. Replay never applies a damaged record.
"""

from __future__ import annotations

import re
import shutil
import struct
import tracemalloc
import zlib

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from test_train import lm_recipe  # noqa: F401 - a fixture, used by the replay test

from mezo_tune import trajectory
from mezo_tune.trajectory import StepRecord, TrajectoryError, TrajectoryWriter, read_trajectory

FUZZ = settings(max_examples=500, deadline=None, database=None, derandomize=True,
                suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])


def _records(n: int) -> list[StepRecord]:
    rng = np.random.default_rng(0)
    out = []
    for t in range(n):
        lp, lm = (float(np.float32(v)) for v in rng.uniform(2, 3, 2))
        skipped = t % 11 == 5
        g = float("nan") if skipped else float(np.float32(rng.normal(0, 1e-2)))
        out.append(StepRecord(t, g, float(np.float32(1e-3)), lp, float("inf") if skipped else lm, skipped))
    return out


@pytest.fixture(scope="module")
def original(tmp_path_factory) -> tuple[bytes, trajectory.TrajectoryData, list[tuple[int, int]]]:
    """A finished 40-step trajectory (blocks of 8 steps, a keyframe every 10 steps, skipped steps), its parsed
    data and its blocks as (offset, size), the header first."""
    path = tmp_path_factory.mktemp("fuzz") / "t.mezo"
    with TrajectoryWriter.create(path, {"seed": 1, "recipe": "[mezo]\nlr = 1e-3\n"}, flush_every=8) as w:
        w.append_keyframe(-1, bytes(32))
        for rec in _records(40):
            w.append_step(rec)
            if rec.step % 10 == 9:
                w.append_keyframe(rec.step, bytes([rec.step]) * 32)
        w.finish(40, bytes([39]) * 32)
    data = read_trajectory(path)
    buf = path.read_bytes()
    spans, pos = [(0, data.header_bytes)], data.header_bytes
    while pos < len(buf):
        (length,) = struct.unpack_from("<I", buf, pos + 3)
        spans.append((pos, 7 + length + 4))
        pos += 7 + length + 4
    return buf, data, spans


def _columns(data, n=None) -> dict[str, bytes]:
    return {k: v[:n].tobytes() for k, v in data.as_arrays().items()}


def check(path, buf: bytes, original) -> trajectory.TrajectoryData | None:
    """Parse a damaged copy and check the contract; returns the data when it parsed."""
    _, clean, _ = original
    path.write_bytes(buf)
    try:
        data = read_trajectory(path)
    except TrajectoryError as e:
        assert str(e).startswith(f"{path}: "), str(e)
        return None
    n = len(data.steps)
    assert _columns(data) == _columns(clean, n)  # only intact steps, exactly as written
    assert all(clean.keyframes.get(step) == digest for step, digest in data.keyframes.items())
    assert data.end in (None, clean.end)
    assert data.intact_bytes <= len(buf)
    if data.problem is not None:
        assert re.search(r"at byte \d+", data.problem), data.problem
    else:
        assert data.intact_bytes == len(buf)
    return data


@FUZZ
@given(cut=st.integers(min_value=0))
def test_truncation(tmp_path, original, cut):
    buf = original[0]
    check(tmp_path / "t.mezo", buf[: cut % (len(buf) + 1)], original)


@FUZZ
@given(flips=st.lists(st.tuples(st.integers(min_value=0), st.integers(0, 7)), min_size=1, max_size=3))
def test_bit_flips(tmp_path, original, flips):
    buf = bytearray(original[0])
    for offset, bit in flips:
        buf[offset % len(buf)] ^= 1 << bit
    data = check(tmp_path / "t.mezo", bytes(buf), original)
    if bytes(buf) != original[0]:  # CRC32 catches every 1 to 3 bit error in blocks this small
        assert data is None or data.problem is not None or data.end is None


@FUZZ
@given(which=st.integers(min_value=0), claim=st.one_of(st.integers(0, 2**32 - 1),
                                                        st.sampled_from([2**32 - 1, 2**31, 1 << 20])),
       fix_crc=st.booleans())
def test_inflated_length_fields(tmp_path, original, which, claim, fix_crc):
    """The header length, a block's payload length, or a steps block's step count (with its CRC recomputed, as a
    hostile file would) set to any value."""
    buf, _, spans = original
    buf = bytearray(buf)
    pos, size = spans[which % len(spans)]
    if pos == 0:
        struct.pack_into("<I", buf, 8, claim)
    elif buf[pos + 2] == ord("S") and fix_crc:
        struct.pack_into("<I", buf, pos + 7 + 8, claim)  # the count, after the u64 first step
        struct.pack_into("<I", buf, pos + size - 4, zlib.crc32(bytes(buf[pos + 2 : pos + size - 4])))
    else:
        struct.pack_into("<I", buf, pos + 3, claim)
    tracemalloc.start()
    try:
        check(tmp_path / "t.mezo", bytes(buf), original)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 8 * len(buf) + (1 << 20), peak


@FUZZ
@given(i=st.integers(min_value=1), j=st.integers(min_value=1))
def test_swapped_blocks(tmp_path, original, i, j):
    buf, _, spans = original
    i, j = sorted((1 + i % (len(spans) - 1), 1 + j % (len(spans) - 1)))
    parts = [buf[p : p + s] for p, s in spans]
    parts[i], parts[j] = parts[j], parts[i]
    check(tmp_path / "t.mezo", b"".join(parts), original)


def _hostile_steps_block(count: int, columns: bytes) -> bytes:
    payload = struct.pack("<QI", 0, count) + zlib.compress(columns, 9)
    return trajectory._encode_block(ord("S"), payload)


def test_a_decompression_bomb_is_not_inflated(tmp_path, original):
    """A steps block with a valid CRC whose columns inflate to 64 MB while its count claims 10 steps: the reader
    inflates at most the 170 bytes the count implies."""
    buf, clean, _ = original
    bomb = buf[: clean.header_bytes] + _hostile_steps_block(10, bytes(64 << 20))
    tracemalloc.start()
    try:
        data = check(tmp_path / "t.mezo", bomb, original)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert data.problem == (f"malformed block at byte {clean.header_bytes}: steps block holds 171 column bytes, "
                            f"expected 170")
    assert peak < 4 << 20, peak


def test_a_huge_step_count_is_refused_before_inflating(tmp_path, original):
    buf, clean, _ = original
    data = check(tmp_path / "t.mezo", buf[: clean.header_bytes] + _hostile_steps_block(2**32 - 1, b""), original)
    assert data.problem == (f"malformed block at byte {clean.header_bytes}: steps block claims 4294967295 steps, "
                            f"more than the 65536 a block may hold")


def test_deeply_nested_json_in_an_end_block(tmp_path, original):
    buf, clean, spans = original
    end_at = spans[-1][0]
    data = check(tmp_path / "t.mezo", buf[:end_at] + trajectory._encode_block(ord("E"), b"[" * 100_000), original)
    assert data.problem.startswith(f"malformed block at byte {end_at}: ")
    assert len(data.steps) == 40 and data.end is None


# ---- replay of a damaged trajectory ---------------------------------------------------------------------------------

@pytest.mark.parametrize("damage", ["flip-in-steps", "cut-mid-block", "swap-steps-blocks", "flip-in-end"])
def test_replay_never_applies_a_damaged_record(damage, lm_recipe, tmp_path):
    """Whatever the damage, replay writes the weights of the intact steps (bit-equal to `--steps N` of the
    undamaged file), or refuses; never weights built from a damaged record."""
    from test_train import assert_same_weights, blocks, cli, train_cli

    train_cli(lm_recipe(steps=12, keyframe_every=4))
    clean = tmp_path / "runs/x/trajectory.mezo"
    bad = tmp_path / "bad.mezo"
    shutil.copy(clean, bad)
    buf = bytearray(bad.read_bytes())
    all_blocks = blocks(clean)
    steps_blocks = [b for b in all_blocks if b[1] == ord("S")]
    if damage == "flip-in-steps":
        pos, _, length = steps_blocks[1]
        buf[pos + 7 + length - 3] ^= 0x10
    elif damage == "cut-mid-block":
        pos, _, length = steps_blocks[2]
        del buf[pos + 7 + length // 2 :]
    elif damage == "swap-steps-blocks":
        (p1, _, l1), (p2, _, l2) = steps_blocks[0], steps_blocks[1]
        a, b = bytes(buf[p1 : p1 + l1 + 11]), bytes(buf[p2 : p2 + l2 + 11])
        buf[p1 : p2 + l2 + 11] = b + bytes(buf[p1 + l1 + 11 : p2]) + a
    else:
        pos, _, length = all_blocks[-1]
        buf[pos + 7] ^= 0x01
    bad.write_bytes(bytes(buf))
    data = read_trajectory(bad)
    assert data.problem is not None
    n = len(data.steps)
    result = cli("replay", bad, "--out", tmp_path / "rep", "-q")
    assert f"warning: {bad}: {data.problem}; replaying the {n} intact steps" in result.output
    cli("replay", clean, "--out", tmp_path / "ref", "--steps", n, "-q")
    assert_same_weights(tmp_path / "ref/model.safetensors", tmp_path / "rep/model.safetensors")
    assert n == {"flip-in-steps": 4, "cut-mid-block": 8, "swap-steps-blocks": 0, "flip-in-end": 12}[damage]
