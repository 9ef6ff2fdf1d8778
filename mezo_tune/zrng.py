"""The counter-based generator of perturbation directions z (DESIGN.md, contract 2).

z = Z(seed, step, tensor_name)[i] is a pure function of its arguments and of the element index i: no torch.Generator,
no torch.randn, no floating-point function whose last bit differs between libraries. So the same run replays to the
same bits on CPU and on any CUDA GPU, eager or compiled, under any torch version.

Generator "mezo-tune/lowbias32x2", version 1:
  key      (k0, k1) = the 8 bytes of blake2b(b"mezo-tune/z/v1" | seed, step, stream as little-endian u64 | name,
           8 bytes), computed once per (step, tensor) in Python.
  bits     h(i) = mix(mix(lo(i) ^ k0) ^ hi(i) ^ k1), where lo/hi are the low/high 32 bits of the 64-bit element index
           and mix is Chris Wellons' "lowbias32" integer hash (two xorshift-multiply rounds, a bijection on 32 bits),
           all in uint32 arithmetic (products mod 2**32). The torch kernels hold the uint32 bit patterns in int32
           (wrapping products, masked right shifts); the Triton kernels use uint32.
  gaussian z = (2 * (b0 + b1 + b2) - 765) / 256 with b0..b2 the three low bytes of h: an Irwin-Hall (sum of three
           uniforms) bell shape, mean 0, variance 65535/65536, support [-2.99, 2.99]. Every value is an integer times
           2**-8 with at most 10 significant bits, so it is exact in fp32/fp16 and products with an fp32 scalar are
           exact in fp64 (that is what makes the update of contract 4 immune to FMA contraction).
  rademacher z = +1 or -1 from the top bit of h.
  rademacher32 (version 2) z = +1 or -1 from bit i % 32 of h(i // 32): one hash serves 32 consecutive elements, so a
           perturbation or an update costs about a memory pass instead of a hash per element (issue #16: in 16-bit
           storage the hash was most of a step's overhead). Its signs within one hash are the 32 bits of a lowbias32
           output, which are as well mixed as its top bit.
Versions: version 1 has gaussian and rademacher; version 2 adds rademacher32 and changes no bit of version 1's. A run
records the lowest version that has its distribution (`version_for`), so a run that an older mezo-tune could replay
stays replayable by it.
Streams: stream 0 draws z; stream 1 draws the uniforms of stochastic rounding, independent of z.

The kernels below (perturbed copy, in-place update) are plain torch functions; `compiled(fn)` wraps them with
torch.compile so that z is generated and consumed in one fused loop (never materialised as a full tensor). Compiled
and eager results are bit-identical (tests/test_zrng.py). `kernel(fn, ...)` runs fn's hand-written twins where they
apply, bit-identical too: on CUDA tensors, when Triton is installed, the Triton kernels of mezo_tune/triton_kernels.py
(tests/test_triton.py); on CPU tensors, when compiling, the C kernels of mezo_tune/cpu_kernels.py, which vectorize the
uint32 hash better than inductor does (tests/test_cpu_kernels.py).
"""

from __future__ import annotations

import functools
import hashlib
import struct

import torch

GENERATOR = "mezo-tune/lowbias32x2"
GENERATOR_VERSION = 2  # the newest version this module generates
DISTRIBUTIONS = ("gaussian", "rademacher", "rademacher32")
_DISTRIBUTION_VERSION = {"gaussian": 1, "rademacher": 1, "rademacher32": 2}
Z_STREAM, ROUNDING_STREAM = 0, 1

_M32 = 0xFFFFFFFF
_MUL1, _MUL2 = 0x7FEB352D, 0x446CA68B  # lowbias32's multipliers (< 2**31: they fit an int32 operand)
CHUNK = 1 << 22  # elements per kernel call: bounds temporaries in eager mode, no cost compiled


def stream_key(seed: int, step: int, name: str, stream: int = Z_STREAM) -> tuple[int, int]:
    """The 64-bit key (k0, k1) of one tensor at one step: depends on nothing but these arguments."""
    return stream_keys(seed, step, [name], stream)[0]


