"""`train --dry-run`: the resolved recipe, the trainable set's size and a peak-memory estimate, without loading
weights (the model is built on the meta device from its config).

Estimate of MeZO's peak (the forward pass dominates; MeZO adds one module's perturbed copy):
    weights                      n_params x bytes(dtype)
    + largest perturbed module   max over modules of its trainable bytes (the scratch copy)
    + logits                     batch x positions x vocab x (bytes(dtype) + 8)   (fp32 copy + log-softmax)
    + activations                batch x seq x hidden x 16 x 4 bytes               (one layer's transients)
Positions is seq for "lm" and 1 per row for single-token classification. The process's own runtime (the torch and
transformers libraries, ~0.4 GB resident on CPU) is not included.
"""

from __future__ import annotations

from .recipe import Recipe, recipe_to_toml

_BYTES = {"float32": 4, "float16": 2, "bfloat16": 2}


def meta_model(model_cfg):
    """The model built on the meta device (no weights read), or None where that needs a download/conversion."""
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
    config = AutoConfig.from_pretrained(load_path, revision=model_cfg.revision)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=models.torch_dtype(model_cfg.dtype))
    return model


def estimate_peak_bytes(model, recipe: Recipe) -> dict:
    from .mezo import trainable_set

    b = _BYTES[recipe.model.dtype]
    trainable = trainable_set(model, recipe.model.freeze)
    train_ids = {id(p) for p in trainable.params}
    n_params = sum(p.numel() for p in model.parameters())
    largest = max((sum(p.numel() for p in m.parameters(recurse=False) if id(p) in train_ids)
                   for m in model.modules()), default=0)
    cfg = model.config
    batch, seq = recipe.mezo.batch_size, recipe.data.max_length
    positions = seq if recipe.task.type == "lm" else 1
    hidden = getattr(cfg, "hidden_size", None) or getattr(cfg, "n_embd", 0)
    parts = {
        "weights": n_params * b,
        "perturbed_copy": largest * b,
        "logits": batch * positions * cfg.vocab_size * (b + 8),
        "activations": batch * seq * hidden * 16 * 4,
    }
    return {"trainable_params": trainable.numel, "trainable_tensors": len(trainable.names), "params": n_params,
            "parts": parts, "peak_bytes": sum(parts.values())}


def dry_run_report(recipe: Recipe) -> str:
    lines = ["# resolved recipe", recipe_to_toml(recipe).rstrip(), ""]
    model = meta_model(recipe.model)
    if model is None:
        lines.append(f"{recipe.model.path} is not converted yet: run once without --dry-run (or `mezo-tune bench`) "
                     "to fetch it; no estimate until then.")
        return "\n".join(lines)
    est = estimate_peak_bytes(model, recipe)
    gib = 1 << 30
    lines.append(f"trainable: {est['trainable_params']:,} parameters in {est['trainable_tensors']} tensors "
                 f"(model: {est['params']:,})")
    lines.append(f"estimated peak memory: {est['peak_bytes'] / gib:.2f} GiB "
                 f"(batch {recipe.mezo.batch_size} x {recipe.data.max_length} tokens, {recipe.model.dtype})")
    for name, v in est["parts"].items():
        lines.append(f"  {name:15} {v / gib:7.3f} GiB")
    return "\n".join(lines)
