"""Training configuration: flags, YAML, precedence, and the validation errors that name the flag to fix."""

import numpy as np
import pytest

from megaphi.data.indexed_dataset import IndexedDatasetBuilder
from megaphi.train.checks import resolve_model_config
from megaphi.train.config import TrainConfig, build_parser, parse_config, save_yaml
from megaphi.train.trainer import Trainer, main


def write_data(prefix, n_docs=60, max_id=500, dtype=np.uint16, seed=0):
    """A small indexed dataset of random tokens in [0, max_id]."""
    rng = np.random.default_rng(seed)
    with IndexedDatasetBuilder(prefix, dtype=dtype) as builder:
        for _ in range(n_docs):
            builder.add_document([rng.integers(0, max_id + 1, size=int(rng.integers(8, 60)))])
    return str(prefix)


@pytest.fixture
def data(tmp_path):
    return write_data(tmp_path / "data")


def tiny(data, *extra):
    """Flags of a small valid tiny-preset run, then extra flags."""
    return ["--preset", "tiny", "--data-path", data, "--train-iters", "2", "--micro-batch-size", "2",
            "--global-batch-size", "4", "--seq-length", "32", "--eval-iters", "1", "--split", "90,5,5", *extra]


def test_flags_use_megatron_names():
    flags = set(build_parser()._option_string_actions)
    for name in ("--micro-batch-size", "--global-batch-size", "--train-iters", "--lr", "--min-lr", "--lr-warmup-iters",
                 "--lr-decay-style", "--lr-decay-iters", "--weight-decay", "--adam-beta1", "--adam-beta2", "--adam-eps",
                 "--clip-grad", "--bf16", "--fp16", "--seq-length", "--data-path", "--split", "--save", "--load",
                 "--save-interval", "--exit-interval", "--eval-interval", "--eval-iters", "--log-interval", "--seed",
                 "--recompute-activations", "--preset", "--num-layers", "--hidden-size", "--num-attention-heads",
                 "--ffn-hidden-size", "--hidden-dropout", "--attention-dropout", "--tokenizer-type",
                 "--tokenizer-model", "--keep-last", "--log-dir", "--peak-tflops", "--kernels", "--finetune",
                 "--config"):
        assert name in flags, name


def test_precedence_defaults_preset_yaml_cli(tmp_path):
    defaults = tmp_path / "defaults.yaml"
    defaults.write_text("model:\n  preset: tiny\n  num_layers: 3\noptimizer:\n  lr: 1.0e-3\nmicro-batch-size: 2\n")
    user = tmp_path / "user.yaml"
    user.write_text("lr: 5e-4\nweight_decay: 0.2\ndata_path: [a, b]\nbf16: true\n")
    config = parse_config(["--config", str(user), "--lr", "3e-4", "--hidden-size", "256", "--no-bf16"],
                          defaults=defaults)
    assert config.optimizer.lr == 3e-4  # CLI beats both YAML files
    assert config.optimizer.weight_decay == 0.2  # the --config YAML beats the defaults YAML and built-in defaults
    assert config.training.micro_batch_size == 2  # the defaults YAML beats the built-in default (1)
    assert config.optimizer.adam_beta2 == 0.999  # built-in default where nothing overrides it
    assert config.data.data_path == ["a", "b"]
    assert config.precision.bf16 is False
    model = resolve_model_config(config)
    assert (model.num_layers, model.hidden_size) == (3, 256)  # YAML and CLI beat the preset...
    assert model.ffn_hidden_size == 512 and model.max_position_embeddings == 64  # ...which beats nothing else


def test_yaml_round_trip_and_bad_yaml(tmp_path):
    config = parse_config(["--lr", "2e-4", "--data-path", "0.3", "x", "0.7", "y", "--bf16"])
    path = tmp_path / "saved.yaml"
    save_yaml(config, path)
    assert parse_config(["--config", str(path)]) == config
    assert TrainConfig.from_dict(config.to_dict()) == config
    bad = tmp_path / "bad.yaml"
    bad.write_text("lr: 1e-3\nmicro_batch_sise: 4\n")
    with pytest.raises(ValueError, match="bad.yaml.*micro_batch_sise"):
        parse_config(["--config", str(bad)])
    bad.write_text("train_iters: lots\n")
    with pytest.raises(ValueError, match="--train-iters expects int"):
        parse_config(["--config", str(bad)])
    bad.write_text("lr_decay_style: exponential\n")
    with pytest.raises(ValueError, match="--lr-decay-style must be one of cosine, linear, constant"):
        parse_config(["--config", str(bad)])
    with pytest.raises(ValueError, match="--config: .*missing.yaml not found"):
        parse_config(["--config", str(tmp_path / "missing.yaml")])


