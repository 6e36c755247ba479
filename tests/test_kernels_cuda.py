"""The CUDA extension megaphi._cuda_kernels: that it is built where it can be, what it reports, and the LayerNorm.

On the CPU: where torch has CUDA and nvcc is found (the CI machine), the extension must import (never a skip) and
list its kernels; its C++ checks raise clear Python errors; the dispatch reports why the backend cannot run and
falls back. With a GPU: the LayerNorm kernel against the reference on fp32 copies, forward and backward, bf16,
fp16 and fp32, odd sizes, relative errors within a stated multiple of the reference's own error.
"""

import os
import shutil
import subprocess
import sys
import textwrap

import pytest
import torch
import torch.nn.functional as F

from kernel_checks import rel_error, run
from megaphi import kernels
from megaphi.kernels import reference

CUDA = torch.cuda.is_available()
gpu_only = pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU")
SHOULD_BE_BUILT = (torch.version.cuda is not None and (shutil.which("nvcc") or os.environ.get("CUDA_HOME"))
                   and os.environ.get("MEGAPHI_SKIP_CUDA", "0") in ("", "0"))
try:
    from megaphi.kernels import cuda as ck
    from megaphi.kernels.cuda import _ext
except ImportError as e:
    ck = _ext = None
    IMPORT_ERROR = e
built_only = pytest.mark.skipif(ck is None, reason="megaphi._cuda_kernels is not built (torch without CUDA or no nvcc)")


def run_fresh(code):
    """stdout of code run in a fresh python (no MEGAPHI_KERNELS), which must succeed."""
    env = {k: v for k, v in os.environ.items() if k != kernels.ENV_VAR}
    result = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], env=env, capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 0, result.stderr
    return result.stdout


def test_extension_is_built_wherever_it_can_be():
    """torch with CUDA + nvcc at install time: the extension must be there (CI compiles it); else it says why not."""
    status = kernels.backend_status()["cuda"]
    if SHOULD_BE_BUILT:
        assert ck is not None, f"torch {torch.__version__} has CUDA and nvcc is here, but: {IMPORT_ERROR}"
        assert {"layer_norm_forward", "layer_norm_backward", "layer_norm_reduce_partials"} <= set(ck.kernels())
        assert _ext.built_archs() and all(a.split("_")[0] in ("sm", "compute") for a in _ext.built_archs())
        assert _ext.ext.CUDA_VERSION // 1000 == int(torch.version.cuda.split(".")[0])
        assert not status.startswith("the CUDA extension is not built")
    elif ck is None:
        assert status.startswith("the CUDA extension is not built (ModuleNotFoundError: no module "
                                 "megaphi._cuda_kernels")
        if torch.version.cuda is None:
            assert "is a CPU build" in status


def test_not_built_is_reported_and_falls_back():
    """An interpreter where the extension cannot be imported: the status says so, the reference runs."""
    out = run_fresh("""
        import sys
        sys.modules["megaphi._cuda_kernels"] = None  # as if never built
        import torch
        from megaphi import kernels
        print(kernels.backend_status()["cuda"])
        print("cuda" in kernels.available_backends())
        x = torch.randn(3, 8)
        print(kernels.backend_for("layer_norm", x, None, None, 1e-5, None))
        try:
            kernels.set_backend("cuda")
        except ValueError as e:
            print(e)
    """)
    lines = out.splitlines()
    assert lines[0].startswith("the CUDA extension is not built (ModuleNotFoundError: no module megaphi._cuda_kernels")
    assert lines[1:3] == ["False", "reference"]
    assert lines[3].startswith("set_backend: kernel backend 'cuda' is not available here (the CUDA extension is not")


@built_only
def test_arch_reasons():
    """Which GPUs a build's -gencode targets run on: same-major cubins, exact sm_XYa, PTX for newer devices."""
    assert _ext.arch_reason((8, 6), ["sm_80", "sm_90"]) is None
    assert _ext.arch_reason((9, 0), ["sm_80", "sm_90"]) is None
    assert "no kernel image" in _ext.arch_reason((10, 0), ["sm_80", "sm_90"])
    assert "rebuild with TORCH_CUDA_ARCH_LIST=7.5" in _ext.arch_reason((7, 5), ["sm_80"])
    assert _ext.arch_reason((12, 0), ["sm_80", "compute_90"]) is None
    assert _ext.arch_reason((9, 0), ["sm_90a"]) is None and _ext.arch_reason((9, 1), ["sm_90a"]) is not None


