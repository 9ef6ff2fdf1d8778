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
import functools
import hashlib
import math
from collections import defaultdict, deque
from dataclasses import dataclass

import numpy as np
import torch

from . import zrng
from .directions import Directions


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
    """c = fp32(η·g): computed once, the same way in train and replay (inf when the product overflows fp32)."""
    with np.errstate(over="ignore", invalid="ignore"):
        return float(np.float32(eta) * np.float32(g))


def applied_scale(eta: float, g: float, skipped: bool = False) -> float | None:
    """The c a step applies, or None for a skipped step: one whose g (a loss) or c = fp32(η·g) is not finite.
    Train and replay both decide with this, so they skip the same steps."""
    c = update_scale(eta, g)
    return None if skipped or not math.isfinite(c) else c


def learning_rate(step: int, lr: float, steps: int, schedule: str = "constant", min_lr: float = 0.0,
                  warmup_steps: int = 0) -> float:
    """η_t as an fp32 value. A linear warmup from lr/warmup_steps to lr over the first warmup_steps steps, then:
    constant lr; or linear, or cosine, from lr to min_lr at the last step. η_t is recorded with every step, so replay
    never recomputes it (the cosine's last bit may differ between math libraries; the recorded value is what counts)."""
    if step < warmup_steps:
        return float(np.float32(lr * (step + 1) / warmup_steps))
    frac = (step - warmup_steps) / max(steps - 1 - warmup_steps, 1)
    if schedule == "constant":
        eta = lr
    elif schedule == "linear":
        eta = lr + (min_lr - lr) * frac
    elif schedule == "cosine":
        eta = min_lr + (lr - min_lr) * 0.5 * (1 + math.cos(math.pi * frac))
    else:
        raise ValueError(f"unknown lr schedule {schedule!r}")
    return float(np.float32(eta))


@dataclass(frozen=True)
class UpdateRule:
    """How a record's scalar becomes an update (DESIGN.md contract 7). beta = 0: SGD, θ ← θ - c_r·z_r. beta > 0:
    momentum rebuilt from the seeds, with no state but the last `window` records: at record r

        θ ← θ - Σ_{k=0}^{W-1} fp32(η_r·w_k)·g_{r-k}·z_{r-k},   w_k = β^k / Σ_{i<W} β^i

    (oldest term first; records before 0 and skipped records contribute nothing; a skipped record r applies nothing).
    The weights sum to 1, so lr keeps its meaning: a steady gradient moves θ as fast as SGD does. z_{r-k} is generated
    again from the seed, so the rule costs W update passes per record and no memory; replay and resume rebuild the
    window from the trajectory's records."""

    beta: float = 0.0
    window: int = 1

    @classmethod
    def from_header(cls, entry: dict | None) -> "UpdateRule":
        entry = entry or {"name": "sgd"}
        if entry.get("name") == "sgd":
            return cls()
        if entry.get("name") == "momentum" and entry.get("version") == 1:
            return cls(entry["beta"], entry["window"])
        raise ValueError(f"update rule {entry!r}: this mezo-tune knows sgd and momentum v1")

    def header(self) -> dict:
        if not self.beta:
            return {"name": "sgd"}
        return {"name": "momentum", "version": 1, "beta": self.beta, "window": self.window}

    @functools.cached_property
    def weights(self) -> tuple[float, ...]:
        """w_0 .. w_{W-1} as fp32 values, by plain IEEE arithmetic in a fixed order (no pow: the same everywhere)."""
        powers = [1.0]
        for _ in range(self.window - 1):
            powers.append(powers[-1] * self.beta)
        total = 0.0
        for p in powers:
            total += p
        return tuple(float(np.float32(p / total)) for p in powers)


def _is_plain_embedding(module: torch.nn.Module) -> bool:
    """An nn.Embedding itself (not a subclass with its own forward), whose forward reads only the looked-up rows."""
    return type(module) is torch.nn.Embedding and module.max_norm is None


# ---- the engine ----------------------------------------------------------------------------------------------------

