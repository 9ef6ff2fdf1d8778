"""The cases every twin of zrng's kernels must pass bit for bit: the Triton kernels (tests/test_triton.py) and the
C kernels for CPU (tests/test_cpu_kernels.py)."""

import torch

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
DISTS = ["gaussian", "rademacher"]
# (numel, offset): non-multiples of the block (1024), offsets whose high word is set or that cross 2**32 mid-tensor
SHAPES = [(1, 0), (1024, 12345), (4097, 2**32 - 1000), (3001, 2**40 + 5)]


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.view({8: torch.int64, 4: torch.int32, 2: torch.int16}[t.element_size()])


def _weights(n: int, dtype, device, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(n, generator=g) * 0.02
    w[::7] = 0.0  # zeros (stochastic rounding steps off them to the smallest subnormal)
    w[3::11] = -0.0
    w[5::13] *= 1e-6  # small values: subnormal in fp16
    return w.to(dtype).to(device)


def run_cases(device: str, tk, shapes=SHAPES) -> list[str]:
    """Run every kernel both ways on `device`: zrng's eager kernel and tk's twin of it (tk: anything with the five
    kernels as attributes). Returns a description of each case whose bits differ."""
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
                w = _weights(n, dtype, device, si)
                for eps in (1e-3, -1e-3, 0.37):
                    eps_t = torch.tensor(eps, dtype=torch.float64, device=device)
                    for out_dtype in {dtype, torch.float32}:
                        outs = [torch.empty(n, dtype=out_dtype, device=device) for _ in range(2)]
                        zrng.perturb_kernel(outs[0], w, key, eps_t, dist)
                        tk.perturb_kernel(outs[1], w, key, eps_t, dist)
                        check(f"perturb_kernel {dtype}->{out_dtype} eps={eps} {case}", *outs)
                    # rows: arbitrary element indices of a larger table, values w
                    index = torch.randperm(4 * n, generator=torch.Generator().manual_seed(si))[:n].to(device)
                    outs = [torch.empty(n, dtype=dtype, device=device) for _ in range(2)]
                    zrng.perturb_rows_kernel(outs[0], w, index, key, eps_t, dist)
                    tk.perturb_rows_kernel(outs[1], w, index, key, eps_t, dist)
                    check(f"perturb_rows_kernel {dtype} eps={eps} {case}", *outs)
                for c in (1e-3, -2.5e-7, 3.0):
                    c_t = torch.tensor(c, dtype=torch.float64, device=device)
                    ws = [w.clone(), w.clone()]
                    zrng.update_kernel(ws[0], key, c_t, dist)
                    tk.update_kernel(ws[1], key, c_t, dist)
                    check(f"update_kernel {dtype} c={c} {case}", *ws)
                    ws = [w.clone(), w.clone()]
                    zrng.update_kernel_stochastic(ws[0], key, rkey, c_t, dist)
                    tk.update_kernel_stochastic(ws[1], key, rkey, c_t, dist)
                    check(f"update_kernel_stochastic {dtype} c={c} {case}", *ws)
                    if n > 1000 and c == -2.5e-7:  # the rounding really is stochastic here: both neighbours occur
                        nearest = w.clone()
                        zrng.update_kernel(nearest, key, c_t, dist)
                        if torch.equal(_bits(nearest), _bits(ws[1])):
                            bad.append(f"update_kernel_stochastic {dtype} {case}: never left the nearest value")
    return bad
