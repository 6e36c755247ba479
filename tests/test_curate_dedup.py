"""Dedup: MinHash/LSH pieces against independent references, and tools/dedup.py on real stdlib files with planted
exact and near duplicates, in one process, two worker processes, stage by stage, and under mpiexec."""

import glob
import json
import os
import random
import subprocess
import sys
from collections import defaultdict
from pathlib import Path

import numpy as np
import pytest

from megaphi.curate.dedup import DedupConfig
from megaphi.curate.dedup import run_dedup as dedup
from megaphi.curate.dedup_minhash import (MinHasher, band_keys, collision_probability, components, optimal_bands,
                                          shingles)

REPO = Path(__file__).resolve().parents[1]
MPIEXEC = Path(sys.executable).parent / "mpiexec"


def stdlib_texts(count=36):
    """Distinct, mid-sized standard-library modules (deterministic pick)."""
    paths = [p for p in sorted(glob.glob(os.path.join(os.path.dirname(os.__file__), "*.py")))
             if 6_000 < os.path.getsize(p) < 40_000 and not os.path.basename(p).startswith(("sre_", "_sysconfig"))]
    assert len(paths) >= count, "needs the Python standard library sources"
    step = len(paths) / count
    return [(os.path.basename(paths[int(i * step)]), open(paths[int(i * step)], encoding="utf-8").read())
            for i in range(count)]


def edit_lines(text, rng, fraction=0.03):
    """A near duplicate: a few lines changed, one deleted, one inserted."""
    lines = text.splitlines()
    for _ in range(max(1, int(len(lines) * fraction))):
        i = rng.randrange(len(lines))
        lines[i] = lines[i] + "  # reviewed"
    del lines[rng.randrange(len(lines))]
    lines.insert(rng.randrange(len(lines)), "x = compute_value(1, 2)  # added")
    return "\n".join(lines) + "\n"


