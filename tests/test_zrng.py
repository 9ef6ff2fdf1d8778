"""Contract 2: z is a pure, portable function of (seed, step, tensor name, element index), pinned by golden vectors."""

import json
from pathlib import Path

import pytest
import torch

from mezo_tune import zrng

GOLDEN = json.loads((Path(__file__).parent / "golden" / "z_v2.json").read_text())
DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def test_golden_file_is_this_generator():
    assert (GOLDEN["generator"], GOLDEN["version"]) == (zrng.GENERATOR, zrng.GENERATOR_VERSION)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("case", GOLDEN["cases"], ids=lambda c: f"seed{c['seed']}-step{c['step']}")
def test_golden_vectors(case, device):
    assert list(zrng.stream_key(case["seed"], case["step"], case["name"])) == case["key"]
    assert list(zrng.stream_key(case["seed"], case["step"], case["name"], zrng.ROUNDING_STREAM)) == case["rounding_key"]
    idx = torch.tensor(case["index"], device=device)
    assert zrng.bits_for(case["seed"], case["step"], case["name"], idx).tolist() == case["bits"]
    for dist in zrng.DISTRIBUTIONS:
        got = [zrng.z_for(case["seed"], case["step"], case["name"], 1, dist, offset=i, device=device).item()
               for i in case["index"]]
        assert got == case[dist]


@pytest.mark.parametrize("device", DEVICES)
def test_chunks_and_offsets_agree(device):
    """A tensor generated in pieces at offsets equals it generated whole: element i depends only on i."""
    whole = zrng.z_for(3, 4, "w", 10_000, device=device)
    parts = torch.cat([zrng.z_for(3, 4, "w", b - a, offset=a, device=device) for a, b in zrng.chunks(10_000, 999)])
    assert torch.equal(whole, parts)


def test_indices_beyond_2_pow_32():
    """Index 2**32 + i is not index i: the high word is part of the counter."""
    low = zrng.z_for(1, 1, "w", 64)
    high = zrng.z_for(1, 1, "w", 64, offset=2**32)
    assert not torch.equal(low, high)
    assert torch.equal(high, torch.stack([zrng.z_for(1, 1, "w", 1, offset=2**32 + i)[0] for i in range(64)]))


def test_independent_of_other_tensors_and_keys_differ():
    a = zrng.z_for(0, 5, "layer.0.weight", 1000)
    assert torch.equal(a, zrng.z_for(0, 5, "layer.0.weight", 1000))
    for other in [(1, 5, "layer.0.weight"), (0, 6, "layer.0.weight"), (0, 5, "layer.1.weight")]:
        assert not torch.equal(a, zrng.z_for(*other, 1000))


@pytest.mark.parametrize("dist,var", [("gaussian", 65535 / 65536), ("rademacher", 1.0), ("rademacher32", 1.0)])
def test_distribution_moments(dist, var):
    z = zrng.z_for(0, 0, "w", 1_000_000, dist, dtype=torch.float64)
    assert abs(z.mean().item()) < 5e-3
    assert abs(z.var().item() - var) < 5e-3
    if dist == "gaussian":
        assert z.abs().max().item() <= 765 / 256
        assert torch.equal(z * 256, (z * 256).round())  # dyadic: integer multiples of 2**-8
        # bell-shaped: P(|z| < 1) near the normal's 0.683 (Irwin-Hall 3: 0.667)
        assert 0.64 < (z.abs() < 1).double().mean().item() < 0.70
    else:
        assert set(z.unique().tolist()) == {-1.0, 1.0}


def test_compiled_kernels_equal_eager():
    w = torch.randn(50_001) * 0.02
    key = zrng.key_tensor(*zrng.stream_key(9, 9, "w"), 12345)
    eps = torch.tensor(1e-3, dtype=torch.float64)
    outs = []
    for compile_ in (False, True):
        z = torch.empty(50_001)
        zrng.kernel(zrng.z_kernel, compile_)(z, key, "gaussian")
        p = torch.empty_like(w)
        zrng.kernel(zrng.perturb_kernel, compile_)(p, w, key, eps, "rademacher")
        outs.append((z, p))
    assert torch.equal(outs[0][0], outs[1][0]) and torch.equal(outs[0][1], outs[1][1])


def test_rademacher32_takes_32_signs_from_one_hash():
    """Element i of rademacher32 is bit i % 32 of the version-1 hash at i // 32 (+1 for a clear bit), at any offset,
    across 2**32 too: the rule the C and Triton kernels implement."""
    for offset in (0, 7, 2**32 - 40, 2**40 + 3):
        z = zrng.z_for(5, 6, "w", 100, "rademacher32", offset=offset)
        index = torch.arange(100, dtype=torch.int64) + offset
        words = zrng.bits_for(5, 6, "w", index // 32)
        assert torch.equal(z, (1 - 2 * ((words >> (index % 32)) & 1)).float())


def test_rademacher32_signs_are_balanced_and_uncorrelated_within_a_word():
    """The 32 signs of one hash: each bit position balanced, neighbours within a word uncorrelated."""
    z = zrng.z_for(0, 1, "w", 32 * 40_000, "rademacher32", dtype=torch.float64).view(-1, 32)
    assert z.mean(0).abs().max().item() < 0.02  # 40k draws per position: 4 sigma is 0.02
    assert (z[:, 1:] * z[:, :-1]).mean(0).abs().max().item() < 0.02


def test_versions():
    """A run records the first version with its distribution; replay takes any version from there to the newest."""
    assert [zrng.version_for(d) for d in zrng.DISTRIBUTIONS] == [1, 1, 2]
    assert zrng.replays(zrng.GENERATOR, 1, "gaussian") and zrng.replays(zrng.GENERATOR, 2, "rademacher")
    assert zrng.replays(zrng.GENERATOR, 2, "rademacher32")
    assert not zrng.replays(zrng.GENERATOR, 1, "rademacher32")  # version 1 had no such distribution
    assert not zrng.replays(zrng.GENERATOR, 3, "gaussian")  # a newer mezo-tune's
    assert not zrng.replays("philox4x32", 1, "gaussian")
    with pytest.raises(ValueError, match="unknown distribution 'normal'"):
        zrng.version_for("normal")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("distribution", zrng.DISTRIBUTIONS)
def test_updated_rows_are_the_rows_of_the_updated_table(dtype, distribution):
    """update_rows_kernel (an embedding's looked-up rows while the table's update is pending) gives the values that
    update_kernel writes at those elements of the whole table, at any key offset, with or without the C twin."""
    from mezo_tune import cpu_kernels

    table = (torch.randn(40, 24, generator=torch.Generator().manual_seed(0)) * 0.02).to(dtype)
    key = zrng.key_tensor(*zrng.stream_key(3, 9, "emb"), 2**32 - 500)
    c = torch.tensor(float(torch.tensor(3e-3, dtype=torch.float32)), dtype=torch.float64)
    updated = table.clone()
    zrng.update_kernel(updated.view(-1), key, c, distribution)
    rows = torch.tensor([39, 0, 21, 5])
    index = (rows[:, None] * 24 + torch.arange(24)).reshape(-1)
    kernels = [zrng.update_rows_kernel, cpu_kernels.twin(zrng.update_rows_kernel, zrng.update_rows_kernel)]
    for kernel in filter(None, kernels):
        values = table[rows].reshape(-1)
        kernel(values, index, key, c, distribution)
        assert torch.equal(values.view(-1, 24), updated[rows]), kernel
