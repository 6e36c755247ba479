"""megaphi's Triton and CUDA kernels against the best plain-PyTorch path: correctness in bf16, then speed and memory.

    python benchmarks/kernels.py                                  # a GPU: phi-1 shapes, every op, a table
    python benchmarks/kernels.py --output benchmarks/results/kernels-h100.md   # also a markdown (or .json) file
    python benchmarks/kernels.py --attention-variants             # also time the attention module's settings
    python benchmarks/kernels.py --backends cuda --ops mlp,rotary # only the CUDA kernels, only these ops
    python benchmarks/kernels.py --smoke                          # no GPU: tiny fp32 shapes in the interpreter
    bash benchmarks/run_gpu_checks.sh                             # the GPU tests, then this, into benchmarks/results

First each op runs at --check-batch on the same inputs through the fused kernel and the reference, both in --dtype,
and both are compared with the reference on fp32 copies: the report gives the fused kernel's relative error
(||a - b|| / ||b||, worst of the output and the input gradients) against the bf16 reference and against fp32, and
the bf16 reference's own error against fp32. Then forward+backward is timed with CUDA events (median of --iters)
at --batch, against the plain-PyTorch path: SDPA (flash backend) after a separate rotary; F.linear +
F.gelu(approximate="tanh"); adds + F.layer_norm; F.linear + F.cross_entropy on fp32 logits (the reference's
numerics). Peak memory is what the step allocates beyond its inputs. An op that raises is reported in its row and
the others still run; the exit status is 1 when an op failed or was less accurate than the reference allows.
Each op runs once per backend in --backends that has it: Triton rows are named by the op, CUDA rows "op (cuda)". The
"rotary" op (CUDA only) rotates q and k of a packed QKV projection (batch, seq, 3 x hidden) into the attention
layout, against the reference's rotary on views of it; the CUDA "attention" is that kernel followed by SDPA.
"""

import argparse
import contextlib
import datetime
import json
import os
import statistics
import sys
import time
import traceback
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # megaphi from this checkout, installed or not

OPS = ["attention", "mlp", "layer_norm", "cross_entropy", "rotary"]
BACKENDS = ["triton", "cuda"]
# Speedup over plain PyTorch each backend's op must reach (issues 5 and 6); ops without one are reported only.
TARGETS = {"triton": {"attention": 1.15, "mlp": 1.1, "layer_norm": 1.3, "cross_entropy": 1.0},
           "cuda": {"mlp": 1.15, "layer_norm": 1.3, "rotary": 3.0}}
MEMORY_TARGETS = {"cross_entropy": 0.25}  # fused peak / baseline peak at most


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--ops", default=",".join(OPS), help="comma-separated ops to run")
    p.add_argument("--backends", default=",".join(BACKENDS),
                   help="comma-separated fused backends to time (those not available here are skipped, and said so)")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seq", type=int, default=2048)
    p.add_argument("--heads", type=int, default=32)
    p.add_argument("--head-dim", type=int, default=64)
    p.add_argument("--rotary-dim", type=int, default=32)
    p.add_argument("--ffn", type=int, default=8192)
    p.add_argument("--vocab", type=int, default=51200)
    p.add_argument("--dtype", choices=["bf16", "fp16"], default="bf16")
    p.add_argument("--check-batch", type=int, default=1, help="batch of the correctness pass")
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--iters", type=int, default=20)
    p.add_argument("--attention-variants", action="store_true",
                   help="also time each ROTARY_K x UNROTATE setting of megaphi.kernels.triton.attention")
    p.add_argument("--output", help="write the results here: .json for JSON, anything else markdown")
    p.add_argument("--smoke", action="store_true", help="tiny fp32 shapes on CPU in the Triton interpreter")
    args = p.parse_args(argv)
    unknown = set(args.ops.split(",")) - set(OPS)
    if unknown:
        p.error(f"--ops: unknown op(s) {sorted(unknown)}; choose from {OPS}")
    unknown = set(args.backends.split(",")) - set(BACKENDS)
    if unknown:
        p.error(f"--backends: unknown backend(s) {sorted(unknown)}; choose from {BACKENDS}")
    if args.smoke:
        args.batch, args.check_batch, args.seq, args.heads, args.head_dim, args.rotary_dim = 2, 1, 16, 2, 32, 16
        args.ffn, args.vocab, args.warmup, args.iters = 96, 300, 1, 2
    return args


