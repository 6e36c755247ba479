"""The phi-1 data recipe in one command: raw code + an LLM endpoint -> pretraining and fine-tuning datasets.

Stages (each a tool of tools/, each resumable: rerun the same command after a crash and finished work is kept):
  1 heuristics      tools/filter_code.py --heuristics      line lengths, alphanumerics, generated/data files, parse
  2 dedup           tools/dedup.py                         exact + MinHash LSH near-duplicates
  3 quality         tools/filter_code.py --annotate/--train/--score
                    an LLM judge labels a sample for "educational value", a random forest on the embeddings of a
                    code model learns the labels, and every file is scored; files under --threshold are dropped
  4 textbooks       tools/generate_synthetic.py textbook   synthetic textbook sections from the endpoint
  5 exercises       tools/generate_synthetic.py exercises  docstring + solution exercises, kept when they parse
  6 decontaminate   tools/decontaminate.py                 13-gram, substring (and AST for exercises) vs HumanEval/MBPP
  7 tokenize        tools/preprocess_data.py               indexed datasets: code, textbooks (pretrain), exercises
Then it prints every stage's counts and the --data-path lines for examples/pretrain_phi1.py and finetune_phi1.py.

    python examples/data_recipe_phi1.py --input /data/the-stack-python --extensions .py --workdir runs/data \\
        --base-url https://api.openai.com/v1 --model gpt-3.5-turbo --chat --embed-load runs/phi1-small \\
        --tokenizer-type HuggingFaceTokenizer --tokenizer-model tokenizers/phi1 --num-textbooks 20000 \\
        --num-exercises 20000 --workers 16

    # this machine, on the CPU: the demo's 2,000 stdlib files, with the `make demo` model served as the endpoint
    python examples/data_recipe_phi1.py --demo
"""

import argparse
import json
import os
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
TOOLS = REPO / "tools"
DEMO_OUT = REPO / "demo_out"


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--demo", action="store_true",
                   help="the CPU demo: stdlib sources, the `make demo` checkpoint as endpoint, embedder and tokenizer")
    g = p.add_argument_group("data")
    g.add_argument("--input", nargs="+", help="raw code: jsonl/parquet files or source folders")
    g.add_argument("--extensions", nargs="+", default=[".py"], help="source files taken from folders")
    g.add_argument("--workdir", help="where every stage writes (default runs/data_recipe; --demo: demo_out/recipe)")
    g.add_argument("--workers", type=int, default=os.cpu_count() or 1, help="processes per stage")
    g = p.add_argument_group("endpoint (judge and synthetic data)")
    g.add_argument("--base-url", help="an OpenAI-compatible endpoint, e.g. http://127.0.0.1:8000/v1")
    g.add_argument("--model", help="the model name sent to the endpoint")
    g.add_argument("--serve-checkpoint", help="start tools/serve.py on this megaphi checkpoint and use it instead")
    g.add_argument("--chat", action="store_true", help="use /chat/completions")
    g.add_argument("--api-key-env", default="OPENAI_API_KEY", help="environment variable holding the API key")
    g.add_argument("--concurrency", type=int, default=8, help="requests in flight")
    g = p.add_argument_group("quality filter")
    g.add_argument("--labels", nargs="+", help="human labels jsonl (instead of asking the judge)")
    g.add_argument("--annotate-sample", type=int, default=2000, help="files the judge labels")
    g.add_argument("--judge-max-chars", type=int, default=4000, help="characters of each file shown to the judge")
    g.add_argument("--proxy-labels", action="store_true",
                   help="label the sample with a docstring/comment-density rule instead of the judge (for endpoints "
                        "too small to judge, like the demo's; say so when you report results)")
    g.add_argument("--embed-load", help="the embedding model: a megaphi checkpoint (or --embed-hf)")
    g.add_argument("--embed-hf", help="the embedding model: a local HuggingFace folder")
    g.add_argument("--embed-max-tokens", type=int, default=512, help="tokens of each file embedded")
    g.add_argument("--threshold", type=float, default=0.5, help="keep files whose quality probability >= this")
    g = p.add_argument_group("synthetic data")
    g.add_argument("--num-textbooks", type=int, default=1000)
    g.add_argument("--num-exercises", type=int, default=1000)
    g.add_argument("--textbook-max-tokens", type=int, default=None)
    g.add_argument("--exercise-max-tokens", type=int, default=None)
    g.add_argument("--exercise-style", choices=["instruct", "completion"], default="instruct",
                   help="completion for a base-model endpoint: it writes the body of a given signature + docstring")
    g.add_argument("--temperature", type=float, default=1.0, help="sampling temperature of the synthetic data")
    g.add_argument("--run-tests", action="store_true", help="keep only exercises whose own asserts pass")
    g.add_argument("--seed", type=int, default=0)
    g = p.add_argument_group("tokenize")
    g.add_argument("--tokenizer-type", help="as tools/preprocess_data.py")
    g.add_argument("--tokenizer-model")
    g.add_argument("--textbook-weight", type=float, default=None,
                   help="fraction of pretraining tokens from textbooks (default: in proportion to their tokens)")
    return p.parse_args(argv)


