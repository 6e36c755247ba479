"""Tokenize jsonl, parquet or source trees into Megatron indexed datasets, byte-identical to Megatron-LM.

Per document and key, as Megatron does: ids = tokenize(text) (a list of strings gives one sequence per
non-empty string); non-empty ids form a sequence; --append-eod appends the end-of-document id to the last
sequence of a document that produced tokens; every document is added, so an empty one is a boundary.

The input is cut into ordered tasks (sources.py). Workers read and tokenize whole tasks (a tokenizer built once
per worker) and return flat numpy arrays; the main process only writes them, in task order, with a bounded
number of tasks in flight so memory stays flat. Under `mpiexec -n N` each rank does a contiguous share of the
tasks into a partial dataset beside the output (so the output folder must be shared by the ranks, as for
Megatron) and rank 0 merges the partials in rank order: the same bytes as one process.
"""

import itertools
import multiprocessing
import os
import queue
import signal
import time
import traceback
from collections import Counter
from dataclasses import dataclass, field

import numpy as np

from megaphi.data.indexed_dataset import IndexedDatasetBuilder, best_dtype, merge_datasets
from megaphi.data.sources import Skip, expand_gzip, expand_inputs, plan_tasks, read_task, share_tasks

MAX_EXAMPLES = 20  # skipped lines shown in full in the summary; all of them are counted
_MPI_SIZE_VARS = ("PMI_SIZE", "OMPI_COMM_WORLD_SIZE", "MV2_COMM_WORLD_SIZE")


@dataclass
class PreprocessConfig:
    """What tools/preprocess_data.py passes in; field names follow Megatron's flags."""

    inputs: list
    output_prefix: str
    tokenizer_type: str
    tokenizer_model: str
    json_keys: tuple = ("text",)
    append_eod: bool = False
    workers: int = 1
    log_interval: int = 1000
    extensions: tuple = ()
    strict: bool = False
    chunk_bytes: int | None = None  # None: picked from the input size, workers and ranks
    progress: bool = True


@dataclass
class TaskResult:
    """One task's output: per key (flat tokens, sequence lengths, sequences per document), and its counts."""

    arrays: dict
    documents: int
    empty: int  # documents whose first key gave no tokens
    tokens: dict
    nbytes: int
    lines: int
    skips: list
    path: str
    kind: str


@dataclass
class Summary:
    """Counts for one run (or one rank): documents, tokens per key, input bytes, and what was skipped."""

    documents: int = 0
    empty_documents: int = 0  # documents whose first key gave no tokens (kept, as boundaries)
    tokens: dict = field(default_factory=dict)
    input_bytes: int = 0
    skipped: Counter = field(default_factory=Counter)
    examples: list = field(default_factory=list)
    lines: dict = field(default_factory=dict)  # jsonl lines read per file (numbers the next task's lines)
    seconds: float = 0.0
    outputs: dict = field(default_factory=dict)

    def add(self, result: TaskResult) -> None:
        """Count one task's results (tasks in input order); numbers its jsonl skips from the file's start."""
        if result.kind == "jsonl":
            before = self.lines.get(result.path, 0)
            for skip in result.skips:
                skip.line += before
            self.lines[result.path] = before + result.lines
        self._count(result.documents, result.empty, result.tokens, result.nbytes)
        self.skipped.update(s.reason for s in result.skips)
        self.examples.extend(result.skips[: MAX_EXAMPLES - len(self.examples)])

    def merge(self, other: "Summary") -> None:
        """Fold in the next rank's counts (ranks in order: its jsonl line numbers continue this rank's)."""
        for skip in other.examples:
            if skip.relative:
                skip.line += self.lines.get(skip.path, 0)
                skip.relative = False
        for path, n in other.lines.items():
            self.lines[path] = self.lines.get(path, 0) + n
        self._count(other.documents, other.empty_documents, other.tokens, other.input_bytes)
        self.skipped.update(other.skipped)
        self.examples.extend(other.examples[: MAX_EXAMPLES - len(self.examples)])
        self.seconds = max(self.seconds, other.seconds)

    def _count(self, documents: int, empty: int, tokens: dict, nbytes: int) -> None:
        self.documents += documents
        self.empty_documents += empty
        for key, n in tokens.items():
            self.tokens[key] = self.tokens.get(key, 0) + n
        self.input_bytes += nbytes

    def report(self) -> str:
        """A human-readable summary."""
        secs = max(self.seconds, 1e-9)
        lines = [
            f"preprocess: {self.documents:,} documents ({self.empty_documents:,} empty, kept as boundaries), "
            f"{self.input_bytes / 1e6:,.2f} MB in {self.seconds:.1f} s "
            f"({self.input_bytes / 1e6 / secs:,.2f} MB/s, {self.documents / secs:,.0f} docs/s)"
        ]
        for key, n in self.tokens.items():
            out = self.outputs.get(key, "")
            lines.append(f"  {key}: {n:,} tokens ({n / secs:,.0f} tokens/s) -> {out}.bin/.idx")
        total = sum(self.skipped.values())
        if total:
            reasons = ", ".join(f"{n:,} {r}" for r, n in self.skipped.most_common())
            lines.append(f"  skipped {total:,} records: {reasons}")
            lines.extend(f"    {s}" for s in self.examples)
            if total > len(self.examples):
                lines.append(f"    ... and {total - len(self.examples):,} more")
        else:
            lines.append("  skipped 0 records")
        return "\n".join(lines)


