"""Merge Megatron indexed datasets (.bin/.idx pairs) into one, in order (like Megatron-LM's merge_datasets.py)."""

import argparse
import os
import sys

from megaphi.data.indexed_dataset import merge_datasets


def dataset_prefixes(inputs, output_prefix: str = "") -> list[str]:
    """Each input as a prefix; a folder stands for every .idx/.bin pair in it, sorted by name, except the output
    (a rerun into the same folder must not merge the last run's output again)."""
    prefixes = []
    output = os.path.realpath(output_prefix) if output_prefix else None
    for item in inputs:
        if os.path.isdir(item):
            names = sorted(n[: -len(".idx")] for n in os.listdir(item) if n.endswith(".idx"))
            names = [n for n in names if os.path.realpath(os.path.join(item, n)) != output]
            if not names:
                raise ValueError(f"--input {item}: folder holds no .idx files")
            prefixes.extend(os.path.join(item, n) for n in names)
        else:
            prefixes.append(item[: -len(".idx")] if item.endswith((".idx", ".bin")) else item)
    return prefixes


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--input", nargs="+", required=True, help="dataset prefixes, or a folder of datasets")
    p.add_argument("--output-prefix", required=True, help="writes {prefix}.bin/.idx")
    args = p.parse_args(argv)
    try:
        ds = merge_datasets(dataset_prefixes(args.input, args.output_prefix), args.output_prefix)
    except (ValueError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(f"merged {ds.num_documents:,} documents, {len(ds):,} sequences, {ds.num_tokens:,} tokens -> {ds.prefix}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
