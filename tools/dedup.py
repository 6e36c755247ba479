"""Remove exact and near-duplicate documents (MinHash LSH), keeping the first of each cluster in input order.

Stages (--stage all, or one at a time, e.g. on different machines sharing --workdir): signatures, buckets,
clusters, filter. Every stage resumes where it stopped; under `mpiexec -n N` the ranks share the work.

  tools/dedup.py --input corpus.jsonl --output dedup.jsonl --report removed.jsonl --workers 8
"""

import argparse
import json
import sys

from megaphi.curate.cli import add_stage_args, run_tool
from megaphi.curate.dedup import STAGES, DedupConfig, run_dedup
from megaphi.curate.stage import mpi_world


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workdir", default="", help="stage files (default: OUTPUT.dedup)")
    p.add_argument("--stage", default="all", choices=("all",) + STAGES)
    p.add_argument("--threshold", type=float, default=0.7, help="estimated Jaccard similarity of near duplicates")
    p.add_argument("--num-perm", type=int, default=256, help="MinHash permutations")
    p.add_argument("--ngram", type=int, default=5, help="words per shingle")
    p.add_argument("--seed", type=int, default=1, help="MinHash permutation seed")
    p.add_argument("--bands", type=int, default=0, help="LSH bands (default: chosen from --threshold)")
    p.add_argument("--rows", type=int, default=0, help="rows per band (with --bands)")
    p.add_argument("--partitions", type=int, default=16, help="bucket partitions (each is held in memory once)")
    p.add_argument("--no-verify", action="store_true", help="take every band collision as a duplicate")
    add_stage_args(p)
    return p.parse_args(argv)


def run(args) -> None:
    cfg = DedupConfig(
        inputs=args.input, output=args.output, workdir=args.workdir, threshold=args.threshold,
        num_perm=args.num_perm, ngram=args.ngram, seed=args.seed, bands=args.bands, rows=args.rows,
        partitions=args.partitions, verify=not args.no_verify, text_key=args.text_key,
        extensions=tuple(args.extensions or ()), workers=args.workers, report=args.report or "",
        resume=not args.no_resume, progress=not args.quiet, chunk_bytes=args.chunk_bytes,
        keep_dropped=args.keep_dropped)
    result = run_dedup(cfg, args.stage)
    if mpi_world()[0] == 0:
        if args.stage in ("all", "signatures"):
            print(f"MinHash: {cfg.num_perm} permutations, {cfg.ngram}-word shingles, {cfg.bands} bands x "
                  f"{cfg.rows} rows (threshold {cfg.threshold})")
        for name in STAGES:
            if name in result:
                print(f"{name:>10}: " + json.dumps(result[name]))
        if "summary" in result:
            print(result["summary"].format())


def main(argv=None) -> int:
    return run_tool(run, parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
