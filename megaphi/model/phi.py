"""phi-1 in one file: the same function and parameter names as HuggingFace's PhiForCausalLM.

Reading order: KV cache -> attention -> MLP -> parallel block -> model. Every op comes from megaphi.kernels, so
fused backends swap in without touching this file; every projection is an nn.Linear submodule, so tensor
parallelism swaps them by name from outside (a sharded linear just yields fewer heads here).

A block computes attn(ln(x)) and mlp(ln(x)) from the same LayerNorm output, and the residual add
x + attn + mlp is done by the *next* LayerNorm (kernels.layer_norm with residual=(attn, mlp)), so a fused
kernel can sum and normalize in one pass over memory.
"""

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from megaphi import kernels
from megaphi.model.config import ModelConfig


class KVCache:
    """Keys and values of the tokens seen so far, per layer, for incremental decoding."""

    def __init__(self, num_layers: int, batch_size: int, max_length: int):
        self.batch_size, self.max_length = batch_size, max_length
        self.length = 0  # tokens already cached; the next token's position
        # (batch, max_length, heads, head_dim) each, allocated at the first update with k's dtype, device and heads.
        self.keys: list[torch.Tensor | None] = [None] * num_layers
        self.values: list[torch.Tensor | None] = [None] * num_layers

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor):
        """Store k, v (batch, new, heads, head_dim) after the cached tokens; return all keys and values so far."""
        b, new = k.shape[:2]
        end = self.length + new
        if b != self.batch_size or end > self.max_length:
            raise ValueError(f"KVCache holds batch {self.batch_size} x {self.max_length} tokens; "
                             f"got batch {b} with {new} new tokens after {self.length}")
        if self.keys[layer] is None:
            shape = (b, self.max_length, *k.shape[2:])
            self.keys[layer] = k.new_empty(shape)
            self.values[layer] = v.new_empty(shape)
        self.keys[layer][:, self.length:end] = k
        self.values[layer][:, self.length:end] = v
        return self.keys[layer][:, :end], self.values[layer][:, :end]

    def advance(self, new: int):
        """Count new tokens as cached (after every layer has stored them)."""
        self.length += new


class PhiAttention(nn.Module):
    """Causal self-attention with partial rotary position embedding."""

    def __init__(self, config: ModelConfig, layer_idx: int):
        super().__init__()
        h = config.hidden_size
        self.layer_idx = layer_idx
        self.head_dim, self.rotary_dim, self.rope_theta = config.head_dim, config.rotary_dim, config.rope_theta
        self.attention_dropout = config.attention_dropout
        self.q_proj = nn.Linear(h, h)
        self.k_proj = nn.Linear(h, h)
        self.v_proj = nn.Linear(h, h)
        self.dense = nn.Linear(h, h)

    def forward(self, x, kv_cache: KVCache | None = None):
        # Shapes come from the projections' outputs, not from x: a tensor-parallel shard yields fewer heads, and
        # with sequence parallelism x holds a slice of the sequence that the projections all-gather.
        q, k, v = (proj(x) for proj in (self.q_proj, self.k_proj, self.v_proj))
        q, k, v = (t.view(*t.shape[:2], -1, self.head_dim) for t in (q, k, v))
        dropout_p = self.attention_dropout if self.training else 0.0
        if kv_cache is None:
            y = kernels.rotary_attention(q, k, v, self.rotary_dim, self.rope_theta, True, dropout_p)
        else:
            q = kernels.apply_rotary(q, self.rotary_dim, self.rope_theta, kv_cache.length)
            k = kernels.apply_rotary(k, self.rotary_dim, self.rope_theta, kv_cache.length)
            k, v = kv_cache.update(self.layer_idx, k, v)
            y = kernels.attention(q, k, v, True, dropout_p)
        return self.dense(y.reshape(*y.shape[:2], -1))


