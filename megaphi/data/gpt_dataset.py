"""GPT training samples as Megatron's GPTDataset builds them: split, shuffled documents, packed fixed-length samples.

Sample i of a split is a pure function of (data files, split, seed, seq_length, num_samples, i): the index arrays
are built once (by global rank 0 under torch.distributed), cached as .npy files and memory-mapped. For the same
data, split, seed and sizes they equal Megatron-LM's arrays (same RandomState draws: all epochs' documents are
shuffled together, a short final epoch apart), so a run can move between the two and keep its sample order.
"""

from __future__ import annotations

import logging
import operator
import os
import sys
import time
import warnings

import numpy as np

from megaphi.data.blended_dataset import BlendedDataset, build_blend_indices, normalize, parse_data_path
from megaphi.data.index_helpers import blend_sizes, build_gpt_indices, load_cached, load_or_build
from megaphi.data.indexed_dataset import IndexedDataset

__all__ = ["GPTDataset", "build_train_valid_test_datasets", "parse_data_path", "parse_split", "split_ranges"]

logger = logging.getLogger(__name__)

SPLITS = ("train", "valid", "test")
INDEX_NAMES = ("document_index", "sample_index", "shuffle_index")


def parse_split(split: str) -> list[float]:
    """`"969,30,1"` -> normalized train/valid/test weights; missing trailing entries are 0 (`"98,2"`)."""
    parts = [p.strip() for p in str(split).replace("/", ",").split(",")]
    if not 1 <= len(parts) <= 3:
        raise ValueError(f"--split {split!r}: expected 1 to 3 comma-separated weights like '969,30,1'")
    weights = []
    for part in parts:
        try:
            weight = float(part)
        except ValueError:
            raise ValueError(f"--split {split!r}: {part!r} is not a number") from None
        if not (np.isfinite(weight) and weight >= 0):
            raise ValueError(f"--split {split!r}: weights must be finite and >= 0, got {part}")
        weights.append(weight)
    weights += [0.0] * (3 - len(weights))
    if sum(weights) <= 0:
        raise ValueError(f"--split {split!r}: the weights sum to 0")
    return normalize(weights)


def split_ranges(weights: list[float], num_sequences: int) -> list[tuple[int, int] | None]:
    """Per split, the sequence range [begin, end) Megatron gives it (rounded cumulative fractions), or None."""
    bounds = [0.0]
    for w in weights:
        bounds.append(bounds[-1] + w)
    ranges = []
    for lo, hi in zip(bounds[:-1], bounds[1:]):
        begin, end = int(round(lo * float(num_sequences))), int(round(hi * float(num_sequences)))
        ranges.append((begin, end) if hi > lo and end > begin else None)
    return ranges


def _file_identity(prefix: str) -> dict:
    """What ties a cache to the data files: real path, sizes and modification times."""
    identity = {"path": os.path.realpath(prefix)}
    for ext in ("idx", "bin"):
        stat = os.stat(f"{prefix}.{ext}")
        identity[f"{ext}_bytes"] = stat.st_size
        identity[f"{ext}_mtime_ns"] = stat.st_mtime_ns
    return identity


class GPTDataset:
    """Fixed-length samples (seq_length + 1 tokens, int64) packed across the documents of one split."""

    def __init__(self, indexed: IndexedDataset, split: str, sequence_range: tuple[int, int], num_samples: int,
                 seq_length: int, seed: int, cache_dir: str | None = None, *, use_cpp: bool | None = None,
                 allow_build: bool = True) -> None:
        self.prefix = indexed.prefix
        self.split = split
        self.sequence_range = (int(sequence_range[0]), int(sequence_range[1]))
        self.seq_length = int(seq_length)
        self.num_samples = int(num_samples)
        self._dataset = indexed
        begin, end = self.sequence_range
        tokens = int(np.asarray(indexed.sequence_lengths[begin:end]).sum(dtype=np.int64))
        if tokens < seq_length + 1:
            raise ValueError(f"{self.prefix}: the {split} split (sequences {begin}..{end - 1}) holds {tokens} tokens, "
                             f"fewer than one sample of seq_length + 1 = {seq_length + 1}")
        description = {
            "class": "GPTDataset", "dataset": _file_identity(self.prefix), "split": split,
            "sequence_range": list(self.sequence_range), "seed": int(seed), "seq_length": self.seq_length,
            "num_samples": self.num_samples, "add_extra_token": 1, "drop_last_partial": True,
        }

        def build():
            return build_gpt_indices(indexed.sequence_lengths, np.arange(begin, end), self.seq_length,
                                     self.num_samples, seed, use_cpp=use_cpp)

        started = time.perf_counter()
        cached = load_or_build(cache_dir or f"{self.prefix}_cache", f"GPTDataset-{split}", description, build,
                               INDEX_NAMES, allow_build)
        self.paths, self.cache_hit = cached.paths, cached.cache_hit
        self._set_arrays(cached.arrays)
        epochs = len(self.document_index) // (end - begin)
        logger.info("%s %s: %d samples (%d requested), %d epoch(s), %s in %.2f s", self.prefix, split, len(self),
                    num_samples, epochs, "loaded" if self.cache_hit else "built", time.perf_counter() - started)

    def _set_arrays(self, arrays: dict[str, np.ndarray]) -> None:
        self.document_index = arrays["document_index"]
        self.sample_index = arrays["sample_index"]
        self.shuffle_index = arrays["shuffle_index"]

    def __len__(self) -> int:
        return len(self.sample_index) - 1

    def __getitem__(self, i) -> np.ndarray:
        i = operator.index(i)
        if not -len(self) <= i < len(self):
            raise IndexError(f"sample {i} out of range for {self} with {len(self)} samples")
        j = int(self.shuffle_index[i])
        (first, offset), (last, end) = self.sample_index[j], self.sample_index[j + 1]
        first, offset, last, end = int(first), int(offset), int(last), int(end) + 1  # + 1: the extra token
        if first == last:
            return self._dataset.get(int(self.document_index[first]), offset, end - offset).astype(np.int64)
        out = np.empty(self.seq_length + 1, dtype=np.int64)
        filled = 0
        for position in range(first, last + 1):
            sequence = int(self.document_index[position])
            stop = end if position == last else int(self._dataset.sequence_lengths[sequence])
            part = self._dataset.get(sequence, offset, stop - offset)
            out[filled : filled + len(part)] = part
            filled += len(part)
            offset = 0
        if filled != len(out):
            raise RuntimeError(f"sample {i} of {self} has {filled} tokens, expected {len(out)}: stale index cache "
                               f"({self.paths['sample_index']})? delete it to rebuild")
        return out

    def __getstate__(self) -> dict:
        # Workers re-open the data and re-map the cached indices instead of receiving copies.
        state = dict(self.__dict__)
        for name in ("_dataset", *INDEX_NAMES):
            del state[name]
        return state

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._dataset = IndexedDataset(self.prefix)
        self._set_arrays(load_cached(self.paths))

    def __repr__(self) -> str:
        return f"GPTDataset({self.prefix!r}, split={self.split}, seq_length={self.seq_length})"


