"""Adapters (peft LoRA, prefix tuning) and quantized bases (bitsandbytes): train -> replay bit for bit, the
perturbation hooks on adapter modules, zrng initial values, PEFT export, merged export, refusals, the dry-run
estimate.

Tiny models of conftest.py on CPU, `mezo.compile = "off"`; runs go through the click CLI in-process.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import CORPUS, build_model, save_tiny, write_jsonl
from safetensors.torch import load_file
from test_train import assert_same_weights, cli, train_cli, write_recipe
from torch.func import functional_call

from mezo_tune import adapters, mezo, zrng
from mezo_tune.recipe import AdapterConfig, load_recipe
from mezo_tune.trajectory import read_trajectory

LORA = ("--set", "adapter.type=lora", "--set", "adapter.r=4", "--set", "adapter.alpha=8")
PREFIX = ("--set", "adapter.type=prefix", "--set", "adapter.num_virtual_tokens=3")


@pytest.fixture(scope="module")
def tiny64(tmp_path_factory):
    """A llama with hidden size 64: every projection is >= 32 wide, as bitsandbytes' 4-bit needs."""
    return save_tiny(tmp_path_factory.mktemp("tiny64"), "llama", torch.float32, hidden=64)


@pytest.fixture
def make_recipe(tmp_path, tiny_model_dirs):
    rows = [{"text": t} for t in CORPUS]
    train, ev = write_jsonl(tmp_path / "train.jsonl", rows * 2), write_jsonl(tmp_path / "eval.jsonl", rows)

    def make(model=None, out="runs/x", name="r.toml", **kw):
        kw.setdefault("steps", 6)
        kw.setdefault("lr", 1e-2)
        kw.setdefault("keyframe_every", 2)
        return write_recipe(tmp_path / name, model or tiny_model_dirs("llama", "float32"), train, ev,
                            out=tmp_path / out, **kw)

    return make


def adapter_file(d: Path) -> Path:
    return d / "adapter_model.safetensors"


# ---- train -> replay, bit for bit (CLI end to end) --------------------------------------------------------------

@pytest.mark.parametrize("kind,dtype,arch", [("lora", "float32", "llama"), ("lora", "bfloat16", "opt"),
                                             ("prefix", "float32", "llama"), ("prefix", "float16", "gpt2")])
def test_adapter_run_replays_bit_equal(kind, dtype, arch, make_recipe, tmp_path, tiny_model_dirs):
    recipe = make_recipe(model=tiny_model_dirs(arch, dtype), dtype=dtype)
    train_cli(recipe, *(LORA if kind == "lora" else PREFIX))
    run = tmp_path / "runs/x"
    final = run / "final"
    assert json.loads((final / "adapter_config.json").read_text())["peft_type"] == \
        {"lora": "LORA", "prefix": "PREFIX_TUNING"}[kind]
    assert not (final / "model.safetensors").exists()  # final/ of an adapter run is the adapter, not the base

    data = read_trajectory(run / "trajectory.mezo")
    header = data.header
    assert header["adapter"]["type"] == kind and header["adapter"]["init"] == "zrng-v1"
    assert header["adapter"]["config"]["peft_type"] == {"lora": "LORA", "prefix": "PREFIX_TUNING"}[kind]
    if kind == "lora":
        assert (header["adapter"]["config"]["r"], header["adapter"]["config"]["lora_alpha"]) == (4, 8.0)
    else:
        assert header["adapter"]["config"]["num_virtual_tokens"] == 3
    # contract 1: the adapter tensors only, kept in fp32 over a 16-bit base
    names = [t["name"] for t in header["trainable"]]
    assert names and all(("lora_" in n) if kind == "lora" else ("prompt_encoder" in n) for n in names)
    assert all(t["dtype"] == "float32" for t in header["trainable"])
    assert not any(r.skipped for r in data.steps)

    result = cli("replay", run / "trajectory.mezo", "--out", tmp_path / "rep", "--verify", "-q")
    assert result.output == f"replayed 6 steps (every keyframe verified); wrote {tmp_path}/rep\n"
    assert_same_weights(adapter_file(final), adapter_file(tmp_path / "rep"))
    # the training moved the adapter (the comparison is not vacuous)
    trained = load_file(adapter_file(final))
    initial = {t["name"]: adapters.initial_value(kind, 7, t["name"], tuple(t["shape"]), torch.float32)
               for t in header["trainable"]}
    assert all(not torch.equal(trained[_saved_name(n)], v) for n, v in initial.items())


