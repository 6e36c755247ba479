"""Samplers, the training hook and tools/evaluate_code.py on a tiny random model (real checkpoint, real HTTP)."""

import json
import shutil
import threading
import time

import pytest
import torch

from megaphi.data.tokenizer import build_tokenizer
from megaphi.eval.evaluate import generate_completions
from megaphi.eval.problems import load_problems
from megaphi.eval.samplers import MegaphiSampler, OpenAISampler, checkpoint_sampler
from megaphi.eval.training_hook import CodeEvalHook, parse_code_eval_spec
from megaphi.generate import generate
from megaphi.model import PhiForCausalLM, get_preset
from megaphi.train.checkpoint import save_model_checkpoint
from tools import evaluate_code


@pytest.fixture(scope="module")
def tokenizer(megatron_fixtures):
    return build_tokenizer("sentencepiece", str(megatron_fixtures / "code8k.model"))


@pytest.fixture(scope="module")
def model(tokenizer):
    torch.manual_seed(0)
    config = get_preset("tiny", vocab_size=tokenizer.vocab_size, max_position_embeddings=512, init_std=0.2)
    return PhiForCausalLM(config).eval()


@pytest.fixture(scope="module")
def checkpoint(model, tokenizer, tmp_path_factory):
    folder = tmp_path_factory.mktemp("ckpt")
    data = {"tokenizer_type": "sentencepiece", "tokenizer_model": tokenizer.name}
    save_model_checkpoint(folder, model.state_dict(), model.config, tensor_parallel_size=2,
                          meta={"config": {"data": data}})
    return folder


def test_code_eval_spec_parser():
    assert parse_code_eval_spec("humaneval:40") == ("humaneval", 40)
    assert parse_code_eval_spec(" MBPP:500 ") == ("mbpp", 500)
    for bad, why in [("humaneval", "N the number"), ("humaneval:0", "between 1 and 164"), ("mbpp:501", "500"),
                     ("apps:3", "one of humaneval, mbpp"), ("humaneval:x", "positive integer"), ("", "BENCH:N"),
                     (None, "BENCH:N"), ("humaneval:-1", "positive integer")]:
        with pytest.raises(ValueError, match="--code-eval") as error:
            parse_code_eval_spec(bad)
        assert why in str(error.value)


def test_training_hook_scores_a_random_model_zero_quickly_and_restores_train_mode(model, tokenizer):
    hook = CodeEvalHook.from_spec("humaneval:2", tokenizer, max_new_tokens=16)
    model.train()
    try:
        start = time.monotonic()
        assert hook(model, iteration=10) == {"humaneval_pass@1": 0.0}
        assert time.monotonic() - start < 30
        assert model.training
    finally:
        model.eval()


def test_greedy_completions_are_deterministic_and_decode_after_the_prompt(model, tokenizer):
    sampler = MegaphiSampler(model, tokenizer, batch_size=2)
    prompts = ["def add(a, b):\n", "import os\n\n\ndef main():\n    "]
    first = sampler.complete(prompts, max_new_tokens=8)
    assert first == sampler.complete(prompts, max_new_tokens=8)
    for prompt, (text,) in zip(prompts, first):
        ids = tokenizer.encode(prompt)
        new = generate(model, [ids], 8, eod=tokenizer.eod, vocab_size=tokenizer.vocab_size)[0]
        assert new and text == tokenizer.decode(ids + new)[len(tokenizer.decode(ids)):]
    sampled = sampler.complete(prompts, n=2, temperature=1.0, max_new_tokens=6, seed=1)
    assert [len(s) for s in sampled] == [2, 2]
    assert sampled == sampler.complete(prompts, n=2, temperature=1.0, max_new_tokens=6, seed=1)


def test_greedy_with_several_samples_is_refused(model, tokenizer):
    with pytest.raises(ValueError, match="--temperature"):
        generate_completions(load_problems("humaneval", limit=1), MegaphiSampler(model, tokenizer), n=2)


def test_checkpoint_sampler_reads_a_tensor_parallel_checkpoint_and_its_tokenizer(checkpoint, model, tokenizer):
    sampler = checkpoint_sampler(str(checkpoint))
    assert sampler.tokenizer.name == tokenizer.name
    prompts = ["def add(a, b):\n"]
    assert sampler.complete(prompts, max_new_tokens=8) == MegaphiSampler(model, tokenizer).complete(
        prompts, max_new_tokens=8)
    with pytest.raises(ValueError, match="--tokenizer-type and --tokenizer-model"):
        checkpoint_sampler(str(checkpoint), tokenizer_type="sentencepiece")


