"""The cases every twin of zrng's kernels must pass bit for bit: the Triton kernels (tests/test_triton.py) and the
C kernels for CPU (tests/test_cpu_kernels.py)."""

import contextlib
import inspect

import torch

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
DISTS = ["gaussian", "rademacher", "rademacher32"]
# (numel, offset): non-multiples of the block (1024), offsets whose high word is set or that cross 2**32 mid-tensor
# fp32 values as Python floats
F32_1E3, F32_TINY, F32_1E_30 = (float(torch.tensor(x, dtype=torch.float32)) for x in (1e-3, 1.2345e-11, -1e-30))
SHAPES = [(1, 0), (1024, 12345), (4097, 2**32 - 1000), (3001, 2**40 + 5)]


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.view({8: torch.int64, 4: torch.int32, 2: torch.int16}[t.element_size()])


def _weights(n: int, dtype, device, seed: int, specials: bool = False) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(n, generator=g) * 0.02
    w[::7] = 0.0  # zeros (stochastic rounding steps off them to the smallest subnormal)
    w[3::11] = -0.0
    w[5::13] *= 1e-6  # small values: subnormal in fp16
    if specials:
        _add_specials(w, g)
    w = w.to(dtype)
    if specials and dtype != torch.float32:  # NaNs of other patterns than the conversion writes (quiet, signalling)
        nans = {torch.bfloat16: (0x7FC1, -0x7F, 0x7F81), torch.float16: (0x7E01, -0x1FF, 0x7C01)}[dtype]
        for start, pattern in zip((30, 32, 34), nans):
            w.view(torch.int16)[start::37] = pattern
    return w.to(device)


def ties(dtype, n: int, g: torch.Generator, scale: float = 1.0) -> torch.Tensor:
    """fp32 values exactly halfway between two neighbours in dtype (fp16 or bf16), both signs, around `scale`: where
    round-to-nearest-even and round-half-away-from-zero differ for every other one."""
    x = ((torch.rand(n, generator=g) + 0.5) * scale).to(dtype)
    x[1::2] = -x[1::2]
    bits = x.view(torch.int16)
    y = (bits + torch.where(bits < 0, -1, 1).to(torch.int16)).view(dtype)  # the neighbour away from zero
    return (x.float() + y.float()) / 2  # exact in fp32


def _add_specials(w: torch.Tensor, g: torch.Generator) -> None:
    """Overwrite some of w (fp32) with the values conversions get wrong first: infinities, NaN, fp32 subnormals,
    fp16 and bf16 subnormals, values right next to fp16's overflow threshold, and exact rounding ties of fp16 and bf16
    (normal and subnormal)."""
    put = {1: float("inf"), 2: float("-inf"), 4: float("nan"), 6: 1e-40, 8: -3e-42, 10: 2.0**-24, 12: -(2.0**-25) * 3,
           14: 65519.0, 15: 65520.0, 16: -65504.0, 18: 2.0**-133,
           # bf16 values whose sum with a scale of 2**-120 and either sign is the fp32 subnormal +-2**-127 (the smallest
           # scale a sum can be subnormal at, which the bf16 kernels check for)
           35: 2.0**-120 - 2.0**-127, 36: 2.0**-127 - 2.0**-120}
    for start, value in put.items():
        w[start::37] = value
    for start, dtype, scale in ((20, torch.bfloat16, 1.0), (22, torch.float16, 1.0), (24, torch.float16, 2.0**-20),
                                (26, torch.bfloat16, 2.0**-130), (28, torch.float16, 1e-2)):
        w[start::37] = ties(dtype, len(w[start::37]), g, scale)


