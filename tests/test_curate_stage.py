"""The curation stage runner: order, counts, reports, parquet, resumption after a crash, and mpiexec ranks."""

import json
import os
import re
import subprocess
import sys

import pytest

from megaphi.curate.records import read_jsonl, write_records
from megaphi.curate.stage import Outcome, run_filter_stage

FILTER_SCRIPT = """
import sys
from megaphi.curate.stage import run_filter_stage
sys.path.insert(0, {tests!r})
from test_curate_stage import KeepEven
summary = run_filter_stage("even", [{src!r}], sys.argv[1], KeepEven(), workers=1, chunk_bytes=2000)
print(f"kept={{summary.kept}}")
"""


class KeepEven:
    """Keeps records with an even id; fails on the id named by $CRASH_AT (to simulate a crash)."""

    def __call__(self, records):
        crash = os.environ.get("CRASH_AT")
        if crash is not None and any(r["id"] == int(crash) for r in records):
            raise RuntimeError("simulated crash")
        if os.environ.get("CHUNK_LOG"):
            with open(os.environ["CHUNK_LOG"], "a") as f:
                f.write(f"{records[0]['id']}\n")
        kept = [r for r in records if r["id"] % 2 == 0]
        dropped = [(r, "odd id", {"id_seen": r["id"]}) for r in records if r["id"] % 2]
        return Outcome(kept, dropped, {"chars": sum(len(r["text"]) for r in records)})


@pytest.fixture
def corpus(tmp_path):
    path = tmp_path / "in.jsonl"
    with open(path, "w") as f:
        for i in range(400):
            f.write(json.dumps({"id": i, "text": f"def f{i}():\n    return {i}\n", "meta": {"n": [i]}}) + "\n")
        f.write("{not json\n\n")
        f.write(json.dumps({"id": 999}) + "\n")
    return path


def test_stage_keeps_order_fields_and_counts_every_drop(corpus, tmp_path):
    out, report = tmp_path / "out.jsonl", tmp_path / "report.jsonl"
    s = run_filter_stage("even", [str(corpus)], str(out), KeepEven(), workers=2, report=str(report),
                         chunk_bytes=2000, progress=False)
    kept = list(read_jsonl(out))
    assert [r["id"] for r in kept] == list(range(0, 400, 2))
    assert kept[3] == {"id": 6, "text": "def f6():\n    return 6\n", "meta": {"n": [6]}}
    assert s.records_in == 402 and s.kept == 200
    assert s.dropped == {"odd id": 200, "bad input: bad JSON": 1, "bad input: no 'text' field": 1}
    assert s.counts["chars"] == sum(len(f"def f{i}():\n    return {i}\n") for i in range(400))
    lines = list(read_jsonl(report))
    assert len(lines) == 202 and sum(line.get("id_seen") is not None for line in lines) == 200
    assert not os.path.exists(str(out) + ".parts")
    assert json.load(open(str(out) + ".summary.json"))["summary"]["kept"] == 200


def test_stage_resumes_after_a_crash_without_redoing_or_duplicating(corpus, tmp_path, repo_root):
    out = tmp_path / "out.jsonl"
    script = FILTER_SCRIPT.format(tests=str(repo_root / "tests"), src=str(corpus))
    log = tmp_path / "chunks.log"
    env = dict(os.environ, CRASH_AT="300", CHUNK_LOG=str(log))
    crashed = subprocess.run([sys.executable, "-c", script, str(out)], env=env, capture_output=True, text=True)
    assert crashed.returncode != 0 and "simulated crash" in crashed.stderr
    assert not out.exists()
    done_parts = [p for p in os.listdir(str(out) + ".parts") if p.endswith(".counts.json")]
    first_run = log.read_text().split()
    assert 0 < len(done_parts) == len(first_run)
    env.pop("CRASH_AT")
    ok = subprocess.run([sys.executable, "-c", script, str(out)], env=env, capture_output=True, text=True)
    assert ok.returncode == 0, ok.stderr
    assert [r["id"] for r in read_jsonl(out)] == list(range(0, 400, 2))
    second_run = log.read_text().split()[len(first_run):]
    assert not set(first_run) & set(second_run)  # chunks done before the crash were not redone
    again = subprocess.run([sys.executable, "-c", script, str(out)], env=dict(env, CRASH_AT="0"),
                           capture_output=True, text=True)
    assert again.returncode == 0 and again.stdout.strip() == "kept=200"  # a finished stage is not redone