@built_only
def test_cpp_checks_raise_python_errors():
    """Bad arguments are a ValueError from the C++ side before any launch; dtype codes come from the extension."""
    ext = _ext.ext
    assert _ext.DTYPES == {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}
    with pytest.raises(ValueError, match="layer_norm: empty input"):
        ext.layer_norm_forward(0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 8, 1e-5, 0, 0, 0)
    with pytest.raises(ValueError, match="row is wider than the CUDA kernel takes"):
        ext.layer_norm_forward(0, 0, 0, 0, 0, 16, 0, 16, 16, 4, 1025 * 4, 1e-5, 0, 0, 0)
    with pytest.raises(ValueError, match="a 16-bit output for fp32 input"):
        ext.layer_norm_forward(0, 0, 0, 0, 0, 0, 0, 0, 0, 4, 8, 1e-5, 1, 2, 0)
    with pytest.raises(ValueError, match="between 1 and rows blocks"):
        ext.layer_norm_backward(0, 0, 0, 0, 0, 0, 0, 0, 0, 4, 8, 5, 0, 0, 0)
    with pytest.raises(ValueError, match="unknown dtype code 7"):
        ext.layer_norm_forward(0, 0, 0, 0, 0, 0, 0, 0, 0, 4, 8, 1e-5, 7, 7, 0)
    assert ext.runtime_version() // 1000 >= 12


@built_only
@pytest.mark.skipif(CUDA, reason="a launch on null pointers would poison a real GPU's context")
def test_launch_errors_name_the_file_and_cuda_error_without_a_gpu():
    """No GPU: the launch fails, and the check after it says where and what CUDA said (RuntimeError)."""
    with pytest.raises(RuntimeError, match=r"layer_norm\.cu:\d+: cudaGetLastError\(\) failed: cuda\w+: "):
        _ext.ext.layer_norm_forward(0, 0, 0, 0, 0, 0, 0, 0, 0, 4, 8, 1e-5, 0, 0, 0)


@built_only
@pytest.mark.skipif(CUDA, reason="checks the no-GPU behaviour")
def test_without_gpu_status_and_fallback():
    """Built but no GPU: unavailable with the reason, explicit choice refused, backend=None runs the reference."""
    assert kernels.backend_status()["cuda"] == "no CUDA device (torch.cuda.is_available() is False)"
    with pytest.raises(ValueError, match="'cuda' is not available here .no CUDA device"):
        kernels.layer_norm(torch.randn(2, 8), None, None, backend="cuda")
    x = torch.randn(2, 8)
    assert kernels.backend_for("layer_norm", x, None, None, 1e-5, None) == "reference"
    assert not ck.supports("layer_norm", x, None, None, 1e-5, None)
    with pytest.raises(ValueError, match="layer_norm: the cuda backend runs on CUDA tensors, got a cpu tensor"):
        ck.layer_norm(x, None, None)


@built_only
def test_layer_norm_limits():
    """The widest rows: 1024 16-byte vectors, or 1024 elements when vectors do not divide the row."""
    from megaphi.kernels.cuda.layer_norm import max_hidden

    assert max_hidden(torch.bfloat16, 2048) == 8192 and max_hidden(torch.float32, 2048) == 4096
    assert max_hidden(torch.float16, 2049) == 1024


# ---- GPU: the LayerNorm kernel against the reference ----

def errors(fn, ref_fn, inputs):
    """[(the kernel's relative error vs fp32, the same-dtype reference's)] for each output and gradient."""
    exact = [t.detach().float().requires_grad_(t.requires_grad) if t is not None else None for t in inputs]
    truth, truth_grads, cot = run(ref_fn, exact)
    ref, ref_grads, _ = run(ref_fn, inputs, cot)
    out, grads, _ = run(fn, inputs, cot)
    truth, ref, out = truth + truth_grads, ref + ref_grads, out + grads
    assert [o.shape for o in out] == [t.shape for t in truth]
    return [(rel_error(a, t), rel_error(r, t)) for a, r, t in zip(out, ref, truth)]


def leaf(*shape, dtype, scale=1.0, shift=0.0):
    return (torch.randn(shape, device="cuda") * scale + shift).to(dtype).requires_grad_()


