"""LayerNorm with the parallel block's residual sum fused in, on the CUDA kernels of csrc/cuda/layer_norm.cu.

The contract of megaphi.kernels.triton.layer_norm: s = x + sum(residual) is formed in fp32 and stored in the promoted
dtype of the inputs, y = LayerNorm(s) in that dtype or the autocast dtype; returns y, or (y, s) with a residual. The
kernel reads every tensor as a contiguous (rows, hidden) array in one dtype (inputs of another dtype are cast, weight
and bias go in as fp32) with 16-byte vectors, so a row holds at most 1024 vectors: see max_hidden.
"""

import torch

from megaphi.kernels import reference
from megaphi.kernels.cuda._ext import dtype_code, ext, ptr, stream

FLOAT = (torch.float32, torch.float16, torch.bfloat16)
_HALF = (torch.float16, torch.bfloat16)
_SM_COUNT: dict[int, int] = {}


def _per_vector(dtype, hidden):
    """Elements per load: a 16-byte vector when it divides hidden, else one."""
    per_vector = 16 // torch.tensor([], dtype=dtype).element_size()
    return per_vector if hidden % per_vector == 0 else 1


def max_hidden(dtype, hidden):
    """The widest row the kernel takes for this dtype and hidden size (one vector per thread, 1024 threads)."""
    return ext.LAYER_NORM_MAX_VECTORS * _per_vector(dtype, hidden)


def _rows(t, n, dtype):
    """t as a contiguous, 16-byte aligned (rows, n) tensor of dtype (a copy only when it is not one already)."""
    t = t.reshape(-1, n).to(dtype).contiguous()
    return t if t.data_ptr() % 16 == 0 else t.clone()


def _fp32(t):
    return None if t is None else _rows(t, t.shape[-1], torch.float32).view(-1)


def _promoted(*tensors):
    dtype = tensors[0].dtype
    for t in tensors[1:]:
        dtype = torch.promote_types(dtype, t.dtype)
    return dtype


