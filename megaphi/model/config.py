"""The phi model's shape: a dataclass, its validation, named presets and the analytic parameter count."""

import dataclasses
from dataclasses import dataclass


def padded_vocab_size(vocab_size: int, multiple: int = 64) -> int:
    """vocab_size rounded up to a multiple (Megatron's --make-vocab-size-divisible-by)."""
    return -(-vocab_size // multiple) * multiple


@dataclass
class ModelConfig:
    """A phi-architecture decoder: parallel attention/MLP blocks, partial rotary, untied LM head with bias."""

    vocab_size: int
    """Tokenizer vocabulary size; the embedding and LM head use padded_vocab_size."""
    num_layers: int
    """Number of transformer blocks (--num-layers)."""
    hidden_size: int
    """Width of the residual stream (--hidden-size)."""
    num_attention_heads: int
    """Attention heads; head_dim = hidden_size // num_attention_heads (--num-attention-heads)."""
    ffn_hidden_size: int
    """Width of the MLP's hidden layer, fc1's output (--ffn-hidden-size)."""
    max_position_embeddings: int
    """Longest sequence the model is built for (training --seq-length must not exceed it)."""
    rotary_dim: int = 32
    """Leading dims of each head that get rotary position embedding; the rest pass through."""
    rope_theta: float = 10000.0
    """Rotary base: frequencies are rope_theta ** (-2i / rotary_dim)."""
    layernorm_epsilon: float = 1e-5
    """LayerNorm epsilon."""
    hidden_dropout: float = 0.0
    """Dropout on the attention and MLP outputs before the residual add (HF resid_pdrop, --hidden-dropout)."""
    attention_dropout: float = 0.0
    """Dropout on the attention probabilities (--attention-dropout)."""
    embedding_dropout: float = 0.0
    """Dropout on the token embeddings (HF embd_pdrop)."""
    init_std: float = 0.02
    """Std of the normal init of the embedding, every linear weight and the LM head (--init-method-std)."""
    make_vocab_size_divisible_by: int = 64
    """The embedding and LM head rows are vocab_size rounded up to a multiple of this."""

    def __post_init__(self):
        for name in ("vocab_size", "num_layers", "hidden_size", "num_attention_heads", "ffn_hidden_size",
                     "max_position_embeddings", "rotary_dim", "make_vocab_size_divisible_by"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ValueError(f"ModelConfig.{name} must be a positive integer, got {value!r}")
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(f"ModelConfig.num_attention_heads={self.num_attention_heads} must divide "
                             f"hidden_size={self.hidden_size}")
        if self.rotary_dim % 2 or self.rotary_dim > self.head_dim:
            raise ValueError(f"ModelConfig.rotary_dim={self.rotary_dim} must be even and at most "
                             f"head_dim={self.head_dim} (hidden_size // num_attention_heads)")
        for name in ("hidden_dropout", "attention_dropout", "embedding_dropout"):
            value = getattr(self, name)
            if not 0.0 <= value < 1.0:
                raise ValueError(f"ModelConfig.{name} must be in [0, 1), got {value!r}")
        for name in ("rope_theta", "layernorm_epsilon", "init_std"):
            if not getattr(self, name) > 0:
                raise ValueError(f"ModelConfig.{name} must be positive, got {getattr(self, name)!r}")

    @property
    def head_dim(self) -> int:
        """Width of one attention head."""
        return self.hidden_size // self.num_attention_heads

    @property
    def padded_vocab_size(self) -> int:
        """Rows of the embedding and LM head."""
        return padded_vocab_size(self.vocab_size, self.make_vocab_size_divisible_by)

    def replace(self, **changes) -> "ModelConfig":
        """A copy with some fields changed (validated again)."""
        return dataclasses.replace(self, **changes)

    def to_hf_config(self) -> dict:
        """The keyword arguments of transformers' PhiConfig for this shape (no transformers import needed)."""
        return dict(
            vocab_size=self.padded_vocab_size, hidden_size=self.hidden_size,
            intermediate_size=self.ffn_hidden_size, num_hidden_layers=self.num_layers,
            num_attention_heads=self.num_attention_heads, max_position_embeddings=self.max_position_embeddings,
            partial_rotary_factor=self.rotary_dim / self.head_dim, rope_theta=self.rope_theta,
            layer_norm_eps=self.layernorm_epsilon, resid_pdrop=self.hidden_dropout,
            embd_pdrop=self.embedding_dropout, attention_dropout=self.attention_dropout,
            hidden_act="gelu_new", tie_word_embeddings=False, initializer_range=self.init_std,
        )


# phi-1's 51200 rows are its tokenizer's 50295 (codegen-350M-mono's) rounded up to a multiple of 1024; with that
# multiple, a run that takes its vocabulary from that tokenizer gets the released shape (and HF conversion works).
_PHI_SHAPE = dict(vocab_size=51200, max_position_embeddings=2048, rotary_dim=32, make_vocab_size_divisible_by=1024)
PRESETS: dict[str, dict] = {
    # phi-1 (Gunasekar et al. 2023): 1.418B parameters.
    "phi-1": dict(num_layers=24, hidden_size=2048, num_attention_heads=32, ffn_hidden_size=8192, **_PHI_SHAPE),
    # phi-1-small: 356.8M parameters (the paper's "350M").
    "phi-1-small": dict(num_layers=20, hidden_size=1024, num_attention_heads=16, ffn_hidden_size=4096, **_PHI_SHAPE),
    # Trains in a few minutes on a 2-core CPU; the trainer sets vocab_size from the tokenizer.
    "demo": dict(num_layers=4, hidden_size=256, num_attention_heads=4, ffn_hidden_size=1024,
                 max_position_embeddings=256, vocab_size=8192, rotary_dim=32),
    # Unit tests: heads of 64 with phi's half rotary, as small as that allows.
    "tiny": dict(num_layers=2, hidden_size=128, num_attention_heads=2, ffn_hidden_size=512,
                 max_position_embeddings=64, vocab_size=512, rotary_dim=32),
}


def get_preset(name: str, **overrides) -> ModelConfig:
    """The ModelConfig of a named preset with some fields overridden."""
    if name not in PRESETS:
        raise ValueError(f"unknown model preset {name!r}; choose one of {sorted(PRESETS)}")
    unknown = set(overrides) - {f.name for f in dataclasses.fields(ModelConfig)}
    if unknown:
        raise ValueError(f"unknown ModelConfig field(s) {sorted(unknown)} overriding preset {name!r}")
    return ModelConfig(**{**PRESETS[name], **overrides})


def num_parameters(config: ModelConfig) -> int:
    """Parameter count of PhiForCausalLM(config), from the shapes alone."""
    h, f, v = config.hidden_size, config.ffn_hidden_size, config.padded_vocab_size
    per_layer = (
        2 * h            # input LayerNorm
        + 4 * (h * h + h)  # q, k, v, dense
        + h * f + f      # fc1
        + f * h + h      # fc2
    )
    return v * h + config.num_layers * per_layer + 2 * h + v * h + v
