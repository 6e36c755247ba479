"""Tokenizers with Megatron-LM's ids: sentencepiece `.model` files and HuggingFace `tokenizer.json` folders.

    tok = build_tokenizer("GPTSentencePieceTokenizer", "code16k.model")   # or "sentencepiece"
    tok = build_tokenizer("HuggingFaceTokenizer", "hf_bpe/")              # or "huggingface"
    tok.encode_batch(texts) -> list[list[int]]; tok.encode(text); tok.decode(ids); tok.vocab_size; tok.eod

Sentencepiece ids are `encode_as_ids(text)` on the whole text and eod is the model's eos id, as Megatron's
GPTSentencePieceTokenizer gives them; encode_batch takes an exact fast path for code models
(fast_sentencepiece.py). HuggingFace ids are `tokenizers.Tokenizer.encode(text).ids` (special tokens added as
the post-processor says) and eod is the id of tokenizer_config.json's eos_token, else of `<|endoftext|>`.
"""

import json
import os
import warnings

SENTENCEPIECE_TYPES = ("sentencepiece", "GPTSentencePieceTokenizer")
HUGGINGFACE_TYPES = ("huggingface", "HuggingFaceTokenizer")
ENDOFTEXT = "<|endoftext|>"


class Tokenizer:
    """What the data tools use: encode, encode_batch, decode, vocab_size, eod (plus bos/pad/unk or None)."""

    name: str
    vocab_size: int
    eod: int
    bos: int | None = None
    pad: int | None = None
    unk: int | None = None

    def encode(self, text: str) -> list[int]:
        """Token ids of one text."""
        return self.encode_batch([text])[0]

    def encode_batch(self, texts) -> list[list[int]]:
        """Token ids of each text; the fast way to encode many documents."""
        raise NotImplementedError

    def decode(self, ids) -> str:
        """The text of a list of ids."""
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.name!r}, vocab_size={self.vocab_size}, eod={self.eod})"


class SentencePieceTokenizer(Tokenizer):
    """A sentencepiece model. backend: "auto" (fastest exact one), "native", "python" or "sentencepiece"."""

    def __init__(self, model_file, backend: str = "auto", num_threads: int = 1):
        import sentencepiece as spm

        from megaphi.data import fast_sentencepiece as fast

        path = os.fspath(model_file)
        if not os.path.isfile(path):
            raise ValueError(f"sentencepiece model {path!r} does not exist or is not a file")
        with open(path, "rb") as f:
            data = f.read()
        try:
            proto = fast.load_model_proto(data)
            self.sp = spm.SentencePieceProcessor(model_proto=data)
        except Exception as e:  # protobuf DecodeError, sentencepiece RuntimeError
            raise ValueError(f"{path!r} is not a valid sentencepiece model: {e}") from None
        if self.sp.get_piece_size() == 0:
            raise ValueError(f"{path!r} is not a valid sentencepiece model: it has no pieces")
        self.name = path
        self.proto = proto
        self.num_threads = num_threads
        self.vocab_size = self.sp.get_piece_size()
        if self.sp.eos_id() < 0:
            raise ValueError(f"sentencepiece model {path!r} has no eos piece to use as the end-of-document token")
        self.eod = self.sp.eos_id()
        self.bos = self.sp.bos_id() if self.sp.bos_id() >= 0 else None
        self.pad = self.sp.pad_id() if self.sp.pad_id() >= 0 else None
        self.unk = self.sp.unk_id() if self.sp.unk_id() >= 0 else None
        self.fast_path_problems = fast.model_problems(proto)
        self.requested_backend = backend
        self.backend_note = ""  # why a slower backend than asked for, if one is used
        self._encoder, self.backend = self._pick_backend(backend, fast)

    def _pick_backend(self, backend: str, fast):
        choices = ("auto", "native", "python", "sentencepiece")
        if backend not in choices:
            raise ValueError(f"backend must be one of {choices}, got {backend!r}")
        if backend == "sentencepiece":
            return None, "sentencepiece"
        if backend == "auto" and self.fast_path_problems:
            self.backend_note = "no exact fast path: " + "; ".join(self.fast_path_problems)
            return None, "sentencepiece"
        if self.fast_path_problems:
            raise ValueError(f"{self.name}: no exact fast path: {'; '.join(self.fast_path_problems)}")
        if backend in ("auto", "native"):
            problems = fast.native_problems(self.proto)
            encoder = None
            if not problems:
                try:
                    encoder = fast.native_encoder(self.sp, self.proto)
                except ValueError as e:  # the C++ side's own checks (a piece made of non-piece characters)
                    problems = [str(e)]
                if encoder is None and not problems:
                    problems = ["the C++ extension megaphi._segment_cache is not built"]
            if encoder is not None:
                return encoder, "native"
            if backend == "native":
                raise ValueError(f"{self.name}: native backend unavailable: {'; '.join(problems)}")
            self.backend_note = "pure-Python segment cache: " + "; ".join(problems)
            if "not built" in self.backend_note:
                warnings.warn(f"{self.backend_note}; tokenizing is several times slower", stacklevel=3)
        return fast.PySegmentEncoder(self.sp), "python"

    def encode_batch(self, texts) -> list[list[int]]:
        """Token ids of each text (equal to `encode_as_ids` on each)."""
        texts = texts if isinstance(texts, list) else list(texts)
        if self._encoder is not None:
            return self._encoder.encode_batch(texts)
        return self.sp.encode(texts, num_threads=self.num_threads)

    def decode(self, ids) -> str:
        """The text of ids; byte-fallback pieces come back as the bytes they stand for."""
        return self.sp.decode([int(i) for i in ids])

    def __getstate__(self):  # picklable for worker processes: rebuilt from the model file
        return {"model_file": self.name, "backend": self.requested_backend, "num_threads": self.num_threads}

    def __setstate__(self, state):
        self.__init__(state["model_file"], state["backend"], state["num_threads"])


