"""Tokenizer files for an HF folder (AutoTokenizer gives our ids), and megaphi tokenizers back from such folders.

A HuggingFace tokenizer is copied as it is. A sentencepiece model becomes a `tokenizers` tokenizer.json: every
piece keeps its id; BPE models get one merge per way of splitting a piece into two pieces, ranked by the piece's
score (sentencepiece merges the best-scoring adjacent pair, leftmost first, which the BPE ranks reproduce);
spaces become "▁" with the model's own prefix and whitespace rules; byte fallback stays on. The result is checked
against sentencepiece on a sample before it is written. The .model file is kept beside it as tokenizer.model.
One difference remains: AutoTokenizer reads a control piece spelled out in the text ("</s>") as that token,
sentencepiece as characters.
"""

import json
import shutil
from pathlib import Path

from megaphi.data.tokenizer import (HUGGINGFACE_TYPES, SENTENCEPIECE_TYPES, HuggingFaceTokenizer,
                                    SentencePieceTokenizer, Tokenizer, build_tokenizer)

HF_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
                      "vocab.json", "merges.txt")
SAMPLE = [
    "def add(a, b):\n    return a + b\n",
    "class Foo(object):\n\tx = [1, 22, 333, 4444]  # trailing   \n\n\n    pass",
    "   leading spaces, then   runs    of spaces and a tab\t\tend  ",
    "unicode: héllo wörld, 中文字符, emoji 😀🚀, math ∑∫ ≠ ≤",
    'print(f"{x!r:>10}") if __name__ == "__main__" else None',
    "0123456789 3.14159e-10 0xFF 1_000_000",
    "",
    " ",
    "\n",
]


def sentencepiece_to_tokenizers(model_file: str | Path):
    """A `tokenizers.Tokenizer` with the same ids as the sentencepiece model (BPE or unigram)."""
    from sentencepiece import sentencepiece_model_pb2 as pb
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers

    proto = pb.ModelProto()
    proto.ParseFromString(Path(model_file).read_bytes())
    piece_type, trainer, norm = pb.ModelProto.SentencePiece, proto.trainer_spec, proto.normalizer_spec
    if trainer.treat_whitespace_as_suffix or not norm.escape_whitespaces:
        raise ValueError(f"{model_file}: treat_whitespace_as_suffix or unescaped whitespace is not supported")
    pieces = list(proto.pieces)
    unk = next((i for i, p in enumerate(pieces) if p.type == piece_type.UNKNOWN), None)
    if trainer.model_type == pb.TrainerSpec.BPE:
        vocab = {p.piece: i for i, p in enumerate(pieces)}
        mergeable = {p.piece: i for i, p in enumerate(pieces) if p.type in (piece_type.NORMAL, piece_type.USER_DEFINED)}
        ranked = []
        for i, p in enumerate(pieces):
            if p.type != piece_type.NORMAL:
                continue
            for k in range(1, len(p.piece)):
                left, right = p.piece[:k], p.piece[k:]
                if left in mergeable and right in mergeable:
                    ranked.append((-p.score, i, mergeable[left], left, right))
        merges = [(left, right) for *_, left, right in sorted(ranked)]
        model = models.BPE(vocab=vocab, merges=merges, unk_token=None if unk is None else pieces[unk].piece,
                           fuse_unk=True, byte_fallback=trainer.byte_fallback)
    elif trainer.model_type == pb.TrainerSpec.UNIGRAM:
        model = models.Unigram([(p.piece, p.score) for p in pieces], unk_id=unk, byte_fallback=trainer.byte_fallback)
    else:
        raise ValueError(f"{model_file}: sentencepiece model type {pb.TrainerSpec.ModelType.Name(trainer.model_type)} "
                         f"cannot be exported; BPE and unigram can")
    tk = Tokenizer(model)
    steps = [normalizers.Precompiled(norm.precompiled_charsmap)] if norm.precompiled_charsmap else []
    if norm.remove_extra_whitespaces:
        steps += [normalizers.Replace(Regex("^ +| +$"), ""), normalizers.Replace(Regex(" {2,}"), " ")]
    if norm.add_dummy_prefix:
        steps.append(normalizers.Prepend(" "))
    steps.append(normalizers.Replace(" ", "▁"))
    tk.normalizer = normalizers.Sequence(steps)
    decode = [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()]
    if norm.add_dummy_prefix:
        decode.append(decoders.Strip(" ", 1, 0))
    tk.decoder = decoders.Sequence(decode)
    special = [p.piece for p in pieces if p.type in (piece_type.CONTROL, piece_type.UNKNOWN)]
    tk.add_special_tokens([AddedToken(s, special=True, normalized=False) for s in special])
    user = [p.piece for p in pieces if p.type == piece_type.USER_DEFINED]
    if user:
        tk.add_tokens([AddedToken(s, special=False, normalized=True) for s in user])
    return tk


