"""MMIDIDX reader, writer and merge: Megatron-LM's own files, round trips, and every kind of bad file."""

import os
import pickle
import struct
import subprocess
import sys

import numpy as np
import pytest

from megaphi.data.indexed_dataset import (
    DTYPES,
    IndexedDataset,
    IndexedDatasetBuilder,
    best_dtype,
    merge_datasets,
)

FIXTURES = ("spm_eod", "spm_noeod", "hf_eod")


def documents(ds: IndexedDataset):
    """Each document of ds as a list of its sequences."""
    idx = ds.document_indices
    return [[ds[i] for i in range(idx[d], idx[d + 1])] for d in range(ds.num_documents)]


def write(prefix, docs, dtype=np.uint16):
    with IndexedDatasetBuilder(prefix, dtype=dtype) as b:
        for doc in docs:
            b.add_document(doc)
    return IndexedDataset(prefix)


def write_two_parts(prefix, folder) -> IndexedDataset:
    """Splits the dataset at prefix into folder/a (first 100 documents) and folder/b (the rest); returns it."""
    src = IndexedDataset(prefix)
    docs = documents(src)
    os.makedirs(folder)
    write(os.path.join(folder, "a"), docs[:100])
    write(os.path.join(folder, "b"), docs[100:])
    return src


def same_files(a, b) -> bool:
    return all(open(f"{a}{e}", "rb").read() == open(f"{b}{e}", "rb").read() for e in (".bin", ".idx"))


@pytest.mark.parametrize("name", FIXTURES)
def test_reads_megatron_fixture(megatron_fixtures, name):
    ds = IndexedDataset(megatron_fixtures / f"{name}_text_document")
    raw = open(megatron_fixtures / f"{name}_text_document.idx", "rb").read()
    assert raw[:9] == b"MMIDIDX\x00\x00" and struct.unpack("<QBQQ", raw[9:34]) == (1, 8, 242, 244)
    assert (len(ds), ds.num_documents, ds.dtype) == (242, 243, np.uint16)
    # document 5 of code_sample.jsonl is empty: a repeated document index, no sequence
    assert list(ds.document_indices[4:8]) == [4, 5, 5, 6]
    lengths = ds.sequence_lengths.astype(np.int64)
    assert np.array_equal(ds.sequence_pointers, np.concatenate([[0], np.cumsum(lengths * 2)[:-1]]))
    assert ds.num_tokens == lengths.sum() == os.path.getsize(f"{ds.prefix}.bin") // 2
    if name.endswith("_eod"):
        eod = 1 if name.startswith("spm") else 0
        assert all(ds[i][-1] == eod for i in range(len(ds)))


def test_items_are_views_with_offsets(megatron_fixtures):
    ds = IndexedDataset(megatron_fixtures / "spm_eod_text_document")
    whole = ds[3]
    assert not whole.flags.owndata and not whole.flags.writeable
    assert len(whole) == ds.sequence_lengths[3]
    assert np.array_equal(ds.get(3, offset=10, length=7), whole[10:17])
    assert np.array_equal(ds.get(3, offset=len(whole) - 5), whole[-5:])
    assert np.array_equal(ds[-1], ds[len(ds) - 1])
    assert [len(s) for s in ds[2:5]] == list(ds.sequence_lengths[2:5])
    with pytest.raises(IndexError):
        ds[len(ds)]
    with pytest.raises(IndexError):
        ds.get(3, offset=len(whole) - 2, length=3)
    copy = pickle.loads(pickle.dumps(ds))  # e.g. into a DataLoader worker: maps the files again
    assert np.array_equal(copy[3], whole) and np.array_equal(copy.document_indices, ds.document_indices)


@pytest.mark.parametrize("name", FIXTURES)
def test_writer_reproduces_megatron_bytes(megatron_fixtures, tmp_path, name):
    src = IndexedDataset(megatron_fixtures / f"{name}_text_document")
    write(tmp_path / "copy", documents(src))
    assert same_files(tmp_path / "copy", src.prefix)
    # the same through add_item / end_document and through one bulk add_documents call
    with IndexedDatasetBuilder(tmp_path / "items", dtype=np.uint16) as b:
        for doc in documents(src):
            for seq in doc:
                b.add_item(seq)
            b.end_document()
    assert same_files(tmp_path / "items", src.prefix)
    sizes = np.diff(src.document_indices)
    with IndexedDatasetBuilder(tmp_path / "bulk", dtype=np.uint16) as b:
        b.add_documents(np.fromfile(f"{src.prefix}.bin", np.uint16), src.sequence_lengths, sizes)
    assert same_files(tmp_path / "bulk", src.prefix)