def make_cases(args, torch, reference, tk, backend="triton"):
    """{op: (inputs(batch, dtype) -> tensors, fused, baseline, flops(batch), bytes(batch))} for the chosen ops that
    backend module tk has."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    s, h, d, ffn, vocab = args.seq, args.heads, args.head_dim, args.ffn, args.vocab
    hidden = h * d
    dev = "cpu" if args.smoke else "cuda"

    def leaf(*shape, dtype, scale=1.0, shift=0.0):
        return (torch.randn(shape, device=dev) * scale + shift).to(dtype).requires_grad_()

    def attention_inputs(b, dtype):
        return [leaf(b, s, h, d, dtype=dtype) for _ in range(3)]

    def attention_baseline(q, k, v):
        if args.smoke or q.dtype == torch.float32:  # the fp32 ground truth: flash takes only 16-bit inputs
            return reference.rotary_attention(q, k, v, args.rotary_dim)
        with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
            return reference.rotary_attention(q, k, v, args.rotary_dim)

    def mlp_inputs(b, dtype):
        return [leaf(b, s, hidden, dtype=dtype), leaf(ffn, hidden, dtype=dtype, scale=hidden**-0.5),
                leaf(ffn, dtype=dtype, scale=0.02), leaf(hidden, ffn, dtype=dtype, scale=ffn**-0.5),
                leaf(hidden, dtype=dtype, scale=0.02)]

    def ln_inputs(b, dtype):
        return [leaf(b, s, hidden, dtype=dtype) for _ in range(3)] + [leaf(hidden, dtype=dtype, scale=0.1, shift=1.0),
                                                                       leaf(hidden, dtype=dtype, scale=0.1)]

    labels = {}

    def ce_inputs(b, dtype):
        labels[b] = torch.randint(0, vocab, (b, s), device=dev)
        labels[b][:, : s // 8] = -100
        return [leaf(b, s, hidden, dtype=dtype), leaf(vocab, hidden, dtype=dtype, scale=hidden**-0.5),
                leaf(vocab, dtype=dtype, scale=0.02)]

    def ce(fn):
        return lambda x, w, bias: fn(x, w, bias, labels[x.shape[0]])

    def rotary_inputs(b, dtype):
        return [leaf(b, s, 3 * hidden, dtype=dtype)]

    def rotary_baseline(qkv):  # views of the packed projection, rotated by the reference into new tensors
        q, k, v = qkv.unflatten(-1, (3, h, d)).unbind(2)
        return reference.apply_rotary(q, args.rotary_dim), reference.apply_rotary(k, args.rotary_dim), v.contiguous()

    # op -> (the backend's function it needs, the case); an op whose function the backend lacks is skipped.
    cases = {
        "attention": ("rotary_attention", lambda: (
            attention_inputs, lambda q, k, v: tk.rotary_attention(q, k, v, args.rotary_dim), attention_baseline,
            lambda b: 3.5 * 2 * b * h * s * s * d, None)),
        "mlp": ("mlp", lambda: (mlp_inputs, tk.mlp, reference.mlp, lambda b: 12 * b * s * hidden * ffn, None)),
        "layer_norm": ("layer_norm", lambda: (
            ln_inputs, lambda x, a, m, w, bias: tk.layer_norm(x, w, bias, 1e-5, (a, m)),
            lambda x, a, m, w, bias: reference.layer_norm(x, w, bias, 1e-5, (a, m)), None,
            lambda b, e: 9 * b * s * hidden * e)),  # fwd: 3 reads, 2 writes; bwd: 3 reads, 1 write
        "cross_entropy": ("linear_cross_entropy", lambda: (
            ce_inputs, ce(tk.linear_cross_entropy), ce(reference.linear_cross_entropy),
            lambda b: 6 * b * s * hidden * vocab, None)),
        "rotary": ("rotary_qkv", lambda: (
            rotary_inputs, lambda qkv: tk.rotary_qkv(qkv, h, args.rotary_dim), rotary_baseline, None,
            lambda b, e: 12 * b * s * hidden * e)),  # fwd: qkv read, q, k, v written; bwd: the same
    }
    chosen = {}
    for op in args.ops.split(","):
        function, case = cases[op]
        if getattr(tk, function, None) is None:
            print(f"{op}: megaphi.kernels.{backend} has no {function}; skipped")
        else:
            chosen[op] = case()
    return chosen


def forward_backward(torch, fn, inputs, cotangents=None):
    """fn(*inputs) and the gradients of the inputs (grad, not backward: nothing accumulates between runs)."""
    out = fn(*inputs)
    out = out if isinstance(out, tuple) else (out,)
    if cotangents is None:
        cotangents = [torch.randn_like(o) for o in out]
    grads = torch.autograd.grad(out, inputs, [c.to(o.dtype) for c, o in zip(cotangents, out)])
    return list(out) + list(grads), cotangents


def rel_error(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm().clamp(min=1e-30)).item()


def check(torch, fused, baseline, inputs):
    """Worst relative errors: fused vs reference (same dtype), fused vs fp32 reference, reference vs fp32."""
    exact = [t.detach().float().requires_grad_() for t in inputs]
    truth, cot = forward_backward(torch, baseline, exact)
    ref, _ = forward_backward(torch, baseline, inputs, cot)
    out, _ = forward_backward(torch, fused, inputs, cot)
    return (max(rel_error(a, r) for a, r in zip(out, ref)), max(rel_error(a, t) for a, t in zip(out, truth)),
            max(rel_error(r, t) for r, t in zip(ref, truth)))


def time_step(torch, fn, inputs, warmup, iters, smoke):
    """(median ms of forward+backward, peak MiB allocated by one step beyond its inputs)."""
    cot = forward_backward(torch, fn, inputs)[1]
    for _ in range(warmup):
        forward_backward(torch, fn, inputs, cot)
    times = []
    if smoke:
        for _ in range(iters):
            start = time.perf_counter()
            forward_backward(torch, fn, inputs, cot)
            times.append((time.perf_counter() - start) * 1e3)
        return statistics.median(times), float("nan")
    for _ in range(iters):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        forward_backward(torch, fn, inputs, cot)
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    forward_backward(torch, fn, inputs, cot)
    torch.cuda.synchronize()
    return statistics.median(times), (torch.cuda.max_memory_allocated() - base) / 2**20


def run_op_safely(torch, args, op, case, dtype, target=None):
    """run_op's row, or {"op": op, "error": ...} after printing the traceback: one op's failure stops no other."""
    try:
        return run_op(torch, args, op, case, dtype, target)
    except Exception as e:  # noqa: BLE001 (compile errors, OOM, a missing SDPA backend: report and go on)
        traceback.print_exc()
        if not args.smoke:
            with contextlib.suppress(RuntimeError):  # after a sticky CUDA error the next ops fail and say so too
                torch.cuda.synchronize()
                torch.cuda.empty_cache()
        return {"op": op, "error": f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"[:300]}


def run_op(torch, args, op, case, dtype, target=None):
    """The row of one op: errors against the reference, then time and peak memory of fused and baseline steps."""
    make_inputs, fused, baseline, flops, nbytes = case
    row = {"op": op}
    torch.manual_seed(0)
    row["err_vs_ref"], row["err_vs_fp32"], row["ref_err_vs_fp32"] = check(torch, fused, baseline,
                                                                          make_inputs(args.check_batch, dtype))
    row["accurate"] = row["err_vs_fp32"] <= 2 * row["ref_err_vs_fp32"] + 1e-3
    inputs = make_inputs(args.batch, dtype)
    for name, fn in (("fused", fused), ("baseline", baseline)):
        row[f"{name}_ms"], row[f"{name}_peak_mib"] = time_step(torch, fn, inputs, args.warmup, args.iters, args.smoke)
        if flops is not None:
            row[f"{name}_tflops"] = flops(args.batch) / row[f"{name}_ms"] / 1e9
        if nbytes is not None:
            row[f"{name}_gbps"] = nbytes(args.batch, inputs[0].element_size()) / row[f"{name}_ms"] / 1e6
    del inputs
    row["speedup"] = row["baseline_ms"] / row["fused_ms"]
    row["memory_ratio"] = row["fused_peak_mib"] / row["baseline_peak_mib"] if row["baseline_peak_mib"] else None
    if target is not None and not args.smoke:
        row["target"] = target
        row["meets_target"] = row["speedup"] >= target and (
            op not in MEMORY_TARGETS or (row["memory_ratio"] or 0) <= MEMORY_TARGETS[op])
    return row


def attention_variant_rows(torch, args, case, dtype):
    """The attention case once per ROTARY_K x UNROTATE setting of the attention module."""
    import importlib

    attention = importlib.import_module("megaphi.kernels.triton.attention")
    if not (hasattr(attention, "ROTARY_K") and hasattr(attention, "UNROTATE")):
        return []
    rows, saved = [], (attention.ROTARY_K, attention.UNROTATE)
    try:
        for rotary_k in ("prepass", "inloop"):
            for unrotate in ("epilogue", "postpass"):
                attention.ROTARY_K, attention.UNROTATE = rotary_k, unrotate
                rows.append(run_op_safely(torch, args, f"attention[{rotary_k},{unrotate}]", case, dtype))
    finally:
        attention.ROTARY_K, attention.UNROTATE = saved
    return rows


def fmt(value, spec=".2f"):
    return "-" if value is None or value != value else format(value, spec)


def table(rows):
    lines = ["| op | fused ms | PyTorch ms | speedup (target) | TFLOP/s fused / PyTorch | GB/s fused / PyTorch | "
             "peak MiB fused / PyTorch | rel err vs ref / vs fp32 (ref's own) |", "|" + "---|" * 8]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['op']} | FAILED: {r['error'].replace('|', '/')} |" + " |" * 6)
            continue
        target = f" (≥{r['target']}{'' if r['meets_target'] else ' MISSED'})" if "target" in r else ""
        lines.append(
            f"| {r['op']} | {fmt(r['fused_ms'], '.3f')} | {fmt(r['baseline_ms'], '.3f')} | "
            f"{r['speedup']:.2f}x{target} | "
            f"{fmt(r.get('fused_tflops'), '.0f')} / {fmt(r.get('baseline_tflops'), '.0f')} | "
            f"{fmt(r.get('fused_gbps'), '.0f')} / {fmt(r.get('baseline_gbps'), '.0f')} | "
            f"{fmt(r['fused_peak_mib'], '.0f')} / {fmt(r['baseline_peak_mib'], '.0f')} | "
            f"{r['err_vs_ref']:.2e} / {r['err_vs_fp32']:.2e} ({r['ref_err_vs_fp32']:.2e})"
            f"{'' if r['accurate'] else ' INACCURATE'} |")
    return "\n".join(lines)


def main(argv=None):
    args = parse_args(argv)
    if args.smoke:
        os.environ["TRITON_INTERPRET"] = "1"  # before triton is imported
    import torch

    if not args.smoke and not torch.cuda.is_available():
        print("benchmarks/kernels.py needs a CUDA GPU (torch.cuda.is_available() is False); nothing measured. "
              "Run with --smoke for a tiny correctness pass through the Triton interpreter on CPU.")
        return 0
    import importlib

    from megaphi import kernels
    from megaphi.kernels import reference

    # --smoke runs in the Triton interpreter, which the CUDA kernels have no counterpart of.
    wanted = ["triton"] if args.smoke else args.backends.split(",")
    status = kernels.backend_status()
    for name in wanted:
        if status[name] != "available":
            print(f"the {name} backend is not available: {status[name]}")
    backends = [name for name in wanted if status[name] == "available"]
    if not backends:
        return 1

    dtype = torch.float32 if args.smoke else {"bf16": torch.bfloat16, "fp16": torch.float16}[args.dtype]
    rows = []
    for backend in backends:
        module = importlib.import_module(f"megaphi.kernels.{backend}")
        for op, case in make_cases(args, torch, reference, module, backend).items():
            label = op if backend == "triton" else f"{op} ({backend})"
            rows.append(run_op_safely(torch, args, label, case, dtype, TARGETS[backend].get(op)))
            print(table(rows[-1:]).splitlines()[-1], flush=True)
            if op == "attention" and backend == "triton" and args.attention_variants:
                rows += attention_variant_rows(torch, args, case, dtype)
    failed = [r["op"] for r in rows if "error" in r]
    inaccurate = [r["op"] for r in rows if not r.get("accurate", True)]
    missed = [r["op"] for r in rows if r.get("meets_target") is False]
    triton = sys.modules.get("triton")
    device = "CPU (Triton interpreter)" if args.smoke else torch.cuda.get_device_name()
    meta = {"date": datetime.date.today().isoformat(), "device": device, "torch": torch.__version__,
            "triton": triton.__version__ if triton else "not used", "backends": backends,
            "command": "python " + " ".join(sys.argv),
            "dtype": "fp32" if args.smoke else args.dtype,
            "shapes": {k: getattr(args, k) for k in ("batch", "seq", "heads", "head_dim", "rotary_dim", "ffn",
                                                      "vocab", "check_batch")}}
    text = (f"# Kernel benchmark, {meta['date']}, {device}\n\n`{meta['command']}`: torch {meta['torch']}, triton "
            f"{meta['triton']}, {meta['dtype']}, shapes {meta['shapes']}; median of {args.iters} fwd+bwd steps."
            f"{' Interpreter times mean nothing: this checks that every kernel runs.' if args.smoke else ''}\n\n"
            f"{table(rows)}\n\nFailed: {failed or 'none'}; inaccurate: {inaccurate or 'none'}; "
            f"missed targets: {missed or 'none'}.\n")
    print("\n" + text)
    if args.output:
        os.makedirs(os.path.dirname(os.path.abspath(args.output)), exist_ok=True)
        with open(args.output, "w") as f:
            if args.output.endswith(".json"):
                json.dump({"meta": meta, "rows": rows}, f, indent=1)
            else:
                f.write(text)
        print(f"wrote {args.output}")
    return 1 if failed or inaccurate else 0


if __name__ == "__main__":
    sys.exit(main())
