"""Validation before training starts: every error names the flag to fix; and the model config the flags imply."""

import re
from pathlib import Path

import numpy as np
from tqdm import tqdm

from megaphi.model import ModelConfig, get_preset, padded_vocab_size
from megaphi.train.checkpoint import find_checkpoint, read_meta
from megaphi.train.config import FIELD_GROUP, TrainConfig, flag

# config field -> ModelConfig field, for the model-shape flags that override the preset.
MODEL_OVERRIDES = {
    "num_layers": "num_layers",
    "hidden_size": "hidden_size",
    "num_attention_heads": "num_attention_heads",
    "ffn_hidden_size": "ffn_hidden_size",
    "max_position_embeddings": "max_position_embeddings",
    "hidden_dropout": "hidden_dropout",
    "attention_dropout": "attention_dropout",
    "init_method_std": "init_std",
}
SCAN_CHUNK = 1 << 26  # tokens per chunk when scanning a .bin for its largest id


def validate_config(config: TrainConfig, dp_size: int = 1) -> None:
    """Checks the settings that need no model, data or tokenizer; raises ValueError naming the flag."""
    t, o, s, p, d, c, log = (config.training, config.optimizer, config.schedule, config.precision, config.data,
                             config.checkpoint, config.logging)
    if t.train_iters is None or t.train_iters < 1:
        raise ValueError(f"--train-iters must be a positive number of iterations, got {t.train_iters}")
    if t.micro_batch_size < 1:
        raise ValueError(f"--micro-batch-size must be at least 1, got {t.micro_batch_size}")
    global_batch = global_batch_size(config, dp_size)
    if global_batch < 1 or global_batch % (t.micro_batch_size * dp_size):
        raise ValueError(f"--global-batch-size {global_batch} is not divisible by --micro-batch-size "
                         f"{t.micro_batch_size} × data-parallel size {dp_size}")
    if t.seq_length is not None and t.seq_length < 1:
        raise ValueError(f"--seq-length must be at least 1, got {t.seq_length}")
    if p.bf16 and p.fp16:
        raise ValueError("--bf16 and --fp16 are mutually exclusive: choose one "
                         "(--no-bf16 turns off a YAML file's bf16)")
    if o.lr < 0 or s.min_lr < 0:
        raise ValueError(f"--lr ({o.lr}) and --min-lr ({s.min_lr}) must not be negative")
    if s.min_lr > o.lr:
        raise ValueError(f"--min-lr {s.min_lr} is larger than --lr {o.lr}")
    decay_iters = s.lr_decay_iters if s.lr_decay_iters is not None else t.train_iters
    if s.lr_warmup_iters < 0:
        raise ValueError(f"--lr-warmup-iters must not be negative, got {s.lr_warmup_iters}")
    if s.lr_decay_style != "constant" and s.lr_warmup_iters > decay_iters:
        default = " (which defaults to --train-iters)" if s.lr_decay_iters is None else ""
        raise ValueError(f"--lr-warmup-iters {s.lr_warmup_iters} is longer than --lr-decay-iters "
                         f"{decay_iters}{default}")
    if not (0 <= o.adam_beta1 < 1 and 0 <= o.adam_beta2 < 1):
        raise ValueError(f"--adam-beta1 ({o.adam_beta1}) and --adam-beta2 ({o.adam_beta2}) must be in [0, 1)")
    if o.adam_eps <= 0 or o.weight_decay < 0 or o.clip_grad < 0:
        raise ValueError(f"--adam-eps must be positive and --weight-decay, --clip-grad non-negative, got "
                         f"{o.adam_eps}, {o.weight_decay}, {o.clip_grad}")
    for name in ("log_interval", "eval_interval", "save_interval", "exit_interval", "keep_last",
                 "loss_scale_window", "hysteresis"):
        value = getattr(getattr(config, FIELD_GROUP[name]), name)
        if value is not None and value < 1:
            raise ValueError(f"{flag(name)} must be at least 1, got {value}")
    if log.peak_tflops is not None and log.peak_tflops <= 0:
        raise ValueError(f"--peak-tflops must be positive, got {log.peak_tflops}")
    if log.eval_iters < 0:
        raise ValueError(f"--eval-iters must not be negative, got {log.eval_iters}")
    for name in ("save_interval", "keep_last"):
        if getattr(c, name) is not None and c.save is None:
            raise ValueError(f"{flag(name)} {getattr(c, name)} (from the flags or the YAML config) needs --save, "
                             f"the folder to write checkpoints to")
    if c.finetune and c.load is None:
        raise ValueError("--finetune needs --load (the pretrained checkpoint to start from)")
    if c.finetune and c.save is not None and Path(c.save).resolve() == Path(c.load).resolve():
        raise ValueError(f"--finetune: --save {c.save} must differ from --load (the pretrained checkpoints would be "
                         f"overwritten and pruned)")
    if c.ckpt_step is not None and c.load is None:
        raise ValueError("--ckpt-step needs --load")
    if c.load is not None and c.finetune and find_checkpoint(c.load, c.ckpt_step) is None:
        raise ValueError(f"--load {c.load}: no checkpoint to fine-tune from")
    if (d.tokenizer_type is None) != (d.tokenizer_model is None):
        raise ValueError("--tokenizer-type and --tokenizer-model must be given together")
    if log.code_eval is not None:
        from megaphi.eval.training_hook import parse_code_eval_spec

        parse_code_eval_spec(log.code_eval)
        if d.tokenizer_type is None:
            raise ValueError(f"--code-eval {log.code_eval} needs --tokenizer-type and --tokenizer-model (completions "
                             f"are decoded to text and run)")
        if config.parallel.tensor_model_parallel_size > 1:
            raise ValueError(f"--code-eval generates on rank 0 with the whole model, so it does not run with "
                             f"--tensor-model-parallel-size {config.parallel.tensor_model_parallel_size}; score the "
                             f"checkpoints with tools/evaluate_code.py instead")
    if d.tokenizer_model is not None and not Path(d.tokenizer_model).exists():
        raise ValueError(f"--tokenizer-model {d.tokenizer_model}: not found")
    check_data_files(d.data_path)


