"""Optimizer, learning-rate schedule, gradient clipping and fp16 loss scaling."""

import json
import math

import numpy as np
import pytest
import torch

from megaphi.data.indexed_dataset import IndexedDatasetBuilder
from megaphi.model import PhiForCausalLM, get_preset
from megaphi.train.config import parse_config
from megaphi.train.optim import LRSchedule, build_optimizer, clip_grad_norm, param_groups
from megaphi.train.precision import LossScaler
from megaphi.train.trainer import Trainer


def test_warmup_then_cosine_endpoints():
    schedule = LRSchedule(max_lr=1e-3, min_lr=1e-4, warmup_iters=10, decay_iters=110, style="cosine")
    assert schedule(1) == pytest.approx(1e-4)  # the first step is not wasted at lr 0
    assert schedule(5) == pytest.approx(5e-4)
    assert schedule(10) == pytest.approx(1e-3)  # warmup ends at the peak
    assert schedule(60) == pytest.approx(1e-4 + 0.5 * 9e-4)  # halfway: cos(pi/2) = 0
    assert schedule(35) == pytest.approx(1e-4 + 0.5 * (1 + math.cos(math.pi / 4)) * 9e-4)
    assert schedule(110) == pytest.approx(1e-4)  # decay reaches min-lr at --lr-decay-iters
    assert schedule(500) == pytest.approx(1e-4)  # and stays there
    values = [schedule(i) for i in range(10, 111)]
    assert all(a >= b for a, b in zip(values, values[1:]))


def test_linear_and_constant_decay():
    linear = LRSchedule(max_lr=2.0, min_lr=0.0, warmup_iters=0, decay_iters=100, style="linear")
    assert linear(1) == pytest.approx(2.0 * 99 / 100)
    assert linear(50) == pytest.approx(1.0)
    assert linear(100) == 0.0
    constant = LRSchedule(max_lr=2.0, min_lr=0.0, warmup_iters=4, decay_iters=100, style="constant")
    assert [constant(i) for i in (1, 4, 5, 1000)] == pytest.approx([0.5, 2.0, 2.0, 2.0])
    with pytest.raises(ValueError, match="--lr-decay-style"):
        LRSchedule(1.0, 0.0, 0, 10, "exponential")


def test_no_weight_decay_on_biases_and_norms():
    model = PhiForCausalLM(get_preset("tiny"))
    decay, no_decay = param_groups(model, 0.1)
    names = {id(p): n for n, p in model.named_parameters()}
    decayed = {names[id(p)] for p in decay["params"]}
    not_decayed = {names[id(p)] for p in no_decay["params"]}
    assert not_decayed and all(n.endswith("bias") or "layernorm" in n for n in not_decayed)
    assert all(n.endswith("weight") and "layernorm" not in n for n in decayed)
    assert "model.embed_tokens.weight" in decayed and "lm_head.weight" in decayed
    assert len(decayed) + len(not_decayed) == len(list(model.parameters()))

    # With zero gradients, AdamW's only change is the decoupled decay: p -= lr * wd * p on 2-D weights only.
    optimizer = build_optimizer(model, lr=0.1, weight_decay=0.5, betas=(0.9, 0.95), eps=1e-8)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.5)  # make biases and norm bias non-zero so a wrong decay would show
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    optimizer.step()
    for name, p in model.named_parameters():
        expected = before[name] * (1 - 0.1 * 0.5) if name in decayed else before[name]
        torch.testing.assert_close(p.detach(), expected, rtol=1e-6, atol=1e-7, msg=name)


def test_clip_grad_norm_returns_the_norm_and_clips():
    a, b = torch.nn.Parameter(torch.zeros(3)), torch.nn.Parameter(torch.zeros(2, 2))
    a.grad = torch.tensor([3.0, 0.0, 0.0])
    b.grad = torch.tensor([[0.0, 4.0], [0.0, 0.0]])
    norm = clip_grad_norm([a, b], max_norm=1.0)
    assert float(norm) == pytest.approx(5.0)
    total = torch.sqrt(a.grad.square().sum() + b.grad.square().sum())
    assert float(total) == pytest.approx(1.0, rel=1e-5)
    assert float(clip_grad_norm([a, b], max_norm=0.0)) == pytest.approx(1.0, rel=1e-5)  # 0: measure only
    b.grad[0, 0] = float("inf")
    assert not torch.isfinite(clip_grad_norm([a, b], max_norm=1.0))
    assert float(a.grad[0]) == pytest.approx(0.6, rel=1e-5)  # untouched: the caller skips the step


