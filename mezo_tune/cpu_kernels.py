"""C twins of the hot kernels in `zrng` for CPU tensors: same signatures, bit-identical results (contracts 2-4).

Why: torch.compile's C++ for the hash keeps the uint32 bit patterns in int32 lanes (inductor does not vectorize
uint32), so every right shift needs a mask, and it builds each 64-bit element index from a vector arange. Plain C over
uint32 with one 32-bit counter per stretch of constant high word is vectorized by the C compiler without either: on
the project's 2-core AVX-512 machine a perturbed copy of 4M fp32 weights takes 0.7-0.8 ms against inductor's 1.6 ms,
an update 1.1 ms against 1.8 ms (numbers in the README). For fp16 / bf16 storage inductor's kernels are slower still
(the conversions, and the emulated roundings that keep them equal to eager), and stochastic rounding of fp32 runs
eager (see zrng._eager_for_fp32_cpu): the C twins cover those too.

What keeps the bits equal to eager torch:
  - the hash is zrng's generator on uint32 (wrapping products, logical shifts): the same bits zrng computes in int32;
  - every float operation is one IEEE operation in zrng's order and precision, compiled with -ffp-contract=off (no
    multiply-add contraction: `w + eps * z` rounds the product, then the sum, as eager torch does) and without any
    value-changing flag (no -ffast-math or its parts; -fno-trapping-math only lets selects vectorize); conversions
    double -> float round to nearest even, as torch's do;
  - fp16 and bf16 are converted to and from fp32 on the bit patterns, in integer arithmetic, as eager torch converts
    on x86 (AVX2 / AVX-512 builds): bf16 rounds to nearest even with every NaN written as 0xFFFF; fp16 rounds to
    nearest even (what vcvtps2ph does) through subnormals and overflow, keeps a NaN quiet with its payload's top
    bits, and widens subnormals exactly. The compiler's _Float16 / __bf16 are not used: their conversions depend on
    the compiler version and ISA flags (a libgcc call, F16C, or AVX512-FP16), the integer code does not;
  - stochastic rounding takes its uniform from the ROUNDING_STREAM key at the same element index as z, and finds the
    other neighbour by stepping the rounded pattern, exactly as zrng.update_kernel_stochastic does.
tests/test_cpu_kernels.py checks every twin bit-equal to eager torch on many sizes and offsets, on special values
(infinities, NaN, subnormals, exact rounding ties) and in every dtype pair, and that those cases catch a build with FP
contraction or a conversion that rounds half away from zero. NaN patterns are those of torch's vector loops: eager torch
widens an fp16 NaN in a loop's scalar tail to 0x7FFFFFFF, so its own pattern depends on the thread count
(tests/kernel_cases.eager).
Covered: contiguous fp32 / fp16 / bf16 weights and outputs (z_kernel: fp32 and fp64 outputs), every distribution,
nearest and stochastic rounding; also one Adam step (`adam`, the twin of mezo.adam_update with z generated inline,
fp32 only). Anything else (other dtypes, strided tensors) goes to the torch kernel the dispatcher would otherwise run.

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
#include <string.h>

/* every helper inlined into the loops, so that they vectorize whole */
#define INLINE static inline __attribute__((always_inline))

/* zrng's generator "mezo-tune/lowbias32x2" v1: h(i) = mix(mix(lo(i) ^ k0) ^ hi(i) ^ k1) on uint32. */
INLINE uint32_t mix(uint32_t x) {
    x ^= x >> 16; x *= 0x7FEB352Du; x ^= x >> 15; x *= 0x446CA68Bu; return x ^ (x >> 16);
}
INLINE uint32_t bits(uint32_t lo, uint32_t hi_k1, uint32_t k0) { return mix(mix(lo ^ k0) ^ hi_k1); }
/* Distributions: 0 gaussian, 1 rademacher, 2 rademacher32 (zrng.DISTRIBUTIONS). z is handled as an integer zi: a
   count of 1/256 steps (gaussian: 2 * (b0 + b1 + b2) - 765) or of whole units (+-1). */
INLINE int32_t zint(uint32_t h, int dist) {
    if (dist == 0) return 2 * (int32_t)((h & 255u) + ((h >> 8) & 255u) + ((h >> 16) & 255u)) - 765;
    return 1 - 2 * (int32_t)(h >> 31);
}
/* rademacher32: +-1 from bit i % 32 of h(i / 32) */
INLINE int32_t sign_of(uint32_t h, uint32_t bit) { return 1 - 2 * (int32_t)((h >> bit) & 1u); }
/* zi at one 64-bit element index, in any distribution */
INLINE int32_t zint_at(uint64_t i, uint32_t k0, uint32_t k1, int dist) {
    if (dist == 2) return sign_of(bits((uint32_t)(i >> 5), (uint32_t)(i >> 37) ^ k1, k0), (uint32_t)i & 31u);
    return zint(bits((uint32_t)i, (uint32_t)(i >> 32) ^ k1, k0), dist);
}
INLINE float z32(int32_t zi, int dist) { return dist == 0 ? (float)zi * (1.0f / 256) : (float)zi; }
INLINE double z64(int32_t zi, int dist) { return dist == 0 ? (double)zi * (1.0 / 256) : (double)zi; }
/* zrng._uniform_from_bits: 24 bits, exact in fp32 */
INLINE float uniform(uint32_t h) { return (float)(h >> 8) * (1.0f / 16777216); }

/* ---- storage kinds: 0 fp32, 1 fp16, 2 bf16. Conversions on the bit patterns, as eager torch converts on x86. ---- */
INLINE uint32_t f2u(float f) { uint32_t u; memcpy(&u, &f, 4); return u; }
INLINE float u2f(uint32_t u) { float f; memcpy(&f, &u, 4); return f; }
INLINE uint64_t d2u(double f) { uint64_t u; memcpy(&u, &f, 8); return u; }
/* x * z in fp32. rademacher32 flips x's sign bit where z = -1 (zsign: 0 or 0x80000000): the same bits as x * (+-1.0f),
   which is exact, in fewer instructions. */
INLINE float times_z(float x, int32_t zi, uint32_t zsign, int dist) {
    return dist == 2 ? u2f(f2u(x) ^ zsign) : x * z32(zi, dist);
}

/* bf16 -> fp32: exact, the pattern in the high half */
INLINE float bf16_to_f32(uint32_t h) { return u2f(h << 16); }
/* fp32 -> bf16, round to nearest even on the pattern (an overflow carries into inf, as it should); NaN -> 0xFFFF,
   what torch's vectorized conversion (AVX2 / AVX-512) writes for every NaN */
INLINE uint32_t f32_to_bf16(float f) {
    uint32_t u = f2u(f);
    return (u & 0x7FFFFFFFu) > 0x7F800000u ? 0xFFFFu : (u + 0x7FFFu + ((u >> 16) & 1u)) >> 16;
}
/* fp16 -> fp32: exact. Normal: rebias the exponent (15 -> 127); subnormal: m * 2^-24 (an exact fp32 product);
   inf / NaN: exponent 255, payload shifted up and NaNs made quiet (what vcvtph2ps does). */
INLINE float f16_to_f32(uint32_t h) {
    uint32_t sign = (h & 0x8000u) << 16, e = (h >> 10) & 31u, m = h & 0x3FFu;
    uint32_t normal = ((e + 112u) << 23) | (m << 13);
    uint32_t special = 0x7F800000u | (m << 13) | (m ? 0x400000u : 0u);
    uint32_t sub = f2u((float)m * (1.0f / 16777216));
    return u2f(sign | (e == 31u ? special : e == 0u ? sub : normal));
}
/* fp32 -> fp16, round to nearest even (what vcvtps2ph does, and so torch): for normal results drop 13 mantissa bits
   with the usual +0xFFF + lsb carry (into the exponent, up to inf at 65520); below 2^-14 add 0.5, whose ulp (2^-24)
   is the fp16 subnormal step, so the fp32 addition (round to nearest even: the only mode this code runs in) rounds
   |f| to a whole number of steps, and that number is the pattern past 0.5's (2^-14 itself comes out as 0x400, the
   smallest normal); NaN stays a quiet NaN with the payload's top bits. */
INLINE uint32_t f32_to_f16(float f) {
    uint32_t u = f2u(f), sign = (u >> 16) & 0x8000u, a = u & 0x7FFFFFFFu;
    uint32_t normal = (a - 0x38000000u + 0xFFFu + ((a >> 13) & 1u)) >> 13;
    uint32_t sub = f2u(u2f(a) + 0.5f) - 0x3F000000u;
    uint32_t r = a > 0x7F800000u ? 0x7E00u | ((a >> 13) & 0x3FFu)
               : a >= 0x47800000u ? 0x7C00u
               : a >= 0x38800000u ? normal : sub;
    return sign | r;
}
INLINE float load(const void *p, int64_t s, int kind) {
    if (kind == 0) return ((const float *)p)[s];
    uint32_t h = ((const uint16_t *)p)[s];
    return kind == 1 ? f16_to_f32(h) : bf16_to_f32(h);
}
INLINE uint32_t round16(float v, int kind) { return kind == 1 ? f32_to_f16(v) : f32_to_bf16(v); }
INLINE float widen16(uint32_t h, int kind) { return kind == 1 ? f16_to_f32(h) : bf16_to_f32(h); }
/* v rounded to nearest even into the storage kind */
INLINE void store(void *p, int64_t s, float v, int kind) {
    if (kind == 0) ((float *)p)[s] = v;
    else ((uint16_t *)p)[s] = (uint16_t)round16(v, kind);
}

#define BLOCK 16384
#define PARALLEL_FROM 65536
/* Elements [b, e) of a tensor whose element 0 has index `offset`, split where the index's high word changes, so that
   each stretch runs on a 32-bit counter `lo` with the constant `hk` = high word ^ k1. BODY uses j (position in the
   stretch), s (position in the tensor), lo and hk. */
#define STRETCHES(...)                                                                            \
    for (int64_t s0 = b; s0 < e;) {                                                               \
        uint64_t first = offset + (uint64_t)s0;                                                   \
        uint64_t room = 0x100000000ull - (first & 0xFFFFFFFFull);                                 \
        int64_t s1 = (uint64_t)(e - s0) > room ? s0 + (int64_t)room : e;                          \
        uint32_t lo0 = (uint32_t)first, hk = (uint32_t)(first >> 32) ^ k1;                        \
        int64_t m = s1 - s0;                                                                      \
        _Pragma("omp simd")                                                                       \
        for (int64_t j = 0; j < m; j++) { int64_t s = s0 + j; uint32_t lo = lo0 + (uint32_t)j; __VA_ARGS__; } \
        s0 = s1;                                                                                  \
    }
/* rademacher32 over elements [b, e) (at most BLOCK): first the hashes of the groups of 32 indices the range touches,
   h(q) for q = index / 32 (16 groups to a vector), then each group's elements take their signs from its hash: a whole
   group in one fixed 32-lane loop, a group cut by b or e element by element. BODY sees s, lo, hk as STRETCHES gives
   them (a group of 32 never crosses a change of the high word), zi and zsign. Its own names (q0, ng, H, grp, first,
   gs, hw, lo0, j0, j1) must not be names BODY uses from outside (adam_'s g is why the group index is grp).
   SIGNS_WITH(FAST, GROUP, BODY) lets a whole group run GROUP(BODY) instead where the constant FAST holds, with gs
   (its first s) and hw (its hash): a hand-vectorized twin of BODY. */
#define SIGNS(...) SIGNS_WITH(0, GROUP_LOOP, __VA_ARGS__)
#define GROUP_LOOP(...) _Pragma("omp simd") for (int j = 0; j < 32; j++) { SIGN_ELEMENT(__VA_ARGS__) }
#define SIGNS_WITH(FAST, GROUP, ...)                                                              \
    {                                                                                             \
        uint64_t q0 = (offset + (uint64_t)b) >> 5;                                                \
        int64_t ng = (int64_t)(((offset + (uint64_t)e - 1) >> 5) - q0) + 1;                       \
        uint32_t H[BLOCK / 32 + 1];                                                               \
        _Pragma("omp simd")                                                                       \
        for (int64_t grp = 0; grp < ng; grp++) {                                                  \
            uint64_t q = q0 + (uint64_t)grp;                                                      \
            H[grp] = bits((uint32_t)q, (uint32_t)(q >> 32) ^ k1, k0);                             \
        }                                                                                         \
        for (int64_t grp = 0; grp < ng; grp++) {                                                  \
            uint64_t first = (q0 + (uint64_t)grp) << 5;                                           \
            int64_t gs = (int64_t)(first - offset); /* the group's first element: s < b for a cut first group */ \
            uint32_t hw = H[grp], lo0 = (uint32_t)first, hk = (uint32_t)(first >> 32) ^ k1;       \
            if (gs >= b && gs + 32 <= e) {                                                        \
                if (FAST) { GROUP(__VA_ARGS__) } else { GROUP_LOOP(__VA_ARGS__) }                 \
            } else {                                                                              \
                int j0 = gs < b ? (int)(b - gs) : 0, j1 = gs + 32 > e ? (int)(e - gs) : 32;       \
                for (int j = j0; j < j1; j++) { SIGN_ELEMENT(__VA_ARGS__) }                       \
            }                                                                                     \
        }                                                                                         \
    }
#define SIGN_ELEMENT(...)                                                                         \
    int64_t s = gs + j; uint32_t lo = lo0 + (uint32_t)j; int32_t zi = sign_of(hw, (uint32_t)j);   \
    uint32_t zsign = (hw << (31 - j)) & 0x80000000u;                                              \
    (void)lo; (void)hk; (void)zi; (void)zsign; __VA_ARGS__;
/* BODY for every element of [b, e) with its zi in distribution D (a constant where it is expanded); ZLOOP_WITH passes
   FAST and GROUP on to SIGNS_WITH */
#define ZLOOP(D, ...) ZLOOP_WITH(D, 0, GROUP_LOOP, __VA_ARGS__)
#define ZLOOP_WITH(D, FAST, GROUP, ...)                                                           \
    if ((D) == 2) SIGNS_WITH(FAST, GROUP, __VA_ARGS__)                                            \
    else { STRETCHES(int32_t zi = zint(bits(lo, hk, k0), D); uint32_t zsign = 0; (void)zsign; __VA_ARGS__) }
/* fp16 storage, rademacher32, whole groups: with AVX-512 the conversions are the hardware's (vcvtph2ps, and
   vcvtps2ph rounding to nearest even), which is what torch's vectorized fp16 conversion on x86 runs and what the
   integer functions above emulate; the compiler does not vectorize them by itself, and the integer ones cost 4x a
   weight copy. With AVX2 the same with 8 lanes where the CPU has F16C (every AVX2 x86 CPU does; built with -mf16c);
   elsewhere (other CPUs) the integer code runs; all are checked against eager torch. */
#if defined(__AVX2__)
#include <immintrin.h>
/* The 16-bit groups ask for the weights 4 KiB ahead (a group is one 64-byte line): measured on the 2-core EPYC, a
   bf16 perturbation pass over 134M weights went from 0.080-0.092 to 0.062-0.067 ns a weight (1 or 2 KiB ahead: no
   better than none, 8 KiB: worse). A prefetch never faults, past the end of a tensor included. */
#define AHEAD 2048
/* x * z on 8 lanes: x (eps: z = +1) where the lane's bit of the group's hash is clear, negx (-x) where it is set. `bits`
   is the hash in every lane, `shift` what brings each lane's bit to bit 31 (SHIFTS8: lanes for bits a..a+3 and
   b..b+3), which blendv reads: the same value as times_z's sign flip. */
INLINE __m256 signed8(__m256 x, __m256 negx, __m256i bits, __m256i shift) {
    return _mm256_blendv_ps(x, negx, _mm256_castsi256_ps(_mm256_sllv_epi32(bits, shift)));
}
#define SHIFTS8(a, b) _mm256_setr_epi32(31 - (a), 30 - (a), 29 - (a), 28 - (a), 31 - (b), 30 - (b), 29 - (b), 28 - (b))
/* perturb_group_T and update_group_T of the AVX2 groups, around add_group_T (the weights asked for AHEAD first) */
#define GROUP_FUNCTIONS(T)                                                                        \
    INLINE void perturb_group_##T(uint16_t *out, const uint16_t *w, uint32_t hw, float eps) {    \
        __builtin_prefetch(w + AHEAD);                                                            \
        add_group_##T(out, w, hw, eps);                                                           \
    }                                                                                             \
    INLINE void update_group_##T(uint16_t *w, uint32_t hw, float c) {                             \
        __builtin_prefetch(w + AHEAD, 1);                                                         \
        add_group_##T(w, w, hw, -c);                                                              \
    }
#endif
#if defined(__AVX512F__)
/* x with its sign flipped in the lanes whose bit of `bits` (bit i for lane i) is set: x * z for 16 lanes (-x is x
   with its sign bit flipped, exactly as times_z flips it); the bits are the lanes' mask as they are */
INLINE __m512 flip16(float x, uint32_t bits) {
    return _mm512_mask_mov_ps(_mm512_set1_ps(x), (__mmask16)bits, _mm512_set1_ps(-x));
}
#define F16_RNE (_MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC)
INLINE void perturb_group_f16(uint16_t *out, const uint16_t *w, uint32_t hw, float eps) {
    __builtin_prefetch(w + AHEAD);
    for (int h = 0; h < 2; h++) {
        __m512 x = _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)(w + 16 * h)));
        __m512 v = _mm512_add_ps(x, flip16(eps, hw >> (16 * h)));
        _mm256_storeu_si256((__m256i *)(out + 16 * h), _mm512_cvtps_ph(v, F16_RNE));
    }
}
INLINE void update_group_f16(uint16_t *w, uint32_t hw, float c) {
    __builtin_prefetch(w + AHEAD, 1);
    for (int h = 0; h < 2; h++) {
        __m512 x = _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)(w + 16 * h)));
        __m512 v = _mm512_sub_ps(x, flip16(c, hw >> (16 * h)));
        _mm256_storeu_si256((__m256i *)(w + 16 * h), _mm512_cvtps_ph(v, F16_RNE));
    }
}
#define F16_PERTURB_GROUP(...) perturb_group_f16((uint16_t *)out + gs, (const uint16_t *)w + gs, hw, eps);
#define F16_UPDATE_GROUP(...) update_group_f16((uint16_t *)w + gs, hw, cf);
#define HAVE_F16_GROUPS 1
#elif defined(__AVX2__) && defined(__F16C__)
/* 8 fp16 weights of w plus x * z (lanes: bits a..a+7 of the hash in `bits`), rounded to nearest even into out */
INLINE void add8_f16(uint16_t *out, const uint16_t *w, __m256 x, __m256 negx, __m256i bits, __m256i shift) {
    __m256 v = _mm256_add_ps(_mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)w)), signed8(x, negx, bits, shift));
    _mm_storeu_si128((__m128i *)out, _mm256_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT));
}
/* x = eps for a perturbation, -c for an update (w - c * z = w + (-c) * z, the same IEEE operation) */
INLINE void add_group_f16(uint16_t *out, const uint16_t *w, uint32_t hw, float x) {
    __m256 v = _mm256_set1_ps(x), negv = _mm256_set1_ps(-x);
    __m256i bits = _mm256_set1_epi32((int)hw);
    add8_f16(out, w, v, negv, bits, SHIFTS8(0, 4));
    add8_f16(out + 8, w + 8, v, negv, bits, SHIFTS8(8, 12));
    add8_f16(out + 16, w + 16, v, negv, bits, SHIFTS8(16, 20));
    add8_f16(out + 24, w + 24, v, negv, bits, SHIFTS8(24, 28));
}
GROUP_FUNCTIONS(f16)
#define F16_PERTURB_GROUP(...) perturb_group_f16((uint16_t *)out + gs, (const uint16_t *)w + gs, hw, eps);
#define F16_UPDATE_GROUP(...) update_group_f16((uint16_t *)w + gs, hw, cf);
#define HAVE_F16_GROUPS 1
#else
#define HAVE_F16_GROUPS 0
#define F16_PERTURB_GROUP GROUP_LOOP
#define F16_UPDATE_GROUP GROUP_LOOP
#endif
/* bf16 storage, rademacher32, whole groups, on CPUs with AVX512-BF16 (built with -mavx512bf16 where torch reports
   it): vcvtne2ps2bf16 rounds 32 fp32 lanes to bf16, nearest even, in one instruction, where f32_to_bf16 takes about
   eight per 16 lanes, the bulk of a pass. It differs from f32_to_bf16 (torch's rounding) in two ways, both handled: a
   NaN comes out as a quiet NaN with its payload's top bits where torch writes 0xFFFF (those lanes are set after it),
   and an fp32 subnormal is read as zero, so a group whose values include one returns 0 and runs the integer code. */
#if defined(__AVX512BF16__)
INLINE __m512 widen_bf16(const uint16_t *p) {
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i *)p)), 16));
}
/* 32 fp32 lanes rounded to bf16 and stored, NaN lanes as 0xFFFF; none of them may be subnormal. stream: with a
   streaming store where out is 64-byte aligned (a perturbed copy, see STREAMING below) */
INLINE void store_normal_bf16(uint16_t *out, __m512 lo, __m512 hi, int stream) {
    __m512i r = (__m512i)_mm512_cvtne2ps_pbh(hi, lo);  /* lo's lanes first */
    __mmask32 nan = _mm512_kunpackw(_mm512_cmp_ps_mask(hi, hi, _CMP_UNORD_Q), _mm512_cmp_ps_mask(lo, lo, _CMP_UNORD_Q));
    r = _mm512_mask_mov_epi16(r, nan, _mm512_set1_epi16(-1));
    if (stream && ((uintptr_t)out & 63) == 0)
        _mm512_stream_si512((__m512i *)out, r);
    else
        _mm512_storeu_si512(out, r);
}
INLINE int store_group_bf16(uint16_t *out, __m512 lo, __m512 hi, int stream) {
    if (_mm512_fpclass_ps_mask(lo, 0x20) | _mm512_fpclass_ps_mask(hi, 0x20))  /* 0x20: the subnormal class */
        return 0;
    store_normal_bf16(out, lo, hi, stream);
    return 1;
}
/* checked: whether a sum may be subnormal (perturb_bf16_signs: not where the scale is at least TINY) */
INLINE int store_bf16(uint16_t *out, __m512 lo, __m512 hi, int checked, int stream) {
    if (checked) return store_group_bf16(out, lo, hi, stream);
    store_normal_bf16(out, lo, hi, stream);
    return 1;
}
INLINE int perturb_group_bf16(uint16_t *out, const uint16_t *w, uint32_t hw, float eps, int checked, int stream) {
    __builtin_prefetch(w + AHEAD);
    return store_bf16(out, _mm512_add_ps(widen_bf16(w), flip16(eps, hw)),
                      _mm512_add_ps(widen_bf16(w + 16), flip16(eps, hw >> 16)), checked, stream);
}
INLINE int update_group_bf16(uint16_t *w, uint32_t hw, float c, int checked) {
    __builtin_prefetch(w + AHEAD, 1);
    return store_bf16(w, _mm512_sub_ps(widen_bf16(w), flip16(c, hw)),
                      _mm512_sub_ps(widen_bf16(w + 16), flip16(c, hw >> 16)), checked, 0);
}
#define BF16_PERTURB_GROUP(...) \
    if (!perturb_group_bf16((uint16_t *)out + gs, (const uint16_t *)w + gs, hw, eps, 1, 0)) { GROUP_LOOP(__VA_ARGS__) }
#define BF16_UPDATE_GROUP(...) if (!update_group_bf16((uint16_t *)w + gs, hw, cf, 1)) { GROUP_LOOP(__VA_ARGS__) }
#define HAVE_BF16_GROUPS 1
#elif defined(__AVX2__)
/* bf16 storage, rademacher32, whole groups, with AVX2 (and AVX-512 without BF16): f32_to_bf16's integer rounding, 8
   lanes at a time. 16 weights are widened by interleaving them with zeros (each the high half of an fp32 lane), which
   leaves them in the order 0-3, 8-11 (lo) and 4-7, 12-15 (hi): their signs are taken from those bits of the hash, and
   packing the two halves back (packus, per 128-bit lane) restores the order. Fewer instructions than the compiler's
   vectorization of the scalar code: on a 2-core Zen 3 (docs/bench_passes.py, SmolLM2's 134M weights) a perturbation
   pass 1.35 -> 0.94 weight copies, the fused update + perturbation 2.35 -> 1.57 (README, Measured: stop 27). */
/* f32_to_bf16 on 8 lanes: round to nearest even, the pattern in the low half of each 32-bit lane */
INLINE __m256i round8_bf16(__m256i u) {
    __m256i lsb = _mm256_and_si256(_mm256_srli_epi32(u, 16), _mm256_set1_epi32(1));
    return _mm256_srli_epi32(_mm256_add_epi32(_mm256_add_epi32(u, _mm256_set1_epi32(0x7FFF)), lsb), 16);
}
/* 16 bf16 weights of w plus x * z (lanes lo: bits a..a+3, a+8..a+11 of the hash in `bits`, hi: a+4..a+7, a+12..a+15),
   rounded to nearest even into out, NaN sums as 0xFFFF */
INLINE void add16_bf16(uint16_t *out, const uint16_t *w, __m256 x, __m256 negx, __m256i bits, __m256i shift_lo,
                       __m256i shift_hi) {
    __m256i v = _mm256_loadu_si256((const __m256i *)w);
    __m256 lo = _mm256_add_ps(_mm256_castsi256_ps(_mm256_unpacklo_epi16(_mm256_setzero_si256(), v)),
                              signed8(x, negx, bits, shift_lo));
    __m256 hi = _mm256_add_ps(_mm256_castsi256_ps(_mm256_unpackhi_epi16(_mm256_setzero_si256(), v)),
                              signed8(x, negx, bits, shift_hi));
    __m256i r = _mm256_packus_epi32(round8_bf16(_mm256_castps_si256(lo)), round8_bf16(_mm256_castps_si256(hi)));
    __m256i nan = _mm256_packs_epi32(_mm256_castps_si256(_mm256_cmp_ps(lo, lo, _CMP_UNORD_Q)),
                                     _mm256_castps_si256(_mm256_cmp_ps(hi, hi, _CMP_UNORD_Q)));
    _mm256_storeu_si256((__m256i *)out, _mm256_or_si256(r, nan));
}
/* x = eps for a perturbation, -c for an update (as add_group_f16) */
INLINE void add_group_bf16(uint16_t *out, const uint16_t *w, uint32_t hw, float x) {
    __m256 v = _mm256_set1_ps(x), negv = _mm256_set1_ps(-x);
    __m256i bits = _mm256_set1_epi32((int)hw);
    add16_bf16(out, w, v, negv, bits, SHIFTS8(0, 8), SHIFTS8(4, 12));
    add16_bf16(out + 16, w + 16, v, negv, bits, SHIFTS8(16, 24), SHIFTS8(20, 28));
}
GROUP_FUNCTIONS(bf16)
#define BF16_PERTURB_GROUP(...) perturb_group_bf16((uint16_t *)out + gs, (const uint16_t *)w + gs, hw, eps);
#define BF16_UPDATE_GROUP(...) update_group_bf16((uint16_t *)w + gs, hw, cf);
#define HAVE_BF16_GROUPS 1
#else
#define HAVE_BF16_GROUPS 0
#define BF16_PERTURB_GROUP GROUP_LOOP
#define BF16_UPDATE_GROUP GROUP_LOOP
#endif
/* the hand-vectorized group of storage kind K (1 fp16, 2 bf16; 0: none), and whether this build has it */
#define PERTURB_GROUP_0 GROUP_LOOP
#define PERTURB_GROUP_1 F16_PERTURB_GROUP
#define PERTURB_GROUP_2 BF16_PERTURB_GROUP
#define UPDATE_GROUP_0 GROUP_LOOP
#define UPDATE_GROUP_1 F16_UPDATE_GROUP
#define UPDATE_GROUP_2 BF16_UPDATE_GROUP
#define HAVE_GROUPS(K) ((K) == 1 ? HAVE_F16_GROUPS : (K) == 2 ? HAVE_BF16_GROUPS : 0)

/* CALL on each block [b, e) of [0, n) (n: a variable of the caller); BLOCKS: over `threads` threads from
   PARALLEL_FROM elements on, below that with no parallel region at all (an OpenMP region of one thread, `if` false,
   cost each small tensor of a perturbed forward ~8 us more: 30 layers at width 64, 2 threads, Zen 3) */
#define EACH_BLOCK(CALL) for (int64_t b = 0; b < n; b += BLOCK) { int64_t e = b + BLOCK < n ? b + BLOCK : n; CALL; }
#define BLOCKS(CALL)                                                                              \
    if (n < PARALLEL_FROM || threads <= 1) {                                                      \
        EACH_BLOCK(CALL)                                                                          \
    } else {                                                                                      \
        _Pragma("omp parallel for schedule(static) num_threads(threads)")                         \
        EACH_BLOCK(CALL)                                                                          \
    }
/* Each kernel body is compiled once per (storage kind(s), distribution), the constants folded in, and picked from a
   table: M(kind, dist) for every kind and distribution, M(w kind, out kind, dist) for every pair of kinds. */
#define EACH_DIST(M, ...) M(__VA_ARGS__, 0) M(__VA_ARGS__, 1) M(__VA_ARGS__, 2)
#define EACH_KIND(M) EACH_DIST(M, 0) EACH_DIST(M, 1) EACH_DIST(M, 2)
#define EACH_PAIR(M) EACH_DIST(M, 0, 0) EACH_DIST(M, 0, 1) EACH_DIST(M, 0, 2) \
                     EACH_DIST(M, 1, 0) EACH_DIST(M, 1, 1) EACH_DIST(M, 1, 2) \
                     EACH_DIST(M, 2, 0) EACH_DIST(M, 2, 1) EACH_DIST(M, 2, 2)
/* a call of F(..., d) with the distribution as a constant */
#define BY_DIST(F, dist, ...) \
    if ((dist) == 0) F(__VA_ARGS__, 0); else if ((dist) == 1) F(__VA_ARGS__, 1); else F(__VA_ARGS__, 2)

INLINE void z_f32_(float *out, int64_t b, int64_t e, uint64_t offset, uint32_t k0, uint32_t k1, int dist) {
    ZLOOP(dist, out[s] = z32(zi, dist))
}
INLINE void z_f64_(double *out, int64_t b, int64_t e, uint64_t offset, uint32_t k0, uint32_t k1, int dist) {
    ZLOOP(dist, out[s] = z64(zi, dist))
}
void z_f32(float *out, int64_t n, const int64_t *key, int dist, int threads) {
    BLOCKS(BY_DIST(z_f32_, dist, out, b, e, key[2], key[0], key[1]))
}
void z_f64(double *out, int64_t n, const int64_t *key, int dist, int threads) {
    BLOCKS(BY_DIST(z_f64_, dist, out, b, e, key[2], key[0], key[1]))
}

/* out = round(fp32(w) + eps * z) in fp32: the product rounded, then the sum (zrng.perturb_kernel) */
typedef void perturb_fn(void *, const void *, int64_t, int64_t, uint64_t, uint32_t, uint32_t, float);
#define PERTURB(W, O, D)                                                                          \
    static void perturb_##W##O##D(void *out, const void *w, int64_t b, int64_t e, uint64_t offset, uint32_t k0, \
                                  uint32_t k1, float eps) {                                       \
        ZLOOP_WITH(D, HAVE_GROUPS(W) && W == O, PERTURB_GROUP_##W,                                 \
                   store(out, s, load(w, s, W) + times_z(eps, zi, zsign, D), O))                  \
    }
EACH_PAIR(PERTURB)
#define ENTRY3(W, O, D) perturb_##W##O##D,
static perturb_fn *const PERTURBS[] = {EACH_PAIR(ENTRY3)};
/* the whole groups of [b, e): [cut[0], cut[1]); returns their count */
INLINE int sign_groups(int64_t b, int64_t e, uint64_t offset, int64_t *cut) {
    int64_t b1 = b + (int64_t)((32 - ((offset + (uint64_t)b) & 31)) & 31);
    int64_t e1 = e - (int64_t)((offset + (uint64_t)e) & 31);
    cut[0] = b1, cut[1] = e1;
    return e1 > b1 ? (int)((e1 - b1) >> 5) : 0;
}
#if defined(__AVX512BF16__)
/* bf16 storage, rademacher32: a block's whole groups in one loop of their own, the groups cut by its ends (and any
   group with a subnormal sum) by the functions the tables hold (perturb_222, update_signs_f32_2). Per group the same
   functions (perturb_group_bf16, update_group_bf16), so the same bits, with less around them: no bounds check or
   index arithmetic per group, and no subnormal check where none can occur. A sum x + s of a bf16 value x and s = +-eps
   (or -+c) with |s| >= 2^-100 is never subnormal: if |x| < 2^-126 it is at least |s| - |x| > 2^-126; otherwise x and
   s are both normal, and either their magnitudes are more than a factor 2 apart (the sum is at least half the larger
   one) or |x| >= |s| / 2 >= 2^-101, so both are multiples of 2^-124 (fp32's ulp at 2^-101) and so is their sum,
   which is 0 or at least 2^-124. Below that scale (eps 0, a tiny c) every group is checked as before. */
#define TINY 0x1p-100f
/* GROUP(gs, hw, checked) on each whole group of [b, e) (false: a subnormal sum, nothing stored), GENERIC(a, z) on the
   rest; s: the scale */
#define SIGN_GROUPS_LOOP(GROUP, GENERIC, s)                                                       \
    int64_t cut[2];                                                                               \
    int ng = sign_groups(b, e, offset, cut);                                                      \
    if (ng == 0) { GENERIC(b, e); return; }                                                       \
    if (cut[0] > b) GENERIC(b, cut[0]);                                                           \
    if (e > cut[1]) GENERIC(cut[1], e);                                                           \
    uint32_t H[BLOCK / 32];                                                                       \
    uint64_t q0 = (offset + (uint64_t)cut[0]) >> 5;                                               \
    _Pragma("omp simd")                                                                           \
    for (int g = 0; g < ng; g++) {                                                                \
        uint64_t q = q0 + (uint64_t)g;                                                            \
        H[g] = bits((uint32_t)q, (uint32_t)(q >> 32) ^ k1, k0);                                   \
    }                                                                                             \
    const int checked = !(fabsf(s) >= TINY);                                                      \
    for (int g = 0; g < ng; g++) {                                                                \
        int64_t gs = cut[0] + 32 * (int64_t)g;                                                    \
        if (!GROUP(gs, H[g], checked)) GENERIC(gs, gs + 32);                                      \
    }
INLINE void perturb_bf16_signs_(void *out, const void *w, int64_t b, int64_t e, uint64_t offset, uint32_t k0,
                                uint32_t k1, float eps, int stream) {
#define GROUP(gs, hw, checked) \
    perturb_group_bf16((uint16_t *)out + gs, (const uint16_t *)w + gs, hw, eps, checked, stream)
#define GENERIC(a, z) perturb_222(out, w, a, z, offset, k0, k1, eps)
    SIGN_GROUPS_LOOP(GROUP, GENERIC, eps)
#undef GROUP
#undef GENERIC
}
static void perturb_bf16_signs(void *out, const void *w, int64_t b, int64_t e, uint64_t offset, uint32_t k0,
                               uint32_t k1, float eps) {
    perturb_bf16_signs_(out, w, b, e, offset, k0, k1, eps, 0);
}
/* STREAMING: a perturbed copy that a long matmul reads next (Mezo.STREAM_TOKENS) is written with streaming stores:
   its buffer, left by the previous matmul that read it, is by then mostly out of the caches, and a plain store first
   reads each line back from memory (and writes it back later): three passes of memory traffic for the copy instead
   of one. The matmul reads the copy from memory, behind its arithmetic. The same values (only the store differs);
   the fence makes them visible before the call returns. SmolLM2 in bf16 at 8 x 64 on a 2-core Zen 4 with
   AVX512-BF16: the kernels inside a perturbed forward (no update pending) 21.1 -> 13.9 ms, a step -35 ms (README:
   stop 33). For a short matmul (a few tokens) the copy is read straight back from the caches: plain stores there
   (1 x 8: +21 ms a step streamed). Not for fp32 (tried: a step -1.5 ms, quartiles -20..+12) nor the update's own
   writes of w (slower: the next group's perturbation reads them back). */
static void perturb_bf16_signs_nt(void *out, const void *w, int64_t b, int64_t e, uint64_t offset, uint32_t k0,
                                  uint32_t k1, float eps) {
    perturb_bf16_signs_(out, w, b, e, offset, k0, k1, eps, 1);
    _mm_sfence();
}
#endif
/* the perturbation kernel of (w kind, out kind, distribution); stream: streaming stores where a kernel has them
   (STREAMING above: bf16 with AVX512-BF16), plain stores elsewhere */
static perturb_fn *perturb_for(int wkind, int okind, int dist, int stream) {
#if defined(__AVX512BF16__)
    if (wkind == 2 && okind == 2 && dist == 2) return stream ? perturb_bf16_signs_nt : perturb_bf16_signs;
#endif
    (void)stream;
    return PERTURBS[(wkind * 3 + okind) * 3 + dist];
}
void perturb(void *out, const void *w, int64_t n, const int64_t *key, double eps, int wkind, int okind, int dist,
             int threads, int stream) {
    perturb_fn *f = perturb_for(wkind, okind, dist, stream);
    float eps32 = (float)eps;
    BLOCKS(f(out, w, b, e, key[2], key[0], key[1], eps32))
}

/* the same at explicit element indices (zrng.perturb_rows_kernel) */
typedef void rows_fn(void *, const void *, const int64_t *, int64_t, int64_t, uint64_t, uint32_t, uint32_t, float);
#define ROWS(W, O, D)                                                                             \
    static void rows_##W##O##D(void *out, const void *w, const int64_t *index, int64_t b, int64_t e, \
                               uint64_t offset, uint32_t k0, uint32_t k1, float eps) {            \
        _Pragma("omp simd")                                                                       \
        for (int64_t s = b; s < e; s++) {                                                         \
            uint64_t i = (uint64_t)index[s] + offset;                                             \
            store(out, s, load(w, s, W) + eps * z32(zint_at(i, k0, k1, D), D), O);                \
        }                                                                                         \
    }
EACH_PAIR(ROWS)
#define ENTRY_ROWS(W, O, D) rows_##W##O##D,
static rows_fn *const ROWSS[] = {EACH_PAIR(ENTRY_ROWS)};
void perturb_rows(void *out, const void *w, const int64_t *index, int64_t n, const int64_t *key, double eps,
                  int wkind, int okind, int dist, int threads) {
    rows_fn *f = ROWSS[(wkind * 3 + okind) * 3 + dist];
    float eps32 = (float)eps;
    BLOCKS(f(out, w, index, b, e, key[2], key[0], key[1], eps32))
}

/* w = round(fp32(fp64(w) - c * z)) (zrng.update_kernel): rounded to fp32, then (16-bit storage) to the storage kind,
   both nearest even. For the gaussian z = k / 256 the product is formed as (c / 256) * k: scaling by a power of two
   is exact, so both forms round the same real number c * k / 256 (exactly representable for an fp32 c), with one
   multiply instead of two.
   rademacher32 with an fp32 c (what a run's update applies) is computed in fp32: w - c * z, with c * z = +-c exact. It
   rounds the same real number as fp32(fp64(w) - c * z): where w and c are within 29 binades of each other their
   difference is exact in fp64 (one rounding either way); further apart, the result is the larger of the two within
   a 64th of its ulp, in both forms. That fp32 form keeps the pass as fast as a copy. */
INLINE double cscale(double c, int dist) { return dist == 0 ? c * (1.0 / 256) : c; }
typedef void update_fn(void *, int64_t, int64_t, uint64_t, uint32_t, uint32_t, double);
#define UPDATE(K, D)                                                                              \
    static void update_##K##D(void *w, int64_t b, int64_t e, uint64_t offset, uint32_t k0, uint32_t k1, double cs) { \
        ZLOOP(D, store(w, s, (float)((double)load(w, s, K) - cs * (double)zi), K))                \
    }
EACH_KIND(UPDATE)
#define UPDATE_SIGNS_F32(K)                                                                       \
    static void update_signs_f32_##K(void *w, int64_t b, int64_t e, uint64_t offset, uint32_t k0, uint32_t k1, \
                                     double c) {                                                  \
        float cf = (float)c;                                                                      \
        SIGNS_WITH(HAVE_GROUPS(K), UPDATE_GROUP_##K,                                              \
                   store(w, s, load(w, s, K) - times_z(cf, zi, zsign, 2), K))                     \
    }
UPDATE_SIGNS_F32(0) UPDATE_SIGNS_F32(1) UPDATE_SIGNS_F32(2)
#define ENTRY2(K, D) update_##K##D,
static update_fn *const UPDATES[] = {EACH_KIND(ENTRY2)};
static update_fn *const UPDATES_SIGNS_F32[] = {update_signs_f32_0, update_signs_f32_1, update_signs_f32_2};
#if defined(__AVX512BF16__)
/* update_signs_f32_2's whole groups in a loop of their own (see perturb_bf16_signs) */
static void update_bf16_signs(void *w, int64_t b, int64_t e, uint64_t offset, uint32_t k0, uint32_t k1, double c) {
    float cf = (float)c;
#define GROUP(gs, hw, checked) update_group_bf16((uint16_t *)w + gs, hw, cf, checked)
#define GENERIC(a, z) update_signs_f32_2(w, a, z, offset, k0, k1, c)
    SIGN_GROUPS_LOOP(GROUP, GENERIC, cf)
#undef GROUP
#undef GENERIC
}
#endif
static update_fn *update_for(double c, int kind, int dist) {
    if (dist == 2 && (double)(float)c == c) {
#if defined(__AVX512BF16__)
        if (kind == 2) return update_bf16_signs;
#endif
        return UPDATES_SIGNS_F32[kind];
    }
    return UPDATES[kind * 3 + dist];
}
void update(void *w, int64_t n, const int64_t *key, double c, int kind, int dist, int threads) {
    update_fn *f = update_for(c, kind, dist);
    double cs = cscale(c, dist);
    BLOCKS(f(w, b, e, key[2], key[0], key[1], cs))
}
/* `update` of `count` tensors of one kind (ws[t]: ns[t] elements, keys[3t .. 3t + 2] its key) in one parallel region:
   one call per step instead of one per tensor, whose entry and thread wake-up cost more than a small tensor's pass.
   Each tensor's blocks are shared out as `update` shares them (a one-block tensor runs on the first thread). */
void update_list(void *const *ws, const int64_t *ns, const int64_t *keys, int64_t count, double c, int kind, int dist,
                 int threads) {
    update_fn *f = update_for(c, kind, dist);
    double cs = cscale(c, dist);
    int64_t total = 0;
    for (int64_t t = 0; t < count; t++) total += ns[t];
    _Pragma("omp parallel num_threads(threads) if(total >= PARALLEL_FROM)")
    for (int64_t t = 0; t < count; t++) {
        void *w = ws[t];
        const int64_t n = ns[t], *key = keys + 3 * t;
        _Pragma("omp for schedule(static) nowait")
        EACH_BLOCK(f(w, b, e, key[2], key[0], key[1], cs))
    }
}
/* update_perturb of 16-bit storage with the hand-vectorized groups, rademacher32, an fp32 c, the two keys from one
   element: each whole group updated and then perturbed while its line is in L1 (update_group_T then perturb_group_T,
   the functions of the separate passes: the same bits), both groups' hashes made a block at a time; the groups cut
   by the block's ends by the per-element functions, the update then the perturbation. On the 2-core Zen 3
   (tensors of SmolLM2's shapes, 134M weights, the two libraries alternating in one process, README: stop 28) the
   pass went from 1.62 to 1.32 weight copies in bf16 and from 1.37 to 1.07 in fp16, against the update and the
   perturbation a block (16384 weights) apart. */
#define FUSED_GROUPS(K, T)                                                                        \
    INLINE void update_perturb_groups_##K##_(void *out, void *w, int64_t b, int64_t e, uint64_t offset, uint32_t k0, \
                                             uint32_t k1, uint32_t u0, uint32_t u1, float eps, double c, int stream) { \
        float cf = (float)c;                                                                      \
        int64_t cut[2];                                                                           \
        int ng = sign_groups(b, e, offset, cut);                                                  \
        if (ng == 0) cut[0] = cut[1] = e;                                                         \
        if (cut[0] > b) {                                                                         \
            update_signs_f32_##K(w, b, cut[0], offset, u0, u1, c);                                \
            perturb_##K##K##2(out, w, b, cut[0], offset, k0, k1, eps);                            \
        }                                                                                         \
        if (e > cut[1]) {                                                                         \
            update_signs_f32_##K(w, cut[1], e, offset, u0, u1, c);                                \
            perturb_##K##K##2(out, w, cut[1], e, offset, k0, k1, eps);                            \
        }                                                                                         \
        uint32_t H[BLOCK / 32], HU[BLOCK / 32];                                                   \
        uint64_t q0 = (offset + (uint64_t)cut[0]) >> 5;                                           \
        _Pragma("omp simd")                                                                       \
        for (int g = 0; g < ng; g++) {                                                            \
            uint64_t q = q0 + (uint64_t)g;                                                        \
            H[g] = bits((uint32_t)q, (uint32_t)(q >> 32) ^ k1, k0);                               \
            HU[g] = bits((uint32_t)q, (uint32_t)(q >> 32) ^ u1, u0);                              \
        }                                                                                         \
        for (int g = 0; g < ng; g++) {                                                            \
            int64_t gs = cut[0] + 32 * (int64_t)g;                                                \
            FUSED_UPDATE_##T(gs, HU[g]);                                                          \
            FUSED_PERTURB_##T(gs, H[g]);                                                          \
        }                                                                                         \
    }                                                                                             \
    static void update_perturb_groups_##K(void *out, void *w, int64_t b, int64_t e, uint64_t offset, uint32_t k0, \
                                          uint32_t k1, uint32_t u0, uint32_t u1, float eps, double c) { \
        update_perturb_groups_##K##_(out, w, b, e, offset, k0, k1, u0, u1, eps, c, 0);           \
    }
/* one group of the fused loop (gs: its first element, h: its hash) by the group functions; an AVX512-BF16 group whose
   sum would be subnormal stores nothing and goes to the per-element function for its 32 weights, as
   update_bf16_signs and perturb_bf16_signs send it (the same bits as the two passes; that fused pass over SmolLM2's
   tensors on a 2-core Zen 4, one process, the two libraries alternating: 25.3 -> 21.9 ms, a copy 16.6 ms). `stream`
   (the loop's argument): whether the perturbed copy is streamed (STREAMING: the AVX512-BF16 groups; ignored by the
   others) */
#define FUSED_UPDATE_f16(gs, h) update_group_f16((uint16_t *)w + gs, h, cf)
#define FUSED_PERTURB_f16(gs, h) perturb_group_f16((uint16_t *)out + gs, (const uint16_t *)w + gs, h, eps)
#if defined(__AVX512BF16__)
#define FUSED_UPDATE_bf16(gs, h)                                                                  \
    if (!update_group_bf16((uint16_t *)w + gs, h, cf, !(fabsf(cf) >= TINY)))                      \
        update_signs_f32_2(w, gs, gs + 32, offset, u0, u1, c)
#define FUSED_PERTURB_bf16(gs, h)                                                                 \
    if (!perturb_group_bf16((uint16_t *)out + gs, (const uint16_t *)w + gs, h, eps, !(fabsf(eps) >= TINY), stream)) \
        perturb_222(out, w, gs, gs + 32, offset, k0, k1, eps)
#else
#define FUSED_UPDATE_bf16(gs, h) update_group_bf16((uint16_t *)w + gs, h, cf)
#define FUSED_PERTURB_bf16(gs, h) perturb_group_bf16((uint16_t *)out + gs, (const uint16_t *)w + gs, h, eps)
#endif
/* which storage kinds have them */
#define HAVE_FUSED_F16 HAVE_F16_GROUPS
#define HAVE_FUSED_BF16 HAVE_BF16_GROUPS
#if HAVE_FUSED_F16
FUSED_GROUPS(1, f16)
#endif
#if HAVE_FUSED_BF16
FUSED_GROUPS(2, bf16)
#endif
#if defined(__AVX512BF16__)
/* update_perturb_groups_2 with the perturbed copy streamed (STREAMING) */
static void update_perturb_groups_nt_2(void *out, void *w, int64_t b, int64_t e, uint64_t offset, uint32_t k0,
                                       uint32_t k1, uint32_t u0, uint32_t u1, float eps, double c) {
    update_perturb_groups_2_(out, w, b, e, offset, k0, k1, u0, u1, eps, c, 1);
    _mm_sfence();
}
#endif
/* How one tensor's perturbed copy is formed, picked once per tensor: `perturb` by (key, eps) or, with an update
   pending (ukey non-null), `update` of w by (ukey, c) then `perturb` of the updated w, one block after the other (the
   block is read from memory once, its second reading comes from cache; the same two functions on the same block as
   the two separate calls: the same bits), or the fused groups above where they apply. */
typedef void fused_fn(void *, void *, int64_t, int64_t, uint64_t, uint32_t, uint32_t, uint32_t, uint32_t, float, double);
typedef struct {
    perturb_fn *p;
    update_fn *u;  /* NULL: no update */
    fused_fn *f;   /* the fused groups, or NULL */
    float eps32;
    double c, cs;
} former;
static former former_for(double eps, const int64_t *key, const int64_t *ukey, double c, int kind, int dist,
                         int stream) {
    former f = {perturb_for(kind, kind, dist, stream), NULL, NULL, (float)eps, c, cscale(c, dist)};
    if (ukey == NULL) return f;
    f.u = update_for(c, kind, dist);
    if (dist == 2 && (double)(float)c == c && key[2] == ukey[2]) {
#if HAVE_FUSED_F16
        if (kind == 1) f.f = update_perturb_groups_1;
#endif
#if HAVE_FUSED_BF16
        if (kind == 2) f.f = update_perturb_groups_2;
#endif
#if defined(__AVX512BF16__)
        if (kind == 2 && stream) f.f = update_perturb_groups_nt_2;
#endif
    }
    return f;
}
INLINE void form_block(const former *f, void *out, void *w, int64_t b, int64_t e, const int64_t *key,
                       const int64_t *ukey) {
    if (f->f) {
        f->f(out, w, b, e, key[2], key[0], key[1], ukey[0], ukey[1], f->eps32, f->c);
        return;
    }
    if (f->u) f->u(w, b, e, ukey[2], ukey[0], ukey[1], f->cs);
    f->p(out, w, b, e, key[2], key[0], key[1], f->eps32);
}
/* `update` of w by (ukey, c), then `perturb` of the updated w into out by (key, eps) (Mezo.perturbed, for an update
   left pending by the previous step) */
void update_perturb(void *out, void *w, int64_t n, const int64_t *key, double eps, const int64_t *ukey, double c,
                    int kind, int dist, int threads, int stream) {
    former f = former_for(eps, key, ukey, c, kind, dist, stream);
    BLOCKS(form_block(&f, out, w, b, e, key, ukey))
}
/* The perturbed copies of `count` tensors of one kind in one call, tensor t described by items[t] (out, w: n
   elements; key its key, ukey its pending update's or NULL): `perturb` or `update_perturb` of each, in one parallel
   region (a module's or a family's tensors, Mezo.perturbed: one call where there were several, each with its entry and
   thread wake-up), each tensor's blocks shared out as `perturb` shares them. One array of items rather than an array
   a field: the caller makes one ctypes array a call instead of five (~0.8 us each in a loop, more inside a
   forward). */
typedef struct {
    void *out, *w;
    int64_t n;
    const int64_t *key, *ukey;
} form_item;
void form_list(const form_item *items, int64_t count, double eps, double c, int kind, int dist, int threads,
               int stream) {
    int64_t total = 0;
    for (int64_t t = 0; t < count; t++) total += items[t].n;
    if (total < PARALLEL_FROM || threads <= 1) {
        for (int64_t t = 0; t < count; t++) {
            const form_item *it = items + t;
            former f = former_for(eps, it->key, it->ukey, c, kind, dist, stream);
            const int64_t n = it->n;
            EACH_BLOCK(form_block(&f, it->out, it->w, b, e, it->key, it->ukey))
        }
        return;
    }
    _Pragma("omp parallel num_threads(threads)")
    for (int64_t t = 0; t < count; t++) {
        const form_item *it = items + t;
        former f = former_for(eps, it->key, it->ukey, c, kind, dist, stream);
        const int64_t n = it->n;
        _Pragma("omp for schedule(static) nowait")
        EACH_BLOCK(form_block(&f, it->out, it->w, b, e, it->key, it->ukey))
    }
}

/* `update` at explicit element indices (zrng.update_rows_kernel): each value as `update` updates the element of its
   index, with the arithmetic update_for picks (an embedding lookup's rows, while its table's update is left for the
   LM head tied to it, Mezo.perturbed) */
typedef void update_rows_fn(void *, const int64_t *, int64_t, int64_t, uint64_t, uint32_t, uint32_t, double);
#define UPDATE_ROWS(K, D)                                                                         \
    static void update_rows_##K##D(void *w, const int64_t *index, int64_t b, int64_t e, uint64_t offset, uint32_t k0, \
                                   uint32_t k1, double cs) {                                      \
        _Pragma("omp simd")                                                                       \
        for (int64_t s = b; s < e; s++) {                                                         \
            int32_t zi = zint_at((uint64_t)index[s] + offset, k0, k1, D);                         \
            store(w, s, (float)((double)load(w, s, K) - cs * (double)zi), K);                     \
        }                                                                                         \
    }
EACH_KIND(UPDATE_ROWS)
#define UPDATE_ROWS_SIGNS_F32(K)                                                                  \
    static void update_rows_signs_f32_##K(void *w, const int64_t *index, int64_t b, int64_t e, uint64_t offset, \
                                          uint32_t k0, uint32_t k1, double c) {                   \
        float cf = (float)c;                                                                      \
        _Pragma("omp simd")                                                                       \
        for (int64_t s = b; s < e; s++) {                                                         \
            int32_t zi = zint_at((uint64_t)index[s] + offset, k0, k1, 2);                         \
            store(w, s, load(w, s, K) - times_z(cf, zi, zi < 0 ? 0x80000000u : 0u, 2), K);       \
        }                                                                                         \
    }
UPDATE_ROWS_SIGNS_F32(0) UPDATE_ROWS_SIGNS_F32(1) UPDATE_ROWS_SIGNS_F32(2)
#define ENTRY_UPDATE_ROWS(K, D) update_rows_##K##D,
static update_rows_fn *const UPDATE_ROWSS[] = {EACH_KIND(ENTRY_UPDATE_ROWS)};
static update_rows_fn *const UPDATE_ROWS_SIGNS_F32S[] = {update_rows_signs_f32_0, update_rows_signs_f32_1,
                                                          update_rows_signs_f32_2};
void update_rows(void *w, const int64_t *index, int64_t n, const int64_t *key, double c, int kind, int dist,
                 int threads) {
    int signs = dist == 2 && (double)(float)c == c;
    update_rows_fn *f = signs ? UPDATE_ROWS_SIGNS_F32S[kind] : UPDATE_ROWSS[kind * 3 + dist];
    double cs = signs ? c : cscale(c, dist);
    BLOCKS(f(w, index, b, e, key[2], key[0], key[1], cs))
}

/* zrng.update_kernel_stochastic, step for step: v = w - c*z in `wide` (fp64 for fp32 storage, else fp32); r = v
   rounded to nearest; n = r's other neighbour (r's bit pattern + 1 away from zero, - 1 toward it, wrapping as zrng's
   signed view does; from a zero: the smallest subnormal with v's sign); n when u < |v - r| / |n - r| and v != r. */
INLINE uint32_t other_neighbour(uint32_t rb, int away, int is_zero, uint32_t sign, uint32_t mask) {
    /* sign: v's sign bit in the storage pattern; from a zero it is v < 0 (v = -0 rounds to r = -0 exactly, and then
       the neighbour is not used) */
    uint32_t step = (rb + (away ? 1u : mask)) & mask;
    return is_zero ? (sign | 1u) : step;
}
INLINE uint32_t stochastic16(float v, float u, int kind) {
    uint32_t rb = round16(v, kind);
    float rv = widen16(rb, kind);
    uint32_t nb = other_neighbour(rb, __builtin_fabsf(v) > __builtin_fabsf(rv), rv == 0.0f, (f2u(v) >> 16) & 0x8000u,
                                  0xFFFFu);
    float p = __builtin_fabsf(v - rv) / __builtin_fabsf(widen16(nb, kind) - rv);
    /* v != rv compared as patterns: the same here (rv keeps v's sign at zero; a NaN v gives p = NaN) */
    return u < p && f2u(v) != f2u(rv) ? nb : rb;
}
INLINE float stochastic32(double v, float u) {
    float r = (float)v;
    double rv = (double)r;
    uint32_t rb = f2u(r);
    uint32_t nb = other_neighbour(rb, __builtin_fabs(v) > __builtin_fabs(rv), rv == 0.0,
                                  (uint32_t)(d2u(v) >> 32) & 0x80000000u, 0xFFFFFFFFu);
    double p = __builtin_fabs(v - rv) / __builtin_fabs((double)u2f(nb) - rv);
    return u2f((double)u < p && v != rv ? nb : rb);
}
typedef void stochastic_fn(void *, int64_t, int64_t, uint64_t, uint32_t, uint32_t, uint32_t, uint32_t, double);
#define STOCHASTIC(K, D)                                                                          \
    static void stochastic_##K##D(void *w, int64_t b, int64_t e, uint64_t offset, uint32_t k0, uint32_t k1, \
                                  uint32_t r0, uint32_t r1, double cs) {                          \
        ZLOOP(D, double v = (double)load(w, s, K) - cs * (double)zi;                              \
                  float u = uniform(bits(lo, hk ^ k1 ^ r1, r0));                                  \
                  if (K == 0) ((float *)w)[s] = stochastic32(v, u);                               \
                  else ((uint16_t *)w)[s] = (uint16_t)stochastic16((float)v, u, K))               \
    }
EACH_KIND(STOCHASTIC)
#define ENTRY_ST(K, D) stochastic_##K##D,
static stochastic_fn *const STOCHASTICS[] = {EACH_KIND(ENTRY_ST)};
void update_stochastic(void *w, int64_t n, const int64_t *key, const int64_t *rkey, double c, int kind, int dist,
                       int threads) {
    stochastic_fn *f = STOCHASTICS[kind * 3 + dist];
    double cs = cscale(c, dist);
    BLOCKS(f(w, b, e, key[2], key[0], key[1], rkey[0], rkey[1], cs))
}

/* One Adam step (mezo.adam_update), in its order, every operation one fp32 rounding (sqrtf: IEEE, correctly
   rounded; -fno-math-errno lets it vectorize). k = {g, eta, beta1, beta2, 1 - beta1, 1 - beta2, 1 - beta1^t,
   1 - beta2^t, eps}, fp32 values; m1, m2 are the moments m, v (STRETCHES uses the name m). */
static inline void adam_(float *w, float *m1, float *m2, int64_t b, int64_t e, uint64_t offset, uint32_t k0,
                         uint32_t k1, const float *k, int dist) {
    float g = k[0], eta = k[1], b1 = k[2], b2 = k[3], c1 = k[4], c2 = k[5], bc1 = k[6], bc2 = k[7], eps = k[8];
    ZLOOP(dist,
        float est = z32(zi, dist) * g;
        float sq = est * est;
        float mm = m1[s] * b1; mm = mm + est * c1;
        float vv = m2[s] * b2; vv = vv + sq * c2;
        float den = sqrtf(vv / bc2) + eps;
        float step = mm / bc1; step = step / den; step = step * eta;
        m1[s] = mm; m2[s] = vv; w[s] = w[s] - step)
}
void adam_f32(float *w, float *m1, float *m2, int64_t n, const int64_t *key, const float *k, int dist, int threads) {
    BLOCKS(BY_DIST(adam_, dist, w, m1, m2, b, e, key[2], key[0], key[1], k))
}
"""

