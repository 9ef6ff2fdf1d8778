"""`mezo-tune bench`: time and peak memory of a forward, a MeZO step, a backprop + AdamW step and the paper code's
4-pass MeZO step, on the same model and batch, reported as ratios measured in one run.

Each variant runs in its own subprocess so that peak memory is honest on CPU too: the child loads the model (on CPU
with freed memory kept for reuse, as train runs: models.keep_freed_memory), warms up (compiles),
resets its peak (Linux: malloc_trim, then /proc/self/clear_refs resets VmHWM; CUDA: reset_peak_memory_stats), then
times `repeats` calls and reports the median time and the peak (resident set on CPU, allocated bytes on CUDA). On
CPU one more, untimed call measures the peak of live tensors (see tensor_peak_bytes), comparable to CUDA's figure.

Time ratios do not divide times taken in different processes: a step variant (MeZO, backprop, reference) times a
forward after each of its calls, and its time is expressed in those forwards (replay: in copies); on shared or
virtual CPUs, whose speed drifts by 10-30 % over the minutes a bench takes, this keeps the ratios steadier.

Every variant but the forward also times, in its own process, a plain copy of a buffer as large as the trainable set
(read + write of each element: "a weight copy"). A step's overhead in weight copies is (step - the 2 forwards timed
between its calls) / a weight copy (replay: its step / a weight copy): what a step costs beyond its forwards, in a
unit that does not depend on how fast the CPU's matmuls are, so that it compares across machines.

The "replay" variant times one replay step (the update θ ← R(θ − c·z) over every trainable tensor, which is all
a replay does per step) and, between its calls, a plain copy of a buffer as large as the trainable set: the
replay's bytes moved (read + write of every trainable element) per second over the copy's is the fraction of
measured memory bandwidth that replay reaches.

`sweep` runs forward, MeZO and backprop over Llama-shaped models built from configs with random weights ("config:
HIDDENxLAYERS", nothing downloaded) and several sequence lengths, and writes a JSON and a PNG chart.

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
import warnings

VARIANTS = ("forward", "mezo", "backprop", "reference", "replay")
SWEEP_VARIANTS = ("forward", "mezo", "backprop")


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


def parse_shape(spec: str) -> tuple[int, int]:
    """(hidden, layers) of "HIDDENxLAYERS" or "config:HIDDENxLAYERS"."""
    try:
        hidden, layers = (int(v) for v in spec.removeprefix("config:").split("x"))
    except ValueError:
        raise ValueError(f"a model shape is HIDDENxLAYERS, e.g. 768x12; got {spec!r}") from None
    if hidden < 64 or hidden % 64 or layers < 1:
        raise ValueError(f"model shape {spec!r}: hidden must be a positive multiple of 64 and layers >= 1")
    return hidden, layers


def random_llama(spec: str, dtype: str, device: str):
    """A Llama-shaped model with random weights from "config:HIDDENxLAYERS": heads of 64, about 4 query heads per
    key/value head (a quarter of the heads, rounded down, or the next count up that divides them), MLP 8/3 wide (a
    multiple of 64), a 32000-token vocabulary, untied embeddings."""
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig

    from . import models

    hidden, layers = parse_shape(spec)
    heads = hidden // 64
    kv_heads = next(d for d in range(max(1, heads // 4), heads + 1) if heads % d == 0)  # 576: 9 heads, 3 (SmolLM2)
    config = LlamaConfig(hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
                         num_key_value_heads=kv_heads, intermediate_size=-(-8 * hidden // 3 // 64) * 64,
                         vocab_size=32000, max_position_embeddings=8192, tie_word_embeddings=False)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=models.torch_dtype(dtype))
    model.config.use_cache = False
    return model.requires_grad_(False).eval().to(device)


def tensor_peak_bytes(call, step: int) -> int:
    """Peak bytes of live tensors during call(step): those alive before it (every tensor the garbage collector can
    reach: weights, optimizer state, scratch) plus the highest running total of what the call allocates, from
    torch.profiler's allocator events (compiled kernels' buffers included). The CPU counterpart of CUDA's
    max_memory_allocated: unlike the resident set it leaves out the runtime (libraries, kernels' code)."""
    import gc

    import torch
    from torch._subclasses.fake_tensor import FakeTensor
    from torch.profiler import ProfilerActivity, profile

    gc.collect()
    storages = {}
    with warnings.catch_warnings():  # isinstance() on some deprecated torch objects warns
        warnings.simplefilter("ignore", FutureWarning)
        objects = [obj for obj in gc.get_objects() if isinstance(obj, torch.Tensor)]
    for obj in objects:
        if obj.device.type == "meta" or isinstance(obj, FakeTensor):  # compile's tracing leaves fake tensors behind
            continue
        try:
            st = obj.untyped_storage()
            storages[st.data_ptr()] = st.nbytes()
        except (RuntimeError, NotImplementedError):  # other tensors without data
            continue
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        call(step)
    events = sorted((e.start_ns(), e.nbytes()) for e in prof.profiler.kineto_results.events() if e.name() == "[memory]")
    now = peak = 0
    for _, nbytes in events:
        now += nbytes
        peak = max(peak, now)
    return sum(storages.values()) + peak


def _copy_call(numel: int, dtype, device: str):
    """(bytes moved, a call that copies a buffer of `numel` elements, at most 2**27, into another: read + write)."""
    import torch

    numel = min(numel, 1 << 27)
    src = torch.ones(numel, dtype=dtype, device=device)
    dst = torch.empty_like(src)
    return 2 * numel * src.element_size(), lambda step: dst.copy_(src)


def _bench_model(model_spec: str, dtype: str, device: str, batch_size: int, seq_len: int, adapter: str = "none",
                 quantization: str = "none"):
    """(model, trainable set, a batch of random token ids) as a bench child measures them; device is resolved."""
    import torch

    from . import models
    from .mezo import trainable_set

    if model_spec.startswith("config:"):
        model = random_llama(model_spec, dtype, device)
    else:
        model = models.load_model(models.resolve_source(model_spec), dtype, device, quantization)
    if device.startswith("cpu"):
        models.keep_freed_memory()  # as train runs
    if adapter != "none":
        from .adapters import attach
        from .recipe import AdapterConfig

        model = attach(model, AdapterConfig(type=adapter), seed=0)
    trainable = trainable_set(model, adapter=adapter != "none")
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, model.config.vocab_size, (batch_size, seq_len), generator=gen).to(device)
    return model, trainable, ids


