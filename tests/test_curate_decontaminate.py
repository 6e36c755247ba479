"""Decontamination: every HumanEval/MBPP item planted verbatim, reformatted or renamed is caught with the item it
came from, real stdlib modules are not, and tools/decontaminate.py runs end to end in two processes."""

import ast
import glob
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from megaphi.curate.decontaminate import (DecontamConfig, Decontaminator, ast_match, canonical_sequence,
                                          find_contamination, function_sequences, get_index, normalize, specific)

REPO = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.filterwarnings("ignore:invalid escape sequence:DeprecationWarning")  # MBPP's regexes
TAU = 0.9


@pytest.fixture(scope="module")
def index():
    """HumanEval + MBPP with the AST rule on."""
    return get_index(DecontamConfig(ast_threshold=TAU))


def stdlib_texts(count=40):
    """Mid-sized standard-library modules (a deterministic pick)."""
    paths = [p for p in sorted(glob.glob(os.path.join(os.path.dirname(os.__file__), "*.py")))
             if 4_000 < os.path.getsize(p) < 60_000]
    assert len(paths) >= count, "needs the Python standard library sources"
    step = len(paths) / count
    return [(os.path.basename(p), Path(p).read_text(encoding="utf-8")) for p in
            (paths[int(i * step)] for i in range(count))]


class _Rename(ast.NodeTransformer):
    """Rename every function, argument and assigned name to zz_N, and drop docstrings."""

    def __init__(self, tree):
        self.names = {}
        for node in ast.walk(tree):
            if isinstance(node, ast.Name) and isinstance(node.ctx, ast.Store):
                self.new(node.id)

    def new(self, name):
        return self.names.setdefault(name, f"zz_{len(self.names)}")

    def visit_FunctionDef(self, node):
        node.name = self.new(node.name)
        if ast.get_docstring(node) is not None:
            node.body = node.body[1:] or [ast.Pass()]
        self.generic_visit(node)
        return node

    def visit_arg(self, node):
        node.arg = self.new(node.arg)
        return node

    def visit_Name(self, node):
        if node.id in self.names:
            node.id = self.names[node.id]
        return node


def renamed(code: str) -> str:
    """code with its names renamed, docstrings dropped and the layout redone by ast.unparse."""
    tree = ast.parse(code)
    return ast.unparse(_Rename(tree).visit(tree))


def item_code(item) -> str:
    return item.parts["prompt"] + item.parts["solution"] if item.benchmark == "humaneval" else item.parts["code"]


def test_normalize_ignores_layout_case_and_string_prefixes():
    assert normalize("def F(x):\n\treturn  re.findall(r'\\b\\w+', X)  # Done") == \
        ["def", "f", "x", "return", "re", "findall", "b", "w", "x", "done"]
    assert normalize("f( a,b )") == normalize("f(\n    a,\n    b,\n)")
    assert specific(["1", "2", "3", "4"]) is False and specific(["a", "a", "b", "b"]) is False


def test_canonical_sequence_sees_through_renaming_but_not_other_code():
    a = ast.parse("def total(xs):\n    '''Sum.'''\n    s = 0\n    for x in xs:\n        s += x * 2\n    return s\n")
    b = ast.parse("def f( values ) :\n    acc=0\n    for v in values: acc += v*2\n    return acc")
    c = ast.parse("def total(xs):\n    s = 0\n    for x in xs:\n        s -= x * 3\n    return s\n")
    assert canonical_sequence(a.body[0]) == canonical_sequence(b.body[0])
    assert canonical_sequence(a.body[0]) != canonical_sequence(c.body[0])
    assert "Name:len" in canonical_sequence(ast.parse("def g(y):\n    return len(y)\n").body[0])  # builtins kept


def test_every_item_is_caught_verbatim_and_reformatted(index):
    k = index.cfg.min_substring_tokens
    too_short = []
    same_tokens = {}  # twins that differ only in punctuation (HumanEval/56 "<>" and 61 "()") normalize alike
    for item in index.items:
        same_tokens.setdefault(tuple(normalize(item_code(item))), set()).add(item.id)
    for item in index.items:
        code = item_code(item)
        if len(normalize(code)) < k or not specific(normalize(code)):
            too_short.append(item.id)  # a 3-token `return x + y` matches nothing safely
            continue
        verbatim = f"import os\n\n\n{code}\n\nif __name__ == '__main__':\n    print(os.getcwd())\n"
        found = find_contamination(verbatim, index)
        assert found is not None and found[1]["matched"] in same_tokens[tuple(normalize(code))], (item.id, found)
        assert found[0] in ("exact_substring", "ngram_overlap")
        reformatted = ast.unparse(ast.parse(code))  # new layout, quotes and parentheses; comments gone
        found = find_contamination(reformatted, index)
        assert found is not None and found[0] != "ast_similarity", (item.id, found)
    assert len(too_short) <= 12, too_short


def test_renamed_functions_are_caught_by_the_ast_rule(index):
    no_ast = get_index(DecontamConfig())
    planted, wrong_item, by_ngrams = 0, [], 0
    for item in index.items:
        code = item_code(item)
        if not function_sequences(code, index.cfg.ast_min_nodes):
            continue
        planted += 1
        copy = renamed(code)
        assert find_contamination(copy, index) is not None, item.id
        found = ast_match(copy, index)  # the AST rule alone
        assert found is not None, item.id
        assert found[1]["similarity"] >= TAU
        if found[1]["matched"] != item.id:
            wrong_item.append(item.id)  # a twin problem with the same canonical AST (e.g. HumanEval/56 and 61)
        by_ngrams += find_contamination(copy, no_ast) is not None
    assert planted > 500
    assert len(wrong_item) <= 0.05 * planted, wrong_item
    assert by_ngrams < 0.1 * planted  # renaming does hide most copies from the text rules


