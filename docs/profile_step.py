"""Where a MeZO step's time goes, by profile: a loop of MeZO steps, or of pairs of plain forwards, on the embedded
SmolLM2 (batch 8 x 64), for a sampling profiler to watch. It writes READY once warmed up; attach then, e.g.

    python docs/profile_step.py step bfloat16 rademacher32 40 & until [ -f READY ]; do sleep 0.3; done
    perf record -e cpu-clock -F 999 -p $! -o step.data -- sleep 10; wait
    perf report -i step.data --sort dso,sym --stdio

and the same with `forwards` instead of `step`. The shares of the C kernels' library (perturb_KKD, update_*), Python
and libgomp in the two profiles, times the seconds per call printed at the end, give the step's parts beyond its two
forwards in CPU time, which a shared CPU disturbs far less than a difference of wall times (README, "Half precision").

Usage: python docs/profile_step.py step|forwards DTYPE DISTRIBUTION CALLS
"""
import sys
import time
from pathlib import Path

import torch
from mezo_tune import models
from mezo_tune.bench import _lm_loss
from mezo_tune.mezo import Mezo, trainable_set

mode, dtype, dist, calls = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
model = models.load_model(models.resolve_source("embedded:smollm2-135m", progress=False), dtype, "cpu")
models.keep_freed_memory()
ids = torch.randint(0, model.config.vocab_size, (8, 64), generator=torch.Generator().manual_seed(0))
engine = Mezo(model, trainable_set(model), seed=0, eps=1e-3, distribution=dist, use_compile=True)
engine.defer_updates = True  # as train runs it (mezo.Mezo.apply_update)


def step(s):
    engine.step(s, 1e-7, lambda: _lm_loss(model, ids))


def forwards(s):
    with torch.no_grad():
        _lm_loss(model, ids).item()
        _lm_loss(model, ids).item()


call = step if mode == "step" else forwards
for s in range(3):
    call(s)
Path("READY").write_text("1")
t0 = time.perf_counter()
for s in range(calls):
    call(s + 3)
print(f"{mode} {dtype} {dist}: {(time.perf_counter() - t0) / calls:.4f} s per call")
