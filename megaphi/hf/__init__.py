"""HuggingFace interop: megaphi checkpoints <-> transformers PhiForCausalLM folders, tokenizers, and loading.

    convert_to_hf(load, output, dtype="fp32", max_shard_size="5GB")   # tools/convert_to_hf.py
    convert_from_hf(hf, save, tensor_parallel_size=1)                  # tools/convert_from_hf.py
    load_hf_model(folder) -> PhiForCausalLM                            # HF (or old phi-1) weights in megaphi's model
    load_model_and_tokenizer(load=... | hf=...) -> (model, tokenizer)  # tools/generate.py, tools/serve.py
"""

from megaphi.hf.config import hf_config, model_config_from_hf
from megaphi.hf.convert import (checkpoint_tokenizer, convert_from_hf, convert_to_hf, load_hf_model, read_hf_folder,
                                read_weights_checkpoint, save_weights_checkpoint)
from megaphi.hf.loading import load_model_and_tokenizer
from megaphi.hf.tokenizer import export_tokenizer, load_hf_tokenizer, sentencepiece_to_tokenizers
from megaphi.hf.weights import from_hf_state_dict, load_weights, save_safetensors, to_hf_state_dict, to_old_state_dict

__all__ = ["hf_config", "model_config_from_hf", "checkpoint_tokenizer", "convert_from_hf", "convert_to_hf",
           "load_hf_model", "read_hf_folder", "read_weights_checkpoint", "save_weights_checkpoint",
           "load_model_and_tokenizer", "export_tokenizer", "load_hf_tokenizer", "sentencepiece_to_tokenizers",
           "from_hf_state_dict", "load_weights", "save_safetensors", "to_hf_state_dict", "to_old_state_dict"]
