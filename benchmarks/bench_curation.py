"""Curation throughput: heuristic filter, dedup and decontamination at P and 2P processes, same run, same corpus.

Corpus: the .py files of this machine's Python standard library (site-packages left out), one jsonl record per
file with its path, built once and cached in --workdir (or given with --corpus). Each stage runs through the
library (megaphi.curate: run_filter_stage + HeuristicFilter, run_dedup with every stage, run_filter_stage +
Decontaminator without and with the AST rule) into a fresh output folder, without resume, at --workers P
processes and then at 2P. The outputs and reports of the two runs must be byte-identical (exit 1 if not).
The 1-minute load average is taken before each run: on a shared machine it says how far to trust the numbers.

    .venv/bin/python benchmarks/bench_curation.py [--workers 1] [--markdown benchmarks/results/DATE-cpu-curation.md]
"""

import argparse
import json
import os
import platform
import shlex
import shutil
import sys
import sysconfig
import tempfile
import time
from datetime import date
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from megaphi.curate.decontaminate import DecontamConfig, Decontaminator, get_index  # noqa: E402
from megaphi.curate.dedup import STAGES, DedupConfig, run_dedup  # noqa: E402
from megaphi.curate.heuristics import HeuristicFilter  # noqa: E402
from megaphi.curate.stage import CHUNK_BYTES, run_filter_stage  # noqa: E402


def build_corpus(path: Path) -> int:
    """The stdlib's .py files, sorted, as {"text", "path"} lines (as examples/demo.py); returns the file count."""
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    files = sorted(p for p in stdlib.rglob("*.py") if "site-packages" not in p.parts)
    count, tmp = 0, path.with_suffix(".jsonl.tmp")
    with tmp.open("w", encoding="utf-8") as out:
        for name in files:
            try:
                text = name.read_text(encoding="utf-8")
            except (UnicodeDecodeError, OSError):  # a few test files are deliberately not UTF-8
                continue
            out.write(json.dumps({"text": text, "path": str(name.relative_to(stdlib))}) + "\n")
            count += 1
    os.replace(tmp, path)
    return count


# --- one run of each stage: returns {row name: seconds} and the files to compare between P and 2P ----------

def heuristics(corpus, out, workers, chunk_bytes):
    f = HeuristicFilter()
    start = time.perf_counter()
    summary = run_filter_stage("heuristics", [str(corpus)], f"{out}/kept.jsonl", f, workers=workers,
                               report=f"{out}/report.jsonl", resume=False, progress=False, params=f.params(),
                               chunk_bytes=chunk_bytes)
    return {"heuristics": time.perf_counter() - start}, ["kept.jsonl", "report.jsonl"], summary


def dedup(corpus, out, workers, chunk_bytes):
    cfg = DedupConfig(inputs=[str(corpus)], output=f"{out}/kept.jsonl", workdir=f"{out}/work", workers=workers,
                      report=f"{out}/report.jsonl", resume=False, progress=False, chunk_bytes=chunk_bytes)
    start = time.perf_counter()
    result = run_dedup(cfg, "all")
    seconds = {"dedup (all stages)": time.perf_counter() - start}
    seconds.update({f"  dedup {s}": result[s]["seconds"] for s in STAGES})
    return seconds, ["kept.jsonl", "report.jsonl"], result["summary"]


def decontaminate(ast_threshold):
    cfg = DecontamConfig(ast_threshold=ast_threshold)
    name = "decontaminate" + (f" --ast-threshold {ast_threshold}" if ast_threshold else "")

    def run(corpus, out, workers, chunk_bytes):
        process = Decontaminator(cfg)  # its index was built by main() before the clock: forked workers inherit it
        start = time.perf_counter()
        summary = run_filter_stage("decontaminate", [str(corpus)], f"{out}/kept.jsonl", process, workers=workers,
                                   report=f"{out}/report.jsonl", resume=False, progress=False,
                                   params=process.params(), chunk_bytes=chunk_bytes)
        return {name: time.perf_counter() - start}, ["kept.jsonl", "report.jsonl"], summary
    return run


def identical(a: Path, b: Path, files) -> bool:
    return all((a / f).read_bytes() == (b / f).read_bytes() for f in files)


