"""phi's partial rotate-half rotary on CUDA (csrc/cuda/rotary.cu), and rotary attention built on it.

One kernel reads q and k (and v) through their strides, so they can be views of the fused QKV projection
(batch, seq, 3 * heads * head_dim), laid out [q | k | v], and writes each rotated as a contiguous
(batch, seq, heads, head_dim) tensor, the layout the attention kernels take; its backward un-rotates the gradients
(rotary_qkv: packed back into one dQKV). Tables are the reference's `rotary_tables` (fp32 math cast to the input dtype),
the rotation is computed in fp32. rotary_attention is this kernel followed by torch's SDPA (flash attention for
fp16/bf16 on sm80+), which also takes dropout.
"""

import torch

from megaphi.kernels import reference
from megaphi.kernels.cuda._ext import dtype_code, ext, ptr, stream
from megaphi.kernels.autocast import autocast_inputs, compute_dtype
from megaphi.kernels.cuda.mlp import check_cuda

__all__ = ["apply_rotary", "rotary_attention", "rotary_qkv", "rotary_unsupported", "supports_apply_rotary",
           "supports_rotary_attention", "MAX_HEAD_DIM"]

MAX_HEAD_DIM = 1024  # a block holds the vectors of at least one row (csrc/cuda/rotary.h)
_FLOAT = (torch.float16, torch.bfloat16, torch.float32)


def rotary_unsupported(x, rotary_dim):
    """Why the CUDA kernel hands x (..., head_dim) with this rotary_dim to the reference, or None."""
    if x.dtype not in _FLOAT:
        return f"dtype {x.dtype} (supported: float16, bfloat16, float32)"
    head_dim = x.shape[-1]
    if head_dim > MAX_HEAD_DIM:
        return f"head_dim {head_dim} (at most {MAX_HEAD_DIM})"
    if rotary_dim % 2 or not 2 <= rotary_dim <= head_dim:
        return f"rotary_dim {rotary_dim} (must be even and in [2, head_dim {head_dim}])"
    return None


def supports_apply_rotary(x, rotary_dim, base=10000.0, position_offset=0):
    """Whether backend=None should run apply_rotary here: elementwise, so any float dtype the kernel takes."""
    return x.is_cuda and x.dim() == 4 and position_offset >= 0 and rotary_unsupported(x, rotary_dim) is None


def supports_rotary_attention(q, k, v, rotary_dim, base=10000.0, causal=True, dropout_p=0.0):
    """Whether backend=None should run rotary_attention here: fp16/bf16 (flash SDPA's ground), one shape."""
    return (q.is_cuda and q.dim() == 4 and q.shape == k.shape == v.shape and q.dtype == k.dtype == v.dtype
            and compute_dtype(q) in (torch.float16, torch.bfloat16) and rotary_unsupported(q, rotary_dim) is None)


def _unit_last(t):
    return t if t.stride(-1) == 1 else t.contiguous()


def _launch(inputs, outputs, rotate_count, cos, sin, rotary_dim, offset, conjugate):
    """outputs[i] = inputs[i] rotated (i < rotate_count) or copied; all (batch, seq, heads, head_dim), unit stride."""
    batch, seq, heads, head_dim = inputs[0].shape
    device = inputs[0].device
    with torch.cuda.device(device):
        ext.rotary(dtype_code(inputs[0]), [t.data_ptr() for t in inputs], [t.data_ptr() for t in outputs],
                   [t.stride()[:3] for t in inputs], [t.stride()[:3] for t in outputs], rotate_count, ptr(cos),
                   ptr(sin), batch, seq, heads, head_dim, rotary_dim, offset, conjugate, stream(device))


class _Rotate(torch.autograd.Function):
    """Each of up to three (batch, seq, heads, head_dim) tensors rotated, in one launch; a tuple when several."""

    @staticmethod
    def forward(ctx, rotary_dim, base, offset, *xs):
        xs = [_unit_last(x) for x in xs]
        cos, sin = reference.rotary_tables(offset + xs[0].shape[1], rotary_dim, base, xs[0].device, xs[0].dtype)
        outs = [torch.empty(x.shape, dtype=x.dtype, device=x.device) for x in xs]
        _launch(xs, outs, len(xs), cos, sin, rotary_dim, offset, False)
        ctx.save_for_backward(cos, sin)
        ctx.rotary_dim, ctx.offset = rotary_dim, offset
        return tuple(outs) if len(outs) > 1 else outs[0]

    @staticmethod
    def backward(ctx, *grads):
        cos, sin = ctx.saved_tensors
        grads = [_unit_last(g) for g in grads]
        dxs = [torch.empty(g.shape, dtype=g.dtype, device=g.device) for g in grads]
        _launch(grads, dxs, len(grads), cos, sin, ctx.rotary_dim, ctx.offset, True)
        return (None, None, None, *dxs)