@gpu_only
@built_only
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("shape,residuals,affine", [
    ((4, 512, 2048), 2, True),   # phi-1: 16-byte vectors, both residuals
    ((3, 37, 2560), 1, True),    # phi-2's width
    ((5, 33, 100), 0, True),     # 100 is no multiple of 8: element by element
    ((2, 7, 1000), 2, False),    # neither weight nor bias
    ((17, 8192), 1, True),       # the widest 16-bit vectorized row (fp32 takes up to 4096: reference)
])
def test_gpu_layer_norm_matches_reference(dtype, shape, residuals, affine):
    from megaphi.kernels.cuda.layer_norm import max_hidden

    n = shape[-1]
    if n > max_hidden(dtype, n):
        pytest.skip(f"{dtype} rows of {n} are wider than the kernel takes")
    torch.manual_seed(n + residuals)
    x = leaf(*shape, dtype=dtype)
    rs = [leaf(*shape, dtype=dtype, scale=0.5) for _ in range(residuals)]
    w = leaf(n, dtype=dtype, scale=0.1, shift=1.0) if affine else None
    b = leaf(n, dtype=dtype, scale=0.1) if affine else None

    def call(fn):
        return lambda x, w, b, *rs: fn(x, w, b, 1e-5, tuple(rs) if rs else None)

    assert ck.supports("layer_norm", x, w, b, 1e-5, tuple(rs) if rs else None)
    slack = 1.0 if dtype == torch.float32 else 2.0
    for ours, theirs in errors(call(ck.layer_norm), call(reference.layer_norm), [x, w, b, *rs]):
        # fp32: the reference is the truth, so allow fp32 rounding; else at most slack x the reference's own error.
        assert ours <= slack * theirs + (1e-5 if dtype == torch.float32 else 1e-3), (ours, theirs)


@gpu_only
@built_only
def test_gpu_layer_norm_autocast_mixed_dtypes_and_offsets():
    """fp32 stream + bf16 branches under autocast: s fp32, y bf16; inputs at odd offsets; each grad in its dtype."""
    torch.manual_seed(3)
    base = torch.randn(6 * 256 + 1, device="cuda", requires_grad=True)
    x = base[1:].view(6, 256)  # 4 bytes past an aligned address: copied to aligned memory, not misread
    a, m = leaf(6, 256, dtype=torch.bfloat16), leaf(6, 256, dtype=torch.bfloat16)
    w, b = leaf(256, dtype=torch.float32, shift=1.0), leaf(256, dtype=torch.float32)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        y, s = ck.layer_norm(x, w, b, 1e-5, (a, m))
    assert y.dtype == torch.bfloat16 and s.dtype == torch.float32
    torch.testing.assert_close(s, x + a.float() + m.float())
    torch.testing.assert_close(y.float(), F.layer_norm(s, (256,), w, b, 1e-5), atol=2e-2, rtol=2e-2)
    gy = torch.randn_like(y)
    grads = torch.autograd.grad((y.float() * gy.float()).sum() + s.sum(), (base, a, w, b))
    ref_s = (x.detach() + a.detach().float() + m.detach().float()).requires_grad_()
    ref_w, ref_b = w.detach().requires_grad_(), b.detach().requires_grad_()
    ref_y = F.layer_norm(ref_s, (256,), ref_w, ref_b, 1e-5)
    ref = torch.autograd.grad((ref_y * gy.float()).sum() + ref_s.sum(), (ref_s, ref_w, ref_b))
    assert grads[1].dtype == torch.bfloat16 and grads[2].dtype == torch.float32
    assert rel_error(grads[0][1:].view(6, 256), ref[0]) < 1e-2
    assert rel_error(grads[1], ref[0]) < 1e-2
    assert rel_error(grads[2], ref[1]) < 1e-2 and rel_error(grads[3], ref[2]) < 1e-2


@gpu_only
@built_only
def test_gpu_backend_none_picks_cuda_layer_norm():
    """On a GPU the build runs on, backend=None takes the CUDA LayerNorm and falls back for what it cannot take."""
    assert kernels.backend_status()["cuda"] == "available"
    x = torch.randn(4, 2048, device="cuda", dtype=torch.bfloat16)
    w, b = torch.ones(2048, device="cuda"), torch.zeros(2048, device="cuda")
    assert kernels.backend_for("layer_norm", x, w, b, 1e-5, x) == "cuda"
    assert kernels.backend_for("layer_norm", x.double(), w, b, 1e-5, None) != "cuda"
    wide = torch.randn(2, 16384, device="cuda", dtype=torch.float32)
    assert kernels.backend_for("layer_norm", wide, None, None, 1e-5, None) != "cuda"
    with pytest.raises(ValueError, match="hidden size up to 4096"):
        kernels.layer_norm(wide, None, None, backend="cuda")
