"""Training configuration: grouped dataclasses, loaded from YAML and overridden by Megatron-named flags."""

import argparse
import dataclasses
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml


def doc(help_text: str, default: Any = None, **extra: Any) -> Any:
    """A dataclass field with its one-line documentation (also the flag's --help text)."""
    if isinstance(default, list):
        return field(default_factory=lambda: list(default), metadata={"help": help_text, **extra})
    return field(default=default, metadata={"help": help_text, **extra})


@dataclass
class ModelArgs:
    """Model shape: a preset, then any field set here overrides it."""

    preset: str = doc("model preset from megaphi.model.PRESETS (phi-1, phi-1-small, demo, tiny)", "phi-1")
    num_layers: int | None = doc("transformer layers (default: the preset's)")
    hidden_size: int | None = doc("hidden size (default: the preset's)")
    num_attention_heads: int | None = doc("attention heads (default: the preset's)")
    ffn_hidden_size: int | None = doc("MLP hidden size (default: the preset's)")
    max_position_embeddings: int | None = doc("longest sequence the model supports (default: the preset's)")
    vocab_size: int | None = doc("vocabulary before padding (default: the tokenizer's, else the preset's)")
    hidden_dropout: float | None = doc("dropout after attention and MLP (default: the preset's)")
    attention_dropout: float | None = doc("dropout on attention probabilities (default: the preset's)")
    init_method_std: float | None = doc("std of the normal weight init (default: the preset's)")
    recompute_activations: bool = doc("recompute each layer's activations in the backward pass", False)
    kernels: str | None = doc("kernel backend for megaphi.kernels.set_backend (default: the library's)")


@dataclass
class TrainingArgs:
    """Batch sizes, iterations and seed."""

    micro_batch_size: int = doc("samples per forward/backward pass on each data-parallel rank", 1)
    global_batch_size: int | None = doc("samples per optimizer step (default: micro batch × data-parallel size)")
    train_iters: int | None = doc("optimizer steps to train for (required)")
    seq_length: int | None = doc("tokens per sample (default: the model's max positions)")
    seed: int = doc("seed for initialisation, dropout and data order", 1234)
    exit_interval: int | None = doc("save and exit when the iteration is a multiple of this")


@dataclass
class OptimizerArgs:
    """AdamW and gradient clipping."""

    lr: float = doc("peak learning rate", 1e-3)
    weight_decay: float = doc("AdamW weight decay (2-D weights only; biases and norms get none)", 0.01)
    adam_beta1: float = doc("AdamW beta1", 0.9)
    adam_beta2: float = doc("AdamW beta2", 0.999)
    adam_eps: float = doc("AdamW epsilon", 1e-8)
    clip_grad: float = doc("clip gradients to this global L2 norm (0: no clipping)", 1.0)


@dataclass
class ScheduleArgs:
    """Learning-rate schedule: linear warmup, then decay to --min-lr."""

    min_lr: float = doc("learning rate at the end of the decay", 0.0)
    lr_warmup_iters: int = doc("iterations of linear warmup from 0 to --lr", 0)
    lr_decay_style: str = doc("decay after warmup", "cosine", choices=("cosine", "linear", "constant"))
    lr_decay_iters: int | None = doc("iteration at which the decay reaches --min-lr (default: --train-iters)")


@dataclass
class PrecisionArgs:
    """Mixed precision: bf16 or fp16 autocast over fp32 master weights."""

    bf16: bool = doc("bf16 autocast (parameters and optimizer states stay fp32)", False)
    fp16: bool = doc("fp16 autocast with dynamic loss scaling", False)
    loss_scale: float | None = doc("static fp16 loss scale (default: dynamic)")
    initial_loss_scale: float = doc("first dynamic fp16 loss scale", 2.0**16)
    min_loss_scale: float = doc("dynamic loss scale never goes below this", 1.0)
    loss_scale_window: int = doc("finite steps before the dynamic loss scale doubles", 1000)
    hysteresis: int = doc("overflowing steps tolerated before the dynamic loss scale halves", 2)


@dataclass
class DataArgs:
    """Training data and tokenizer."""

    data_path: list[str] = doc("indexed dataset prefixes, optionally weighted: [w1] p1 [w2] p2 ...", [])
    split: str = doc("train,valid,test proportions of the documents", "969,30,1")
    data_cache_path: str | None = doc("folder for the sample index caches (default: beside the data)")
    tokenizer_type: str | None = doc("tokenizer type (sentencepiece / GPTSentencePieceTokenizer / huggingface)")
    tokenizer_model: str | None = doc("tokenizer .model file or folder with tokenizer.json")


