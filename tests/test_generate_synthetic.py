"""Synthetic textbooks and exercises: reproducible, diverse prompts; exercise checks (parse, own tests in the
sandbox); tools/generate_synthetic.py killed midway and rerun against the fault server loses and duplicates
nothing; and real requests to the project's own server (tools/serve.py on a tiny checkpoint)."""

import importlib.util
import json
import os
import re
import signal
import subprocess
import sys
import time
from collections import Counter

import pytest
import torch

from fault_server import FaultServer, canned, serving, variant
from megaphi.curate.synthetic import build_prompts, check_reply, extract_code, rejected_path, split_exercise

EXERCISE = '''import math


def area(r: float) -> float:
    """Return the area of a circle of radius r."""
    if r < 0:
        raise ValueError("r must be >= 0")
    return math.pi * r * r


assert area(0) == 0
assert abs(area(1) - math.pi) < 1e-9
'''


def tool(repo_root, *args):
    return [sys.executable, str(repo_root / "tools" / "generate_synthetic.py"), *map(str, args)]


@pytest.fixture(scope="module")
def cli(repo_root):
    """tools/generate_synthetic.py's main(argv), run in this process (saves a start-up per call)."""
    spec = importlib.util.spec_from_file_location("generate_synthetic", repo_root / "tools" / "generate_synthetic.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return lambda *args: module.main([str(a) for a in args])


def test_prompts_are_reproducible_distinct_and_cover_the_seed_lists():
    a = build_prompts("exercises", 600, seed=3)
    assert a == build_prompts("exercises", 600, seed=3) and a[100:110] == build_prompts("exercises", 10, 3, 100)
    assert len({p["prompt"] for p in a}) == 600 and len({p["id"] for p in a}) == 600
    assert len({p["function_name"] for p in a[:93]}) == 93  # a new name for each prompt of a topic cycle
    assert all(f"named `{p['function_name']}`" in p["prompt"] and p["constraint"] in p["prompt"] for p in a)
    b = build_prompts("exercises", 600, seed=4)
    assert sum(x["prompt"] == y["prompt"] for x, y in zip(a, b)) < 10 and a[0]["id"] != b[0]["id"]
    t = build_prompts("textbook", 200, seed=0)
    for field, size in [("audience", 10), ("style", 8), ("subtopic", 93)]:
        counts = Counter(p[field] for p in t[:size * 2])
        assert len(counts) == size and max(counts.values()) <= 4, field  # cycled evenly, not clumped
    assert len({p["seed"] for p in t}) == 200
    with pytest.raises(ValueError, match="kind must be one of"):
        build_prompts("novels", 1)


def test_split_exercise_and_reply_checks():
    reply = "Here you go:\n```python\n" + EXERCISE + "```\nEnjoy!"
    assert extract_code(reply) == EXERCISE and extract_code("def f(): pass") == "def f(): pass"
    parts, reason = split_exercise(extract_code(reply), "area")
    assert reason == "" and parts["exercise"].endswith('"""Return the area of a circle of radius r."""\n')
    assert parts["exercise"].startswith("import math") and parts["solution"].startswith("    if r < 0:")
    assert parts["exercise"] + parts["solution"] == parts["text"] and parts["tests"].startswith("assert area(0)")
    assert split_exercise("def f(:\n", None) == (None, "no_parse")
    assert split_exercise("def f(x):\n    return x\n", None) == (None, "no_docstring_function")
    assert split_exercise('def f(x):\n    """Doc."""\n', None) == (None, "no_solution")
    job = {"function_name": "area"}
    kept, reason = check_reply("exercises", job, reply, run_tests=True)
    assert reason == "" and kept["tests_passed"]
    broken = reply.replace("assert area(0) == 0", "assert area(0) == 1")
    failed, reason = check_reply("exercises", job, broken, run_tests=True)
    assert reason == "tests_failed" and "AssertionError" in failed["test_result"]
    no_tests = reply.split("assert")[0] + "print(area(2))\n```"
    assert check_reply("exercises", job, no_tests, run_tests=True)[1] == "no_tests"
    assert split_exercise(extract_code(no_tests))[0]["tests"] == ""
    assert check_reply("textbook", {}, "  \n")[1] == "empty"


def read_jsonl(path):
    return [json.loads(line) for line in open(path)] if os.path.exists(path) else []


def test_cli_killed_midway_then_rerun_loses_and_duplicates_nothing(tmp_path, repo_root):
    out = tmp_path / "ex.jsonl"
    faults = ["ok", "500", "ok", "429", "ok", "timeout", "malformed", "ok", "drop", "ok", "ok"]
    env = {**os.environ, "SYNTH_KEY": "sk-very-secret-42"}
    with FaultServer(faults, sleep=0.8, delay=0.05) as server:
        args = tool(repo_root, "exercises", "--base-url", server.url, "--model", "fake", "--output", out,
                    "--num", 40, "--seed", 7, "--concurrency", 4, "--timeout", 0.4, "--max-retries", 30,
                    "--backoff", 0.01, "--max-backoff", 0.1, "--api-key-env", "SYNTH_KEY", "--run-tests", "--no-progress")
        proc = subprocess.Popen(args, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        deadline = time.monotonic() + 60
        while len(read_jsonl(out)) + len(read_jsonl(rejected_path(str(out)))) < 8 and time.monotonic() < deadline:
            time.sleep(0.02)
        proc.send_signal(signal.SIGKILL)
        proc.communicate()
        first = {r["id"] for r in read_jsonl(out) + read_jsonl(rejected_path(str(out)))}
        assert 8 <= len(first) < 40, "killed too late to test resuming"
        result = subprocess.run(args, env=env, capture_output=True, text=True, timeout=120)
        assert result.returncode == 0, result.stderr
        assert server.auth == {"Bearer sk-very-secret-42"}
    assert "sk-very-secret" not in result.stdout + result.stderr
    kept, dropped = read_jsonl(out), read_jsonl(rejected_path(str(out)))
    ids = [r["id"] for r in kept + dropped]
    assert sorted(ids) == sorted(p["id"] for p in build_prompts("exercises", 40, 7))  # every prompt exactly once
    for r in kept:
        assert variant(r["prompt"]) >= 2 and r["tests_passed"] and r["text"] in canned(r["prompt"])
        assert r["usage"]["completion_tokens"] > 0 and r["function_name"] in r["exercise"]
    assert {r["reason"] for r in dropped if variant(r["prompt"]) == 0} <= {"tests_failed"}
    assert {r["reason"] for r in dropped if variant(r["prompt"]) == 1} <= {"no_parse"}
    assert len(dropped) == sum(variant(p["prompt"]) < 2 for p in build_prompts("exercises", 40, 7))
    summary = json.loads((tmp_path / "ex.jsonl.summary.json").read_text())
    assert summary["skipped"] == len(first) and summary["requested"] == 40 - len(first)
    assert summary["kept"] + sum(summary["dropped"].values()) == 40 - len(first) and summary["failed"] == 0
    assert summary["in_files"] == {"kept": len(kept), "rejected": len(dropped)} and summary["retries"]
    assert re.search(rf"already done \(skipped\) +{len(first)}\n", result.stdout)
    again = subprocess.run(args, env=env, capture_output=True, text=True, timeout=60)  # nothing left to do
    assert again.returncode == 0 and len(read_jsonl(out)) == len(kept) and re.search(r"requested +0\n", again.stdout)


def test_cli_bad_input_and_failures(tmp_path, cli, capsys):
    base = ["--model", "m", "--output", tmp_path / "o.jsonl", "--no-progress"]
    assert cli("textbook", "--base-url", "localhost:1", "--num", 2, *base) == 1
    assert "--base-url must start with http" in capsys.readouterr().err
    assert cli("textbook", "--base-url", "http://h/v1", "--num", 2, *base[:3], tmp_path / "o.parquet", "--quiet") == 1
    assert "o.parquet: results are appended as jsonl" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        cli("textbook", "--base-url", "http://h/v1", "--num", 2, "--concurrency", 0, *base)
    assert "--concurrency must be >= 1" in capsys.readouterr().err
    with FaultServer(["500"]) as server:
        assert cli("textbook", "--base-url", server.url, "--num", 3, "--max-retries", 1, "--backoff", 0.01, *base) == 1
    out = capsys.readouterr()
    assert "3 prompts failed after all retries" in out.err and re.search(r"failed \(rerun to retry\) +3\n", out.out)
    assert read_jsonl(tmp_path / "o.jsonl") == []
    with FaultServer(["400"]) as server:
        assert cli("textbook", "--base-url", server.url, "--num", 3, *base) == 1
    assert "answered 400" in capsys.readouterr().err


@pytest.fixture(scope="module")
def megaphi_server(tmp_path_factory, repo_root, megatron_fixtures):
    """The URL of tools/serve.py on a tiny random checkpoint with a 512-token context."""
    from megaphi.data.tokenizer import build_tokenizer
    from megaphi.hf import save_weights_checkpoint
    from megaphi.model import ModelConfig, PhiForCausalLM

    config = ModelConfig(vocab_size=8000, num_layers=2, hidden_size=64, num_attention_heads=4, ffn_hidden_size=128,
                         max_position_embeddings=512, rotary_dim=8, init_std=0.2)
    torch.manual_seed(0)
    tokenizer = build_tokenizer("sentencepiece", megatron_fixtures / "code8k.model")
    meta = {"config": {"data": {"tokenizer_type": "sentencepiece", "tokenizer_model": tokenizer.name}}}
    path = save_weights_checkpoint(tmp_path_factory.mktemp("synth") / "tiny", PhiForCausalLM(config).state_dict(),
                                   config, meta=meta)
    with serving([sys.executable, repo_root / "tools" / "serve.py", "--load", path.parent, "--port", "0",
                  "--device", "cpu", "--quiet"]) as (url, _):
        yield url


def test_real_megaphi_server_textbooks_are_seeded_and_counted(tmp_path, repo_root, cli, megaphi_server):
    def run(name, *extra):
        out = tmp_path / name
        args = ["textbook", "--base-url", megaphi_server, "--model", "tiny", "--output", out, "--num", 4, "--seed", 1,
                "--max-tokens", 12, "--concurrency", 2, "--timeout", 60, "--no-progress", *extra]
        if name == "a.jsonl":  # once as a real command line
            r = subprocess.run(tool(repo_root, *args), capture_output=True, text=True, timeout=120)
            assert r.returncode == 0, r.stderr
        else:
            assert cli(*args) == 0
        return read_jsonl(out) + read_jsonl(rejected_path(str(out))), json.loads(
            (tmp_path / f"{name}.summary.json").read_text())

    records, summary = run("a.jsonl")
    assert sorted(r["id"] for r in records) == [f"textbook-1-{i:07d}" for i in range(4)]
    assert all(r["model"] == "tiny" and 0 < r["usage"]["completion_tokens"] <= 12 for r in records)
    assert summary["requests"] == 4 and summary["retries"] == {}
    assert summary["completion_tokens"] == sum(r["usage"]["completion_tokens"] for r in records)
    assert summary["prompt_tokens"] == sum(r["usage"]["prompt_tokens"] for r in records) > 4 * 40
    again, _ = run("b.jsonl")  # the same prompts and request seeds: the same samples
    assert sorted((r["id"], r.get("text")) for r in again) == sorted((r["id"], r.get("text")) for r in records)
    chat, summary = run("c.jsonl", "--chat", "--limit", 1)
    assert len(chat) == 1 and summary["requested"] == 1 and chat[0]["usage"]["prompt_tokens"] > 40


def test_completion_style_exercises_are_the_header_plus_the_models_body():
    jobs = build_prompts("exercises", 3, seed=5, style="completion")
    assert all(j["id"].startswith("exercises-completion-5-") and j["stop"] for j in jobs)
    assert {j["id"] for j in jobs}.isdisjoint(j["id"] for j in build_prompts("exercises", 3, seed=5))
    job = jobs[0]
    fields, reason = check_reply("exercises", job, "    out = list(data)\n    return out[::-1]\n")
    assert reason == ""
    assert fields["exercise"] == job["prompt"] and fields["solution"] == "    out = list(data)\n    return out[::-1]\n"
    assert check_reply("exercises", job, "    return (data\n")[1] == "no_parse"
    cut, reason = check_reply("exercises", job, "    total = len(data)\n    return total\n    if (x\n")
    assert reason == "" and cut["solution"] == "    total = len(data)\n    return total\n"  # cut where it stopped
    with pytest.raises(ValueError, match="for exercises"):
        build_prompts("textbook", 1, style="completion")
