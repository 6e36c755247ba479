"""Megatron's MMIDIDX indexed dataset: a memory-mapped reader, a streaming atomic writer, and merging.

`{prefix}.bin` holds the tokens of every sequence end to end (no header, little-endian). `{prefix}.idx` holds:
magic b"MMIDIDX\\x00\\x00", version <Q = 1, dtype code <B, sequence count N <Q, document count D <Q, then
int32 sequence lengths [N], int64 byte pointers into .bin [N], int64 document indices [D] (0 ... N).
An empty document adds a boundary (a repeated document index) and no sequence.
"""

import mmap
import os
import struct

import numpy as np

MAGIC = b"MMIDIDX\x00\x00"
VERSION = 1
HEADER = struct.Struct("<9sQBQQ")  # magic, version, dtype code, N, D: 34 bytes
DTYPES = {
    1: np.dtype(np.uint8),
    2: np.dtype(np.int8),
    3: np.dtype(np.int16),
    4: np.dtype(np.int32),
    5: np.dtype(np.int64),
    6: np.dtype(np.float64),
    7: np.dtype(np.float32),
    8: np.dtype(np.uint16),
}
DTYPE_CODES = {dtype: code for code, dtype in DTYPES.items()}
_COPY_ITEMS = 1 << 22  # index entries copied per step when finalizing or merging (16-32 MiB)


def best_dtype(vocab_size: int | None) -> np.dtype:
    """Token dtype Megatron picks: uint16 when the vocabulary has fewer than 65500 entries, else int32."""
    if vocab_size is not None and vocab_size < 65500:
        return np.dtype(np.uint16)
    return np.dtype(np.int32)


def data_file_path(prefix: str | os.PathLike) -> str:
    """The .bin path of a dataset prefix."""
    return os.fspath(prefix) + ".bin"


def index_file_path(prefix: str | os.PathLike) -> str:
    """The .idx path of a dataset prefix."""
    return os.fspath(prefix) + ".idx"


def _map(path: str, offset: int, dtype, count: int) -> np.ndarray:
    """`count` items at `offset` of `path`, memory-mapped read-only (used for the builder's side files)."""
    if count == 0:
        return np.empty(0, dtype=dtype)
    return np.memmap(path, dtype=dtype, mode="r", offset=offset, shape=(count,))


def _mmap(path: str):
    """A read-only mmap of a whole file, or b"" for an empty one (mmap cannot map 0 bytes)."""
    with open(path, "rb") as f:
        return mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) if os.fstat(f.fileno()).st_size else b""


def _view(buffer, offset: int, dtype, count: int) -> np.ndarray:
    return np.frombuffer(buffer, dtype=dtype, count=count, offset=offset) if count else np.empty(0, dtype)


