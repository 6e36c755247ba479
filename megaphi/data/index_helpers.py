"""Index arrays for GPT samples and blends: builders (C++ or numpy), and their on-disk .npy cache."""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import tempfile
import warnings
from typing import Callable, NamedTuple

import numpy as np

logger = logging.getLogger(__name__)

INT32_MAX = np.iinfo(np.int32).max
# Bump when the algorithm changes, so that old caches are never read.
INDEX_FORMAT_VERSION = 1

_extension = None
_extension_error: str | None = None
_warned_fallback = False


def _load_extension():
    """The compiled megaphi._index_helpers module, or None (the reason is kept for messages)."""
    global _extension, _extension_error
    if _extension is None and _extension_error is None:
        try:
            from megaphi import _index_helpers

            _extension = _index_helpers
        except ImportError as error:
            _extension_error = f"{error} (build it with `pip install --no-build-isolation -e .`)"
    return _extension


def cpp_available() -> bool:
    """Whether the C++ index builders are importable."""
    return _load_extension() is not None


def _resolve_use_cpp(use_cpp: bool | None) -> bool:
    """use_cpp=None: C++ unless MEGAPHI_NO_CPP=1 or the extension is missing (then warn once); True: C++ or error."""
    global _warned_fallback
    if use_cpp is None:
        if os.environ.get("MEGAPHI_NO_CPP", "") not in ("", "0"):
            return False
        if _load_extension() is None:
            if not _warned_fallback:
                warnings.warn(f"megaphi._index_helpers not available, using the numpy fallback: {_extension_error}")
                _warned_fallback = True
            return False
        return True
    if use_cpp and _load_extension() is None:
        raise ImportError(f"use_cpp=True but megaphi._index_helpers is not available: {_extension_error}")
    return bool(use_cpp)


def _check_int_array(name: str, array, lowest: int, highest: int) -> np.ndarray:
    """A 1-D int32 contiguous array of values in [lowest, highest], or ValueError."""
    array = np.asarray(array)
    if array.ndim != 1 or not np.issubdtype(array.dtype, np.integer):
        raise ValueError(f"{name} must be a 1-D integer array, got {array.dtype} with shape {array.shape}")
    if array.size and (int(array.min()) < lowest or int(array.max()) > highest):
        raise ValueError(f"{name} has values outside [{lowest}, {highest}]")
    return np.ascontiguousarray(array, dtype=np.int32)


def build_sample_idx(sizes, doc_idx, seq_length: int, num_epochs: int, tokens_per_epoch: int,
                     drop_last_partial: bool = True, add_extra_token: int = 1, *,
                     use_cpp: bool | None = None) -> np.ndarray:
    """Sample starts [num_samples + 1, 2] = (position in doc_idx, token offset); int32 when doc_idx fits, else int64.

    The documents doc_idx names are concatenated; sample s is the seq_length + add_extra_token tokens from
    global position s * seq_length, so each sample starts on the previous sample's last token (when
    add_extra_token=1). num_samples = (num_epochs * tokens_per_epoch - add_extra_token) // seq_length, rounded
    up instead when drop_last_partial is False (the last sample is then short).
    """
    sizes = _check_int_array("sizes", sizes, 0, INT32_MAX)
    doc_idx = _check_int_array("doc_idx", doc_idx, 0, len(sizes) - 1)
    if len(doc_idx) == 0:
        raise ValueError("doc_idx is empty")
    if seq_length < 1 or num_epochs < 1 or tokens_per_epoch < 1:
        raise ValueError(f"seq_length, num_epochs and tokens_per_epoch must be >= 1, got "
                         f"{seq_length}, {num_epochs}, {tokens_per_epoch}")
    if add_extra_token not in (0, 1):
        raise ValueError(f"add_extra_token must be 0 or 1, got {add_extra_token}")
    use_int32 = len(doc_idx) <= INT32_MAX
    if _resolve_use_cpp(use_cpp):
        return _load_extension().build_sample_idx(sizes, doc_idx, int(seq_length), int(num_epochs),
                                                  int(tokens_per_epoch), bool(drop_last_partial),
                                                  int(add_extra_token), use_int32)
    return _sample_idx_numpy(sizes, doc_idx, seq_length, num_epochs * tokens_per_epoch, drop_last_partial,
                             int(add_extra_token), np.int32 if use_int32 else np.int64)


