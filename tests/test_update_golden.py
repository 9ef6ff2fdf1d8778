"""Contracts 3 and 4 pinned across machines and torch versions, without a forward pass.

For fixed weights θ (built with exact integer arithmetic, the same bits everywhere), a fixed scale c, seed and step, the
update θ ← R(θ - c·z) and the perturbed copy θ ± εz must give the same bytes on every CPU (AVX2, AVX-512, AMX), GPU,
torch version and kernel (eager, torch.compile, the C twins, Triton). Their sha256 digests are committed in
tests/golden/update_v2.json; `python tests/test_update_golden.py --write` regenerates the file (only after a
deliberate change of the generator or the update, which also bumps zrng.GENERATOR_VERSION).
"""

from __future__ import annotations

import hashlib
import json
import sys
from pathlib import Path

import pytest
import torch

from mezo_tune import zrng
from mezo_tune.mezo import Mezo, trainable_set, update_scale

GOLDEN_PATH = Path(__file__).parent / "golden" / "update_v2.json"
DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
SHAPES = {"a.weight": (37, 129), "b.weight": (5000,), "b.bias": (3,)}  # odd sizes: every kernel's tail code runs
SEED, STEP, EPS = 1234, 56789, 1e-3
SCALE = update_scale(1e-2, 0.37)  # c = fp32(η·g), as training computes it


class Params(torch.nn.Module):
    def __init__(self, dtype: torch.dtype, device: str):
        super().__init__()
        for i, (name, shape) in enumerate(SHAPES.items()):
            n = 1
            for s in shape:
                n *= s
            # Exact everywhere: small integers times a power of two, spread over a few binades (and some zeros).
            k = (torch.arange(n, dtype=torch.int64) * 2654435761 + 97 * i) % 2039 - 1019
            values = (k.to(torch.float64) * 2.0 ** -14).reshape(shape)
            self.register_parameter(name.replace(".", "_"), torch.nn.Parameter(values.to(dtype).to(device)))


def _digest(tensors) -> str:
    h = hashlib.sha256()
    for t in tensors:
        h.update(t.detach().to("cpu").contiguous().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def _engine(dtype: str, distribution: str, rounding: str, device: str, use_compile: bool) -> Mezo:
    model = Params(DTYPES[dtype], device)
    return Mezo(model, trainable_set(model), seed=SEED, eps=EPS, distribution=distribution, rounding=rounding,
                use_compile=use_compile)


def _updated(engine: Mezo) -> str:
    engine.apply_update(STEP, SCALE)
    engine.apply_update(STEP + 1, -SCALE)  # a second step: rounding of an already rounded θ
    return _digest(engine.trainable.params)


def _perturbed(engine: Mezo, sign: int) -> str:
    """θ + sign·εz as the perturbation kernel forms it for each trainable tensor."""
    eps = torch.tensor(sign * EPS, dtype=torch.float64)
    kernel = zrng.kernel(zrng.perturb_kernel, engine.use_compile)
    outs = []
    for name, p in zip(engine.trainable.names, engine.trainable.params):
        out = torch.empty_like(p.data)
        key = zrng.key_tensor(*zrng.stream_key(SEED, STEP, name), 0, p.device)
        kernel(out.view(-1), p.data.reshape(-1), key, eps.to(p.device), engine.distribution)
        outs.append(out)
    return _digest(outs)


CASES = [(d, dist, r) for d in DTYPES for dist in zrng.DISTRIBUTIONS for r in ("nearest", "stochastic")]


def _case_id(case) -> str:
    return "-".join(case)


def compute(device: str = "cpu", use_compile: bool = False) -> dict:
    out = {}
    for case in CASES:
        dtype, dist, rounding = case
        entry = {"update": _updated(_engine(dtype, dist, rounding, device, use_compile))}
        if rounding == "nearest":
            engine = _engine(dtype, dist, rounding, device, use_compile)
            entry.update(perturb_plus=_perturbed(engine, +1), perturb_minus=_perturbed(engine, -1))
        out[_case_id(case)] = entry
    return out


GOLDEN = json.loads(GOLDEN_PATH.read_text()) if GOLDEN_PATH.exists() else {}


def test_golden_file_is_this_generator():
    assert (GOLDEN["generator"], GOLDEN["version"]) == (zrng.GENERATOR, zrng.GENERATOR_VERSION)
    assert GOLDEN["scale"] == SCALE and sorted(GOLDEN["cases"]) == sorted(map(_case_id, CASES))


@pytest.mark.parametrize("use_compile", [False, True], ids=["eager", "compiled"])
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("case", CASES, ids=_case_id)
def test_update_and_perturbation_match_golden(case, device, use_compile):
    """Bit for bit on every machine: a forward-free pin of contract 4 (and of the perturbed values of contract 3).
    `compiled` runs the C twins on CPU (fp32) or torch.compile's kernels, Triton on CUDA."""
    dtype, dist, rounding = case
    expected = GOLDEN["cases"][_case_id(case)]
    assert _updated(_engine(dtype, dist, rounding, device, use_compile)) == expected["update"]
    if rounding == "nearest":
        engine = _engine(dtype, dist, rounding, device, use_compile)
        assert _perturbed(engine, +1) == expected["perturb_plus"]
        assert _perturbed(engine, -1) == expected["perturb_minus"]


def test_golden_update_changes_every_tensor():
    """The pins are not vacuous: the update moves every tensor (the b.bias of 3 elements too) in every dtype."""
    for dtype in DTYPES:
        before = Params(DTYPES[dtype], "cpu")
        engine = _engine(dtype, "gaussian", "nearest", "cpu", False)
        engine.apply_update(STEP, SCALE)
        for p0, p1 in zip(before.parameters(), engine.trainable.params):
            assert not torch.equal(p0, p1)


if __name__ == "__main__" and sys.argv[1:] == ["--write"]:
    GOLDEN_PATH.write_text(json.dumps({"generator": zrng.GENERATOR, "version": zrng.GENERATOR_VERSION,
                                       "seed": SEED, "step": STEP, "eps": EPS, "scale": SCALE,
                                       "cases": compute()}, indent=1) + "\n")
    print(f"wrote {GOLDEN_PATH}")