def demo_defaults(args) -> None:
    """--demo: the stdlib, and the model, tokenizer and sizes that make a few-minute CPU run."""
    ckpt, tokenizer = DEMO_OUT / "checkpoints", DEMO_OUT / "code_tokenizer.model"
    if not (ckpt / "latest").exists() or not tokenizer.exists() or not (DEMO_OUT / "stdlib.jsonl").exists():
        sys.exit("error: --demo uses the model and tokenizer of the CPU demo: run `make demo` first")
    args.input = args.input or [str(DEMO_OUT / "stdlib.jsonl")]  # the demo's corpus: 2,000 stdlib files
    args.workdir = args.workdir or str(DEMO_OUT / "recipe")
    args.serve_checkpoint = args.serve_checkpoint or str(ckpt)
    args.embed_load = args.embed_load or str(ckpt)
    args.embed_max_tokens = min(args.embed_max_tokens, 256)
    args.tokenizer_type = args.tokenizer_type or "GPTSentencePieceTokenizer"
    args.tokenizer_model = args.tokenizer_model or str(tokenizer)
    args.workers = min(args.workers, 2)
    args.concurrency = min(args.concurrency, 2)
    args.annotate_sample = min(args.annotate_sample, 300)
    args.num_textbooks = min(args.num_textbooks, 24)
    args.num_exercises = min(args.num_exercises, 48)
    args.textbook_max_tokens = args.textbook_max_tokens or 96  # the demo model has a 256-token context
    args.exercise_max_tokens = args.exercise_max_tokens or 96
    args.judge_max_chars = min(args.judge_max_chars, 100)
    args.exercise_style = "completion"  # the demo model is a base model
    args.temperature = min(args.temperature, 0.3)  # a 5M-parameter model writes parseable code only near greedy
    args.proxy_labels = args.proxy_labels or not args.labels


def check_args(args) -> None:
    """A one-line error for a missing or contradictory flag."""
    if not args.input:
        sys.exit("error: --input is required (or --demo)")
    if not (args.tokenizer_type and args.tokenizer_model):
        sys.exit("error: --tokenizer-type and --tokenizer-model are required to build the indexed datasets")
    if not args.serve_checkpoint and not (args.base_url and args.model):
        sys.exit("error: give the endpoint as --base-url and --model, or --serve-checkpoint to start one")
    if not (args.embed_load or args.embed_hf):
        sys.exit("error: the quality classifier needs an embedding model: --embed-load or --embed-hf")
    if args.textbook_weight is not None and not 0 < args.textbook_weight < 1:
        sys.exit(f"error: --textbook-weight must be in (0, 1), got {args.textbook_weight}")


