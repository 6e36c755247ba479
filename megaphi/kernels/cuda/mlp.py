"""The MLP on cuBLASLt GEMMs whose epilogues do the elementwise work (csrc/cuda/mlp.cu).

mlp(x, w1, b1, w2, b2) = gelu_tanh(x @ w1.T + b1) @ w2.T + b2, x (..., hidden), w1 (ffn, hidden), w2 (hidden, ffn).
Forward: fc1 with the bias + GELU epilogue that also stores the pre-activation (GELU_AUX_BIAS), fc2 with the bias
epilogue. Backward: dw2 = dy.T @ h with db2 reduced in the same GEMM (BGRADB), dpre = (dy @ w2) * gelu'(pre) with
db1 reduced in its epilogue (DGELU_BGRAD), then dx = dpre @ w1 and dw1 = dpre.T @ x: no pass of its own touches
the (tokens, ffn) activation. cuBLASLt's GELU is the tanh approximation.
"""

import functools

import torch

from megaphi.kernels import reference
from megaphi.kernels.autocast import autocast_inputs, compute_dtype
from megaphi.kernels.cuda._ext import dtype_code, ext, ptr, stream

__all__ = ["mlp", "mlp_unsupported", "supports_mlp", "gemm", "check_cuda"]

_EPILOGUES = ext.GEMM_EPILOGUES
_HALF = (torch.float16, torch.bfloat16)






def check_cuda(op, *tensors):
    """ValueError unless every tensor given is on one CUDA device."""
    devices = {t.device for t in tensors if t is not None}
    for device in devices:
        if device.type != "cuda":
            raise ValueError(f"{op}: the cuda backend runs on CUDA tensors, got a {device} tensor; "
                             "use backend='reference' for other devices")
    if len(devices) > 1:
        raise ValueError(f"{op}: all tensors must be on one device, got {sorted(map(str, devices))}")


@functools.lru_cache(maxsize=None)
def _workspace_bytes(device_index):
    # NVIDIA's advice for cuBLASLt: 32 MiB on Hopper, 4 MiB on earlier GPUs.
    return (32 if torch.cuda.get_device_capability(device_index)[0] >= 9 else 4) << 20


def gemm(a, b, d, trans_a=False, trans_b=False, epilogue="none", bias=None, aux=None):
    """d (M, N) = epilogue(op(a) @ op(b)) on cuBLASLt, op(a) = a.T if trans_a; 2-D tensors with unit column stride.

    epilogue: a key of ext.GEMM_EPILOGUES (see csrc/cuda/mlp.h); bias (N) is read or, for the *bgrad epilogues,
    written; aux (M, N) is the pre-activation. Returns False only when "bgrad_a" was not available: then d holds
    the plain product and bias was not written.
    """
    m, k = (a.shape[1], a.shape[0]) if trans_a else a.shape
    n = b.shape[0] if trans_b else b.shape[1]
    # From torch's caching allocator on the current stream, so it is free again once this GEMM has run.
    workspace = torch.empty(_workspace_bytes(d.device.index), dtype=torch.uint8, device=d.device)
    return ext.gemm(dtype_code(d), a.data_ptr(), b.data_ptr(), d.data_ptr(), m, n, k, trans_a, trans_b,
                    a.stride(0), b.stride(0), d.stride(0), _EPILOGUES[epilogue], ptr(bias), ptr(aux),
                    0 if aux is None else aux.stride(0), False, workspace.data_ptr(), workspace.numel(),
                    stream(d.device))