_P, _I64, _INT, _DBL = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int, ctypes.c_double
_SIGNATURES = {
    "z_f32": [_P, _I64, _P, _INT, _INT],
    "z_f64": [_P, _I64, _P, _INT, _INT],
    "perturb": [_P, _P, _I64, _P, _DBL, _INT, _INT, _INT, _INT, _INT],
    "perturb_rows": [_P, _P, _P, _I64, _P, _DBL, _INT, _INT, _INT, _INT],
    "update": [_P, _I64, _P, _DBL, _INT, _INT, _INT],
    "update_rows": [_P, _P, _I64, _P, _DBL, _INT, _INT, _INT],
    "update_list": [_P, _P, _P, _I64, _DBL, _INT, _INT, _INT],
    "update_perturb": [_P, _P, _I64, _P, _DBL, _P, _DBL, _INT, _INT, _INT, _INT],
    "form_list": [_P, _I64, _DBL, _DBL, _INT, _INT, _INT, _INT],
    "update_stochastic": [_P, _I64, _P, _P, _DBL, _INT, _INT, _INT],
    "adam_f32": [_P, _P, _P, _I64, _P, _P, _INT, _INT],
}
# the storage kinds of the C source (form_list takes one; Mezo._form_list looks it up)
KINDS = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}
# what torch.compile's CPU backend passes for the same capability
_ISA_FLAGS = {"AVX512": ["-mavx512f", "-mavx512dq", "-mavx512vl", "-mavx512bw", "-mfma"],
              "AVX2": ["-mavx2", "-mfma", "-mf16c"]}  # F16C: every AVX2 x86 CPU has it (the fp16 groups use it)


