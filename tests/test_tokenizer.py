"""Tokenizers: Megatron-LM's ids on the shared fixtures, the exact fast paths, round trips, bad input."""

import json
import pickle
import random
import sys

import numpy as np
import pytest
import sentencepiece as spm

from megaphi.data import fast_sentencepiece as fast
from megaphi.data.tokenizer import build_tokenizer

SP_BACKENDS = ("native", "python", "sentencepiece")

ROUND_TRIP = [
    "",
    "def f(x):\n\treturn x\n",
    "\t\tindented with tabs\n\t \tmixed\n",
    "a    b        c" + " " * 40 + "d",
    "windows\r\nline\r\nends\r\n",
    "   leading and trailing spaces   ",
    "   ",
    "emoji 😀🚀 and CJK 漢字テスト, accents éàü, Ω≈ç√",
    "controls \x00\x01\x07\x1b\x7f form\x0cfeed vtab\x0b",
    "digits 0123456789 3.14159e-10 0xFF_FF 1_000_000",
    "literal <|endoftext|> and </s> in the text",
    "x" * 3000,
]

# Where segmenting could go wrong: space runs, the escaped space '▁' itself, long space-free runs, unknowns.
ADVERSARIAL = ROUND_TRIP + [
    " ", "  ", " x", "x ", "x  ", " \n ", "\n    \n", "a▁b", "▁", "▁▁ ▁x", "x▁ y", " ▁ ▁  ▁", "▁x ▁y",
    "if x  ==  1 :\n    y = 2\n", "=" * 300, "-" * 65 + " " + "-" * 64, "ab" * 200 + " " + "ba" * 200,
    "𝔘𝔫𝔦𝔠𝔬𝔡𝔢 ﷽ \u200b\u200d\ufeff \u3000 full\u3000width", "\ufffd replacement",
    "1234567890" * 10, "a1b2c3 " * 30, "\t \t  \t   \n" * 5,
]


def _docs(megatron_fixtures):
    with open(megatron_fixtures / "code_sample.jsonl", encoding="utf-8") as f:
        return [json.loads(line)["text"] for line in f]


def _flat(ids_per_doc, eod=None):
    """Megatron's .bin order: each non-empty document's ids, then eod when appending it."""
    extra = [] if eod is None else [eod]
    return np.array([i for ids in ids_per_doc if ids for i in ids + extra], dtype=np.uint16)


def _fuzz(seed: int, count: int) -> list[str]:
    alphabet = list("abcxyz_019(){}:=.,'\"#") + [" "] * 8 + ["\t", "\n", "\r", "▁", "😀", "漢", "é", "\x00"]
    rng = random.Random(seed)
    return ["".join(rng.choice(alphabet) for _ in range(rng.randint(0, 120))) for _ in range(count)]


@pytest.fixture(scope="module")
def docs(megatron_fixtures):
    return _docs(megatron_fixtures)


@pytest.mark.parametrize("backend", SP_BACKENDS)
def test_sentencepiece_matches_megatron(megatron_fixtures, docs, backend):
    tok = build_tokenizer("GPTSentencePieceTokenizer", megatron_fixtures / "code8k.model", backend=backend)
    assert tok.backend == backend
    ids = tok.encode_batch(docs)
    eod_bin = np.fromfile(megatron_fixtures / "spm_eod_text_document.bin", dtype=np.uint16)
    noeod_bin = np.fromfile(megatron_fixtures / "spm_noeod_text_document.bin", dtype=np.uint16)
    np.testing.assert_array_equal(_flat(ids, tok.eod), eod_bin)
    np.testing.assert_array_equal(_flat(ids), noeod_bin)
    assert [tok.encode(d) for d in docs[:20]] == ids[:20]


def test_huggingface_matches_megatron(megatron_fixtures, docs):
    for model in (megatron_fixtures / "hf_bpe8k", megatron_fixtures / "hf_bpe8k" / "tokenizer.json"):
        tok = build_tokenizer("HuggingFaceTokenizer", model)
        ids = tok.encode_batch(docs)
        eod_bin = np.fromfile(megatron_fixtures / "hf_eod_text_document.bin", dtype=np.uint16)
        np.testing.assert_array_equal(_flat(ids, tok.eod), eod_bin)
        assert [tok.encode(d) for d in docs[:20]] == ids[:20]


