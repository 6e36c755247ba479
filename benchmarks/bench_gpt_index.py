"""Time to build GPT sample indices for a synthetic ~10B-token dataset at seq 2048: C++ builders vs numpy fallback.

    .venv/bin/python benchmarks/bench_gpt_index.py                        # 10M documents of ~1000 tokens
    .venv/bin/python benchmarks/bench_gpt_index.py --documents 1000000    # a quicker, 1B-token run

Only the sequence-length array exists (no tokens are written): it is what the index builders read. Each phase
of GPTDataset's build (document index, sample index, shuffle index) is timed for both implementations in the
same run, then the greedy blending index; the arrays of both are checked to be equal.
"""

import argparse
import time

import numpy as np

from megaphi.data import index_helpers as ih


def timed(fn):
    """(result, seconds) of fn()."""
    start = time.perf_counter()
    result = fn()
    return result, time.perf_counter() - start


def gpt_phases(sizes, seq_length, num_samples, seed, use_cpp):
    """The three GPTDataset index phases (as build_gpt_indices runs them), each timed."""
    documents = np.arange(len(sizes))
    tokens_per_epoch = int(sizes.sum(dtype=np.int64))
    epochs = ih.num_epochs_needed(tokens_per_epoch, num_samples, seq_length)
    rng = np.random.RandomState(seed)
    doc_index, t_doc = timed(lambda: ih.build_document_index(documents, epochs, rng, False))
    sample_index, t_sample = timed(lambda: ih.build_sample_idx(sizes, doc_index, seq_length, epochs,
                                                               tokens_per_epoch, use_cpp=use_cpp))
    total = len(sample_index) - 1
    shuffle_index, t_shuffle = timed(lambda: ih.build_shuffle_index(total, total, rng))
    return (doc_index, sample_index, shuffle_index), {"document": t_doc, "sample": t_sample, "shuffle": t_shuffle}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--documents", type=int, default=10_000_000, help="number of documents")
    parser.add_argument("--mean-length", type=int, default=1000, help="mean document length in tokens")
    parser.add_argument("--seq-length", type=int, default=2048)
    parser.add_argument("--epochs", type=float, default=1.0, help="samples requested, in epochs of the data")
    parser.add_argument("--blend-samples", type=int, default=2_000_000, help="blended samples for the blend index")
    parser.add_argument("--seed", type=int, default=1234)
    args = parser.parse_args()

    rng = np.random.default_rng(0)
    sizes = rng.integers(1, 2 * args.mean_length, size=args.documents, dtype=np.int32)
    tokens = int(sizes.sum(dtype=np.int64))
    num_samples = int(args.epochs * (tokens - 1) // args.seq_length)
    print(f"{args.documents:,} documents, {tokens / 1e9:.2f}B tokens, seq {args.seq_length}, "
          f"{num_samples:,} samples requested, C++ extension: {ih.cpp_available()}")

    results = {}
    for name, use_cpp in (("C++", True), ("numpy", False)):
        arrays, times = gpt_phases(sizes, args.seq_length, num_samples, args.seed, use_cpp)
        results[name] = (arrays, times)
        phases = ", ".join(f"{phase} {t:.2f} s" for phase, t in times.items())
        print(f"  {name:>5}: {phases}; total {sum(times.values()):.2f} s")
    same = all(np.array_equal(a, b) for a, b in zip(results["C++"][0], results["numpy"][0]))
    cpp_t, np_t = results["C++"][1], results["numpy"][1]
    print(f"  identical arrays: {same}; sample index numpy/C++ = {np_t['sample'] / cpp_t['sample']:.1f}x, "
          f"whole build numpy/C++ = {sum(np_t.values()) / sum(cpp_t.values()):.2f}x")

    weights = [0.6, 0.3, 0.1]
    cpp_blend, t_cpp = timed(lambda: ih.build_blending_indices(weights, 3, args.blend_samples, use_cpp=True))
    py_blend, t_py = timed(lambda: ih.build_blending_indices(weights, 3, args.blend_samples, use_cpp=False))
    same = all(np.array_equal(a, b) for a, b in zip(cpp_blend, py_blend))
    print(f"blending index, 3 datasets, {args.blend_samples:,} samples: C++ {t_cpp:.3f} s, Python {t_py:.2f} s "
          f"({t_py / t_cpp:.0f}x), identical: {same}")


if __name__ == "__main__":
    main()
