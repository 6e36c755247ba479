"""Plain-PyTorch reference ops: the ground truth that fused backends are tested against.

Every tensor in attention ops is laid out (batch, seq, heads, head_dim), the layout the q/k/v projections produce.
"""

import math

import torch
import torch.nn.functional as F

# (device, dtype, rotary_dim, base) -> (cos, sin), each (positions, rotary_dim // 2); grown on demand.
_ROTARY_TABLES: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = {}


def rotary_tables(length, rotary_dim, base, device, dtype):
    """cos and sin of position * inv_freq for positions 0..length-1, each (length, rotary_dim // 2)."""
    key = (torch.device(device), dtype, rotary_dim, float(base))
    cached = _ROTARY_TABLES.get(key)
    if cached is None or cached[0].shape[0] < length:
        # Grow to a power of two so decoding one token at a time does not rebuild the table every step.
        size = max(2 ** math.ceil(math.log2(max(length, 1))), 256)
        # Outside inference mode, so a table first built while generating can later be used in training.
        with torch.inference_mode(False), torch.no_grad():
            # Computed in fp32 exactly as HF's PhiRotaryEmbedding does, then cast, so the fp32 numerics are identical.
            inv_freq = 1.0 / (base ** (torch.arange(0, rotary_dim, 2, dtype=torch.float32, device=device) / rotary_dim))
            freqs = torch.arange(size, dtype=torch.float32, device=device)[:, None] * inv_freq[None, :]
            cached = (freqs.cos().to(dtype), freqs.sin().to(dtype))
        _ROTARY_TABLES[key] = cached
    return cached[0][:length], cached[1][:length]


def apply_rotary(x, rotary_dim, base=10000.0, position_offset=0):
    """Rotate-half RoPE on the first rotary_dim dims of x (batch, seq, heads, head_dim) at positions offset.."""
    seq = x.shape[1]
    cos, sin = rotary_tables(position_offset + seq, rotary_dim, base, x.device, x.dtype)
    cos = cos[position_offset:, None, :]  # (seq, 1, rotary_dim/2): broadcasts over batch and heads
    sin = sin[position_offset:, None, :]
    half = rotary_dim // 2
    x1, x2, rest = x[..., :half], x[..., half:rotary_dim], x[..., rotary_dim:]
    return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin, rest), dim=-1)


def attention(q, k, v, causal=True, dropout_p=0.0):
    """SDPA (scale 1/sqrt(head_dim)) of already-rotated q (b, sq, h, d) over k, v (b, sk, h, d); sk >= sq.

    With causal and sk > sq, the queries are the last sq positions (KV-cache decoding): the mask is bottom-right
    aligned, not SDPA's top-left is_causal.
    """
    sq, sk = q.shape[1], k.shape[1]
    mask, is_causal = None, False
    if causal and sq == sk:
        is_causal = True
    elif causal and sq > 1:
        mask = torch.ones(sq, sk, dtype=torch.bool, device=q.device).tril(diagonal=sk - sq)
    out = F.scaled_dot_product_attention(
        q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
        attn_mask=mask, dropout_p=dropout_p, is_causal=is_causal,
    )
    return out.transpose(1, 2)


def rotary_attention(q, k, v, rotary_dim, base=10000.0, causal=True, dropout_p=0.0):
    """Attention over q, k rotated at positions 0..seq-1; q, k, v (batch, seq, heads, head_dim), not yet rotated."""
    return attention(apply_rotary(q, rotary_dim, base), apply_rotary(k, rotary_dim, base), v, causal, dropout_p)


def layer_norm(x, weight, bias, eps=1e-5, residual=None):
    """LayerNorm over the last dim; with residual (tensor or tuple): (LayerNorm(s), s), s = x + sum(residual)."""
    if residual is None:
        return F.layer_norm(x, x.shape[-1:], weight, bias, eps)
    if isinstance(residual, torch.Tensor):
        residual = (residual,)
    for r in residual:
        x = x + r
    return F.layer_norm(x, x.shape[-1:], weight, bias, eps), x


def gelu_tanh(x):
    """GELU with the tanh approximation (HF's gelu_new)."""
    return F.gelu(x, approximate="tanh")


def mlp(x, w1, b1, w2, b2):
    """gelu_tanh(x @ w1.T + b1) @ w2.T + b2."""
    return F.linear(gelu_tanh(F.linear(x, w1, b1)), w2, b2)


def linear_cross_entropy(hidden, weight, bias, labels, ignore_index=-100, reduction="mean", process_group=None):
    """Cross entropy of logits = hidden @ weight.T + bias (computed in fp32) against labels; hidden (..., h)."""
    if process_group is not None and torch.distributed.get_world_size(process_group) > 1:
        return _vocab_parallel_linear_cross_entropy(hidden, weight, bias, labels, ignore_index, reduction,
                                                    process_group)
    logits = F.linear(hidden.reshape(-1, hidden.shape[-1]), weight, bias).float()
    loss = F.cross_entropy(logits, labels.reshape(-1), ignore_index=ignore_index, reduction=reduction)
    return loss.view(labels.shape) if reduction == "none" else loss