def _device_name(device: str) -> str:
    import torch

    if device.startswith("cuda"):
        return torch.cuda.get_device_name()
    return f"cpu ({os.cpu_count()} cores, {torch.get_num_threads()} threads)"


def run_variant(variant: str, model_spec: str, dtype: str, batch_size: int, seq_len: int, repeats: int,
                device: str, compile_setting: str = "auto", adapter: str = "none", quantization: str = "none",
                distribution: str = "gaussian") -> dict:
    """Measure one variant in this process (distribution: of z, in the MeZO step and the replay step)."""
    import torch

    from . import models
    from .mezo import Mezo, update_scale
    from .run import use_compile

    device = models.resolve_device(device)
    model, trainable, ids = _bench_model(model_spec, dtype, device, batch_size, seq_len, adapter, quantization)

    def forward(step):
        with torch.no_grad():
            _lm_loss(model, ids).item()

    if variant == "forward":
        call = forward
    elif variant == "mezo":
        engine = Mezo(model, trainable, seed=0, eps=1e-3, distribution=distribution,
                      use_compile=use_compile(compile_setting, device))
        engine.defer_updates = True  # as train runs it: each update fused into the next step's first perturbation

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
    elif variant == "replay":
        engine = Mezo(model, trainable, seed=0, eps=1e-3, distribution=distribution,
                      use_compile=use_compile(compile_setting, device))
        c = update_scale(1e-7, 1e-2)  # an fp32 c = fp32(η·g), as training applies

        def call(step):
            engine.apply_update(step, c)
    else:
        raise ValueError(variant)

    call(0)  # warm-up: compilation, allocator, optimizer state
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
    sync()
    _reset_peak(device)
    # One untimed call after the reset: on CPU malloc_trim has just handed the heap back, and the first call pays for
    # faulting it in again (a step in a run never does); it still counts for the peak.
    call(1)
    sync()
    # The peaks before the timed calls (the same calls): the yardstick copy's buffers, made after, count in neither.
    # The live-tensor peak comes from an extra, untimed call (the profiler slows what it watches).
    peak = _peak_bytes(device)
    tensor_peak = peak if device.startswith("cuda") else tensor_peak_bytes(call, repeats + 2)
    # Each call is followed by a timed call of the yardstick it is compared with (a step variant: a forward, then a
    # copy of as many bytes as the trainable weights; replay: a plain copy), so that a machine whose speed drifts
    # between children or within one (shared or virtual CPUs) does not skew the ratios.
    out = {"variant": variant, "peak_bytes": peak, "tensor_peak_bytes": tensor_peak,
           "params": sum(p.numel() for p in model.parameters()), "trainable": trainable.numel,
           "device": _device_name(device)}
    # a copy of the trainable weights (read + write of each): the unit of a step's overhead (bench's docstring)
    out["bytes_moved"] = sum(2 * p.numel() * p.element_size() for p in trainable.params)
    yardsticks = []
    if variant in ("mezo", "backprop", "reference"):
        yardsticks.append(forward)
    if variant != "forward":
        copy_bytes, copy = _copy_call(trainable.numel, trainable.params[0].dtype, device)
        copy(0)
        yardsticks.append(copy)
    times, after = [], [[] for _ in yardsticks]  # after[k][i]: yardstick k timed right after call i
    for step in range(2, repeats + 2):
        for fn, into in [(call, times), *zip(yardsticks, after)]:
            t0 = time.perf_counter()
            fn(step)
            sync()
            into.append(time.perf_counter() - t0)
    out["seconds"], out["times"] = statistics.median(times), times
    if variant in ("mezo", "backprop", "reference"):
        out["forward_seconds"] = statistics.median(after[0])
        out["forward_times"] = after[0]  # each right after the call of the same index in "times"
        out["copy_times"] = after[1]  # each right after that forward
    if variant != "forward":
        out["copy_bytes"], out["copy_bytes_per_s"] = copy_bytes, copy_bytes / statistics.median(after[-1])
    return out


