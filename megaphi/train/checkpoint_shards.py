"""Reading checkpoints at any layout: partition dims, resharding, optimizer states by name, format 1.

A sharded tensor is saved as tp pieces (one file per TP rank); its full form is their concatenation along the
parameter's partition dim. Loading at another TP size takes, for this rank's slice, only the overlapping parts
of the saved pieces, so no rank materialises more than it keeps (files are memory-mapped).
"""

import dataclasses
import json
import pickle
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

from megaphi.parallel.layers import shard_view

# Module names of the phi model by tensor-parallel role (the TP plan's): their weights split on this dim.
COLUMN_PARALLEL = ("q_proj", "k_proj", "v_proj", "fc1", "lm_head", "embed_tokens")  # output rows (dim 0), bias too
ROW_PARALLEL = ("dense", "fc2")  # input columns (dim 1); the bias is replicated
# Optimizer group settings that choose an implementation for this machine, not training hyperparameters.
IMPLEMENTATION_KEYS = ("foreach", "fused", "capturable", "differentiable")


def phi_partition_dim(name: str) -> int | None:
    """The dim a phi state-dict entry is split on under tensor parallelism, None when replicated."""
    parts = name.split(".")
    module, kind = (parts[-2], parts[-1]) if len(parts) >= 2 else ("", name)
    if module in COLUMN_PARALLEL:
        return 0
    if module in ROW_PARALLEL and kind == "weight":
        return 1
    return None


def partition_dims(model: nn.Module) -> dict[str, int]:
    """{parameter name: tensor_parallel_dim} of the model's sharded parameters."""
    return {name: int(p.tensor_parallel_dim) for name, p in model.named_parameters()
            if getattr(p, "tensor_parallel_dim", None) is not None}


