"""Checks a converted folder: transformers' PhiForCausalLM (fp32) against megaphi's model on the same weights."""

from pathlib import Path

import torch

from megaphi.model import ModelConfig, PhiForCausalLM

# Real code for the "real token ids" check (the model's own tokenizer encodes it).
VERIFY_TEXT = '''def fibonacci(n: int) -> list[int]:
    """Return the first n Fibonacci numbers."""
    result, a, b = [], 0, 1
    for _ in range(n):
        result.append(a)
        a, b = b, a + b
    return result


if __name__ == "__main__":
    print(fibonacci(10))
'''
TOLERANCE = 1e-4  # fp32: both compute the same ops in a different order


def reference_model(config: ModelConfig, state_dict: dict, dtype: torch.dtype = torch.float32) -> PhiForCausalLM:
    """megaphi's fp32 model with the weights rounded to the exported dtype (so only the conversion is compared)."""
    model = PhiForCausalLM(config)
    model.load_state_dict({k: v.to(dtype).float() for k, v in state_dict.items()})
    return model.eval()


@torch.no_grad()
def compare_logits(folder: str | Path, model: PhiForCausalLM, token_ids: dict[str, torch.Tensor]) -> dict[str, float]:
    """Largest absolute logit difference per named batch of ids between the folder in transformers and model."""
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    return {name: (hf(ids).logits - model(ids)).abs().max().item() for name, ids in token_ids.items()}


def verification_ids(config: ModelConfig, tokenizer, seed: int = 0) -> dict[str, torch.Tensor]:
    """Random ids (2 rows) over the tokenizer's vocabulary and the ids of VERIFY_TEXT, within the model's length."""
    length = min(config.max_position_embeddings, 64)
    vocab = tokenizer.vocab_size if tokenizer is not None else config.vocab_size
    ids = {"random": torch.randint(0, vocab, (2, length), generator=torch.Generator().manual_seed(seed))}
    if tokenizer is not None:
        ids["real"] = torch.tensor([tokenizer.encode(VERIFY_TEXT)[:config.max_position_embeddings]])
    return ids


def verify(folder: str | Path, config: ModelConfig, state_dict: dict, tokenizer, dtype: torch.dtype = torch.float32,
           tolerance: float = TOLERANCE) -> tuple[bool, dict[str, float]]:
    """(every difference within tolerance, the differences) for a folder converted from state_dict."""
    diffs = compare_logits(folder, reference_model(config, state_dict, dtype), verification_ids(config, tokenizer))
    return all(d <= tolerance for d in diffs.values()), diffs
