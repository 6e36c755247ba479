"""The CUDA fused MLP (cuBLASLt epilogues) and rotary kernels against the reference, forward and backward.

On the CPU (the extension built, no GPU needed): the binding lists its kernels and rejects bad arguments before it
touches the GPU; the Python wrappers reject bad shapes and devices and say which inputs go to the reference.
Where CUDA is present: every kernel in bf16 and fp16 (and fp32 for the rotary) on fresh random inputs of odd sizes.
Tolerances: the MLP and rotary attention, whose reference itself rounds in the low dtype, must be within SLACK x the
reference's own relative error (Frobenius norm, vs the fp32 reference on the same inputs) + FLOOR; the rotary,
which rounds once, must match the exact fp32 rotation by the same tables to ROTARY_TOL (about one unit in the last
place). Run with -s to see the relative errors.
"""

import importlib

import pytest
import torch

from kernel_checks import rel_error, run
from megaphi import kernels
from megaphi.kernels import reference
from megaphi.model import ModelConfig, PhiForCausalLM

try:
    # The modules (the package's attribute `mlp` is the op, not the module).
    cuda_mlp = importlib.import_module("megaphi.kernels.cuda.mlp")
    cuda_rotary = importlib.import_module("megaphi.kernels.cuda.rotary")
    from megaphi.kernels.cuda._ext import ext
except ImportError as e:  # the extension is not built (a CPU torch, no nvcc, MEGAPHI_SKIP_CUDA)
    pytestmark = pytest.mark.skip(reason=f"the CUDA extension is not built ({e})")

CUDA = torch.cuda.is_available()
gpu_only = pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU")
HALF = [torch.bfloat16, torch.float16]
SLACK, FLOOR = 2.0, 1e-3
ROTARY_TOL = {torch.float32: dict(rtol=1e-5, atol=1e-6), torch.float16: dict(rtol=2**-10, atol=1e-5),
              torch.bfloat16: dict(rtol=2**-7, atol=1e-5)}


def randn(*shape, dtype=torch.float32, scale=1.0, grad=True, device="cuda"):
    """A fresh random tensor."""
    return (torch.randn(shape, device=device) * scale).to(dtype).requires_grad_(grad)




def assert_as_accurate_as_reference(fn, ref_fn, inputs, what):
    """fn's outputs and grads are within SLACK x the reference's own error in the inputs' dtype (vs fp32) + FLOOR."""
    exact = [t.detach().float().requires_grad_(t.requires_grad) if isinstance(t, torch.Tensor)
             and t.is_floating_point() else t for t in inputs]
    truth, truth_grads, cot = run(ref_fn, exact)
    ref, ref_grads, _ = run(ref_fn, inputs, cot)
    out, grads, _ = run(fn, inputs, cot)
    assert len(out) == len(truth) and len(grads) == len(truth_grads)
    for i, (a, r, t) in enumerate(zip(out + grads, ref + ref_grads, truth + truth_grads)):
        assert a.shape == t.shape and a.dtype == r.dtype
        err, ref_err = rel_error(a, t), rel_error(r, t)
        print(f"{what} tensor {i}: relative error {err:.2e} (reference in {r.dtype}: {ref_err:.2e})")
        assert err <= SLACK * ref_err + FLOOR, (what, i, err, ref_err)
    return out, grads


# ---- CPU: the binding and the wrappers' argument checks ----

def test_extension_lists_the_mlp_and_rotary_kernels():
    assert {"gemm", "rotary"} <= set(ext.KERNELS)
    assert set(ext.GEMM_EPILOGUES) == {"none", "bias", "gelu", "gelu_bias", "gelu_aux", "gelu_aux_bias", "dgelu",
                                       "dgelu_bgrad", "bgrad_a"}


