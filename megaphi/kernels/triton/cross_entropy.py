"""The LM head and the cross-entropy in chunks of tokens: the (tokens x vocab) logits never exist in memory.

hidden (..., h), weight (V, h), bias (V,), labels (...) -> loss. Per chunk of tokens: logits = h_c @ weight.T + bias
(cuBLAS, in the input dtype, as F.linear would), a Triton kernel computes each row's online max and sum-exp and its
target logit, and a second kernel overwrites the logits with their gradient (softmax - onehot) * scale. That
gradient then feeds dh_c = dlogits @ weight (cuBLAS) and dweight += dlogits.T @ h_c (an fp32-accumulating Triton
GEMM), dbias += the column sums.

Where the gradients are computed: for reduction "mean" and "sum" in the forward (Liger style: one logits GEMM
instead of two, the backward only scales by grad_output); for "none" in the backward, which recomputes each
chunk's logits from the saved log-sum-exp, since per-token grad_output scales cannot be applied to a finished
dweight. With a process group, weight and bias are this rank's contiguous vocab shard: the row max, sum-exp and
target logit are all-reduced per chunk, the loss is the full-vocab loss on every rank, and the hidden gradient is
this shard's contribution (the tensor-parallel layer sums it over the group).
"""

import torch
import torch.distributed as dist
import triton
import triton.language as tl

from megaphi.kernels.autocast import autocast_inputs
from megaphi.kernels.triton.common import INTERPRET, check_device
from megaphi.kernels.triton.mlp import EPILOGUE_ACCUMULATE, gemm

CHUNK_ELEMENTS = 2**28  # logits per chunk (512 MiB in bf16): few chunks, far below the full logits
MAX_BLOCK_V = 64 if INTERPRET else 4096  # small in the interpreter, so its tests cover the vocab loop


@triton.jit
def _ce_stats_kernel(LOGITS, LABELS, MAX, SUMEXP, TARGET, stride, V, vocab_start, ignore_index,
                     BLOCK_V: tl.constexpr):
    """Per row: max logit, sum of exp(logit - max), and the target's logit (0 when not in this shard)."""
    row = tl.program_id(0).to(tl.int64)
    base = LOGITS + row * stride
    m = float("-inf")
    d = 0.0
    for start in range(0, V, BLOCK_V):
        cols = start + tl.arange(0, BLOCK_V)
        x = tl.load(base + cols, mask=cols < V, other=float("-inf")).to(tl.float32)
        m_new = tl.maximum(m, tl.max(x, axis=0))
        d = d * tl.exp(m - m_new) + tl.sum(tl.exp(x - m_new), axis=0)
        m = m_new
    label = tl.load(LABELS + row)
    local = label - vocab_start
    here = (label != ignore_index) & (local >= 0) & (local < V)
    target = tl.load(base + tl.where(here, local, 0), mask=here, other=0.0).to(tl.float32)
    tl.store(MAX + row, m)
    tl.store(SUMEXP + row, d)
    tl.store(TARGET + row, tl.where(here, target, 0.0))


@triton.jit
def _ce_grad_kernel(LOGITS, LABELS, LSE, SCALE, stride, scale_stride, V, vocab_start, ignore_index,
                    BLOCK_V: tl.constexpr):
    """Overwrite a row of logits with (softmax - onehot(label)) * scale; zeros for ignored rows."""
    row = tl.program_id(0).to(tl.int64)
    base = LOGITS + row * stride
    label = tl.load(LABELS + row)
    lse = tl.load(LSE + row)
    scale = tl.where(label != ignore_index, tl.load(SCALE + row * scale_stride), 0.0)
    local = label - vocab_start
    for start in range(0, V, BLOCK_V):
        cols = start + tl.arange(0, BLOCK_V)
        mask = cols < V
        x = tl.load(base + cols, mask=mask, other=0.0).to(tl.float32)
        g = (tl.exp(x - lse) - tl.where(cols == local, 1.0, 0.0)) * scale
        tl.store(base + cols, g.to(LOGITS.dtype.element_ty), mask=mask)


def _group_size(group):
    return dist.get_world_size(group) if group is not None else 1