def _split_qkv(qkv, num_heads):
    """q, k, v views (batch, seq, heads, head_dim) of a [q | k | v] packed qkv (batch, seq, 3 * heads * head_dim)."""
    return qkv.unflatten(-1, (3, num_heads, qkv.shape[-1] // (3 * num_heads))).unbind(2)


class _RotaryQKV(torch.autograd.Function):
    """Packed qkv -> rotated q, k and copied v, each contiguous; backward: one packed dqkv."""

    @staticmethod
    def forward(ctx, qkv, num_heads, rotary_dim, base, offset):
        views = _split_qkv(_unit_last(qkv), num_heads)
        cos, sin = reference.rotary_tables(offset + qkv.shape[1], rotary_dim, base, qkv.device, qkv.dtype)
        outs = [torch.empty(v.shape, dtype=v.dtype, device=v.device) for v in views]
        _launch(views, outs, 2, cos, sin, rotary_dim, offset, False)
        ctx.save_for_backward(cos, sin)
        ctx.num_heads, ctx.rotary_dim, ctx.offset = num_heads, rotary_dim, offset
        return tuple(outs)

    @staticmethod
    def backward(ctx, dq, dk, dv):
        cos, sin = ctx.saved_tensors
        grads = [_unit_last(g) for g in (dq, dk, dv)]
        batch, seq, heads, head_dim = grads[0].shape
        dqkv = grads[0].new_empty(batch, seq, 3 * heads * head_dim)
        _launch(grads, _split_qkv(dqkv, heads), 2, cos, sin, ctx.rotary_dim, ctx.offset, True)
        return dqkv, None, None, None, None


def _check_position(op, position_offset):
    if position_offset < 0:
        raise ValueError(f"{op}: position_offset must be >= 0, got {position_offset}")


def apply_rotary(x, rotary_dim, base=10000.0, position_offset=0):
    """The reference's apply_rotary in one pass: x (batch, seq, heads, head_dim) at positions offset.. (differentiable).

    Inputs the kernel does not take (see rotary_unsupported) go to the reference.
    """
    if x.dim() != 4:
        raise ValueError(f"apply_rotary: x must be (batch, seq, heads, head_dim), got shape {tuple(x.shape)}")
    _check_position("apply_rotary", position_offset)
    check_cuda("apply_rotary", x)
    if rotary_unsupported(x, rotary_dim) is not None:
        return reference.apply_rotary(x, rotary_dim, base, position_offset)
    return _Rotate.apply(rotary_dim, base, position_offset, x)


def rotary_qkv(qkv, num_heads, rotary_dim, base=10000.0, position_offset=0):
    """Packed qkv (batch, seq, 3 * heads * head_dim), [q | k | v] -> contiguous rotate(q), rotate(k), v.

    Each output is (batch, seq, heads, head_dim); differentiable, the gradient comes back as one packed dqkv.
    """
    if qkv.dim() != 3 or num_heads < 1 or qkv.shape[-1] % (3 * num_heads):
        raise ValueError(f"rotary_qkv: qkv must be (batch, seq, 3 * heads * head_dim) with heads={num_heads}, got "
                         f"shape {tuple(qkv.shape)}")
    _check_position("rotary_qkv", position_offset)
    check_cuda("rotary_qkv", qkv)
    (qkv,) = autocast_inputs(qkv)
    if rotary_unsupported(qkv.unflatten(-1, (3 * num_heads, -1)), rotary_dim) is not None:
        q, k, v = _split_qkv(qkv, num_heads)
        return (reference.apply_rotary(q, rotary_dim, base, position_offset),
                reference.apply_rotary(k, rotary_dim, base, position_offset), v.contiguous())
    return _RotaryQKV.apply(qkv, num_heads, rotary_dim, base, position_offset)


def rotary_attention(q, k, v, rotary_dim, base=10000.0, causal=True, dropout_p=0.0):
    """SDPA(rotate(q), rotate(k), v), scale 1/sqrt(head_dim); q, k, v (batch, seq, heads, head_dim), not yet rotated.

    q and k are rotated by one launch of the CUDA kernel (they may be views of a packed QKV), then torch's SDPA
    runs; differentiable in q, k, v; inside autocast, computed in the autocast dtype.
    """
    if q.dim() != 4 or q.shape != k.shape or q.shape != v.shape:
        raise ValueError("rotary_attention: q, k, v must share one (batch, seq, heads, head_dim) shape, got "
                         f"{tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}")
    check_cuda("rotary_attention", q, k, v)
    q, k, v = autocast_inputs(q, k, v)
    if not (q.dtype == k.dtype == v.dtype) or rotary_unsupported(q, rotary_dim) is not None:
        return reference.rotary_attention(q, k, v, rotary_dim, base, causal, dropout_p)
    q, k = _Rotate.apply(rotary_dim, base, 0, q, k)
    return reference.attention(q, k, v, causal, dropout_p)
