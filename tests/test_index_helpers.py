"""Index builders: C++ and numpy give identical arrays; sample starts and blends mean what they should."""

import subprocess
import sys

import numpy as np
import pytest

from megaphi.data import index_helpers as ih


def _random_case(rng):
    """Random sizes (empty, tiny, longer than seq) and a multi-epoch shuffled doc_idx."""
    n = int(rng.integers(1, 40))
    high = int(rng.choice([2, 5, 30, 400]))
    sizes = rng.integers(0, high, size=n).astype(np.int32)
    sizes[rng.random(n) < 0.2] = 0  # empty sequences
    if sizes.sum() < 2:
        sizes[0] = 2
    epochs = int(rng.integers(1, 4))
    doc_idx = np.tile(np.arange(n, dtype=np.int32), epochs)
    rng.shuffle(doc_idx)
    seq = int(rng.choice([1, 2, 3, 7, 16, 64, 1000]))
    return sizes, doc_idx, seq, epochs, int(sizes.sum())


def test_cpp_extension_is_built():
    assert ih.cpp_available(), f"megaphi._index_helpers missing: {ih._extension_error}"


def test_sample_idx_cpp_equals_numpy_on_random_inputs():
    rng = np.random.default_rng(0)
    for _ in range(400):
        sizes, doc_idx, seq, epochs, tokens = _random_case(rng)
        for drop_last in (True, False):
            for extra in (0, 1):
                args = (sizes, doc_idx, seq, epochs, tokens, drop_last, extra)
                cpp = ih.build_sample_idx(*args, use_cpp=True)
                ref = ih.build_sample_idx(*args, use_cpp=False)
                assert cpp.dtype == ref.dtype == np.int32
                np.testing.assert_array_equal(cpp, ref, err_msg=str(args))


def test_sample_idx_int64_variant_matches():
    rng = np.random.default_rng(1)
    for _ in range(50):
        sizes, doc_idx, seq, epochs, tokens = _random_case(rng)
        cpp = ih._load_extension().build_sample_idx(sizes, doc_idx, seq, epochs, tokens, True, 1, False)
        ref = ih._sample_idx_numpy(sizes, doc_idx, seq, epochs * tokens, True, 1, np.int64)
        assert cpp.dtype == ref.dtype == np.int64
        np.testing.assert_array_equal(cpp, ref)


@pytest.mark.parametrize("use_cpp", [True, False])
def test_sample_idx_rows_are_consecutive_windows_of_the_token_stream(use_cpp):
    """Row s -> row s+1 (+ extra) must cover global token positions [s*seq, (s+1)*seq + extra), nothing else."""
    rng = np.random.default_rng(2)
    for _ in range(200):
        sizes, doc_idx, seq, epochs, tokens = _random_case(rng)
        for extra in (0, 1):
            idx = ih.build_sample_idx(sizes, doc_idx, seq, epochs, tokens, True, extra, use_cpp=use_cpp)
            starts = np.concatenate([[0], np.cumsum(sizes[doc_idx].astype(np.int64))])
            assert len(idx) - 1 == (epochs * tokens - extra) // seq
            for s in range(len(idx) - 1):
                (d0, o0), (d1, o1) = idx[s], idx[s + 1]
                assert 0 <= o0 <= sizes[doc_idx[d0]] - extra or (o0 == 0 and s == 0)
                assert starts[d0] + o0 == s * seq
                assert starts[d1] + o1 + extra == (s + 1) * seq + extra
                assert o1 + extra <= sizes[doc_idx[d1]]


def test_sample_idx_partial_last_sample():
    sizes = np.array([5, 0, 5], np.int32)
    doc_idx = np.array([0, 1, 2], np.int32)
    for use_cpp in (True, False):
        full = ih.build_sample_idx(sizes, doc_idx, 4, 1, 10, True, 1, use_cpp=use_cpp)
        assert full.tolist() == [[0, 0], [0, 4], [2, 3]]  # tokens [0, 5) and [4, 9); token 9 is dropped
        partial = ih.build_sample_idx(sizes, doc_idx, 4, 1, 10, False, 1, use_cpp=use_cpp)
        assert partial.tolist() == [[0, 0], [0, 4], [2, 3], [2, 4]]  # a third, short sample: tokens [8, 10)


@pytest.mark.parametrize("use_cpp", [True, False])
def test_sample_idx_errors(use_cpp):
    sizes = np.array([3, 4], np.int32)
    with pytest.raises(ValueError, match="doc_idx has values outside"):
        ih.build_sample_idx(sizes, np.array([0, 2], np.int32), 2, 1, 7, use_cpp=use_cpp)
    with pytest.raises(ValueError, match="doc_idx is empty"):
        ih.build_sample_idx(sizes, np.array([], np.int32), 2, 1, 7, use_cpp=use_cpp)
    with pytest.raises(ValueError, match="seq_length"):
        ih.build_sample_idx(sizes, np.array([0, 1], np.int32), 0, 1, 7, use_cpp=use_cpp)
    with pytest.raises(ValueError, match="exceeds the tokens"):
        ih.build_sample_idx(sizes, np.array([0, 1], np.int32), 2, 3, 7, use_cpp=use_cpp)


