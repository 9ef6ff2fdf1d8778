"""The Triton kernels (mezo_tune/triton_kernels.py) are bit-identical to the eager torch kernels of zrng.

Without a GPU they run on CPU tensors in Triton's interpreter. TRITON_INTERPRET is read when a kernel is defined,
i.e. when mezo_tune.triton_kernels is first imported, so the interpreted checks run in a fresh interpreter: this file
executed as a script, with TRITON_INTERPRET=1 in its environment, all cases in one process.
"""

import json
import os
import subprocess
import sys

import pytest
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


def run_cases(device: str) -> list[str]:
    """Run every kernel both ways on `device`; return a description of each case whose bits differ."""
    from mezo_tune import triton_kernels as tk
    from mezo_tune import zrng

    bad = []

    def check(what, a, b):
        if a.dtype != b.dtype or not torch.equal(_bits(a), _bits(b)):
            diff = (_bits(a) != _bits(b)).sum().item() if a.dtype == b.dtype else "dtype"
            bad.append(f"{what}: {diff} of {a.numel()} differ")

    for dist in DISTS:
        for si, (n, offset) in enumerate(SHAPES):
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


def test_interpreted_triton_kernels_bit_equal_eager():
    pytest.importorskip("triton")
    env = {**os.environ, "TRITON_INTERPRET": "1", "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    proc = subprocess.run([sys.executable, __file__], env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    assert report["interpreted"] and report["cases_ok"]
    assert report["bad"] == []


def test_twins_have_zrng_signatures():
    pytest.importorskip("triton")
    import inspect

    from mezo_tune import zrng

    for fn in (zrng.z_kernel, zrng.perturb_kernel, zrng.perturb_rows_kernel, zrng.update_kernel,
               zrng.update_kernel_stochastic):
        twin = zrng._triton_twin(fn)
        assert twin is not fn and twin.__name__ == fn.__name__
        assert inspect.signature(twin) == inspect.signature(fn)


def test_without_triton_import_works_and_dispatch_keeps_torch():
    code = (
        "import sys; sys.modules['triton'] = None\n"  # makes `import triton` raise ImportError
        "import torch\n"
        "from mezo_tune import triton_kernels, zrng\n"
        "assert not triton_kernels.available()\n"
        "assert zrng._triton_twin(zrng.z_kernel) is None\n"
        "out = torch.empty(5)\n"
        "zrng.kernel(zrng.z_kernel, False)(out, zrng.key_tensor(1, 2, 3), 'gaussian')\n"
        "ref = torch.empty(5)\n"
        "zrng.z_kernel(ref, zrng.key_tensor(1, 2, 3), 'gaussian')\n"
        "assert torch.equal(out, ref)\n"
    )
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_compiled_triton_kernels_bit_equal_eager_on_cuda():
    pytest.importorskip("triton")
    if os.environ.get("TRITON_INTERPRET") == "1":
        pytest.skip("TRITON_INTERPRET=1: the kernels would not be compiled")
    assert run_cases("cuda") == []


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_dispatch_uses_triton_on_cuda(monkeypatch):
    """zrng.kernel(fn, ...) sends CUDA tensors to the Triton twin, whatever use_compile says."""
    pytest.importorskip("triton")
    from mezo_tune import triton_kernels as tk
    from mezo_tune import zrng

    calls = []
    monkeypatch.setattr(tk, "z_kernel", lambda *a: calls.append(a))
    out = torch.empty(10, device="cuda")
    zrng.kernel(zrng.z_kernel, False)(out, zrng.key_tensor(1, 2, 0, "cuda"), "gaussian")
    assert len(calls) == 1


if __name__ == "__main__":
    assert os.environ.get("TRITON_INTERPRET") == "1" and "mezo_tune.triton_kernels" not in sys.modules
    from mezo_tune import triton_kernels

    assert triton_kernels.available()
    bad = run_cases("cpu")
    print(json.dumps({"interpreted": True, "cases_ok": True, "bad": bad}))
