"""LayerNorm with the parallel block's residual sum fused in: s = x + sum(residual) and LayerNorm(s) in one pass.

Shapes: every tensor is viewed as (rows, hidden) with rows = prod(leading dims); weight and bias (hidden,).
Statistics are fp32. The forward saves s, the row means and reciprocal standard deviations; the backward writes
one dx (the gradient of s: ds + LayerNorm'(dy)) that is also each residual's gradient, and reduces dweight/dbias in
two stages: each program sums its rows into one partial row, then torch sums the few partial rows.
"""

import torch
import triton
import triton.language as tl

from megaphi.kernels import reference
from megaphi.kernels.triton.common import INTERPRET, check_device

MAX_HIDDEN = 16384  # a row lives in registers; wider rows go to the reference


@triton.jit
def _layer_norm_fwd(X, R1, R2, W, B, Y, S, Mean, Rstd, stride_x, stride_r1, stride_r2, stride_y, stride_s, N, eps,
                    NUM_RES: tl.constexpr, HAS_W: tl.constexpr, HAS_B: tl.constexpr, BLOCK_N: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK_N)
    mask = cols < N
    s = tl.load(X + row * stride_x + cols, mask=mask, other=0.0).to(tl.float32)
    if NUM_RES >= 1:
        s += tl.load(R1 + row * stride_r1 + cols, mask=mask, other=0.0).to(tl.float32)
    if NUM_RES >= 2:
        s += tl.load(R2 + row * stride_r2 + cols, mask=mask, other=0.0).to(tl.float32)
    if NUM_RES >= 1:
        # Normalize the sum as stored, so the backward (which reads s back) sees the same numbers.
        s = s.to(S.dtype.element_ty)
        tl.store(S + row * stride_s + cols, s, mask=mask)
        s = s.to(tl.float32)
    mean = tl.sum(s, axis=0) / N
    d = tl.where(mask, s - mean, 0.0)
    rstd = 1.0 / tl.sqrt(tl.sum(d * d, axis=0) / N + eps)
    y = d * rstd
    if HAS_W:
        y = y * tl.load(W + cols, mask=mask, other=0.0).to(tl.float32)
    if HAS_B:
        y = y + tl.load(B + cols, mask=mask, other=0.0).to(tl.float32)
    tl.store(Y + row * stride_y + cols, y.to(Y.dtype.element_ty), mask=mask)
    tl.store(Mean + row, mean)
    tl.store(Rstd + row, rstd)


@triton.jit
def _layer_norm_bwd(DY, DS, S, W, Mean, Rstd, DX, DW, DB, stride_dy, stride_ds, stride_s, stride_dx, M, N,
                    rows_per_program, HAS_DS: tl.constexpr, HAS_W: tl.constexpr, COMPUTE_DW: tl.constexpr,
                    COMPUTE_DB: tl.constexpr, BLOCK_N: tl.constexpr):
    pid = tl.program_id(0)
    cols = tl.arange(0, BLOCK_N)
    mask = cols < N
    if HAS_W:
        w = tl.load(W + cols, mask=mask, other=0.0).to(tl.float32)
    dw = tl.zeros((BLOCK_N,), dtype=tl.float32)
    db = tl.zeros((BLOCK_N,), dtype=tl.float32)
    first = pid.to(tl.int64) * rows_per_program
    for i in range(0, tl.minimum(rows_per_program, M - pid * rows_per_program)):
        row = first + i
        s = tl.load(S + row * stride_s + cols, mask=mask, other=0.0).to(tl.float32)
        dy = tl.load(DY + row * stride_dy + cols, mask=mask, other=0.0).to(tl.float32)
        rstd = tl.load(Rstd + row)
        xhat = tl.where(mask, (s - tl.load(Mean + row)) * rstd, 0.0)
        wdy = dy
        if HAS_W:
            wdy = dy * w
        c1 = tl.sum(xhat * wdy, axis=0) / N
        c2 = tl.sum(wdy, axis=0) / N
        dx = (wdy - (xhat * c1 + c2)) * rstd
        if HAS_DS:
            dx += tl.load(DS + row * stride_ds + cols, mask=mask, other=0.0).to(tl.float32)
        tl.store(DX + row * stride_dx + cols, dx.to(DX.dtype.element_ty), mask=mask)
        if COMPUTE_DW:
            dw += dy * xhat
        if COMPUTE_DB:
            db += dy
    if COMPUTE_DW:
        tl.store(DW + pid * N + cols, dw, mask=mask)
    if COMPUTE_DB:
        tl.store(DB + pid * N + cols, db, mask=mask)


def _rows(t, n):
    """t as a (rows, n) view with unit column stride (a copy only when it has none)."""
    t = t.reshape(-1, n)
    return t if t.stride(1) == 1 else t.contiguous()


