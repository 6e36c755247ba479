"""Generate completions with megaphi's KV-cache sampler from a megaphi checkpoint or a HuggingFace folder.

    python tools/generate.py --load runs/phi1 --prompt 'def fib(n):' --max-new-tokens 64
    python tools/generate.py --hf phi-1/ --prompt-file prompts.jsonl --temperature 0.8 --top-p 0.95 --seed 1 \\
        --stop $'\\ndef ' --output-format jsonl

--hf folders run in megaphi's own model (weights mapped from the HF names), so both paths share one sampler.
Temperature 0 (the default) is greedy. Prompts: --prompt (repeatable) and/or --prompt-file, a jsonl file of
{"prompt": ...} objects or JSON strings, one per line; all decode as one batch. Output: the completion text
(several prompts: each after a "=== completion i ===" line), or with --output-format jsonl one
{"prompt", "completion", "num_tokens", "finish_reason"} object per line.
"""

import argparse
import json
import sys


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--load", help="a megaphi --save folder or iter_ folder")
    src.add_argument("--hf", help="a HuggingFace phi folder (PhiForCausalLM or old phi-1 names)")
    p.add_argument("--iteration", type=int, default=None, help="which checkpoint of --load (default: the latest)")
    p.add_argument("--prompt", action="append", default=[], help="a prompt (repeat for a batch)")
    p.add_argument("--prompt-file", default=None, help="jsonl: {\"prompt\": ...} or a JSON string per line")
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass (with --temperature > 0)")
    p.add_argument("--seed", type=int, default=None, help="seed of the sampler (reproducible sampling)")
    p.add_argument("--stop", action="append", default=[], help="cut the completion before this text (repeatable)")
    p.add_argument("--tokenizer-type", default=None, help="override the checkpoint's tokenizer")
    p.add_argument("--tokenizer-model", default=None)
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1 (default: cuda if available)")
    p.add_argument("--dtype", choices=["fp32", "bf16", "fp16"], default="fp32")
    p.add_argument("--output-format", choices=["text", "jsonl"], default="text")
    return p.parse_args(argv)


def read_prompts(path: str) -> list[str]:
    """Prompts from a jsonl file: {"prompt": ...} objects or JSON strings; blank lines skipped."""
    prompts = []
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                value = json.loads(line)
            except ValueError as e:
                raise ValueError(f"--prompt-file {path}:{n}: not JSON ({e})") from None
            if isinstance(value, dict):
                value = value.get("prompt")
            if not isinstance(value, str):
                raise ValueError(f"--prompt-file {path}:{n}: expected a JSON string or an object with a "
                                 f"\"prompt\" string")
            prompts.append(value)
    return prompts


def main(argv=None) -> int:
    args = parse_args(argv)
    from megaphi.generate import generate_text
    from megaphi.hf.loading import load_model_and_tokenizer

    try:
        prompts = list(args.prompt) + (read_prompts(args.prompt_file) if args.prompt_file else [])
        if not prompts:
            raise ValueError("no prompts: pass --prompt TEXT or --prompt-file FILE")
        model, tokenizer = load_model_and_tokenizer(args.load, args.hf, args.iteration, args.device, args.dtype,
                                                    args.tokenizer_type, args.tokenizer_model)
        results = generate_text(model, tokenizer, prompts, args.max_new_tokens, args.temperature, args.top_p,
                                args.stop, args.seed)
    except (ValueError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    for i, (prompt, result) in enumerate(zip(prompts, results)):
        if args.output_format == "jsonl":
            print(json.dumps({"prompt": prompt, "completion": result["text"], "num_tokens": len(result["tokens"]),
                              "finish_reason": result["finish_reason"]}, ensure_ascii=False))
        elif len(prompts) == 1:
            print(result["text"])
        else:
            print(f"=== completion {i} ===\n{result['text']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