def test_blending_cpp_equals_python_and_follows_weights():
    rng = np.random.default_rng(3)
    for k in (1, 2, 3, 5, 17):
        for _ in range(3):
            weights = rng.random(k) ** 3 + 1e-3
            weights /= weights.sum()
            size = int(rng.integers(0, 5000))
            cpp = ih.build_blending_indices(weights, k, size, use_cpp=True)
            ref = ih.build_blending_indices(weights, k, size, use_cpp=False)
            for a, b, dtype in zip(cpp, ref, (np.int16, np.int64)):
                assert a.dtype == b.dtype == dtype
                np.testing.assert_array_equal(a, b)
            dataset_index, sample_index = cpp
            counts = np.bincount(dataset_index, minlength=k)
            assert np.all(np.abs(counts - weights * size) <= 1.0 + 1e-9)
            for d in range(k):  # each dataset's samples are taken in order 0, 1, 2, ...
                np.testing.assert_array_equal(sample_index[dataset_index == d], np.arange(counts[d]))


def test_blending_greedy_rule_small_case():
    # Deficits at i=0 and i=1 both use x=1: 0.7-0 > 0.3-0 -> 0; then 0.7-1 < 0.3-0 -> 1; x=2: 1.4-1 > 0.6-1 -> 0.
    dataset_index, sample_index = ih.build_blending_indices([0.7, 0.3], 2, 5)
    assert dataset_index.tolist() == [0, 1, 0, 0, 1]
    assert sample_index.tolist() == [0, 0, 1, 2, 1]


def test_blending_errors():
    with pytest.raises(ValueError, match="shape"):
        ih.build_blending_indices([0.5, 0.5], 3, 10)
    with pytest.raises(ValueError, match="size"):
        ih.build_blending_indices([1.0], 1, -1)


def test_build_gpt_indices_matches_an_independent_shuffle():
    sizes = np.arange(1, 31, dtype=np.int32)
    documents = np.arange(5, 25)
    tokens, seq = int(sizes[5:25].sum()), 16  # 310 tokens: 19 samples per epoch
    # (samples, epochs, final epoch shuffled apart): the final epoch is apart when it adds < int(0.8 * 19) samples.
    for num_samples, epochs, separate in ((10, 1, False), (20, 2, True), (36, 2, False), (40, 3, True)):
        out = ih.build_gpt_indices(sizes, documents, seq, num_samples, seed=7)
        assert ih.num_epochs_needed(tokens, num_samples, seq) == epochs
        rng = np.random.RandomState(7)
        if separate:  # second epoch holds 1 sample, under 80% of an epoch: it is shuffled on its own
            first, last = np.tile(documents.astype(np.int32), epochs - 1), documents.astype(np.int32)
            rng.shuffle(first)
            rng.shuffle(last)
            expected_docs = np.concatenate([first, last])
        else:
            expected_docs = np.tile(documents.astype(np.int32), epochs)
            rng.shuffle(expected_docs)
        np.testing.assert_array_equal(out["document_index"], expected_docs)
        total = len(out["sample_index"]) - 1
        assert total >= num_samples
        before_final = ((epochs - 1) * tokens - 1) // seq if separate else total
        expected_shuffle = np.arange(before_final, dtype=np.uint32)
        rng.shuffle(expected_shuffle)
        if separate:
            tail = np.arange(before_final, total, dtype=np.uint32)
            rng.shuffle(tail)
            expected_shuffle = np.concatenate([expected_shuffle, tail])
        np.testing.assert_array_equal(out["shuffle_index"], expected_shuffle)
        assert out["shuffle_index"].dtype == np.uint32


def test_no_cpp_env_selects_numpy(monkeypatch):
    monkeypatch.setenv("MEGAPHI_NO_CPP", "1")
    assert ih._resolve_use_cpp(None) is False
    assert ih._resolve_use_cpp(True) is True
    monkeypatch.delenv("MEGAPHI_NO_CPP")
    assert ih._resolve_use_cpp(None) is True


def test_missing_extension_falls_back_with_one_warning():
    # A real interpreter where the extension cannot be imported (a None entry in sys.modules blocks it).
    script = """
import sys, warnings
sys.modules["megaphi._index_helpers"] = None
import numpy as np
from megaphi.data import index_helpers as ih
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    a = ih.build_sample_idx(np.array([5, 6], np.int32), np.array([1, 0], np.int32), 3, 1, 11)
    b = ih.build_blending_indices([0.5, 0.5], 2, 4)
print(len(caught), "numpy fallback" in str(caught[0].message), a.tolist(), b[0].tolist())
try:
    ih.build_sample_idx(np.array([5], np.int32), np.array([0], np.int32), 3, 1, 5, use_cpp=True)
except ImportError as error:
    print("ImportError", "pip install" in str(error))
"""
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True).stdout
    assert out.splitlines() == ["1 True [[0, 0], [0, 3], [1, 0], [1, 3]] [0, 1, 0, 1]", "ImportError True"]