def global_batch_size(config: TrainConfig, dp_size: int = 1) -> int:
    """--global-batch-size, defaulting to one micro batch per data-parallel rank."""
    t = config.training
    return t.global_batch_size if t.global_batch_size is not None else t.micro_batch_size * dp_size


def data_prefixes(data_path: list[str]) -> list[str]:
    """The dataset prefixes of --data-path (weights dropped)."""
    from megaphi.data.gpt_dataset import parse_data_path

    return parse_data_path(data_path)[0]


def check_data_files(data_path: list[str]) -> None:
    """Every --data-path prefix has its .bin and .idx."""
    if not data_path:
        raise ValueError("--data-path is required: one or more indexed dataset prefixes (without .bin/.idx)")
    for prefix in data_prefixes(data_path):
        for suffix in (".bin", ".idx"):
            if not Path(prefix + suffix).is_file():
                raise ValueError(f"--data-path: {prefix}{suffix} not found (prefixes are given without .bin/.idx)")


def resolve_model_config(config: TrainConfig, tokenizer_vocab_size: int | None = None) -> ModelConfig:
    """The preset with the flags' overrides; vocab from --vocab-size, else the tokenizer, else the preset."""
    m = config.model
    overrides = {dst: getattr(m, src) for src, dst in MODEL_OVERRIDES.items() if getattr(m, src) is not None}
    if m.vocab_size is not None:
        if tokenizer_vocab_size is not None and m.vocab_size < tokenizer_vocab_size:
            raise ValueError(f"--vocab-size {m.vocab_size} is smaller than the tokenizer's vocabulary "
                             f"{tokenizer_vocab_size} (--tokenizer-model {config.data.tokenizer_model})")
        overrides["vocab_size"] = m.vocab_size
    elif tokenizer_vocab_size is not None:
        overrides["vocab_size"] = tokenizer_vocab_size
    try:
        model_config = get_preset(m.preset, **overrides)
    except ValueError as e:
        text = str(e).replace("model preset", "--preset")
        text = re.sub(r"ModelConfig\.(\w+)", lambda g: flag(_flag_of(g.group(1))), text)
        raise ValueError(f"model shape: {text}") from None
    seq_length = config.training.seq_length
    if seq_length is not None and seq_length > model_config.max_position_embeddings:
        raise ValueError(f"--seq-length {seq_length} is longer than the model's max positions "
                         f"{model_config.max_position_embeddings} (--max-position-embeddings, preset {m.preset})")
    return model_config


