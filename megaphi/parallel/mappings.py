"""Autograd functions that carry activations into and out of tensor- and sequence-parallel regions.

Each function's backward is the conjugate collective of its forward (Megatron's f/g operators):

    copy_to_tp            identity            | all-reduce          (enter a TP region, replicated input)
    reduce_from_tp        all-reduce          | identity            (leave a TP region, replicated output)
    scatter_to_tp         split last dim      | all-gather last dim
    gather_from_tp        all-gather last dim | split last dim      (e.g. full logits from vocab shards)
    scatter_to_sp         split seq (dim 1)   | all-gather seq
    gather_from_sp        all-gather seq      | reduce-scatter seq  (enter a TP region from sequence shards)
    reduce_scatter_to_sp  reduce-scatter seq  | all-gather seq      (leave a TP region onto sequence shards)

Activations are (batch, seq, hidden), so the sequence dim is 1. Every collective here goes through _record, which
count_collectives() reads: a test proves Megatron's communication volume per layer with it.
"""

import contextlib
from collections import defaultdict

import torch
import torch.distributed as dist


def all_gather_tensor_fn():
    """torch's flat-tensor all-gather: all_gather_single from torch 2.13, all_gather_into_tensor before."""
    return getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor


def reduce_scatter_tensor_fn():
    """torch's flat-tensor reduce-scatter: reduce_scatter_single from torch 2.13, reduce_scatter_tensor before."""
    return getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor


_active_counters: list[dict] = []


@contextlib.contextmanager
def count_collectives():
    """Counts the collectives run inside the block: yields {op: {"calls": n, "bytes": b}}, filled as they run.

    op is all_reduce, all_gather or reduce_scatter; bytes is the size of the full (unsharded) tensor: the
    all-reduced tensor, the gathered output, the reduce-scattered input.
    """
    counts = defaultdict(lambda: {"calls": 0, "bytes": 0})
    _active_counters.append(counts)
    try:
        yield counts
    finally:
        _active_counters.remove(counts)


def _record(op: str, full: torch.Tensor):
    for counts in _active_counters:
        counts[op]["calls"] += 1
        counts[op]["bytes"] += full.numel() * full.element_size()


def _native_collectives(group, native: bool | None) -> bool:
    # gloo lacks the tensor collectives in older torch versions: on it, all-gather takes a list of outputs and
    # reduce-scatter is an all-reduce plus a slice (unless native=True asks for the tensor collectives).
    return dist.get_backend(group) != "gloo" if native is None else native


def _even_chunks(x: torch.Tensor, dim: int, n: int) -> tuple[torch.Tensor, ...]:
    if x.shape[dim] % n:
        what = "the sequence length (--seq-length)" if dim == 1 else f"dim {dim}"
        raise ValueError(f"{what} {x.shape[dim]} must be divisible by the tensor-parallel size "
                         f"{n} (--tensor-model-parallel-size) to split it over the ranks")
    return x.chunk(n, dim)


def all_reduce(tensor: torch.Tensor, group, op=dist.ReduceOp.SUM) -> torch.Tensor:
    """In-place all-reduce of a contiguous tensor over group (counted); returns it."""
    _record("all_reduce", tensor)
    dist.all_reduce(tensor, op=op, group=group)
    return tensor


def all_gather(x: torch.Tensor, dim: int, group, native: bool | None = None) -> torch.Tensor:
    """The ranks' x concatenated along dim, in rank order (counted); native: see _native_collectives."""
    n = dist.get_world_size(group)
    x = x.contiguous()
    out = x.new_empty((n * x.shape[0], *x.shape[1:]))
    _record("all_gather", out)
    if _native_collectives(group, native):
        all_gather_tensor_fn()(out, x, group=group)
    else:
        dist.all_gather(list(out.chunk(n)), x, group=group)
    return out if dim == 0 else torch.cat(out.chunk(n), dim)


