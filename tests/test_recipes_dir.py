"""Every ready recipe in recipes/ is a valid recipe (its data files may not exist yet: they are built by commands)."""

from pathlib import Path

import pytest

from mezo_tune.recipe import parse_recipe

RECIPES = sorted((Path(__file__).resolve().parents[1] / "recipes").glob("*.toml"))


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: p.name)
def test_ready_recipe_is_valid(path):
    parse_recipe(path.read_text(), str(path), check_files=False)


def test_there_are_recipes():
    assert {"demo.toml", "rt-mezo-full.toml", "rt-mezo-lora.toml", "rt-mezo-prefix.toml", "debates-mezo.toml",
            "rt-backprop.toml"} <= {p.name for p in RECIPES}