def test_binding_rejects_bad_arguments_before_touching_the_gpu():
    """The C++ checks run first: these raise ValueError on a machine without a GPU too (fake pointers)."""
    e = ext.GEMM_EPILOGUES
    gemm = dict(dtype=1, a=256, b=512, d=768, m=4, n=16, k=8, trans_a=False, trans_b=False, lda=8, ldb=16, ldd=16,
                epilogue=e["gelu_aux_bias"], bias=1024, aux=2048, aux_ld=16, allow_tf32=False, workspace=0,
                workspace_bytes=0, stream=0)
    for change, message in [(dict(aux_ld=12), "aux_ld must be >= N and a multiple of 8"),
                            (dict(bias=0), "needs a bias"), (dict(aux=0), "needs an aux"),
                            (dict(k=0), "M, N and K must be positive"), (dict(lda=4), "lda is smaller"),
                            (dict(epilogue=99), "unknown epilogue code 99"), (dict(dtype=7), "unknown dtype code"),
                            (dict(workspace_bytes=1024), "needs a workspace pointer")]:
        with pytest.raises((ValueError, RuntimeError), match=message):
            ext.gemm(**{**gemm, **change})
    rotary = dict(dtype=1, inputs=[256], outputs=[512], in_strides=[(64, 64, 64)], out_strides=[(64, 64, 64)],
                  rotate_count=1, cos=1024, sin=2048, batch=1, seq=1, heads=1, head_dim=64, rotary_dim=32,
                  pos_offset=0, conjugate=False, stream=0)
    for change, message in [(dict(rotary_dim=31), "rotary_dim must be even"),
                            (dict(rotary_dim=128), "rotary_dim must be even and in"),
                            (dict(head_dim=2048, rotary_dim=32), "head_dim must be in"),
                            (dict(cos=0), "cos and sin tables"), (dict(rotate_count=2), "rotate_count"),
                            (dict(outputs=[512, 768]), "same length"), (dict(pos_offset=-1), "negative position")]:
        with pytest.raises(ValueError, match=message):
            ext.rotary(**{**rotary, **change})
    # Nothing to do (zero rows) is not an error and launches nothing, even on the null data_ptr() of empty tensors.
    ext.rotary(**{**rotary, "seq": 0})
    ext.rotary(**{**rotary, "batch": 0, "inputs": [0], "outputs": [0]})
    with pytest.raises(ValueError, match="null tensor pointer"):
        ext.rotary(**{**rotary, "inputs": [0]})


def test_wrappers_reject_bad_shapes_and_devices():
    cpu = dict(device="cpu", dtype=torch.float16)
    x, w1, b1, w2, b2 = randn(3, 16, **cpu), randn(32, 16, **cpu), randn(32, **cpu), randn(16, 32, **cpu), None
    with pytest.raises(ValueError, match="CUDA tensors"):
        cuda_mlp.mlp(x, w1, b1, w2, b2)
    with pytest.raises(ValueError, match="do not chain"):
        cuda_mlp.mlp(x, w1, b1, randn(16, 24, **cpu), b2)
    with pytest.raises(ValueError, match="b1 must have shape"):
        cuda_mlp.mlp(x, w1, randn(31, **cpu), w2, b2)
    with pytest.raises(ValueError, match="share one dtype"):
        cuda_mlp.mlp(x, w1.float(), b1, w2, b2)
    q = randn(2, 5, 3, 64, **cpu)
    with pytest.raises(ValueError, match="CUDA tensors"):
        cuda_rotary.apply_rotary(q, 32)
    with pytest.raises(ValueError, match="batch, seq, heads, head_dim"):
        cuda_rotary.apply_rotary(q[0], 32)
    with pytest.raises(ValueError, match="position_offset"):
        cuda_rotary.apply_rotary(q, 32, position_offset=-1)
    with pytest.raises(ValueError, match="share one"):
        cuda_rotary.rotary_attention(q, q, q[:, :4], 32)
    with pytest.raises(ValueError, match=r"3 \* heads \* head_dim"):
        cuda_rotary.rotary_qkv(randn(2, 5, 100, **cpu), 4, 32)
    with pytest.raises(ValueError, match="CUDA tensors"):
        cuda_rotary.rotary_qkv(randn(2, 5, 3 * 4 * 16, **cpu), 4, 8)


