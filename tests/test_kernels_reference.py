"""The reference kernels against independent, straightforward formulations, and the backend dispatch."""

import math

import pytest
import torch
import torch.nn.functional as F

from megaphi import kernels


def rotate_complex(x, rotary_dim, base, offset=0):
    """RoPE written as complex multiplication: (x_i + j x_{i+half}) * exp(j pos theta_i), in float64."""
    half = rotary_dim // 2
    pos = torch.arange(offset, offset + x.shape[1], dtype=torch.float64)
    theta = base ** (-torch.arange(half, dtype=torch.float64) * 2 / rotary_dim)
    angle = pos[:, None] * theta[None, :]  # (seq, half)
    rot = torch.polar(torch.ones_like(angle), angle)[None, :, None, :]
    z = torch.complex(x[..., :half].double(), x[..., half:rotary_dim].double()) * rot
    return torch.cat((z.real, z.imag, x[..., rotary_dim:].double()), dim=-1).to(x.dtype)


def naive_attention(q, k, v):
    """Causal softmax attention with an explicit mask, layout (batch, seq, heads, dim)."""
    scores = torch.einsum("bqhd,bkhd->bhqk", q, k) / math.sqrt(q.shape[-1])
    sq, sk = q.shape[1], k.shape[1]
    mask = torch.ones(sq, sk, dtype=torch.bool).tril(diagonal=sk - sq)
    probs = scores.masked_fill(~mask, float("-inf")).softmax(dim=-1)
    return torch.einsum("bhqk,bkhd->bqhd", probs, v)


@pytest.mark.parametrize("head_dim,rotary_dim,base", [(64, 32, 10000.0), (32, 32, 500.0), (48, 16, 10000.0)])
def test_apply_rotary_matches_complex_formulation(head_dim, rotary_dim, base):
    torch.manual_seed(0)
    x = torch.randn(2, 37, 3, head_dim)
    expected = rotate_complex(x, rotary_dim, base)
    torch.testing.assert_close(kernels.apply_rotary(x, rotary_dim, base), expected, atol=2e-5, rtol=1e-5)
    # Dims past rotary_dim pass through untouched.
    assert torch.equal(kernels.apply_rotary(x, rotary_dim, base)[..., rotary_dim:], x[..., rotary_dim:])
    # An offset rotates as those positions of a longer sequence would.
    torch.testing.assert_close(kernels.apply_rotary(x[:, 30:], rotary_dim, base, position_offset=30),
                               expected[:, 30:], atol=2e-5, rtol=1e-5)


def test_rotary_tables_grow_and_stay_consistent():
    x = torch.randn(1, 600, 1, 64)
    long = kernels.apply_rotary(x, 32, 10000.0)  # grows the cached table past its first size
    torch.testing.assert_close(kernels.apply_rotary(x[:, 550:], 32, 10000.0, 550), long[:, 550:], atol=0, rtol=0)


@pytest.mark.parametrize("seq", [1, 17, 64])
def test_rotary_attention_matches_naive(seq):
    torch.manual_seed(1)
    q, k, v = (torch.randn(2, seq, 3, 64) for _ in range(3))
    out = kernels.rotary_attention(q, k, v, 32, 10000.0)
    expected = naive_attention(rotate_complex(q, 32, 10000.0), rotate_complex(k, 32, 10000.0), v)
    assert out.shape == (2, seq, 3, 64)
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)