def _run_children(variants, model_spec, dtype, batch_size, seq_len, repeats, device, compile_setting,
                  adapter="none", quantization="none", progress=True, distribution="gaussian") -> dict:
    """Each variant in its own subprocess; returns {variant: its result}."""
    results = {}
    for variant in variants:
        if progress:
            print(f"[bench] {model_spec} {batch_size}x{seq_len} {variant} ...", file=sys.stderr, flush=True)
        cmd = [sys.executable, "-m", "mezo_tune.bench", variant, model_spec, dtype, str(batch_size), str(seq_len),
               str(repeats), device, compile_setting, adapter, quantization, distribution]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0:
            raise RuntimeError(f"bench variant {variant} failed:\n{proc.stderr[-3000:]}")
        results[variant] = json.loads(proc.stdout.strip().splitlines()[-1])
    return results


def in_forwards(result: dict) -> float:
    """A variant's time per call over the time of a forward measured in the same child, between its calls."""
    return result["seconds"] / result["forward_seconds"]


def weight_copy_seconds(result: dict) -> float:
    """The time to copy the trainable weights once (read + write of each), at the copy bandwidth measured in the
    variant's own process."""
    return result["bytes_moved"] / result["copy_bytes_per_s"]


def overhead_in_copies(result: dict) -> float:
    """What a step costs beyond its forwards, in copies of the trainable weights: the median over the calls of (the
    call's time - 2 x the forward timed right after it) / the weight copy timed right after that forward, all in one
    process: a CPU whose speed drifts (shared, virtual) disturbs each triple less than a ratio of medians. Results
    from before the copies were interleaved: the median of (call - 2 forwards) over the median copy. Replay (no
    forward): its step in copies. It does not depend on how fast the matmuls are, so it compares across machines
    (issue #16)."""
    if "copy_times" in result:  # each step against the forward and the copy timed right after it
        return statistics.median(_overheads_per_call(result))
    if "forward_times" in result:  # the median of paired differences: each step against the forward timed after it
        beyond = statistics.median(t - 2 * f for t, f in zip(result["times"], result["forward_times"]))
    else:
        beyond = result["seconds"] - 2 * result.get("forward_seconds", 0.0)
    return beyond / weight_copy_seconds(result)


