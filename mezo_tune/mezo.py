"""The MeZO algorithm: the trainable set, perturbed forwards, the projected gradient and the update.

One step on a batch B (Malladi et al. 2023, Algorithm 1), with z = Z(seed, t, name) from `zrng`:

    L+ = loss(θ + εz; B)      L- = loss(θ - εz; B)          (two forwards, losses in fp32)
    g  = (L+ - L-) / (2ε)                                    (the projected gradient, one fp32 scalar)
    θ  ← R(θ - c·z),  c = fp32(η·g)                           (R: rounding to the storage dtype)

This module is shared by `train` and `replay`: replay is the same `apply_update` fed with recorded (η, g).

Contract 3: the stored weights are never written by a perturbed forward. Just before a module that owns trainable
weights runs, a hook forms θ ± εz into a scratch buffer and points the parameter at it; right after, the parameter
points back at the untouched original. Nothing is perturbed in place and "subtracted back" (in fp16/bf16 that does
not restore the weights).
"""

from __future__ import annotations

import contextlib
import fnmatch
import hashlib
import math
from collections import defaultdict
from dataclasses import dataclass

import numpy as np
import torch

from . import zrng


# ---- contract 1: the trainable set -----------------------------------------------------------------------------------

@dataclass
class TrainableSet:
    """The ordered named tensors MeZO trains. Tied weights appear once, under their first name."""

    names: list[str]
    params: list[torch.nn.Parameter]

    def header(self) -> list[dict]:
        return [{"name": n, "shape": list(p.shape), "dtype": str(p.dtype).removeprefix("torch.")}
                for n, p in zip(self.names, self.params)]

    @property
    def numel(self) -> int:
        return sum(p.numel() for p in self.params)


def trainable_set(model: torch.nn.Module, freeze: tuple[str, ...] | list[str] = (),
                  adapter: bool = False) -> TrainableSet:
    """All floating-point parameters (each tied tensor once), minus those matching a `freeze` pattern.

    With adapter=True (a peft model), only the adapter tensors: the parameters peft marks trainable
    (requires_grad), in the model's named_parameters order; the base weights are never in the set."""
    names, params = [], []
    for name, p in model.named_parameters():  # named_parameters yields a shared tensor once
        if not p.is_floating_point() or any(fnmatch.fnmatchcase(name, pat) for pat in freeze):
            continue
        if adapter and not p.requires_grad:
            continue
        names.append(name)
        params.append(p)
    if not params:
        raise ValueError("nothing to train: every parameter is frozen or not floating point (check [model] freeze)")
    return TrainableSet(names, params)


# ---- digests (trajectory header and keyframes) ----------------------------------------------------------------------

def tensor_digest(t: torch.Tensor) -> str:
    """blake2b-128 of a tensor's dtype, shape and bytes."""
    h = hashlib.blake2b(digest_size=16)
    h.update(f"{t.dtype}{tuple(t.shape)}".encode())
    h.update(_tensor_bytes(t))
    return h.hexdigest()


def weights_digest(tensors) -> bytes:
    """blake2b-256 over the tensors in order: the keyframe digest."""
    h = hashlib.blake2b(digest_size=32)
    for t in tensors:
        h.update(f"{t.dtype}{tuple(t.shape)}".encode())
        h.update(_tensor_bytes(t))
    return h.digest()


def _tensor_bytes(t: torch.Tensor) -> memoryview:
    t = t.detach().to("cpu").contiguous()
    return memoryview(t.view(torch.uint8).reshape(-1).numpy())


# ---- the scalars ---------------------------------------------------------------------------------------------------

def projected_gradient(loss_plus: float, loss_minus: float, eps: float) -> float:
    """g = (L+ - L-) / (2ε) in fp32; NaN when either loss is not finite (the step is then skipped)."""
    lp, lm = np.float32(loss_plus), np.float32(loss_minus)
    if not (np.isfinite(lp) and np.isfinite(lm)):
        return float("nan")
    with np.errstate(over="ignore"):
        return float((lp - lm) / np.float32(2 * eps))