def _compiler() -> str | None:
    if os.environ.get("CC"):
        return os.environ["CC"]
    return next((cc for cc in ("gcc", "cc", "clang") if shutil.which(cc)), None)


def _build(cc: str, flags: list[str], source: str = SOURCE) -> Path:
    """The shared library for (source, compiler, flags): built once into the cache, atomically."""
    from .cache import cache_dir

    version = subprocess.run([cc, "--version"], capture_output=True, text=True, timeout=60).stdout
    digest = hashlib.sha256("\0".join([source, cc, version, *flags]).encode()).hexdigest()[:16]
    target = cache_dir() / "kernels" / f"cpu_kernels-{digest}.so"
    if target.exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        src, lib = Path(tmp) / "cpu_kernels.c", Path(tmp) / target.name
        src.write_text(source)
        proc = subprocess.run([cc, *flags, str(src), "-o", str(lib)], capture_output=True, text=True, timeout=300)
        if proc.returncode != 0:
            raise RuntimeError(f"{cc} failed: {proc.stderr.strip()[-2000:]}")
        os.replace(lib, target)  # atomic: a concurrent process sees no file or a whole one
    return target


def compile_flags() -> list[str]:
    """The compiler flags, OpenMP aside. -ffp-contract=off is what keeps the bits (no multiply-add contraction);
    -fno-trapping-math changes no result (it lets the compiler compute both sides of a select, so the fp16
    conversions vectorize), nor does -fno-math-errno (sqrtf stays IEEE, correctly rounded; it may then vectorize, for
    the Adam step), and no value-changing flag (-ffast-math and its parts) is ever passed."""
    isa = _ISA_FLAGS.get(torch.backends.cpu.get_cpu_capability(), [])
    if "-mavx512f" in isa and torch.cpu._is_avx512_bf16_supported():  # vcvtne2ps2bf16 for the bf16 groups
        isa = [*isa, "-mavx512bf16"]
    return ["-O3", "-shared", "-fPIC", "-ffp-contract=off", "-fno-trapping-math", "-fno-math-errno", *isa]