def _overheads_per_call(result: dict) -> list[float]:
    """Each call's (time - 2 x the forward timed right after it) / the weight copy timed right after that forward."""
    scale = result["bytes_moved"] / result["copy_bytes"]  # the copy's bytes: those of the weights, up to 2**27
    return [(t - 2 * f) / (c * scale) for t, f, c in zip(result["times"], result["forward_times"], result["copy_times"])]


def overhead_quartiles(result: dict) -> tuple[float, float] | None:
    """The first and third quartiles of a step variant's per-call overheads in copies (overhead_in_copies is their
    median): how far the figure moves from call to call on this machine. None with fewer than two calls."""
    if "copy_times" not in result or len(result["times"]) < 2:
        return None
    q1, _, q3 = statistics.quantiles(_overheads_per_call(result), n=4)
    return q1, q3


def bench(model_spec: str, dtype: str = "float32", batch_size: int = 8, seq_len: int = 64, repeats: int = 5,
          device: str = "auto", compile_setting: str = "auto", progress: bool = True, adapter: str = "none",
          quantization: str = "none", distribution: str = "gaussian") -> dict:
    """Run every variant in its own subprocess; return times, peaks and ratios (one JSON-able dict)."""
    from . import models

    if not model_spec.startswith("config:"):
        models.resolve_source(model_spec, progress=progress)  # fetch/convert once, before the children start
    results = _run_children(VARIANTS, model_spec, dtype, batch_size, seq_len, repeats, device, compile_setting,
                            adapter, quantization, progress, distribution)
    f, m, b, r, rp = (results[v] for v in VARIANTS)
    replay_bytes_per_s = rp["bytes_moved"] / rp["seconds"]
    return {
        "model": model_spec, "dtype": dtype, "adapter": adapter, "quantization": quantization,
        "distribution": distribution, "batch_size": batch_size, "seq_len": seq_len, "repeats": repeats,
        "device": f["device"],
        "forward_s": f["seconds"], "mezo_step_s": m["seconds"], "backprop_step_s": b["seconds"],
        "reference_step_s": r["seconds"], "replay_step_s": rp["seconds"],
        "replay_bytes_moved": rp["bytes_moved"], "copy_bytes_per_s": rp["copy_bytes_per_s"],
        "forward_peak_bytes": f["peak_bytes"], "mezo_peak_bytes": m["peak_bytes"],
        "backprop_peak_bytes": b["peak_bytes"], "reference_peak_bytes": r["peak_bytes"],
        **{f"{v}_tensor_peak_bytes": results[v]["tensor_peak_bytes"] for v in VARIANTS[:4]},
        "ratios": {
            "mezo_over_forward": in_forwards(m),
            "backprop_over_mezo": in_forwards(b) / in_forwards(m),
            "reference_over_mezo": in_forwards(r) / in_forwards(m),
            "mezo_peak_over_forward_peak": m["peak_bytes"] / f["peak_bytes"],
            "backprop_peak_over_mezo_peak": b["peak_bytes"] / m["peak_bytes"],
            "mezo_tensor_peak_over_forward": m["tensor_peak_bytes"] / f["tensor_peak_bytes"],
            "backprop_tensor_peak_over_mezo": b["tensor_peak_bytes"] / m["tensor_peak_bytes"],
            "replay_bandwidth_fraction": replay_bytes_per_s / rp["copy_bytes_per_s"],
        },
        "forward_between_calls_s": {v: results[v]["forward_seconds"] for v in ("mezo", "backprop", "reference")},
        "weight_copy_s": {v: weight_copy_seconds(results[v]) for v in VARIANTS[1:]},
        "overhead_in_copies": {v: overhead_in_copies(results[v]) for v in VARIANTS[1:]},
        "overhead_quartiles": {v: overhead_quartiles(results[v]) for v in ("mezo", "backprop", "reference")},
        "times": {v: results[v]["times"] for v in VARIANTS},
        "forward_times": {v: results[v]["forward_times"] for v in ("mezo", "backprop", "reference")},
        "copy_times": {v: results[v]["copy_times"] for v in ("mezo", "backprop", "reference")},
        "copy_bytes": {v: results[v]["copy_bytes"] for v in VARIANTS[1:]},
    }


