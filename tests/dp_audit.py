"""`mezo-tune` as torchrun runs `-m mezo_tune`, recording what this process writes under $MEZO_AUDIT_ROOT: every file
opened for writing, created, renamed, truncated or deleted there (sys.addaudithook sees them all, from Python and from
os.* alike). At exit the list goes to $MEZO_AUDIT_DIR/rank<RANK>.json, outside the audited root.
Used by tests/test_distributed.py to prove that rank 1 writes nothing."""

import atexit
import json
import os
import sys

ROOT = os.path.abspath(os.environ["MEZO_AUDIT_ROOT"])
WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND
EVENTS = ("os.rename", "os.replace", "os.remove", "os.rmdir", "os.mkdir", "os.truncate", "shutil.rmtree", "os.link",
          "os.symlink", "os.chmod")
written: list[list[str]] = []


def _under_root(path) -> bool:
    return isinstance(path, (str, bytes, os.PathLike)) and os.path.abspath(os.fsdecode(path)).startswith(ROOT)


def hook(event: str, args: tuple) -> None:
    if event == "open":
        path, mode, flags = args
        writes = (isinstance(mode, str) and any(c in mode for c in "wax+")) or bool((flags or 0) & WRITE_FLAGS)
        if writes and _under_root(path):
            written.append([event, os.fsdecode(path)])
    elif event in EVENTS and args and _under_root(args[0]):
        written.append([event, os.fsdecode(args[0])])


def report() -> None:
    path = os.path.join(os.environ["MEZO_AUDIT_DIR"], f"rank{os.environ.get('RANK', '0')}.json")
    with open(path, "w") as f:
        json.dump(written, f)


atexit.register(report)
sys.addaudithook(hook)

from mezo_tune.cli import main  # noqa: E402  (after the hook: imports are audited too)

main(prog_name="mezo-tune")