@pytest.mark.parametrize("code,dtype", sorted(DTYPES.items()))
def test_every_dtype_round_trips(tmp_path, code, dtype):
    docs = [[np.arange(5, dtype=dtype), np.arange(3, dtype=dtype)], [], [np.array([7], dtype=dtype)], []]
    ds = write(tmp_path / "d", docs, dtype=dtype)
    assert open(tmp_path / "d.idx", "rb").read()[17] == code
    assert ds.dtype == dtype and list(ds.document_indices) == [0, 2, 2, 3, 3]
    assert [list(s) for s in ds] == [[0, 1, 2, 3, 4], [0, 1, 2], [7]]
    assert os.path.getsize(tmp_path / "d.bin") == 9 * np.dtype(dtype).itemsize


def test_empty_dataset(tmp_path):
    ds = write(tmp_path / "e", [[], []])
    assert (len(ds), ds.num_documents, list(ds.document_indices)) == (0, 2, [0, 0, 0])
    assert os.path.getsize(tmp_path / "e.bin") == 0


def test_best_dtype():
    assert best_dtype(8000) == np.uint16 and best_dtype(65499) == np.uint16
    assert best_dtype(65500) == np.int32 and best_dtype(100_000) == np.int32 and best_dtype(None) == np.int32


def test_builder_rejects_inconsistent_input(tmp_path):
    with pytest.raises(ValueError, match="sequence lengths sum to 5"):
        with IndexedDatasetBuilder(tmp_path / "x") as b:
            b.add_documents(np.arange(4), np.array([5]), np.array([1]))
    with pytest.raises(ValueError, match="no MMIDIDX code"):
        IndexedDatasetBuilder(tmp_path / "y", dtype=np.uint32)
    assert os.listdir(tmp_path) == []


def test_error_inside_builder_leaves_nothing(tmp_path):
    with pytest.raises(RuntimeError):
        with IndexedDatasetBuilder(tmp_path / "out", dtype=np.uint16) as b:
            b.add_document([np.arange(100)])
            raise RuntimeError("interrupted")
    assert os.listdir(tmp_path) == []


def test_finalize_replaces_an_old_pair(tmp_path):
    write(tmp_path / "d", [[np.arange(50)]] * 3)
    ds = write(tmp_path / "d", [[np.array([9])]])
    assert [list(s) for s in ds] == [[9]] and sorted(os.listdir(tmp_path)) == ["d.bin", "d.idx"]


@pytest.fixture
def good(tmp_path):
    """A small valid dataset: prefix, raw .idx bytes, raw .bin bytes."""
    write(tmp_path / "good", [[np.arange(10), np.arange(4)], [], [np.arange(6)]])
    return tmp_path / "good", (tmp_path / "good.idx").read_bytes(), (tmp_path / "good.bin").read_bytes()


def corrupt(tmp_path, good, idx=None, bin=None):
    prefix, idx0, bin0 = good
    (tmp_path / "bad.idx").write_bytes(idx0 if idx is None else idx)
    (tmp_path / "bad.bin").write_bytes(bin0 if bin is None else bin)
    return tmp_path / "bad"


@pytest.mark.parametrize(
    "change,message",
    [
        (lambda i, b: (b"XXIDIDX\x00\x00" + i[9:], b), "not an MMIDIDX index"),
        (lambda i, b: (i[:9] + struct.pack("<Q", 2) + i[17:], b), "unsupported index version 2"),
        (lambda i, b: (i[:17] + bytes([9]) + i[18:], b), "unknown dtype code 9"),
        (lambda i, b: (i[:20], b), "truncated header"),
        (lambda i, b: (i[:-8], b), "truncated"),
        (lambda i, b: (i + b"\x00" * 8, b), "trailing bytes"),
        (lambda i, b: (i, b[:-2]), "truncated"),
        (lambda i, b: (i, b + b"\x00\x00"), "larger than its index describes"),
        (lambda i, b: (i[:-8] + struct.pack("<q", 7), b), "document indices must run from 0 to N=3"),
        (lambda i, b: (b"", b), "not an MMIDIDX index"),
    ],
    ids=["magic", "version", "dtype", "header", "idx-short", "idx-long", "bin-short", "bin-long", "docs", "empty"],
)
def test_bad_files_raise_value_error(tmp_path, good, change, message):
    idx, bin = change(good[1], good[2])
    prefix = corrupt(tmp_path, good, idx, bin)
    with pytest.raises(ValueError, match=message) as err:
        IndexedDataset(prefix)
    assert str(prefix) in str(err.value)


