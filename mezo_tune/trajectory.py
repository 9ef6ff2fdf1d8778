"""The trajectory file (DESIGN.md contract 5): the only module that knows its byte format.

A trajectory records a MeZO run compactly enough to rebuild it bit for bit: for every step the scalar
projected gradient g_t exactly as applied, the learning rate eta_t, both perturbed losses and a skipped flag,
plus periodic digests of the trainable tensors (keyframes) so `replay --verify` can name the first step where a
rebuild diverges. It is parsed as data (never unpickled), append-only, and crash-safe: every block carries a
CRC32, and a torn or corrupt tail is reported (``TrajectoryData.problem``), never raised, so `train --resume`
can cut it off and go on. Steps not yet in a block wait in a side journal, so a kill loses none of them (below).

Format, version 3 (all integers little-endian; versions 1 and 2 are read too: version 2 is version 3 with
blake2b-256 keyframes and no "weights_digest" in the header, version 1 is version 2 without V blocks):

    file    := magic header_len header header_crc block*
    magic   := b"MEZOTRJ1"                                    8 bytes
    header_len := u32                                          length of `header`
    header  := UTF-8 JSON object, json.dumps(sort_keys=True, separators=(",", ":"), allow_nan=False);
               it always holds "format_version": 3, and "weights_digest": {"name", "version"}, the scheme of
               every weights digest in the file (keyframes, the end block, "initial_digest"); see keyframe_digest()
    header_crc := u32                                          zlib.crc32(header)
    block   := b"\\xb7\\x0c" type:u8 length:u32 payload crc:u32
               crc = zlib.crc32(type byte + length bytes + payload)

Block types:

    b"S" steps     payload := first_step:u64 count:u32 zlib.compress(columns, level=9)
                   columns := g[count] eta[count] loss_plus[count] loss_minus[count] flags[count]
                   The four float columns are float32, each stored byte-plane-shuffled: all byte-0s of the
                   column, then all byte-1s, byte-2s, byte-3s (of the little-endian float32). flags is u8,
                   bit0 = skipped (other bits are 0). A constant eta column and the flags then compress to
                   almost nothing. Steps are contiguous: a block's first_step is the previous block's last
                   step + 1 (the first S block starts at 0); a gap is treated as corruption. 1 <= count <= 65536
                   (MAX_STEPS_PER_BLOCK): a reader never inflates more than count * 17 bytes.
    b"K" keyframe  payload := step:i64 digest (32 raw bytes, by the header's weights digest scheme)
                   digest of the trainable tensors AFTER the update of `step` was applied (steps are 0-based);
                   step = -1 means "before any step" (the starting weights). `step` never exceeds the last
                   recorded step at the point the keyframe is written.
    b"V" eval      payload := UTF-8 JSON {"step": s, "metrics": {name: number or null}}: a dev evaluation of the
                   weights after step s (-1: before any step), e.g. {"accuracy": 0.8, "loss": 0.47}. Like a
                   keyframe, s never exceeds the last recorded step. `replay --best` picks its step from these.
    b"E" end       payload := UTF-8 JSON {"digest": hex, "steps": N}, written once when training completes;
                   nothing may follow it.

Block boundaries: the writer closes an S block after a step s with (s + 1) % flush_every == 0, before a keyframe or
an eval, on close/finish, and (only with flush_seconds > 0) after the first step appended flush_seconds or more after
the last flush. Decision (issue #13): on power loss (see the step journal below for kills) this loses at most
min(flush_every steps, flush_seconds of steps) rather than a whole block of slow steps, at the price of byte-identity
of the FILE: with the time-based flush the boundaries also depend on the clock, so a resumed run may cut its S blocks
elsewhere than an uninterrupted one. What a trajectory means does not change: the records (every g, eta, loss and
flag), keyframes, evals, the end block and the weights rebuilt from it are identical either way, and after any block
the step-numbered boundaries line up again. With flush_seconds = 0 boundaries are a function of the step numbers
only, so a run resumed from its last intact block writes the same bytes an uninterrupted run writes. A time-based
flush costs one extra block (~35 bytes of framing and zlib overhead, one write + fsync) per flush_seconds at most: at
the 30 s default that is < 5 KB an hour, and it only fires when flush_every steps take longer than flush_seconds.

The step journal (issue #13: a SIGKILL should lose at most one step): a block per step would cost ~35 bytes of
framing per step, so the file keeps its blocks and the writer also appends every step, as it is appended, to a side
file `<trajectory>.journal` (JOURNAL_SUFFIX), in one write system call, not fsynced (JOURNAL_FSYNC):

    journal := (head record*)?                                 empty after every block
    head    := b"MEZOJNL1" run:u32 file_bytes:u64              run = the trajectory's header_crc; file_bytes = the
                                                               trajectory's length when the records began
    record  := step:u64 g:f32 eta:f32 loss_plus:f32 loss_minus:f32 flags:u8 crc:u32      29 bytes
               the float32 bytes and flags an S block stores for that step; crc = zlib.crc32(the 25 bytes before)

After an S block is written and fsynced the journal is truncated to nothing, so it holds exactly the steps not yet
in a block; the file never grows while it holds any (a keyframe or eval block is written after the flush that empties
it). A closed or finished writer removes it. A record that reached the OS survives a SIGKILL of the process, so a kill
loses no finished step (measured: tests/fault_injection.py, 20 kills, 0 lost; the step in progress is recomputed).
Power loss can lose the journal's unsynced tail, which the blocks bound as above; an fsync per step would cost ~0.3 ms
(docs/journal_cost.py; the write alone ~3 µs). `train --resume` (read_for_resume, open_for_resume) takes the
journal's records up to its first torn, corrupt or out-of-order record, and only when the journal names this run,
continues the file at its intact length now, and starts at the file's next step; anything else is ignored with a note
(records the file already holds, after a kill between a block's write and the truncation, silently). The recovered
records go back into the writer as pending steps, in a fresh journal, and reach the file in the block they belonged
to (closed again at once if its own write was torn): with flush_seconds = 0 the resumed file is still byte-identical to
an uninterrupted one, and the resumed run re-applies them without scoring them again. The trajectory never depends on
the journal: read_trajectory, replay and inspect ignore it, and a file without its journal is complete up to its last
block. Data-parallel ranks other than 0 write neither (contract 8); they read the same journal on resume.

Size (measured, see tests/test_trajectory.py::test_bytes_per_step_at_most_16): g ~ N(0, 1e-2), losses in
[2, 3), constant eta, a keyframe every 100 steps: 15.1 bytes/step over 200 steps and 14.3 over 20k steps with
flush_every=16; 12.9 and 12.1 with flush_every=64. The three random float columns dominate; eta and the flags
cost almost nothing. A 20k-step run is ~0.29 MB. Fully random float32 bit patterns (not realistic) reach ~16.8.
"""