def load(path: Path) -> ctypes.CDLL:
    """A built library with the kernels' argument types set."""
    lib = ctypes.CDLL(str(path))
    for name, argtypes in _SIGNATURES.items():
        getattr(lib, name).argtypes, getattr(lib, name).restype = argtypes, None
    return lib


@functools.cache
def library() -> ctypes.CDLL | None:
    """The compiled kernels, or None (with one warning) when they cannot be built here."""
    if os.environ.get("MEZO_TUNE_CPU_KERNELS", "1") == "0":
        return None
    cc = _compiler()
    problems = []
    if cc is None:
        problems.append("no C compiler found (set CC)")
    else:
        # with OpenMP (threads shared with torch's libgomp), else single-threaded (e.g. Apple clang: no -fopenmp)
        for flags in (compile_flags() + ["-fopenmp"], compile_flags()):
            try:
                return load(_build(cc, flags))
            except Exception as exc:  # noqa: BLE001 - any failure means: use the torch kernels
                problems.append(str(exc))
    warnings.warn("mezo-tune: the C kernels for CPU could not be built, so z is generated by the (slower) torch "
                  f"kernels: {'; '.join(problems)}", RuntimeWarning, stacklevel=2)
    return None


def _on_cpu(*tensors: torch.Tensor, dtypes=tuple(KINDS)) -> bool:
    """Contiguous CPU tensors of the given dtypes and all of one size (the C kernels trust both)."""
    n = tensors[0].numel()
    for t in tensors:  # a loop, not all(...): this runs for every tensor of every perturbed forward
        if not (t.is_cpu and t.dtype in dtypes and t.is_contiguous() and t.numel() == n):
            return False
    return True


