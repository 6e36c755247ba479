"""Input sources for preprocessing: jsonl (plain or gzip), parquet and source trees, cut into ordered tasks.

A task is a small, picklable description of a piece of input (a byte range of a jsonl file, a parquet row
group, a group of source files, or a chunk of gzip lines read by the main process). Reading a task gives its
records in input order plus every line it had to skip and why; concatenating the tasks' records in task order
gives the records of the whole input, however the tasks were cut or shared out.
"""

import glob
import gzip
import json
import os
import zlib
from dataclasses import dataclass, field

GZIP_SUFFIXES = (".gz",)
PARQUET_SUFFIXES = (".parquet",)
TREE_KEYS = ("text", "path")  # what a source-tree document offers: file contents and relative path
_READ_BLOCK = 1 << 16


@dataclass(frozen=True)
class Task:
    """One piece of input, by kind: "jsonl": the lines that start in bytes [start, end) of path; "gzip": a whole
    .gz file (the main process turns it into "lines" tasks: `lines`, numbered from `start`); "parquet": row
    group `start`; "files": `files` under the folder `path`, one document each."""

    kind: str
    path: str
    start: int = 0
    end: int = 0
    files: tuple = ()
    lines: tuple = ()  # "lines" tasks: the raw lines, read by the main process (gzip)
    weight: int = 0  # input bytes this task accounts for (progress and sharing out between ranks)


@dataclass
class Skip:
    """A record left out, and why. `line` counts from 1, `row` (parquet) from 0; `relative` marks a jsonl line
    number that counts from the start of this rank's share of the file (merging ranks makes it absolute)."""

    path: str
    reason: str
    detail: str = ""
    line: int = 0
    row: int = -1
    relative: bool = False

    def location(self) -> str:
        """`path:line N`, `path:row N`, or the path alone (a whole file)."""
        if self.line:
            return f"{self.path}:line {self.line}"
        return f"{self.path}:row {self.row}" if self.row >= 0 else self.path

    def __str__(self) -> str:
        return f"{self.location()}: {self.reason}" + (f" ({self.detail})" if self.detail else "")


@dataclass
class Records:
    """What reading a task gives: one tuple of values (in key order) per kept record, the skips, and the
    number of jsonl lines read (to number the lines of the tasks that follow)."""

    rows: list = field(default_factory=list)
    skips: list = field(default_factory=list)
    lines: int = 0


def expand_inputs(patterns, extensions=None) -> list[str]:
    """Each --input in order: an existing path as is, else a glob (sorted); ValueError when nothing matches."""
    paths = []
    for pattern in patterns:
        if os.path.exists(pattern):
            matches = [pattern]
        else:
            matches = sorted(glob.glob(pattern, recursive=True))
            if not matches:
                raise ValueError(f"--input {pattern}: no such file, and no file matches it as a glob pattern")
        for path in matches:
            if os.path.isdir(path) and not extensions:
                raise ValueError(f"--input {path} is a directory: pass --extensions (e.g. --extensions .py)")
            paths.append(path)
    return paths


def input_kind(path: str) -> str:
    """"tree", "gzip", "parquet" or "jsonl" (the default, as Megatron reads any file as jsonl)."""
    if os.path.isdir(path):
        return "tree"
    if path.endswith(GZIP_SUFFIXES):
        return "gzip"
    if path.endswith(PARQUET_SUFFIXES):
        return "parquet"
    return "jsonl"


def list_tree(root: str, extensions) -> list[str]:
    """Files under root whose names end with one of extensions, as sorted relative POSIX paths."""
    found = []
    for folder, dirs, files in os.walk(root):
        dirs.sort()
        rel = os.path.relpath(folder, root)
        for name in files:
            if name.endswith(tuple(extensions)) and os.path.isfile(os.path.join(folder, name)):
                found.append(name if rel == "." else f"{rel}/{name}".replace(os.sep, "/"))
    return sorted(found)


