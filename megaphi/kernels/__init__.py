"""The one place the model takes its ops from: each op dispatches to a backend module.

A backend is chosen per call (`backend="reference"`), else by `set_backend()` (the trainer's `--kernels` flag),
else by the MEGAPHI_KERNELS environment variable, else "reference". A backend module implements any subset of
the ops below; the ops it lacks fall back to the reference. Fused backends ("triton", "cuda") register here as
`megaphi.kernels.<name>` modules; a backend that is known but fails to import is reported with the reason.
"""

import importlib
import os

from megaphi.kernels import reference

# name -> module path; a backend exists when its module imports.
KNOWN_BACKENDS = {
    "reference": "megaphi.kernels.reference",
    "triton": "megaphi.kernels.triton",
    "cuda": "megaphi.kernels.cuda",
}
ENV_VAR = "MEGAPHI_KERNELS"

_loaded = {"reference": reference}
_import_errors: dict[str, str] = {}
_selected: str | None = None


def _load(name):
    """The backend module called name, or None with the reason recorded."""
    if name in _loaded:
        return _loaded[name]
    if name in _import_errors:
        return None
    try:
        _loaded[name] = importlib.import_module(KNOWN_BACKENDS[name])
    except ImportError as e:
        _import_errors[name] = f"{type(e).__name__}: {e}"
        return None
    return _loaded[name]


def available_backends() -> list[str]:
    """Names of the backends whose modules import on this machine."""
    return [name for name in KNOWN_BACKENDS if _load(name) is not None]


def _check(name, source):
    """The module for backend name; ValueError naming source when unknown or unavailable."""
    if name not in KNOWN_BACKENDS:
        raise ValueError(f"{source}: unknown kernel backend {name!r}; choose one of {sorted(KNOWN_BACKENDS)}")
    module = _load(name)
    if module is None:
        raise ValueError(f"{source}: kernel backend {name!r} is not available here ({_import_errors[name]}); "
                         f"available: {available_backends()}")
    return module


def set_backend(name: str | None) -> None:
    """Make name the default backend for calls without backend= (None: back to $MEGAPHI_KERNELS or reference)."""
    global _selected
    if name is not None:
        _check(name, "set_backend")
    _selected = name


def get_backend(backend: str | None = None) -> str:
    """The name of the backend a call with this backend= argument uses."""
    if backend is not None:
        _check(backend, "backend=")
        return backend
    if _selected is not None:
        return _selected
    name = os.environ.get(ENV_VAR) or "reference"
    _check(name, ENV_VAR)
    return name


def _op(name, backend):
    module = _check(get_backend(backend), "backend=")
    return getattr(module, name, None) or getattr(reference, name)


def rotary_attention(q, k, v, rotary_dim, base=10000.0, causal=True, dropout_p=0.0, *, backend=None):
    """SDPA of rotate(q), rotate(k), v at positions 0..seq-1; q, k, v (batch, seq, heads, head_dim) -> same shape.

    rotate: phi's partial rotate-half RoPE on the first rotary_dim dims (dim i pairs with i + rotary_dim/2), the rest
    passes through; scale 1/sqrt(head_dim).
    """
    return _op("rotary_attention", backend)(q, k, v, rotary_dim, base, causal, dropout_p)


def apply_rotary(x, rotary_dim, base=10000.0, position_offset=0, *, backend=None):
    """x (batch, seq, heads, head_dim) rotated at positions position_offset..position_offset+seq-1."""
    return _op("apply_rotary", backend)(x, rotary_dim, base, position_offset)


def attention(q, k, v, causal=True, dropout_p=0.0, *, backend=None):
    """SDPA of already-rotated q (b, sq, h, d) over k, v (b, sk, h, d); causal is bottom-right aligned when sk > sq."""
    return _op("attention", backend)(q, k, v, causal, dropout_p)


def layer_norm(x, weight, bias, eps=1e-5, residual=None, *, backend=None):
    """LayerNorm(x) over the last dim; with residual (tensor or tuple): (LayerNorm(s), s), s = x + sum(residual)."""
    return _op("layer_norm", backend)(x, weight, bias, eps, residual)


def gelu_tanh(x, *, backend=None):
    """GELU, tanh approximation (HF's gelu_new)."""
    return _op("gelu_tanh", backend)(x)


def mlp(x, w1, b1, w2, b2, *, backend=None):
    """gelu_tanh(x @ w1.T + b1) @ w2.T + b2."""
    return _op("mlp", backend)(x, w1, b1, w2, b2)


def linear_cross_entropy(hidden, weight, bias, labels, ignore_index=-100, reduction="mean", process_group=None,
                         *, backend=None):
    """Cross entropy of hidden @ weight.T + bias against labels, ignoring ignore_index; reduction mean|sum|none.

    process_group: the tensor-parallel group when weight/bias are a vocab shard (None: the full vocab).
    """
    return _op("linear_cross_entropy", backend)(hidden, weight, bias, labels, ignore_index, reduction, process_group)
