"""The phi model: configuration, presets, the module itself and its FLOP count."""

from megaphi.model.config import PRESETS, ModelConfig, get_preset, num_parameters, padded_vocab_size
from megaphi.model.flops import flops_per_token, peak_tflops
from megaphi.model.phi import KVCache, PhiForCausalLM

__all__ = ["PRESETS", "KVCache", "ModelConfig", "PhiForCausalLM", "flops_per_token", "get_preset",
           "num_parameters", "padded_vocab_size", "peak_tflops"]