def _key_ok(*keys: torch.Tensor) -> bool:
    for key in keys:
        if not (key.is_cpu and key.dtype == torch.int64 and key.is_contiguous()):
            return False
    return True


def adam(w: torch.Tensor, m: torch.Tensor, v: torch.Tensor, key: torch.Tensor, scalars: torch.Tensor,
         distribution: str) -> bool:
    """mezo.adam_update over a whole fp32 tensor with z generated inline (scalars: adam_f32's k, fp32); False, doing
    nothing, where the C kernels do not cover it (the caller runs the torch ops then)."""
    lib = library()
    if lib is None or not (_on_cpu(w, m, v, dtypes=(torch.float32,)) and _key_ok(key)
                           and _on_cpu(scalars, dtypes=(torch.float32,))):
        return False
    lib.adam_f32(w.data_ptr(), m.data_ptr(), v.data_ptr(), w.numel(), key.data_ptr(), scalars.data_ptr(),
                 zrng.distribution_code(distribution), torch.get_num_threads())
    return True


def update_list(tensors: list[torch.Tensor], keys: torch.Tensor, c: float, distribution: str,
                lib: ctypes.CDLL | None = None) -> bool:
    """zrng.update_kernel over whole tensors of one dtype in one call (keys: int64, one (k0, k1, offset) row per
    tensor); False, doing nothing, where the C kernels do not cover them (the caller runs the kernel per tensor)."""
    lib = lib or library()
    if (lib is None or not tensors or tensors[0].dtype not in KINDS or keys.shape != (len(tensors), 3)
            or not _key_ok(keys) or not all(_on_cpu(t, dtypes=(tensors[0].dtype,)) for t in tensors)):
        return False
    count = len(tensors)
    lib.update_list((ctypes.c_void_p * count)(*[t.data_ptr() for t in tensors]),
                    (ctypes.c_int64 * count)(*[t.numel() for t in tensors]), keys.data_ptr(), count, float(c),
                    KINDS[tensors[0].dtype], zrng.distribution_code(distribution), torch.get_num_threads())
    return True


