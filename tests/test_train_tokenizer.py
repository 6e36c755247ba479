"""Tokenizer training: tiny sentencepiece and byte-level BPE models on real code, loaded back and checked."""

import gzip
import json
import os
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest
import sentencepiece as spm

from megaphi.data import fast_sentencepiece as fast
from megaphi.data.tokenizer import build_tokenizer
from megaphi.data.tokenizer_training import CorpusStats, iter_documents, list_inputs, split_long
from tools.train_tokenizer import main as train_main

STDLIB = Path(sysconfig.get_paths()["stdlib"])
HELD_OUT = [
    "import os\n\n\ndef walk(top):\n\tfor root, dirs, files in os.walk(top):\n\t\tyield root\r\n",
    "class  A :\n    x   =  [1, 2,   3]  # spaces   everywhere   \n",
    "s = '😀 漢字 éà'  \x00\x7f\n",
    "",
    "    ",
]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """A source folder (stdlib json/ and email/ packages) and a jsonl of the same files with two bad lines."""
    root = tmp_path_factory.mktemp("corpus")
    src = root / "src"
    texts = []
    for package in ("json", "email"):
        for path in sorted((STDLIB / package).glob("*.py")):
            dst = src / package / path.name
            dst.parent.mkdir(parents=True, exist_ok=True)
            dst.write_bytes(path.read_bytes())
            texts.append(path.read_text(encoding="utf-8"))
    (src / "notes.txt").write_text("not picked up: wrong extension")
    jsonl = root / "code.jsonl"
    with open(jsonl, "w", encoding="utf-8") as f:
        for i, text in enumerate(texts):
            f.write(json.dumps({"text": text, "id": i}) + "\n")
            if i == 3:
                f.write("{broken json\n")
            if i == 5:
                f.write(json.dumps({"content": "no text key"}) + "\n")
    return {"src": src, "jsonl": jsonl, "texts": texts}


@pytest.fixture(scope="module")
def sp_model(corpus, tmp_path_factory):
    out = tmp_path_factory.mktemp("sp") / "code.model"
    assert train_main(["--input", str(corpus["jsonl"]), "--tokenizer-type", "sentencepiece",
                       "--vocab-size", "500", "--output", str(out), "--quiet"]) == 0
    return out


@pytest.fixture(scope="module")
def hf_model(corpus, tmp_path_factory):
    out = tmp_path_factory.mktemp("hf") / "code_hf"
    assert train_main(["--input", str(corpus["src"]), "--extensions", ".py", "--tokenizer-type", "huggingface",
                       "--vocab-size", "500", "--output", str(out), "--quiet"]) == 0
    return out


def test_sentencepiece_model_is_a_code_model(sp_model):
    proto = fast.load_model_proto(sp_model.read_bytes())
    t, n = proto.trainer_spec, proto.normalizer_spec
    assert (t.model_type, t.byte_fallback, t.split_digits, t.allow_whitespace_only_pieces) == (t.BPE, True, True, True)
    assert (n.name, n.add_dummy_prefix, n.remove_extra_whitespaces, n.precompiled_charsmap) == (
        "identity", False, False, b"")
    assert fast.model_problems(proto) == [] and fast.native_problems(proto) == []
    tok = build_tokenizer("sentencepiece", sp_model)
    assert tok.backend == "native"
    assert (tok.vocab_size, tok.eod, tok.unk) == (500, 1, 0)
    assert tok.sp.id_to_piece(tok.eod) == "<|endoftext|>"
    pieces = [p.piece for p in proto.pieces]
    assert "\u2581\u2581\u2581\u2581" in pieces  # indentation is a piece
    assert not any(len(p) > 1 and any(c.isdigit() for c in p) for p in pieces if not p.startswith("<0x"))


def test_sentencepiece_round_trip_and_exact_fast_path(sp_model, corpus):
    tok = build_tokenizer("sentencepiece", sp_model)
    sp = spm.SentencePieceProcessor(model_file=str(sp_model))
    texts = HELD_OUT + corpus["texts"]
    ids = tok.encode_batch(texts)
    assert ids == [sp.encode_as_ids(t) for t in texts]
    assert [tok.decode(i) for i in ids] == texts


def test_huggingface_model(hf_model, corpus):
    assert sorted(os.listdir(hf_model)) == ["tokenizer.json", "tokenizer_config.json"]  # no temp files left
    config = json.loads((hf_model / "tokenizer_config.json").read_text())
    assert config["eos_token"] == config["bos_token"] == "<|endoftext|>"
    tok = build_tokenizer("HuggingFaceTokenizer", hf_model)
    assert tok.vocab_size == 500
    assert tok.eod == tok.tk.token_to_id("<|endoftext|>")
    texts = HELD_OUT + corpus["texts"][:10]
    assert [tok.decode(i) for i in tok.encode_batch(texts)] == texts