def test_what_goes_to_the_reference_is_said():
    meta = dict(device="cpu", grad=False)
    x, w1, w2 = randn(4, 64, **meta), randn(256, 64, **meta), randn(64, 256, **meta)
    assert "float16 and bfloat16" in cuda_mlp.mlp_unsupported(x, w1, None, w2, None)
    half = dict(dtype=torch.float16, **meta)
    assert cuda_mlp.mlp_unsupported(randn(4, 64, **half), randn(256, 64, **half), None, randn(64, 256, **half),
                                    None) is None
    assert "multiple of 8" in cuda_mlp.mlp_unsupported(randn(4, 60, **half), randn(256, 60, **half), None,
                                                       randn(60, 256, **half), None)
    assert "empty" in cuda_mlp.mlp_unsupported(randn(0, 64, **half), randn(256, 64, **half), None,
                                               randn(64, 256, **half), None)
    q = randn(1, 3, 2, 64, **half)
    assert cuda_rotary.rotary_unsupported(q, 32) is None
    assert "float64" in cuda_rotary.rotary_unsupported(q.double(), 32)
    assert "rotary_dim 31" in cuda_rotary.rotary_unsupported(q, 31)
    assert "rotary_dim 66" in cuda_rotary.rotary_unsupported(q, 66)
    assert "head_dim 2048" in cuda_rotary.rotary_unsupported(randn(1, 1, 1, 2048, **half), 32)


# ---- GPU: the MLP ----

def mlp_inputs(shape, ffn, dtype, b1=True, b2=True, scale=1.0):
    hidden = shape[-1]
    x = randn(*shape, dtype=dtype)
    w1 = randn(ffn, hidden, dtype=dtype, scale=scale * hidden**-0.5)
    w2 = randn(hidden, ffn, dtype=dtype, scale=scale * ffn**-0.5)
    return [x, w1, randn(ffn, dtype=dtype) if b1 else None, w2, randn(hidden, dtype=dtype) if b2 else None]


@gpu_only
@pytest.mark.parametrize("dtype", HALF)
@pytest.mark.parametrize("shape,ffn,b1,b2", [((3, 37, 200), 808, True, True), ((37, 96), 256, True, False),
                                            ((1, 5, 64), 128, False, True)], ids=["3x37x200", "37x96", "no-b1"])
def test_gpu_mlp(dtype, shape, ffn, b1, b2):
    torch.manual_seed(20)
    inputs = mlp_inputs(shape, ffn, dtype, b1, b2)
    out, _ = assert_as_accurate_as_reference(cuda_mlp.mlp, reference.mlp, inputs, f"mlp {shape} {dtype}")
    assert out[0].shape == shape and out[0].dtype == dtype


def gelu_grad(x):
    """d gelu_tanh / dx at x, fp32."""
    x = x.float().requires_grad_()
    (g,) = torch.autograd.grad(reference.gelu_tanh(x).sum(), (x,))
    return g


@gpu_only
@pytest.mark.parametrize("trans_a,trans_b,epilogue", [
    (False, False, "none"), (False, True, "bias"), (True, False, "none"), (True, True, "bias"),  # the layout map
    (False, True, "gelu_aux_bias"), (False, False, "dgelu_bgrad"), (True, False, "bgrad_a"),  # as the MLP calls them
])
def test_gpu_gemm_layouts_and_epilogues(trans_a, trans_b, epilogue):
    """One row-major GEMM and its epilogue at a time, fp16, against fp32 torch: pins a failing MLP to one GEMM."""
    torch.manual_seed(24)
    m, n, k = 200, 136, 72  # no two alike, each a multiple of 8
    a = randn(*((k, m) if trans_a else (m, k)), dtype=torch.float16, scale=k**-0.5, grad=False)
    b = randn(*((n, k) if trans_b else (k, n)), dtype=torch.float16, grad=False)
    acc = (a.float().t() if trans_a else a.float()) @ (b.float().t() if trans_b else b.float())
    d = torch.empty(m, n, dtype=torch.float16, device="cuda")
    close = dict(rtol=4e-3, atol=4e-3)
    if epilogue in ("none", "bias"):
        bias = randn(n, dtype=torch.float16, grad=False) if epilogue == "bias" else None
        assert cuda_mlp.gemm(a, b, d, trans_a, trans_b, epilogue, bias)
        torch.testing.assert_close(d.float(), acc + (0 if bias is None else bias.float()), **close)
    elif epilogue == "gelu_aux_bias":
        bias, pre = randn(n, dtype=torch.float16, grad=False), torch.empty_like(d)
        assert cuda_mlp.gemm(a, b, d, trans_a, trans_b, epilogue, bias, pre)
        torch.testing.assert_close(pre.float(), acc + bias.float(), **close)  # the stored pre-activation
        torch.testing.assert_close(d.float(), reference.gelu_tanh(pre.float()), **close)
        # tanh GELU, not erf: they differ by up to 5e-4, which only the statistics of many elements tell apart.
        erf = torch.nn.functional.gelu(pre.float())
        assert rel_error(d, reference.gelu_tanh(pre.float())) < rel_error(d, erf)
    elif epilogue == "dgelu_bgrad":
        aux, bias = randn(m, n, dtype=torch.float16, grad=False), torch.empty(n, dtype=torch.float16, device="cuda")
        assert cuda_mlp.gemm(a, b, d, trans_a, trans_b, epilogue, bias, aux)
        expected = acc * gelu_grad(aux)
        torch.testing.assert_close(d.float(), expected, **close)
        torch.testing.assert_close(bias.float(), expected.sum(0), rtol=1e-2, atol=2e-2)  # over the M rows of D
    else:  # bgrad_a: the bias gradient (length M) is op(A) summed over K; False: cuBLASLt lacks it, d is plain
        bias = torch.full((m,), float("nan"), dtype=torch.float16, device="cuda")
        fused = cuda_mlp.gemm(a, b, d, trans_a, trans_b, epilogue, bias)
        torch.testing.assert_close(d.float(), acc, **close)
        print(f"bgrad_a fused by cuBLASLt: {fused}")
        if fused:
            torch.testing.assert_close(bias.float(), a.float().sum(0), rtol=1e-2, atol=2e-2)


