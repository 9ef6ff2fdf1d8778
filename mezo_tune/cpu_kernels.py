"""C twins of the hot kernels in `zrng` for CPU tensors: same signatures, bit-identical results (contracts 2-4).

Why: torch.compile's C++ for the hash keeps the uint32 bit patterns in int32 lanes (inductor does not vectorize
uint32), so every right shift needs a mask, and it builds each 64-bit element index from a vector arange. Plain C over
uint32 with one 32-bit counter per stretch of constant high word is vectorized by the C compiler without either: on
the project's 2-core AVX-512 machine a perturbed copy of 4M fp32 weights takes 0.7-0.8 ms against inductor's 1.6 ms,
an update 1.1 ms against 1.8 ms (numbers in the README).

What keeps the bits equal to eager torch:
  - the hash is zrng's generator on uint32 (wrapping products, logical shifts): the same bits zrng computes in int32;
  - every float operation is one IEEE operation in zrng's order and precision, compiled with -ffp-contract=off (no
    multiply-add contraction: `w + eps * z` rounds the product, then the sum, as eager torch does) and without any
    fast-math flag; conversions double -> float round to nearest even, as torch's do.
Covered: contiguous fp32 weights and outputs (z_kernel also fills fp64), both distributions; also one Adam step
(`adam`, the twin of mezo.adam_update with z generated inline; sqrtf is IEEE, so -fno-math-errno only lets it vectorize). Anything else (fp16 /
bf16 storage, stochastic rounding, strided tensors) goes to the torch kernel the dispatcher would otherwise run.

The library is built on first use with the system C compiler (`CC`, else gcc / cc / clang: the toolchain
torch.compile needs on CPU anyway) and cached under the mezo-tune cache directory, keyed by source, compiler and
flags. When it cannot be built, `library()` warns once and returns None, and the torch kernels run instead.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import shutil
import subprocess
import tempfile
import warnings
from pathlib import Path

import torch

from mezo_tune import zrng

SOURCE = r"""
#include <stdint.h>
#include <math.h>

/* zrng's generator "mezo-tune/lowbias32x2" v1: h(i) = mix(mix(lo(i) ^ k0) ^ hi(i) ^ k1) on uint32. */
static inline uint32_t mix(uint32_t x) {
    x ^= x >> 16; x *= 0x7FEB352Du; x ^= x >> 15; x *= 0x446CA68Bu; return x ^ (x >> 16);
}
static inline uint32_t bits(uint32_t lo, uint32_t hi_k1, uint32_t k0) { return mix(mix(lo ^ k0) ^ hi_k1); }
/* z as an integer count of 1/256 steps (gaussian: 2 * (b0 + b1 + b2) - 765) or of whole units (rademacher: +-1) */
static inline int32_t zint(uint32_t h, int dist) {
    if (dist == 0) return 2 * (int32_t)((h & 255u) + ((h >> 8) & 255u) + ((h >> 16) & 255u)) - 765;
    return 1 - 2 * (int32_t)(h >> 31);
}
static inline float z32(uint32_t h, int dist) {
    return dist == 0 ? (float)zint(h, 0) * (1.0f / 256) : (float)zint(h, 1);
}
static inline double z64(uint32_t h, int dist) {
    return dist == 0 ? (double)zint(h, 0) * (1.0 / 256) : (double)zint(h, 1);
}

#define BLOCK 16384
#define PARALLEL_FROM 65536
/* Elements [b, e) of a tensor whose element 0 has index `offset`, split where the index's high word changes, so that
   each stretch runs on a 32-bit counter `lo` with the constant `hk` = high word ^ k1. BODY uses j (position in the
   stretch), s (position in the tensor), lo and hk. */
#define STRETCHES(BODY)                                                                           \
    for (int64_t s0 = b; s0 < e;) {                                                               \
        uint64_t first = offset + (uint64_t)s0;                                                   \
        uint64_t room = 0x100000000ull - (first & 0xFFFFFFFFull);                                 \
        int64_t s1 = (uint64_t)(e - s0) > room ? s0 + (int64_t)room : e;                          \
        uint32_t lo0 = (uint32_t)first, hk = (uint32_t)(first >> 32) ^ k1;                        \
        int64_t m = s1 - s0;                                                                      \
        _Pragma("omp simd")                                                                       \
        for (int64_t j = 0; j < m; j++) { int64_t s = s0 + j; uint32_t lo = lo0 + (uint32_t)j; BODY; } \
        s0 = s1;                                                                                  \
    }
