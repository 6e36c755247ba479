"""Resuming: in-process and after SIGKILL the losses equal an uninterrupted run's; SIGTERM saves; fine-tuning."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from megaphi.train import checkpoint as ckpt
from megaphi.train.config import parse_config
from megaphi.train.trainer import Trainer, train


@pytest.fixture
def data(write_token_dataset):
    return write_token_dataset(200)


def tiny_flags(data, *extra):
    """A tiny-preset run with dropout (so resuming must restore the RNG) and gradient accumulation."""
    return ["--preset", "tiny", "--data-path", data, "--micro-batch-size", "2", "--global-batch-size", "4",
            "--seq-length", "16", "--split", "90,10,0", "--eval-iters", "1", "--eval-interval", "3",
            "--hidden-dropout", "0.1", "--attention-dropout", "0.1", "--lr-warmup-iters", "2", "--log-interval", "1",
            *extra]


def test_resumed_run_matches_uninterrupted_run(data, tmp_path):
    n = 4
    full = train(parse_config(tiny_flags(data, "--train-iters", str(2 * n), "--save", str(tmp_path / "a"),
                                         "--save-interval", str(n))), progress=False)
    split = tiny_flags(data, "--train-iters", str(2 * n), "--save", str(tmp_path / "b"), "--load", str(tmp_path / "b"))
    first = train(parse_config(split + ["--exit-interval", str(n)]), progress=False)
    assert first.stop_reason == "exit-interval" and first.iteration == n
    second = train(parse_config(split), progress=False)
    assert list(second.losses) == list(range(n + 1, 2 * n + 1))
    assert {**first.losses, **second.losses} == full.losses  # bit-identical at every step
    assert {**first.valid_losses, **second.valid_losses} == full.valid_losses
    assert second.consumed_samples == full.consumed_samples == 2 * n * 4
    a, b = ckpt.load_model(tmp_path / "a"), ckpt.load_model(tmp_path / "b")
    for (name, pa), pb in zip(a.state_dict().items(), b.state_dict().values()):
        assert torch.equal(pa, pb), name
    # Dropout is really on, so the match needs the RNG state restored, not just the weights.
    a.train()
    ids = torch.randint(0, 500, (1, 16))
    assert not torch.equal(a(ids), a(ids))


def test_finetune_starts_fresh_and_resumes_from_its_own_checkpoints(data, tmp_path):
    pre = tmp_path / "pre"
    train(parse_config(tiny_flags(data, "--train-iters", "3", "--save", str(pre))), progress=False)
    pretrained = ckpt.load_model(pre)
    flags = tiny_flags(data, "--train-iters", "4", "--load", str(pre), "--save", str(tmp_path / "ft"), "--finetune",
                       "--lr", "1e-4", "--save-interval", "2")
    trainer = Trainer(parse_config(flags + ["--exit-interval", "2"]), progress=False)
    assert trainer.iteration == 0 and trainer.consumed == 0 and not trainer.optimizer.optimizer.state
    for (name, p), q in zip(trainer.model.state_dict().items(), pretrained.state_dict().values()):
        assert torch.equal(p, q), name
    assert trainer.run().iteration == 2
    resumed = Trainer(parse_config(flags), progress=False)  # interrupted fine-tuning continues from --save
    assert resumed.iteration == 2 and resumed.consumed == 8 and resumed.optimizer.optimizer.state
    assert list(resumed.run().losses) == [3, 4]


def script_cmd(script, data, save, iters, *extra):
    return [sys.executable, script, *tiny_flags(data, "--train-iters", str(iters), "--save", str(save),
                                                "--no-bf16", "--save-interval", "1", *extra)]


def subprocess_env():
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


def losses(path, kind="train", key="loss"):
    records = []
    for line in path.read_text().splitlines():
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:  # the line a killed run was writing
            continue
    return {r["iteration"]: r[key] for r in records if r["type"] == kind}


def wait_for(path, proc, timeout=120):
    deadline = time.time() + timeout
    while not path.exists():
        assert proc.poll() is None, f"training exited early:\n{proc.communicate()[0]}"
        assert time.time() < deadline, f"{path} did not appear"
        time.sleep(0.02)


@pytest.mark.slow
def test_sigkill_then_resume_matches_uninterrupted_run(data, tmp_path, repo_root):
    iters = 40
    script = "examples/pretrain_phi1.py"
    reference = subprocess.run(script_cmd(script, data, tmp_path / "ref", iters), cwd=repo_root, env=subprocess_env(),
                               capture_output=True, text=True, timeout=300)
    assert reference.returncode == 0, reference.stderr
    ref_losses = losses(tmp_path / "ref" / "metrics.jsonl")
    assert sorted(ref_losses) == list(range(1, iters + 1))

    save = tmp_path / "killed"
    cmd = script_cmd(script, data, save, iters, "--load", str(save), "--keep-last", "3")
    proc = subprocess.Popen(cmd, cwd=repo_root, env=subprocess_env(), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    try:
        wait_for(save / "latest", proc)
        time.sleep(0.1)  # somewhere in the next iterations: mid-step, mid-save or mid-log
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=60)
    finally:
        proc.kill()
    assert proc.returncode == -signal.SIGKILL
    killed_at = int(ckpt.read_meta(ckpt.find_checkpoint(save))["iteration"])
    assert killed_at < iters, "the run finished before the kill: make it longer"
    before = losses(save / "metrics.jsonl")
    assert before and all(before[i] == ref_losses[i] for i in before)

    resumed = subprocess.run(cmd, cwd=repo_root, env=subprocess_env(), capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr
    assert f"resumed from {save / ckpt.checkpoint_name(killed_at)}" in resumed.stdout
    assert losses(save / "metrics.jsonl") == ref_losses  # every iteration once, bit-identical
    assert losses(save / "metrics.jsonl", "valid", "valid_loss") == losses(tmp_path / "ref" / "metrics.jsonl",
                                                                           "valid", "valid_loss")
    assert [i for i, _ in ckpt.list_checkpoints(save)] == [iters - 2, iters - 1, iters]
    assert not [p for p in save.iterdir() if p.name.startswith(".tmp_")]


@pytest.mark.slow
def test_sigterm_saves_and_exits(data, tmp_path, repo_root):
    save = tmp_path / "term"
    proc = subprocess.Popen(script_cmd("examples/pretrain_phi1.py", data, save, 200, "--save-interval", "50"),
                            cwd=repo_root, env=subprocess_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True)
    try:
        wait_for(save / "metrics.jsonl", proc)
        while not losses(save / "metrics.jsonl"):
            time.sleep(0.02)
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=120)
    finally:
        proc.kill()
    assert proc.returncode == 0, out
    stopped_at = max(losses(save / "metrics.jsonl"))
    assert stopped_at < 200 and f"stopping at iteration {stopped_at} (signal)" in out
    assert (save / "latest").read_text().strip() == ckpt.checkpoint_name(stopped_at)


@pytest.mark.slow
def test_examples_under_torchrun_and_finetune(data, tmp_path, repo_root):
    torchrun = os.path.join(os.path.dirname(sys.executable), "torchrun")
    pre = tmp_path / "pre"
    run = subprocess.run([torchrun, "--standalone", "--nproc_per_node", "1",
                          *script_cmd("examples/pretrain_phi1.py", data, pre, 2)[1:]],
                         cwd=repo_root, env=subprocess_env(), capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    assert (pre / "latest").read_text().strip() == "iter_0000002"
    ft = tmp_path / "ft"
    run = subprocess.run(script_cmd("examples/finetune_phi1.py", data, ft, 2, "--load", str(pre)), cwd=repo_root,
                         env=subprocess_env(), capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    assert f"fine-tuning from {pre / 'iter_0000002'}" in run.stdout
    meta = ckpt.read_meta(ft / "iter_0000002")
    assert meta["config"]["optimizer"]["lr"] == 1e-4 and meta["config"]["training"]["global_batch_size"] == 4
    assert meta["config"]["optimizer"]["weight_decay"] == 0.01 and meta["config"]["checkpoint"]["finetune"]

    run = subprocess.run(script_cmd("examples/pretrain_phi1.py", data, tmp_path / "x", 2), cwd=repo_root,
                         env={**subprocess_env(), "WORLD_SIZE": "2", "RANK": "0"}, capture_output=True, text=True,
                         timeout=300)
    assert run.returncode == 2  # a half-set launch environment: one clear line, no traceback
    assert "WORLD_SIZE=2" in run.stderr and "MASTER_ADDR/MASTER_PORT unset" in run.stderr
    assert "Traceback" not in run.stderr
