"""Exact and MinHash-LSH near-duplicate removal in four resumable stages, out of core, on many processes.

Documents are numbered in input order (the usable records of the chunks of megaphi.curate.stage, in order).
Everything between stages lives in files under the work folder, so any stage runs on processes (--workers) and
ranks (mpiexec) that share that folder, and memory stays bounded by a chunk or a bucket partition:

  signatures/  per chunk: MinHash signatures (sig-*.npy), sha256 content digests, shingle counts, a label and
               text head per record (labels-*.json), and meta-*.json (record count, chunk fingerprint: the done
               marker)
  buckets/     per chunk and partition: (key, doc) pairs, one per LSH band and one exact-content key per doc,
               partitioned by key, so equal keys meet in one partition file set
  clusters/    per partition: candidate edges (docs sharing a key, verified by estimated Jaccard or digest);
               then union-find over all edges; per chunk: which records go and which kept record they match
  filter       megaphi.curate.stage.run_filter_stage keeps the first document of each cluster
"""

import hashlib
import io
import json
import os
import shutil
import time
from dataclasses import dataclass

import numpy as np

from megaphi.curate.dedup_minhash import MinHasher, band_keys, components, exact_keys, optimal_bands
from megaphi.curate.records import read_chunk, write_atomic
from megaphi.curate.stage import (CHUNK_BYTES, Outcome, input_stats, map_ordered, mpi_world, plan_chunks,
                                   run_filter_stage, update_summary)
from megaphi.data.sources import share_tasks

STAGES = ("signatures", "buckets", "clusters", "filter")
LABEL_KEYS = ("id", "path", "task_id")
HEAD_CHARS = 80
BLOCK = 1 << 16  # bucket entries (or drops) verified at once: at most 64 MB of 256-permutation signatures
VERIFY_WINDOW = 64  # a candidate that fails against its bucket's first doc is tried against at most this many
BUCKET_DTYPE = np.dtype([("key", "<u8"), ("doc", "<i8"), ("exact", "u1")])


@dataclass
class DedupConfig:
    """Settings of a dedup run (flags of tools/dedup.py)."""

    inputs: list
    output: str
    workdir: str = ""  # default: OUTPUT.dedup
    threshold: float = 0.7  # estimated Jaccard similarity at or above which two documents are near duplicates
    num_perm: int = 256
    ngram: int = 5  # words per shingle
    seed: int = 1
    bands: int = 0  # 0: bands and rows from the threshold (optimal_bands)
    rows: int = 0
    partitions: int = 16  # bucket partitions: each must fit in memory in the clusters stage
    verify: bool = True  # check each candidate pair's estimated Jaccard (False: every band collision is a match)
    text_key: str = "text"
    extensions: tuple = ()
    workers: int = 1
    report: str = ""
    keep_dropped: bool = False  # the report holds each removed record whole
    resume: bool = True
    progress: bool = True
    chunk_bytes: int = CHUNK_BYTES

    def __post_init__(self):
        self.workdir = self.workdir or self.output + ".dedup"
        if not 0.0 < self.threshold <= 1.0:
            raise ValueError(f"--threshold must be in (0, 1], got {self.threshold}")
        if (self.bands > 0) != (self.rows > 0):
            raise ValueError("--bands and --rows go together (or leave both out to derive them from --threshold)")
        if not self.bands:
            self.bands, self.rows = optimal_bands(min(self.threshold, 0.999), self.num_perm)
        if self.bands * self.rows > self.num_perm:
            raise ValueError(f"--bands {self.bands} x --rows {self.rows} exceeds --num-perm {self.num_perm}")
        if self.partitions < 1 or self.workers < 1:
            raise ValueError("--partitions and --workers must be >= 1")


def _digest(text: str) -> bytes:
    return hashlib.sha256(text.encode("utf-8", "surrogatepass")).digest()[:16]


def chunk_fingerprint(records) -> str:
    """A hash of a chunk's whole records, in order: how the filter recognises which chunk it was given."""
    h = hashlib.sha256()
    for r in records:
        h.update(json.dumps(r, sort_keys=True, ensure_ascii=False, default=str).encode("utf-8", "surrogatepass"))
        h.update(b"\n")
    return h.hexdigest()


def _label(record) -> dict:
    return {k: record[k] for k in LABEL_KEYS if isinstance(record.get(k), (str, int, float))}


def _save_npy(path: str, array) -> None:
    buf = io.BytesIO()
    np.save(buf, array)
    write_atomic(path, buf.getvalue())


def _read_json(path: str):
    with open(path, encoding="utf-8") as f:
        return json.load(f)


