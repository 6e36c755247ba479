"""Train a code tokenizer (sentencepiece BPE .model, or HuggingFace byte-level BPE folder) from jsonl or sources.

    python tools/train_tokenizer.py --input data/*.jsonl --tokenizer-type sentencepiece \\
        --vocab-size 16000 --output code16k.model
    python tools/train_tokenizer.py --input repo/ --extensions .py --tokenizer-type huggingface \\
        --vocab-size 16000 --output code16k_hf/

Both use `<|endoftext|>` as the end-of-document token; the outputs load with
`megaphi.data.tokenizer.build_tokenizer` and tools/preprocess_data.py.
"""

import argparse
import sys

from megaphi.data.tokenizer_training import (
    CorpusStats, iter_documents, list_inputs, train_huggingface_bpe, train_sentencepiece,
)

TYPES = {"sentencepiece": "sentencepiece", "GPTSentencePieceTokenizer": "sentencepiece",
         "huggingface": "huggingface", "HuggingFaceTokenizer": "huggingface"}


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--input", nargs="+", required=True, help="jsonl files (.gz too), globs, or source folders")
    p.add_argument("--json-keys", nargs="+", default=["text"], help="jsonl keys holding the text (default: text)")
    p.add_argument("--extensions", nargs="+", default=[], help="for folders: file endings to read (e.g. .py)")
    p.add_argument("--tokenizer-type", required=True, choices=sorted(TYPES))
    p.add_argument("--vocab-size", type=int, required=True)
    p.add_argument("--output", required=True, help="the .model file (sentencepiece) or folder (huggingface)")
    g = p.add_argument_group("sentencepiece")
    g.add_argument("--input-sentence-size", type=int, default=200_000,
                   help="documents (after cutting long ones) sampled for training and held in memory; 0 = all")
    g.add_argument("--max-sentence-length", type=int, default=1 << 16,
                   help="bytes; longer documents are cut at line ends, not dropped")
    g.add_argument("--character-coverage", type=float, default=0.9999,
                   help="share of characters given their own piece; the rest use byte fallback")
    g.add_argument("--num-threads", type=int, default=None, help="default: all cores")
    g.add_argument("--seed", type=int, default=1234, help="seed of the document sample")
    g = p.add_argument_group("huggingface")
    g.add_argument("--min-frequency", type=int, default=2, help="merges seen fewer times are not learned")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.add_argument("--verbose", action="store_true", help="sentencepiece's own training log")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        inputs = list_inputs(args.input, args.extensions)
        stats = CorpusStats()
        texts = iter_documents(inputs, args.json_keys, stats, progress=not args.quiet)
        if TYPES[args.tokenizer_type] == "sentencepiece":
            train_sentencepiece(texts, args.output, args.vocab_size, args.input_sentence_size,
                                args.max_sentence_length, args.num_threads, args.seed, args.character_coverage,
                                verbose=args.verbose, progress=not args.quiet)
        else:
            train_huggingface_bpe(texts, args.output, args.vocab_size, args.min_frequency, progress=not args.quiet)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"read {len(inputs)} files: {stats.documents} documents, {stats.bytes / 1e6:.1f} MB")
    for reason, count in sorted(stats.skipped.items()):
        print(f"  skipped {count}: {reason}")
    for example in stats.examples:
        print(f"    e.g. {example}")
    print(f"wrote {args.output} (vocab size {args.vocab_size})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
