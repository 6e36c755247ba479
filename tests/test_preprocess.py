"""tools/preprocess_data.py: byte-identity with Megatron-LM, every input kind, bad input, interrupted runs."""

import gzip
import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import sentencepiece

from megaphi.data.indexed_dataset import IndexedDataset
from megaphi.data.preprocess import PreprocessConfig, preprocess

TOKENIZERS = {"spm": ("GPTSentencePieceTokenizer", "code8k.model"), "hf": ("HuggingFaceTokenizer", "hf_bpe8k")}
CASES = {"spm_eod": ("spm", True), "spm_noeod": ("spm", False), "hf_eod": ("hf", True)}


def run(fx, out, inputs, tok="spm", eod=True, **kw):
    """preprocess() in this process; returns (summary, {key: IndexedDataset})."""
    kind, model = TOKENIZERS[tok]
    cfg = PreprocessConfig(inputs=[str(i) for i in inputs], output_prefix=str(out), tokenizer_type=kind,
                           tokenizer_model=str(fx / model), append_eod=eod, progress=False, **kw)
    summary = preprocess(cfg)
    return summary, {k: IndexedDataset(p) for k, p in summary.outputs.items()}


def same_files(a, b) -> bool:
    return all(open(f"{a}{e}", "rb").read() == open(f"{b}{e}", "rb").read() for e in (".bin", ".idx"))


