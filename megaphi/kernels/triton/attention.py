"""Triton rotary attention: the reference's rotary_attention contract, flash-attention-2 style, rotary fused in.

Forward (attention_fwd.py): K is rotated once by a pre-pass (ROTARY_K = "prepass"; "inloop" rotates each K block as
the attention kernel loads it), Q in the kernel's prologue; the rotated q and k are what the backward keeps, in place
of the un-rotated ones. Backward (attention_bwd.py): delta, a dK/dV kernel and a dQ kernel; dQ and dK are un-rotated
in the epilogues (UNROTATE = "epilogue"; "postpass" uses the rotary kernel afterwards). The two module settings exist
to be timed against each other on a GPU (benchmarks/kernels.py).
"""

import torch

from megaphi.kernels import reference
from megaphi.kernels.triton.attention_bwd import attention_backward
from megaphi.kernels.triton.attention_fwd import attention_forward
from megaphi.kernels.autocast import autocast_inputs
from megaphi.kernels.triton.rotary import apply_rotary, rotary_unsupported, rotate

__all__ = ["rotary_attention", "unsupported_reason", "rotary_unsupported", "attention_forward", "attention_backward",
           "apply_rotary", "ROTARY_K", "UNROTATE"]

ROTARY_K = "prepass"   # or "inloop"
UNROTATE = "epilogue"  # or "postpass"


def unsupported_reason(q, k, v, rotary_dim, dropout_p=0.0):
    """Why the Triton kernel would hand this call to the reference, or None when the kernel runs it."""
    if dropout_p > 0.0:
        return f"dropout_p {dropout_p} (the kernel has no dropout)"
    if not (q.dtype == k.dtype == v.dtype):
        return f"mixed dtypes q {q.dtype}, k {k.dtype}, v {v.dtype}"
    return rotary_unsupported(q, rotary_dim)


def _last_dim_contiguous(x):
    return x if x.stride(-1) == 1 else x.contiguous()


class _RotaryAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, rotary_dim, base, causal):
        q, k, v = (_last_dim_contiguous(x) for x in (q, k, v))
        cos, sin = reference.rotary_tables(q.shape[1], rotary_dim, base, q.device, q.dtype)
        save = any(ctx.needs_input_grad[:3])
        o, lse, q_rot, k_rot = attention_forward(q, k, v, cos, sin, causal, rotate_k=ROTARY_K, save_rotated=save)
        if save:
            # "inloop" never materialized k_rot: keep k and rotate it when the backward runs.
            ctx.k_is_rotated = k_rot is not None
            ctx.save_for_backward(q_rot, k_rot if k_rot is not None else k, v, o, lse, cos, sin)
            ctx.causal = causal
        return o

    @staticmethod
    def backward(ctx, do):
        q_rot, k_rot, v, o, lse, cos, sin = ctx.saved_tensors
        if not ctx.k_is_rotated:
            k_rot = rotate(k_rot, cos, sin)
        dq, dk, dv = attention_backward(_last_dim_contiguous(do), q_rot, k_rot, v, o, lse, cos, sin, ctx.causal,
                                        unrotate=UNROTATE)
        return dq, dk, dv, None, None, None


def rotary_attention(q, k, v, rotary_dim, base=10000.0, causal=True, dropout_p=0.0):
    """SDPA(rotate(q), rotate(k), v), scale 1/sqrt(head_dim); q, k, v (batch, seq, heads, head_dim), not yet rotated.

    Differentiable in q, k, v; inside autocast, computed in the autocast dtype. The fused kernel runs fp16/bf16/fp32
    with head_dim a power of two in [16, 256] and rotary_dim a power of two <= head_dim, on CUDA (or CPU under
    TRITON_INTERPRET=1); anything else (dropout_p > 0, other head/rotary dims, dtypes or devices, bf16 under the
    interpreter) falls back to the reference (see unsupported_reason).
    """
    if q.dim() != 4 or q.shape != k.shape or q.shape != v.shape:
        raise ValueError("rotary_attention: q, k, v must share one (batch, seq, heads, head_dim) shape, got "
                         f"{tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}")
    q, k, v = autocast_inputs(q, k, v)  # SDPA computes in the autocast dtype; a custom Function is not cast
    if unsupported_reason(q, k, v, rotary_dim, dropout_p) is not None:
        return reference.rotary_attention(q, k, v, rotary_dim, base, causal, dropout_p)
    return _RotaryAttention.apply(q, k, v, rotary_dim, base, causal)
