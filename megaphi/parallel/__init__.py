"""Tensor, sequence and data parallelism on torch.distributed, applied to the model from outside."""

from megaphi.parallel.state import ParallelContext

__all__ = ["ParallelContext"]
