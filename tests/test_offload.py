"""Offload (models larger than memory): a tiny llama with layers offloaded to disk by accelerate trains with MeZO,
perturbation never writes the offload store, and the trajectory replays in memory to the same bits.

On CPU the offloaded layers run on CPU too; the losses of an offloaded run are then bit-equal to an in-memory run's:
the perturbed weights are the same bits (same kernel, same z) and each module's forward runs the same CPU kernels on
them, so nothing differs but where the weights sit between forwards.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest
import torch
from test_train import assert_same_weights, cli, train_cli, write_recipe

from mezo_tune import models
from mezo_tune.mezo import Mezo, trainable_set
from mezo_tune.recipe import RecipeError, parse_recipe
from mezo_tune.trajectory import read_trajectory

# layer 1 on disk, the rest in CPU memory
LAYER_ON_DISK = {"model.embed_tokens": "cpu", "model.layers.0": "cpu", "model.layers.1": "disk", "model.norm": "cpu",
                 "model.rotary_emb": "cpu", "lm_head": "cpu"}
# layer 1 and the tied embedding / LM head on disk
TIED_ON_DISK = {**LAYER_ON_DISK, "model.embed_tokens": "disk", "lm_head": "disk"}


def file_digest(path: Path) -> str:
    return hashlib.blake2b(path.read_bytes(), digest_size=16).hexdigest()


def store_bytes(folder: Path) -> dict[str, bytes]:
    """Every file of an offload store, by name: what a forward must never change."""
    return {p.name: p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def offloaded(model_dir: Path, device_map, tmp_path: Path):
    """The tiny model loaded with device_map, and its offload store folder."""
    model = models.load_model(models.resolve_source(str(model_dir)), device_map=device_map,
                              offload_dir=str(tmp_path / "offload"))
    (folder,) = (tmp_path / "offload").iterdir()
    return model, folder


def batch_loss(model, tokenizer):
    ids = tokenizer(["the quick brown fox jumps over the lazy dog"] * 2, return_tensors="pt").input_ids
    return lambda: model(input_ids=ids, labels=ids).loss.float()


@pytest.mark.parametrize("device_map", [LAYER_ON_DISK, TIED_ON_DISK], ids=["layer", "layer+tied-embedding"])
def test_offloaded_steps_equal_in_memory_steps(tiny_model_dirs, tokenizer, tmp_path, device_map):
    model_dir = tiny_model_dirs("llama")
    weights_file = model_dir / "model.safetensors"
    before = file_digest(weights_file)
    model, folder = offloaded(model_dir, device_map, tmp_path)
    in_memory = models.load_model(models.resolve_source(str(model_dir)))
    assert models.state_digests(model) == models.state_digests(in_memory)  # the same base, wherever it lives
    engines = []
    for m in (model, in_memory):
        engines.append(Mezo(m, trainable_set(m), seed=5, eps=1e-3))
    assert engines[0].trainable.header() == engines[1].trainable.header()  # a tied weight once, as in memory
    stored = [p for p in engines[0].trainable.params if not isinstance(p, torch.nn.Parameter)]
    assert stored, "no trainable tensor lives in the offload store"
    for t in range(4):
        a, b = (e.step(t, 1e-2, batch_loss(m, tokenizer)) for e, m in zip(engines, (model, in_memory)))
        assert (a[0]["loss_plus"], a[0]["loss_minus"], a[0]["g"]) == (b[0]["loss_plus"], b[0]["loss_minus"], b[0]["g"])
    for name, p, q in zip(engines[0].trainable.names, engines[0].trainable.params, engines[1].trainable.params):
        assert torch.equal(p, q), name
    assert file_digest(weights_file) == before  # the model's own files are never written
    # the offloaded forward reads the updated store: an unperturbed forward equals the in-memory model's, bit for bit
    with torch.no_grad():
        assert torch.equal(batch_loss(model, tokenizer)(), batch_loss(in_memory, tokenizer)())
    assert any(f.suffix == ".dat" for f in folder.iterdir())


def test_perturbation_leaves_the_store_untouched(tiny_model_dirs, tokenizer, tmp_path):
    """Only layer 1 (on disk) is trained: a perturbed forward pair changes the losses (the offloaded weights were
    perturbed) and not one byte of the store."""
    model, folder = offloaded(tiny_model_dirs("llama"), LAYER_ON_DISK, tmp_path)
    trainable = trainable_set(model, freeze=["model.embed_tokens*", "model.layers.0.*", "model.norm*"])
    assert all(n.startswith("model.layers.1.") for n in trainable.names)
    engine = Mezo(model, trainable, seed=1, eps=1e-2)
    files, tensors = store_bytes(folder), [p.clone() for p in trainable.params]
    loss = batch_loss(model, tokenizer)
    with torch.no_grad():
        plain = float(loss())
    lp, lm = engine.loss_pair(0, loss)
    assert lp != plain and lm != plain and lp != lm
    assert store_bytes(folder) == files
    assert all(torch.equal(a, b) for a, b in zip(tensors, trainable.params))
    engine.step(1, 0.0, loss)  # η = 0: two perturbed forwards and no update
    assert store_bytes(folder) == files


def test_offloaded_run_replays_in_memory_bit_equal(tiny_model_dirs, lm_files, tmp_path):
    """`train` with layer 1 on disk; `replay` of its trajectory, in memory or offloaded, writes final/'s bits; an
    in-memory run of the same recipe records the same steps."""
    model_dir = tiny_model_dirs("llama")
    train, _ = lm_files
    recipe = write_recipe(tmp_path / "offload.toml", model_dir, train, out=tmp_path / "run", steps=6)
    text = recipe.read_text().replace('device = "cpu"\n', "")
    table = ", ".join(f'"{k}" = "{v}"' for k, v in LAYER_ON_DISK.items())
    recipe.write_text(text.replace("[model]\n", f'[model]\ndevice_map = {{ {table} }}\n'
                                                f'offload_dir = "{tmp_path / "offload"}"\n'))
    train_cli(recipe)
    for how in ("--in-memory", "--verify"):  # whole, and offloaded as the recipe says
        cli("replay", tmp_path / "run" / "trajectory.mezo", "--out", tmp_path / how, how, "-q")
        assert_same_weights(tmp_path / "run" / "final" / "model.safetensors", tmp_path / how / "model.safetensors")
    plain = write_recipe(tmp_path / "plain.toml", model_dir, train, out=tmp_path / "plain", steps=6)
    train_cli(plain)
    offl, mem = (read_trajectory(tmp_path / d / "trajectory.mezo").steps for d in ("run", "plain"))
    assert [(s.g, s.loss_plus, s.loss_minus) for s in offl] == [(s.g, s.loss_plus, s.loss_minus) for s in mem]
    assert_same_weights(tmp_path / "run" / "final" / "model.safetensors",
                        tmp_path / "plain" / "final" / "model.safetensors")


def test_split_tied_weight_is_refused(tiny_model_dirs, tmp_path):
    split = {**LAYER_ON_DISK, "lm_head": "disk"}  # the LM head on disk, the embedding it is tied to in memory
    with pytest.raises(models.ModelError) as e:
        offloaded(tiny_model_dirs("llama"), split, tmp_path)
    assert str(e.value) == (
        "the tied weights lm_head.weight = model.embed_tokens.weight are offloaded for one name and not as one tensor "
        "for the other, so MeZO would train two copies of what must stay one weight. Put the modules that share it on "
        "the same device in [model] device_map (both \"disk\", or both in memory)")


RECIPE = """
[model]
path = "tiny"
{model}
{adapter}
[data]
train = "hf:imdb:train"
[mezo]
lr = 1e-6
eps = 1e-3
steps = 10
batch_size = 2
seed = 0
[output]
dir = "runs/x"
"""


def problems(model: str, adapter: str = "") -> list[str]:
    with pytest.raises(RecipeError) as e:
        parse_recipe(RECIPE.format(model=model, adapter=adapter), check_files=False)
    return e.value.problems


def test_offload_keys_validate():
    recipe = parse_recipe(RECIPE.format(model='device_map = "auto"\nmax_memory = { cpu = "2GiB", "cuda:0" = 1000 }\n'
                                              'offload_dir = "scratch"', adapter=""), check_files=False)
    assert (recipe.model.device_map, recipe.model.max_memory) == ("auto", {"cpu": "2GiB", "cuda:0": 1000})
    assert models.accelerate_max_memory(recipe.model.max_memory) == {"cpu": "2GiB", 0: 1000}
    assert problems('device_map = "everywhere"') == [
        'model.device_map: must be "" (no offload), one of "auto", "balanced", "balanced_low_0", "sequential", or a '
        'table of module name = "cpu" | "disk" | "cuda:N" (got "everywhere")']
    assert problems('device_map = { lm_head = "gpu" }') == [
        'model.device_map: a table must put each module on "cpu", "disk", "cuda" or "cuda:N" (got lm_head = "gpu")']
    assert problems('max_memory = { cpu = "2GiB" }\noffload_dir = "x"') == [
        "model.max_memory: needs device_map (it only says how accelerate offloads)",
        "model.offload_dir: needs device_map (it only says how accelerate offloads)"]
    assert problems('device_map = { "" = "cpu" }\nmax_memory = { cpu = 1000 }\ndevice = "cpu"') == [
        'model.device: is "cpu", but device_map places the modules: leave device out',
        'model.max_memory: limits the memory a device_map strategy ("auto", ...) may fill; a device_map table places '
        'every module itself: give one or the other']


def test_adapter_on_quantized_base_cannot_offload():
    assert problems('device_map = "auto"\nquantization = "4bit"', '[adapter]\ntype = "lora"') == [
        'model.device_map: cannot offload a quantized base (quantization = "4bit"): bitsandbytes\' quantized weights '
        'stay on the one device they were quantized on, accelerate cannot store them on disk or load them back per '
        'forward. Drop device_map (the quantized base is small), or load the base unquantized (quantization = '
        '"none") and offload it for full-weight training']
    assert problems('device_map = "auto"', '[adapter]\ntype = "lora"') == [
        'model.device_map: cannot train an adapter (lora) on an offloaded base: peft creates the adapter tensors of an '
        'offloaded layer on the meta device, where they hold no values. Offload for full-weight training ([adapter] '
        'type = "none"), or load the base in memory for the adapter']


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cpu_offload_on_gpu_replays_on_cpu(tiny_model_dirs, tokenizer, tmp_path):
    """Layer 1 in CPU RAM, executed on the GPU (perturbed there); the update runs on the CPU copy. A CPU replay of
    the records gives the same bits (contracts 2 and 4)."""
    model_dir = tiny_model_dirs("llama")
    gpu_map = {k: ("cpu" if v == "disk" else "cuda:0") for k, v in LAYER_ON_DISK.items()}
    model = models.load_model(models.resolve_source(str(model_dir)), device_map=gpu_map,
                              offload_dir=str(tmp_path / "offload"))
    engine = Mezo(model, trainable_set(model), seed=2, eps=1e-3)
    assert {p.device.type for p in engine.trainable.params} == {"cpu", "cuda"}
    ids = tokenizer(["the quick brown fox"] * 2, return_tensors="pt").input_ids.to("cuda:0")
    records = []
    for t in range(3):
        records += engine.step(t, 1e-2, lambda: model(input_ids=ids, labels=ids).loss.float())
    cpu = models.load_model(models.resolve_source(str(model_dir)))
    replay = Mezo(cpu, trainable_set(cpu), seed=2, eps=1e-3)
    for rec in records:
        replay.apply_record(rec)
    for name, p, q in zip(engine.trainable.names, engine.trainable.params, replay.trainable.params):
        assert torch.equal(p.cpu(), q), name


def test_backprop_baseline_refuses_an_offloaded_model(tiny_model_dirs, lm_files, tmp_path):
    recipe = write_recipe(tmp_path / "adamw.toml", tiny_model_dirs("llama"), lm_files[0], out=tmp_path / "run")
    text = recipe.read_text().replace('device = "cpu"\n', 'device_map = { "model.layers.1" = "disk", "" = "cpu" }\n')
    recipe.write_text(text + '\n[optim]\ntype = "adamw"\n')
    result = train_cli(recipe, ok=False)
    assert result.exit_code != 0
    assert ('optim.type = "adamw" (the backprop baseline) keeps gradients and moments beside every weight, so it '
            'cannot train an offloaded model; remove [model] device_map, or train with MeZO (optim.type = "mezo")'
            ) in " ".join(result.output.split())
