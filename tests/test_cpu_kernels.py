"""The C kernels for CPU (mezo_tune/cpu_kernels.py) are bit-identical to the eager torch kernels of zrng, and the
dispatcher runs them where they apply."""

import functools
import inspect
import os
import subprocess
import sys
import types

import pytest
import torch
from kernel_cases import SHAPES, num_threads, run_cases

from mezo_tune import cpu_kernels, zrng

KERNELS = (zrng.z_kernel, zrng.perturb_kernel, zrng.perturb_rows_kernel, zrng.update_kernel,
           zrng.update_rows_kernel, zrng.update_kernel_stochastic)
# beyond kernel_cases' shapes: tensors large enough for several threads and blocks (16384 elements), one of them with
# its index crossing 2**32 inside a block that is not the first
LARGE = [(200_003, 2**32 - 70_001), (65_536, 7)]


@pytest.fixture(scope="module")
def lib():
    lib = cpu_kernels.library()
    if lib is None:
        pytest.skip("no C compiler here: the C kernels are not built (the torch kernels run instead)")
    return lib


def _twins():
    """zrng's kernels with their C twins swapped in (falling back to the eager kernel, so that a case the twin does not
    cover compares eager with eager), and the fused update + perturbation (run_cases checks it against the two)."""
    return types.SimpleNamespace(**{fn.__name__: cpu_kernels.twin(fn, fn) or fn for fn in KERNELS},
                                 update_perturb=cpu_kernels.update_perturb)


def test_c_kernels_bit_equal_eager(lib):
    assert run_cases("cpu", _twins(), SHAPES + LARGE) == []


@pytest.mark.parametrize("threads", [None, 16])
def test_c_kernels_bit_equal_eager_on_special_values(lib, threads):
    """Infinities, NaN, fp32 / fp16 / bf16 subnormals, fp16's overflow threshold and exact rounding ties, in every
    storage dtype and every perturbed-copy dtype pair, with scales that leave the ties exact; on torch's thread count
    and on 16 threads (where plain eager torch wrote other fp16 NaN patterns in its loops' tails: kernel_cases.eager)."""
    with num_threads(threads or torch.get_num_threads()):
        assert run_cases("cpu", _twins(), SHAPES + LARGE[:1], specials=True) == []


def test_eager_torch_writes_fp16_nans_by_position_and_the_reference_does_not(lib):
    """Why kernel_cases.eager exists: torch's fp16 -> fp32 conversion keeps a NaN's payload in its vector loop and
    writes 0x7FFFFFFF in the scalar tail; the reference gives the vector loop's pattern at every position."""
    from kernel_cases import eager

    w = torch.full((19,), 0x7E01, dtype=torch.int16).view(torch.float16)  # 16 in the vector loop, 3 in the tail
    plain, ref = torch.empty(19), torch.empty(19)
    key, eps = zrng.key_tensor(1, 2, 0), torch.tensor(0.0, dtype=torch.float64)
    zrng.perturb_kernel(plain, w, key, eps, "gaussian")
    eager(zrng.perturb_kernel, ref, w, key, eps, "gaussian")
    assert set(plain.view(torch.int32)[:16].tolist()) == {0x7FC02000}  # the tail: 0x7FFFFFFF in torch 2.13
    assert set(ref.view(torch.int32).tolist()) == {0x7FC02000}
    cpu_kernels.twin(zrng.perturb_kernel, None)(plain, w, key, eps, "gaussian")  # the C twin: the same as ref
    assert torch.equal(plain.view(torch.int32), ref.view(torch.int32))


def _mutant(tmp_path, monkeypatch, flags=None, **replace):
    """The kernels built from a changed source or with other flags (into a scratch cache), as twins."""
    monkeypatch.setenv("MEZO_TUNE_CACHE", str(tmp_path))
    source = cpu_kernels.SOURCE
    for old, new in replace.values():
        assert source.count(old) == 1, old
        source = source.replace(old, new)
    mutant = cpu_kernels.load(cpu_kernels._build(cpu_kernels._compiler(), flags or cpu_kernels.compile_flags(), source))
    return types.SimpleNamespace(**{fn.__name__: cpu_kernels.twin(fn, fn, mutant) for fn in KERNELS},
                                 update_perturb=functools.partial(cpu_kernels.update_perturb, lib=mutant))