from __future__ import annotations

import errno
import json
import math
import os
import struct
import time
import zlib
from dataclasses import dataclass, field

import numpy as np

FORMAT_VERSION = 3
READABLE_VERSIONS = (1, 2, 3)
# Format 1 and 2 files name no digest scheme: all of their digests are blake2b-256 of the tensors' bytes.
BLAKE2B_KEYFRAMES = {"name": "blake2b-256", "version": 1}
MAGIC = b"MEZOTRJ1"
BLOCK_MARKER = b"\xb7\x0c"
DIGEST_BYTES = 32

_BLOCK_HEAD = struct.Struct("<2sBI")  # marker, type, payload length
_U32 = struct.Struct("<I")
_STEPS_HEAD = struct.Struct("<QI")  # first step, count
_KEYFRAME_STEP = struct.Struct("<q")
_TYPE_STEPS, _TYPE_KEYFRAME, _TYPE_EVAL, _TYPE_END = ord("S"), ord("K"), ord("V"), ord("E")
_FLAG_SKIPPED = 0x01
_BYTES_PER_STEP_RAW = 4 * 4 + 1  # four float32 columns and the flags byte
_RESUME_HINT = "run `mezo-tune train --resume` to continue from there"
MAX_STEPS_PER_BLOCK = 1 << 16  # the writer writes flush_every (<= this) steps per block; a reader never inflates more

JOURNAL_SUFFIX = ".journal"  # the step journal of `<trajectory>` is `<trajectory>.journal`, next to it
JOURNAL_MAGIC = b"MEZOJNL1"
JOURNAL_FSYNC = False  # a SIGKILL keeps what reached the OS; fsync per step only helps on power loss (docstring)
# magic, run identity (the CRC32 of the trajectory's header), the trajectory's length when the records began
_JOURNAL_HEAD = struct.Struct("<8sIQ")
_JOURNAL_RECORD = struct.Struct("<Q16sB")  # step, the four float32 values (g, eta, L+, L-) as stored, flags
JOURNAL_RECORD_BYTES = _JOURNAL_RECORD.size + _U32.size  # 29: the record and its CRC32


class TrajectoryError(Exception):
    """A trajectory cannot be read or written. The message names the file, what is wrong and what to do."""


@dataclass
class StepRecord:
    step: int
    g: float
    eta: float
    loss_plus: float
    loss_minus: float
    skipped: bool


@dataclass
class TrajectoryData:
    path: str
    header: dict
    steps: list[StepRecord]
    keyframes: dict[int, bytes]
    end: dict | None
    intact_bytes: int
    problem: str | None
    header_bytes: int = 0  # offset where the blocks start (magic + header length + header + header CRC)
    evals: list[dict] = field(default_factory=list)  # {"step": s, **metrics}, in the order they were recorded
    header_crc: int = 0  # the header's CRC32: the run identity a step journal must carry
    from_journal: int = 0  # read_for_resume: how many of `steps` (the last ones) came from the step journal
    journal_note: str | None = None  # read_for_resume: why (part of) the journal was not used, if it was not

    def as_arrays(self) -> dict:
        """Columns as numpy arrays: step (int64), g/eta/loss_plus/loss_minus (float32), skipped (bool)."""
        return {
            "step": np.array([r.step for r in self.steps], dtype=np.int64),
            "g": np.array([r.g for r in self.steps], dtype=np.float32),
            "eta": np.array([r.eta for r in self.steps], dtype=np.float32),
            "loss_plus": np.array([r.loss_plus for r in self.steps], dtype=np.float32),
            "loss_minus": np.array([r.loss_minus for r in self.steps], dtype=np.float32),
            "skipped": np.array([r.skipped for r in self.steps], dtype=bool),
        }


# ----------------------------------------------------------------------------------------------- encoding


def _encode_header(header: dict, path: str) -> bytes:
    if not isinstance(header, dict):
        raise TrajectoryError(f"{path}: the trajectory header must be a dict, got {type(header).__name__}.")
    header = dict(header)
    if header.setdefault("format_version", FORMAT_VERSION) != FORMAT_VERSION:
        raise TrajectoryError(
            f"{path}: header says format_version={header['format_version']!r}, but this writer writes "
            f"version {FORMAT_VERSION}; leave format_version out of the header, the writer sets it."
        )
    try:
        text = json.dumps(header, sort_keys=True, separators=(",", ":"), allow_nan=False, ensure_ascii=False)
    except (TypeError, ValueError) as exc:
        raise TrajectoryError(
            f"{path}: the trajectory header is not plain JSON data ({exc}); use str/int/float/bool/None, "
            f"lists and dicts with string keys, and finite floats only."
        ) from None
    body = text.encode("utf-8")
    return MAGIC + _U32.pack(len(body)) + body + _U32.pack(zlib.crc32(body))


def _encode_block(block_type: int, payload: bytes) -> bytes:
    head = _BLOCK_HEAD.pack(BLOCK_MARKER, block_type, len(payload))
    return head + payload + _U32.pack(zlib.crc32(head[2:] + payload))


def _shuffle_f32(values: np.ndarray) -> bytes:
    planes = np.ascontiguousarray(values, dtype="<f4").view(np.uint8).reshape(-1, 4)
    return planes.T.tobytes()


def _unshuffle_f32(raw: bytes, count: int) -> np.ndarray:
    planes = np.frombuffer(raw, dtype=np.uint8).reshape(4, count)
    return np.ascontiguousarray(planes.T).view("<f4").reshape(count)