def update_perturb(out: torch.Tensor, w: torch.Tensor, key: torch.Tensor, eps: float, ukey: torch.Tensor, c: float,
                   distribution: str, lib: ctypes.CDLL | None = None) -> bool:
    """zrng.update_kernel(w, ukey, c) (round to nearest), then zrng.perturb_kernel(out, w, key, eps), in one pass over
    w (out and w of one dtype); False, doing nothing, where the C kernels do not cover them."""
    lib = lib or library()
    if lib is None or not (_on_cpu(out, w) and out.dtype == w.dtype and _key_ok(key, ukey)):
        return False
    lib.update_perturb(out.data_ptr(), w.data_ptr(), w.numel(), key.data_ptr(), float(eps), ukey.data_ptr(), float(c),
                       KINDS[w.dtype], zrng.distribution_code(distribution), torch.get_num_threads(), 0)
    return True


def perturb_whole(lib: ctypes.CDLL, out: torch.Tensor, w: torch.Tensor, key: int, eps: float, distribution: int,
                  ukey: int | None = None, c: float = 0.0, stream: bool = False) -> bool:
    """`perturb` of a whole tensor (out = R(w + eps·z)), and with ukey `update_perturb` (w ← R(w - c·z_u) first, in
    the same pass), as the hot path of a perturbed forward calls them (form_list: several tensors at once): the keys
    are addresses of int64 (k0, k1, offset) rows that outlive the call, eps and c plain floats and the distribution
    its code, where the twins take tensors and names, whose checks and conversions cost more than a small tensor's
    pass (docs/bench_passes.py times the kernels with it; the tests hold form_list to it). stream: out written with
    streaming stores where the kernel has them (the C source's STREAMING: for a copy a long matmul reads next; the
    same bits). False, doing nothing, where the C kernels do not cover out and w."""
    if not (_on_cpu(out, w) and out.dtype == w.dtype):
        return False
    kind = KINDS[w.dtype]
    if ukey is None:
        lib.perturb(out.data_ptr(), w.data_ptr(), w.numel(), key, eps, kind, kind, distribution,
                    torch.get_num_threads(), int(stream))
    else:
        lib.update_perturb(out.data_ptr(), w.data_ptr(), w.numel(), key, eps, ukey, c, kind, distribution,
                           torch.get_num_threads(), int(stream))
    return True


