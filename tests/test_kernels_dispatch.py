"""The kernel dispatch: explicit choices (argument, set_backend, MEGAPHI_KERNELS), the automatic choice per op,
fallback to the reference, and the reasons a backend is unavailable (some checked in a fresh interpreter)."""

import logging
import os
import subprocess
import sys
import textwrap

import torch

if not torch.cuda.is_available():  # backend="triton" on CPU tensors needs the interpreter, set before triton loads
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from megaphi import kernels  # noqa: E402

CUDA = torch.cuda.is_available()
HAVE_TRITON = "triton" in kernels.available_backends()


@pytest.fixture
def dispatch(monkeypatch, tmp_path):
    """The dispatch with its caches isolated, and a real partial backend module "partial" (gelu_tanh only)."""
    monkeypatch.setattr(kernels, "_loaded", dict(kernels._loaded))
    monkeypatch.setattr(kernels, "_import_errors", dict(kernels._import_errors))
    monkeypatch.setattr(kernels, "_logged", set())
    monkeypatch.setattr(kernels, "_selected", None)
    monkeypatch.delenv(kernels.ENV_VAR, raising=False)
    (tmp_path / "partial_backend.py").write_text(textwrap.dedent("""
        import torch

        def gelu_tanh(x):
            return torch.full_like(x, 42.0)

        def supports(op, *args):
            return args[0].dtype == torch.float32
    """))
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setitem(kernels.KNOWN_BACKENDS, "partial", "partial_backend")
    return kernels


def test_none_on_cpu_is_the_reference(dispatch):
    x, w, b = torch.randn(4, 6), torch.randn(6), torch.randn(6)
    for op, args in [("layer_norm", (x, w, b, 1e-5, (x, x))), ("mlp", (x, w.view(1, 6).expand(3, 6), None,
                                                                       torch.randn(6, 3), None)),
                     ("gelu_tanh", (x,)), ("linear_cross_entropy", (x, torch.randn(9, 6), None, torch.zeros(4)))]:
        assert dispatch.backend_for(op, *args) == "reference"
    assert dispatch.get_backend() == "reference"
    y, s = dispatch.layer_norm(x, w, b, 1e-5, residual=(x, x))
    assert torch.equal(y, F.layer_norm(3 * x, (6,), w, b, 1e-5)) and torch.equal(s, 3 * x)


def test_explicit_choices_and_their_precedence(dispatch, monkeypatch):
    x = torch.randn(3)
    monkeypatch.setenv(kernels.ENV_VAR, "partial")
    assert dispatch.get_backend() == "partial"
    assert dispatch.gelu_tanh(x).eq(42).all()
    dispatch.set_backend("reference")  # set_backend wins over the environment
    assert dispatch.backend_for("gelu_tanh", x) == "reference"
    assert dispatch.gelu_tanh(x, backend="partial").eq(42).all()  # and the argument over both
    dispatch.set_backend(None)
    assert dispatch.get_backend() == "partial"
    monkeypatch.setenv(kernels.ENV_VAR, "nope")
    with pytest.raises(ValueError, match="MEGAPHI_KERNELS: unknown kernel backend 'nope'"):
        dispatch.gelu_tanh(x)


def test_ops_missing_from_a_backend_fall_back_to_the_reference(dispatch):
    x, w, b = torch.randn(2, 5), torch.randn(5), torch.randn(5)
    assert dispatch.backend_for("gelu_tanh", x, backend="partial") == "partial"
    assert dispatch.backend_for("layer_norm", x, w, b, 1e-5, None, backend="partial") == "reference"
    torch.testing.assert_close(dispatch.layer_norm(x, w, b, backend="partial"), F.layer_norm(x, (5,), w, b))


def test_automatic_choice_per_op_with_supports_and_one_warning(dispatch, monkeypatch, caplog):
    """AUTO_DEVICES widened to CPU so the automatic path runs here: first usable backend per op and dtype."""
    monkeypatch.setattr(kernels, "AUTO_DEVICES", {"cpu"})
    monkeypatch.setitem(kernels.KNOWN_BACKENDS, "broken", "megaphi.kernels.no_such_backend")
    monkeypatch.setattr(kernels, "AUTO_ORDER", ["broken", "partial"])
    x = torch.randn(4)
    assert dispatch.backend_for("gelu_tanh", x) == "partial"  # available, has the op, supports fp32
    assert dispatch.backend_for("gelu_tanh", x.double()) == "reference"  # supports() says no
    assert dispatch.backend_for("layer_norm", x, None, None, 1e-5, None) == "reference"  # op missing
    assert dispatch.get_backend(device="cpu") == "partial"
    with caplog.at_level(logging.WARNING, logger="megaphi.kernels"):
        dispatch.gelu_tanh(x.double())  # "partial" declines: routine, not logged
        monkeypatch.setattr(kernels, "AUTO_ORDER", ["broken"])
        dispatch.gelu_tanh(x)  # no fused backend at all: said once
        dispatch.gelu_tanh(x)
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "broken: module megaphi.kernels.no_such_backend does not exist" in warnings[0]