def test_special_ids_and_vocab(megatron_fixtures):
    sp = build_tokenizer("sentencepiece", megatron_fixtures / "code8k.model")
    assert (sp.vocab_size, sp.eod, sp.unk, sp.bos, sp.pad) == (8000, 1, 0, None, None)
    assert sp.backend == "native", "megaphi._segment_cache is not built (pip install -e .)"
    hf = build_tokenizer("huggingface", megatron_fixtures / "hf_bpe8k")
    assert (hf.vocab_size, hf.eod, hf.bos) == (8000, 0, 0)
    assert hf.tk.id_to_token(hf.eod) == "<|endoftext|>"


@pytest.mark.parametrize("text", ROUND_TRIP)
def test_round_trip_fixture_tokenizers(megatron_fixtures, text):
    for tok in (build_tokenizer("sentencepiece", megatron_fixtures / "code8k.model"),
                build_tokenizer("huggingface", megatron_fixtures / "hf_bpe8k")):
        assert tok.decode(tok.encode(text)) == text
        assert tok.decode(np.array(tok.encode(text), dtype=np.int64)) == text


@pytest.mark.parametrize("backend", ["native", "python"])
def test_fast_paths_equal_sentencepiece(megatron_fixtures, docs, backend):
    data = (megatron_fixtures / "code8k.model").read_bytes()
    sp = spm.SentencePieceProcessor(model_proto=data)
    proto = fast.load_model_proto(data)
    texts = ADVERSARIAL + _fuzz(0, 400) + docs[:40]
    expected = [sp.encode_as_ids(t) for t in texts]
    # A tiny cache turns over constantly (generation swaps, clears) and must not change a single id.
    for max_entries in (3, 1 << 16, 0):
        if backend == "native":
            encoder = fast.native_encoder(sp, proto, max_entries=max_entries)
            assert encoder is not None, "megaphi._segment_cache is not built (pip install -e .)"
        else:
            encoder = fast.PySegmentEncoder(sp, max_entries=max_entries)
        for start in range(0, len(texts), 37):  # batches mixing cached and new segments
            assert encoder.encode_batch(texts[start:start + 37]) == expected[start:start + 37]
        assert encoder.encode_batch(texts) == expected  # second pass: from the cache


def _edited_model(megatron_fixtures, tmp_path, edit):
    proto = fast.load_model_proto((megatron_fixtures / "code8k.model").read_bytes())
    edit(proto)
    path = tmp_path / "edited.model"
    path.write_bytes(proto.SerializeToString())
    return path, proto


def _add_piece(proto, text, score):
    piece = proto.pieces.add()
    piece.piece, piece.score, piece.type = text, score, fast.model_pb2.ModelProto.SentencePiece.NORMAL


def test_piece_across_a_space_disables_the_fast_path(megatron_fixtures, tmp_path):
    # "x▁" spans a non-space | space position: cutting "x y" there would change the ids, and the check knows.
    path, proto = _edited_model(megatron_fixtures, tmp_path, lambda p: _add_piece(p, "x\u2581", 1.0))
    assert any("non-space followed by a space" in p for p in fast.model_problems(proto))
    sp = spm.SentencePieceProcessor(model_file=str(path))
    text = "x y = x  x\n"
    assert fast.PySegmentEncoder(sp).encode(text) != sp.encode_as_ids(text)  # why the check exists
    tok = build_tokenizer("sentencepiece", path)
    assert tok.backend == "sentencepiece"
    assert tok.encode_batch([text]) == [sp.encode_as_ids(text)]
    with pytest.raises(ValueError, match="no exact fast path"):
        build_tokenizer("sentencepiece", path, backend="python")


