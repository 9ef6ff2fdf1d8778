"""The trajectory file (contract 5): exact round trips, size, crash safety, resume == uninterrupted."""

from __future__ import annotations

import errno
import hashlib
import json
import math
import os
import struct
from pathlib import Path

import numpy as np
import pytest

from mezo_tune.trajectory import (
    FORMAT_VERSION,
    JOURNAL_RECORD_BYTES,
    StepRecord,
    TrajectoryError,
    TrajectoryWriter,
    format_summary,
    journal_path,
    read_for_resume,
    read_trajectory,
    summarize,
)

HEADER = {
    "tool_version": "0.1.0",
    "base_model": {"path": "/models/tiny", "digest": "ab12cd34ef56" * 4},
    "dtype": "bfloat16",
    "trainable": [{"name": "w1", "shape": [4, 8], "dtype": "bfloat16"},
                  {"name": "b1", "shape": [8], "dtype": "bfloat16"}],
    "seed": 1234,
    "eps": 0.001,
    "z_generator": {"name": "philox4x32", "version": 1, "distribution": "gaussian"},
    "rounding": "nearest",
    "recipe": "[train]\nsteps = 200\n",
}


def f32(x) -> float:
    return float(np.float32(x))


def bits(x: float) -> bytes:
    return struct.pack("<f", x)


def header_size(header: dict) -> int:
    body = json.dumps({**header, "format_version": FORMAT_VERSION}, sort_keys=True, separators=(",", ":"),
                      ensure_ascii=False).encode()
    return 8 + 4 + len(body) + 4


def make_records(n: int, seed: int = 0, eta: float = 1e-6) -> list[StepRecord]:
    """A plausible run: g ~ N(0, 1e-2), losses near 2.5 drifting down, constant eta."""
    rng = np.random.default_rng(seed)
    g = (rng.standard_normal(n) * 1e-2).astype(np.float32)
    base = (2.5 - np.arange(n) * 1e-3 + rng.standard_normal(n) * 0.05).astype(np.float32)
    lp = (base + rng.standard_normal(n).astype(np.float32) * 0.01).astype(np.float32)
    lm = (base + rng.standard_normal(n).astype(np.float32) * 0.01).astype(np.float32)
    return [StepRecord(t, float(g[t]), f32(eta), float(lp[t]), float(lm[t]), False) for t in range(n)]


def digest(step: int) -> bytes:
    return hashlib.blake2b(str(step).encode(), digest_size=32).digest()


def run(writer: TrajectoryWriter, records: list[StepRecord], stop: int, keyframe_every: int,
        keyframes: dict[int, bytes]) -> None:
    """The train loop's use of the writer: steps, and a keyframe after every `keyframe_every` steps.

    On resume the keyframe for the last recorded step may have been torn off after its steps block was written;
    the loop re-emits it (this is the documented contract of open_for_resume)."""
    if writer.next_step % keyframe_every == 0 and (writer.next_step - 1) not in keyframes:
        writer.append_keyframe(writer.next_step - 1, digest(writer.next_step - 1))
    for t in range(writer.next_step, stop):
        writer.append_step(records[t])
        if (t + 1) % keyframe_every == 0:
            writer.append_keyframe(t, digest(t))


def write_full(path, records, keyframe_every=50, flush_every=16) -> bytes:
    w = TrajectoryWriter.create(path, HEADER, flush_every=flush_every)
    run(w, records, len(records), keyframe_every, keyframes={})
    w.finish(len(records), digest(len(records) - 1))
    with open(path, "rb") as f:
        return f.read()


# ------------------------------------------------------------------------------------------ round trip


