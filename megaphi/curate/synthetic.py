"""Synthetic textbooks and exercises (phi-1's two synthetic corpora) from any OpenAI-compatible endpoint.

    prompts = build_prompts("exercises", 1000, seed=0)          # reproducible: prompt i depends on (kind, seed, i)
    summary = generate("exercises", client, "exercises.jsonl", 1000, seed=0, concurrency=8, run_tests=True)

Prompts combine the seed lists of seeds.py so that no two of the first len(space) prompts share their
combination. Kept records are appended to OUTPUT as they arrive, dropped ones (with the reason) to
OUTPUT.rejected.jsonl: a rerun skips every id in either file, so nothing is requested or written twice.
Exercises are kept only if the reply's code parses and holds a function with a docstring; with run_tests its
own asserts must also pass in megaphi.eval.sandbox. Records: {"id", "kind", "text", "prompt", topic fields...,
"finish_reason", "usage"}; exercises add "exercise" (signature and docstring), "solution" and "tests".
"""

import ast
import hashlib
import json
import math
import os
import random
import re
import threading
import time
from collections import Counter

from megaphi.curate import seeds
from megaphi.curate.llm import LLMClient, ResumableJsonl, run_concurrently
from megaphi.curate.records import write_atomic

KINDS = ("textbook", "exercises")
STYLES = ("instruct", "completion")
DEFAULT_MAX_TOKENS = {"textbook": 1024, "exercises": 512}

TEXTBOOK_PROMPT = (
    "Write a section of a Python textbook on {topic}, about {subtopic}, for {audience}. Style: {style}.\n"
    "Interleave short explanations in plain English with small, self-contained Python code examples that run "
    "as they are, and say what each example shows. Start with a title line; end with a one-sentence summary.\n")
EXERCISE_PROMPT = (
    "Write a Python exercise on {topic} ({subtopic}) for {audience}.\n"
    "Give a function named `{function_name}` with type hints and a docstring that states the problem, its "
    "input and its output; then the solution, as the function's body. {constraint}\n"
    "After the function, add at least three assert statements that test it. Reply with one ```python code "
    "block and nothing else.\n")
# For a base model (no instructions followed): the exercise's header, whose body the model writes; it stops where
# a new top-level statement starts (OpenAI endpoints take at most 4 stop strings).
EXERCISE_COMPLETION_PROMPT = (
    "# {topic}: {subtopic}. An exercise for {audience}.\n"
    "def {function_name}(data):\n"
    '    """{task} {constraint}"""\n')
COMPLETION_STOPS = ["\ndef ", "\nclass ", "\nif __name__", "\nprint("]


def _spaces(kind: str) -> dict:
    pairs = [(t, s) for t, subs in seeds.TOPICS.items() for s in subs]
    if kind == "textbook":
        return {"topic": pairs, "audience": seeds.AUDIENCES, "style": seeds.STYLES}
    names = [f"{verb}_{noun}" for verb in seeds.VERBS for noun in seeds.NOUNS]
    return {"topic": pairs, "function_name": names, "audience": seeds.AUDIENCES, "constraint": seeds.CONSTRAINTS}


def _coprime(size: int, rng: random.Random) -> int:
    """A random multiplier in [1, size) coprime to size (1 for size <= 2)."""
    choices = [m for m in range(1, size) if math.gcd(m, size) == 1]
    return rng.choice(choices) if choices else 1


def build_prompts(kind: str, n: int, seed: int = 0, start: int = 0, style: str = "instruct") -> list[dict]:
    """Prompts start..start+n-1 of (kind, seed): {"id", "prompt", "seed" (the request's), and what it combines}.

    style "completion" (exercises only) gives base models the exercise's header to write the body of."""
    return list(iter_prompts(kind, n, seed, start, style))


def iter_prompts(kind: str, n: int, seed: int = 0, start: int = 0, style: str = "instruct"):
    """build_prompts, one at a time (a million prompts need not sit in memory)."""
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
    if style not in STYLES:
        raise ValueError(f"--style must be one of {STYLES}, got {style!r}")
    if style == "completion" and kind != "exercises":
        raise ValueError("--style completion is for exercises: textbook prompts work with any model as they are")
    if n < 0 or start < 0:
        raise ValueError(f"--num must be >= 0, got {n}")
    return _prompts(kind, n, seed, start, style)


