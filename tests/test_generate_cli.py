"""tools/generate.py from a checkpoint and from an HF folder (the same sampler), and the text layer under it:
stop strings, partial characters, streaming."""

import json
import subprocess
import sys

import pytest
import torch

from megaphi.data.tokenizer import build_tokenizer
from megaphi.generate import GenerationStream, TextCompletion, generate, generate_text
from megaphi.hf import convert_to_hf, save_weights_checkpoint
from megaphi.model import ModelConfig, PhiForCausalLM
from tools.generate import main as generate_main

CONFIG = ModelConfig(vocab_size=8000, num_layers=2, hidden_size=64, num_attention_heads=4, ffn_hidden_size=128,
                     max_position_embeddings=64, rotary_dim=8, init_std=0.2)
PROMPTS = ["def fibonacci(n):\n    ", "import os\nimport", "class Stack:"]


@pytest.fixture(scope="module")
def tokenizer(megatron_fixtures):
    return build_tokenizer("sentencepiece", megatron_fixtures / "code8k.model")


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return PhiForCausalLM(CONFIG).eval()


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory, model, tokenizer):
    meta = {"config": {"data": {"tokenizer_type": "sentencepiece", "tokenizer_model": tokenizer.name}}}
    return save_weights_checkpoint(tmp_path_factory.mktemp("gen") / "run", model.state_dict(), CONFIG, meta=meta)


def expected(model, tokenizer, prompt, n, stop=None):
    """The completion megaphi.generate gives (greedy), decoded and cut before stop."""
    ids = generate(model, [tokenizer.encode(prompt)], n, eod=tokenizer.eod, vocab_size=tokenizer.vocab_size)[0]
    text = tokenizer.decode(ids)
    return text[:text.index(stop)] if stop else text


def test_one_prompt_prints_the_greedy_completion(checkpoint, model, tokenizer, capsys):
    assert generate_main(["--load", str(checkpoint.parent), "--prompt", PROMPTS[0], "--max-new-tokens", "20",
                          "--device", "cpu"]) == 0
    assert capsys.readouterr().out == expected(model, tokenizer, PROMPTS[0], 20) + "\n"


def test_batch_from_a_prompt_file_as_jsonl(checkpoint, model, tokenizer, tmp_path, capsys):
    file = tmp_path / "prompts.jsonl"
    file.write_text(json.dumps({"prompt": PROMPTS[1]}) + "\n\n" + json.dumps(PROMPTS[2]) + "\n")
    argv = ["--load", str(checkpoint), "--prompt", PROMPTS[0], "--prompt-file", str(file), "--max-new-tokens", "16",
            "--output-format", "jsonl", "--device", "cpu"]
    assert generate_main(argv) == 0
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [r["prompt"] for r in rows] == PROMPTS
    for row in rows:  # batched prompts of different lengths give each prompt's own completion
        assert row["completion"] == expected(model, tokenizer, row["prompt"], 16)
        assert row["num_tokens"] == 16 and row["finish_reason"] == "length"


def test_hf_folder_generates_the_same_text(checkpoint, tmp_path, capsys):
    convert_to_hf(checkpoint, tmp_path / "hf")
    outputs = []
    for source in (["--load", str(checkpoint)], ["--hf", str(tmp_path / "hf")]):
        argv = [*source, "--prompt", PROMPTS[0], "--prompt", PROMPTS[2], "--max-new-tokens", "12", "--device", "cpu"]
        assert generate_main(argv) == 0
        outputs.append(capsys.readouterr().out)
    assert outputs[0] == outputs[1] and "=== completion 1 ===" in outputs[0]


def test_stop_strings_and_seeded_sampling(checkpoint, model, tokenizer, capsys):
    full = expected(model, tokenizer, PROMPTS[0], 20)
    stop = full[5:8]
    argv = ["--load", str(checkpoint), "--prompt", PROMPTS[0], "--max-new-tokens", "20", "--stop", stop,
            "--output-format", "jsonl", "--device", "cpu"]
    assert generate_main(argv) == 0
    row = json.loads(capsys.readouterr().out)
    assert row["completion"] == full[:full.index(stop)] and row["finish_reason"] == "stop"
    sampled = []
    for seed in ("1", "1", "2"):
        assert generate_main(["--load", str(checkpoint), "--prompt", PROMPTS[1], "--max-new-tokens", "16",
                              "--temperature", "1.0", "--top-p", "0.9", "--seed", seed, "--device", "cpu"]) == 0
        sampled.append(capsys.readouterr().out)
    assert sampled[0] == sampled[1] != sampled[2]


