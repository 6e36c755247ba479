"""The CUDA backend of megaphi.kernels: the kernels of csrc/cuda, compiled into megaphi._cuda_kernels by setup.py.

Importing this package imports the extension: a ModuleNotFoundError when it was not built tells the dispatch "the
CUDA extension is not built". `unavailable_reason()` says why built kernels cannot run here (no GPU, or no kernel
image for its architecture), `supports(op, *args)` whether backend=None should pick an op for these arguments, and
`kernels()` lists what the build holds. Ops this backend lacks fall back to the reference.
"""

import importlib

import torch

from megaphi.kernels.autocast import compute_dtype

from megaphi.kernels.cuda import _ext
from megaphi.kernels.cuda import layer_norm as _layer_norm
from megaphi.kernels.cuda.layer_norm import layer_norm

__all__ = ["layer_norm", "kernels", "unavailable_reason", "supports"]


def _optional(name):
    """megaphi.kernels.cuda.<name>, or None until that module exists."""
    try:
        return importlib.import_module(f"megaphi.kernels.cuda.{name}")
    except ModuleNotFoundError as e:
        if e.name != f"megaphi.kernels.cuda.{name}":
            raise
        return None


_mlp = _optional("mlp")
_rotary = _optional("rotary")
if _mlp is not None:
    mlp = _mlp.mlp
    __all__ += ["mlp"]
if _rotary is not None:
    rotary_attention, apply_rotary = _rotary.rotary_attention, _rotary.apply_rotary
    rotary_qkv = _rotary.rotary_qkv  # not a dispatched op: packed QKV -> rotated q, k and v (benchmarks, model)
    __all__ += ["rotary_attention", "apply_rotary", "rotary_qkv"]

_HALF = (torch.float16, torch.bfloat16)
_arch_reasons: dict[int, str | None] = {}


def kernels():
    """Names of the functions the compiled extension holds, e.g. ["layer_norm_forward", ...]."""
    return list(_ext.KERNELS)


def _device_reason(index):
    if index not in _arch_reasons:
        _arch_reasons[index] = _ext.arch_reason(torch.cuda.get_device_capability(index))
    return _arch_reasons[index]


def unavailable_reason():
    """Why these kernels cannot run here, or None."""
    if not torch.cuda.is_available():
        return "no CUDA device (torch.cuda.is_available() is False)"
    return _device_reason(torch.cuda.current_device())




def _module_supports(module, op, args, default):
    """module.supports_<op>(*args) when the module defines it, else default()."""
    check = getattr(module, f"supports_{op}", None)
    return check(*args) if check is not None else default()


def supports(op, *args):
    """Whether backend=None should use this backend's op for these arguments: CUDA tensors it is made for."""
    x = args[0]
    if not x.is_cuda or _device_reason(x.device.index if x.device.index is not None
                                       else torch.cuda.current_device()) is not None:
        return False
    if op == "layer_norm":
        return _layer_norm.supports(*args)
    if op == "mlp" and _mlp is not None:  # fp32 without TF32 is cuBLAS's ground
        return _module_supports(_mlp, op, args, lambda: compute_dtype(x) in _HALF)
    if op in ("rotary_attention", "apply_rotary") and _rotary is not None:
        return _module_supports(_rotary, op, args, lambda: compute_dtype(x) in _HALF)
    return False