# ---- data parallel (torchrun) ----------------------------------------------------------------------------------------

def run_dp(model_spec: str, dtype: str, batch_size: int, seq_len: int, repeats: int, device: str,
           compile_setting: str = "auto") -> dict | None:
    """One rank of the data-parallel bench, under torchrun: MeZO steps on a global batch of batch_size rows, this
    rank scoring its shard, the losses reduced as train reduces them (distributed.global_losses). Every
    torch.distributed.all_reduce is counted (bytes of the tensors it is given). Rank 0 returns every rank's figures
    (the others None): the median step time, the peak resident set and the peak of live tensors."""
    import torch

    from . import distributed, models
    from .mezo import Mezo
    from .run import use_compile

    with distributed.process_group(device) as world:
        device = models.resolve_device(device)
        if device.startswith("cuda"):
            device = f"cuda:{torch.cuda.current_device()}"
        model, trainable, ids = _bench_model(model_spec, dtype, device, batch_size, seq_len)
        engine = Mezo(model, trainable, seed=0, eps=1e-3, use_compile=use_compile(compile_setting, device))
        engine.defer_updates = True  # as train runs it
        mine = distributed.shard(ids, world)
        reduced: list[int] = []
        if world.parallel:
            import torch.distributed as dist

            all_reduce = dist.all_reduce

            def counted(t, *args, **kwargs):
                reduced.append(t.numel() * t.element_size())
                return all_reduce(t, *args, **kwargs)

            dist.all_reduce = counted
            tokens = mine[:, 1:].numel()
            loss_fn = lambda: (float(_lm_loss(model, mine)) * tokens, float(tokens))  # noqa: E731 - (sum, count)
            reduce = distributed.global_losses
        else:
            loss_fn, reduce = (lambda: _lm_loss(model, ids)), None

        def call(step):
            engine.step(step, 1e-7, loss_fn, reduce=reduce)

        sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
        call(0)  # warm-up, then as run_variant: reset the peak, one untimed call
        sync()
        _reset_peak(device)
        call(1)
        sync()
        reduced.clear()
        times = []
        for step in range(2, repeats + 2):
            world.barrier()  # every rank starts the step together: a step's time includes waiting for the slowest
            t0 = time.perf_counter()
            call(step)
            sync()
            times.append(time.perf_counter() - t0)
        mine_out = {"rank": world.rank, "seconds": statistics.median(times), "times": times,
                    "peak_bytes": _peak_bytes(device), "reduced_bytes_per_step": sum(reduced) / repeats,
                    "rows": len(mine), "device": _device_name(device),
                    "params": sum(p.numel() for p in model.parameters())}
        if not device.startswith("cuda"):
            mine_out["tensor_peak_bytes"] = tensor_peak_bytes(call, repeats + 2)
        if not world.parallel:
            return {"ranks": [mine_out]}
        import torch.distributed as dist

        gathered = [None] * world.size
        dist.all_gather_object(gathered, mine_out)
        return {"ranks": gathered} if world.main else None