class IndexedDataset:
    """Read-only, memory-mapped view of a `{prefix}.bin`/`{prefix}.idx` pair; items are numpy views."""

    def __init__(self, prefix: str | os.PathLike):
        self.prefix = os.fspath(prefix)
        idx_path, bin_path = index_file_path(prefix), data_file_path(prefix)
        for path in (idx_path, bin_path):
            if not os.path.isfile(path):
                raise ValueError(f"{path}: file not found (indexed dataset prefix {self.prefix!r})")
        # One mapping per file: header, size and arrays all come from the same file even if it is replaced meanwhile.
        self._idx = _mmap(idx_path)
        idx_size = len(self._idx)
        head = bytes(self._idx[: HEADER.size])
        if head[: len(MAGIC)] != MAGIC:
            raise ValueError(f"{idx_path}: not an MMIDIDX index (magic {head[:len(MAGIC)]!r}, expected {MAGIC!r})")
        if len(head) < HEADER.size:
            raise ValueError(f"{idx_path}: truncated header ({len(head)} of {HEADER.size} bytes)")
        _, version, code, n, d = HEADER.unpack(head)
        if version != VERSION:
            raise ValueError(f"{idx_path}: unsupported index version {version} (expected {VERSION})")
        if code not in DTYPES:
            raise ValueError(f"{idx_path}: unknown dtype code {code} (known: {sorted(DTYPES)})")
        expected = HEADER.size + 4 * n + 8 * n + 8 * d
        if idx_size != expected:
            what = "truncated" if idx_size < expected else "has trailing bytes"
            raise ValueError(f"{idx_path}: {what}: {idx_size} bytes, header (N={n}, D={d}) implies {expected}")
        self.dtype = DTYPES[code]
        self.sequence_lengths = _view(self._idx, HEADER.size, np.int32, n)
        self.sequence_pointers = _view(self._idx, HEADER.size + 4 * n, np.int64, n)
        self.document_indices = _view(self._idx, HEADER.size + 12 * n, np.int64, d)
        if d < 1 or self.document_indices[0] != 0 or self.document_indices[-1] != n:
            first_last = (self.document_indices[0], self.document_indices[-1]) if d else "none"
            raise ValueError(f"{idx_path}: document indices must run from 0 to N={n}, got {first_last}")
        self._bin = np.frombuffer(_mmap(bin_path), dtype=np.uint8)
        bin_size = len(self._bin)
        end = int(self.sequence_pointers[-1]) + int(self.sequence_lengths[-1]) * self.dtype.itemsize if n else 0
        if bin_size != end:
            what = "truncated" if bin_size < end else "larger than its index describes"
            raise ValueError(f"{bin_path}: {what}: {bin_size} bytes, {idx_path} implies {end}")

    def __getstate__(self):  # an mmap does not pickle: a copy (e.g. in a DataLoader worker) maps the files again
        return {"prefix": self.prefix}

    def __setstate__(self, state):
        self.__init__(state["prefix"])

    def __len__(self) -> int:
        return len(self.sequence_lengths)

    def __getitem__(self, i):
        if isinstance(i, slice):
            return [self.get(j) for j in range(*i.indices(len(self)))]
        return self.get(i)

    def get(self, i: int, offset: int = 0, length: int | None = None) -> np.ndarray:
        """Tokens [offset, offset + length) of sequence i (to its end when length is None), as a view."""
        n = len(self)
        if not -n <= i < n:
            raise IndexError(f"sequence {i} out of range for {self.prefix} with {n} sequences")
        i = int(i) % n
        size, pointer = int(self.sequence_lengths[i]), int(self.sequence_pointers[i])
        if size < 0 or pointer < 0 or pointer + size * self.dtype.itemsize > len(self._bin):
            raise ValueError(f"{index_file_path(self.prefix)}: corrupt index: sequence {i} (length {size}, byte "
                             f"pointer {pointer}) lies outside {data_file_path(self.prefix)} ({len(self._bin)} bytes)")
        if length is None:
            length = size - offset
        if offset < 0 or length < 0 or offset + length > size:
            raise IndexError(f"tokens [{offset}, {offset + length}) out of range for sequence {i} of length {size}")
        start = pointer + offset * self.dtype.itemsize
        return self._bin[start : start + length * self.dtype.itemsize].view(self.dtype)

    @property
    def num_documents(self) -> int:
        """Number of documents (including empty ones)."""
        return len(self.document_indices) - 1

    @property
    def num_tokens(self) -> int:
        """Total number of tokens over all sequences."""
        return len(self._bin) // self.dtype.itemsize

    def __repr__(self) -> str:
        n, d = len(self), self.num_documents
        return f"IndexedDataset({self.prefix!r}, sequences={n}, documents={d}, dtype={self.dtype})"