@pytest.mark.parametrize("edit, problem", [
    (lambda p: setattr(p.normalizer_spec, "add_dummy_prefix", True), "add_dummy_prefix"),
    (lambda p: setattr(p.normalizer_spec, "remove_extra_whitespaces", True), "remove_extra_whitespaces"),
    (lambda p: setattr(p.normalizer_spec, "name", "nmt_nfkc"), "not identity"),
    (lambda p: setattr(p.trainer_spec, "treat_whitespace_as_suffix", True), "treat_whitespace_as_suffix"),
    (lambda p: setattr(p.pieces[500], "type", fast.model_pb2.ModelProto.SentencePiece.UNUSED), "UNUSED"),
    (lambda p: setattr(p.trainer_spec, "model_type", fast.model_pb2.TrainerSpec.UNIGRAM), "not BPE"),
])
def test_unsafe_models_fall_back_to_sentencepiece(megatron_fixtures, tmp_path, docs, edit, problem):
    path, proto = _edited_model(megatron_fixtures, tmp_path, edit)
    assert any(problem in p for p in fast.model_problems(proto))
    tok = build_tokenizer("sentencepiece", path)
    assert tok.backend == "sentencepiece"
    sp = spm.SentencePieceProcessor(model_file=str(path))
    texts = docs[:5] + ADVERSARIAL[:10]
    assert tok.encode_batch(texts) == [sp.encode_as_ids(t) for t in texts]


def test_user_defined_pieces_use_the_python_cache(megatron_fixtures, tmp_path, docs):
    def edit(proto):
        piece = proto.pieces.add()
        piece.piece, piece.type = "<|im_start|>", fast.model_pb2.ModelProto.SentencePiece.USER_DEFINED

    path, proto = _edited_model(megatron_fixtures, tmp_path, edit)
    assert fast.model_problems(proto) == [] and fast.native_problems(proto)
    tok = build_tokenizer("sentencepiece", path)
    assert tok.backend == "python"
    sp = spm.SentencePieceProcessor(model_file=str(path))
    texts = ["a <|im_start|>b <|im_start|> <|im_start|>\n"] + docs[:5] + ADVERSARIAL
    assert tok.encode_batch(texts) == [sp.encode_as_ids(t) for t in texts]


@pytest.mark.parametrize("backend", ["native", "python"])
def test_without_byte_fallback_unknown_runs_stay_whole(megatron_fixtures, tmp_path, docs, backend):
    # Unknown characters become <unk>, and sentencepiece joins a run of them into one: no cut may split a run.
    def edit(proto):
        proto.trainer_spec.byte_fallback = False
        kept = [p for p in proto.pieces if p.type != fast.model_pb2.ModelProto.SentencePiece.BYTE]
        del proto.pieces[:]
        proto.pieces.extend(kept)

    path, proto = _edited_model(megatron_fixtures, tmp_path, edit)
    assert fast.model_problems(proto) == []
    sp = spm.SentencePieceProcessor(model_file=str(path))
    texts = ["\x00\x01\x02 \x00x\x01\x01(\x02) ꙮꙮ(ꙮ xꙮ ꙮꙮꙮ", "😀😀 😀\x00😀", "\x00" * 9] + ADVERSARIAL + docs[:5]
    expected = [sp.encode_as_ids(t) for t in texts]
    assert sp.unk_id() in expected[0] and len(expected[2]) == 1
    tok = build_tokenizer("sentencepiece", path, backend=backend)
    assert tok.encode_batch(texts) == expected
    assert tok.encode_batch(texts) == expected  # from the cache


def test_piece_with_a_non_piece_character_leaves_the_native_path(megatron_fixtures, tmp_path):
    # sentencepiece merges "ꙮ" + "x" into "ꙮx" although "ꙮ" alone is no piece; the C++ id-level merges cannot.
    path, proto = _edited_model(megatron_fixtures, tmp_path, lambda p: _add_piece(p, "\ua66ex", 1.0))
    sp = spm.SentencePieceProcessor(model_file=str(path))
    with pytest.raises(ValueError, match="not a piece"):
        fast.native_encoder(sp, proto)
    tok = build_tokenizer("sentencepiece", path)
    assert tok.backend == "python"
    texts = ["\ua66ex \ua66e \ua66exx x\ua66ex"] + ADVERSARIAL
    assert tok.encode_batch(texts) == [sp.encode_as_ids(t) for t in texts]
    assert sp.id_to_piece(tok.encode("\ua66ex")[0]) == "\ua66ex"