def _failing_kernels(bad: list[str]) -> set[str]:
    return {line.split()[0] for line in bad}


@pytest.mark.skipif(torch.backends.cpu.get_cpu_capability() not in ("AVX2", "AVX512"), reason="needs FMA")
def test_cases_catch_fp_contraction(lib, tmp_path, monkeypatch):
    """Built with -ffp-contract=fast, `w + eps * z` becomes one fused multiply-add (one rounding where eager torch
    rounds twice): the cases see it in the perturbed copies (the fused update + perturbation's too). The update's c*z
    is exact in fp64, so contraction cannot change it: those cases still pass."""
    flags = [f for f in cpu_kernels.compile_flags() if f != "-ffp-contract=off"] + ["-ffp-contract=fast", "-mfma"]
    bad = run_cases("cpu", _mutant(tmp_path, monkeypatch, flags), SHAPES)
    assert _failing_kernels(bad) == {"perturb_kernel", "perturb_rows_kernel", "update_perturb"}
    assert not any(line.startswith("update_perturb (w)") for line in bad), bad


BF16_RNE = "(u + 0x7FFFu + ((u >> 16) & 1u)) >> 16"
F16_RNE = "(a - 0x38000000u + 0xFFFu + ((a >> 13) & 1u)) >> 13"
F16_SUB_RNE = "f2u(u2f(a) + 0.5f) - 0x3F000000u"


@pytest.mark.parametrize("what, old, new", [
    ("bf16 ties away from zero", BF16_RNE, "(u + 0x8000u) >> 16"),
    ("fp16 ties away from zero", F16_RNE, "(a - 0x38000000u + 0x1000u) >> 13"),
    ("fp16 subnormal ties away from zero", F16_SUB_RNE, "(uint32_t)(u2f(a) * 16777216.0f + 0.5f)"),
    ("fp16 subnormals truncated", F16_SUB_RNE, "(uint32_t)(u2f(a) * 16777216.0f)"),
])
def test_cases_catch_a_different_rounding(lib, tmp_path, monkeypatch, what, old, new):
    """The special values include exact fp32 ties of fp16 and bf16 (normal and subnormal), which a perturbed copy
    into that dtype with eps = 0 rounds as they are: a conversion that rounds half away from zero, or truncates
    subnormals, fails those cases (and only cases that write that dtype)."""
    bad = run_cases("cpu", _mutant(tmp_path, monkeypatch, rounding=(old, new)), SHAPES, specials=True)
    dtype = "bfloat16" if "bf16" in what else "float16"
    assert any(line.startswith(f"perturb_kernel torch.float32->torch.{dtype} eps=0.0 ") for line in bad), bad
    assert all(f"{dtype} " in line.replace("->", " ") for line in bad), bad


@pytest.mark.parametrize("threads", [1, 2])
def test_c_kernels_bit_equal_eager_on_any_thread_count(lib, threads):
    with num_threads(threads):
        n, offset = LARGE[0]
        key = zrng.key_tensor(*zrng.stream_key(3, 5, "t"), offset)
        c = torch.tensor(-1.5e-3, dtype=torch.float64)
        ws = [torch.randn(n, generator=torch.Generator().manual_seed(0)) for _ in range(2)]
        zrng.update_kernel(ws[0], key, c, "gaussian")
        cpu_kernels.twin(zrng.update_kernel, None)(ws[1], key, c, "gaussian")
        assert torch.equal(ws[0], ws[1])


@pytest.mark.skipif("-mavx512bf16" not in cpu_kernels.compile_flags(), reason="needs a CPU with AVX512-BF16")
@pytest.mark.parametrize("what, old, new", [
    ("NaN lanes left as vcvtne2ps2bf16 writes them", "_mm512_mask_mov_epi16(r, nan, _mm512_set1_epi16(-1))", "r"),
    ("subnormal groups not sent to the integer code",
     "_mm512_fpclass_ps_mask(lo, 0x20) | _mm512_fpclass_ps_mask(hi, 0x20)", "0"),
    ("the fused update's subnormal groups left as they were", "update_signs_f32_2(w, gs, gs + 32, offset, u0, u1, c)",
     "(void)0"),
    ("the fused perturbation's subnormal groups left unwritten", "perturb_222(out, w, gs, gs + 32, offset, k0, k1, eps)",
     "(void)0"),
])
def test_cases_catch_the_bf16_groups_without_their_fixes(lib, tmp_path, monkeypatch, what, old, new):
    """The bf16 groups' hardware rounding differs from torch's on NaN patterns and fp32 subnormals; without either
    fix, or without the fused groups' way round a subnormal sum, the bf16 rademacher32 cases fail (NaNs of other
    patterns and subnormal sums are among the special values)."""
    bad = run_cases("cpu", _mutant(tmp_path, monkeypatch, fix=(old, new)), SHAPES, specials=True)
    assert bad and all("bfloat16" in line and "rademacher32" in line for line in bad), bad


