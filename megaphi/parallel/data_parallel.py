"""Data parallelism: gradients reduced over DP in fp32 buckets launched during the backward pass, and AdamW on top.

Gradients live in one flat fp32 buffer and each parameter's `.grad` is a view into it (Megatron's layout), so
autograd accumulates micro-batches in place and a bucket is reduced without a copy in or out. The buffer is laid out
in reverse parameter order (roughly the order backward produces gradients) and cut into buckets of about
`bucket_size_mb`; each bucket's async all-reduce (reduce-scatter under ZeRO-1) starts from a post-accumulate-grad hook
as soon as its last gradient is in, overlapping the rest of the backward. Buckets start strictly in index order, so
every rank issues the same collectives in the same order.
"""

import contextlib
import functools
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
from torch import nn

from megaphi.parallel.mappings import all_gather_tensor_fn, reduce_scatter_tensor_fn
from megaphi.parallel.state import ParallelContext
from megaphi.train import optim

_ALIGN = 64
"""Buckets are padded to a multiple of dp_size * _ALIGN elements, so every rank's shard starts 256-byte aligned."""

HYPERPARAMETERS = ("lr", "betas", "eps", "weight_decay")
"""The per-group settings state_dict_by_name() saves (implementation flags such as fused= stay with the machine)."""


def _group_size(group) -> int:
    return dist.get_world_size(group) if group is not None else dist.get_world_size()


def _group_rank(group) -> int:
    return dist.get_rank(group) if group is not None else dist.get_rank()


def reduce_scatter(output: torch.Tensor, input: torch.Tensor, group):
    """Async reduce-scatter (sum) of `input` into this rank's chunk `output` (nccl, or gloo in recent torch)."""
    return reduce_scatter_tensor_fn()(output, input, group=group, async_op=True)


def all_gather(output: torch.Tensor, shard: torch.Tensor, group, native: bool):
    """Async all-gather of every rank's `shard` into the flat `output` (a list all-gather where native is False)."""
    if native:
        return all_gather_tensor_fn()(output, shard, group=group, async_op=True)
    # The clone keeps gloo from reading a shard that aliases the output it writes.
    return dist.all_gather(list(output.chunk(_group_size(group))), shard.clone(), group=group, async_op=True)


@dataclass
class Bucket:
    """Consecutive parameters whose gradients form one contiguous slice of the flat buffer."""

    index: int
    params: list[int]
    """Indices (into GradBuckets.params) of the parameters, in buffer order."""
    offsets: list[int]
    """Start of each parameter inside the bucket."""
    start: int
    """Start of the bucket in the flat buffer."""
    numel: int
    """Padded size: a multiple of dp_size * _ALIGN."""
    ready: set[int] = field(default_factory=set)
    work: object = None


