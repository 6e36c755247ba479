"""Data: Megatron-compatible indexed datasets, tokenizers, preprocessing and GPT training samples."""