@pytest.mark.parametrize("flags, message", [
    (["--global-batch-size", "6", "--micro-batch-size", "4"],
     r"--global-batch-size 6 is not divisible by --micro-batch-size 4 × data-parallel size 1"),
    (["--seq-length", "128"], r"--seq-length 128 is longer than the model's max positions 64"),
    (["--bf16", "--fp16"], r"--bf16 and --fp16 are mutually exclusive"),
    (["--train-iters", "0"], r"--train-iters must be a positive"),
    (["--min-lr", "0.1", "--lr", "0.01"], r"--min-lr 0.1 is larger than --lr 0.01"),
    (["--lr-warmup-iters", "5", "--lr-decay-iters", "3"], r"--lr-warmup-iters 5 is longer than --lr-decay-iters 3"),
    (["--lr-warmup-iters", "5"],
     r"--lr-warmup-iters 5 is longer than --lr-decay-iters 2 \(which defaults to --train-iters\)"),
    (["--peak-tflops", "0"], r"--peak-tflops must be positive, got 0.0"),
    (["--save-interval", "10"], r"--save-interval 10 \(from the flags or the YAML config\) needs --save"),
    (["--finetune"], r"--finetune needs --load"),
    (["--finetune", "--load", "/tmp/x", "--save", "/tmp/x"], r"--finetune: --save /tmp/x must differ from --load"),
    (["--keep-last", "2"], r"--keep-last 2 \(from the flags or the YAML config\) needs --save"),
    (["--ckpt-step", "2"], r"--ckpt-step needs --load"),
    (["--tokenizer-type", "sentencepiece"], r"--tokenizer-type and --tokenizer-model must be given together"),
    (["--tokenizer-type", "foo", "--tokenizer-model", "/"],
     r"--tokenizer-type foo --tokenizer-model /: unknown tokenizer"),
    (["--tokenizer-type", "sentencepiece", "--tokenizer-model", "/"],
     r"--tokenizer-type sentencepiece --tokenizer-model /: sentencepiece model '/' does not exist"),
    (["--log-interval", "0"], r"--log-interval must be at least 1"),
    (["--num-attention-heads", "3"], r"model shape: --num-attention-heads=3 must divide hidden_size=128"),
    (["--preset", "huge"], r"unknown --preset 'huge'"),
    (["--vocab-size", "300"], r"--data-path .*data: holds token id 500, but the model's vocabulary is 300"),
    (["--kernels", "nonexistent"], r"--kernels: .*unknown kernel backend 'nonexistent'"),
])
def test_validation_errors_name_the_flag(data, flags, message):
    with pytest.raises(ValueError, match=message):
        Trainer(parse_config(tiny(data, *flags)))


def test_missing_data_files(tmp_path, data):
    with pytest.raises(ValueError, match=r"--data-path: .*nowhere.bin not found"):
        Trainer(parse_config(tiny(str(tmp_path / "nowhere"))))
    (tmp_path / "half.bin").write_bytes(b"")
    with pytest.raises(ValueError, match=r"--data-path: .*half.idx not found"):
        Trainer(parse_config(tiny(data, "--data-path", "0.5", data, "0.5", str(tmp_path / "half"))))
    with pytest.raises(ValueError, match=r"--data-path is required"):
        Trainer(parse_config(tiny(data)[:2] + tiny(data)[4:]))


def test_data_vocab_checked_against_model(tmp_path):
    # uint8 data always fits the tiny preset's 512 entries: the dtype bound suffices, no scan needed.
    small = write_data(tmp_path / "small", max_id=255, dtype=np.uint8)
    Trainer(parse_config(tiny(small, "--vocab-size", "256")))
    # int32 data with an id of 511 fits 512 but not 511.
    wide = write_data(tmp_path / "wide", max_id=511, dtype=np.int32, seed=3)
    Trainer(parse_config(tiny(wide)))
    with pytest.raises(ValueError, match=r"holds token id 511, but the model's vocabulary is 511"):
        Trainer(parse_config(tiny(wide, "--vocab-size", "511")))


def test_tokenizer_sets_padded_model_vocab(megatron_fixtures, data):
    spm = str(megatron_fixtures / "code8k.model")
    config = parse_config(tiny(data, "--tokenizer-type", "sentencepiece", "--tokenizer-model", spm))
    from megaphi.data.tokenizer import build_tokenizer

    vocab = build_tokenizer("sentencepiece", spm).vocab_size
    trainer = Trainer(config)
    assert trainer.model_config.vocab_size == vocab
    assert trainer.model_config.padded_vocab_size % 64 == 0
    assert trainer.model.lm_head.weight.shape[0] == trainer.model_config.padded_vocab_size
    with pytest.raises(ValueError, match=r"--vocab-size 100 is smaller than the tokenizer's vocabulary"):
        Trainer(parse_config(tiny(data, "--tokenizer-type", "sentencepiece", "--tokenizer-model", spm,
                                  "--vocab-size", "100")))


def test_main_reports_config_file_errors_without_a_traceback(tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    for text, message in [("training:\n  micro_batchsize: 3\n", "unknown setting 'micro_batchsize'"),
                          ("training:\n  micro_batch_size: [3\n", "bad.yaml is not valid YAML"),
                          ("micro_batch_size: abc\n", "--micro-batch-size expects int, got 'abc'")]:
        bad.write_text(text)
        with pytest.raises(SystemExit) as exit_info:
            main(["--config", str(bad)])
        assert exit_info.value.code == 2
        err = capsys.readouterr().err
        assert err.startswith("error: ") and message in err, err
    with pytest.raises(SystemExit) as exit_info:
        main(["--config", str(tmp_path / "missing.yaml")])
    assert exit_info.value.code == 2 and "missing.yaml not found" in capsys.readouterr().err
