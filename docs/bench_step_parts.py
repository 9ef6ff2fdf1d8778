"""What a MeZO step is made of, in one process on the embedded SmolLM2 (batch 8 x 64): a plain forward, a perturbed
forward, the update pass and one copy of the trainable weights, interleaved, medians. With `blocks`, also a perturbed
forward with only the LM head perturbed in row blocks (large_linear=1 << 23, the fp32 default) and one with every
trainable nn.Linear so (large_linear=0, the 16-bit CPU default): mezo.blocked_linear_threshold.

Usage: OMP_NUM_THREADS=1 python docs/bench_step_parts.py DTYPE REPEATS [blocks]
"""
import json
import statistics
import sys
import time

import torch
from mezo_tune import models
from mezo_tune.bench import _lm_loss
from mezo_tune.mezo import Mezo, trainable_set

dtype, repeats = sys.argv[1], int(sys.argv[2])
blocks = len(sys.argv) > 3 and sys.argv[3] == "blocks"
model = models.load_model(models.resolve_source("embedded:smollm2-135m", progress=False), dtype, "cpu")
models.keep_freed_memory()
tr = trainable_set(model)
ids = torch.randint(0, model.config.vocab_size, (8, 64), generator=torch.Generator().manual_seed(0))
engines = {"default": Mezo(model, tr, seed=0, eps=1e-3, use_compile=True)}
if blocks:
    engines["lm_head_blocked"] = Mezo(model, tr, seed=0, eps=1e-3, use_compile=True, large_linear=1 << 23)
    engines["all_linears_blocked"] = Mezo(model, tr, seed=0, eps=1e-3, use_compile=True, large_linear=0)
src = torch.ones(tr.numel, dtype=tr.params[0].dtype); dst = torch.empty_like(src)
calls = {"forward": lambda s: _lm_loss(model, ids).item(), "copy": lambda s: dst.copy_(src)}
for name, e in engines.items():
    def pf(s, e=e):
        with e.perturbed(s, +1):
            _lm_loss(model, ids).item()
    calls[f"perturbed_forward[{name}]"] = pf
calls["update"] = lambda s, e=engines["default"]: e.apply_update(s, 1e-9)
times = {k: [] for k in calls}
with torch.no_grad():
    for k, f in calls.items():
        f(0); f(1)  # warm-up / compile
    for r in range(repeats):
        for k, f in calls.items():
            t0 = time.perf_counter(); f(r + 2); times[k].append(time.perf_counter() - t0)
med = {k: statistics.median(v) for k, v in times.items()}
print(json.dumps({"dtype": dtype, "threads": torch.get_num_threads(), "median_s": med}))
