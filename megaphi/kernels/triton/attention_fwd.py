"""Flash-attention-2 forward with the partial rotary fused: Q rotated in the prologue, K by a pre-pass or per block.

Layout: q, k, v, o are (batch, seq, heads, head_dim) with head_dim contiguous, read through their strides (no
transposes). One program owns BLOCK_M queries of one (batch, head) and streams keys in BLOCK_N blocks with an fp32
online softmax in base 2; causal programs stop at their diagonal, and only the diagonal and tail blocks pay for a
mask. The log-sum-exp (base 2, (batch * heads, seq) fp32) is saved for the backward.
"""

import math

import torch
import triton
import triton.language as tl

from megaphi.kernels.triton.common import INTERPRET
from megaphi.kernels.triton.rotary import load_rotated, rotate

LOG2E = 1.4426950408889634

# Interpreter: one small fixed config (it runs one program at a time in numpy).
INTERPRET_META = {"BLOCK_M": 16, "BLOCK_N": 16}
# GPU (H100/H200): BLOCK_M must be a multiple of BLOCK_N so the causal diagonal starts on a block boundary. The last
# config is the smallest: the only one tried for fp32 and short sequences (see prune_configs).
FWD_CONFIGS = [
    triton.Config({"BLOCK_M": bm, "BLOCK_N": bn}, num_warps=w, num_stages=s)
    for bm, bn, w, s in [(128, 64, 4, 3), (128, 64, 8, 3), (128, 128, 8, 3), (128, 32, 4, 4), (64, 64, 4, 3),
                         (64, 32, 4, 2)]
]
SHORT_SEQ = 256


def prune_configs(configs, named_args, **_):
    """The configs to tune over: only the last, smallest one for fp32 and for sequences up to SHORT_SEQ."""
    # Each config is a compile of seconds on first use; fp32 is never the fast path, short sequences are tests.
    if named_args["seq"] <= SHORT_SEQ or named_args["Q"].dtype == torch.float32:
        return configs[-1:]
    return configs


def dot_precision(dtype):
    """tl.dot input precision: exact fp32 for fp32 inputs (not tf32), the default for half types."""
    return "ieee" if dtype == torch.float32 else "tf32"