def bench_dp(model_spec: str, nprocs: list[int], dtype: str = "float32", batch_size: int = 8, seq_len: int = 64,
             repeats: int = 5, device: str = "auto", compile_setting: str = "auto", progress: bool = True) -> dict:
    """The data-parallel bench for each number of processes in nprocs: `torchrun --standalone --nproc-per-node N
    -m mezo_tune.bench dp ...` in a subprocess. Each rank takes OMP_NUM_THREADS threads (torchrun's default for N > 1
    is 1; set it for N = 1 too, to compare like with like)."""
    from . import models

    if not model_spec.startswith("config:"):
        models.resolve_source(model_spec, progress=progress)  # fetch/convert once, before the ranks start
    points = []
    for n in nprocs:
        if progress:
            print(f"[bench] {model_spec} {batch_size}x{seq_len} data parallel, {n} process{'es' if n > 1 else ''} ...",
                  file=sys.stderr, flush=True)
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={n}", "-m",
               "mezo_tune.bench", "dp", model_spec, dtype, str(batch_size), str(seq_len), str(repeats), device,
               compile_setting]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0:
            raise RuntimeError(f"data-parallel bench with {n} processes failed:\n{proc.stderr[-3000:]}")
        ranks = json.loads(proc.stdout.strip().splitlines()[-1])["ranks"]
        points.append({"nproc": n, "step_s": max(r["seconds"] for r in ranks), "ranks": ranks,
                       "reduced_bytes_per_step": ranks[0]["reduced_bytes_per_step"]})
    return {"model": model_spec, "dtype": dtype, "batch_size": batch_size, "seq_len": seq_len, "repeats": repeats,
            "device": points[0]["ranks"][0]["device"], "params": points[0]["ranks"][0]["params"],
            "omp_num_threads": os.environ.get("OMP_NUM_THREADS"), "points": points}


def format_bench_dp(res: dict) -> str:
    mib = 1 << 20
    lines = [f"{res['model']} {res['dtype']}, global batch {res['batch_size']} x {res['seq_len']} tokens, median of "
             f"{res['repeats']} MeZO steps, on {res['device']} per process",
             f"{'processes':>9} {'s/step':>8} {'rows/rank':>10} {'peak MiB per rank':>18} {'tensors MiB per rank':>21} "
             f"{'all-reduced B/step':>19}"]
    for p in res["points"]:
        ranks = p["ranks"]
        rows = ",".join(str(r["rows"]) for r in ranks)
        peak = ",".join(f"{r['peak_bytes'] / mib:.0f}" for r in ranks)
        tensors = ",".join(f"{r['tensor_peak_bytes'] / mib:.0f}" if "tensor_peak_bytes" in r else "-" for r in ranks)
        lines.append(f"{p['nproc']:>9} {p['step_s']:8.3f} {rows:>10} {peak:>18} {tensors:>21} "
                     f"{p['reduced_bytes_per_step']:>19.0f}")
    return "\n".join(lines)