def form_list(lib: ctypes.CDLL, items, eps: float, c: float, kind: int, distribution: int,
              stream: bool = False) -> None:
    """`perturb_whole` of several tensors of one storage kind in one call. items: five ints a tensor, (out, w, n, key,
    ukey): out's and w's data addresses (contiguous CPU tensors, out and w of n elements and one kind), the address of
    its key's (k0, k1, offset) row and that of its pending update's (0: none; c: that update's scale); a list, or the
    array form_items made of one (kept by the caller). For the hot path of a perturbed forward (Mezo._form_list): the
    caller has checked the tensors. stream: as perturb_whole's."""
    array = items if isinstance(items, ctypes.Array) else form_items(items)
    lib.form_list(array, len(items) // 5, eps, c, kind, distribution, torch.get_num_threads(), int(stream))


def form_items(items: list[int]) -> ctypes.Array:
    """form_list's items as the C array it passes."""
    return (ctypes.c_int64 * len(items))(*items)


def twin(fn, fallback, lib: ctypes.CDLL | None = None):
    """fn's C twin with fn's signature, handing any case it does not cover to `fallback`; None if there is none.
    lib: the built kernels to call (default: library())."""
    lib = lib or library()
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
    lib.perturb(out.data_ptr(), w.data_ptr(), w.numel(), key.data_ptr(), float(eps), KINDS[w.dtype],
                KINDS[out.dtype], zrng.distribution_code(distribution), torch.get_num_threads(), 0)


def _perturb_rows(lib, fallback, out, w, index, key, eps, distribution):
    if not (_on_cpu(out, w) and _on_cpu(index, dtypes=(torch.int64,)) and index.numel() == w.numel()
            and _key_ok(key)):
        return fallback(out, w, index, key, eps, distribution)
    lib.perturb_rows(out.data_ptr(), w.data_ptr(), index.data_ptr(), w.numel(), key.data_ptr(), float(eps),
                     KINDS[w.dtype], KINDS[out.dtype], zrng.distribution_code(distribution), torch.get_num_threads())


def _update(lib, fallback, w, key, c, distribution):
    if not _on_cpu(w) or not _key_ok(key):
        return fallback(w, key, c, distribution)
    lib.update(w.data_ptr(), w.numel(), key.data_ptr(), float(c), KINDS[w.dtype],
               zrng.distribution_code(distribution), torch.get_num_threads())


def _update_rows(lib, fallback, w, index, key, c, distribution):
    if not (_on_cpu(w) and _on_cpu(index, dtypes=(torch.int64,)) and index.numel() == w.numel() and _key_ok(key)):
        return fallback(w, index, key, c, distribution)
    lib.update_rows(w.data_ptr(), index.data_ptr(), w.numel(), key.data_ptr(), float(c), KINDS[w.dtype],
                    zrng.distribution_code(distribution), torch.get_num_threads())


def _update_stochastic(lib, fallback, w, key, rkey, c, distribution):
    if not _on_cpu(w) or not _key_ok(key, rkey):
        return fallback(w, key, rkey, c, distribution)
    lib.update_stochastic(w.data_ptr(), w.numel(), key.data_ptr(), rkey.data_ptr(), float(c), KINDS[w.dtype],
                          zrng.distribution_code(distribution), torch.get_num_threads())


_TWINS = {"z_kernel": _z, "perturb_kernel": _perturb, "perturb_rows_kernel": _perturb_rows,
          "update_kernel": _update, "update_rows_kernel": _update_rows, "update_kernel_stochastic": _update_stochastic}
