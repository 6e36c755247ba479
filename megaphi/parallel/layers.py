"""Tensor-parallel layers, each built from the full nn.Linear / nn.Embedding / PhiMLP by keeping this rank's slice.

Shards are contiguous and even: rank r keeps rows (dim 0) or columns (dim 1) [r*n/tp, (r+1)*n/tp). Sharded
parameters carry `tensor_parallel_dim`; parameters applied to sequence shards (row-parallel biases under sequence
parallelism) carry `sequence_parallel_grad`, whose gradient the DP gradient sync all-reduces over TP. Names stay
`weight` and `bias`, so state_dict keys are those of the plain model.

Sequence parallelism applies in training mode only: in eval mode (evaluation, generation with a KV cache, any
sequence length) the same modules run the TP-only layout, which computes the same values.

Column-parallel linears do not communicate on their input: it must already be inside the TP region
(mappings.enter_tp_region: once per attention block, a pre-hook from tensor_parallel.py; inside ParallelMLP), so
q, k and v share one all-reduce (or all-gather) instead of three.
"""

import torch
import torch.nn as nn
import torch.nn.functional as F

from megaphi import kernels
from megaphi.parallel.mappings import enter_tp_region, exit_tp_region, gather_from_tp
from megaphi.parallel.state import ParallelContext


def shard_view(tensor: torch.Tensor, dim: int | None, rank: int, size: int) -> torch.Tensor:
    """Rank's contiguous, even slice of a full tensor along dim, as a view (the tensor itself when dim is None)."""
    if dim is None or size == 1:
        return tensor
    if tensor.shape[dim] % size:
        raise ValueError(f"cannot split a tensor of shape {tuple(tensor.shape)} into {size} even shards on dim {dim}")
    n = tensor.shape[dim] // size
    return tensor.narrow(dim, rank * n, n)


def shard(tensor: torch.Tensor, dim: int, rank: int, size: int) -> torch.Tensor:
    """A copy of this rank's contiguous slice of tensor along dim."""
    return shard_view(tensor.detach(), dim, rank, size).clone()


def sequence_parallel_now(module: nn.Module, ctx: ParallelContext) -> bool:
    """Whether module runs on sequence shards in this call: SP is on and the module is training."""
    return ctx.sequence_parallel and module.training


def _sharded(param: torch.Tensor, dim: int, ctx: ParallelContext) -> nn.Parameter:
    out = nn.Parameter(shard(param, dim, ctx.tp_rank, ctx.tp_size), requires_grad=param.requires_grad)
    out.tensor_parallel_dim = dim
    return out


def _replicated(param: torch.Tensor, sequence_parallel_grad: bool) -> nn.Parameter:
    out = nn.Parameter(param.detach().clone(), requires_grad=param.requires_grad)
    if sequence_parallel_grad:
        out.sequence_parallel_grad = True
    return out


class ColumnParallelLinear(nn.Module):
    """y_shard = x @ W_shard.T + b_shard: this rank's slice of the output features (weight and bias split on dim 0).

    x must already be inside the TP region (full sequence, gradient reduced by whoever entered the region).
    gather_output all-gathers the slices into the full output (backward: keep own slice).
    """

    def __init__(self, linear: nn.Linear, ctx: ParallelContext, gather_output: bool = False):
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.process_group, self.gather_output = ctx.tp_group, gather_output
        self.weight = _sharded(linear.weight, 0, ctx)
        self.bias = None if linear.bias is None else _sharded(linear.bias, 0, ctx)

    def forward(self, x):
        y = F.linear(x, self.weight, self.bias)
        return gather_from_tp(y, self.process_group) if self.gather_output else y

    def extra_repr(self):
        return (f"in_features={self.in_features}, out_features={self.out_features} (this rank: "
                f"{self.weight.shape[0]}), bias={self.bias is not None}, gather_output={self.gather_output}")