def _distributed():
    """torch.distributed when a process group is up (torch is never imported from here), else None."""
    dist = sys.modules.get("torch.distributed")
    if dist is not None and dist.is_available() and dist.is_initialized():
        return dist
    return None


def build_train_valid_test_datasets(data_path, split: str, seq_length: int, seed: int,
                                    num_samples: tuple[int, int, int], cache_dir: str | None = None, *,
                                    use_cpp: bool | None = None):
    """(train, valid, test) datasets from `--data-path` prefixes (optionally weighted) and a `--split` string.

    A split is None when it gets no sequences or 0 samples are requested. Each dataset yields int64 arrays
    of seq_length + 1 tokens and holds at least the requested number of samples. Several prefixes are blended
    by their weights (unweighted: by their tokens in the split; a prefix with no sequences in a split is left
    out of that split's blend with a warning); one prefix, weighted or not, gives a plain GPTDataset. Index
    arrays are cached in `cache_dir` (default `<prefix>_cache/` beside the data); under torch.distributed,
    global rank 0 builds them while the other ranks wait at a barrier, then load them.
    """
    prefixes, weights = parse_data_path(data_path)
    split_weights = parse_split(split)
    if isinstance(seq_length, bool) or not isinstance(seq_length, (int, np.integer)) or seq_length < 1:
        raise ValueError(f"--seq-length must be a positive integer, got {seq_length!r}")
    num_samples = tuple(num_samples)
    if len(num_samples) != 3 or any(not isinstance(n, (int, np.integer)) or n < 0 for n in num_samples):
        raise ValueError(f"num_samples must be three integers >= 0 (train, valid, test), got {num_samples!r}")
    for prefix in prefixes:
        missing = [f"{prefix}.{ext}" for ext in ("bin", "idx") if not os.path.isfile(f"{prefix}.{ext}")]
        if missing:
            raise ValueError(f"--data-path: dataset {prefix!r} not found: missing {' and '.join(missing)}")
    args = (prefixes, weights, split_weights, int(seq_length), int(seed), num_samples, cache_dir, use_cpp)
    dist = _distributed()
    if dist is None:
        return _build(*args, allow_build=True)
    if dist.get_rank() == 0:
        try:
            return _build(*args, allow_build=True)
        finally:
            dist.barrier()  # also on failure, so the other ranks fail instead of hanging
    dist.barrier()
    return _build(*args, allow_build=False)


def _build(prefixes, weights, split_weights, seq_length, seed, num_samples, cache_dir, use_cpp, allow_build):
    """The three splits; see build_train_valid_test_datasets."""
    indexed = [IndexedDataset(p) for p in prefixes]
    ranges = [split_ranges(split_weights, len(ds)) for ds in indexed]
    options = {"use_cpp": use_cpp, "allow_build": allow_build}
    result = []
    for s, split in enumerate(SPLITS):
        members = [(d, ranges[d][s]) for d in range(len(indexed)) if ranges[d][s] is not None]
        n = num_samples[s]
        if n == 0 or not members:
            result.append(None)
            continue
        if len(members) < len(indexed):
            left_out = [prefixes[d] for d in range(len(indexed)) if ranges[d][s] is None]
            warnings.warn(f"{split} split: {', '.join(left_out)} hold no sequences for it; blending the others")
        if len(members) == 1:
            d, span = members[0]
            result.append(GPTDataset(indexed[d], split, span, n, seq_length, seed, cache_dir, **options))
            continue
        if weights is None:  # unweighted blend: in proportion to each dataset's tokens in this split
            split_weights_here = [float(np.asarray(indexed[d].sequence_lengths[b:e]).sum(dtype=np.int64))
                                  for d, (b, e) in members]
        else:
            split_weights_here = [weights[d] for d, _ in members]
        blend_weights = normalize(split_weights_here)
        targets, buffered = blend_sizes(blend_weights, n)
        cached = build_blend_indices(blend_weights, sum(targets), cache_dir or f"{prefixes[members[0][0]]}_cache",
                                     **options)
        counts = cached.arrays["counts"]
        datasets = [GPTDataset(indexed[d], split, span, max(buffered[k], int(counts[k])), seq_length, seed,
                               cache_dir, **options) for k, (d, span) in enumerate(members)]
        result.append(BlendedDataset(datasets, blend_weights, cached))
    return tuple(result)
