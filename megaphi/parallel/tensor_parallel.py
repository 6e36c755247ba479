"""apply_tensor_parallel: turn a full PhiForCausalLM into this rank's tensor-parallel shard, from outside the model.

The plan (modules swapped in place, names kept; hooks where phi.py calls ops rather than modules):

    model.embed_tokens          VocabParallelEmbedding; under SP it reduce-scatters onto sequence shards
    layers.N.input_layernorm    unchanged; under SP it runs on sequence shards (params: sequence_parallel_grad)
    layers.N.self_attn          pre-hook: its input enters the TP region once (copy_to_tp / SP all-gather)
      q_proj, k_proj, v_proj    ColumnParallelLinear: this rank's heads
      dense                     RowParallelLinear: all-reduce (SP: reduce-scatter), then the bias
    layers.N.mlp                ParallelMLP: fc1 column-parallel, fc2 row-parallel, one kernels.mlp call
    model.final_layernorm       as input_layernorm
    model (its output)          forward hook: the final hidden state enters the TP region for the head
    lm_head                     VocabParallelLMHead: exposes process_group, so the loss is the vocab-parallel CE

Dropout: without SP only attention dropout is inside a TP region (head shards): the attention forward runs under
the TP RNG fork, while hidden and embedding dropout act on replicated activations and use the default generator
(same masks on every TP rank). Under SP every activation inside the model is either head- or sequence-sharded,
so the whole model forward runs under the fork.

Sequence parallelism is a training-mode layout: in eval mode every module takes the TP-only path (same values),
so evaluation and KV-cache generation work at any sequence length.
"""

import contextlib

import torch.nn as nn

from megaphi.model.phi import PhiForCausalLM
from megaphi.parallel import random
from megaphi.parallel.groups import check_layout
from megaphi.parallel.layers import (ColumnParallelLinear, ParallelMLP, RowParallelLinear, VocabParallelEmbedding,
                                     VocabParallelLMHead, sequence_parallel_now)
from megaphi.parallel.mappings import enter_tp_region
from megaphi.parallel.state import ParallelContext


def _fork_rng_during_forward(module: nn.Module, enabled) -> None:
    """Runs module's forward under the TP RNG fork whenever enabled(module) holds when it is called."""
    active: list = []

    def enter(mod, args):
        stack = contextlib.ExitStack()
        if enabled(mod):
            stack.enter_context(random.get_tracker().fork(args[0].device))
        active.append(stack)

    def leave(mod, args, output):
        if active:  # empty when enter itself failed
            active.pop().close()

    module.register_forward_pre_hook(enter)
    module.register_forward_hook(leave, always_call=True)


def _enter_region_on_input(module: nn.Module, ctx: ParallelContext) -> None:
    module.register_forward_pre_hook(
        lambda mod, args: (enter_tp_region(args[0], ctx.tp_group, sequence_parallel_now(mod, ctx)), *args[1:]))


def _enter_region_on_output(module: nn.Module, ctx: ParallelContext) -> None:
    module.register_forward_hook(
        lambda mod, args, output: enter_tp_region(output, ctx.tp_group, sequence_parallel_now(mod, ctx)))


def _mark_sequence_parallel(module: nn.Module) -> None:
    for p in module.parameters():
        p.sequence_parallel_grad = True


def apply_tensor_parallel(model: PhiForCausalLM, ctx: ParallelContext) -> PhiForCausalLM:
    """Replaces model's layers by this rank's shards (in place; returns model); the identity when ctx.tp_size is 1.

    Build the full model from the seed first (any device), then call this on every rank of the TP group.
    """
    if ctx.tp_size == 1:
        return model
    if not isinstance(model, PhiForCausalLM):
        raise TypeError(f"apply_tensor_parallel takes a PhiForCausalLM (before any DP wrapping), got "
                        f"{type(model).__name__}")
    if isinstance(model.lm_head, VocabParallelLMHead):
        raise ValueError("apply_tensor_parallel was already applied to this model")
    check_layout(model.config, ctx.tp_size, ctx.world_size)
    sp = ctx.sequence_parallel
    body = model.model
    body.embed_tokens = VocabParallelEmbedding(body.embed_tokens, ctx)
    for layer in body.layers:
        attn = layer.self_attn
        attn.q_proj, attn.k_proj, attn.v_proj = (ColumnParallelLinear(lin, ctx)
                                                 for lin in (attn.q_proj, attn.k_proj, attn.v_proj))
        attn.dense = RowParallelLinear(attn.dense, ctx)
        _enter_region_on_input(attn, ctx)
        if not sp:
            _fork_rng_during_forward(attn, lambda mod: mod.training and mod.attention_dropout > 0)
        layer.mlp = ParallelMLP(layer.mlp, ctx)
        if sp:
            _mark_sequence_parallel(layer.input_layernorm)
    if sp:
        _mark_sequence_parallel(body.final_layernorm)
        c = model.config
        any_dropout = max(c.hidden_dropout, c.attention_dropout, c.embedding_dropout) > 0
        _fork_rng_during_forward(body, lambda mod: mod.training and any_dropout)
    _enter_region_on_output(body, ctx)
    model.lm_head = VocabParallelLMHead(model.lm_head, ctx)
    return model
