"""Where mezo-tune keeps what it fetches or builds once: the embedded model and data wheels, the converted model, the
C kernels. Imports nothing of ours, so the generator's kernels (zrng -> cpu_kernels) do not reach up into models."""

from __future__ import annotations

import os
from pathlib import Path


def cache_dir() -> Path:
    """$MEZO_TUNE_CACHE, else ~/.cache/mezo-tune."""
    return Path(os.environ.get("MEZO_TUNE_CACHE", Path.home() / ".cache" / "mezo-tune"))
