"""mezo-tune: fine-tune causal LMs with MeZO, and replay any run bit for bit from its trajectory."""

__version__ = "0.1.0"
