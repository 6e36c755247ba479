"""Draws loss (train and validation) and throughput curves from a training run's metrics.jsonl to PNG files."""

import argparse
import sys

from megaphi.train.plots import plot_metrics


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("metrics", help="metrics.jsonl written by training (in --save or --log-dir)")
    parser.add_argument("--output", required=True, help="folder for loss.png and throughput.png")
    args = parser.parse_args()
    try:
        paths = plot_metrics(args.metrics, args.output)
    except ValueError as e:
        sys.exit(f"error: {e}")
    for path in paths:
        print(f"wrote {path}")


if __name__ == "__main__":
    main()