class _MLP(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, w1, b1, w2, b2, save):
        x2 = x.reshape(-1, x.shape[-1]).contiguous()
        w1, w2 = w1.contiguous(), w2.contiguous()
        b1 = b1.contiguous() if b1 is not None else None
        b2 = b2.contiguous() if b2 is not None else None
        with torch.cuda.device(x.device):
            h = x2.new_empty(x2.shape[0], w1.shape[0])
            pre = torch.empty_like(h) if save else None
            epilogue = "gelu" + ("_aux" if save else "") + ("_bias" if b1 is not None else "")
            gemm(x2, w1, h, trans_b=True, epilogue=epilogue, bias=b1, aux=pre)
            y = x2.new_empty(x2.shape[0], w2.shape[0])
            gemm(h, w2, y, trans_b=True, epilogue="bias" if b2 is not None else "none", bias=b2)
        if save:
            ctx.save_for_backward(x2, w1, w2, pre, h)
            ctx.x_shape = x.shape
        return y.view(*x.shape[:-1], w2.shape[0])

    @staticmethod
    def backward(ctx, dy):
        x2, w1, w2, pre, h = ctx.saved_tensors
        need_x, need_w1, need_b1, need_w2, need_b2 = ctx.needs_input_grad[:5]
        dy2 = dy.reshape(-1, dy.shape[-1]).contiguous()
        dx = dw1 = db1 = dw2 = db2 = None
        with torch.cuda.device(dy.device):
            if need_w2:
                dw2 = torch.empty_like(w2)
                db2 = dy2.new_empty(dy2.shape[1]) if need_b2 else None
                if not gemm(dy2, h, dw2, trans_a=True, epilogue="bgrad_a" if need_b2 else "none", bias=db2):
                    db2 = dy2.sum(0)
            elif need_b2:
                db2 = dy2.sum(0)
            if need_x or need_w1 or need_b1:
                dpre = torch.empty_like(pre)
                db1 = dpre.new_empty(dpre.shape[1]) if need_b1 else None
                gemm(dy2, w2, dpre, epilogue="dgelu_bgrad" if need_b1 else "dgelu", bias=db1, aux=pre)
                if need_x:
                    dx = dpre.new_empty(dpre.shape[0], w1.shape[1])
                    gemm(dpre, w1, dx)
                    dx = dx.view(ctx.x_shape)
                if need_w1:
                    dw1 = torch.empty_like(w1)
                    gemm(dpre, x2, dw1, trans_a=True)
        return dx, dw1, db1, dw2, db2, None


def mlp_unsupported(x, w1, b1, w2, b2):
    """Why the cuBLASLt MLP hands these (valid) arguments to the reference, or None when it runs them."""
    dtype = compute_dtype(x)
    if dtype not in _HALF:
        return f"dtype {dtype} (the cuBLASLt GELU epilogues run float16 and bfloat16)"
    ffn, hidden = w1.shape
    if ffn % 8 or hidden % 8 or w2.shape[0] % 8:
        return (f"hidden {hidden}, ffn {ffn}, output {w2.shape[0]}: each must be a multiple of 8 (cuBLASLt's "
                "GELU aux matrix and 16-byte rows)")
    if x.numel() == 0 or w1.numel() == 0 or w2.numel() == 0:  # cuBLASLt takes no zero M, N or K
        return "an empty input"
    return None


def supports_mlp(x, w1, b1, w2, b2):
    """Whether backend=None should run mlp here: CUDA tensors the cuBLASLt kernels take (see mlp_unsupported)."""
    return x.is_cuda and w1.dim() == 2 and w2.dim() == 2 and mlp_unsupported(x, w1, b1, w2, b2) is None


def _check_shapes(x, w1, b1, w2, b2):
    dtypes = {t.dtype for t in (x, w1, b1, w2, b2) if t is not None}
    if len(dtypes) > 1:
        raise ValueError(f"mlp: x, weights and biases must share one dtype, got {sorted(map(str, dtypes))}")
    if w1.dim() != 2 or w2.dim() != 2 or w1.shape[1] != x.shape[-1] or w2.shape[1] != w1.shape[0]:
        raise ValueError(f"mlp: shapes x {tuple(x.shape)}, w1 {tuple(w1.shape)}, w2 {tuple(w2.shape)} do not chain")
    for name, bias, size in (("b1", b1, w1.shape[0]), ("b2", b2, w2.shape[0])):
        if bias is not None and tuple(bias.shape) != (size,):
            raise ValueError(f"mlp: {name} must have shape ({size},), got {tuple(bias.shape)}")


def mlp(x, w1, b1, w2, b2):
    """gelu_tanh(x @ w1.T + b1) @ w2.T + b2 (b1, b2 may be None); inside autocast, in the autocast dtype.

    fp16/bf16 with hidden and ffn multiples of 8 run the cuBLASLt kernels; other valid inputs the reference.
    """
    x, w1, b1, w2, b2 = autocast_inputs(x, w1, b1, w2, b2)
    _check_shapes(x, w1, b1, w2, b2)
    check_cuda("mlp", x, w1, b1, w2, b2)
    if mlp_unsupported(x, w1, b1, w2, b2) is not None:
        return reference.mlp(x, w1, b1, w2, b2)
    save = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (x, w1, b1, w2, b2))
    return _MLP.apply(x, w1, b1, w2, b2, save)
