"""The MeZO algorithm: the trainable set, perturbed forwards, the projected gradient and the update.

One step on a batch B (Malladi et al. 2023, Algorithm 1), with z = Z(seed, t, name) from `zrng`:

    L+ = loss(θ + εz; B)      L- = loss(θ - εz; B)          (two forwards, losses in fp32)
    g  = (L+ - L-) / (2ε)                                    (the projected gradient, one fp32 scalar)
    θ  ← R(θ - c·z),  c = fp32(η·g)                           (R: rounding to the storage dtype)

This module is shared by `train` and `replay`: replay is the same `apply_update` fed with recorded (η, g).

Beyond the paper (DESIGN.md contract 7), each replayable from the records alone: n-SPSA (K directions per step) and
the FZOO-style one-sided step normalised by the spread of its losses (`normalised_differences`) are estimators, they
only decide the records' g; momentum rebuilt from the seeds (`UpdateRule`) and the stored-moment Adam rule
(`AdamRule`, `adam_update`) are update rules, they decide what a record does to the weights (`Mezo.apply_record`).

Contract 3: the stored weights are never written by a perturbed forward. Just before a module that owns trainable
weights runs, a hook forms θ ± εz into a scratch buffer and points the parameter at it; right after, the parameter
points back at the untouched original. Nothing is perturbed in place and "subtracted back" (in fp16/bf16 that does
not restore the weights). A module accelerate offloaded (offload.py) has its weights only inside its forward: the
same swap runs once accelerate has loaded them, on the execution device, and the update writes the stored copy.
"""

from __future__ import annotations

import contextlib
import fnmatch
import functools
import hashlib
import math
from collections import Counter, defaultdict, deque
from dataclasses import dataclass, field

import numpy as np
import torch

from . import cpu_kernels, zrng
from .directions import Directions

ESTIMATORS = ("spsa", "fzoo")
ADAM_PREFIX = "mezo-tune/adam/"  # checkpoint tensor names of the Adam moments: "mezo-tune/adam/m/<tensor name>"


# ---- contract 1: the trainable set -----------------------------------------------------------------------------------

@dataclass
class TrainableSet:
    """The ordered named tensors MeZO trains. Tied weights appear once, under their first name.

    params holds the tensors where the weights are stored: the module's parameter, or for a parameter accelerate
    offloaded (on the meta device between forwards) the tensor of its offload store (offload.py), which the update,
    digests and checkpoints read and write in place."""

    names: list[str]
    params: list[torch.Tensor]

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
    stored = offloaded_weights(model)
    seen = set()  # an offloaded tied weight has a meta parameter per owner but one store (offload.check_ties)
    for name, p in model.named_parameters():  # named_parameters yields a shared tensor once
        if not p.is_floating_point() or any(fnmatch.fnmatchcase(name, pat) for pat in freeze):
            continue
        if adapter and not p.requires_grad:
            continue
        if name in stored:
            from .offload import storage_key

            if storage_key(stored[name]) in seen:
                continue
            seen.add(storage_key(stored[name]))
        names.append(name)
        params.append(stored.get(name, p))
    if not params:
        raise ValueError("nothing to train: every parameter is frozen or not floating point (check [model] freeze)")
    return TrainableSet(names, params)