@contextlib.contextmanager
def num_threads(n: int):
    """torch's intra-op thread count (which the C kernels take too) set to n for the block, then restored."""
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def eager(fn, *args) -> None:
    """zrng's kernel fn, run eagerly as the reference the twins are held to, with every element in torch's vector loops.

    On CPU, torch's fp16 -> fp32 conversion keeps a NaN's payload in the vector body of its loop (as vcvtph2ps does)
    but writes 0x7FFFFFFF for any NaN in the scalar tail (the last elements of each thread's stretch, n mod 16 and
    more), so the pattern eager torch writes for an fp16 NaN depends on its position and on the thread count (seen at
    16 threads). The reference is therefore taken on one thread over the tensors padded to a multiple of 256 elements
    (the values past n are zeros, and dropped): every element is in the vector body, and the twins are held to the
    vector body's patterns everywhere."""
    names = list(inspect.signature(fn).parameters)
    padded = list(args)
    spans = [i for i, name in enumerate(names[:len(args)]) if name in ("out", "w", "index")]
    if args[spans[0]].is_cuda:
        fn(*args)
        return
    n = args[spans[0]].numel()
    m = -(-n // 256) * 256
    for i in spans:
        padded[i] = torch.zeros(m, dtype=args[i].dtype)
        padded[i][:n] = args[i]
    with num_threads(1):
        fn(*padded)
    for i in spans:
        if names[i] in ("out", "w"):  # written: the perturbed copy, or the weights updated in place
            args[i].copy_(padded[i][:n])


def run_cases(device: str, tk, shapes=SHAPES, specials: bool = False) -> list[str]:
    """Run every kernel both ways on `device`: zrng's eager kernel and tk's twin of it (tk: anything with the five
    kernels as attributes; if it has update_perturb, that too, against the update then the perturbation; and
    update_rows_kernel, if it has it). Returns a
    description of each case whose bits differ.

    specials: weights with infinities, NaN, subnormals and exact rounding ties too, perturbed copies into every
    floating dtype, and scales that leave a tie exact (eps 0, c 1e-30). NaN bits are part of the comparison: a
    twin must write the NaN patterns eager torch writes on this device (on x86 CPUs: 0xFFFF for bf16)."""
    from mezo_tune import zrng

    bad = []

    def check(what, a, b):
        if a.dtype != b.dtype or not torch.equal(_bits(a), _bits(b)):
            diff = (_bits(a) != _bits(b)).sum().item() if a.dtype == b.dtype else "dtype"
            bad.append(f"{what}: {diff} of {a.numel()} differ")

    for dist in DISTS:
        for si, (n, offset) in enumerate(shapes):
            key = zrng.key_tensor(*zrng.stream_key(7, 11 + si, "w"), offset, device)
            rkey = zrng.key_tensor(*zrng.stream_key(7, 11 + si, "w", zrng.ROUNDING_STREAM), offset, device)
            case = f"{dist} n={n} offset={offset}"
            for dtype in [torch.float64, *DTYPES]:
                outs = [torch.empty(n, dtype=dtype, device=device) for _ in range(2)]
                zrng.z_kernel(outs[0], key, dist)
                tk.z_kernel(outs[1], key, dist)
                check(f"z_kernel {dtype} {case}", *outs)
            for dtype in DTYPES:
                w = _weights(n, dtype, device, si, specials)
                for eps in (1e-3, -1e-3, 0.37) + ((0.0, 1e-30, 2.0**-120) if specials else ()):
                    eps_t = torch.tensor(eps, dtype=torch.float64, device=device)
                    for out_dtype in DTYPES if specials else {dtype, torch.float32}:
                        outs = [torch.empty(n, dtype=out_dtype, device=device) for _ in range(2)]
                        eager(zrng.perturb_kernel, outs[0], w, key, eps_t, dist)
                        tk.perturb_kernel(outs[1], w, key, eps_t, dist)
                        check(f"perturb_kernel {dtype}->{out_dtype} eps={eps} {case}", *outs)
                    # rows: arbitrary element indices of a larger table, values w
                    index = torch.randperm(4 * n, generator=torch.Generator().manual_seed(si))[:n].to(device)
                    outs = [torch.empty(n, dtype=dtype, device=device) for _ in range(2)]
                    eager(zrng.perturb_rows_kernel, outs[0], w, index, key, eps_t, dist)
                    tk.perturb_rows_kernel(outs[1], w, index, key, eps_t, dist)
                    check(f"perturb_rows_kernel {dtype} eps={eps} {case}", *outs)
                # c as training passes it (an fp32 value: rademacher32's C update then computes in fp32) and not (fp64 only);
                # 2**-40 and fp32(1.2345e-11): w - c is inexact in fp64 against weights of ~0.02 (over 29 binades)
                # 0: the weights left as they are, so the fused perturbation after it meets the special values
                for c in (1e-3, F32_1E3, -2.5e-7, 3.0, 2.0**-40, F32_TINY) + (
                        (1e-30, -7e4, F32_1E_30, 2.0**-120, 0.0) if specials else ()):
                    c_t = torch.tensor(c, dtype=torch.float64, device=device)
                    ws = [w.clone(), w.clone()]
                    eager(zrng.update_kernel, ws[0], key, c_t, dist)
                    tk.update_kernel(ws[1], key, c_t, dist)
                    check(f"update_kernel {dtype} c={c} {case}", *ws)
                    if hasattr(tk, "update_perturb"):  # the update fused into the next perturbation (Triton twin)
                        ukey = zrng.key_tensor(*zrng.stream_key(7, 10 + si, "w"), offset, device)
                        # with the tiny c, a tiny eps too: sums that may be subnormal on both sides of the fusion
                        eps_t = torch.tensor(2.0**-120 if abs(c) < 1e-20 else -1e-3, dtype=torch.float64, device=device)
                        ws, outs = [w.clone(), w.clone()], [torch.empty_like(w) for _ in range(2)]
                        eager(zrng.update_kernel, ws[0], ukey, c_t, dist)
                        eager(zrng.perturb_kernel, outs[0], ws[0], key, eps_t, dist)
                        if not tk.update_perturb(outs[1], ws[1], key, eps_t, ukey, c_t, dist):
                            bad.append(f"update_perturb {dtype} {case}: not covered")
                        check(f"update_perturb (w) {dtype} c={c} {case}", *ws)
                        check(f"update_perturb (out) {dtype} c={c} {case}", *outs)
                    if hasattr(tk, "update_rows_kernel"):  # an embedding's looked-up rows, its update pending
                        index = torch.randperm(4 * n, generator=torch.Generator().manual_seed(si))[:n].to(device)
                        ws = [w.clone(), w.clone()]
                        eager(zrng.update_rows_kernel, ws[0], index, key, c_t, dist)
                        tk.update_rows_kernel(ws[1], index, key, c_t, dist)
                        check(f"update_rows_kernel {dtype} c={c} {case}", *ws)
                    ws = [w.clone(), w.clone()]
                    eager(zrng.update_kernel_stochastic, ws[0], key, rkey, c_t, dist)
                    tk.update_kernel_stochastic(ws[1], key, rkey, c_t, dist)
                    check(f"update_kernel_stochastic {dtype} c={c} {case}", *ws)
                    # the rounding really is stochastic here: both neighbours occur
                    if n > 1000 and c == -2.5e-7 and not specials:
                        nearest = w.clone()
                        eager(zrng.update_kernel, nearest, key, c_t, dist)
                        if torch.equal(_bits(nearest), _bits(ws[1])):
                            bad.append(f"update_kernel_stochastic {dtype} {case}: never left the nearest value")
    return bad
