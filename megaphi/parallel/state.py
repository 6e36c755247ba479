"""Where this process sits in the parallel layout: global, tensor-parallel and data-parallel ranks and groups."""

from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist


@dataclass
class ParallelContext:
    """Ranks and process groups of one process; the defaults describe a single-process run.

    Ranks are laid out Megatron's way: tensor-parallel (TP) groups are blocks of tp_size consecutive global ranks
    (inside a node), data-parallel (DP) groups take one rank from each block (stride tp_size).
    """

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    tp_size: int = 1
    tp_rank: int = 0
    dp_size: int = 1
    dp_rank: int = 0
    tp_group: Any = None
    """torch.distributed group of this rank's TP block (None when tp_size == 1)."""
    dp_group: Any = None
    """torch.distributed group of the ranks holding the same TP shard (None when dp_size == 1)."""
    sequence_parallel: bool = False
    """LayerNorms and dropout run on sequence shards between the TP regions (--sequence-parallel)."""

    @property
    def is_main(self) -> bool:
        """Whether this process logs and writes shared files."""
        return self.rank == 0

    def mean_over_dp(self, value: torch.Tensor) -> torch.Tensor:
        """The mean of a tensor over the data-parallel ranks (one rank: itself)."""
        if self.dp_size == 1:
            return value
        value = value.detach().clone()
        dist.all_reduce(value, group=self.dp_group)
        return value / self.dp_size
