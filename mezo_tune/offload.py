"""Models larger than memory: accelerate's big-model inference (`device_map`, `max_memory`, offload to CPU RAM or
disk), made trainable by MeZO.

accelerate keeps an offloaded module's parameters on the `meta` device between forwards; its AlignDevicesHook loads
them from a weights map just before the module runs (onto the execution device) and drops them right after. MeZO
needs two more things, and this module gives them without changing accelerate's hooks:

- a writable store. transformers maps disk-offloaded weights straight onto the model's own safetensors files, which
  must never be written. `make_store` copies them once, at load, into accelerate's own offload format (one `.dat`
  memmap per tensor + index.json) in a fresh scratch folder, and hands accelerate's weights map the writable memmaps;
  weights offloaded to CPU RAM are already plain CPU tensors. `stored_tensors` names the store's tensor of every
  offloaded parameter: the trainable set holds those, so the update θ ← R(θ - c·z), digests and checkpoints run on
  the stored weights where they live (CPU RAM or the memmapped file), with the same kernels as in memory.
- perturbation after loading. `LoadedWeightsHook` is chained after accelerate's hook (SequentialHook order): while
  `Mezo.perturbed` is active it points the just-loaded parameters at θ ± εz formed into scratch buffers, on the
  execution device, and gives the buffers back after accelerate has dropped the weights again. The store is never
  written by a forward (contract 3).

The store is scratch: it is rebuilt from the base model at every load and removed when the process exits. What a run
keeps is its trajectory and final/, as always.
"""

from __future__ import annotations

import atexit
import os
import shutil
import tempfile

import torch
from accelerate.hooks import ModelHook, SequentialHook

STORE_PREFIX = "mezo-tune-offload-"


class OffloadError(Exception):
    """An offloaded model MeZO cannot train correctly, said for people."""


def _align_hook(module):
    """accelerate's AlignDevicesHook on this module (alone or first in a SequentialHook chain), or None."""
    hook = getattr(module, "_hf_hook", None)
    for h in getattr(hook, "hooks", (hook,)):
        if type(h).__name__ == "AlignDevicesHook":
            return h
    return None


def offloading_hook(module):
    """The AlignDevicesHook that loads this module's own weights for each forward (offload=True), or None."""
    hook = _align_hook(module)
    return hook if hook is not None and hook.offload and not hook.place_submodules else None


def is_offloaded(model) -> bool:
    return any(offloading_hook(m) is not None for m in model.modules())


def stored_tensors(model) -> dict[str, torch.Tensor]:
    """full parameter name -> the tensor its weights are stored in, for every parameter accelerate offloaded."""
    out = {}
    for name, module in model.named_modules():
        hook = offloading_hook(module)
        if hook is None:
            continue
        for local in module._parameters:
            if module._parameters[local] is not None:
                out[f"{name}.{local}" if name else local] = hook.weights_map[local]
    return out


def scratch_folder(offload_dir: str | None) -> str:
    """A new folder for one loaded model's offload store, inside `offload_dir` (the system's temporary folder when
    empty), removed when the process exits: two runs never share a store."""
    if offload_dir:
        os.makedirs(offload_dir, exist_ok=True)
    folder = tempfile.mkdtemp(prefix=STORE_PREFIX, dir=offload_dir or None)
    atexit.register(shutil.rmtree, folder, ignore_errors=True)
    return folder


def make_store(model, folder: str) -> None:
    """Point every disk-offloaded weight of a dispatched model at a writable memmap in `folder` (scratch_folder),
    filled from the weights accelerate would have read (the model's own files, never written).

    Tied weights keep one stored tensor: two names that accelerate reads from the same file entry share a memmap."""
    from accelerate.utils import offload_weight, save_offload_index

    loaders = {id(h.weights_map.dataset): h.weights_map.dataset
               for m in model.modules() if (h := offloading_hook(m)) is not None}
    on_disk = [(loader, name) for loader in loaders.values() for name in loader.index if name not in loader.state_dict]
    index: dict = {}
    by_source: dict = {}
    for loader, name in on_disk:
        info = loader.index[name]
        source = (info.get("safetensors_file"), info.get("weight_name", name)) if "safetensors_file" in info else None
        if source is None or source not in by_source:
            offload_weight(loader[name], name, folder, index)
            if source is not None:
                by_source[source] = name
        loader.state_dict[name] = _writable(folder, by_source.get(source, name), index)
    save_offload_index(index, folder)