def jaccard(a, b):
    sa, sb = shingles(a), shingles(b)
    return len(sa & sb) / len(sa | sb)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """in.jsonl: clean files first, then planted copies; returns (path, clean ids, {planted id: (original, kind)})."""
    rng = random.Random(0)
    clean = stdlib_texts()
    records = [{"id": name, "text": text, "source": "stdlib"} for name, text in clean]
    planted = {}
    for k, (name, text) in enumerate(rng.sample(clean, 8)):
        records.append({"id": f"exact-{k}", "text": text, "source": "copy"})
        planted[f"exact-{k}"] = (name, "exact_duplicate")
    for k, (name, text) in enumerate(rng.sample(clean, 8)):
        edited = edit_lines(text, rng)
        assert 0.75 < jaccard(text, edited) < 1.0  # the plant is a real near duplicate, not a copy
        records.append({"id": f"near-{k}", "text": edited, "source": "edit"})
        planted[f"near-{k}"] = (name, "near_duplicate")
    name, text = clean[3]
    lines = text.splitlines()
    far = "\n".join(lines[: len(lines) // 3]) + "\n" + "\n".join(f"value_{i} = {i} * other_{i}" for i in range(400))
    assert jaccard(text, far) < 0.4
    records.append({"id": "far-edit", "text": far, "source": "edit"})  # similar in part only: must be kept
    folder = tmp_path_factory.mktemp("dedup")
    path = folder / "in.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path, [r["id"] for r in records[: len(clean)]] + ["far-edit"], planted


def run_dedup(*args, mpi=0):
    cmd = [sys.executable, str(REPO / "tools" / "dedup.py"), "--quiet", "--chunk-bytes", "150000", *map(str, args)]
    if mpi:
        cmd = [str(MPIEXEC), "-n", str(mpi)] + cmd
    run = subprocess.run(cmd, capture_output=True, text=True, timeout=120, cwd=REPO)
    return run


def check_result(out, report, clean_ids, planted):
    kept = [json.loads(line) for line in open(out)]
    assert [r["id"] for r in kept] == clean_ids  # every clean file kept, in input order, and nothing else
    assert all(set(r) == {"id", "text", "source"} for r in kept)  # fields as they came
    removed = {r["id"] if "id" in r else r["record"]["id"]: r for r in map(json.loads, open(report))}
    assert set(removed) == set(planted)
    for rid, (original, reason) in planted.items():
        assert removed[rid]["reason"] == reason, rid
        assert removed[rid]["kept"] == {"id": original}, rid
        assert removed[rid]["jaccard"] >= (1.0 if reason == "exact_duplicate" else 0.7)


def test_optimal_bands_match_datasketch_and_threshold():
    from datasketch.lsh import _optimal_param  # an independent implementation (scipy quad integrals)

    for threshold, num_perm in [(0.7, 256), (0.5, 128), (0.85, 64)]:
        assert optimal_bands(threshold, num_perm) == _optimal_param(threshold, num_perm, 0.5, 0.5)
    bands, rows = optimal_bands(0.7, 256)
    assert (bands, rows) == (25, 10)
    # near the threshold the S-curve is steep: pairs at 0.85 almost always collide, pairs at 0.4 rarely
    assert collision_probability(0.85, bands, rows) > 0.98 and collision_probability(0.4, bands, rows) < 0.01


def test_signatures_estimate_true_jaccard():
    rng = random.Random(1)
    hasher = MinHasher(num_perm=256, ngram=5)
    for name, text in stdlib_texts(6):
        edited = edit_lines(text, rng, fraction=rng.choice([0.02, 0.1, 0.3]))
        (a, na), (b, nb) = hasher.signature(text), hasher.signature(edited)
        assert na == len(shingles(text)) and nb == len(shingles(edited))  # hashed shingles: the same sets
        assert abs((a == b).mean() - jaccard(text, edited)) < 0.12, name  # 256 perms: std error <= 0.032
    assert hasher.signature("")[1] == 0 and hasher.signature("a b c")[1] == 1


def test_band_keys_collide_exactly_on_equal_bands():
    rng = np.random.default_rng(0)
    sigs = rng.integers(0, 2**32, (4, 20), dtype=np.uint32)
    sigs[1] = sigs[0]
    sigs[1, 5] += 1  # band 1 of 4 (rows 4..7) differs
    sigs[2, :4] = sigs[3, 4:8]  # same values in a different band position
    keys = band_keys(sigs, bands=4, rows=4)  # 16 of 20 values used
    assert list(keys[0] == keys[1]) == [True, False, True, True]
    assert keys[2, 0] != keys[3, 1]


def test_union_find_matches_graph_search():
    rng = np.random.default_rng(2)
    for n in (5, 200, 3000):
        edges = rng.integers(0, n, (n // 2, 2)) * 7 + 3  # sparse ids
        nodes, roots = components(edges)
        adjacent = defaultdict(set)
        for a, b in edges.tolist():
            adjacent[a].add(b)
            adjacent[b].add(a)
        expected = {}
        for start in sorted(adjacent):
            if start not in expected:
                seen, todo = {start}, [start]
                while todo:
                    for y in adjacent[todo.pop()] - seen:
                        seen.add(y)
                        todo.append(y)
                expected.update(dict.fromkeys(seen, min(seen)))
        assert dict(zip(nodes.tolist(), roots.tolist())) == expected


def test_cli_catches_planted_duplicates_with_two_workers(corpus, tmp_path):
    path, clean_ids, planted = corpus
    run = run_dedup("--input", path, "--output", tmp_path / "out.jsonl", "--report", tmp_path / "r.jsonl",
                    "--workers", 2, "--keep-dropped")
    assert run.returncode == 0, run.stderr
    check_result(tmp_path / "out.jsonl", tmp_path / "r.jsonl", clean_ids, planted)
    assert all(set(r["record"]) == {"id", "text", "source"} for r in map(json.loads, open(tmp_path / "r.jsonl")))
    assert "8  exact_duplicate" in run.stdout and "8  near_duplicate" in run.stdout
    assert "25 bands x 10 rows" in run.stdout
    summary = json.load(open(tmp_path / "out.jsonl.summary.json"))["summary"]
    assert summary["records_in"] == len(clean_ids) + len(planted) and summary["kept"] == len(clean_ids)


def test_stages_one_at_a_time_resume_and_input_twice(corpus, tmp_path):
    path, clean_ids, planted = corpus
    out, work = tmp_path / "out.jsonl", tmp_path / "work"

    def cfg(**kw):
        return DedupConfig(inputs=[str(path)], output=str(out), report=str(tmp_path / "r.jsonl"), workdir=str(work),
                           progress=False, chunk_bytes=150_000, **kw)

    with pytest.raises(ValueError, match="--stage clusters needs the signatures stage done first"):
        dedup(cfg(), "clusters")
    dedup(cfg(), "signatures")
    metas = sorted(glob.glob(str(work / "signatures" / "meta-*.json")))
    assert len(metas) >= 4  # several chunks
    os.remove(metas[1])  # as if that chunk's worker had died: only it is redone
    before = {m: os.stat(m).st_mtime_ns for m in metas if m != metas[1]}
    with pytest.raises(ValueError, match="--stage buckets needs the signatures stage"):
        dedup(cfg(), "buckets")
    result = dedup(cfg(), "all")
    assert {m: os.stat(m).st_mtime_ns for m in before} == before and os.path.exists(metas[1])
    assert result["clusters"]["exact_duplicates"] == 8 and result["clusters"]["near_duplicates"] == 8
    check_result(out, tmp_path / "r.jsonl", clean_ids, planted)
    # other settings start the later stages over; the signatures stay
    result = dedup(cfg(threshold=0.99), "all")
    assert result["summary"].dropped == {"exact_duplicate": 8}
    assert {m: os.stat(m).st_mtime_ns for m in before} == before
    # the same file twice: the second copy is all exact duplicates, the output the same
    twice = dedup(DedupConfig(inputs=[str(path)] * 2, output=str(tmp_path / "twice.jsonl"), progress=False,
                              chunk_bytes=150_000), "all")
    assert twice["summary"].kept == len(clean_ids)
    dedup(cfg(), "all")
    check_result(out, tmp_path / "r.jsonl", clean_ids, planted)
    assert open(tmp_path / "twice.jsonl").read() == open(out).read()


def test_mpiexec_two_ranks_same_output(corpus, tmp_path):
    path, clean_ids, planted = corpus
    run = run_dedup("--input", path, "--output", tmp_path / "out.jsonl", "--report", tmp_path / "r.jsonl",
                    "--partitions", 3, mpi=2)
    assert run.returncode == 0, run.stderr
    assert run.stdout.count("records in") == 1  # rank 0 reports for both
    check_result(tmp_path / "out.jsonl", tmp_path / "r.jsonl", clean_ids, planted)
    buckets = tmp_path / "out.jsonl.dedup" / "buckets"
    assert sorted(p.name for p in buckets.glob("p*")) == ["p0000", "p0001", "p0002"]


def test_bad_flags_fail_with_a_message(tmp_path):
    (tmp_path / "in.jsonl").write_text('{"text": "a"}\n')
    run = run_dedup("--input", tmp_path / "in.jsonl", "--output", tmp_path / "o.jsonl", "--threshold", "1.5")
    assert run.returncode == 1 and "--threshold must be in (0, 1]" in run.stderr
    run = run_dedup("--input", tmp_path / "in.jsonl", "--output", tmp_path / "o.jsonl", "--bands", "30",
                    "--rows", "10")
    assert run.returncode == 1 and "exceeds --num-perm 256" in run.stderr


def test_parquet_and_source_tree_inputs(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    clean = stdlib_texts(8)
    texts = [t for _, t in clean] + [clean[2][1], edit_lines(clean[5][1], random.Random(3))]
    ids = [n for n, _ in clean] + ["copy", "edit"]
    pq.write_table(pa.table({"id": ids, "text": texts, "n": list(range(10))}), tmp_path / "in.parquet",
                   row_group_size=3)
    result = dedup(DedupConfig(inputs=[str(tmp_path / "in.parquet")], output=str(tmp_path / "out.parquet"),
                               report=str(tmp_path / "r.jsonl"), progress=False), "all")
    assert result["summary"].dropped == {"exact_duplicate": 1, "near_duplicate": 1}
    table = pq.read_table(tmp_path / "out.parquet")
    assert table.column("id").to_pylist() == ids[:8] and table.column("n").to_pylist() == list(range(8))
    assert [json.loads(line)["kept"] for line in open(tmp_path / "r.jsonl")] == [{"id": ids[2]}, {"id": ids[5]}]
    tree = tmp_path / "tree"
    for i, text in enumerate(texts):
        (tree / f"d{i % 3}").mkdir(parents=True, exist_ok=True)
        (tree / f"d{i % 3}" / f"m{i:02d}.py").write_text(text)
    result = dedup(DedupConfig(inputs=[str(tree)], output=str(tmp_path / "tree.jsonl"), extensions=(".py",),
                               report=str(tmp_path / "tr.jsonl"), progress=False), "all")
    removed = [json.loads(line) for line in open(tmp_path / "tr.jsonl")]
    # files come in sorted path order, so the edit d0/m09.py comes first and is kept
    assert [(r["path"], r["reason"], r["kept"]) for r in removed] == [
        ("d2/m05.py", "near_duplicate", {"path": "d0/m09.py"}), ("d2/m08.py", "exact_duplicate", {"path": "d2/m02.py"})]
