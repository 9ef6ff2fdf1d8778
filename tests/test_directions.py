"""Cheaper or sparser directions (issue #15 item 3, DESIGN.md contract 7's direction axis): layer-wise subsets, sparse
masks (random and by magnitude) and low-rank z = U Vᵀ — each replaying, resuming and verifying bit for bit, and
touching nothing outside its subset.

Tiny llama of conftest.py on CPU, `mezo.compile = "off"`; runs go through the click CLI in-process.
"""

from __future__ import annotations

import pytest
import torch
from conftest import build_model
from safetensors.torch import load_file
from test_learning import BASE_RECIPE, _copy_first_records, recipe_file
from test_train import assert_same_weights, cli, train_cli, write_recipe

from mezo_tune import zrng
from mezo_tune.directions import SAMPLE, U_STREAM, V_STREAM, Directions, magnitude_threshold, random_mask
from mezo_tune.mezo import Mezo, trainable_set, update_scale
from mezo_tune.recipe import RecipeError, parse_recipe
from mezo_tune.trajectory import read_trajectory

CHOICES = {
    "layerwise": ({"direction_type": "layerwise", "layer_count": 4},
                  {"name": "layerwise", "version": 1, "count": 4, "fraction": 0.25}),
    "layerwise-fraction": ({"direction_type": "layerwise", "layer_fraction": 0.5},
                           {"name": "layerwise", "version": 1, "count": 10, "fraction": 0.5}),
    "sparse-random": ({"direction_type": "sparse", "sparse_mask": "random", "sparse_fraction": 0.3},
                      {"name": "sparse", "version": 1, "mask": "random", "fraction": 0.3}),
    "sparse-magnitude": ({"direction_type": "sparse", "sparse_fraction": 0.3},
                         {"name": "sparse", "version": 1, "mask": "magnitude", "fraction": 0.3}),
    "lowrank": ({"direction_type": "lowrank", "lowrank_rank": 4, "lowrank_v_every": 4},
                {"name": "lowrank", "version": 1, "rank": 4, "v_every": 4}),
}


# ---- replay, resume, verify ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("choice", list(CHOICES))
def test_each_direction_replays_and_resumes_bit_for_bit(tmp_path, tiny_model_dirs, choice):
    mezo, header = CHOICES[choice]
    train_cli(recipe_file(tmp_path, tiny_model_dirs(), mezo=mezo))
    traj = tmp_path / "runs/x/trajectory.mezo"
    data = read_trajectory(traj)
    assert data.header["direction"] == header
    assert len({r.g for r in data.steps}) == 6  # it trained: six different projected gradients
    cli("replay", traj, "--out", tmp_path / "rep", "--verify", "-q")
    assert_same_weights(tmp_path / "runs/x/final/model.safetensors", tmp_path / "rep/model.safetensors")

    # a stop after record 2 (inside low rank's first V period), resumed: same records, keyframes and weights
    crashed = recipe_file(tmp_path, tiny_model_dirs(), out="runs/y", mezo=mezo, name="y.toml")
    _copy_first_records(traj, tmp_path / "runs/y/trajectory.mezo", 3)
    train_cli(crashed, "--resume")
    resumed = read_trajectory(tmp_path / "runs/y/trajectory.mezo")
    assert resumed.steps == data.steps and resumed.keyframes == data.keyframes
    assert_same_weights(tmp_path / "runs/x/final/model.safetensors", tmp_path / "runs/y/final/model.safetensors")


def test_the_choice_is_in_the_dry_run_and_a_dense_run_names_it(tmp_path, tiny_model_dirs):
    recipe = recipe_file(tmp_path, tiny_model_dirs(), mezo={"direction_type": "lowrank"})
    out = cli("train", recipe, "--dry-run").output
    assert 'direction_type = "lowrank"' in out and "lowrank_rank = 2" in out and "lowrank_v_every = 50" in out
    assert "\ndirections: lowrank, z = U Vᵀ of rank 2 for 2-D tensors (V kept 50 records), dense for the others; " in out
    layers = recipe_file(tmp_path, tiny_model_dirs(), mezo={"direction_type": "layerwise"}, name="l.toml")
    assert "\ndirections: layerwise, 5 trainable tensors per record (chosen by seed); " in cli(
        "train", layers, "--dry-run").output  # 0.25 of the tiny llama's 20 tensors
    train_cli(recipe_file(tmp_path, tiny_model_dirs(), out="runs/d", name="d.toml"))
    assert read_trajectory(tmp_path / "runs/d/trajectory.mezo").header["direction"] == {"name": "dense"}
    assert Directions.from_header(None) == Directions()  # a trajectory from before directions: dense
    with pytest.raises(ValueError, match="this mezo-tune knows dense, layerwise, sparse, lowrank v1"):
        Directions.from_header({"name": "lowrank", "version": 2, "rank": 2, "v_every": 1})