class Recipe:
    """Runs the stages in order into one work folder and collects what each one reports."""

    def __init__(self, args):
        self.args, self.work = args, Path(args.workdir)
        (self.work / "reports").mkdir(parents=True, exist_ok=True)
        self.timings: dict[str, float] = {}
        self.up_to_date: list[str] = []  # stages that found their work done and changed nothing

    def path(self, name: str) -> str:
        return str(self.work / name)

    def run(self, stage: str, cmd: list, outputs: tuple = ()) -> None:
        """Run one tool; a failure stops the recipe with the tool's own message above. A tool that left its
        outputs as they were (it resumed and found its work done) is reported up to date."""
        print(f"\n=== {stage} ===", flush=True)
        before = [file_stats(path) for path in outputs if os.path.exists(path)]
        start = time.perf_counter()
        result = subprocess.run([sys.executable, *map(str, cmd)], cwd=REPO)
        if result.returncode != 0:
            sys.exit(f"error: stage {stage!r} failed (exit {result.returncode}); fix the cause and rerun this "
                     "command: finished stages and chunks are kept")
        self.timings[stage] = self.timings.get(stage, 0.0) + time.perf_counter() - start
        if before and before == [file_stats(path) for path in outputs if os.path.exists(path)]:
            self.done(stage, outputs[0], "(finished earlier: nothing redone)")

    def done(self, stage: str, output: str, note: str = "") -> None:
        """Report a stage whose outputs were already complete."""
        self.up_to_date.append(stage)
        print(f"up to date: {output} {note}".rstrip())

    def run_once(self, stage: str, cmd: list, output: str, inputs: list) -> None:
        """run(), unless output was made by this same command from inputs as they are now (a tool that always
        redoes its work, like --train, would otherwise make every later stage redo its own)."""
        stamp = json.dumps([list(map(str, cmd)), [file_stats(path) for path in inputs]])
        marker = Path(output + ".recipe.json")
        if Path(output).exists() and marker.exists() and marker.read_text() == stamp:
            print(f"\n=== {stage} ===")
            self.done(stage, output)
            return
        self.run(stage, cmd)
        marker.write_text(stamp)

    def common(self) -> list:
        return ["--workers", self.args.workers, "--quiet"]

    def endpoint(self) -> list:
        a = self.args
        flags = ["--base-url", a.base_url, "--model", a.model, "--api-key-env", a.api_key_env,
                 "--concurrency", a.concurrency]
        return flags + (["--chat"] if a.chat else [])

    def embedder(self) -> list:
        a = self.args
        return ["--load", a.embed_load] if a.embed_load else ["--hf", a.embed_hf]

    def filter_code(self) -> str:
        """Stages 1-3: heuristics, dedup, quality; the path of the kept code."""
        a, p = self.args, self.path
        self.run("heuristics", [TOOLS / "filter_code.py", "--heuristics", "--input", *a.input, "--extensions",
                                *a.extensions, "--output", p("1_heuristics.jsonl"), "--report",
                                p("reports/heuristics.jsonl"), *self.common()], (p("1_heuristics.jsonl"),))
        self.run("dedup", [TOOLS / "dedup.py", "--input", p("1_heuristics.jsonl"), "--output", p("2_dedup.jsonl"),
                           "--report", p("reports/dedup.jsonl"), *self.common()], (p("2_dedup.jsonl"),))
        labels = self.labels(p("2_dedup.jsonl"))
        train = [TOOLS / "filter_code.py", "--train", "--labels", *labels, "--input", p("2_dedup.jsonl"),
                 "--classifier", p("quality.joblib"), *self.embedder(), "--max-tokens", a.embed_max_tokens,
                 "--seed", a.seed, "--quiet"]
        self.run_once("quality: train", train, p("quality.joblib"), [*labels, p("2_dedup.jsonl")])
        self.run("quality: score", [TOOLS / "filter_code.py", "--score", "--input", p("2_dedup.jsonl"), "--output",
                                    p("3_quality.jsonl"), "--classifier", p("quality.joblib"), "--threshold",
                                    a.threshold, "--report", p("reports/quality.jsonl"), *self.common()],
                 (p("3_quality.jsonl"),))
        return p("3_quality.jsonl")

    def labels(self, corpus: str) -> list:
        """Labels of a sample: human (--labels), the judge's, or the stand-in rule (--proxy-labels)."""
        a, p = self.args, self.path
        if a.labels:
            return a.labels
        if a.proxy_labels:
            print("\n=== quality: proxy labels ===")
            if not write_proxy_labels(corpus, p("3_labels_proxy.jsonl"), a.annotate_sample, a.seed):
                self.done("quality: proxy labels", p("3_labels_proxy.jsonl"))
            return [p("3_labels_proxy.jsonl")]
        self.run("quality: annotate", [TOOLS / "filter_code.py", "--annotate", "--input", corpus, "--sample",
                                       a.annotate_sample, "--output", p("3_labels.jsonl"), "--judge-max-chars",
                                       a.judge_max_chars, "--seed", a.seed, *self.endpoint(), "--quiet"],
                 (p("3_labels.jsonl"),))
        return [p("3_labels.jsonl")]

    def synthesize(self) -> tuple:
        """Stages 4-5: textbooks and exercises; their paths."""
        a, p = self.args, self.path
        for kind, num, tokens, out in (("textbook", a.num_textbooks, a.textbook_max_tokens, "4_textbooks.jsonl"),
                                       ("exercises", a.num_exercises, a.exercise_max_tokens, "5_exercises.jsonl")):
            cmd = [TOOLS / "generate_synthetic.py", kind, "--output", p(out), "--num", num, "--seed", a.seed,
                   "--temperature", a.temperature, *self.endpoint(), "--quiet"]
            cmd += ["--max-tokens", tokens] if tokens else []
            cmd += ["--run-tests"] if kind == "exercises" and a.run_tests else []
            cmd += ["--style", a.exercise_style] if kind == "exercises" else []
            self.run(kind, cmd, (p(out), p(out.replace(".jsonl", ".rejected.jsonl"))))
        return p("4_textbooks.jsonl"), p("5_exercises.jsonl")

    def decontaminate(self, name: str, source: str, ast: bool) -> str:
        """Stage 6 for one corpus; the path of the clean copy."""
        out = self.path(f"6_{name}.jsonl")
        cmd = [TOOLS / "decontaminate.py", "--input", source, "--output", out, "--benchmarks", "humaneval,mbpp",
               "--report", self.path(f"reports/decontaminate_{name}.jsonl"), *self.common()]
        self.run(f"decontaminate {name}", cmd + (["--ast-threshold", "0.9"] if ast else []), (out,))
        return out

    def tokenize(self, name: str, source: str) -> str:
        """Stage 7 for one corpus; the dataset prefix (skipped when it is already newer than its source)."""
        a = self.args
        prefix = self.work / "datasets" / name
        dataset = Path(f"{prefix}_text_document")
        idx = dataset.with_suffix(".idx")
        if idx.exists() and idx.stat().st_mtime >= Path(source).stat().st_mtime:
            print(f"\n=== tokenize {name} ===")
            self.done(f"tokenize {name}", str(dataset))
            return str(dataset)
        if not any(line.strip() for line in open(source, encoding="utf-8")):
            sys.exit(f"error: {source} kept no record, so there is nothing to tokenize for {name}: see the "
                     f"stage reports in {self.work / 'reports'}")
        prefix.parent.mkdir(exist_ok=True)
        self.run(f"tokenize {name}", [TOOLS / "preprocess_data.py", "--input", source, "--output-prefix", prefix,
                                      "--tokenizer-type", a.tokenizer_type, "--tokenizer-model", a.tokenizer_model,
                                      "--append-eod", "--workers", a.workers, "--quiet"])
        return str(dataset)


