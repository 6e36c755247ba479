"""The compiled extension megaphi._cuda_kernels and what its callers need: dtype codes, pointers, the stream.

The kernels take raw device pointers and a stream handle (the extension includes no torch header); the wrappers
in this package check devices, dtypes, shapes and contiguity before they call it, since the C++ side cannot.
"""

import importlib

import torch

try:
    ext = importlib.import_module("megaphi._cuda_kernels")
except ModuleNotFoundError as e:
    if e.name != "megaphi._cuda_kernels":
        raise
    why = (f"torch {torch.__version__} is a CPU build" if torch.version.cuda is None else
           "`pip install -e .` builds it when nvcc is found (CUDA_HOME, or nvcc on the PATH) and MEGAPHI_SKIP_CUDA "
           "is unset")
    # Under the package's name: the dispatch reports that as "the CUDA extension is not built".
    raise ModuleNotFoundError(f"no module megaphi._cuda_kernels; {why}", name="megaphi.kernels.cuda") from e
except ImportError as e:  # built, but it does not load (a missing libcublasLt, a torch/CUDA mismatch)
    raise ImportError(f"megaphi._cuda_kernels is built but does not load: {e}") from e

# torch dtype -> the megaphi::DType code of csrc/cuda/common.cuh, read from the extension itself.
DTYPES = {getattr(torch, name): code for name, code in ext.DTYPE_CODES.items()}
KERNELS = tuple(ext.KERNELS)


def built_archs():
    """The -gencode targets the extension holds, e.g. ["sm_80", "sm_90"] (compute_XY: PTX for XY and newer)."""
    return [a for a in ext.CUDA_ARCHS.split(",") if a]


def arch_reason(capability, archs=None):
    """Why a device of compute capability (major, minor) cannot run the extension's kernels, or None.

    A cubin sm_XY runs on devices XY' with the same major and minor >= Y (sm_XYa only on XY); PTX compute_XY is
    compiled by the driver for any device XY and newer.
    """
    archs = built_archs() if archs is None else archs
    major, minor = capability
    for arch in archs:
        kind, digits = arch.split("_")
        exact = digits.endswith("a")
        digits = digits.rstrip("a")
        a_major, a_minor = int(digits[:-1]), int(digits[-1])
        if kind == "compute" and (major, minor) >= (a_major, a_minor):
            return None
        if kind == "sm" and major == a_major and (minor == a_minor if exact else minor >= a_minor):
            return None
    return (f"the CUDA extension was built for {','.join(archs)} and has no kernel image for this GPU "
            f"(compute capability {major}.{minor}); rebuild with TORCH_CUDA_ARCH_LIST={major}.{minor}")


def dtype_code(t):
    """The DType code of tensor t; ValueError for dtypes the kernels do not take."""
    try:
        return DTYPES[t.dtype]
    except KeyError:
        raise ValueError(f"the cuda kernels take {sorted(str(d) for d in DTYPES)}, got {t.dtype}") from None


def ptr(t):
    """t's device address as an int, 0 for None."""
    return 0 if t is None else t.data_ptr()


def stream(device):
    """The handle of torch's current stream on device, so the kernels order with the surrounding torch ops."""
    return torch.cuda.current_stream(device).cuda_stream
