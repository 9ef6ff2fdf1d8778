"""Triton twins of the kernels in `zrng` for CUDA tensors: same signatures, bit-identical results (contracts 2-4).

Each twin generates z inside the kernel from the same counter-based hash as `zrng` and consumes it at once, so z is
never materialised and a perturbation or update is one pass over the weights. The key tensor [k0, k1, offset] and
the scalars eps / c are loaded inside the kernel, so new keys, offsets and scalars never recompile anything.

What keeps the bits equal to eager torch:
  - the hash runs in uint32, whose wrapping multiply and logical shifts are what zrng's int32 lanes compute (wrapping
    products, masked shifts); the element index is the 64-bit offset + i, split into its low and high words exactly
    as zrng splits it;
  - every float operation is one IEEE operation in the same order and precision as zrng; kernels are launched with
    enable_fp_fusion=False, because Triton otherwise contracts `w + eps * z` into one FMA (a single rounding where
    eager torch rounds the product and then the sum); the update's c*z is exact in fp64, so it is immune anyway;
  - divisions are IEEE round-to-nearest: `tl.fdiv(..., ieee_rounding=True)` in fp32, where Triton's plain `/` is
    an approximate division on NVIDIA (div.full.f32); plain `/` in fp64, which is div.rn.f64;
  - bf16 is converted to and from fp32 by integer operations on the bit pattern, with torch's own round-to-nearest-
    even rule (the Triton interpreter, which the CPU tests use, truncates instead of rounding).

Triton is optional: importing this module never fails; `available()` says whether the kernels can be used. Under
TRITON_INTERPRET=1 (read when the kernels are defined, i.e. at import) they also run on CPU tensors, which is how
tests/test_triton.py checks them against the eager kernels without a GPU.
"""

from __future__ import annotations

import contextlib

import torch

from mezo_tune import zrng

try:
    import triton
    import triton.language as tl
except Exception:  # not installed, or unusable on this machine: the dispatcher then keeps the torch kernels
    triton = tl = None

BLOCK = 1024
# storage kinds, passed to the kernels as constexpr: how to convert to and from fp32
_F32, _F16, _BF16, _F64 = 0, 1, 2, 3
_KIND = {torch.float32: _F32, torch.float16: _F16, torch.bfloat16: _BF16, torch.float64: _F64}


def available() -> bool:
    """True when Triton imported (the kernels still need CUDA tensors, or TRITON_INTERPRET=1 for CPU tensors)."""
    return triton is not None


def _ok(*tensors: torch.Tensor, kinds=(_F32, _F16, _BF16)) -> bool:
    return all(t.is_contiguous() and _KIND.get(t.dtype) in kinds for t in tensors)


def _launch(kernel, n: int, *args, **constexprs) -> None:
    if n == 0:
        return
    # Triton launches on the current CUDA device: make it the tensors' one (a model may be spread over GPUs).
    on_device = torch.cuda.device(args[0].device) if args[0].is_cuda else contextlib.nullcontext()
    with on_device:
        # enable_fp_fusion=False: no mul+add -> FMA contraction, so `w + eps * z` rounds twice as in eager torch.
        # (Triton 3.9 still fuses by default and warns that 3.10 will not; passing it explicitly is right for both.)
        kernel[(triton.cdiv(n, BLOCK),)](*args, n, BLOCK=BLOCK, enable_fp_fusion=False, num_warps=4, **constexprs)