def check_same_ids(ours: Tokenizer, theirs, texts=SAMPLE) -> None:
    """ValueError unless the `tokenizers` tokenizer encodes and decodes texts exactly as ours."""
    for text in texts:
        want, got = ours.encode(text), theirs.encode(text, add_special_tokens=False).ids
        if want != got:
            raise ValueError(f"the exported tokenizer.json would not give our ids on {text!r}: {got} instead of {want}")
        if theirs.decode(got, skip_special_tokens=False) != ours.decode(want):
            raise ValueError(f"the exported tokenizer.json would not decode {want} to {ours.decode(want)!r}")


def export_tokenizer(tokenizer_type: str, tokenizer_model: str, folder: str | Path,
                     model_max_length: int) -> Tokenizer:
    """Writes the tokenizer files AutoTokenizer loads into folder; returns megaphi's tokenizer for the ids."""
    folder = Path(folder)
    ours = build_tokenizer(tokenizer_type, tokenizer_model)
    if tokenizer_type in HUGGINGFACE_TYPES:
        src = Path(tokenizer_model)
        src_dir = src if src.is_dir() else src.parent
        shutil.copyfile(src if src.is_file() else src / "tokenizer.json", folder / "tokenizer.json")
        for name in HF_TOKENIZER_FILES[1:]:
            if (src_dir / name).is_file():
                shutil.copyfile(src_dir / name, folder / name)
        config = _read_json(folder / "tokenizer_config.json")
        eod_text = ours.tk.id_to_token(ours.eod)
    else:
        tk = sentencepiece_to_tokenizers(tokenizer_model)
        check_same_ids(ours, tk)
        tk.save(str(folder / "tokenizer.json"))
        shutil.copyfile(tokenizer_model, folder / "tokenizer.model")
        eod_text = ours.sp.id_to_piece(ours.eod)
        config = {"unk_token": None if ours.unk is None else ours.sp.id_to_piece(ours.unk),
                  "pad_token": None if ours.pad is None else ours.sp.id_to_piece(ours.pad),
                  "clean_up_tokenization_spaces": False, "add_bos_token": False, "add_eos_token": False}
        if ours.bos is not None:
            config["bos_token"] = ours.sp.id_to_piece(ours.bos)
    config.setdefault("tokenizer_class", "PreTrainedTokenizerFast")
    config.setdefault("eos_token", eod_text)
    config.setdefault("bos_token", eod_text)  # GPT-style: documents are separated (and so begun) by eod
    config.setdefault("model_max_length", model_max_length)
    (folder / "tokenizer_config.json").write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n")
    return ours


def special_ids(tokenizer: Tokenizer) -> tuple[int, int]:
    """(bos, eos) for config.json: the tokenizer's bos if it has one, else eod, which begins every document."""
    return (tokenizer.bos if tokenizer.bos is not None else tokenizer.eod), tokenizer.eod


def load_hf_tokenizer(folder: str | Path) -> Tokenizer | None:
    """megaphi's tokenizer for an HF folder: its tokenizer.model (sentencepiece), else tokenizer.json; else None."""
    folder = Path(folder)
    if (folder / "tokenizer.model").is_file():
        try:
            return SentencePieceTokenizer(folder / "tokenizer.model")
        except ValueError:  # e.g. a tiktoken file under that name: fall back to tokenizer.json
            pass
    if (folder / "tokenizer.json").is_file():
        return HuggingFaceTokenizer(folder)
    return None


def tokenizer_spec(folder: str | Path) -> tuple[str, str] | None:
    """(--tokenizer-type, --tokenizer-model) for the tokenizer of an HF folder, or None when it has none."""
    tok = load_hf_tokenizer(folder)
    if tok is None:
        return None
    return (SENTENCEPIECE_TYPES[0], str(tok.name)) if isinstance(tok, SentencePieceTokenizer) else \
        (HUGGINGFACE_TYPES[0], str(tok.name))


def _read_json(path: Path) -> dict:
    if not path.is_file():
        return {}
    try:
        value = json.loads(path.read_text())
    except ValueError as e:
        raise ValueError(f"{path} is not valid JSON: {e}") from None
    return value if isinstance(value, dict) else {}
