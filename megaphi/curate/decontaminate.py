"""Decontamination against HumanEval and MBPP: exact substrings, n-gram overlap, and (optional) AST similarity.

Text is normalized to lowercase word tokens (identifiers, numbers, words: punctuation, whitespace and layout
are gone), so reformatted code matches. Comments and docstrings are kept: a HumanEval prompt is mostly its
docstring. Three rules, checked in this order (the report names the benchmark item that matched):
  exact_substring  the normalized prompt, solution or MBPP task text of an item occurs in the record
                   (items shorter than min_substring_tokens tokens are too generic to match alone)
  ngram_overlap    the record shares at least min_ngram_matches n-grams (13 by default) with an item
  ast_similarity   a function of the record (parsed whole, or from its ``` code blocks) has the same
                   canonical AST as an item's function up to --ast-threshold (difflib ratio of node sequences
                   with docstrings dropped and locally bound names renamed to v0, v1, ...): renamed variables
                   and reformatting do not hide a solution (phi-1 paired code embeddings with an AST match
                   rate above a threshold tau; this is the AST half, which needs no model).
"""

import ast
import difflib
import hashlib
import re
import warnings
from dataclasses import asdict, dataclass

import numpy as np

from megaphi.curate.stage import Outcome

BENCHMARKS = ("humaneval", "mbpp")
RULES = ("exact_substring", "ngram_overlap", "ast_similarity")
_TOKEN = re.compile(r"\w+")
_STRING_PREFIX = re.compile(r"(?<![\w'\"])[rRbBuUfF]{1,2}(?=['\"])")
_FENCE = re.compile(r"```[^\n`]*\n(.*?)```", re.S)
_MULT = np.random.default_rng(20260).integers(1, 2**63, size=64, dtype=np.uint64) | np.uint64(1)  # odd multipliers
_TOKEN_CACHE: dict = {}
_INDEXES: dict = {}


@dataclass(frozen=True)
class DecontamConfig:
    """What to match against and how."""

    benchmarks: tuple = BENCHMARKS
    ngram: int = 13  # tokens per n-gram
    min_ngram_matches: int = 1  # shared n-grams that make a record contaminated
    min_substring_tokens: int = 8  # shorter benchmark strings are not matched as substrings
    ast_threshold: float | None = None  # None: no AST check; else the similarity (0, 1] that drops a record
    ast_min_nodes: int = 30  # functions with fewer canonical nodes are too generic to compare
    mbpp_path: str | None = None  # MBPP's mbpp.jsonl (default: megaphi.eval.problems.default_mbpp_path())

    def __post_init__(self):
        unknown = [b for b in self.benchmarks if b not in BENCHMARKS]
        if unknown or not self.benchmarks:
            raise ValueError(f"--benchmarks must name some of {', '.join(BENCHMARKS)}, "
                             f"got {','.join(self.benchmarks)!r}")
        if not 1 <= self.ngram <= len(_MULT):
            raise ValueError(f"--ngram must be in [1, {len(_MULT)}], got {self.ngram}")
        if self.min_ngram_matches < 1:
            raise ValueError(f"--min-ngram-matches must be >= 1, got {self.min_ngram_matches}")
        if not 1 <= self.min_substring_tokens <= len(_MULT):
            raise ValueError(f"--min-substring-tokens must be in [1, {len(_MULT)}], got {self.min_substring_tokens}")
        if self.ast_threshold is not None and not 0 < self.ast_threshold <= 1:
            raise ValueError(f"--ast-threshold must be in (0, 1], got {self.ast_threshold}")
        if self.ast_min_nodes < 1:
            raise ValueError(f"--ast-min-nodes must be >= 1, got {self.ast_min_nodes}")


def normalize(text: str) -> list:
    """Lowercase word tokens of text (string prefixes such as r"" dropped): what substrings and n-grams compare."""
    return _TOKEN.findall(_STRING_PREFIX.sub("", text).lower())