def test_round_trip_bit_exact_with_nan_inf_and_skips(tmp_path):
    path = tmp_path / "traj.bin"
    nan, inf = float("nan"), float("inf")
    recs = [
        StepRecord(0, f32(0.1), f32(1e-6), f32(2.5), f32(2.4), False),
        StepRecord(1, nan, f32(1e-6), nan, f32(2.4), True),
        StepRecord(2, f32(-3.5e-8), f32(2e-6), inf, -inf, True),
        StepRecord(3, 0.0, 0.0, f32(1e30), f32(-0.0), False),
        StepRecord(4, -0.0, f32(1e-6), f32(1e-45), f32(3.4e38), False),
    ] + [StepRecord(t, f32(t * 0.25), f32(1e-6), f32(t), f32(-t), t % 3 == 0) for t in range(5, 40)]
    with TrajectoryWriter.create(path, HEADER, flush_every=7) as w:
        w.append_keyframe(-1, digest(-1))
        for r in recs:
            w.append_step(r)
            if r.step == 20:
                w.append_keyframe(20, digest(20))
        assert w.next_step == 40
        w.finish(40, b"\x01" * 32)

    data = read_trajectory(path)
    assert data.problem is None
    assert data.path == str(path)
    assert data.header == {**HEADER, "format_version": FORMAT_VERSION}
    assert [r.step for r in data.steps] == list(range(40))
    for want, got in zip(recs, data.steps):
        assert (bits(got.g), bits(got.eta), bits(got.loss_plus), bits(got.loss_minus), got.skipped) == (
            bits(want.g), bits(want.eta), bits(want.loss_plus), bits(want.loss_minus), want.skipped)
    assert data.keyframes == {-1: digest(-1), 20: digest(20)}
    assert data.end == {"steps": 40, "digest": "01" * 32}
    assert data.intact_bytes == os.path.getsize(path)

    arr = data.as_arrays()
    assert arr["step"].dtype == np.int64 and arr["g"].dtype == np.float32 and arr["skipped"].dtype == bool
    assert arr["step"].tolist() == list(range(40))
    assert arr["skipped"].tolist() == [r.skipped for r in recs]
    assert arr["loss_plus"].tobytes() == np.array([r.loss_plus for r in recs], dtype=np.float32).tobytes()
    assert arr["g"].tobytes() == np.array([r.g for r in recs], dtype=np.float32).tobytes()


def test_g_and_eta_must_be_float32_exact(tmp_path):
    with TrajectoryWriter.create(tmp_path / "t.bin", HEADER) as w:
        with pytest.raises(TrajectoryError, match=r"step 0: g=0.1 is not exactly a float32"):
            w.append_step(StepRecord(0, 0.1, f32(1e-6), 2.0, 2.0, False))
        with pytest.raises(TrajectoryError, match=r"step 0: eta=1e-06 is not exactly a float32"):
            w.append_step(StepRecord(0, f32(0.1), 1e-6, 2.0, 2.0, False))
        assert w.next_step == 0
        w.append_step(StepRecord(0, f32(0.1), f32(1e-6), 2.1, 2.0, False))  # losses are just rounded
    assert read_trajectory(tmp_path / "t.bin").steps[0].loss_plus == f32(2.1)


# ------------------------------------------------------------------------------------------ size


def test_bytes_per_step_at_most_16(tmp_path):
    path = tmp_path / "traj.bin"
    rng = np.random.default_rng(7)
    g = (rng.standard_normal(200) * 1e-2).astype(np.float32)
    lp = (2.0 + rng.random(200)).astype(np.float32)
    lm = (2.0 + rng.random(200)).astype(np.float32)
    recs = [StepRecord(t, float(g[t]), f32(1e-6), float(lp[t]), float(lm[t]), False) for t in range(200)]
    write_full(path, recs, keyframe_every=100, flush_every=16)
    per_step = (os.path.getsize(path) - header_size(HEADER)) / 200
    print(f"bytes/step: {per_step:.2f}")
    assert per_step <= 16
    assert read_trajectory(path).header_bytes == header_size(HEADER)
    assert summarize(read_trajectory(path))["bytes_per_step"] == per_step


# ------------------------------------------------------------------------------------------ crash safety


def _three_blocks(path):
    """40 steps flushed every 16: S[0..15] S[16..31] S[32..39]; returns (start of last block, file bytes)."""
    recs = make_records(40)
    w = TrajectoryWriter.create(path, HEADER, flush_every=16)
    for r in recs[:32]:
        w.append_step(r)
    last_start = os.path.getsize(path)
    for r in recs[32:]:
        w.append_step(r)
    w.close()
    with open(path, "rb") as f:
        return last_start, f.read(), recs


