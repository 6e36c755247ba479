"""Flash-attention-2 backward for rotary attention, with dQ and dK un-rotated in the kernels' epilogues.

Inputs are the forward's rotated q_rot, k_rot (so no inner loop rotates anything), v, o, the base-2 lse and dO.
Three launches, no atomics: delta = rowsum(dO * O); a dK/dV kernel (one program per key block, looping over the
query blocks from its diagonal on); a dQ kernel (one program per query block, looping over key blocks up to its
diagonal). The rotation is orthogonal, so the gradients of the un-rotated q, k are R^T dq_rot, R^T dk_rot: applied to
the fp32 accumulators before the store ("epilogue"), or by the rotary kernel afterwards ("postpass").
"""

import math

import torch
import triton
import triton.language as tl

from megaphi.kernels.triton.attention_fwd import INTERPRET_META, LOG2E, dot_precision, prune_configs
from megaphi.kernels.triton.common import INTERPRET
from megaphi.kernels.triton.rotary import rotate, rotate_tile

# dK/dV: BLOCK_N (keys held) must be a multiple of BLOCK_M (queries streamed); dQ: the other way round. The last
# config of each is the smallest (prune_configs).
DKDV_CONFIGS = [
    triton.Config({"BLOCK_M": bm, "BLOCK_N": bn}, num_warps=w, num_stages=s)
    for bm, bn, w, s in [(32, 128, 4, 3), (64, 128, 8, 3), (32, 64, 4, 3), (64, 64, 4, 3), (16, 64, 4, 2)]
]
DQ_CONFIGS = [
    triton.Config({"BLOCK_M": bm, "BLOCK_N": bn}, num_warps=w, num_stages=s)
    for bm, bn, w, s in [(128, 32, 4, 3), (128, 64, 8, 3), (64, 32, 4, 3), (64, 64, 4, 3), (64, 16, 4, 2)]
]


@triton.jit
def _bwd_preprocess(O, DO, DELTA, seq, heads, stride_ob, stride_os, stride_oh, stride_db, stride_ds, stride_dh,
                    HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr):
    bh = tl.program_id(1)
    b = (bh // heads).to(tl.int64)
    h = (bh % heads).to(tl.int64)
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD_DIM)
    mask = (offs_m < seq)[:, None]
    o = tl.load(O + b * stride_ob + h * stride_oh + offs_m[:, None] * stride_os + offs_d[None, :], mask=mask,
                other=0.0)
    do = tl.load(DO + b * stride_db + h * stride_dh + offs_m[:, None] * stride_ds + offs_d[None, :], mask=mask,
                 other=0.0)
    delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), axis=1)
    tl.store(DELTA + bh.to(tl.int64) * seq + offs_m, delta, mask=offs_m < seq)


@triton.jit
def _dkdv_blocks(dk, dv, k, v, Q, DO, LSE, DELTA, q_base, do_base, stats_base, stride_qs, stride_ds, offs_n,
                 lo, hi, seq, qk_scale, BLOCK_M: tl.constexpr, HEAD_DIM: tl.constexpr, MASKED: tl.constexpr,
                 DOT_PREC: tl.constexpr):
    # Query blocks [lo, hi); MASKED blocks cross the causal diagonal. Query rows past seq load as zeros (dO = 0,
    # delta = 0), so they add nothing.
    offs_d = tl.arange(0, HEAD_DIM)
    for start_m in range(lo, hi, BLOCK_M):
        offs_m = start_m + tl.arange(0, BLOCK_M)
        m_mask = offs_m < seq
        q = tl.load(Q + q_base + offs_m[:, None] * stride_qs + offs_d[None, :], mask=m_mask[:, None], other=0.0)
        do = tl.load(DO + do_base + offs_m[:, None] * stride_ds + offs_d[None, :], mask=m_mask[:, None], other=0.0)
        lse = tl.load(LSE + stats_base + offs_m, mask=m_mask, other=0.0)
        delta = tl.load(DELTA + stats_base + offs_m, mask=m_mask, other=0.0)
        p_t = tl.exp2(tl.dot(k, tl.trans(q), input_precision=DOT_PREC) * qk_scale - lse[None, :])
        if MASKED:
            p_t = tl.where(offs_m[None, :] >= offs_n[:, None], p_t, 0.0)
        dv = tl.dot(p_t.to(do.dtype), do, dv, input_precision=DOT_PREC)
        dp_t = tl.dot(v, tl.trans(do), input_precision=DOT_PREC)
        ds_t = p_t * (dp_t - delta[None, :])
        dk = tl.dot(ds_t.to(q.dtype), q, dk, input_precision=DOT_PREC)
    return dk, dv


