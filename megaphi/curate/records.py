"""Records on disk: read whole json records from jsonl/parquet/source trees, write jsonl/parquet atomically."""

import json
import os

from megaphi.data.sources import read_range

PARQUET_BATCH = 4096


def write_atomic(path: str, data) -> None:
    """Write str or bytes to path through a temporary file and a rename: a reader sees all of it or nothing."""
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    tmp = f"{path}.tmp{os.getpid()}"
    try:
        with open(tmp, "wb") as f:
            f.write(data.encode("utf-8") if isinstance(data, str) else data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def read_chunk(task, text_key: str = "text"):
    """(records, bad): the whole json objects of one chunk, and (raw, reason, detail) for each unusable line."""
    if task.kind in ("jsonl", "lines"):
        lines = read_range(task.path, task.start, task.end) if task.kind == "jsonl" else task.lines
        where = {"path": task.path, "chunk_byte": task.start} if task.kind == "jsonl" else {"path": task.path}
        return _parse_lines(lines, text_key, where, first_line=task.start if task.kind == "lines" else None)
    if task.kind == "parquet":
        return _read_row_group(task.path, task.start, text_key)
    if task.kind == "files":
        return _read_files(task.path, task.files, text_key), []
    raise ValueError(f"{task.path}: unknown chunk kind {task.kind!r}")


def _parse_lines(lines, text_key, where, first_line):
    records, bad = [], []
    for i, line in enumerate(lines):
        here = dict(where, line=first_line + i) if first_line is not None else dict(where, line_in_chunk=i + 1)
        try:
            obj = json.loads(line.decode("utf-8") if isinstance(line, bytes) else line)
        except UnicodeDecodeError as e:
            bad.append((None, "bad input: invalid UTF-8", dict(here, error=str(e))))
            continue
        except ValueError as e:
            if line.strip():
                bad.append((None, "bad input: bad JSON", dict(here, error=str(e))))
            continue  # blank lines carry no record
        reason = _check(obj, text_key)
        if reason:
            bad.append((obj if isinstance(obj, dict) else None, f"bad input: {reason}", here))
        else:
            records.append(obj)
    return records, bad


def _check(obj, text_key):
    if not isinstance(obj, dict):
        return "not a JSON object"
    if text_key not in obj:
        return f"no {text_key!r} field"
    if not isinstance(obj[text_key], str):
        return f"{text_key!r} is not a string"
    return None


def _read_row_group(path, index, text_key):
    import pyarrow.parquet as pq

    try:
        rows = pq.ParquetFile(path).read_row_group(index).to_pylist()
    except Exception as e:  # pyarrow's own error types
        raise ValueError(f"{path}: cannot read row group {index} ({e})") from None
    records, bad = [], []
    for r, row in enumerate(rows):
        reason = _check(row, text_key)
        if reason:
            bad.append((row, f"bad input: {reason}", {"path": path, "row_group": index, "row_in_group": r}))
        else:
            records.append(row)
    return records, bad


def _read_files(root, files, text_key="text"):
    """One record per source file; undecodable bytes become U+FFFD (the heuristics count them as encoding errors)."""
    records = []
    for rel in files:
        with open(os.path.join(root, rel), "rb") as f:
            data = f.read()
        records.append({text_key: data.decode("utf-8", errors="replace"), "path": rel})
    return records


def read_jsonl(path: str):
    """The json objects of a jsonl file, one per non-blank line; ValueError names the file and line when bad."""
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            if line.strip():
                try:
                    yield json.loads(line)
                except ValueError as e:
                    raise ValueError(f"{path}:{number}: not valid JSON ({e})") from None


def read_records(inputs, text_key: str = "text", extensions=None, progress: bool = False):
    """Every usable record of the inputs, in order, in this process (for small inputs: labels, benchmarks)."""
    from tqdm import tqdm

    from megaphi.curate.stage import plan_chunks

    for task in tqdm(plan_chunks(inputs, text_key, extensions), disable=not progress, desc="read", unit="chunk"):
        yield from read_chunk(task, text_key)[0]


def write_records(path: str, records) -> int:
    """Write records to path (.parquet, else jsonl) atomically; the number written."""
    tmp = f"{path}.tmp{os.getpid()}"
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    try:
        count = _write_parquet(tmp, records) if path.endswith(".parquet") else _write_jsonl(tmp, records)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())  # on disk before the rename makes it the output
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
    return count


def _write_jsonl(path, records) -> int:
    count = 0
    with open(path, "w", encoding="utf-8") as f:
        for record in records:
            f.write(json.dumps(record, ensure_ascii=False) + "\n")
            count += 1
        f.flush()
        os.fsync(f.fileno())
    return count


def _write_parquet(path, records) -> int:
    import pyarrow as pa
    import pyarrow.parquet as pq

    writer, batch, count = None, [], 0
    try:
        for record in records:
            batch.append(record)
            if len(batch) >= PARQUET_BATCH:
                writer = _write_batch(pa, pq, path, writer, batch)
                count, batch = count + len(batch), []
        if batch or writer is None:
            writer = _write_batch(pa, pq, path, writer, batch)
            count += len(batch)
    finally:
        if writer is not None:
            writer.close()
    return count


def _write_batch(pa, pq, path, writer, batch):
    if writer is not None:
        names = set(writer.schema.names)
        extra = next((k for r in batch for k in r if k not in names), None)
        if extra is not None:  # from_pylist would drop the field silently
            raise ValueError(f"{path}: field {extra!r} first appears after record {PARQUET_BATCH}: a parquet "
                             "file has one schema; write jsonl instead")
    if writer is None:  # the first batch sets the schema: every field any of its records has (from_pylist would
        names = list(dict.fromkeys(k for r in batch for k in r))  # take only the first record's)
        table = pa.table({k: [r.get(k) for r in batch] for k in names})
    else:
        table = pa.Table.from_pylist(batch, schema=writer.schema)
    if writer is None:
        writer = pq.ParquetWriter(path, table.schema)
    writer.write_table(table)
    return writer