class Workdir:
    """Paths of the work folder."""

    def __init__(self, root: str):
        self.root = root
        self.sig, self.buckets, self.clusters = (os.path.join(root, s) for s in STAGES[:3])

    def signature(self, kind: str, i: int) -> str:
        return os.path.join(self.sig, f"{kind}-{i:06d}.{'json' if kind in ('meta', 'labels') else 'npy'}")

    def bucket(self, p: int, i: int) -> str:
        return os.path.join(self.buckets, f"p{p:04d}", f"c{i:06d}.npy")

    def bucket_done(self, i: int) -> str:
        return os.path.join(self.buckets, f"done-{i:06d}")

    def edges(self, p: int) -> str:
        return os.path.join(self.clusters, f"edges-p{p:04d}.npy")

    def drops(self, i: int) -> str:
        return os.path.join(self.clusters, f"drops-{i:06d}.json")

    def clusters_done(self) -> str:
        return os.path.join(self.clusters, "done.json")


# ---- stage 1: signatures -------------------------------------------------------------------------------------

def _signature_job(job) -> dict:
    """Worker: one chunk's signatures, digests, shingle counts and meta (the meta last: the done marker)."""
    task, i, text_key, hasher, wd = job
    records, _ = read_chunk(task, text_key)
    texts = [r[text_key] for r in records]
    sigs, counts = hasher.signatures(texts)
    digests = np.frombuffer(b"".join(_digest(t) for t in texts), dtype=np.uint8).reshape(len(texts), 16)
    _save_npy(wd.signature("sig", i), sigs)
    _save_npy(wd.signature("digest", i), digests)
    _save_npy(wd.signature("shingles", i), counts)
    labels = {"labels": [_label(r) for r in records], "heads": [t[:HEAD_CHARS] for t in texts]}
    write_atomic(wd.signature("labels", i), json.dumps(labels, ensure_ascii=False))
    meta = {"n": len(records), "input": task.path, "fingerprint": chunk_fingerprint(records)}
    write_atomic(wd.signature("meta", i), json.dumps(meta))
    return {"records": len(records), "no_shingles": int((counts == 0).sum())}


# ---- stage 2: buckets ----------------------------------------------------------------------------------------

def _bucket_job(job) -> int:
    """Worker: one chunk's band keys and exact keys, written per partition (then the chunk's done marker)."""
    i, offset, cfg, wd = job
    sigs = np.load(wd.signature("sig", i))
    counts = np.load(wd.signature("shingles", i))
    digests = np.load(wd.signature("digest", i))
    docs = offset + np.arange(len(sigs), dtype=np.int64)
    near = counts > 0  # a document without words has no shingles: only its exact key can match
    keys = band_keys(sigs[near], cfg.bands, cfg.rows)
    entries = np.empty(keys.size + len(docs), dtype=BUCKET_DTYPE)
    entries["key"][:keys.size] = keys.ravel()
    entries["doc"][:keys.size] = np.repeat(docs[near], cfg.bands)
    entries["exact"][:keys.size] = 0
    entries["key"][keys.size:] = exact_keys(digests)
    entries["doc"][keys.size:] = docs
    entries["exact"][keys.size:] = 1
    part = entries["key"] % np.uint64(cfg.partitions)
    for p in range(cfg.partitions):
        os.makedirs(os.path.dirname(wd.bucket(p, i)), exist_ok=True)
        _save_npy(wd.bucket(p, i), entries[part == p])
    write_atomic(wd.bucket_done(i), "")
    return len(entries)


# ---- stage 3: clusters ---------------------------------------------------------------------------------------

class SignatureStore:
    """Random access to signatures and digests by document number (memory-mapped, one chunk file at a time)."""

    def __init__(self, wd: Workdir, offsets: np.ndarray):
        self.wd, self.offsets, self._maps = wd, offsets, {}

    def _map(self, kind: str, c: int):
        if (kind, c) not in self._maps:
            self._maps[kind, c] = np.load(self.wd.signature(kind, c), mmap_mode="r")
        return self._maps[kind, c]

    def gather(self, kind: str, docs: np.ndarray) -> np.ndarray:
        """Rows of `kind` ("sig" or "digest") for docs, in the order given."""
        docs = np.asarray(docs, dtype=np.int64)
        chunks = np.searchsorted(self.offsets, docs, side="right") - 1
        width = self._map(kind, int(chunks[0])).shape[1] if len(docs) else 1
        out = np.empty((len(docs), width), dtype=np.uint32 if kind == "sig" else np.uint8)
        for c in np.unique(chunks):
            at = np.flatnonzero(chunks == c)
            out[at] = self._map(kind, int(c))[docs[at] - self.offsets[c]]
        return out


