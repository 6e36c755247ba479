"""Does the bucketed DP gradient all-reduce overlap the backward pass? Two gloo processes on the CPU.

Times forward+backward of a stack of linears per iteration (median over --iters, rank 0) in four modes:
  compute only     backward under no_sync(), no communication
  comm only        finish_grad_sync() alone, after a no_sync() backward: all buckets reduced back to back
  after backward   backward under no_sync(), then finish_grad_sync(): communication after the backward
  overlapped       plain backward (hooks launch each bucket as it fills), then finish_grad_sync()
and reports how much of the communication the overlapped mode hides: (after - overlapped) / comm.

    python benchmarks/bench_dp_overlap.py [--layers 8 --hidden 1024 --batch 64 --bucket-mb 4 --iters 10]
"""

import argparse
import socket
import statistics
import time
from datetime import timedelta

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from megaphi.parallel.data_parallel import build_parallel_optimizer
from megaphi.parallel.state import ParallelContext

MODES = ("compute only", "comm only", "after backward", "overlapped")


def _iteration(mode: str, model: nn.Module, opt, x: torch.Tensor) -> tuple[float, int]:
    """Seconds of one iteration of `mode` (comm only: finish_grad_sync alone), and the buckets already reduced
    when the backward returned."""
    opt.zero_grad()
    dist.barrier()
    start = time.perf_counter()
    loss = model(x).square().mean()
    if mode == "overlapped":
        loss.backward()
    else:
        with opt.no_sync():
            loss.backward()
    done = sum(b.work is not None and b.work.is_completed() for b in opt.grads.buckets)
    if mode == "comm only":
        dist.barrier()
        start = time.perf_counter()
    if mode != "compute only":
        opt.finish_grad_sync()
    return time.perf_counter() - start, done


def _worker(rank: int, port: int, args) -> None:
    torch.set_num_threads(args.threads)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2,
                            timeout=timedelta(minutes=5))
    ctx = ParallelContext(rank=rank, world_size=2, local_rank=rank, dp_size=2, dp_rank=rank,
                          dp_group=dist.new_group([0, 1]))
    torch.manual_seed(0)
    layers = []
    for _ in range(args.layers):
        layers += [nn.Linear(args.hidden, args.hidden), nn.ReLU()]
    model = nn.Sequential(*layers)
    opt = build_parallel_optimizer(model, ctx, 1e-3, 0.0, (0.9, 0.95), 1e-8, args.distributed_optimizer,
                                   args.bucket_mb)
    x = torch.randn(args.batch, args.hidden)
    runs = {mode: [] for mode in MODES}
    for i in range(args.warmup + args.iters):
        for mode in MODES:  # round-robin, so a change in the machine's load hits every mode alike
            result = _iteration(mode, model, opt, x)
            if i >= args.warmup:
                runs[mode].append(result)
    times = {mode: statistics.median(t for t, _ in runs[mode]) for mode in MODES}
    done = {mode: statistics.median(d for _, d in runs[mode]) for mode in MODES}
    if rank == 0:
        params = sum(p.numel() for p in model.parameters())
        print(f"{args.layers} x Linear({args.hidden}, {args.hidden}), batch {args.batch}: {params / 1e6:.1f}M "
              f"parameters, {params * 4 / 2**20:.0f} MB of fp32 gradients in {len(opt.grads.buckets)} buckets of "
              f"~{args.bucket_mb} MB; gloo, 2 processes x {args.threads} thread(s), "
              f"{'reduce-scatter (ZeRO-1)' if args.distributed_optimizer else 'all-reduce'}")
        for mode in MODES:
            print(f"  {mode:15s} {times[mode] * 1e3:8.1f} ms")
        print(f"  buckets fully reduced before the overlapped backward returned: {done['overlapped']:g} of "
              f"{len(opt.grads.buckets)}")
        comm = times["comm only"]
        hidden = (times["after backward"] - times["overlapped"]) / comm if comm > 0 else float("nan")
        print(f"  communication hidden behind the backward: {hidden:.0%} "
              f"(overlapped {times['overlapped'] / times['compute only']:.2f}x compute only, "
              f"after backward {times['after backward'] / times['compute only']:.2f}x)")
    dist.destroy_process_group()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--bucket-mb", type=float, default=4.0)
    parser.add_argument("--iters", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--threads", type=int, default=1, help="torch threads per process")
    parser.add_argument("--distributed-optimizer", action="store_true", help="ZeRO-1: reduce-scatter buckets")
    args = parser.parse_args()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_worker, args=(port, args), nprocs=2)


if __name__ == "__main__":
    main()
