"""The training loop: gradient accumulation to the global batch, validation, checkpoints, logging, signals."""

import contextlib
import dataclasses
import random
import signal
import sys
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import numpy as np
import torch

from megaphi.model import PhiForCausalLM, flops_per_token, num_parameters
from megaphi.parallel.data_parallel import build_parallel_optimizer
from megaphi.parallel.groups import check_layout
from megaphi.parallel.random import get_tracker
from megaphi.train import checkpoint as ckpt
from megaphi.train.checks import (check_checkpoint_model, check_data_vocab, global_batch_size,
                                  resolve_model_config, validate_config)
from megaphi.train.config import TrainConfig, parse_config
from megaphi.train.distributed import (ParallelContext, agree_on_stop, parallelize, select_device,
                                       setup_distributed)
from megaphi.parallel.launch import destroy_distributed
from megaphi.train.metrics import IntervalMeter, MetricsLogger, device_peak_tflops
from megaphi.train.optim import LRSchedule, set_lr
from megaphi.train.precision import autocast, autocast_dtype, build_loss_scaler


@dataclass
class TrainResult:
    """What one call of train() did."""

    iteration: int
    """Iterations completed in total (including those before a resume)."""
    consumed_samples: int
    """Training samples consumed in total."""
    losses: dict[int, float] = field(default_factory=dict)
    """Training loss of each iteration run in this call."""
    valid_losses: dict[int, float] = field(default_factory=dict)
    """Validation loss by iteration."""
    test_loss: float | None = None
    """Test loss at the end of training (when the test split has samples)."""
    skipped_steps: int = 0
    """Steps skipped in this call for inf/nan gradients."""
    stop_reason: str = "done"
    """done, exit-interval or signal."""
    checkpoint: str | None = None
    """The last checkpoint written."""


def seed_everything(seed: int) -> None:
    """Seeds python, numpy and torch (CPU and CUDA)."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def batch_indices(consumed: int, global_batch: int, dp_rank: int = 0, dp_size: int = 1) -> range:
    """Sample indices of one data-parallel rank's contiguous share of the global batch starting at `consumed`."""
    per_rank = global_batch // dp_size
    start = consumed + dp_rank * per_rank
    return range(start, start + per_rank)


def micro_batches(dataset, indices: range, micro_batch_size: int,
                  device: torch.device) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """(input_ids, labels) micro batches: labels are the inputs shifted by one token."""
    for start in range(0, len(indices), micro_batch_size):
        tokens = np.stack([dataset[i] for i in indices[start : start + micro_batch_size]]).astype(np.int64)
        tokens = torch.from_numpy(tokens)
        if device.type == "cuda":
            tokens = tokens.pin_memory().to(device, non_blocking=True)
        yield tokens[:, :-1], tokens[:, 1:]