def stream_keys(seed: int, step: int, names, stream: int = Z_STREAM) -> list[tuple[int, int]]:
    """stream_key of each name, the material's common part made once (a step's first perturbed forward asks for every
    trainable tensor's)."""
    if not (0 <= seed < 2**64 and 0 <= step < 2**64):
        raise ValueError(f"seed and step must be in [0, 2**64): got seed={seed}, step={step}")
    head = b"mezo-tune/z/v1" + struct.pack("<QQQ", seed, step, stream)
    keys = []
    for name in names:
        key = int.from_bytes(hashlib.blake2b(head + name.encode("utf-8"), digest_size=8).digest(), "little")
        keys.append((key & _M32, key >> 32))
    return keys


def version_for(distribution: str) -> int:
    """The generator version a run with this distribution records: the first one that has it."""
    distribution_code(distribution)  # refuses an unknown one
    return _DISTRIBUTION_VERSION[distribution]


def replays(name: str, version: int, distribution: str) -> bool:
    """Whether this module generates the z of a trajectory header's (name, version, distribution) bit for bit."""
    return (name == GENERATOR and distribution in DISTRIBUTIONS
            and _DISTRIBUTION_VERSION[distribution] <= version <= GENERATOR_VERSION)


def _signed32(k):
    """A 32-bit value as the int32 with the same bits (tensor or Python int)."""
    if isinstance(k, torch.Tensor):
        return k.to(torch.int32)  # int64 -> int32 keeps the low 32 bits
    return k - (1 << 32) if k >= 1 << 31 else k


def _mix(x: torch.Tensor) -> torch.Tensor:
    """lowbias32 on int32 tensors holding uint32 bit patterns: products wrap mod 2**32 (what the uint32 hash does),
    and each right shift is masked so the sign bit does not spread (a logical shift)."""
    x = x ^ ((x >> 16) & 0xFFFF)
    x = x * _MUL1
    x = x ^ ((x >> 15) & 0x1FFFF)
    x = x * _MUL2
    return x ^ ((x >> 16) & 0xFFFF)


def _bits(index: torch.Tensor, k0, k1) -> torch.Tensor:
    """32 random bits (as int32) per int64 element index. Hashing in 32-bit lanes runs twice as fast as in int64
    (the first implementation, same bits)."""
    lo, hi = index.to(torch.int32), (index >> 32).to(torch.int32)
    return _mix(_mix(lo ^ _signed32(k0)) ^ hi ^ _signed32(k1))


def word_hash(words: torch.Tensor, index: torch.Tensor, k0, k1) -> torch.Tensor:
    """mix(w ^ bits(i)) per int32 word w at int64 index i: for each i a bijection of w, the same bits on every device
    (the weights digest, mezo.tensor_sum_hash, sums these)."""
    return _mix(words ^ _bits(index, k0, k1))


def _z(index: torch.Tensor, k0, k1, distribution: str, dtype: torch.dtype) -> torch.Tensor:
    """z at int64 element indices, in dtype (fp32 or fp64: exact in both)."""
    if distribution == "rademacher32":
        h = _bits(index >> 5, k0, k1)
        return (1 - 2 * ((h >> (index & 31).to(torch.int32)) & 1)).to(dtype)  # bit 0-31 of h: no sign spreading
    return _z_from_bits(_bits(index, k0, k1), distribution, dtype)


def _z_from_bits(h: torch.Tensor, distribution: str, dtype: torch.dtype) -> torch.Tensor:
    if distribution == "gaussian":
        s = (h & 255) + ((h >> 8) & 255) + ((h >> 16) & 255)
        return (2 * s - 765).to(dtype) * (1.0 / 256)
    if distribution == "rademacher":
        return (1 - 2 * ((h >> 31) & 1)).to(dtype)
    raise ValueError(f"unknown distribution {distribution!r}: choose one of {', '.join(DISTRIBUTIONS)}")