class Mezo:
    """Perturbation and update over a trainable set, for one run (seed, ε, z distribution, rounding)."""

    def __init__(self, model: torch.nn.Module, trainable: TrainableSet, *, seed: int, eps: float,
                 distribution: str = "gaussian", rounding: str = "nearest", use_compile: bool = False,
                 rule: UpdateRule = UpdateRule(), directions: Directions = Directions(), large_linear: int = 1 << 23):
        """large_linear: a trainable nn.Linear weight of at least this many elements is perturbed in row blocks.
        directions: which tensors and elements each record's z touches (directions.py); dense by default."""
        if distribution not in zrng.DISTRIBUTIONS:
            raise ValueError(f"unknown distribution {distribution!r}")
        if rounding not in ("nearest", "stochastic"):
            raise ValueError(f"unknown rounding {rounding!r}")
        if rounding == "stochastic" and directions.kind in ("sparse", "lowrank"):
            raise ValueError(f"stochastic rounding is not available with {directions.kind} directions")
        self.model, self.trainable = model, trainable
        self.seed, self.eps, self.distribution, self.rounding = seed, eps, distribution, rounding
        self.use_compile = use_compile
        self.rule = rule
        self.directions = directions
        self._names = tuple(trainable.names)
        self._window: deque = deque(maxlen=rule.window)  # the latest records (the momentum rule's only state)
        self._name_of = {id(p): n for n, p in zip(trainable.names, trainable.params)}
        # Modules that own trainable parameters directly (a tied tensor has two owners). Plain embeddings and large
        # linear layers get a forward of their own inside `perturbed` (see there); the others get swap hooks.
        self.linear_block_elements: int | None = None  # None: `_block_rows` chooses per device
        self._embeddings, self._large_linears = [], []
        self._owners: list[tuple[torch.nn.Module, list[torch.nn.Parameter]]] = []
        for module in model.modules():
            own = [p for p in module.parameters(recurse=False) if id(p) in self._name_of]
            if not own:
                continue
            weight = getattr(module, "weight", None)
            # never replace a forward someone else (accelerate) installed; a formed z goes through the swap hooks
            if "forward" not in module.__dict__ and not (id(weight) in self._name_of and directions.forms(weight)):
                if _is_plain_embedding(module) and id(weight) in self._name_of:
                    self._embeddings.append(module)
                    own = [p for p in own if p is not weight]
                elif (type(module) is torch.nn.Linear and id(weight) in self._name_of
                      and weight.numel() >= large_linear):
                    self._large_linears.append(module)
                    own = [p for p in own if p is not weight]
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
        eps_t: dict = {}
        stream_keys: dict = {}
        swapped: dict[int, tuple[torch.nn.Parameter, torch.Tensor]] = {}
        handles = []
        touched = self.directions.touched(self.seed, step, self._names)

        def is_touched(p) -> bool:
            return self._name_of[id(p)] in touched

        def eps_on(device):
            if device not in eps_t:
                eps_t[device] = torch.tensor(sign * self.eps, dtype=torch.float64, device=device)
            return eps_t[device]

        def key_of(p) -> tuple[int, int]:
            name = self._name_of[id(p)]
            if name not in stream_keys:
                stream_keys[name] = zrng.stream_key(self.seed, step, name)
            return stream_keys[name]

        def perturb(out: torch.Tensor, w: torch.Tensor, p, offset: int = 0) -> None:
            """out = θ ± εz for the elements [offset, offset + numel) of parameter p (w: those values)."""
            if self.directions.forms(w):  # the whole tensor (formed z never takes the row-block paths)
                z = self.directions.perturbation(self.seed, step, self._name_of[id(p)], w, self.distribution)
                out.copy_((w.to(torch.float32) + eps_on(w.device).to(torch.float32) * z).to(out.dtype))
                return
            flat_w, flat_out = w.reshape(-1), out.view(-1)
            for a, b in zrng.chunks(flat_w.numel()):
                key = zrng.key_tensor(*key_of(p), offset + a, w.device)
                kernel(flat_out[a:b], flat_w[a:b], key, eps_on(w.device), self.distribution)

        def pre_hook(module, args, params):
            for p in params:
                if id(p) in swapped:  # already pointed at its perturbed copy (re-entrant or shared use)
                    continue
                orig = p.data
                buf = self._acquire(orig.shape, orig.dtype, orig.device)
                perturb(buf, orig, p)
                swapped[id(p)] = (p, orig)
                p.data = buf

        def post_hook(module, args, output, params):
            for p in params:
                self._restore(swapped.pop(id(p), None))
            return None

        def embedding_forward(module, ids):
            # A lookup reads only the rows of its ids: perturb those rows alone, and look up in them.
            w = module.weight
            rows, inverse = torch.unique(ids, return_inverse=True)
            width = w.shape[1]
            index = (rows[:, None] * width + torch.arange(width, device=w.device)).reshape(-1)
            values = torch.empty(index.numel(), dtype=w.dtype, device=w.device)
            rows_kernel(values, w[rows].reshape(-1), index, zrng.key_tensor(*key_of(w), 0, w.device),
                        eps_on(w.device), self.distribution)
            return torch.nn.functional.embedding(inverse, values.view(-1, width))

        def linear_forward(module, x):
            # A large weight (an LM head) is perturbed and applied one block of output rows at a time, so its
            # perturbed copy never exists whole: the scratch is one block.
            w = module.weight
            out_features, in_features = w.shape
            out = torch.empty(*x.shape[:-1], out_features, dtype=x.dtype, device=x.device)
            x2, o2 = x.reshape(-1, in_features), out.view(-1, out_features)
            rows = self._block_rows(w)
            block = self._acquire((min(rows, out_features), in_features), w.dtype, w.device)
            try:
                for a in range(0, out_features, rows):
                    b = min(a + rows, out_features)
                    perturb(block[: b - a], w[a:b], w, offset=a * in_features)
                    o2[:, a:b] = x2 @ block[: b - a].t()
            finally:
                self._release(block)
            if module.bias is not None:
                out += module.bias
            return out

        overridden = []
        try:
            for module, params in self._owners:
                params = [p for p in params if is_touched(p)]  # a module with none touched runs untouched, unhooked
                if params:
                    handles.append(module.register_forward_pre_hook(
                        lambda m, a, ps=params: pre_hook(m, a, ps)))
                    handles.append(module.register_forward_hook(
                        lambda m, a, o, ps=params: post_hook(m, a, o, ps)))
            for module, fn in [(m, embedding_forward) for m in self._embeddings] + [
                    (m, linear_forward) for m in self._large_linears]:
                if is_touched(module.weight):
                    module.forward = functools.partial(fn, module)
                    overridden.append(module)
            yield
        finally:
            for module in overridden:
                del module.forward  # back to the class's forward
            for h in handles:
                h.remove()
            for entry in list(swapped.values()):  # a forward that raised leaves nothing perturbed behind
                self._restore(entry)
            swapped.clear()

    def _block_rows(self, w: torch.Tensor) -> int:
        """Output rows of a large weight that `perturbed` forms and applies at a time (linear_forward).

        linear_block_elements, when set, is the block's size in elements. By default, on CPU: a power of two of rows
        whose block (at most 1 MiB) is still in the L2 cache when the matmul reads it back; for SmolLM2's LM head (576
        wide: 256 rows) that measured 10-20 ms faster per forward than blocks of 4M elements and no slower than one
        unblocked matmul (row counts that are not a power of two were slower). On CUDA: zrng.CHUNK elements, fewer
        launches."""
        in_features = w.shape[1]
        if self.linear_block_elements is not None:
            return max(1, self.linear_block_elements // in_features)
        if w.is_cuda:
            return max(1, zrng.CHUNK // in_features)
        fit = (1 << 20) // (w.element_size() * in_features)
        return max(16, 1 << max(0, fit.bit_length() - 1))

    def _acquire(self, shape, dtype, device) -> torch.Tensor:
        """A scratch tensor, reused across modules and steps (no allocation, no page faults after the first step)."""
        pool = self._scratch[(dtype, device, tuple(shape))]
        return pool.pop() if pool else torch.empty(shape, dtype=dtype, device=device)

    def _release(self, buf: torch.Tensor) -> None:
        self._scratch[(buf.dtype, buf.device, tuple(buf.shape))].append(buf)

    def _restore(self, entry) -> None:
        if entry is None:
            return
        p, orig = entry
        buf = p.data
        p.data = orig
        self._release(buf)

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
        """θ ← R(θ - c·z_step) for every trainable tensor the step's directions touch. c == 0 changes no bit (and is
        not even computed)."""
        if c == 0.0:
            return
        if self.rounding == "stochastic":
            kernel = zrng.kernel(zrng.update_kernel_stochastic, self.use_compile)
        else:
            kernel = zrng.kernel(zrng.update_kernel, self.use_compile)
        c_t = {}
        touched = self.directions.touched(self.seed, step, self._names)
        with torch.no_grad():
            for name, p in zip(self.trainable.names, self.trainable.params):
                w = p.data
                if name not in touched:
                    continue
                if w.device not in c_t:
                    c_t[w.device] = torch.tensor(c, dtype=torch.float64, device=w.device)
                if self.directions.forms(w):
                    z = self.directions.update_direction(self.seed, step, name, w, self.distribution)
                    w.copy_((w.to(torch.float64) - c_t[w.device] * z.to(torch.float64)).to(torch.float32).to(w.dtype))
                    continue
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

    def step(self, step: int, eta: float, loss_fn, directions: int = 1, recorded: list | None = None) -> list[dict]:
        """One optimizer step: `directions` two-point estimates at the same θ (n-SPSA; 1 is the paper's MeZO), then
        their updates in order. Direction k is trajectory record `step·directions + k`, with its own z (keyed by the
        record), g and η/directions, so replay applies records one by one and knows nothing of K. `recorded`: records
        of this step already in the trajectory (a resume that stopped inside the step); their forwards are not redone.
        Returns the records to append (a record is skipped when a loss or its scale c is not finite)."""
        recorded = recorded or []
        records = list(recorded)
        eta_k = float(np.float32(eta / directions))
        for r in range(step * directions + len(records), (step + 1) * directions):
            lp, lm = self.loss_pair(r, loss_fn)
            g = projected_gradient(lp, lm, self.eps)
            skipped = applied_scale(eta_k, g) is None
            records.append({"step": r, "g": g, "eta": eta_k, "loss_plus": lp, "loss_minus": lm, "skipped": skipped})
        for rec in records:
            self.apply_record(rec)
        return records[len(recorded):]

    def apply_record(self, rec) -> None:
        """The update one trajectory record stands for, by the run's update rule (train, resume and replay all apply
        records through this, in order)."""
        step, eta, g, skipped = _fields(rec)
        self._window.append((step, g, skipped))
        if skipped:
            return
        for past_step, past_g, past_skipped in self._window:  # oldest first; SGD: the window is this record, w_0 = 1
            c = applied_scale(float(np.float32(eta * self.rule.weights[step - past_step])), past_g, past_skipped)
            if c is not None:
                self.apply_update(past_step, c)

    def remember(self, records) -> None:
        """Records already applied to the weights (a resume from a checkpoint): the window the rule reads, not
        applied again."""
        for rec in records:
            step, _, g, skipped = _fields(rec)
            self._window.append((step, g, skipped))

    def digest(self) -> bytes:
        return weights_digest(self.trainable.params)


def _fields(rec) -> tuple[int, float, float, bool]:
    """(step, eta, g, skipped) of a record: a trajectory StepRecord or the dict Mezo.step returns."""
    get = rec.get if isinstance(rec, dict) else functools.partial(getattr, rec)
    return get("step"), get("eta"), get("g"), get("skipped")