def _encode_steps(records: list[StepRecord]) -> bytes:
    columns = [
        _shuffle_f32(np.array([getattr(r, name) for r in records], dtype=np.float32))
        for name in ("g", "eta", "loss_plus", "loss_minus")
    ]
    flags = bytes(_FLAG_SKIPPED if r.skipped else 0 for r in records)
    payload = _STEPS_HEAD.pack(records[0].step, len(records)) + zlib.compress(b"".join(columns) + flags, 9)
    return _encode_block(_TYPE_STEPS, payload)


def _decode_steps(payload: bytes) -> dict:
    """S payload -> column arrays; raises ValueError describing what is malformed."""
    if len(payload) < _STEPS_HEAD.size:
        raise ValueError("steps block shorter than its 12-byte head")
    first, count = _STEPS_HEAD.unpack_from(payload)
    if count == 0:
        raise ValueError("steps block with zero steps")
    if count > MAX_STEPS_PER_BLOCK:
        raise ValueError(f"steps block claims {count} steps, more than the {MAX_STEPS_PER_BLOCK} a block may hold")
    inflate = zlib.decompressobj()
    try:  # never inflate past the size the count implies (a corrupt or hostile block cannot make us allocate more)
        raw = inflate.decompress(payload[_STEPS_HEAD.size :], count * _BYTES_PER_STEP_RAW + 1)
    except zlib.error as exc:
        raise ValueError(f"steps block does not decompress ({exc})") from None
    if len(raw) != count * _BYTES_PER_STEP_RAW:
        raise ValueError(f"steps block holds {len(raw)} column bytes, expected {count * _BYTES_PER_STEP_RAW}")
    if not inflate.eof or inflate.unused_data:
        raise ValueError("steps block's compressed columns are cut short or followed by stray bytes")
    cols = {}
    for i, name in enumerate(("g", "eta", "loss_plus", "loss_minus")):
        cols[name] = _unshuffle_f32(raw[i * 4 * count : (i + 1) * 4 * count], count)
    flags = np.frombuffer(raw[16 * count :], dtype=np.uint8)
    if np.any(flags & ~np.uint8(_FLAG_SKIPPED)):
        raise ValueError("steps block has unknown flag bits set")
    cols["skipped"] = (flags & _FLAG_SKIPPED).astype(bool)
    cols["step"] = np.arange(first, first + count, dtype=np.int64)
    return cols


def _as_f32(value: float, what: str, step: int, exact: bool) -> float:
    f32 = float(np.float32(value))
    if exact and f32 != value and not (math.isnan(f32) and math.isnan(value)):
        raise TrajectoryError(
            f"step {step}: {what}={value!r} is not exactly a float32; record the fp32 value exactly as applied "
            f"(contract 4 computes the update with an fp32 scalar), e.g. float(torch.float32 tensor)."
        )
    return f32


# ----------------------------------------------------------------------------------------------- reading


def read_trajectory(path) -> TrajectoryData:
    """Parse a trajectory file. A bad tail is reported in `.problem`; only an unusable start raises."""
    path = os.fspath(path)
    try:
        with open(path, "rb") as f:
            buf = f.read()
    except FileNotFoundError:
        raise TrajectoryError(
            f"{path}: no such trajectory file; check the path (train writes it into its run directory)."
        ) from None
    except OSError as exc:
        raise TrajectoryError(f"{path}: cannot read the trajectory ({exc.strerror or exc}).") from None
    return _parse(path, buf)