def distribution_code(distribution: str) -> int:
    """The distribution's index in DISTRIBUTIONS (0 gaussian, 1 rademacher, 2 rademacher32): how the hand-written
    kernels take it."""
    if distribution not in DISTRIBUTIONS:
        raise ValueError(f"unknown distribution {distribution!r}: choose one of {', '.join(DISTRIBUTIONS)}")
    return DISTRIBUTIONS.index(distribution)


def _uniform_from_bits(h: torch.Tensor) -> torch.Tensor:
    """A uniform in [0, 1) with 24 bits, exact in fp32."""
    return ((h >> 8) & 0xFFFFFF).to(torch.float32) * (1.0 / (1 << 24))


def key_tensor(k0: int, k1: int, offset: int = 0, device=None) -> torch.Tensor:
    """Kernel arguments as a small int64 tensor, so compiled kernels never recompile for new keys or offsets."""
    return torch.tensor([k0, k1, offset], dtype=torch.int64, device=device)


def _indices(n: int, key: torch.Tensor) -> torch.Tensor:
    return torch.arange(n, dtype=torch.int64, device=key.device) + key[2]


# ---- kernels (each one: plain torch, compiled on demand) ------------------------------------------------------------

def z_kernel(out: torch.Tensor, key: torch.Tensor, distribution: str) -> None:
    """out[i] = z(offset + i) in out's dtype (fp32 or fp64: both exact)."""
    out.copy_(_z(_indices(out.numel(), key), key[0], key[1], distribution, out.dtype))


def perturb_kernel(out: torch.Tensor, w: torch.Tensor, key: torch.Tensor, eps: torch.Tensor,
                   distribution: str) -> None:
    """out = round_to(out.dtype)(fp32(w) + eps * z): a perturbed copy of w; w itself is never written."""
    z = _z(_indices(w.numel(), key), key[0], key[1], distribution, torch.float32)
    out.copy_((w.to(torch.float32) + eps.to(torch.float32) * z).to(out.dtype))


def perturb_rows_kernel(out: torch.Tensor, w: torch.Tensor, index: torch.Tensor, key: torch.Tensor,
                        eps: torch.Tensor, distribution: str) -> None:
    """perturb_kernel at explicit element indices: out = round(fp32(w) + eps * z(index)), w = the values there.

    For an embedding lookup only the rows it reads need perturbing; each value is formed exactly as perturb_kernel
    forms it, so the looked-up rows are bit-identical to rows of the fully perturbed table."""
    z = _z(index + key[2], key[0], key[1], distribution, torch.float32)
    out.copy_((w.to(torch.float32) + eps.to(torch.float32) * z).to(out.dtype))


def update_kernel(w: torch.Tensor, key: torch.Tensor, c: torch.Tensor, distribution: str) -> None:
    """w <- round_nearest(w - c * z), in place.

    In fp64, c (an fp32 value) times z (<= 10 significant bits) is exact, so w - c*z is rounded exactly once whether or
    not a compiler fuses the multiply and subtract; then it is rounded to fp32 and to w's dtype, both nearest-even.
    """
    z = _z(_indices(w.numel(), key), key[0], key[1], distribution, torch.float64)
    v = (w.to(torch.float64) - c * z).to(torch.float32)
    w.copy_(v.to(w.dtype))


def update_rows_kernel(w: torch.Tensor, index: torch.Tensor, key: torch.Tensor, c: torch.Tensor,
                       distribution: str) -> None:
    """update_kernel at explicit element indices, in place: w = the values there.

    For an embedding lookup while the table's update is left pending for a later pass (Mezo.perturbed): the
    looked-up rows updated exactly as update_kernel updates those elements of the table."""
    z = _z(index + key[2], key[0], key[1], distribution, torch.float64)
    w.copy_((w.to(torch.float64) - c * z).to(torch.float32).to(w.dtype))


def _int_view_dtype(dtype: torch.dtype) -> torch.dtype:
    return {torch.float16: torch.int16, torch.bfloat16: torch.int16, torch.float32: torch.int32}[dtype]


