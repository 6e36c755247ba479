"""pass@1 on the first N problems of a benchmark at each validation: `--code-eval humaneval:40`.

    hook = CodeEvalHook.from_spec("humaneval:40", tokenizer)
    metrics.update(hook(model, iteration))     # {"humaneval_pass@1": 0.125} on rank 0, {} elsewhere

Greedy completions of the first N problems (always the same ones), so successive values are comparable.
"""

import torch

from megaphi.eval.evaluate import evaluate, generate_completions
from megaphi.eval.problems import BENCHMARKS, load_problems
from megaphi.eval.samplers import MegaphiSampler
from megaphi.eval.sandbox import Limits

BENCHMARK_SIZES = {"humaneval": 164, "mbpp": 500}


def parse_code_eval_spec(spec: str) -> tuple[str, int]:
    """("humaneval", 40) from "humaneval:40"; a ValueError naming --code-eval for anything else."""
    text = spec.strip() if isinstance(spec, str) else ""
    bench, sep, count = text.partition(":")
    bench = bench.strip().lower()
    if bench not in BENCHMARKS:
        raise ValueError(f"--code-eval {spec!r}: expected BENCH:N with BENCH one of {', '.join(BENCHMARKS)} "
                         f"(e.g. humaneval:40)")
    if not sep or not count.strip().isdigit():
        raise ValueError(f"--code-eval {spec!r}: expected BENCH:N with N the number of problems, a positive "
                         f"integer (e.g. {bench}:40)")
    n = int(count)
    if not 1 <= n <= BENCHMARK_SIZES[bench]:
        raise ValueError(f"--code-eval {spec!r}: N must be between 1 and {BENCHMARK_SIZES[bench]} "
                         f"({bench} has {BENCHMARK_SIZES[bench]} problems)")
    return bench, n


class CodeEvalHook:
    """Greedy pass@1 of a model on a fixed set of problems; runs on rank 0 only and restores the model's mode."""

    def __init__(self, benchmark: str, num_problems: int, tokenizer, max_new_tokens: int = 256,
                 limits: Limits = Limits(), workers: int | None = None, batch_size: int = 8,
                 mbpp_path: str | None = None, shots: int = 3):
        self.benchmark = benchmark
        self.problems = load_problems(benchmark, mbpp_path, shots, limit=num_problems)
        self.tokenizer, self.max_new_tokens, self.limits = tokenizer, max_new_tokens, limits
        self.workers, self.batch_size = workers, batch_size
        self.key = f"{benchmark}_pass@1"

    @classmethod
    def from_spec(cls, spec: str, tokenizer, **kwargs) -> "CodeEvalHook":
        """The hook for a --code-eval value such as "humaneval:40" (kwargs: see __init__)."""
        benchmark, n = parse_code_eval_spec(spec)
        return cls(benchmark, n, tokenizer, **kwargs)

    def __call__(self, model, iteration: int) -> dict[str, float]:
        """{"<benchmark>_pass@1": fraction} on rank 0; {} on the other ranks."""
        if torch.distributed.is_available() and torch.distributed.is_initialized() and \
                torch.distributed.get_rank() != 0:
            return {}
        model = getattr(model, "module", model)  # a DDP-style wrapper
        was_training = model.training
        try:
            model.eval()
            sampler = MegaphiSampler(model, self.tokenizer, self.batch_size, name=f"iteration {iteration}")
            completions = generate_completions(self.problems, sampler, n=1, temperature=0.0,
                                               max_new_tokens=self.max_new_tokens, progress=False)
            summary, _ = evaluate(self.problems, completions, self.benchmark, self.limits, self.workers, ks=(1,),
                                  progress=False)
        finally:
            model.train(was_training)
        return {self.key: summary["pass@1"]}