class StrictError(ValueError):
    """--strict met a malformed record (`skip`; its jsonl line counts from this rank's share of the file)."""

    def __init__(self, skip: Skip):
        super().__init__(f"{skip} (--strict: stopping at the first malformed record)")
        self.skip = skip


class Encoder:
    """Reads a task and tokenizes its documents into flat arrays per key (one per worker process)."""

    def __init__(self, tokenizer_type: str, tokenizer_model: str, keys, append_eod: bool):
        from megaphi.data.tokenizer import build_tokenizer

        self.tokenizer = build_tokenizer(tokenizer_type, tokenizer_model)
        self.keys = tuple(keys)
        self.append_eod = append_eod
        self.dtype = best_dtype(self.tokenizer.vocab_size)

    def __call__(self, task) -> TaskResult:
        """Read and tokenize one task."""
        records = read_task(task, self.keys)
        arrays = {key: self.encode_documents([row[j] for row in records.rows]) for j, key in enumerate(self.keys)}
        first = arrays[self.keys[0]]
        return TaskResult(
            arrays, len(records.rows), int(np.count_nonzero(first[2] == 0)),
            {key: int(a[0].size) for key, a in arrays.items()}, task.weight, records.lines, records.skips,
            task.path, task.kind,
        )

    def encode_documents(self, values):
        """Flat tokens, int32 sequence lengths, int64 sequences per document, for a list of documents."""
        if all(type(v) is str for v in values):
            texts, owner = values, None
        else:  # Megatron's list-of-sentences documents: one sequence per non-empty sentence
            texts = [s for v in values for s in ([v] if type(v) is str else v)]
            owner = np.repeat(np.arange(len(values)), [1 if type(v) is str else len(v) for v in values])
        ids = self.tokenizer.encode_batch(texts) if texts else []
        lengths = np.fromiter(map(len, ids), dtype=np.int64, count=len(ids))
        if ids and isinstance(ids[0], np.ndarray):
            flat = np.concatenate(ids).astype(self.dtype, copy=False)
        else:
            flat = np.fromiter(itertools.chain.from_iterable(ids), dtype=self.dtype, count=int(lengths.sum()))
        nonempty = lengths > 0
        seq_lengths = lengths[nonempty]
        if owner is None:
            doc_sizes = nonempty.astype(np.int64)
            doc_tokens = lengths
        else:
            doc_sizes = np.bincount(owner[nonempty], minlength=len(values)).astype(np.int64)
            doc_tokens = np.bincount(owner, weights=lengths, minlength=len(values)).astype(np.int64)
        if self.append_eod:
            has_tokens = doc_sizes > 0
            flat = np.insert(flat, np.cumsum(doc_tokens)[has_tokens], self.tokenizer.eod)
            seq_lengths[np.cumsum(doc_sizes)[has_tokens] - 1] += 1
        return flat, seq_lengths.astype(np.int32), doc_sizes