def _verified_edges(docs, sel, start, same) -> np.ndarray:
    """Edges (first doc of its bucket, doc) for the bucket members at positions sel that `same` accepts against
    their bucket's first member; a member that fails is tried against the members before it (at most
    VERIFY_WINDOW of them) and joined to the first that passes (chains of near duplicates stay connected)."""
    ok = same(start[sel], sel)
    edges = [np.stack([docs[start[sel[ok]]], docs[sel[ok]]], axis=1)]
    for j in sel[~ok]:
        earlier = np.arange(max(start[j] + 1, j - VERIFY_WINDOW), j)
        hit = np.flatnonzero(same(earlier, np.full(len(earlier), j))) if len(earlier) else []
        if len(hit):
            edges.append(np.array([[docs[earlier[hit[0]]], docs[j]]]))
    return np.concatenate(edges)


def _block_edges(entries, new, store, cfg) -> np.ndarray:
    """Verified edges of whole buckets (sorted entries; `new` marks each bucket's first entry)."""
    start = np.maximum.accumulate(np.where(new, np.arange(len(entries)), 0))  # position of the bucket's first
    docs, found = entries["doc"], [np.empty((0, 2), np.int64)]
    for exact in (1, 0):
        here = entries["exact"] == exact
        sel = np.flatnonzero(here & ~new)
        if not len(sel):
            continue
        if not exact and not cfg.verify:
            found.append(np.stack([docs[start[sel]], docs[sel]], axis=1))
            continue
        at = np.flatnonzero(here)
        unique, inverse = np.unique(docs[at], return_inverse=True)
        rows = store.gather("digest" if exact else "sig", unique)
        index = np.full(len(entries), -1, dtype=np.int64)
        index[at] = inverse.ravel()

        def same(a, b, rows=rows, index=index, exact=exact):
            equal = rows[index[a]] == rows[index[b]]
            return equal.all(axis=1) if exact else equal.mean(axis=1) >= cfg.threshold

        found.append(_verified_edges(docs, sel, start, same))
    return np.concatenate(found)


def _cluster_job(job) -> int:
    """Worker: the candidate edges of one bucket partition (documents that share a key), verified a block of
    buckets at a time (so at most BLOCK signatures are in memory)."""
    p, count, offsets, cfg, wd = job
    entries = np.concatenate([np.load(wd.bucket(p, i)) for i in range(count)] + [np.empty(0, BUCKET_DTYPE)])
    entries = entries[np.lexsort((entries["doc"], entries["key"], entries["exact"]))]
    new = np.ones(len(entries), dtype=bool)
    new[1:] = (entries["key"][1:] != entries["key"][:-1]) | (entries["exact"][1:] != entries["exact"][:-1])
    group = np.cumsum(new) - 1
    shared = np.bincount(group, minlength=1)[group] > 1  # a key held by one document matches nothing
    entries, new = entries[shared], new[shared]
    firsts = np.flatnonzero(new)
    cuts = np.unique(np.r_[0, firsts[np.searchsorted(firsts, np.arange(BLOCK, len(entries), BLOCK))
                                     .clip(max=len(firsts) - 1)] if len(firsts) else [], len(entries)])
    store, found = SignatureStore(wd, offsets), [np.empty((0, 2), np.int64)]
    for lo, hi in zip(cuts[:-1], cuts[1:]):
        found.append(_block_edges(entries[lo:hi], new[lo:hi], store, cfg))
    edges = np.unique(np.concatenate(found).astype(np.int64), axis=0)
    _save_npy(wd.edges(p), edges)
    return len(edges)