def format_bench(res: dict) -> str:
    mib = 1 << 20
    rows = [(name, res[f"{v}_s" if v == "forward" else f"{v}_step_s"], res[f"{v}_peak_bytes"],
             res[f"{v}_tensor_peak_bytes"])
            for name, v in (("forward", "forward"), ("MeZO step (ours)", "mezo"), ("backprop + AdamW step", "backprop"),
                            ("reference MeZO step (paper code)", "reference"))]
    setup = "".join(f", {k} {res[k]}" for k in ("adapter", "quantization") if res.get(k, "none") != "none")
    if res.get("distribution", "gaussian") != "gaussian":
        setup += f", z {res['distribution']}"
    lines = [f"{res['model']} {res['dtype']}{setup}, batch {res['batch_size']} x {res['seq_len']} tokens, "
             f"median of {res['repeats']}, on {res['device']}",
             f"{'variant':34} {'s/call':>9} {'peak MiB':>10} {'tensors MiB':>12}"]
    lines += [f"{name:34} {s:9.3f} {peak / mib:10.0f} {tensors / mib:12.0f}" for name, s, peak, tensors in rows]
    r = res["ratios"]
    lines += ["",
              f"MeZO step / forward            {r['mezo_over_forward']:.2f} x",
              f"reference step / MeZO step     {r['reference_over_mezo']:.2f} x",
              f"backprop step / MeZO step      {r['backprop_over_mezo']:.2f} x",
              f"MeZO peak / forward peak       {r['mezo_peak_over_forward_peak']:.2f} x",
              f"backprop peak / MeZO peak      {r['backprop_peak_over_mezo_peak']:.2f} x",
              f"  live tensors only: MeZO / forward {r['mezo_tensor_peak_over_forward']:.2f} x, "
              f"backprop / MeZO {r['backprop_tensor_peak_over_mezo']:.2f} x",
              f"replay step: {res['replay_bytes_moved'] / 1e9:.2f} GB moved in {res['replay_step_s']:.3f} s = "
              f"{res['replay_bytes_moved'] / res['replay_step_s'] / 1e9:.1f} GB/s; "
              f"copy {res['copy_bytes_per_s'] / 1e9:.1f} GB/s -> "
              f"{r['replay_bandwidth_fraction']:.2f} of copy bandwidth"]
    if "overhead_in_copies" in res:
        o, c = res["overhead_in_copies"], res["weight_copy_s"]
        q = (res.get("overhead_quartiles") or {}).get("mezo")
        spread = f" (quartiles over the calls {q[0]:.1f}-{q[1]:.1f})" if q else ""
        lines.append(f"overhead in weight copies      MeZO {o['mezo']:.1f}{spread}, reference {o['reference']:.1f}, "
                     f"backprop {o['backprop']:.1f}, replay {o['replay']:.1f} (step - 2 forwards, over one copy of "
                     f"the trainable weights: {c['mezo'] * 1e3:.1f} ms in MeZO's process)")
    return "\n".join(lines)


def sweep(sizes=("256x4", "512x8", "768x12"), seq_lens=(64, 256), batch_size: int = 8, repeats: int = 3,
          dtype: str = "float32", device: str = "auto", compile_setting: str = "auto", out_dir: str = "bench-sweep",
          progress: bool = True) -> dict:
    """Forward, MeZO and backprop time and peak over model sizes x sequence lengths; writes sweep.json and
    sweep.png (when matplotlib is installed) under out_dir and returns the JSON."""
    from pathlib import Path

    points = []
    for size in sizes:
        for seq_len in seq_lens:
            res = _run_children(SWEEP_VARIANTS, f"config:{size}", dtype, batch_size, seq_len, repeats, device,
                                compile_setting, progress=progress)
            points.append({"size": size, "params": res["forward"]["params"], "seq_len": seq_len,
                           **{f"{v}_s": res[v]["seconds"] for v in SWEEP_VARIANTS},
                           "mezo_over_forward": in_forwards(res["mezo"]),
                           "backprop_over_mezo": in_forwards(res["backprop"]) / in_forwards(res["mezo"]),
                           **{f"{v}_peak_bytes": res[v]["peak_bytes"] for v in SWEEP_VARIANTS},
                           **{f"{v}_tensor_peak_bytes": res[v]["tensor_peak_bytes"] for v in SWEEP_VARIANTS}})
            device_name = res["forward"]["device"]
    out = {"device": device_name, "dtype": dtype, "batch_size": batch_size, "repeats": repeats, "points": points}
    path = Path(out_dir)
    path.mkdir(parents=True, exist_ok=True)
    (path / "sweep.json").write_text(json.dumps(out, indent=2) + "\n")
    try:
        plot_sweep(out, path / "sweep.png")
    except ImportError:
        print("[bench] matplotlib is not installed: no sweep.png", file=sys.stderr)
    return out


