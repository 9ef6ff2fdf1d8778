"""Adapters through peft (LoRA, prefix tuning): attaching them, rebuilding their initial values, exporting them.

MeZO on an adapter run trains only the adapter tensors (contract 1); the base weights (fp16/bf16, or 8-/4-bit
through bitsandbytes) are never written. peft keeps adapter tensors in fp32 over a low-precision base
(`autocast_adapter_dtype`, LoRA; prefix tuning's embedding is created in fp32).

Initial values, scheme "zrng-v1" (contract 5): peft initialises adapters from torch's global RNG, which is not
portable, so every adapter tensor is overwritten from the run's counter-based generator, on its own stream
(INIT_STREAM, step 0: it never collides with z of any step, stream 0, or stochastic rounding, stream 1):
  LoRA A   uniform on (-b, b), b = fp32(1/sqrt(fan_in)): the bound of peft's kaiming_uniform(a=sqrt(5)). Element i is
           u·b with u = (2·(h >> 8) - (2**24 - 1)) / 2**24 (h: the 32 bits of zrng at i), a symmetric 24-bit dyadic
           number; u·b is exact in fp64 and rounded once to the tensor's dtype.
  LoRA B   zeros (as peft): the model starts as the base model exactly.
  prefix   zrng's Gaussian (Irwin-Hall, variance 65535/65536, values k/256), in place of peft's N(0, 1).
Every value is thus a function of (seed, tensor name, index) alone, the same on every device, and replay rebuilds it
from the trajectory header.

Initial values, scheme "activations-v1" (prefix tuning, `[adapter] init = "activations"`; Li & Liang 2021, used by the
MeZO paper): the virtual tokens start as the keys and values the base model computes for real tokens — those of
`init_text`, or num_virtual_tokens tokens drawn from the vocabulary by zrng (INIT_STREAM, name "prefix_init_tokens") —
so the model starts as if its prompt began with those tokens. A forward's last bits depend on the device and its
kernels, so these values are stored in the trajectory header (tokens x layers x 2 x kv width fp32 numbers: 225 KiB
for SmolLM2-135M's 5 tokens) and replay and resume copy them from there instead of computing them again.
"""

from __future__ import annotations

import base64
import json
import math

import numpy as np
import torch

from . import zrng

INIT_SCHEME = "zrng-v1"
INIT_ACTIVATIONS = "activations-v1"
INIT_STREAM = 2  # zrng streams: 0 = z, 1 = stochastic rounding, 2 = adapter initial values
ADAPTER_TYPES = ("lora", "prefix")


class AdapterError(Exception):
    """An adapter that cannot be attached, rebuilt or exported, said for people."""


def peft_config(adapter_cfg):
    """The peft config for a recipe's [adapter] section (type lora or prefix)."""
    from peft import LoraConfig, PrefixTuningConfig

    if adapter_cfg.type == "lora":
        targets = None if adapter_cfg.target_modules == "auto" else list(adapter_cfg.target_modules)
        return LoraConfig(r=adapter_cfg.r, lora_alpha=adapter_cfg.alpha, lora_dropout=adapter_cfg.dropout,
                          target_modules=targets, task_type="CAUSAL_LM")
    if adapter_cfg.type == "prefix":
        return PrefixTuningConfig(num_virtual_tokens=adapter_cfg.num_virtual_tokens, task_type="CAUSAL_LM")
    raise AdapterError(f"unknown adapter type {adapter_cfg.type!r}: choose one of {', '.join(ADAPTER_TYPES)}")


def attach(model, adapter_cfg, seed: int, init: bool = True):
    """The peft model over `model` (in eval mode: LoRA dropout is inert), adapter values rebuilt from zrng."""
    from peft import get_peft_model

    try:
        peft_model = get_peft_model(model, peft_config(adapter_cfg), autocast_adapter_dtype=True)
    except ValueError as e:  # e.g. target modules that the model does not have
        raise AdapterError(f"[adapter] cannot attach a {adapter_cfg.type} adapter to this model: {e}") from None
    peft_model.eval()
    if init:
        init_adapter(peft_model, adapter_cfg.type, seed)
    return peft_model