@pytest.mark.skipif("-mavx2" not in cpu_kernels.compile_flags(), reason="the AVX2 build (torch's AVX2 capability)")
@pytest.mark.parametrize("what, old, new, dtypes", [
    ("bf16 ties away from zero", "_mm256_add_epi32(_mm256_add_epi32(u, _mm256_set1_epi32(0x7FFF)), lsb)",
     "_mm256_add_epi32(u, _mm256_set1_epi32(0x8000))", {"bfloat16"}),
    ("bf16 NaN lanes left as the sum rounds them", "_mm256_or_si256(r, nan)", "r", {"bfloat16"}),
    ("fp16 truncated", "_mm256_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT)", "_mm256_cvtps_ph(v, _MM_FROUND_TO_ZERO)",
     {"float16"}),
    ("fp16 signs of two lanes' bits swapped", "add8_f16(out + 8, w + 8, v, negv, bits, SHIFTS8(8, 12));",
     "add8_f16(out + 8, w + 8, v, negv, bits, SHIFTS8(12, 8));", {"float16"}),
    ("bf16 signs taken in the order of the weights, not of the widened lanes", "SHIFTS8(0, 8), SHIFTS8(4, 12)",
     "SHIFTS8(0, 4), SHIFTS8(8, 12)", {"bfloat16"}),
])
def test_cases_catch_a_wrong_avx2_group(lib, tmp_path, monkeypatch, what, old, new, dtypes):
    """The AVX2 groups (16-bit storage, rademacher32: F16C conversions for fp16, f32_to_bf16's integer rounding on 8
    lanes for bf16) are held to the same cases: a rounding tie, a NaN pattern or a sign in the wrong lane fails the
    rademacher32 cases of that dtype, and only those."""
    bad = run_cases("cpu", _mutant(tmp_path, monkeypatch, fix=(old, new)), SHAPES, specials=True)
    assert bad and all("rademacher32" in line for line in bad), bad
    assert {d for d in ("bfloat16", "float16") if any(f"torch.{d}" in line for line in bad)} == dtypes, bad


FUSED_UPDATE = "FUSED_UPDATE_##T(gs, HU[g]);"
FUSED_PERTURB = "FUSED_PERTURB_##T(gs, H[g]);"