def plan_tasks(paths, keys, extensions=None, chunk_bytes: int = 4 << 20) -> list[Task]:
    """Cut the inputs into ordered tasks of about chunk_bytes (deterministic: every rank plans the same)."""
    tasks = []
    for path in paths:
        kind = input_kind(path)
        if kind == "jsonl" and extensions and path.endswith(tuple(extensions)):
            # a source file named on the command line (`src/*.py`): one document, as inside a folder
            _check_tree_keys(path, keys)
            folder, name = os.path.split(path)
            tasks.append(Task("files", folder, files=(name,), weight=os.path.getsize(path)))
        elif kind == "jsonl":
            size = os.path.getsize(path)
            for start in range(0, size, chunk_bytes):
                end = min(size, start + chunk_bytes)
                tasks.append(Task("jsonl", path, start, end, weight=end - start))
        elif kind == "gzip":
            tasks.append(Task("gzip", path, weight=os.path.getsize(path)))
        elif kind == "parquet":
            tasks.extend(_plan_parquet(path, keys))
        else:
            tasks.extend(_plan_tree(path, keys, extensions, chunk_bytes))
    return tasks


def _plan_parquet(path: str, keys) -> list[Task]:
    import pyarrow.parquet as pq

    try:
        meta = pq.ParquetFile(path).metadata
    except Exception as e:  # pyarrow raises its own error types for a bad file
        raise ValueError(f"{path}: not a readable parquet file ({e})") from None
    missing = [k for k in keys if k not in meta.schema.names]
    if missing:
        raise ValueError(f"{path}: parquet file has no column {missing[0]!r} (columns: {meta.schema.names})")
    return [
        Task("parquet", path, start=i, end=i + 1, weight=meta.row_group(i).total_byte_size)
        for i in range(meta.num_row_groups)
    ]


def _check_tree_keys(root: str, keys) -> None:
    bad = [k for k in keys if k not in TREE_KEYS]
    if bad:
        raise ValueError(f"--input {root}: a source tree offers keys {TREE_KEYS}, not --json-keys {bad[0]!r}")


def _plan_tree(root: str, keys, extensions, chunk_bytes: int) -> list[Task]:
    _check_tree_keys(root, keys)
    files = list_tree(root, extensions)
    if not files:
        raise ValueError(f"--input {root}: no files ending with {' or '.join(extensions)} in this folder")
    tasks, group, size = [], [], 0
    for rel in files:
        group.append(rel)
        size += os.path.getsize(os.path.join(root, rel))
        if size >= chunk_bytes or len(group) >= 1024:
            tasks.append(Task("files", root, files=tuple(group), weight=size))
            group, size = [], 0
    if group:
        tasks.append(Task("files", root, files=tuple(group), weight=size))
    return tasks


def share_tasks(tasks, rank: int, world: int) -> list[Task]:
    """Rank `rank`'s contiguous share of the tasks, balanced by weight; the shares concatenate to all tasks."""
    total = sum(t.weight for t in tasks) or 1
    mine, done = [], 0
    for task in tasks:
        middle = done + task.weight / 2  # a task goes to the rank whose weight interval holds its middle
        if min(world - 1, int(middle * world / total)) == rank:
            mine.append(task)
        done += task.weight
    return mine


def expand_gzip(task: Task, chunk_bytes: int):
    """Stream a gzip jsonl file as "lines" tasks of about chunk_bytes each (runs in the main process)."""
    try:
        yield from _gzip_chunks(task, chunk_bytes)
    except (OSError, EOFError, zlib.error) as e:
        raise ValueError(f"{task.path}: cannot read as gzip ({e})") from None


def _gzip_chunks(task: Task, chunk_bytes: int):
    with open(task.path, "rb") as raw, gzip.GzipFile(fileobj=raw) as f:
        lines, size, first, number, reported = [], 0, 1, 0, 0
        for line in f:
            number += 1
            lines.append(line)
            size += len(line)
            if size >= chunk_bytes:
                pos = raw.tell()
                yield Task("lines", task.path, start=first, lines=tuple(lines), weight=pos - reported)
                lines, size, first, reported = [], 0, number + 1, pos
        yield Task("lines", task.path, start=first, lines=tuple(lines), weight=task.weight - reported)


