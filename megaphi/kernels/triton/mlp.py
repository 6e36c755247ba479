"""The MLP with GELU fused into its GEMMs, the GEMM itself, and the tanh-GELU as an elementwise op.

mlp(x, w1, b1, w2, b2) = gelu_tanh(x @ w1.T + b1) @ w2.T + b2, x (..., hidden), w1 (ffn, hidden), w2 (hidden, ffn).
Forward: a Triton GEMM adds b1 and applies the GELU in its epilogue, storing both the pre-activation (for the
backward) and the activation; fc2 is cuBLAS (F.linear). Backward: a Triton GEMM computes dY @ w2 and multiplies by
gelu'(pre) in its epilogue, so the pre-activation's gradient is written once; the weight gradients are cuBLAS.
"""

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from megaphi.kernels.autocast import autocast_inputs
from megaphi.kernels.triton.common import INTERPRET, check_device

EPILOGUE_NONE, EPILOGUE_GELU, EPILOGUE_DGELU, EPILOGUE_ACCUMULATE = 0, 1, 2, 3


@triton.jit
def _sigmoid_2u(x):
    """sigmoid(2u), u = sqrt(2/pi) (x + 0.044715 x^3): the (1 + tanh(u)) / 2 of the tanh GELU, without tanh."""
    u = 0.7978845608028654 * (x + 0.044715 * x * x * x)
    # exp(-2u) as exp2(-2u log2 e), capped short of fp32 overflow (the sigmoid is ~1e-38 there either way)
    return 1.0 / (1.0 + tl.exp2(tl.minimum(-2.8853900817779268 * u, 126.0)))


@triton.jit
def _gelu(x):
    return x * _sigmoid_2u(x)


@triton.jit
def _gelu_grad(x):
    s = _sigmoid_2u(x)
    return s + 1.5957691216057308 * x * s * (1.0 - s) * (1.0 + 0.134145 * x * x)


