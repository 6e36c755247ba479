"""AdamW with Megatron's weight-decay groups, the learning-rate schedule, and gradient clipping."""

import math
from dataclasses import dataclass

import torch
from torch import nn


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Two groups: 2-D and larger weights decay; biases and norm weights (1-D) do not, as in Megatron."""
    decay, no_decay = [], []
    for param in model.parameters():
        if param.requires_grad:
            (decay if param.ndim >= 2 else no_decay).append(param)
    return [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]


def fused_adam_class():
    """apex's FusedAdam when apex is importable and CUDA is there, else None."""
    if not torch.cuda.is_available():
        return None
    try:
        from apex.optimizers import FusedAdam
    except ImportError:
        return None
    return FusedAdam


def build_optimizer(
    model: nn.Module, lr: float, weight_decay: float, betas: tuple[float, float], eps: float
) -> torch.optim.Optimizer:
    """AdamW: apex FusedAdam if available, else torch's fused (CUDA) or foreach (CPU) implementation."""
    groups = param_groups(model, weight_decay)
    fused_adam = fused_adam_class()
    on_cuda = any(p.is_cuda for p in model.parameters())
    if fused_adam is not None and on_cuda:
        return fused_adam(groups, lr=lr, betas=betas, eps=eps, adam_w_mode=True)
    if on_cuda:
        return torch.optim.AdamW(groups, lr=lr, betas=betas, eps=eps, fused=True)
    return torch.optim.AdamW(groups, lr=lr, betas=betas, eps=eps, foreach=True)


@dataclass
class LRSchedule:
    """Linear warmup to max_lr, then cosine/linear decay to min_lr at decay_iters (Megatron's formula)."""

    max_lr: float
    min_lr: float
    warmup_iters: int
    decay_iters: int
    style: str = "cosine"

    def __post_init__(self):
        if self.style not in ("cosine", "linear", "constant"):
            raise ValueError(f"--lr-decay-style must be cosine, linear or constant, not {self.style!r}")

    def __call__(self, iteration: int) -> float:
        """Learning rate for the optimizer step numbered `iteration` (1-based)."""
        # Evaluated at the step being taken, so the first step runs at max_lr / warmup_iters rather than
        # Megatron's 0, and warmup ends exactly at max_lr.
        if self.warmup_iters > 0 and iteration <= self.warmup_iters:
            return self.max_lr * iteration / self.warmup_iters
        if self.style == "constant":
            return self.max_lr
        if iteration >= self.decay_iters:
            return self.min_lr
        ratio = (iteration - self.warmup_iters) / (self.decay_iters - self.warmup_iters)
        if self.style == "linear":
            coeff = 1.0 - ratio
        else:
            coeff = 0.5 * (1.0 + math.cos(math.pi * ratio))
        return self.min_lr + coeff * (self.max_lr - self.min_lr)

    def state_dict(self) -> dict:
        """The schedule's settings (the position is the checkpoint's iteration)."""
        return {"max_lr": self.max_lr, "min_lr": self.min_lr, "warmup_iters": self.warmup_iters,
                "decay_iters": self.decay_iters, "style": self.style}


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    """Sets every parameter group's learning rate."""
    for group in optimizer.param_groups:
        group["lr"] = lr


def clip_grad_norm(params: list[torch.Tensor], max_norm: float) -> torch.Tensor:
    """Global L2 norm of the gradients (0-d tensor); clips to max_norm > 0 unless the norm is inf/nan."""
    with_grads = [p for p in params if p.grad is not None]
    if not with_grads:
        return torch.zeros(())
    norm = torch.nn.utils.get_total_norm([p.grad for p in with_grads], norm_type=2.0, foreach=True)
    if max_norm > 0 and bool(torch.isfinite(norm)):
        torch.nn.utils.clip_grads_with_norm_(with_grads, max_norm, norm, foreach=True)
    return norm
