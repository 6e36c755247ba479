"""A model and its tokenizer for generation, from a megaphi checkpoint (--load) or an HF folder (--hf)."""

from pathlib import Path

import torch

from megaphi.data.tokenizer import Tokenizer, build_tokenizer
from megaphi.hf.convert import TORCH_DTYPES, find_checkpoint_path, load_hf_model, resolve_tokenizer
from megaphi.hf.tokenizer import load_hf_tokenizer
from megaphi.model import PhiForCausalLM
from megaphi.train import checkpoint as ckpt


def default_device() -> str:
    """cuda when a GPU is visible, else cpu."""
    return "cuda" if torch.cuda.is_available() else "cpu"


def check_device(device: str) -> str:
    """device as given, or a ValueError naming --device when this machine does not have it."""
    try:
        kind = torch.device(device).type
    except RuntimeError as e:
        raise ValueError(f"--device {device!r}: {e}") from None
    if kind == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {device}: no CUDA GPU is visible here (torch {torch.__version__}); use cpu")
    return device


def load_model_and_tokenizer(load: str | Path | None = None, hf: str | Path | None = None,
                             iteration: int | None = None, device: str | None = None, dtype: str = "fp32",
                             tokenizer_type: str | None = None,
                             tokenizer_model: str | None = None) -> tuple[PhiForCausalLM, Tokenizer]:
    """megaphi's eval-mode model and tokenizer from exactly one of load (checkpoint) and hf (folder)."""
    if (load is None) == (hf is None):
        raise ValueError("give exactly one of --load (a megaphi checkpoint) and --hf (a HuggingFace folder)")
    if dtype not in TORCH_DTYPES:
        raise ValueError(f"--dtype must be one of {sorted(TORCH_DTYPES)}, got {dtype!r}")
    device = check_device(device or default_device())
    if load is not None:
        path = find_checkpoint_path(load, iteration)
        tok_type, tok_model = resolve_tokenizer(ckpt.read_meta(path), tokenizer_type, tokenizer_model,
                                                f"checkpoint {path}")
        tokenizer = build_tokenizer(tok_type, tok_model)
        model = ckpt.load_model(path, device=device)
    else:
        if not Path(hf).is_dir():
            raise ValueError(f"--hf {hf}: no such folder")
        if tokenizer_type is not None or tokenizer_model is not None:
            tok_type, tok_model = resolve_tokenizer({}, tokenizer_type, tokenizer_model, f"--hf {hf}")
            tokenizer = build_tokenizer(tok_type, tok_model)
        else:
            tokenizer = load_hf_tokenizer(hf)
            if tokenizer is None:
                raise ValueError(f"--hf {hf} has no tokenizer.model or tokenizer.json: pass --tokenizer-type and "
                                 f"--tokenizer-model")
        model = load_hf_model(hf, device=device)
    if tokenizer.vocab_size > model.config.padded_vocab_size:
        raise ValueError(f"the tokenizer has {tokenizer.vocab_size} tokens, more than the model's "
                         f"{model.config.padded_vocab_size} embedding rows: wrong --tokenizer-model?")
    return model.to(TORCH_DTYPES[dtype]).eval(), tokenizer
