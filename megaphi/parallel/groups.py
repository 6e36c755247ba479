"""Process groups for tensor and data parallelism, the rank layout behind them, and the layout checks.

Ranks are numbered Megatron's way, tensor-parallel fastest: rank = (pp_rank * dp_size + dp_rank) * tp_size + tp_rank.
So a TP group is a block of tp_size consecutive ranks (one node's GPUs when tp_size <= GPUs per node), and a DP
group takes one rank from each block. Pipeline parallelism is not implemented; RankLayout already has its axis
(outermost) so adding it means creating the pp groups, not renumbering ranks.
"""

import os
import warnings
from dataclasses import dataclass

import torch.distributed as dist

from megaphi.model.config import ModelConfig
from megaphi.parallel.state import ParallelContext


@dataclass(frozen=True)
class RankLayout:
    """How world_size ranks split into tensor-, data- and pipeline-parallel groups (pp_size 1 for now)."""

    world_size: int
    tp_size: int
    pp_size: int = 1

    def __post_init__(self):
        names = {"world_size": "the number of processes", "tp_size": "--tensor-model-parallel-size",
                 "pp_size": "the pipeline-parallel size"}
        for name, what in names.items():
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{what} must be a positive integer, got {value!r}")
        if self.world_size % (self.tp_size * self.pp_size):
            raise ValueError(f"--tensor-model-parallel-size={self.tp_size} (x pipeline {self.pp_size}) must divide "
                             f"the number of processes, {self.world_size}")

    @property
    def dp_size(self) -> int:
        """Ranks holding the same model shard."""
        return self.world_size // (self.tp_size * self.pp_size)

    def coordinates(self, rank: int) -> tuple[int, int, int]:
        """(pp_rank, dp_rank, tp_rank) of a global rank."""
        return rank // (self.dp_size * self.tp_size), rank // self.tp_size % self.dp_size, rank % self.tp_size

    def rank(self, pp_rank: int, dp_rank: int, tp_rank: int) -> int:
        """The global rank at these coordinates."""
        return (pp_rank * self.dp_size + dp_rank) * self.tp_size + tp_rank

    def tp_groups(self) -> list[list[int]]:
        """Every tensor-parallel group: consecutive ranks."""
        return [[self.rank(p, d, t) for t in range(self.tp_size)]
                for p in range(self.pp_size) for d in range(self.dp_size)]

    def dp_groups(self) -> list[list[int]]:
        """Every data-parallel group: the same (pp, tp) position in each block."""
        return [[self.rank(p, d, t) for d in range(self.dp_size)]
                for p in range(self.pp_size) for t in range(self.tp_size)]

    def pp_groups(self) -> list[list[int]]:
        """Every pipeline group (stage order), for when pipeline parallelism lands."""
        return [[self.rank(p, d, t) for p in range(self.pp_size)]
                for d in range(self.dp_size) for t in range(self.tp_size)]


def check_layout(model_config: ModelConfig, tp_size: int, world_size: int, *, sequence_parallel: bool = False,
                 seq_length: int | None = None) -> None:
    """ValueError naming the flag to change when the model cannot be split tp_size ways over world_size ranks.

    hidden_size needs no check of its own: ModelConfig already requires num_attention_heads to divide it, so
    heads % tp == 0 implies hidden_size % tp == 0.
    """
    RankLayout(world_size, tp_size)
    c = model_config
    if c.num_attention_heads % tp_size:
        raise ValueError(f"--num-attention-heads={c.num_attention_heads} must be divisible by "
                         f"--tensor-model-parallel-size={tp_size} (each rank holds whole heads)")
    if c.padded_vocab_size % tp_size:
        raise ValueError(f"the padded vocabulary ({c.padded_vocab_size} rows) must be divisible by "
                         f"--tensor-model-parallel-size={tp_size}: set --make-vocab-size-divisible-by to a "
                         f"multiple of {tp_size} (now {c.make_vocab_size_divisible_by})")
    if c.ffn_hidden_size % tp_size:
        raise ValueError(f"--ffn-hidden-size={c.ffn_hidden_size} must be divisible by "
                         f"--tensor-model-parallel-size={tp_size}")
    if sequence_parallel and seq_length is not None and seq_length % tp_size:
        raise ValueError(f"--sequence-parallel splits the sequence over the TP ranks: --seq-length={seq_length} "
                         f"must be divisible by --tensor-model-parallel-size={tp_size}")


def _new_groups(rank_lists: list[list[int]], rank: int):
    """Creates every group (all ranks must call new_group for each, in the same order); returns this rank's."""
    mine = None
    for ranks in rank_lists:
        group = dist.new_group(ranks)
        if rank in ranks:
            mine = group
    return mine


def build_parallel_context(tp_size: int, sequence_parallel: bool = False,
                           local_rank: int | None = None) -> ParallelContext:
    """This process's ParallelContext with its TP and DP groups; call after dist.init_process_group (collective).

    Without an initialised process group it describes a single process (tp_size must then be 1). Sequence
    parallelism with tp_size 1 has nothing to split: it is switched off with a warning, as Megatron does.
    local_rank defaults to $LOCAL_RANK (0 when unset).
    """
    if sequence_parallel and tp_size == 1:
        warnings.warn("--sequence-parallel has no effect with --tensor-model-parallel-size=1; turning it off")
        sequence_parallel = False
    if local_rank is None:
        local_rank = int(os.environ.get("LOCAL_RANK", 0))
    if not (dist.is_available() and dist.is_initialized()):
        if tp_size != 1:
            raise ValueError(f"--tensor-model-parallel-size={tp_size} needs several processes: launch with torchrun "
                             f"(or mpiexec) so that torch.distributed is initialised before build_parallel_context")
        return ParallelContext(local_rank=local_rank)
    rank, world_size = dist.get_rank(), dist.get_world_size()
    layout = RankLayout(world_size, tp_size)
    _, dp_rank, tp_rank = layout.coordinates(rank)
    # Groups of one rank are never created (consistently on every rank): a None group means "no communication".
    tp_group = _new_groups(layout.tp_groups(), rank) if tp_size > 1 else None
    dp_group = _new_groups(layout.dp_groups(), rank) if layout.dp_size > 1 else None
    return ParallelContext(rank=rank, world_size=world_size, local_rank=local_rank, tp_size=tp_size, tp_rank=tp_rank,
                           dp_size=layout.dp_size, dp_rank=dp_rank, tp_group=tp_group, dp_group=dp_group,
                           sequence_parallel=sequence_parallel)