def cli(repo_root, *args, env=None, **kw):
    return subprocess.Popen([sys.executable, str(repo_root / "tools" / "preprocess_data.py"), *map(str, args)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, **kw)


@pytest.fixture(scope="module")
def sp(megatron_fixtures):
    return sentencepiece.SentencePieceProcessor(model_file=str(megatron_fixtures / "code8k.model"))


@pytest.fixture(scope="module")
def texts(megatron_fixtures):
    return [json.loads(line)["text"] for line in open(megatron_fixtures / "code_sample.jsonl")]


def docs_of(ds):
    idx = ds.document_indices
    return [[list(ds[i]) for i in range(idx[d], idx[d + 1])] for d in range(ds.num_documents)]


@pytest.mark.parametrize("workers", [1, 2])
@pytest.mark.parametrize("case", CASES)
def test_byte_identical_to_megatron(megatron_fixtures, tmp_path, case, workers):
    tok, eod = CASES[case]
    chunk = 150_000 if workers > 1 else None  # many tasks, cut mid-line, so ordering and alignment matter
    summary, out = run(megatron_fixtures, tmp_path / "o", [megatron_fixtures / "code_sample.jsonl"], tok, eod,
                       workers=workers, chunk_bytes=chunk)
    assert same_files(out["text"].prefix, megatron_fixtures / f"{case}_text_document")
    assert (summary.documents, summary.empty_documents, sum(summary.skipped.values())) == (243, 1, 0)
    assert summary.tokens["text"] == out["text"].num_tokens


def test_hf_without_eod_is_megatron_minus_eod(megatron_fixtures, tmp_path):
    """No Megatron fixture for hf without --append-eod: it must be the eod fixture with each eod removed."""
    _, out = run(megatron_fixtures, tmp_path / "o", [megatron_fixtures / "code_sample.jsonl"], "hf", False)
    ref = IndexedDataset(megatron_fixtures / "hf_eod_text_document")
    ds = out["text"]
    assert np.array_equal(ds.document_indices, ref.document_indices)
    assert np.array_equal(ds.sequence_lengths, ref.sequence_lengths - 1)
    for i in range(len(ref)):
        assert ref[i][-1] == 0 and np.array_equal(ds[i], ref[i][:-1])


def test_cli_subprocess(megatron_fixtures, repo_root, tmp_path):
    proc = cli(repo_root, "--input", megatron_fixtures / "code_sample.jsonl", "--output-prefix", tmp_path / "o",
               "--tokenizer-type", "GPTSentencePieceTokenizer", "--tokenizer-model", megatron_fixtures / "code8k.model",
               "--append-eod", "--workers", 2, "--log-interval", 10)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err
    assert "243 documents (1 empty" in out and "skipped 0 records" in out and "800,847 tokens" in out
    assert "preprocess: 100%" in err  # the progress bar
    assert same_files(tmp_path / "o_text_document", megatron_fixtures / "spm_eod_text_document")
    assert sorted(os.listdir(tmp_path)) == ["o_text_document.bin", "o_text_document.idx"]


BAD_LINES = [
    (b'{"text": "def f(x):\\n    return x\\n"}', None),
    (b'{"text": "oops", ', "bad JSON"),
    (b'{"content": "no text key"}', "missing key 'text'"),
    (b'{"text": 42}', "key 'text' is int, not a string"),
    (b'{"text": null}', "key 'text' is null, not a string"),
    (b'["text"]', "not a JSON object"),
    (b"", "blank line"),
    (b'{"text": "caf\xe9"}', "invalid UTF-8"),
    (b'{"text": "print(1)\\r\\n"}', None),
    (b'{"text": ""}', None),
]


def write_bad_corpus(path, texts, repeat=3):
    """Good fixture lines mixed with bad ones; returns the expected texts and {line number: reason}."""
    lines, good, bad = [], [], {}
    for r in range(repeat):
        for j, (line, reason) in enumerate(BAD_LINES):
            lines.append(json.dumps({"text": texts[r * 10 + j]}).encode())
            good.append(texts[r * 10 + j])
            lines.append(line)
            if reason:
                bad[len(lines)] = reason
            else:
                good.append(json.loads(line)["text"])
    path.write_bytes(b"\n".join(lines) + b"\n")
    return good, bad


@pytest.mark.parametrize("workers", [1, 2])
def test_malformed_lines_are_counted_with_line_numbers(megatron_fixtures, tmp_path, sp, texts, workers):
    good, bad = write_bad_corpus(tmp_path / "bad.jsonl", texts)
    summary, out = run(megatron_fixtures, tmp_path / "o", [tmp_path / "bad.jsonl"], workers=workers,
                       chunk_bytes=20_000)
    assert summary.documents == len(good) and sum(summary.skipped.values()) == len(bad)
    assert summary.skipped["bad JSON"] == 3 and summary.skipped["invalid UTF-8"] == 3
    assert [(str(s.location()), s.reason) for s in summary.examples] == [
        (f"{tmp_path / 'bad.jsonl'}:line {n}", r) for n, r in sorted(bad.items())][:20]  # 20 shown in full
    expected = [[sp.encode_as_ids(t) + [1]] if t else [] for t in good]
    assert docs_of(out["text"]) == expected
    report = summary.report()
    assert "skipped 21 records" in report and f"bad.jsonl:line {min(bad)}: bad JSON" in report
    assert "... and 1 more" in report


def test_strict_fails_and_writes_nothing(megatron_fixtures, repo_root, tmp_path, texts):
    _, bad = write_bad_corpus(tmp_path / "bad.jsonl", texts)
    proc = cli(repo_root, "--input", tmp_path / "bad.jsonl", "--output-prefix", tmp_path / "out" / "o",
               "--tokenizer-type", "sentencepiece", "--tokenizer-model", megatron_fixtures / "code8k.model",
               "--workers", 2, "--strict", "--quiet")
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 1
    assert f"bad.jsonl:line {min(bad)}: bad JSON" in err and "--strict" in err and "Traceback" not in err
    assert os.listdir(tmp_path / "out") == []


def test_gzip_glob_and_several_inputs(megatron_fixtures, tmp_path):
    lines = open(megatron_fixtures / "code_sample.jsonl", "rb").read().splitlines(keepends=True)
    for i, (a, b) in enumerate([(0, 50), (50, 120), (120, 243)]):
        (tmp_path / f"part-{i}.jsonl").write_bytes(b"".join(lines[a:b]))
    with gzip.open(tmp_path / "all.jsonl.gz", "wb") as f:
        f.writelines(lines)
    ref = megatron_fixtures / "spm_eod_text_document"
    _, out = run(megatron_fixtures, tmp_path / "glob", [tmp_path / "part-*.jsonl"], workers=2, chunk_bytes=100_000)
    assert same_files(out["text"].prefix, ref)
    _, out = run(megatron_fixtures, tmp_path / "gz", [tmp_path / "all.jsonl.gz"], workers=2, chunk_bytes=100_000)
    assert same_files(out["text"].prefix, ref)
    (tmp_path / "head.jsonl.gz").write_bytes(gzip.compress(b"".join(lines[:50])))
    inputs = [tmp_path / "head.jsonl.gz", tmp_path / "part-1.jsonl", tmp_path / "part-2.jsonl"]
    _, out = run(megatron_fixtures, tmp_path / "mix", inputs, workers=1)
    assert same_files(out["text"].prefix, ref)


def test_gzip_bad_line_and_bad_file(megatron_fixtures, tmp_path):
    (tmp_path / "a.jsonl.gz").write_bytes(gzip.compress(b'{"text": "x = 1"}\n{bad\n{"text": "y"}\n'))
    summary, out = run(megatron_fixtures, tmp_path / "o", [tmp_path / "a.jsonl.gz"])
    assert [str(s) for s in summary.examples][0].startswith(f"{tmp_path / 'a.jsonl.gz'}:line 2: bad JSON")
    assert out["text"].num_documents == 2
    (tmp_path / "b.jsonl.gz").write_bytes(gzip.compress(b'{"text": "x = 1"}\n' * 1000)[:-30])
    with pytest.raises(ValueError, match="b.jsonl.gz: cannot read as gzip"):
        run(megatron_fixtures, tmp_path / "p", [tmp_path / "b.jsonl.gz"])
    assert not any(n.startswith("p_") for n in os.listdir(tmp_path))


def test_parquet_by_row_group(megatron_fixtures, tmp_path, texts):
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"text": texts, "n": list(range(len(texts)))}), tmp_path / "a.parquet", row_group_size=40)
    assert pq.ParquetFile(tmp_path / "a.parquet").metadata.num_row_groups == 7
    for workers in (1, 2):
        _, out = run(megatron_fixtures, tmp_path / f"w{workers}", [tmp_path / "a.parquet"], workers=workers)
        assert same_files(out["text"].prefix, megatron_fixtures / "spm_eod_text_document")
    pq.write_table(pa.table({"text": ["a = 1", None, "b = 2"]}), tmp_path / "n.parquet", row_group_size=2)
    summary, out = run(megatron_fixtures, tmp_path / "n", [tmp_path / "n.parquet"])
    assert [str(s) for s in summary.examples] == [f"{tmp_path / 'n.parquet'}:row 1: key 'text' is null, not a string"]
    assert out["text"].num_documents == 2
    with pytest.raises(ValueError, match="n.parquet: parquet file has no column 'code'"):
        run(megatron_fixtures, tmp_path / "m", [tmp_path / "n.parquet"], json_keys=("code",))
    data = bytearray((tmp_path / "a.parquet").read_bytes())
    data[len(data) // 2 : len(data) // 2 + 4000] = bytes(4000)  # a damaged data page, intact footer
    (tmp_path / "bad.parquet").write_bytes(bytes(data))
    with pytest.raises(ValueError, match="bad.parquet: cannot read row group"):  # raised in a worker
        run(megatron_fixtures, tmp_path / "bad", [tmp_path / "bad.parquet"], workers=2)
    assert not any(n.startswith("bad_") for n in os.listdir(tmp_path))


def test_source_tree(megatron_fixtures, tmp_path, sp, texts):
    root = tmp_path / "repo"
    files = {"b.py": texts[0], "a/z.py": texts[1], "a/b/c.py": "x\r\n\ty  = 1\n", "empty.py": "", "notes.txt": "no"}
    for rel, text in files.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(text.encode())
    (root / "latin1.py").write_bytes(b"caf\xe9 = 1\n")
    summary, out = run(megatron_fixtures, tmp_path / "o", [root], json_keys=("text", "path"),
                       extensions=(".py",), workers=2, chunk_bytes=10_000)
    order = ["a/b/c.py", "a/z.py", "b.py", "empty.py"]
    assert docs_of(out["text"]) == [[sp.encode_as_ids(files[p]) + [1]] if files[p] else [] for p in order]
    assert docs_of(out["path"]) == [[sp.encode_as_ids(p) + [1]] for p in order]
    assert summary.skipped == {"undecodable file (not UTF-8)": 1}
    assert str(summary.examples[0]).startswith(f"{root / 'latin1.py'}: undecodable file")
    with pytest.raises(ValueError, match="is a directory: pass --extensions"):
        run(megatron_fixtures, tmp_path / "p", [root])
    with pytest.raises(ValueError, match=r"no files ending with \.rs or \.go"):
        run(megatron_fixtures, tmp_path / "p", [root], extensions=(".rs", ".go"))
    with pytest.raises(ValueError, match="source tree offers keys"):
        run(megatron_fixtures, tmp_path / "p", [root], extensions=(".py",), json_keys=("content",))


def test_several_keys_and_sentence_lists(megatron_fixtures, tmp_path, sp):
    rows = [{"text": "a = 1", "doc": ["x = 1", "", "y"]}, {"text": "", "doc": []}, {"text": "b", "doc": ["", "z"]}]
    (tmp_path / "k.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    _, out = run(megatron_fixtures, tmp_path / "o", [tmp_path / "k.jsonl"], json_keys=("text", "doc"))
    e = sp.encode_as_ids
    assert docs_of(out["text"]) == [[e("a = 1") + [1]], [], [e("b") + [1]]]
    # Megatron's list values: one sequence per non-empty sentence, eod on the document's last sequence
    assert docs_of(out["doc"]) == [[e("x = 1"), e("y") + [1]], [], [e("z") + [1]]]
    assert out["doc"].prefix.endswith("o_doc_document")


def test_bad_arguments(megatron_fixtures, tmp_path):
    with pytest.raises(ValueError, match="no file matches it as a glob"):
        run(megatron_fixtures, tmp_path / "o", [tmp_path / "nothing-*.jsonl"])
    with pytest.raises(ValueError, match="--workers must be at least 1"):
        run(megatron_fixtures, tmp_path / "o", [megatron_fixtures / "code_sample.jsonl"], workers=0)


@pytest.fixture(scope="module")
def big_corpus(megatron_fixtures, tmp_path_factory):
    """code_sample.jsonl 40 times over (~100 MB): long enough to interrupt."""
    path = tmp_path_factory.mktemp("big") / "big.jsonl"
    data = (megatron_fixtures / "code_sample.jsonl").read_bytes()
    with open(path, "wb") as f:
        for _ in range(40):
            f.write(data)
    return path


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGKILL])
def test_interrupted_run_leaves_no_complete_pair(megatron_fixtures, repo_root, tmp_path, big_corpus, sig):
    out_dir = tmp_path / "out"
    proc = cli(repo_root, "--input", big_corpus, "--output-prefix", out_dir / "o", "--tokenizer-type", "sentencepiece",
               "--tokenizer-model", megatron_fixtures / "code8k.model", "--workers", 2, "--quiet",
               start_new_session=True)
    deadline = time.time() + 60
    while not (out_dir.exists() and any(n.startswith("o_text_document.bin.tmp") for n in os.listdir(out_dir))):
        assert time.time() < deadline and proc.poll() is None, "the run ended before it could be interrupted"
        time.sleep(0.05)
    time.sleep(0.5)  # let it write some tokens
    assert proc.poll() is None, "the run ended before it could be interrupted"
    os.killpg(proc.pid, sig)  # the whole group: main process and its workers
    proc.communicate(timeout=60)
    names = os.listdir(out_dir)
    assert "o_text_document.bin" not in names and "o_text_document.idx" not in names
    if sig == signal.SIGTERM:  # a catchable signal: the temporary files are gone too
        assert names == []
    with pytest.raises(ValueError, match="file not found"):
        IndexedDataset(out_dir / "o_text_document")


