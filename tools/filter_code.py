"""Filter a code corpus: StarCoder-style heuristics, or phi-1's learned "educational value" classifier.

    # 1. rule-based filters, one drop count per rule
    python tools/filter_code.py --heuristics --input raw.jsonl --output clean.jsonl --report dropped.jsonl
    # 2a. label a sample with an LLM judge (any OpenAI-compatible endpoint; rerun to resume) ...
    python tools/filter_code.py --annotate --input clean.jsonl --sample 2000 --output labels.jsonl \\
        --base-url http://127.0.0.1:8000/v1 --model gpt-4
    #     ... or bring human labels ({"id" or "path" or "text", "label" or "score"} per line)
    python tools/filter_code.py --annotate --labels human.jsonl --output labels.jsonl
    # 2b. embed the labeled files with a code model, train a random forest (+ logistic regression baseline)
    python tools/filter_code.py --train --labels labels.jsonl --input clean.jsonl --load runs/phi1 \\
        --classifier quality.joblib
    # 2c. score everything (processes on one node, or mpiexec -n N across nodes), keep score >= threshold
    python tools/filter_code.py --score --input clean.jsonl --output good.jsonl --classifier quality.joblib \\
        --threshold 0.5 --workers 4

Inputs are jsonl (.gz), parquet or source folders (with --extensions). Records keep every field; --score adds
`quality_score`. --heuristics, --score and --annotate (LLM judge) write OUTPUT.summary.json and resume an
interrupted run.
"""

import argparse
import json
import os
import sys

from megaphi.curate.cli import add_stage_args, run_tool
from megaphi.curate.heuristics import HeuristicFilter, add_heuristic_args, heuristic_config


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    mode = p.add_mutually_exclusive_group(required=True)
    for name, text in (("heuristics", "drop files by the rule-based filters"),
                       ("annotate", "label files with an LLM judge (or normalize --labels human labels)"),
                       ("train", "train the quality classifier on labels"),
                       ("score", "score files with the classifier and keep those >= --threshold")):
        mode.add_argument(f"--{name}", action="store_true", help=text)
    g = add_stage_args(p, required=False)
    g.add_argument("--id-key", default="id", help="the field naming a record (else its path, else a text hash)")
    add_heuristic_args(p)
    g = p.add_argument_group("--annotate: the LLM judge")
    g.add_argument("--base-url", help="OpenAI-compatible endpoint, e.g. http://127.0.0.1:8000/v1")
    g.add_argument("--model", help="model name sent to the endpoint")
    g.add_argument("--api-key-env", default="OPENAI_API_KEY", help="environment variable holding the API key")
    g.add_argument("--chat", action="store_true", help="use /chat/completions instead of /completions")
    g.add_argument("--timeout", type=float, default=120.0, help="seconds per request")
    g.add_argument("--max-retries", type=int, default=6)
    g.add_argument("--concurrency", type=int, default=8, help="requests in flight")
    g.add_argument("--sample", type=int, default=None, help="annotate a reproducible sample of this many files")
    g.add_argument("--seed", type=int, default=0, help="seed of the sample, the judge and the train/test split")
    g.add_argument("--judge-max-chars", type=int, default=4000, help="characters of each file shown to the judge")
    g.add_argument("--judge-max-tokens", type=int, default=16, help="tokens of the judge's reply")
    g.add_argument("--label-threshold", type=float, default=5.0, help="a 0-10 score >= this is a positive label")
    g = p.add_argument_group("--train / --score: labels, embedding model, classifier")
    g.add_argument("--labels", nargs="+", default=[], help="label jsonl files (--annotate output or human labels)")
    g.add_argument("--classifier", help="the classifier file (.joblib; its metadata in FILE.json)")
    g.add_argument("--classifier-type", choices=["random_forest", "logistic_regression"], default="random_forest",
                   help="which of the two trained classifiers to save (both are evaluated)")
    g.add_argument("--test-fraction", type=float, default=0.2, help="labels held out for precision/recall/AUC")
    g.add_argument("--n-estimators", type=int, default=200, help="trees of the random forest")
    g.add_argument("--threshold", type=float, default=0.5, help="--score keeps files with probability >= this")
    g.add_argument("--load", help="embedding model: a megaphi checkpoint folder (--score: default the trained one)")
    g.add_argument("--hf", help="embedding model: a local HuggingFace folder")
    g.add_argument("--iteration", type=int, default=None, help="checkpoint iteration of --load")
    g.add_argument("--embed-backend", choices=["auto", "megaphi", "transformers"], default=None)
    g.add_argument("--max-tokens", type=int, default=None,
                   help="tokens of each file embedded (default 512; --score: the trained value)")
    g.add_argument("--batch-size", type=int, default=None, help="files per forward pass (default 16)")
    g.add_argument("--device", default=None, help="cpu, cuda, cuda:1 (default: cuda if available)")
    g.add_argument("--dtype", choices=["fp32", "bf16", "fp16"], default=None)
    g.add_argument("--tokenizer-type", default=None, help="override the embedding model's tokenizer")
    g.add_argument("--tokenizer-model", default=None)
    return p.parse_args(argv)