def _parse(path: str, buf: bytes) -> TrajectoryData:
    if buf[: len(MAGIC)] != MAGIC:
        if not buf:
            why = "it is empty"
        elif len(buf) < len(MAGIC) and MAGIC.startswith(buf):
            why = f"it is only {len(buf)} bytes long, a torn start of a trajectory"
        elif buf[:7] == MAGIC[:7]:
            raise TrajectoryError(
                f"{path}: trajectory format {buf[7:8].decode('latin-1')!r} is not supported by this version of "
                f"mezo-tune (it reads {MAGIC.decode()} files); upgrade mezo-tune."
            )
        else:
            why = "it does not start with the trajectory magic b'MEZOTRJ1'"
        raise TrajectoryError(
            f"{path}: not a mezo-tune trajectory file ({why}); "
            f"pass the trajectory file that `mezo-tune train` wrote."
        )
    pos = len(MAGIC)
    if len(buf) < pos + 4:
        raise TrajectoryError(f"{path}: the trajectory header is truncated (file is {len(buf)} bytes); the run "
                              f"stopped before writing it, start the run again.")
    (hlen,) = _U32.unpack_from(buf, pos)
    pos += 4
    if len(buf) < pos + hlen + 4:
        raise TrajectoryError(f"{path}: the trajectory header is truncated (needs {pos + hlen + 4} bytes, file has "
                              f"{len(buf)}); the run stopped before writing it, start the run again.")
    body = buf[pos : pos + hlen]
    (header_crc,) = _U32.unpack_from(buf, pos + hlen)
    if zlib.crc32(body) != header_crc:
        raise TrajectoryError(f"{path}: the trajectory header is corrupt (checksum mismatch); the file was damaged "
                              f"after it was written, restore it from a copy.")
    try:
        header = json.loads(body.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as exc:
        raise TrajectoryError(f"{path}: the trajectory header is not valid JSON ({exc}).") from None
    if not isinstance(header, dict):
        raise TrajectoryError(f"{path}: the trajectory header is not a JSON object.")
    version = header.get("format_version")
    if version not in READABLE_VERSIONS:
        raise TrajectoryError(
            f"{path}: trajectory format_version {version!r} is not supported (this mezo-tune reads versions "
            f"{', '.join(map(str, READABLE_VERSIONS))}); use the mezo-tune version that wrote it."
        )
    header_end = pos + hlen + 4

    columns: list[dict] = []
    keyframes: dict[int, bytes] = {}
    evals: list[dict] = []
    end = None
    next_step = 0
    problem = None
    pos = header_end
    while pos < len(buf):
        if end is not None:
            problem = f"unexpected data after the end block at byte {pos}"
            break
        if len(buf) - pos < _BLOCK_HEAD.size:
            problem = f"truncated block at byte {pos} (the run was interrupted while writing)"
            break
        marker, btype, length = _BLOCK_HEAD.unpack_from(buf, pos)
        if marker != BLOCK_MARKER:
            problem = f"no block marker at byte {pos} (the file is corrupt from there on)"
            break
        stop = pos + _BLOCK_HEAD.size + length + 4
        if stop > len(buf):
            problem = f"truncated block at byte {pos} (the run was interrupted while writing)"
            break
        payload = buf[pos + _BLOCK_HEAD.size : stop - 4]
        (crc,) = _U32.unpack_from(buf, stop - 4)
        if zlib.crc32(buf[pos + 2 : stop - 4]) != crc:
            problem = f"checksum mismatch in block at byte {pos}"
            break
        try:
            if btype == _TYPE_STEPS:
                cols = _decode_steps(payload)
                first = int(cols["step"][0])
                if first != next_step:
                    raise ValueError(f"steps block starts at step {first}, expected step {next_step} (a gap)")
                columns.append(cols)
                next_step = int(cols["step"][-1]) + 1
            elif btype == _TYPE_KEYFRAME:
                if len(payload) != _KEYFRAME_STEP.size + DIGEST_BYTES:
                    raise ValueError(f"keyframe block of {len(payload)} bytes, expected {8 + DIGEST_BYTES}")
                (kstep,) = _KEYFRAME_STEP.unpack_from(payload)
                if not -1 <= kstep < next_step:
                    raise ValueError(f"keyframe for step {kstep}, but steps so far are 0..{next_step - 1}")
                keyframes[kstep] = bytes(payload[_KEYFRAME_STEP.size :])
            elif btype == _TYPE_EVAL and version >= 2:
                evals.append(_decode_eval(payload, next_step))
            elif btype == _TYPE_END:
                end_payload = json.loads(payload.decode("utf-8"))
                if not isinstance(end_payload, dict) or end_payload.get("steps") != next_step:
                    raise ValueError(f"end block {end_payload!r} does not match the {next_step} recorded steps")
                end = end_payload
            else:
                raise ValueError(f"unknown block type {btype:#04x}")
        except (ValueError, UnicodeDecodeError, RecursionError) as exc:  # json.JSONDecodeError is a ValueError
            problem = f"malformed block at byte {pos}: {exc}"
            break
        pos = stop

    arrays = _concat(columns)
    steps = [
        StepRecord(int(s), float(g), float(e), float(lp), float(lm), bool(sk))
        for s, g, e, lp, lm, sk in zip(
            arrays["step"], arrays["g"], arrays["eta"], arrays["loss_plus"], arrays["loss_minus"], arrays["skipped"]
        )
    ]
    return TrajectoryData(
        path=path, header=header, steps=steps, keyframes=keyframes, end=end, intact_bytes=pos,
        problem=problem, header_bytes=header_end, evals=evals, header_crc=header_crc,
    )


def keyframe_digest(data_or_header) -> dict:
    """The weights digest scheme {"name", "version"} of a trajectory's keyframes, end block and initial digest: the
    header's "weights_digest" from format 3 on, blake2b-256 in format 1 and 2 files (their readers compare with it,
    so old runs still resume and replay)."""
    header = data_or_header.header if isinstance(data_or_header, TrajectoryData) else data_or_header
    if header.get("format_version", FORMAT_VERSION) < 3:
        return dict(BLAKE2B_KEYFRAMES)
    scheme = header.get("weights_digest")
    if not (isinstance(scheme, dict) and isinstance(scheme.get("name"), str) and type(scheme.get("version")) is int):
        raise TrajectoryError(f"the trajectory header's weights_digest is {scheme!r}, not {{\"name\": str, "
                              f"\"version\": int}}: a format {header.get('format_version')} file names the scheme "
                              f"of its keyframe digests; the header is damaged or was not written by mezo-tune.")
    return {"name": scheme["name"], "version": scheme["version"]}


def _decode_eval(payload: bytes, next_step: int) -> dict:
    """V payload -> {"step": s, **metrics}; raises ValueError describing what is malformed."""
    ev = json.loads(payload.decode("utf-8"))
    metrics = ev.get("metrics") if isinstance(ev, dict) else None
    if (not isinstance(metrics, dict) or type(ev.get("step")) is not int or "step" in metrics
            or not all(v is None or type(v) in (int, float) for v in metrics.values())):
        raise ValueError(f"eval block {ev!r} is not {{step, metrics: {{name: number}}}}")
    if not -1 <= ev["step"] < next_step:
        raise ValueError(f"eval for step {ev['step']}, but steps so far are 0..{next_step - 1}")
    return {"step": ev["step"], **metrics}


def _concat(columns: list[dict]) -> dict:
    names = {"step": np.int64, "g": np.float32, "eta": np.float32, "loss_plus": np.float32,
             "loss_minus": np.float32, "skipped": bool}
    if not columns:
        return {k: np.zeros(0, dtype=t) for k, t in names.items()}
    return {k: np.concatenate([c[k] for c in columns]) for k in names}


# ----------------------------------------------------------------------------------------------- the step journal


def journal_path(path) -> str:
    """Where the step journal of the trajectory at `path` lives."""
    return os.fspath(path) + JOURNAL_SUFFIX


def discard_journal(path) -> None:
    """Remove the step journal of the trajectory at `path`, if there is one."""
    try:
        os.unlink(journal_path(path))
    except OSError:
        pass


def _encode_journal_record(rec: StepRecord) -> bytes:
    # the float32 conversion _encode_steps makes, so a recovered record is the one its S block would have held
    floats = np.array([rec.g, rec.eta, rec.loss_plus, rec.loss_minus], dtype="<f4").tobytes()
    body = _JOURNAL_RECORD.pack(rec.step, floats, _FLAG_SKIPPED if rec.skipped else 0)
    return body + _U32.pack(zlib.crc32(body))


def _decode_journal_record(raw: bytes) -> StepRecord | None:
    """A journal record, or None when it is torn (short), fails its CRC or has unknown flag bits."""
    if len(raw) != JOURNAL_RECORD_BYTES or zlib.crc32(raw[: _JOURNAL_RECORD.size]) != _U32.unpack_from(
            raw, _JOURNAL_RECORD.size)[0]:
        return None
    step, floats, flags = _JOURNAL_RECORD.unpack_from(raw)
    if flags & ~_FLAG_SKIPPED:
        return None
    g, eta, loss_plus, loss_minus = (float(x) for x in np.frombuffer(floats, dtype="<f4"))
    return StepRecord(step, g, eta, loss_plus, loss_minus, bool(flags & _FLAG_SKIPPED))


def _recover_journal(data: TrajectoryData) -> tuple[list[StepRecord], str | None]:
    """The step journal's records that continue data's intact steps, and a note when (part of) it is not used.

    It is trusted only when it names this run (the header's CRC32), continues the file where its intact part ends
    now (the length in its head: no block, not even a keyframe, was lost after the journal began) and its first
    record is the file's next step; it is read up to its first torn, corrupt or out-of-order record. Records the
    file already holds (a kill between a block's write and the journal's truncation) are dropped without a note."""
    jpath = journal_path(data.path)
    try:
        with open(jpath, "rb") as f:
            buf = f.read()
    except FileNotFoundError:
        return [], None
    except OSError as exc:
        return [], f"ignored {jpath}: cannot read it ({exc.strerror or exc})"
    if not buf:  # emptied after a block
        return [], None
    if len(buf) < _JOURNAL_HEAD.size or buf[: len(JOURNAL_MAGIC)] != JOURNAL_MAGIC:
        return [], f"ignored {jpath}: it does not start with a step journal's head"
    (_, run_id, file_bytes) = _JOURNAL_HEAD.unpack_from(buf)
    if run_id != data.header_crc:
        return [], (f"ignored {jpath}: it belongs to another run (run identity {run_id:08x}, the trajectory's "
                    f"header has {data.header_crc:08x})")
    records, note = [], None
    for pos in range(_JOURNAL_HEAD.size, len(buf), JOURNAL_RECORD_BYTES):
        rec = _decode_journal_record(buf[pos : pos + JOURNAL_RECORD_BYTES])
        if rec is None or (records and rec.step != records[-1].step + 1):
            note = f"{jpath}: a torn or corrupt record at byte {pos}, the journal is used up to there"
            break
        records.append(rec)
    next_step = len(data.steps)
    records = [rec for rec in records if rec.step >= next_step]
    if not records:
        return [], note
    if records[0].step != next_step:
        return [], (f"ignored {jpath}: its records start at step {records[0].step}, but the trajectory's intact "
                    f"steps end at step {next_step - 1} (they are not contiguous)")
    if file_bytes != data.intact_bytes:
        return [], (f"ignored {jpath}: it continues the trajectory at byte {file_bytes}, but the trajectory is "
                    f"intact up to byte {data.intact_bytes} (a block after its last steps block is lost)")
    return records, note


def read_for_resume(path) -> TrajectoryData:
    """read_trajectory, and then the step journal's records that continue the intact steps (from_journal of them,
    at the end of data.steps; why a journal was not used is in data.journal_note). Reads only; `train --resume`
    reads this on every process. A finished trajectory is returned as it is."""
    data = read_trajectory(path)
    if data.end is not None:
        return data
    records, note = _recover_journal(data)
    data.steps = data.steps + records
    data.from_journal, data.journal_note = len(records), note
    return data


# ----------------------------------------------------------------------------------------------- writing


class TrajectoryWriter:
    """Appends steps, keyframes and the end block to a trajectory. Use create() or open_for_resume()."""

    def __init__(self, path: str, fd: int, intact_bytes: int, next_step: int, flush_every: int,
                 flush_seconds: float = 0.0, log=None):
        if not 1 <= flush_every <= MAX_STEPS_PER_BLOCK:
            raise TrajectoryError(f"{path}: flush_every must be between 1 and {MAX_STEPS_PER_BLOCK}, "
                                  f"got {flush_every}.")
        if not (flush_seconds >= 0 and math.isfinite(flush_seconds)):
            raise TrajectoryError(f"{path}: flush_seconds must be a finite number >= 0 (0: no time-based flush), "
                                  f"got {flush_seconds}.")
        self.path = path
        self.flush_every = flush_every
        self.flush_seconds = flush_seconds  # 0: block boundaries by step number only (see the module docstring)
        self._last_flush = time.monotonic()
        self._fd: int | None = fd
        self._intact = intact_bytes  # file length up to the last block known to be on disk
        self._next_step = next_step
        self._durable_steps = next_step  # steps 0.._durable_steps-1 are in intact blocks
        self._pending: list[StepRecord] = []
        self._broken: str | None = None
        self._journal_fd: int | None = None  # the step journal of the pending steps; None: none (or it failed)
        self._run_id = 0  # the header's CRC32, in the journal's head
        self._journal_empty = True  # the next record is written with the journal's head (_journal_append)
        self._log = log or (lambda msg: None)

    # -- construction

    @classmethod
    def create(cls, path, header: dict, flush_every: int = 16, flush_seconds: float = 0.0,
               log=None) -> "TrajectoryWriter":
        """Start a new trajectory; never overwrites. The header gains "format_version" and is fsynced. A step
        journal next to it (any earlier one replaced) starts empty; log(message) is told if it cannot be written."""
        path = os.fspath(path)
        data = _encode_header(header, path)
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0), 0o644)
        except FileExistsError:
            raise TrajectoryError(
                f"{path}: a trajectory already exists here; continue it with `mezo-tune train --resume`, or "
                f"choose a new output directory (it is never overwritten)."
            ) from None
        except OSError as exc:
            raise TrajectoryError(f"{path}: cannot create the trajectory ({exc.strerror or exc}).") from None
        writer = cls(path, fd, 0, 0, flush_every, flush_seconds, log)
        try:
            writer._write_durably(data)
        except TrajectoryError:
            os.close(fd)
            os.unlink(path)  # a file without a whole header is useless; let the retry create it again
            raise
        _fsync_dir(path)
        writer._start_journal(_U32.unpack_from(data, len(data) - _U32.size)[0], [])
        return writer

    @classmethod
    def open_for_resume(cls, path, flush_every: int = 16, flush_seconds: float = 0.0,
                        log=None) -> tuple["TrajectoryWriter", TrajectoryData]:
        """Cut a torn/corrupt tail (reported in data.problem) and return a writer at data.intact_bytes, with the
        steps recovered from the step journal (read_for_resume: the last data.from_journal of data.steps) pending,
        in a fresh journal, as if they had just been appended: the block they belong to closes where it would have.

        The caller continues at writer.next_step == len(data.steps). A crash can land between a keyframe's
        flushed steps block and its K block, so if the keyframe schedule calls for one at next_step - 1 and
        data.keyframes lacks it, append it first (the weights rebuilt to next_step are exactly what it digests);
        then the resumed file is byte-identical to an uninterrupted one. A finished run is refused.
        """
        path = os.fspath(path)
        data = read_for_resume(path)
        if data.end is not None:
            raise TrajectoryError(
                f"{path}: this run already finished ({data.end.get('steps')} steps); there is nothing to resume. "
                f"Use `mezo-tune replay` to rebuild its weights, or start a new run."
            )
        try:
            fd = os.open(path, os.O_RDWR | getattr(os, "O_BINARY", 0))
            if os.fstat(fd).st_size != data.intact_bytes:
                os.ftruncate(fd, data.intact_bytes)  # cut the torn/corrupt tail
                os.fsync(fd)
            os.lseek(fd, data.intact_bytes, os.SEEK_SET)
        except OSError as exc:
            raise TrajectoryError(f"{path}: cannot open the trajectory to resume ({exc.strerror or exc}).") from None
        in_file = len(data.steps) - data.from_journal
        writer = cls(path, fd, data.intact_bytes, in_file, flush_every, flush_seconds, log)
        writer._start_journal(data.header_crc, data.steps[in_file:])
        if writer._pending and writer.next_step % flush_every == 0:
            writer.flush()  # the last recovered step closed a block (whose write was then lost): close it again
        return writer, data

    # -- appending

    @property
    def next_step(self) -> int:
        return self._next_step

    def append_step(self, rec: StepRecord) -> None:
        self._check_open()
        if rec.step != self._next_step:
            kind = "repeats an earlier step" if rec.step < self._next_step else "leaves a gap"
            raise TrajectoryError(
                f"{self.path}: append_step got step {rec.step} but the next step must be {self._next_step} "
                f"(it {kind}); steps are recorded once each, in order, starting at 0."
            )
        rec = StepRecord(
            step=rec.step,
            g=_as_f32(rec.g, "g", rec.step, exact=True),
            eta=_as_f32(rec.eta, "eta", rec.step, exact=True),
            loss_plus=_as_f32(rec.loss_plus, "loss_plus", rec.step, exact=False),
            loss_minus=_as_f32(rec.loss_minus, "loss_minus", rec.step, exact=False),
            skipped=bool(rec.skipped),
        )
        self._pending.append(rec)
        self._next_step += 1
        self._journal_append(_encode_journal_record(rec))
        if self._next_step % self.flush_every == 0 or (
                self.flush_seconds and time.monotonic() - self._last_flush >= self.flush_seconds):
            self.flush()

    def append_keyframe(self, step: int, digest: bytes) -> None:
        self._check_open()
        digest = bytes(digest)
        if len(digest) != DIGEST_BYTES:
            raise TrajectoryError(f"{self.path}: keyframe digest must be {DIGEST_BYTES} raw bytes "
                                  f"(by the header's weights digest), got {len(digest)}.")
        if not -1 <= step < self._next_step:
            raise TrajectoryError(
                f"{self.path}: keyframe for step {step}, but only steps 0..{self._next_step - 1} are recorded; "
                f"a keyframe digests the weights after its step's update (-1 = before any step)."
            )
        self.flush()
        self._write_durably(_encode_block(_TYPE_KEYFRAME, _KEYFRAME_STEP.pack(step) + digest))

    def append_eval(self, step: int, metrics: dict) -> None:
        """A dev evaluation of the weights after `step`: its scalar metrics (others, like a confusion matrix, are
        left out; a non-finite value is stored as null)."""
        self._check_open()
        if not -1 <= step < self._next_step:
            raise TrajectoryError(f"{self.path}: eval for step {step}, but only steps 0..{self._next_step - 1} are "
                                  "recorded; an eval scores the weights after its step's update "
                                  "(-1 = before any step).")
        scalars = {k: (float(v) if math.isfinite(v) else None) if isinstance(v, float) else v
                   for k, v in metrics.items() if type(v) in (int, float) and k != "step"}
        payload = json.dumps({"step": step, "metrics": scalars}, sort_keys=True, allow_nan=False).encode("utf-8")
        self.flush()
        self._write_durably(_encode_block(_TYPE_EVAL, payload))

    def flush(self) -> None:
        """Write the pending steps as one S block (write + fsync), then empty the step journal. Everything recorded
        is then on disk, so the flush_seconds clock restarts here even when nothing was pending (a block boundary
        or an eval)."""
        self._check_open()
        if self._pending:
            self._write_durably(_encode_steps(self._pending), steps_after=self._pending[-1].step + 1)
            self._pending = []
            self._journal_truncate()
        self._last_flush = time.monotonic()

    def finish(self, steps: int, digest: bytes) -> None:
        self._check_open()
        if steps != self._next_step:
            raise TrajectoryError(f"{self.path}: finish(steps={steps}) but {self._next_step} steps were recorded.")
        self.flush()
        payload = json.dumps({"digest": bytes(digest).hex(), "steps": steps}, sort_keys=True).encode("utf-8")
        self._write_durably(_encode_block(_TYPE_END, payload))
        self.close()

    def close(self) -> None:
        """Write the pending steps and close. A closed writer leaves no step journal: its steps are in the
        file, or (after a failed write) the file says where it is intact and the steps after it are recomputed."""
        if self._fd is None:
            return
        try:
            if self._broken is None:
                self.flush()
        finally:
            fd, self._fd = self._fd, None
            os.close(fd)
            self._journal_close()

    def __enter__(self) -> "TrajectoryWriter":
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()

    # -- internals

    def _check_open(self) -> None:
        if self._broken is not None:
            raise TrajectoryError(self._broken)
        if self._fd is None:
            raise TrajectoryError(f"{self.path}: the trajectory writer is closed.")

    def _write_chunk(self, data: bytes) -> int:
        """One write system call; returns how many bytes were written (tests replace this to fake a full disk)."""
        return os.write(self._fd, data)

    def _write_durably(self, data: bytes, steps_after: int | None = None) -> None:
        try:
            view = memoryview(data)
            while view:
                view = view[self._write_chunk(view) :]
            os.fsync(self._fd)
        except OSError as exc:
            self._fail(exc)
        self._intact += len(data)
        if steps_after is not None:
            self._durable_steps = steps_after

    def _fail(self, exc: OSError) -> None:
        self._journal_close()  # the message below says where the file is intact: a resume goes on from there
        try:  # best effort: drop the torn block so the file ends on an intact one
            os.ftruncate(self._fd, self._intact)
            os.lseek(self._fd, self._intact, os.SEEK_SET)
            os.fsync(self._fd)
        except OSError:
            pass
        what = "the disk is full" if exc.errno == errno.ENOSPC else f"the write failed ({exc.strerror or exc})"
        if self._intact == 0:
            self._broken = f"{self.path}: could not write the trajectory header: {what}; free space and start again."
        else:
            kept = (f"intact up to step {self._durable_steps - 1}" if self._durable_steps
                    else "intact but holds no steps yet")
            self._broken = (f"{self.path}: could not append to the trajectory: {what}. The trajectory is {kept}; "
                            f"free space, then {_RESUME_HINT}.")
        raise TrajectoryError(self._broken) from exc

    def _start_journal(self, run_id: int, recovered: list[StepRecord]) -> None:
        """A fresh step journal holding `recovered` (then pending), replacing any journal there in one rename, so
        a kill now leaves either the old journal or the new one, both with those steps."""
        jpath = journal_path(self.path)
        tmp = jpath + ".tmp"
        self._run_id, self._journal_empty = run_id, not recovered
        data = b"" if not recovered else self._journal_head() + b"".join(map(_encode_journal_record, recovered))
        self._pending = list(recovered)
        self._next_step += len(recovered)
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | getattr(os, "O_BINARY", 0), 0o644)
            try:
                if os.write(fd, data) != len(data):
                    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
            finally:
                os.close(fd)
            os.replace(tmp, jpath)
            self._journal_fd = os.open(jpath, os.O_WRONLY | os.O_APPEND | getattr(os, "O_BINARY", 0))
        except OSError as exc:
            self._journal_failed(exc)

    def _journal_append(self, record: bytes) -> None:
        """One step's record (the first after a block with the journal's head, which names the file's length now:
        the file does not grow while the journal holds steps), in one write system call: a SIGKILL keeps it once
        the call returned."""
        if self._journal_fd is None:
            return
        if self._journal_empty:
            record = self._journal_head() + record
            self._journal_empty = False
        try:
            if os.write(self._journal_fd, record) != len(record):  # a torn record: resume stops before it
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
            if JOURNAL_FSYNC:
                os.fsync(self._journal_fd)
        except OSError as exc:
            self._journal_failed(exc)

    def _journal_head(self) -> bytes:
        return _JOURNAL_HEAD.pack(JOURNAL_MAGIC, self._run_id, self._intact)

    def _journal_truncate(self) -> None:
        """Empty the journal: its steps are now in an intact block."""
        if self._journal_fd is None:
            return
        self._journal_empty = True
        try:
            os.ftruncate(self._journal_fd, 0)
        except OSError as exc:
            self._journal_failed(exc)

    def _journal_failed(self, exc: OSError) -> None:
        """The journal is a help, not the record: when it cannot be written the run goes on without it, said once."""
        self._journal_close()
        self._log(f"note: the step journal {journal_path(self.path)} cannot be written "
                  f"({exc.strerror or exc}); the run goes on without it, a kill now loses the steps not yet in a "
                  f"block of {self.path} (up to output.flush_every)")

    def _journal_close(self) -> None:
        fd, self._journal_fd = self._journal_fd, None
        try:
            if fd is not None:
                os.close(fd)
        except OSError:
            pass
        discard_journal(self.path)
        try:
            os.unlink(journal_path(self.path) + ".tmp")
        except OSError:
            pass


