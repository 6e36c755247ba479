"""megaphi: a Megatron-style GPT trainer that reproduces the phi-1 recipe."""

__version__ = "0.1.0"
