"""Tokenize jsonl (plain, gzip, globs), parquet or source trees into Megatron .bin/.idx datasets.

A drop-in for Megatron-LM's tools/preprocess_data.py (same flags, byte-identical output), plus parquet and
source-tree input, per-line error reporting, --strict, and multi-node runs under `mpiexec -n N`.
"""

import argparse
import signal
import sys

from megaphi.data.preprocess import PreprocessConfig, mpi_rank, preprocess

TOKENIZER_TYPES = ["GPTSentencePieceTokenizer", "HuggingFaceTokenizer", "sentencepiece", "huggingface"]


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    g = p.add_argument_group("input data")
    g.add_argument("--input", nargs="+", required=True,
                   help="jsonl / .jsonl.gz / .parquet files, glob patterns, or source folders (with --extensions)")
    g.add_argument("--json-keys", nargs="+", default=["text"],
                   help="keys (parquet columns) to tokenize; one output pair per key (default: text)")
    g.add_argument("--extensions", nargs="+", default=[],
                   help="source files to take from folder inputs, one document per file (e.g. .py); an input file "
                        "named with one of these endings is one document too")
    g.add_argument("--strict", action="store_true", help="fail on the first malformed record instead of skipping it")
    g = p.add_argument_group("tokenizer")
    g.add_argument("--tokenizer-type", required=True, choices=TOKENIZER_TYPES)
    g.add_argument("--tokenizer-model", required=True, help="sentencepiece .model, or folder with tokenizer.json")
    g.add_argument("--append-eod", action="store_true", help="append the end-of-document token to each document")
    g = p.add_argument_group("output data")
    g.add_argument("--output-prefix", required=True, help="writes {prefix}_{key}_document.bin/.idx")
    g = p.add_argument_group("runtime")
    g.add_argument("--workers", type=int, default=1, help="tokenizer processes (per rank under mpiexec)")
    g.add_argument("--log-interval", type=int, default=1000, help="documents between progress-rate updates")
    g.add_argument("--chunk-bytes", type=int, default=None, help="input bytes per task (default: from input size)")
    g.add_argument("--quiet", action="store_true", help="no progress bar")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # unwind, so temporary files are removed
    cfg = PreprocessConfig(
        inputs=args.input, output_prefix=args.output_prefix, tokenizer_type=args.tokenizer_type,
        tokenizer_model=args.tokenizer_model, json_keys=tuple(args.json_keys), append_eod=args.append_eod,
        workers=args.workers, log_interval=args.log_interval, extensions=tuple(args.extensions),
        strict=args.strict, chunk_bytes=args.chunk_bytes, progress=not args.quiet,
    )
    try:
        summary = preprocess(cfg)
    except (ValueError, OSError, RuntimeError) as e:  # RuntimeError: a worker died or failed
        if mpi_rank() == 0:
            print(f"error: {e}", file=sys.stderr)
        return 1
    if mpi_rank() == 0:
        print(summary.report())
    return 0


if __name__ == "__main__":
    sys.exit(main())
