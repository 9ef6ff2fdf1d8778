"""`train --dry-run`: the resolved recipe, the trainable set's size and a peak-memory estimate, without loading
weights (the model is built on the meta device from its config).

Estimate of MeZO's peak (the forward pass dominates; MeZO adds perturbed copies of a few tensors at a time):
    weights                      n_params x bytes(dtype)
    + perturbed copies           the small tensors' (modules whose trainable tensors have at most Mezo.SMALL_TENSOR
                                 elements each, up to Mezo.EARLY_ELEMENTS in all: norms, biases, adapters), alive for
                                 the whole forward, + the largest other module's trainable bytes (the scratch copy)
    + the larger of (no autograd: a layer's transients are freed before the logits exist)
        logits                   batch x positions x vocab x (bytes(dtype) + 8)   (fp32 copy + log-softmax; fp32
                                 logits need no copy: 8 bytes)
        activations              batch x seq x (4 x hidden + 2 x intermediate) x bytes(dtype)   (one layer's
                                 transients: residual, normed input, attention output, two MLP intermediates)
    + adam moments               2 x trainable x 4 bytes (m and v in fp32; only with mezo.adam = true)
Positions is seq for "lm" and 1 per row for single-token classification. The process's own runtime (the torch and
transformers libraries, ~0.4 GB resident on CPU) is not included.

Quantized bases (bitsandbytes) store the linear layers of the decoder (not the LM head) in 1 byte (8bit, plus an fp32
scale per row) or 0.5 byte (4bit NF4, plus an fp32 absmax per 64 weights) per weight, and dequantize one layer's weight
at a time into the compute dtype. Adapter runs (peft, built on the meta device too) add the adapter tensors in fp32;
the perturbed copies are then the adapter modules', in fp32.

`measure_step_peak_bytes` measures the same quantity (live tensor bytes: the weights plus the peak of the tensors
alive at once during one MeZO step, tracked op by op): tests/test_adapters.py checks the estimate against it (within
25% on a tiny Llama: full weights, LoRA, 4-bit + LoRA, prefix).
"""

from __future__ import annotations

from collections import Counter

from .recipe import Recipe, recipe_to_toml

_BYTES = {"float32": 4, "float16": 2, "bfloat16": 2}


def meta_model(model_cfg, adapter_cfg=None):
    """The model built on the meta device (no weights read), or None where that needs a download/conversion.
    With an [adapter] of type lora/prefix, the peft model over it (adapter tensors on the meta device too)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from . import models

    spec = model_cfg.path
    if spec.startswith("embedded:"):
        cached = models.cache_dir() / "models" / spec.split(":", 1)[1]
        if not (cached / "config.json").exists():
            return None
        load_path = str(cached)
    else:
        load_path = models.resolve_source(spec, model_cfg.revision, progress=False).load_path
    remote_code = models.remote_code_kw(getattr(model_cfg, "trust_remote_code", False))
    config = AutoConfig.from_pretrained(load_path, revision=model_cfg.revision, **remote_code)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=models.torch_dtype(model_cfg.dtype), **remote_code)
    if adapter_cfg is not None and adapter_cfg.type != "none":
        from .adapters import attach

        model.requires_grad_(False)
        model = attach(model, adapter_cfg, seed=0, init=False)
    return model


def _quantized_linears(model) -> list:
    """The weights bitsandbytes quantizes: every Linear / Conv1D weight except the output embedding's."""
    import torch

    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    out_emb = base.get_output_embeddings()
    skip = {id(out_emb.weight)} if out_emb is not None else set()
    weights = {}  # by identity: a LoRA wrapper's `weight` is its base layer's
    for mod_name, m in base.named_modules():
        if type(m).__name__ in ("Linear", "Conv1D") and isinstance(getattr(m, "weight", None), torch.Tensor) \
                and id(m.weight) not in skip and not any(k in mod_name for k in ("lora_", "prompt_encoder")):
            weights[id(m.weight)] = m.weight
    return list(weights.values())