def _num_warps(block_n):
    return min(max(block_n // 256, 1), 8)


_SM_COUNT: dict[int, int] = {}


def _num_programs(device):
    """Programs of the backward: a few per SM, so each reduces many rows into its partial dweight row."""
    if INTERPRET or device.type != "cuda":
        return 4
    index = device.index if device.index is not None else torch.cuda.current_device()
    if index not in _SM_COUNT:
        _SM_COUNT[index] = torch.cuda.get_device_properties(index).multi_processor_count
    return 4 * _SM_COUNT[index]


def _promoted(*tensors):
    """The dtype of the sum of tensors."""
    dtype = tensors[0].dtype
    for t in tensors[1:]:
        dtype = torch.promote_types(dtype, t.dtype)
    return dtype


class _LayerNorm(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, eps, out_dtype, *residuals):
        n = x.shape[-1]
        x2 = _rows(x, n)
        res = [_rows(r, n) for r in residuals]
        sum_dtype = _promoted(x, *residuals)
        m = x2.shape[0]
        y = torch.empty((m, n), dtype=out_dtype, device=x.device)
        s = torch.empty((m, n), dtype=sum_dtype, device=x.device) if res else x2
        mean = torch.empty(m, dtype=torch.float32, device=x.device)
        rstd = torch.empty_like(mean)
        r1 = res[0] if res else x2
        r2 = res[1] if len(res) > 1 else x2
        block = triton.next_power_of_2(n)
        _layer_norm_fwd[(m,)](
            x2, r1, r2, weight, bias, y, s, mean, rstd, x2.stride(0), r1.stride(0), r2.stride(0), y.stride(0),
            s.stride(0), n, eps, NUM_RES=len(res), HAS_W=weight is not None, HAS_B=bias is not None,
            BLOCK_N=block, num_warps=_num_warps(block))
        ctx.save_for_backward(s, weight, mean, rstd)
        ctx.bias_dtype = bias.dtype if bias is not None else None
        ctx.input_dtypes = [x.dtype] + [r.dtype for r in residuals]
        y = y.view(x.shape)
        return (y, s.view(x.shape)) if res else y

    @staticmethod
    def backward(ctx, dy, ds=None):
        s, weight, mean, rstd = ctx.saved_tensors
        m, n = s.shape
        dy2 = _rows(dy, n)
        ds2 = _rows(ds, n) if ds is not None else dy2
        dx = torch.empty((m, n), dtype=s.dtype, device=s.device)
        compute_dw = weight is not None and ctx.needs_input_grad[1]
        compute_db = ctx.bias_dtype is not None and ctx.needs_input_grad[2]
        rows_per_program = triton.cdiv(m, min(m, _num_programs(s.device)))
        programs = triton.cdiv(m, rows_per_program)
        partial = torch.empty((2 if compute_db else 1, programs, n) if compute_dw or compute_db else (1, 1, 1),
                              dtype=torch.float32, device=s.device)
        block = triton.next_power_of_2(n)
        _layer_norm_bwd[(programs,)](
            dy2, ds2, s, weight if weight is not None else s, mean, rstd, dx, partial[0], partial[-1],
            dy2.stride(0), ds2.stride(0), s.stride(0), dx.stride(0), m, n, rows_per_program,
            HAS_DS=ds is not None, HAS_W=weight is not None, COMPUTE_DW=compute_dw, COMPUTE_DB=compute_db,
            BLOCK_N=block, num_warps=_num_warps(block))
        dw = partial[0].sum(0).to(weight.dtype) if compute_dw else None
        db = partial[-1].sum(0).to(ctx.bias_dtype) if compute_db else None
        dx = dx.view(dy.shape)
        # x and every residual get the same gradient, each in its own dtype.
        grads = [dx if dt == dx.dtype else dx.to(dt) for dt in ctx.input_dtypes]
        return grads[0], dw, db, None, None, *grads[1:]


def layer_norm(x, weight, bias, eps=1e-5, residual=None):
    """LayerNorm over the last dim; with residual (tensor or tuple): (LayerNorm(s), s), s = x + sum(residual).

    The sum is formed in fp32 and stored in the promoted dtype of x and the residuals; the normalized output has
    that dtype too, or the autocast dtype inside an autocast region (its consumers are matmuls that would cast it).
    """
    residuals = () if residual is None else (residual,) if isinstance(residual, torch.Tensor) else tuple(residual)
    if len(residuals) > 2:  # the kernel reads two residuals; fold the rest into the second
        residuals = (residuals[0], sum(residuals[2:], residuals[1]))
    check_device("layer_norm", x, weight, bias, *residuals)
    if x.numel() == 0:
        return reference.layer_norm(x, weight, bias, eps, residual)
    if x.shape[-1] > MAX_HIDDEN:
        raise ValueError(f"layer_norm: the triton kernel takes a hidden size up to {MAX_HIDDEN}, got "
                         f"{x.shape[-1]}; use backend='reference'")
    for r in residuals:
        if r.shape != x.shape:
            raise ValueError(f"layer_norm: residual of shape {tuple(r.shape)} does not match x {tuple(x.shape)}")
    out_dtype = _promoted(x, *residuals)
    if torch.is_autocast_enabled(x.device.type):
        out_dtype = torch.get_autocast_dtype(x.device.type)
    return _LayerNorm.apply(x, weight, bias, eps, out_dtype, *residuals)
