"""Triton rotary attention and rotary kernels against the reference: CPU interpreter cases, and GPU cases."""

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is imported
pytest.importorskip("triton")

from megaphi.kernels import reference  # noqa: E402
from megaphi.kernels.triton import attention  # noqa: E402
from megaphi.kernels.triton.rotary import INTERPRET, apply_rotary  # noqa: E402

DEVICE = "cpu" if INTERPRET else "cuda"
GPU = pytest.mark.skipif(not torch.cuda.is_available() or INTERPRET, reason="needs CUDA (and TRITON_INTERPRET unset)")


def _qkv(batch, seq, heads, head_dim, dtype, seed, device=DEVICE, fused=False):
    """Fresh random q, k, v (leaves, requires_grad) and dO; fused: q, k, v are strided views of one qkv tensor."""
    gen = torch.Generator(device=device).manual_seed(seed)
    if fused:
        qkv = torch.randn(batch, seq, 3, heads, head_dim, generator=gen, device=device).to(dtype).requires_grad_()
        leaves = (qkv,)
    else:
        leaves = tuple(torch.randn(batch, seq, heads, head_dim, generator=gen, device=device).to(dtype)
                       .requires_grad_() for _ in range(3))
    do = torch.randn(batch, seq, heads, head_dim, generator=gen, device=device).to(dtype)
    return leaves, do


def _run(fn, leaves, do, rotary_dim, causal, dtype=None):
    """Output and gradients of fn over copies of leaves (cast to dtype), as fp32."""
    leaves = [x.detach().to(dtype or x.dtype).requires_grad_() for x in leaves]
    q, k, v = leaves[0].unbind(2) if len(leaves) == 1 else leaves
    out = fn(q, k, v, rotary_dim, 10000.0, causal)
    grads = torch.autograd.grad(out, leaves, do.to(out.dtype))
    return [t.float() for t in (out, *grads)]


def _assert_kernel_runs(leaves, rotary_dim):
    q = leaves[0][:, :, 0] if len(leaves) == 1 else leaves[0]
    reason = attention.unsupported_reason(q, q, q, rotary_dim)
    assert reason is None, f"the Triton kernel would fall back to the reference: {reason}"


def _check_close_fp32(leaves, do, rotary_dim, causal):
    _assert_kernel_runs(leaves, rotary_dim)
    ours = _run(attention.rotary_attention, leaves, do, rotary_dim, causal)
    ref = _run(reference.rotary_attention, leaves, do, rotary_dim, causal)
    for name, a, b in zip(("out", "dq", "dk", "dv"), ours, ref):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4, msg=lambda m: f"{name}: {m}")


def _check_close_lowp(leaves, do, rotary_dim, causal, atol):
    """Error vs the fp32 reference within 2x the low-precision reference's own error, plus atol."""
    _assert_kernel_runs(leaves, rotary_dim)
    ours = _run(attention.rotary_attention, leaves, do, rotary_dim, causal)
    ref_lowp = _run(reference.rotary_attention, leaves, do, rotary_dim, causal)
    ref32 = _run(reference.rotary_attention, leaves, do, rotary_dim, causal, dtype=torch.float32)
    for name, a, b, c in zip(("out", "dq", "dk", "dv"), ours, ref_lowp, ref32):
        err, ref_err = (a - c).abs().max().item(), (b - c).abs().max().item()
        assert err <= 2 * ref_err + atol, f"{name}: max error {err:.3g} vs the reference's own {ref_err:.3g}"


# (batch, seq, heads, head_dim, rotary_dim): seq 1, and tails past 1 to 3 blocks of 16 (the interpreter's blocks).
FP32_CASES = [
    (1, 1, 2, 64, 32),
    (2, 37, 1, 64, 32),
    (1, 50, 1, 64, 32),
    (1, 37, 1, 64, 64),    # full rotary
    (1, 29, 1, 128, 32),
    (1, 21, 1, 32, 16),
]


@pytest.mark.parametrize("causal", [True, False], ids=["causal", "full"])
@pytest.mark.parametrize("shape", FP32_CASES, ids=lambda s: "x".join(map(str, s)))
def test_fp32_matches_reference(shape, causal):
    batch, seq, heads, head_dim, rotary_dim = shape
    leaves, do = _qkv(batch, seq, heads, head_dim, torch.float32, seed=seq * 7 + head_dim)
    _check_close_fp32(leaves, do, rotary_dim, causal)


@pytest.mark.parametrize("causal", [True, False], ids=["causal", "full"])
@pytest.mark.parametrize("shape", [(1, 37, 1, 64, 32), (1, 19, 1, 128, 128)], ids=lambda s: "x".join(map(str, s)))
def test_fp16_matches_reference(shape, causal):
    batch, seq, heads, head_dim, rotary_dim = shape
    leaves, do = _qkv(batch, seq, heads, head_dim, torch.float16, seed=seq)
    _check_close_lowp(leaves, do, rotary_dim, causal, atol=1e-3)


def test_strided_inputs():
    """q, k, v as views of one fused qkv projection (seq stride 3 * heads * head_dim)."""
    leaves, do = _qkv(1, 33, 1, 64, torch.float32, seed=3, fused=True)
    assert not leaves[0].unbind(2)[0].is_contiguous()
    _check_close_fp32(leaves, do, 32, causal=True)