def test_truncated_tail_at_every_offset_is_detected(tmp_path):
    path = tmp_path / "traj.bin"
    last_start, full, recs = _three_blocks(path)
    assert len(read_trajectory(path).steps) == 40
    cut_path = tmp_path / "cut.bin"
    for cut in range(last_start, len(full)):
        cut_path.write_bytes(full[:cut])
        data = read_trajectory(cut_path)
        if cut == last_start:
            assert data.problem is None
        else:
            assert data.problem == f"truncated block at byte {last_start} (the run was interrupted while writing)"
        assert data.intact_bytes == last_start
        assert data.steps == recs[:32]
        assert data.end is None


def _one_block_size(tmp_path, recs) -> int:
    """Where the second block of a 16-step-block file starts: the size of a file holding only the first."""
    one = tmp_path / "one.bin"
    w = TrajectoryWriter.create(one, HEADER, flush_every=16)
    for r in recs[:16]:
        w.append_step(r)
    w.close()
    return os.path.getsize(one)


def test_flipped_byte_is_detected(tmp_path):
    path = tmp_path / "traj.bin"
    last_start, full, recs = _three_blocks(path)
    # locate the second block: it starts where a 16-step file would end
    second = _one_block_size(tmp_path, recs)
    assert header_size(HEADER) < second < last_start
    flipped = tmp_path / "flipped.bin"
    for pos in range(second, last_start):
        bad = bytearray(full)
        bad[pos] ^= 0x40
        flipped.write_bytes(bytes(bad))
        data = read_trajectory(flipped)
        assert data.problem is not None
        assert data.steps == recs[:16]
        assert data.intact_bytes == second
        if pos >= second + 7:  # payload or CRC: exactly a checksum mismatch
            assert data.problem == f"checksum mismatch in block at byte {second}"
    bad = bytearray(full)
    bad[second] ^= 0xFF
    flipped.write_bytes(bytes(bad))
    assert read_trajectory(flipped).problem == (
        f"no block marker at byte {second} (the file is corrupt from there on)")


def test_step_gap_between_blocks_is_corruption(tmp_path):
    path = tmp_path / "traj.bin"
    last_start, full, recs = _three_blocks(path)
    second = _one_block_size(tmp_path, recs)
    # drop the middle block: S[0..15] S[32..39] has a gap
    gapped = tmp_path / "gap.bin"
    gapped.write_bytes(full[:second] + full[last_start:])
    data = read_trajectory(gapped)
    assert data.problem == (f"malformed block at byte {second}: steps block starts at step 32, "
                            f"expected step 16 (a gap)")
    assert data.steps == recs[:16]


def test_not_a_trajectory(tmp_path):
    path = tmp_path / "model.safetensors"
    path.write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{}      ")
    with pytest.raises(TrajectoryError) as err:
        read_trajectory(path)
    assert str(err.value) == (
        f"{path}: not a mezo-tune trajectory file (it does not start with the trajectory magic b'MEZOTRJ1'); "
        f"pass the trajectory file that `mezo-tune train` wrote.")
    path.write_bytes(b"")
    with pytest.raises(TrajectoryError, match=r"not a mezo-tune trajectory file \(it is empty\)"):
        read_trajectory(path)
    with pytest.raises(TrajectoryError, match=r"no such trajectory file"):
        read_trajectory(tmp_path / "missing.bin")


def test_corrupt_header_and_unsupported_version(tmp_path):
    good = tmp_path / "good.bin"
    TrajectoryWriter.create(good, HEADER).close()
    raw = good.read_bytes()
    bad = tmp_path / "bad.bin"
    bad.write_bytes(raw[:20] + bytes([raw[20] ^ 1]) + raw[21:])
    with pytest.raises(TrajectoryError, match=r"header is corrupt \(checksum mismatch\)"):
        read_trajectory(bad)
    bad.write_bytes(raw[:30])
    with pytest.raises(TrajectoryError, match=r"header is truncated"):
        read_trajectory(bad)
    bad.write_bytes(b"MEZOTRJ2" + raw[8:])
    with pytest.raises(TrajectoryError, match=r"trajectory format '2' is not supported"):
        read_trajectory(bad)
    with pytest.raises(TrajectoryError, match=r"leave format_version out of the header"):
        TrajectoryWriter.create(tmp_path / "v4.bin", {"format_version": 4})