def estimate_peak_bytes(model, recipe: Recipe) -> dict:
    from .mezo import Mezo, trainable_set

    b = _BYTES[recipe.model.dtype]
    adapter = recipe.adapter.type != "none"
    trainable = trainable_set(model, recipe.model.freeze, adapter=adapter)
    train_ids = {id(p) for p in trainable.params}
    n_params = sum(p.numel() for p in model.parameters())
    early, early_elements = 0, 0  # perturbed copies: as Mezo._hooked_by picks them
    parent_of = {id(c): p for p in model.modules() for c in p.children()}
    together = Counter()  # the others, alive together: a module's, or its family's (its parent's children's)
    for m in model.modules():
        own = [p for p in m.parameters(recurse=False) if id(p) in train_ids]
        size, nbytes = sum(p.numel() for p in own), sum(p.numel() * p.element_size() for p in own)
        if own and max(p.numel() for p in own) <= Mezo.SMALL_TENSOR and early_elements + size <= Mezo.EARLY_ELEMENTS:
            early, early_elements = early + nbytes, early_elements + size
        elif own:
            together[id(parent_of.get(id(m), m))] += nbytes
    largest = max(together.values(), default=0)
    quantization = getattr(recipe.model, "quantization", "none")
    quantized = _quantized_linears(model) if quantization != "none" else []
    q_numel = sum(w.numel() for w in quantized)
    per_weight = {"none": b, "8bit": 1 + 4 / max(w.shape[-1] for w in quantized) if quantized else 1,
                  "4bit": 0.5 + 4 / 64}[quantization]
    weights = sum(p.numel() * (4 if id(p) in train_ids and adapter else b) for p in model.parameters())
    weights += int(q_numel * (per_weight - b))
    cfg = model.config
    batch, seq = recipe.mezo.batch_size, recipe.data.max_length
    positions = 1 if recipe.task.type == "classification" else seq  # other tasks score logits at every position
    hidden = getattr(cfg, "hidden_size", None) or getattr(cfg, "n_embd", 0)
    intermediate = (getattr(cfg, "intermediate_size", None) or getattr(cfg, "ffn_dim", None)
                    or getattr(cfg, "n_inner", None) or 4 * hidden)
    parts = {
        "weights": weights,
        "perturbed_copy": early + largest,
        "logits": batch * positions * cfg.vocab_size * (b + 4 if b == 4 else b + 8),
        "activations": batch * seq * (4 * hidden + 2 * intermediate) * b,
    }
    if quantized:
        parts["dequantized"] = max(w.numel() for w in quantized) * b  # one layer's weight in the compute dtype
    if getattr(recipe.mezo, "adam", False):
        parts["adam_moments"] = 2 * trainable.numel * 4  # m and v, fp32 per trainable element, for the whole run
    peak = sum(parts.values()) - min(parts["logits"], parts["activations"])
    return {"trainable_params": trainable.numel, "trainable_tensors": len(trainable.names), "params": n_params,
            "parts": parts, "peak_bytes": peak}


def dry_run_report(recipe: Recipe) -> str:
    lines = ["# resolved recipe", recipe_to_toml(recipe).rstrip(), ""]
    model = meta_model(recipe.model, recipe.adapter)
    if model is None:
        lines.append(f"{recipe.model.path} is not converted yet: run once without --dry-run (or `mezo-tune bench`) "
                     "to fetch it; no estimate until then.")
        return "\n".join(lines)
    est = estimate_peak_bytes(model, recipe)
    gib = 1 << 30
    kind = "" if recipe.adapter.type == "none" else f"{recipe.adapter.type} adapter in float32; "
    lines.append(f"trainable: {est['trainable_params']:,} parameters in {est['trainable_tensors']} tensors "
                 f"({kind}model: {est['params']:,})")
    lines.append(f"directions: {_directions_line(recipe, est['trainable_tensors'])}")
    quant = "" if recipe.model.quantization == "none" else f", {recipe.model.quantization} base"
    lines.append(f"estimated peak memory: {est['peak_bytes'] / gib:.2f} GiB "
                 f"(batch {recipe.mezo.batch_size} x {recipe.data.max_length} tokens, {recipe.model.dtype}{quant})")
    off_peak = min(("logits", "activations"), key=lambda k: est["parts"][k])
    for name, v in est["parts"].items():
        lines.append(f"  {name:15} {v / gib:7.3f} GiB" + ("  (freed before the peak)" if name == off_peak else ""))
    return "\n".join(lines)