def _sample_idx_numpy(sizes: np.ndarray, doc_idx: np.ndarray, seq_length: int, total_tokens: int,
                      drop_last_partial: bool, extra: int, dtype) -> np.ndarray:
    """Vectorized build_sample_idx: sample s starts in the first document whose end reaches s * seq + extra."""
    usable = total_tokens - extra
    num_samples = usable // seq_length if drop_last_partial else -(-usable // seq_length)
    lengths = sizes[doc_idx].astype(np.int64)
    ends = np.cumsum(lengths)
    starts = np.arange(1, num_samples + 1, dtype=np.int64) * seq_length
    # A sample must hold `extra` tokens past the next one's start, so a start that falls exactly on a
    # document's end (extra=1) belongs to the next non-empty document.
    position = np.searchsorted(ends, starts + extra, side="left")
    offset = np.empty_like(starts)
    found = position < len(doc_idx)
    offset[found] = starts[found] - (ends[position[found]] - lengths[position[found]])
    if not found.all():
        if not found[:-1].all():
            raise ValueError("num_epochs * tokens_per_epoch exceeds the tokens in doc_idx")
        # Only the last, partial sample ends past the data: mark the end of the last document.
        position[-1] = len(doc_idx) - 1
        offset[-1] = lengths[-1] - extra
    out = np.empty((num_samples + 1, 2), dtype=dtype)
    out[0] = 0
    out[1:, 0] = position
    out[1:, 1] = offset
    return out