def test_corpus_reading_counts_skips(corpus):
    stats = CorpusStats()
    texts = list(iter_documents(list_inputs([str(corpus["jsonl"])]), ["text"], stats, progress=False))
    assert texts == [t for t in corpus["texts"] if t]
    assert stats.skipped == {"bad JSON": 1, "missing key 'text'": 1}
    assert any(":5: bad JSON" in e for e in stats.examples)
    inputs = list_inputs([str(corpus["src"])], [".py"])
    assert all(kind == "file" and path.endswith(".py") for path, kind in inputs)
    assert len(inputs) == len(corpus["texts"])


def test_long_documents_are_cut_not_dropped():
    text = "".join(f"line {i} {'x' * (i % 50)} 漢\n" for i in range(500)) + "y" * 5000 + "é" * 3000
    pieces = list(split_long([text, "short"], 1000))
    assert "".join(pieces[:-1]) == text and pieces[-1] == "short"
    assert max(len(p.encode("utf-8")) for p in pieces) <= 1000


def test_bad_training_inputs(corpus, tmp_path, capsys):
    out = str(tmp_path / "m.model")
    base = ["--tokenizer-type", "sentencepiece", "--vocab-size", "300", "--output", out, "--quiet"]
    assert train_main(["--input", str(tmp_path / "missing*.jsonl")] + base) == 2
    assert "no such file" in capsys.readouterr().err
    assert train_main(["--input", str(corpus["src"])] + base) == 2
    assert "give --extensions" in capsys.readouterr().err
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n")
    assert train_main(["--input", str(empty)] + base) == 2
    assert "no documents" in capsys.readouterr().err
    assert train_main(["--input", str(corpus["jsonl"])] + base[:3] + ["100"] + base[4:]) == 2
    assert "too small" in capsys.readouterr().err
    assert not os.path.exists(out)


def test_cli_runs_as_a_script(corpus, tmp_path, repo_root):
    out = tmp_path / "cli.model"
    result = subprocess.run(
        [sys.executable, str(repo_root / "tools" / "train_tokenizer.py"), "--input", str(corpus["src"]),
         "--extensions", ".py", "--tokenizer-type", "GPTSentencePieceTokenizer", "--vocab-size", "400",
         "--output", str(out), "--quiet"],
        capture_output=True, text=True, cwd=repo_root, env={**os.environ, "PYTHONPATH": str(repo_root)},
    )
    assert result.returncode == 0, result.stderr
    assert f"{len(corpus['texts'])} documents" in result.stdout
    assert build_tokenizer("sentencepiece", out).vocab_size == 400


def test_corpus_reading_skips_what_preprocess_skips(tmp_path):
    """Invalid UTF-8 is skipped and counted (not turned into U+FFFD); a dangling symlink is no traceback."""
    (tmp_path / "bad.jsonl").write_bytes(b'{"text": "caf\xe9 = 1"}\n{"text": "ok = 1"}\n')
    stats = CorpusStats()
    texts = list(iter_documents(list_inputs([str(tmp_path / "bad.jsonl")]), ["text"], stats, progress=False))
    assert texts == ["ok = 1"] and stats.skipped == {"invalid UTF-8": 1}
    assert stats.examples[0].startswith(f"{tmp_path / 'bad.jsonl'}:1: invalid UTF-8")
    src = tmp_path / "src"
    src.mkdir()
    (src / "a.py").write_text("x = 1\n")
    (src / "gone.py").symlink_to(tmp_path / "nowhere.py")
    inputs = list_inputs([str(src)], [".py"])
    assert inputs == [(str(src / "a.py"), "file")]
    assert list(iter_documents(inputs, progress=False)) == ["x = 1\n"]


def test_truncated_gzip_is_a_clear_error(corpus, tmp_path, capsys):
    data = gzip.compress(corpus["jsonl"].read_bytes())
    (tmp_path / "cut.jsonl.gz").write_bytes(data[: len(data) // 2])
    out = tmp_path / "m.model"
    assert train_main(["--input", str(tmp_path / "cut.jsonl.gz"), "--tokenizer-type", "sentencepiece",
                       "--vocab-size", "300", "--output", str(out), "--quiet"]) == 2
    assert "cut.jsonl.gz: cannot read as gzip" in capsys.readouterr().err and not out.exists()