def _writable(folder: str, name: str, index: dict) -> torch.Tensor:
    """The stored tensor `name` of an accelerate offload folder as a CPU tensor over a shared, writable memmap:
    what the update writes reaches the file (the page cache), and accelerate's next load reads it."""
    import numpy as np

    info = index[name]
    np_dtype = {"bfloat16": "int16"}.get(info["dtype"], info["dtype"])
    if info["dtype"].startswith("float8_"):
        raise OffloadError(f"{name} is stored as {info['dtype']}: MeZO does not train float8 weights")
    shape = tuple(info["shape"]) or (1,)
    array = np.memmap(os.path.join(folder, f"{name}.dat"), dtype=np_dtype, mode="r+", shape=shape)
    tensor = torch.from_numpy(array)
    if info["dtype"] == "bfloat16":
        tensor = tensor.view(torch.bfloat16)
    return tensor if info["shape"] else tensor.reshape(())


def check_ties(model) -> None:
    """Refuse a tied weight (e.g. embedding and LM head) that accelerate offloaded: between forwards each of its
    owners holds its own meta parameter, so the trainable set would count it twice and train two copies."""
    stored = stored_tensors(model)
    tied_names = getattr(model, "all_tied_weights_keys", None) or {}
    offloaded_ties = sorted(f"{a} = {b}" for a, b in tied_names.items() if a in stored or b in stored)
    if offloaded_ties:
        raise OffloadError(f"tied weights ({', '.join(offloaded_ties)}) were offloaded; MeZO trains a tied weight "
                           f"once and cannot while accelerate holds two copies of it. Keep the modules that share it "
                           f"in memory: list them in [model] device_map with a device (\"cpu\" or \"cuda:N\"), or "
                           f"give [model] max_memory room for them")


class LoadedWeightsHook(ModelHook):
    """Chained after accelerate's AlignDevicesHook on an offloaded module: `on_load(module)` runs once accelerate
    has loaded the module's weights for a forward, `on_unload(module)` once it has dropped them. Both are None
    (nothing happens) outside `Mezo.perturbed`."""

    def __init__(self):
        self.on_load = None
        self.on_unload = None

    def pre_forward(self, module, *args, **kwargs):
        if self.on_load is not None:
            self.on_load(module)
        return args, kwargs

    def post_forward(self, module, output):
        if self.on_unload is not None:
            self.on_unload(module)
        return output


def loaded_weights_hook(module) -> LoadedWeightsHook:
    """This offloaded module's LoadedWeightsHook, chained after accelerate's hook on first use.

    accelerate's forward wrapper reads `module._hf_hook` at every call, so chaining is assigning a SequentialHook
    there (what add_hook_to_module(append=True) builds, without its detach and re-init of the offload hook, which
    would load and drop every weight once more)."""
    hook = module._hf_hook
    for h in getattr(hook, "hooks", (hook,)):
        if isinstance(h, LoadedWeightsHook):
            return h
    mine = LoadedWeightsHook()
    module._hf_hook = SequentialHook(*getattr(hook, "hooks", (hook,)), mine)
    return mine


def offloaded_owners(model, names) -> list[tuple[torch.nn.Module, LoadedWeightsHook, list[tuple[str, str]]]]:
    """(module, its LoadedWeightsHook, [(local name, full name)]) for every offloaded module that owns trainable
    parameters (full names in `names`)."""
    wanted = set(names)
    owners = []
    for name, module in model.named_modules():
        if offloading_hook(module) is None:
            continue
        own = [(local, f"{name}.{local}" if name else local) for local in module._parameters]
        own = [(local, full) for local, full in own if full in wanted]
        if own:
            owners.append((module, loaded_weights_hook(module), own))
    return owners
