"""What the Triton kernel files share: whether triton interprets, and the device check."""

import os

import triton


def _interpret():
    """Whether triton runs kernels in its CPU interpreter: TRITON_INTERPRET, parsed as triton parses it."""
    knobs = getattr(triton, "knobs", None)  # triton >= 3.4
    if knobs is not None:
        return bool(knobs.runtime.interpret)
    return os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "on", "yes", "y")


# Read once, at import: triton.jit chose between compiling and interpreting when it decorated the kernels.
INTERPRET = _interpret()


def check_device(op, *tensors):
    """ValueError unless every tensor is on CUDA (or on CPU under TRITON_INTERPRET=1)."""
    for t in tensors:
        if t is not None and not t.is_cuda and not (INTERPRET and t.device.type == "cpu"):
            raise ValueError(f"{op}: the triton backend runs on CUDA tensors, got a {t.device} tensor; use "
                             f"backend='reference', or set TRITON_INTERPRET=1 before importing triton for CPU tensors")

