"""Checkpoints: atomic iter_XXXXXXX folders with a `latest` pointer, pruning, and loading at any parallel layout.

Format 2, one folder per iteration `<save>/iter_0000100/`:
  model_tpXX.pt  the model's state_dict as tensor-parallel rank XX holds it (shard shapes), written by the
                 data-parallel rank 0 of that TP rank; the same keys at every layout
  optim_tpXX.pt  {"optimizer": {"param_groups": [...], "state": {param name: {"step", "exp_avg", ...}}} in
                 TP rank XX's shard shapes (full over DP, also with the distributed optimizer), plus the trainer's
                 entries (loss scaler, schedule); written by DP rank 0 of TP rank XX
  rng_XXXXX.pt   python, numpy, torch CPU and CUDA RNG states of global rank XXXXX, plus its `extra` (the TP
                 dropout RNG tracker's state)
  meta.json      format_version, iteration, the trainer's meta (configs, consumed samples), "layout"
                 {world_size, tensor_parallel, data_parallel, distributed_optimizer}, "partition_dims"
                 {param name: dim} of the TP-sharded parameters, "contents" (model, optim, rng)
A sharded tensor's full form is its TP pieces concatenated along its partition dim, so loading at another TP size
reshards weights and Adam states by name; the DP size only decides who writes. RNG states are restored only at the
same layout (a different layout cannot reproduce the dropout masks anyway).

A save is collective: rank 0 creates a hidden temp folder beside the checkpoint, every rank writes and fsyncs its
files there, the ranks agree that all succeeded, then rank 0 writes meta.json and renames the folder into place
(the commit point) and rewrites `latest` atomically. A SIGKILL at any moment leaves either the previous complete
checkpoint or the new one; leftover temp folders are ignored and removed. Several nodes need a shared filesystem.

Format 1 (model.pt, optim.pt with torch's optimizer.state_dict() of build_optimizer's two groups, rng.pt;
single process) is still read: weights (load_model, load_full_state_dict, fine-tuning) and full resumes at any
layout.
"""

import dataclasses
import json
import os
import random
import re
import shutil
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from megaphi.parallel.layers import shard_view
from megaphi.parallel.state import ParallelContext
from megaphi.train.checkpoint_shards import (SavedCheckpoint, load_torch_optimizer_state_by_name, model_file,
                                             model_state, optim_file, optimizer_state, partition_dims,
                                             phi_partition_dim, read_meta, reshard, rng_file, torch_load,
                                             torch_optimizer_state_by_name)

CHECKPOINT_RE = re.compile(r"^iter_(\d{7,})$")
TMP_PREFIX = ".tmp_"
LATEST = "latest"
FORMAT_VERSION = 2


def checkpoint_name(iteration: int) -> str:
    """The folder name of the checkpoint at an iteration."""
    return f"iter_{iteration:07d}"


def _fsync_dir(path: Path) -> None:
    """Makes a folder's entries (creations, renames) durable."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_file(path: Path, write) -> None:
    """Writes a file with write(f), flushes and fsyncs it."""
    with open(path, "wb") as f:
        write(f)
        f.flush()
        os.fsync(f.fileno())


def _write_atomic_text(path: Path, text: str) -> None:
    """Replaces a small text file atomically (temp file in the same folder, fsync, rename)."""
    tmp = path.with_name(f"{TMP_PREFIX}{path.name}.{os.getpid()}")
    _write_file(tmp, lambda f: f.write(text.encode()))
    os.replace(tmp, path)
    _fsync_dir(path.parent)


def rng_state() -> dict[str, Any]:
    """All RNG states as plain data and tensors (loadable with weights_only=True)."""
    name, keys, pos, has_gauss, gauss = np.random.get_state()
    state = {
        "python": random.getstate(),
        "numpy": [name, torch.from_numpy(keys.astype(np.int64)), int(pos), int(has_gauss), float(gauss)],
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    """Restores rng_state()'s output."""
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    name, keys, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, gauss))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        states = state["cuda"]
        if len(states) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(states)
        else:  # a different GPU count: this process's device gets the first saved state
            torch.cuda.set_rng_state(states[0])