def embed_fields(args) -> dict:
    """The EmbedderSpec fields the flags set (None: not given)."""
    return {"load": args.load, "hf": args.hf, "iteration": args.iteration, "backend": args.embed_backend,
            "max_tokens": args.max_tokens, "batch_size": args.batch_size, "device": args.device, "dtype": args.dtype,
            "tokenizer_type": args.tokenizer_type, "tokenizer_model": args.tokenizer_model}


def need(args, *flags) -> None:
    """ValueError naming the first of flags (attribute names) that is missing for this mode."""
    mode = next(m for m in ("heuristics", "annotate", "train", "score") if getattr(args, m))
    for flag in flags:
        if not getattr(args, flag.replace("-", "_")):
            raise ValueError(f"--{mode} needs --{flag}")


def run_stage(args, name, process, params):
    from megaphi.curate.stage import mpi_world, run_filter_stage

    need(args, "input", "output")
    if args.workers < 1 or args.chunk_bytes < 1:
        raise ValueError(f"--workers and --chunk-bytes must be >= 1, got {args.workers}, {args.chunk_bytes}")
    summary = run_filter_stage(name, args.input, args.output, process, text_key=args.text_key, workers=args.workers,
                               report=args.report, extensions=args.extensions, resume=not args.no_resume,
                               progress=not args.quiet, params=params, keep_dropped=args.keep_dropped,
                               chunk_bytes=args.chunk_bytes)
    if mpi_world()[0] == 0:
        print(summary.format())


def heuristics(args) -> None:
    cfg = heuristic_config(args)
    process = HeuristicFilter(cfg, text_key=args.text_key)
    run_stage(args, "heuristics", process, process.params())


def annotate(args) -> None:
    from megaphi.curate import quality
    from megaphi.curate.records import read_jsonl, read_records, write_atomic, write_records

    need(args, "output")
    if args.labels:  # human labels: check them and write them in the annotation format
        items, skipped = quality.read_labels(args.labels, args.id_key, args.text_key, args.label_threshold)
        if args.input:
            quality.attach_texts(items, read_records(args.input, args.text_key, args.extensions), args.id_key,
                                 args.text_key)
        if os.path.exists(args.output) and any(r.get("source") != "human" for r in read_jsonl(args.output)):
            raise ValueError(f"--output {args.output} holds LLM annotations, which human labels would replace: "
                             "write them to another file and pass both to --train --labels")
        rows = [{"id": i.id, "label": i.label, "source": "human",
                 **({args.text_key: i.text} if i.text is not None else {})} for i in items]
        write_records(args.output, rows)
        print(f"annotate: {len(rows)} human labels ({sum(i.label for i in items)} positive, {skipped} without a "
              f"label skipped) -> {args.output}")
        return
    from megaphi.curate.llm import EndpointConfig, LLMClient

    need(args, "input", "base-url", "model")
    client = LLMClient(EndpointConfig(args.base_url, args.model, args.api_key_env, args.timeout, args.max_retries,
                                      chat=args.chat))
    records = read_records(args.input, args.text_key, args.extensions, progress=not args.quiet)
    if args.sample is not None:
        if args.sample < 1:
            raise ValueError(f"--sample must be >= 1, got {args.sample}")
        records = quality.sample_records(records, args.sample, args.seed, args.id_key, args.text_key)
    else:
        records = list(records)
    counts = quality.annotate(records, client, args.output, id_key=args.id_key, text_key=args.text_key,
                              max_chars=args.judge_max_chars, max_tokens=args.judge_max_tokens, seed=args.seed,
                              label_threshold=args.label_threshold, concurrency=args.concurrency,
                              progress=not args.quiet)
    write_atomic(f"{args.output}.summary.json", json.dumps(counts, indent=1) + "\n")  # as generate_synthetic's
    print(f"annotate: {json.dumps(counts)} -> {args.output}")
    if counts["unparseable"] and not counts["scored"]:
        print(f"warning: no reply held a 0-10 score; read the replies in {args.output} (an instruction-following "
              "--model, or --chat, may be needed)", file=sys.stderr)
    if counts["failed"]:
        raise RuntimeError(f"{counts['failed']} requests failed after retries: rerun to retry them")