@gpu_only
def test_gpu_mlp_frozen_weights_no_grad_and_fallbacks():
    torch.manual_seed(21)
    x, w1, b1, w2, b2 = mlp_inputs((2, 9, 64), 192, torch.bfloat16)
    with torch.no_grad():
        out = cuda_mlp.mlp(x, w1, b1, w2, b2)
    assert rel_error(out, reference.mlp(x.float(), w1.float(), b1.float(), w2.float(), b2.float())) < 1e-2
    w1.requires_grad_(False)
    w2.requires_grad_(False)  # dw2 off, db2 on: the bias gradient comes from dy alone
    gx, gb1, gb2 = torch.autograd.grad(cuda_mlp.mlp(x, w1, b1, w2, b2).float().sum(), (x, b1, b2))
    rx, rb1, rb2 = torch.autograd.grad(reference.mlp(x, w1, b1, w2, b2).float().sum(), (x, b1, b2))
    for g, r in ((gx, rx), (gb1, rb1), (gb2, rb2)):
        assert g.dtype == r.dtype and rel_error(g, r) < 2e-2
    # fp32 and sizes that are not multiples of 8 go to the reference, and still agree with it.
    for args in (mlp_inputs((7, 64), 128, torch.float32), mlp_inputs((7, 60), 100, torch.float16)):
        torch.testing.assert_close(cuda_mlp.mlp(*args), reference.mlp(*args))


@gpu_only
def test_gpu_mlp_under_autocast_runs_in_the_autocast_dtype():
    torch.manual_seed(22)
    inputs = mlp_inputs((4, 33, 128), 512, torch.float32)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        out = cuda_mlp.mlp(*inputs)
        ref = reference.mlp(*inputs)
    assert out.dtype == torch.bfloat16 and rel_error(out, ref) < 1e-2
    grads = torch.autograd.grad(out.float().sum(), [inputs[0], inputs[1]])
    assert [g.dtype for g in grads] == [torch.float32, torch.float32]


@gpu_only
@pytest.mark.parametrize("dtype", HALF)
def test_gpu_mlp_phi1(dtype):
    torch.manual_seed(23)
    inputs = mlp_inputs((2, 1024, 2048), 8192, dtype, scale=0.5)
    assert_as_accurate_as_reference(cuda_mlp.mlp, reference.mlp, inputs, f"mlp phi-1 {dtype}")


# ---- GPU: the rotary ----