class IndexedDatasetBuilder:
    """Streams an indexed dataset to temporary files and renames them into place on `finalize()`.

    Tokens go straight to `.bin`; lengths and document ends go to side files, so memory stays flat in the
    corpus size. As a context manager it finalizes on a clean exit and removes every temporary file on error.
    """

    def __init__(self, prefix: str | os.PathLike, dtype=np.int32):
        self.prefix = os.fspath(prefix)
        self.dtype = np.dtype(dtype)
        if self.dtype not in DTYPE_CODES:
            raise ValueError(f"{self.prefix}: dtype {self.dtype} has no MMIDIDX code (use one of {list(DTYPE_CODES)})")
        tag = f".tmp{os.getpid()}"
        self._tmp_bin = data_file_path(prefix) + tag
        self._tmp_idx = index_file_path(prefix) + tag
        self._tmp_lengths = index_file_path(prefix) + tag + ".lengths"
        self._tmp_docs = index_file_path(prefix) + tag + ".docs"
        self._files = [open(p, "wb") for p in (self._tmp_bin, self._tmp_lengths, self._tmp_docs)]
        self._bin, self._lengths, self._docs = self._files
        self.num_sequences = 0
        self.num_documents = 0
        self.num_tokens = 0
        self._open_document = False
        self._done = False

    def add_item(self, tokens) -> None:
        """Append one sequence to the current document."""
        self.add_documents(np.asarray(tokens), np.array([np.size(tokens)], np.int32), None)
        self._open_document = True

    def end_document(self) -> None:
        """Close the current document (with no sequence added since the last one, this is an empty document)."""
        np.array([self.num_sequences], np.int64).tofile(self._docs)
        self.num_documents += 1
        self._open_document = False

    def add_document(self, sequences) -> None:
        """Append one document given as a list of token sequences; [] adds an empty document (a boundary)."""
        sequences = [np.asarray(s) for s in sequences]
        lengths = np.array([s.size for s in sequences], np.int32)
        tokens = np.concatenate(sequences) if sequences else np.empty(0, self.dtype)
        self.add_documents(tokens, lengths, np.array([len(sequences)], np.int64))

    def add_documents(self, tokens: np.ndarray, sequence_lengths: np.ndarray, document_sizes) -> None:
        """Append many documents at once: flat tokens, each sequence's length, each document's sequence count.

        `document_sizes` None appends the sequences to the open document without closing it.
        """
        self._check_open()
        lengths = np.ascontiguousarray(sequence_lengths, dtype=np.int32)
        total = int(lengths.sum(dtype=np.int64))
        if tokens.size != total:
            raise ValueError(f"{self.prefix}: {tokens.size} tokens given, sequence lengths sum to {total}")
        self._bin.write(np.ascontiguousarray(tokens, dtype=self.dtype).data)
        lengths.tofile(self._lengths)
        self.num_tokens += total
        self.num_sequences += len(lengths)
        if document_sizes is not None:
            sizes = np.asarray(document_sizes, dtype=np.int64)
            if int(sizes.sum()) != len(lengths):
                raise ValueError(f"{self.prefix}: documents hold {int(sizes.sum())} sequences, {len(lengths)} given")
            ends = self.num_sequences - len(lengths) + np.cumsum(sizes)
            ends.tofile(self._docs)
            self.num_documents += len(sizes)
            if len(sizes):  # the first of them ends the document add_item left open, if any
                self._open_document = False

    def add_index(self, prefix: str | os.PathLike) -> None:
        """Append every document of another indexed dataset (same dtype) to this one."""
        self._check_open()
        other = IndexedDataset(prefix)
        if other.dtype != self.dtype:
            raise ValueError(f"{other.prefix}: dtype {other.dtype} differs from the output's {self.dtype}")
        if self._open_document:
            raise ValueError(f"{self.prefix}: end_document() before add_index()")
        with open(data_file_path(prefix), "rb") as src:
            while chunk := src.read(1 << 24):
                self._bin.write(chunk)
        n = len(other)
        for start in range(0, n, _COPY_ITEMS):
            np.asarray(other.sequence_lengths[start : start + _COPY_ITEMS]).tofile(self._lengths)
        docs = other.document_indices
        for start in range(1, len(docs), _COPY_ITEMS):
            (np.asarray(docs[start : start + _COPY_ITEMS]) + self.num_sequences).tofile(self._docs)
        self.num_tokens += other.num_tokens
        self.num_sequences += n
        self.num_documents += other.num_documents

    def finalize(self) -> None:
        """Write the index and move both files into place: .bin first, then .idx (the old .idx goes first)."""
        self._check_open()
        if self._open_document:
            self.end_document()
        for f in self._files:
            f.close()
        n, d = self.num_sequences, self.num_documents + 1
        with open(self._tmp_idx, "wb") as out:
            out.write(HEADER.pack(MAGIC, VERSION, DTYPE_CODES[self.dtype], n, d))
            lengths = _map(self._tmp_lengths, 0, np.int32, n)
            for start in range(0, n, _COPY_ITEMS):
                np.asarray(lengths[start : start + _COPY_ITEMS]).tofile(out)
            pointer = 0
            for start in range(0, n, _COPY_ITEMS):
                nbytes = lengths[start : start + _COPY_ITEMS].astype(np.int64) * self.dtype.itemsize
                ends = np.cumsum(nbytes) + pointer
                (ends - nbytes).tofile(out)
                pointer = int(ends[-1])
            np.zeros(1, np.int64).tofile(out)
            docs = _map(self._tmp_docs, 0, np.int64, d - 1)
            for start in range(0, d - 1, _COPY_ITEMS):
                np.asarray(docs[start : start + _COPY_ITEMS]).tofile(out)
            del lengths, docs
            out.flush()
            os.fsync(out.fileno())
        os.remove(self._tmp_lengths)
        os.remove(self._tmp_docs)
        final_idx = index_file_path(self.prefix)
        if os.path.exists(final_idx):
            os.remove(final_idx)  # never pair a new .bin with an old .idx, even for a moment
        os.replace(self._tmp_bin, data_file_path(self.prefix))
        os.replace(self._tmp_idx, final_idx)
        self._done = True

    def abort(self) -> None:
        """Close and remove every temporary file; the output paths are left untouched."""
        if self._done:
            return
        for f in self._files:
            f.close()
        for path in (self._tmp_bin, self._tmp_idx, self._tmp_lengths, self._tmp_docs):
            if os.path.exists(path):
                os.remove(path)
        self._done = True

    def _check_open(self) -> None:
        if self._done:
            raise ValueError(f"{self.prefix}: builder already finalized or aborted")

    def __enter__(self) -> "IndexedDatasetBuilder":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.finalize()
        else:
            self.abort()


def merge_datasets(prefixes, out_prefix: str | os.PathLike) -> IndexedDataset:
    """Concatenate indexed datasets (in the given order, all of one dtype) into `out_prefix`, atomically."""
    prefixes = [os.fspath(p) for p in prefixes]
    if not prefixes:
        raise ValueError("merge_datasets: no input datasets given")
    datasets = [IndexedDataset(p) for p in prefixes]
    dtypes = {ds.dtype for ds in datasets}
    if len(dtypes) > 1:
        found = ", ".join(f"{ds.prefix}: {ds.dtype}" for ds in datasets)
        raise ValueError(f"merge_datasets: inputs must share one dtype, found {found}")
    with IndexedDatasetBuilder(out_prefix, dtype=datasets[0].dtype) as builder:
        for p in prefixes:
            builder.add_index(p)
    return IndexedDataset(out_prefix)
