"""Training throughput of megaphi's PhiForCausalLM against transformers' PhiForCausalLM, same config and weights.

    .venv/bin/python benchmarks/bench_train_vs_hf.py                    # CPU: demo preset, ours vs HF, ratio
    .venv/bin/python benchmarks/bench_train_vs_hf.py --gpu-presets phi-1-small,phi-1   # on a GPU (the default there)

CPU: both models train on the same batch with torch AdamW from the same weights; timed iterations alternate between
them, and the median iteration time gives tokens/s. GPU: each preset in bf16 autocast with fused
AdamW, one model at a time, reporting tokens/s, model TFLOP/s (megaphi.model.flops) and MFU against the card's peak.
"""

import argparse
import gc
import statistics
import time

import torch

from megaphi.model import PhiForCausalLM, flops_per_token, get_preset, peak_tflops


DEFAULT_GPU_BATCH = {"phi-1": 4}  # micro batch per preset on a GPU when --gpu-batch-size is not given; else 8


def hf_phi(config):
    """transformers' PhiForCausalLM with the shape of a megaphi ModelConfig (SDPA attention)."""
    from transformers import PhiConfig
    from transformers import PhiForCausalLM as HFPhi

    return HFPhi(PhiConfig(**config.to_hf_config(), use_cache=False, attn_implementation="sdpa"))


def make_step(model, optimizer, ids, is_hf, autocast_dtype=None):
    """A closure running one training iteration (forward, backward, AdamW step) and returning the loss."""
    inputs, labels = ids[:, :-1], ids[:, 1:].contiguous()
    device_type = ids.device.type

    def step():
        with torch.autocast(device_type, dtype=autocast_dtype or torch.bfloat16, enabled=autocast_dtype is not None):
            if is_hf:  # shift_labels: the labels are already the next tokens, as in megaphi
                loss = model(input_ids=inputs, labels=labels, shift_labels=labels).loss
            else:
                loss = model(inputs, labels=labels)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss

    return step


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(step, iters, device):
    """Seconds for iters calls of step."""
    sync(device)
    start = time.perf_counter()
    for _ in range(iters):
        loss = step()
    loss.item()
    sync(device)
    return time.perf_counter() - start


def bench_cpu(args):
    """Ours vs transformers on the CPU, alternating rounds; prints tokens/s of each and the ratio."""
    config = get_preset(args.preset)
    seq = args.seq_length or config.max_position_embeddings
    torch.manual_seed(args.seed)
    ours = PhiForCausalLM(config)
    hf = hf_phi(config)
    hf.load_state_dict(ours.state_dict(), strict=True)
    ids = torch.randint(0, config.vocab_size, (args.batch_size, seq + 1))
    steps = {}
    for name, model, is_hf in (("megaphi", ours, False), ("transformers", hf, True)):
        model.train()
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.1)
        steps[name] = make_step(model, optimizer, ids, is_hf)
    print(f"CPU, {torch.get_num_threads()} threads, torch {torch.__version__}; preset {args.preset} "
          f"({ours.num_parameters() / 1e6:.1f}M params), batch {args.batch_size} x {seq} tokens, AdamW")
    first = {name: step().item() for name, step in steps.items()}
    print("first-step loss: " + ", ".join(f"{n} {v:.6f}" for n, v in first.items()))
    for _ in range(args.warmup - 1):
        for step in steps.values():
            step()
    # One iteration of each per round, in alternating order, so load from other processes hits both alike;
    # the median iteration time is robust to the rounds that such load spoils.
    wall, cpu = {name: [] for name in steps}, {name: [] for name in steps}
    for r in range(args.rounds):
        for name in (list(steps) if r % 2 == 0 else list(reversed(steps))):
            start_cpu = time.thread_time()
            wall[name].append(timed(steps[name], 1, torch.device("cpu")))
            cpu[name].append(time.thread_time() - start_cpu)
    tokens = args.batch_size * seq
    rate = {name: tokens / statistics.median(t) for name, t in wall.items()}
    for name, tps in rate.items():
        print(f"{name:>13}: {tps:10.1f} tokens/s  (median {statistics.median(wall[name]) * 1e3:.1f} ms/iter, "
              f"min {min(wall[name]) * 1e3:.1f}, max {max(wall[name]) * 1e3:.1f} over {args.rounds})")
    print(f"ratio megaphi / transformers (wall clock): {rate['megaphi'] / rate['transformers']:.3f}")
    if torch.get_num_threads() == 1:
        # With one thread all the work runs on this thread, so its CPU time ignores time lost to other processes.
        cpu_rate = {name: tokens / statistics.median(t) for name, t in cpu.items()}
        print("CPU-time tokens/s: " + ", ".join(f"{n} {v:.1f}" for n, v in cpu_rate.items())
              + f"; ratio {cpu_rate['megaphi'] / cpu_rate['transformers']:.3f}")