def file_stats(path: str) -> tuple:
    """(path, size, mtime): what a rerun compares."""
    stat = os.stat(path)
    return os.path.abspath(path), stat.st_size, stat.st_mtime_ns


def write_proxy_labels(corpus: str, output: str, sample: int, seed: int) -> bool:
    """Labels from a rule (docstrings and comments per line, short functions): a stand-in for the judge. False
    when output already holds them (it is left untouched, so --train sees nothing new)."""
    from megaphi.curate.quality import record_id, sample_records
    from megaphi.curate.records import read_jsonl, write_records

    rows = []
    for record in sample_records(read_jsonl(corpus), sample, seed):
        lines = [line.strip() for line in record["text"].splitlines() if line.strip()] or [""]
        explained = sum(line.startswith(("#", '"""', "'''")) for line in lines) / len(lines)
        defs = sum(line.startswith(("def ", "class ")) for line in lines)
        score = min(10.0, 40 * explained + (3.0 if defs and len(lines) / defs < 40 else 0.0))
        rows.append({"id": record_id(record), "score": round(score, 2), "source": "proxy rule"})
    if os.path.exists(output) and list(read_jsonl(output)) == rows:
        return False
    write_records(output, rows)
    print(f"{len(rows)} files labeled by the stand-in rule -> {output}")
    return True


def start_server(checkpoint: str):
    """tools/serve.py on a free port; (process, base URL, model name) once it answers /health."""
    proc = subprocess.Popen([sys.executable, str(TOOLS / "serve.py"), "--load", checkpoint, "--port", "0", "--quiet",
                             "--model-name", "recipe-endpoint"], stdout=subprocess.PIPE, text=True, cwd=REPO)
    line = proc.stdout.readline()
    if not line.startswith("serving"):
        proc.kill()
        sys.exit(f"error: tools/serve.py --load {checkpoint} did not start ({line.strip() or 'no output'})")
    url = line.split(" on ")[-1].strip()
    for _ in range(100):
        try:
            urllib.request.urlopen(url.removesuffix("/v1") + "/health", timeout=2).read()
            break
        except OSError:
            time.sleep(0.2)
    return proc, url, "recipe-endpoint"