def test_dynamic_loss_scaler_backoff_growth_and_state():
    scaler = LossScaler(2.0**16, dynamic=True, min_scale=1.0, window=3, hysteresis=2)
    scaler.update(found_inf=True)
    assert scaler.scale == 2.0**16  # hysteresis: the first overflow is tolerated
    scaler.update(found_inf=True)
    assert scaler.scale == 2.0**15
    scaler.update(found_inf=True)
    assert scaler.scale == 2.0**14  # further overflows halve at once until the scale grows again
    for _ in range(3):
        scaler.update(found_inf=False)
    assert scaler.scale == 2.0**15
    state = scaler.state_dict()
    other = LossScaler(1.0, dynamic=True, window=3, hysteresis=2)
    other.load_state_dict(state)
    assert other.state_dict() == state
    tiny = LossScaler(2.0, dynamic=True, min_scale=1.0, window=10, hysteresis=1)
    for _ in range(5):
        tiny.update(found_inf=True)
    assert tiny.scale == 1.0  # never below --min-loss-scale


def fp16_trainer(tmp_path, initial_scale: float) -> Trainer:
    rng = np.random.default_rng(0)
    prefix = tmp_path / "data"
    if not (tmp_path / "data.idx").exists():
        with IndexedDatasetBuilder(prefix, dtype=np.uint16) as builder:
            for _ in range(40):
                builder.add_document([rng.integers(0, 500, size=40)])
    logs = tmp_path / f"logs{initial_scale:g}"
    config = parse_config(["--preset", "tiny", "--data-path", str(prefix), "--train-iters", "3",
                           "--micro-batch-size", "2", "--global-batch-size", "2", "--seq-length", "16",
                           "--split", "100,0,0", "--eval-iters", "0", "--fp16", "--initial-loss-scale",
                           str(initial_scale), "--hysteresis", "1", "--log-interval", "1", "--log-dir", str(logs)])
    return Trainer(config, progress=False)


def test_fp16_run_skips_steps_with_inf_gradients(tmp_path):
    # A scale of 2^127 turns the scaled loss (~6 x 2^127) into inf: every step overflows, is skipped and
    # counted, and the scale halves each time (hysteresis 1); the weights never change.
    trainer = fp16_trainer(tmp_path, 2.0**127)
    initial = {n: p.detach().clone() for n, p in trainer.model.named_parameters()}
    result = trainer.run()
    assert result.skipped_steps == 3 and result.iteration == 3
    assert all(math.isfinite(loss) for loss in result.losses.values())
    for name, p in trainer.model.named_parameters():
        assert torch.equal(p, initial[name]), f"{name} changed in a skipped step"
    records = [json.loads(line) for line in (tmp_path / "logs1.70141e+38" / "metrics.jsonl").read_text().splitlines()]
    assert [r["skipped_steps"] for r in records] == [1, 1, 1]
    assert [r["loss_scale"] for r in records] == [2.0**126, 2.0**125, 2.0**124]
    assert all(r["grad_norm"] is None for r in records)  # inf is not valid JSON: written as null

    # A sane scale: no step is skipped and the weights move.
    trainer = fp16_trainer(tmp_path, 1024.0)
    initial = {n: p.detach().clone() for n, p in trainer.model.named_parameters()}
    result = trainer.run()
    assert result.skipped_steps == 0
    assert all(not torch.equal(p, initial[n]) for n, p in trainer.model.named_parameters() if p.ndim == 2)


def small_run(tmp_path, *extra):
    prefix = tmp_path / "data"
    if not (tmp_path / "data.idx").exists():
        rng = np.random.default_rng(1)
        with IndexedDatasetBuilder(prefix, dtype=np.uint16) as builder:
            for _ in range(40):
                builder.add_document([rng.integers(0, 500, size=40)])
    config = parse_config(["--preset", "tiny", "--data-path", str(prefix), "--train-iters", "3",
                           "--micro-batch-size", "1", "--global-batch-size", "2", "--seq-length", "16",
                           "--split", "100,0,0", "--eval-iters", "0", "--lr-decay-style", "constant", *extra])
    trainer = Trainer(config, progress=False)
    return trainer, trainer.run()


def test_bf16_keeps_fp32_master_weights_and_tracks_fp32(tmp_path):
    fp32_trainer, fp32 = small_run(tmp_path)
    trainer, bf16 = small_run(tmp_path, "--bf16")
    assert all(p.dtype == torch.float32 for p in trainer.model.parameters())
    assert all(t.dtype == torch.float32 for s in trainer.optimizer.optimizer.state.values() for t in s.values() if t.ndim)
    assert bf16.losses != fp32.losses  # the forward really ran in bf16...
    for step in fp32.losses:  # ...and stays close to fp32
        assert bf16.losses[step] == pytest.approx(fp32.losses[step], abs=0.05)


def test_recompute_activations_gives_the_same_training(tmp_path):
    _, plain = small_run(tmp_path)
    trainer, recomputed = small_run(tmp_path, "--recompute-activations")
    assert trainer.model.model.activation_checkpointing
    assert recomputed.losses == pytest.approx(plain.losses, rel=1e-6)