def read_task(task: Task, keys) -> Records:
    """The records of one task (runs in a worker)."""
    if task.kind == "jsonl":
        return parse_lines(task.path, read_range(task.path, task.start, task.end), keys, relative=True)
    if task.kind == "lines":
        return parse_lines(task.path, task.lines, keys, first_line=task.start)
    if task.kind == "parquet":
        return _read_row_group(task.path, task.start, keys)
    if task.kind == "files":
        return _read_files(task.path, task.files, keys)
    raise ValueError(f"{task.path}: unknown task kind {task.kind!r}")


def read_range(path: str, start: int, end: int) -> list:
    """The lines that start in bytes [start, end) of path."""
    with open(path, "rb") as f:
        if start > 0:
            f.seek(start - 1)
            if f.read(1) != b"\n":  # start is mid-line: that line belongs to the previous range
                _skip_past_newline(f)
        first = f.tell()
        if first >= end:
            return []
        data = f.read(end - first)
        if not data.endswith(b"\n"):
            data += _read_through_newline(f)
    lines = data.split(b"\n")
    if lines[-1] == b"":
        lines.pop()
    return lines


def _skip_past_newline(f) -> None:
    while block := f.read(_READ_BLOCK):
        i = block.find(b"\n")
        if i >= 0:
            f.seek(i + 1 - len(block), os.SEEK_CUR)
            return


def _read_through_newline(f) -> bytes:
    parts = []
    while block := f.read(_READ_BLOCK):
        i = block.find(b"\n")
        if i >= 0:
            parts.append(block[: i + 1])
            break
        parts.append(block)
    return b"".join(parts)


def check_value(value, key: str):
    """None for a usable value (a string, or a list of strings as Megatron's sentences), else the reason."""
    if type(value) is str:
        return None
    if isinstance(value, list) and all(type(v) is str for v in value):
        return None
    kind = "null" if value is None else type(value).__name__
    return f"key {key!r} is {kind}, not a string"


def parse_lines(path: str, lines, keys, first_line: int = 1, relative: bool = False) -> Records:
    """Parse jsonl lines; a bad line becomes a Skip with its line number and the reason."""
    out = Records(lines=len(lines))
    rows, loads = out.rows, json.loads
    for i, line in enumerate(lines):
        try:
            obj = loads(line.decode("utf-8"))
        except UnicodeDecodeError as e:
            reason, detail = "invalid UTF-8", str(e)
        except ValueError as e:
            reason, detail = ("blank line", "") if not line.strip() else ("bad JSON", str(e))
        else:
            reason, detail = _check_record(obj, keys), ""
            if reason is None:
                rows.append(tuple(obj[k] for k in keys))
                continue
        out.skips.append(Skip(path, reason, detail, line=first_line + i, relative=relative))
    return out


def _check_record(obj, keys):
    """None for a JSON object with a usable value at every key, else the reason."""
    if not isinstance(obj, dict):
        return "not a JSON object"
    for key in keys:
        if key not in obj:
            return f"missing key {key!r}"
        reason = check_value(obj[key], key)
        if reason:
            return reason
    return None


def _read_row_group(path: str, index: int, keys) -> Records:
    import pyarrow.parquet as pq

    try:
        parquet = pq.ParquetFile(path)
        table = parquet.read_row_group(index, columns=list(keys))
    except Exception as e:  # pyarrow's own error types
        raise ValueError(f"{path}: cannot read row group {index} ({e})") from None
    columns = [table.column(k).to_pylist() for k in keys]
    out = Records()
    first_row = sum(parquet.metadata.row_group(i).num_rows for i in range(index))
    for r, row in enumerate(zip(*columns)):
        reason = next(filter(None, (check_value(v, k) for k, v in zip(keys, row))), None)
        if reason:
            out.skips.append(Skip(path, reason, row=first_row + r))
        else:
            out.rows.append(row)
    return out


def _read_files(root: str, files, keys) -> Records:
    out = Records()
    for rel in files:
        path = os.path.join(root, rel)
        with open(path, "rb") as f:
            data = f.read()
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError as e:
            out.skips.append(Skip(path, "undecodable file (not UTF-8)", str(e)))
            continue
        values = {"text": text, "path": rel}
        out.rows.append(tuple(values[k] for k in keys))
    return out
