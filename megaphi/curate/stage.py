"""A curation stage: stream records from jsonl/parquet/source trees through a filter, in parallel, resumably.

The input is cut into ordered chunks (megaphi.data.sources tasks). Each chunk is read and filtered in a worker
process, which writes its kept records, its report lines and its counts to OUTPUT.parts/ (each file atomically,
the counts last, so a chunk is done exactly when its counts exist). A rerun after a crash skips the done chunks.
Under mpiexec each rank takes a share of the chunks; rank 0 then concatenates the parts, in input order, into
the output (atomically) and writes OUTPUT.summary.json. Nothing is dropped without a reason in the counts.
"""

import hashlib
import json
import os
import shutil
import time
from collections import Counter, deque
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field

from megaphi.curate.records import (read_chunk, read_jsonl, write_atomic, write_records)
from megaphi.data.preprocess import mpi_comm
from megaphi.data.sources import expand_gzip, expand_inputs, plan_tasks, share_tasks

CHUNK_BYTES = 4 << 20
SUMMARY_SUFFIX = ".summary.json"


@dataclass
class Outcome:
    """What a filter returns for one chunk: kept records, (record, reason, detail) drops, extra counters."""

    kept: list
    dropped: list = field(default_factory=list)
    counts: dict = field(default_factory=dict)

    @classmethod
    def by_record(cls, records, check) -> "Outcome":
        """Keep the records check(record) finds nothing in (None); drop the rest with its (reason, detail)."""
        out = cls(kept=[])
        for record in records:
            found = check(record)
            if found is None:
                out.kept.append(record)
            else:
                out.dropped.append((record, *found))
        return out


@dataclass
class StageSummary:
    """Counts of one stage: records in, kept, dropped by reason, bytes, time and the filter's own counters."""

    name: str
    records_in: int = 0
    kept: int = 0
    dropped: Counter = field(default_factory=Counter)
    bytes_in: int = 0
    bytes_out: int = 0
    seconds: float = 0.0
    counts: Counter = field(default_factory=Counter)
    output: str = ""
    cached: bool = False  # True when a finished run's summary was returned and nothing was redone

    def mb_per_s(self) -> float:
        """Input megabytes (1e6 bytes) per second."""
        return self.bytes_in / 1e6 / self.seconds if self.seconds > 0 else 0.0

    def add(self, part: dict) -> None:
        """Add one chunk's counts (as written by the worker)."""
        self.records_in += part["records_in"]
        self.kept += part["kept"]
        self.dropped.update(part["dropped"])
        self.bytes_in += part["bytes_in"]
        self.counts.update(part["counts"])

    def to_dict(self) -> dict:
        """A json-ready dict."""
        return {"name": self.name, "records_in": self.records_in, "kept": self.kept,
                "dropped": dict(sorted(self.dropped.items())), "bytes_in": self.bytes_in,
                "bytes_out": self.bytes_out, "seconds": round(self.seconds, 3), "mb_per_s": round(self.mb_per_s(), 3),
                "counts": dict(sorted(self.counts.items())), "output": self.output}

    @classmethod
    def from_dict(cls, d: dict) -> "StageSummary":
        """The summary that to_dict() wrote."""
        return cls(d["name"], d["records_in"], d["kept"], Counter(d["dropped"]), d["bytes_in"], d["bytes_out"],
                   d["seconds"], Counter(d["counts"]), d.get("output", ""))

    def format(self) -> str:
        """A small table for the terminal."""
        n = max(self.records_in, 1)
        lines = [f"{self.name}: {self.records_in:,} records in, {self.kept:,} kept ({100 * self.kept / n:.1f}%), "
                 f"{sum(self.dropped.values()):,} dropped; {self.bytes_in / 1e6:,.1f} MB in {self.seconds:.1f} s "
                 f"({self.mb_per_s():.2f} MB/s)"]
        for reason, count in sorted(self.dropped.items(), key=lambda kv: -kv[1]):
            lines.append(f"  dropped  {count:>10,}  {reason}")
        for name, count in sorted(self.counts.items()):
            lines.append(f"  count    {count:>10,}  {name}")
        if self.output:
            lines.append(f"  output   {self.output}")
        return "\n".join(lines)


def mpi_world():
    """(rank, world size, mpi4py communicator or None): (0, 1, None) outside a multi-rank mpiexec."""
    comm = mpi_comm()
    return (comm.Get_rank(), comm.Get_size(), comm) if comm else (0, 1, None)