def reduce_scatter(x: torch.Tensor, dim: int, group, native: bool | None = None) -> torch.Tensor:
    """This rank's slice along dim of the sum of the ranks' x (counted); native: see _native_collectives."""
    n = dist.get_world_size(group)
    chunks = _even_chunks(x, dim, n)
    stacked = torch.stack(chunks)  # (n, *chunk): the collectives split along dim 0
    _record("reduce_scatter", stacked)
    if _native_collectives(group, native):
        out = x.new_empty(chunks[0].shape)
        reduce_scatter_tensor_fn()(out, stacked.flatten(0, 1), group=group)
        return out
    dist.all_reduce(stacked, group=group)
    return stacked[dist.get_rank(group)]


def _split(x: torch.Tensor, dim: int, group) -> torch.Tensor:
    return _even_chunks(x, dim, dist.get_world_size(group))[dist.get_rank(group)].contiguous()


class _CopyToTP(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        return all_reduce(grad.clone(memory_format=torch.contiguous_format), ctx.group), None


class _ReduceFromTP(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group):
        # Out of place: the op that produced x may have saved it for its backward.
        return all_reduce(x.clone(memory_format=torch.contiguous_format), group)

    @staticmethod
    def backward(ctx, grad):
        return grad, None


class _Scatter(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, dim, group):
        ctx.dim, ctx.group = dim, group
        return _split(x, dim, group)

    @staticmethod
    def backward(ctx, grad):
        return all_gather(grad, ctx.dim, ctx.group), None, None


class _Gather(torch.autograd.Function):
    """All-gather along dim; backward splits (reduce=False) or reduce-scatters (reduce=True) the gradient."""

    @staticmethod
    def forward(ctx, x, dim, group, reduce):
        ctx.dim, ctx.group, ctx.reduce = dim, group, reduce
        return all_gather(x, dim, group)

    @staticmethod
    def backward(ctx, grad):
        if ctx.reduce:
            return reduce_scatter(grad, ctx.dim, ctx.group), None, None, None
        return _split(grad, ctx.dim, ctx.group), None, None, None


class _ReduceScatter(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, dim, group):
        ctx.dim, ctx.group = dim, group
        return reduce_scatter(x, dim, group)

    @staticmethod
    def backward(ctx, grad):
        return all_gather(grad, ctx.dim, ctx.group), None, None


def _single(group) -> bool:
    return group is None or dist.get_world_size(group) == 1


def copy_to_tp(x, group):
    """Identity forward, all-reduce of the gradient over the TP group: a replicated input entering a TP region."""
    return x if _single(group) else _CopyToTP.apply(x, group)


def reduce_from_tp(x, group):
    """All-reduce forward, identity backward: the partial sums of a row-parallel layer leaving a TP region."""
    return x if _single(group) else _ReduceFromTP.apply(x, group)


def scatter_to_tp(x, group):
    """This rank's slice of the last dim; backward all-gathers it."""
    return x if _single(group) else _Scatter.apply(x, -1, group)


def gather_from_tp(x, group):
    """The TP ranks' last-dim slices concatenated; backward keeps this rank's slice of the gradient."""
    return x if _single(group) else _Gather.apply(x, -1, group, False)


def scatter_to_sp(x, group):
    """This rank's slice of the sequence (dim 1); backward all-gathers it."""
    return x if _single(group) else _Scatter.apply(x, 1, group)


def gather_from_sp(x, group):
    """The full sequence from the TP ranks' shards; backward reduce-scatters (the consumers are TP-parallel)."""
    return x if _single(group) else _Gather.apply(x, 1, group, True)


def reduce_scatter_to_sp(x, group):
    """Sum over the TP ranks, keeping this rank's sequence shard; backward all-gathers the gradient."""
    return x if _single(group) else _ReduceScatter.apply(x, 1, group)


def enter_tp_region(x, group, sequence_parallel: bool):
    """The input of a column-parallel region: copy_to_tp, or gather_from_sp from sequence shards."""
    return gather_from_sp(x, group) if sequence_parallel else copy_to_tp(x, group)


def exit_tp_region(x, group, sequence_parallel: bool):
    """The partial sums of a row-parallel region: reduce_from_tp, or reduce_scatter_to_sp onto sequence shards."""
    return reduce_scatter_to_sp(x, group) if sequence_parallel else reduce_from_tp(x, group)