def rotate_exact(x, rotary_dim, base=10000.0, offset=0, table_dtype=None):
    """x rotated in fp32 by the tables the kernels use (the reference's, in table_dtype): one rounding away."""
    cos, sin = reference.rotary_tables(offset + x.shape[1], rotary_dim, base, x.device, table_dtype or x.dtype)
    cos, sin = cos[offset:, None, :].float(), sin[offset:, None, :].float()
    half = rotary_dim // 2
    x = x.float()
    x1, x2, rest = x[..., :half], x[..., half:rotary_dim], x[..., rotary_dim:]
    return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin, rest), dim=-1)


def assert_rotates_exactly(fn, exact_fn, inputs, dtype):
    """fn's outputs and grads match exact_fn (fp32, on fp32 copies of the same inputs) to ROTARY_TOL[dtype]."""
    exact = [t.detach().float().requires_grad_() for t in inputs]
    # Cotangents representable in dtype: the kernel's backward sees them rounded to dtype.
    probe = exact_fn(*exact)
    cot = [torch.randn(o.shape, device=o.device).to(dtype).float()
           for o in (probe if isinstance(probe, tuple) else (probe,))]
    truth, truth_grads, _ = run(exact_fn, exact, cot)
    out, grads, _ = run(fn, inputs, cot)
    for a, t in zip(out + grads, truth + truth_grads):
        assert a.shape == t.shape and a.dtype == dtype
        torch.testing.assert_close(a.float(), t, **ROTARY_TOL[dtype])
    return out, grads


@gpu_only
@pytest.mark.parametrize("dtype", [*HALF, torch.float32])
@pytest.mark.parametrize("shape,rotary_dim,offset", [((2, 37, 5, 64), 32, 0), ((3, 17, 3, 80), 16, 11),
                                                     ((1, 9, 2, 10), 6, 3), ((2, 4, 1, 64), 64, 0)],
                         ids=["phi1", "hd80-offset", "hd10-rd6", "full"])
def test_gpu_apply_rotary(dtype, shape, rotary_dim, offset):
    torch.manual_seed(30)
    x = randn(*shape, dtype=dtype)
    assert_rotates_exactly(lambda x: cuda_rotary.apply_rotary(x, rotary_dim, 10000.0, offset),
                           lambda x: rotate_exact(x, rotary_dim, 10000.0, offset, dtype), [x], dtype)
    # The contract: the reference op in the same dtype, which rounds after every step.
    eps = torch.finfo(dtype).eps
    torch.testing.assert_close(cuda_rotary.apply_rotary(x, rotary_dim, 10000.0, offset),
                               reference.apply_rotary(x, rotary_dim, 10000.0, offset), rtol=4 * eps, atol=8 * eps)


@gpu_only
@pytest.mark.parametrize("dtype", HALF)
def test_gpu_rotary_qkv_packed_in_and_out(dtype):
    """The fused QKV projection's output in, q/k/v out; the gradient comes back as one packed dqkv."""
    torch.manual_seed(31)
    batch, seq, heads, head_dim, rotary_dim, offset = 2, 45, 3, 64, 32, 7
    qkv = randn(batch, seq, 3 * heads * head_dim, dtype=dtype)

    def exact(qkv):
        q, k, v = qkv.unflatten(-1, (3, heads, head_dim)).unbind(2)
        return (rotate_exact(q, rotary_dim, 500.0, offset, dtype), rotate_exact(k, rotary_dim, 500.0, offset, dtype),
                v)

    out, (dqkv,) = assert_rotates_exactly(lambda t: cuda_rotary.rotary_qkv(t, heads, rotary_dim, 500.0, offset),
                                          exact, [qkv], dtype)
    assert all(t.is_contiguous() and t.shape == (batch, seq, heads, head_dim) for t in out)
    assert dqkv.shape == qkv.shape and dqkv.is_contiguous()
    # v is copied exactly; q and k read through the packed strides equal apply_rotary on contiguous copies.
    q, k, v = qkv.detach().unflatten(-1, (3, heads, head_dim)).unbind(2)
    assert torch.equal(out[2], v)
    assert torch.equal(out[0], cuda_rotary.apply_rotary(q.contiguous(), rotary_dim, 500.0, offset))
    assert torch.equal(out[1], cuda_rotary.apply_rotary(k.contiguous(), rotary_dim, 500.0, offset))


