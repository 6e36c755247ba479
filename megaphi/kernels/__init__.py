"""The one place the model takes its ops from: each op dispatches to a backend module.

A backend is chosen per call (`backend="reference"`), else by `set_backend()` (the trainer's `--kernels` flag),
else by the MEGAPHI_KERNELS environment variable. An explicit backend module implements any subset of the ops below;
the ops it lacks fall back to the reference. With none of these (backend=None), each call picks the fastest
backend for its inputs: on CUDA tensors the first of AUTO_ORDER that is available, has the op and whose
`supports(op, *args)` accepts the arguments (device, dtype, shape); on any other device the reference. Fused
backends ("triton", "cuda") register here as `megaphi.kernels.<name>` modules, imported on first use so that
importing this package stays cheap; `backend_status()` says why one is not available.
"""

import importlib
import logging
import os

from megaphi.kernels import reference

# name -> module path; a backend exists when its module imports.
KNOWN_BACKENDS = {
    "reference": "megaphi.kernels.reference",
    "triton": "megaphi.kernels.triton",
    "cuda": "megaphi.kernels.cuda",
}
AUTO_ORDER = ["cuda", "triton"]  # backend=None on CUDA tensors: the first that takes the call, else the reference
AUTO_DEVICES = {"cuda"}  # device types on which backend=None looks past the reference
ENV_VAR = "MEGAPHI_KERNELS"

log = logging.getLogger(__name__)

_loaded = {"reference": reference}
_import_errors: dict[str, str] = {}
_selected: str | None = None
_logged: set[str] = set()


def _import_reason(name, e):
    """Why backend name's module failed to import, in words, with the error."""
    error = f"{type(e).__name__}: {e}"
    missing = getattr(e, "name", None)
    if isinstance(e, ModuleNotFoundError) and missing == KNOWN_BACKENDS[name]:
        what = "the CUDA extension is not built" if name == "cuda" else f"module {missing} does not exist"
        return f"{what} ({error})"
    if isinstance(e, ModuleNotFoundError) and missing:
        return f"{missing.split('.')[0]} is not installed ({error})"
    return error


def _load(name):
    """The backend module called name, or None with the reason recorded."""
    if name in _loaded:
        return _loaded[name]
    if name in _import_errors:
        return None
    try:
        _loaded[name] = importlib.import_module(KNOWN_BACKENDS[name])
    except ImportError as e:
        _import_errors[name] = _import_reason(name, e)
        return None
    return _loaded[name]


def _unavailable(name):
    """Why backend name cannot run here (import failure, or the module's own unavailable_reason()), or None."""
    module = _load(name)
    if module is None:
        return _import_errors[name]
    check = getattr(module, "unavailable_reason", None)
    return check() if check is not None else None


def backend_status() -> dict[str, str]:
    """{backend name: "available" or the reason it is not} for every known backend."""
    return {name: _unavailable(name) or "available" for name in KNOWN_BACKENDS}


def available_backends() -> list[str]:
    """Names of the backends that can run on this machine."""
    return [name for name in KNOWN_BACKENDS if _unavailable(name) is None]


def _check(name, source):
    """The module for backend name; ValueError naming source when unknown or unavailable."""
    if name not in KNOWN_BACKENDS:
        raise ValueError(f"{source}: unknown kernel backend {name!r}; choose one of {sorted(KNOWN_BACKENDS)}")
    reason = _unavailable(name)
    if reason is not None:
        raise ValueError(f"{source}: kernel backend {name!r} is not available here ({reason}); "
                         f"available: {available_backends()}")
    return _loaded[name]


def set_backend(name: str | None) -> None:
    """Make name the default backend for calls without backend= (None: back to $MEGAPHI_KERNELS or automatic)."""
    global _selected
    if name is not None:
        _check(name, "set_backend")
    _selected = name


def _explicit(backend):
    """(name, source) of the backend chosen by argument, set_backend or the environment; (None, None) if none."""
    if backend is not None:
        return backend, "backend="
    if _selected is not None:
        return _selected, "set_backend"
    env = os.environ.get(ENV_VAR)
    return (env, ENV_VAR) if env else (None, None)


def get_backend(backend: str | None = None, device=None) -> str:
    """The name of the backend a call with this backend= argument uses on tensors of device (default CPU).

    Under the automatic choice it is the first backend of AUTO_ORDER available for CUDA devices; a single op still
    falls back to the reference when that backend lacks it or does not support its arguments.
    """
    name, source = _explicit(backend)
    if name is not None:
        _check(name, source)
        return name
    if device is None or str(device).split(":")[0] not in AUTO_DEVICES:
        return "reference"
    return next((b for b in AUTO_ORDER if _unavailable(b) is None), "reference")