def test_without_the_extension_python_takes_over(megatron_fixtures, docs, monkeypatch):
    import megaphi

    monkeypatch.setitem(sys.modules, "megaphi._segment_cache", None)  # as if never built: import fails
    monkeypatch.delattr(megaphi, "_segment_cache", raising=False)
    with pytest.warns(UserWarning, match="not built"):
        tok = build_tokenizer("sentencepiece", megatron_fixtures / "code8k.model")
    assert tok.backend == "python"
    eod_bin = np.fromfile(megatron_fixtures / "spm_eod_text_document.bin", dtype=np.uint16)
    np.testing.assert_array_equal(_flat(tok.encode_batch(docs), tok.eod), eod_bin)
    with pytest.raises(ValueError, match="native backend unavailable"):
        build_tokenizer("sentencepiece", megatron_fixtures / "code8k.model", backend="native")


def test_empty_batches(megatron_fixtures):
    for backend in SP_BACKENDS:
        tok = build_tokenizer("sentencepiece", megatron_fixtures / "code8k.model", backend=backend)
        assert tok.encode_batch([]) == [] and tok.encode_batch(["", ""]) == [[], []]
    assert build_tokenizer("huggingface", megatron_fixtures / "hf_bpe8k").encode_batch([]) == []


def test_pickle_rebuilds_the_tokenizer(megatron_fixtures, docs):
    for tok in (build_tokenizer("sentencepiece", megatron_fixtures / "code8k.model"),
                build_tokenizer("huggingface", megatron_fixtures / "hf_bpe8k")):
        copy = pickle.loads(pickle.dumps(tok))
        assert (copy.vocab_size, copy.eod) == (tok.vocab_size, tok.eod)
        assert copy.encode_batch(docs[:3]) == tok.encode_batch(docs[:3])


def test_bad_tokenizer_inputs(megatron_fixtures, tmp_path):
    with pytest.raises(ValueError, match="unknown tokenizer type"):
        build_tokenizer("GPT2BPETokenizer", megatron_fixtures / "code8k.model")
    with pytest.raises(ValueError, match="does not exist"):
        build_tokenizer("sentencepiece", tmp_path / "missing.model")
    garbage = tmp_path / "garbage.model"
    garbage.write_bytes(b"\x00\xff not a model \x13\x37" * 10)
    with pytest.raises(ValueError, match="not a valid sentencepiece model"):
        build_tokenizer("sentencepiece", garbage)
    with pytest.raises(ValueError, match="no tokenizer.json"):
        build_tokenizer("huggingface", tmp_path)
    bad_json = tmp_path / "bad" / "tokenizer.json"
    bad_json.parent.mkdir()
    bad_json.write_text("{not json")
    with pytest.raises(ValueError, match="not a valid tokenizer.json"):
        build_tokenizer("huggingface", bad_json.parent)


def test_sentencepiece_without_eos(megatron_fixtures, tmp_path):
    def edit(proto):
        proto.pieces[1].type = fast.model_pb2.ModelProto.SentencePiece.USER_DEFINED
        proto.trainer_spec.eos_id = -1

    path, _ = _edited_model(megatron_fixtures, tmp_path, edit)
    with pytest.raises(ValueError, match="no eos piece"):
        build_tokenizer("sentencepiece", path)


def _hf_without_eod(tmp_path, config):
    from tokenizers import Tokenizer, models, pre_tokenizers

    tk = Tokenizer(models.BPE(vocab={"a": 0, "b": 1, "ab": 2}, merges=[("a", "b")]))
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    folder = tmp_path / "hf"
    folder.mkdir(exist_ok=True)
    tk.save(str(folder / "tokenizer.json"))
    if config is not None:
        (folder / "tokenizer_config.json").write_text(json.dumps(config))
    return folder


def test_huggingface_eod_errors(tmp_path):
    with pytest.raises(ValueError, match="no end-of-document token"):
        build_tokenizer("huggingface", _hf_without_eod(tmp_path, None))
    with pytest.raises(ValueError, match="eos_token '</s>' is not in the vocabulary"):
        build_tokenizer("huggingface", _hf_without_eod(tmp_path, {"eos_token": {"content": "</s>"}}))
    tok = build_tokenizer("huggingface", _hf_without_eod(tmp_path, {"eos_token": "ab"}))
    assert tok.eod == 2 and tok.encode("ab") == [2]
    (tmp_path / "hf" / "tokenizer_config.json").write_text("[1, 2")
    with pytest.raises(ValueError, match="not valid JSON"):
        build_tokenizer("huggingface", tmp_path / "hf")
