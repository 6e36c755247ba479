"""Generate phi-1-style synthetic textbooks or exercises through any OpenAI-compatible endpoint.

    python tools/generate_synthetic.py textbook --base-url http://127.0.0.1:8000/v1 --model phi-1 \\
        --output textbooks.jsonl --num 1000 --seed 0 --concurrency 8
    OPENAI_API_KEY=... python tools/generate_synthetic.py exercises --base-url https://api.openai.com/v1 \\
        --model gpt-3.5-turbo --chat --output exercises.jsonl --num 5000 --run-tests

Prompts combine the seed lists of megaphi/curate/seeds.py (topics and subtopics, audiences, styles; function
names and constraints for exercises), reproducibly from --seed. Replies are appended to --output as they arrive
(dropped ones, with the reason, to OUTPUT.rejected.jsonl); a rerun skips what either file holds, so an
interrupted run is resumed by running the same command again. Exercises must parse and hold a function with a
docstring; --run-tests also runs their own asserts in the sandbox. The key is read from --api-key-env and
never printed. Exit status 1 on bad input or if some prompts failed after all retries (rerun to retry them),
as the other curation tools (filter_code, dedup, decontaminate).
"""

import argparse
import json
import sys


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("kind", choices=["textbook", "exercises"])
    p.add_argument("--base-url", required=True, help="the endpoint, e.g. http://127.0.0.1:8000/v1")
    p.add_argument("--model", required=True, help="the model name sent with each request")
    p.add_argument("--output", required=True, help="the jsonl file the kept records are appended to")
    p.add_argument("--num", type=int, required=True, help="how many prompts (ids 0..num-1 of this --seed)")
    p.add_argument("--seed", type=int, default=0, help="picks the prompts and the per-request sampling seeds")
    p.add_argument("--concurrency", type=int, default=8, help="requests in flight at once")
    p.add_argument("--timeout", type=float, default=120.0, help="seconds per request attempt")
    p.add_argument("--max-retries", type=int, default=6, help="retries per request (429, 5xx, timeouts, ...)")
    p.add_argument("--backoff", type=float, default=1.0, help="seconds before the first retry; doubles each time")
    p.add_argument("--max-backoff", type=float, default=60.0, help="the longest wait between retries (seconds)")
    p.add_argument("--api-key-env", default="OPENAI_API_KEY", help="the environment variable holding the key")
    p.add_argument("--chat", action="store_true", help="use /chat/completions (chat models) instead of /completions")
    p.add_argument("--max-tokens", type=int, default=None, help="per reply (default: 1024 textbook, 512 exercises)")
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--limit", type=int, default=None, help="send at most this many requests in this run")
    p.add_argument("--style", choices=["instruct", "completion"], default="instruct",
                   help="exercises: instruct (ask for exercise, solution and tests) or completion (a base model "
                        "writes the body of a given signature and docstring)")
    p.add_argument("--run-tests", action="store_true", help="keep only exercises whose own asserts pass")
    p.add_argument("--test-timeout", type=float, default=5.0, help="seconds per exercise in the sandbox")
    p.add_argument("--print-prompts", type=int, default=0, metavar="K", help="print the first K prompts and exit")
    p.add_argument("--quiet", "--no-progress", dest="quiet", action="store_true", help="no progress bar")
    args = p.parse_args(argv)
    for name in ("num", "concurrency"):
        if getattr(args, name) < (0 if name == "num" else 1):
            p.error(f"--{name} must be >= {0 if name == 'num' else 1}, got {getattr(args, name)}")
    if args.limit is not None and args.limit < 0:
        p.error(f"--limit must be >= 0, got {args.limit}")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    from megaphi.curate.llm import EndpointConfig, LLMClient
    from megaphi.curate.synthetic import build_prompts, format_summary, generate

    if args.print_prompts:
        for job in build_prompts(args.kind, min(args.num, args.print_prompts), args.seed,
                                 style=args.style):
            print(json.dumps(job, ensure_ascii=False))
        return 0
    try:
        cfg = EndpointConfig(args.base_url, args.model, args.api_key_env, args.timeout, args.max_retries,
                             args.backoff, args.max_backoff, chat=args.chat)
        summary = generate(args.kind, LLMClient(cfg), args.output, args.num, args.seed, args.concurrency,
                           args.run_tests, args.max_tokens, args.temperature, args.limit, args.test_timeout,
                           progress=not args.quiet, style=args.style)
    except (ValueError, OSError, RuntimeError) as err:  # bad input, a non-retryable answer (4xx), a broken sandbox
        print(f"error: {err}", file=sys.stderr)
        return 1
    print(format_summary(summary))
    if summary["failed"]:
        print(f"{summary['failed']} prompts failed after all retries: rerun the same command to retry them",
              file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