def train(args) -> None:
    import numpy as np

    from megaphi.curate import quality
    from megaphi.curate.embed import Embedder, EmbedderSpec
    from megaphi.curate.records import read_records

    need(args, "labels", "classifier")
    items, skipped = quality.read_labels(args.labels, args.id_key, args.text_key, args.label_threshold)
    if any(i.text is None for i in items):
        if not args.input:
            raise ValueError("some labels carry no text: pass the corpus they name as --input")
        quality.attach_texts(items, read_records(args.input, args.text_key, args.extensions), args.id_key,
                             args.text_key)
    embedder = Embedder(EmbedderSpec(**{k: v for k, v in embed_fields(args).items() if v is not None}))
    features = embedder.embed([i.text for i in items], progress=not args.quiet)
    labels = np.array([i.label for i in items])
    results = quality.train_classifiers(features, labels, test_fraction=args.test_fraction, seed=args.seed,
                                        n_estimators=args.n_estimators)
    chosen = results[args.classifier_type]
    meta = {"classifier_type": chosen.name, "embedder": embedder.describe(),
            "metrics": {name: r.metrics for name, r in results.items()},
            "labels": {"files": [os.path.abspath(p) for p in args.labels], "n": len(items),
                       "positive": int(labels.sum()), "skipped": skipped, "label_threshold": args.label_threshold},
            "seed": args.seed, "test_fraction": args.test_fraction}
    quality.save_classifier(args.classifier, chosen.model, meta)
    print(f"train: {len(items)} labeled files ({int(labels.sum())} positive, {skipped} skipped), "
          f"{features.shape[1]}-dim features from {embedder.backend} model {args.load or args.hf}")
    print(quality.format_metrics(results))
    print(f"saved {chosen.name} -> {args.classifier} (+ {quality.meta_path(args.classifier)})")


def score(args) -> None:
    from megaphi.curate.quality import QualityScorer, load_classifier

    need(args, "classifier")
    _, meta = load_classifier(args.classifier)  # fail here, not in every worker
    overrides = {k: v for k, v in embed_fields(args).items() if v is not None}
    # Processes sharing this node's cores each get their share of torch threads (oversubscribed OpenMP crawls).
    local_ranks = next((int(os.environ[v]) for v in ("OMPI_COMM_WORLD_LOCAL_SIZE", "MPI_LOCALNRANKS")
                        if os.environ.get(v, "").isdigit()), 1)
    sharing = args.workers * local_ranks
    threads = max(1, (os.cpu_count() or 1) // sharing) if sharing > 1 else None
    process = QualityScorer(args.classifier, args.threshold, args.text_key, overrides, threads)
    params = {"classifier": os.path.abspath(args.classifier), "created": meta.get("created"),
              "threshold": args.threshold, "overrides": overrides}
    run_stage(args, "quality", process, params)


def main(argv=None) -> int:
    args = parse_args(argv)
    mode = next(m for m in ("heuristics", "annotate", "train", "score") if getattr(args, m))
    return run_tool({"heuristics": heuristics, "annotate": annotate, "train": train, "score": score}[mode], args)


if __name__ == "__main__":
    sys.exit(main())
