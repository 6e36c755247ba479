"""What the kernel tests share: relative error, and one forward + backward with the same cotangents."""

import torch


def rel_error(a, b):
    """||a - b|| / ||b|| in fp32 (b == 0 counts as a tiny norm, so a == b == 0 is 0, not nan)."""
    return ((a.float() - b.float()).norm() / b.float().norm().clamp(min=1e-30)).item()


def run(fn, inputs, cotangents=None):
    """(outputs, gradients of sum(output * cotangent) over the inputs that require grad, cotangents)."""
    out = fn(*inputs)
    out = out if isinstance(out, tuple) else (out,)
    if cotangents is None:
        cotangents = [torch.randn(o.shape, device=o.device) for o in out]
    total = sum((o.float() * c).sum() for o, c in zip(out, cotangents))
    grads = torch.autograd.grad(total, [t for t in inputs if isinstance(t, torch.Tensor) and t.requires_grad])
    return out, grads, cotangents