def list_checkpoints(folder: str | Path) -> list[tuple[int, Path]]:
    """Complete checkpoints in a folder as (iteration, path), oldest first; temp folders are not listed."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    found = []
    for entry in folder.iterdir():
        match = CHECKPOINT_RE.match(entry.name)
        if match and entry.is_dir() and (entry / "meta.json").is_file():
            found.append((int(match.group(1)), entry))
    return sorted(found)


def clean_incomplete(folder: str | Path) -> list[Path]:
    """Removes temp folders and files left by interrupted saves; returns what was removed."""
    folder = Path(folder)
    removed = []
    if folder.is_dir():
        for entry in folder.iterdir():
            if entry.name.startswith(TMP_PREFIX):
                shutil.rmtree(entry) if entry.is_dir() else entry.unlink()
                removed.append(entry)
    return removed


def find_checkpoint(folder: str | Path, iteration: int | None = None) -> Path | None:
    """The checkpoint to resume from: the given iteration, else `latest`'s target, else the newest one."""
    folder = Path(folder)
    if iteration is not None:
        path = folder / checkpoint_name(iteration)
        if not (path / "meta.json").is_file():
            raise ValueError(f"--ckpt-step {iteration}: no complete checkpoint {path}")
        return path
    latest = folder / LATEST
    if latest.is_file():
        name = latest.read_text().strip()
        if CHECKPOINT_RE.match(name) and (folder / name / "meta.json").is_file():
            return folder / name
    found = list_checkpoints(folder)
    return found[-1][1] if found else None


def _context(ctx: ParallelContext | None) -> ParallelContext:
    """ctx, or a single process's context for None."""
    if ctx is None:
        return ParallelContext()
    if ctx.world_size > 1 and not dist.is_initialized():
        raise ValueError(f"a ParallelContext of {ctx.world_size} ranks, but torch.distributed is not initialised")
    return ctx


def _agree(error: Exception | None, ctx: ParallelContext, what: str) -> None:
    """Raises on every rank when any rank failed: its own error where it failed, a ValueError elsewhere.

    The steps between two _agree calls catch every Exception, not only OSError: a rank that raised past it would
    leave the others waiting in the next collective until the NCCL timeout.
    """
    failed = int(error is not None)
    if ctx.world_size > 1:
        device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else "cpu"
        flag = torch.tensor([failed], device=device)
        dist.all_reduce(flag)
        failed = int(flag.item())
    if error is not None:
        raise error
    if failed:
        raise ValueError(f"{what} failed on {failed} other rank(s): see their error messages")