def token_hashes(tokens) -> np.ndarray:
    """A stable 64-bit hash per token (the same in every process, unlike hash())."""
    cache = _TOKEN_CACHE
    if len(cache) > 2_000_000:
        cache.clear()
    out = np.empty(len(tokens), dtype=np.uint64)
    for i, token in enumerate(tokens):
        h = cache.get(token)
        if h is None:
            h = cache[token] = int.from_bytes(hashlib.blake2b(token.encode(), digest_size=8).digest(), "little")
        out[i] = h
    return out


def window_hashes(hashes: np.ndarray, n: int) -> np.ndarray:
    """The hash of every n-token window (position i covers tokens i..i+n-1); empty when there are fewer."""
    count = len(hashes) - n + 1
    if count <= 0:
        return np.empty(0, dtype=np.uint64)
    acc = np.zeros(count, dtype=np.uint64)
    for j in range(n):
        acc += hashes[j: j + count] * _MULT[j]  # uint64 arithmetic wraps: a polynomial hash mod 2**64
    return acc


def specific(tokens) -> bool:
    """Whether a token run says something: not only numbers ("1 2 3 ... 13"), at least 4 distinct tokens."""
    return len(set(tokens)) >= 4 and not all(t.isdigit() for t in tokens)


def _specific_windows(tokens, hashes: np.ndarray, n: int) -> np.ndarray:
    """specific() of every n-token window, vectorized over the windows."""
    count = len(hashes) - n + 1
    if count <= 0:
        return np.zeros(0, dtype=bool)
    distinct = np.ones(count, dtype=np.int32)
    for j in range(1, n):  # the token at offset j is new when it differs from those at offsets < j
        fresh = np.ones(count, dtype=bool)
        for i in range(j):
            fresh &= hashes[j: j + count] != hashes[i: i + count]
        distinct += fresh
    digits = np.concatenate([[0], np.cumsum([t.isdigit() for t in tokens])])
    return (distinct >= 4) & (digits[n:] - digits[:count] < n)


@dataclass
class Item:
    """One benchmark problem: id, benchmark, text parts by name (prompt/solution/test or text/code/tests, and
    unparsed)."""

    id: str
    benchmark: str
    parts: dict


def load_items(benchmarks, mbpp_path=None) -> list:
    """The benchmark problems as Items (all of MBPP's 974 tasks, not only its test split)."""
    from megaphi.eval.problems import load_humaneval, read_mbpp

    items = []
    if "humaneval" in benchmarks:
        for p in load_humaneval():
            parts = {"prompt": p.prompt, "solution": p.reference, "test": p.test}
            items.append(Item(p.task_id, "humaneval", _with_unparsed(parts, p.prompt + p.reference)))
    if "mbpp" in benchmarks:
        for task_id, row in sorted(read_mbpp(mbpp_path).items()):
            parts = {"text": row["text"], "code": row["code"], "tests": "\n".join(row["test_list"])}
            items.append(Item(f"Mbpp/{task_id}", "mbpp", _with_unparsed(parts, row["code"])))
    return items


def _with_unparsed(parts: dict, code: str) -> dict:
    """parts plus "unparsed": the code as ast.unparse prints it, without comments (when it parses), so that
    a copy reformatted by a tool that drops comments still matches as a substring."""
    tree = parse_quietly(code)
    if tree is not None:
        parts["unparsed"] = ast.unparse(tree)
    return parts


SUBSTRING_PARTS = ("prompt", "solution", "text", "code", "unparsed")