def _directions_line(recipe: Recipe, n_tensors: int) -> str:
    from .directions import Directions

    try:
        return Directions.from_recipe(recipe.mezo).resolved(n_tensors).describe()
    except ValueError as e:
        return f"{e} (train will refuse it)"


def measure_step_peak_bytes(recipe: Recipe) -> int:
    """Live tensor bytes at the peak of one MeZO step (the recipe's first batch): the model's parameters and buffers
    plus the largest total of tensor storages alive at once during the step, tracked op by op (a TorchDispatchMode
    that counts every new storage an op returns until it is freed). Loads the model: for tests and calibration, not
    for --dry-run."""
    import weakref

    import torch
    from torch.utils._python_dispatch import TorchDispatchMode
    from torch.utils._pytree import tree_flatten

    from .data import batch_indices
    from .run import build_run

    run = build_run(recipe, progress=False)
    held = {}
    for t in list(run.model.parameters()) + list(run.model.buffers()):
        held[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()

    class LiveBytes(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.live, self.now, self.peak = {}, 0, 0

        def _free(self, ptr):
            self.now -= self.live.pop(ptr, 0)

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            for t in tree_flatten(out)[0]:
                if isinstance(t, torch.Tensor) and t.device.type != "meta":
                    st = t.untyped_storage()
                    ptr = st.data_ptr()
                    if ptr and ptr not in self.live and ptr not in held:
                        self.live[ptr] = st.nbytes()
                        self.now += st.nbytes()
                        self.peak = max(self.peak, self.now)
                        weakref.finalize(st, self._free, ptr)
            return out

    rows = [run.train_rows[i] for i in batch_indices(len(run.train_rows), recipe.mezo.batch_size, recipe.mezo.seed, 0)]
    run.engine.step(0, 0.0, lambda: run.task.loss(run.model, rows))  # warm-up (lazy buffers, caches)
    with LiveBytes() as mode:
        run.engine.step(1, 0.0, lambda: run.task.loss(run.model, rows))
    return sum(held.values()) + mode.peak


# ---- does it fit? (train: a warning at start-up on CPU, advice after a CUDA out-of-memory error) -------------------

GIB = 1 << 30


def available_memory_bytes() -> int | None:
    """What the kernel can hand out now without swapping: MemAvailable of /proc/meminfo, else psutil's `available`;
    None where neither can be read."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    try:
        import psutil

        return int(psutil.virtual_memory().available)
    except Exception:  # psutil missing or unsupported here
        return None


def variants(recipe: Recipe, cuda: bool) -> list[tuple[str, int]]:
    """(change, estimated peak bytes) of the configurations nearest to the recipe that need less memory, nearest first:
    mezo.batch_size halved down to 1, the update rule without Adam's moments (if adam), a LoRA adapter (if none), and on
    CUDA a 4bit base with LoRA (if unquantized).
    Empty where the model cannot be built on the meta device (not converted yet)."""
    from .recipe import AdapterConfig

    model = meta_model(recipe.model, recipe.adapter)
    if model is None:
        return []
    found = []
    bs = recipe.mezo.batch_size // 2
    while bs >= 1:
        smaller = recipe.model_copy(update={"mezo": recipe.mezo.model_copy(update={"batch_size": bs})})
        found.append((f"mezo.batch_size = {bs}", estimate_peak_bytes(model, smaller)["peak_bytes"]))
        bs //= 2
    if getattr(recipe.mezo, "adam", False):
        plain = recipe.model_copy(update={"mezo": recipe.mezo.model_copy(update={"adam": False})})
        found.append(("mezo.adam = false", estimate_peak_bytes(model, plain)["peak_bytes"]))
    lora = AdapterConfig(type="lora")
    if recipe.adapter.type == "none":
        with_lora = recipe.model_copy(update={"adapter": lora})
        found.append(('adapter.type = "lora"',
                      estimate_peak_bytes(meta_model(recipe.model, lora), with_lora)["peak_bytes"]))
    if cuda and recipe.model.quantization == "none":
        adapter = recipe.adapter if recipe.adapter.type != "none" else lora
        q4 = recipe.model_copy(update={"model": recipe.model.model_copy(update={"quantization": "4bit"}),
                                       "adapter": adapter})
        change = 'model.quantization = "4bit"' + (' with adapter.type = "lora"' if adapter is lora else "")
        found.append((change, estimate_peak_bytes(meta_model(q4.model, adapter), q4)["peak_bytes"]))
    return found


def fit_advice(candidates: list[tuple[str, int]], available: int) -> str:
    """What to change so that the run fits in `available` bytes: the largest batch size that fits and each other
    change that fits, with their estimates (from `variants`)."""
    fits = [(change, peak) for change, peak in candidates if peak <= available]
    batch = [c for c in fits if c[0].startswith("mezo.batch_size")][:1]
    chosen = batch + [c for c in fits if not c[0].startswith("mezo.batch_size")]
    if not chosen:
        tried = ", ".join(change for change, _ in candidates) or "no smaller configuration could be estimated"
        return (f"No nearby configuration is estimated to fit ({tried}): use a smaller model or a machine with "
                f"more memory.")
    return "Estimated to fit: " + "; ".join(f"{change} ({peak / GIB:.2f} GiB)" for change, peak in chosen) + "."


def memory_warning(peak: int, available: int, candidates: list[tuple[str, int]]) -> str | None:
    """The start-up warning of a CPU run whose estimated peak exceeds the memory available now; None if it fits."""
    if peak <= available:
        return None
    return (f"warning: this run's estimated peak memory, {peak / GIB:.2f} GiB (`mezo-tune train --dry-run` shows its "
            f"parts), exceeds the memory available now, {available / GIB:.2f} GiB: it may swap or be killed. "
            + fit_advice(candidates, available) + " Or free memory and start again.")


def oom_message(step: int, device: str, capacity: int, peak: int | None, candidates: list[tuple[str, int]],
                traj_path) -> str:
    """Why a CUDA run stopped with an out-of-memory error in `step`, and the nearest configurations that fit."""
    est = (f"; this recipe's estimated peak is {peak / GIB:.2f} GiB, `mezo-tune train --dry-run` shows its parts"
           if peak is not None else "")
    return (f"step {step}: out of memory on {device} ({capacity / GIB:.2f} GiB{est}). "
            + fit_advice(candidates, capacity)
            + f" These change the run, so start a new one with the change (another output.dir); {traj_path} keeps "
              f"the steps before {step}.")


def startup_memory_warning(recipe: Recipe) -> str | None:
    """train's check before loading a CPU model: the warning of `memory_warning`, or None (fits, or cannot tell)."""
    available = available_memory_bytes()
    if available is None:
        return None
    try:
        model = meta_model(recipe.model, recipe.adapter)
        if model is None:
            return None
        peak = estimate_peak_bytes(model, recipe)["peak_bytes"]
        return memory_warning(peak, available, variants(recipe, cuda=False) if peak > available else [])
    except Exception:  # noqa: BLE001 - advice only: a model the estimator cannot build is loaded and trained as before
        return None


def cuda_oom_message(recipe: Recipe, step: int, device: str, traj_path) -> str:
    """oom_message for this recipe on this CUDA device (its total memory as the capacity)."""
    import torch

    capacity = torch.cuda.mem_get_info(torch.device(device))[1]
    try:
        model = meta_model(recipe.model, recipe.adapter)
        peak = estimate_peak_bytes(model, recipe)["peak_bytes"] if model is not None else None
        candidates = variants(recipe, cuda=True)
    except Exception:  # noqa: BLE001 - the out-of-memory message goes out even where the estimator fails
        peak, candidates = None, []
    return oom_message(step, device, capacity, peak, candidates, traj_path)