def update_scale(eta: float, g: float) -> float:
    """c = fp32(η·g): computed once, the same way in train and replay."""
    return float(np.float32(eta) * np.float32(g))


def learning_rate(step: int, lr: float, steps: int, schedule: str = "constant", min_lr: float = 0.0) -> float:
    """η_t as an fp32 value: constant, or linear from lr at step 0 to min_lr at the last step."""
    if schedule == "constant":
        eta = lr
    elif schedule == "linear":
        frac = step / max(steps - 1, 1)
        eta = lr + (min_lr - lr) * frac
    else:
        raise ValueError(f"unknown lr schedule {schedule!r}")
    return float(np.float32(eta))


def _is_plain_embedding(module: torch.nn.Module, p: torch.nn.Parameter) -> bool:
    """An nn.Embedding itself (not a subclass with its own forward), whose forward reads only the looked-up rows."""
    return type(module) is torch.nn.Embedding and p is module.weight and module.max_norm is None


# ---- the engine ----------------------------------------------------------------------------------------------------

class Mezo:
    """Perturbation and update over a trainable set, for one run (seed, ε, z distribution, rounding)."""

    def __init__(self, model: torch.nn.Module, trainable: TrainableSet, *, seed: int, eps: float,
                 distribution: str = "gaussian", rounding: str = "nearest", use_compile: bool = False):
        if distribution not in zrng.DISTRIBUTIONS:
            raise ValueError(f"unknown distribution {distribution!r}")
        if rounding not in ("nearest", "stochastic"):
            raise ValueError(f"unknown rounding {rounding!r}")
        self.model, self.trainable = model, trainable
        self.seed, self.eps, self.distribution, self.rounding = seed, eps, distribution, rounding
        self.use_compile = use_compile
        self._name_of = {id(p): n for n, p in zip(trainable.names, trainable.params)}
        # Modules that own trainable parameters directly (a tied tensor has two owners).
        self._owners: list[tuple[torch.nn.Module, list[torch.nn.Parameter]]] = []
        for module in model.modules():
            own = [p for p in module.parameters(recurse=False) if id(p) in self._name_of]
            if own:
                self._owners.append((module, own))
        self._scratch: dict[tuple, list[torch.Tensor]] = defaultdict(list)

    # -- keys
    def _chunk_keys(self, step: int, name: str, numel: int, device, stream: int = zrng.Z_STREAM):
        k0, k1 = zrng.stream_key(self.seed, step, name, stream)
        return [(a, b, zrng.key_tensor(k0, k1, a, device)) for a, b in zrng.chunks(numel)]

    # -- contract 3
    @contextlib.contextmanager
    def perturbed(self, step: int, sign: int):
        """Inside this context the model computes with θ + sign·ε·z_step; the stored θ is never written."""
        kernel = zrng.kernel(zrng.perturb_kernel, self.use_compile)
        rows_kernel = zrng.kernel(zrng.perturb_rows_kernel, self.use_compile)
        eps_t = {}
        keys = {}
        swapped: dict[int, tuple[torch.nn.Parameter, torch.Tensor]] = {}
        handles = []

        def pre_hook(module, args, params):
            for p in params:
                if id(p) in swapped:  # already pointed at its perturbed copy (re-entrant or shared use)
                    continue
                orig = p.data
                buf = self._acquire(orig)
                name = self._name_of[id(p)]
                if name not in keys:
                    keys[name] = self._chunk_keys(step, name, orig.numel(), orig.device)
                if orig.device not in eps_t:
                    eps_t[orig.device] = torch.tensor(sign * self.eps, dtype=torch.float64, device=orig.device)
                if _is_plain_embedding(module, p) and args and torch.is_tensor(args[0]):
                    # A lookup reads only the rows of its ids: perturb those rows alone (the rest of the scratch
                    # table is never read). For a large vocabulary this is most of the embedding's cost saved.
                    rows = torch.unique(args[0])
                    width = orig.shape[1]
                    index = (rows[:, None] * width + torch.arange(width, device=orig.device)).reshape(-1)
                    values = torch.empty(index.numel(), dtype=orig.dtype, device=orig.device)
                    rows_kernel(values, orig[rows].reshape(-1), index, keys[name][0][2], eps_t[orig.device],
                                self.distribution)
                    buf[rows] = values.view(-1, width)
                else:
                    flat_w, flat_out = orig.reshape(-1), buf.view(-1)
                    for a, b, key in keys[name]:
                        kernel(flat_out[a:b], flat_w[a:b], key, eps_t[orig.device], self.distribution)
                swapped[id(p)] = (p, orig)
                p.data = buf

        def post_hook(module, args, output, params):
            for p in params:
                self._restore(swapped.pop(id(p), None))
            return None

        try:
            for module, params in self._owners:
                handles.append(module.register_forward_pre_hook(
                    lambda m, a, ps=params: pre_hook(m, a, ps)))
                handles.append(module.register_forward_hook(
                    lambda m, a, o, ps=params: post_hook(m, a, o, ps)))
            yield
        finally:
            for h in handles:
                h.remove()
            for entry in list(swapped.values()):  # a forward that raised leaves nothing perturbed behind
                self._restore(entry)
            swapped.clear()

    def _acquire(self, like: torch.Tensor) -> torch.Tensor:
        pool = self._scratch[(like.dtype, like.device, tuple(like.shape))]
        return pool.pop() if pool else torch.empty(like.shape, dtype=like.dtype, device=like.device)

    def _restore(self, entry) -> None:
        if entry is None:
            return
        p, orig = entry
        buf = p.data
        p.data = orig
        self._scratch[(buf.dtype, buf.device, tuple(buf.shape))].append(buf)

    def release_scratch(self) -> None:
        self._scratch.clear()

    def loss_pair(self, step: int, loss_fn) -> tuple[float, float]:
        """(L+, L-) for step `step`: loss_fn() evaluated at θ + εz and at θ - εz."""
        with torch.no_grad():
            with self.perturbed(step, +1):
                lp = float(loss_fn())
            with self.perturbed(step, -1):
                lm = float(loss_fn())
        return lp, lm

    # -- contract 4
    def apply_update(self, step: int, c: float) -> None:
        """θ ← R(θ - c·z_step) for every trainable tensor. c == 0 changes no bit (and is not even computed)."""
        if c == 0.0:
            return
        if self.rounding == "stochastic":
            kernel = zrng.kernel(zrng.update_kernel_stochastic, self.use_compile)
        else:
            kernel = zrng.kernel(zrng.update_kernel, self.use_compile)
        c_t = {}
        with torch.no_grad():
            for name, p in zip(self.trainable.names, self.trainable.params):
                w = p.data
                if w.device not in c_t:
                    c_t[w.device] = torch.tensor(c, dtype=torch.float64, device=w.device)
                flat = w.view(-1) if w.is_contiguous() else w.reshape(-1).clone()
                keys = self._chunk_keys(step, name, w.numel(), w.device)
                if self.rounding == "stochastic":
                    rkeys = self._chunk_keys(step, name, w.numel(), w.device, zrng.ROUNDING_STREAM)
                    for (a, b, key), (_, _, rkey) in zip(keys, rkeys):
                        kernel(flat[a:b], key, rkey, c_t[w.device], self.distribution)
                else:
                    for a, b, key in keys:
                        kernel(flat[a:b], key, c_t[w.device], self.distribution)
                if not w.is_contiguous():
                    w.copy_(flat.view_as(w))

    def step(self, step: int, eta: float, loss_fn) -> dict:
        """One MeZO step. Returns the record to append to the trajectory (skipped when a loss is not finite)."""
        lp, lm = self.loss_pair(step, loss_fn)
        g = projected_gradient(lp, lm, self.eps)
        skipped = not math.isfinite(g)
        if not skipped:
            self.apply_update(step, update_scale(eta, g))
        return {"step": step, "g": g, "eta": eta, "loss_plus": lp, "loss_minus": lm, "skipped": skipped}

    def digest(self) -> bytes:
        return weights_digest(self.trainable.params)