@triton.jit
def _fwd_blocks(acc, l_i, m_i, q, K, V, COS, SIN, k_base, v_base, stride_ks, stride_vs, offs_m, lo, hi, seq,
                qk_scale, BLOCK_N: tl.constexpr, HEAD_DIM: tl.constexpr, HALF: tl.constexpr,
                MASKED: tl.constexpr, CAUSAL: tl.constexpr, ROTATE_K: tl.constexpr, DOT_PREC: tl.constexpr):
    # Key blocks [lo, hi); MASKED blocks may cross the causal diagonal or the end of the sequence.
    offs_d = tl.arange(0, HEAD_DIM)
    for start_n in range(lo, hi, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        n_mask = offs_n < seq
        if ROTATE_K:
            k = load_rotated(K, k_base + offs_n * stride_ks, n_mask, offs_n, COS, SIN, HEAD_DIM, HALF, False)
            k = k.to(q.dtype)
        elif MASKED:
            k = tl.load(K + k_base + offs_n[:, None] * stride_ks + offs_d[None, :], mask=n_mask[:, None], other=0.0)
        else:
            k = tl.load(K + k_base + offs_n[:, None] * stride_ks + offs_d[None, :])
        qk = tl.dot(q, tl.trans(k), input_precision=DOT_PREC) * qk_scale
        if MASKED:
            keep = n_mask[None, :]
            if CAUSAL:
                keep = keep & (offs_m[:, None] >= offs_n[None, :])
            qk = tl.where(keep, qk, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(qk, 1))
        p = tl.exp2(qk - m_new[:, None])
        alpha = tl.exp2(m_i - m_new)
        l_i = l_i * alpha + tl.sum(p, 1)
        if MASKED:
            v = tl.load(V + v_base + offs_n[:, None] * stride_vs + offs_d[None, :], mask=n_mask[:, None], other=0.0)
        else:
            v = tl.load(V + v_base + offs_n[:, None] * stride_vs + offs_d[None, :])
        acc = tl.dot(p.to(v.dtype), v, acc * alpha[:, None], input_precision=DOT_PREC)
        m_i = m_new
    return acc, l_i, m_i


@triton.jit
def _attn_fwd_kernel(Q, K, V, O, LSE, QR, COS, SIN, seq, heads, qk_scale,
                     stride_qb, stride_qs, stride_qh, stride_kb, stride_ks, stride_kh,
                     stride_vb, stride_vs, stride_vh, stride_ob, stride_os, stride_oh,
                     HEAD_DIM: tl.constexpr, HALF: tl.constexpr, CAUSAL: tl.constexpr, ROTATE_K: tl.constexpr,
                     STORE_QR: tl.constexpr, DOT_PREC: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    # Causal: the last query blocks have the most keys, so they are launched first.
    start_m = tl.cdiv(seq, BLOCK_M) - 1 - tl.program_id(0)
    bh = tl.program_id(1)
    b = (bh // heads).to(tl.int64)
    h = (bh % heads).to(tl.int64)
    offs_m = start_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD_DIM)
    m_mask = offs_m < seq

    q = load_rotated(Q, b * stride_qb + h * stride_qh + offs_m * stride_qs, m_mask, offs_m, COS, SIN,
                     HEAD_DIM, HALF, False).to(Q.dtype.element_ty)
    o_ptrs = b * stride_ob + h * stride_oh + offs_m[:, None] * stride_os + offs_d[None, :]
    if STORE_QR:  # the rotated q, in O's layout, for the backward
        tl.store(QR + o_ptrs, q, mask=m_mask[:, None])

    m_i = tl.zeros([BLOCK_M], dtype=tl.float32) - float("inf")
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)
    if CAUSAL:
        lo_masked = start_m * BLOCK_M
        hi = tl.minimum((start_m + 1) * BLOCK_M, seq)
    else:
        lo_masked = (seq // BLOCK_N) * BLOCK_N
        hi = seq
    k_base = b * stride_kb + h * stride_kh
    v_base = b * stride_vb + h * stride_vh
    acc, l_i, m_i = _fwd_blocks(acc, l_i, m_i, q, K, V, COS, SIN, k_base, v_base, stride_ks, stride_vs, offs_m,
                                0, lo_masked, seq, qk_scale, BLOCK_N, HEAD_DIM, HALF, False, CAUSAL, ROTATE_K,
                                DOT_PREC)
    acc, l_i, m_i = _fwd_blocks(acc, l_i, m_i, q, K, V, COS, SIN, k_base, v_base, stride_ks, stride_vs, offs_m,
                                lo_masked, hi, seq, qk_scale, BLOCK_N, HEAD_DIM, HALF, True, CAUSAL, ROTATE_K,
                                DOT_PREC)
    acc = acc / l_i[:, None]
    tl.store(O + o_ptrs, acc.to(O.dtype.element_ty), mask=m_mask[:, None])
    tl.store(LSE + bh.to(tl.int64) * seq + offs_m, m_i + tl.log2(l_i), mask=m_mask)


_fwd_tuned = triton.autotune(FWD_CONFIGS, key=["seq", "HEAD_DIM", "CAUSAL", "ROTATE_K", "STORE_QR"],
                             prune_configs_by={"early_config_prune": prune_configs})(_attn_fwd_kernel)


def attention_forward(q, k, v, cos, sin, causal=True, rotate_k="prepass", save_rotated=True):
    """Forward of rotary attention: (o, lse, q_rot, k_rot) for un-rotated q, k, v (batch, seq, heads, head_dim).

    cos, sin: the rotary tables (>= seq positions, rotary_dim/2). rotate_k: "prepass" rotates K once into a new
    tensor before the attention kernel, "inloop" rotates each K block as it is loaded (k_rot is then None).
    save_rotated: also write q_rot (and keep k_rot) for the backward; else both are None. lse: (batch*heads, seq)
    fp32, base-2 log-sum-exp of the scaled scores. Inputs need head_dim contiguous (stride(-1) == 1).
    """
    if rotate_k not in ("prepass", "inloop"):
        raise ValueError(f"rotate_k must be 'prepass' or 'inloop', got {rotate_k!r}")
    batch, seq, heads, head_dim = q.shape
    k_rot = rotate(k, cos, sin) if rotate_k == "prepass" else None
    o = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    q_rot = torch.empty_like(o) if save_rotated else o  # unused pointer when not stored
    lse = torch.empty(batch * heads, seq, dtype=torch.float32, device=q.device)
    if o.numel() == 0:
        return o, lse, (q_rot if save_rotated else None), (k_rot if save_rotated else None)
    kk = k_rot if k_rot is not None else k
    args = (q, kk, v, o, lse, q_rot, cos, sin, seq, heads, LOG2E / math.sqrt(head_dim),
            q.stride(0), q.stride(1), q.stride(2), kk.stride(0), kk.stride(1), kk.stride(2),
            v.stride(0), v.stride(1), v.stride(2), o.stride(0), o.stride(1), o.stride(2))
    consts = dict(HEAD_DIM=head_dim, HALF=cos.shape[1], CAUSAL=causal, ROTATE_K=rotate_k == "inloop",
                  STORE_QR=save_rotated, DOT_PREC=dot_precision(q.dtype))
    if INTERPRET:
        grid = (triton.cdiv(seq, INTERPRET_META["BLOCK_M"]), batch * heads)
        _attn_fwd_kernel[grid](*args, **consts, **INTERPRET_META)
    else:
        _fwd_tuned[lambda meta: (triton.cdiv(seq, meta["BLOCK_M"]), batch * heads)](*args, **consts)
    if not save_rotated:
        return o, lse, None, None
    return o, lse, q_rot, k_rot