@dataclass
class CheckpointArgs:
    """Saving and loading checkpoints."""

    save: str | None = doc("folder to write checkpoints (and, by default, logs) to")
    load: str | None = doc("folder to resume from (its 'latest' checkpoint)")
    ckpt_step: int | None = doc("with --load, the iteration to load instead of the latest")
    save_interval: int | None = doc("save every this many iterations (and always at the end)")
    keep_last: int | None = doc("keep only the newest N checkpoints in --save")
    finetune: bool = doc("load only the model weights from --load: fresh optimizer, iteration 0", False)


@dataclass
class LoggingArgs:
    """Logging, validation and throughput accounting."""

    log_interval: int = doc("iterations between log lines", 100)
    eval_interval: int = doc("iterations between validation runs", 1000)
    eval_iters: int = doc("global batches per validation run", 100)
    log_dir: str | None = doc("folder for metrics.jsonl and TensorBoard events (default: --save)")
    peak_tflops: float | None = doc("peak TFLOP/s of one device for MFU (default: known GPU table)")
    code_eval: str | None = doc("at each validation, score greedy pass@1 on the first N problems of BENCH, as "
                                "BENCH:N (e.g. humaneval:40); the other ranks wait for rank 0 within "
                                "--distributed-timeout-minutes")


@dataclass
class ParallelArgs:
    """Tensor, sequence and data parallelism (data-parallel size = world size / tensor-parallel size)."""

    tensor_model_parallel_size: int = doc("ranks that split each layer's weights (inside a node)", 1)
    sequence_parallel: bool = doc("with tensor parallelism, run LayerNorm and dropout on sequence shards", False)
    use_distributed_optimizer: bool = doc("ZeRO-1: shard fp32 master weights and Adam states over data parallel",
                                          False)
    ddp_bucket_size_mb: float = doc("size of the gradient buckets reduced during the backward pass, in MB", 25.0)
    distributed_backend: str | None = doc("torch.distributed backend (default: nccl on GPUs, gloo on CPUs)", None,
                                          choices=("nccl", "gloo"))
    distributed_timeout_minutes: float = doc("timeout of collective operations, in minutes", 10.0)


GROUPS = {
    "model": ModelArgs,
    "training": TrainingArgs,
    "optimizer": OptimizerArgs,
    "schedule": ScheduleArgs,
    "precision": PrecisionArgs,
    "parallel": ParallelArgs,
    "data": DataArgs,
    "checkpoint": CheckpointArgs,
    "logging": LoggingArgs,
}


@dataclass
class TrainConfig:
    """All training settings, one group per concern; field names are unique across groups."""

    model: ModelArgs = field(default_factory=ModelArgs)
    training: TrainingArgs = field(default_factory=TrainingArgs)
    optimizer: OptimizerArgs = field(default_factory=OptimizerArgs)
    schedule: ScheduleArgs = field(default_factory=ScheduleArgs)
    precision: PrecisionArgs = field(default_factory=PrecisionArgs)
    parallel: ParallelArgs = field(default_factory=ParallelArgs)
    data: DataArgs = field(default_factory=DataArgs)
    checkpoint: CheckpointArgs = field(default_factory=CheckpointArgs)
    logging: LoggingArgs = field(default_factory=LoggingArgs)

    def set(self, name: str, value: Any, source: str = "") -> None:
        """Sets one field by its flat name (dashes or underscores), coercing and checking the value's type."""
        key = name.replace("-", "_")
        if key not in FIELD_GROUP:
            raise ValueError(f"{source}unknown setting {name!r} (see --help for the settings)")
        group = getattr(self, FIELD_GROUP[key])
        setattr(group, key, coerce(FIELDS[key], value, f"{source}{flag(key)}"))

    def update(self, values: dict[str, Any], source: str = "") -> None:
        """Sets fields from a flat or grouped mapping ({'lr': 1e-3} or {'optimizer': {'lr': 1e-3}})."""
        for key, value in values.items():
            if key in GROUPS and isinstance(value, dict):
                self.update(value, source)
            else:
                self.set(key, value, source)

    def to_dict(self) -> dict[str, dict[str, Any]]:
        """The configuration as nested plain data (for YAML, JSON and checkpoints)."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> "TrainConfig":
        """Rebuilds a configuration from to_dict()'s output."""
        config = cls()
        config.update(values)
        return config


