"""`python -m mezo_tune`: the command line, as torchrun launches it (`torchrun ... -m mezo_tune train recipe.toml`)."""

from .cli import main

main(prog_name="mezo-tune")