def _compact(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The tensors, copied where they are views of a larger storage (torch.save would write all of it)."""
    # The copies go to the CPU: under the distributed optimizer every parameter is a view of one flat buffer, and
    # cloning them on the GPU would need a second copy of the model in GPU memory during the save.
    return {k: v.detach().to("cpu", copy=True) if v.untyped_storage().nbytes() > v.nbytes else v
            for k, v in state.items()}


def _layout(ctx: ParallelContext, meta: dict[str, Any]) -> dict[str, Any]:
    """meta.json's layout: the sizes from ctx, other entries (distributed_optimizer) from the caller's meta."""
    layout = {"world_size": ctx.world_size, "tensor_parallel": ctx.tp_size, "data_parallel": ctx.dp_size,
              "distributed_optimizer": False}
    return {**layout, **meta.get("layout", {}), **{k: layout[k] for k in ("world_size", "tensor_parallel",
                                                                           "data_parallel")}}


def _commit(folder: Path, tmp: Path, final: Path, meta: dict[str, Any], keep_last: int | None) -> None:
    """Writes meta.json into the temp folder and renames it into place; then `latest` and pruning."""
    _write_file(tmp / "meta.json", lambda f: f.write(json.dumps(meta, indent=2).encode()))
    _fsync_dir(tmp)
    if final.exists():  # re-saving an iteration (e.g. after resuming from an older checkpoint)
        old = folder / f"{TMP_PREFIX}old_{final.name}.{os.getpid()}"
        os.rename(final, old)
        os.rename(tmp, final)
        shutil.rmtree(old)
    else:
        os.rename(tmp, final)
    _fsync_dir(folder)
    _write_atomic_text(folder / LATEST, final.name + "\n")
    if keep_last is not None:
        prune(folder, keep_last, protect=final)


def save_checkpoint(
    folder: str | Path,
    iteration: int,
    model: torch.nn.Module,
    optimizer: Any = None,
    extra_optim_state: dict[str, Any] | None = None,
    meta: dict[str, Any] | None = None,
    keep_last: int | None = None,
    ctx: ParallelContext | None = None,
    rng_extra: dict[str, Any] | None = None,
) -> Path:
    """Writes the checkpoint for an iteration atomically, points `latest` at it, prunes to keep_last.

    Collective over all ranks of ctx (None: one process). optimizer is the parallel optimizer (state_dict_by_name,
    collective over DP) or a plain torch optimizer; rng_extra is this rank's extra RNG state (TP tracker).
    """
    ctx = _context(ctx)
    folder = Path(folder)
    final = folder / checkpoint_name(iteration)
    tmp = folder / f"{TMP_PREFIX}{final.name}"
    error = None
    if ctx.rank == 0:
        try:
            folder.mkdir(parents=True, exist_ok=True)
            clean_incomplete(folder)
            tmp.mkdir()
        except Exception as e:
            error = e
    _agree(error, ctx, f"creating {tmp}")
    writer = ctx.dp_rank == 0
    try:
        if writer:
            _write_file(tmp / model_file(ctx.tp_rank), lambda f: torch.save(_compact(model.state_dict()), f))
    except Exception as e:
        error = e
    optim_state = dict(extra_optim_state or {})
    if optimizer is not None:  # collective over DP: every rank takes part, even after a failed write
        by_name = getattr(optimizer, "state_dict_by_name", None)
        optim_state["optimizer"] = by_name() if by_name else torch_optimizer_state_by_name(optimizer, model)
    try:
        if writer and error is None:
            _write_file(tmp / optim_file(ctx.tp_rank), lambda f: torch.save(optim_state, f))
        if error is None:
            rng = {**rng_state(), **({"extra": rng_extra} if rng_extra is not None else {})}
            _write_file(tmp / rng_file(ctx.rank), lambda f: torch.save(rng, f))
    except Exception as e:
        error = e
    _agree(error, ctx, f"writing checkpoint files to {tmp} (all ranks write there: on several nodes --save must be "
                       f"on a filesystem they share)")
    if ctx.rank == 0:
        meta = meta or {}
        meta = {"format_version": FORMAT_VERSION, "iteration": iteration, "saved_at": time.time(),
                "torch_version": torch.__version__, **meta, "layout": _layout(ctx, meta),
                "partition_dims": partition_dims(model), "contents": ["model", "optim", "rng"]}
        try:
            _commit(folder, tmp, final, meta, keep_last)
        except Exception as e:
            error = e
    _agree(error, ctx, f"committing {final}")
    return final


def save_model_checkpoint(
    folder: str | Path,
    state_dict: dict[str, torch.Tensor],
    model_config,
    tensor_parallel_size: int = 1,
    iteration: int = 0,
    meta: dict[str, Any] | None = None,
) -> Path:
    """Writes a weights-only checkpoint of a full phi state dict, split for tensor_parallel_size (single process).

    --load with --finetune starts from it; load_model and load_full_state_dict read it back.
    """
    from megaphi.model import PhiForCausalLM

    if not isinstance(tensor_parallel_size, int) or tensor_parallel_size < 1:
        raise ValueError(f"tensor_parallel_size must be a positive integer, got {tensor_parallel_size!r}")
    with torch.device("meta"):
        expected = PhiForCausalLM(model_config).state_dict()
    missing, unexpected = sorted(set(expected) - set(state_dict)), sorted(set(state_dict) - set(expected))
    wrong = [f"{k} {tuple(state_dict[k].shape)} (expected {tuple(v.shape)})" for k, v in expected.items()
             if k in state_dict and state_dict[k].shape != v.shape]
    if missing or unexpected or wrong:
        raise ValueError(f"save_model_checkpoint: the state dict does not fit the model config: missing {missing[:3]}, "
                         f"unexpected {unexpected[:3]}, wrong shapes {wrong[:3]}")
    tp = tensor_parallel_size
    dims = {k: d for k in expected if (d := phi_partition_dim(k)) is not None} if tp > 1 else {}
    for name, dim in dims.items():
        if state_dict[name].shape[dim] % tp:
            raise ValueError(f"tensor_parallel_size={tp}: {name} has {state_dict[name].shape[dim]} entries on dim "
                             f"{dim}, not divisible by {tp}")
    folder = Path(folder)
    final = folder / checkpoint_name(iteration)
    tmp = folder / f"{TMP_PREFIX}{final.name}"
    folder.mkdir(parents=True, exist_ok=True)
    clean_incomplete(folder)
    tmp.mkdir()
    for r in range(tp):
        shards = {k: shard_view(state_dict[k].detach().cpu(), dims.get(k), r, tp).clone() for k in expected}
        _write_file(tmp / model_file(r), lambda f: torch.save(shards, f))
    meta = {"format_version": FORMAT_VERSION, "iteration": iteration, "saved_at": time.time(),
            "torch_version": torch.__version__, **(meta or {}), "model_config": dataclasses.asdict(model_config),
            "layout": {"world_size": tp, "tensor_parallel": tp, "data_parallel": 1, "distributed_optimizer": False},
            "partition_dims": dims, "contents": ["model"]}
    _commit(folder, tmp, final, meta, None)
    return final


def prune(folder: str | Path, keep_last: int, protect: Path | None = None) -> list[Path]:
    """Deletes all but the keep_last newest checkpoints (never `protect`); returns the deleted paths."""
    found = [path for _, path in list_checkpoints(folder)]
    doomed = [p for p in found[: max(len(found) - keep_last, 0)] if p != protect]
    for path in doomed:
        # Rename first, so a kill mid-delete leaves a temp folder rather than a half-deleted checkpoint.
        trash = path.with_name(f"{TMP_PREFIX}del_{path.name}.{os.getpid()}")
        os.rename(path, trash)
        shutil.rmtree(trash)
    return doomed


def load_model_state(path: str | Path, model: torch.nn.Module, ctx: ParallelContext | None = None) -> None:
    """Loads a checkpoint's weights (saved at any layout) into this rank's model; collective when ctx has ranks."""
    ctx, error = _context(ctx), None
    try:
        saved = SavedCheckpoint(Path(path), read_meta(path))
        model.load_state_dict(model_state(saved, model, ctx.tp_rank, ctx.tp_size))
    except Exception as e:
        error = e
    _agree(error, ctx, f"loading the weights of {path}")


def load_checkpoint(
    path: str | Path, model: torch.nn.Module, optimizer: Any = None, load_rng: bool = True,
    ctx: ParallelContext | None = None,
) -> tuple[dict[str, Any], dict[str, Any]]:
    """Loads weights, optimizer and RNG states saved at any layout into this one; collective.

    Returns (meta.json, the optim file's other entries such as the loss scaler and schedule, plus "rng_extra":
    this rank's saved extra RNG state when the RNG states were restored).
    """
    ctx, path, error = _context(ctx), Path(path), None
    optim_state, extra = None, {}
    try:
        saved = SavedCheckpoint(path, read_meta(path))
        model.load_state_dict(model_state(saved, model, ctx.tp_rank, ctx.tp_size))
        if optimizer is not None:
            optim_state, extra = optimizer_state(saved, model, ctx.tp_rank, ctx.tp_size)
        rng = None
        same_layout = saved.layout == (ctx.tp_size, ctx.dp_size, ctx.world_size)
        if load_rng and same_layout and "rng" in saved.contents:
            rng = torch_load(saved.rng_path(ctx.rank))
    except Exception as e:
        error = e
    _agree(error, ctx, f"loading {path}")
    try:  # the states are checked against this rank's optimizer: a mismatch may show on some ranks only
        if optimizer is not None:
            load_by_name = getattr(optimizer, "load_state_dict_by_name", None)
            if load_by_name:
                load_by_name(optim_state)
            else:
                load_torch_optimizer_state_by_name(optimizer, model, optim_state)
        if rng is not None:
            set_rng_state(rng)
    except Exception as e:
        error = e
    _agree(error, ctx, f"loading the optimizer and RNG states of {path}")
    if rng is not None:
        if "extra" in rng:
            extra["rng_extra"] = rng["extra"]
    elif load_rng and ctx.is_main:
        tp, dp, world = saved.layout
        reason = ("it holds no RNG states" if "rng" not in saved.contents else
                  f"it was saved at TP {tp} x DP {dp} ({world} ranks), this run is TP {ctx.tp_size} x DP "
                  f"{ctx.dp_size} ({ctx.world_size} ranks)")
        print(f"note: RNG states start from the seed, not from checkpoint {path}: {reason}", flush=True)
    return saved.meta, extra


def _resolve(folder: str | Path, iteration: int | None = None) -> Path:
    """A checkpoint folder: the iter_ folder given, or a --save folder's `latest` (or `iteration`)."""
    folder = Path(folder)
    path = folder if CHECKPOINT_RE.match(folder.name) else find_checkpoint(folder, iteration)
    if path is None or not (path / "meta.json").is_file():
        raise ValueError(f"no checkpoint found in {folder}")
    return path


def model_config_of(meta: dict[str, Any]):
    """The ModelConfig recorded in a checkpoint's meta.json."""
    from megaphi.model import ModelConfig

    fields = {f.name for f in dataclasses.fields(ModelConfig)}
    if "model_config" not in meta:
        raise ValueError("the checkpoint's meta.json records no model_config")
    return ModelConfig(**{k: v for k, v in meta["model_config"].items() if k in fields})


def load_full_state_dict(path: str | Path, iteration: int | None = None):
    """(ModelConfig, the full, unsharded state dict) of a checkpoint saved at any layout (single process)."""
    path = _resolve(path, iteration)
    saved = SavedCheckpoint(path, read_meta(path))
    files = saved.files("model")
    state = {name: reshard(lambda i: files[i][name], len(files), saved.dims.get(name), None, 0, 1, name).clone()
             for name in files[0]}
    return model_config_of(saved.meta), state


def load_model(folder: str | Path, iteration: int | None = None, device: str | torch.device = "cpu"):
    """The eval-mode PhiForCausalLM of a --save folder's latest checkpoint (or `iteration`, or an iter_ folder)."""
    from megaphi.model import PhiForCausalLM

    path = _resolve(folder, iteration)
    config, state = load_full_state_dict(path)
    model = PhiForCausalLM(config)
    try:
        model.load_state_dict(state)
    except RuntimeError as e:
        raise ValueError(f"checkpoint {path} does not fit its own model_config: {str(e).splitlines()[0]}") from None
    return model.to(device).eval()
