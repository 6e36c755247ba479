"""Checkpoints: atomic iter_XXXXXXX folders with a `latest` pointer, pruning, resume and model-only loading.

Layout of one checkpoint folder `<save>/iter_0000100/`:
  model.pt   the model's state_dict (fp32)
  optim.pt   optimizer, loss scaler and schedule states
  rng.pt     python, numpy, torch CPU (and CUDA) RNG states
  meta.json  iteration, consumed samples, the training and model configs, the parallel layout
A checkpoint is written to a hidden temp folder beside it, fsynced, then renamed into place (the commit
point); then `latest` is rewritten atomically to name it. A SIGKILL at any moment leaves either the previous
complete checkpoint or the new one; leftover temp folders are ignored and removed.
"""

import dataclasses
import json
import os
import pickle
import random
import re
import shutil
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

CHECKPOINT_RE = re.compile(r"^iter_(\d{7,})$")
TMP_PREFIX = ".tmp_"
LATEST = "latest"
FORMAT_VERSION = 1


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


def save_checkpoint(
    folder: str | Path,
    iteration: int,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer | None = None,
    extra_optim_state: dict[str, Any] | None = None,
    meta: dict[str, Any] | None = None,
    keep_last: int | None = None,
) -> Path:
    """Writes the checkpoint for an iteration atomically, points `latest` at it and prunes to keep_last."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    clean_incomplete(folder)
    final = folder / checkpoint_name(iteration)
    tmp = folder / f"{TMP_PREFIX}{final.name}.{os.getpid()}"
    tmp.mkdir()
    _write_file(tmp / "model.pt", lambda f: torch.save(model.state_dict(), f))
    optim_state = dict(extra_optim_state or {})
    if optimizer is not None:
        optim_state["optimizer"] = optimizer.state_dict()
    _write_file(tmp / "optim.pt", lambda f: torch.save(optim_state, f))
    _write_file(tmp / "rng.pt", lambda f: torch.save(rng_state(), f))
    meta = {"format_version": FORMAT_VERSION, "iteration": iteration, "saved_at": time.time(),
            "torch_version": torch.__version__, **(meta or {})}
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


def _unreadable(path: Path, error: Exception) -> ValueError:
    """The error for a checkpoint file that is missing or damaged (its folder is still listed as complete)."""
    reason = (str(error).splitlines() or [""])[0]
    return ValueError(f"--load: checkpoint file {path} is missing or unreadable ({type(error).__name__}: {reason}); "
                      f"delete {path.parent} to resume from the checkpoint before it, or choose one with --ckpt-step")


def read_meta(path: str | Path) -> dict[str, Any]:
    """A checkpoint's meta.json."""
    file = Path(path) / "meta.json"
    try:
        return json.loads(file.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise _unreadable(file, e) from None


def _torch_load(path: Path) -> Any:
    """torch.load on CPU with weights_only=True (checkpoints hold only tensors and plain data)."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except (OSError, RuntimeError, EOFError, pickle.UnpicklingError) as e:
        raise _unreadable(path, e) from None


def load_model_state(path: str | Path, model: torch.nn.Module) -> None:
    """Loads a checkpoint's weights into model, with a clear error when the shapes differ."""
    path = Path(path)
    state = _torch_load(path / "model.pt")
    try:
        model.load_state_dict(state)
    except RuntimeError as e:
        saved = read_meta(path).get("model_config", {})
        raise ValueError(f"--load: checkpoint {path} does not fit this model (saved model config: {saved}): "
                         f"{str(e).splitlines()[0]}") from None


def load_checkpoint(
    path: str | Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer | None = None, load_rng: bool = True
) -> tuple[dict[str, Any], dict[str, Any]]:
    """Loads weights, optimizer and RNG states; returns (meta.json, optim.pt's other entries such as the scaler)."""
    path = Path(path)
    load_model_state(path, model)
    optim_state = _torch_load(path / "optim.pt") if optimizer is not None else {}
    if optimizer is not None:
        optimizer.load_state_dict(optim_state.pop("optimizer"))
    if load_rng:
        set_rng_state(_torch_load(path / "rng.pt"))
    return read_meta(path), optim_state


def load_model(folder: str | Path, iteration: int | None = None, device: str | torch.device = "cpu"):
    """The eval-mode PhiForCausalLM of a --save folder's latest checkpoint (or `iteration`, or an iter_ folder)."""
    from megaphi.model import ModelConfig, PhiForCausalLM

    folder = Path(folder)
    path = folder if CHECKPOINT_RE.match(folder.name) else find_checkpoint(folder, iteration)
    if path is None or not (path / "meta.json").is_file():
        raise ValueError(f"no checkpoint found in {folder}")
    fields = {f.name for f in dataclasses.fields(ModelConfig)}
    config = ModelConfig(**{k: v for k, v in read_meta(path)["model_config"].items() if k in fields})
    model = PhiForCausalLM(config)
    load_model_state(path, model)
    return model.to(device).eval()