def test_stage_reads_parquet_and_trees_and_writes_parquet(tmp_path):
    pq_in = tmp_path / "in.parquet"
    write_records(str(pq_in), [{"id": i, "text": "x" * i, "lang": "python"} for i in range(10)])
    tree = tmp_path / "src"
    tree.mkdir()
    (tree / "a.py").write_text("print(1)\n")
    (tree / "b.py").write_bytes(b"x = '\xff'\n")
    out = tmp_path / "out.parquet"
    records = []

    class Collect:
        def __call__(self, recs):
            return Outcome(recs)

    s = run_filter_stage("all", [str(pq_in), str(tree)], str(out), Collect(), extensions=[".py"], progress=False)
    import pyarrow.parquet as pq

    records = pq.read_table(out).to_pylist()
    assert s.kept == 12 and len(records) == 12
    assert records[3]["lang"] == "python" and records[3]["text"] == "xxx"
    assert records[11]["path"] == "b.py" and "\ufffd" in records[11]["text"]


def test_parquet_writer_refuses_a_field_that_would_be_lost(tmp_path):
    rows = [{"text": "a"}] * 5000 + [{"text": "b", "late": 1}]
    with pytest.raises(ValueError, match="late"):
        write_records(str(tmp_path / "x.parquet"), rows)
    assert not (tmp_path / "x.parquet").exists()


def test_stage_under_mpiexec_matches_one_process(corpus, tmp_path, repo_root):
    mpiexec = os.path.join(os.path.dirname(sys.executable), "mpiexec")
    if not os.path.exists(mpiexec):
        pytest.fail("mpiexec not found beside the venv's python: pip install mpich mpi4py")
    script = FILTER_SCRIPT.format(tests=str(repo_root / "tests"), src=str(corpus))
    one, two = tmp_path / "one.jsonl", tmp_path / "two.jsonl"
    subprocess.run([sys.executable, "-c", script, str(one)], check=True, capture_output=True)
    res = subprocess.run([mpiexec, "-n", "2", sys.executable, "-c", script, str(two)], capture_output=True, text=True,
                         timeout=120)
    assert res.returncode == 0, res.stderr
    assert re.findall(r"kept=(\d+)", res.stdout) == ["200", "200"]  # every rank has the summary
    assert one.read_bytes() == two.read_bytes()


def test_stage_passes_a_lone_surrogate_through_escaped(tmp_path):
    src = tmp_path / "in.jsonl"
    src.write_text('{"text": "x = \\"\\ud800\\"", "id": 1}\n{"text": "ok", "id": 2}\n')

    class Keep:
        def __call__(self, recs):
            return Outcome(recs)

    out = tmp_path / "out.jsonl"
    s = run_filter_stage("keep", [str(src)], str(out), Keep(), progress=False)
    assert s.kept == 2
    assert [r["text"] for r in read_jsonl(out)] == ['x = "\ud800"', "ok"]


def test_stage_refuses_an_output_that_is_an_input_or_a_folder(corpus, tmp_path):
    with pytest.raises(ValueError, match="also an --input"):
        run_filter_stage("even", [str(corpus)], str(corpus), KeepEven(), progress=False)
    with pytest.raises(ValueError, match="is a directory"):
        run_filter_stage("even", [str(corpus)], str(tmp_path), KeepEven(), progress=False)


def test_stage_redoes_a_tree_whose_file_changed_and_writes_a_report_asked_for_later(tmp_path):
    tree = tmp_path / "src"
    tree.mkdir()
    (tree / "a.py").write_text("x = 1\n")

    class DropAll:
        def __call__(self, recs):
            return Outcome([], [(r, "all", {}) for r in recs])

    out, report = tmp_path / "out.jsonl", tmp_path / "report.jsonl"
    run_filter_stage("t", [str(tree)], str(out), DropAll(), extensions=[".py"], progress=False, text_key="code")
    assert not report.exists()
    run_filter_stage("t", [str(tree)], str(out), DropAll(), extensions=[".py"], progress=False, text_key="code",
                     report=str(report))
    assert [line["text_head"] for line in read_jsonl(report)] == ["x = 1\n"]
    (tree / "a.py").write_text("x = 2\n")
    os.utime(tree / "a.py", ns=(1, 1))
    run_filter_stage("t", [str(tree)], str(out), DropAll(), extensions=[".py"], progress=False, text_key="code",
                     report=str(report))
    assert [line["text_head"] for line in read_jsonl(report)] == ["x = 2\n"]
