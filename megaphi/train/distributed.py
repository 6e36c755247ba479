"""The process layout seen by the trainer: launch, process groups, the device, and the parallel model hook."""

import torch
from torch import nn

from megaphi.parallel.state import ParallelContext
from megaphi.train.config import ParallelArgs


def setup_distributed(parallel: ParallelArgs | None = None) -> ParallelContext:
    """Initialises torch.distributed from the launcher (torchrun, mpiexec, srun; nothing for one process) and
    builds the tensor- and data-parallel groups."""
    from megaphi.parallel.groups import build_parallel_context
    from megaphi.parallel.launch import init_distributed

    p = parallel or ParallelArgs()
    if p.tensor_model_parallel_size < 1:
        raise ValueError(f"--tensor-model-parallel-size must be at least 1, got {p.tensor_model_parallel_size}")
    if p.ddp_bucket_size_mb <= 0 or p.distributed_timeout_minutes <= 0:
        raise ValueError(f"--ddp-bucket-size-mb ({p.ddp_bucket_size_mb}) and --distributed-timeout-minutes "
                         f"({p.distributed_timeout_minutes}) must be positive")
    init_distributed(p.distributed_backend, p.distributed_timeout_minutes)
    return build_parallel_context(p.tensor_model_parallel_size, p.sequence_parallel)


def select_device(ctx: ParallelContext) -> torch.device:
    """This process's GPU (cuda:LOCAL_RANK) when CUDA is available, else the CPU."""
    if torch.cuda.is_available():
        device = torch.device("cuda", ctx.local_rank % torch.cuda.device_count())
        torch.cuda.set_device(device)
        return device
    return torch.device("cpu")


def parallelize(model: nn.Module, ctx: ParallelContext, seed: int) -> nn.Module:
    """Swaps in this rank's tensor-parallel layers (the identity for tp_size 1) and seeds the TP dropout RNG."""
    from megaphi.parallel.random import get_tracker
    from megaphi.parallel.tensor_parallel import apply_tensor_parallel

    get_tracker().set_seed(seed, ctx.tp_rank)
    return apply_tensor_parallel(model, ctx)


def agree_on_stop(ctx: ParallelContext, stop: bool, device: torch.device) -> bool:
    """Whether any rank wants to stop (a signal may reach only some of them); device: where NCCL can reduce."""
    if ctx.world_size == 1:
        return stop
    import torch.distributed as dist

    flag = torch.tensor([int(stop)], dtype=torch.int32, device=device)
    dist.all_reduce(flag, op=dist.ReduceOp.MAX)
    return bool(flag.item())