class _Chunks:
    """The per-chunk pieces shared by the forward and the recomputing backward."""

    def __init__(self, h, weight, bias, labels, ignore_index, group, chunk_size):
        self.h, self.weight, self.bias, self.labels, self.ignore_index = h, weight, bias, labels, ignore_index
        self.group = group if _group_size(group) > 1 else None
        vocab = weight.shape[0]
        self.vocab_start = dist.get_rank(group) * vocab if self.group is not None else 0
        n = h.shape[0]
        if chunk_size is None:  # equal chunks of at most about CHUNK_ELEMENTS logits, rows a multiple of 64
            chunks = triton.cdiv(n, max(1, CHUNK_ELEMENTS // vocab))
            chunk_size = min(n, triton.cdiv(triton.cdiv(n, chunks), 64) * 64)
        self.chunk = max(1, chunk_size)
        self.buffer = h.new_empty(min(self.chunk, h.shape[0]), vocab)
        self.block = min(triton.next_power_of_2(vocab), MAX_BLOCK_V)
        self.warps = 1 if INTERPRET else 8

    def ranges(self):
        n = self.h.shape[0]
        return [(s, min(s + self.chunk, n)) for s in range(0, n, self.chunk)]

    def logits(self, start, end):
        out = self.buffer[: end - start]
        if self.bias is not None:
            return torch.addmm(self.bias, self.h[start:end], self.weight.t(), out=out)
        return torch.mm(self.h[start:end], self.weight.t(), out=out)

    def lse_and_target(self, logits, start, end):
        """Log-sum-exp over the full vocab and the target logit, each (rows,) fp32."""
        rows, vocab = logits.shape
        stats = torch.empty(3, rows, dtype=torch.float32, device=logits.device)
        _ce_stats_kernel[(rows,)](logits, self.labels[start:end], stats[0], stats[1], stats[2], logits.stride(0),
                                  vocab, self.vocab_start, self.ignore_index, BLOCK_V=self.block,
                                  num_warps=self.warps)
        row_max, sumexp, target = stats
        if self.group is not None:
            local_max = row_max.clone()
            dist.all_reduce(row_max, dist.ReduceOp.MAX, group=self.group)
            sumexp.mul_(torch.exp(local_max - row_max))
            dist.all_reduce(stats[1:], group=self.group)  # sum-exp and target logit in one call
        return row_max + torch.log(sumexp), target

    def backward(self, logits, start, end, lse, scale, scale_stride, dh, dw, db):
        """Turn logits into their gradient in place, then add this chunk's share to dh, dw (fp32), db (fp32)."""
        rows, vocab = logits.shape
        _ce_grad_kernel[(rows,)](logits, self.labels[start:end], lse, scale, logits.stride(0), scale_stride,
                                 vocab, self.vocab_start, self.ignore_index, BLOCK_V=self.block,
                                 num_warps=self.warps)
        if dh is not None:
            torch.mm(logits, self.weight, out=dh[start:end])
        if dw is not None:
            if logits.dtype == torch.float32:
                dw.addmm_(logits.t(), self.h[start:end])
            else:
                gemm(logits.t(), self.h[start:end], dw, EPILOGUE_ACCUMULATE)
        if db is not None:
            db.add_(logits.sum(0, dtype=torch.float32))


class _LinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, bias, labels, ignore_index, reduction, group, chunk_size, want_grads):
        h = hidden.reshape(-1, hidden.shape[-1])
        y = labels.reshape(-1).contiguous()
        ch = _Chunks(h, weight, bias, y, ignore_index, group, chunk_size)
        n = h.shape[0]
        losses = torch.empty(n, dtype=torch.float32, device=h.device)
        lse_all = torch.empty_like(losses) if want_grads and reduction == "none" else None
        count = (y != ignore_index).sum()
        grads_now = want_grads and reduction != "none"
        need_h, need_w, need_b = ctx.needs_input_grad[:3]
        dh = torch.empty_like(h) if grads_now and need_h else None
        dw = torch.zeros(weight.shape, dtype=torch.float32, device=h.device) if grads_now and need_w else None
        db = torch.zeros(weight.shape[0], dtype=torch.float32, device=h.device) if grads_now and need_b else None
        # Scale the gradients by 1/count now, except in fp16, whose range cannot hold softmax/count (the backward
        # scales then, after the loss scale has been applied).
        if reduction == "mean" and h.dtype != torch.float16:
            scale = 1.0 / count.clamp(min=1).float().view(1)
        else:
            scale = torch.ones(1, dtype=torch.float32, device=h.device)
        for start, end in ch.ranges():
            logits = ch.logits(start, end)
            lse, target = ch.lse_and_target(logits, start, end)
            losses[start:end] = torch.where(y[start:end] != ignore_index, lse - target, 0.0)
            if lse_all is not None:
                lse_all[start:end] = lse
            if grads_now:
                ch.backward(logits, start, end, lse, scale, 0, dh, dw, db)
        ctx.reduction, ctx.shapes = reduction, (hidden.shape, labels.shape)
        ctx.weight_dtype, ctx.bias_dtype = weight.dtype, bias.dtype if bias is not None else None
        ctx.late_mean = reduction == "mean" and h.dtype == torch.float16
        if want_grads:
            if grads_now:
                ctx.save_for_backward(dh, dw, db, count)
            else:
                ctx.save_for_backward(h, weight, bias, y, lse_all)
                ctx.chunk_args = (ignore_index, group, chunk_size)
        if reduction == "none":
            return losses.view(labels.shape)
        total = losses.sum()
        return total / count if reduction == "mean" else total

    @staticmethod
    def backward(ctx, grad_out):
        if ctx.reduction == "none":
            return _LinearCrossEntropy._recompute(ctx, grad_out)
        dh, dw, db, count = ctx.saved_tensors
        g = grad_out.float() / count.clamp(min=1) if ctx.late_mean else grad_out.float()
        dh = (dh * g).to(dh.dtype).view(ctx.shapes[0]) if dh is not None else None
        dw = (dw * g).to(ctx.weight_dtype) if dw is not None else None
        db = (db * g).to(ctx.bias_dtype) if db is not None else None
        return dh, dw, db, None, None, None, None, None, None

    @staticmethod
    def _recompute(ctx, grad_out):
        h, weight, bias, y, lse_all = ctx.saved_tensors
        need_h, need_w, need_b = ctx.needs_input_grad[:3]
        ch = _Chunks(h, weight, bias, y, *ctx.chunk_args)
        dh = torch.empty_like(h) if need_h else None
        dw = torch.zeros(weight.shape, dtype=torch.float32, device=h.device) if need_w else None
        db = torch.zeros(weight.shape[0], dtype=torch.float32, device=h.device) if need_b else None
        scale = grad_out.reshape(-1).float().contiguous()
        for start, end in ch.ranges():
            logits = ch.logits(start, end)
            ch.backward(logits, start, end, lse_all[start:end], scale[start:], 1, dh, dw, db)
        dh = dh.view(ctx.shapes[0]) if dh is not None else None
        dw = dw.to(weight.dtype) if dw is not None else None
        db = db.to(bias.dtype) if db is not None else None
        return dh, dw, db, None, None, None, None, None, None


def linear_cross_entropy(hidden, weight, bias, labels, ignore_index=-100, reduction="mean", process_group=None,
                         chunk_size=None):
    """Cross entropy of hidden @ weight.T + bias against labels without materializing the logits; loss in fp32.

    process_group: weight/bias are this rank's vocab shard (rank r: rows [r V/tp, (r+1) V/tp)); labels are global
    ids. chunk_size: tokens per chunk (default: as many as keep a chunk's logits under CHUNK_ELEMENTS).
    """
    if reduction not in ("mean", "sum", "none"):
        raise ValueError(f"linear_cross_entropy: reduction must be 'mean', 'sum' or 'none', got {reduction!r}")
    hidden, weight, bias = autocast_inputs(hidden, weight, bias)
    check_device("linear_cross_entropy", hidden, weight, bias, labels)
    if labels.shape != hidden.shape[:-1]:
        raise ValueError(f"linear_cross_entropy: labels {tuple(labels.shape)} must be hidden's leading dims "
                         f"{tuple(hidden.shape[:-1])}")
    dtypes = {t.dtype for t in (hidden, weight, bias) if t is not None}
    if len(dtypes) > 1:
        raise ValueError(f"linear_cross_entropy: hidden, weight and bias must share one dtype (or run under autocast), "
                         f"got {sorted(map(str, dtypes))}")
    want_grads = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (hidden, weight, bias))
    with torch.autocast(hidden.device.type, enabled=False):
        return _LinearCrossEntropy.apply(hidden, weight, bias, labels, ignore_index, reduction, process_group,
                                         chunk_size, want_grads)
