"""config.json both ways: megaphi's ModelConfig <-> transformers' PhiConfig keys (and the old phi-1 MixFormer keys)."""

import dataclasses
import math

from megaphi.model.config import ModelConfig, padded_vocab_size

DTYPES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}
# Activations that compute phi's tanh-approximated GELU.
TANH_GELU = ("gelu_new", "gelu_pytorch_tanh", "gelu_fast")
DEFAULT_ROPE_THETA = 10000.0


def hf_config(config: ModelConfig, bos_token_id: int | None, eos_token_id: int | None,
              dtype: str = "fp32") -> dict:
    """config.json of a PhiForCausalLM with this shape, readable by transformers 4.x and 5.x."""
    if dtype not in DTYPES:
        raise ValueError(f"--dtype must be one of {sorted(DTYPES)}, got {dtype!r}")
    keys = config.to_hf_config()
    keys["partial_rotary_factor"] = rotary_factor(config.rotary_dim, config.head_dim)
    rope = {"rope_type": "default", "rope_theta": keys["rope_theta"],
            "partial_rotary_factor": keys["partial_rotary_factor"]}
    return {
        "architectures": ["PhiForCausalLM"], "model_type": "phi", **keys,
        "num_key_value_heads": config.num_attention_heads,
        # transformers 5 reads rope_parameters; 4.x reads the top-level rope_theta and partial_rotary_factor.
        "rope_parameters": rope, "qk_layernorm": False, "use_cache": True,
        "bos_token_id": bos_token_id, "eos_token_id": eos_token_id, "pad_token_id": None,
        "dtype": DTYPES[dtype], "torch_dtype": DTYPES[dtype],
    }


def rotary_factor(rotary_dim: int, head_dim: int) -> float:
    """partial_rotary_factor such that transformers' int(head_dim * factor) gives back rotary_dim."""
    factor = rotary_dim / head_dim
    while int(head_dim * factor) < rotary_dim:  # 30 / 44 * 44 == 29.999...: step to the next float up
        factor = math.nextafter(factor, math.inf)
    return factor


def generation_config(bos_token_id: int | None, eos_token_id: int | None) -> dict:
    """generation_config.json: greedy by default, stopping at our end-of-document token."""
    return {"bos_token_id": bos_token_id, "eos_token_id": eos_token_id, "do_sample": False}


def vocab_fields(rows: int, tokenizer_vocab_size: int | None) -> dict:
    """vocab_size and make_vocab_size_divisible_by giving `rows` embedding rows (the tokenizer's size if it fits)."""
    if tokenizer_vocab_size is not None:
        if tokenizer_vocab_size > rows:
            raise ValueError(f"the tokenizer has {tokenizer_vocab_size} tokens but the model only {rows} "
                             f"embedding rows")
        multiple = 64
        while multiple <= rows:
            if padded_vocab_size(tokenizer_vocab_size, multiple) == rows:
                return {"vocab_size": tokenizer_vocab_size, "make_vocab_size_divisible_by": multiple}
            multiple *= 2
    return {"vocab_size": rows, "make_vocab_size_divisible_by": 64 if rows % 64 == 0 else 1}


def _get(cfg: dict, *names, default=None):
    for name in names:
        if cfg.get(name) is not None:
            return cfg[name]
    return default


def model_config_from_hf(cfg: dict, tokenizer_vocab_size: int | None = None) -> ModelConfig:
    """The ModelConfig of a config.json: PhiConfig keys, or the old phi-1 ones (n_embd, n_layer, rotary_dim, ...)."""
    old = "n_embd" in cfg
    hidden = _get(cfg, "n_embd", "hidden_size")
    heads = _get(cfg, "n_head", "num_attention_heads")
    layers = _get(cfg, "n_layer", "num_hidden_layers")
    if hidden is None or heads is None or layers is None:
        raise ValueError("config.json lacks the model's shape: it needs hidden_size, num_attention_heads and "
                         "num_hidden_layers (or the old n_embd, n_head, n_layer)")
    kv_heads = _get(cfg, "n_head_kv", "num_key_value_heads", default=heads)
    if kv_heads != heads:
        raise ValueError(f"config.json: {kv_heads} key/value heads for {heads} query heads; megaphi's phi has "
                         f"plain multi-head attention")
    act = _get(cfg, "activation_function", "hidden_act", default="gelu_new")
    if act not in TANH_GELU:
        raise ValueError(f"config.json: activation {act!r} is not phi's tanh GELU ({', '.join(TANH_GELU)})")
    if cfg.get("qk_layernorm"):
        raise ValueError("config.json: qk_layernorm is on; megaphi's phi has no query/key LayerNorm")
    head_dim = hidden // heads
    rope = cfg.get("rope_parameters") or {}
    if rope.get("rope_type", "default") != "default":
        raise ValueError(f"config.json: rope_type {rope['rope_type']!r}; megaphi implements only the default rotary")
    if old:
        rotary_dim = _get(cfg, "rotary_dim", default=32)
    else:
        factor = _get(rope, "partial_rotary_factor", default=_get(cfg, "partial_rotary_factor", default=0.5))
        rotary_dim = int(head_dim * factor)  # as transformers computes it
    theta = _get(rope, "rope_theta", default=_get(cfg, "rope_theta", "rotary_emb_base", default=DEFAULT_ROPE_THETA))
    inner = _get(cfg, "n_inner", "intermediate_size", default=4 * hidden)
    rows = _get(cfg, "vocab_size", default=51200)
    try:
        return ModelConfig(
            **vocab_fields(rows, tokenizer_vocab_size), num_layers=layers, hidden_size=hidden,
            num_attention_heads=heads, ffn_hidden_size=inner,
            max_position_embeddings=_get(cfg, "n_positions", "max_position_embeddings", default=2048),
            rotary_dim=rotary_dim, rope_theta=float(theta),
            layernorm_epsilon=float(_get(cfg, "layer_norm_epsilon", "layer_norm_eps", default=1e-5)),
            hidden_dropout=float(_get(cfg, "resid_pdrop", default=0.0)),
            attention_dropout=float(_get(cfg, "attn_pdrop", "attention_dropout", default=0.0)),
            embedding_dropout=float(_get(cfg, "embd_pdrop", default=0.0)),
            init_std=float(_get(cfg, "initializer_range", default=0.02)),
        )
    except ValueError as e:
        raise ValueError(f"config.json does not describe a model megaphi can build: {e}") from None


def model_config_from_dict(fields: dict) -> ModelConfig:
    """A ModelConfig from dataclasses.asdict() output, ignoring keys a newer or older version added."""
    names = {f.name for f in dataclasses.fields(ModelConfig)}
    return ModelConfig(**{k: v for k, v in fields.items() if k in names})
