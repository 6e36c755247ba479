"""Train a code tokenizer: sentencepiece BPE (a .model file) or HuggingFace byte-level BPE (a folder).

Both end documents with `<|endoftext|>`. The sentencepiece model is made for code and for megaphi's exact fast
encoder: byte fallback, identity normalization, whitespace-only pieces ("▁▁▁▁"), no dummy prefix, spaces kept
as they are, digits split. Documents stream from jsonl files (plain or .gz, --json-keys) or source folders (one
document per file with the given extensions); sentencepiece keeps a random sample of them
(input_sentence_size), cut at line ends into pieces of at most max_sentence_length bytes so nothing is skipped.
"""

import glob
import gzip
import io
import itertools
import json
import os
import sys
import tempfile
import zlib
from dataclasses import dataclass, field

from tqdm import tqdm

from megaphi.data.sources import list_tree, parse_lines

ENDOFTEXT = "<|endoftext|>"
JSONL_SUFFIXES = (".jsonl", ".json", ".ndjson", ".jsonl.gz", ".json.gz", ".ndjson.gz")


@dataclass
class CorpusStats:
    """What the training corpus held: documents and bytes read, records skipped with their reasons."""

    documents: int = 0
    bytes: int = 0
    skipped: dict = field(default_factory=dict)  # reason -> count
    examples: list = field(default_factory=list)  # the first few "path:line: reason"

    def skip(self, where: str, reason: str) -> None:
        self.skipped[reason] = self.skipped.get(reason, 0) + 1
        if len(self.examples) < 5:
            self.examples.append(f"{where}: {reason}")


def list_inputs(inputs, extensions=()) -> list[tuple[str, str]]:
    """(path, kind) to read in order: kind "jsonl" for jsonl files, "file" for one document per source file."""
    extensions = tuple(extensions)
    found = []
    for pattern in inputs:
        matches = [pattern] if os.path.exists(pattern) else sorted(glob.glob(pattern))
        if not matches:
            raise ValueError(f"--input {pattern!r}: no such file, folder or glob match")
        for path in matches:
            if os.path.isdir(path):
                if not extensions:
                    raise ValueError(f"--input {path!r} is a folder: give --extensions (e.g. .py) to pick files")
                found += [(os.path.join(path, rel), "file") for rel in list_tree(path, extensions)]
            elif extensions and path.endswith(extensions):
                found.append((path, "file"))
            elif path.endswith(JSONL_SUFFIXES):
                found.append((path, "jsonl"))
            else:
                raise ValueError(f"--input {path!r}: not jsonl (.jsonl/.json, maybe .gz) and not one of --extensions")
    return found


def iter_documents(inputs, json_keys=("text",), stats: CorpusStats | None = None, progress: bool = True):
    """Yields each document's text: each --json-keys value of each jsonl line, or each whole source file."""
    stats = stats if stats is not None else CorpusStats()
    total = sum(os.path.getsize(p) for p, _ in inputs)
    with tqdm(total=total, unit="B", unit_scale=True, desc="reading", disable=not progress) as bar:
        for path, kind in inputs:
            if kind == "jsonl":
                yield from _jsonl_documents(path, json_keys, stats)
            else:
                try:
                    with open(path, encoding="utf-8") as f:
                        text = f.read()
                except (UnicodeDecodeError, OSError) as e:
                    stats.skip(path, f"unreadable file ({type(e).__name__})")
                    text = ""
                if text:
                    stats.documents += 1
                    stats.bytes += len(text.encode("utf-8"))
                    yield text
            bar.update(os.path.getsize(path))


def _jsonl_documents(path: str, json_keys, stats: CorpusStats):
    """The texts of a jsonl file, parsed and checked as tools/preprocess_data.py does (same skip reasons)."""
    try:
        yield from _parsed_jsonl(path, json_keys, stats)
    except (OSError, EOFError, zlib.error) as e:
        raise ValueError(f"{path}: cannot read{' as gzip' if path.endswith('.gz') else ''} ({e})") from None


def _parsed_jsonl(path: str, json_keys, stats: CorpusStats):
    opener = gzip.open if path.endswith(".gz") else open
    with opener(path, "rb") as f:
        first = 1
        while lines := list(itertools.islice(f, 4096)):
            records = parse_lines(path, lines, json_keys, first_line=first)
            first += len(lines)
            for skip in records.skips:
                stats.skip(f"{path}:{skip.line}", skip.reason)
            for row in records.rows:
                for value in row:
                    for text in [value] if isinstance(value, str) else value:
                        if text:
                            stats.documents += 1
                            stats.bytes += len(text.encode("utf-8"))
                            yield text