def _union(wd: Workdir, cfg: DedupConfig, offsets: np.ndarray, count: int) -> dict:
    """Rank 0: union-find over every partition's edges; each non-first member of a cluster is written to its
    chunk's drops file with the kept document (the cluster's first) it matches."""
    edges = np.concatenate([np.load(wd.edges(p)) for p in range(cfg.partitions)])
    nodes, roots = components(edges)
    gone = nodes != roots
    drops, kept = nodes[gone], roots[gone]
    store = SignatureStore(wd, offsets)
    exact, jaccard = np.zeros(len(drops), dtype=bool), np.zeros(len(drops), dtype=np.float32)
    for lo in range(0, len(drops), BLOCK):
        a, b = drops[lo:lo + BLOCK], kept[lo:lo + BLOCK]
        exact[lo:lo + BLOCK] = (store.gather("digest", a) == store.gather("digest", b)).all(axis=1)
        jaccard[lo:lo + BLOCK] = (store.gather("sig", a) == store.gather("sig", b)).mean(axis=1)
    metas = {}

    def kept_label(doc):
        c = int(np.searchsorted(offsets, doc, side="right") - 1)
        if c not in metas:
            metas.clear()  # one chunk's meta at a time: kept documents come in increasing order per chunk
            metas[c] = {**_read_json(wd.signature("meta", c)), **_read_json(wd.signature("labels", c))}
        row = int(doc - offsets[c])
        return {"duplicate_of": int(doc), "kept": metas[c]["labels"][row] or {"input": metas[c]["input"]},
                "kept_text_head": metas[c]["heads"][row]}

    chunk_of = np.searchsorted(offsets, drops, side="right") - 1
    labels = {}
    for d in np.unique(kept):
        labels[int(d)] = kept_label(d)
    for c in np.unique(chunk_of):
        at = np.flatnonzero(chunk_of == c)
        rows = {int(drops[k] - offsets[c]): {"exact": bool(exact[k]), "jaccard": round(float(jaccard[k]), 4),
                                              **labels[int(kept[k])]} for k in at}
        write_atomic(wd.drops(int(c)), json.dumps({"rows": rows}, ensure_ascii=False))
    counts = {"candidate_edges": int(len(edges)), "clusters": int(len(np.unique(roots))),
              "exact_duplicates": int(np.sum(exact)), "near_duplicates": int(len(drops) - np.sum(exact))}
    write_atomic(wd.clusters_done(), json.dumps(counts))
    return counts


# ---- stage 4: filter -----------------------------------------------------------------------------------------

class DedupFilter:
    """The filter of stage 4 (picklable): drops the rows that the clusters stage listed for chunk `chunk`."""

    takes_chunk = True  # run_filter_stage passes the chunk number

    def __init__(self, workdir: str, fingerprints: list):
        self.wd = Workdir(workdir)
        self.fingerprints = fingerprints

    def __call__(self, records, chunk: int) -> Outcome:
        i = chunk
        if chunk_fingerprint(records) != self.fingerprints[i]:
            raise RuntimeError(f"chunk {i} of the input changed since the signatures stage: rerun with --no-resume")
        path = self.wd.drops(i)
        rows = _read_json(path)["rows"] if os.path.exists(path) else {}
        out = Outcome(kept=[])
        for j, record in enumerate(records):
            hit = rows.get(str(j))
            if hit is None:
                out.kept.append(record)
            else:
                reason = "exact_duplicate" if hit.pop("exact") else "near_duplicate"
                out.dropped.append((record, reason, hit))
        return out


# ---- the stages together -------------------------------------------------------------------------------------

def _fingerprints(cfg: DedupConfig, tasks) -> dict:
    """What each stage's files depend on; a stage whose fingerprint changed is redone, and so are those after."""
    parts = {"signatures": [input_stats(tasks), len(tasks), cfg.chunk_bytes, cfg.text_key, cfg.num_perm, cfg.ngram, cfg.seed],
             "buckets": [cfg.bands, cfg.rows, cfg.partitions], "clusters": [cfg.threshold, cfg.verify]}
    out, blob = {}, ""
    for stage in STAGES[:3]:
        blob = hashlib.sha256(json.dumps([blob, parts[stage]], default=str).encode()).hexdigest()
        out[stage] = blob
    return out


def _prepare(wd: Workdir, fingerprints: dict, resume: bool) -> None:
    """Rank 0: keep each stage folder whose fingerprint matches (and all before it did); empty the others."""
    stale = not resume
    for stage, folder in zip(STAGES, (wd.sig, wd.buckets, wd.clusters)):
        marker = os.path.join(folder, "fingerprint")
        if not stale and os.path.exists(marker):
            with open(marker) as f:
                stale = f.read() != fingerprints[stage]
        else:
            stale = True
        if stale:
            shutil.rmtree(folder, ignore_errors=True)
            os.makedirs(folder)
            write_atomic(marker, fingerprints[stage])


def _require(done: bool, stage: str, before: str) -> None:
    if not done:
        raise ValueError(f"--stage {stage} needs the {before} stage done first (run --stage {before}, or all)")


