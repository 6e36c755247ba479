"""Training metrics: metrics.jsonl records, TensorBoard events, resume truncation and the plotting tool."""

import json
import subprocess
import sys
import time

import pytest

from megaphi.model import flops_per_token, get_preset
from megaphi.train.config import parse_config
from megaphi.train.metrics import IntervalMeter, format_line
from megaphi.train.trainer import train


@pytest.fixture
def data(write_token_dataset):
    return write_token_dataset(80)


def run_config(data, *extra):
    return parse_config(["--preset", "tiny", "--data-path", data, "--train-iters", "6", "--micro-batch-size", "2",
                         "--global-batch-size", "4", "--seq-length", "16", "--split", "80,20,0", "--eval-iters", "1",
                         "--eval-interval", "3", "--log-interval", "2", *extra])


def read_records(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_metrics_jsonl_and_tensorboard(data, tmp_path, capsys):
    save = tmp_path / "ckpt"
    result = train(run_config(data, "--save", str(save), "--peak-tflops", "0.5"), progress=False)
    records = read_records(save / "metrics.jsonl")
    trains = [r for r in records if r["type"] == "train"]
    valids = [r for r in records if r["type"] == "valid"]
    assert [r["iteration"] for r in trains] == [2, 4, 6]
    for r in trains:
        assert {"iteration", "loss", "lr", "grad_norm", "tokens_per_s", "tflops_per_device", "mfu",
                "skipped_steps", "consumed_samples"} <= set(r)
        assert r["tokens_per_s"] > 0 and r["grad_norm"] > 0 and r["skipped_steps"] == 0
        assert r["mfu"] == pytest.approx(r["tflops_per_device"] / 0.5)
        expected = r["tokens_per_s"] * flops_per_token(get_preset("tiny"), 16) / 1e12
        assert r["tflops_per_device"] == pytest.approx(expected)
    # The logged loss is the mean over the interval's iterations.
    assert trains[0]["loss"] == pytest.approx((result.losses[1] + result.losses[2]) / 2)
    assert trains[2]["consumed_samples"] == 24
    assert [r["iteration"] for r in valids] == [3, 6]
    assert valids[1]["valid_loss"] == pytest.approx(result.valid_losses[6])
    out = capsys.readouterr().out
    assert "iteration 2/6 | loss" in out and "MFU" in out and "valid loss at iteration 3" in out

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = list(save.glob("events.out.tfevents.*"))
    assert events
    acc = EventAccumulator(str(save))
    acc.Reload()
    tags = acc.Tags()["scalars"]
    assert {"train/loss", "train/lr", "train/grad_norm", "train/tokens_per_s", "valid/loss"} <= set(tags)
    assert [e.step for e in acc.Scalars("train/loss")] == [2, 4, 6]


def test_no_mfu_on_cpu_without_peak_and_log_dir_override(data, tmp_path, capsys):
    save, logs = tmp_path / "ckpt", tmp_path / "logs"
    train(run_config(data, "--save", str(save), "--log-dir", str(logs)), progress=False)
    assert not (save / "metrics.jsonl").exists() and (logs / "metrics.jsonl").exists()
    assert list(logs.glob("events.out.tfevents.*"))
    trains = [r for r in read_records(logs / "metrics.jsonl") if r["type"] == "train"]
    assert all(r["mfu"] is None for r in trains)
    assert "MFU" not in capsys.readouterr().out


def test_resume_rewrites_records_after_the_checkpoint(data, tmp_path):
    save = tmp_path / "ckpt"
    train(run_config(data, "--save", str(save), "--save-interval", "3", "--log-interval", "1"), progress=False)
    # Resuming from iteration 3 replays 4..6: their old records are dropped (and a torn last line too).
    with open(save / "metrics.jsonl", "a") as f:
        f.write('{"type": "train", "iterat')
    train(run_config(data, "--save", str(save), "--log-interval", "1", "--load", str(save), "--ckpt-step", "3"),
          progress=False)
    records = read_records(save / "metrics.jsonl")
    assert [r["iteration"] for r in records if r["type"] == "train"] == [1, 2, 3, 4, 5, 6]
    assert [r["iteration"] for r in records if r["type"] == "valid"] == [3, 6]


def test_format_line():
    line = format_line({"iteration": 7, "loss": 2.5, "lr": 1e-3, "grad_norm": 0.5, "tokens_per_s": 1234.4,
                        "tflops_per_device": 1.5, "mfu": 0.25, "skipped_steps": 1, "loss_scale": 1024.0}, 100)
    assert line == ("iteration   7/100 | loss 2.5000 | lr 1.000e-03 | grad norm 0.500 | tokens/s 1234 | "
                    "TFLOP/s/device 1.50 | MFU 25.0% | skipped 1 | loss scale 1024")


def test_plot_metrics_writes_png(data, tmp_path, repo_root):
    save = tmp_path / "ckpt"
    train(run_config(data, "--save", str(save)), progress=False)
    out = tmp_path / "plots"
    proc = subprocess.run([sys.executable, "tools/plot_metrics.py", str(save / "metrics.jsonl"), "--output", str(out)],
                          cwd=repo_root, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    import matplotlib.image

    for name in ("loss.png", "throughput.png"):
        path = out / name
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        height, width, _ = matplotlib.image.imread(path).shape
        assert height > 100 and width > 100
    proc = subprocess.run([sys.executable, "tools/plot_metrics.py", str(tmp_path / "none.jsonl"), "--output", str(out)],
                          cwd=repo_root, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1 and "none.jsonl: metrics file not found" in proc.stderr


def test_progress_bar_keeps_log_lines(data, tmp_path, capsys):
    train(run_config(data, "--save", str(tmp_path / "ckpt")), progress=True)
    captured = capsys.readouterr()
    assert "train: 100%" in captured.err and "6/6" in captured.err
    assert "iteration 6/6 | loss" in captured.out and "saved checkpoint" in captured.out


def test_throughput_excludes_validation_and_checkpoint_time(data, tmp_path, monkeypatch):
    # As Megatron stops its interval timer around evaluation and saving: a slow validation or save must not show
    # up as a throughput drop in the next log line.
    from megaphi.train.trainer import Trainer

    def slow(real):
        def wrapper(*args, **kwargs):
            time.sleep(1.0)
            return real(*args, **kwargs)
        return wrapper

    monkeypatch.setattr(Trainer, "evaluate", slow(Trainer.evaluate))
    monkeypatch.setattr(Trainer, "save", slow(Trainer.save))
    save = tmp_path / "ckpt"
    train(run_config(data, "--save", str(save), "--log-interval", "1", "--eval-interval", "1", "--save-interval", "1",
                     "--train-iters", "3"), progress=False)
    trains = [r for r in read_records(save / "metrics.jsonl") if r["type"] == "train"]
    assert [r["iteration"] for r in trains] == [1, 2, 3]
    assert all(r["s_per_iter"] < 0.9 for r in trains), [r["s_per_iter"] for r in trains]


def test_plot_metrics_of_a_killed_run_skips_its_torn_last_line(tmp_path):
    from megaphi.train.plots import plot_metrics

    path = tmp_path / "metrics.jsonl"
    records = [{"type": "train", "iteration": i, "loss": 5.0 - i, "tokens_per_s": 100.0} for i in (1, 2)]
    path.write_text("".join(json.dumps(r) + "\n" for r in records) + '{"type": "train", "iterat')
    assert [p.name for p in plot_metrics(path, tmp_path / "plots")] == ["loss.png", "throughput.png"]
    path.write_text('{"type": "train", "iterat\n' + json.dumps(records[0]) + "\n")
    with pytest.raises(ValueError, match=r"metrics.jsonl:1: not a JSON record"):
        plot_metrics(path, tmp_path / "plots")


def test_interval_loss_leaves_out_skipped_steps():
    meter = IntervalMeter()
    meter.add(2.0, tokens=10, skipped=False)
    meter.add(9.0, tokens=10, skipped=True)  # finite loss, but its gradients overflowed: the step was not taken
    meter.add(4.0, tokens=10, skipped=False)
    summary = meter.summary(flops_per_token=1.0, world_size=1, peak=None)
    assert summary["loss"] == 3.0
    assert summary["skipped_steps"] == 1
