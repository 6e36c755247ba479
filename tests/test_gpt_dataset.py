"""GPT samples from real indexed datasets on disk: packing, splits, blending, caching, ranks and bad input."""

import os
import pickle
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from megaphi.data.blended_dataset import BlendedDataset
from megaphi.data.gpt_dataset import (GPTDataset, build_train_valid_test_datasets, parse_data_path, parse_split,
                                      split_ranges)
from megaphi.data.indexed_dataset import IndexedDataset, IndexedDatasetBuilder

SEQ = 16


def write_dataset(prefix, docs, dtype=np.uint16) -> str:
    """Write documents (token arrays; empty ones allowed) with the project's own builder."""
    with IndexedDatasetBuilder(str(prefix), dtype) as builder:
        for doc in docs:
            builder.add_document([np.asarray(doc)] if len(doc) else [])
    return str(prefix)


def random_docs(seed: int, n: int, low: int = 0, high: int = 1000, max_len: int = 3 * SEQ):
    """Documents of 0 .. max_len tokens (empty, shorter and longer than a sample) drawn from [low, high)."""
    rng = np.random.default_rng(seed)
    return [rng.integers(low, high, size=int(rng.integers(0, max_len))) for _ in range(n)]


def reference_samples(indexed: IndexedDataset, dataset: GPTDataset) -> list[np.ndarray]:
    """Unshuffled sample k = tokens[k*seq : k*seq + seq + 1] of the documents concatenated in document_index order."""
    tokens = np.concatenate([indexed.get(int(d)) for d in dataset.document_index]).astype(np.int64)
    seq = dataset.seq_length
    return [tokens[k * seq : k * seq + seq + 1] for k in range(len(dataset))]


def check_packing(indexed: IndexedDataset, dataset: GPTDataset) -> None:
    """Every sample equals the reference sample its shuffle index names; indices cover their ranges exactly."""
    begin, end = dataset.sequence_range
    epochs = len(dataset.document_index) // (end - begin)
    counts = np.bincount(np.asarray(dataset.document_index) - begin, minlength=end - begin)
    assert len(counts) == end - begin and np.all(counts == epochs)  # each sequence of the split, once per epoch
    assert sorted(np.asarray(dataset.shuffle_index).tolist()) == list(range(len(dataset)))
    reference = np.stack(reference_samples(indexed, dataset))
    samples = [dataset[i] for i in range(len(dataset))]
    assert {(s.dtype, s.shape) for s in samples} == {(np.dtype(np.int64), (dataset.seq_length + 1,))}
    np.testing.assert_array_equal(np.stack(samples), reference[np.asarray(dataset.shuffle_index, dtype=np.int64)])


@pytest.fixture
def corpus(tmp_path):
    """One dataset of 60 documents (some empty) with uint16 tokens."""
    return write_dataset(tmp_path / "corpus_text_document", random_docs(0, 60))