class BenchmarkIndex:
    """N-gram hashes, substring patterns and canonical function ASTs of the benchmark items."""

    def __init__(self, cfg: DecontamConfig, items=None):
        self.cfg = cfg
        self.items = items if items is not None else load_items(cfg.benchmarks, cfg.mbpp_path)
        self._build_ngrams()
        self._build_substrings()
        self.functions = self._build_functions() if cfg.ast_threshold is not None else None

    def _build_ngrams(self):
        n = self.cfg.ngram
        tokens, owners = [], []
        for i, item in enumerate(self.items):  # all items in one array: a few large numpy calls, not many small
            words = normalize("\n".join(item.parts.values()))
            tokens += words
            owners += [i] * len(words)
        owners = np.array(owners, dtype=np.int32)
        token_ids = token_hashes(tokens)
        grams = window_hashes(token_ids, n)
        keep = _specific_windows(tokens, token_ids, n)
        if len(grams):
            keep &= owners[: len(grams)] == owners[n - 1:]  # windows that run across two items are not n-grams
        h, o = grams[keep], owners[: len(grams)][keep]
        order = np.argsort(h, kind="stable")
        h, o = h[order], o[order]
        first = np.ones(len(h), dtype=bool)
        first[1:] = h[1:] != h[:-1]  # an n-gram shared by several items belongs to the first
        self.ngram_hashes, self.ngram_owners = h[first], o[first]

    def _build_substrings(self):
        k = self.cfg.min_substring_tokens
        self.patterns, keys = [], []  # (item index, part name, token hashes)
        for i, item in enumerate(self.items):
            for part in SUBSTRING_PARTS:
                if part in item.parts:
                    words = normalize(item.parts[part])
                    tokens = token_hashes(words)
                    if len(tokens) >= k and specific(words):
                        keys.append(window_hashes(tokens[:k], k)[0])
                        self.patterns.append((i, part, tokens))
        self.pattern_keys = np.array(keys, dtype=np.uint64)

    def _build_functions(self):
        seqs, owners = [], []
        for i, item in enumerate(self.items):
            parts = item.parts
            code = parts["prompt"] + parts["solution"] if item.benchmark == "humaneval" else parts["code"]
            for seq in function_sequences(code, self.cfg.ast_min_nodes):
                seqs.append(seq)
                owners.append(i)
        return _FunctionIndex(seqs, owners)


class _FunctionIndex:
    """Canonical function sequences with coarse node-type histograms (an upper bound on difflib's ratio)."""

    def __init__(self, seqs, owners):
        self.seqs, self.owners = seqs, owners
        self.vocab = {}
        for seq in seqs:
            for element in seq:
                self.vocab.setdefault(_coarse(element), len(self.vocab))
        self.counts = np.zeros((len(seqs), len(self.vocab) + 1), dtype=np.int32)
        for r, seq in enumerate(seqs):
            self.counts[r] = self.histogram(seq)
        self.lengths = np.array([len(s) for s in seqs], dtype=np.int64)

    def histogram(self, seq) -> np.ndarray:
        """Counts of coarse node types (types the benchmarks lack go to a last column that matches nothing)."""
        h = np.zeros(len(self.vocab) + 1, dtype=np.int32)
        other = len(self.vocab)
        for element in seq:
            h[self.vocab.get(_coarse(element), other)] += 1
        return h

    def best_match(self, seq, threshold: float):
        """(similarity, owner) of the most similar benchmark function at or above threshold, or None."""
        if not self.seqs:
            return None
        h = self.histogram(seq)
        h[-1] = 0
        bound = 2 * np.minimum(self.counts, h).sum(1) / (self.lengths + len(seq))
        best = None
        matcher = difflib.SequenceMatcher(None, autojunk=False)
        matcher.set_seq2(seq)
        for r in np.flatnonzero(bound >= threshold):
            matcher.set_seq1(self.seqs[r])
            if matcher.quick_ratio() >= threshold:
                ratio = matcher.ratio()
                if ratio >= threshold and (best is None or ratio > best[0]):
                    best = (ratio, self.owners[r])
        return best


def _coarse(element: str) -> str:
    return element.split(":", 1)[0]


