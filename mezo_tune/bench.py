"""`mezo-tune bench`: time and peak memory of a forward, a MeZO step, a backprop + AdamW step and the paper code's
4-pass MeZO step, on the same model and batch, reported as ratios measured in one run.

Each variant runs in its own subprocess so that peak memory is honest on CPU too: the child loads the model, warms
up (compiles), resets its peak (Linux: malloc_trim, then /proc/self/clear_refs resets VmHWM; CUDA:
reset_peak_memory_stats), then
times `repeats` calls and reports the median time and the peak (resident set on CPU, allocated bytes on CUDA).

With --adapter lora|prefix (peft, default settings of [adapter]) every variant runs on the adapter model: MeZO
perturbs and updates the adapter tensors only, backprop + AdamW trains them only (the base frozen), and the paper
code's step perturbs them only. --quantization 8bit|4bit loads the base through bitsandbytes (needs an adapter).
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import time

VARIANTS = ("forward", "mezo", "backprop", "reference")


def _lm_loss(model, ids):
    import torch

    logits = model(input_ids=ids).logits.float()
    return torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1))


def _reference_step(model, ids, step: int, lr: float, eps: float, params=None):
    """The paper code's step (princeton-nlp/MeZO, trainer.py): perturb in place +εz, -2εz, +εz, then update; z drawn
    from torch.normal with the global RNG, regenerated four times."""
    import torch

    params = params or [p for p in model.parameters() if p.is_floating_point()]

    def perturb(scale):
        torch.manual_seed(step)
        for p in params:
            z = torch.normal(0.0, 1.0, size=p.shape, device=p.device, dtype=p.dtype)
            p.data = p.data + scale * eps * z

    with torch.no_grad():
        perturb(+1)
        lp = _lm_loss(model, ids).item()
        perturb(-2)
        lm = _lm_loss(model, ids).item()
        perturb(+1)
        g = (lp - lm) / (2 * eps)
        torch.manual_seed(step)
        for p in params:
            z = torch.normal(0.0, 1.0, size=p.shape, device=p.device, dtype=p.dtype)
            p.data = p.data - lr * g * z


def _reset_peak(device: str) -> None:
    """Start peak accounting after warm-up. On CPU, freed heap memory is first handed back to the OS (malloc_trim),
    the same for every variant, so the peak is what the timed calls need, not what warm-up left in the allocator."""
    import gc

    import torch

    gc.collect()
    if device.startswith("cuda"):
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        return
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass


def _peak_bytes(device: str) -> int:
    import torch

    if device.startswith("cuda"):
        return torch.cuda.max_memory_allocated()
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def run_variant(variant: str, model_spec: str, dtype: str, batch_size: int, seq_len: int, repeats: int,
                device: str, compile_setting: str = "auto", adapter: str = "none", quantization: str = "none") -> dict:
    """Measure one variant in this process."""
    import torch

    from . import models
    from .mezo import Mezo, trainable_set
    from .train import use_compile

    source = models.resolve_source(model_spec)
    device = models.resolve_device(device)
    model = models.load_model(source, dtype, device, quantization)
    if adapter != "none":
        from .adapters import attach
        from .recipe import AdapterConfig

        model = attach(model, AdapterConfig(type=adapter), seed=0)
    trainable = trainable_set(model, adapter=adapter != "none")
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, model.config.vocab_size, (batch_size, seq_len), generator=gen).to(device)

    if variant == "forward":
        def call(step):
            with torch.no_grad():
                _lm_loss(model, ids).item()
    elif variant == "mezo":
        engine = Mezo(model, trainable, seed=0, eps=1e-3,
                      use_compile=use_compile(compile_setting, device))

        def call(step):
            engine.step(step, 1e-7, lambda: _lm_loss(model, ids))
    elif variant == "backprop":
        for p in trainable.params:
            p.requires_grad_(True)
        model.train()
        opt = torch.optim.AdamW(trainable.params, lr=1e-7)

        def call(step):
            loss = _lm_loss(model, ids)
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
    elif variant == "reference":
        def call(step):
            _reference_step(model, ids, step, 1e-7, 1e-3, trainable.params)
    else:
        raise ValueError(variant)

    call(0)  # warm-up: compilation, allocator, optimizer state
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
    sync()
    _reset_peak(device)
    times = []
    for step in range(1, repeats + 1):
        t0 = time.perf_counter()
        call(step)
        sync()
        times.append(time.perf_counter() - t0)
    return {"variant": variant, "seconds": statistics.median(times), "times": times, "peak_bytes": _peak_bytes(device),
            "device": torch.cuda.get_device_name() if device.startswith("cuda") else f"cpu ({os.cpu_count()} cores, "
            f"{torch.get_num_threads()} threads)"}


def bench(model_spec: str, dtype: str = "float32", batch_size: int = 8, seq_len: int = 64, repeats: int = 5,
          device: str = "auto", compile_setting: str = "auto", progress: bool = True, adapter: str = "none",
          quantization: str = "none") -> dict:
    """Run every variant in its own subprocess; return times, peaks and ratios (one JSON-able dict)."""
    from . import models

    models.resolve_source(model_spec, progress=progress)  # fetch/convert once, before the children start
    # A fixed mmap threshold makes glibc hand every freed tensor of >= 4 MiB straight back to the OS, so a resident
    # peak measures live tensors rather than what the allocator kept cached (the same for every variant).
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_=str(4 << 20))
    results = {}
    for variant in VARIANTS:
        if progress:
            print(f"[bench] {variant} ...", file=sys.stderr, flush=True)
        cmd = [sys.executable, "-m", "mezo_tune.bench", variant, model_spec, dtype, str(batch_size), str(seq_len),
               str(repeats), device, compile_setting, adapter, quantization]
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
        if proc.returncode != 0:
            raise RuntimeError(f"bench variant {variant} failed:\n{proc.stderr[-3000:]}")
        results[variant] = json.loads(proc.stdout.strip().splitlines()[-1])
    f, m, b, r = (results[v] for v in VARIANTS)
    return {
        "model": model_spec, "dtype": dtype, "adapter": adapter, "quantization": quantization,
        "batch_size": batch_size, "seq_len": seq_len, "repeats": repeats,
        "device": f["device"],
        "forward_s": f["seconds"], "mezo_step_s": m["seconds"], "backprop_step_s": b["seconds"],
        "reference_step_s": r["seconds"],
        "forward_peak_bytes": f["peak_bytes"], "mezo_peak_bytes": m["peak_bytes"],
        "backprop_peak_bytes": b["peak_bytes"], "reference_peak_bytes": r["peak_bytes"],
        "ratios": {
            "mezo_over_forward": m["seconds"] / f["seconds"],
            "backprop_over_mezo": b["seconds"] / m["seconds"],
            "reference_over_mezo": r["seconds"] / m["seconds"],
            "mezo_peak_over_forward_peak": m["peak_bytes"] / f["peak_bytes"],
            "backprop_peak_over_mezo_peak": b["peak_bytes"] / m["peak_bytes"],
        },
        "times": {v: results[v]["times"] for v in VARIANTS},
    }


def format_bench(res: dict) -> str:
    mib = 1 << 20
    rows = [("forward", res["forward_s"], res["forward_peak_bytes"]),
            ("MeZO step (ours)", res["mezo_step_s"], res["mezo_peak_bytes"]),
            ("backprop + AdamW step", res["backprop_step_s"], res["backprop_peak_bytes"]),
            ("reference MeZO step (paper code)", res["reference_step_s"], res["reference_peak_bytes"])]
    setup = "".join(f", {k} {res[k]}" for k in ("adapter", "quantization") if res.get(k, "none") != "none")
    lines = [f"{res['model']} {res['dtype']}{setup}, batch {res['batch_size']} x {res['seq_len']} tokens, "
             f"median of {res['repeats']}, on {res['device']}",
             f"{'variant':34} {'s/call':>9} {'peak MiB':>10}"]
    lines += [f"{name:34} {s:9.3f} {peak / mib:10.0f}" for name, s, peak in rows]
    r = res["ratios"]
    lines += ["",
              f"MeZO step / forward            {r['mezo_over_forward']:.2f} x",
              f"reference step / MeZO step     {r['reference_over_mezo']:.2f} x",
              f"backprop step / MeZO step      {r['backprop_over_mezo']:.2f} x",
              f"MeZO peak / forward peak       {r['mezo_peak_over_forward_peak']:.2f} x",
              f"backprop peak / MeZO peak      {r['backprop_peak_over_mezo_peak']:.2f} x"]
    return "\n".join(lines)


if __name__ == "__main__":  # a bench child: python -m mezo_tune.bench VARIANT MODEL DTYPE B L REPEATS DEVICE COMPILE
    v, spec, dt, b, l, rep, dev, comp = sys.argv[1:9]
    adapter_type, quant = (sys.argv[9:11] + ["none", "none"])[:2]
    print(json.dumps(run_variant(v, spec, dt, int(b), int(l), int(rep), dev, comp, adapter_type, quant)))