def reshard(get: Callable[[int], torch.Tensor], tp: int, saved_dim: int | None, dim: int | None, rank: int,
            size: int, name: str) -> torch.Tensor:
    """This rank's slice (dim split over size ranks) of a tensor saved as tp pieces split on saved_dim.

    get(i) returns saved piece i; only the pieces overlapping the slice are asked for when the dims agree.
    """
    if saved_dim is None:  # replicated when saved: every piece is the full tensor
        return shard_view(get(rank if tp == size else 0), dim, rank, size)
    if dim != saved_dim or size == 1:
        return shard_view(torch.cat([get(i) for i in range(tp)], saved_dim), dim, rank, size)
    saved = get(0).shape[dim]
    if (saved * tp) % size:
        raise ValueError(f"{name}: {saved * tp} along dim {dim} does not split into {size} tensor-parallel shards")
    n = saved * tp // size
    start, stop = rank * n, (rank + 1) * n
    parts = []
    for i in range(start // saved, (stop - 1) // saved + 1):
        lo, hi = max(start, i * saved), min(stop, (i + 1) * saved)
        parts.append(get(i).narrow(dim, lo - i * saved, hi - lo))
    return parts[0] if len(parts) == 1 else torch.cat(parts, dim)


def unreadable(path: Path, error: Exception) -> ValueError:
    """The error for a checkpoint file that is missing or damaged (its folder is still listed as complete)."""
    reason = (str(error).splitlines() or [""])[0]
    return ValueError(f"--load: checkpoint file {path} is missing or unreadable ({type(error).__name__}: {reason}); "
                      f"delete {path.parent} to resume from the checkpoint before it, or choose one with --ckpt-step")


def torch_load(path: Path, mmap: bool = False) -> Any:
    """torch.load on CPU with weights_only=True (checkpoints hold only tensors and plain data)."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except (OSError, RuntimeError, EOFError, pickle.UnpicklingError, ValueError) as e:
        raise unreadable(path, e) from None


class ShardFiles:
    """The per-TP-rank files of one kind in a checkpoint (model_tpXX.pt or optim_tpXX.pt), loaded when first used."""

    def __init__(self, paths: list[Path]):
        self.paths = paths
        self._loaded: dict[int, Any] = {}

    def __len__(self) -> int:
        """The saved TP size."""
        return len(self.paths)

    def __getitem__(self, index: int) -> Any:
        """The contents of TP rank index's file (memory-mapped tensors)."""
        if index not in self._loaded:
            self._loaded[index] = torch_load(self.paths[index], mmap=True)
        return self._loaded[index]


def torch_optimizer_state_by_name(optimizer: torch.optim.Optimizer, model: nn.Module) -> dict[str, Any]:
    """A torch optimizer's state_dict keyed by parameter name: {"param_groups": [...], "state": {name: {...}}}."""
    names = {id(p): n for n, p in model.named_parameters()}
    sd = optimizer.state_dict()
    index_to_name = {}
    for group, saved in zip(optimizer.param_groups, sd["param_groups"]):
        for param, index in zip(group["params"], saved["params"]):
            if id(param) not in names:
                raise ValueError("the optimizer holds a parameter that is not in the model")
            index_to_name[index] = names[id(param)]
    return {"param_groups": [{k: v for k, v in g.items() if k != "params"} for g in sd["param_groups"]],
            "state": {index_to_name[i]: s for i, s in sd["state"].items()}}


def load_torch_optimizer_state_by_name(optimizer: torch.optim.Optimizer, model: nn.Module,
                                       state: dict[str, Any]) -> None:
    """Loads torch_optimizer_state_by_name()'s output (from any layout, already resharded) into a torch optimizer."""
    names = {id(p): n for n, p in model.named_parameters()}
    current = optimizer.state_dict()
    if len(state["param_groups"]) != len(current["param_groups"]):
        raise ValueError(f"the checkpoint's optimizer has {len(state['param_groups'])} parameter groups, this one "
                         f"{len(current['param_groups'])}")
    groups, index_of = [], {}
    for group, cur, saved in zip(optimizer.param_groups, current["param_groups"], state["param_groups"]):
        keep = {k: cur[k] for k in IMPLEMENTATION_KEYS if k in cur}  # a CUDA-fused run may resume on CPU
        groups.append({**saved, **keep, "params": cur["params"]})
        index_of.update({names[id(p)]: i for p, i in zip(group["params"], cur["params"])})
    unknown = sorted(set(state["state"]) - set(index_of))
    if unknown:
        raise ValueError(f"the checkpoint holds optimizer states of parameters this optimizer lacks: {unknown[:3]}")
    optimizer.load_state_dict({"state": {index_of[n]: s for n, s in state["state"].items()}, "param_groups": groups})


def v1_optimizer_state_by_name(saved: dict[str, Any], weights: dict[str, torch.Tensor]) -> dict[str, Any]:
    """A format-1 checkpoint's torch optimizer state keyed by name.

    Format 1 came from build_optimizer's two groups: first every >= 2-D parameter, then every 1-D one, each in
    the model's order, which fixes the index -> name mapping.
    """
    names = [n for n, t in weights.items() if t.ndim >= 2] + [n for n, t in weights.items() if t.ndim < 2]
    indices = [i for g in saved["param_groups"] for i in g["params"]]
    if len(indices) != len(names):
        raise ValueError(f"format-1 optimizer state covers {len(indices)} parameters, the model has {len(names)}")
    index_to_name = dict(zip(indices, names))
    return {"param_groups": [{k: v for k, v in g.items() if k != "params"} for g in saved["param_groups"]],
            "state": {index_to_name[i]: s for i, s in saved["state"].items()}}


def model_file(tp_rank: int) -> str:
    """The name of TP rank tp_rank's weights file."""
    return f"model_tp{tp_rank:02d}.pt"


def optim_file(tp_rank: int) -> str:
    """The name of TP rank tp_rank's optimizer file."""
    return f"optim_tp{tp_rank:02d}.pt"


def rng_file(rank: int) -> str:
    """The name of global rank rank's RNG file."""
    return f"rng_{rank:05d}.pt"


def read_meta(path: str | Path) -> dict[str, Any]:
    """A checkpoint's meta.json."""
    file = Path(path) / "meta.json"
    try:
        return json.loads(file.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise unreadable(file, e) from None


@dataclasses.dataclass
class SavedCheckpoint:
    """What a checkpoint folder holds: its format, layout, sharded parameters and files."""

    path: Path
    meta: dict[str, Any]

    @property
    def version(self) -> int:
        """The format: 1 (single process, model.pt) or 2 (per-rank shards)."""
        return int(self.meta.get("format_version", 1))

    @property
    def layout(self) -> tuple[int, int, int]:
        """(tensor_parallel, data_parallel, world_size) at save time."""
        layout = self.meta.get("layout", {}) if self.version > 1 else {}
        return (int(layout.get("tensor_parallel", 1)), int(layout.get("data_parallel", 1)),
                int(layout.get("world_size", 1)))

    @property
    def dims(self) -> dict[str, int]:
        """{parameter name: partition dim} of the parameters saved as TP shards."""
        return self.meta.get("partition_dims", {}) if self.version > 1 else {}

    @property
    def contents(self) -> list[str]:
        """What was saved: "model", and for training checkpoints "optim" and "rng"."""
        return self.meta.get("contents", ["model", "optim", "rng"]) if self.version > 1 else ["model", "optim", "rng"]

    def files(self, kind: str) -> ShardFiles:
        """The model or optim files, one per saved TP rank (format 1: the one file)."""
        if self.version == 1:
            return ShardFiles([self.path / f"{kind}.pt"])
        name = model_file if kind == "model" else optim_file
        return ShardFiles([self.path / name(r) for r in range(self.layout[0])])

    def rng_path(self, rank: int) -> Path:
        """The RNG file of a global rank."""
        return self.path / ("rng.pt" if self.version == 1 else rng_file(rank))


def does_not_fit(saved: SavedCheckpoint, reason: str) -> ValueError:
    """The error for a checkpoint whose weights do not match the model being loaded."""
    return ValueError(f"--load: checkpoint {saved.path} does not fit this model (saved model config: "
                      f"{saved.meta.get('model_config', {})}): {reason}")


def model_state(saved: SavedCheckpoint, model: nn.Module, tp_rank: int, tp_size: int) -> dict[str, torch.Tensor]:
    """The checkpoint's weights resharded to this rank's shapes, checked against the model."""
    files, current, dims = saved.files("model"), model.state_dict(), partition_dims(model)
    keys = set(files[0])
    missing, unexpected = sorted(set(current) - keys), sorted(keys - set(current))
    if missing or unexpected:
        raise does_not_fit(saved, f"missing keys {missing[:3]}, unexpected keys {unexpected[:3]}")
    state = {}
    for name, tensor in current.items():
        try:
            value = reshard(lambda i: files[i][name], len(files), saved.dims.get(name), dims.get(name), tp_rank,
                            tp_size, name)
        except (ValueError, RuntimeError) as e:
            raise does_not_fit(saved, str(e).splitlines()[0]) from None
        if value.shape != tensor.shape:
            raise does_not_fit(saved, f"{name} is {tuple(value.shape)} for this rank, the model's "
                                       f"{tuple(tensor.shape)}")
        state[name] = value
    return state


def optimizer_state(saved: SavedCheckpoint, model: nn.Module, tp_rank: int, tp_size: int):
    """(optimizer state by name resharded to this rank, the optim file's other entries)."""
    if "optim" not in saved.contents:
        raise ValueError(f"--load: checkpoint {saved.path} holds weights only (no optimizer state): start from it "
                         f"with --finetune")
    files = saved.files("optim")
    by_name = {}

    def optim(i: int) -> dict[str, Any]:
        if i not in by_name:
            if "optimizer" not in files[i]:
                raise ValueError(f"--load: checkpoint {saved.path} holds no optimizer state: start from it with "
                                 f"--finetune")
            entry = files[i]["optimizer"]
            by_name[i] = v1_optimizer_state_by_name(entry, saved.files("model")[0]) if saved.version == 1 else entry
        return by_name[i]

    dims = partition_dims(model)
    shapes = {n: p.shape for n, p in model.named_parameters()}
    state = {}
    for name, entry in optim(0)["state"].items():
        if name not in shapes:
            raise does_not_fit(saved, f"optimizer state of {name}, which this model lacks")
        state[name] = {}
        for key, value in entry.items():
            if isinstance(value, torch.Tensor) and value.ndim == len(shapes[name]) and value.ndim > 0:
                value = reshard(lambda i: optim(i)["state"][name][key], len(files), saved.dims.get(name),
                                dims.get(name), tp_rank, tp_size, name)
                if value.shape != shapes[name]:
                    raise does_not_fit(saved, f"optimizer {key} of {name} is {tuple(value.shape)}, the parameter "
                                               f"{tuple(shapes[name])}")
            state[name][key] = value.clone() if isinstance(value, torch.Tensor) else value
    extra = {k: v for k, v in files[0].items() if k != "optimizer"}
    return {"param_groups": optim(0)["param_groups"], "state": state}, extra