@triton.jit
def _bwd_dkdv_kernel(Q, K, V, DO, LSE, DELTA, DK, DV, COS, SIN, seq, heads, qk_scale, sm_scale,
                     stride_qb, stride_qs, stride_qh, stride_kb, stride_ks, stride_kh,
                     stride_vb, stride_vs, stride_vh, stride_db, stride_ds, stride_dh,
                     stride_gb, stride_gs, stride_gh,
                     HEAD_DIM: tl.constexpr, HALF: tl.constexpr, CHUNKS: tl.constexpr, CAUSAL: tl.constexpr,
                     UNROTATE: tl.constexpr, DOT_PREC: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    # DK and DV share the (contiguous) layout stride_g*.
    bh = tl.program_id(1)
    b = (bh // heads).to(tl.int64)
    h = (bh % heads).to(tl.int64)
    start_n = tl.program_id(0) * BLOCK_N
    offs_n = start_n + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_DIM)
    n_mask = offs_n < seq
    k = tl.load(K + b * stride_kb + h * stride_kh + offs_n[:, None] * stride_ks + offs_d[None, :],
                mask=n_mask[:, None], other=0.0)
    v = tl.load(V + b * stride_vb + h * stride_vh + offs_n[:, None] * stride_vs + offs_d[None, :],
                mask=n_mask[:, None], other=0.0)
    dk = tl.zeros([BLOCK_N, HEAD_DIM], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, HEAD_DIM], dtype=tl.float32)
    q_base = b * stride_qb + h * stride_qh
    do_base = b * stride_db + h * stride_dh
    stats_base = bh.to(tl.int64) * seq
    if CAUSAL:
        # Queries before this key block never see it; the first BLOCK_N queries cross the diagonal.
        mid = tl.minimum(start_n + BLOCK_N, seq)
        dk, dv = _dkdv_blocks(dk, dv, k, v, Q, DO, LSE, DELTA, q_base, do_base, stats_base, stride_qs, stride_ds,
                              offs_n, start_n, mid, seq, qk_scale, BLOCK_M, HEAD_DIM, True, DOT_PREC)
    else:
        mid = 0
    dk, dv = _dkdv_blocks(dk, dv, k, v, Q, DO, LSE, DELTA, q_base, do_base, stats_base, stride_qs, stride_ds,
                          offs_n, mid, seq, seq, qk_scale, BLOCK_M, HEAD_DIM, False, DOT_PREC)
    dk = dk * sm_scale
    if UNROTATE:
        dk = rotate_tile(dk, COS, SIN, offs_n, n_mask, BLOCK_N, HEAD_DIM, HALF, CHUNKS, True)
    out = b * stride_gb + h * stride_gh + offs_n[:, None] * stride_gs + offs_d[None, :]
    tl.store(DK + out, dk.to(DK.dtype.element_ty), mask=n_mask[:, None])
    tl.store(DV + out, dv.to(DV.dtype.element_ty), mask=n_mask[:, None])