class HuggingFaceTokenizer(Tokenizer):
    """A `tokenizers` tokenizer.json (with the folder's tokenizer_config.json for eos/bos/pad/unk)."""

    def __init__(self, path):
        from tokenizers import Tokenizer as HFTokenizer

        path = os.fspath(path)
        folder, file = (path, os.path.join(path, "tokenizer.json")) if os.path.isdir(path) else (
            os.path.dirname(path), path)
        if not os.path.isfile(file):
            raise ValueError(f"HuggingFace tokenizer {path!r}: no tokenizer.json found at {file!r}")
        try:
            self.tk = HFTokenizer.from_file(file)
        except Exception as e:
            raise ValueError(f"{file!r} is not a valid tokenizer.json: {e}") from None
        config = _read_config(os.path.join(folder, "tokenizer_config.json"))
        self.name = path
        self.vocab_size = self.tk.get_vocab_size(with_added_tokens=True)
        eos = _token_text(config.get("eos_token"))
        if eos is not None:
            if self.tk.token_to_id(eos) is None:
                raise ValueError(f"{path!r}: tokenizer_config.json's eos_token {eos!r} is not in the vocabulary")
            self.eod = self.tk.token_to_id(eos)
        elif self.tk.token_to_id(ENDOFTEXT) is not None:
            self.eod = self.tk.token_to_id(ENDOFTEXT)
        else:
            raise ValueError(f"{path!r}: no end-of-document token (no eos_token in tokenizer_config.json, "
                             f"no {ENDOFTEXT} in the vocabulary)")
        self.bos, self.pad, self.unk = (self._config_id(config, k) for k in ("bos_token", "pad_token", "unk_token"))
        self._batch = getattr(self.tk, "encode_batch_fast", self.tk.encode_batch)  # fast: no offsets

    def _config_id(self, config, key):
        token = _token_text(config.get(key))
        return None if token is None else self.tk.token_to_id(token)

    def encode(self, text: str) -> list[int]:
        """Token ids of one text."""
        return self.tk.encode(text).ids

    def encode_batch(self, texts) -> list[list[int]]:
        """Token ids of each text, encoded in parallel by the Rust library."""
        texts = texts if isinstance(texts, list) else list(texts)
        return [e.ids for e in self._batch(texts)]

    def decode(self, ids) -> str:
        """The text of ids, special tokens included."""
        return self.tk.decode([int(i) for i in ids], skip_special_tokens=False)

    def __getstate__(self):
        return {"path": self.name}

    def __setstate__(self, state):
        self.__init__(state["path"])


def _read_config(path: str) -> dict:
    if not os.path.isfile(path):
        return {}
    try:
        with open(path, encoding="utf-8") as f:
            config = json.load(f)
    except (OSError, ValueError) as e:
        raise ValueError(f"{path!r} is not valid JSON: {e}") from None
    if not isinstance(config, dict):
        raise ValueError(f"{path!r} does not hold a JSON object")
    return config


def _token_text(value):
    """A special token as tokenizer_config.json writes it: a string or {"content": ...}."""
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) and value else None


def build_tokenizer(tokenizer_type: str, tokenizer_model, **kwargs) -> Tokenizer:
    """The tokenizer of a type (Megatron's names or ours) and a model file or folder."""
    if tokenizer_model is None:
        raise ValueError(f"--tokenizer-model is required for --tokenizer-type {tokenizer_type}")
    if tokenizer_type in SENTENCEPIECE_TYPES:
        return SentencePieceTokenizer(tokenizer_model, **kwargs)
    if tokenizer_type in HUGGINGFACE_TYPES:
        return HuggingFaceTokenizer(tokenizer_model, **kwargs)
    raise ValueError(
        f"unknown tokenizer type {tokenizer_type!r}: use one of {SENTENCEPIECE_TYPES + HUGGINGFACE_TYPES}"
    )
