"""Which directions z a record perturbs and updates along (DESIGN.md contract 7, the "direction" axis).

    dense       every trainable tensor, z = Z(seed, record, name): the paper's MeZO (the zrng kernels, unchanged).
    layerwise   per record, `count` of the trainable tensors, chosen by seed: z is dense on them; the others get no z,
                no scratch buffer, no hook and no update. The choice ranks the tensors by zrng.stream_key(seed, record,
                name, LAYER_STREAM) (blake2b: the same on every machine) and keeps the `count` smallest.
    sparse      z ⊙ m with a 0/1 mask m of about `fraction` of each tensor's elements (Sparse MeZO, Liu et al. 2024):
                  random     m_i = [bits_i < fraction·2**32], bits from the MASK_STREAM of (seed, record, name): a fresh
                             mask per record, independent of z and of the weights;
                  magnitude  m_i = [|θ_i| <= τ], the paper's choice: perturb the small weights. τ is the exact k-th
                             smallest |θ| of a fixed seed-chosen sample of SAMPLE elements (k = round(fraction·S)):
                             selection and comparisons only, no float quantile, so every device finds the same τ. It is
                             computed from the weights as they are when the record's z is formed (contract 7), which is
                             the same moment in train, resume and replay.
    lowrank     for 2-D tensors z = U Vᵀ of rank r (LOZO, Chen et al. 2024): U (rows × r) from the U_STREAM of the
                record, V (cols × r) from the V_STREAM of record // v_every (V is kept for v_every records, "lazy
                sampling"); the update moves along U Vᵀ / r, as the paper's estimator does. Other tensors: dense z.

Bit-exactness of the formed z (sparse, low-rank): U, V and z values are integers times 2**-8 below 3 in magnitude (the
Gaussian of zrng) or ±1; a product U_ik·V_jk is an integer times 2**-16 below 9, and a sum of r <= 16 of them stays
below 2**8, so every partial sum has at most 24 significant bits: exact in fp32, whatever the order of summation.
Dividing by r (a power of two) is exact too, and c·z has at most 48 significant bits: exact in fp64, as the dense
update's product is. The z are formed with eager elementwise torch ops (no matmul, whose TF32/bf16 modes would round).
Cost: a formed z is one fp32 tensor the size of the weight (plus int64 temporaries for the mask), made three times a
record (two forwards, one update), where the dense kernels never materialise z.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch

from . import zrng

# zrng streams: 0 = z, 1 = stochastic rounding, 2 = adapter initial values (adapters.py); these are the directions'.
MASK_STREAM, U_STREAM, V_STREAM, LAYER_STREAM = 3, 4, 5, 6
KINDS = ("dense", "layerwise", "sparse", "lowrank")
SAMPLE = 4096  # elements sampled per tensor for the magnitude threshold
VERSION = 1


@dataclass(frozen=True)
class Directions:
    """The run's direction choice and its parameters (only those of `kind` matter). Methods are pure functions of
    (seed, record, name, weights)."""

    kind: str = "dense"
    count: int = 0  # layerwise: tensors per record (resolved against the trainable set by `resolved`)
    fraction: float = 1.0  # layerwise: of the tensors (when count = 0); sparse: of each tensor's elements
    mask: str = "random"  # sparse
    rank: int = 1  # lowrank
    v_every: int = 1  # lowrank: records that share one V

    # ---- header (contract 7: named and versioned) ----------------------------------------------------------------
    def header(self) -> dict:
        if self.kind == "dense":
            return {"name": "dense"}
        params = {"layerwise": {"count": self.count, "fraction": self.fraction},
                  "sparse": {"mask": self.mask, "fraction": self.fraction},
                  "lowrank": {"rank": self.rank, "v_every": self.v_every}}[self.kind]
        return {"name": self.kind, "version": VERSION, **params}

    @classmethod
    def from_header(cls, entry: dict | None) -> "Directions":
        entry = entry or {"name": "dense"}
        name = entry.get("name")
        if name == "dense":
            return cls()
        if name in KINDS and entry.get("version") == VERSION:
            return cls(name, **{k: v for k, v in entry.items() if k not in ("name", "version")})
        raise ValueError(f"directions {entry!r}: this mezo-tune knows {', '.join(KINDS)} v{VERSION}")

    @classmethod
    def from_recipe(cls, mezo) -> "Directions":
        """The [mezo] section's choice (layerwise count still unresolved when given as a fraction)."""
        kind = mezo.direction_type
        if kind == "layerwise":
            return cls(kind, count=mezo.layer_count, fraction=mezo.layer_fraction)
        if kind == "sparse":
            return cls(kind, fraction=mezo.sparse_fraction, mask=mezo.sparse_mask)
        if kind == "lowrank":
            return cls(kind, rank=mezo.lowrank_rank, v_every=mezo.lowrank_v_every)
        return cls()

    def resolved(self, n_tensors: int) -> "Directions":
        """Layerwise with count = 0: the count the fraction gives for this trainable set (the nearest whole number of
        tensors, at least one). Raises ValueError when a count exceeds the set."""
        if self.kind != "layerwise":
            return self
        if self.count > n_tensors:
            raise ValueError(f"mezo.layer_count = {self.count} but the trainable set has {n_tensors} tensors")
        count = self.count or max(1, round(self.fraction * n_tensors))
        return Directions(self.kind, count=count, fraction=self.fraction)

    def describe(self) -> str:
        """One line for `train --dry-run`: what a record perturbs, and what it costs beside dense MeZO."""
        formed = ("z formed per tensor in eager fp32 three times a record (no fused kernel): extra memory of about "
                  "4-8 bytes per element of the largest such tensor")
        if self.kind == "layerwise":
            return (f"layerwise, {self.count} trainable tensors per record (chosen by seed); the others get no z, no "
                    "hook and no update")
        if self.kind == "sparse":
            how = ("the smallest |θ| (threshold: exact k-th value of a 4096-element sample)"
                   if self.mask == "magnitude" else "a seed-random mask")
            return f"sparse, about {self.fraction:.0%} of each tensor's elements, {how}; {formed}"
        if self.kind == "lowrank":
            return (f"lowrank, z = U Vᵀ of rank {self.rank} for 2-D tensors (V kept {self.v_every} records), "
                    f"dense for the others; {formed}")
        return "dense, every element of every trainable tensor (fused kernels, z never stored)"

    # ---- which tensors, and which of them get a formed z ---------------------------------------------------------
    def touched(self, seed: int, record: int, names: tuple[str, ...]) -> frozenset[str]:
        """The tensors record `record` perturbs and updates."""
        if self.kind != "layerwise":
            return frozenset(names)
        return _chosen(seed, record, names, self.count)

    def forms(self, w: torch.Tensor) -> bool:
        """Whether w's z is formed here (`perturbation`, `update_direction`) rather than by zrng's dense kernels."""
        return self.kind == "sparse" or (self.kind == "lowrank" and w.dim() == 2)

    # ---- formed z ------------------------------------------------------------------------------------------------
    def perturbation(self, seed: int, record: int, name: str, w: torch.Tensor, distribution: str) -> torch.Tensor:
        """z of the two forwards, fp32, shaped like w (w: the stored weights, read by the magnitude mask)."""
        if self.kind == "sparse":
            z = zrng.z_for(seed, record, name, w.numel(), distribution, device=w.device)
            return self._masked(z, seed, record, name, w).view(w.shape)
        return _low_rank(seed, record, record // self.v_every, name, tuple(w.shape), self.rank, distribution, w.device)

    def update_direction(self, seed: int, record: int, name: str, w: torch.Tensor,
                         distribution: str) -> torch.Tensor:
        """z of the update, fp32: the perturbation, divided by r for low rank (LOZO's estimator; exact)."""
        z = self.perturbation(seed, record, name, w, distribution)
        return z * (1.0 / self.rank) if self.kind == "lowrank" else z

    def _masked(self, z: torch.Tensor, seed: int, record: int, name: str, w: torch.Tensor) -> torch.Tensor:
        """z ⊙ m in place, a chunk of zrng.CHUNK elements at a time (bounds the mask's temporaries)."""
        flat_w = w.reshape(-1)
        tau = magnitude_threshold(seed, name, w, self.fraction) if self.mask == "magnitude" else None
        for a, b in zrng.chunks(z.numel()):
            if tau is None:
                z[a:b] *= random_mask(seed, record, name, b - a, self.fraction, w.device, offset=a)
            else:
                z[a:b] *= (flat_w[a:b].abs() <= tau).to(torch.float32)
        return z

    def mask_of(self, seed: int, record: int, name: str, w: torch.Tensor) -> torch.Tensor:
        """The 0/1 mask of a sparse record, as a bool tensor shaped like w (for tests and inspection)."""
        ones = torch.ones(w.numel(), dtype=torch.float32, device=w.device)
        return self._masked(ones, seed, record, name, w).view(w.shape).bool()


@functools.lru_cache(maxsize=64)
def _chosen(seed: int, record: int, names: tuple[str, ...], count: int) -> frozenset[str]:
    """The `count` names with the smallest 64-bit keys of (seed, record, name) on the layer stream (cached: a record
    asks three times, two forwards and its update)."""
    def rank(name):
        k0, k1 = zrng.stream_key(seed, record, name, LAYER_STREAM)
        return (k1 << 32) | k0, name

    return frozenset(sorted(names, key=rank)[:count])


def random_mask(seed: int, record: int, name: str, numel: int, fraction: float, device,
                offset: int = 0) -> torch.Tensor:
    """m_i = 1.0 for elements offset .. offset + numel - 1 whose 32 hash bits of the MASK_STREAM fall below
    fraction·2**32 (an integer: no float compare)."""
    index = torch.arange(offset, offset + numel, dtype=torch.int64, device=device)
    return (zrng.bits_for(seed, record, name, index, MASK_STREAM) < round(fraction * 2**32)).to(torch.float32)


def magnitude_threshold(seed: int, name: str, w: torch.Tensor, fraction: float) -> torch.Tensor:
    """τ: the exact k-th smallest |θ| of a fixed sample of min(SAMPLE, numel) elements (indices from the MASK_STREAM
    of (seed, record 0, name), fixed for the run), k = round(fraction·S), at least 1. A 0-d tensor in w's dtype."""
    flat = w.reshape(-1)
    n = flat.numel()
    if n <= SAMPLE:
        sample = flat
    else:
        idx = zrng.bits_for(seed, 0, name, torch.arange(SAMPLE, dtype=torch.int64, device=w.device), MASK_STREAM) % n
        sample = flat[idx]
    k = max(1, round(fraction * sample.numel()))
    return sample.abs().kthvalue(k).values


def _low_rank(seed: int, record: int, v_record: int, name: str, shape: tuple[int, int], rank: int,
              distribution: str, device) -> torch.Tensor:
    """U Vᵀ in fp32 as a sum of r outer products, added in the order k = 0..r-1 (exact: module docstring)."""
    rows, cols = shape
    u = zrng.z_for(seed, record, name, rows * rank, distribution, stream=U_STREAM, device=device).view(rows, rank)
    v = zrng.z_for(seed, v_record, name, cols * rank, distribution, stream=V_STREAM, device=device).view(cols, rank)
    z = torch.zeros(rows, cols, dtype=torch.float32, device=device)
    for k in range(rank):
        z += u[:, k, None] * v[None, :, k]
    return z