@pytest.mark.skipif(not {"-mavx2", "-mavx512f"} & set(cpu_kernels.compile_flags()), reason="x86 builds only")
@pytest.mark.parametrize("what, fixes, fails", [
    ("each group perturbed before its update",
     {"a": (FUSED_UPDATE, ""), "b": (FUSED_PERTURB, FUSED_PERTURB + " " + FUSED_UPDATE)}, {"update_perturb (out)"}),
    ("the update's signs from the perturbation's key",
     {"a": ("HU[g] = bits((uint32_t)q, (uint32_t)(q >> 32) ^ u1, u0);",
            "HU[g] = bits((uint32_t)q, (uint32_t)(q >> 32) ^ k1, k0);")}, {"update_perturb (w)", "update_perturb (out)"}),
])
def test_cases_catch_a_wrong_fused_group(lib, tmp_path, monkeypatch, what, fixes, fails):
    """update_perturb's fused 16-bit groups (each group updated, then perturbed, in one pass; the AVX512-BF16 ones too)
    are held to the update then the perturbation: perturbing the weights before their update, or taking the update's
    signs from the other key, fails the fused cases of rademacher32 (the distribution the groups run) in both 16-bit
    dtypes, and no other case."""
    bad = run_cases("cpu", _mutant(tmp_path, monkeypatch, **fixes), SHAPES, specials=True)
    assert bad and all("rademacher32" in line for line in bad), bad
    assert {line.split(" torch.")[0] for line in bad} == fails, bad
    assert {d for d in ("bfloat16", "float16") if any(f"torch.{d}" in line for line in bad)} == {"bfloat16", "float16"}


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_update_list_is_update_per_tensor(lib, dtype):
    """One update_list call over tensors of kernel_cases' shapes and LARGE's (several blocks and threads, an offset
    crossing 2**32 mid-block) gives the bits of the eager update kernel run on each tensor alone; with special values,
    every distribution, an fp32-exact c (rademacher32's fp32 path) and one that is not."""
    from kernel_cases import F32_1E3, _weights, eager

    shapes = SHAPES + LARGE
    for dist in ("gaussian", "rademacher", "rademacher32"):
        for c in (F32_1E3, 1e-3):
            keys = [(*zrng.stream_key(5, 9, f"w{i}"), offset) for i, (_, offset) in enumerate(shapes)]
            ws = [_weights(n, dtype, "cpu", i, specials=True) for i, (n, _) in enumerate(shapes)]
            expected = [w.clone() for w in ws]
            for w, key in zip(expected, keys):
                eager(zrng.update_kernel, w, zrng.key_tensor(*key), torch.tensor(c, dtype=torch.float64), dist)
            assert cpu_kernels.update_list(ws, torch.tensor(keys, dtype=torch.int64), c, dist)
            for i, (w, e) in enumerate(zip(ws, expected)):
                assert torch.equal(w.view(torch.uint8), e.view(torch.uint8)), (dist, c, shapes[i])