def test_rotary_attention_non_causal():
    torch.manual_seed(2)
    q, k, v = (torch.randn(1, 9, 2, 64) for _ in range(3))
    qr, kr = rotate_complex(q, 32, 10000.0), rotate_complex(k, 32, 10000.0)
    probs = (torch.einsum("bqhd,bkhd->bhqk", qr, kr) / 8.0).softmax(-1)
    expected = torch.einsum("bhqk,bkhd->bqhd", probs, v)
    torch.testing.assert_close(kernels.rotary_attention(q, k, v, 32, causal=False), expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("sq", [1, 4])
def test_attention_with_fewer_queries_is_bottom_right_causal(sq):
    torch.manual_seed(3)
    q, k, v = (torch.randn(2, 11, 2, 64) for _ in range(3))
    full = kernels.attention(q, k, v, causal=True)
    torch.testing.assert_close(kernels.attention(q[:, -sq:], k, v, causal=True), full[:, -sq:], atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(full, naive_attention(q, k, v), atol=1e-5, rtol=1e-5)


def test_rotary_attention_gradients_reach_unrotated_inputs():
    torch.manual_seed(4)
    q, k, v = (torch.randn(1, 6, 2, 16, dtype=torch.float64, requires_grad=True) for _ in range(3))
    assert torch.autograd.gradcheck(lambda a, b, c: kernels.rotary_attention(a, b, c, 8, 100.0), (q, k, v))
    # And they match the gradients of the independent formulation.
    out = kernels.rotary_attention(q, k, v, 8, 100.0)
    grads = torch.autograd.grad(out.pow(2).sum(), (q, k, v))
    ref = naive_attention(rotate_complex(q, 8, 100.0), rotate_complex(k, 8, 100.0), v)
    ref_grads = torch.autograd.grad(ref.pow(2).sum(), (q, k, v))
    for g, r in zip(grads, ref_grads):
        assert g.abs().sum() > 0
        torch.testing.assert_close(g, r, atol=1e-6, rtol=1e-6)


def test_layer_norm_with_and_without_residual():
    torch.manual_seed(5)
    x, a, b = (torch.randn(3, 5, 40) for _ in range(3))
    w, bias = torch.randn(40), torch.randn(40)
    torch.testing.assert_close(kernels.layer_norm(x, w, bias, 1e-5), F.layer_norm(x, (40,), w, bias, 1e-5))
    normed, summed = kernels.layer_norm(x, w, bias, 1e-5, residual=(a, b))
    torch.testing.assert_close(summed, x + a + b)
    torch.testing.assert_close(normed, F.layer_norm(x + a + b, (40,), w, bias, 1e-5))
    normed, summed = kernels.layer_norm(x, w, bias, 1e-3, residual=a)
    torch.testing.assert_close(summed, x + a)
    torch.testing.assert_close(normed, F.layer_norm(x + a, (40,), w, bias, 1e-3))


def test_gelu_tanh_and_mlp():
    torch.manual_seed(6)
    x = torch.randn(4, 7, 16)
    expected = 0.5 * x * (1 + torch.tanh(math.sqrt(2 / math.pi) * (x + 0.044715 * x**3)))
    torch.testing.assert_close(kernels.gelu_tanh(x), expected, atol=1e-6, rtol=1e-5)
    w1, b1, w2, b2 = torch.randn(32, 16), torch.randn(32), torch.randn(16, 32), torch.randn(16)
    h = x @ w1.T + b1
    mlp_expected = 0.5 * h * (1 + torch.tanh(math.sqrt(2 / math.pi) * (h + 0.044715 * h**3))) @ w2.T + b2
    torch.testing.assert_close(kernels.mlp(x, w1, b1, w2, b2), mlp_expected, atol=1e-4, rtol=1e-5)


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_linear_cross_entropy_matches_cross_entropy(reduction):
    torch.manual_seed(7)
    hidden = torch.randn(2, 9, 24, requires_grad=True)
    weight = torch.randn(67, 24, requires_grad=True)
    bias = torch.randn(67, requires_grad=True)
    labels = torch.randint(0, 67, (2, 9))
    labels[0, :4] = -100
    labels[1, 8] = -100
    loss = kernels.linear_cross_entropy(hidden, weight, bias, labels, reduction=reduction)
    logits = hidden @ weight.T + bias
    expected = F.cross_entropy(logits.view(-1, 67), labels.view(-1), ignore_index=-100, reduction=reduction)
    if reduction == "none":
        assert loss.shape == labels.shape and torch.all(loss[labels == -100] == 0)
        expected = expected.view(2, 9)
    torch.testing.assert_close(loss, expected)
    grads = torch.autograd.grad(loss.sum(), (hidden, weight, bias))
    ref_grads = torch.autograd.grad(expected.sum(), (hidden, weight, bias))
    for g, r in zip(grads, ref_grads):
        torch.testing.assert_close(g, r)
    assert torch.all(grads[0][0, :4] == 0)  # ignored positions get no gradient


def test_linear_cross_entropy_custom_ignore_index_and_bf16_logits_in_fp32():
    torch.manual_seed(8)
    hidden, weight, bias = torch.randn(10, 16).bfloat16(), torch.randn(50, 16).bfloat16(), torch.randn(50).bfloat16()
    labels = torch.randint(0, 50, (10,))
    labels[3] = 7
    loss = kernels.linear_cross_entropy(hidden, weight, bias, labels, ignore_index=7)
    assert loss.dtype == torch.float32
    logits = F.linear(hidden, weight, bias).float()
    torch.testing.assert_close(loss, F.cross_entropy(logits, labels, ignore_index=7))


def test_dispatch_choice_and_errors(monkeypatch):
    assert "reference" in kernels.available_backends()
    assert kernels.get_backend() == "reference"
    with pytest.raises(ValueError, match="unknown kernel backend 'nope'"):
        kernels.gelu_tanh(torch.zeros(2), backend="nope")
    with pytest.raises(ValueError, match="set_backend: unknown"):
        kernels.set_backend("nope")
    monkeypatch.setenv(kernels.ENV_VAR, "nope")
    with pytest.raises(ValueError, match="MEGAPHI_KERNELS: unknown kernel backend"):
        kernels.gelu_tanh(torch.zeros(2))
    kernels.set_backend("reference")  # an explicit choice wins over the environment
    try:
        assert kernels.get_backend() == "reference"
        kernels.gelu_tanh(torch.zeros(2))
    finally:
        kernels.set_backend(None)
    monkeypatch.setenv(kernels.ENV_VAR, "reference")
    assert kernels.get_backend() == "reference"
    # A known backend whose module cannot import is reported with the reason, not silently replaced.
    monkeypatch.setitem(kernels.KNOWN_BACKENDS, "missing", "megaphi.kernels.no_such_module")
    assert "missing" not in kernels.available_backends()
    with pytest.raises(ValueError, match="'missing' is not available here .*No module named"):
        kernels.layer_norm(torch.zeros(2, 3), None, None, backend="missing")