@gpu_only
@pytest.mark.parametrize("dtype", HALF)
@pytest.mark.parametrize("shape,rotary_dim,causal", [((2, 129, 4, 64), 32, True), ((1, 77, 3, 128), 64, False)],
                         ids=["phi1-causal", "hd128-full"])
def test_gpu_rotary_attention(dtype, shape, rotary_dim, causal):
    torch.manual_seed(32)
    q, k, v = (randn(*shape, dtype=dtype) for _ in range(3))
    assert_as_accurate_as_reference(lambda q, k, v: cuda_rotary.rotary_attention(q, k, v, rotary_dim, causal=causal),
                                    lambda q, k, v: reference.rotary_attention(q, k, v, rotary_dim, causal=causal),
                                    [q, k, v], f"rotary_attention {shape} {dtype}")


@gpu_only
def test_gpu_rotary_attention_on_views_of_a_packed_qkv():
    """q, k, v as the strided views a fused projection gives: same result as on contiguous copies."""
    torch.manual_seed(33)
    qkv = randn(2, 50, 3 * 4 * 64, dtype=torch.bfloat16)
    q, k, v = qkv.unflatten(-1, (3, 4, 64)).unbind(2)
    out = cuda_rotary.rotary_attention(q, k, v, 32)
    (dqkv,) = torch.autograd.grad(out.float().sum(), (qkv,))
    copies = [t.detach().contiguous().requires_grad_() for t in (q, k, v)]
    ref = cuda_rotary.rotary_attention(*copies, 32)
    ref_grads = torch.autograd.grad(ref.float().sum(), copies)
    # (not bitwise: flash attention's backward accumulates dq with atomics)
    torch.testing.assert_close(out, ref)
    torch.testing.assert_close(dqkv, torch.cat([g.flatten(2) for g in ref_grads], dim=-1))


@gpu_only
def test_gpu_dispatch_runs_the_cuda_ops():
    torch.manual_seed(34)
    inputs = mlp_inputs((5, 64), 256, torch.float16, b2=False)
    assert kernels.backend_for("mlp", *inputs, backend="cuda") == "cuda"
    torch.testing.assert_close(kernels.mlp(*inputs, backend="cuda"), cuda_mlp.mlp(*inputs))
    q, k, v = (randn(1, 16, 2, 64, dtype=torch.bfloat16) for _ in range(3))
    assert kernels.backend_for("rotary_attention", q, k, v, 32, 10000.0, True, 0.0) == "cuda"
    torch.testing.assert_close(kernels.rotary_attention(q, k, v, 32, backend="cuda"),
                               cuda_rotary.rotary_attention(q, k, v, 32))
    assert torch.equal(kernels.apply_rotary(q, 32, position_offset=5, backend="cuda"),
                       cuda_rotary.apply_rotary(q, 32, position_offset=5))
    empty = randn(1, 0, 2, 64, dtype=torch.bfloat16)
    assert cuda_rotary.apply_rotary(empty, 32).shape == empty.shape


@gpu_only
def test_gpu_tiny_model_cuda_backend_matches_reference():
    """A two-layer phi under bf16 autocast: loss and gradients through backend cuda vs reference."""
    config = ModelConfig(vocab_size=1000, num_layers=2, hidden_size=256, num_attention_heads=4, ffn_hidden_size=1024,
                         max_position_embeddings=128)
    torch.manual_seed(35)
    model = PhiForCausalLM(config).cuda()
    ids = torch.randint(0, 1000, (2, 128), device="cuda")
    # The key bias's gradient is zero in exact arithmetic (softmax ignores a shift shared by all keys): noise only.
    names, params = zip(*[(n, p) for n, p in model.named_parameters() if not n.endswith("k_proj.bias")])
    results = {}
    for backend in ("reference", "cuda"):
        kernels.set_backend(backend)
        try:
            with torch.autocast("cuda", dtype=torch.bfloat16):
                loss = model(ids, labels=ids.roll(-1, 1))
            results[backend] = (loss, torch.autograd.grad(loss, params))
        finally:
            kernels.set_backend(None)
    (ref, ref_grads), (loss, grads) = results["reference"], results["cuda"]
    torch.testing.assert_close(loss, ref, atol=2e-2, rtol=2e-2)
    for name, g, r in zip(names, grads, ref_grads):
        assert rel_error(g, r) < 5e-2, name