def test_backend_status_reasons(dispatch, monkeypatch):
    status = dispatch.backend_status()
    assert status["reference"] == "available"
    try:
        import megaphi._cuda_kernels  # noqa: F401
    except ImportError:  # torch without CUDA, or no nvcc at install time
        assert status["cuda"].startswith("the CUDA extension is not built (ModuleNotFoundError")
    else:
        assert status["cuda"] == "available" if CUDA else status["cuda"].startswith("no CUDA device")
    assert set(status) == set(kernels.KNOWN_BACKENDS)
    assert ("triton" in dispatch.available_backends()) == (status["triton"] == "available")
    monkeypatch.setitem(kernels.KNOWN_BACKENDS, "missing", "megaphi.kernels.no_such_module")
    with pytest.raises(ValueError, match="'missing' is not available here .*does not exist .*No module named"):
        dispatch.set_backend("missing")


@pytest.mark.skipif(not HAVE_TRITON, reason="the triton extra is not installed")
def test_explicit_triton_runs_its_kernels(dispatch, monkeypatch):
    from megaphi.kernels import triton as tk

    device = "cuda" if CUDA else "cpu"
    x, r = torch.randn(5, 64, device=device), torch.randn(5, 64, device=device)
    w, b = torch.randn(64, device=device), torch.randn(64, device=device)
    monkeypatch.setenv(kernels.ENV_VAR, "triton")
    assert dispatch._resolve("layer_norm", None, (x, w, b, 1e-5, r)) == ("triton", tk.layer_norm)
    y, s = dispatch.layer_norm(x, w, b, 1e-5, residual=r)
    torch.testing.assert_close(y, F.layer_norm(x + r, (64,), w, b, 1e-5), atol=1e-5, rtol=1e-5)
    # On CUDA tensors backend=None takes triton's kernel; on CPU ones the reference, never the interpreter.
    monkeypatch.delenv(kernels.ENV_VAR)
    assert dispatch.backend_for("layer_norm", x, w, b, 1e-5, r) == ("triton" if CUDA else "reference")
    assert dispatch.backend_for("layer_norm", x.cpu(), w.cpu(), b.cpu(), 1e-5, r.cpu()) == "reference"
    # The kernels compute in fp32: float64 stays with the reference.
    assert dispatch.backend_for("layer_norm", x.double(), w.double(), b.double(), 1e-5, r.double()) == "reference"


def run_fresh(code, **env):
    """Run code in a fresh python with the given environment changes; its stdout."""
    full_env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", kernels.ENV_VAR)} | env
    result = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], env=full_env, capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    return result.stdout


def test_without_triton_import_is_cheap_and_none_falls_back():
    """triton unimportable: megaphi.kernels imports without it, reports why, and runs the reference."""
    out = run_fresh("""
        import sys
        sys.modules["triton"] = None  # as if not installed
        import torch
        from megaphi import kernels
        assert "triton" not in sys.modules or sys.modules["triton"] is None
        assert "megaphi.kernels.triton" not in sys.modules  # importing the dispatch loads no backend
        x = torch.randn(3, 8)
        print(kernels.backend_for("layer_norm", x, None, None, 1e-5, None))
        kernels.layer_norm(x, None, None)
        print(kernels.available_backends())
        print(kernels.backend_status()["triton"])
        try:
            kernels.set_backend("triton")
        except ValueError as e:
            print(e)
    """)
    lines = out.splitlines()
    assert lines[0] == "reference"
    assert lines[1] == "['reference']"
    assert lines[2].startswith("triton is not installed (ModuleNotFoundError")
    assert lines[3].startswith("set_backend: kernel backend 'triton' is not available here (triton is not installed")


@pytest.mark.skipif(CUDA or not HAVE_TRITON, reason="checks the no-GPU reason of an installed triton")
def test_triton_without_gpu_or_interpreter_says_why():
    out = run_fresh("""
        from megaphi import kernels
        print(kernels.backend_status()["triton"])
        print(kernels.available_backends())
    """)
    lines = out.splitlines()
    assert lines[0].startswith("no CUDA device (torch.cuda.is_available() is False); set TRITON_INTERPRET=1")
    assert lines[1] == "['reference']"
