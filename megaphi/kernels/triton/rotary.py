"""Triton rotate-half RoPE (phi's partial rotary): tile helpers the attention kernels share, and a pre-pass kernel.

Tables are the reference's `rotary_tables` (fp32 math, cast to the input dtype), so both backends rotate by the same
cos/sin values: cos, sin of shape (positions, rotary_dim // 2), contiguous. Dim i < rotary_dim/2 pairs with
i + rotary_dim/2; dims >= rotary_dim pass through. The rotation is orthogonal, so its backward is the same kernel with
sin negated (CONJ).
"""

import torch
import triton
import triton.language as tl

from megaphi.kernels import reference
from megaphi.kernels.triton.common import INTERPRET


@triton.jit
def load_rotated(X, row_off, row_mask, pos, COS, SIN, HEAD_DIM: tl.constexpr, HALF: tl.constexpr,
                 CONJ: tl.constexpr):
    """Rows X[row_off + 0..HEAD_DIM) rotated at positions pos, fp32 (rows, HEAD_DIM); masked rows read as 0."""
    d = tl.arange(0, HEAD_DIM)
    in_rot = d < 2 * HALF
    partner = tl.where(d < HALF, d + HALF, d - HALF)
    x = tl.load(X + row_off[:, None] + d[None, :], mask=row_mask[:, None], other=0.0).to(tl.float32)
    xp = tl.load(X + row_off[:, None] + partner[None, :], mask=row_mask[:, None] & in_rot[None, :],
                 other=0.0).to(tl.float32)
    # cos = 1, sin = 0 on the pass-through dims and masked rows.
    idx = pos[:, None] * HALF + (d % HALF)[None, :]
    tab_mask = row_mask[:, None] & in_rot[None, :]
    cos = tl.load(COS + idx, mask=tab_mask, other=1.0).to(tl.float32)
    sin = tl.load(SIN + idx, mask=tab_mask, other=0.0).to(tl.float32)
    # rot(x)[i] = x[i] cos - x[i + half] sin; rot(x)[i + half] = x[i + half] cos + x[i] sin.
    first = (d < HALF)[None, :]
    if CONJ:
        sin = tl.where(first, sin, -sin)
    else:
        sin = tl.where(first, -sin, sin)
    return x * cos + xp * sin


@triton.jit
def rotate_tile(x, COS, SIN, pos, pos_mask, BLOCK: tl.constexpr, HEAD_DIM: tl.constexpr, HALF: tl.constexpr,
                CHUNKS: tl.constexpr, CONJ: tl.constexpr):
    """Rotate a register tile x (BLOCK, HEAD_DIM) fp32 at positions pos; CHUNKS = HEAD_DIM // rotary_dim.

    The partner of a dim lives in another thread's registers, so the tile is split into its rotate-half pairs with
    reshape/permute/split (a layout shuffle, once per tile) instead of a second load from memory.
    """
    idx = pos[:, None] * HALF + tl.arange(0, HALF)[None, :]
    cos = tl.load(COS + idx, mask=pos_mask[:, None], other=1.0).to(tl.float32)
    sin = tl.load(SIN + idx, mask=pos_mask[:, None], other=0.0).to(tl.float32)
    if CONJ:
        sin = -sin
    # Chunk c holds dims [c*rotary_dim, (c+1)*rotary_dim); only chunk 0 rotates.
    first = (tl.arange(0, CHUNKS) == 0)[None, :, None]
    cos = tl.where(first, cos[:, None, :], 1.0)
    sin = tl.where(first, sin[:, None, :], 0.0)
    pairs = tl.permute(tl.reshape(x, (BLOCK, CHUNKS, 2, HALF)), (0, 1, 3, 2))
    a, b = tl.split(pairs)
    y = tl.join(a * cos - b * sin, b * cos + a * sin)
    return tl.reshape(tl.permute(y, (0, 1, 3, 2)), (BLOCK, HEAD_DIM))