def _worker_main(tasks, results, encoder_args) -> None:
    """A worker process: build the tokenizer once, then encode the tasks it is sent (until it is killed)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the main process handles Ctrl-C and stops the workers
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    try:
        encoder = Encoder(*encoder_args)
        results.put((True, encoder.dtype))  # ready: the main process needs no tokenizer of its own
        while True:
            results.put((True, encoder(tasks.get())))
    except Exception as e:  # sent back as text: not every exception pickles
        if isinstance(e, (ValueError, OSError)):  # bad input or a missing file: the message says it all
            results.put((False, (ValueError, str(e))))
        else:
            results.put((False, (RuntimeError, f"worker failed:\n{traceback.format_exc()}")))


class _Workers:
    """Worker processes fed round-robin, each through its own queues, so results come back in task order.

    Unlike multiprocessing.Pool, nothing is respawned and no lock is shared: a killed worker cannot hang the
    main process, which notices it and stops.
    """

    def __init__(self, count: int, encoder_args):
        ctx = multiprocessing.get_context()
        self.queues = [(ctx.Queue(), ctx.Queue()) for _ in range(count)]
        self.procs = [ctx.Process(target=_worker_main, args=(*q, encoder_args), daemon=True) for q in self.queues]
        for proc in self.procs:
            proc.start()

    def ready(self) -> np.dtype:
        """Wait until every worker has built its tokenizer; the token dtype they use."""
        return [self.receive(i) for i in range(len(self.procs))][0]

    def send(self, i: int, task) -> None:
        self.queues[i % len(self.procs)][0].put(task)

    def receive(self, i: int):
        worker = i % len(self.procs)
        while True:
            try:
                ok, value = self.queues[worker][1].get(timeout=1.0)
                break
            except queue.Empty:
                if not self.procs[worker].is_alive():
                    raise RuntimeError(f"worker {worker} died (exit code {self.procs[worker].exitcode})") from None
        if not ok:
            error, message = value
            raise error(message)
        return value

    def close(self) -> None:
        for proc in self.procs:
            proc.kill()
        for proc in self.procs:
            proc.join()
        for tasks, results in self.queues:
            tasks.cancel_join_thread()  # data for a dead worker must not block our exit
            tasks.close()
            results.close()


def _ordered_results(tasks, encoder_args, workers: int, window: int):
    """Results of the tasks in task order, with at most `window` tasks in flight (memory stays flat)."""
    if workers <= 1:
        encoder = Encoder(*encoder_args)
        yield encoder.dtype
        for task in tasks:
            yield encoder(task)
        return
    pool = _Workers(workers, encoder_args)
    try:
        yield pool.ready()  # the tokenizer loads (or fails clearly) before any work
        sent = received = 0
        for task in tasks:
            pool.send(sent, task)
            sent += 1
            if sent - received >= window:
                yield pool.receive(received)
                received += 1
        while received < sent:
            yield pool.receive(received)
            received += 1
    finally:
        pool.close()


def _expand(tasks, chunk_bytes: int):
    """Tasks as workers take them: gzip files become chunks of lines read here, the rest pass through."""
    for task in tasks:
        if task.kind == "gzip":
            yield from expand_gzip(task, chunk_bytes)
        else:
            yield task


def _run_tasks(cfg: PreprocessConfig, tasks, prefixes: dict, chunk_bytes: int, show: bool) -> Summary:
    """Tokenize tasks into one dataset per key at `prefixes`; abort (no output) on any error."""
    from tqdm import tqdm

    summary, start = Summary(tokens=dict.fromkeys(prefixes, 0), outputs=dict(prefixes)), time.perf_counter()
    args = (cfg.tokenizer_type, cfg.tokenizer_model, tuple(cfg.json_keys), cfg.append_eod)
    results = _ordered_results(_expand(tasks, chunk_bytes), args, cfg.workers, window=2 * cfg.workers + 2)
    dtype = next(results)
    builders = {}
    bar = tqdm(total=sum(t.weight for t in tasks), unit="B", unit_scale=True, disable=not show,
               desc="preprocess", mininterval=1.0, dynamic_ncols=True)
    try:
        for key, prefix in prefixes.items():
            builders[key] = IndexedDatasetBuilder(prefix, dtype=dtype)
        shown = 0
        for result in results:
            summary.add(result)
            if cfg.strict and result.skips:
                raise StrictError(result.skips[0])
            for key, arrays in result.arrays.items():
                builders[key].add_documents(*arrays)
            bar.update(result.nbytes)
            if summary.documents - shown >= cfg.log_interval:
                shown, secs = summary.documents, time.perf_counter() - start
                rate = sum(summary.tokens.values()) / secs
                bar.set_postfix_str(f"{shown / secs:,.0f} docs/s, {rate / 1e6:,.2f}M tokens/s", refresh=False)
        for builder in builders.values():
            builder.finalize()
    except BaseException:
        for builder in builders.values():
            builder.abort()
        raise
    finally:
        results.close()
        bar.close()
    summary.seconds = time.perf_counter() - start
    return summary


def mpi_comm():
    """MPI.COMM_WORLD when launched by mpiexec with more than one rank, else None (mpi4py not imported)."""
    if any(int(os.environ.get(v, "1") or 1) > 1 for v in _MPI_SIZE_VARS):
        from mpi4py import MPI

        if MPI.COMM_WORLD.Get_size() > 1:
            return MPI.COMM_WORLD
    return None


def mpi_rank() -> int:
    """This process's MPI rank (0 outside mpiexec)."""
    comm = mpi_comm()
    return comm.Get_rank() if comm else 0


