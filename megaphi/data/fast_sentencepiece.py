"""Exact fast paths for sentencepiece BPE on code: cut the text where no piece can span, cache the segments.

sentencepiece's BPE merges adjacent symbols whose concatenation is a piece, best score first (ties: leftmost),
over the whole normalized text. A merge never joins symbols across a position that no piece spans. When the
model normalizes nothing but spaces (identity, no dummy prefix, no whitespace cleanup) and no piece has a
non-space character followed by a space, every "non-space | space" position is such a position: the text can
be cut before each run of spaces that follows a non-space character, the segments encoded on their own and
the ids concatenated; the result equals `encode_as_ids(text)`. Code repeats its segments ("    return",
" =", " self.x") so most come from a cache.

`model_problems` lists what makes a model unsafe for this (then we encode whole texts with sentencepiece).
Two encoders give identical ids: the C++ `megaphi._segment_cache.SegmentEncoder` (its own BPE, same merge
order as sentencepiece; a segment it lacks is cut again between ASCII characters no piece holds side by side)
and `PySegmentEncoder` (regex split, dict cache, misses batched through sentencepiece), the fallback when the
extension is not built. Both are checked against sentencepiece on the whole stdlib (benchmarks/) and in tests.
"""

import re
from itertools import chain

from sentencepiece import sentencepiece_model_pb2 as model_pb2

SPACES = (" ", "\u2581")  # a raw space and the escaped space sentencepiece turns it into
# A run of spaces then non-spaces; or trailing spaces. Cut points: before a space that follows a non-space.
SEGMENT_RE = re.compile("[ \u2581]*[^ \u2581]+|[ \u2581]+")
MAX_KEY_LEN = 256  # longer segments (chars in Python, bytes in C++) are encoded but not cached
DEFAULT_MAX_ENTRIES = 1 << 19  # segments per cache generation (C++ keeps two: ~100 MB when full)

_Piece = model_pb2.ModelProto.SentencePiece
_BPE = model_pb2.TrainerSpec.BPE


def load_model_proto(data: bytes):
    """Parses a serialized sentencepiece ModelProto."""
    proto = model_pb2.ModelProto()
    proto.ParseFromString(data)
    return proto


def _spans_space_boundary(piece: str) -> bool:
    return any(a not in SPACES and b in SPACES for a, b in zip(piece, piece[1:]))


def model_problems(proto) -> list[str]:
    """Why cutting texts into segments would change sentencepiece's ids for this model ([] when it is exact)."""
    problems = []
    trainer, norm = proto.trainer_spec, proto.normalizer_spec
    if trainer.model_type != _BPE:
        problems.append(f"model_type is {model_pb2.TrainerSpec.ModelType.Name(trainer.model_type)}, not BPE")
    if norm.name != "identity" or norm.precompiled_charsmap:
        problems.append(f"normalizer {norm.name!r} is not identity (or has a character map)")
    if norm.add_dummy_prefix:
        problems.append("add_dummy_prefix is on")
    if norm.remove_extra_whitespaces:
        problems.append("remove_extra_whitespaces is on")
    if not norm.escape_whitespaces:
        problems.append("escape_whitespaces is off")
    if trainer.treat_whitespace_as_suffix:
        problems.append("treat_whitespace_as_suffix is on")
    spanning = [p.piece for p in proto.pieces if _spans_space_boundary(p.piece)]
    if spanning:
        problems.append(f"{len(spanning)} pieces have a non-space followed by a space, e.g. {spanning[0]!r}")
    # sentencepiece resegments UNUSED pieces with a map shared by the whole text: segments would not be independent.
    if any(p.type == _Piece.UNUSED for p in proto.pieces):
        problems.append("the model has UNUSED pieces")
    # Without byte fallback a run of unknown characters becomes one <unk>; a segment starts with a space, so
    # runs never cross a cut when the space itself is a known piece.
    space_known = any(p.piece == "\u2581" and p.type == _Piece.NORMAL for p in proto.pieces)
    if not trainer.byte_fallback and not space_known:
        problems.append("no byte fallback and '\u2581' is not a piece")
    return problems


def native_problems(proto) -> list[str]:
    """Why the C++ encoder (which implements only NORMAL pieces in its BPE) cannot take this model."""
    problems = []
    if any(p.type == _Piece.USER_DEFINED for p in proto.pieces):
        problems.append("the model has user-defined pieces")
    reserved = (_Piece.CONTROL, _Piece.UNKNOWN, _Piece.BYTE)
    # sentencepiece maps a lone character to a reserved piece of the same spelling before a normal one.
    if any(p.type in reserved and len(p.piece) == 1 for p in proto.pieces):
        problems.append("a control, unknown or byte piece is a single character")
    if sum(p.type == _Piece.UNKNOWN for p in proto.pieces) != 1:
        problems.append("the model does not have exactly one unknown piece")
    return problems


class PySegmentEncoder:
    """Pure-Python segment cache over a SentencePieceProcessor; the ids equal `sp.encode_as_ids` per text."""

    def __init__(self, sp, max_entries: int = DEFAULT_MAX_ENTRIES):
        self.sp = sp
        self.max_entries = max_entries
        self.cache: dict[str, list[int]] = {}

    def encode(self, text: str) -> list[int]:
        """Ids of one text."""
        return self.encode_batch([text])[0]

    def encode_batch(self, texts) -> list[list[int]]:
        """Ids of each text: cached segments, the misses encoded by sentencepiece in one call."""
        findall, cache = SEGMENT_RE.findall, self.cache
        get = cache.get
        seglists = [findall(t) for t in texts]
        found = [list(map(get, segs)) for segs in seglists]
        missing = {}
        for segs, ids in zip(seglists, found):
            if None in ids:
                missing.update((s, None) for s, i in zip(segs, ids) if i is None)
        if missing:
            keys = list(missing)
            encoded = dict(zip(keys, self.sp.encode(keys, num_threads=1)))
            for segs, ids in zip(seglists, found):
                if None in ids:
                    ids[:] = [encoded[s] if i is None else i for s, i in zip(segs, ids)]
            if len(cache) + len(encoded) > self.max_entries:
                cache.clear()
            cache.update((s, i) for s, i in encoded.items() if len(s) <= MAX_KEY_LEN)
        return [list(chain.from_iterable(ids)) for ids in found]


def native_encoder(sp, proto, max_entries: int = DEFAULT_MAX_ENTRIES):
    """The C++ SegmentEncoder for this model, or None when the extension is not built."""
    try:
        from megaphi import _segment_cache
    except ImportError:
        return None
    normal = [(p.piece, i, p.score) for i, p in enumerate(proto.pieces) if p.type == _Piece.NORMAL]
    pieces, ids, scores = (list(x) for x in zip(*normal)) if normal else ([], [], [])
    byte_ids = [sp.piece_to_id(f"<0x{b:02X}>") for b in range(256)] if proto.trainer_spec.byte_fallback else []
    return _segment_cache.SegmentEncoder(
        pieces, ids, scores, sp.unk_id(), byte_ids, max_entries, MAX_KEY_LEN
    )