if triton is not None:

    @triton.jit
    def _mix(x):
        """lowbias32 on uint32: the products wrap mod 2**32, as in zrng._mix."""
        x = x ^ (x >> 16)
        x = x * 0x7FEB352D
        x = x ^ (x >> 15)
        x = x * 0x446CA68B
        return x ^ (x >> 16)

    @triton.jit
    def _bits(index, key_ptr):
        """32 random bits (uint32) per int64 element index, for the key [k0, k1, ...] at key_ptr."""
        k0 = tl.load(key_ptr).to(tl.uint32)
        k1 = tl.load(key_ptr + 1).to(tl.uint32)
        lo = index.to(tl.uint32)  # truncation: the low word
        hi = (index >> 32).to(tl.uint32)
        return _mix(_mix(lo ^ k0) ^ hi ^ k1)

    @triton.jit
    def _z(index, key_ptr, DIST: tl.constexpr, WIDE: tl.constexpr):
        """z at int64 element indices in fp32 (WIDE=False) or fp64: both exact, as in zrng._z."""
        if DIST == 2:  # rademacher32: bit index % 32 of the hash of index // 32
            h = _bits(index >> 5, key_ptr)
            zi = 1 - 2 * ((h >> (index & 31).to(tl.uint32)) & 1).to(tl.int32)
        else:
            h = _bits(index, key_ptr)
            if DIST == 0:
                s = (h & 255) + ((h >> 8) & 255) + ((h >> 16) & 255)
                zi = 2 * s.to(tl.int32) - 765
            else:
                zi = 1 - 2 * (h >> 31).to(tl.int32)
        if WIDE:
            z = zi.to(tl.float64)
        else:
            z = zi.to(tl.float32)
        if DIST == 0:
            z = z * 0.00390625  # 1/256: exact
        return z

    @triton.jit
    def _bf16_to_f32(x):
        return (x.to(tl.uint16, bitcast=True).to(tl.uint32) << 16).to(tl.float32, bitcast=True)

    @triton.jit
    def _f32_to_bf16_bits(x):
        """fp32 -> bf16 bit pattern (uint32), round to nearest even, NaN -> 0x7FC0: torch's rule (c10 BFloat16.h)."""
        u = x.to(tl.uint32, bitcast=True)
        r = (u + (0x7FFF + ((u >> 16) & 1))) >> 16
        return tl.where(x != x, 0x7FC0, r)

    @triton.jit
    def _to_f32(x, KIND: tl.constexpr):
        if KIND == 2:
            return _bf16_to_f32(x)
        else:
            return x.to(tl.float32)

    @triton.jit
    def _from_f32(x, KIND: tl.constexpr):
        """fp32 -> the storage kind, round to nearest even."""
        if KIND == 2:
            return _f32_to_bf16_bits(x).to(tl.uint16).to(tl.bfloat16, bitcast=True)
        elif KIND == 1:
            return x.to(tl.float16)
        elif KIND == 3:
            return x.to(tl.float64)
        else:
            return x

    @triton.jit
    def _z_kernel(out_ptr, key_ptr, n, DIST: tl.constexpr, KIND: tl.constexpr, BLOCK: tl.constexpr):
        offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK).to(tl.int64)
        mask = offs < n
        index = offs + tl.load(key_ptr + 2)
        if KIND == 3:
            tl.store(out_ptr + offs, _z(index, key_ptr, DIST, True), mask=mask)
        else:
            tl.store(out_ptr + offs, _from_f32(_z(index, key_ptr, DIST, False), KIND), mask=mask)

    @triton.jit
    def _perturb_kernel(out_ptr, w_ptr, index_ptr, key_ptr, eps_ptr, n, DIST: tl.constexpr, W_KIND: tl.constexpr,
                        OUT_KIND: tl.constexpr, ROWS: tl.constexpr, BLOCK: tl.constexpr):
        """out = round(fp32(w) + fp32(eps) * z): at offset + i, or at index[i] + offset when ROWS."""
        offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK).to(tl.int64)
        mask = offs < n
        if ROWS:
            index = tl.load(index_ptr + offs, mask=mask, other=0)
        else:
            index = offs
        z = _z(index + tl.load(key_ptr + 2), key_ptr, DIST, False)
        w = _to_f32(tl.load(w_ptr + offs, mask=mask, other=0), W_KIND)
        eps = tl.load(eps_ptr).to(tl.float32)
        tl.store(out_ptr + offs, _from_f32(w + eps * z, OUT_KIND), mask=mask)

    @triton.jit
    def _update_kernel(w_ptr, key_ptr, c_ptr, n, DIST: tl.constexpr, KIND: tl.constexpr, BLOCK: tl.constexpr):
        """w <- round_nearest(fp32(fp64(w) - fp64(c) * z)), in place; c*z is exact in fp64."""
        offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK).to(tl.int64)
        mask = offs < n
        z = _z(offs + tl.load(key_ptr + 2), key_ptr, DIST, True)
        w = _to_f32(tl.load(w_ptr + offs, mask=mask, other=0), KIND).to(tl.float64)
        c = tl.load(c_ptr).to(tl.float64)
        v = (w - c * z).to(tl.float32)
        tl.store(w_ptr + offs, _from_f32(v, KIND), mask=mask)

    @triton.jit
    def _update_perturb_kernel(out_ptr, w_ptr, key_ptr, eps_ptr, ukey_ptr, c_ptr, n, DIST: tl.constexpr,
                               KIND: tl.constexpr, BLOCK: tl.constexpr):
        """_update_kernel of w by (ukey, c), then _perturb_kernel of the updated w into out by (key, eps): one read of
        w (zrng.update_perturb)."""
        offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK).to(tl.int64)
        mask = offs < n
        uz = _z(offs + tl.load(ukey_ptr + 2), ukey_ptr, DIST, True)
        w = _to_f32(tl.load(w_ptr + offs, mask=mask, other=0), KIND).to(tl.float64)
        c = tl.load(c_ptr).to(tl.float64)
        updated = _from_f32((w - c * uz).to(tl.float32), KIND)
        tl.store(w_ptr + offs, updated, mask=mask)
        z = _z(offs + tl.load(key_ptr + 2), key_ptr, DIST, False)
        eps = tl.load(eps_ptr).to(tl.float32)
        tl.store(out_ptr + offs, _from_f32(_to_f32(updated, KIND) + eps * z, KIND), mask=mask)

    @triton.jit
    def _update_stochastic_kernel(w_ptr, key_ptr, rkey_ptr, c_ptr, n, DIST: tl.constexpr, KIND: tl.constexpr,
                                  SIGN_BIT: tl.constexpr, BLOCK: tl.constexpr):
        """zrng.update_kernel_stochastic, step for step (see there): v in `wide` (fp64 for fp32 storage, else fp32),
        r = v rounded to nearest, n its other neighbour (bit pattern of r +- 1), n with probability |v-r| / |n-r|."""
        offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK).to(tl.int64)
        mask = offs < n
        idx = offs + tl.load(key_ptr + 2)
        z = _z(idx, key_ptr, DIST, True)
        c = tl.load(c_ptr).to(tl.float64)
        w = _to_f32(tl.load(w_ptr + offs, mask=mask, other=0), KIND).to(tl.float64)
        u = ((_bits(idx, rkey_ptr) >> 8).to(tl.float32) * (1.0 / (1 << 24)))
        if KIND == 0:
            v = w - c * z
            r = v.to(tl.float32)
            rv = r.to(tl.float64)
            rbits = r.to(tl.uint32, bitcast=True).to(tl.int64)
            u = u.to(tl.float64)
        else:
            v = (w - c * z).to(tl.float32)
            if KIND == 2:
                rbits = _f32_to_bf16_bits(v).to(tl.int64)
                rv = _bf16_to_f32(rbits.to(tl.uint16))
            else:
                r = v.to(tl.float16)
                rv = r.to(tl.float32)
                rbits = r.to(tl.uint16, bitcast=True).to(tl.int64)
        away = tl.abs(v) > tl.abs(rv)
        step_bits = tl.where(away, rbits + 1, rbits - 1)
        from_zero = tl.where(v < 0, SIGN_BIT | 1, 1).to(tl.int64)  # from a zero: the smallest subnormal, v's sign
        nbits = tl.where(rv == 0, from_zero, step_bits) & (2 * SIGN_BIT - 1)  # wraps as zrng's signed view does
        if KIND == 0:
            nv = nbits.to(tl.uint32).to(tl.float32, bitcast=True).to(tl.float64)
        elif KIND == 2:
            nv = _bf16_to_f32(nbits.to(tl.uint16))
        else:
            nv = nbits.to(tl.uint16).to(tl.float16, bitcast=True).to(tl.float32)
        if KIND == 0:
            p = tl.abs(v - rv) / tl.abs(nv - rv)  # fp64: `/` is div.rn.f64 (precise division has no fp64 form)
        else:
            p = tl.fdiv(tl.abs(v - rv), tl.abs(nv - rv), ieee_rounding=True)  # fp32 `/` would be approximate
        out = tl.where((u < p) & (v != rv), nbits, rbits)
        if KIND == 0:
            tl.store(w_ptr + offs, out.to(tl.uint32).to(tl.float32, bitcast=True), mask=mask)
        elif KIND == 2:
            tl.store(w_ptr + offs, out.to(tl.uint16).to(tl.bfloat16, bitcast=True), mask=mask)
        else:
            tl.store(w_ptr + offs, out.to(tl.uint16).to(tl.float16, bitcast=True), mask=mask)