# Tokens per chunk of the vocab-parallel cross entropy: one chunk's fp32 logits hold at most this many elements.
VOCAB_PARALLEL_CE_CHUNK_ELEMENTS = 1 << 26


def _token_chunks(num_tokens, vocab_shard):
    step = max(1, VOCAB_PARALLEL_CE_CHUNK_ELEMENTS // vocab_shard)
    return [slice(i, min(i + step, num_tokens)) for i in range(0, num_tokens, step)]


def _shard_logits(hidden, weight, bias):
    # The matmul in the input dtype, then fp32: the plain path's numerics, so TP and single-GPU runs agree.
    return F.linear(hidden, weight, bias).float()


class _VocabParallelLinearCrossEntropy(torch.autograd.Function):
    """Per-token cross entropy with the vocabulary split over the group; logits recomputed chunk by chunk.

    hidden (tokens, h) is replicated over the group; weight/bias are this rank's rows [r*V/tp, (r+1)*V/tp).
    The hidden gradient returned is this shard's part only: the caller's hidden must come through
    copy_to_tp / gather_from_sp, whose backward sums it over the group.
    """

    @staticmethod
    def forward(ctx, hidden, weight, bias, labels, ignore_index, group):
        from megaphi.parallel.mappings import all_reduce

        shard = weight.shape[0]
        local = labels - torch.distributed.get_rank(group) * shard
        hit = (local >= 0) & (local < shard)  # this rank holds the target's row
        local = local.where(hit, 0)
        lse = hidden.new_empty(labels.shape, dtype=torch.float32)  # logsumexp over this shard
        target = hidden.new_zeros(labels.shape, dtype=torch.float32)  # the target's logit, where hit
        for c in _token_chunks(labels.shape[0], shard):
            logits = _shard_logits(hidden[c], weight, bias)
            lse[c] = torch.logsumexp(logits, dim=-1)
            target[c] = logits.gather(1, local[c, None]).squeeze(1)
        # The full-vocabulary logsumexp from the shards': max, then sum of exp; the target logit summed along.
        top = all_reduce(lse.clone(), group, torch.distributed.ReduceOp.MAX)
        stats = all_reduce(torch.stack((torch.exp(lse - top), target.where(hit, 0.0))), group)
        lse = top + torch.log(stats[0])
        valid = labels != ignore_index
        ctx.save_for_backward(hidden, weight, bias, lse, local, hit, valid)
        # The backward runs outside autocast: it recomputes the logits under the forward's autocast settings.
        device = hidden.device.type
        ctx.autocast = (device, torch.is_autocast_enabled(device), torch.get_autocast_dtype(device))
        return (lse - stats[1]).where(valid, 0.0)

    @staticmethod
    def backward(ctx, grad_losses):
        hidden, weight, bias, lse, local, hit, valid = ctx.saved_tensors
        need_hidden, need_weight, need_bias = ctx.needs_input_grad[:3]
        scale = grad_losses.float().where(valid, 0.0)
        dhidden = torch.zeros_like(hidden) if need_hidden else None
        dweight = torch.zeros_like(weight, dtype=torch.float32) if need_weight else None
        dbias = torch.zeros_like(bias, dtype=torch.float32) if need_bias else None
        for c in _token_chunks(hidden.shape[0], weight.shape[0]):
            # d loss / d logits = softmax - onehot(target), times the incoming gradient of each token.
            device, enabled, dtype = ctx.autocast
            with torch.autocast(device, dtype=dtype, enabled=enabled):
                logits = _shard_logits(hidden[c], weight, bias)
            grad = torch.exp(logits - lse[c, None])
            grad.scatter_add_(1, local[c, None], -hit[c, None].float())
            grad = (grad * scale[c, None]).to(weight.dtype)
            if need_hidden:
                dhidden[c] = grad @ weight
            if need_weight:
                dweight += grad.t() @ hidden[c]
            if need_bias:
                dbias += grad.sum(0, dtype=torch.float32)
        return (dhidden, None if dweight is None else dweight.to(weight.dtype),
                None if dbias is None else dbias.to(bias.dtype), None, None, None)


def _vocab_parallel_linear_cross_entropy(hidden, weight, bias, labels, ignore_index, reduction, group):
    """linear_cross_entropy with weight/bias this rank's vocab shard; never builds more than a chunk of logits."""
    if reduction not in ("mean", "sum", "none"):
        raise ValueError(f"linear_cross_entropy: reduction must be 'mean', 'sum' or 'none', got {reduction!r}")
    flat = labels.reshape(-1)
    losses = _VocabParallelLinearCrossEntropy.apply(hidden.reshape(-1, hidden.shape[-1]), weight, bias, flat,
                                                    ignore_index, group)
    if reduction == "none":
        return losses.view(labels.shape)
    if reduction == "sum":
        return losses.sum()
    return losses.sum() / (flat != ignore_index).sum()