def test_adapter_run_resumes_bit_equal(make_recipe, tmp_path):
    """A LoRA run cut after 3 of 6 steps (no checkpoint: rebuilt from the base, the zrng init and the records) and
    resumed ends with the adapter of the uninterrupted run."""
    import shutil

    from mezo_tune import train as train_mod
    from mezo_tune.trajectory import TrajectoryWriter

    recipe = make_recipe(steps=6, keyframe_every=2)
    train_cli(recipe, *LORA)
    run = tmp_path / "runs/x"
    assert "(lora adapter r=4 alpha=8.0, init zrng-v1)" in cli("inspect", run / "trajectory.mezo").output
    cut = tmp_path / "runs/cut"
    cut.mkdir()
    data = read_trajectory(run / "trajectory.mezo")
    with TrajectoryWriter.create(cut / "trajectory.mezo", data.header, flush_every=train_mod.FLUSH_EVERY) as w:
        w.append_keyframe(-1, data.keyframes[-1])
        for rec in data.steps[:3]:
            w.append_step(rec)
            if rec.step in data.keyframes:
                w.append_keyframe(rec.step, data.keyframes[rec.step])
    shutil.copy(run / "recipe.toml", cut / "recipe.toml")
    train_cli(recipe, *LORA, "--resume", "--set", f"output.dir={cut}")
    assert_same_weights(adapter_file(run / "final"), adapter_file(cut / "final"))
    assert read_trajectory(cut / "trajectory.mezo").steps == data.steps


def _saved_name(name: str) -> str:
    """peft saves adapter tensors without the adapter name ("default"); a prefix as "prompt_embeddings"."""
    return "prompt_embeddings" if name.startswith("prompt_encoder.") else name.replace(".default", "")


def test_quantized_4bit_base_with_lora_replays_bit_equal(make_recipe, tiny64, tmp_path):
    recipe = make_recipe(model=tiny64, steps=4, keyframe_every=2)
    train_cli(recipe, *LORA, "--set", "model.quantization=4bit")
    run = tmp_path / "runs/x"
    header = read_trajectory(run / "trajectory.mezo").header
    assert header["quantization"] == "4bit"
    assert all(t["dtype"] == "float32" for t in header["trainable"])
    cli("replay", run / "trajectory.mezo", "--out", tmp_path / "rep", "--verify", "-q")
    assert_same_weights(adapter_file(run / "final"), adapter_file(tmp_path / "rep"))

    result = cli("replay", run / "trajectory.mezo", "--out", tmp_path / "merged", "--merge", "-q", ok=False)
    assert result.exit_code == 1
    assert result.output.startswith("error: --merge needs an unquantized base; this run's base is 4bit.")

    # eval --model takes the adapter directory: the recipe's base, quantized as it says, plus the adapter
    out = cli("eval", run / "recipe.toml", "--model", run / "final", "--json", "-q").output
    via_adapter = json.loads(out)
    via_trajectory = json.loads(cli("eval", run / "recipe.toml", "--model", run / "trajectory.mezo", "--json",
                                    "-q").output)
    assert via_adapter["loss"] == via_trajectory["loss"]


def test_quantized_8bit_base_with_lora_replays_bit_equal(make_recipe, tiny64, tmp_path):
    # 8-bit matmul on CPU is slow (int8 through fp16 casts): 2 steps on the tiny model, ~10 s on 2 cores
    recipe = make_recipe(model=tiny64, steps=2, keyframe_every=1)
    train_cli(recipe, *LORA, "--set", "model.quantization=8bit")
    run = tmp_path / "runs/x"
    cli("replay", run / "trajectory.mezo", "--out", tmp_path / "rep", "--verify", "-q")
    assert_same_weights(adapter_file(run / "final"), adapter_file(tmp_path / "rep"))