def test_create_refuses_to_overwrite(tmp_path):
    path = tmp_path / "traj.bin"
    TrajectoryWriter.create(path, HEADER).close()
    before = path.read_bytes()
    with pytest.raises(TrajectoryError) as err:
        TrajectoryWriter.create(path, {"other": 1})
    assert str(err.value) == (
        f"{path}: a trajectory already exists here; continue it with `mezo-tune train --resume`, or choose a "
        f"new output directory (it is never overwritten).")
    assert path.read_bytes() == before


# ------------------------------------------------------------------------------------------ writer rules


def test_step_gap_and_repeat_refused(tmp_path):
    recs = make_records(3)
    with TrajectoryWriter.create(tmp_path / "traj.bin", HEADER) as w:
        w.append_step(recs[0])
        with pytest.raises(TrajectoryError) as err:
            w.append_step(recs[2])
        assert str(err.value) == (
            f"{tmp_path / 'traj.bin'}: append_step got step 2 but the next step must be 1 (it leaves a gap); "
            f"steps are recorded once each, in order, starting at 0.")
        with pytest.raises(TrajectoryError, match=r"got step 0 but the next step must be 1 \(it repeats"):
            w.append_step(recs[0])
        assert w.next_step == 1
        w.append_step(recs[1])
        assert w.next_step == 2
        with pytest.raises(TrajectoryError, match=r"keyframe for step 2, but only steps 0..1 are recorded"):
            w.append_keyframe(2, digest(2))
        with pytest.raises(TrajectoryError, match=r"keyframe digest must be 32 raw bytes"):
            w.append_keyframe(1, b"short")
        with pytest.raises(TrajectoryError, match=r"finish\(steps=5\) but 2 steps were recorded"):
            w.finish(5, digest(1))
    assert [r.step for r in read_trajectory(tmp_path / "traj.bin").steps] == [0, 1]


def test_blocks_follow_step_numbers_and_keyframes(tmp_path):
    path = tmp_path / "traj.bin"
    recs = make_records(20)
    w = TrajectoryWriter.create(path, HEADER, flush_every=8)
    sizes = []
    for r in recs:
        w.append_step(r)
        if r.step == 4:
            w.append_keyframe(4, digest(4))  # flushes steps 0..4 first
        sizes.append(os.path.getsize(path))
    grew = [t for t in range(1, 20) if sizes[t] != sizes[t - 1]]
    assert grew == [4, 7, 15]  # blocks close after steps 7 and 15 (absolute step numbers), not 12
    w.close()
    assert len(read_trajectory(path).steps) == 20
    with pytest.raises(TrajectoryError, match=r"the trajectory writer is closed"):
        w.append_step(recs[0])
    w.close()  # idempotent


# ------------------------------------------------------------------------------------------ resume


def test_resume_after_any_crash_equals_uninterrupted(tmp_path):
    recs = make_records(100, seed=3)
    reference = write_full(tmp_path / "ref.bin", recs, keyframe_every=25, flush_every=16)
    hdr = header_size(HEADER)

    # Every block boundary (a crash between blocks, or with steps still buffered) and a torn point inside
    # every block (a crash mid-write), plus garbage after a boundary.
    boundaries, pos = [], hdr
    while pos < len(reference):
        boundaries.append(pos)
        (length,) = struct.unpack_from("<I", reference, pos + 3)
        pos += 2 + 1 + 4 + length + 4
    assert pos == len(reference) and len(boundaries) > 10
    prefixes = []
    for b in boundaries:
        prefixes.append(reference[:b])
        prefixes.append(reference[:b + 5])
        prefixes.append(reference[:b] + b"\x00garbage")
    for i, prefix in enumerate(prefixes):
        path = tmp_path / f"crash{i}.bin"
        path.write_bytes(prefix)
        w, data = TrajectoryWriter.open_for_resume(path, flush_every=16)
        assert os.path.getsize(path) == data.intact_bytes
        assert data.steps == recs[:len(data.steps)]
        assert w.next_step == len(data.steps)
        run(w, recs, 100, keyframe_every=25, keyframes=data.keyframes)
        w.finish(100, digest(99))
        assert path.read_bytes() == reference, f"prefix {i} of {len(prefixes)} ({len(prefix)} bytes)"


