"""A MeZO step's memory passes over the trainable set of the embedded SmolLM2, timed in one process (interleaved,
medians): a perturbed copy of every trainable tensor (what each perturbed forward does; here into one scratch buffer),
the update pass (= a replay step), the update fused into a perturbed copy (what a step's first perturbed forward does
with the previous step's update, cpu_kernels.update_perturb) and a plain copy of the trainable weights. A few seconds each, so far less noisy on a
shared CPU than bench's step - 2 forwards; (perturbed copy + fused update and perturbed copy) / copy is the part of a
step's overhead in weight copies that the kernels cause (README, "Half precision"); with the update in a pass of its
own (as before the fusion, or where it does not apply): 2 perturbed copies + update.

Usage: OMP_NUM_THREADS=1 python docs/bench_passes.py DTYPE REPEATS [DISTRIBUTION]
       (DTYPE: float32 | bfloat16 | float16; DISTRIBUTION: gaussian (default) | rademacher | rademacher32)
"""
import json
import statistics
import sys
import time

import torch
from mezo_tune import cpu_kernels, models, zrng
from mezo_tune.mezo import Mezo, trainable_set, update_scale

dtype, repeats = sys.argv[1], int(sys.argv[2])
dist = sys.argv[3] if len(sys.argv) > 3 else "gaussian"
model = models.load_model(models.resolve_source("embedded:smollm2-135m", progress=False), dtype, "cpu")
tr = trainable_set(model)
engine = Mezo(model, tr, seed=0, eps=1e-3, distribution=dist, use_compile=True)
lib = cpu_kernels.library()
code = zrng.distribution_code(dist)
scratch = torch.empty(max(p.numel() for p in tr.params), dtype=tr.params[0].dtype)
src = torch.ones(tr.numel, dtype=tr.params[0].dtype); dst = torch.empty_like(src)
# every step's keys made beforehand (the engine keeps a step's key table for its three passes): the timed passes are
# the kernels, one C call per tensor (a perturbed forward's hot path, Mezo._form_list, makes one per module or
# family of modules: the same kernels, one parallel region for several tensors)
keys = {s: {n: zrng.key_tensor(*zrng.stream_key(0, s, n)) for n in tr.names} for s in range(repeats + 3)}


def perturb_all(step):
    for name, p in zip(tr.names, tr.params):
        flat = p.data.view(-1)
        assert cpu_kernels.perturb_whole(lib, scratch[: flat.numel()], flat, keys[step][name].data_ptr(), 1e-3, code)


def update_perturb_all(step):
    for name, p in zip(tr.names, tr.params):
        flat = p.data.view(-1)
        ukey = keys[step - 1][name].data_ptr()  # the previous step's update
        assert cpu_kernels.perturb_whole(lib, scratch[: flat.numel()], flat, keys[step][name].data_ptr(), 1e-3, code,
                                         ukey, c)


c = update_scale(1e-7, 1e-2)  # an fp32 c, as training applies (the C update then computes in fp32)
calls = {"perturb_all": perturb_all, "update": lambda s: engine.apply_update(s, c),
         "update_perturb_all": update_perturb_all, "copy": lambda s: dst.copy_(src)}
times = {k: [] for k in calls}
with torch.no_grad():
    for f in calls.values():
        f(1); f(2)
    for r in range(repeats):
        for k, f in calls.items():
            t0 = time.perf_counter(); f(r + 3); times[k].append(time.perf_counter() - t0)
med = {k: statistics.median(v) for k, v in times.items()}
print(json.dumps({"dtype": dtype, "distribution": dist, "threads": torch.get_num_threads(), "median_s": med,
                  "in_copies": {k: v / med["copy"] for k, v in med.items()},
                  "step_passes_in_copies": (med["perturb_all"] + med["update_perturb_all"]) / med["copy"],
                  "unfused_step_passes_in_copies": (2 * med["perturb_all"] + med["update"]) / med["copy"]}))