def update_kernel_stochastic(w: torch.Tensor, key: torch.Tensor, rkey: torch.Tensor, c: torch.Tensor,
                             distribution: str) -> None:
    """w <- round_stochastic(w - c * z), in place: unbiased rounding to w's dtype.

    v = w - c*z is formed exactly as in update_kernel (in fp32 for 16-bit storage, in fp64 for fp32 storage). r is v
    rounded to nearest and n its other neighbour in w's dtype (found by stepping r's bit pattern by one). n is taken
    with probability |v - r| / |n - r|, against a uniform from the rounding stream (rkey): E[result] = v.
    """
    n_el = w.numel()
    idx = _indices(n_el, key)
    z = _z(idx, key[0], key[1], distribution, torch.float64)
    wide = torch.float64 if w.dtype == torch.float32 else torch.float32
    v = (w.to(torch.float64) - c * z).to(wide)
    r = v.to(w.dtype)
    rv = r.to(wide)
    ibits = r.view(_int_view_dtype(w.dtype)).to(torch.int64)
    # |v| > |r|: the other neighbour lies away from zero (bit pattern + 1), else toward zero (- 1). From a zero,
    # the neighbour is the smallest subnormal with v's sign.
    away = v.abs() > rv.abs()
    sign_bit = 1 << (8 * w.element_size() - 1)
    step_bits = torch.where(away, ibits + 1, ibits - 1)
    from_zero = torch.where(v < 0, sign_bit | 1, 1)
    nbits = torch.where(rv == 0, from_zero, step_bits)
    nbits = torch.where(nbits >= sign_bit, nbits - 2 * sign_bit, nbits)  # back into the signed range of the view
    n = nbits.to(_int_view_dtype(w.dtype)).view(w.dtype)
    p = (v - rv).abs() / (n.to(wide) - rv).abs()
    u = _uniform_from_bits(_bits(idx, rkey[0], rkey[1])).to(wide)
    w.copy_(torch.where((u < p) & (v != rv), n, r))


@functools.cache
def compiled(fn):
    """fn compiled with torch.compile (dynamic shapes: one compilation serves every tensor size).

    emulate_precision_casts keeps every fp16/bf16 rounding that eager performs; without it inductor elides
    a downcast-upcast pair inside a fused kernel and stochastic rounding would differ from eager.
    """
    return torch.compile(fn, dynamic=True, options={"emulate_precision_casts": True})


def _triton_twin(fn):
    """fn's twin in mezo_tune.triton_kernels, or None when Triton is not installed (imported on first CUDA use) or fn
    has none (update_rows_kernel: an embedding's looked-up rows, a few thousand elements; torch runs it)."""
    from mezo_tune import triton_kernels

    return getattr(triton_kernels, fn.__name__, None) if triton_kernels.available() else None


def _cpu_twin(fn, fallback):
    """fn's C twin in mezo_tune.cpu_kernels (handing what it does not cover to fallback), or None when the C kernels
    cannot be built here (built on first CPU use)."""
    from mezo_tune import cpu_kernels

    return cpu_kernels.twin(fn, fallback)


def kernel(fn, use_compile: bool):
    """fn as it runs. CUDA tensors: its Triton twin when Triton is available, else torch. CPU tensors: with
    use_compile its C twin (contiguous fp32 / fp16 / bf16 tensors; built on first use) or else compiled torch;
    without, eager torch."""
    torch_fn = compiled(fn) if use_compile else fn
    if use_compile and fn is update_kernel_stochastic:
        torch_fn = _eager_for_fp32_cpu(fn, torch_fn)
    cpu_fn = None

    def run(first: torch.Tensor, *args):
        nonlocal cpu_fn
        if first.is_cuda:
            return (_triton_twin(fn) or torch_fn)(first, *args)
        if cpu_fn is None:
            cpu_fn = (_cpu_twin(fn, torch_fn) if use_compile else None) or torch_fn
        return cpu_fn(first, *args)

    return run