def _prompts(kind: str, n: int, seed: int, start: int, style: str):
    rng = random.Random(f"{kind}:{seed}")
    spaces = {}
    for name, values in _spaces(kind).items():  # each list in an order of this seed's own
        values = list(values)
        rng.shuffle(values)
        spaces[name] = values
    sizes = [len(v) for v in spaces.values()]
    size = math.prod(sizes)
    # Index i -> mixed-radix digits r_0 (fastest) ... r_k; choice c is sum(m_cd * r_d for d <= c) mod len(list c)
    # with every m coprime to that length. That is a bijection (the first `size` prompts have distinct
    # combinations), and as r_0 runs through all its values every sizes[0] prompts, every list is cycled through
    # evenly in any window of consecutive prompts, not only once per sizes[0] * ... * sizes[c-1] prompts.
    mult = [[_coprime(length, rng) for _ in range(c + 1)] for c, length in enumerate(sizes)]
    for i in range(start, start + n):
        raw, j = [], i % size
        for length in sizes:
            j, digit = divmod(j, length)
            raw.append(digit)
        pick = {}
        for c, (name, values) in enumerate(spaces.items()):
            pick[name] = values[sum(r * m for r, m in zip(raw, mult[c])) % sizes[c]]
        request_seed = int.from_bytes(hashlib.sha256(f"{kind}:{seed}:{i}".encode()).digest()[:4], "little") >> 1
        name = kind if style == "instruct" else f"{kind}-{style}"  # a style's ids never match another's
        record = {"id": f"{name}-{seed}-{i:07d}", "seed": request_seed}
        record["topic"], record["subtopic"] = pick.pop("topic")
        record.update(pick)
        if style == "completion":
            verb, _, noun = record["function_name"].partition("_")
            record["prompt"] = EXERCISE_COMPLETION_PROMPT.format(task=f"{verb.capitalize()} the {noun} of `data`.",
                                                                 **record)
            record["style"], record["stop"] = style, COMPLETION_STOPS
        else:
            record["prompt"] = (EXERCISE_PROMPT if kind == "exercises" else TEXTBOOK_PROMPT).format(**record)
        yield record


def extract_code(text: str) -> str:
    """The first fenced code block of a reply (```python or ```), or the whole reply when there is none."""
    match = re.search(r"```[ \t]*(?:python|py|python3)?[ \t]*\n(.*?)(?:```|\Z)", text, re.S | re.I)
    return match.group(1) if match else text


def split_exercise(code: str, function_name: str | None = None) -> tuple[dict | None, str]:
    """Splits exercise code into {"exercise", "solution", "tests", "text"}; or (None, reason) when it is not one.

    The problem is the function named function_name, else the first top-level function with a docstring:
    "exercise" is the code up to the end of its docstring, "solution" the rest of it, "text" the code without
    the tests, "tests" the top-level statements after the last function, class or import (empty unless they
    hold an assert).
    """
    try:
        tree = ast.parse(code)
    except (SyntaxError, ValueError):
        return None, "no_parse"
    funcs = [node for node in tree.body if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef))
             and ast.get_docstring(node) is not None]
    if not funcs:
        return None, "no_docstring_function"
    func = next((f for f in funcs if f.name == function_name), funcs[0])
    if len(func.body) < 2:
        return None, "no_solution"
    lines = code.splitlines()
    last_def = max(i for i, node in enumerate(tree.body)
                   if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef, ast.Import,
                                        ast.ImportFrom)))
    body_end = tree.body[last_def].end_lineno
    docstring_end = func.body[0].end_lineno
    tests = "\n".join(lines[body_end:]).strip()
    asserts = any(isinstance(n, ast.Assert) for node in tree.body[last_def + 1:] for n in ast.walk(node))
    return {"exercise": "\n".join(lines[:docstring_end]) + "\n",
            "solution": "\n".join(lines[docstring_end:func.end_lineno]) + "\n",
            "tests": tests + "\n" if asserts else "",
            "text": "\n".join(lines[:body_end]).rstrip() + "\n"}, ""


def _complete_exercise(job: dict, text: str):
    """split_exercise of header + body, the body cut back to its longest prefix of whole lines that parses (a
    reply stopped by max_tokens ends mid-statement, as HumanEval completions are cut at a stop)."""
    lines = text.splitlines(keepends=True)
    first = None
    for end in range(len(lines), 0, -1):
        parts, reason = split_exercise(job["prompt"] + "".join(lines[:end]), job.get("function_name"))
        if parts is not None:
            return parts, reason
        first = first or reason
    return None, first or "no_solution"


