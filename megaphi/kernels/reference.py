"""Plain-PyTorch reference ops: the ground truth that fused backends are tested against.

Every tensor in attention ops is laid out (batch, seq, heads, head_dim), the layout the q/k/v projections produce.
"""

import math

import torch
import torch.nn.functional as F

# (device, dtype, rotary_dim, base) -> (cos, sin), each (positions, rotary_dim // 2); grown on demand.
_ROTARY_TABLES: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = {}


def rotary_tables(length, rotary_dim, base, device, dtype):
    """cos and sin of position * inv_freq for positions 0..length-1, each (length, rotary_dim // 2)."""
    key = (torch.device(device), dtype, rotary_dim, float(base))
    cached = _ROTARY_TABLES.get(key)
    if cached is None or cached[0].shape[0] < length:
        # Grow to a power of two so decoding one token at a time does not rebuild the table every step.
        size = max(2 ** math.ceil(math.log2(max(length, 1))), 256)
        # Outside inference mode, so a table first built while generating can later be used in training.
        with torch.inference_mode(False), torch.no_grad():
            # Computed in fp32 exactly as HF's PhiRotaryEmbedding does, then cast, so the fp32 numerics are identical.
            inv_freq = 1.0 / (base ** (torch.arange(0, rotary_dim, 2, dtype=torch.float32, device=device) / rotary_dim))
            freqs = torch.arange(size, dtype=torch.float32, device=device)[:, None] * inv_freq[None, :]
            cached = (freqs.cos().to(dtype), freqs.sin().to(dtype))
        _ROTARY_TABLES[key] = cached
    return cached[0][:length], cached[1][:length]


def apply_rotary(x, rotary_dim, base=10000.0, position_offset=0):
    """Rotate-half RoPE on the first rotary_dim dims of x (batch, seq, heads, head_dim) at positions offset.."""
    seq = x.shape[1]
    cos, sin = rotary_tables(position_offset + seq, rotary_dim, base, x.device, x.dtype)
    cos = cos[position_offset:, None, :]  # (seq, 1, rotary_dim/2): broadcasts over batch and heads
    sin = sin[position_offset:, None, :]
    half = rotary_dim // 2
    x1, x2, rest = x[..., :half], x[..., half:rotary_dim], x[..., rotary_dim:]
    return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin, rest), dim=-1)


def attention(q, k, v, causal=True, dropout_p=0.0):
    """SDPA (scale 1/sqrt(head_dim)) of already-rotated q (b, sq, h, d) over k, v (b, sk, h, d); sk >= sq.

    With causal and sk > sq, the queries are the last sq positions (KV-cache decoding): the mask is bottom-right
    aligned, not SDPA's top-left is_causal.
    """
    sq, sk = q.shape[1], k.shape[1]
    mask, is_causal = None, False
    if causal and sq == sk:
        is_causal = True
    elif causal and sq > 1:
        mask = torch.ones(sq, sk, dtype=torch.bool, device=q.device).tril(diagonal=sk - sq)
    out = F.scaled_dot_product_attention(
        q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
        attn_mask=mask, dropout_p=dropout_p, is_causal=is_causal,
    )
    return out.transpose(1, 2)


def rotary_attention(q, k, v, rotary_dim, base=10000.0, causal=True, dropout_p=0.0):
    """Attention over q, k rotated at positions 0..seq-1; q, k, v (batch, seq, heads, head_dim), not yet rotated."""
    return attention(apply_rotary(q, rotary_dim, base), apply_rotary(k, rotary_dim, base), v, causal, dropout_p)


def layer_norm(x, weight, bias, eps=1e-5, residual=None):
    """LayerNorm over the last dim; with residual (tensor or tuple): (LayerNorm(s), s), s = x + sum(residual)."""
    if residual is None:
        return F.layer_norm(x, x.shape[-1:], weight, bias, eps)
    if isinstance(residual, torch.Tensor):
        residual = (residual,)
    for r in residual:
        x = x + r
    return F.layer_norm(x, x.shape[-1:], weight, bias, eps), x


def gelu_tanh(x):
    """GELU with the tanh approximation (HF's gelu_new)."""
    return F.gelu(x, approximate="tanh")


def mlp(x, w1, b1, w2, b2):
    """gelu_tanh(x @ w1.T + b1) @ w2.T + b2."""
    return F.linear(gelu_tanh(F.linear(x, w1, b1)), w2, b2)


def linear_cross_entropy(hidden, weight, bias, labels, ignore_index=-100, reduction="mean", process_group=None):
    """Cross entropy of logits = hidden @ weight.T + bias (computed in fp32) against labels; hidden (..., h)."""
    if process_group is not None and torch.distributed.get_world_size(process_group) > 1:
        raise NotImplementedError("the reference linear_cross_entropy does not take a vocab-sharded weight yet")
    logits = F.linear(hidden.reshape(-1, hidden.shape[-1]), weight, bias).float()
    loss = F.cross_entropy(logits, labels.reshape(-1), ignore_index=ignore_index, reduction=reduction)
    return loss.view(labels.shape) if reduction == "none" else loss