# ---- what each direction touches, and nothing else -----------------------------------------------------------------

def _engine(directions: Directions, seed: int = 5):
    model = build_model("llama")
    trainable = trainable_set(model)
    return model, trainable, Mezo(model, trainable, seed=seed, eps=1e-3, directions=directions)


def _forward_pair_leaves_weights(model, trainable, engine, record: int) -> None:
    before = [p.detach().clone() for p in trainable.params]
    ids = torch.arange(2, 18).view(2, 8)
    lp, lm = engine.loss_pair(record, lambda: model(input_ids=ids, labels=ids).loss)
    assert lp != lm  # the forwards saw a perturbation
    assert all(torch.equal(p, b) for p, b in zip(trainable.params, before))  # contract 3


def test_layerwise_touches_only_the_seed_chosen_tensors_and_hooks_only_their_modules():
    directions = Directions("layerwise", count=4)
    model, trainable, engine = _engine(directions)
    names = tuple(trainable.names)
    chosen = directions.touched(5, 7, names)
    assert len(chosen) == 4 and chosen != directions.touched(5, 8, names)  # a new subset every record
    assert chosen == Directions("layerwise", count=4).touched(5, 7, tuple(reversed(names)))  # by name, not position
    _forward_pair_leaves_weights(model, trainable, engine, 7)
    with engine.perturbed(7, +1):
        hooked = {n for n, m in model.named_modules() if id(m) in engine._hooked}
    owners = {n.rsplit(".", 1)[0] for n in chosen}
    assert hooked <= owners  # a module none of whose tensors is chosen is not swapped
    before = [p.detach().clone() for p in trainable.params]
    engine.apply_update(7, 1e-2)
    changed = {n for n, p, b in zip(names, trainable.params, before) if not torch.equal(p, b)}
    assert changed == chosen


@pytest.mark.parametrize("mask", ["random", "magnitude"])
def test_sparse_changes_exactly_the_masked_elements(mask):
    directions = Directions("sparse", fraction=0.3, mask=mask)
    model, trainable, engine = _engine(directions)
    _forward_pair_leaves_weights(model, trainable, engine, 3)
    before = [p.detach().clone() for p in trainable.params]
    expected = [directions.mask_of(5, 3, n, b) for n, b in zip(trainable.names, before)]
    engine.apply_update(3, 1e-2)
    for name, p, b, m in zip(trainable.names, trainable.params, before, expected):
        assert torch.equal(p != b, m), name  # Irwin-Hall z is never 0: every masked element moves, no other
        # about 30 % of the elements: a 4-sigma band for draws over the tensor (random) or over the threshold's sample
        n = b.numel() if mask == "random" else min(b.numel(), SAMPLE)
        if b.numel() > 64 and b.std() > 0:
            assert abs(m.float().mean().item() - 0.3) < 4 * (0.3 * 0.7 / n) ** 0.5 + 1 / n, name


def test_a_random_mask_is_the_same_whole_or_in_chunks():
    whole = random_mask(1, 2, "w", 1000, 0.3, "cpu")
    assert torch.equal(torch.cat([random_mask(1, 2, "w", 400, 0.3, "cpu"),
                                  random_mask(1, 2, "w", 600, 0.3, "cpu", offset=400)]), whole)
    assert torch.equal(random_mask(1, 2, "w", 1000, 1.0, "cpu"), torch.ones(1000))  # fraction 1: every element


def test_magnitude_threshold_is_an_exact_element_of_a_fixed_sample():
    w = torch.randn(100, 80)
    tau = magnitude_threshold(9, "w", w, 0.25)
    assert tau.item() in set(w.abs().reshape(-1).tolist())  # selected, never interpolated
    assert torch.equal(tau, magnitude_threshold(9, "w", w.clone(), 0.25))
    small = torch.arange(-5.0, 5.0)  # numel <= SAMPLE: the whole tensor, k = round(0.3 · 10) = 3
    assert magnitude_threshold(0, "s", small, 0.3).item() == 1.0