/* CALL on blocks [b, e) of [0, n), over `threads` threads (n and threads: variables of the caller) */
#define BLOCKS(CALL)                                                                              \
    _Pragma("omp parallel for schedule(static) num_threads(threads) if(n >= PARALLEL_FROM)")      \
    for (int64_t b = 0; b < n; b += BLOCK) { int64_t e = b + BLOCK < n ? b + BLOCK : n; CALL; }

static inline void z_f32_(float *out, int64_t b, int64_t e, uint64_t offset, uint32_t k0, uint32_t k1, int dist) {
    STRETCHES(out[s] = z32(bits(lo, hk, k0), dist))
}
static inline void z_f64_(double *out, int64_t b, int64_t e, uint64_t offset, uint32_t k0, uint32_t k1, int dist) {
    STRETCHES(out[s] = z64(bits(lo, hk, k0), dist))
}
void z_f32(float *out, int64_t n, const int64_t *key, int dist, int threads) {
    BLOCKS(if (dist == 0) z_f32_(out, b, e, key[2], key[0], key[1], 0);
        else z_f32_(out, b, e, key[2], key[0], key[1], 1))
}
void z_f64(double *out, int64_t n, const int64_t *key, int dist, int threads) {
    BLOCKS(if (dist == 0) z_f64_(out, b, e, key[2], key[0], key[1], 0);
        else z_f64_(out, b, e, key[2], key[0], key[1], 1))
}

/* out = w + eps * z in fp32: the product rounded, then the sum (zrng.perturb_kernel) */
static inline void perturb_(float *out, const float *w, int64_t b, int64_t e, uint64_t offset, uint32_t k0,
                            uint32_t k1, float eps, int dist) {
    STRETCHES(out[s] = w[s] + eps * z32(bits(lo, hk, k0), dist))
}
void perturb_f32(float *out, const float *w, int64_t n, const int64_t *key, double eps, int dist, int threads) {
    float eps32 = (float)eps;
    BLOCKS(if (dist == 0) perturb_(out, w, b, e, key[2], key[0], key[1], eps32, 0);
        else perturb_(out, w, b, e, key[2], key[0], key[1], eps32, 1))
}

/* the same at explicit element indices (zrng.perturb_rows_kernel) */
static inline void perturb_rows_(float *out, const float *w, const int64_t *index, int64_t b, int64_t e,
                                 uint64_t offset, uint32_t k0, uint32_t k1, float eps, int dist) {
    _Pragma("omp simd")
    for (int64_t s = b; s < e; s++) {
        uint64_t i = (uint64_t)index[s] + offset;
        out[s] = w[s] + eps * z32(bits((uint32_t)i, (uint32_t)(i >> 32) ^ k1, k0), dist);
    }
}
void perturb_rows_f32(float *out, const float *w, const int64_t *index, int64_t n, const int64_t *key, double eps,
                      int dist, int threads) {
    float eps32 = (float)eps;
    BLOCKS(if (dist == 0) perturb_rows_(out, w, index, b, e, key[2], key[0], key[1], eps32, 0);
        else perturb_rows_(out, w, index, b, e, key[2], key[0], key[1], eps32, 1))
}

/* w = fp32(fp64(w) - c * z) (zrng.update_kernel). For the gaussian z = k / 256 the product is formed as (c / 256) * k:
   scaling by a power of two is exact, so both forms round the same real number c * k / 256 (exactly representable
   for an fp32 c), with one multiply instead of two. */
static inline void update_(float *w, int64_t b, int64_t e, uint64_t offset, uint32_t k0, uint32_t k1, double c,
                           int dist) {
    double cs = dist == 0 ? c * (1.0 / 256) : c;
    STRETCHES(w[s] = (float)((double)w[s] - cs * (double)zint(bits(lo, hk, k0), dist)))
}
void update_f32(float *w, int64_t n, const int64_t *key, double c, int dist, int threads) {
    BLOCKS(if (dist == 0) update_(w, b, e, key[2], key[0], key[1], c, 0);
        else update_(w, b, e, key[2], key[0], key[1], c, 1))
}