def bench_accelerator(args, device, presets):
    """Each preset in bf16 autocast: tokens/s, TFLOP/s and MFU, for megaphi and then transformers."""
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else str(device)
    peak = args.peak_tflops or peak_tflops(name)
    print(f"{name}: bf16 peak {peak or 'unknown'} TFLOP/s (dense); torch {torch.__version__}")
    for preset in presets:
        config = get_preset(preset)
        seq = args.seq_length or config.max_position_embeddings
        batch = args.gpu_batch_size or DEFAULT_GPU_BATCH.get(preset, 8)
        ids = torch.randint(0, config.vocab_size, (batch, seq + 1), device=device)
        rates = {}
        for impl in ("megaphi", "transformers"):
            if device.type == "cuda":
                torch.cuda.empty_cache()
                torch.cuda.reset_peak_memory_stats(device)
            torch.manual_seed(args.seed)
            with device:  # initialise on the device: a 1.4B model is slow to initialise on the CPU
                model = (PhiForCausalLM(config) if impl == "megaphi" else hf_phi(config)).train()
            if args.recompute:
                if impl == "megaphi":
                    model.set_activation_checkpointing(True)
                else:
                    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
            optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.1, fused=device.type == "cuda")
            step = make_step(model, optimizer, ids, impl == "transformers", autocast_dtype=torch.bfloat16)
            try:
                timed(step, args.warmup, device)
                seconds = timed(step, args.iters, device)
            except torch.OutOfMemoryError:
                print(f"{preset:>12} {impl:>13}: out of memory at batch {batch} x {seq} (try --gpu-batch-size or "
                      "--recompute)")
                seconds = None
            if seconds is not None:
                tps = batch * seq * args.iters / seconds
                tflops = tps * flops_per_token(config, seq) / 1e12
                mfu = f"{100 * tflops / peak:5.1f}%" if peak else "n/a"
                mem = f"{torch.cuda.max_memory_allocated(device) / 2**30:.1f} GiB" if device.type == "cuda" else "n/a"
                print(f"{preset:>12} {impl:>13}: batch {batch} x {seq}: {tps:10.0f} tokens/s  "
                      f"{tflops:7.1f} TFLOP/s  MFU {mfu}  peak mem {mem}")
                rates[impl] = tps
            del model, optimizer, step
            gc.collect()
        if len(rates) == 2:
            print(f"{preset:>12} ratio megaphi / transformers: {rates['megaphi'] / rates['transformers']:.3f}")


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="demo", help="CPU comparison preset")
    parser.add_argument("--batch-size", type=int, default=8, help="CPU micro batch")
    parser.add_argument("--seq-length", type=int, default=None, help="default: the preset's max positions")
    parser.add_argument("--warmup", type=int, default=2, help="untimed iterations per model first")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--rounds", type=int, default=10, help="CPU: timed rounds of one iteration per model")
    parser.add_argument("--iters", type=int, default=10, help="timed iterations per preset on --device")
    parser.add_argument("--seed", type=int, default=1234)
    parser.add_argument("--device", default=None, help="device of the preset runs (default: cuda when available)")
    parser.add_argument("--gpu-presets", default=None,
                        help="comma-separated presets timed in bf16 on --device (default: phi-1-small,phi-1 on a GPU, "
                             "none on the CPU; e.g. '--device cpu --gpu-presets tiny' tries the path on a CPU)")
    parser.add_argument("--gpu-batch-size", type=int, default=None, help="default 4 for phi-1, else 8")
    parser.add_argument("--recompute", action="store_true", help="activation checkpointing in the preset runs")
    parser.add_argument("--peak-tflops", type=float, default=None, help="override the card's bf16 peak for MFU")
    parser.add_argument("--skip-cpu", action="store_true", help="skip the CPU comparison")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if not args.skip_cpu:
        bench_cpu(args)
    presets = args.gpu_presets
    if presets is None:
        presets = "phi-1-small,phi-1" if device.type == "cuda" else ""
    if presets:
        bench_accelerator(args, device, presets.split(","))

if __name__ == "__main__":
    main()