class PhiMLP(nn.Module):
    """fc1 -> GELU (tanh) -> fc2."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.fc1 = nn.Linear(config.hidden_size, config.ffn_hidden_size)
        self.fc2 = nn.Linear(config.ffn_hidden_size, config.hidden_size)

    def forward(self, x):
        return kernels.mlp(x, self.fc1.weight, self.fc1.bias, self.fc2.weight, self.fc2.bias)


class PhiDecoderLayer(nn.Module):
    """One LayerNorm feeding attention and MLP in parallel: x + drop(attn(ln(x))) + drop(mlp(ln(x)))."""

    def __init__(self, config: ModelConfig, layer_idx: int):
        super().__init__()
        self.eps, self.hidden_dropout = config.layernorm_epsilon, config.hidden_dropout
        self.input_layernorm = nn.LayerNorm(config.hidden_size, eps=config.layernorm_epsilon)
        self.self_attn = PhiAttention(config, layer_idx)
        self.mlp = PhiMLP(config)

    def forward(self, x, attn_out=None, mlp_out=None, kv_cache=None):
        """x plus the previous block's branch outputs (None for the first) -> (this block's x, attn_out, mlp_out)."""
        ln = self.input_layernorm
        if attn_out is None:
            h = kernels.layer_norm(x, ln.weight, ln.bias, self.eps)
        else:
            h, x = kernels.layer_norm(x, ln.weight, ln.bias, self.eps, residual=(attn_out, mlp_out))
        attn_out, mlp_out = self.self_attn(h, kv_cache), self.mlp(h)
        if self.hidden_dropout and self.training:
            attn_out = F.dropout(attn_out, self.hidden_dropout, True)
            mlp_out = F.dropout(mlp_out, self.hidden_dropout, True)
        return x, attn_out, mlp_out


class PhiModel(nn.Module):
    """Token embedding, the blocks and the final LayerNorm; returns normalized hidden states."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        self.embed_tokens = nn.Embedding(config.padded_vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(PhiDecoderLayer(config, i) for i in range(config.num_layers))
        self.final_layernorm = nn.LayerNorm(config.hidden_size, eps=config.layernorm_epsilon)
        self.activation_checkpointing = False

    def forward(self, input_ids, kv_cache: KVCache | None = None):
        x = self.embed_tokens(input_ids)
        if self.config.embedding_dropout and self.training:
            x = F.dropout(x, self.config.embedding_dropout, True)
        attn_out = mlp_out = None
        for layer in self.layers:
            if self.activation_checkpointing and self.training and kv_cache is None:
                x, attn_out, mlp_out = checkpoint(layer, x, attn_out, mlp_out, use_reentrant=False)
            else:
                x, attn_out, mlp_out = layer(x, attn_out, mlp_out, kv_cache)
        if kv_cache is not None:
            kv_cache.advance(input_ids.shape[1])
        ln = self.final_layernorm
        return kernels.layer_norm(x, ln.weight, ln.bias, self.config.layernorm_epsilon, residual=(attn_out, mlp_out))[0]


class PhiForCausalLM(nn.Module):
    """The phi language model: PhiModel plus an untied LM head with bias."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        self.model = PhiModel(config)
        self.lm_head = nn.Linear(config.hidden_size, config.padded_vocab_size)
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self):
        """N(0, init_std) for the embedding and every linear weight, zero biases, LayerNorm weight 1 and bias 0."""
        for module in self.modules():
            if isinstance(module, (nn.Linear, nn.Embedding)):
                module.weight.normal_(0.0, self.config.init_std)
                if getattr(module, "bias", None) is not None:
                    module.bias.zero_()
            elif isinstance(module, nn.LayerNorm):
                module.weight.fill_(1.0)
                module.bias.zero_()

    def set_activation_checkpointing(self, enabled: bool = True):
        """Recompute each block's activations in the backward pass instead of storing them."""
        self.model.activation_checkpointing = enabled

    def forward(self, input_ids, labels=None, kv_cache: KVCache | None = None):
        """Mean cross entropy over labels != -100 when labels are given, else logits (batch, seq, padded_vocab).

        labels are already the next tokens (Megatron style: labels[:, i] is the target at position i; no shift here).
        """
        hidden = self.model(input_ids, kv_cache)
        if labels is None:
            return self.lm_head(hidden)
        # A vocab-parallel head exposes its tensor-parallel group; the loss then never gathers the full logits.
        group = getattr(self.lm_head, "process_group", None)
        return kernels.linear_cross_entropy(hidden, self.lm_head.weight, self.lm_head.bias, labels,
                                            process_group=group)

    def num_parameters(self) -> int:
        """Parameters held by this module (on this rank)."""
        return sum(p.numel() for p in self.parameters())