def test_a_dead_worker_stops_the_run(megatron_fixtures, repo_root, tmp_path, big_corpus):
    out_dir = tmp_path / "out"
    proc = cli(repo_root, "--input", big_corpus, "--output-prefix", out_dir / "o", "--tokenizer-type", "sentencepiece",
               "--tokenizer-model", megatron_fixtures / "code8k.model", "--workers", 2, "--quiet")
    children = f"/proc/{proc.pid}/task/{proc.pid}/children"
    deadline = time.time() + 60
    while not (out_dir.exists() and open(children).read().split()):
        assert time.time() < deadline and proc.poll() is None, "the run ended before a worker could be killed"
        time.sleep(0.05)
    time.sleep(0.5)
    os.kill(int(open(children).read().split()[0]), signal.SIGKILL)  # as the OOM killer would
    out, err = proc.communicate(timeout=60)
    assert proc.returncode != 0 and "died (exit code -9)" in err
    assert os.listdir(out_dir) == []


def test_bad_chunk_bytes_is_an_error_not_an_empty_output(megatron_fixtures, tmp_path):
    """A negative --chunk-bytes once planned no jsonl tasks: an empty dataset and exit 0."""
    with pytest.raises(ValueError, match="--chunk-bytes must be at least 1"):
        run(megatron_fixtures, tmp_path / "o", [megatron_fixtures / "code_sample.jsonl"], chunk_bytes=-1)
    assert os.listdir(tmp_path) == []