@triton.jit
def _dq_blocks(dq, q, do, lse, delta, K, V, k_base, v_base, stride_ks, stride_vs, offs_m, lo, hi, seq, qk_scale,
               BLOCK_N: tl.constexpr, HEAD_DIM: tl.constexpr, MASKED: tl.constexpr, CAUSAL: tl.constexpr,
               DOT_PREC: tl.constexpr):
    # Key blocks [lo, hi); MASKED blocks may cross the causal diagonal or the end of the sequence.
    offs_d = tl.arange(0, HEAD_DIM)
    for start_n in range(lo, hi, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        n_mask = offs_n < seq
        if MASKED:
            k = tl.load(K + k_base + offs_n[:, None] * stride_ks + offs_d[None, :], mask=n_mask[:, None], other=0.0)
            v = tl.load(V + v_base + offs_n[:, None] * stride_vs + offs_d[None, :], mask=n_mask[:, None], other=0.0)
        else:
            k = tl.load(K + k_base + offs_n[:, None] * stride_ks + offs_d[None, :])
            v = tl.load(V + v_base + offs_n[:, None] * stride_vs + offs_d[None, :])
        p = tl.exp2(tl.dot(q, tl.trans(k), input_precision=DOT_PREC) * qk_scale - lse[:, None])
        if MASKED:
            keep = n_mask[None, :]
            if CAUSAL:
                keep = keep & (offs_m[:, None] >= offs_n[None, :])
            p = tl.where(keep, p, 0.0)
        dp = tl.dot(do, tl.trans(v), input_precision=DOT_PREC)
        ds = p * (dp - delta[:, None])
        dq = tl.dot(ds.to(k.dtype), k, dq, input_precision=DOT_PREC)
    return dq


@triton.jit
def _bwd_dq_kernel(Q, K, V, DO, LSE, DELTA, DQ, COS, SIN, seq, heads, qk_scale, sm_scale,
                   stride_qb, stride_qs, stride_qh, stride_kb, stride_ks, stride_kh,
                   stride_vb, stride_vs, stride_vh, stride_db, stride_ds, stride_dh,
                   stride_gb, stride_gs, stride_gh,
                   HEAD_DIM: tl.constexpr, HALF: tl.constexpr, CHUNKS: tl.constexpr, CAUSAL: tl.constexpr,
                   UNROTATE: tl.constexpr, DOT_PREC: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    start_m = tl.cdiv(seq, BLOCK_M) - 1 - tl.program_id(0)  # most keys first
    bh = tl.program_id(1)
    b = (bh // heads).to(tl.int64)
    h = (bh % heads).to(tl.int64)
    offs_m = start_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD_DIM)
    m_mask = offs_m < seq
    q = tl.load(Q + b * stride_qb + h * stride_qh + offs_m[:, None] * stride_qs + offs_d[None, :],
                mask=m_mask[:, None], other=0.0)
    do = tl.load(DO + b * stride_db + h * stride_dh + offs_m[:, None] * stride_ds + offs_d[None, :],
                 mask=m_mask[:, None], other=0.0)
    lse = tl.load(LSE + bh.to(tl.int64) * seq + offs_m, mask=m_mask, other=0.0)
    delta = tl.load(DELTA + bh.to(tl.int64) * seq + offs_m, mask=m_mask, other=0.0)
    dq = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)
    if CAUSAL:
        lo_masked = start_m * BLOCK_M
        hi = tl.minimum((start_m + 1) * BLOCK_M, seq)
    else:
        lo_masked = (seq // BLOCK_N) * BLOCK_N
        hi = seq
    k_base = b * stride_kb + h * stride_kh
    v_base = b * stride_vb + h * stride_vh
    dq = _dq_blocks(dq, q, do, lse, delta, K, V, k_base, v_base, stride_ks, stride_vs, offs_m, 0, lo_masked, seq,
                    qk_scale, BLOCK_N, HEAD_DIM, False, CAUSAL, DOT_PREC)
    dq = _dq_blocks(dq, q, do, lse, delta, K, V, k_base, v_base, stride_ks, stride_vs, offs_m, lo_masked, hi, seq,
                    qk_scale, BLOCK_N, HEAD_DIM, True, CAUSAL, DOT_PREC)
    dq = dq * sm_scale
    if UNROTATE:
        dq = rotate_tile(dq, COS, SIN, offs_m, m_mask, BLOCK_M, HEAD_DIM, HALF, CHUNKS, True)
    out = b * stride_gb + h * stride_gh + offs_m[:, None] * stride_gs + offs_d[None, :]
    tl.store(DQ + out, dq.to(DQ.dtype.element_ty), mask=m_mask[:, None])


_KEY = ["seq", "HEAD_DIM", "CAUSAL", "UNROTATE"]
_PRUNE = {"early_config_prune": prune_configs}
_dkdv_tuned = triton.autotune(DKDV_CONFIGS, key=_KEY, prune_configs_by=_PRUNE)(_bwd_dkdv_kernel)
_dq_tuned = triton.autotune(DQ_CONFIGS, key=_KEY, prune_configs_by=_PRUNE)(_bwd_dq_kernel)


def _strides(x):
    return x.stride(0), x.stride(1), x.stride(2)


def attention_backward(do, q_rot, k_rot, v, o, lse, cos, sin, causal=True, unrotate="epilogue"):
    """(dq, dk, dv) for the un-rotated q, k and for v, from the forward's q_rot, k_rot, v, o, lse and dO.

    All (batch, seq, heads, head_dim) with head_dim contiguous; lse as attention_forward returns it. unrotate:
    "epilogue" applies R^T to dQ/dK in registers before the store, "postpass" stores dq_rot/dk_rot and un-rotates
    them in place with the rotary kernel.
    """
    if unrotate not in ("epilogue", "postpass"):
        raise ValueError(f"unrotate must be 'epilogue' or 'postpass', got {unrotate!r}")
    batch, seq, heads, head_dim = q_rot.shape
    dq = torch.empty(q_rot.shape, dtype=q_rot.dtype, device=q_rot.device)
    dk = torch.empty_like(dq)
    dv = torch.empty_like(dq)
    if dq.numel() == 0:
        return dq, dk, dv
    delta = torch.empty_like(lse)
    block = INTERPRET_META["BLOCK_M"] if INTERPRET else 128
    _bwd_preprocess[(triton.cdiv(seq, block), batch * heads)](
        o, do, delta, seq, heads, *_strides(o), *_strides(do), HEAD_DIM=head_dim, BLOCK_M=block)

    half = cos.shape[1]
    in_epilogue = unrotate == "epilogue"
    common = (cos, sin, seq, heads, LOG2E / math.sqrt(head_dim), 1.0 / math.sqrt(head_dim),
              *_strides(q_rot), *_strides(k_rot), *_strides(v), *_strides(do), *_strides(dq))
    consts = dict(HEAD_DIM=head_dim, HALF=half, CHUNKS=head_dim // (2 * half), CAUSAL=causal, UNROTATE=in_epilogue,
                  DOT_PREC=dot_precision(q_rot.dtype))
    dkdv_args = (q_rot, k_rot, v, do, lse, delta, dk, dv, *common)
    dq_args = (q_rot, k_rot, v, do, lse, delta, dq, *common)
    bh = batch * heads
    if INTERPRET:
        meta = INTERPRET_META
        _bwd_dkdv_kernel[(triton.cdiv(seq, meta["BLOCK_N"]), bh)](*dkdv_args, **consts, **meta)
        _bwd_dq_kernel[(triton.cdiv(seq, meta["BLOCK_M"]), bh)](*dq_args, **consts, **meta)
    else:
        _dkdv_tuned[lambda meta: (triton.cdiv(seq, meta["BLOCK_N"]), bh)](*dkdv_args, **consts)
        _dq_tuned[lambda meta: (triton.cdiv(seq, meta["BLOCK_M"]), bh)](*dq_args, **consts)
    if not in_epilogue:
        rotate(dq, cos, sin, conjugate=True, out=dq)
        rotate(dk, cos, sin, conjugate=True, out=dk)
    return dq, dk, dv
