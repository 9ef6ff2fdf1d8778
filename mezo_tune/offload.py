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


def stored_tensors(model) -> dict[str, torch.Tensor | None]:
    """full parameter name -> the tensor its weights are stored in, for every parameter accelerate offloaded (None
    for one its weights map lacks: a tied weight whose other owner stayed in memory; check_ties refuses those)."""
    out = {}
    for name, module in model.named_modules():
        hook = offloading_hook(module)
        if hook is None:
            continue
        for local in module._parameters:
            if module._parameters[local] is not None:
                full = f"{name}.{local}" if name else local
                out[full] = _stored(hook.weights_map, local)
    return out


def storage_key(t: torch.Tensor) -> tuple:
    """Equal for two tensors over the same memory (one stored weight under two names): accelerate's CPU store holds
    a tensor object per name, all views of one storage."""
    return (t.device, t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), tuple(t.stride()), t.dtype)


def _stored(weights_map, local: str) -> torch.Tensor | None:
    try:
        return weights_map[local]
    except KeyError:
        return None


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
    tensors: dict = {}  # where a weight is read from (file entry, or its name) -> its writable stored tensor
    for loader, name in on_disk:
        info = loader.index[name]
        source = (info["safetensors_file"], info.get("weight_name", name)) if "safetensors_file" in info else name
        if source not in tensors:
            offload_weight(loader[name], name, folder, index)
            tensors[source] = _writable(folder, name, index)
        loader.state_dict[name] = tensors[source]
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
    """Refuse a tied weight (e.g. embedding and LM head) that is offloaded for one of its names and not stored as
    one tensor for all of them: MeZO trains a tied weight once, so every name must read and write the same store
    (make_store shares one memmap between names read from the same file entry; `trainable_set` then keeps the
    first name only, as named_parameters does for a model in memory)."""
    stored = stored_tensors(model)
    tied_names = getattr(model, "all_tied_weights_keys", None) or {}
    split = sorted(f"{a} = {b}" for a, b in tied_names.items() if (a in stored or b in stored) and (
        stored.get(a) is None or stored.get(b) is None or storage_key(stored[a]) != storage_key(stored[b])))
    if split:
        raise OffloadError(f"the tied weights {', '.join(split)} are offloaded for one name and not as one tensor "
                           f"for the other, so MeZO would train two copies of what must stay one weight. Put the "
                           f"modules that share it on the same device in [model] device_map (both \"disk\", or both "
                           f"in memory)")


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
    module._hf_hook = _Chain(*getattr(hook, "hooks", (hook,)), mine)
    return mine


class _Chain(SequentialHook):
    """accelerate's hook followed by ours. Attributes it lacks are the first hook's: transformers reads
    `module._hf_hook.weights_map` (saving an offloaded model)."""

    def __getattr__(self, name):
        if name == "hooks":  # not set yet (copy, unpickling): no recursion
            raise AttributeError(name)
        return getattr(self.hooks[0], name)


def offloaded_owners(model, names, tensors) -> list[tuple[torch.nn.Module, LoadedWeightsHook, list[tuple[str, str]]]]:
    """(module, its LoadedWeightsHook, [(local parameter name, trainable name)]) for every offloaded module that owns
    trainable parameters (`names`, stored in `tensors`); a tied weight's second owner maps to the name its shared
    store is trained under."""
    name_of = {storage_key(t): n for n, t in zip(names, tensors)}
    owners = []
    for module in model.modules():
        hook = offloading_hook(module)
        if hook is None:
            continue
        own = [(local, name_of.get(storage_key(hook.weights_map[local]))) for local in module._parameters
               if module._parameters[local] is not None]
        own = [(local, name) for local, name in own if name is not None]
        if own:
            owners.append((module, loaded_weights_hook(module), own))
    return owners