def test_errors(checkpoint, tmp_path, capsys):
    assert generate_main(["--load", str(checkpoint), "--device", "cpu"]) == 2
    assert "no prompts" in capsys.readouterr().err
    argv = ["--load", str(checkpoint), "--prompt", "x", "--max-new-tokens", "100", "--device", "cpu"]
    assert generate_main(argv) == 2
    assert "max_position_embeddings=64" in capsys.readouterr().err
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": 1}\n')
    assert generate_main(["--load", str(checkpoint), "--prompt-file", str(bad)]) == 2
    assert "bad.jsonl:1" in capsys.readouterr().err
    assert generate_main(["--load", str(tmp_path), "--prompt", "x"]) == 2
    assert "no checkpoint found" in capsys.readouterr().err
    assert generate_main(["--hf", str(tmp_path / "missing"), "--prompt", "x"]) == 2
    assert "no such folder" in capsys.readouterr().err
    assert generate_main(["--load", str(checkpoint), "--prompt", "x", "--iteration", "9"]) == 2
    assert "--iteration 9" in capsys.readouterr().err
    if not torch.cuda.is_available():
        assert generate_main(["--load", str(checkpoint), "--prompt", "x", "--device", "cuda"]) == 2
        assert "--device cuda" in capsys.readouterr().err
    with pytest.raises(SystemExit):  # --load and --hf exclude each other
        generate_main(["--load", "a", "--hf", "b", "--prompt", "x"])


def test_runs_as_a_script(repo_root, checkpoint, model, tokenizer):
    result = subprocess.run([sys.executable, str(repo_root / "tools" / "generate.py"), "--load", str(checkpoint),
                             "--prompt", PROMPTS[2], "--max-new-tokens", "8", "--device", "cpu"],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout == expected(model, tokenizer, PROMPTS[2], 8) + "\n"


def test_text_completion_holds_back_stop_prefixes_and_partial_characters():
    pieces = {1: "ab", 2: "c\n", 3: "#", 4: "E", 5: "\ufffd", 6: "x"}

    def decode(ids):
        text = "".join(pieces[i] for i in ids)
        return text.replace("\ufffdx", "é")  # token 6 completes the character token 5 began

    c = TextCompletion(decode, ["\n#E"])
    assert [c.add(t) for t in (1, 2, 3)] == ["ab", "c", ""]  # "\n#" may begin the stop string: held back
    assert c.add(4) == "" and c.stopped and c.text == "abc" and c.finish_reason(10) == "stop"
    c = TextCompletion(decode, ["\n#E"])
    assert [c.add(t) for t in (1, 2, 3, 5)] == ["ab", "c", "", "\n#"]  # no stop after all; a partial char is held
    assert c.add(6) == "é" and c.finish() == "" and c.finish_reason(5) == "length"
    c = TextCompletion(decode, strip_leading=True)
    pieces[7] = "  "
    assert [c.add(t) for t in (7, 1)] == ["", "ab"] and c.text == "ab"


def test_generation_stream_yields_what_generate_returns(model):
    prompts = [[5, 6, 7], [8, 9], [10, 11, 12]]
    events = list(GenerationStream(model, prompts, 6))
    assert len(events) == 18
    rebuilt = [[t for row, t in events if row == i] for i in range(3)]
    assert rebuilt == generate(model, prompts, 6)
    with pytest.raises(ValueError, match="prompt 0 is empty"):
        GenerationStream(model, [[]], 4)  # checked when created, not when first iterated


def test_generate_text_cuts_at_stops(model, tokenizer):
    full = generate_text(model, tokenizer, [PROMPTS[0], ""], 12)
    assert full[0]["finish_reason"] == "length" and len(full[0]["tokens"]) == 12
    assert full[1]["text"] == tokenizer.decode(full[1]["tokens"])  # an empty prompt starts after eod
    stop = full[0]["text"][3:6]
    cut = generate_text(model, tokenizer, [PROMPTS[0]], 12, stop_strings=[stop])[0]
    assert cut["text"] == full[0]["text"][:full[0]["text"].index(stop)] and cut["finish_reason"] == "stop"
    assert generate_text(model, tokenizer, [PROMPTS[0]], 12, stop_strings=[""])[0] == full[0]  # "" stops nothing