class Trainer:
    """Builds everything from a TrainConfig (validating it first), resumes, and runs the loop."""

    def __init__(self, config: TrainConfig, ctx: ParallelContext | None = None, progress: bool | None = None):
        self.config = config
        self.ctx = ctx or setup_distributed(config.parallel)
        self.progress = progress
        self.logger: MetricsLogger | None = None
        validate_config(config, self.ctx.dp_size)
        self.global_batch = global_batch_size(config, self.ctx.dp_size)
        self.model_config = resolve_model_config(config, self._tokenizer_vocab_size())
        self.seq_length = config.training.seq_length or self.model_config.max_position_embeddings
        check_layout(self.model_config, self.ctx.tp_size, self.ctx.world_size,
                     sequence_parallel=self.ctx.sequence_parallel, seq_length=self.seq_length)
        check_data_vocab(config, self.model_config)
        if config.model.kernels is not None:
            from megaphi import kernels

            try:
                kernels.set_backend(config.model.kernels)
            except ValueError as e:
                raise ValueError(f"--kernels: {e}") from None
        self.device = select_device(self.ctx)
        self.train_ds, self.valid_ds, self.test_ds = self._build_datasets()  # rank 0 builds the index caches first
        self.load_path, self.load_full = self._checkpoint_to_load()
        if self.load_path is not None:  # before building the model: a phi-1 takes a while to initialise
            check_checkpoint_model(self.load_path, self.model_config)
        self._build_model_and_optimizer()
        self.iteration, self.consumed = 0, 0
        self._resume()
        self.code_eval = self._build_code_eval()

    def _print(self, text: str) -> None:
        if self.logger is not None:
            self.logger.print(text)  # keeps the progress bar intact
        elif self.ctx.is_main:
            print(text, flush=True)

    def _tokenizer_vocab_size(self) -> int | None:
        d = self.config.data
        if d.tokenizer_type is None:
            return None
        from megaphi.data.tokenizer import build_tokenizer

        try:
            return build_tokenizer(d.tokenizer_type, d.tokenizer_model).vocab_size
        except ValueError as e:
            raise ValueError(f"--tokenizer-type {d.tokenizer_type} --tokenizer-model {d.tokenizer_model}: "
                             f"{e}") from None

    def _build_datasets(self):
        from megaphi.data.gpt_dataset import build_train_valid_test_datasets

        t, log = self.config.training, self.config.logging
        n_train = t.train_iters * self.global_batch
        n_eval = log.eval_iters * self.global_batch
        train, valid, test = build_train_valid_test_datasets(
            data_path=self.config.data.data_path, split=self.config.data.split, seq_length=self.seq_length,
            seed=t.seed, num_samples=(n_train, n_eval, n_eval), cache_dir=self.config.data.data_cache_path)
        if train is None or len(train) < n_train:
            have = 0 if train is None else len(train)
            raise ValueError(f"--split {self.config.data.split}: the train split gives {have} samples, "
                             f"{n_train} needed (--train-iters × --global-batch-size)")
        for name, ds in (("valid", valid), ("test", test)):
            if n_eval and ds is not None and len(ds) < n_eval:
                raise ValueError(f"--split {self.config.data.split}: the {name} split gives {len(ds)} samples, "
                                 f"{n_eval} needed (--eval-iters × --global-batch-size)")
        if n_eval and valid is None:
            self._print(f"note: --split {self.config.data.split} leaves no validation documents: no validation")
        return train, (valid if n_eval else None), (test if n_eval else None)

    def _build_model_and_optimizer(self) -> None:
        c = self.config
        seed_everything(c.training.seed)
        # The full model is initialised on the CPU from the seed, then each rank keeps its tensor-parallel shard:
        # the same starting weights at any device and any layout.
        model = PhiForCausalLM(self.model_config)
        model.set_activation_checkpointing(c.model.recompute_activations)
        self.model = parallelize(model, self.ctx, c.training.seed).to(self.device)
        o, s, par = c.optimizer, c.schedule, c.parallel
        self.optimizer = build_parallel_optimizer(
            self.model, self.ctx, o.lr, o.weight_decay, (o.adam_beta1, o.adam_beta2), o.adam_eps,
            distributed_optimizer=par.use_distributed_optimizer, bucket_size_mb=par.ddp_bucket_size_mb)
        decay_iters = s.lr_decay_iters if s.lr_decay_iters is not None else c.training.train_iters
        self.schedule = LRSchedule(o.lr, s.min_lr, s.lr_warmup_iters, decay_iters, s.lr_decay_style)
        p = c.precision
        self.amp_dtype = autocast_dtype(p.bf16, p.fp16)
        self.scaler = build_loss_scaler(p.fp16, p.loss_scale, p.initial_loss_scale, p.min_loss_scale,
                                        p.loss_scale_window, p.hysteresis)

    def _checkpoint_to_load(self) -> tuple[Path | None, bool]:
        """The checkpoint to start from (or None), and whether to resume it in full (else fine-tune its weights)."""
        c = self.config.checkpoint
        own = ckpt.find_checkpoint(c.save) if c.finetune and c.save else None
        if own is not None and ckpt.read_meta(own).get("config", {}).get("checkpoint", {}).get("finetune"):
            return own, True  # an interrupted fine-tuning run continues from its own checkpoints
        if c.load is None:
            return None, False
        return ckpt.find_checkpoint(c.load, c.ckpt_step), not c.finetune

    def _resume(self) -> None:
        path, c = self.load_path, self.config.checkpoint
        if path is None:
            if c.load is not None:
                self._print(f"note: --load {c.load} holds no checkpoint yet: starting from scratch")
        elif self.load_full:
            self._load_full(path)
        else:
            ckpt.load_model_state(path, self.model, self.ctx)
            self._print(f"fine-tuning from {path}: weights only, fresh optimizer, iteration 0")

    def _load_full(self, path: Path) -> None:
        meta, extra = ckpt.load_checkpoint(path, self.model, self.optimizer, load_rng=True, ctx=self.ctx)
        if "rng_extra" in extra:
            get_tracker().set_state(extra["rng_extra"])
        if "loss_scaler" in extra:
            self.scaler.load_state_dict(extra["loss_scaler"])
        self.iteration, self.consumed = int(meta["iteration"]), int(meta["consumed_samples"])
        self._print(f"resumed from {path}: iteration {self.iteration}, {self.consumed} samples consumed")
        remaining = max(self.config.training.train_iters - self.iteration, 0) * self.global_batch
        if self.consumed + remaining > len(self.train_ds):
            raise ValueError(f"--load {path}: {self.consumed} samples consumed + {remaining} to go exceed the "
                             f"{len(self.train_ds)} training samples; was --global-batch-size or --train-iters "
                             f"changed since the checkpoint?")

    def train_step(self) -> tuple[float, float, bool]:
        """One optimizer step over the next global batch: (loss, grad norm, skipped for inf/nan gradients)."""
        self.model.train()
        self.optimizer.zero_grad()
        indices = batch_indices(self.consumed, self.global_batch, self.ctx.dp_rank, self.ctx.dp_size)
        n_micro = len(indices) // self.config.training.micro_batch_size
        total = torch.zeros((), device=self.device)
        batches = micro_batches(self.train_ds, indices, self.config.training.micro_batch_size, self.device)
        for i, (input_ids, labels) in enumerate(batches):
            # Data-parallel gradients are reduced only in the last micro-batch's backward, overlapping it.
            with contextlib.nullcontext() if i == n_micro - 1 else self.optimizer.no_sync():
                with autocast(self.device, self.amp_dtype):
                    loss = self.model(input_ids, labels=labels)
                self.scaler.scale_loss(loss.float() / n_micro).backward()
            total += loss.detach().float()
        self.optimizer.finish_grad_sync()
        loss = self.ctx.mean_over_dp(total / n_micro)
        if self.scaler.scale != 1.0:
            self.optimizer.unscale_(1.0 / self.scaler.scale)
        grad_norm = self.optimizer.clip_grad_norm(self.config.optimizer.clip_grad)
        skipped = not bool(torch.isfinite(grad_norm))
        if not skipped:
            self.optimizer.step()
        self.scaler.update(found_inf=skipped)
        self.consumed += self.global_batch
        return float(loss), float(grad_norm), skipped

    @torch.no_grad()
    def evaluate(self, dataset) -> float:
        """Mean loss over --eval-iters global batches from the start of a split (the same samples each time)."""
        self.model.eval()
        total, count = torch.zeros((), device=self.device), 0
        for batch in range(self.config.logging.eval_iters):
            indices = batch_indices(batch * self.global_batch, self.global_batch, self.ctx.dp_rank, self.ctx.dp_size)
            for input_ids, labels in micro_batches(dataset, indices, self.config.training.micro_batch_size,
                                                   self.device):
                with autocast(self.device, self.amp_dtype):
                    total += self.model(input_ids, labels=labels).float()
                count += 1
        self.model.train()
        return float(self.ctx.mean_over_dp(total / max(count, 1)))

    def save(self) -> str | None:
        """Writes a checkpoint of the current state to --save (collective: every rank writes its shards)."""
        c, c_par = self.config.checkpoint, self.config.parallel
        if c.save is None:
            return None
        meta = {
            "consumed_samples": self.consumed,
            "config": self.config.to_dict(),
            "model_config": dataclasses.asdict(self.model_config),
            "layout": {"distributed_optimizer": c_par.use_distributed_optimizer},
        }
        extra = {"loss_scaler": self.scaler.state_dict(), "schedule": self.schedule.state_dict()}
        path = ckpt.save_checkpoint(c.save, self.iteration, self.model, self.optimizer, extra, meta, c.keep_last,
                                    ctx=self.ctx, rng_extra=get_tracker().get_state())
        self._print(f"saved checkpoint {path}")
        return str(path)

    def _describe(self) -> None:
        c, m = self.config, self.model_config
        precision = "bf16" if c.precision.bf16 else "fp16" if c.precision.fp16 else "fp32"
        self._print(
            f"model: preset {c.model.preset}, {num_parameters(m) / 1e6:.2f}M parameters, {m.num_layers} layers, "
            f"hidden {m.hidden_size}, {m.num_attention_heads} heads, vocab {m.vocab_size} "
            f"(padded {m.padded_vocab_size})\n"
            f"training: {c.training.train_iters} iterations × {self.global_batch} samples × {self.seq_length} "
            f"tokens, micro batch {c.training.micro_batch_size}, {precision} on {self.device}; "
            f"train/valid/test samples {len(self.train_ds)}/{len(self.valid_ds or [])}/{len(self.test_ds or [])}\n"
            f"parallel: {self.ctx.world_size} processes = tensor parallel {self.ctx.tp_size} × data parallel "
            f"{self.ctx.dp_size}{', sequence parallel' if self.ctx.sequence_parallel else ''}"
            f"{', distributed optimizer' if c.parallel.use_distributed_optimizer else ''}")

    def run(self) -> TrainResult:
        """Trains to --train-iters (or --exit-interval, or a SIGTERM/SIGINT), saving and evaluating on the way."""
        c = self.config
        train_iters = c.training.train_iters
        result = TrainResult(self.iteration, self.consumed)
        self._describe()
        if self.iteration >= train_iters:
            self._print(f"nothing to do: iteration {self.iteration} has reached --train-iters {train_iters}")
        log_dir = c.logging.log_dir or c.checkpoint.save
        self.logger = MetricsLogger(log_dir, self.iteration, train_iters, self.ctx.is_main, self.progress)
        meter = IntervalMeter()
        saved_at = evaluated_at = None
        try:
            with _StopSignals() as stop:
                while self.iteration < train_iters:
                    self.iteration += 1
                    lr = self.schedule(self.iteration)
                    set_lr(self.optimizer, lr)
                    loss, grad_norm, skipped = self.train_step()
                    result.losses[self.iteration] = loss
                    result.skipped_steps += int(skipped)
                    meter.add(loss, self.global_batch * self.seq_length, skipped)
                    self.logger.step(self.iteration, loss)
                    if self.iteration % c.logging.log_interval == 0:
                        self._log_interval(meter, lr, grad_norm)
                    if self.valid_ds is not None and self.iteration % c.logging.eval_interval == 0:
                        with meter.paused():
                            result.valid_losses[self.iteration] = self._eval_and_log(self.valid_ds, "valid")
                        evaluated_at = self.iteration
                    if c.checkpoint.save_interval and self.iteration % c.checkpoint.save_interval == 0:
                        with meter.paused():
                            result.checkpoint, saved_at = self.save(), self.iteration
                    exit_interval = c.training.exit_interval
                    # Every rank must stop at the same iteration, even when only some received the signal.
                    signalled = agree_on_stop(self.ctx, stop.received is not None, self.device)
                    if signalled or (exit_interval and self.iteration % exit_interval == 0):
                        result.stop_reason = "signal" if signalled else "exit-interval"
                        self._print(f"stopping at iteration {self.iteration} ({result.stop_reason})")
                        break
            if result.stop_reason == "done" and result.losses:
                if self.valid_ds is not None and evaluated_at != self.iteration:
                    result.valid_losses[self.iteration] = self._eval_and_log(self.valid_ds, "valid")
                if self.test_ds is not None:
                    result.test_loss = self._eval_and_log(self.test_ds, "test")
            if result.losses and saved_at != self.iteration:
                result.checkpoint = self.save()
        finally:
            self.logger.close()
            self.logger = None
        result.iteration, result.consumed_samples = self.iteration, self.consumed
        return result

    def _log_interval(self, meter: IntervalMeter, lr: float, grad_norm: float) -> None:
        """Logs the interval that ends at this iteration and starts the next one."""
        flops = flops_per_token(self.model_config, self.seq_length)
        peak = device_peak_tflops(self.device, self.config.logging.peak_tflops)
        record = {"iteration": self.iteration, "consumed_samples": self.consumed, "lr": lr, "grad_norm": grad_norm,
                  **meter.summary(flops, self.ctx.world_size, peak)}
        if self.config.precision.fp16:
            record["loss_scale"] = self.scaler.scale
        if self.device.type == "cuda":
            record["max_mem_gib"] = torch.cuda.max_memory_allocated(self.device) / 2**30
        self.logger.log_train(record)
        meter.reset()

    def _build_code_eval(self):
        """The --code-eval hook on rank 0 (None elsewhere, or without the flag)."""
        spec = self.config.logging.code_eval
        if spec is None or not self.ctx.is_main:
            return None
        from megaphi.data.tokenizer import build_tokenizer
        from megaphi.eval.training_hook import CodeEvalHook

        d = self.config.data
        # Up to 256 new tokens, fewer for a model with short positions (prompts then keep their last tokens).
        max_new = min(256, self.model_config.max_position_embeddings // 2)
        return CodeEvalHook.from_spec(spec, build_tokenizer(d.tokenizer_type, d.tokenizer_model),
                                      max_new_tokens=max_new)

    def _eval_and_log(self, dataset, split: str) -> float:
        loss = self.evaluate(dataset)
        self.logger.log_eval(self.iteration, split, loss)
        if split == "valid" and self.code_eval is not None:  # rank 0; the others wait at the next collective
            self.logger.log_scalars(self.iteration, "code_eval", self.code_eval(self.model, self.iteration))
        return loss


class _StopSignals:
    """While active, SIGTERM and SIGINT ask the loop to save and stop; a second SIGINT interrupts at once."""

    def __init__(self):
        self.received: int | None = None
        self._previous = {}

    def _handle(self, signum, frame):
        if self.received is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.received = signum

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGTERM, signal.SIGINT):
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc):
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()


def train(config: TrainConfig, ctx: ParallelContext | None = None, progress: bool | None = None) -> TrainResult:
    """Validates the config, builds model, data and optimizer, resumes from --load, and trains."""
    return Trainer(config, ctx, progress).run()


def main(argv: list[str] | None = None, defaults: str | Path | None = None, description: str | None = None,
         finetune: bool = False) -> TrainResult:
    """Command-line entry point: parse flags over a YAML of defaults, then train; bad settings exit with status 2."""
    try:
        config = parse_config(argv, defaults, description)
        if finetune:
            config.checkpoint.finetune = True
        trainer = Trainer(config)
    except ValueError as e:  # configuration errors (flags, YAML files, checkpoints): one line, no traceback
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(2) from None
    try:
        return trainer.run()
    finally:
        destroy_distributed()