@triton.jit
def _rotary_kernel(X, OUT, COS, SIN, n_rows, seq, heads, pos_offset,
                   stride_xb, stride_xs, stride_xh, stride_ob, stride_os, stride_oh,
                   HEAD_DIM: tl.constexpr, HALF: tl.constexpr, CONJ: tl.constexpr, BLOCK_ROWS: tl.constexpr):
    # One program rotates BLOCK_ROWS rows of (batch, seq, heads); row = (b * seq + s) * heads + h.
    rows = (tl.program_id(0) * BLOCK_ROWS + tl.arange(0, BLOCK_ROWS)).to(tl.int64)
    mask = rows < n_rows
    h = rows % heads
    s = (rows // heads) % seq
    b = rows // (heads * seq)
    y = load_rotated(X, b * stride_xb + s * stride_xs + h * stride_xh, mask, s + pos_offset, COS, SIN,
                     HEAD_DIM, HALF, CONJ)
    out_off = b * stride_ob + s * stride_os + h * stride_oh
    d = tl.arange(0, HEAD_DIM)
    tl.store(OUT + out_off[:, None] + d[None, :], y.to(OUT.dtype.element_ty), mask=mask[:, None])


def rotate(x, cos, sin, position_offset=0, conjugate=False, out=None):
    """x (batch, seq, heads, head_dim) rotated at positions offset.. by cos/sin (positions, rotary_dim/2).

    conjugate: the inverse rotation (the backward). out: where to write (may be x itself); default a new tensor.
    Needs head_dim and rotary_dim powers of two and x.stride(-1) == 1.
    """
    batch, seq, heads, head_dim = x.shape
    out = torch.empty_like(x, memory_format=torch.contiguous_format) if out is None else out
    rows = batch * seq * heads
    if rows == 0:
        return out
    block_rows = 16 if INTERPRET else max(1, 4096 // head_dim)
    _rotary_kernel[(triton.cdiv(rows, block_rows),)](
        x, out, cos, sin, rows, seq, heads, position_offset,
        x.stride(0), x.stride(1), x.stride(2), out.stride(0), out.stride(1), out.stride(2),
        HEAD_DIM=head_dim, HALF=cos.shape[1], CONJ=conjugate, BLOCK_ROWS=block_rows, num_warps=4)
    return out


def _pow2(n):
    return n > 0 and n & (n - 1) == 0


def rotary_unsupported(x, rotary_dim):
    """Why the Triton rotary cannot take x (batch, seq, heads, head_dim) and rotary_dim, or None when it can."""
    if x.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        return f"dtype {x.dtype} (supported: float16, bfloat16, float32)"
    if x.device.type != "cuda" and not INTERPRET:
        return f"device {x.device.type} (Triton kernels run on CUDA, or on CPU with TRITON_INTERPRET=1)"
    if INTERPRET and x.dtype == torch.bfloat16:
        return "bfloat16 under TRITON_INTERPRET (the interpreter computes it wrongly)"
    head_dim = x.shape[-1]
    if not _pow2(head_dim) or not 16 <= head_dim <= 256:
        return f"head_dim {head_dim} (supported: powers of two from 16 to 256)"
    if not _pow2(rotary_dim) or not 2 <= rotary_dim <= head_dim:
        return f"rotary_dim {rotary_dim} (supported: powers of two from 2 to head_dim)"
    return None


class _ApplyRotary(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, rotary_dim, base, position_offset):
        cos, sin = reference.rotary_tables(position_offset + x.shape[1], rotary_dim, base, x.device, x.dtype)
        ctx.save_for_backward(cos, sin)
        ctx.position_offset = position_offset
        return rotate(x if x.stride(-1) == 1 else x.contiguous(), cos, sin, position_offset)

    @staticmethod
    def backward(ctx, grad):
        cos, sin = ctx.saved_tensors
        grad = grad if grad.stride(-1) == 1 else grad.contiguous()
        return rotate(grad, cos, sin, ctx.position_offset, conjugate=True), None, None, None


def apply_rotary(x, rotary_dim, base=10000.0, position_offset=0):
    """The reference's apply_rotary in one Triton pass (differentiable); unsupported shapes use the reference."""
    if x.dim() != 4:
        raise ValueError(f"apply_rotary: x must be (batch, seq, heads, head_dim), got shape {tuple(x.shape)}")
    if rotary_unsupported(x, rotary_dim) is not None:
        return reference.apply_rotary(x, rotary_dim, base, position_offset)
    return _ApplyRotary.apply(x, rotary_dim, base, position_offset)
