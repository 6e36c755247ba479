"""The Triton LayerNorm, MLP, GELU and linear cross-entropy against the reference, forward and backward.

On CPU the kernels run in the Triton interpreter (TRITON_INTERPRET=1, set before triton is imported) on tiny, odd
shapes in fp32 (tight: the interpreter's dots are exact) and fp16 (against the fp32 reference on the same fp16
inputs, tolerance TOL[fp16]). Where CUDA is present the same tests run on the GPU, plus bf16/fp16 checks at phi-1
sizes that compare each kernel's error with the reference's own error in that dtype.
"""

import os
import socket
import subprocess
import sys

import torch

CUDA = torch.cuda.is_available()
if not CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch.distributed as dist  # noqa: E402
import torch.multiprocessing as mp  # noqa: E402
import torch.nn.functional as F  # noqa: E402

pytest.importorskip("triton", reason="the triton extra is not installed")

from kernel_checks import run  # noqa: E402
from megaphi import kernels  # noqa: E402
from megaphi.kernels import reference  # noqa: E402
from megaphi.kernels import triton as tk  # noqa: E402
from megaphi.model import ModelConfig, PhiForCausalLM  # noqa: E402

DEVICE = "cuda" if CUDA else "cpu"
TOL = {torch.float32: dict(atol=1e-4, rtol=1e-4), torch.float16: dict(atol=2e-2, rtol=2e-2)}
gpu_only = pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU")


def randn(*shape, dtype=torch.float32, scale=1.0, grad=True):
    """A fresh random tensor on DEVICE."""
    return (torch.randn(shape, device=DEVICE) * scale).to(dtype).requires_grad_(grad)



def assert_matches_reference(fn, ref_fn, inputs, dtype):
    """fn's outputs and gradients equal ref_fn's, which runs on fp32 copies of the inputs."""
    ref_inputs = [t.detach().float().requires_grad_(t.requires_grad) if isinstance(t, torch.Tensor)
                  and t.is_floating_point() else t for t in inputs]
    ref_out, ref_grads, cotangents = run(ref_fn, ref_inputs)
    out, grads, _ = run(fn, inputs, cotangents)
    assert len(out) == len(ref_out) and len(grads) == len(ref_grads)
    for a, b in zip(out + grads, ref_out + ref_grads):
        assert a.shape == b.shape
        torch.testing.assert_close(a.float(), b.float(), **TOL[dtype])
    return out, grads


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("residual", [None, "tensor", "tuple"])
def test_layer_norm(dtype, residual):
    torch.manual_seed(0)
    shape = (37, 80) if residual == "tensor" else (3, 7, 96)
    x = randn(*shape, dtype=dtype)
    w = (torch.randn(shape[-1], device=DEVICE) * 0.3 + 1).to(dtype).requires_grad_()
    b = randn(shape[-1], dtype=dtype)
    residuals = [randn(*shape, dtype=dtype) for _ in range({None: 0, "tensor": 1, "tuple": 2}[residual])]

    def call(fn):
        def f(x, w, b, *rs):
            return fn(x, w, b, 1e-5, None if residual is None else rs[0] if residual == "tensor" else tuple(rs))
        return f

    out, grads = assert_matches_reference(call(tk.layer_norm), call(reference.layer_norm), [x, w, b, *residuals],
                                          dtype)
    assert all(o.dtype == dtype for o in out)
    for g in grads[3:]:  # x and every residual get the same gradient
        torch.testing.assert_close(g, grads[0], atol=0, rtol=0)