def _backward_blocks(device, rows, n, dtype):
    """Blocks of the backward: enough to fill every SM, each reducing many rows into its partial dweight row."""
    index = device.index if device.index is not None else torch.cuda.current_device()
    if index not in _SM_COUNT:
        _SM_COUNT[index] = torch.cuda.get_device_properties(index).multi_processor_count
    threads = max(32, -(-n // _per_vector(dtype, n) // 32) * 32)
    return max(1, min(rows, _SM_COUNT[index] * max(1, 2048 // threads)))


class _LayerNorm(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, eps, out_dtype, *residuals):
        n = x.shape[-1]
        dtype = _promoted(x, *residuals)
        x2 = _rows(x, n, dtype)
        res = [_rows(r, n, dtype) for r in residuals]
        m = x2.shape[0]
        w32, b32 = _fp32(weight), _fp32(bias)
        y = torch.empty((m, n), dtype=out_dtype, device=x.device)
        s = torch.empty_like(x2) if res else x2
        mean = torch.empty(m, dtype=torch.float32, device=x.device)
        rstd = torch.empty_like(mean)
        with torch.cuda.device(x.device):
            ext.layer_norm_forward(ptr(x2), ptr(res[0] if res else None), ptr(res[1] if len(res) > 1 else None),
                                   ptr(w32), ptr(b32), ptr(y), ptr(s if res else None), ptr(mean), ptr(rstd), m, n,
                                   eps, dtype_code(x2), dtype_code(y), stream(x.device))
        ctx.save_for_backward(s, w32, mean, rstd)
        ctx.weight_dtype = weight.dtype if weight is not None else None
        ctx.bias_dtype = bias.dtype if bias is not None else None
        ctx.out_dtype = out_dtype
        ctx.input_dtypes = [x.dtype] + [r.dtype for r in residuals]
        y = y.view(x.shape)
        return (y, s.view(x.shape)) if res else y

    @staticmethod
    def backward(ctx, dy, ds=None):
        s, w32, mean, rstd = ctx.saved_tensors
        m, n = s.shape
        dy2 = _rows(dy, n, ctx.out_dtype)
        ds2 = _rows(ds, n, s.dtype) if ds is not None else None
        dx = torch.empty_like(s)
        compute_dw = ctx.weight_dtype is not None and ctx.needs_input_grad[1]
        compute_db = ctx.bias_dtype is not None and ctx.needs_input_grad[2]
        blocks = _backward_blocks(s.device, m, n, s.dtype)
        partial = torch.empty((2, blocks, n) if compute_dw or compute_db else (2, 0, 0), dtype=torch.float32,
                              device=s.device)
        dwb = torch.empty((2, n), dtype=torch.float32, device=s.device)
        with torch.cuda.device(s.device):
            handle = stream(s.device)
            ext.layer_norm_backward(ptr(dy2), ptr(ds2), ptr(s), ptr(w32), ptr(mean), ptr(rstd), ptr(dx),
                                    ptr(partial[0]) if compute_dw else 0, ptr(partial[1]) if compute_db else 0, m, n,
                                    blocks, dtype_code(s), dtype_code(dy2), handle)
            ext.layer_norm_reduce_partials(ptr(partial[0]) if compute_dw else 0, ptr(partial[1]) if compute_db else 0,
                                           ptr(dwb[0]), ptr(dwb[1]), blocks, n, handle)
        dw = dwb[0].to(ctx.weight_dtype) if compute_dw else None
        db = dwb[1].to(ctx.bias_dtype) if compute_db else None
        dx = dx.view(dy.shape)
        # x and every residual get the same gradient, each in its own dtype.
        grads = [dx if dt == dx.dtype else dx.to(dt) for dt in ctx.input_dtypes]
        return grads[0], dw, db, None, None, *grads[1:]


def unsupported_reason(x, weight, bias, residuals):
    """Why the kernel cannot take these arguments (a sentence), or None."""
    tensors = [t for t in (x, weight, bias, *residuals) if t is not None]
    for t in tensors:
        if not t.is_cuda:
            return f"the cuda backend runs on CUDA tensors, got a {t.device} tensor"
        if t.device != x.device:
            return f"tensors on {x.device} and {t.device}"
        if t.dtype not in FLOAT:
            return f"the cuda kernel computes in fp32 and takes fp32/fp16/bf16 tensors, got {t.dtype}"
    for r in residuals:
        if r.shape != x.shape:
            return f"residual of shape {tuple(r.shape)} does not match x {tuple(x.shape)}"
    n = x.shape[-1]
    for t in (weight, bias):
        if t is not None and t.shape != (n,):
            return f"weight/bias of shape {tuple(t.shape)}, expected ({n},)"
    limit = max_hidden(_promoted(x, *residuals), n)
    if n > limit:
        return f"the cuda kernel takes a hidden size up to {limit} for this dtype and size, got {n}"
    return None


def _residuals(residual):
    residuals = () if residual is None else (residual,) if isinstance(residual, torch.Tensor) else tuple(residual)
    if len(residuals) > 2:  # the kernel reads two residuals; fold the rest into the second
        residuals = (residuals[0], sum(residuals[2:], residuals[1]))
    return residuals


def supports(x, weight, bias, eps=1e-5, residual=None):
    """Whether backend=None should run these arguments here."""
    return unsupported_reason(x, weight, bias, _residuals(residual)) is None


def layer_norm(x, weight, bias, eps=1e-5, residual=None):
    """LayerNorm over the last dim; with residual (tensor or tuple): (LayerNorm(s), s), s = x + sum(residual)."""
    residuals = _residuals(residual)
    reason = unsupported_reason(x, weight, bias, residuals)
    if reason is not None:
        raise ValueError(f"layer_norm: {reason}; use backend='reference'")
    if x.numel() == 0:
        return reference.layer_norm(x, weight, bias, eps, residual)
    dtype = _promoted(x, *residuals)
    out_dtype = torch.get_autocast_dtype("cuda") if torch.is_autocast_enabled("cuda") else dtype
    if out_dtype != dtype and not (dtype == torch.float32 and out_dtype in _HALF):
        out = _LayerNorm.apply(x, weight, bias, eps, dtype, *residuals)  # a pair the kernel lacks: cast after
        return (out[0].to(out_dtype), out[1]) if residuals else out.to(out_dtype)
    return _LayerNorm.apply(x, weight, bias, eps, out_dtype, *residuals)
