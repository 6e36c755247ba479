"""Training metrics: interval statistics, the log line, metrics.jsonl, TensorBoard and the progress bar."""

import contextlib
import json
import math
import os
import sys
import time
from pathlib import Path
from typing import Any

import torch

METRICS_FILE = "metrics.jsonl"


def device_peak_tflops(device: torch.device, override: float | None) -> float | None:
    """Peak TFLOP/s of one device: --peak-tflops, else the known-GPU table (CPU: unknown)."""
    if override is not None:
        return override
    if device.type != "cuda":
        return None
    from megaphi.model.flops import peak_tflops

    return peak_tflops(torch.cuda.get_device_name(device))


def finite_or_none(value: float | None) -> float | None:
    """value, or None when it is NaN/inf (JSON has no NaN)."""
    return value if value is not None and math.isfinite(value) else None


class IntervalMeter:
    """Accumulates losses, tokens, skipped steps and time between two log lines."""

    def __init__(self):
        self.reset()

    def reset(self) -> None:
        """Starts a new interval now."""
        self.losses: list[float] = []
        self.iterations = 0
        self.tokens = 0
        self.skipped = 0
        self.start = time.perf_counter()

    @contextlib.contextmanager
    def paused(self):
        """Time spent inside (validation, checkpointing) is left out of the interval, as Megatron's timers do."""
        start = time.perf_counter()
        try:
            yield
        finally:
            self.start += time.perf_counter() - start

    def add(self, loss: float, tokens: int, skipped: bool) -> None:
        """Records one optimizer step."""
        self.iterations += 1
        self.tokens += tokens
        self.skipped += int(skipped)
        if math.isfinite(loss) and not skipped:  # as Megatron: a skipped step's loss stays out of the average
            self.losses.append(loss)

    def summary(self, flops_per_token: float, world_size: int, peak: float | None) -> dict[str, Any]:
        """Mean loss (steps not skipped), tokens/s, TFLOP/s per device, MFU and skipped steps of the interval."""
        elapsed = max(time.perf_counter() - self.start, 1e-9)
        tokens_per_s = self.tokens / elapsed
        tflops = tokens_per_s * flops_per_token / world_size / 1e12
        return {
            "loss": sum(self.losses) / len(self.losses) if self.losses else None,
            "tokens_per_s": tokens_per_s,
            "tflops_per_device": tflops,
            "mfu": tflops / peak if peak else None,
            "skipped_steps": self.skipped,
            "s_per_iter": elapsed / max(self.iterations, 1),
        }


def format_line(record: dict[str, Any], train_iters: int) -> str:
    """The human-readable log line of one train record."""
    width = len(str(train_iters))
    loss = record.get("loss")
    parts = [
        f"iteration {record['iteration']:>{width}}/{train_iters}",
        f"loss {loss:.4f}" if loss is not None else "loss nan",
        f"lr {record['lr']:.3e}",
        f"grad norm {record['grad_norm']:.3f}" if record.get("grad_norm") is not None else "grad norm nan",
        f"tokens/s {record['tokens_per_s']:.0f}",
        f"TFLOP/s/device {record['tflops_per_device']:.2f}",
    ]
    if record.get("mfu") is not None:
        parts.append(f"MFU {100 * record['mfu']:.1f}%")
    parts.append(f"skipped {record['skipped_steps']}")
    if record.get("loss_scale") is not None:
        parts.append(f"loss scale {record['loss_scale']:g}")
    return " | ".join(parts)


def truncate_records(path: Path, last_iteration: int) -> None:
    """Drops records after last_iteration (and any torn last line) from a metrics.jsonl, atomically."""
    if not path.is_file():
        return
    kept = []
    for line in path.read_text().splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(record, dict) and record.get("iteration", 0) <= last_iteration:
            kept.append(line)
    tmp = path.with_name(f".tmp_{path.name}.{os.getpid()}")
    tmp.write_text("".join(line + "\n" for line in kept))
    os.replace(tmp, path)