def test_layer_norm_mixed_dtypes_without_weight_and_only_the_sum_used():
    """An fp32 stream plus fp16 branch outputs (the autocast case): the sum is fp32, each input's grad its dtype."""
    torch.manual_seed(1)
    x, a, m = randn(2, 5, 72), randn(2, 5, 72, dtype=torch.float16), randn(2, 5, 72, dtype=torch.float16)
    y, s = tk.layer_norm(x, None, None, 1e-5, (a, m))
    assert s.dtype == torch.float32 and y.dtype == torch.float32
    torch.testing.assert_close(s, x + a.float() + m.float())
    torch.testing.assert_close(y, F.layer_norm(s, (72,), eps=1e-5), atol=1e-5, rtol=1e-5)
    gx, ga = torch.autograd.grad(s.sum() * 2, (x, a))  # y unused: ds alone flows through
    assert ga.dtype == torch.float16
    torch.testing.assert_close(gx, torch.full_like(x, 2.0))
    torch.testing.assert_close(ga.float(), gx)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_gelu_tanh(dtype):
    torch.manual_seed(2)
    x = randn(5, 77, dtype=dtype, scale=3.0)
    assert_matches_reference(tk.gelu_tanh, reference.gelu_tanh, [x], dtype)
    big = torch.tensor([-60.0, -20.0, 0.0, 20.0, 60.0], device=DEVICE, dtype=dtype)
    torch.testing.assert_close(tk.gelu_tanh(big).float(), reference.gelu_tanh(big.float()), atol=1e-6, rtol=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("shape,ffn,with_b2", [((2, 9, 64), 96, True), ((37, 80), 200, False)])
def test_mlp(dtype, shape, ffn, with_b2):
    torch.manual_seed(3)
    hidden = shape[-1]
    x = randn(*shape, dtype=dtype)
    w1, b1 = randn(ffn, hidden, dtype=dtype, scale=hidden**-0.5), randn(ffn, dtype=dtype)
    w2, b2 = randn(hidden, ffn, dtype=dtype, scale=ffn**-0.5), randn(hidden, dtype=dtype) if with_b2 else None
    out, _ = assert_matches_reference(tk.mlp, reference.mlp, [x, w1, b1, w2, b2], dtype)
    assert out[0].shape == shape and out[0].dtype == dtype


def test_mlp_without_grad_and_with_frozen_weights():
    torch.manual_seed(4)
    x, w1, b1, w2 = randn(10, 64), randn(96, 64, scale=0.1), randn(96), randn(64, 96, scale=0.1)
    with torch.no_grad():
        out = tk.mlp(x, w1, b1, w2, None)
    torch.testing.assert_close(out, reference.mlp(x, w1, b1, w2, None).detach(), **TOL[torch.float32])
    w1.requires_grad_(False)
    (gx,) = torch.autograd.grad(tk.mlp(x, w1, b1.detach(), w2.detach(), None).sum(), (x,))
    (rx,) = torch.autograd.grad(reference.mlp(x, w1, b1, w2, None).sum(), (x,))
    torch.testing.assert_close(gx, rx, **TOL[torch.float32])


def lce_inputs(dtype=torch.float32, tokens=(2, 11), hidden=64, vocab=300, bias=True, ignore=-100):
    """hidden (tokens..., hidden), weight (vocab, hidden), bias, labels with some ignored positions."""
    h = randn(*tokens, hidden, dtype=dtype)
    w = randn(vocab, hidden, dtype=dtype, scale=hidden**-0.5)
    b = randn(vocab, dtype=dtype) if bias else None
    labels = torch.randint(0, vocab, tokens, device=DEVICE)
    labels.view(-1)[:3] = ignore
    labels.view(-1)[-1] = ignore
    return h, w, b, labels


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("chunk", [7, None])
def test_linear_cross_entropy(reduction, chunk):
    torch.manual_seed(5)
    h, w, b, labels = lce_inputs()

    def fn(h, w, b):
        return tk.linear_cross_entropy(h, w, b, labels, -100, reduction, None, chunk_size=chunk)

    out, grads = assert_matches_reference(
        fn, lambda h, w, b: reference.linear_cross_entropy(h, w, b, labels, -100, reduction), [h, w, b],
        torch.float32)
    assert out[0].dtype == torch.float32
    assert torch.all(grads[0].view(-1, 64)[:3] == 0)  # ignored positions get no gradient
    if reduction == "none":
        assert out[0].shape == labels.shape and torch.all(out[0].view(-1)[:3] == 0)


@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_linear_cross_entropy_fp16_no_bias_custom_ignore_index(reduction):
    torch.manual_seed(6)
    h, w, _, labels = lce_inputs(torch.float16, tokens=(23,), hidden=96, vocab=131, bias=False, ignore=5)

    def fn(h, w):
        return tk.linear_cross_entropy(h, w, None, labels, 5, reduction, None, chunk_size=10)

    assert_matches_reference(fn, lambda h, w: reference.linear_cross_entropy(h, w, None, labels, 5, reduction),
                             [h, w], torch.float16)


def test_linear_cross_entropy_without_grad_and_errors():
    torch.manual_seed(7)
    h, w, b, labels = lce_inputs(tokens=(9,))
    with torch.no_grad():
        loss = tk.linear_cross_entropy(h, w, b, labels)
    assert loss.grad_fn is None
    torch.testing.assert_close(loss, reference.linear_cross_entropy(h, w, b, labels), **TOL[torch.float32])
    with pytest.raises(ValueError, match="reduction must be"):
        tk.linear_cross_entropy(h, w, b, labels, reduction="max")
    with pytest.raises(ValueError, match="labels .* must be hidden's leading dims"):
        tk.linear_cross_entropy(h, w, b, labels[:4])


def _vocab_parallel_worker(rank, world, port):
    """One rank of a 2-process gloo group: its vocab shard's loss and grads against the full-vocab reference."""
    torch.set_num_threads(1)  # a forked child must not reuse the parent's OpenMP pool
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        torch.manual_seed(8)  # the same full tensors on every rank
        h, w, b, labels = lce_inputs(tokens=(3, 5), hidden=64, vocab=2 * 75)
        shard = slice(rank * 75, (rank + 1) * 75)
        for reduction in ("mean", "sum", "none"):
            ref = reference.linear_cross_entropy(h, w, b, labels, -100, reduction)  # no group: the full vocab
            cot = torch.rand(ref.shape)
            rh, rw, rb = torch.autograd.grad((ref * cot).sum(), (h, w, b))
            ws, bs = w.detach()[shard].requires_grad_(), b.detach()[shard].requires_grad_()
            loss = tk.linear_cross_entropy(h, ws, bs, labels, -100, reduction, dist.group.WORLD, chunk_size=4)
            gh, gw, gb = torch.autograd.grad((loss * cot).sum(), (h, ws, bs))
            torch.testing.assert_close(loss, ref, **TOL[torch.float32])
            dist.all_reduce(gh)  # the tensor-parallel layer's job: sum the shards' contributions
            torch.testing.assert_close(gh, rh, **TOL[torch.float32])
            torch.testing.assert_close(gw, rw[shard], **TOL[torch.float32])
            torch.testing.assert_close(gb, rb[shard], **TOL[torch.float32])
    finally:
        dist.destroy_process_group()


@pytest.mark.skipif(CUDA, reason="the 2-process gloo run uses CPU tensors in the interpreter")
def test_linear_cross_entropy_vocab_parallel_two_processes():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    # fork: the children reuse this process's imports (spawn would import torch and triton again, ~10x slower)
    mp.start_processes(_vocab_parallel_worker, args=(2, port), nprocs=2, join=True, start_method="fork")


def test_tiny_model_triton_backend_matches_reference():
    """A two-layer phi: loss and every parameter's gradient through kernels.* with backend triton vs reference."""
    config = ModelConfig(vocab_size=100, num_layers=2, hidden_size=64, num_attention_heads=2, ffn_hidden_size=96,
                         max_position_embeddings=16, rotary_dim=16, make_vocab_size_divisible_by=1)
    torch.manual_seed(9)
    model = PhiForCausalLM(config).to(DEVICE)
    with torch.no_grad():  # non-trivial LayerNorm and bias values
        for name, p in model.named_parameters():
            if p.dim() == 1:
                p.add_(torch.randn_like(p) * 0.1)
    ids = torch.randint(0, 100, (2, 12), device=DEVICE)
    labels = ids.roll(-1, 1)
    labels[:, -1] = -100
    results = {}
    for backend in ("reference", "triton"):
        kernels.set_backend(backend)
        try:
            loss = model(ids, labels=labels)
            results[backend] = (loss, torch.autograd.grad(loss, list(model.parameters())))
        finally:
            kernels.set_backend(None)
    (loss, grads), (ref_loss, ref_grads) = results["triton"], results["reference"]
    torch.testing.assert_close(loss, ref_loss, atol=1e-5, rtol=1e-5)
    for g, r in zip(grads, ref_grads):
        torch.testing.assert_close(g, r, atol=1e-5, rtol=1e-4)


def test_benchmark_smoke_runs_every_op(repo_root, tmp_path):
    """benchmarks/kernels.py --smoke: every op checked and timed in the interpreter, the report written."""
    out = tmp_path / "results" / "smoke.md"  # a folder that does not exist yet
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    result = subprocess.run([sys.executable, str(repo_root / "benchmarks" / "kernels.py"), "--smoke", "--output",
                             str(out)], env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    report = out.read_text()
    for op in ("attention", "mlp", "layer_norm", "cross_entropy"):
        assert f"| {op} |" in report
    assert "Failed: none; inaccurate: none" in report


def rel_error(a, b):
    """||a - b|| / ||b|| in fp32."""
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def assert_as_accurate_as_reference(fn, ref_fn, inputs, slack=2.0):
    """In the inputs' dtype, fn's outputs and grads are within slack x the reference's own error (vs fp32) + 1e-3."""
    exact = [t.detach().float().requires_grad_(t.requires_grad) if t.is_floating_point() else t for t in inputs]
    truth, truth_grads, cot = run(ref_fn, exact)
    ref, ref_grads, _ = run(ref_fn, inputs, cot)
    out, grads, _ = run(fn, inputs, cot)
    for a, r, t in zip(out + grads, ref + ref_grads, truth + truth_grads):
        assert rel_error(a, t) <= slack * rel_error(r, t) + 1e-3, (rel_error(a, t), rel_error(r, t))


@gpu_only
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_gpu_layer_norm_phi1(dtype):
    torch.manual_seed(10)
    x, a, m = (randn(4, 1024, 2048, dtype=dtype) for _ in range(3))
    w, b = randn(2048, dtype=dtype), randn(2048, dtype=dtype)
    assert_as_accurate_as_reference(lambda *t: tk.layer_norm(*t[:3], 1e-5, t[3:]),
                                    lambda *t: reference.layer_norm(*t[:3], 1e-5, t[3:]), [x, w, b, a, m])


@gpu_only
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_gpu_mlp_phi1(dtype):
    torch.manual_seed(11)
    x = randn(2, 1024, 2048, dtype=dtype)
    w1, b1 = randn(8192, 2048, dtype=dtype, scale=0.02), randn(8192, dtype=dtype, scale=0.02)
    w2, b2 = randn(2048, 8192, dtype=dtype, scale=0.02), randn(2048, dtype=dtype, scale=0.02)
    assert_as_accurate_as_reference(tk.mlp, reference.mlp, [x, w1, b1, w2, b2])


@gpu_only
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_gpu_linear_cross_entropy_phi1(dtype):
    torch.manual_seed(12)
    h, w, b, labels = lce_inputs(dtype, tokens=(2, 2048), hidden=2048, vocab=51200)
    assert_as_accurate_as_reference(lambda h, w, b: tk.linear_cross_entropy(h, w, b, labels),
                                    lambda h, w, b: reference.linear_cross_entropy(h, w, b, labels), [h, w, b])


@gpu_only
def test_gpu_autocast_model_step_matches_reference():
    """bf16 autocast over fp32 weights, as the trainer runs: backend=None (cuda where built, triton for the ops cuda
    lacks or declines) agrees with the reference."""
    config = ModelConfig(vocab_size=1000, num_layers=2, hidden_size=256, num_attention_heads=4, ffn_hidden_size=1024,
                         max_position_embeddings=256)
    torch.manual_seed(13)
    model = PhiForCausalLM(config).cuda()
    ids = torch.randint(0, 1000, (2, 256), device="cuda")
    assert kernels.get_backend(device="cuda") == ("cuda" if "cuda" in kernels.available_backends() else "triton")
    # The key bias's gradient is zero in exact arithmetic (softmax ignores a shift shared by all keys): noise only.
    names, params = zip(*[(n, p) for n, p in model.named_parameters() if not n.endswith("k_proj.bias")])
    results = {}
    for backend in ("reference", None):
        kernels.set_backend(backend)
        try:
            with torch.autocast("cuda", dtype=torch.bfloat16):
                loss = model(ids, labels=ids.roll(-1, 1))
            results[backend] = (loss, torch.autograd.grad(loss, params))
        finally:
            kernels.set_backend(None)
    (ref, ref_grads), (loss, grads) = results["reference"], results[None]
    torch.testing.assert_close(loss, ref, atol=2e-2, rtol=2e-2)
    for name, g, r in zip(names, grads, ref_grads):
        assert rel_error(g, r) < 5e-2, name