def detach(model):
    """`model` as it was before `attach` (in place; returned too): peft injected LoRA layers into it, each wrapping
    the layer it replaced, and each is swapped back for that layer, as peft's `unload()` does without merging; peft's
    config attribute goes. Prefix tuning injected nothing (its PeftModel only wraps the model). The base weights are
    never written by an adapter run, so they come back as they were (sweep checks their digests)."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    for name, module in list(model.named_modules()):
        if isinstance(module, BaseTunerLayer):
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent), child, module.get_base_layer())
    if hasattr(model, "peft_config"):
        del model.peft_config
    return model


def adapter_params(peft_model):
    """(name, parameter) of the adapter tensors (what peft marks trainable), in named_parameters order."""
    return [(n, p) for n, p in peft_model.named_parameters() if p.requires_grad]


def _uniform(seed: int, name: str, numel: int) -> torch.Tensor:
    """numel symmetric uniforms on (-1, 1), each an odd multiple of 2**-24, in fp64 (exact)."""
    h = zrng.bits_for(seed, 0, name, torch.arange(numel, dtype=torch.int64), stream=INIT_STREAM)
    return (2 * (h >> 8) - ((1 << 24) - 1)).to(torch.float64) * 2.0 ** -24


def initial_value(kind: str, seed: int, name: str, shape, dtype: torch.dtype) -> torch.Tensor:
    """The zrng-v1 initial value of one adapter tensor (on CPU)."""
    numel = math.prod(shape)
    if kind == "lora":
        if ".lora_A." in name:
            fan_in = shape[1] if len(shape) == 2 else math.prod(shape[1:])
            bound = float(np.float32(1.0 / math.sqrt(fan_in)))
            return (_uniform(seed, name, numel) * bound).to(dtype).view(shape)
        if ".lora_B." in name:
            return torch.zeros(shape, dtype=dtype)
    elif kind == "prefix":
        return zrng.z_for(seed, 0, name, numel, "gaussian", stream=INIT_STREAM, dtype=dtype).view(shape)
    raise AdapterError(f"no {INIT_SCHEME} initialisation for adapter tensor {name} ({kind}); "
                       "this peft adapter variant is not supported")


def init_adapter(peft_model, kind: str, seed: int) -> None:
    with torch.no_grad():
        for name, p in adapter_params(peft_model):
            p.copy_(initial_value(kind, seed, name, tuple(p.shape), p.dtype))


def config_dict(peft_model) -> dict:
    """The peft config as plain JSON data (sets as sorted lists, enums as their values)."""
    cfg = peft_model.peft_config["default"].to_dict()

    def plain(v):
        if isinstance(v, (set, frozenset)):
            return sorted(v)
        if isinstance(v, dict):
            return {k: plain(x) for k, x in v.items()}
        if isinstance(v, (list, tuple)):
            return [plain(x) for x in v]
        return v

    return json.loads(json.dumps(plain(cfg), default=str))


def header(peft_model, kind: str, seed: int, init: str = "zrng") -> dict:
    """The trajectory header's "adapter" entry. The config leaves out where the base was loaded from (a local cache
    path for an embedded model): the header's "base_model" says which base it is, by digest. With init =
    "activations", the initial values themselves (they came from a forward: see the module docstring)."""
    config = {k: v for k, v in config_dict(peft_model).items() if k not in ("base_model_name_or_path", "revision")}
    entry = {"type": kind, "config": config, "init": INIT_SCHEME, "init_seed": seed, "init_stream": INIT_STREAM}
    if init == "activations":
        entry["init"] = INIT_ACTIVATIONS
        entry["init_values"] = {name: _encode_tensor(p.detach()) for name, p in adapter_params(peft_model)}
    return entry


def _encode_tensor(t: torch.Tensor) -> dict:
    t = t.to("cpu").contiguous()
    raw = t.view(torch.uint8).reshape(-1).numpy().tobytes()
    return {"dtype": str(t.dtype).removeprefix("torch."), "shape": list(t.shape),
            "base64": base64.b64encode(raw).decode("ascii")}


def _decode_tensor(entry: dict) -> torch.Tensor:
    dtype = getattr(torch, entry["dtype"])
    raw = bytearray(base64.b64decode(entry["base64"], validate=True))
    return torch.frombuffer(raw, dtype=torch.uint8).view(dtype).reshape(entry["shape"])


def restore_initial_values(peft_model, entry: dict) -> None:
    """Copy the initial values an "activations-v1" header stores into the adapter tensors (replay and resume)."""
    stored = entry.get("init_values") or {}
    params = dict(adapter_params(peft_model))
    if sorted(stored) != sorted(params):
        raise AdapterError(f"the trajectory stores initial values for {', '.join(sorted(stored)) or 'nothing'}, but "
                           f"the adapter has {', '.join(sorted(params))}")
    with torch.no_grad():
        for name, p in params.items():
            value = _decode_tensor(stored[name])
            if value.shape != p.shape or value.dtype != p.dtype:
                raise AdapterError(f"the stored initial value of {name} is {value.dtype} {list(value.shape)}; the "
                                   f"adapter tensor is {p.dtype} {list(p.shape)}")
            p.copy_(value)


def prefix_init_tokens(tokenizer, text: str, seed: int, n: int) -> list[int]:
    """The real tokens whose activations start the prefix: the first n tokens of `text`, or with no text n token ids
    drawn from the vocabulary by zrng (a function of the seed alone)."""
    if text:
        ids = list(tokenizer(text, add_special_tokens=False).input_ids)
        if len(ids) < n:
            raise AdapterError(f"[adapter] init_text is {len(ids)} tokens; the prefix has num_virtual_tokens = {n}: "
                               f"give a longer text, or fewer virtual tokens")
        return ids[:n]
    h = zrng.bits_for(seed, 0, "prefix_init_tokens", torch.arange(n, dtype=torch.int64), stream=INIT_STREAM)
    return [int(v) % len(tokenizer) for v in h]


def init_prefix_from_activations(peft_model, token_ids: list[int]) -> None:
    """Set the prefix (peft's embedding of num_virtual_tokens x (layers·2·kv heads·head dim)) to the keys and values
    the base model computes for token_ids at positions 0 .. n-1: peft's get_prompt views the embedding as (tokens,
    layers·2, heads, head dim), key of layer l at 2l, value at 2l + 1."""
    (name, weight), = adapter_params(peft_model)
    base = peft_model.get_base_model()
    ids = torch.tensor([token_ids], dtype=torch.long, device=weight.device)
    with torch.no_grad():
        out = base(input_ids=ids, use_cache=True)
        cache = getattr(out, "cache", None) or out.past_key_values
        kv = [t for layer in cache.layers for t in (layer.keys, layer.values)]  # each (1, heads, tokens, head dim)
        stacked = torch.stack([t[0] for t in kv])  # (layers·2, heads, tokens, head dim)
        value = stacked.permute(2, 0, 1, 3).reshape(len(token_ids), -1)
        if value.shape != weight.shape:
            raise AdapterError(f"the base model's keys/values for the prefix are {list(value.shape)}; peft's prefix "
                               f"{name} is {list(weight.shape)}: this model's attention layout is not supported by "
                               f'init = "activations"')
        weight.copy_(value.to(weight.dtype))


def is_adapter_dir(path) -> bool:
    from pathlib import Path

    return (Path(path) / "adapter_config.json").is_file()


def load_adapter_dir(base_model, adapter_dir):
    """A saved PEFT adapter directory over base_model, in eval mode."""
    from peft import PeftModel

    return PeftModel.from_pretrained(base_model, str(adapter_dir)).eval()


def merged(peft_model, quantization: str | None):
    """The base model with the adapter merged into its weights (unquantized bases only)."""
    if quantization and quantization != "none":
        raise AdapterError(f"--merge needs an unquantized base; this run's base is {quantization}. Write the adapter "
                           "directory instead (replay --out without --merge) and load it over the base with peft, "
                           "or train over an unquantized base (model.quantization = \"none\")")
    if peft_model.peft_config["default"].peft_type != "LORA":
        raise AdapterError("--merge works for LoRA adapters only (prefix tuning adds virtual tokens, it changes no "
                           "weight); write the adapter directory instead (replay --out without --merge)")
    return peft_model.merge_and_unload()
