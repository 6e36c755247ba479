"""Remove records that contain HumanEval or MBPP problems: exact substrings, n-gram overlap, AST similarity.

    tools/decontaminate.py --input corpus.jsonl --output clean.jsonl --benchmarks humaneval,mbpp \\
        --report contaminated.jsonl --workers 8
    # exercises: also compare every function's canonical AST (renamed variables, reformatting) with tau = 0.9
    tools/decontaminate.py --input exercises.jsonl --output clean.jsonl --ast-threshold 0.9

Text is compared as lowercase word tokens (layout, punctuation and string prefixes ignored). The report has one
line per removed record: the rule (exact_substring, ngram_overlap, ast_similarity), the benchmark item it
matched ("matched": "HumanEval/3") and the evidence. Records keep every field; the run resumes when rerun and
shares the work among ranks under mpiexec.
"""

import argparse
import hashlib
import os
import sys

from megaphi.curate.cli import add_stage_args, run_tool
from megaphi.curate.decontaminate import DecontamConfig, Decontaminator, get_index
from megaphi.curate.stage import mpi_world, run_filter_stage


def parse_args(argv=None) -> argparse.Namespace:
    d = DecontamConfig()
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--benchmarks", default=",".join(d.benchmarks), help="comma-separated: humaneval, mbpp")
    p.add_argument("--mbpp-path", default=None, help="MBPP's mbpp.jsonl (default: shared/data/mbpp/mbpp.jsonl)")
    p.add_argument("--ngram", type=int, default=d.ngram, help="tokens per n-gram")
    p.add_argument("--min-ngram-matches", type=int, default=d.min_ngram_matches,
                   help="n-grams a record must share with one item to be removed")
    p.add_argument("--min-substring-tokens", type=int, default=d.min_substring_tokens,
                   help="shortest prompt/solution (in tokens) matched as an exact substring")
    p.add_argument("--ast-threshold", type=float, default=None,
                   help="also compare functions' canonical ASTs; remove at this similarity (e.g. 0.9; off by default)")
    p.add_argument("--ast-min-nodes", type=int, default=d.ast_min_nodes,
                   help="smallest function (AST nodes) the AST rule compares")
    add_stage_args(p)
    return p.parse_args(argv)


def run(args) -> None:
    if args.workers < 1 or args.chunk_bytes < 1:
        raise ValueError(f"--workers and --chunk-bytes must be >= 1, got {args.workers}, {args.chunk_bytes}")
    benchmarks = tuple(b.strip().lower() for b in args.benchmarks.split(",") if b.strip())
    cfg = DecontamConfig(benchmarks=benchmarks, ngram=args.ngram, min_ngram_matches=args.min_ngram_matches,
                         min_substring_tokens=args.min_substring_tokens, ast_threshold=args.ast_threshold,
                         ast_min_nodes=args.ast_min_nodes,
                         mbpp_path=os.path.abspath(args.mbpp_path) if args.mbpp_path else None)
    index = get_index(cfg)  # built here once: bad benchmark files fail now, and forked workers inherit it
    process = Decontaminator(cfg, args.text_key)
    digest = hashlib.sha256(index.ngram_hashes.tobytes()).hexdigest()[:16]  # reruns notice changed benchmarks
    summary = run_filter_stage("decontaminate", args.input, args.output, process, text_key=args.text_key,
                               workers=args.workers, report=args.report, extensions=args.extensions,
                               resume=not args.no_resume, progress=not args.quiet,
                               params={**process.params(), "index": digest}, keep_dropped=args.keep_dropped,
                               chunk_bytes=args.chunk_bytes)
    if mpi_world()[0] == 0:
        functions = f", {len(index.functions.seqs)} functions" if index.functions is not None else ""
        print(f"benchmarks: {','.join(benchmarks)} ({len(index.items)} items, {len(index.ngram_hashes):,} "
              f"{cfg.ngram}-grams, {len(index.patterns):,} substrings{functions})")
        print(summary.format())


def main(argv=None) -> int:
    return run_tool(run, parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