def test_resume_of_finished_run_refused(tmp_path):
    path = tmp_path / "traj.bin"
    write_full(path, make_records(10), keyframe_every=5)
    with pytest.raises(TrajectoryError, match=r"this run already finished \(10 steps\); there is nothing to resume"):
        TrajectoryWriter.open_for_resume(path)


# ------------------------------------------------------------------------------------------ the step journal

JOURNAL_HEAD = 20  # magic, run identity, the trajectory's length when its records began


def record_bits(records: list[StepRecord]) -> list[tuple]:
    """Records with their floats as float32 bit patterns (NaN == NaN, -0.0 != 0.0)."""
    return [(r.step, bits(r.g), bits(r.eta), bits(r.loss_plus), bits(r.loss_minus), r.skipped) for r in records]


def killed_copy(path, to) -> None:
    """What a SIGKILL leaves: the trajectory and its journal as they are now (the writer never closed)."""
    to.write_bytes(path.read_bytes())
    if os.path.exists(journal_path(path)):
        Path(journal_path(to)).write_bytes(Path(journal_path(path)).read_bytes())


def odd_records(n: int) -> list[StepRecord]:
    """make_records with a skipped step whose L+ is NaN, an infinite L-, and a g of -0.0."""
    recs = make_records(n, seed=9)
    recs[33] = StepRecord(33, -0.0, recs[33].eta, float("nan"), float("inf"), True)
    return recs


def test_a_kill_after_any_step_loses_nothing_and_resume_writes_the_same_bytes(tmp_path):
    recs = odd_records(60)
    reference = write_full(tmp_path / "ref.bin", recs, keyframe_every=25, flush_every=16)
    assert not os.path.exists(journal_path(tmp_path / "ref.bin"))  # a finished run leaves no journal
    path = tmp_path / "live.bin"
    w = TrajectoryWriter.create(path, HEADER, flush_every=16)
    w.append_keyframe(-1, digest(-1))  # as run() writes the reference
    for t in range(60):
        w.append_step(recs[t])
        if (t + 1) % 25 == 0:
            w.append_keyframe(t, digest(t))
        pending = t + 1 - len(read_trajectory(path).steps)  # blocks close after steps 15, 24 (keyframe), 31, 47
        assert os.path.getsize(journal_path(path)) == (JOURNAL_HEAD + pending * JOURNAL_RECORD_BYTES if pending else 0)
        crash = tmp_path / f"crash{t}.bin"
        killed_copy(path, crash)
        assert record_bits(read_trajectory(crash).steps) == record_bits(recs[: t + 1 - pending])  # replay: the file
        r, data = TrajectoryWriter.open_for_resume(crash, flush_every=16)
        assert record_bits(data.steps) == record_bits(recs[: t + 1]), t  # nothing lost, bit for bit
        assert (data.from_journal, data.journal_note, r.next_step) == (pending, None, t + 1)
        run(r, recs, 60, keyframe_every=25, keyframes=data.keyframes)
        r.finish(60, digest(59))
        assert crash.read_bytes() == reference, t  # the recovered steps close their block where it would have
        assert not os.path.exists(journal_path(crash))
    w.close()
    assert not os.path.exists(journal_path(path))  # closed: every step is in a block