def build_blending_indices(weights, num_datasets: int, size: int, *,
                           use_cpp: bool | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Greedy blend of `size` samples: (dataset_index int16, dataset_sample_index int64).

    Sample i goes to the dataset with the largest deficit weights[d] * max(i, 1) - count[d] (the first on
    ties); dataset_sample_index counts that dataset's samples so far.
    """
    weights = np.ascontiguousarray(weights, dtype=np.float64)
    if weights.shape != (num_datasets,):
        raise ValueError(f"weights has shape {weights.shape}, expected ({num_datasets},)")
    if not 1 <= num_datasets <= np.iinfo(np.int16).max:
        raise ValueError(f"num_datasets must be in [1, 32767], got {num_datasets}")
    if size < 0:
        raise ValueError(f"size must be >= 0, got {size}")
    if _resolve_use_cpp(use_cpp):
        return _load_extension().build_blending_indices(weights, int(num_datasets), int(size))
    return _blending_python(weights.tolist(), int(size))


def _blending_python(weights: list[float], size: int) -> tuple[np.ndarray, np.ndarray]:
    """Pure-Python greedy blend (each step depends on the last, so it does not vectorize): ~1 s per 1M samples."""
    counts = [0] * len(weights)
    chosen = [0] * size
    sample = [0] * size
    others = range(1, len(weights))
    for i in range(size):
        x = float(i) if i > 1 else 1.0
        best, best_error = 0, weights[0] * x - counts[0]
        for d in others:
            error = weights[d] * x - counts[d]
            if error > best_error:
                best, best_error = d, error
        chosen[i] = best
        sample[i] = counts[best]
        counts[best] += 1
    return np.array(chosen, dtype=np.int16), np.array(sample, dtype=np.int64)


def build_document_index(documents: np.ndarray, num_epochs: int, rng: np.random.RandomState,
                         separate_final_epoch: bool) -> np.ndarray:
    """num_epochs copies of `documents` shuffled together (int32); the final epoch shuffled on its own if separate."""
    if not separate_final_epoch or num_epochs == 1:
        index = np.tile(np.asarray(documents, dtype=np.int32), num_epochs)
        rng.shuffle(index)
        return index
    first = build_document_index(documents, num_epochs - 1, rng, False)
    last = build_document_index(documents, 1, rng, False)
    return np.concatenate((first, last))


def build_shuffle_index(num_samples: int, total_size: int, rng: np.random.RandomState) -> np.ndarray:
    """A shuffled arange(total_size), with [0, num_samples) and [num_samples, total_size) shuffled apart."""
    dtype = np.uint32 if total_size < np.iinfo(np.uint32).max - 1 else np.int64
    first = np.arange(num_samples, dtype=dtype)
    rng.shuffle(first)
    if num_samples == total_size:
        return first
    last = np.arange(num_samples, total_size, dtype=dtype)
    rng.shuffle(last)
    return np.concatenate((first, last))


def num_epochs_needed(tokens_per_epoch: int, num_samples: int, seq_length: int, add_extra_token: int = 1) -> int:
    """Fewest epochs whose tokens cover num_samples samples of seq_length (+ the one extra token)."""
    needed = num_samples * seq_length + add_extra_token
    return max(1, -(-needed // tokens_per_epoch))


def build_gpt_indices(sizes, documents, seq_length: int, num_samples: int, seed: int, *,
                      add_extra_token: int = 1, use_cpp: bool | None = None) -> dict[str, np.ndarray]:
    """Megatron's GPTDataset indices for `documents` (sequence ids): document_index, sample_index, shuffle_index.

    Enough epochs to cover num_samples; all epochs' documents are shuffled together with RandomState(seed),
    except that a final epoch contributing under 80% of an epoch's samples is shuffled apart (in both the
    document and the shuffle index), so that the samples first used are drawn from whole epochs.
    """
    sizes = np.asarray(sizes)
    documents = np.asarray(documents)
    tokens_per_epoch = int(sizes[documents].sum(dtype=np.int64))
    if tokens_per_epoch < seq_length + add_extra_token:
        raise ValueError(f"{len(documents)} documents hold {tokens_per_epoch} tokens, fewer than one sample "
                         f"of seq_length + {add_extra_token} = {seq_length + add_extra_token}")
    num_epochs = num_epochs_needed(tokens_per_epoch, num_samples, seq_length, add_extra_token)
    separate_final_epoch = False
    if num_epochs > 1:
        samples_before_final = ((num_epochs - 1) * tokens_per_epoch - add_extra_token) // seq_length
        samples_per_epoch = (tokens_per_epoch - add_extra_token) // seq_length
        separate_final_epoch = num_samples - samples_before_final < int(0.80 * samples_per_epoch)
    rng = np.random.RandomState(seed)
    document_index = build_document_index(documents, num_epochs, rng, separate_final_epoch)
    sample_index = build_sample_idx(sizes, document_index, seq_length, num_epochs, tokens_per_epoch,
                                    True, add_extra_token, use_cpp=use_cpp)
    total = len(sample_index) - 1
    shuffle_index = build_shuffle_index(samples_before_final if separate_final_epoch else total, total, rng)
    return {"document_index": document_index, "sample_index": sample_index, "shuffle_index": shuffle_index}


def blend_sizes(weights: list[float], num_samples: int, surplus: float = 0.005) -> tuple[list[int], list[int]]:
    """Per-dataset (target, buffered) sample counts for a blend: ceil(n * w) and ceil(ceil(n * w) * (1 + surplus))."""
    targets = [math.ceil(num_samples * w) for w in weights]
    return targets, [math.ceil(t * (1 + surplus)) for t in targets]


def _save_atomic(path: str, write: Callable) -> None:
    """Write through a temporary file in the same folder, then rename over `path`."""
    folder = os.path.dirname(path) or "."
    handle, tmp = tempfile.mkstemp(dir=folder, prefix=".tmp-", suffix=os.path.basename(path))
    try:
        with os.fdopen(handle, "wb") as f:
            write(f)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


class CachedArrays(NamedTuple):
    """Index arrays loaded from the cache (mmap), their files, and whether they were there before the call."""

    arrays: dict[str, np.ndarray]
    paths: dict[str, str]
    cache_hit: bool


def load_or_build(cache_dir: str, kind: str, description: dict, build: Callable[[], dict[str, np.ndarray]],
                  names: tuple[str, ...], allow_build: bool = True) -> CachedArrays:
    """Arrays from `{cache_dir}/{md5(description)}-{kind}-{name}.npy` (mmap), built and saved first on a miss.

    The description JSON is written last, so a complete set of files marks a finished build.
    allow_build=False (ranks other than 0) makes a miss an error instead of a build.
    """
    text = json.dumps({**description, "format_version": INDEX_FORMAT_VERSION}, indent=2, sort_keys=True)
    digest = hashlib.md5(text.encode("utf-8")).hexdigest()
    base = os.path.join(cache_dir, f"{digest}-{kind}")
    paths = {name: f"{base}-{name}.npy" for name in names}
    description_path = f"{base}-description.json"
    cache_hit = all(os.path.isfile(p) for p in [description_path, *paths.values()])
    if not cache_hit:
        if not allow_build:
            raise RuntimeError(f"index cache {description_path} is missing after rank 0 built it: "
                               f"cache_dir must be a folder that every rank sees")
        try:
            os.makedirs(cache_dir, exist_ok=True)
        except OSError as error:
            raise ValueError(f"cannot create the index cache folder {cache_dir} ({error}): pass cache_dir") from None
        arrays = build()
        for name, path in paths.items():
            _save_atomic(path, lambda f, a=arrays[name]: np.save(f, a, allow_pickle=False))
        _save_atomic(description_path, lambda f: f.write(text.encode("utf-8")))
    return CachedArrays(load_cached(paths), paths, cache_hit)


def load_cached(paths: dict[str, str]) -> dict[str, np.ndarray]:
    """Memory-map cached .npy index files; an unreadable one is a ValueError naming it."""
    arrays = {}
    for name, path in paths.items():
        try:
            arrays[name] = np.load(path, mmap_mode="r", allow_pickle=False)
        except (OSError, ValueError) as error:
            raise ValueError(f"unreadable index cache file {path} ({error}): delete it to rebuild") from None
    return arrays