class RowParallelLinear(nn.Module):
    """y = reduce(x_shard @ W_shard.T) + b: input features split (weight on dim 1), bias added once, after the sum.

    The reduction is an all-reduce, or a reduce-scatter onto sequence shards under sequence parallelism (training;
    the bias is then applied per shard and marked sequence_parallel_grad).
    """

    def __init__(self, linear: nn.Linear, ctx: ParallelContext):
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.ctx = ctx
        self.weight = _sharded(linear.weight, 1, ctx)
        self.bias = None if linear.bias is None else _replicated(linear.bias, ctx.sequence_parallel)

    def forward(self, x):
        y = exit_tp_region(F.linear(x, self.weight), self.ctx.tp_group, sequence_parallel_now(self, self.ctx))
        return y if self.bias is None else y + self.bias

    def extra_repr(self):
        return (f"in_features={self.in_features} (this rank: {self.weight.shape[1]}), "
                f"out_features={self.out_features}, bias={self.bias is not None}, "
                f"sequence_parallel={self.ctx.sequence_parallel}")


class ParallelMLP(nn.Module):
    """PhiMLP on shards: fc1 column-parallel, fc2 row-parallel, through kernels.mlp so a fused MLP still applies.

    The kernel runs without fc2's bias (b2=None) on this rank's slice of the hidden layer; the partial sums are
    reduced and fc2's bias is added once.
    """

    def __init__(self, mlp: nn.Module, ctx: ParallelContext):
        super().__init__()
        self.ctx = ctx
        self.fc1 = ColumnParallelLinear(mlp.fc1, ctx)
        self.fc2 = RowParallelLinear(mlp.fc2, ctx)

    def forward(self, x):
        group, sp = self.ctx.tp_group, sequence_parallel_now(self, self.ctx)
        y = kernels.mlp(enter_tp_region(x, group, sp), self.fc1.weight, self.fc1.bias, self.fc2.weight, None)
        y = exit_tp_region(y, group, sp)
        return y if self.fc2.bias is None else y + self.fc2.bias


class VocabParallelEmbedding(nn.Module):
    """Embedding with this rank's rows of the vocabulary: a masked lookup, then summed over the TP ranks.

    The sum is an all-reduce, or under sequence parallelism (training) a reduce-scatter that leaves each rank its
    sequence shard (batch, seq / tp, hidden).
    """

    def __init__(self, embedding: nn.Embedding, ctx: ParallelContext):
        super().__init__()
        self.num_embeddings, self.embedding_dim = embedding.num_embeddings, embedding.embedding_dim
        self.ctx = ctx
        self.weight = _sharded(embedding.weight, 0, ctx)
        self.vocab_start = ctx.tp_rank * self.weight.shape[0]

    def forward(self, input_ids):
        local = input_ids - self.vocab_start
        outside = (local < 0) | (local >= self.weight.shape[0])
        x = F.embedding(local.masked_fill(outside, 0), self.weight)
        x = x.masked_fill(outside.unsqueeze(-1), 0.0)
        return exit_tp_region(x, self.ctx.tp_group, sequence_parallel_now(self, self.ctx))

    def extra_repr(self):
        return (f"{self.num_embeddings}, {self.embedding_dim} (this rank: rows {self.vocab_start}.."
                f"{self.vocab_start + self.weight.shape[0] - 1})")


class VocabParallelLMHead(ColumnParallelLinear):
    """The LM head on this rank's vocabulary rows; `process_group` sends the model's loss to the vocab-parallel CE.

    Its input is the final hidden state already in the TP region (tensor_parallel.py maps the model's output with
    enter_tp_region: copy_to_tp, or the sequence all-gather under sequence parallelism). Called as a module (the
    logits path, labels=None) it returns the full logits by default (gather_output=True); set gather_output False to
    get this rank's vocab shard (batch, seq, padded_vocab / tp) instead.
    """

    def __init__(self, linear: nn.Linear, ctx: ParallelContext, gather_output: bool = True):
        super().__init__(linear, ctx, gather_output)