@triton.jit
def _gelu_kernel(X, DY, OUT, n, BACKWARD: tl.constexpr, BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    x = tl.load(X + offs, mask=mask, other=0.0).to(tl.float32)
    if BACKWARD:
        out = tl.load(DY + offs, mask=mask, other=0.0).to(tl.float32) * _gelu_grad(x)
    else:
        out = _gelu(x)
    tl.store(OUT + offs, out.to(OUT.dtype.element_ty), mask=mask)


def _gelu_launch(x, dy=None):
    out = torch.empty_like(x)
    block = 1024
    _gelu_kernel[(triton.cdiv(x.numel(), block),)](x, dy if dy is not None else x, out, x.numel(),
                                                   BACKWARD=dy is not None, BLOCK=block, num_warps=4)
    return out


class _Gelu(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        x = x.contiguous()
        ctx.save_for_backward(x)
        return _gelu_launch(x)

    @staticmethod
    def backward(ctx, dy):
        (x,) = ctx.saved_tensors
        return _gelu_launch(x, dy.contiguous())


def gelu_tanh(x):
    """GELU with the tanh approximation, computed in fp32."""
    check_device("gelu_tanh", x)
    return _Gelu.apply(x)


def _gemm_configs():
    if INTERPRET:
        return [triton.Config({"BLOCK_M": 32, "BLOCK_N": 32, "BLOCK_K": 32, "GROUP_M": 2})]
    shapes = [(128, 256, 64, 3, 8), (256, 128, 64, 3, 8), (128, 128, 64, 4, 8), (128, 128, 64, 4, 4),
              (64, 256, 64, 4, 4), (128, 64, 64, 4, 4), (64, 128, 64, 4, 4), (64, 64, 64, 4, 4)]
    return [triton.Config({"BLOCK_M": m, "BLOCK_N": n, "BLOCK_K": k, "GROUP_M": 8}, num_stages=s, num_warps=w)
            for m, n, k, s, w in shapes]


@triton.jit
def _gemm_kernel(A, B, C, BIAS, AUX, COLSUM, M, N, K, stride_am, stride_ak, stride_bk, stride_bn, stride_cm,
                 stride_cn, EPILOGUE: tl.constexpr, HAS_BIAS: tl.constexpr, SAVE_PRE: tl.constexpr,
                 HAS_COLSUM: tl.constexpr, PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                 BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr):
    """C (M, N) = epilogue(A (M, K) @ B (K, N)); AUX has C's shape and strides; COLSUM[pid_m] gets C's column sums."""
    # Grouped order: GROUP_M row blocks sweep the column blocks together, so their B tiles are reused from L2.
    pid = tl.program_id(0)
    num_m = tl.cdiv(M, BLOCK_M)
    num_n = tl.cdiv(N, BLOCK_N)
    per_group = GROUP_M * num_n
    first_m = (pid // per_group) * GROUP_M
    group_rows = tl.minimum(num_m - first_m, GROUP_M)
    pid_m = first_m + (pid % per_group) % group_rows
    pid_n = (pid % per_group) // group_rows
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    # Rows and columns past the edge wrap around, so loads need no M/N mask; their results are never stored.
    rm = (offs_m % M).to(tl.int64)
    rn = (offs_n % N).to(tl.int64)
    a_ptrs = A + rm[:, None] * stride_am + offs_k[None, :] * stride_ak
    b_ptrs = B + offs_k[:, None] * stride_bk + rn[None, :] * stride_bn
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k in range(0, tl.cdiv(K, BLOCK_K)):
        k_left = K - k * BLOCK_K
        a = tl.load(a_ptrs, mask=offs_k[None, :] < k_left, other=0.0)
        b = tl.load(b_ptrs, mask=offs_k[:, None] < k_left, other=0.0)
        acc = tl.dot(a, b, acc, input_precision=PRECISION)
        a_ptrs += BLOCK_K * stride_ak
        b_ptrs += BLOCK_K * stride_bk
    mask = (offs_m[:, None] < M) & (offs_n[None, :] < N)
    c_offs = offs_m.to(tl.int64)[:, None] * stride_cm + offs_n.to(tl.int64)[None, :] * stride_cn
    if EPILOGUE == 1:  # bias + GELU; the GELU reads the pre-activation as stored, as the backward will
        if HAS_BIAS:
            acc += tl.load(BIAS + rn).to(tl.float32)[None, :]
        pre = acc.to(C.dtype.element_ty)
        if SAVE_PRE:
            tl.store(AUX + c_offs, pre, mask=mask)
        out = _gelu(pre.to(tl.float32))
    elif EPILOGUE == 2:  # gradient of the pre-activation: (dY @ w2) * gelu'(pre)
        out = acc * _gelu_grad(tl.load(AUX + c_offs, mask=mask, other=0.0).to(tl.float32))
    elif EPILOGUE == 3:  # C += A @ B, C in fp32
        out = acc + tl.load(C + c_offs, mask=mask, other=0.0)
    else:
        out = acc
    tl.store(C + c_offs, out.to(C.dtype.element_ty), mask=mask)
    if HAS_COLSUM:  # this row block's share of the bias gradient, summed over row blocks afterwards
        tl.store(COLSUM + pid_m * N + offs_n, tl.sum(tl.where(mask, out, 0.0), axis=0), mask=offs_n < N)


SMALL_GEMM = 2**20  # outputs of at most this many elements (and fp32 inputs) tune over the last config only


def _prune_configs(configs, named_args, **_):
    """The configs to tune over: only the last, smallest one for small outputs and for fp32 (cuBLAS's ground)."""
    # Each config is a compile of seconds on first use.
    if named_args["M"] * named_args["N"] <= SMALL_GEMM or named_args["A"].dtype == torch.float32:
        return configs[-1:]
    return configs


_GEMM_KEY = ["M", "N", "K", "EPILOGUE", "HAS_BIAS", "SAVE_PRE", "HAS_COLSUM"]
_MIN_BLOCK_M = min(c.kwargs["BLOCK_M"] for c in _gemm_configs())


def _tuned(**hooks):
    return triton.autotune(_gemm_configs(), key=_GEMM_KEY, prune_configs_by={"early_config_prune": _prune_configs},
                           **hooks)(_gemm_kernel)


_gemm = _tuned()
# Tuning runs the kernel once per config: an accumulating one must get its C back after each try, and the column
# sums must start from zeros before the chosen config runs (a config with a smaller BLOCK_M writes more rows).
_gemm_accumulate = _tuned(restore_value=["C"])
_gemm_column_sums = _tuned(reset_to_zero=["COLSUM"])


def tf32_matmuls():
    """Whether torch's fp32 CUDA matmuls use TF32 (legacy allow_tf32 or the newer fp32_precision setting)."""
    matmul = torch.backends.cuda.matmul
    try:
        return bool(matmul.allow_tf32)
    except RuntimeError:  # torch refuses the legacy getter once the fp32_precision API has been used
        return getattr(matmul, "fp32_precision", "ieee") == "tf32"


def gemm(a, b, c, epilogue=EPILOGUE_NONE, bias=None, aux=None, column_sums=False):
    """c (M, N) = epilogue(a (M, K) @ b (K, N)) with any strides; aux (c's strides) holds or gives the pre-activation.

    EPILOGUE_GELU: c = gelu(a @ b + bias), aux = a @ b + bias (if given). EPILOGUE_DGELU: c = (a @ b) * gelu'(aux).
    EPILOGUE_ACCUMULATE: c += a @ b (c fp32). fp32 inputs use TF32 when torch's fp32 matmuls do (tf32_matmuls).
    column_sums: return c's column sums in fp32 (reduced per row block in the epilogue, then over blocks), else None.
    """
    (m, k), n = a.shape, b.shape[1]
    if aux is not None and aux.stride() != c.stride():
        raise ValueError("gemm: aux must have the strides of c")
    # The dot's default ("tf32") for 16-bit inputs, where it is ignored; fp32 follows torch's TF32 switch.
    precision = "ieee" if a.dtype == torch.float32 and not tf32_matmuls() else "tf32"
    if column_sums and epilogue == EPILOGUE_ACCUMULATE:
        raise ValueError("gemm: column_sums cannot be combined with EPILOGUE_ACCUMULATE")
    kernel = _gemm_accumulate if epilogue == EPILOGUE_ACCUMULATE else _gemm_column_sums if column_sums else _gemm
    grid = lambda meta: (triton.cdiv(m, meta["BLOCK_M"]) * triton.cdiv(n, meta["BLOCK_N"]),)  # noqa: E731
    # Zeroed: the tuned BLOCK_M decides how many row blocks write their sums.
    sums = torch.zeros((triton.cdiv(m, _MIN_BLOCK_M), n), dtype=torch.float32, device=c.device) if column_sums else c
    kernel[grid](a, b, c, bias if bias is not None else c, aux if aux is not None else c, sums, m, n, k,
                 a.stride(0), a.stride(1), b.stride(0), b.stride(1), c.stride(0), c.stride(1),
                 EPILOGUE=epilogue, HAS_BIAS=bias is not None, SAVE_PRE=aux is not None, HAS_COLSUM=column_sums,
                 PRECISION=precision)
    return sums.sum(0) if column_sums else None


class _MLP(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, w1, b1, w2, b2, save):
        x2 = x.reshape(-1, x.shape[-1])
        h = x2.new_empty(x2.shape[0], w1.shape[0])
        pre = torch.empty_like(h) if save else None
        gemm(x2, w1.t(), h, EPILOGUE_GELU, bias=b1, aux=pre)
        y = F.linear(h, w2, b2)
        if save:
            ctx.save_for_backward(x2, w1, w2, pre, h)
        return y.view(*x.shape[:-1], w2.shape[0])

    @staticmethod
    def backward(ctx, dy):
        x2, w1, w2, pre, h = ctx.saved_tensors
        need_x, need_w1, need_b1, need_w2, need_b2, _ = ctx.needs_input_grad
        dy2 = dy.reshape(-1, dy.shape[-1])
        dw2 = dy2.t().mm(h) if need_w2 else None
        db2 = dy2.sum(0) if need_b2 else None
        dx = dw1 = db1 = None
        if need_x or need_w1 or need_b1:
            dpre = torch.empty_like(pre)
            db1 = gemm(dy2, w2, dpre, EPILOGUE_DGELU, aux=pre, column_sums=need_b1)
            db1 = db1.to(dpre.dtype) if db1 is not None else None
            dx = dpre.mm(w1).view(*dy.shape[:-1], w1.shape[1]) if need_x else None
            dw1 = dpre.t().mm(x2) if need_w1 else None
        return dx, dw1, db1, dw2, db2, None


def mlp(x, w1, b1, w2, b2):
    """gelu_tanh(x @ w1.T + b1) @ w2.T + b2 (b2 may be None); inside autocast, computed in the autocast dtype."""
    x, w1, b1, w2, b2 = autocast_inputs(x, w1, b1, w2, b2)
    check_device("mlp", x, w1, b1, w2, b2)
    dtypes = {t.dtype for t in (x, w1, b1, w2, b2) if t is not None}
    if len(dtypes) > 1:
        raise ValueError(f"mlp: x, weights and biases must share one dtype, got {sorted(map(str, dtypes))}")
    if w1.shape[1] != x.shape[-1] or w2.shape[1] != w1.shape[0]:
        raise ValueError(f"mlp: shapes x {tuple(x.shape)}, w1 {tuple(w1.shape)}, w2 {tuple(w2.shape)} do not chain")
    save = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (x, w1, b1, w2, b2))
    return _MLP.apply(x, w1, b1, w2, b2, save)