def test_full_weight_on_a_quantized_base_is_refused(make_recipe):
    recipe = make_recipe()
    result = train_cli(recipe, "--set", "model.quantization=8bit", ok=False)
    assert result.exit_code == 2
    assert result.output == (
        f"error: recipe {recipe} has 1 problem:\n"
        '  model.quantization: full-weight MeZO cannot train a quantized base (quantization = "8bit"): train an '
        'adapter on it ([adapter] type = "lora" or "prefix"), or load the base unquantized (quantization = "none" '
        'with dtype = "bfloat16", "float16" or "float32")\n')
    result = cli("train", recipe, "--dry-run", "--set", "model.quantization=4bit", ok=False)
    assert result.exit_code == 2 and "full-weight MeZO cannot train a quantized base" in result.output


# ---- export -----------------------------------------------------------------------------------------------------

def test_exported_adapter_loads_through_peft_with_the_same_logits(make_recipe, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from mezo_tune.replay import rebuild

    recipe = make_recipe(steps=5)
    train_cli(recipe, *LORA, "--set", "adapter.target_modules=[\"q_proj\", \"v_proj\", \"down_proj\"]")
    run = tmp_path / "runs/x"
    rebuilt = rebuild(run / "trajectory.mezo", progress=False, log=lambda m: None)
    ids = torch.arange(2, 22).reshape(2, 10)
    with torch.no_grad():
        expected = rebuilt.model(input_ids=ids).logits
    base_path = load_recipe(recipe).model.path
    base = AutoModelForCausalLM.from_pretrained(base_path, dtype=torch.float32)
    loaded = PeftModel.from_pretrained(base, str(run / "final")).eval()
    with torch.no_grad():
        got = loaded(input_ids=ids).logits
    assert torch.equal(got, expected)
    plain = AutoModelForCausalLM.from_pretrained(base_path, dtype=torch.float32).eval()
    with torch.no_grad():
        assert not torch.equal(plain(input_ids=ids).logits, expected)  # the adapter does something

    # --merge: full weights in a Hugging Face directory, the same function up to the rounding of the merge
    cli("replay", run / "trajectory.mezo", "--out", tmp_path / "merged", "--merge", "-q")
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged", dtype=torch.float32).eval()
    assert not (tmp_path / "merged/adapter_config.json").exists()
    with torch.no_grad():
        torch.testing.assert_close(merged(input_ids=ids).logits, expected, rtol=1e-5, atol=1e-5)


# ---- the engine on adapter modules (contracts 3 and 5) ------------------------------------------------------------

def _lora_model(dtype=torch.float32, seed=11, kind="lora"):
    model = build_model("llama", dtype).requires_grad_(False)
    cfg = AdapterConfig(type=kind, r=4, alpha=8, target_modules=("q_proj", "v_proj", "up_proj"))
    return adapters.attach(model, cfg, seed)


def _loss(logits, ids):
    logits = logits.float()
    return torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1))


@pytest.mark.parametrize("kind,dtype", [("lora", torch.float32), ("lora", torch.bfloat16),
                                        ("prefix", torch.float32), ("prefix", torch.float16)], ids=str)
def test_hooked_perturbation_on_adapters_equals_functional_call(kind, dtype):
    model = _lora_model(dtype, kind=kind)
    ts = mezo.trainable_set(model, adapter=True)
    assert ts.names == [n for n, _ in adapters.adapter_params(model)]
    assert all((".lora_" in n) if kind == "lora" else n.startswith("prompt_encoder.") for n in ts.names)
    engine = mezo.Mezo(model, ts, seed=5, eps=1e-2)
    ids = torch.arange(2, 26).reshape(2, 12)
    # B = 0 at init makes the perturbed loss independent of A's perturbation: start from a trained-looking state
    engine.apply_update(0, 0.5)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    for sign in (+1, -1):
        with torch.no_grad(), engine.perturbed(3, sign):
            hooked = _loss(model(input_ids=ids).logits, ids)
        params = {}
        for name, p in zip(ts.names, ts.params):
            z = zrng.z_for(5, 3, name, p.numel()).view(p.shape)
            params[name] = (p.float() + torch.tensor(sign * 1e-2, dtype=torch.float32) * z).to(p.dtype)
        with torch.no_grad():
            reference = _loss(functional_call(model, params, (), {"input_ids": ids}).logits, ids)
            plain = _loss(model(input_ids=ids).logits, ids)
        assert hooked.item() == reference.item()
        assert hooked.item() != plain.item()
    after = model.state_dict()
    assert all(torch.equal(before[k].view(torch.uint8), after[k].view(torch.uint8)) for k in before)