/* One Adam step (mezo.adam_update), in its order, every operation one fp32 rounding (sqrtf: IEEE, correctly
   rounded; -fno-math-errno lets it vectorize). k = {g, eta, beta1, beta2, 1 - beta1, 1 - beta2, 1 - beta1^t,
   1 - beta2^t, eps}, fp32 values; m1, m2 are the moments m, v (STRETCHES uses the name m). */
static inline void adam_(float *w, float *m1, float *m2, int64_t b, int64_t e, uint64_t offset, uint32_t k0,
                         uint32_t k1, const float *k, int dist) {
    float g = k[0], eta = k[1], b1 = k[2], b2 = k[3], c1 = k[4], c2 = k[5], bc1 = k[6], bc2 = k[7], eps = k[8];
    STRETCHES(
        float est = z32(bits(lo, hk, k0), dist) * g;
        float sq = est * est;
        float mm = m1[s] * b1; mm = mm + est * c1;
        float vv = m2[s] * b2; vv = vv + sq * c2;
        float den = sqrtf(vv / bc2) + eps;
        float step = mm / bc1; step = step / den; step = step * eta;
        m1[s] = mm; m2[s] = vv; w[s] = w[s] - step)
}
void adam_f32(float *w, float *m1, float *m2, int64_t n, const int64_t *key, const float *k, int dist, int threads) {
    BLOCKS(if (dist == 0) adam_(w, m1, m2, b, e, key[2], key[0], key[1], k, 0);
        else adam_(w, m1, m2, b, e, key[2], key[0], key[1], k, 1))
}
"""

_P, _I64, _INT, _DBL = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int, ctypes.c_double
_SIGNATURES = {
    "z_f32": [_P, _I64, _P, _INT, _INT],
    "z_f64": [_P, _I64, _P, _INT, _INT],
    "perturb_f32": [_P, _P, _I64, _P, _DBL, _INT, _INT],
    "perturb_rows_f32": [_P, _P, _P, _I64, _P, _DBL, _INT, _INT],
    "update_f32": [_P, _I64, _P, _DBL, _INT, _INT],
    "adam_f32": [_P, _P, _P, _I64, _P, _P, _INT, _INT],
}
# what torch.compile's CPU backend passes for the same capability; -ffp-contract=off is what keeps the bits
_ISA_FLAGS = {"AVX512": ["-mavx512f", "-mavx512dq", "-mavx512vl", "-mavx512bw", "-mfma"], "AVX2": ["-mavx2", "-mfma"]}


def _compiler() -> str | None:
    if os.environ.get("CC"):
        return os.environ["CC"]
    return next((cc for cc in ("gcc", "cc", "clang") if shutil.which(cc)), None)


def _build(cc: str, flags: list[str]) -> Path:
    """The shared library for (source, compiler, flags): built once into the cache, atomically."""
    from .cache import cache_dir

    version = subprocess.run([cc, "--version"], capture_output=True, text=True, timeout=60).stdout
    digest = hashlib.sha256("\0".join([SOURCE, cc, version, *flags]).encode()).hexdigest()[:16]
    target = cache_dir() / "kernels" / f"cpu_kernels-{digest}.so"
    if target.exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        src, lib = Path(tmp) / "cpu_kernels.c", Path(tmp) / target.name
        src.write_text(SOURCE)
        proc = subprocess.run([cc, *flags, str(src), "-o", str(lib)], capture_output=True, text=True, timeout=300)
        if proc.returncode != 0:
            raise RuntimeError(f"{cc} failed: {proc.stderr.strip()[-2000:]}")
        os.replace(lib, target)  # atomic: a concurrent process sees no file or a whole one
    return target


@functools.cache
def library() -> ctypes.CDLL | None:
    """The compiled kernels, or None (with one warning) when they cannot be built here."""
    if os.environ.get("MEZO_TUNE_CPU_KERNELS", "1") == "0":
        return None
    cc = _compiler()
    base = ["-O3", "-shared", "-fPIC", "-ffp-contract=off", "-fno-math-errno",
            *_ISA_FLAGS.get(torch.backends.cpu.get_cpu_capability(), [])]
    problems = []
    if cc is None:
        problems.append("no C compiler found (set CC)")
    else:
        # with OpenMP (threads shared with torch's libgomp), else single-threaded (e.g. Apple clang: no -fopenmp)
        for flags in (base + ["-fopenmp"], base):
            try:
                lib = ctypes.CDLL(str(_build(cc, flags)))
            except Exception as exc:  # noqa: BLE001 - any failure means: use the torch kernels
                problems.append(str(exc))
                continue
            for name, argtypes in _SIGNATURES.items():
                getattr(lib, name).argtypes, getattr(lib, name).restype = argtypes, None
            return lib
    warnings.warn("mezo-tune: the C kernels for CPU could not be built, so z is generated by the (slower) torch "
                  f"kernels: {'; '.join(problems)}", RuntimeWarning, stacklevel=2)
    return None


def _on_cpu(*tensors: torch.Tensor, dtypes=(torch.float32,)) -> bool:
    """Contiguous CPU tensors of the given dtypes and all of one size (the C kernels trust both)."""
    return all(t.dtype in dtypes and t.is_contiguous() and t.device.type == "cpu" and t.numel() == tensors[0].numel()
               for t in tensors)


def _key_ok(key: torch.Tensor) -> bool:
    return key.dtype == torch.int64 and key.is_contiguous() and key.device.type == "cpu"


def adam(w: torch.Tensor, m: torch.Tensor, v: torch.Tensor, key: torch.Tensor, scalars: torch.Tensor,
         distribution: str) -> bool:
    """mezo.adam_update over a whole fp32 tensor with z generated inline (scalars: adam_f32's k, fp32); False, doing
    nothing, where the C kernels do not cover it (the caller runs the torch ops then)."""
    lib = library()
    if lib is None or not (_on_cpu(w, m, v) and _key_ok(key) and _on_cpu(scalars)):
        return False
    lib.adam_f32(w.data_ptr(), m.data_ptr(), v.data_ptr(), w.numel(), key.data_ptr(), scalars.data_ptr(),
                 zrng.distribution_code(distribution), torch.get_num_threads())
    return True


def twin(fn, fallback):
    """fn's C twin with fn's signature, handing any case it does not cover to `fallback`; None if there is none."""
    lib = library()
    if lib is None or fn.__name__ not in _TWINS:
        return None
    return functools.partial(_TWINS[fn.__name__], lib, fallback)


def _z(lib, fallback, out, key, distribution):
    if not _on_cpu(out, dtypes=(torch.float32, torch.float64)) or not _key_ok(key):
        return fallback(out, key, distribution)
    fill = lib.z_f32 if out.dtype == torch.float32 else lib.z_f64
    fill(out.data_ptr(), out.numel(), key.data_ptr(), zrng.distribution_code(distribution), torch.get_num_threads())


def _perturb(lib, fallback, out, w, key, eps, distribution):
    if not _on_cpu(out, w) or not _key_ok(key):
        return fallback(out, w, key, eps, distribution)
    lib.perturb_f32(out.data_ptr(), w.data_ptr(), w.numel(), key.data_ptr(), float(eps),
                    zrng.distribution_code(distribution), torch.get_num_threads())


def _perturb_rows(lib, fallback, out, w, index, key, eps, distribution):
    if not (_on_cpu(out, w) and _on_cpu(index, dtypes=(torch.int64,)) and index.numel() == w.numel()
            and _key_ok(key)):
        return fallback(out, w, index, key, eps, distribution)
    lib.perturb_rows_f32(out.data_ptr(), w.data_ptr(), index.data_ptr(), w.numel(), key.data_ptr(), float(eps),
                         zrng.distribution_code(distribution), torch.get_num_threads())


def _update(lib, fallback, w, key, c, distribution):
    if not _on_cpu(w) or not _key_ok(key):
        return fallback(w, key, c, distribution)
    lib.update_f32(w.data_ptr(), w.numel(), key.data_ptr(), float(c), zrng.distribution_code(distribution),
                   torch.get_num_threads())


_TWINS = {"z_kernel": _z, "perturb_kernel": _perturb, "perturb_rows_kernel": _perturb_rows,
          "update_kernel": _update}
