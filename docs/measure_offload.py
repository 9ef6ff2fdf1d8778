"""Seconds per MeZO step on the embedded SmolLM2-135M (fp32, batch 8 x 64, full weights), all in memory vs half of
its 30 layers (15-29) offloaded to disk by accelerate ([model] device_map), in one process, steps interleaved (each
run first in turn), medians. "in_memory (LM head unblocked)" perturbs the LM head whole, as every module under
accelerate's hooks is (Mezo's blocked LM head forward is not installed over accelerate's).

"offloaded (cold)" drops the store's pages from the page cache before each step (fdatasync, then
posix_fadvise DONTNEED on every .dat file), so that step's first forward reads the offloaded half from the disk; in the
"offloaded" steps the store (the 15 layers, ~200 MB) stays in the page cache, as it does on a machine with the RAM
for it. Also says whether each step's g was bit-equal between the two runs (both start from the same weights).

Usage: OMP_NUM_THREADS=1 python docs/measure_offload.py OFFLOAD_DIR REPEATS
"""
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch
from mezo_tune import models
from mezo_tune.bench import _lm_loss
from mezo_tune.mezo import Mezo, trainable_set

offload_dir, repeats = sys.argv[1], int(sys.argv[2])
source = models.resolve_source("embedded:smollm2-135m", progress=False)
models.quiet_transformers()
layers = 30
half_on_disk = {"model.embed_tokens": "cpu", "model.norm": "cpu", "model.rotary_emb": "cpu", "lm_head": "cpu",
                **{f"model.layers.{i}": "cpu" if i < layers // 2 else "disk" for i in range(layers)}}
models_ = {"in_memory": models.load_model(source, "float32", "cpu"),
           "in_memory (LM head unblocked)": models.load_model(source, "float32", "cpu")}
for label in ("offloaded", "offloaded (cold)"):  # each with its own store, so all three take the same steps
    before = set(Path(offload_dir).iterdir()) if Path(offload_dir).exists() else set()
    models_[label] = models.load_model(source, "float32", "cpu", device_map=half_on_disk, offload_dir=offload_dir)
    (store,) = set(Path(offload_dir).iterdir()) - before
models.keep_freed_memory()
ids = torch.randint(0, models_["in_memory"].config.vocab_size, (8, 64), generator=torch.Generator().manual_seed(0))
# Under accelerate's hooks no module gets Mezo's own forward: the LM head is perturbed whole, not in row blocks. The
# second in-memory engine does the same (large_linear past every weight), to tell that apart from the offload.
engines = {label: Mezo(m, trainable_set(m), seed=0, eps=1e-3, use_compile=True,
                       large_linear=1 << 62 if "unblocked" in label else 1 << 23) for label, m in models_.items()}


def drop_store_cache():
    """The cold run's store out of the page cache (written back first): its next forward reads it from the disk."""
    for f in store.glob("*.dat"):
        fd = os.open(f, os.O_RDONLY)
        try:
            os.fdatasync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


times = {label: [] for label in models_}
cpu_times = {label: [] for label in models_}  # this process's CPU seconds: less swayed by other jobs on the machine
gs = {label: [] for label in models_}
labels = list(models_)
for t in range(repeats + 1):  # step 0 warms up (compiles the kernels) and is not counted
    for label in labels[t % len(labels):] + labels[: t % len(labels)]:  # each run first in turn
        model = models_[label]
        if label == "offloaded (cold)":
            drop_store_cache()
        t0, c0 = time.perf_counter(), time.process_time()
        rec = engines[label].step(t, 1e-6, lambda: _lm_loss(model, ids))
        dt, dc = time.perf_counter() - t0, time.process_time() - c0
        gs[label].append(rec[0]["g"])
        if t:
            times[label].append(dt)
            cpu_times[label].append(dc)
med = {k: round(statistics.median(v), 2) for k, v in times.items()}
cpu_med = {k: round(statistics.median(v), 2) for k, v in cpu_times.items()}
print(json.dumps({"threads": torch.get_num_threads(), "repeats": repeats, "median_s_per_step": med,
                  "ratio_to_in_memory": {k: round(v / med["in_memory"], 2) for k, v in med.items()},
                  "s_per_step": {k: [round(x, 2) for x in v] for k, v in times.items()},
                  "median_cpu_s_per_step": cpu_med,
                  "cpu_ratio_to_in_memory": {k: round(v / cpu_med["in_memory"], 2) for k, v in cpu_med.items()},
                  "g_bit_equal": gs["in_memory"] == gs["offloaded"] == gs["offloaded (cold)"],
                  "g": {label: g[:3] for label, g in gs.items()}}))