def test_update_list_hands_back_what_it_does_not_cover(lib):
    """False, and nothing written, for a strided tensor, mixed dtypes, an fp64 tensor or keys of the wrong shape."""
    key = torch.tensor([[1, 2, 0]], dtype=torch.int64)
    for tensors, keys in (([torch.ones(20)[::2]], key), ([torch.ones(4), torch.ones(4, dtype=torch.bfloat16)],
                                                          key.repeat(2, 1)),
                          ([torch.ones(4, dtype=torch.float64)], key), ([torch.ones(4)], key.repeat(2, 1))):
        before = [t.clone() for t in tensors]
        assert not cpu_kernels.update_list(tensors, keys, 0.5, "gaussian")
        assert all(torch.equal(t, b) for t, b in zip(tensors, before))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_update_perturb_is_the_update_then_the_perturbation(lib, dtype):
    """update_perturb (the pending update fused into the next perturbation, Mezo.apply_update) leaves w and out with
    the bits of the eager update kernel followed by the eager perturbation kernel: kernel_cases' shapes and LARGE's,
    special values, every distribution, an fp32-exact c and one that is not, both signs of eps."""
    from kernel_cases import F32_1E3, _weights, eager

    for dist in ("gaussian", "rademacher", "rademacher32"):
        for c, eps in ((F32_1E3, 1e-3), (1e-3, -1e-2)):
            for i, (n, offset) in enumerate(SHAPES + LARGE):
                key, ukey = zrng.key_tensor(*zrng.stream_key(5, 10, "w"), offset), zrng.key_tensor(
                    *zrng.stream_key(5, 9, "w"), offset)
                w = _weights(n, dtype, "cpu", i, specials=True)
                expected_w, expected_out = w.clone(), torch.empty_like(w)
                eager(zrng.update_kernel, expected_w, ukey, torch.tensor(c, dtype=torch.float64), dist)
                eager(zrng.perturb_kernel, expected_out, expected_w, key, torch.tensor(eps, dtype=torch.float64), dist)
                out = torch.empty_like(w)
                assert cpu_kernels.update_perturb(out, w, key, eps, ukey, c, dist)
                assert torch.equal(w.view(torch.uint8), expected_w.view(torch.uint8)), (dist, c, n)
                assert torch.equal(out.view(torch.uint8), expected_out.view(torch.uint8)), (dist, c, n)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_form_list_is_each_tensors_perturbation(lib, dtype):
    """form_list (a module's or a family's perturbed copies in one call, Mezo._form_list) gives each tensor the bits of
    perturb_whole alone: the perturbation, or the update then the perturbation where it has a pending update; tensors
    of kernel_cases' shapes and LARGE's, special values, every distribution, an fp32-exact c and one that is not, both
    signs of eps, one thread and two; with plain stores and streamed (the C source's STREAMING), outs aligned and
    not."""
    from kernel_cases import F32_1E3, _weights

    # and two whose groups of 32 start on 64-byte boundaries, as a whole tensor's and an LM head block's do (offsets
    # that are multiples of 32): where the streamed stores happen
    shapes = SHAPES + LARGE + [(100_003, 0), (40_000, 2**32 - 4096)]
    for threads in (1, 2):
        with num_threads(threads):
            for dist in ("gaussian", "rademacher", "rademacher32"):
                code = zrng.distribution_code(dist)
                for c, eps in ((F32_1E3, 1e-3), (1e-3, -1e-2)):
                    keys = [zrng.key_tensor(*zrng.stream_key(5, 10, f"w{i}"), o) for i, (_, o) in enumerate(shapes)]
                    ukeys = [zrng.key_tensor(*zrng.stream_key(5, 9, f"w{i}"), o) if i % 3 else None
                             for i, (_, o) in enumerate(shapes)]  # some with an update pending, some without
                    ws = [_weights(n, dtype, "cpu", i, specials=True) for i, (n, _) in enumerate(shapes)]
                    expected_w, expected = [w.clone() for w in ws], [torch.empty_like(w) for w in ws]
                    for w, out, key, ukey in zip(expected_w, expected, keys, ukeys):
                        assert cpu_kernels.perturb_whole(lib, out, w, key.data_ptr(), eps, code,
                                                         None if ukey is None else ukey.data_ptr(), c)
                    for stream in (False, True):
                        # streamed: every other out one element off a 64-byte boundary (plain stores there)
                        outs = [torch.empty(w.numel() + 1, dtype=dtype)[i % 2:][: w.numel()] if stream
                                else torch.empty_like(w) for i, w in enumerate(ws)]
                        ws_now = [w.clone() for w in ws]
                        items = [x for o, w, k, u in zip(outs, ws_now, keys, ukeys)
                                 for x in (o.data_ptr(), w.data_ptr(), w.numel(), k.data_ptr(),
                                           0 if u is None else u.data_ptr())]
                        cpu_kernels.form_list(lib, items, eps, c, cpu_kernels.KINDS[dtype], code, stream)
                        for i in range(len(shapes)):
                            assert torch.equal(ws_now[i].view(torch.uint8), expected_w[i].view(torch.uint8)), (
                                dist, c, i, stream)
                            assert torch.equal(outs[i].view(torch.uint8), expected[i].view(torch.uint8)), (
                                dist, c, i, stream)
                            if stream:  # perturb_whole streamed (a blocked linear's blocks) too
                                w, out = ws[i].clone(), torch.empty_like(outs[i])
                                assert cpu_kernels.perturb_whole(lib, out, w, keys[i].data_ptr(), eps, code,
                                                                 None if ukeys[i] is None else ukeys[i].data_ptr(),
                                                                 c, stream=True)
                                assert torch.equal(w.view(torch.uint8), expected_w[i].view(torch.uint8))
                                assert torch.equal(out.view(torch.uint8), expected[i].view(torch.uint8))


def test_update_perturb_hands_back_what_it_does_not_cover(lib):
    """False, and nothing written, for a strided weight, an output of another dtype or size, an fp64 weight."""
    key = zrng.key_tensor(1, 2, 0)
    for out, w in ((torch.zeros(10), torch.ones(20)[::2]), (torch.zeros(4, dtype=torch.bfloat16), torch.ones(4)),
                   (torch.zeros(5), torch.ones(4)), (torch.zeros(4, dtype=torch.float64), torch.ones(4, dtype=torch.float64))):
        before = w.clone()
        assert not cpu_kernels.update_perturb(out, w, key, 1e-3, key, 0.5, "gaussian")
        assert torch.equal(w, before) and not out.any()


def test_twins_cover_every_kernel_and_have_zrng_signatures(lib):
    covered = {"z_kernel", "perturb_kernel", "perturb_rows_kernel", "update_kernel", "update_rows_kernel",
               "update_kernel_stochastic"}
    for fn in KERNELS:
        twin = cpu_kernels.twin(fn, fn)
        assert (twin is not None) == (fn.__name__ in covered)
        if twin is not None:
            assert list(inspect.signature(twin).parameters) == list(inspect.signature(fn).parameters)


