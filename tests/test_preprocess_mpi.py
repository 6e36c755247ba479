"""tools/preprocess_data.py under `mpiexec -n N` (real processes): the same bytes as one process."""

import gzip
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from megaphi.data.indexed_dataset import IndexedDataset
from megaphi.data.preprocess import PreprocessConfig, preprocess
from megaphi.data.sources import plan_tasks, share_tasks

MPIEXEC = Path(sys.executable).parent / "mpiexec"
TOKENIZERS = {"spm": ("GPTSentencePieceTokenizer", "code8k.model"), "hf": ("HuggingFaceTokenizer", "hf_bpe8k")}


def mpirun(repo_root, fx, ranks, inputs, out, tok="spm", eod=True, *extra):
    kind, model = TOKENIZERS[tok]
    cmd = [str(MPIEXEC), "-n", str(ranks), sys.executable, str(repo_root / "tools" / "preprocess_data.py"),
           "--input", *map(str, inputs), "--output-prefix", str(out), "--tokenizer-type", kind,
           "--tokenizer-model", str(fx / model), "--quiet", *map(str, extra)] + (["--append-eod"] if eod else [])
    return subprocess.run(cmd, capture_output=True, text=True, timeout=180)


def same_files(a, b) -> bool:
    return all(open(f"{a}{e}", "rb").read() == open(f"{b}{e}", "rb").read() for e in (".bin", ".idx"))


@pytest.mark.parametrize("case,workers", [("spm_eod", 1), ("spm_eod", 2), ("spm_noeod", 2), ("hf_eod", 1)])
def test_two_ranks_byte_identical_to_megatron(megatron_fixtures, repo_root, tmp_path, case, workers):
    tok, eod = case.split("_")
    run = mpirun(repo_root, megatron_fixtures, 2, [megatron_fixtures / "code_sample.jsonl"], tmp_path / "o", tok,
                 eod == "eod", "--workers", workers, "--chunk-bytes", 200_000)
    assert run.returncode == 0, run.stderr
    assert run.stdout.count("243 documents (1 empty") == 1  # rank 0 reports, for all ranks
    assert same_files(tmp_path / "o_text_document", megatron_fixtures / f"{case}_text_document")
    assert sorted(os.listdir(tmp_path)) == ["o_text_document.bin", "o_text_document.idx"]  # partials gone


def test_mixed_inputs_on_three_ranks_match_one_process(megatron_fixtures, repo_root, tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    lines = open(megatron_fixtures / "code_sample.jsonl", "rb").read().splitlines(keepends=True)
    (tmp_path / "a.jsonl.gz").write_bytes(gzip.compress(b"".join(lines[:60])))
    (tmp_path / "b.jsonl").write_bytes(b"".join(lines[60:150]) + b"{broken\n" + b"".join(lines[150:]))
    texts = [json.loads(line)["text"] for line in lines[:80]]
    pq.write_table(pa.table({"text": texts}), tmp_path / "c.parquet", row_group_size=16)
    tree = tmp_path / "tree"
    for i, text in enumerate(texts[:30]):
        (tree / f"d{i % 4}").mkdir(parents=True, exist_ok=True)
        (tree / f"d{i % 4}" / f"f{i}.py").write_text(text)
    inputs = [tmp_path / "a.jsonl.gz", tmp_path / "b.jsonl", tmp_path / "c.parquet", tree]
    kind, model = TOKENIZERS["spm"]
    one = preprocess(PreprocessConfig(inputs=[str(i) for i in inputs], output_prefix=str(tmp_path / "one"),
                                      tokenizer_type=kind, tokenizer_model=str(megatron_fixtures / model),
                                      append_eod=True, extensions=(".py",), chunk_bytes=100_000, progress=False))
    run = mpirun(repo_root, megatron_fixtures, 3, inputs, tmp_path / "out" / "mpi", "spm", True,
                 "--extensions", ".py", "--workers", 2, "--chunk-bytes", 100_000)
    assert run.returncode == 0, run.stderr
    assert same_files(tmp_path / "out" / "mpi_text_document", one.outputs["text"])
    assert IndexedDataset(one.outputs["text"]).num_documents == one.documents == 243 + 80 + 30
    # the bad line is reported with its line number in its file, by rank 0, once
    assert run.stdout.count(f"{tmp_path / 'b.jsonl'}:line 91: bad JSON") == 1
    assert sorted(os.listdir(tmp_path / "out")) == ["mpi_text_document.bin", "mpi_text_document.idx"]


def test_line_numbers_count_across_ranks_and_strict_fails_all(megatron_fixtures, repo_root, tmp_path):
    lines = open(megatron_fixtures / "code_sample.jsonl", "rb").read().splitlines(keepends=True)
    ends = np.cumsum([len(line) for line in lines])
    a, b = int(np.searchsorted(ends, 0.6 * ends[-1])), int(np.searchsorted(ends, 0.85 * ends[-1]))
    data = b"".join(lines[:a]) + b"[1, 2]\n" + b"".join(lines[a:b]) + b"{oops\n" + b"".join(lines[b:])
    (tmp_path / "in.jsonl").write_bytes(data)
    # both bad lines fall in rank 1's share, so their numbers need rank 0's line count
    tasks = plan_tasks([str(tmp_path / "in.jsonl")], ["text"], chunk_bytes=200_000)
    assert share_tasks(tasks, 1, 2)[0].start < ends[a - 1]
    run = mpirun(repo_root, megatron_fixtures, 2, [tmp_path / "in.jsonl"], tmp_path / "o", "spm", True,
                 "--chunk-bytes", 200_000)
    assert run.returncode == 0, run.stderr
    assert f"in.jsonl:line {a + 1}: not a JSON object" in run.stdout
    assert f"in.jsonl:line {b + 2}: bad JSON" in run.stdout
    assert "243 documents" in run.stdout and "skipped 2 records" in run.stdout
    run = mpirun(repo_root, megatron_fixtures, 2, [tmp_path / "in.jsonl"], tmp_path / "out" / "o", "spm", True,
                 "--strict", "--chunk-bytes", 200_000)
    assert run.returncode != 0
    assert run.stderr.count("error: rank 1: ") == 1 and f"in.jsonl:line {a + 1}: not a JSON object" in run.stderr
    assert os.listdir(tmp_path / "out") == []
