"""--code-eval: HumanEval pass@1 logged beside the validation loss, and its start-up checks."""

import json

import pytest

from megaphi.train.config import parse_config
from megaphi.train.trainer import Trainer, train


def flags(data, tokenizer, *extra):
    return ["--preset", "tiny", "--data-path", data, "--micro-batch-size", "2", "--global-batch-size", "2",
            "--seq-length", "16", "--split", "90,10,0", "--eval-iters", "1", "--eval-interval", "2",
            "--log-interval", "1", "--train-iters", "2", "--tokenizer-type", "sentencepiece",
            "--tokenizer-model", tokenizer, *extra]


def test_code_eval_is_logged_at_each_validation(write_token_dataset, megatron_fixtures, tmp_path):
    tokenizer = str(megatron_fixtures / "code8k.model")
    # The tiny model has 64 positions: 32 new tokens, and the prompts keep their last 32 tokens.
    with pytest.warns(UserWarning, match="keep only their last 32 tokens"):
        result = train(parse_config(flags(write_token_dataset(200), tokenizer, "--code-eval", "humaneval:2",
                                          "--save", str(tmp_path))), progress=False)
    assert result.valid_losses
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    code_eval = [r for r in records if r["type"] == "code_eval"]
    # A 2-iteration random model solves nothing; the point is that the problems were generated and run.
    assert code_eval == [{"type": "code_eval", "iteration": 2, "humaneval_pass@1": 0.0}]


@pytest.mark.parametrize("extra, message", [
    (["--code-eval", "humaneval"], "expected BENCH:N"),
    (["--code-eval", "apps:3"], "expected BENCH:N with BENCH one of"),
    (["--code-eval", "mbpp:0"], "N must be between 1 and 500"),
])
def test_bad_code_eval_specs_fail_at_start(write_token_dataset, megatron_fixtures, extra, message):
    with pytest.raises(ValueError, match=message):
        Trainer(parse_config(flags(write_token_dataset(50), str(megatron_fixtures / "code8k.model"), *extra)))


def test_code_eval_needs_a_tokenizer(write_token_dataset):
    args = ["--preset", "tiny", "--data-path", write_token_dataset(50), "--train-iters", "1", "--code-eval",
            "humaneval:1"]
    with pytest.raises(ValueError, match="needs --tokenizer-type and --tokenizer-model"):
        Trainer(parse_config(args))