@pytest.mark.parametrize("rotary_k,unrotate", [("inloop", "postpass"), ("prepass", "postpass"),
                                               ("inloop", "epilogue")])
def test_fusion_variants(monkeypatch, rotary_k, unrotate):
    """The alternatives kept for timing (K rotated per block; dQ/dK un-rotated after the kernels) agree too."""
    monkeypatch.setattr(attention, "ROTARY_K", rotary_k)
    monkeypatch.setattr(attention, "UNROTATE", unrotate)
    leaves, do = _qkv(1, 33, 1, 64, torch.float32, seed=5)
    _check_close_fp32(leaves, do, 32, causal=True)


def test_no_grad_forward():
    leaves, _ = _qkv(1, 20, 2, 64, torch.float32, seed=6)
    with torch.no_grad():
        out = attention.rotary_attention(*leaves, 32)
    torch.testing.assert_close(out, reference.rotary_attention(*leaves, 32).detach(), atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("head_dim,rotary_dim,dropout_p,why", [(48, 32, 0.0, "head_dim"), (64, 24, 0.0, "rotary_dim"),
                                                               (64, 32, 0.1, "dropout_p")])
def test_unsupported_falls_back_to_reference(head_dim, rotary_dim, dropout_p, why):
    (q, k, v), _ = _qkv(1, 9, 2, head_dim, torch.float32, seed=7)
    assert why in attention.unsupported_reason(q, k, v, rotary_dim, dropout_p)
    torch.manual_seed(0)
    out = attention.rotary_attention(q, k, v, rotary_dim, dropout_p=dropout_p)
    torch.manual_seed(0)
    assert torch.equal(out, reference.rotary_attention(q, k, v, rotary_dim, dropout_p=dropout_p))


@pytest.mark.skipif(not INTERPRET, reason="only the interpreter mishandles bfloat16")
def test_interpreter_hands_bf16_to_reference():
    (q, k, v), _ = _qkv(1, 9, 1, 64, torch.bfloat16, seed=9)
    assert "bfloat16" in attention.unsupported_reason(q, k, v, 32)
    assert torch.equal(attention.rotary_attention(q, k, v, 32), reference.rotary_attention(q, k, v, 32))


def test_mismatched_shapes_raise():
    (q, k, v), _ = _qkv(1, 9, 2, 64, torch.float32, seed=8)
    with pytest.raises(ValueError, match="share one"):
        attention.rotary_attention(q, k[:, :5], v, 32)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("rotary_dim,offset", [(16, 0), (32, 5), (64, 0)])
def test_apply_rotary_matches_reference(dtype, rotary_dim, offset):
    (x, _, _), g = _qkv(2, 23, 3, 64, dtype, seed=rotary_dim + offset)
    ours = apply_rotary(x, rotary_dim, 10000.0, offset)
    ref = reference.apply_rotary(x, rotary_dim, 10000.0, offset)
    # fp16: the kernel rounds once from fp32, the reference after each op (1 ulp apart).
    tol = dict(atol=1e-6, rtol=1e-6) if dtype == torch.float32 else dict(atol=2e-3, rtol=2e-3)
    torch.testing.assert_close(ours, ref, **tol)
    torch.testing.assert_close(torch.autograd.grad(ours, x, g)[0], torch.autograd.grad(ref, x, g)[0], **tol)


# GPU: phi-1's attention shape at batch 2, plus head_dim 128 and an odd sequence length.
@GPU
@pytest.mark.parametrize("dtype,atol", [(torch.bfloat16, 1e-2), (torch.float16, 2e-3)], ids=["bf16", "fp16"])
@pytest.mark.parametrize("shape,causal", [((2, 2048, 32, 64, 32), True), ((2, 2048, 32, 64, 32), False),
                                          ((1, 1031, 16, 128, 32), True)],
                         ids=["phi1-causal", "phi1-full", "hd128-odd"])
def test_gpu_matches_reference(shape, causal, dtype, atol):
    batch, seq, heads, head_dim, rotary_dim = shape
    leaves, do = _qkv(batch, seq, heads, head_dim, dtype, seed=seq, device="cuda")
    _check_close_lowp(leaves, do, rotary_dim, causal, atol)


@GPU
@pytest.mark.parametrize("rotary_k,unrotate", [("inloop", "postpass"), ("prepass", "postpass")])
def test_gpu_fusion_variants_agree(monkeypatch, rotary_k, unrotate):
    leaves, do = _qkv(2, 1024, 8, 64, torch.bfloat16, seed=1, device="cuda")
    default = _run(attention.rotary_attention, leaves, do, 32, True)
    monkeypatch.setattr(attention, "ROTARY_K", rotary_k)
    monkeypatch.setattr(attention, "UNROTATE", unrotate)
    other = _run(attention.rotary_attention, leaves, do, 32, True)
    for a, b in zip(default, other):
        # Same math; only the rounding of the rotated operands and of dq/dk before the un-rotation may differ.
        torch.testing.assert_close(a, b, atol=2e-2, rtol=2e-2)
