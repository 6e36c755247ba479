"""ZeRO-1: each data-parallel rank keeps and steps only its shard of the fp32 master weights and Adam states.

Parameters move into a flat fp32 buffer with the gradient buffer's layout (each parameter's data is a view into it).
Every bucket is split into dp_size equal contiguous shards; rank r owns shard r of each bucket, receives exactly that
part of the averaged gradient (reduce-scatter), steps it, and the updated buckets are all-gathered back. The weights
are fp32 already, so the master shard is a view of the parameter buffer itself, not a copy. The optimizer steps the
pieces where this rank's shards cross parameters, each in its parameter's weight-decay group.
"""

import torch
import torch.distributed as dist
from torch import nn

from megaphi.parallel.data_parallel import DataParallelOptimizer, all_gather
from megaphi.train import optim


def adamw(groups: list[dict], lr: float, betas: tuple[float, float], eps: float,
          device: torch.device) -> torch.optim.Optimizer:
    """AdamW over explicit groups, picking the implementation the way optim.build_optimizer does."""
    fused_adam = optim.fused_adam_class()
    if fused_adam is not None and device.type == "cuda":
        return fused_adam(groups, lr=lr, betas=betas, eps=eps, adam_w_mode=True)
    if device.type == "cuda":
        return torch.optim.AdamW(groups, lr=lr, betas=betas, eps=eps, fused=True)
    return torch.optim.AdamW(groups, lr=lr, betas=betas, eps=eps, foreach=True)


class DistributedOptimizer(DataParallelOptimizer):
    """DataParallelOptimizer with ZeRO-1 sharding: reduce-scatter gradients, step the own shard, all-gather params."""

    sharded = True

    def _build_optimizer(self, model: nn.Module, lr, weight_decay, betas, eps) -> torch.optim.Optimizer:
        grads = self.grads
        self.param_buffer = torch.zeros_like(grads.buffer)
        with torch.no_grad():
            for b in grads.buckets:
                for i, off in zip(b.params, b.offsets):
                    p = self.params[i]
                    view = self.param_buffer[b.start + off : b.start + off + p.numel()].view(p.shape)
                    view.copy_(p)
                    p.data = view
        self.data_ptrs = [p.data_ptr() for p in self.params]
        decay, no_decay = [], []
        self.entries, self.counted, self.offsets = {}, {}, {}
        for b in grads.buckets:
            lo, hi = grads.shard_range(b)
            for i, off in zip(b.params, b.offsets):
                p = self.params[i]
                start, end = max(lo, off), min(hi, off + p.numel())
                if start >= end:
                    continue
                piece = self.param_buffer[b.start + start : b.start + end]
                piece.grad = grads.buffer[b.start + start : b.start + end]
                self.entries[id(piece)] = (self.names[i], slice(start - off, end - off))
                self.counted[id(piece)] = self._counted(p)
                self.offsets[id(piece)] = b.start + start
                (decay if p.ndim >= 2 else no_decay).append(piece)
        if not decay and not no_decay:  # a tiny model on many ranks: this rank's shards are all padding
            empty = self.param_buffer[:0]
            empty.grad = grads.buffer[:0]
            no_decay.append(empty)
        groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
        return adamw(groups, lr, betas, eps, self.param_buffer.device)

    def step(self) -> None:
        """Steps this rank's shard, then all-gathers the updated parameters over DP."""
        for name, p, ptr in zip(self.names, self.params, self.data_ptrs):
            if p.data_ptr() != ptr:
                raise RuntimeError(f"parameter {name} no longer lives in the distributed optimizer's buffer: load "
                                   f"weights in place (load_state_dict without assign=True, copy_) and move the "
                                   f"model to its device before building the optimizer")
        self.optimizer.step()
        self._gather_buckets(self.param_buffer)

    def _gather_buckets(self, flat: torch.Tensor) -> None:
        """Fills every bucket of a buffer-shaped tensor from the rank owning each shard."""
        grads = self.grads
        if self.ctx.dp_size == 1:
            return
        works = []
        for b in grads.buckets:
            full = flat[b.start : b.start + b.numel]
            works.append(all_gather(full, full[slice(*grads.shard_range(b))], self.ctx.dp_group, grads.native))
        for work in works:
            work.wait()

    def state_dict_by_name(self) -> dict:
        """Collective over DP: the Adam states gathered to full parameter shapes, as the plain optimizer's."""
        pieces = [(t, g) for g in self.optimizer.param_groups for t in g["params"] if id(t) in self.entries]
        steps = [self._step_of(t, g) for t, g in pieces if "exp_avg" in self.optimizer.state.get(t, {})]
        # Ranks may differ in whether they hold any state (a shard of padding), so agree on it first.
        step = torch.tensor(max(steps, default=-1.0), dtype=torch.float64, device=self.param_buffer.device)
        if self.ctx.dp_size > 1:
            dist.all_reduce(step, op=dist.ReduceOp.MAX, group=self.ctx.dp_group)
        result = {"param_groups": self._hyperparameters(), "state": {}}
        if step < 0:
            return result
        state = result["state"]
        for name in self.names:
            state[name] = {"step": torch.tensor(float(step), dtype=torch.float32)}
        for key in ("exp_avg", "exp_avg_sq"):
            flat = torch.zeros_like(self.param_buffer)
            for t, _ in pieces:
                s = self.optimizer.state.get(t)
                if s and key in s:
                    offset = self.offsets[id(t)]
                    flat[offset : offset + t.numel()] = s[key]
            self._gather_buckets(flat)
            for b in self.grads.buckets:
                for i, off in zip(b.params, b.offsets):
                    p = self.params[i]
                    piece = flat[b.start + off : b.start + off + p.numel()]
                    state[self.names[i]][key] = piece.view(p.shape).to("cpu", copy=True)
            del flat, piece  # before the next key's buffer: one extra copy of the model in GPU memory, not two
        return result