def plot_sweep(res: dict, png) -> None:
    """Step time and peak memory against parameter count, one line per (variant, sequence length)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_t, ax_m) = plt.subplots(1, 2, figsize=(11, 4.2))
    styles = {"forward": ("tab:gray", ":"), "mezo": ("tab:blue", "-"), "backprop": ("tab:red", "--")}
    for seq_len in sorted({p["seq_len"] for p in res["points"]}):
        pts = sorted((p for p in res["points"] if p["seq_len"] == seq_len), key=lambda p: p["params"])
        x = [p["params"] / 1e6 for p in pts]
        for v, (color, ls) in styles.items():
            label = f"{v}, {seq_len} tokens"
            marker = "o" if seq_len == min(q["seq_len"] for q in res["points"]) else "s"
            ax_t.plot(x, [p[f"{v}_s"] for p in pts], ls=ls, color=color, marker=marker, label=label)
            ax_m.plot(x, [p[f"{v}_tensor_peak_bytes"] / 2**20 for p in pts], ls=ls, color=color, marker=marker,
                      label=label)
    ax_t.set(xlabel="parameters (M)", ylabel="seconds per call", title="time: forward, MeZO step, backprop + AdamW")
    ax_m.set(xlabel="parameters (M)", ylabel="peak MiB of live tensors", title="peak memory")
    for ax in (ax_t, ax_m):
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.grid(True, which="both", alpha=0.3)
    ax_m.legend(fontsize=7)
    fig.suptitle(f"mezo-tune bench --sweep: {res['dtype']}, batch {res['batch_size']}, on {res['device']}")
    fig.tight_layout()
    fig.savefig(png, dpi=110)
    plt.close(fig)


def format_sweep(res: dict) -> str:
    lines = [f"{res['dtype']}, batch {res['batch_size']}, median of {res['repeats']}, on {res['device']}",
             f"{'model':>8} {'params':>8} {'tokens':>6} {'fwd s':>7} {'MeZO s':>7} {'BP s':>7} {'MeZO/fwd':>8} "
             f"{'BP/MeZO':>7} {'fwd MiB':>8} {'MeZO MiB':>8} {'BP MiB':>8}"]
    for p in res["points"]:
        mib = [p[f"{v}_tensor_peak_bytes"] / 2**20 for v in SWEEP_VARIANTS]  # live tensors
        lines.append(f"{p['size']:>8} {p['params'] / 1e6:7.1f}M {p['seq_len']:>6} {p['forward_s']:7.3f} "
                     f"{p['mezo_s']:7.3f} {p['backprop_s']:7.3f} {p['mezo_over_forward']:8.2f} "
                     f"{p['backprop_over_mezo']:7.2f} {mib[0]:8.0f} {mib[1]:8.0f} {mib[2]:8.0f}")
    return "\n".join(lines)


if __name__ == "__main__":  # a bench child: python -m mezo_tune.bench VARIANT MODEL DTYPE B L REPEATS DEVICE COMPILE
    v, spec, dt, b, l, rep, dev, comp = sys.argv[1:9]
    if v == "dp":  # a rank of the data-parallel bench, under torchrun; rank 0 prints every rank's figures
        res = run_dp(spec, dt, int(b), int(l), int(rep), dev, comp)
        if res is not None:
            print(json.dumps(res))
        sys.exit(0)
    adapter_type, quant, dist = (sys.argv[9:12] + ["none", "none", "gaussian"][len(sys.argv[9:12]):])[:3]
    print(json.dumps(run_variant(v, spec, dt, int(b), int(l), int(rep), dev, comp, adapter_type, quant, dist)))
