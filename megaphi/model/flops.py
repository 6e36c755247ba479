"""Model FLOPs per token, counted as Megatron does, and peak bf16 throughput of known GPUs, for MFU.

Forward matmul FLOPs per token (2 per multiply-add), with h = hidden, f = ffn hidden, s = seq, V = padded vocab:
    q, k, v, dense projections   8 h^2
    fc1, fc2                      4 h f
    q @ k^T and probs @ v         4 s h     (the full s x s square, as Megatron counts it, although causal)
    LM head                       2 h V
so forward = L (8 h^2 + 4 h f + 4 s h) + 2 h V, and training (forward + backward, which costs two forwards) is 3x.
With f = 4h this is Megatron's 72 b s L h^2 (1 + s/(6h) + V/(12 L h)) divided by the b s tokens. Recomputed
activations are not counted (model FLOPs, not hardware FLOPs); norms, softmax, GELU and rotary are negligible.
"""

# Dense bf16 tensor-core peak in TFLOP/s (vendor datasheets, no sparsity). Matched against
# torch.cuda.get_device_name() in order, so the more specific names come first.
PEAK_BF16_TFLOPS = [
    ("H100 PCIe", 756.0),
    ("H100 NVL", 835.0),
    ("H100", 989.0),  # SXM5 ("NVIDIA H100 80GB HBM3")
    ("H800", 989.0),
    ("H200", 989.0),
    ("A100", 312.0),
    ("A800", 312.0),
    ("L40S", 362.0),
    ("L40", 181.0),
    ("A10G", 70.0),
    ("L4", 121.0),
]


def flops_per_token(config, seq_len: int | None = None, training: bool = True) -> int:
    """Model FLOPs per token at seq_len (default: the model's max positions); training counts the backward too."""
    s = config.max_position_embeddings if seq_len is None else seq_len
    h, f, v, layers = config.hidden_size, config.ffn_hidden_size, config.padded_vocab_size, config.num_layers
    forward = layers * (8 * h * h + 4 * h * f + 4 * s * h) + 2 * h * v
    return 3 * forward if training else forward


def peak_tflops(device_name: str) -> float | None:
    """Dense bf16 peak TFLOP/s of a GPU named like torch.cuda.get_device_name(), or None when unknown."""
    for key, tflops in PEAK_BF16_TFLOPS:
        if key.lower() in device_name.lower():
            return tflops
    return None