def summarize(recipe: Recipe, datasets: dict) -> dict:
    """Every stage's counts (from the summaries the tools wrote), printed and saved as recipe_summary.json."""
    stages = {}
    for name in ("1_heuristics", "2_dedup", "3_quality", "4_textbooks", "5_exercises", "6_code", "6_textbooks",
                 "6_exercises"):
        summary_file = recipe.work / f"{name}.jsonl.summary.json"
        if summary_file.exists():
            data = json.loads(summary_file.read_text())
            stages[name] = data.get("summary") or synthetic_totals(recipe.work / f"{name}.rejected.jsonl", data)
    classifier_meta = recipe.work / "quality.joblib.json"
    if classifier_meta.exists():
        stages["quality_classifier"] = json.loads(classifier_meta.read_text()).get("metrics", {})
    tokens = {name: dataset_tokens(prefix) for name, prefix in datasets.items()}
    summary = {"stages": stages, "seconds": {k: round(v, 1) for k, v in recipe.timings.items()},
               "up_to_date": recipe.up_to_date,
               "datasets": datasets, "tokens": tokens}
    summary["pretrain_data_path"] = blend(datasets, tokens, recipe.args.textbook_weight)
    summary["finetune_data_path"] = datasets["exercises"]
    (recipe.work / "recipe_summary.json").write_text(json.dumps(summary, indent=1))
    print("\n=== summary ===")
    print(f"{'stage':<14}{'in':>9}{'kept':>9}  dropped (reason: count)")
    for name, s in stages.items():
        if "records_in" in s:
            dropped = ", ".join(f"{r}: {c}" for r, c in (s.get("dropped") or {}).items()) or "-"
            print(f"{name:<14}{s['records_in']:>9,}{s['kept']:>9,}  {dropped}")
    for name, t in tokens.items():
        print(f"dataset {name:<10} {t:>12,} tokens  {datasets[name]}")
    if recipe.up_to_date:
        print(f"up to date, nothing redone: {', '.join(recipe.up_to_date)}")
    print(f"\npretrain:  --data-path {summary['pretrain_data_path']}")
    print(f"finetune:  --data-path {summary['finetune_data_path']}")
    print(f"(all counts: {recipe.work / 'recipe_summary.json'})")
    return summary


def synthetic_totals(rejected: Path, run: dict) -> dict:
    """A synthetic file's totals over all runs: replies, kept, dropped by reason (its rejected file), tokens."""
    from collections import Counter

    reasons = Counter(json.loads(line)["reason"] for line in open(rejected, encoding="utf-8") if line.strip()) \
        if rejected.exists() else Counter()
    kept = run["in_files"]["kept"]
    return {"records_in": kept + sum(reasons.values()), "kept": kept, "dropped": dict(reasons),
            "last_run": {k: run[k] for k in ("requests", "prompt_tokens", "completion_tokens", "seconds")}}


def dataset_tokens(prefix: str) -> int:
    """Tokens in an indexed dataset."""
    from megaphi.data.indexed_dataset import IndexedDataset

    return int(IndexedDataset(prefix).sequence_lengths.sum())


def blend(datasets: dict, tokens: dict, textbook_weight) -> str:
    """The pretraining --data-path: code and textbooks, weighted by tokens or by --textbook-weight."""
    if textbook_weight is None:
        total = tokens["code"] + tokens["textbooks"]
        textbook_weight = tokens["textbooks"] / total if total else 0.0
    return f"{1 - textbook_weight:.4f} {datasets['code']} {textbook_weight:.4f} {datasets['textbooks']}"


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.demo:
        demo_defaults(args)
    args.workdir = args.workdir or "runs/data_recipe"
    check_args(args)
    server = None
    if args.serve_checkpoint:
        server, args.base_url, args.model = start_server(args.serve_checkpoint)
        print(f"endpoint: {args.base_url} (tools/serve.py --load {args.serve_checkpoint})")
    try:
        recipe = Recipe(args)
        code = recipe.filter_code()
        textbooks, exercises = recipe.synthesize()
        clean = {"code": recipe.decontaminate("code", code, ast=False),
                 "textbooks": recipe.decontaminate("textbooks", textbooks, ast=False),
                 "exercises": recipe.decontaminate("exercises", exercises, ast=True)}
        datasets = {name: recipe.tokenize(name, path) for name, path in clean.items()}
        summarize(recipe, datasets)
    finally:
        if server is not None:
            server.terminate()
            server.wait()
    return 0


if __name__ == "__main__":
    sys.exit(main())