def update_tensors(items, c: float, distribution: str, use_compile: bool) -> None:
    """update_kernel (round to nearest) over several whole tensors: items are (flat contiguous tensor, (k0, k1), index
    of its first element). With use_compile the CPU tensors of each C storage dtype go to the C kernels in one call
    (cpu_kernels.update_list); the rest, or all where those cannot be built, run `kernel(update_kernel)` per chunk."""
    rest, by_dtype = [], {}
    for item in items:
        (rest if not use_compile or item[0].is_cuda else by_dtype.setdefault(item[0].dtype, [])).append(item)
    if by_dtype:
        from mezo_tune import cpu_kernels

        for group in by_dtype.values():
            keys = torch.tensor([[k0, k1, offset] for _, (k0, k1), offset in group], dtype=torch.int64)
            if not cpu_kernels.update_list([t for t, _, _ in group], keys, c, distribution):
                rest += group
    run = kernel(update_kernel, use_compile)
    c_t: dict = {}
    for flat, (k0, k1), offset in rest:
        if flat.device not in c_t:
            c_t[flat.device] = torch.tensor(c, dtype=torch.float64, device=flat.device)
        for a, b in chunks(flat.numel()):
            run(flat[a:b], key_tensor(k0, k1, offset + a, flat.device), c_t[flat.device], distribution)


def update_perturb(out: torch.Tensor, w: torch.Tensor, key: torch.Tensor, eps: torch.Tensor, ukey: torch.Tensor,
                   c: torch.Tensor, distribution: str) -> bool:
    """update_kernel(w, ukey, c) (round to nearest), then perturb_kernel(out, w, key, eps), in one pass over w: the
    same bits as the two kernels. By the C kernels on CPU, the Triton ones on CUDA (eps, c: fp64 scalars on w's
    device); False, doing nothing, where neither covers the tensors (the caller then runs the two kernels)."""
    if w.is_cuda:
        if not fuses_updates(w):
            return False
        from mezo_tune import triton_kernels

        return triton_kernels.update_perturb(out, w, key, eps, ukey, c, distribution)
    from mezo_tune import cpu_kernels

    return w.is_cpu and cpu_kernels.update_perturb(out, w, key, float(eps), ukey, float(c), distribution)


def fuses_updates(w: torch.Tensor) -> bool:
    """Whether update_perturb has kernels for w's device (built or imported on first use)."""
    if w.is_cuda:
        return _triton_twin(update_kernel) is not None
    from mezo_tune import cpu_kernels

    return w.is_cpu and cpu_kernels.library() is not None


def _eager_for_fp32_cpu(fn, compiled_fn):
    """fn eager for fp32 CPU tensors, compiled otherwise: the fallback of the C twin (which covers fp32), used where
    the C kernels cannot be built or for strided tensors. Stochastic rounding of fp32 weights rounds an fp64 value to
    fp32 and back (r, rv); with AVX2 kernels (ATEN_CPU_CAPABILITY=avx2, CPUs without AVX-512) inductor (torch 2.13)
    gets that round trip wrong inside the fused loop, so 1 in 4 results took the other neighbour than eager does;
    with AVX-512 it is right. Caught by tests/test_update_golden.py, run with AVX2 kernels in CI."""

    def run(w: torch.Tensor, *args):
        return (fn if w.dtype == torch.float32 and not w.is_cuda else compiled_fn)(w, *args)

    return run


def chunks(numel: int, chunk: int = CHUNK):
    """(start, stop) pairs covering [0, numel)."""
    for start in range(0, numel, chunk):
        yield start, min(start + chunk, numel)


def z_for(seed: int, step: int, name: str, numel: int, distribution: str = "gaussian", offset: int = 0,
          stream: int = Z_STREAM, device="cpu", dtype=torch.float32) -> torch.Tensor:
    """The reference: z of one tensor as a flat tensor (eager, for tests, golden vectors and small tensors)."""
    k0, k1 = stream_key(seed, step, name, stream)
    out = torch.empty(numel, dtype=dtype, device=device)
    z_kernel(out, key_tensor(k0, k1, offset, device), distribution)
    return out


def bits_for(seed: int, step: int, name: str, index: torch.Tensor, stream: int = Z_STREAM) -> torch.Tensor:
    """The raw 32 bits (as int64) at arbitrary element indices: for golden vectors and the > 2**32 index test."""
    k0, k1 = stream_key(seed, step, name, stream)
    return _bits(index.to(torch.int64), k0, k1).to(torch.int64) & _M32