def _log_once(level, message):
    if message not in _logged:
        _logged.add(message)
        log.log(level, message)


def _auto(op, args):
    """(name, function) of the fastest implementation of op for args: see the module docstring."""
    device = getattr(args[0], "device", None)
    if device is None or device.type not in AUTO_DEVICES:
        _log_once(logging.INFO, f"megaphi.kernels: backend=None runs the reference kernels on {device} tensors")
        return "reference", getattr(reference, op)
    skipped = []
    for name in AUTO_ORDER:
        reason = _unavailable(name)
        if reason is not None:
            skipped.append(f"{name}: {reason}")
            continue
        fn = getattr(_loaded[name], op, None)
        supports = getattr(_loaded[name], "supports", None)
        if fn is not None and (supports is None or supports(op, *args)):
            return name, fn
    if len(skipped) == len(AUTO_ORDER):  # no fused backend at all (a backend declining one op is routine)
        _log_once(logging.WARNING, "megaphi.kernels: backend=None falls back to the reference kernels on "
                                   f"{device.type} tensors; " + "; ".join(skipped))
    return "reference", getattr(reference, op)


def _resolve(op, backend, args):
    """(name, function) that runs op on args under this backend= argument."""
    chosen, source = _explicit(backend)
    if chosen is None:
        return _auto(op, args)
    module = _check(chosen, source)
    fn = getattr(module, op, None)
    return (chosen, fn) if fn is not None else ("reference", getattr(reference, op))


def backend_for(op: str, *args, backend: str | None = None) -> str:
    """The name of the backend that runs kernels.<op>(*args, backend=backend)."""
    return _resolve(op, backend, args)[0]


def _op(name, backend, args):
    return _resolve(name, backend, args)[1]


def rotary_attention(q, k, v, rotary_dim, base=10000.0, causal=True, dropout_p=0.0, *, backend=None):
    """SDPA of rotate(q), rotate(k), v at positions 0..seq-1; q, k, v (batch, seq, heads, head_dim) -> same shape.

    rotate: phi's partial rotate-half RoPE on the first rotary_dim dims (dim i pairs with i + rotary_dim/2), the rest
    passes through; scale 1/sqrt(head_dim).
    """
    args = (q, k, v, rotary_dim, base, causal, dropout_p)
    return _op("rotary_attention", backend, args)(*args)


def apply_rotary(x, rotary_dim, base=10000.0, position_offset=0, *, backend=None):
    """x (batch, seq, heads, head_dim) rotated at positions position_offset..position_offset+seq-1."""
    args = (x, rotary_dim, base, position_offset)
    return _op("apply_rotary", backend, args)(*args)


def attention(q, k, v, causal=True, dropout_p=0.0, *, backend=None):
    """SDPA of already-rotated q (b, sq, h, d) over k, v (b, sk, h, d); causal is bottom-right aligned when sk > sq."""
    args = (q, k, v, causal, dropout_p)
    return _op("attention", backend, args)(*args)


def layer_norm(x, weight, bias, eps=1e-5, residual=None, *, backend=None):
    """LayerNorm(x) over the last dim; with residual (tensor or tuple): (LayerNorm(s), s), s = x + sum(residual)."""
    args = (x, weight, bias, eps, residual)
    return _op("layer_norm", backend, args)(*args)


def gelu_tanh(x, *, backend=None):
    """GELU, tanh approximation (HF's gelu_new)."""
    return _op("gelu_tanh", backend, (x,))(x)


def mlp(x, w1, b1, w2, b2, *, backend=None):
    """gelu_tanh(x @ w1.T + b1) @ w2.T + b2; b2 may be None."""
    args = (x, w1, b1, w2, b2)
    return _op("mlp", backend, args)(*args)


def linear_cross_entropy(hidden, weight, bias, labels, ignore_index=-100, reduction="mean", process_group=None,
                         *, backend=None):
    """Cross entropy of hidden @ weight.T + bias against labels, ignoring ignore_index; reduction mean|sum|none.

    process_group: the tensor-parallel group when weight/bias are a vocab shard (None: the full vocab).
    """
    args = (hidden, weight, bias, labels, ignore_index, reduction, process_group)
    return _op("linear_cross_entropy", backend, args)(*args)