def run_dedup(cfg: DedupConfig, stage: str = "all") -> dict:
    """Run one stage (or all) and return {stage: {seconds, mb_per_s, ...counts}} plus "summary" (StageSummary
    of the filter) when the filter ran; under mpiexec every rank calls this and rank 0 merges."""
    if stage not in STAGES + ("all",):
        raise ValueError(f"--stage must be one of all, {', '.join(STAGES)}; got {stage!r}")
    rank, world, comm = mpi_world()
    barrier = comm.Barrier if comm else (lambda: None)
    total = comm.allreduce if comm else (lambda x: x)  # a count summed over ranks
    tasks = plan_chunks(cfg.inputs, cfg.text_key, cfg.extensions or None, cfg.chunk_bytes)
    wd, count = Workdir(cfg.workdir), len(tasks)
    fingerprints = _fingerprints(cfg, tasks)
    if rank == 0:
        _prepare(wd, fingerprints, cfg.resume)
    barrier()
    total_bytes = sum(t.weight for t in tasks)
    mine = {id(t) for t in share_tasks(tasks, rank, world)}
    shares = [i for i, t in enumerate(tasks) if id(t) in mine]
    result, run = {}, (lambda s: stage in ("all", s))
    tag = "" if world == 1 else f" [rank {rank}]"

    def timed(name, fn):
        start = time.perf_counter()
        counts = fn() or {}
        barrier()
        seconds = time.perf_counter() - start
        result[name] = {"seconds": round(seconds, 3), "mb_per_s": round(total_bytes / 1e6 / max(seconds, 1e-9), 3),
                        **counts}

    def signatures():
        hasher = MinHasher(cfg.num_perm, cfg.ngram, cfg.seed)
        todo = [i for i in shares if not os.path.exists(wd.signature("meta", i))]
        jobs = [(tasks[i], i, cfg.text_key, hasher, wd) for i in todo]
        out = list(map_ordered(_signature_job, jobs, cfg.workers, "dedup signatures" + tag,
                               [tasks[i].weight or 1 for i in todo], cfg.progress))
        return {"no_shingles": total(sum(o["no_shingles"] for o in out))}

    def offsets():
        metas = [wd.signature("meta", i) for i in range(count)]
        _require(all(map(os.path.exists, metas)), stage, "signatures")
        return np.cumsum([0] + [_read_json(m)["n"] for m in metas]).astype(np.int64)

    if run("signatures"):
        timed("signatures", signatures)
    starts = offsets() if stage != "signatures" else None
    if run("buckets"):
        todo = [i for i in shares if not os.path.exists(wd.bucket_done(i))]
        jobs = [(i, int(starts[i]), cfg, wd) for i in todo]
        timed("buckets", lambda: {"bucket_entries": total(sum(map_ordered(
            _bucket_job, jobs, cfg.workers, "dedup buckets" + tag, None, cfg.progress)))})
    if stage in ("all", "clusters", "filter"):
        _require(all(os.path.exists(wd.bucket_done(i)) for i in range(count)), stage, "buckets")
    if run("clusters"):
        def clusters():
            todo = [p for p in range(cfg.partitions) if p % world == rank and not os.path.exists(wd.edges(p))]
            jobs = [(p, count, starts, cfg, wd) for p in todo]
            for _ in map_ordered(_cluster_job, jobs, cfg.workers, "dedup clusters" + tag, None, cfg.progress):
                pass
            barrier()
            if rank == 0 and not os.path.exists(wd.clusters_done()):
                return _union(wd, cfg, starts, count)
            return {}
        timed("clusters", clusters)
    if stage == "filter":
        _require(os.path.exists(wd.clusters_done()), stage, "clusters")
    if run("filter"):
        fps = [_read_json(wd.signature("meta", i))["fingerprint"] for i in range(count)]
        barrier()
        summary = run_filter_stage("dedup", cfg.inputs, cfg.output, DedupFilter(cfg.workdir, fps),
                                   text_key=cfg.text_key, workers=cfg.workers, report=cfg.report or None,
                                   extensions=cfg.extensions or None, resume=cfg.resume, progress=cfg.progress,
                                   params={"clusters": fingerprints["clusters"]}, keep_dropped=cfg.keep_dropped,
                                   chunk_bytes=cfg.chunk_bytes)
        result["filter"] = {"seconds": round(summary.seconds, 3), "mb_per_s": round(summary.mb_per_s(), 3)}
        result["summary"] = summary
    if rank == 0 and os.path.exists(wd.clusters_done()):
        result.setdefault("clusters", {}).update(_read_json(wd.clusters_done()))
    summary = result.get("summary")
    if rank == 0 and stage == "all" and summary is not None and not summary.cached:  # all stages' totals
        # (a finished output that was not redone keeps the totals it has)
        summary.seconds = sum(result[s]["seconds"] for s in STAGES if s in result)
        summary.counts.update({k: v for k, v in result.get("clusters", {}).items()
                               if isinstance(v, int) and k not in summary.counts})
        update_summary(cfg.output, summary)
    return result
