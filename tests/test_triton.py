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

from kernel_cases import run_cases


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
    from mezo_tune import triton_kernels

    assert run_cases("cuda", triton_kernels) == []


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
    bad = run_cases("cpu", triton_kernels)
    print(json.dumps({"interpreted": True, "cases_ok": True, "bad": bad}))
