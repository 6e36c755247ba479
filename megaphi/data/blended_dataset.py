"""Weighted blends of GPT datasets: `--data-path 0.7 a 0.3 b` parsing and Megatron's greedy blending index."""

from __future__ import annotations

import math
import operator

import numpy as np

from megaphi.data.index_helpers import build_blending_indices, load_cached, load_or_build


def _as_weight(text: str) -> float | None:
    """The float a --data-path entry spells, or None for a path."""
    try:
        return float(text)
    except ValueError:
        return None


def parse_data_path(data_path) -> tuple[list[str], list[float] | None]:
    """`["0.7", "a", "0.3", "b"]` -> (["a", "b"], [0.7, 0.3]); `["a", "b"]` -> (["a", "b"], None).

    A string is split on whitespace. Weights need not sum to 1 (they are normalized later).
    """
    entries = data_path.split() if isinstance(data_path, str) else [str(e).strip() for e in data_path]
    if not entries:
        raise ValueError("--data-path is empty: give a dataset prefix, or weight/prefix pairs like '0.7 a 0.3 b'")
    if _as_weight(entries[0]) is None:
        numbers = [e for e in entries if _as_weight(e) is not None]
        if numbers:
            raise ValueError(f"--data-path {' '.join(entries)}: mixes weights ({', '.join(numbers)}) with unweighted "
                             f"prefixes; give either prefixes only or weight/prefix pairs")
        return entries, None
    if len(entries) % 2:
        raise ValueError(f"--data-path {' '.join(entries)}: odd number of entries ({len(entries)}); weighted "
                         f"blends need weight/prefix pairs like '0.7 a 0.3 b'")
    prefixes, weights = entries[1::2], []
    for text, prefix in zip(entries[0::2], prefixes):
        weight = _as_weight(text)
        if weight is None:
            raise ValueError(f"--data-path: {text!r} (before {prefix!r}) is not a number; expected weight/prefix pairs")
        if not (math.isfinite(weight) and weight > 0):
            raise ValueError(f"--data-path: weight {text} for {prefix!r} must be a positive number")
        if _as_weight(prefix) is not None:
            raise ValueError(f"--data-path: {prefix!r} (after weight {text}) looks like a weight, not a dataset prefix")
        weights.append(weight)
    return prefixes, weights


def normalize(weights) -> list[float]:
    """Weights divided by their sum (float64, as Megatron does it)."""
    w = np.asarray(weights, dtype=np.float64)
    return (w / w.sum()).tolist()


def build_blend_indices(weights: list[float], size: int, cache_dir: str, *, use_cpp: bool | None = None,
                        allow_build: bool = True):
    """Cached (dataset_index, dataset_sample_index) arrays for `size` samples blended by normalized `weights`."""
    weights = normalize(weights)
    description = {"class": "BlendedDataset", "weights": weights, "size": int(size)}

    def build():
        dataset_index, sample_index = build_blending_indices(weights, len(weights), size, use_cpp=use_cpp)
        counts = np.zeros(len(weights), dtype=np.int64)
        for start in range(0, size, 1 << 24):  # chunks: bincount widens int16 to int64
            counts += np.bincount(dataset_index[start : start + (1 << 24)], minlength=len(weights))
        return {"dataset_index": dataset_index, "dataset_sample_index": sample_index, "counts": counts}

    return load_or_build(cache_dir, "BlendedDataset", description, build,
                         ("dataset_index", "dataset_sample_index", "counts"), allow_build)


class BlendedDataset:
    """Samples drawn from several datasets by a precomputed blending index; item i is a dataset's sample."""

    def __init__(self, datasets: list, weights: list[float], cached) -> None:
        self.datasets = list(datasets)
        self.weights = normalize(weights)
        self.paths = cached.paths
        self.cache_hit = cached.cache_hit
        self._set_arrays(cached.arrays)
        for d, (dataset, needed) in enumerate(zip(self.datasets, cached.arrays["counts"])):
            if len(dataset) < needed:
                raise ValueError(f"blend needs {needed} samples from dataset {d} ({dataset}), which has {len(dataset)}")

    def _set_arrays(self, arrays: dict[str, np.ndarray]) -> None:
        self.dataset_index = arrays["dataset_index"]
        self.dataset_sample_index = arrays["dataset_sample_index"]

    def __len__(self) -> int:
        return len(self.dataset_index)

    def __getitem__(self, i) -> np.ndarray:
        i = operator.index(i)
        if not -len(self) <= i < len(self):
            raise IndexError(f"sample {i} out of range for a blend of {len(self)} samples")
        return self.datasets[int(self.dataset_index[i])][int(self.dataset_sample_index[i])]

    def __getstate__(self) -> dict:
        # Workers re-map the cached files instead of receiving copies of the index arrays.
        state = dict(self.__dict__)
        del state["dataset_index"], state["dataset_sample_index"]
        return state

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._set_arrays(load_cached(self.paths))

    def __repr__(self) -> str:
        return f"BlendedDataset(samples={len(self)}, weights={self.weights}, datasets={self.datasets})"