def check_reply(kind: str, job: dict, text: str, run_tests: bool = False, test_timeout: float = 5.0):
    """(fields to add to the record, "") for a reply worth keeping, else (detail fields, reason)."""
    if not text.strip():
        return {}, "empty"
    if kind == "textbook":
        return {"text": text.strip() + "\n"}, ""
    if job.get("style") == "completion":
        parts, reason = _complete_exercise(job, text)
    else:
        parts, reason = split_exercise(extract_code(text), job.get("function_name"))
    if parts is None:
        return {"text": text}, reason
    if run_tests:
        from megaphi.eval.sandbox import Limits, run_program

        if not parts["tests"]:
            return parts, "no_tests"
        result = run_program(parts["text"] + "\n\n" + parts["tests"], Limits(timeout=test_timeout))
        if not result.passed:
            return {**parts, "test_result": result.result}, "tests_failed"
        parts["tests_passed"] = True
    return parts, ""


def rejected_path(output: str) -> str:
    """Where the replies dropped for OUTPUT go: out.jsonl -> out.rejected.jsonl."""
    root, ext = os.path.splitext(output)
    return f"{root}.rejected{ext or '.jsonl'}"


def generate(kind: str, client: LLMClient, output: str, num: int, seed: int = 0, concurrency: int = 8,
             run_tests: bool = False, max_tokens: int | None = None, temperature: float = 1.0,
             limit: int | None = None, test_timeout: float = 5.0, progress: bool = True,
             style: str = "instruct") -> dict:
    """Generates the first `num` prompts of (kind, seed) not yet in OUTPUT or its rejected file; returns the summary.

    The summary (also written to OUTPUT.summary.json) counts this run's requests, retries, tokens, kept and
    dropped-by-reason, failed prompts (retries used up: a rerun tries them again) and the totals in the files.
    """
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
    if max_tokens is not None and max_tokens < 1:
        raise ValueError(f"--max-tokens must be >= 1, got {max_tokens}")
    max_tokens = max_tokens or DEFAULT_MAX_TOKENS[kind]
    jobs = ({**job, "max_tokens": max_tokens, "temperature": temperature} for job in iter_prompts(kind, num, seed, 0, style))
    kept, rejected = ResumableJsonl(output), ResumableJsonl(rejected_path(output))
    lock = threading.Lock()
    counts = Counter()
    model = client.cfg.model

    def on_result(job, completion):
        fields, reason = check_reply(kind, job, completion.text, run_tests, test_timeout)
        meta = {k: v for k, v in job.items() if k not in ("max_tokens", "temperature", "stop")}
        record = {"id": job["id"], "kind": kind, **fields, **meta, "model": model,
                  "finish_reason": completion.finish_reason, "usage": completion.usage()}
        if reason:
            rejected.append({**record, "reason": reason})
        else:
            kept.append(record)
        with lock:
            counts[reason or "kept"] += 1

    start = time.monotonic()
    try:
        done = kept.done_ids() | rejected.done_ids()
        run = run_concurrently(client, jobs, done, on_result, concurrency, progress, limit, desc=kind, total=num)
        totals = {"kept": len(kept.done_ids()), "rejected": len(rejected.done_ids())}
    finally:
        kept.close()
        rejected.close()
    stats = client.stats()
    summary = {"kind": kind, "output": output, "rejected_file": rejected_path(output), "prompts": num,
               "skipped": run.skipped, "requested": run.submitted, "kept": counts.pop("kept", 0),
               "dropped": dict(sorted(counts.items())), "failed": len(run.failed),
               "failed_ids": sorted(run.failed)[:20], "requests": stats["requests"], "retries": stats["retries"],
               "prompt_tokens": stats["prompt_tokens"], "completion_tokens": stats["completion_tokens"],
               "seconds": round(time.monotonic() - start, 3), "in_files": totals}
    write_atomic(f"{output}.summary.json", json.dumps(summary, indent=1) + "\n")
    return summary


def format_summary(s: dict) -> str:
    """A small table of a generate() summary."""
    rows = [("prompts", s["prompts"]), ("already done (skipped)", s["skipped"]), ("requested", s["requested"]),
            ("kept", s["kept"])]
    rows += [(f"dropped: {reason}", n) for reason, n in s["dropped"].items()]
    rows += [("failed (rerun to retry)", s["failed"]), ("HTTP requests", s["requests"])]
    rows += [(f"retries: {kind}", n) for kind, n in s["retries"].items()]
    rows += [("prompt tokens", s["prompt_tokens"]), ("completion tokens", s["completion_tokens"]),
             ("seconds", s["seconds"]), ("kept in file", s["in_files"]["kept"]),
             ("rejected in file", s["in_files"]["rejected"])]
    width = max(len(name) for name, _ in rows)
    return f"{s['kind']} -> {s['output']}\n" + "\n".join(f"  {name:<{width}}  {value}" for name, value in rows)