def _fsync_dir(path: str) -> None:
    try:
        fd = os.open(os.path.dirname(os.path.abspath(path)), os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


# ----------------------------------------------------------------------------------------------- inspecting

_SKIPPED_LIST_CAP = 100
_N_WINDOWS = 10


def _finite_mean(values: np.ndarray) -> float | None:
    values = values[np.isfinite(values)]
    return float(values.astype(np.float64).mean()) if len(values) else None


def summarize(data: TrajectoryData) -> dict:
    """Everything `mezo-tune inspect --json` prints. Loss means skip non-finite values; None if none is finite."""
    arr = data.as_arrays()
    n = len(arr["step"])
    loss = (arr["loss_plus"].astype(np.float64) + arr["loss_minus"].astype(np.float64)) / 2
    skipped = arr["step"][arr["skipped"]].tolist()
    k = max(1, n // 10)
    windows = []
    for idx in np.array_split(np.arange(n), min(_N_WINDOWS, n)) if n else []:
        windows.append({"first_step": int(arr["step"][idx[0]]), "last_step": int(arr["step"][idx[-1]]),
                        "mean_loss": _finite_mean(loss[idx])})
    record_bytes = data.intact_bytes - data.header_bytes
    return {
        "path": data.path,
        "format_version": data.header.get("format_version"),
        "header": data.header,
        "n_steps": n,
        "n_skipped": len(skipped),
        "skipped_steps": skipped[:_SKIPPED_LIST_CAP],
        "skipped_steps_truncated": len(skipped) > _SKIPPED_LIST_CAP,
        "keyframe_steps": sorted(data.keyframes),
        "finished": data.end is not None,
        "end": data.end,
        "problem": data.problem,
        "intact_bytes": data.intact_bytes,
        "bytes_per_step": record_bytes / n if n else None,
        "loss_first_10pct": _finite_mean(loss[:k]) if n else None,
        "loss_last_10pct": _finite_mean(loss[-k:]) if n else None,
        "loss_windows": windows,
        "evals": data.evals,
        "best_eval": best_eval(data.evals, data.header.get("select")),
    }


def best_eval(evals: list[dict], select: dict | None) -> dict | None:
    """The eval with the best value of select["metric"] (the earliest of equals); None when none has it."""
    if not select:
        return None
    metric = select["metric"]
    scored = [e for e in evals if isinstance(e.get(metric), (int, float))]
    if not scored:
        return None
    sign = 1 if select["lower_is_better"] else -1
    return min(scored, key=lambda e: sign * e[metric])


def _get(header: dict, key: str):
    """The value at a dotted key ("base_model.digest"), else None."""
    node = header
    for part in key.split("."):
        if not isinstance(node, dict) or part not in node:
            return None
        node = node[part]
    return node


def _fmt(value) -> str:
    return "?" if value is None else str(value)


def _fmt_loss(value: float | None) -> str:
    return "n/a (no finite losses)" if value is None else f"{value:.4f}"


def _fmt_adapter(adapter: dict) -> str:
    """"lora adapter r=8 alpha=16.0, init zrng-v1" from the header's "adapter" entry."""
    cfg = adapter.get("config") or {}
    keys = {"lora": ("r", "lora_alpha"), "prefix": ("num_virtual_tokens",)}.get(adapter.get("type"), ())
    detail = " ".join(f"{k.removeprefix('lora_')}={cfg[k]}" for k in keys if k in cfg)
    return f"{adapter.get('type')} adapter{' ' + detail if detail else ''}, init {adapter.get('init')}"


def _optimizer_line(h: dict) -> list[str]:
    """The estimator and update rule the header names, as one line; none for the paper's MeZO (spsa with one
    direction, sgd), which every trajectory without these entries is."""
    parts = []
    for entry in (h.get("estimator"), h.get("update_rule")):
        if not isinstance(entry, dict) or entry in ({"name": "spsa", "directions": 1}, {"name": "sgd"}):
            continue
        params = ", ".join(f"{k} {v}" for k, v in entry.items() if k not in ("name", "version")
                           and isinstance(v, (int, float)))
        parts.append(f"{entry.get('name')}" + (f" v{entry['version']}" if "version" in entry else "")
                     + (f" ({params})" if params else ""))
    return [f"optimizer   {'; '.join(parts)}"] if parts else []


def format_summary(data: TrajectoryData) -> str:
    """The text `mezo-tune inspect` prints. Header keys that a run did not record show as '?'."""
    s = summarize(data)
    h = data.header
    model = _get(h, "base_model.path")
    revision = _get(h, "base_model.revision")
    digest = _get(h, "base_model.digest")
    trainable = h.get("trainable")
    if isinstance(trainable, list):
        n_tensors = len(trainable)
        n_elements = sum(math.prod(t["shape"]) for t in trainable)
    else:
        n_tensors = n_elements = None
    zgen = h.get("z_generator")
    if isinstance(zgen, dict):
        zgen = " ".join(str(zgen[k]) for k in ("name", "version", "distribution") if k in zgen) or None

    model_line = _fmt(model) + (f"@{revision}" if revision else "")
    if digest:
        model_line += f" (digest {str(digest)[:12]}…)"
    quant = h.get("quantization")
    lines = [
        f"trajectory  {data.path}  (format {_fmt(s['format_version'])})",
        f"model       {model_line}",
        f"dtype       {_fmt(h.get('dtype'))}"
        + (f", quantization {quant}" if quant else ""),
        f"trainable   {_fmt(n_tensors)} tensors, "
        f"{'?' if n_elements is None else f'{n_elements:,}'} elements"
        + (f" ({_fmt_adapter(h['adapter'])})" if isinstance(h.get("adapter"), dict) else ""),
        f"seed        {_fmt(h.get('seed'))}   eps {_fmt(h.get('eps'))}   "
        f"z {_fmt(zgen)}   rounding {_fmt(h.get('rounding'))}",
        *_optimizer_line(h),
        f"steps       {s['n_steps']} recorded, {s['n_skipped']} skipped"
        + (f" (steps {', '.join(map(str, s['skipped_steps'][:10]))}"
           f"{', …' if s['n_skipped'] > 10 else ''})" if s["n_skipped"] else "")
        + (f", finished ({s['end']['steps']} steps)" if s["finished"] else ", not finished"),
        f"keyframes   {len(s['keyframe_steps'])}"
        + (f" (steps {', '.join(map(str, s['keyframe_steps'][:10]))}"
           f"{', …' if len(s['keyframe_steps']) > 10 else ''})" if s["keyframe_steps"] else ""),
        f"size        {s['intact_bytes']:,} bytes"
        + (f", {s['bytes_per_step']:.1f} bytes/step" if s["bytes_per_step"] is not None else ""),
    ]
    if data.problem:
        upto = f" (step {s['n_steps'] - 1})" if s["n_steps"] else ""
        lines.append(f"PROBLEM     {data.problem}; intact up to byte {data.intact_bytes}{upto}; "
                     f"`mezo-tune train --resume` cuts the tail off and continues.")
    else:
        lines.append("file        clean (every block checksum verified)")
    if data.evals:
        best = s["best_eval"]
        select = h.get("select") or {}
        lines.append(f"evals       {len(data.evals)}"
                     + (f"; best {select['metric']} {best[select['metric']]:.4f} after step {best['step']} "
                        f"(`replay --best`)" if best else ""))
        shown = data.evals if len(data.evals) <= 20 else data.evals[:10] + data.evals[-10:]
        for e in shown:
            values = "   ".join(f"{k} {v:.4f}" for k, v in e.items()
                                if k in ("accuracy", "exact_match", "f1", "loss", "perplexity") and v is not None)
            lines.append(f"  after {e['step']:>7}   {values}" + ("   <- best" if e is best else ""))
    if s["n_steps"]:
        lines.append(f"loss        first 10%: {_fmt_loss(s['loss_first_10pct'])}   "
                     f"last 10%: {_fmt_loss(s['loss_last_10pct'])}   (mean of (L+ + L-)/2)")
        for w in s["loss_windows"]:
            lines.append(f"  steps {w['first_step']:>7}-{w['last_step']:<7} {_fmt_loss(w['mean_loss'])}")
    return "\n".join(lines)