class GradBuckets:
    """The flat fp32 gradient buffer, its buckets, the hooks that launch them and the TP/DP gradient sync."""

    def __init__(self, params: list[nn.Parameter], names: list[str], ctx: ParallelContext, bucket_size_mb: float,
                 shard: bool):
        self.params, self.names, self.ctx, self.shard = params, names, ctx, shard
        self.dp_group = ctx.dp_group
        self.dp_size = ctx.dp_size
        self.dp_rank = ctx.dp_rank
        if self.dp_size > 1 or ctx.tp_size > 1:
            if not dist.is_initialized():
                raise ValueError(f"dp_size={ctx.dp_size}, tp_size={ctx.tp_size} need torch.distributed: call "
                                 f"init_process_group before build_parallel_optimizer")
        if self.dp_size > 1:
            if _group_size(self.dp_group) != self.dp_size:
                raise ValueError(f"ParallelContext has dp_size={self.dp_size} but its dp_group has "
                                 f"{_group_size(self.dp_group)} ranks")
            self.dp_rank = _group_rank(self.dp_group)  # the shard index must be the rank inside the group
        device = params[0].device
        self.buckets = self._layout(int(bucket_size_mb * 2**20) // 4)
        total = sum(b.numel for b in self.buckets)
        self.buffer = torch.zeros(total, dtype=torch.float32, device=device)
        self.views: list[torch.Tensor] = [None] * len(params)
        self.bucket_of: list[Bucket] = [None] * len(params)
        for b in self.buckets:
            for i, off in zip(b.params, b.offsets):
                start = b.start + off
                self.views[i] = self.buffer[start : start + params[i].numel()].view(params[i].shape)
                self.bucket_of[i] = b
        self.attach_grads()
        self.native = (self.dp_size > 1 and device.type != "cpu"
                       and dist.get_backend(self.dp_group) != "gloo")
        """Reduce-scatter and all-gather into flat tensors (nccl); else all-reduce + slice and list all-gathers."""
        self.sync = True
        self.next_bucket = 0
        self.hooks = []
        if self.dp_size > 1:
            for i, p in enumerate(params):
                self.hooks.append(p.register_post_accumulate_grad_hook(functools.partial(self._grad_ready, i)))
        self.sp_params = [i for i, p in enumerate(params) if getattr(p, "sequence_parallel_grad", False)]

    def _layout(self, bucket_elems: int) -> list[Bucket]:
        """Buckets of about bucket_elems elements over the parameters in reverse order."""
        align = self.dp_size * _ALIGN
        groups: list[list[int]] = []
        size = bucket_elems
        for i in reversed(range(len(self.params))):
            if size >= bucket_elems:
                groups.append([])
                size = 0
            groups[-1].append(i)
            size += self.params[i].numel()
        buckets, start = [], 0
        for index, members in enumerate(groups):
            offsets, n = [], 0
            for i in members:
                offsets.append(n)
                n += self.params[i].numel()
            numel = -(-n // align) * align
            buckets.append(Bucket(index, members, offsets, start, numel))
            start += numel
        return buckets

    def bucket_grad(self, b: Bucket) -> torch.Tensor:
        """The bucket's slice of the flat gradient buffer."""
        return self.buffer[b.start : b.start + b.numel]

    def shard_range(self, b: Bucket) -> tuple[int, int]:
        """This DP rank's [start, end) inside the bucket (the whole bucket without sharding)."""
        if not self.shard:
            return 0, b.numel
        size = b.numel // self.dp_size
        return self.dp_rank * size, (self.dp_rank + 1) * size

    def regions(self) -> list[torch.Tensor]:
        """The parts of the buffer whose gradients are valid on this rank after finish(): all, or the shards."""
        if not self.shard:
            return [self.buffer]
        return [self.bucket_grad(b)[slice(*self.shard_range(b))] for b in self.buckets]

    def attach_grads(self) -> None:
        """Points every parameter's .grad at its view of the buffer (again, if something replaced it)."""
        for p, view in zip(self.params, self.views):
            if p.grad is None or p.grad.data_ptr() != view.data_ptr():
                p.grad = view

    def zero(self) -> None:
        """Zeroes the buffer and forgets any half-finished sync."""
        self._wait()
        self.attach_grads()
        self.buffer.zero_()

    @contextlib.contextmanager
    def no_sync(self):
        """Backward passes inside accumulate into the buffer without any communication."""
        previous, self.sync = self.sync, False
        try:
            yield
        finally:
            self.sync = previous

    def _grad_ready(self, index: int, param: torch.Tensor) -> None:
        if not self.sync:
            return
        b = self.bucket_of[index]
        if index in b.ready:
            raise RuntimeError(f"parameter {self.names[index]} got a second gradient outside no_sync() before "
                               f"finish_grad_sync(): run every micro-batch's backward but the last inside "
                               f"opt.no_sync(), then call opt.finish_grad_sync()")
        b.ready.add(index)
        if len(b.ready) == len(b.params):
            while (self.next_bucket < len(self.buckets)
                   and len(self.buckets[self.next_bucket].ready) == len(self.buckets[self.next_bucket].params)):
                self._launch(self.buckets[self.next_bucket])

    def _launch(self, b: Bucket) -> None:
        grad = self.bucket_grad(b)
        # Averaging before the sum keeps the fp32 values at one rank's scale; exact for power-of-two dp_size.
        grad.mul_(1.0 / self.dp_size)
        if self.shard and self.native:
            b.work = reduce_scatter(grad[slice(*self.shard_range(b))], grad, self.dp_group)
        else:  # ZeRO on gloo keeps its shard of the all-reduced bucket
            b.work = dist.all_reduce(grad, group=self.dp_group, async_op=True)
        self.next_bucket = b.index + 1

    def _wait(self) -> None:
        for b in self.buckets:
            if b.work is not None:
                b.work.wait()
                b.work = None
            b.ready.clear()
        self.next_bucket = 0

    def finish(self) -> None:
        """Launches the buckets the hooks did not, waits for all, then all-reduces sequence-parallel grads over TP."""
        if self.dp_size > 1:
            for b in self.buckets[self.next_bucket :]:
                self._launch(b)
        self._wait()
        for name, p, view in zip(self.names, self.params, self.views):
            if p.grad is None or p.grad.data_ptr() != view.data_ptr():
                raise RuntimeError(f"the .grad of {name} no longer points into the gradient buffer: use "
                                   f"opt.zero_grad() (not model.zero_grad or set_to_none) and no create_graph")
        if self.sp_params and self.ctx.tp_size > 1:
            # Summing over TP commutes with the DP average, so doing it after lets the DP buckets overlap backward.
            grads = [self.views[i] for i in self.sp_params]
            flat = torch.cat([g.reshape(-1) for g in grads])
            dist.all_reduce(flat, group=self.ctx.tp_group)
            for g, f in zip(grads, flat.split([g.numel() for g in grads])):
                g.copy_(f.view_as(g))

    def remove_hooks(self) -> None:
        """Detaches the post-accumulate-grad hooks from the parameters."""
        for h in self.hooks:
            h.remove()
        self.hooks = []


class DataParallelOptimizer:
    """AdamW on gradients averaged over data-parallel ranks; every rank keeps full Adam states and steps all."""

    sharded = False

    def __init__(self, model: nn.Module, ctx: ParallelContext, lr: float, weight_decay: float,
                 betas: tuple[float, float], eps: float, bucket_size_mb: float = 25.0):
        if not bucket_size_mb > 0:
            raise ValueError(f"--ddp-bucket-size-mb must be positive, got {bucket_size_mb}")
        named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        if not named:
            raise ValueError("the model has no trainable parameters")
        for n, p in named:
            if p.dtype != torch.float32:
                raise ValueError(f"parameter {n} is {p.dtype}: keep weights fp32 (mixed precision runs through "
                                 f"autocast, --bf16/--fp16) so gradients and masters are fp32")
            if p.device != named[0][1].device:
                raise ValueError(f"parameter {n} is on {p.device}, {named[0][0]} on {named[0][1].device}: move the "
                                 f"model to one device before building the optimizer")
        self.ctx = ctx
        self.names = [n for n, _ in named]
        self.params = [p for _, p in named]
        self.grads = GradBuckets(self.params, self.names, ctx, bucket_size_mb, shard=self.sharded)
        self.optimizer = self._build_optimizer(model, lr, weight_decay, betas, eps)

    def _build_optimizer(self, model, lr, weight_decay, betas, eps) -> torch.optim.Optimizer:
        self.entries = {id(p): (name, None) for name, p in zip(self.names, self.params)}
        """Optimizer tensor -> (parameter name, flat slice of that parameter or None for all of it)."""
        self.counted = {id(p): self._counted(p) for p in self.params}
        return optim.build_optimizer(model, lr, weight_decay, betas, eps)

    def _counted(self, param: nn.Parameter) -> bool:
        # A TP-sharded parameter's norm is spread over the TP ranks; a replicated one is counted on tp_rank 0 only.
        return getattr(param, "tensor_parallel_dim", None) is not None or self.ctx.tp_rank == 0

    @property
    def param_groups(self) -> list[dict]:
        """The underlying optimizer's groups (decay, no decay); set_lr writes their "lr"."""
        return self.optimizer.param_groups

    def zero_grad(self, set_to_none: bool | None = None) -> None:
        """Zeroes the gradient buffer (gradients stay views into it, so set_to_none is ignored)."""
        self.grads.zero()

    def no_sync(self):
        """Context for the backward of every micro-batch but the last: accumulate, no communication."""
        return self.grads.no_sync()

    def finish_grad_sync(self) -> None:
        """Waits for the bucket reductions (launching any not started) and sums sequence-parallel grads over TP."""
        self.grads.finish()

    def unscale_(self, factor: float) -> None:
        """Multiplies this rank's valid gradients by factor (1 / loss scale)."""
        if factor != 1.0:
            torch._foreach_mul_(self.grads.regions(), factor)

    def clip_grad_norm(self, max_norm: float) -> torch.Tensor:
        """Global L2 norm of the gradients over TP and DP shards (0-d fp32, equal on all ranks); clips to max_norm."""
        tensors = [t for g in self.optimizer.param_groups for t in g["params"]]
        counted = [t.grad for t in tensors if self.counted.get(id(t), False)]
        sq = torch.zeros((), dtype=torch.float32, device=self.grads.buffer.device)
        if counted:
            sq = torch.stack(torch._foreach_norm(counted)).square().sum()
        if self.ctx.tp_size > 1:
            dist.all_reduce(sq, group=self.ctx.tp_group)
        if self.sharded and self.ctx.dp_size > 1:
            dist.all_reduce(sq, group=self.ctx.dp_group)
        norm = sq.sqrt()
        grads = [t.grad for t in tensors if t.numel()]
        if max_norm > 0 and grads and bool(torch.isfinite(norm)):
            # torch.nn.utils.clip_grad_norm_'s coefficient, so a single process matches it exactly
            torch._foreach_mul_(grads, (max_norm / (norm + 1e-6)).clamp(max=1.0))
        return norm

    def step(self) -> None:
        """One AdamW step on the synced gradients."""
        self.optimizer.step()

    def _step_of(self, tensor: torch.Tensor, group: dict) -> float:
        state = self.optimizer.state.get(tensor, {})
        return float(state["step"]) if "step" in state else float(group.get("step", 0))  # apex keeps it per group

    def _hyperparameters(self) -> list[dict]:
        return [{k: (tuple(g[k]) if k == "betas" else g[k]) for k in HYPERPARAMETERS if k in g}
                for g in self.optimizer.param_groups]

    def state_dict_by_name(self) -> dict:
        """{"param_groups": [hyperparameters], "state": {name: {"step", "exp_avg", "exp_avg_sq"}}}: CPU copies."""
        state = {}
        for g in self.optimizer.param_groups:
            for p in g["params"]:
                s = self.optimizer.state.get(p)
                if s and "exp_avg" in s:
                    name = self.entries[id(p)][0]
                    state[name] = {"step": torch.tensor(self._step_of(p, g), dtype=torch.float32),
                                   "exp_avg": s["exp_avg"].detach().to("cpu", copy=True),
                                   "exp_avg_sq": s["exp_avg_sq"].detach().to("cpu", copy=True)}
        return {"param_groups": self._hyperparameters(), "state": state}

    def _check_state_dict(self, sd: dict) -> None:
        if not isinstance(sd, dict) or "param_groups" not in sd or "state" not in sd:
            raise ValueError("optimizer state: expected state_dict_by_name()'s {'param_groups', 'state'} dict")
        if len(sd["param_groups"]) != len(self.optimizer.param_groups):
            raise ValueError(f"optimizer state has {len(sd['param_groups'])} parameter groups, this optimizer "
                             f"{len(self.optimizer.param_groups)}")
        state = sd["state"]
        unknown = sorted(set(state) - set(self.names))
        missing = [n for n in self.names if n not in state] if state else []
        if unknown or missing:
            raise ValueError(f"optimizer state does not match the model: unknown {unknown[:5]}, missing "
                             f"{missing[:5]}")
        for name, p in zip(self.names, self.params):
            for key in ("exp_avg", "exp_avg_sq"):
                if name in state and tuple(state[name][key].shape) != tuple(p.shape):
                    raise ValueError(f"optimizer state {name}.{key} has shape {tuple(state[name][key].shape)}, "
                                     f"this rank's parameter {tuple(p.shape)}: reshard the checkpoint to this "
                                     f"tensor-parallel layout")

    def load_state_dict_by_name(self, sd: dict) -> None:
        """Loads state_dict_by_name()'s output saved by a plain or ZeRO-1 optimizer at any DP size."""
        self._check_state_dict(sd)
        index, groups, state = 0, [], {}
        for g, saved in zip(self.optimizer.param_groups, sd["param_groups"]):
            # Only the hyperparameters: a format-1 or plain torch state also holds fused=/foreach=, which belong
            # to the machine that saved it (a CUDA run resumed on the CPU, or the other way round).
            saved = {k: saved[k] for k in HYPERPARAMETERS if k in saved}
            ids = []
            for t in g["params"]:
                entry = self.entries.get(id(t))
                s = sd["state"].get(entry[0]) if entry else None
                if s is not None:
                    state[index] = {"step": torch.tensor(float(s["step"]), dtype=torch.float32)}
                    for key in ("exp_avg", "exp_avg_sq"):
                        value = s[key] if entry[1] is None else s[key].reshape(-1)[entry[1]]
                        state[index][key] = value.to(device=t.device, dtype=t.dtype, copy=True)
                    if "step" in g:
                        saved = {**saved, "step": int(s["step"])}
                ids.append(index)
                index += 1
            groups.append({**{k: v for k, v in g.items() if k != "params"}, **saved, "params": ids})
        self.optimizer.load_state_dict({"state": state, "param_groups": groups})


def build_parallel_optimizer(model: nn.Module, ctx: ParallelContext | None, lr: float, weight_decay: float,
                             betas: tuple[float, float], eps: float, distributed_optimizer: bool = False,
                             bucket_size_mb: float = 25.0) -> DataParallelOptimizer:
    """AdamW with overlapped DP gradient buckets (ZeRO-1 sharded with distributed_optimizer); any layout."""
    ctx = ctx or ParallelContext()
    if distributed_optimizer:
        from megaphi.parallel.distributed_optimizer import DistributedOptimizer  # it subclasses this module's

        return DistributedOptimizer(model, ctx, lr, weight_decay, betas, eps, bucket_size_mb)
    return DataParallelOptimizer(model, ctx, lr, weight_decay, betas, eps, bucket_size_mb)