def test_hand_renamed_solution_inside_a_textbook_code_block(index):
    text = """## Checking closeness

Let us check whether a list holds two values within some tolerance of each other.

```python
def near_pair(vals, tol):
    # compare every pair
    for a, first in enumerate(vals):
        for b, second in enumerate(vals):
            if a != b:
                gap = abs(first - second)
                if gap < tol:
                    return True
    return False
```

Each pair is compared twice; can you halve the work?
"""
    assert find_contamination(text, get_index(DecontamConfig())) is None
    rule, detail = find_contamination(text, index)
    assert rule == "ast_similarity" and detail["matched"] == "HumanEval/0" and detail["similarity"] >= TAU


def test_real_stdlib_modules_are_kept(index):
    for name, text in stdlib_texts():
        assert find_contamination(text, index) is None, name


def test_generic_runs_do_not_count(index):
    assert find_contamination("DATA = [" + ", ".join(str(i) for i in range(1, 40)) + "]\n", index) is None
    assert find_contamination("def add(x, y):\n    return x + y\n", index) is None


def test_config_errors_name_the_flag():
    with pytest.raises(ValueError, match="--benchmarks must name"):
        DecontamConfig(benchmarks=("apps",))
    with pytest.raises(ValueError, match="--ngram must be in"):
        DecontamConfig(ngram=0)
    with pytest.raises(ValueError, match="--ast-threshold must be in"):
        DecontamConfig(ast_threshold=1.5)
    with pytest.raises(ValueError, match="--mbpp-path .* does not exist"):
        get_index(DecontamConfig(mbpp_path="/nonexistent/mbpp.jsonl"))


def test_filter_outcome_keeps_fields_and_reports_the_match(index):
    he0 = index.items[0]
    process = Decontaminator(index.cfg, text_key="content")
    outcome = process([{"content": "x = 1\n", "id": "a", "meta": {"k": 1}},
                       {"content": he0.parts["prompt"] + he0.parts["solution"], "id": "b"}])
    assert outcome.kept == [{"content": "x = 1\n", "id": "a", "meta": {"k": 1}}]
    (record, rule, detail), = outcome.dropped
    assert (record["id"], rule, detail["matched"]) == ("b", "exact_substring", "HumanEval/0")
    assert detail["part"] == "unparsed"  # the longest match: prompt + solution as ast.unparse prints them


def test_cli_end_to_end_in_two_processes(tmp_path, index):
    items = {item.id: item for item in index.items}
    clean = [{"id": name, "text": text, "source": "stdlib"} for name, text in stdlib_texts(16)]
    planted = {
        "he-exact": ("HumanEval/10", "import sys\n\n" + item_code(items["HumanEval/10"]) + "\nprint(sys.argv)\n"),
        "he-solution": ("HumanEval/129", items["HumanEval/129"].parts["solution"]),
        "mbpp-exact": ("Mbpp/11", items["Mbpp/11"].parts["code"]),
        "mbpp-reformatted": ("Mbpp/120", ast.unparse(ast.parse(items["Mbpp/120"].parts["code"]))),
        "mbpp-task": ("Mbpp/600", f'def solve(n):\n    """{items["Mbpp/600"].parts["text"]}"""\n'),
        "he-renamed": ("HumanEval/129", renamed(item_code(items["HumanEval/129"]))),
    }
    records = []
    for i, (key, (_, text)) in enumerate(planted.items()):
        records += clean[2 * i: 2 * i + 2] + [{"id": key, "text": text, "source": "planted"}]
    records += clean[2 * len(planted):]
    src, out, report = tmp_path / "in.jsonl", tmp_path / "out.jsonl", tmp_path / "report.jsonl"
    src.write_text("".join(json.dumps(r) + "\n" for r in records))
    cmd = [sys.executable, str(REPO / "tools" / "decontaminate.py"), "--input", str(src), "--output", str(out),
           "--benchmarks", "humaneval,mbpp", "--report", str(report), "--workers", "2", "--chunk-bytes", "60000",
           "--ast-threshold", str(TAU), "--quiet"]
    run = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    assert [json.loads(line) for line in out.read_text().splitlines()] == clean
    lines = {r["id"]: r for r in map(json.loads, report.read_text().splitlines())}
    assert {key: lines[key]["matched"] for key in lines} == {key: want for key, (want, _) in planted.items()}
    assert lines["he-renamed"]["reason"] == "ast_similarity"
    assert lines["mbpp-task"]["reason"] == "exact_substring" and lines["mbpp-task"]["part"] == "text"
    assert f"{len(records)} records in, {len(clean)} kept" in run.stdout
    assert "benchmarks: humaneval,mbpp (1138 items" in run.stdout
    bad = subprocess.run(cmd[:6] + ["--benchmarks", "humaneval,apps"], capture_output=True, text=True, timeout=60)
    assert bad.returncode == 1 and "error: --benchmarks must name" in bad.stderr