def plan_chunks(inputs, text_key: str = "text", extensions=None, chunk_bytes: int = CHUNK_BYTES) -> list:
    """The inputs cut into ordered chunks (gzip files are read here into chunks of lines); the same on every rank."""
    tasks = []
    for path in expand_inputs(inputs, extensions):
        # a source file becomes {text_key: contents, "path"}, so only jsonl and parquet must hold text_key
        source = os.path.isdir(path) or (extensions and path.endswith(tuple(extensions)))
        for task in plan_tasks([path], ("text",) if source else (text_key,), extensions, chunk_bytes):
            tasks.extend(expand_gzip(task, chunk_bytes) if task.kind == "gzip" else [task])
    return tasks


def map_ordered(fn, items, workers: int, desc: str = "", weights=None, progress: bool = True):
    """fn(item) for each item, in order, on `workers` processes (fn and items picklable), with a progress bar."""
    from tqdm import tqdm

    items = list(items)
    unit = "it" if weights is None else "B"
    weights = list(weights) if weights is not None else [1] * len(items)
    bar = tqdm(total=sum(weights), desc=desc, disable=not progress, unit=unit,
               unit_scale=True, mininterval=1.0, dynamic_ncols=True)
    try:
        if workers <= 1:
            for item, w in zip(items, weights):
                yield fn(item)
                bar.update(w)
            return
        with ProcessPoolExecutor(workers) as pool:
            pending = deque()
            for item, w in zip(items, weights):
                pending.append((pool.submit(fn, item), w))
                if len(pending) >= 2 * workers + 2:  # a bounded window: memory stays flat
                    future, done = pending.popleft()
                    yield future.result()
                    bar.update(done)
            while pending:
                future, done = pending.popleft()
                yield future.result()
                bar.update(done)
    finally:
        bar.close()


def input_stats(tasks) -> list:
    """(path, size, mtime) of every input file, those inside source folders included: what a rerun compares."""
    files = set()
    for t in tasks:
        files.update([os.path.join(t.path, f) for f in t.files] if t.kind == "files" else [t.path])
    return [(os.path.abspath(p), st.st_size, st.st_mtime_ns) for p in sorted(files) for st in [os.stat(p)]]


