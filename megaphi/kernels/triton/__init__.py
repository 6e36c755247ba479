"""The Triton backend of megaphi.kernels: fused LayerNorm+residual, MLP, linear cross-entropy, rotary attention.

Importing this module imports triton (an ImportError when it is missing marks the backend unavailable). The kernels
run on CUDA tensors, or on CPU tensors when TRITON_INTERPRET=1 was set before triton was imported (tests).
`unavailable_reason()` and `supports(op, *args)` tell the dispatch whether backend=None should pick an op here.
"""

import torch

from megaphi.kernels.autocast import compute_dtype

from megaphi.kernels.triton.common import INTERPRET
from megaphi.kernels.triton.cross_entropy import linear_cross_entropy
from megaphi.kernels.triton.layer_norm import MAX_HIDDEN, layer_norm
from megaphi.kernels.triton.mlp import gelu_tanh, mlp

__all__ = ["layer_norm", "mlp", "gelu_tanh", "linear_cross_entropy", "unavailable_reason", "supports"]

try:  # written beside this module; until it exists the dispatch falls back to the reference for attention
    from megaphi.kernels.triton import attention as _attention
except ModuleNotFoundError as e:
    if e.name != "megaphi.kernels.triton.attention":
        raise
    _attention = None
else:  # (an op named "attention" would clash with the submodule's name: it needs another module)
    rotary_attention, apply_rotary = _attention.rotary_attention, _attention.apply_rotary
    __all__ += ["rotary_attention", "apply_rotary"]

_HALF = (torch.float16, torch.bfloat16)
_FLOAT = (*_HALF, torch.float32)  # the kernels compute in fp32: float64 stays with the reference


def unavailable_reason():
    """Why these kernels cannot run here, or None."""
    if INTERPRET or torch.cuda.is_available():
        return None
    return ("no CUDA device (torch.cuda.is_available() is False); set TRITON_INTERPRET=1 before importing triton "
            "to run the kernels on CPU tensors")




def supports(op, *args):
    """Whether backend=None should use this backend's op for these arguments: CUDA tensors it is faster on.

    The interpreter is never chosen automatically; backend="triton" runs it on CPU tensors.
    """
    x = args[0]
    if not x.is_cuda:
        return False
    dtype = compute_dtype(x)
    if op == "layer_norm":
        residual = args[4] if len(args) > 4 else None
        residuals = () if residual is None else (residual,) if isinstance(residual, torch.Tensor) else residual
        return (x.dtype in _FLOAT and x.shape[-1] <= MAX_HIDDEN
                and all(r.shape == x.shape and r.dtype in _FLOAT for r in residuals))
    if op == "mlp":  # fp32 without TF32 is cuBLAS's ground
        return dtype in _HALF
    if op == "linear_cross_entropy":
        return dtype in _FLOAT
    if op == "rotary_attention":
        q, k, v, rotary_dim = args[:4]
        dropout_p = args[6] if len(args) > 6 else 0.0
        return dtype in _HALF and _attention.unsupported_reason(q, k, v, rotary_dim, dropout_p) is None
    if op == "apply_rotary":  # elementwise, exact in fp32 too
        check = getattr(_attention, "rotary_unsupported", None)
        return check is not None and check(x, args[1]) is None
    return False  # gelu_tanh: PyTorch's own kernel is one fused pass already
