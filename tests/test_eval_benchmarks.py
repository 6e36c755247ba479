"""HumanEval and MBPP: reference solutions pass in the sandbox, empty and wrong ones fail, prompts and stops."""

import json

import pytest

from megaphi.eval.evaluate import evaluate
from megaphi.eval.problems import (MBPP_FEWSHOT_STOP, load_mbpp, load_problems, normalize_task_id, read_mbpp,
                                   truncate)
from megaphi.eval.sandbox import Limits

WORKERS = 4


@pytest.fixture(scope="module")
def mbpp_path(shared_dir):
    return shared_dir / "data" / "mbpp" / "mbpp.jsonl"


def score(problems, completions_per_problem, benchmark, limits=Limits()):
    completions = {p.task_id: list(c) for p, c in zip(problems, completions_per_problem)}
    summary, per_problem = evaluate(problems, completions, benchmark, limits, WORKERS, ks=(1,), progress=False)
    return summary, per_problem


def test_humaneval_canonical_solutions_all_pass():
    problems = load_problems("humaneval")
    assert len(problems) == 164 and problems[0].task_id == "HumanEval/0"
    summary, per_problem = score(problems, [[p.reference] for p in problems], "humaneval", Limits(timeout=20))
    failures = [(p["task_id"], p["results"]) for p in per_problem if not p["correct"]]
    assert failures == [] and summary["pass@1"] == 1.0 and summary["n_problems"] == 164


@pytest.mark.slow  # about 45 s on the shared 2-core machine: 500 programs
def test_mbpp_reference_solutions_pass_their_tests(mbpp_path):
    problems = load_mbpp(mbpp_path)
    assert [p.task_id for p in problems] == [f"Mbpp/{i}" for i in range(11, 511)]
    summary, per_problem = score(problems, [[p.reference] for p in problems], "mbpp")
    failures = {p["task_id"]: p["results"][0] for p in per_problem if not p["correct"]}
    print(f"MBPP references: {500 - len(failures)}/500 pass; failures: {failures}")
    # Task 123's reference sums divisors up to 9999 quadratically: ~8 s of CPU, over the 5 s limit.
    assert set(failures) <= {"Mbpp/123"}
    assert all(r.startswith("timed out") for r in failures.values())


def test_empty_and_wrong_completions_score_zero(mbpp_path):
    humaneval = load_problems("humaneval", limit=10)
    wrong = ["", "    pass\n", "    return None\n", "    raise NotImplementedError\n", "    return 42\n",
             "    return ["]
    summary, per_problem = score(humaneval, [wrong] * len(humaneval), "humaneval")
    assert summary["pass@1"] == 0.0 and sum(p["correct"] for p in per_problem) == 0
    assert summary["results"] == {"failed": 60}
    mbpp = load_mbpp(mbpp_path)[:10]
    summary, _ = score(mbpp, [["", "def f():\n    return 0\n", "x ="]] * len(mbpp), "mbpp")
    assert summary["pass@1"] == 0.0


def test_humaneval_program_is_prompt_completion_tests_and_check():
    problem = load_problems("humaneval", limit=1)[0]
    program = problem.program("    return True\n")
    assert program.startswith(problem.prompt + "    return True\n")
    assert program.rstrip().endswith(f"check({problem.entry_point})")


def test_mbpp_prompts_follow_austin_et_al(mbpp_path):
    rows = read_mbpp(mbpp_path)
    problem = load_mbpp(mbpp_path, shots=3)[0]
    header = "You are an expert Python programmer, and here is your task: "
    assert problem.prompt.count(header) == 4 and problem.prompt.count("[DONE]") == 3
    for i in (2, 3, 4):
        assert f"{header}{rows[i]['text']} Your code should pass these tests:\n\n" in problem.prompt
        assert rows[i]["code"].replace("\r", "") + "\n[DONE]\n" in problem.prompt
    assert problem.prompt.endswith(f"{rows[11]['text']} Your code should pass these tests:\n\n"
                                   + "\n".join(rows[11]["test_list"]) + "\n[BEGIN]\n")
    assert problem.program("def f(): pass") == "def f(): pass\n\n" + "\n".join(rows[11]["test_list"]) + "\n"
    assert problem.stop == MBPP_FEWSHOT_STOP
    zero = load_mbpp(mbpp_path, shots=0)[0]
    assert zero.prompt == f'"""\n{rows[11]["text"]}\n{rows[11]["test_list"][0]}\n"""\n'
    assert zero.program("x = 1\n").startswith(zero.prompt + "x = 1\n")


def test_mbpp_setup_code_runs_between_solution_and_tests(mbpp_path):
    problem = next(p for p in load_mbpp(mbpp_path) if p.task_id == "Mbpp/367")
    summary, _ = score([problem], [[problem.reference]], "mbpp")
    assert summary["pass@1"] == 1.0


def test_truncate_cuts_at_the_first_stop_sequence():
    stops = load_problems("humaneval", limit=1)[0].stop
    body = "    return x\n"
    assert truncate(body + "\ndef helper():\n    pass\n", stops) == body
    assert truncate(body + "\n# a comment\nprint(1)\n", stops) == body
    assert truncate(body + "    # an indented comment stays\n", stops) == body + "    # an indented comment stays\n"
    assert truncate(body + "\nif __name__ == '__main__':\n", stops) == body
    assert truncate(body + "    y = 1\n```\n", stops) == body + "    y = 1"
    assert truncate(body, stops) == body
    assert truncate("    return 1\n[DONE]\nYou are", MBPP_FEWSHOT_STOP) == "    return 1\n"


def test_subsets_and_task_ids():
    assert [p.task_id for p in load_problems("humaneval", limit=3)] == ["HumanEval/0", "HumanEval/1", "HumanEval/2"]
    chosen = load_problems("humaneval", task_ids=["HumanEval/5", 7])
    assert [p.task_id for p in chosen] == ["HumanEval/5", "HumanEval/7"]
    assert normalize_task_id("mbpp", 11) == normalize_task_id("mbpp", "MBPP/11") == "Mbpp/11"
    with pytest.raises(ValueError, match="--task-ids"):
        load_problems("humaneval", task_ids=["HumanEval/999"])
    with pytest.raises(ValueError, match="--limit"):
        load_problems("humaneval", limit=0)
    with pytest.raises(ValueError, match="--benchmark"):
        load_problems("apps")


def test_mbpp_path_errors(tmp_path):
    with pytest.raises(ValueError, match="--mbpp-path"):
        load_mbpp(tmp_path / "missing.jsonl")
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"task_id": 1}) + "\nnot json\n")
    with pytest.raises(ValueError, match="line 2"):
        read_mbpp(bad)
    with pytest.raises(ValueError, match="--mbpp-shots"):
        load_mbpp(tmp_path / "missing.jsonl", shots=1)
