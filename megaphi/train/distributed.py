"""The process layout seen by the trainer: ranks from torchrun's environment, the device, and the parallel hook.

Single process for now: tensor/sequence/data parallelism arrive with the parallelism issue, which replaces
`setup_distributed` (process groups) and `parallelize` (TP layers, DP gradient reduction) behind this seam.
"""

import os

import torch
from torch import nn

from megaphi.parallel.state import ParallelContext


def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name)
    if value is None or value == "":
        return default
    try:
        return int(value)
    except ValueError:
        raise ValueError(f"environment variable {name}={value!r} is not an integer") from None


def setup_distributed() -> ParallelContext:
    """Reads RANK/WORLD_SIZE/LOCAL_RANK (torchrun); more than one process is refused until the parallelism issue."""
    world_size = _env_int("WORLD_SIZE", 1)
    rank = _env_int("RANK", 0)
    local_rank = _env_int("LOCAL_RANK", 0)
    if world_size > 1:
        raise ValueError(f"WORLD_SIZE={world_size}: megaphi trains in one process for now; data and tensor "
                         f"parallelism (--tensor-model-parallel-size, DP over torch.distributed) arrive with the "
                         f"parallelism issue. Run with one process (torchrun --nproc_per_node 1).")
    return ParallelContext(rank=rank, world_size=world_size, local_rank=local_rank, dp_rank=0, dp_size=1)


def select_device(ctx: ParallelContext) -> torch.device:
    """This process's GPU (cuda:LOCAL_RANK) when CUDA is available, else the CPU."""
    if torch.cuda.is_available():
        device = torch.device("cuda", ctx.local_rank % torch.cuda.device_count())
        torch.cuda.set_device(device)
        return device
    return torch.device("cpu")


def parallelize(model: nn.Module, ctx: ParallelContext) -> nn.Module:
    """The hook where TP layers are swapped in and DP wrapping happens; the identity for one process."""
    return model