def _flag_of(model_field: str) -> str:
    """The config field that sets a ModelConfig field."""
    for src, dst in MODEL_OVERRIDES.items():
        if dst == model_field:
            return src
    return model_field


def max_token_id(prefix: str) -> int:
    """The largest token id in an indexed dataset (-1 when empty), scanned in chunks."""
    from megaphi.data.indexed_dataset import IndexedDataset, data_file_path

    dtype = IndexedDataset(prefix).dtype
    path = data_file_path(prefix)
    n = Path(path).stat().st_size // np.dtype(dtype).itemsize
    if n == 0:
        return -1
    tokens = np.memmap(path, dtype=dtype, mode="r", shape=(n,))
    chunks = range(0, n, SCAN_CHUNK)
    largest = -1
    for start in tqdm(chunks, desc=f"scanning {Path(prefix).name}", unit="chunk", disable=len(chunks) < 16):
        largest = max(largest, int(tokens[start : start + SCAN_CHUNK].max()))
    return largest


def check_data_vocab(config: TrainConfig, model_config: ModelConfig) -> None:
    """Every token id in the data fits the model's vocabulary (the dtype bound, else a scan of the tokens)."""
    from megaphi.data.indexed_dataset import IndexedDataset

    vocab = model_config.vocab_size
    for prefix in data_prefixes(config.data.data_path):
        dtype = np.dtype(IndexedDataset(prefix).dtype)
        if np.iinfo(dtype).max < vocab:
            continue
        largest = max_token_id(prefix)
        if largest >= vocab:
            raise ValueError(f"--data-path {prefix}: holds token id {largest}, but the model's vocabulary is {vocab} "
                             f"(from --vocab-size, --tokenizer-model or --preset {config.model.preset}); "
                             f"was the data made with another tokenizer?")


# ModelConfig fields that fix the weights' shapes or their meaning (heads, rotary): a loaded checkpoint must agree.
CHECKPOINT_FIELDS = ("num_layers", "hidden_size", "num_attention_heads", "ffn_hidden_size", "padded_vocab_size",
                     "rotary_dim", "rope_theta")


def check_checkpoint_model(path: Path, model_config: ModelConfig) -> None:
    """The checkpoint at path was saved from a model of this shape; else a ValueError naming the flags to change."""
    meta = read_meta(path)
    saved = dict(meta.get("model_config") or {})
    if not saved:
        return
    saved["padded_vocab_size"] = padded_vocab_size(saved["vocab_size"], saved.get("make_vocab_size_divisible_by", 64))
    flags = {**{dst: flag(src) for src, dst in MODEL_OVERRIDES.items()},
             "padded_vocab_size": "--vocab-size or the tokenizer", "rotary_dim": "--preset", "rope_theta": "--preset"}
    diffs = [f"{name} {saved[name]} in the checkpoint, {getattr(model_config, name)} here ({flags[name]})"
             for name in CHECKPOINT_FIELDS if name in saved and saved[name] != getattr(model_config, name)]
    if diffs:
        preset = (meta.get("config") or {}).get("model", {}).get("preset")
        raise ValueError(f"--load: checkpoint {path} does not fit this model: {'; '.join(diffs)}"
                         + (f" (it was saved with --preset {preset})" if preset else ""))