FIELDS: dict[str, dataclasses.Field] = {}
FIELD_GROUP: dict[str, str] = {}
for _group, _cls in GROUPS.items():
    for _f in dataclasses.fields(_cls):
        assert _f.name not in FIELDS, f"setting {_f.name} is defined twice"
        FIELDS[_f.name] = _f
        FIELD_GROUP[_f.name] = _group


def flag(name: str) -> str:
    """The command-line flag of a field: micro_batch_size -> --micro-batch-size."""
    return "--" + name.replace("_", "-")


def base_type(annotation: Any) -> tuple[Any, bool]:
    """(the type inside Optional, whether None is allowed)."""
    if isinstance(annotation, types.UnionType) or typing.get_origin(annotation) is typing.Union:
        args = [a for a in typing.get_args(annotation) if a is not type(None)]
        return args[0], True
    return annotation, False


def _convert(kind: Any, value: Any) -> Any:
    """value as `kind` (bool, int, float, str or list[str]); TypeError/ValueError when it is not one."""
    if isinstance(value, bool) and kind is not bool:
        raise TypeError("a boolean")
    if kind is bool:
        if isinstance(value, str) and value.lower() in ("true", "false", "yes", "no"):
            return value.lower() in ("true", "yes")
        if not isinstance(value, bool):
            raise TypeError("not a boolean")
        return value
    if kind is int:
        if isinstance(value, float) and not value.is_integer():
            raise TypeError("not a whole number")
        return int(value)
    if kind is float:
        return float(value)
    if kind is str:
        if not isinstance(value, (str, int, float)):
            raise TypeError("not a string")
        return str(value)
    if typing.get_origin(kind) is list:
        return [str(v) for v in (value.split() if isinstance(value, str) else value)]
    raise AssertionError(f"unsupported setting type {kind}")


def coerce(f: dataclasses.Field, value: Any, where: str) -> Any:
    """Converts a YAML/CLI value to the field's type, or raises a ValueError naming the flag."""
    kind, optional = base_type(f.type)
    if value is None:
        if optional:
            return None
        raise ValueError(f"{where} cannot be empty")
    try:
        value = _convert(kind, value)
    except (TypeError, ValueError):
        raise ValueError(f"{where} expects {getattr(kind, '__name__', kind)}, got {value!r}") from None
    choices = f.metadata.get("choices")
    if choices and value not in choices:
        raise ValueError(f"{where} must be one of {', '.join(choices)}, not {value!r}")
    return value


def load_yaml(path: str | Path) -> dict[str, Any]:
    """Reads a YAML config file: a mapping of settings, flat or grouped."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"--config: {path} not found")
    try:
        values = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise ValueError(f"--config: {path} is not valid YAML: {e}") from None
    if not isinstance(values, dict):
        raise ValueError(f"--config: {path} must hold a mapping of settings, not {type(values).__name__}")
    return values


def build_parser(description: str | None = None) -> argparse.ArgumentParser:
    """An argparse parser with one flag per field; unset flags are absent from the result."""
    parser = argparse.ArgumentParser(description=description, argument_default=argparse.SUPPRESS,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", action="append", help="YAML file of settings (repeatable; later wins)")
    for group, cls in GROUPS.items():
        arg_group = parser.add_argument_group(group, cls.__doc__)
        for f in dataclasses.fields(cls):
            kind, _ = base_type(f.type)
            default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
            kwargs: dict[str, Any] = {"help": f"{f.metadata['help']} (default: {default})", "dest": f.name}
            if kind is bool:
                kwargs["action"] = argparse.BooleanOptionalAction
            elif typing.get_origin(kind) is list:
                kwargs["nargs"] = "+"
            else:
                kwargs["type"] = kind
                kwargs["choices"] = f.metadata.get("choices")
                kwargs["metavar"] = f.name.upper() if kwargs["choices"] is None else None
            arg_group.add_argument(flag(f.name), **kwargs)
    return parser


def parse_config(
    argv: list[str] | None = None, defaults: str | Path | None = None, description: str | None = None
) -> TrainConfig:
    """Defaults < preset < YAML (`defaults`, then each --config) < command-line flags."""
    args = vars(build_parser(description).parse_args(argv))
    config = TrainConfig()
    for path in ([defaults] if defaults else []) + args.pop("config", []):
        config.update(load_yaml(path), source=f"{path}: ")
    for name, value in args.items():
        config.set(name, value)
    return config


def save_yaml(config: TrainConfig, path: str | Path) -> None:
    """Writes the configuration as grouped YAML (readable back with --config)."""
    Path(path).write_text(yaml.safe_dump(config.to_dict(), sort_keys=False))