def _fingerprint(name, tasks, text_key, params, report, keep_dropped) -> str:
    """What a run's outputs depend on: the inputs, chunking, text key, report and the filter's params."""
    report = os.path.abspath(report) if report else None
    blob = json.dumps([name, input_stats(tasks), len(tasks), text_key, params, report, keep_dropped],
                      sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()


def _part_paths(parts: str, i: int) -> tuple:
    stem = os.path.join(parts, f"part-{i:06d}")
    return stem + ".jsonl", stem + ".report.jsonl", stem + ".counts.json"


def _run_chunk(job) -> None:
    """Worker: read one chunk, filter it, write its parts (counts last: the done marker)."""
    process, task, text_key, parts, i, keep_dropped = job
    kept_path, report_path, counts_path = _part_paths(parts, i)
    records, bad = read_chunk(task, text_key)
    if not records:
        outcome = Outcome(kept=[])
    else:  # a filter that works per chunk (dedup's drop lists) says so with takes_chunk
        outcome = process(records, chunk=i) if getattr(process, "takes_chunk", False) else process(records)
    drops = list(bad) + list(outcome.dropped)
    write_atomic(kept_path, jsonl_bytes(outcome.kept))
    write_atomic(report_path, jsonl_bytes(_report_line(r, reason, detail, keep_dropped, text_key)
                                          for r, reason, detail in drops))
    counts = {"records_in": len(records) + len(bad), "kept": len(outcome.kept),
              "dropped": dict(Counter(reason for _, reason, _ in drops)), "bytes_in": task.weight,
              "counts": dict(outcome.counts)}
    write_atomic(counts_path, json.dumps(counts))


def jsonl_bytes(objs) -> bytes:
    """Objects as UTF-8 jsonl; one holding a lone surrogate (valid JSON, not UTF-8) is written \\u-escaped."""
    out = []
    for obj in objs:
        line = json.dumps(obj, ensure_ascii=False) + "\n"
        try:
            out.append(line.encode("utf-8"))
        except UnicodeEncodeError:
            out.append((json.dumps(obj) + "\n").encode("ascii"))
    return b"".join(out)


def _report_line(record, reason, detail, keep_record: bool, text_key: str = "text") -> dict:
    """One report line: the reason, its detail, and the record (whole, or its id/path and first characters)."""
    line = {"reason": reason, **(detail or {})}
    if keep_record or not isinstance(record, dict):
        line["record"] = record
    else:
        for key in ("id", "path", "task_id"):
            if key in record:
                line[key] = record[key]
        text = record.get(text_key)
        if isinstance(text, str):
            line["text_head"] = text[:200]
    return line


def _merge(output, report, parts, count, summary) -> None:
    """Rank 0: the parts, in order, into the output and the report (each written atomically)."""
    kept_files = [_part_paths(parts, i)[0] for i in range(count)]
    if output.endswith(".parquet"):
        write_records(output, (r for path in kept_files for r in read_jsonl(path)))
    else:
        _concatenate(kept_files, output)
    if report:
        _concatenate([_part_paths(parts, i)[1] for i in range(count)], report)
    summary.bytes_out = os.path.getsize(output)


def _concatenate(files, output) -> None:
    tmp = f"{output}.tmp{os.getpid()}"
    try:
        with open(tmp, "wb") as out:
            for path in files:
                with open(path, "rb") as f:
                    shutil.copyfileobj(f, out, 1 << 20)
            out.flush()
            os.fsync(out.fileno())  # on disk before the parts it came from are removed
        os.replace(tmp, output)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def run_filter_stage(name, inputs, output, process, *, text_key="text", workers=1, report=None, extensions=None,
                     resume=True, progress=True, params=None, keep_dropped=False,
                     chunk_bytes=CHUNK_BYTES) -> StageSummary:
    """Filter `inputs` into `output` with process(records) -> Outcome; see the module docstring.

    `params` (json-able) names the filter's settings: a rerun with other settings or inputs starts over. A
    completed output with a matching summary is not redone. `report` gets one jsonl line per dropped record
    (its reason, the detail the filter gave, and its id/path/first characters, or the whole record with
    keep_dropped). Returns the summary on every rank.
    """
    rank, world, comm = mpi_world()
    start = time.perf_counter()
    tasks = plan_chunks(inputs, text_key, extensions, chunk_bytes)
    _check_outputs(output, report, tasks)
    fingerprint = _fingerprint(name, tasks, text_key, params, report, keep_dropped)
    summary_path = output + SUMMARY_SUFFIX
    done_before = os.path.exists(output) and os.path.exists(summary_path) and (not report or os.path.exists(report))
    if resume and done_before:
        with open(summary_path) as f:
            done = json.load(f)
        if done.get("fingerprint") == fingerprint:
            summary = StageSummary.from_dict(done["summary"])
            summary.cached = True
            return summary
    parts = output + ".parts"
    if rank == 0:
        _prepare_parts(parts, fingerprint, resume)
    if comm:
        comm.Barrier()
    mine = {id(t) for t in share_tasks(tasks, rank, world)}  # by identity: an input named twice has equal tasks
    todo = [i for i, t in enumerate(tasks) if id(t) in mine and not os.path.exists(_part_paths(parts, i)[2])]
    jobs = [(process, tasks[i], text_key, parts, i, keep_dropped) for i in todo]
    desc = name if world == 1 else f"{name} [rank {rank}]"
    for _ in map_ordered(_run_chunk, jobs, workers, desc, [tasks[i].weight or 1 for i in todo], progress):
        pass
    if comm:
        comm.Barrier()
    summary = StageSummary(name, output=output)
    if rank == 0:
        for i in range(len(tasks)):
            with open(_part_paths(parts, i)[2]) as f:
                summary.add(json.load(f))
        _merge(output, report, parts, len(tasks), summary)
        summary.seconds = time.perf_counter() - start
        write_atomic(summary_path, json.dumps({"fingerprint": fingerprint, "summary": summary.to_dict()}, indent=1))
        shutil.rmtree(parts, ignore_errors=True)
    if comm:
        summary = comm.bcast(summary, root=0)
    return summary


def update_summary(output: str, summary: StageSummary) -> None:
    """Rewrite OUTPUT.summary.json with summary (a multi-stage tool's totals), keeping its fingerprint."""
    path = output + SUMMARY_SUFFIX
    with open(path) as f:
        done = json.load(f)
    done["summary"] = summary.to_dict()
    write_atomic(path, json.dumps(done, indent=1))


def _check_outputs(output, report, tasks) -> None:
    """ValueError for an output that is a folder, or that is also an input (the only copy would be replaced)."""
    for flag, path in (("--output", output), ("--report", report)):
        if path and os.path.isdir(path):
            raise ValueError(f"{flag} {path} is a directory, not a file")
    inputs = {os.path.abspath(t.path) for t in tasks}
    for flag, path in (("--output", output), ("--report", report)):
        if path and os.path.abspath(path) in inputs:
            raise ValueError(f"{flag} {path} is also an --input: write it elsewhere")


def _prepare_parts(parts, fingerprint, resume) -> None:
    """Keep the parts of an interrupted run with the same fingerprint; otherwise start an empty folder."""
    marker = os.path.join(parts, "fingerprint")
    if resume and os.path.exists(marker):
        with open(marker) as f:
            if f.read() == fingerprint:
                return
    shutil.rmtree(parts, ignore_errors=True)
    os.makedirs(parts)
    write_atomic(marker, fingerprint)
