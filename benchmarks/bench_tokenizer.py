"""Tokenizer speed on real code: plain sentencepiece vs megaphi's encode_batch, same run, same ids.

Corpus: the .py files of this machine's Python standard library (site-packages left out). Tokenizer: a
sentencepiece code model (--tokenizer-model), by default a 16k one trained on that corpus and cached.
Prints MB/s and tokens/s (wall clock and CPU time: the machine may be shared) for
  sentencepiece   SentencePieceProcessor.encode_as_ids per document (what each Megatron worker does)
  native          our encode_batch, C++ segment cache (cold cache: a fresh tokenizer), then warm
  python          our encode_batch, pure-Python segment cache (cold)
and checks that every backend gives the same ids. With --hf-model, also HuggingFace encode vs encode_batch.

    python benchmarks/bench_tokenizer.py [--tokenizer-model m.model] [--limit-mb 10] [--hf-model dir]
"""

import argparse
import os
import pathlib
import sys
import sysconfig
import time

REPO = pathlib.Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from megaphi.data.tokenizer import build_tokenizer  # noqa: E402
from megaphi.data.tokenizer_training import train_sentencepiece  # noqa: E402


def stdlib_corpus(limit_mb: float | None = None) -> list[str]:
    """The UTF-8 .py files of the standard library, sorted by path (site-packages left out)."""
    root = pathlib.Path(sysconfig.get_paths()["stdlib"])
    texts, size = [], 0
    for path in sorted(root.rglob("*.py")):
        if "site-packages" in path.parts or "dist-packages" in path.parts:
            continue
        try:
            text = path.read_text(encoding="utf-8")
        except (UnicodeDecodeError, OSError):
            continue
        texts.append(text)
        size += len(text.encode("utf-8"))
        if limit_mb and size >= limit_mb * 1e6:
            break
    return texts


def stdlib_model(vocab_size: int, cache_dir: str) -> str:
    """A sentencepiece code model trained on the stdlib corpus (cached in cache_dir)."""
    path = os.path.join(cache_dir, f"stdlib_code{vocab_size // 1000}k.model")
    if not os.path.isfile(path):
        print(f"training {path} (once) ...", flush=True)
        start = time.perf_counter()
        train_sentencepiece(stdlib_corpus(), path, vocab_size)
        print(f"  {time.perf_counter() - start:.0f} s", flush=True)
    return path


def timed(fn, texts, batch: int):
    """(ids per text, wall seconds, cpu seconds) of fn over the texts, `batch` texts per call."""
    wall, cpu = time.perf_counter(), time.process_time()
    ids = []
    for i in range(0, len(texts), batch):
        ids += fn(texts[i:i + batch])
    return ids, time.perf_counter() - wall, time.process_time() - cpu


def report(name: str, ids, wall: float, cpu: float, mb: float, base) -> None:
    tokens = sum(map(len, ids))
    ratio = "" if base is None else f"  x{base[0] / wall:5.2f} wall  x{base[1] / cpu:5.2f} cpu"
    print(f"{name:<22} {mb / wall:7.2f} MB/s {tokens / wall / 1e6:6.2f} Mtok/s (wall)"
          f"   {mb / cpu:7.2f} MB/s (cpu){ratio}", flush=True)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tokenizer-model", help="sentencepiece .model (default: 16k model trained on the corpus)")
    p.add_argument("--vocab-size", type=int, default=16000, help="of the default model")
    p.add_argument("--cache-dir", default=os.path.join(os.path.expanduser("~"), ".cache", "megaphi"))
    p.add_argument("--limit-mb", type=float, default=None, help="use only the first MB of the corpus")
    p.add_argument("--batch", type=int, default=64, help="documents per encode_batch call")
    p.add_argument("--hf-model", help="also time a HuggingFace tokenizer.json folder")
    args = p.parse_args(argv)

    texts = stdlib_corpus(args.limit_mb)
    mb = sum(len(t.encode("utf-8")) for t in texts) / 1e6
    model = args.tokenizer_model or stdlib_model(args.vocab_size, args.cache_dir)
    print(f"corpus: {len(texts)} stdlib files, {mb:.1f} MB; model: {model}; cpus: {os.cpu_count()}")

    plain = build_tokenizer("sentencepiece", model, backend="sentencepiece")
    ref, wall, cpu = timed(lambda batch: [plain.sp.encode_as_ids(t) for t in batch], texts, args.batch)
    report("sentencepiece", ref, wall, cpu, mb, None)
    base = (wall, cpu)
    ok = True
    for backend in ("native", "python"):
        try:
            tok = build_tokenizer("sentencepiece", model, backend=backend)
        except ValueError as e:
            print(f"{backend:<22} unavailable: {e}")
            continue
        runs = ("cold", "warm") if backend == "native" else ("cold",)
        for run in runs:
            ids, wall, cpu = timed(tok.encode_batch, texts, args.batch)
            report(f"{backend} ({run})", ids, wall, cpu, mb, base)
            same = ids == ref
            ok &= same
            if not same:
                bad = next(i for i, (a, b) in enumerate(zip(ids, ref)) if a != b)
                print(f"  MISMATCH: {backend} ids differ from sentencepiece, first at document {bad}")
    print("ids identical to sentencepiece:", "yes" if ok else "NO")

    if args.hf_model:
        hf = build_tokenizer("huggingface", args.hf_model)
        ref, wall, cpu = timed(lambda batch: [hf.tk.encode(t).ids for t in batch], texts, args.batch)
        report("hf encode", ref, wall, cpu, mb, None)
        ids, wall2, cpu2 = timed(hf.encode_batch, texts, args.batch)
        report("hf encode_batch", ids, wall2, cpu2, mb, (wall, cpu))
        print("hf ids identical:", "yes" if ids == ref else "NO")
        ok &= ids == ref
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