def test_empty_input_still_reports_each_output(megatron_fixtures, tmp_path):
    (tmp_path / "empty.jsonl").write_bytes(b"")
    summary, out = run(megatron_fixtures, tmp_path / "o", [tmp_path / "empty.jsonl"], json_keys=("text", "code"))
    assert (len(out["text"]), out["code"].num_documents) == (0, 0)
    report = summary.report()
    assert "text: 0 tokens" in report and "code: 0 tokens" in report


def test_source_files_named_on_the_command_line(megatron_fixtures, tmp_path, sp, texts):
    """`--input 'src/*.py' --extensions .py`: one document per file, as for a folder (not each line as JSON)."""
    (tmp_path / "src").mkdir()
    for i in range(3):
        (tmp_path / "src" / f"m{i}.py").write_text(texts[i])
    summary, out = run(megatron_fixtures, tmp_path / "o", [tmp_path / "src" / "*.py"], json_keys=("text", "path"),
                       extensions=(".py",))
    assert sum(summary.skipped.values()) == 0
    assert docs_of(out["text"]) == [[sp.encode_as_ids(t) + [1]] for t in texts[:3]]
    assert docs_of(out["path"]) == [[sp.encode_as_ids(f"m{i}.py") + [1]] for i in range(3)]
    _, tree = run(megatron_fixtures, tmp_path / "t", [tmp_path / "src"], extensions=(".py",))
    assert same_files(out["text"].prefix, tree["text"].prefix)