def offloaded_weights(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """name -> stored tensor of each parameter accelerate offloaded ({} for a model without accelerate's hooks)."""
    if not any(hasattr(m, "_hf_hook") for m in model.modules()):
        return {}
    from .offload import stored_tensors

    return stored_tensors(model)


# ---- digests (trajectory header and keyframes) ----------------------------------------------------------------------

def tensor_digest(t: torch.Tensor) -> str:
    """blake2b-128 of a tensor's dtype, shape and bytes: the base model's identity in the header (taken once per run,
    on the host; keyframes use `weights_digest`)."""
    h = hashlib.blake2b(digest_size=16)
    h.update(f"{t.dtype}{tuple(t.shape)}".encode())
    h.update(_tensor_bytes(t))
    return h.hexdigest()


# The weights digest of keyframes, the end block, the initial digest and checkpoints, named and versioned in the
# trajectory header ("weights_digest"). Format 1 and 2 trajectories hold BLAKE2B_DIGEST values (trajectory.py says
# which a file holds); new runs record SUM_DIGEST, which never copies a tensor off its device.
SUM_DIGEST = {"name": "mezo-tune/lowbias32-sum", "version": 1}
BLAKE2B_DIGEST = {"name": "blake2b-256", "version": 1}
_SUM_KEY = zrng.stream_key(0, 0, "mezo-tune/weights-digest/v1")  # fixed (k0, k1) of the per-index mixing
_WORD_DTYPE = {1: torch.int8, 2: torch.int16, 4: torch.int32, 8: torch.int32}  # element size -> word view
# Words per call: few kernel launches on a GPU; on CPU chunks whose temporaries stay in cache (SmolLM2's 28.3M-element
# embedding, 1 thread: 0.22 s at 2**17 words, 0.41 s at 2**20, 3.8 s at 2**24). The value does not depend on it.
_SUM_CHUNK = {"cpu": 1 << 17, "default": 1 << 24}


def weights_digest(tensors, scheme: dict = SUM_DIGEST) -> bytes:
    """The 32-byte digest of the trainable tensors, in order, by the named scheme (SUM_DIGEST or BLAKE2B_DIGEST)."""
    if scheme == SUM_DIGEST:
        return _sum_digest(tensors)
    if scheme == BLAKE2B_DIGEST:
        return _blake2b_digest(tensors)
    raise ValueError(f"weights digest {scheme!r} is unknown to this mezo-tune (it computes {SUM_DIGEST['name']} "
                     f"v{SUM_DIGEST['version']} and {BLAKE2B_DIGEST['name']} v{BLAKE2B_DIGEST['version']})")


def _blake2b_digest(tensors) -> bytes:
    """blake2b-256 over each tensor's dtype, shape and bytes, in order (format 1 and 2 keyframes): a host copy of
    every tensor."""
    h = hashlib.blake2b(digest_size=32)
    for t in tensors:
        h.update(f"{t.dtype}{tuple(t.shape)}".encode())
        h.update(_tensor_bytes(t))
    return h.digest()


def _sum_digest(tensors) -> bytes:
    """SUM_DIGEST: each tensor reduced on its own device to one integer (`tensor_sum_hash`), then blake2b-256 over
    the scheme's name and each tensor's dtype, shape and integer, in order, on the host (8 bytes per tensor move)."""
    return sum_digest_of(tensors, device_sums([tensor_sum_hash(t, device_sum=True) for t in tensors]))


def device_sums(sums: list[torch.Tensor]) -> list[int]:
    """tensor_sum_hash's 0-d device sums as integers in [0, 2**64), one transfer per device."""
    by_device: dict = defaultdict(list)
    for i, s in enumerate(sums):
        by_device[s.device].append(i)
    values = [0] * len(sums)
    for idx in by_device.values():  # one transfer per device
        for i, v in zip(idx, torch.stack([sums[i] for i in idx]).tolist()):
            values[i] = v % (1 << 64)
    return values


def sum_digest_of(tensors, values: list[int]) -> bytes:
    """SUM_DIGEST from each tensor's dtype, shape and sum hash (a sharded tensor: its global shape, and the sum of its
    shards' sums, sharded.py)."""
    h = hashlib.blake2b(f"{SUM_DIGEST['name']}/v{SUM_DIGEST['version']}".encode(), digest_size=32)
    for t, v in zip(tensors, values):
        h.update(f"{t.dtype}{tuple(t.shape)}".encode())
        h.update(v.to_bytes(8, "little"))
    return h.digest()


def tensor_sum_hash(t: torch.Tensor, offset: int = 0, device_sum: bool = False):
    """sum over the tensor's words w_i of mix(w_i ^ bits(offset + i)), mod 2**64: an order-independent hash of its
    bytes, computed on its device with integer ops only.

    Words are the elements' bit patterns (int16 for fp16/bf16, int32 for fp32, two int32 per fp64 element), i their
    row-major index. bits is zrng's per-index hash (contract 2: the same bits on every device) under a fixed key and
    mix is its lowbias32 bijection, so for each i, w -> term is one-to-one: changing any one word always changes the
    sum, and a change anywhere else collides with chance ~2**-64. Integer addition is associative: the value does
    not depend on the chunking, the thread count or the device's reduction order, and the sums of a tensor's
    shards (each with its `offset`, contract 8) add up to the whole tensor's. Each term fits in int32, so a sum
    overflows int64 only past 2**32 words, where it wraps (defined on CPU and CUDA alike).
    device_sum: return the int64 sum as a 0-d tensor on t's device (no sync), else as a Python int in [0, 2**64)."""
    words = t.detach().contiguous().reshape(-1).view(_WORD_DTYPE[t.element_size()])
    chunk = _SUM_CHUNK.get(words.device.type, _SUM_CHUNK["default"])
    total = torch.zeros((), dtype=torch.int64, device=words.device)
    with torch.no_grad():
        for a in range(0, words.numel(), chunk):
            w = words[a : a + chunk].to(torch.int32)
            index = torch.arange(offset + a, offset + a + w.numel(), dtype=torch.int64, device=w.device)
            total += zrng.word_hash(w, index, *_SUM_KEY).sum(dtype=torch.int64)
    return total if device_sum else int(total) % (1 << 64)


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


def normalised_differences(losses: list[float], base: float) -> list[float]:
    """FZOO's scalars (Dang et al. 2025), one per direction: g_i = fp32((l_i - l_0) / σ), l_i = loss(θ + εz_i),
    l_0 = loss(θ), σ the sample standard deviation (N - 1 in the denominator) of the N losses l_i.

    The update θ ← θ - (η/N)·Σ_i g_i·z_i is then the paper's θ - η/(N·σ)·Σ_i (l_i - l_0)·u_i: the normaliser is
    folded into g, so a record holds exactly the fp32 g its update applies and replay needs neither the losses nor
    σ. σ is computed here once, in fp64, in a fixed order (mean, then the sum of squared deviations, then one
    correctly rounded sqrt), from the losses as fp32 values: the same bits wherever train runs. Folding σ into g
    rather than η keeps η the schedule's η/N, so the momentum and Adam rules read normalised estimates with the lr
    they expect.

    All NaN (the step is skipped) when a loss is not finite; all 0 when σ = 0 (every direction scored the same: there
    is nothing to normalise by, and nothing to learn from this batch)."""
    ls = [float(np.float32(loss)) for loss in losses]
    l0 = float(np.float32(base))
    if len(ls) < 2:
        raise ValueError(f"the spread of the losses needs at least 2 directions (got {len(ls)})")
    if not all(math.isfinite(x) for x in (*ls, l0)):
        return [float("nan")] * len(ls)
    mean = sum(ls) / len(ls)
    sigma = math.sqrt(sum((x - mean) * (x - mean) for x in ls) / (len(ls) - 1))
    if sigma == 0.0:
        return [0.0] * len(ls)
    with np.errstate(over="ignore"):
        return [float(np.float32((x - l0) / sigma)) for x in ls]


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
    def from_header(cls, entry: dict | None) -> "UpdateRule | AdamRule":
        """The rule a trajectory header names (sgd when it names none: trajectories from before update rules)."""
        entry = entry or {"name": "sgd"}
        if entry.get("name") == "sgd":
            return cls()
        if entry.get("name") == "momentum" and entry.get("version") == 1:
            return cls(entry["beta"], entry["window"])
        if entry.get("name") == "adam" and entry.get("version") == AdamRule.VERSION:
            return AdamRule(entry["beta1"], entry["beta2"], entry["eps"])
        raise ValueError(f"update rule {entry!r}: this mezo-tune knows sgd, momentum v1 and adam v1")

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


@dataclass(frozen=True)
class AdamRule:
    """The stored-moment update rule (update rule `adam` v1), for runs that can afford two fp32 tensors the size of the
    trainable set. Record r with scalar g_r and direction z_r (every non-skipped record is one Adam step, t = 1, 2, ..):

        e = g_r·z_r
        m ← β1·m + (1-β1)·e          v ← β2·v + (1-β2)·e²
        θ ← R(θ - η_r·m̂ / (√v̂ + δ)),  m̂ = m / (1-β1^t),  v̂ = v / (1-β2^t)

    Every operation is one eager fp32 torch op, so one IEEE rounding each (`adam_update` fixes their order; no FMA can
    form between separate eager kernels; division is correctly rounded on CPU and CUDA, the square root is made so by
    `exact_sqrt`), and β^t is a running fp64 product (no pow). The state (m, v, t) is rebuilt by running the rule
    over the records from the start (replay needs the memory too) and is saved in checkpoints so that a resume
    continues it exactly."""

    beta1: float = 0.9
    beta2: float = 0.999
    eps: float = 1e-8
    VERSION = 1
    window = 1  # records a resume must remember: the rule's state comes from the checkpoint, not from records

    def header(self) -> dict:
        return {"name": "adam", "version": self.VERSION, "beta1": self.beta1, "beta2": self.beta2, "eps": self.eps,
                "state": "rebuilt from the records (m, v: fp32 per trainable element; saved in checkpoints)"}


@dataclass
class AdamState:
    """AdamRule's state: the moments m, v (fp32, shaped like the trainable tensors), the count t of records applied,
    and the running products β1^t, β2^t (fp64)."""

    m: list[torch.Tensor]
    v: list[torch.Tensor]
    count: int = 0
    beta1_power: float = 1.0
    beta2_power: float = 1.0

    @classmethod
    def zeros(cls, params) -> "AdamState":
        return cls([torch.zeros(p.shape, dtype=torch.float32, device=p.device) for p in params],
                   [torch.zeros(p.shape, dtype=torch.float32, device=p.device) for p in params])

    def advance(self, rule: AdamRule) -> tuple[float, float]:
        """t ← t + 1; the bias corrections (1 - β1^t, 1 - β2^t) as fp32 values."""
        self.count += 1
        self.beta1_power *= rule.beta1
        self.beta2_power *= rule.beta2
        return float(np.float32(1.0 - self.beta1_power)), float(np.float32(1.0 - self.beta2_power))


def exact_sqrt(x: torch.Tensor) -> torch.Tensor:
    """The correctly rounded fp32 square root of an fp32 tensor, on every device.

    torch.sqrt is not that on CPU: its vectorised fp32 kernel (torch 2.13, AVX-512; torch.pow(x, 0.5) too) is 1 ulp
    off on ~17% of fp32 inputs, measured against numpy's IEEE sqrt (tests/test_rules.py checks exact_sqrt the same
    way). So: r = fp32(sqrt in fp64), within one fp32 ulp of the
    true root whatever library computed it, then corrected exactly: the midpoints between r and its fp32 neighbours
    have at most 25 significant bits, so their squares are exact in fp64 and comparing them with x decides the right
    neighbour. A square root of an fp32 value is never exactly such a midpoint, so there are no ties."""
    x64 = x.to(torch.float64)
    r = x64.sqrt().to(torch.float32)
    up = torch.nextafter(r, torch.full_like(r, math.inf))
    down = torch.nextafter(r, torch.zeros_like(r))
    r64 = r.to(torch.float64)
    above, below = (r64 + up.to(torch.float64)) * 0.5, (r64 + down.to(torch.float64)) * 0.5
    r = torch.where(above * above < x64, up, r)
    return torch.where(below * below > x64, down, r)


def adam_scalars(rule: AdamRule, g: float, eta: float, corrections: tuple[float, float]) -> list[float]:
    """The fp32 scalars of one Adam step, in the order the C twin takes them (cpu_kernels.adam_f32): g, η, β1, β2,
    1-β1, 1-β2, the two bias corrections, δ."""
    values = (g, eta, rule.beta1, rule.beta2, 1.0 - rule.beta1, 1.0 - rule.beta2, *corrections, rule.eps)
    return [float(np.float32(x)) for x in values]


def adam_update(w: torch.Tensor, m: torch.Tensor, v: torch.Tensor, z: torch.Tensor, g: float, eta: float,
                rule: AdamRule, corrections: tuple[float, float]) -> None:
    """One Adam step on a flat chunk, in place: m, v (fp32) and w (any float dtype, rounded to nearest-even).

    The op order is the contract (AdamRule's docstring); each line is separate eager ops on fp32 tensors whose scalar
    operands are fp32 values, so every result is one correctly rounded IEEE operation on every device. Never add with
    `alpha=` or use lerp/addcmul: those may fuse a multiply and an add into one rounding on one device and not another.
    """
    g, eta, b1, b2, c1, c2, bc1, bc2, eps = adam_scalars(rule, g, eta, corrections)
    estimate = z * g
    squared = estimate * estimate
    m.mul_(b1)
    m.add_(estimate.mul_(c1))
    v.mul_(b2)
    v.add_(squared.mul_(c2))
    # Divisors as 0-dim tensors on w's device: CUDA divides by a CPU scalar as a multiply by its reciprocal (two
    # roundings); by a device tensor it divides, correctly rounded, as the CPU does.
    bc1, bc2 = (torch.tensor(c, dtype=torch.float32, device=w.device) for c in (bc1, bc2))
    denom = exact_sqrt(v / bc2)
    denom.add_(eps)
    step = m / bc1
    step.div_(denom)
    step.mul_(eta)
    if w.dtype == torch.float32:
        w.sub_(step)
    else:
        w.copy_((w.to(torch.float32) - step).to(w.dtype))


def _is_plain_embedding(module: torch.nn.Module) -> bool:
    """An nn.Embedding itself (not a subclass with its own forward), whose forward reads only the looked-up rows."""
    return type(module) is torch.nn.Embedding and module.max_norm is None


class _FormPlan:
    """One family's (or one module's) perturbed copies on the C kernels' hot path, made at its first call and kept
    (Mezo._plan_for): its tensors are formed into buffers of their own, shared with the families of the same shapes one
    at a time (shared[0]: in use), by item arrays kept by the key table slots of the step and of the pending update
    (Mezo._planned_call), so that a family's call is a lookup and one C call a storage dtype where _form_list made a
    row of Python a tensor and an array a call, ~70 us a family inside a forward (120 families a step of SmolLM2;
    README: stop 30). bufs None: the hot path does not take every tensor of it."""

    def __init__(self, alone: list, shared: list | None, bufs: list | None):
        self.alone, self.shared, self.bufs = alone, shared, bufs
        self.names = [name for _, _, name, _ in alone]
        self.items = None if bufs is None else [(buf, p, name) for buf, (_, _, name, p) in zip(bufs, alone)]
        self.ptrs = [p.data_ptr() for *_, p in alone]  # where the tensors were: the arrays name them
        self.calls: dict[tuple, tuple[list, list]] = {}

    def put_in(self) -> None:
        """The buffers in the parameters' places, in their modules' parameter dicts (formed after: Mezo._form_list)."""
        for (params, key, _, _), buf in zip(self.alone, self.bufs):
            params[key] = buf

    def take_out(self) -> None:
        """The parameters back in their places; the buffers free for the next family of these shapes."""
        for params, key, _, p in self.alone:
            params[key] = p
        self.shared[0] = False


# ---- the engine ----------------------------------------------------------------------------------------------------

@dataclass
class _Pending:
    """An update left for the next perturbed forward (Mezo.apply_update): θ ← R(θ - c·z_step) for the tensors left."""

    step: int
    c: float
    names: set[str]  # the tensors left (their keys: Mezo._key_tensor, _key_addresses of `step`)
    c_on: dict  # c as an fp64 tensor on each device
    done: dict[str, int] = field(default_factory=dict)  # a tensor updated in part (row blocks): its elements done


# From this many elements a trainable nn.Linear weight is perturbed in row blocks during a perturbed forward
# (`Mezo.perturbed`'s linear_forward) rather than swapped whole for a perturbed copy: 8M (an LM head), in every dtype.
# Blocks of a smaller weight made its matmuls slower than the perturbed copy they save: with the rademacher32 kernels,
# whose perturbed copy costs about a weight copy, a bf16 perturbed forward of SmolLM2 took +0.090 s over a plain one
# with every linear blocked against +0.059 s with the LM head alone (gaussian: +0.139 / +0.084 s; one thread, medians
# of 9, the engines A/B in one process as `docs/bench_step_parts.py DTYPE N blocks Z` runs them; README "Half
# precision").
BLOCKED_LINEAR_ELEMENTS = 1 << 23
_KEY_TABLE = ("key table",)  # where Mezo._key_slot keeps a step's key table slot among its keys (names are strings)


class Mezo:
    """Perturbation and update over a trainable set, for one run (seed, ε, z distribution, rounding)."""

    DEFERS = True  # whether an update may be left pending for the next perturbed forward (apply_update)
    SMALL_TENSOR, EARLY_ELEMENTS = 1 << 16, 1 << 22  # see _hooked_by
    SMALL_MATMUL_TOKENS = 64  # see _block_rows
    ALONE = True  # see perturbed's swapping_alone
    FAMILIES = True  # see _hooked_by: the modules that alone own their tensors swapped by their parent's call
    PLANS = True  # see _plan_for: a family's hot-path call made once and kept
    # A blocked linear's blocks (linear_forward in perturbed) are formed in turn into this many buffers on CPU, where
    # its matmuls take more than SMALL_MATMUL_TOKENS tokens: a block buffer that the previous block's matmul has just
    # read (on both cores) was sometimes slow to write again. SmolLM2's bf16 LM head at 8 x 64 on a 2-core Zen 4,
    # its 48 blocks' kernels in a perturbed forward: 2.8-4.2 ms in most processes, 13-16.5 ms in some (the same
    # calls back to back: 2.8 ms); in such a process 13.1 -> 8.3 ms with 3 buffers, and in a loop of kernel + matmul
    # 16.1 -> 10.7 (2 buffers) -> 7.8 ms (3), no change where it was fast. Costs two blocks (2 x 1.2 MB) of scratch.
    BLOCK_BUFFERS = 3
    # From this many tokens in a module's input (rows of its first floating tensor argument, _tokens) the perturbed
    # copies formed for its call (a family's, a module's, a blocked linear's blocks) are written with streaming stores
    # where the C kernels have them (bf16 with AVX512-BF16: cpu_kernels' STREAMING): the matmuls that read them are
    # long enough to hide reading them from memory, and their buffers, evicted since their last use, cost no reading
    # back before the write. SmolLM2 bf16 on a 2-core Zen 4 (AVX512-BF16), steps streamed and not alternating in one
    # process, paired medians: 8 x 64 -35 ms (quartiles -48..-21; again, this threshold against none: -36, -75..-8),
    # 2 x 32 -32, 4 x 64 -6 / +6 (two runs); 1 x 8, 1 x 16, 1 x 32 +21 / +22 / +22 ms (a short matmul reads the copy
    # straight back from the caches); 1 x 48 +5 (README: stop 33).
    STREAM_TOKENS = 64

    def __init__(self, model: torch.nn.Module, trainable: TrainableSet, *, seed: int, eps: float,
                 distribution: str = "gaussian", rounding: str = "nearest", use_compile: bool = False,
                 rule: UpdateRule | AdamRule = UpdateRule(), estimator: str = "spsa",
                 directions: Directions = Directions(), large_linear: int | None = None, digest: dict = SUM_DIGEST):
        """estimator: how `step` scores its directions, "spsa" (two-point) or "fzoo" (one-sided, normalised); replay
        never needs it. directions: which tensors and elements each record's z touches (directions.py); dense by
        default. large_linear: a trainable nn.Linear weight of at least this many elements is perturbed in row
        blocks (None: BLOCKED_LINEAR_ELEMENTS). digest: the weights digest scheme of `digest()` (a resumed or replayed run: the one its trajectory
        holds)."""
        if distribution not in zrng.DISTRIBUTIONS:
            raise ValueError(f"unknown distribution {distribution!r}")
        if rounding not in ("nearest", "stochastic"):
            raise ValueError(f"unknown rounding {rounding!r}")
        if estimator not in ESTIMATORS:
            raise ValueError(f"unknown estimator {estimator!r}")
        if isinstance(rule, AdamRule) and rounding != "nearest":
            raise ValueError("the adam update rule rounds to nearest only")
        if isinstance(rule, AdamRule) and directions.kind != "dense":
            raise ValueError(f"the adam update rule needs dense directions (got {directions.kind})")
        if rounding == "stochastic" and directions.kind in ("sparse", "lowrank"):
            raise ValueError(f"stochastic rounding is not available with {directions.kind} directions")
        self.model, self.trainable = model, trainable
        self.seed, self.eps, self.distribution, self.rounding = seed, eps, distribution, rounding
        self.use_compile = use_compile
        self.rule, self.estimator = rule, estimator
        self.directions = directions
        self._names = tuple(trainable.names)
        self.use_digest(digest)
        self._window: deque = deque(maxlen=rule.window)  # the latest records (the momentum rule's only state)
        self.adam = AdamState.zeros(trainable.params) if isinstance(rule, AdamRule) else None
        self._name_of = {id(p): n for n, p in zip(trainable.names, trainable.params)}
        # Modules that own trainable parameters directly (a tied tensor has two owners). Plain embeddings and large
        # linear layers get a forward of their own inside `perturbed` (see there); the others swap in perturbed copies.
        self.linear_block_elements: int | None = None  # None: `_block_rows` chooses per device
        self._embeddings, self._large_linears = [], []
        self._owners: list[tuple[torch.nn.Module, list[torch.nn.Parameter]]] = []
        for module in model.modules():
            own = [p for p in module.parameters(recurse=False) if id(p) in self._name_of]
            if not own:
                continue
            weight = getattr(module, "weight", None)
            # never replace a forward someone else (accelerate) installed; a formed z is swapped in whole
            if "forward" not in module.__dict__ and not (id(weight) in self._name_of and directions.forms(weight)):
                if _is_plain_embedding(module) and id(weight) in self._name_of:
                    self._embeddings.append(module)
                    own = [p for p in own if p is not weight]
                elif (type(module) is torch.nn.Linear and id(weight) in self._name_of
                      and weight.numel() >= (BLOCKED_LINEAR_ELEMENTS if large_linear is None
                                             else large_linear)):
                    self._large_linears.append(module)
                    own = [p for p in own if p is not weight]
            self._owners.append((module, own))
        # each module's parent, where it has one (a module registered under two parents has none here)
        self._parent_of: dict[int, torch.nn.Module | None] = {}
        for parent in model.modules():
            for child in parent.children():
                self._parent_of[id(child)] = None if id(child) in self._parent_of else parent
        # Offloaded modules: their weights exist only inside a forward, loaded by accelerate; perturbed after that.
        self._offloaded = []
        if any(hasattr(m, "_hf_hook") for m in model.modules()):
            from .offload import offloaded_owners

            self._offloaded = offloaded_owners(model, trainable.names, trainable.params)
        self._scratch: dict[tuple, list[torch.Tensor]] = defaultdict(list)
        # the buffers of the kept hot-path calls (_plan_for), by their tensors' shapes: ([in use], buffers)
        self._plan_buffers: dict[tuple, tuple[list, list[torch.Tensor]]] = {}
        # defer_updates: leave each step's update pending, to be fused into the next perturbed forward (see
        # apply_update); the caller then calls flush() before reading the weights itself (train does)
        self.defer_updates = False
        self._pending: _Pending | None = None
        self._keys: dict[int, dict] = {}  # the two latest steps' keys, _step_key's and _key_tensor's (see there)
        # the C kernels' key tables, two slots made once (_key_slot), and each slot's name -> row address
        self._key_slots: list[torch.Tensor] = []
        self._slot_addresses: list[dict[str, int]] = []
        # inside `perturbed`: id(module) -> (its touched (name, parameter) pairs, their names, where it alone owns
        # them a (its parameter dict, key there, name, parameter) each, else None: _hooked_by)
        self._hooked: dict[int, tuple[list, list, list | None]] = {}
        self._hooked_cache: dict[frozenset, tuple] = {}  # _hooked_by's

    # -- keys
    def _step_keys(self, step: int) -> dict:
        """The keys kept for `step`, for the two steps asked for last: a step's two perturbed forwards and its update
        ask for each of ~300 names (a blake2b each), and a pending update of the step before (apply_update) may be
        flushed in between (an untied embedding's, at the first forward's exit), which must not drop them. The older
        of the two is dropped, not the lower step: a step run out of order (bench's extra call for the peak, a resume)
        would otherwise be kept for good and leave one place to the current step and its pending update, which then
        evicted each other at every tensor (bench, bf16: +400 ms a step, rebuilding the key tables)."""
        keys = self._keys.get(step)
        if keys is None:
            if len(self._keys) >= 2:
                del self._keys[next(iter(self._keys))]  # the one made first
            keys = self._keys[step] = {}
        return keys

    def _step_key(self, step: int, name: str) -> tuple[int, int]:
        """zrng.stream_key of z for (step, name), kept (_step_keys)."""
        keys = self._step_keys(step)
        key = keys.get(name)
        if key is None:
            key = keys[name] = zrng.stream_key(self.seed, step, name)
        return key

    def _key_tensor(self, step: int, name: str, offset: int, device) -> torch.Tensor:
        """zrng.key_tensor of (step, name) from element `offset`, kept (_step_keys) for the step's second perturbed
        forward."""
        key = self._step_key(step, name)
        keys = self._keys[step]
        cached = keys.get((name, offset, device))
        if cached is None:
            cached = keys[(name, offset, device)] = zrng.key_tensor(*key, offset, device)
        return cached

    def _key_addresses(self, step: int) -> dict[str, int]:
        """name -> the address of (k0, k1, 0), the key of z_step for that trainable tensor from element 0, in the step's
        key table, for the C kernels' hot path: a row of every trainable tensor, written at the step's first call into
        the one of two int64 tables (slots, made once) that the other step kept (_step_keys) does not hold. A slot's
        addresses never change, so that item arrays naming them can be kept (_FormPlan)."""
        return self._slot_addresses[self._key_slot(step)]

    def _key_slot(self, step: int) -> int:
        """The key table slot holding step `step`'s keys (_key_addresses), written there at the step's first call."""
        keys = self._step_keys(step)
        slot = keys.get(_KEY_TABLE)
        if slot is None:
            if not self._key_slots:
                for _ in range(2):
                    table, addresses = _key_rows([(0, 0, 0)] * len(self._names))
                    self._key_slots.append(table)
                    self._slot_addresses.append(dict(zip(self._names, addresses)))
            taken = {kept[_KEY_TABLE] for s, kept in self._keys.items() if s != step and _KEY_TABLE in kept}
            slot = keys[_KEY_TABLE] = 1 if 0 in taken else 0
            missing = [n for n in self._names if n not in keys]
            keys.update(zip(missing, zrng.stream_keys(self.seed, step, missing)))
            self._key_slots[slot].copy_(torch.tensor([(*keys[n], 0) for n in self._names],
                                                     dtype=torch.int64).view(-1, 3))
        return slot

    def _chunk_keys(self, step: int, name: str, numel: int, device, stream: int = zrng.Z_STREAM, offset: int = 0):
        """(a, b, key) per chunk of `numel` elements whose first one is the tensor's element `offset` (a shard's)."""
        k0, k1 = zrng.stream_key(self.seed, step, name, stream)
        return [(a, b, zrng.key_tensor(k0, k1, offset + a, device)) for a, b in zrng.chunks(numel)]

    def _weights(self):
        """(name, stored tensor, global index of its first element) per trainable tensor: the whole tensor here; a
        rank's shard of it in sharded.ShardedMezo."""
        return [(name, p.data, 0) for name, p in zip(self.trainable.names, self.trainable.params)]

    # -- contract 3
    @contextlib.contextmanager
    def perturbed(self, step: int, sign: int):
        """Inside this context the model computes with θ + sign·ε·z_step; the stored θ is never written, except by an
        update left pending (apply_update), which is applied on the way (θ is then the updated weights)."""
        kernel = zrng.kernel(zrng.perturb_kernel, self.use_compile)
        rows_kernel = zrng.kernel(zrng.perturb_rows_kernel, self.use_compile)
        eps_t: dict = {}
        swapped: dict[str, tuple[torch.nn.Parameter, torch.Tensor]] = {}
        handles = []
        touched = self.directions.touched(self.seed, step, self._names)
        c_kernels = cpu_kernels.library() if self.use_compile else None  # for _form_list

        def is_touched(p) -> bool:
            return self._name_of[id(p)] in touched

        def eps_on(device):
            if device not in eps_t:
                eps_t[device] = torch.tensor(sign * self.eps, dtype=torch.float64, device=device)
            return eps_t[device]

        def perturb(out: torch.Tensor, w: torch.Tensor, name: str, offset: int = 0) -> None:
            """out = θ ± εz for the elements [offset, offset + numel) of trainable tensor `name` (w: their values)."""
            self.flush([name])  # a pending update of a tensor that is not perturbed whole (swap_in fuses those)
            if self.directions.forms(w):  # the whole tensor (formed z never takes the row-block paths)
                z = self.directions.perturbation(self.seed, step, name, w, self.distribution)
                out.copy_((w.to(torch.float32) + eps_on(w.device).to(torch.float32) * z).to(out.dtype))
                return
            flat_w, flat_out = w.view(-1) if w.is_contiguous() else w.reshape(-1), out.view(-1)
            n = flat_w.numel()
            for a, b in zrng.chunks(n):
                # a whole tensor (most of them) unsliced: this runs for every tensor of every perturbed forward
                o, x = (flat_out, flat_w) if b - a == n else (flat_out[a:b], flat_w[a:b])
                kernel(o, x, self._key_tensor(step, name, offset + a, w.device), eps_on(w.device), self.distribution)

        def form_all(items, plan=None, stream=False):
            """buf = θ ± εz for the whole of tensor `name`, its pending update applied first, for each (buf, w, name)
            item (w: the tensor's stored values): by the C kernels' hot path (_form_list; plan: its kept call for
            these items; stream: see STREAM_TOKENS), else here."""
            for buf, w, name in (self._form_list(c_kernels, items, step, sign, plan, stream) if c_kernels is not None
                                 else items):
                w = w.detach()
                if not self._update_perturb(buf, w, name, step, eps_on(w.device)):
                    perturb(buf, w, name)

        def swap_in(named):
            """Point each (name, parameter) at θ ± εz formed into a scratch buffer; the stored θ is kept aside."""
            items = [(self._acquire(p.shape, p.dtype, p.device), p.data, name, p) for name, p in named
                     if name not in swapped]  # (not if already pointed at its perturbed copy: re-entrant, shared)
            form_all([item[:3] for item in items])  # before any is swapped: a flush there updates the stored θ
            for buf, orig, name, p in items:
                swapped[name] = (p, orig)
                p.data = buf

        def swap_out(names):
            for name in names:
                if name not in early_names:  # swapped for the whole forward, restored at its exit
                    self._restore(swapped.pop(name, None))

        def embedding_forward(module, ids):
            # A lookup reads only the rows of its ids: perturb those rows alone, and look up in them.
            w = module.weight
            name = self._name_of[id(w)]
            rows, inverse = torch.unique(ids, return_inverse=True)
            width = w.shape[1]
            index = (rows[:, None] * width + torch.arange(width, device=w.device)).reshape(-1)
            # A pending update of the table: applied to the gathered rows alone, the table left to the pass that fuses
            # it (a blocked LM head tied to it, else the context's exit); in part already: applied first.
            stored = w[rows].reshape(-1)
            if not self._update_rows(stored, index, name):
                self.flush([name])
                stored = w[rows].reshape(-1)
            values = torch.empty(index.numel(), dtype=w.dtype, device=w.device)
            key = self._key_tensor(step, name, 0, w.device)
            rows_kernel(values, stored, index, key, eps_on(w.device), self.distribution)
            return torch.nn.functional.embedding(inverse, values.view(-1, width))

        def linear_forward(module, x):
            # A large weight (an LM head) is perturbed and applied one block of output rows at a time, so its
            # perturbed copy never exists whole: the scratch is one block (or BLOCK_BUFFERS blocks).
            w = module.weight
            out_features, in_features = w.shape
            out = torch.empty(*x.shape[:-1], out_features, dtype=x.dtype, device=x.device)
            x2, o2 = x.reshape(-1, in_features), out.view(-1, out_features)
            rows = self._block_rows(w, x2.shape[0])
            # blocks formed in turn into BLOCK_BUFFERS buffers on CPU where a block's matmul is long (see there)
            count = min(-(-out_features // rows), self.BLOCK_BUFFERS if w.device.type == "cpu"
                        and x2.shape[0] > self.SMALL_MATMUL_TOKENS else 1)
            blocks = [self._acquire((min(rows, out_features), in_features), w.dtype, w.device) for _ in range(count)]
            name, bias = self._name_of[id(w)], module.bias
            stream = x2.shape[0] >= self.STREAM_TOKENS
            form = (self._block_former(c_kernels, w, name, step, sign, rows, stream) if c_kernels is not None
                    else None)
            try:
                # out= takes no autograd, which a perturbed forward never needs
                with torch.no_grad():
                    for i, a in enumerate(range(0, out_features, rows)):
                        b = min(a + rows, out_features)
                        part = blocks[i % count][: b - a]
                        # the C kernels' hot path (its pending update fused), else the general one: the update
                        # fused block by block (a flush first, where the kernels do not take them)
                        if form is None or not form(part, w[a:b], i):
                            if not self._update_perturb(part, w[a:b], name, step, eps_on(w.device),
                                                        offset=a * in_features, numel=w.numel()):
                                perturb(part, w[a:b], name, offset=a * in_features)
                        # what F.linear computes (mm, or addmm with the bias), written into the output's columns in
                        # place: assigning a block's result to them cost a copy (bf16 LM head: 46.6 -> 44.7 ms)
                        if bias is None:
                            torch.mm(x2, part.t(), out=o2[:, a:b])
                        else:
                            torch.addmm(bias[a:b], x2, part.t(), out=o2[:, a:b])
            finally:
                for block in blocks:
                    self._release(block)
            return out

        def swapping(module, forward):
            """module's forward with its touched tensors pointed at their perturbed copies for its duration."""
            named, names, alone = hooked[id(module)]
            if alone is not None and self.ALONE:
                return swapping_alone(forward, alone)

            def run(*args, **kwargs):
                swap_in(named)
                try:
                    return forward(*args, **kwargs)
                finally:
                    swap_out(names)

            return run

        def swapping_alone(forward, alone):
            """`swapping` for modules that alone own their touched tensors (every linear of a decoder layer), one
            module or the members of a family (_hooked_by) around their parent's call: the perturbed copies take the
            parameters' places in each module's own parameter dict (alone: (that dict, the tensor's key there, its
            name, the parameter) per tensor) for the call, which its forward reads them from (module.weight), instead
            of becoming the Parameters' .data (whose getter makes a tensor and whose setter checks and copies
            metadata, twice a tensor) with the context's bookkeeping; formed by a call kept for them (_plan_for) into
            buffers of its own, else into the pool's. A call that raises puts the parameters back here."""

            def run(*args, **kwargs):
                plan = self._plan_for(plans, alone) if c_kernels is not None else None
                stream = c_kernels is not None and _tokens(args, kwargs) >= self.STREAM_TOKENS
                try:
                    if plan is not None:
                        plan.put_in()
                        form_all(plan.items, plan, stream)
                    else:
                        items = []
                        for params, key, name, p in alone:
                            # in the dict before it is formed: released below if forming raises
                            buf = params[key] = self._acquire(p.shape, p.dtype, p.device)
                            items.append((buf, p, name))
                        form_all(items, stream=stream)
                    return forward(*args, **kwargs)
                finally:
                    if plan is not None:
                        plan.take_out()
                    else:
                        for params, key, _, p in alone:
                            if params[key] is not p:
                                self._release(params[key])
                                params[key] = p

            return run

        overridden, loading, early_names, early_plan = [], [], frozenset(), None
        try:
            hooked, (early, early_ids, early_alone), families, plans = self._hooked_by(touched)
            self._hooked = hooked
            # A module's own forward: a lookup of perturbed rows (plain embeddings), a perturbed matmul in row blocks
            # (large linears), and around it (or the class forward) the swap of the module's other touched tensors.
            # An instance attribute, not module hooks: with any global module hook every module call of the model
            # takes torch's slow path (+3.5 ms a forward of SmolLM2, against 0.8 ms for these attributes), and
            # registering per-module hooks costs more. A forward someone else installed (accelerate) keeps it: such
            # modules are swapped by two global hooks.
            forwards = {id(m): functools.partial(fn, m) for fns, fn in ((self._embeddings, embedding_forward),
                                                                        (self._large_linears, linear_forward))
                        for m in fns if is_touched(m.weight)}
            # the small tensors, for the whole forward (_hooked_by): in their modules' parameter dicts by one kept
            # call where those modules alone own them (as swapping_alone does), else as the Parameters' .data
            early_plan = self._plan_for(plans, early_alone) if early_alone and c_kernels is not None else None
            if early_plan is not None:
                early_plan.put_in()
                form_all(early_plan.items, early_plan)
            else:
                swap_in(early)
            early_names = frozenset(name for name, _ in early)
            by_hooks = set()
            in_family = set()
            for parent, members, alone in families if self.ALONE and self.FAMILIES else ():
                forward = functools.partial(type(parent).forward, parent)
                object.__setattr__(parent, "forward", swapping_alone(forward, alone))
                overridden.append(parent)
                in_family.update(id(m) for m in members)
            for module, _ in self._owners:
                if id(module) in early_ids or id(module) in in_family:
                    continue
                if id(module) in hooked and "forward" in module.__dict__:
                    by_hooks.add(id(module))
                elif id(module) in hooked or id(module) in forwards:
                    forward = forwards.get(id(module)) or functools.partial(type(module).forward, module)
                    # object's setattr: nn.Module's first checks whether the value is a parameter, buffer or module
                    # (~20 isinstance calls: 0.6 ms a forward of a 30-layer Llama, against 0.1)
                    object.__setattr__(module, "forward", swapping(module, forward) if id(module) in hooked
                                       else forward)
                    overridden.append(module)
            if by_hooks:
                def pre_hook(module, args):
                    if id(module) in by_hooks:
                        swap_in(hooked[id(module)][0])

                def post_hook(module, args, output):
                    if id(module) in by_hooks:
                        swap_out(hooked[id(module)][1])

                handles.append(torch.nn.modules.module.register_module_forward_pre_hook(pre_hook))
                handles.append(torch.nn.modules.module.register_module_forward_hook(post_hook))
            for module, hook, own in self._offloaded:  # swapped once accelerate has loaded the weights (offload.py)
                own = [(local, name) for local, name in own if name in touched]
                if own:
                    hook.on_load = lambda m, o=own: swap_in([(name, m._parameters[local]) for local, name in o])
                    hook.on_unload = lambda m, o=own: swap_out([name for _, name in o])
                    loading.append(hook)
            yield
        finally:
            for module in overridden:
                object.__delattr__(module, "forward")  # back to the class's forward
            for h in handles:
                h.remove()
            self._hooked = {}
            for hook in loading:
                hook.on_load = hook.on_unload = None
            for entry in list(swapped.values()):  # a forward that raised leaves nothing perturbed behind
                self._restore(entry)
            swapped.clear()
            if early_plan is not None:
                early_plan.take_out()
            self.flush()  # what this forward did not perturb whole (modules it did not run, a forward that raised)

    def _hooked_by(self, touched: frozenset) -> tuple[dict[int, tuple[list, list, list | None]],
                                                      tuple[list, set[int]], list, dict]:
        """(id(module) -> (its touched (name, parameter) pairs, their names, and if it alone owns them a (its
        parameter dict, the tensor's key there, name, parameter) each, else None) for the modules owning a touched
        tensor; the early swaps: the touched pairs `perturbed` swaps in for the whole forward, their modules' ids, and
        their `alone` entries in one list where each of those modules has them (else None);
        the families: (parent, its children, their `alone` entries in one list) triples; the _FormPlan made for each
        such list, by its id (_plan_for)), kept for the latest few sets (dense directions touch the same set every
        record, layerwise a new one).

        A family is the children of one module that alone own their touched tensors and would each be swapped around
        their own calls (a decoder layer's attention projections, its MLP's three linears): with FAMILIES (and ALONE)
        they are swapped around their parent's call instead, their perturbed copies formed in one call of the C
        kernels (Mezo._form_list), which costs less Python than a swap each (30 layers at width 64, bf16, 2 threads,
        Zen 3: a step 23 -> 15 ms beyond its two forwards, with the one call for the early swaps). Their copies are
        alive together for the parent's call (SmolLM2: an MLP's three, 2.7M elements, where one at a time was 0.9M).
        The parent must own no touched tensor itself, have no forward of its own but its class's (a ModuleList, which
        never runs, holds no family: its items are swapped around their own calls), and a child only the one parent.
        (Tried and left out, stop 31: a decoder layer's two families as one around the layer's call. 1 x 8 on the
        2-core Zen 3, paired medians: bf16 with the kernels no-ops -1.9 ms a step, with them -0.8 ms (quartiles
        -17..+10); fp32 +4.3 ms (-13..+30) -- probably its attention's copies, formed before the MLP's 10.6 MB, read
        back from further away.)

        A module whose touched tensors are all small (at most SMALL_TENSOR elements: norms, biases, adapters) has
        them swapped in when the perturbed forward starts, with the other such modules', rather than around each of
        its calls: a swap costs the same Python whatever the tensor's size (~30 us inside a forward, whose matmuls
        have just evicted the interpreter's data; SmolLM2: 61 norms, 122 swaps a step). Up to EARLY_ELEMENTS in all,
        so that their perturbed copies, alive for the whole forward, add little to its peak; not a module with a
        forward of its own (embeddings, large linears, one someone else installed) or holding the weight of one, and
        none where accelerate offloads (the weights exist only inside their modules' calls)."""
        cached = self._hooked_cache.get(touched)
        if cached is None:
            hooked, early, early_ids, taken, total = {}, [], set(), set(), 0
            special = (*self._embeddings, *self._large_linears)
            own_forward = {id(m) for m in special}
            # their weights too, wherever else owned (a tied LM head's): a lookup perturbs the stored rows itself
            read_whole = {self._name_of[id(m.weight)] for m in special}
            owners = Counter(self._name_of[id(p)] for module, params in self._owners for p in params)
            owners.update(read_whole)
            for module, params in self._owners:
                named = [(self._name_of[id(p)], p) for p in params if self._name_of[id(p)] in touched]
                if not named:  # a module with none touched runs untouched
                    continue
                # alone: no other module owns (or reads whole) any of them; then where each is in its parameter dict
                alone = None
                if all(owners[n] == 1 for n, _ in named) and not self._offloaded:
                    key_of = {id(v): k for k, v in module._parameters.items() if v is not None}
                    alone = [(module._parameters, key_of[id(p)], n, p) for n, p in named]
                hooked[id(module)] = (named, [n for n, _ in named], alone)
                size = sum(p.numel() for _, p in named)
                if (max(p.numel() for _, p in named) <= self.SMALL_TENSOR and total + size <= self.EARLY_ELEMENTS
                        and id(module) not in own_forward and "forward" not in module.__dict__
                        and not any(n in read_whole for n, _ in named) and not self._offloaded):
                    early += [(n, p) for n, p in named if n not in taken]  # a tensor two modules own: once
                    taken.update(n for n, _ in named)
                    early_ids.add(id(module))
                    total += size
            # families: a parent's children that alone own their touched tensors and are swapped around their own
            # calls, swapped instead around the parent's call (one swap of Python where there were several); a parent
            # that runs them: it owns no touched tensor, has no forward of its own but its class's, which is not
            # nn.Module's (a ModuleList never runs: its items would run unperturbed)
            def runs_children(m) -> bool:
                return (m is not None and id(m) not in hooked and id(m) not in own_forward
                        and "forward" not in m.__dict__ and type(m).forward is not torch.nn.Module.forward)

            members = defaultdict(list)
            for module, _ in self._owners:
                entry, parent = hooked.get(id(module)), self._parent_of.get(id(module))
                if (entry is not None and entry[2] is not None and id(module) not in early_ids
                        and id(module) not in own_forward and "forward" not in module.__dict__
                        and runs_children(parent)):
                    members[id(parent)].append((parent, module))
            families = [(pairs[0][0], [m for _, m in pairs], [x for _, m in pairs for x in hooked[id(m)][2]])
                        for pairs in members.values() if len(pairs) > 1]
            # the early swaps' `alone` entries in one list, where every one of their modules alone owns its tensors
            alone = [hooked[id(module)][2] for module, _ in self._owners if id(module) in early_ids]
            early_alone = [x for entry in alone for x in entry] if all(e is not None for e in alone) else None
            if len(self._hooked_cache) >= 4:
                del self._hooked_cache[next(iter(self._hooked_cache))]
            cached = self._hooked_cache[touched] = (hooked, (early, early_ids, early_alone), families, {})
        return cached

    def _block_rows(self, w: torch.Tensor, tokens: int | None = None) -> int:
        """Output rows of a large weight that `perturbed` forms and applies at a time (linear_forward), for a matmul
        over `tokens` input rows (None: many).

        linear_block_elements, when set, is the block's size in elements. By default, on CPU: the largest power of two
        of rows whose block takes at most 2 MiB, so that it is still in cache when the matmul reads it back; for
        SmolLM2's LM head (576 wide) that is 512 rows in fp32 and 1024 in bf16 (1.2 MB each). Measured on a 2-core
        EPYC with AVX512-BF16, 2 threads, 512 tokens (medians of 7; an unblocked matmul: 230 ms fp32, 57 ms bf16): fp32
        256 / 512 / 1024 rows 239 / 230 / 242 ms, bf16 256 / 512 / 1024 / 2048 rows 70 / 64 / 60 / 65 ms (with one
        thread, earlier, a 1 MiB block was 10-20 ms faster than blocks of 4M elements; row counts that are not a power
        of two were slower). Up to SMALL_MATMUL_TOKENS tokens the matmul reads a block about once, and a block's call
        (~25 us of Python, a C call, a matmul's start) costs more than a block that has left L2: blocks up to 4 MiB
        (8 MiB: no faster, and the 1 x 8 live-tensor peak 1.031 -> 1.044 of a forward's); from 128 tokens on, 4 MiB
        blocks gained little or lost (below).
        SmolLM2's LM head on the 2-core Zen 3 (AVX2), a perturbed forward of it, medians of 13: bf16 at 8 tokens
        1024 / 2048 / 4096 rows 32.7 / 32.2 / 31.7 and 34.9 / 33.6 / 33.7 ms (plain head 26.2, 28.1), at 64 tokens
        204 / 199 / 196, at 128 422 / 419 / 408, at 256 846 / 867 / 837, at 512 1609 / 1626 / 1629; fp32 at 8 tokens
        512 / 1024 / 2048 rows 17.5 / 16.1 / 15.6 ms, at 512 220 / 223 / 224.
        On CUDA: zrng.CHUNK elements, fewer launches."""
        in_features = w.shape[1]
        if self.linear_block_elements is not None:
            return max(1, self.linear_block_elements // in_features)
        if w.is_cuda:
            return max(1, zrng.CHUNK // in_features)
        block_bytes = (4 << 20) if tokens is not None and tokens <= self.SMALL_MATMUL_TOKENS else (2 << 20)
        fit = block_bytes // (w.element_size() * in_features)
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
        self._plan_buffers.clear()
        for entry in self._hooked_cache.values():
            entry[3].clear()  # the plans (they hold their buffers)

    def _plan_for(self, plans: dict, alone: list) -> "_FormPlan | None":
        """The kept hot-path call for a family's (or a module's) `alone` entries (swapping_alone), made at its first
        call (again where a tensor's storage moved); None where the C kernels' hot path would not take every tensor of
        it (their storage, layout, formed z), or its buffers are in use (a family called inside another of the same
        shapes): the caller's own path. Marks the buffers in use (the caller frees them)."""
        if not self.PLANS:
            return None
        plan = plans.get(id(alone))
        if plan is None or plan.ptrs != [p.data_ptr() for *_, p in alone]:  # (a tensor's storage moved: made again)
            if not all(self._c_takes(p.detach(), name, static=True) for _, _, name, p in alone):
                plans[id(alone)] = plan = _FormPlan(alone, None, None)
            else:
                shapes = tuple((tuple(p.shape), p.dtype) for *_, p in alone)
                shared = self._plan_buffers.get(shapes)
                if shared is None:
                    shared = self._plan_buffers[shapes] = ([False], [torch.empty(s, dtype=d) for s, d in shapes])
                plans[id(alone)] = plan = _FormPlan(alone, *shared)
        if plan.bufs is None or plan.shared[0]:
            return None
        plan.shared[0] = True
        return plan

    def loss_pair(self, step: int, loss_fn, reduce=None) -> tuple[float, float]:
        """(L+, L-) for step `step`: loss_fn() evaluated at θ + εz and at θ - εz.

        reduce (data parallel): loss_fn gives this rank's part of each loss, and reduce(part+, part-) the two losses
        of the global batch; both parts are computed first so that the ranks exchange them in one call."""
        with torch.no_grad():
            with self.perturbed(step, +1):
                lp = loss_fn()
            with self.perturbed(step, -1):
                lm = loss_fn()
        if reduce is not None:
            return reduce(lp, lm)
        return float(lp), float(lm)

    # -- contract 4
    def apply_update(self, step: int, c: float) -> None:
        """θ ← R(θ - c·z_step) for every trainable tensor the step's directions touch. c == 0 changes no bit (and is
        not even computed).

        With defer_updates, where the kernels cover it (round to nearest, dense or layerwise z, contiguous tensors on
        CPU with the C kernels or on CUDA with Triton, the two-point estimator, no offloading), the update is left
        pending: the next perturbed forward applies it to each tensor in the same pass that forms the tensor's
        perturbed copy (zrng.update_perturb: one read of the weights instead of two; the same bits as the update then
        the perturbation), a blocked linear's block by block; an embedding's lookup updates the rows it gathers and
        leaves the table to a blocked LM head tied to it; the forward's exit updates whatever is left. Anything else
        that reads the weights calls flush() first: digest and rule_state do; a caller that reads the model itself (an
        eval, a save) must."""
        if c == 0.0:
            return
        self.flush()
        if self.defer_updates and self._defers():
            touched = self.directions.touched(self.seed, step, self._names)
            weights = [(name, w) for name, w, _ in self._weights() if name in touched]
            devices = {w.device for _, w in weights}
            self._pending = _Pending(step, c, {name for name, _ in weights},
                                     {d: torch.tensor(c, dtype=torch.float64, device=d) for d in devices})
            return
        self._update_now(step, c)

    def _defers(self) -> bool:
        """Whether an update may be left pending (see apply_update)."""
        return (self.DEFERS and self.use_compile and self.rounding == "nearest" and self.adam is None
                and self.estimator == "spsa" and self.directions.kind in ("dense", "layerwise")
                and not self._offloaded
                and all(w.is_contiguous() and zrng.fuses_updates(w) for _, w, _ in self._weights()))

    def _update_perturb(self, out: torch.Tensor, w: torch.Tensor, name: str, step: int, eps: torch.Tensor,
                        offset: int = 0, numel: int | None = None) -> bool:
        """The pending update of tensor `name` and its perturbation by ±ε (eps: an fp64 tensor on w's device) into
        out, in one pass, for w: the whole tensor, or (a blocked LM head) its elements from `offset` of `numel`, taken
        in order. False where there is none for them (or the kernels do not take them: the caller perturbs, after a
        flush, which updates what is left)."""
        pending = self._pending
        if pending is None or name not in pending.names or pending.done.get(name, 0) != offset:
            return False
        ukey = self._key_tensor(pending.step, name, offset, w.device)  # kept with the step's (_step_keys)
        key = self._key_tensor(step, name, offset, w.device)
        if not zrng.update_perturb(out, w, key, eps, ukey, pending.c_on[w.device], self.distribution):
            return False
        self._updated_to(name, offset + w.numel(), w.numel() if numel is None else numel)
        return True

    def _form_list(self, lib, items: list, step: int, sign: int, plan: "_FormPlan | None" = None,
                   stream: bool = False) -> list:
        """out = θ ± εz_step for each (out, w, name) item, the whole of tensor `name` (w: its values, out a scratch
        buffer of its shape and dtype), its pending update applied first in the same pass, by the C kernels (lib): what
        `perturbed` does for most tensors of most forwards (a contiguous CPU tensor of a C storage dtype, z from the
        dense kernels, an update pending whole or not at all), one call a storage dtype (cpu_kernels.form_list: a
        module's, a family's or the early swaps' tensors at once), with the keys' addresses and plain floats; the same
        kernels and arguments as the general path (zrng.update_perturb, then the perturbation kernel's C twin).
        Returns the items it does not take, for that path. plan: the kept call for exactly these items, with its
        buffers as the outs (_plan_for), used where it still holds (a caller may pass part of them). stream: the
        copies written with streaming stores (STREAM_TOKENS)."""
        if plan is not None and len(items) == len(plan.names):
            kept = self._planned_call(plan, step)
            if kept is not None:
                calls, updated = kept
                eps, dist = sign * self.eps, zrng.distribution_code(self.distribution)
                for kind, array, c in calls:
                    cpu_kernels.form_list(lib, array, eps, c, kind, dist, stream)
                if updated:
                    self._updated(updated)
                return []
        pending, by_kind, rest, updated = self._pending, {}, [], []
        keys = self._key_addresses(step)
        left = pending.names if pending is not None else ()
        ukeys = self._key_addresses(pending.step) if left else None
        for item in items:
            out, w, name = item
            if not self._c_takes(w, name):
                rest.append(item)
                continue
            ukey = 0
            if name in left:
                ukey = ukeys[name]
                updated.append(name)
            _add_item(by_kind, out, w, keys[name], ukey)
        for kind, rows in by_kind.items():
            cpu_kernels.form_list(lib, rows, sign * self.eps, pending.c if updated else 0.0, kind,
                                  zrng.distribution_code(self.distribution), stream)
        if updated:
            self._updated(updated)
        return rest

    def _c_takes(self, w: torch.Tensor, name: str, static: bool = False) -> bool:
        """Whether the C kernels' hot path (_form_list, _block_former) forms tensor `name`'s perturbed copy from w (its
        stored values): a contiguous CPU tensor of a C storage dtype, z from the dense kernels, its pending update (if
        any) not applied in part (static: the tensor's part alone)."""
        pending = self._pending
        return (w.dtype in cpu_kernels.KINDS and w.is_cpu and w.is_contiguous() and not self.directions.forms(w)
                and (static or not (pending is not None and name in pending.names and pending.done.get(name, 0))))

    def _planned_call(self, plan: "_FormPlan", step: int) -> tuple[list, list] | None:
        """The C calls of plan for step `step` and the pending update: ([(kind, item array, c)], the names it updates),
        made at the first call of each (key slot, update slot, tensors with an update pending) and kept; None where a
        tensor's pending update is applied in part."""
        pending = self._pending
        left = pending.names if pending is not None else ()
        fused = tuple(name in left for name in plan.names)
        if any(fused) and pending.done and any(name in pending.done for name in plan.names):
            return None
        kslot = self._key_slot(step)
        uslot = self._key_slot(pending.step) if any(fused) else None
        kept = plan.calls.get((kslot, uslot, fused))
        if kept is None:
            keys, ukeys = self._slot_addresses[kslot], self._slot_addresses[uslot] if uslot is not None else None
            by_kind = {}
            for (*_, name, p), buf, f in zip(plan.alone, plan.bufs, fused):
                _add_item(by_kind, buf, p, keys[name], ukeys[name] if f else 0)
            kept = plan.calls[(kslot, uslot, fused)] = (
                [(kind, cpu_kernels.form_items(rows), any(rows[4::5])) for kind, rows in by_kind.items()],
                [name for name, f in zip(plan.names, fused) if f])
        calls, updated = kept
        return [(kind, array, pending.c if uses_c else 0.0) for kind, array, uses_c in calls], updated

    def _block_former(self, lib, w: torch.Tensor, name: str, step: int, sign: int, rows: int, stream: bool = False):
        """For a perturbed forward's blocked linear (weight w, blocks of `rows` output rows): form(part, w_block, i)
        forming part = θ ± εz_step for block i (w_block: its rows of w), the pending update fused in order, by the C
        kernels directly, one call a block with the keys' addresses made once a step. The general path's checks and
        conversions cost ~110 us of Python a block inside a forward: SmolLM2's bf16 LM head at 1 x 8 tokens, 48 blocks,
        the kernels made no-ops, took 36.5 ms on it against 30.2 for the plain head, and 25.3 against 23.7 on this one
        (2-vCPU Zen 3). form returns False, doing nothing, where the kernels do not take the block. None where
        _form_list would not take w: the caller's general path. stream: the blocks written with streaming stores
        (STREAM_TOKENS)."""
        if not self._c_takes(w, name):
            return None
        pending = self._pending
        fused = pending is not None and name in pending.names
        keys = self._block_keys(step, name, w, rows)
        ukeys = self._block_keys(pending.step, name, w, rows) if fused else None
        eps, dist = sign * self.eps, zrng.distribution_code(self.distribution)

        def form(part, w_block, i) -> bool:
            if ukeys is None or self._pending is not pending or name not in pending.names:
                return cpu_kernels.perturb_whole(lib, part, w_block, keys[i], eps, dist, stream=stream)
            if not cpu_kernels.perturb_whole(lib, part, w_block, keys[i], eps, dist, ukeys[i], pending.c, stream):
                return False
            self._updated_to(name, min((i + 1) * rows, w.shape[0]) * w.shape[1], w.numel())
            return True

        return form

    def _block_keys(self, step: int, name: str, w: torch.Tensor, rows: int) -> list[int]:
        """The addresses of the keys of z_step for tensor `name` (w) from the first element of each block of `rows`
        rows, in one int64 table kept with the step's keys (_step_keys)."""
        keys = self._step_keys(step)
        table = keys.get((_KEY_TABLE, name, rows))
        if table is None:
            k0, k1 = self._step_key(step, name)
            table = keys[(_KEY_TABLE, name, rows)] = _key_rows([(k0, k1, a * w.shape[1])
                                                                 for a in range(0, w.shape[0], rows)])
        return table[1]

    def _update_rows(self, values: torch.Tensor, index: torch.Tensor, name: str) -> bool:
        """Values gathered from tensor `name` at element `index`, updated in place as the pending update would
        update them there (the tensor itself left pending); False where the tensor is updated in part (the caller
        flushes it and gathers again)."""
        pending = self._pending
        if pending is None or name not in pending.names:
            return True  # nothing pending: the stored values are current
        if pending.done.get(name, 0):
            return False
        kernel = zrng.kernel(zrng.update_rows_kernel, self.use_compile)
        kernel(values, index, self._key_tensor(pending.step, name, 0, values.device), pending.c_on[values.device],
               self.distribution)
        return True

    def flush(self, names=None) -> None:
        """Apply what is left of a pending update (see apply_update): to every tensor, or to those of `names`."""
        pending = self._pending
        if pending is None:
            return
        todo = set(pending.names) if names is None else pending.names & set(names)
        if not todo:
            return
        self._update_now(pending.step, pending.c, todo, pending.done)
        self._updated(todo)

    def _updated_to(self, name: str, upto: int, numel: int) -> None:
        """Tensor `name` (numel elements) has had the pending update up to element `upto` (a blocked linear's blocks,
        in order): from there a flush updates the rest; all of it: done."""
        if upto < numel:
            self._pending.done[name] = upto
        else:
            self._updated([name])

    def _updated(self, names) -> None:
        """These tensors have had the pending update: nothing is pending once none is left."""
        pending = self._pending
        for name in names:
            pending.names.remove(name)
            pending.done.pop(name, None)
        if not pending.names:
            self._pending = None

    def _update_now(self, step: int, c: float, names=None, done: dict[str, int] | None = None) -> None:
        """apply_update's θ ← R(θ - c·z_step), applied now, to the tensors the step touches (of `names`, if given);
        done: elements already updated at the start of a tensor (a pending update applied in part, round to nearest)."""
        stochastic = zrng.kernel(zrng.update_kernel_stochastic, self.use_compile)
        c_t = {}
        touched = self.directions.touched(self.seed, step, self._names)
        if names is not None:
            touched = touched & frozenset(names)
        nearest, strided = [], []  # round to nearest: all in one zrng.update_tensors call
        with torch.no_grad():
            for name, w, offset in self._weights():
                if name not in touched:
                    continue
                if w.device not in c_t:
                    c_t[w.device] = torch.tensor(c, dtype=torch.float64, device=w.device)
                if self.directions.forms(w):
                    z = self.directions.update_direction(self.seed, step, name, w, self.distribution)
                    w.copy_((w.to(torch.float64) - c_t[w.device] * z.to(torch.float64)).to(torch.float32).to(w.dtype))
                    continue
                flat = w.view(-1) if w.is_contiguous() else w.reshape(-1).clone()
                if not w.is_contiguous():
                    strided.append((w, flat))
                if self.rounding == "nearest":
                    start = done.get(name, 0) if done else 0
                    nearest.append((flat[start:], self._step_key(step, name), offset + start))
                    continue
                keys = self._chunk_keys(step, name, w.numel(), w.device, offset=offset)
                rkeys = self._chunk_keys(step, name, w.numel(), w.device, zrng.ROUNDING_STREAM, offset)
                for (a, b, key), (_, _, rkey) in zip(keys, rkeys):
                    stochastic(flat[a:b], key, rkey, c_t[w.device], self.distribution)
            zrng.update_tensors(nearest, c, self.distribution, self.use_compile)
            for w, flat in strided:
                w.copy_(flat.view_as(w))

    def step(self, step: int, eta: float, loss_fn, directions: int = 1, recorded: list | None = None,
             reduce=None) -> list[dict]:
        """One optimizer step: `directions` = K estimates at the same θ, then their updates in order. Direction k is
        trajectory record `step·K + k`, with its own z (keyed by the record), g and η/K, so replay applies records one
        by one and knows nothing of K or of the estimator. `recorded`: records of this step already in the trajectory
        (a resume that stopped inside the step); their forwards are not redone. Returns the records to append (a record
        is skipped when a loss or its scale c is not finite).

        The run's estimator scores the directions: "spsa" (n-SPSA; K = 1 is the paper's MeZO) two forwards each,
        g_k = (L+ - L-)/2ε; "fzoo" one forward each at θ + εz_k plus one at θ, g_k from `normalised_differences`.
        reduce (data parallel): see loss_pair."""
        recorded = list(recorded or [])
        eta_k = float(np.float32(eta / directions))
        first = step * directions
        if self.estimator == "fzoo":
            records = self._score_fzoo(first, directions, eta_k, loss_fn, recorded, reduce)
        else:
            records = recorded + self._score_spsa(first + len(recorded), first + directions, eta_k, loss_fn, reduce)
        for rec in records:
            self.apply_record(rec)
        return records[len(recorded):]

    def _score_spsa(self, start: int, stop: int, eta_k: float, loss_fn, reduce=None) -> list[dict]:
        """Two-point records start .. stop - 1: L± = loss(θ ± εz_r), g = (L+ - L-)/2ε."""
        records = []
        for r in range(start, stop):
            lp, lm = self.loss_pair(r, loss_fn, reduce)
            records.append(_record(r, projected_gradient(lp, lm, self.eps), eta_k, lp, lm))
        return records

    def _score_fzoo(self, first: int, n: int, eta_k: float, loss_fn, recorded: list[dict], reduce=None) -> list[dict]:
        """FZOO's N one-sided records first .. first + N - 1 (loss_plus = l_i = loss(θ + εz_i), loss_minus = l_0 =
        loss(θ), shared). g depends on all N losses, so a resume inside the step takes the recorded directions' l_i and
        l_0 from their records and scores only the rest. reduce (data parallel, see loss_pair): each direction's part
        is reduced together with l_0's part (one all-reduce per direction); l_0 is then scored again on a resume, and
        the recorded one kept."""
        with torch.no_grad():
            base_part = loss_fn() if not recorded or reduce is not None else None
            parts = []
            for r in range(first + len(recorded), first + n):
                with self.perturbed(r, +1):
                    parts.append(loss_fn())
        pairs = [reduce(base_part, part) if reduce else (base_part, float(part)) for part in parts]
        base = recorded[0]["loss_minus"] if recorded else float(pairs[0][0])
        losses = [rec["loss_plus"] for rec in recorded] + [loss for _, loss in pairs]
        gs = normalised_differences(losses, base)
        return [_record(first + i, g, eta_k, loss, base) for i, (g, loss) in enumerate(zip(gs, losses))]

    def apply_record(self, rec) -> None:
        """The update one trajectory record stands for, by the run's update rule (train, resume and replay all apply
        records through this, in order)."""
        step, eta, g, skipped = _fields(rec)
        if self.adam is not None:
            if not skipped:
                self._apply_adam(step, eta, g)
            return
        self._window.append((step, g, skipped))
        if skipped:
            return
        for past_step, past_g, past_skipped in self._window:  # oldest first; SGD: the window is this record, w_0 = 1
            c = applied_scale(float(np.float32(eta * self.rule.weights[step - past_step])), past_g, past_skipped)
            if c is not None:
                self.apply_update(past_step, c)

    def _apply_adam(self, step: int, eta: float, g: float) -> None:
        """AdamRule for one record: z_step generated again chunk by chunk (the same keys and kernel as every other z),
        and `adam_update` on each chunk of weights and moments; with compiled kernels on CPU, fp32 weights go through
        its C twin (cpu_kernels.adam_f32: the same bits in one pass, z generated inline by the C generator)."""
        corrections = self.adam.advance(self.rule)
        z_kernel = zrng.kernel(zrng.z_kernel, self.use_compile)
        scalars = None
        with torch.no_grad():
            for name, p, m, v in zip(self.trainable.names, self.trainable.params, self.adam.m, self.adam.v):
                w = p.data
                if self.use_compile and w.device.type == "cpu":  # the C twin, one pass with z inline, if it covers w
                    from . import cpu_kernels

                    if scalars is None:
                        scalars = torch.tensor(adam_scalars(self.rule, g, eta, corrections), dtype=torch.float32)
                    key = zrng.key_tensor(*zrng.stream_key(self.seed, step, name))
                    if cpu_kernels.adam(w, m, v, key, scalars, self.distribution):
                        continue
                flat = w.view(-1) if w.is_contiguous() else w.reshape(-1).clone()
                z = torch.empty(min(w.numel(), zrng.CHUNK), dtype=torch.float32, device=w.device)
                for a, b, key in self._chunk_keys(step, name, w.numel(), w.device):
                    z_kernel(z[: b - a], key, self.distribution)
                    adam_update(flat[a:b], m.view(-1)[a:b], v.view(-1)[a:b], z[: b - a], g, eta, self.rule,
                                corrections)
                if not w.is_contiguous():
                    w.copy_(flat.view_as(w))

    def rule_state(self) -> tuple[dict[str, torch.Tensor], dict]:
        """The update rule's state for a checkpoint: (tensors by name, JSON-able scalars); empty for rules without
        stored state (sgd, momentum: its window is rebuilt from the records)."""
        self.flush()
        if self.adam is None:
            return {}, {}
        tensors = {}
        for name, m, v in zip(self.trainable.names, self.adam.m, self.adam.v):
            tensors[f"{ADAM_PREFIX}m/{name}"], tensors[f"{ADAM_PREFIX}v/{name}"] = m, v
        return tensors, {"count": self.adam.count, "beta1_power": self.adam.beta1_power,
                         "beta2_power": self.adam.beta2_power}

    def load_rule_state(self, tensors: dict[str, torch.Tensor], scalars: dict) -> None:
        """Put back what `rule_state` saved (KeyError when the checkpoint lacks it)."""
        if self.adam is None:
            return
        if not isinstance(scalars, dict):
            raise KeyError("rule_state")
        count, powers = scalars["count"], (scalars["beta1_power"], scalars["beta2_power"])
        saved = [(tensors[f"{ADAM_PREFIX}m/{n}"], tensors[f"{ADAM_PREFIX}v/{n}"]) for n in self.trainable.names]
        with torch.no_grad():  # nothing is changed before everything was found
            for (m_saved, v_saved), m, v in zip(saved, self.adam.m, self.adam.v):
                m.copy_(m_saved)
                v.copy_(v_saved)
        self.adam.count, (self.adam.beta1_power, self.adam.beta2_power) = count, powers

    def remember(self, records) -> None:
        """Records already applied to the weights (a resume from a checkpoint): the window the rule reads, not
        applied again."""
        for rec in records:
            step, _, g, skipped = _fields(rec)
            self._window.append((step, g, skipped))

    def use_digest(self, scheme: dict) -> None:
        """Digest by this scheme from now on (a resumed run: the one its trajectory holds). An unknown scheme is
        refused here (ValueError), not at the first keyframe."""
        weights_digest([], scheme)
        self.digest_scheme = scheme

    def digest(self) -> bytes:
        """The weights digest of the trainable tensors now (keyframes, the end block, checkpoints)."""
        self.flush()
        return weights_digest(self.trainable.params, self.digest_scheme)


def _add_item(by_kind: dict, out: torch.Tensor, w: torch.Tensor, key: int, ukey: int) -> None:
    """Tensor w's item for cpu_kernels.form_list (out: its perturbed copy's buffer; key, ukey: key row addresses, ukey 0
    for no pending update), appended to its storage kind's list."""
    by_kind.setdefault(cpu_kernels.KINDS[w.dtype], []).extend((out.data_ptr(), w.data_ptr(), w.numel(), key, ukey))


def _tokens(args: tuple, kwargs: dict) -> int:
    """The rows of a call's first floating tensor argument of two or more dimensions (its elements over its last
    dimension): the tokens a module's matmuls take (a decoder layer's attention or MLP: its hidden states); 0 if it
    has none."""
    for a in (*args, *kwargs.values()):
        if isinstance(a, torch.Tensor) and a.dim() >= 2 and a.is_floating_point():
            return a.numel() // max(1, a.shape[-1])
    return 0


def _key_rows(rows: list[tuple[int, int, int]]) -> tuple[torch.Tensor, list[int]]:
    """(k0, k1, offset) key rows in one int64 tensor, and each row's address, for the C kernels' hot path (the
    tensor must be kept alive as long as the addresses are used)."""
    table = torch.tensor(rows, dtype=torch.int64).view(-1, 3)
    stride = table.stride(0) * table.element_size()
    return table, [table.data_ptr() + stride * i for i in range(len(rows))]


def _record(r: int, g: float, eta: float, loss_plus: float, loss_minus: float) -> dict:
    """A trajectory record as `step` returns it; skipped when g (a loss) or c = fp32(η·g) is not finite."""
    return {"step": r, "g": g, "eta": eta, "loss_plus": loss_plus, "loss_minus": loss_minus,
            "skipped": applied_scale(eta, g) is None}


def _fields(rec) -> tuple[int, float, float, bool]:
    """(step, eta, g, skipped) of a record: a trajectory StepRecord or the dict Mezo.step returns."""
    get = rec.get if isinstance(rec, dict) else functools.partial(getattr, rec)
    return get("step"), get("eta"), get("g"), get("skipped")