def split_long(texts, max_bytes: int):
    """Each text, cut at line ends (or anywhere, for a longer line) into pieces of at most max_bytes UTF-8 bytes."""
    for text in texts:
        if len(text) * 4 <= max_bytes or len(text.encode("utf-8")) <= max_bytes:
            yield text
            continue
        piece, size = [], 0
        for line in text.splitlines(keepends=True):
            n = len(line.encode("utf-8"))
            if size + n > max_bytes and piece:
                yield "".join(piece)
                piece, size = [], 0
            while n > max_bytes:  # one very long line: cut by characters
                head = line.encode("utf-8")[:max_bytes].decode("utf-8", errors="ignore")
                yield head
                line = line[len(head):]
                n = len(line.encode("utf-8"))
            piece.append(line)
            size += n
        if piece:
            yield "".join(piece)


def _atomic_write(path: str, data: bytes) -> None:
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=".tmp-" + os.path.basename(path))
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise


def train_sentencepiece(texts, output: str, vocab_size: int, input_sentence_size: int = 200_000,
                        max_sentence_length: int = 1 << 16, num_threads: int | None = None, seed: int = 1234,
                        character_coverage: float = 0.9999, verbose: bool = False, progress: bool = True) -> str:
    """Trains a sentencepiece BPE code model on the texts and writes it to `output` (a .model file).

    sentencepiece holds its sample in memory: about input_sentence_size x the average document size.
    """
    import sentencepiece as spm

    if vocab_size < 260:
        raise ValueError(f"--vocab-size {vocab_size} is too small: byte fallback alone takes 256 + 2 pieces")
    model = io.BytesIO()
    count = [0]

    def sentences():
        for text in split_long(texts, max_sentence_length):
            count[0] += 1
            yield text
        if progress and count[0]:
            sample = min(count[0], input_sentence_size or count[0])
            print(f"sentencepiece: training a {vocab_size}-piece BPE on {sample} of {count[0]} documents/pieces",
                  file=sys.stderr, flush=True)

    spm.set_random_generator_seed(seed)  # the sentence sample
    try:
        spm.SentencePieceTrainer.train(
            sentence_iterator=sentences(), model_writer=model, model_type="bpe", vocab_size=vocab_size,
            byte_fallback=True, normalization_rule_name="identity", add_dummy_prefix=False,
            remove_extra_whitespaces=False, allow_whitespace_only_pieces=True, split_digits=True,
            split_by_whitespace=True, treat_whitespace_as_suffix=False, character_coverage=character_coverage,
            unk_id=0, eos_id=1, eos_piece=ENDOFTEXT, bos_id=-1, pad_id=-1,
            input_sentence_size=input_sentence_size, shuffle_input_sentence=True,
            max_sentence_length=max_sentence_length, max_sentencepiece_length=16,
            num_threads=num_threads or os.cpu_count() or 1, hard_vocab_limit=True,
            minloglevel=0 if verbose else 2,
        )
    except RuntimeError as e:
        if count[0] == 0:
            raise ValueError("no documents to train on: the inputs hold no text") from None
        raise ValueError(f"sentencepiece training failed: {e}") from None
    if count[0] == 0:
        raise ValueError("no documents to train on: the inputs hold no text")
    _atomic_write(output, model.getvalue())
    return output


def train_huggingface_bpe(texts, output_dir: str, vocab_size: int, min_frequency: int = 2,
                          model_max_length: int = 2048, progress: bool = True) -> str:
    """Trains a byte-level BPE (GPT-2 style) and writes tokenizer.json + tokenizer_config.json to output_dir."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    alphabet = pre_tokenizers.ByteLevel.alphabet()
    if vocab_size < len(alphabet) + 1:
        raise ValueError(f"--vocab-size {vocab_size} is too small: byte-level BPE needs {len(alphabet) + 1}")
    tk = Tokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=min_frequency, special_tokens=[ENDOFTEXT],
                                  initial_alphabet=alphabet, show_progress=progress)
    count = [0]

    def counted():
        for text in texts:
            count[0] += 1
            yield text

    tk.train_from_iterator(counted(), trainer=trainer)
    if count[0] == 0:
        raise ValueError("no documents to train on: the inputs hold no text")
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "eos_token": ENDOFTEXT, "bos_token": ENDOFTEXT,
              "unk_token": ENDOFTEXT, "model_max_length": model_max_length}
    # tokenizer.json last: a folder without it is not a tokenizer, so an interrupted run never looks complete.
    _atomic_write(os.path.join(output_dir, "tokenizer_config.json"), (json.dumps(config, indent=2) + "\n").encode())
    _atomic_write(os.path.join(output_dir, "tokenizer.json"), tk.to_str().encode("utf-8"))
    return output_dir