@pytest.mark.parametrize("use_cpp", [True, False])
def test_samples_pack_shuffled_documents_across_epochs(corpus, tmp_path, use_cpp):
    indexed = IndexedDataset(corpus)
    tokens = int(np.asarray(indexed.sequence_lengths).sum())
    # ~2.5 epochs of train samples, so documents repeat and the final epoch is shuffled apart.
    train, valid, test = build_train_valid_test_datasets([corpus], "80,15,5", SEQ, 1234,
                                                         (int(2.5 * 0.8 * tokens) // SEQ, 5, 2),
                                                         cache_dir=str(tmp_path / "cache"), use_cpp=use_cpp)
    for dataset in (train, valid, test):
        check_packing(indexed, dataset)
    assert len(train.document_index) // (train.sequence_range[1] - train.sequence_range[0]) == 3


def test_megatron_written_fixture(megatron_fixtures, tmp_path):
    prefix = str(megatron_fixtures / "spm_eod_text_document")
    train, valid, test = build_train_valid_test_datasets([prefix], "90,8,2", 64, 42, (300, 20, 1),
                                                         cache_dir=str(tmp_path))
    indexed = IndexedDataset(prefix)
    assert train.sequence_range == (0, round(0.9 * len(indexed)))
    for dataset in (train, valid, test):
        assert len(dataset) >= dataset.num_samples
        check_packing(indexed, dataset)


def test_len_getitem_and_pickle(corpus, tmp_path):
    train, _, _ = build_train_valid_test_datasets([corpus], "1", SEQ, 1, (50, 0, 0), cache_dir=str(tmp_path))
    assert len(train) >= 50
    np.testing.assert_array_equal(train[-1], train[len(train) - 1])
    np.testing.assert_array_equal(train[np.int64(3)], train[3])
    with pytest.raises(IndexError):
        train[len(train)]
    data = pickle.dumps(train)
    assert len(data) < 4096  # the index arrays are re-mapped from the cache, not copied
    clone = pickle.loads(data)
    for i in range(len(train)):
        np.testing.assert_array_equal(clone[i], train[i])


def test_parse_split_and_ranges():
    assert parse_split("969,30,1") == pytest.approx([0.969, 0.03, 0.001])
    assert parse_split("98,2") == pytest.approx([0.98, 0.02, 0.0])
    assert parse_split("1") == [1.0, 0.0, 0.0]
    assert split_ranges(parse_split("969,30,1"), 1000) == [(0, 969), (969, 999), (999, 1000)]
    assert split_ranges(parse_split("98,2"), 100) == [(0, 98), (98, 100), None]
    assert split_ranges(parse_split("1,1,1"), 7) == [(0, 2), (2, 5), (5, 7)]  # rounded cumulative thirds
    assert split_ranges(parse_split("1,1,1"), 2) == [(0, 1), None, (1, 2)]  # rounding leaves valid empty


@pytest.mark.parametrize("bad", ["a,b", "1,2,3,4", "-1,2,3", "0,0,0", "", "1,,2", "inf,1"])
def test_bad_split_strings(bad):
    with pytest.raises(ValueError, match="--split"):
        parse_split(bad)


def test_splits_use_disjoint_sequences_and_none_when_empty(corpus, tmp_path):
    train, valid, test = build_train_valid_test_datasets([corpus], "80,20,0", SEQ, 3, (40, 10, 10),
                                                         cache_dir=str(tmp_path))
    assert test is None  # weight 0: no sequences
    assert train.sequence_range == (0, 48) and valid.sequence_range == (48, 60)
    assert set(np.asarray(train.document_index)) <= set(range(48))
    assert set(np.asarray(valid.document_index)) <= set(range(48, 60))
    _, valid, test = build_train_valid_test_datasets([corpus], "80,20,0", SEQ, 3, (40, 0, 0),
                                                     cache_dir=str(tmp_path))
    assert valid is None and test is None  # 0 samples requested


def test_cache_reuse_determinism_and_seed(corpus, tmp_path):
    def arrays(datasets):
        return [np.asarray(getattr(d, name)).copy() for d in datasets
                for name in ("document_index", "sample_index", "shuffle_index")]

    args = ([corpus], "80,15,5", SEQ, 1234, (100, 10, 5))
    first = build_train_valid_test_datasets(*args, cache_dir=str(tmp_path / "one"))
    assert not any(d.cache_hit for d in first)
    files = sorted(os.listdir(tmp_path / "one"))
    stamps = {f: os.stat(tmp_path / "one" / f).st_mtime_ns for f in files}
    again = build_train_valid_test_datasets(*args, cache_dir=str(tmp_path / "one"))
    assert all(d.cache_hit for d in again)
    assert isinstance(again[0].sample_index, np.memmap)
    assert sorted(os.listdir(tmp_path / "one")) == files
    assert {f: os.stat(tmp_path / "one" / f).st_mtime_ns for f in files} == stamps
    elsewhere = build_train_valid_test_datasets(*args, cache_dir=str(tmp_path / "two"))
    for a, b, c in zip(arrays(first), arrays(again), arrays(elsewhere)):
        np.testing.assert_array_equal(a, b)
        np.testing.assert_array_equal(a, c)
    reseeded = build_train_valid_test_datasets([corpus], "80,15,5", SEQ, 4321, (100, 10, 5),
                                               cache_dir=str(tmp_path / "one"))
    assert not reseeded[0].cache_hit
    assert not np.array_equal(reseeded[0].shuffle_index, first[0].shuffle_index)
    assert not np.array_equal(reseeded[0].document_index, first[0].document_index)
    assert any(not np.array_equal(reseeded[0][i], first[0][i]) for i in range(10))


def test_default_cache_dir_and_rewritten_data(tmp_path):
    prefix = write_dataset(tmp_path / "data", random_docs(1, 30))
    train, _, _ = build_train_valid_test_datasets([prefix], "1", SEQ, 5, (20, 0, 0))
    assert os.path.dirname(train.paths["sample_index"]) == f"{prefix}_cache"
    assert not train.cache_hit
    write_dataset(prefix, random_docs(2, 30))  # new data at the same path: the old cache must not be used
    train2, _, _ = build_train_valid_test_datasets([prefix], "1", SEQ, 5, (20, 0, 0))
    assert not train2.cache_hit
    check_packing(IndexedDataset(prefix), train2)


def test_weighted_blend(tmp_path):
    a = write_dataset(tmp_path / "a", random_docs(3, 80, 0, 1000))
    b = write_dataset(tmp_path / "b", random_docs(4, 40, 1000, 2000))
    n = 2000
    train, valid, _ = build_train_valid_test_datasets(["0.7", a, "0.3", b], "90,10,0", SEQ, 9, (n, 30, 0),
                                                      cache_dir=str(tmp_path / "cache"))
    assert isinstance(train, BlendedDataset) and isinstance(valid, BlendedDataset)
    assert len(train) == np.ceil(n * 0.7) + np.ceil(n * 0.3)
    source = np.asarray(train.dataset_index)
    assert abs(np.mean(source[:n] == 0) - 0.7) <= 1 / n
    assert [len(d) >= np.ceil(np.ceil(n * w) * 1.005) for d, w in zip(train.datasets, (0.7, 0.3))] == [True, True]
    for i in range(len(train)):
        sample = train[i]
        expected = train.datasets[source[i]][int(train.dataset_sample_index[i])]
        np.testing.assert_array_equal(sample, expected)
        assert np.all((sample >= 1000) == bool(source[i]))  # tokens come from the dataset the index names
    again = build_train_valid_test_datasets(["0.7", a, "0.3", b], "90,10,0", SEQ, 9, (n, 30, 0),
                                            cache_dir=str(tmp_path / "cache"))[0]
    assert again.cache_hit and all(d.cache_hit for d in again.datasets)


def test_unweighted_blend_follows_token_counts(tmp_path):
    a = write_dataset(tmp_path / "a", [np.full(30, 1)] * 30)  # 900 tokens
    b = write_dataset(tmp_path / "b", [np.full(30, 2)] * 10)  # 300 tokens
    train, _, _ = build_train_valid_test_datasets([a, b], "1", SEQ, 0, (400, 0, 0), cache_dir=str(tmp_path))
    assert train.weights == pytest.approx([0.75, 0.25])
    assert np.mean(np.asarray(train.dataset_index) == 0) == pytest.approx(0.75, abs=0.01)


def test_blend_member_without_sequences_in_a_split(tmp_path):
    a = write_dataset(tmp_path / "a", random_docs(5, 50))
    b = write_dataset(tmp_path / "b", [np.arange(40)] * 3)  # 3 sequences: round(0.9 * 3) = 3, none for valid
    with pytest.warns(UserWarning, match="hold no sequences"):
        train, valid, _ = build_train_valid_test_datasets(["1", a, "1", b], "90,10,0", SEQ, 0, (50, 5, 0),
                                                          cache_dir=str(tmp_path))
    assert isinstance(train, BlendedDataset)
    assert isinstance(valid, GPTDataset) and valid.prefix == a and len(valid) >= 5


@pytest.mark.parametrize("data_path, match", [
    (["0.7", "a", "0.3"], "odd number of entries"),
    (["0", "a", "1", "b"], "positive"),
    (["-1", "a", "1", "b"], "positive"),
    (["nan", "a"], "positive"),
    (["0.5", "a", "b", "c"], "not a number"),
    (["a", "0.5", "b"], "mixes weights"),
    ([], "empty"),
])
def test_bad_data_paths(data_path, match):
    with pytest.raises(ValueError, match=match):
        parse_data_path(data_path)


def test_parse_data_path_forms():
    assert parse_data_path(["0.7", "a", "0.3", "b"]) == (["a", "b"], [0.7, 0.3])
    assert parse_data_path("2 x 1 y") == (["x", "y"], [2.0, 1.0])
    assert parse_data_path(["a"]) == (["a"], None)


def test_bad_inputs_to_the_builder(corpus, tmp_path):
    missing = str(tmp_path / "nothing_here")
    with pytest.raises(ValueError, match=r"nothing_here.*missing .*nothing_here\.bin and .*nothing_here\.idx"):
        build_train_valid_test_datasets(["0.5", corpus, "0.5", missing], "1", SEQ, 0, (10, 0, 0))
    os.remove(corpus + ".idx")
    with pytest.raises(ValueError, match=r"missing .*corpus_text_document\.idx"):
        build_train_valid_test_datasets([corpus], "1", SEQ, 0, (10, 0, 0))
    short = write_dataset(tmp_path / "short", [np.arange(10)] * 20)  # 200 tokens
    with pytest.raises(ValueError, match=r"valid split .* 20 tokens, fewer than one sample of seq_length \+ 1 = 65"):
        build_train_valid_test_datasets([short], "90,10,0", 64, 0, (10, 1, 0), cache_dir=str(tmp_path))
    with pytest.raises(ValueError, match="seq-length"):
        build_train_valid_test_datasets([short], "1", 0, 0, (10, 0, 0))
    with pytest.raises(ValueError, match="num_samples"):
        build_train_valid_test_datasets([short], "1", SEQ, 0, (10, 0))


def test_ranks_share_one_build(corpus, tmp_path):
    """Two real gloo ranks: rank 0 builds, rank 1 waits and loads; a failing build fails both, hanging neither."""
    script = textwrap.dedent("""
        import sys
        import torch.distributed as dist
        from megaphi.data.gpt_dataset import build_train_valid_test_datasets
        rank, corpus, cache, store = int(sys.argv[1]), sys.argv[2], sys.argv[3], sys.argv[4]
        dist.init_process_group("gloo", init_method="file://" + store, rank=rank, world_size=2)
        try:
            build_train_valid_test_datasets([corpus], "1", 10_000, 0, (1, 0, 0), cache_dir=cache)
        except ValueError as error:
            print("error", "fewer than one sample" in str(error))
        train, _, _ = build_train_valid_test_datasets([corpus], "1", 16, 0, (40, 0, 0), cache_dir=cache)
        print("hit", train.cache_hit, int(sum(train[i].sum() for i in range(len(train)))))
        dist.destroy_process_group()
    """)
    cache, store = str(tmp_path / "cache"), str(tmp_path / "store")
    procs = [subprocess.Popen([sys.executable, "-c", script, str(r), corpus, cache, store], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for r in range(2)]
    try:
        outs = [p.communicate(timeout=120) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    for p, (out, err) in zip(procs, outs):
        assert p.returncode == 0, err
    lines = [out.split() for out, _ in outs]
    assert lines[0][:4] == ["error", "True", "hit", "False"]  # rank 0 built
    assert lines[1][:4] == ["error", "True", "hit", "True"]  # rank 1 loaded rank 0's files
    assert lines[0][4] == lines[1][4]
