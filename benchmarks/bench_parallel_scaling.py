"""Training throughput at several parallel layouts against one process, in the same run.

    python benchmarks/bench_parallel_scaling.py                       # CPU: gloo, the demo preset
    python benchmarks/bench_parallel_scaling.py --nproc 8 --preset phi-1-small --bf16 --seq-length 2048 ...  # GPUs

Each layout runs examples/pretrain_phi1.py under torchrun on random token data and reports the median tokens/s of
its logged iterations after the first few (warm-up). On one machine with fewer devices than processes (a CPU, or a
single GPU) the processes share the hardware, so this shows the communication overhead rather than a speed-up.
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from megaphi.data.indexed_dataset import IndexedDatasetBuilder  # noqa: E402


def write_data(prefix: Path, tokens: int, vocab: int) -> None:
    """Random documents of 50 to 2000 tokens, ids below vocab."""
    rng = np.random.default_rng(0)
    with IndexedDatasetBuilder(prefix, dtype=np.uint16 if vocab < 65536 else np.int32) as builder:
        written = 0
        while written < tokens:
            doc = rng.integers(0, vocab, size=int(rng.integers(50, 2000)))
            builder.add_document([doc])
            written += doc.size


def layouts(nproc: int) -> dict[str, tuple[int, list[str]]]:
    """Layout name -> (processes, flags)."""
    found = {"1 process": (1, [])}
    if nproc >= 2:
        found[f"DP {nproc}"] = (nproc, [])
        found[f"DP {nproc} + ZeRO-1"] = (nproc, ["--use-distributed-optimizer"])
        found[f"TP {min(nproc, 4)}" + (f" × DP {nproc // min(nproc, 4)}" if nproc > 4 else "")] = (
            nproc, ["--tensor-model-parallel-size", str(min(nproc, 4))])
        found[f"TP 2 + SP" + (f" × DP {nproc // 2}" if nproc > 2 else "")] = (
            nproc, ["--tensor-model-parallel-size", "2", "--sequence-parallel"])
    return found


def run(name: str, nproc: int, extra: list[str], common: list[str], workdir: Path, warmup: int) -> float:
    """Median tokens/s of one layout's logged iterations after warmup."""
    save = workdir / name.replace(" ", "_").replace("+", "").replace("×", "x")
    cmd = [str(Path(sys.executable).parent / "torchrun"), "--standalone", "--nproc_per_node", str(nproc),
           str(REPO / "examples" / "pretrain_phi1.py"), *common, *extra, "--save", str(save), "--save-interval", str(10**9)]
    # One thread per process, so on CPUs each layout uses one core per process (1 process: one core).
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    done = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"{name} failed:\n{done.stdout[-2000:]}\n{done.stderr[-3000:]}")
    records = [json.loads(line) for line in (save / "metrics.jsonl").read_text().splitlines() if line.strip()]
    rates = [r["tokens_per_s"] for r in records if r.get("type") == "train" and r["iteration"] > warmup]
    return statistics.median(rates)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--nproc", type=int, default=2, help="processes for the parallel layouts")
    parser.add_argument("--preset", default="demo")
    parser.add_argument("--seq-length", type=int, default=256)
    parser.add_argument("--micro-batch-size", type=int, default=4)
    parser.add_argument("--global-batch-size", type=int, default=16)
    parser.add_argument("--iters", type=int, default=12)
    parser.add_argument("--warmup", type=int, default=3, help="logged iterations left out of the median")
    parser.add_argument("--bf16", action="store_true")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        vocab = 8192 if args.preset == "demo" else 50295
        write_data(workdir / "tokens", args.iters * args.global_batch_size * (args.seq_length + 1) * 2, vocab)
        common = ["--preset", args.preset, "--vocab-size", str(vocab), "--data-path", str(workdir / "tokens"),
                  "--split", "100,0,0", "--seq-length", str(args.seq_length), "--micro-batch-size",
                  str(args.micro_batch_size), "--global-batch-size", str(args.global_batch_size), "--train-iters",
                  str(args.iters), "--eval-iters", "0", "--log-interval", "1", "--lr-warmup-iters", "1",
                  "--hidden-dropout", "0", "--attention-dropout", "0", "--bf16" if args.bf16 else "--no-bf16"]
        results = {}
        for name, (nproc, extra) in layouts(args.nproc).items():
            results[name] = run(name, nproc, extra, common, workdir, args.warmup)
            print(f"{name:<22} {results[name]:>10.0f} tokens/s  ({results[name] / results['1 process']:.2f}× one "
                  f"process)", flush=True)


if __name__ == "__main__":
    main()