def test_cli_generates_scores_and_rescores_its_samples(checkpoint, tmp_path, capsys):
    out, per_problem, samples = tmp_path / "results.json", tmp_path / "pp.jsonl", tmp_path / "samples.jsonl"
    code = evaluate_code.main(["--benchmark", "humaneval", "--load", str(checkpoint), "--limit", "3",
                               "--max-new-tokens", "8", "--output", str(out), "--per-problem", str(per_problem),
                               "--save-samples", str(samples), "--no-progress", "--device", "cpu"])
    assert code == 0
    summary = json.loads(out.read_text())
    assert summary["benchmark"] == "humaneval" and summary["n_problems"] == 3 and summary["pass@1"] == 0.0
    assert "pass@10" not in summary and summary["temperature"] == 0.0
    printed = capsys.readouterr().out
    assert "sandbox: namespaces" in printed and "pass@1" in printed
    records = [json.loads(line) for line in per_problem.read_text().splitlines()]
    assert [r["task_id"] for r in records] == ["HumanEval/0", "HumanEval/1", "HumanEval/2"]
    assert all(r["n"] == 1 and r["correct"] == 0 and len(r["results"]) == 1 for r in records)
    # Scoring the saved samples gives the same per-problem results.
    rescored = tmp_path / "rescored.jsonl"
    assert evaluate_code.main(["--benchmark", "humaneval", "--samples", str(samples), "--per-problem",
                               str(rescored), "--no-progress"]) == 0
    again = [json.loads(line) for line in rescored.read_text().splitlines()]
    assert [(r["task_id"], r["completions"], r["results"]) for r in again] == \
        [(r["task_id"], r["completions"], r["results"]) for r in records]


def test_cli_samples_with_references_and_errors(tmp_path, capsys):
    problems = load_problems("humaneval", limit=4)
    samples = tmp_path / "s.jsonl"
    rows = [{"task_id": p.task_id, "completion": c} for p in problems for c in (p.reference, "    pass\n")]
    samples.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "r.json"
    assert evaluate_code.main(["--benchmark", "humaneval", "--samples", str(samples), "--k", "1,2",
                               "--output", str(out), "--no-progress", "--workers", "2"]) == 0
    summary = json.loads(out.read_text())
    assert summary["n_problems"] == 4 and summary["pass@1"] == 0.5 and summary["pass@2"] == 1.0
    samples.write_text(json.dumps({"task_id": "HumanEval/999", "completion": ""}) + "\n")
    assert evaluate_code.main(["--benchmark", "humaneval", "--samples", str(samples), "--no-progress"]) == 1
    assert "HumanEval/999" in capsys.readouterr().err
    assert evaluate_code.main(["--benchmark", "humaneval", "--samples", str(samples), "--limit", "2",
                               "--no-progress"]) == 1
    assert "have no samples" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        evaluate_code.main(["--benchmark", "humaneval", "--samples", str(samples), "--load", "x"])
    with pytest.raises(SystemExit):  # refused before any work, not after it
        evaluate_code.main(["--benchmark", "humaneval", "--samples", str(samples), "--output",
                            str(tmp_path / "missing" / "r.json")])
    assert "its folder does not exist" in capsys.readouterr().err
    samples.write_bytes(b'\xff{"task_id": 1}\n')
    assert evaluate_code.main(["--benchmark", "humaneval", "--samples", str(samples), "--no-progress"]) == 1
    assert "is not UTF-8 text" in capsys.readouterr().err


def test_hf_folder_gives_the_same_greedy_completions_with_either_backend(tmp_path, megatron_fixtures):
    from transformers import PhiConfig
    from transformers import PhiForCausalLM as HFPhi

    from megaphi.eval.samplers import hf_sampler

    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(megatron_fixtures / "hf_bpe8k" / name, tmp_path / name)
    torch.manual_seed(0)
    config = PhiConfig(vocab_size=8000, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                       num_attention_heads=2, max_position_embeddings=512, partial_rotary_factor=0.5,
                       tie_word_embeddings=False, bos_token_id=0, eos_token_id=0, initializer_range=0.2)
    HFPhi(config).save_pretrained(tmp_path)
    problems = load_problems("humaneval", limit=2)
    ours = generate_completions(problems, hf_sampler(str(tmp_path)), max_new_tokens=8, progress=False)
    theirs = generate_completions(problems, hf_sampler(str(tmp_path), backend="transformers"), max_new_tokens=8,
                                  progress=False)
    assert ours == theirs and any(c[0] for c in ours.values())


def test_openai_endpoint_gives_the_same_greedy_completions(model, tokenizer):
    from megaphi import serve

    server = serve.make_server(serve.Engine(model, tokenizer, "tiny"), "127.0.0.1", 0, verbose=False)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        host, port = server.server_address[:2]
        remote = OpenAISampler(f"http://{host}:{port}/v1", "tiny", api_key_env="MEGAPHI_TEST_NO_KEY")
        problems = load_problems("humaneval", limit=2)
        local = generate_completions(problems, MegaphiSampler(model, tokenizer), max_new_tokens=24, progress=False)
        assert generate_completions(problems, remote, max_new_tokens=24, progress=False) == local
    finally:
        server.shutdown()
        server.server_close()