def test_a_step_with_zero_lr_changes_no_bit_of_an_adapter_model():
    model = _lora_model(torch.bfloat16)
    ts = mezo.trainable_set(model, adapter=True)
    engine = mezo.Mezo(model, ts, seed=5, eps=1e-2)
    ids = torch.arange(2, 26).reshape(2, 12)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    (rec,) = engine.step(0, 0.0, lambda: _loss(model(input_ids=ids).logits, ids))
    assert np.isfinite(rec["g"])
    after = model.state_dict()
    assert before.keys() == after.keys()
    assert all(torch.equal(before[k].view(torch.uint8), after[k].view(torch.uint8)) for k in before)


def test_adapter_initial_values_come_from_zrng():
    a, b = _lora_model(seed=11), _lora_model(seed=11)
    c = _lora_model(seed=12)
    pa, pb, pc = (dict(adapters.adapter_params(m)) for m in (a, b, c))
    for name, p in pa.items():
        assert torch.equal(p, pb[name])
        if ".lora_A." in name:
            bound = float(np.float32(1 / np.sqrt(p.shape[1])))
            assert p.abs().max() < bound and p.abs().max() > 0.9 * bound and not torch.equal(p, pc[name])
        else:
            assert not p.any()  # B = 0: the adapter starts as the identity
    # the values do not depend on torch's global RNG (peft's own init does)
    torch.manual_seed(123)
    d = dict(adapters.adapter_params(_lora_model(seed=11)))
    assert all(torch.equal(d[n], pa[n]) for n in pa)
    # pinned: the first values of the first A tensor
    first = next(n for n in pa if ".lora_A." in n)
    assert first == "base_model.model.model.layers.0.self_attn.q_proj.lora_A.default.weight"
    h = zrng.bits_for(11, 0, first, torch.arange(3), stream=adapters.INIT_STREAM)
    expected = ((2 * (h >> 8) - (2**24 - 1)).double() * 2.0**-24 * float(np.float32(1 / np.sqrt(32)))).float()
    assert torch.equal(pa[first].view(-1)[:3], expected)


# ---- dry run ------------------------------------------------------------------------------------------------------

def test_dry_run_reports_adapter_and_quantization(make_recipe, tiny64):
    recipe = make_recipe(model=tiny64)
    out = cli("train", recipe, "--dry-run", *LORA, "--set", "model.quantization=4bit").output
    trainable = [line for line in out.splitlines() if line.startswith("trainable:")]
    model = build_model("llama", hidden=64).requires_grad_(False)
    n = sum(p.numel() for _, p in adapters.adapter_params(
        adapters.attach(model, AdapterConfig(type="lora", r=4, alpha=8), 0, init=False)))
    assert trainable and trainable[0].startswith(f"trainable: {n:,} parameters in 8 tensors (lora adapter")
    assert "4bit" in out


def test_dry_run_estimate_is_within_25_percent_of_the_measured_peak(tiny64, tmp_path):
    """The estimate against the peak of live tensor bytes measured during one MeZO step (rows long enough to fill
    max_length, as the estimate assumes)."""
    from mezo_tune.estimate import estimate_peak_bytes, measure_step_peak_bytes, meta_model

    train = write_jsonl(tmp_path / "long.jsonl", [{"text": " ".join(CORPUS * 3)}] * 8)
    path = write_recipe(tmp_path / "r.toml", tiny64, train, out=tmp_path / "o", batch_size=8, max_length=64)
    for overrides in ([], ["adapter.type=lora"], ["adapter.type=lora", "model.quantization=4bit"],
                      ["adapter.type=prefix"]):
        recipe = load_recipe(path, overrides)
        est = estimate_peak_bytes(meta_model(recipe.model, recipe.adapter), recipe)["peak_bytes"]
        measured = measure_step_peak_bytes(recipe)
        assert abs(est - measured) <= 0.25 * measured, (overrides, est, measured)


# ---- GPU ----------------------------------------------------------------------------------------------------------

@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_lora_trained_on_cuda_replays_bit_equal_on_cpu(make_recipe, tmp_path):
    recipe = make_recipe(steps=6)
    train_cli(recipe, *LORA, "--set", "model.device=cuda", "--set", "mezo.compile=on")
    run = tmp_path / "runs/x"
    cli("replay", run / "trajectory.mezo", "--out", tmp_path / "rep", "--device", "cpu", "--verify", "-q")
    assert_same_weights(adapter_file(run / "final"), adapter_file(tmp_path / "rep"))