def test_dispatch_runs_c_twins_for_cpu_storage_dtypes_when_compiling(lib, monkeypatch):
    """zrng.kernel(fn, use_compile=True) sends contiguous fp32 / fp16 / bf16 CPU tensors to the C twin and anything
    else to torch; use_compile=False keeps eager torch."""
    calls = []
    real = lib.update
    monkeypatch.setattr(lib, "update", lambda *a: calls.append(a) or real(*a))
    monkeypatch.setattr(zrng, "compiled", lambda fn: fn)  # the fallback, uncompiled (no inductor build in this test)
    key, c = zrng.key_tensor(1, 2, 0), torch.tensor(0.5, dtype=torch.float64)
    w = torch.ones(10)
    zrng.kernel(zrng.update_kernel, True)(w, key, c, "gaussian")
    assert len(calls) == 1 and not torch.equal(w, torch.ones(10))
    for dtype in (torch.bfloat16, torch.float16):
        zrng.kernel(zrng.update_kernel, True)(torch.ones(10, dtype=dtype), key, c, "gaussian")
    assert len(calls) == 3
    zrng.kernel(zrng.update_kernel, True)(torch.ones(10, dtype=torch.float64), key, c, "gaussian")  # torch
    zrng.kernel(zrng.update_kernel, True)(torch.ones(20)[::2], key, c, "gaussian")  # strided: torch
    zrng.kernel(zrng.update_kernel, False)(torch.ones(10), key, c, "gaussian")  # eager torch
    assert len(calls) == 3


def test_twins_hand_mismatched_sizes_to_torch(lib):
    """The C kernels trust their sizes: a mismatch goes to the torch kernel, which refuses it, never past a buffer."""
    key, eps = zrng.key_tensor(1, 2, 0), torch.tensor(1e-3, dtype=torch.float64)
    perturb = cpu_kernels.twin(zrng.perturb_kernel, zrng.perturb_kernel)
    rows = cpu_kernels.twin(zrng.perturb_rows_kernel, zrng.perturb_rows_kernel)
    with pytest.raises(RuntimeError):
        perturb(torch.empty(3), torch.ones(1000), key, eps, "gaussian")
    with pytest.raises(RuntimeError):
        rows(torch.empty(1000), torch.ones(1000), torch.arange(3), key, eps, "gaussian")


def _run(code: str, **env) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1"), **env}
    return subprocess.run([sys.executable, "-W", "always", "-c", code], env=env, capture_output=True, text=True,
                          timeout=300)


CHECK_FALLBACK = (
    "import torch\n"
    "from mezo_tune import cpu_kernels, zrng\n"
    "assert cpu_kernels.library() is None and cpu_kernels.twin(zrng.update_kernel, None) is None\n"
    "w, ref = torch.ones(100), torch.ones(100)\n"
    "key, c = zrng.key_tensor(1, 2, 3), torch.tensor(0.25, dtype=torch.float64)\n"
    "zrng.kernel(zrng.update_kernel, True)(w, key, c, 'gaussian')\n"
    "zrng.update_kernel(ref, key, c, 'gaussian')\n"
    "assert torch.equal(w, ref)\n"
)


def test_without_a_compiler_warns_once_and_torch_kernels_run(tmp_path):
    proc = _run(CHECK_FALLBACK, CC=str(tmp_path / "no-such-cc"), MEZO_TUNE_CACHE=str(tmp_path))
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr.count("the C kernels for CPU could not be built") == 1
    assert "no-such-cc" in proc.stderr


def test_switched_off_by_environment(tmp_path):
    proc = _run(CHECK_FALLBACK, MEZO_TUNE_CPU_KERNELS="0", MEZO_TUNE_CACHE=str(tmp_path))
    assert proc.returncode == 0, proc.stderr
    assert "could not be built" not in proc.stderr and not (tmp_path / "kernels").exists()


def test_library_is_built_once_into_the_cache(tmp_path, lib):
    code = "from mezo_tune import cpu_kernels\nassert cpu_kernels.library() is not None\n"
    for _ in range(2):
        proc = _run(code, MEZO_TUNE_CACHE=str(tmp_path))
        assert proc.returncode == 0, proc.stderr
    built = list((tmp_path / "kernels").iterdir())
    assert len(built) == 1 and built[0].name.startswith("cpu_kernels-") and built[0].suffix == ".so"