def test_missing_files(tmp_path, good):
    with pytest.raises(ValueError, match=r"nothere\.idx: file not found"):
        IndexedDataset(tmp_path / "nothere")
    os.remove(tmp_path / "good.bin")
    with pytest.raises(ValueError, match=r"good\.bin: file not found"):
        IndexedDataset(good[0])


def test_merge_offsets_document_indices(megatron_fixtures, tmp_path):
    src = IndexedDataset(megatron_fixtures / "spm_eod_text_document")
    docs = documents(src)
    cuts = [(0, 3), (3, 3), (3, 90), (90, 243)]  # one part is empty
    parts = [write(tmp_path / f"part{i}", docs[a:b]).prefix for i, (a, b) in enumerate(cuts)]
    merged = merge_datasets(parts, tmp_path / "merged")
    assert same_files(merged.prefix, src.prefix)
    twice = merge_datasets([src.prefix, src.prefix], tmp_path / "twice")
    assert twice.num_documents == 486 and list(twice.document_indices[243:247]) == [242, 243, 244, 245]
    assert np.array_equal(twice[242 + 17], src[17])


def test_merge_rejects_mixed_dtypes(tmp_path):
    a = write(tmp_path / "a", [[np.arange(3)]], dtype=np.uint16)
    b = write(tmp_path / "b", [[np.arange(3)]], dtype=np.int32)
    with pytest.raises(ValueError, match="share one dtype.*uint16.*int32"):
        merge_datasets([a.prefix, b.prefix], tmp_path / "m")
    with pytest.raises(ValueError, match="no input datasets"):
        merge_datasets([], tmp_path / "m")
    assert not (tmp_path / "m.idx").exists() and not (tmp_path / "m.bin").exists()


def test_merge_cli(megatron_fixtures, repo_root, tmp_path):
    src = write_two_parts(megatron_fixtures / "hf_eod_text_document", tmp_path / "parts")
    cmd = [sys.executable, str(repo_root / "tools" / "merge_datasets.py"), "--input", str(tmp_path / "parts"),
           "--output-prefix", str(tmp_path / "all")]
    run = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
    assert run.returncode == 0, run.stderr
    assert "243 documents" in run.stdout and same_files(tmp_path / "all", src.prefix)
    run = subprocess.run(cmd[:3] + [str(tmp_path / "missing"), *cmd[4:]], capture_output=True, text=True, timeout=60)
    assert run.returncode == 1 and "missing.idx: file not found" in run.stderr


@pytest.mark.parametrize("field,value", [("pointer", 10**12), ("pointer", -8), ("length", -5), ("length", 10**6)])
def test_corrupt_index_entry_is_an_error_not_a_garbage_read(tmp_path, good, field, value):
    """An index entry that points outside .bin (sizes still consistent) fails on read, naming the file."""
    idx = bytearray(good[1])
    n = struct.unpack("<Q", idx[18:26])[0]
    at = 34 + (4 * n + 8 * 1 if field == "pointer" else 4 * 1)  # sequence 1's pointer or length
    idx[at : at + (8 if field == "pointer" else 4)] = struct.pack("<q" if field == "pointer" else "<i", value)
    ds = IndexedDataset(corrupt(tmp_path, good, bytes(idx)))
    assert list(ds.get(0)) == list(range(10))
    with pytest.raises(ValueError, match=r"bad\.idx: corrupt index: sequence 1 "):
        ds.get(1)


def test_add_item_then_add_document_makes_one_document(tmp_path):
    """add_document closes the document add_item opened (as in Megatron): no empty document at finalize."""
    with IndexedDatasetBuilder(tmp_path / "d", dtype=np.uint16) as b:
        b.add_item([1, 2])
        b.add_document([[3]])
    ds = IndexedDataset(tmp_path / "d")
    assert list(ds.document_indices) == [0, 2] and ds.num_documents == 1


def test_merge_cli_folder_leaves_out_its_own_output(megatron_fixtures, repo_root, tmp_path):
    """Merging a folder into a prefix inside it twice must not merge the first output into the second."""
    src = write_two_parts(megatron_fixtures / "spm_eod_text_document", tmp_path / "parts")
    cmd = [sys.executable, str(repo_root / "tools" / "merge_datasets.py"), "--input", str(tmp_path / "parts"),
           "--output-prefix", str(tmp_path / "parts" / "all")]
    for _ in range(2):
        run = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
        assert run.returncode == 0, run.stderr
        assert same_files(tmp_path / "parts" / "all", src.prefix)