# ---- the twins: zrng's signatures; anything the kernels do not cover (other dtypes, strided tensors) goes to zrng

def z_kernel(out: torch.Tensor, key: torch.Tensor, distribution: str) -> None:
    if not _ok(out, kinds=(_F32, _F16, _BF16, _F64)):
        return zrng.z_kernel(out, key, distribution)
    _launch(_z_kernel, out.numel(), out, key, DIST=zrng.distribution_code(distribution), KIND=_KIND[out.dtype])


def perturb_kernel(out: torch.Tensor, w: torch.Tensor, key: torch.Tensor, eps: torch.Tensor,
                   distribution: str) -> None:
    if not _ok(out, w):
        return zrng.perturb_kernel(out, w, key, eps, distribution)
    _launch(_perturb_kernel, w.numel(), out, w, key, key, eps, DIST=zrng.distribution_code(distribution),
            W_KIND=_KIND[w.dtype], OUT_KIND=_KIND[out.dtype], ROWS=False)


def perturb_rows_kernel(out: torch.Tensor, w: torch.Tensor, index: torch.Tensor, key: torch.Tensor,
                        eps: torch.Tensor, distribution: str) -> None:
    if not (_ok(out, w) and index.dtype == torch.int64 and index.is_contiguous()):
        return zrng.perturb_rows_kernel(out, w, index, key, eps, distribution)
    _launch(_perturb_kernel, w.numel(), out, w, index, key, eps, DIST=zrng.distribution_code(distribution),
            W_KIND=_KIND[w.dtype], OUT_KIND=_KIND[out.dtype], ROWS=True)


