"""What a MeZO step is made of, in one process on the embedded SmolLM2 (batch 8 x 64): a plain forward, a perturbed
forward, the update pass and one copy of the trainable weights, interleaved, medians. With `blocks`, also a perturbed
forward with only the LM head perturbed in row blocks (large_linear=1 << 23, the default) and one with every trainable
nn.Linear so (large_linear=0), per distribution: mezo.BLOCKED_LINEAR_ELEMENTS.

With distributions named (gaussian, rademacher, rademacher32), a perturbed forward and an update with each, so that
they compare in one process, and a whole step (engine.step) with each; "in_copies" is each part beyond its forwards
(a perturbed forward: one, a step: two, the update: none) over the copy.

Usage: OMP_NUM_THREADS=1 python docs/bench_step_parts.py DTYPE REPEATS [blocks] [DISTRIBUTION ...]
"""
import json
import statistics
import sys
import time

import torch
from mezo_tune import models
from mezo_tune.bench import _lm_loss
from mezo_tune.mezo import Mezo, trainable_set, update_scale

dtype, repeats = sys.argv[1], int(sys.argv[2])
blocks = "blocks" in sys.argv[3:]
dists = [a for a in sys.argv[3:] if a != "blocks"]
model = models.load_model(models.resolve_source("embedded:smollm2-135m", progress=False), dtype, "cpu")
models.keep_freed_memory()
tr = trainable_set(model)
ids = torch.randint(0, model.config.vocab_size, (8, 64), generator=torch.Generator().manual_seed(0))
engines = {"default": Mezo(model, tr, seed=0, eps=1e-3, use_compile=True)}
for d in dists:
    engines[d] = Mezo(model, tr, seed=0, eps=1e-3, use_compile=True, distribution=d)
if blocks:
    for d in dists or ["gaussian"]:
        engines[f"{d},lm_head_blocked"] = Mezo(model, tr, seed=0, eps=1e-3, use_compile=True, distribution=d,
                                               large_linear=1 << 23)
        engines[f"{d},all_linears_blocked"] = Mezo(model, tr, seed=0, eps=1e-3, use_compile=True, distribution=d,
                                                   large_linear=0)
src = torch.ones(tr.numel, dtype=tr.params[0].dtype); dst = torch.empty_like(src)
calls = {"forward": lambda s: _lm_loss(model, ids).item(), "copy": lambda s: dst.copy_(src)}
for name, e in engines.items():
    def pf(s, e=e):
        with e.perturbed(s, +1):
            _lm_loss(model, ids).item()
    calls[f"perturbed_forward[{name}]"] = pf
c = update_scale(1e-7, 1e-2)  # an fp32 c, as training applies
for name in ["default"] + dists:
    calls[f"update[{name}]"] = lambda s, e=engines[name]: e.apply_update(s, c)
    calls[f"step[{name}]"] = lambda s, e=engines[name]: e.step(s, 1e-7, lambda: _lm_loss(model, ids))
times = {k: [] for k in calls}
with torch.no_grad():
    for k, f in calls.items():
        f(0); f(1)  # warm-up / compile
    for r in range(repeats):
        for k, f in calls.items():
            t0 = time.perf_counter(); f(r + 2); times[k].append(time.perf_counter() - t0)
med = {k: statistics.median(v) for k, v in times.items()}
beyond = {"perturbed": 1, "step": 2}  # forwards in each call, taken off
in_copies = {k: (v - beyond.get(k.split("_")[0].split("[")[0], 0) * med["forward"]) / med["copy"]
             for k, v in med.items() if k not in ("forward", "copy")}
print(json.dumps({"dtype": dtype, "threads": torch.get_num_threads(), "median_s": med, "in_copies": in_copies}))