# ---- prefix initialised from real-token activations (issue #15, item 5) -------------------------------------------

@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_prefix_from_activations_starts_as_if_the_prompt_began_with_those_tokens(arch):
    base = build_model(arch, torch.float32).eval()
    tokens, x = [5, 6, 7], torch.tensor([[10, 11, 12, 13]])
    with torch.no_grad():
        expected = base(torch.tensor([tokens + x[0].tolist()])).logits[:, len(tokens):]
    cfg = AdapterConfig(type="prefix", num_virtual_tokens=3, init="activations")
    peft_model = adapters.attach(build_model(arch, torch.float32), cfg, seed=7)
    adapters.init_prefix_from_activations(peft_model, tokens)
    with torch.no_grad():
        got = peft_model(input_ids=x, attention_mask=torch.ones_like(x)).logits
    # the same attention over the same keys and values, summed in another order: fp32 rounding only
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-5)


def test_prefix_from_activations_is_stored_and_replays_and_resumes_bit_equal(make_recipe, tmp_path):
    import shutil

    from mezo_tune.trajectory import TrajectoryWriter

    recipe = make_recipe(steps=4, keyframe_every=2)
    init = ("--set", "adapter.init=activations")
    train_cli(recipe, *PREFIX, *init)
    run = tmp_path / "runs/x"
    data = read_trajectory(run / "trajectory.mezo")
    entry = data.header["adapter"]
    assert entry["init"] == "activations-v1"
    (name, stored), = entry["init_values"].items()
    assert data.header["trainable"] == [{"name": name, "shape": stored["shape"], "dtype": "float32"}]
    assert name == "prompt_encoder.default.embedding.weight" and stored["shape"][0] == 3
    # the values are the base model's keys/values of 3 zrng-chosen vocabulary tokens, not the zrng Gaussian
    assert adapters._decode_tensor(stored).abs().max() < 100
    assert not torch.equal(adapters._decode_tensor(stored),
                           adapters.initial_value("prefix", 7, name, tuple(stored["shape"]), torch.float32))
    cli("replay", run / "trajectory.mezo", "--out", tmp_path / "rep", "--verify", "-q")
    assert_same_weights(adapter_file(run / "final"), adapter_file(tmp_path / "rep"))

    # resume starts from the stored values (run.restore_recorded_init), as replay does, and ends bit-identical
    cut = tmp_path / "runs/cut"
    cut.mkdir()
    with TrajectoryWriter.create(cut / "trajectory.mezo", data.header) as w:
        w.append_keyframe(-1, data.keyframes[-1])
        for rec in data.steps[:2]:
            w.append_step(rec)
        w.append_keyframe(1, data.keyframes[1])
    shutil.copy(run / "recipe.toml", cut / "recipe.toml")
    train_cli(recipe, *PREFIX, *init, "--resume", "--set", f"output.dir={cut}")
    assert_same_weights(adapter_file(run / "final"), adapter_file(cut / "final"))
    assert read_trajectory(cut / "trajectory.mezo").steps == data.steps


def test_prefix_init_text_and_its_length(make_recipe, tmp_path):
    recipe = make_recipe(steps=1)
    result = train_cli(recipe, *PREFIX, "--set", "adapter.init=activations", "--set", "adapter.init_text=a b",
                       ok=False)
    assert result.exit_code == 1
    assert "[adapter] init_text is 2 tokens; the prefix has num_virtual_tokens = 3: give a longer text, or fewer " \
           "virtual tokens" in result.output


@pytest.mark.parametrize("sets,problem", [
    (("adapter.type=lora", "adapter.init=activations"),
     "adapter.init: \"activations\" starts prefix tuning's virtual tokens from real tokens; this adapter is 'lora' "
     "(use \"auto\" or \"zrng\")"),
    (("adapter.type=prefix", "adapter.init_text=hello"),
     'adapter.init_text: is the text whose activations start the prefix: it needs init = "activations"'),
])
def test_prefix_init_settings_are_checked(make_recipe, sets, problem):
    result = cli("train", make_recipe(), "--dry-run", *(a for s in sets for a in ("--set", s)), ok=False)
    assert result.exit_code == 2
    assert problem in result.output