def update_kernel(w: torch.Tensor, key: torch.Tensor, c: torch.Tensor, distribution: str) -> None:
    if not _ok(w):
        return zrng.update_kernel(w, key, c, distribution)
    _launch(_update_kernel, w.numel(), w, key, c, DIST=zrng.distribution_code(distribution), KIND=_KIND[w.dtype])


def update_kernel_stochastic(w: torch.Tensor, key: torch.Tensor, rkey: torch.Tensor, c: torch.Tensor,
                             distribution: str) -> None:
    if not _ok(w):
        return zrng.update_kernel_stochastic(w, key, rkey, c, distribution)
    _launch(_update_stochastic_kernel, w.numel(), w, key, rkey, c, DIST=zrng.distribution_code(distribution),
            KIND=_KIND[w.dtype], SIGN_BIT=1 << (8 * w.element_size() - 1))


def update_perturb(out: torch.Tensor, w: torch.Tensor, key: torch.Tensor, eps: torch.Tensor, ukey: torch.Tensor,
                   c: torch.Tensor, distribution: str) -> bool:
    """zrng.update_perturb's twin (eps, c: fp64 scalars on w's device); False where it does not cover the tensors."""
    if not (_ok(out, w) and out.dtype == w.dtype and out.numel() == w.numel()):
        return False
    _launch(_update_perturb_kernel, w.numel(), out, w, key, eps, ukey, c, DIST=zrng.distribution_code(distribution),
            KIND=_KIND[w.dtype])
    return True