def parse_quietly(code: str):
    """The module AST of code, or None when it does not parse."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return ast.parse(code)
    except (SyntaxError, ValueError, RecursionError, MemoryError):
        return None


def code_trees(text: str) -> list:
    """The ASTs of text: the whole text when it parses, else each ``` code block that parses."""
    tree = parse_quietly(text)
    if tree is not None:
        return [tree]
    return [t for t in (parse_quietly(block) for block in _FENCE.findall(text)) if t is not None]


def function_sequences(code: str, min_nodes: int = 1, max_nodes: int | None = None) -> list:
    """The canonical node sequence of every function in code (nested ones too) with min_nodes..max_nodes nodes."""
    out = []
    for tree in code_trees(code):
        flat = _Flat(tree)
        for i in flat.functions:
            size = flat.ends[i] - i
            if size >= min_nodes and (max_nodes is None or size <= max_nodes):
                out.append(flat.sequence(i))
    return out


def canonical_sequence(func) -> list:
    """A function as a pre-order list of node labels: docstrings dropped, names it binds renamed v0, v1, ...

    Free names (builtins, globals, modules), attribute names, operators and non-string constants are kept;
    strings become "Constant:str" (messages and docstrings reworded do not matter).
    """
    return _Flat(func).sequence(0)


_SCOPES = (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef, ast.Module)


class _Flat:
    """A tree in pre-order without docstrings and contexts: each node's label, the name in it, the name it binds,
    and where its subtree ends (a function's nodes are the slice [i, ends[i]))."""

    def __init__(self, root):
        labels, names, binds, parents, self.functions = [], [], [], [], []
        stack = [(root, -1)]
        while stack:  # iterative: deeply nested expressions would overflow recursion
            node, parent = stack.pop()
            i = len(labels)
            parents.append(parent)
            kind, name, bind, doc = type(node), None, None, None
            if kind is ast.Name:
                label, name = "Name", node.id
                if type(node.ctx) is not ast.Load:
                    bind = name
            elif kind is ast.Attribute:
                label = f"Attribute:{node.attr}"
            elif kind is ast.Constant:
                value = node.value
                label = "Constant:str" if isinstance(value, (str, bytes)) else f"Constant:{value!r}"[:40]
            elif kind is ast.arg:
                label, name, bind = "arg", node.arg, node.arg
            elif kind in _SCOPES:
                label, doc = kind.__name__, _docstring(node)
                if kind is not ast.Module:
                    name = bind = node.name
                    if kind is not ast.ClassDef:
                        self.functions.append(i)
            elif kind is ast.alias:
                label, bind = "alias", (node.asname or node.name).split(".")[0]
            elif kind is ast.ExceptHandler:
                label, bind = "ExceptHandler", node.name
            else:
                label = kind.__name__
            labels.append(label)
            names.append(name)
            binds.append(bind)
            children = []
            for field in node._fields:
                value = getattr(node, field, None)
                if type(value) is list:
                    children.extend(c for c in value if isinstance(c, ast.AST) and c is not doc)
                elif isinstance(value, ast.AST) and not isinstance(value, ast.expr_context):
                    children.append(value)
            children.reverse()
            stack.extend((c, i) for c in children)
        sizes = [1] * len(labels)
        for i in range(len(sizes) - 1, 0, -1):
            sizes[parents[i]] += sizes[i]
        self.labels, self.names, self.binds = labels, names, binds
        self.ends = [i + n for i, n in enumerate(sizes)]

    def sequence(self, i: int) -> list:
        """The canonical labels of the subtree at i, bound names renamed in order of appearance."""
        end = self.ends[i]
        bound = set(self.binds[i:end])
        renamed: dict = {}
        out = []
        for label, name in zip(self.labels[i:end], self.names[i:end]):
            if name is None:
                out.append(label)
            elif name in bound:
                out.append(f"{label}:{renamed.setdefault(name, f'v{len(renamed)}')}")
            else:
                out.append(f"{label}:{name}")
        return out


def _docstring(node):
    """The docstring statement of a module, class or function, or None."""
    if node.body:
        first = node.body[0]
        if isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant) and type(first.value.value) is str:
            return first
    return None


def get_index(cfg: DecontamConfig) -> BenchmarkIndex:
    """The index for cfg, built once per process (forked workers inherit the parent's)."""
    index = _INDEXES.get(cfg)
    if index is None:
        index = _INDEXES[cfg] = BenchmarkIndex(cfg)
    return index


def find_contamination(text: str, index: BenchmarkIndex):
    """(rule, detail) for the first rule the text breaks against the index, or None when it is clean."""
    cfg = index.cfg
    tokens = normalize(text)
    hashes = token_hashes(tokens)
    found = _substring(hashes, index) or _ngrams(tokens, hashes, index)
    if found is None and cfg.ast_threshold is not None:
        found = ast_match(text, index)
    return found


def _describe(index, owner: int, rule: str, **detail) -> tuple:
    item = index.items[owner]
    return rule, {"matched": item.id, "benchmark": item.benchmark, **detail}


def _substring(hashes, index):
    k = index.cfg.min_substring_tokens
    if not len(index.patterns) or len(hashes) < k:
        return None
    heads = window_hashes(hashes, k)
    best = None  # the longest pattern found: twins that normalize alike (HumanEval/56 and 61) are told apart
    for pos in np.flatnonzero(np.isin(heads, index.pattern_keys)):
        for p in np.flatnonzero(index.pattern_keys == heads[pos]):
            pattern = index.patterns[p][2]
            if (best is None or len(pattern) > len(best[1][2])) and \
                    np.array_equal(hashes[pos: pos + len(pattern)], pattern):
                best = (pos, index.patterns[p])
    if best is None:
        return None
    pos, (owner, part, pattern) = best
    return _describe(index, owner, "exact_substring", part=part, tokens=len(pattern), at_token=int(pos))


def _ngrams(tokens, hashes, index):
    n = index.cfg.ngram
    grams = window_hashes(hashes, n)
    if not len(grams) or not len(index.ngram_hashes):
        return None
    where = np.searchsorted(index.ngram_hashes, grams).clip(max=len(index.ngram_hashes) - 1)
    hit = index.ngram_hashes[where] == grams
    if not hit.any():
        return None
    owners = index.ngram_owners[where[hit]]
    counts = np.bincount(owners)
    owner = int(counts.argmax())
    shared = len(np.unique(grams[hit][owners == owner]))
    if shared < index.cfg.min_ngram_matches:
        return None
    first = int(np.flatnonzero(hit)[np.flatnonzero(owners == owner)[0]])
    return _describe(index, owner, "ngram_overlap", ngrams=shared, n=n, example=" ".join(tokens[first: first + n]))


def ast_match(text, index: BenchmarkIndex):
    """("ast_similarity", detail) for the text's function most like a benchmark function, or None."""
    best, functions, t = None, index.functions, index.cfg.ast_threshold
    if functions is None:
        raise ValueError("the AST rule needs an index built with --ast-threshold")
    longest = int(functions.lengths.max() * (2 - t) / t) if len(functions.seqs) else 0
    for seq in function_sequences(text, index.cfg.ast_min_nodes, longest):
        match = functions.best_match(seq, t)
        if match and (best is None or match[0] > best[0]):
            best = match
    if best is None:
        return None
    return _describe(index, best[1], "ast_similarity", similarity=round(best[0], 4),
                     threshold=index.cfg.ast_threshold)


class Decontaminator:
    """A picklable stage filter: drops records that match a benchmark item; pickles only its settings."""

    def __init__(self, cfg: DecontamConfig | None = None, text_key: str = "text"):
        self.cfg = cfg or DecontamConfig()
        self.text_key = text_key

    def params(self) -> dict:
        """The settings, for the stage's resume fingerprint."""
        return {"decontaminate": asdict(self.cfg), "text_key": self.text_key}

    def __call__(self, records) -> Outcome:
        index = get_index(self.cfg)
        return Outcome.by_record(records, lambda record: find_contamination(record[self.text_key], index))