def _auto_chunk_bytes(paths, workers: int, world: int) -> int:
    """1 MiB tasks (a worker's memory is a few tasks' worth, whatever the corpus size); smaller for small
    inputs, so that every worker on every rank gets several."""
    total = sum(os.path.getsize(p) for p in paths if os.path.isfile(p))
    if total == 0:
        return 1 << 20
    return int(min(1 << 20, max(64 << 10, total // (4 * max(1, workers) * world))))


def output_prefixes(output_prefix: str, keys) -> dict:
    """Megatron's output names: {prefix}_{key}_document for each --json-keys key."""
    return {key: f"{output_prefix}_{key}_document" for key in keys}


def preprocess(cfg: PreprocessConfig) -> Summary:
    """Run the whole preprocessing (on every rank under mpiexec); the Summary covers all ranks."""
    if cfg.workers < 1:
        raise ValueError(f"--workers must be at least 1, got {cfg.workers}")
    if not cfg.json_keys:
        raise ValueError("--json-keys: give at least one key")
    if cfg.chunk_bytes is not None and cfg.chunk_bytes < 1:
        raise ValueError(f"--chunk-bytes must be at least 1, got {cfg.chunk_bytes}")
    comm = mpi_comm()
    rank, world = (comm.Get_rank(), comm.Get_size()) if comm else (0, 1)
    paths = expand_inputs(cfg.inputs, cfg.extensions)
    chunk = cfg.chunk_bytes or _auto_chunk_bytes(paths, cfg.workers, world)
    tasks = plan_tasks(paths, cfg.json_keys, cfg.extensions, chunk)
    finals = output_prefixes(cfg.output_prefix, cfg.json_keys)
    os.makedirs(os.path.dirname(os.path.abspath(cfg.output_prefix)), exist_ok=True)
    if comm is None:
        return _run_tasks(cfg, tasks, finals, chunk, cfg.progress)

    partials = {k: f"{p}.part{rank}of{world}" for k, p in finals.items()}
    try:
        outcome = _run_tasks(cfg, share_tasks(tasks, rank, world), partials, chunk, cfg.progress and rank == 0)
    except StrictError as e:
        outcome = e.skip
    except Exception as e:  # every rank must reach the gather, or the others wait forever
        outcome = f"rank {rank}: {e}"
    gathered = comm.gather(outcome, root=0)
    if rank == 0:
        try:
            outcome = _merge_ranks(gathered, finals, world)
        except Exception as e:
            outcome = f"rank 0: merging the ranks' partial datasets: {e}"
        finally:
            for final in finals.values():
                for r in range(world):
                    for ext in (".bin", ".idx"):
                        if os.path.exists(f"{final}.part{r}of{world}{ext}"):
                            os.remove(f"{final}.part{r}of{world}{ext}")
    outcome = comm.bcast(outcome, root=0)
    if isinstance(outcome, str):
        raise ValueError(outcome)
    return outcome


def _merge_ranks(outcomes, finals: dict, world: int):
    """Rank 0: the error message of the first rank that failed, or merge every rank's partial dataset, in
    rank order, into the final outputs and return the Summary of the whole run."""
    total = Summary(outputs=dict(finals))
    for rank, outcome in enumerate(outcomes):
        if isinstance(outcome, Skip):  # a --strict stop: the ranks before it ran to the end, so count on
            if outcome.relative:
                outcome.line += total.lines.get(outcome.path, 0)
            return f"rank {rank}: {StrictError(outcome)}"
        if isinstance(outcome, str):
            return outcome
        total.merge(outcome)
    start = time.perf_counter()
    for key, final in finals.items():
        merge_datasets([f"{final}.part{r}of{world}" for r in range(world)], final)
    total.seconds += time.perf_counter() - start
    return total