def test_low_rank_z_is_exactly_u_v_transposed_with_v_kept_for_v_every_records():
    directions = Directions("lowrank", rank=4, v_every=2)
    model, trainable, engine = _engine(directions)
    w = dict(zip(trainable.names, trainable.params))["model.layers.0.mlp.up_proj.weight"]  # 64 x 32
    rows, cols = w.shape

    def z(record):
        return directions.perturbation(5, record, "model.layers.0.mlp.up_proj.weight", w.data, "gaussian").double()

    u = zrng.z_for(5, 1, "model.layers.0.mlp.up_proj.weight", rows * 4, stream=U_STREAM).view(rows, 4).double()
    v = zrng.z_for(5, 0, "model.layers.0.mlp.up_proj.weight", cols * 4, stream=V_STREAM).view(cols, 4).double()
    assert torch.equal(z(1), u @ v.T)  # fp64 matmul of these values is exact too: the fp32 sums never rounded
    assert torch.linalg.matrix_rank(torch.cat([z(0), z(1)])).item() == 4  # records 0, 1 share V
    assert torch.linalg.matrix_rank(torch.cat([z(1), z(2)])).item() == 8  # record 2 draws a new V
    # the update moves along U Vᵀ / r; 1-D tensors move along dense z, as the dense engine moves them
    _forward_pair_leaves_weights(model, trainable, engine, 1)
    dense_model, dense_set, dense = _engine(Directions())
    before = w.detach().clone()
    c = update_scale(1e-2, 1.0)  # an fp32 value, as every c is
    engine.apply_update(1, c)
    dense.apply_update(1, c)
    expected = (before.double() - c * z(1) / 4).float()  # c·z/4 is exact in fp64: one rounding, then to fp32
    assert torch.equal(w.data, expected)
    for name, p, q in zip(trainable.names, trainable.params, dense_set.params):
        assert torch.equal(p, q) == (p.dim() == 1), name


# ---- bad values ----------------------------------------------------------------------------------------------------

def test_bad_direction_settings_are_named_at_once():
    with pytest.raises(RecipeError) as info:
        parse_recipe(BASE_RECIPE, "x.toml", check_files=False, overrides=[
            "mezo.direction_type=sparse", "mezo.sparse_fraction=0", "mezo.layer_fraction=1.5",
            "mezo.lowrank_rank=3", "mezo.lowrank_v_every=0", "mezo.layer_count=-1", "mezo.rounding=stochastic",
            "mezo.sparse_mask=largest"])
    assert str(info.value) == "\n".join([
        "recipe x.toml has 7 problems:",
        '  mezo.rounding: "stochastic" is not available with direction_type = "sparse" (its z is formed outside the '
        'fused kernels); use "nearest", or dense or layerwise directions',
        "  mezo.layer_fraction: must be <= 1 (got 1.5)",
        "  mezo.layer_count: must be >= 0 (got -1)",
        '  mezo.sparse_mask: must be one of magnitude, random (got "largest")',
        "  mezo.sparse_fraction: must be > 0 (got 0)",
        "  mezo.lowrank_rank: must be one of 1, 2, 4, 8, 16 (got 3)",
        "  mezo.lowrank_v_every: must be > 0 (got 0)",
    ])
    with pytest.raises(RecipeError, match=r'mezo.direction_type: must be one of dense, layerwise, sparse, lowrank '
                                          r'\(got "svd"\)'):
        parse_recipe(BASE_RECIPE, "x.toml", check_files=False, overrides=["mezo.direction_type=svd"])


def test_a_layer_count_above_the_trainable_set_is_refused_naming_the_key(tmp_path, tiny_model_dirs):
    recipe = recipe_file(tmp_path, tiny_model_dirs(), mezo={"direction_type": "layerwise", "layer_count": 21})
    result = train_cli(recipe, ok=False)
    assert result.exit_code == 1
    assert result.output == ("error: [mezo] mezo.layer_count = 21 but the trainable set has 20 tensors: lower it, "
                             "or give a layer_fraction instead\n")
    assert not (tmp_path / "runs/x/trajectory.mezo").exists()


@pytest.mark.parametrize("sets", [["mezo.direction_type=lowrank", "mezo.lowrank_v_every=2"],
                                  ["mezo.direction_type=sparse"]], ids=["lowrank", "sparse-magnitude"])
def test_formed_directions_replay_bit_equal_in_bfloat16(tmp_path, tiny_model_dirs, lm_files, sets):
    # bf16 storage: the formed perturbation and update round to bf16 exactly as the dense kernels do
    train, _ = lm_files
    recipe = write_recipe(tmp_path / "r.toml", tiny_model_dirs("llama", "bfloat16"), train, out=tmp_path / "run",
                          dtype="bfloat16", steps=4, lr=1e-2)
    train_cli(recipe, *[a for s in sets for a in ("--set", s)])
    cli("replay", tmp_path / "run/trajectory.mezo", "--out", tmp_path / "rep", "--verify", "-q")
    assert_same_weights(tmp_path / "run/final/model.safetensors", tmp_path / "rep/model.safetensors")
    start = build_model("llama", torch.bfloat16)
    trained = load_file(tmp_path / "run/final/model.safetensors")
    assert not torch.equal(trained["model.layers.0.mlp.up_proj.weight"],
                           start.state_dict()["model.layers.0.mlp.up_proj.weight"])  # it moved