def table(rows, mb) -> list:
    """Markdown table lines: stage, processes, MB in, seconds, MB/s, speedup vs P, load before the run."""
    lines = ["| stage | processes | MB in | seconds | MB/s | speedup vs P | load (1 min) before |",
             "|---|---|---|---|---|---|---|"]
    base = {}
    for name, procs, secs, load in rows:
        base.setdefault(name, secs)
        lines.append(f"| {name} | {procs} | {mb:.1f} | {secs:.2f} | {mb / secs:.2f} | {base[name] / secs:.2f}x | "
                     f"{load if load is not None else '—'} |")
    return lines


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workers", type=int, default=1, help="P: the first run's processes (the second uses 2P)")
    p.add_argument("--corpus", type=Path, default=None, help="a jsonl with a text field (default: the stdlib)")
    p.add_argument("--workdir", type=Path, default=Path(tempfile.gettempdir()) / "megaphi-bench-curation",
                   help="where the stdlib corpus is cached and the runs write (their outputs are removed)")
    p.add_argument("--stages", default="heuristics,dedup,decontaminate,decontaminate-ast",
                   help="comma-separated subset of heuristics,dedup,decontaminate,decontaminate-ast")
    p.add_argument("--chunk-bytes", type=int, default=CHUNK_BYTES, help="input bytes per work item")
    p.add_argument("--markdown", type=Path, default=None, help="also write the table, date, machine and command")
    args = p.parse_args()
    if args.workers < 1:
        p.error("--workers must be >= 1")

    args.workdir.mkdir(parents=True, exist_ok=True)
    corpus = args.corpus
    if corpus is None:
        corpus = args.workdir / "stdlib.jsonl"
        if not corpus.exists():
            print(f"building corpus from {sysconfig.get_paths()['stdlib']} ...", flush=True)
            build_corpus(corpus)
    mb = corpus.stat().st_size / 1e6
    records = sum(1 for _ in open(corpus, "rb"))
    cpus, usable = os.cpu_count(), len(os.sched_getaffinity(0))
    procs = (args.workers, 2 * args.workers)
    print(f"corpus: {corpus} ({records:,} records, {mb:.1f} MB); processes {procs[0]} and {procs[1]}; "
          f"cpus: {cpus} ({usable} usable); load average {os.getloadavg()[0]:.2f}", flush=True)

    known = {"heuristics": heuristics, "dedup": dedup, "decontaminate": decontaminate(None),
             "decontaminate-ast": decontaminate(0.9)}
    wanted = [s.strip() for s in args.stages.split(",") if s.strip()]
    if unknown := [s for s in wanted if s not in known]:
        p.error(f"--stages: unknown {unknown} (known: {', '.join(known)})")
    notes = []
    for threshold, stage in ((None, "decontaminate"), (0.9, "decontaminate-ast")):
        if stage in wanted:  # the benchmark index is built once per process, outside the timed runs
            start = time.perf_counter()
            get_index(DecontamConfig(ast_threshold=threshold))
            notes.append(f"{stage} index built in {time.perf_counter() - start:.2f} s (not in the timings)")
            print(notes[-1], flush=True)

    rows, loads, mismatched = [], [], []
    runs = args.workdir / "runs"
    for stage in wanted:
        outs = []
        for n in procs:
            out = runs / f"{stage}-{n}"
            shutil.rmtree(out, ignore_errors=True)
            out.mkdir(parents=True)
            load = round(os.getloadavg()[0], 2)
            loads.append(load)
            seconds, files, summary = known[stage](corpus, out, n, args.chunk_bytes)
            for i, (name, secs) in enumerate(seconds.items()):
                rows.append((name, n, secs, load if i == 0 else None))
                print(f"{name:<36}{n:>3} processes {secs:>8.2f} s {mb / secs:>8.2f} MB/s  (load before {load})",
                      flush=True)
            outs.append(out)
        same = identical(*outs, files)
        dropped = ", ".join(f"{reason} {count}" for reason, count in sorted(summary.dropped.items())) or "none"
        notes.append(f"{stage}: {summary.records_in:,} records in, {summary.kept:,} kept; dropped: {dropped}")
        print(notes[-1], flush=True)
        print(f"{stage}: outputs at {procs[0]} and {procs[1]} processes byte-identical: {same}", flush=True)
        if not same:
            mismatched.append(stage)
        else:
            for out in outs:
                shutil.rmtree(out)
    # rows in table order: each stage at P then 2P, dedup's sub-stages under their total
    order = {name: i for i, (name, *_) in enumerate(rows)}
    rows.sort(key=lambda r: (order[r[0]], r[1]))
    lines = table(rows, mb)
    verdict = ("outputs byte-identical between P and 2P for every stage" if not mismatched else
               f"OUTPUTS DIFFER between P and 2P for: {', '.join(mismatched)} (kept under {runs})")
    print("\n" + "\n".join(lines) + f"\n\n{verdict}; load average before the runs {min(loads)}-{max(loads)}; "
          f"cpus {cpus} ({usable} usable)")
    if args.markdown:
        command = " ".join(shlex.quote(a) for a in [Path(sys.executable).name, *sys.argv])
        text = [f"# Curation throughput ({date.today().isoformat()})", "",
                f"Machine: {platform.node()}, {platform.machine()}, {cpus} CPUs ({usable} usable), "
                f"Python {platform.python_version()}; load average before the runs {min(loads)}-{max(loads)}.",
                f"Command: `{command}`", f"Corpus: {corpus} ({records:,} records, {mb:.1f} MB).", "",
                *lines, "", f"{verdict}.", "", *[f"- {n}" for n in notes], ""]
        args.markdown.parent.mkdir(parents=True, exist_ok=True)
        args.markdown.write_text("\n".join(text))
    return 1 if mismatched else 0


if __name__ == "__main__":
    sys.exit(main())