def test_a_kill_during_a_block_write_loses_nothing_and_resume_writes_the_same_bytes(tmp_path):
    """The block torn half way, the journal still holding its steps (it is emptied after the block is written): the
    resume takes them from the journal and closes their block again, where it was."""
    recs = make_records(60)
    reference = write_full(tmp_path / "ref.bin", recs, keyframe_every=25, flush_every=16)
    path = tmp_path / "live.bin"
    w = TrajectoryWriter.create(path, HEADER, flush_every=16)
    w.append_keyframe(-1, digest(-1))
    kills, starts = [], []
    truncate, write = w._journal_truncate, w._write_durably

    def block_write(data, steps_after=None):
        starts.append(os.path.getsize(path))
        write(data, steps_after)

    def torn_block_write():  # what the files hold when a kill tears the steps block just written: half of it
        whole, start = path.read_bytes(), starts[-1]
        kills.append((whole[: start + (len(whole) - start) // 2], Path(journal_path(path)).read_bytes(), w.next_step))
        truncate()

    w._write_durably, w._journal_truncate = block_write, torn_block_write
    run(w, recs, 60, keyframe_every=25, keyframes={-1: digest(-1)})
    w.close()
    assert [n for _, _, n in kills] == [16, 25, 32, 48, 50, 60]  # after steps 15, 24 (keyframe), 31, 47, 49, 59
    for torn, journal, n in kills:
        crash = tmp_path / f"crash{n}.bin"
        crash.write_bytes(torn)
        Path(journal_path(crash)).write_bytes(journal)
        r, data = TrajectoryWriter.open_for_resume(crash, flush_every=16)
        assert data.problem.startswith("truncated block at byte") and data.steps == recs[:n] and data.from_journal
        run(r, recs, 60, keyframe_every=25, keyframes=data.keyframes)
        r.finish(60, digest(59))
        assert crash.read_bytes() == reference, n


def test_a_torn_or_corrupt_journal_record_ends_what_is_recovered(tmp_path):
    recs = make_records(40)
    path = tmp_path / "live.bin"
    w = TrajectoryWriter.create(path, HEADER, flush_every=16)
    for r in recs[:40]:
        w.append_step(r)
    journal = Path(journal_path(path)).read_bytes()  # steps 32..39
    assert len(journal) == JOURNAL_HEAD + 8 * JOURNAL_RECORD_BYTES
    torn = JOURNAL_HEAD + 5 * JOURNAL_RECORD_BYTES
    for name, damaged, recovered in (("torn", journal[: torn + 11], 5),  # power lost during record 37's write
                                     ("flipped", journal[: torn + 9] + b"\xff" + journal[torn + 10 :], 5),
                                     ("head", journal[:7], 0)):
        crash = tmp_path / f"{name}.bin"
        killed_copy(path, crash)
        Path(journal_path(crash)).write_bytes(damaged)
        r, data = TrajectoryWriter.open_for_resume(crash, flush_every=16)
        assert data.steps == recs[: 32 + recovered] and data.from_journal == recovered
        if name == "head":
            assert data.journal_note == f"ignored {journal_path(crash)}: it does not start with a step journal's head"
        else:
            assert data.journal_note == (f"{journal_path(crash)}: a torn or corrupt record at byte {torn}, the "
                                         f"journal is used up to there")
        assert os.path.getsize(journal_path(crash)) == (JOURNAL_HEAD + recovered * JOURNAL_RECORD_BYTES  # rewritten
                                                        if recovered else 0)
        for t in range(32 + recovered, 40):
            r.append_step(recs[t])
        r.close()
        assert read_trajectory(crash).steps == recs
    w.close()


def test_a_foreign_or_stale_journal_is_ignored_with_a_note(tmp_path):
    recs = make_records(40)
    other = tmp_path / "other.bin"  # another run: its header differs in the seed only
    o = TrajectoryWriter.create(other, {**HEADER, "seed": 99}, flush_every=16)
    early = tmp_path / "early.bin"  # this run killed after step 20: steps 0..15 in the file, 16..20 in the journal
    e = TrajectoryWriter.create(early, HEADER, flush_every=16)
    path = tmp_path / "live.bin"  # this run killed after step 39: 0..31 and a keyframe in the file, 32..39 journaled
    w = TrajectoryWriter.create(path, HEADER, flush_every=16)
    for t in range(40):
        o.append_step(recs[t])
        w.append_step(recs[t])
        if t == 31:
            w.append_keyframe(31, digest(31))
        if t <= 20:
            e.append_step(recs[t])
    ours, theirs = read_trajectory(path).header_crc, read_trajectory(other).header_crc
    size = os.path.getsize(path)
    keyframe = 2 + 1 + 4 + 8 + 32 + 4
    for name, file_of, journal_of, kept, note in (
        ("foreign", path, other, 32, f"it belongs to another run (run identity {theirs:08x}, the trajectory's "
                                     f"header has {ours:08x})"),
        ("stale", early, path, 16, "its records start at step 32, but the trajectory's intact steps end at step 15 "
                                   "(they are not contiguous)"),
        ("lost keyframe", path, path, 32, f"it continues the trajectory at byte {size}, but the trajectory is "
                                          f"intact up to byte {size - keyframe} (a block after its last steps "
                                          f"block is lost)")):
        crash = tmp_path / f"{name}.bin"
        killed_copy(file_of, crash)
        Path(journal_path(crash)).write_bytes(Path(journal_path(journal_of)).read_bytes())
        if name == "lost keyframe":  # the K block after step 31 cut off (at a block boundary: no problem seen)
            os.truncate(crash, size - keyframe)
        r, data = TrajectoryWriter.open_for_resume(crash, flush_every=16)
        assert data.steps == recs[:kept] and data.from_journal == 0 and data.problem is None
        assert data.journal_note == f"ignored {journal_path(crash)}: {note}"
        assert os.path.getsize(journal_path(crash)) == 0  # replaced by this run's, empty
        r.close()
    for writer in (o, e, w):
        writer.close()


def test_journal_records_the_file_already_holds_are_dropped_quietly(tmp_path):
    """A kill between a block's write and the journal's truncation: the journal repeats the block's steps."""
    recs = make_records(20)
    path = tmp_path / "live.bin"
    w = TrajectoryWriter.create(path, HEADER, flush_every=16)
    for r in recs[:15]:
        w.append_step(r)
    journal = Path(journal_path(path)).read_bytes()  # steps 0..14
    w.append_step(recs[15])  # closes the block 0..15 and empties the journal
    crash = tmp_path / "crash.bin"
    killed_copy(path, crash)
    Path(journal_path(crash)).write_bytes(journal)
    r, data = TrajectoryWriter.open_for_resume(crash, flush_every=16)
    assert (data.steps, data.from_journal, data.journal_note) == (recs[:16], 0, None)
    r.close()
    w.close()


def test_a_journal_that_cannot_be_written_is_left_out_with_a_note(tmp_path):
    recs = make_records(20)
    path = tmp_path / "live.bin"
    notes = []
    w = TrajectoryWriter.create(path, HEADER, flush_every=16, log=notes.append)
    os.close(w._journal_fd)  # the next journal write fails (EBADF: read-only), as a full disk would fail it
    w._journal_fd = os.open(journal_path(path), os.O_RDONLY)
    for r in recs:
        w.append_step(r)
    assert notes == [f"note: the step journal {journal_path(path)} cannot be written (Bad file descriptor); the "
                     f"run goes on without it, a kill now loses the steps not yet in a block of {path} (up to "
                     f"output.flush_every)"]
    assert not os.path.exists(journal_path(path))
    w.close()
    assert read_trajectory(path).steps == recs


# ------------------------------------------------------------------------------------------ disk full


def test_disk_full_keeps_file_intact_and_resumable(tmp_path):
    path = tmp_path / "traj.bin"
    recs = make_records(64)
    w = TrajectoryWriter.create(path, HEADER, flush_every=16)
    for r in recs[:40]:
        w.append_step(r)
    intact = os.path.getsize(path)

    calls = []

    def full_disk(data):
        calls.append(len(data))
        if len(calls) == 1:
            return os.write(w._fd, bytes(data[: len(data) // 2]))  # a short write, then the disk is full
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    w._write_chunk = full_disk
    for r in recs[40:47]:
        w.append_step(r)
    with pytest.raises(TrajectoryError) as err:
        w.append_step(recs[47])  # closes the block 32..47
    message = (f"{path}: could not append to the trajectory: the disk is full. The trajectory is intact up to "
               f"step 31; free space, then run `mezo-tune train --resume` to continue from there.")
    assert str(err.value) == message
    assert len(calls) == 2
    assert os.path.getsize(path) == intact
    with pytest.raises(TrajectoryError) as again:
        w.append_step(recs[48])
    assert str(again.value) == message
    w.close()
    data = read_trajectory(path)
    assert data.problem is None and data.steps == recs[:32]

    w, data = TrajectoryWriter.open_for_resume(path, flush_every=16)
    assert w.next_step == 32
    for r in recs[32:]:
        w.append_step(r)
    w.finish(64, digest(63))
    assert read_trajectory(path).steps == recs


def test_other_write_error_message(tmp_path):
    path = tmp_path / "traj.bin"
    w = TrajectoryWriter.create(path, HEADER, flush_every=4)

    def broken(data):
        raise OSError(errno.EIO, "Input/output error")

    w._write_chunk = broken
    for r in make_records(3):
        w.append_step(r)
    with pytest.raises(TrajectoryError) as err:
        w.append_keyframe(2, digest(2))
    assert str(err.value) == (
        f"{path}: could not append to the trajectory: the write failed (Input/output error). The trajectory is "
        f"intact but holds no steps yet; free space, then run `mezo-tune train --resume` to continue from there.")
    w.close()
    assert read_trajectory(path).steps == []


# ------------------------------------------------------------------------------------------ inspect


def test_summarize_and_format_summary(tmp_path):
    path = tmp_path / "traj.bin"
    recs = make_records(100, seed=5)
    recs[10].skipped = True
    recs[10].loss_plus = float("nan")
    recs[57].skipped = True
    write_full(path, recs, keyframe_every=50)
    data = read_trajectory(path)
    s = summarize(data)
    json.dumps(s, allow_nan=False)  # inspect --json must be strict JSON
    assert s["header"]["seed"] == 1234 and s["format_version"] == FORMAT_VERSION
    assert (s["n_steps"], s["n_skipped"], s["skipped_steps"], s["skipped_steps_truncated"]) == (100, 2, [10, 57], False)
    assert s["keyframe_steps"] == [-1, 49, 99]
    assert s["finished"] is True and s["problem"] is None
    assert s["bytes_per_step"] == (os.path.getsize(path) - header_size(HEADER)) / 100
    loss = [(np.float64(r.loss_plus) + np.float64(r.loss_minus)) / 2 for r in recs]
    first = [x for x in loss[:10] if math.isfinite(x)]
    assert s["loss_first_10pct"] == pytest.approx(sum(first) / len(first), rel=1e-12)
    assert s["loss_last_10pct"] == pytest.approx(sum(loss[90:]) / 10, rel=1e-12)
    assert [(w["first_step"], w["last_step"]) for w in s["loss_windows"]] == [(i * 10, i * 10 + 9) for i in range(10)]
    assert s["loss_windows"][1]["mean_loss"] == pytest.approx(float(np.nanmean(loss[10:20])), rel=1e-12)

    text = format_summary(data)
    assert "model       /models/tiny (digest ab12cd34ef56…)" in text
    assert "dtype       bfloat16" in text
    assert "trainable   2 tensors, 40 elements" in text
    assert "seed        1234   eps 0.001   z philox4x32 1 gaussian   rounding nearest" in text
    assert "steps       100 recorded, 2 skipped (steps 10, 57), finished (100 steps)" in text
    assert "keyframes   3 (steps -1, 49, 99)" in text
    assert "file        clean (every block checksum verified)" in text
    assert text.count("\n  steps ") == 10

    torn = tmp_path / "torn.bin"
    torn.write_bytes(path.read_bytes()[:-3])
    tdata = read_trajectory(torn)
    assert summarize(tdata)["finished"] is False
    assert (f"PROBLEM     truncated block at byte {tdata.intact_bytes} (the run was interrupted while writing); "
            f"intact up to byte {tdata.intact_bytes} (step 99)") in format_summary(tdata)


def test_summarize_empty_and_many_skips(tmp_path):
    path = tmp_path / "traj.bin"
    TrajectoryWriter.create(path, {}).close()
    s = summarize(read_trajectory(path))
    assert (s["n_steps"], s["bytes_per_step"], s["loss_first_10pct"], s["loss_windows"]) == (0, None, None, [])
    assert "steps       0 recorded, 0 skipped, not finished" in format_summary(read_trajectory(path))

    path2 = tmp_path / "skips.bin"
    recs = make_records(150)
    for r in recs:
        r.skipped = True
    with TrajectoryWriter.create(path2, HEADER) as w:
        for r in recs:
            w.append_step(r)
    s = summarize(read_trajectory(path2))
    assert s["n_skipped"] == 150 and s["skipped_steps"] == list(range(100)) and s["skipped_steps_truncated"]