class MetricsLogger:
    """Writes log lines to stdout, records to metrics.jsonl and scalars to TensorBoard (rank 0 only)."""

    def __init__(self, log_dir: str | Path | None, start_iteration: int, train_iters: int, enabled: bool = True,
                 progress: bool | None = None):
        self.enabled = enabled
        self.train_iters = train_iters
        self.file = None
        self.writer = None
        self.bar = None
        if not enabled:
            return
        if log_dir is not None:
            log_dir = Path(log_dir)
            log_dir.mkdir(parents=True, exist_ok=True)
            self.path = log_dir / METRICS_FILE
            # A resumed run replays the iterations after its checkpoint: drop their old records and events,
            # so the files read as one continuous run.
            truncate_records(self.path, start_iteration)
            self.file = open(self.path, "a")
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(str(log_dir), purge_step=start_iteration + 1 if start_iteration else None)
        if progress is None:
            progress = sys.stdout.isatty()
        if progress:
            from tqdm import tqdm

            self.bar = tqdm(total=train_iters, initial=start_iteration, desc="train", unit="it", dynamic_ncols=True)

    def print(self, text: str) -> None:
        """Prints a line without breaking the progress bar."""
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.write(text)
        else:
            print(text, flush=True)

    def _write(self, record: dict[str, Any]) -> None:
        if self.file is not None:
            self.file.write(json.dumps(record) + "\n")
            self.file.flush()

    def step(self, iteration: int, loss: float) -> None:
        """Advances the progress bar by one iteration."""
        if self.bar is not None:
            self.bar.update(1)
            self.bar.set_postfix(loss=f"{loss:.4f}", refresh=False)

    def log_train(self, record: dict[str, Any]) -> None:
        """Logs one train record (iteration, loss, lr, grad_norm, tokens_per_s, ...)."""
        if not self.enabled:
            return
        record = {"type": "train", **{k: finite_or_none(v) if isinstance(v, float) else v for k, v in record.items()}}
        self.print(format_line(record, self.train_iters))
        self._write(record)
        if self.writer is not None:
            for key, value in record.items():
                if key not in ("type", "iteration") and isinstance(value, (int, float)) and value is not None:
                    self.writer.add_scalar(f"train/{key}", value, record["iteration"])
            self.writer.flush()

    def log_eval(self, iteration: int, split: str, loss: float) -> None:
        """Logs a validation (or test) loss as its own record."""
        if not self.enabled:
            return
        ppl = math.exp(min(loss, 50.0)) if math.isfinite(loss) else None
        record = {"type": split, "iteration": iteration, f"{split}_loss": finite_or_none(loss), f"{split}_ppl": ppl}
        ppl_text = f"{ppl:.3f}" if ppl is not None else "nan"
        self.print(f"{split} loss at iteration {iteration}: {loss:.4f} | {split} ppl {ppl_text}")
        self._write(record)
        if self.writer is not None:
            self.writer.add_scalar(f"{split}/loss", loss, iteration)
            if ppl is not None:
                self.writer.add_scalar(f"{split}/ppl", ppl, iteration)
            self.writer.flush()

    def log_scalars(self, iteration: int, kind: str, values: dict[str, float]) -> None:
        """Logs named scalars (e.g. code-eval pass@1) as one record of type kind."""
        if not self.enabled or not values:
            return
        self.print(f"{kind} at iteration {iteration}: " + " | ".join(f"{k} {v:.4f}" for k, v in values.items()))
        self._write({"type": kind, "iteration": iteration, **values})
        if self.writer is not None:
            for key, value in values.items():
                self.writer.add_scalar(f"{kind}/{key}", value, iteration)
            self.writer.flush()

    def close(self) -> None:
        """Flushes and closes the files and the progress bar."""
        if self.bar is not None:
            self.bar.close()
            self.bar = None
        if self.file is not None:
            self.file.close()
            self.file = None
        if self.writer is not None:
            self.writer.close()
            self.writer = None
