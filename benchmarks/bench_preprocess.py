"""Preprocessing throughput: tools/preprocess_data.py against a Megatron-style baseline, same run, same corpus.

Corpus: the .py files of this machine's Python standard library, one jsonl document per file. Tokenizer: a 16k
sentencepiece BPE code model trained on that corpus by megaphi.data.tokenizer_training (cached). The baseline
mirrors Megatron-LM's preprocess_data.py: Pool.imap over lines (chunksize 32), per document json.loads +
encode_as_ids, then a np.array per document written by a builder that keeps the index in Python lists. Both
outputs must be byte-identical. Peak RSS (largest process of a run) is measured at two corpus sizes to show
that it stays flat.

    .venv/bin/python benchmarks/bench_preprocess.py [--workers 2] [--repeat 1] [--sizes 1 4 8]
"""

import argparse
import json
import multiprocessing
import os
import struct
import subprocess
import sys
import sysconfig
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
CACHE = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "megaphi" / "bench_preprocess"


def build_corpus(path: Path) -> int:
    """The stdlib's .py files (site-packages left out), sorted, as {"text": ...} lines; returns documents."""
    root = sysconfig.get_paths()["stdlib"]
    files = []
    for folder, dirs, names in os.walk(root):
        dirs[:] = sorted(d for d in dirs if d != "site-packages")
        files += [os.path.join(folder, n) for n in names if n.endswith(".py")]
    count = 0
    with open(path.with_suffix(".tmp"), "w") as out:
        for name in sorted(files):
            try:
                text = Path(name).read_bytes().decode("utf-8")
            except UnicodeDecodeError:  # a few test files are deliberately not UTF-8
                continue
            out.write(json.dumps({"text": text}) + "\n")
            count += 1
    os.replace(path.with_suffix(".tmp"), path)
    return count


def train_model(corpus: Path, model: Path, vocab_size: int) -> Path:
    """A sentencepiece BPE code model trained by megaphi's trainer on the corpus."""
    from megaphi.data.tokenizer_training import train_sentencepiece

    texts = (json.loads(line)["text"] for line in open(corpus))
    train_sentencepiece(texts, str(model), vocab_size=vocab_size, progress=False)
    return model


# --- the Megatron-style baseline (runs in a child process: `--baseline`) ---------------------------------

class BaselineEncoder:
    """Per-document work as Megatron's Encoder does it; the processor lives in a per-worker global."""

    def __init__(self, model: str, append_eod: bool):
        self.model, self.append_eod = model, append_eod

    def initializer(self):
        import sentencepiece as spm

        global SP
        SP = spm.SentencePieceProcessor(model_file=self.model)

    def encode(self, line: str):
        text = json.loads(line)["text"]
        ids = SP.encode_as_ids(text)
        lengths = [len(ids)] if ids else []
        if ids and self.append_eod:
            ids.append(SP.eos_id())
            lengths[-1] += 1
        return ids, lengths, len(line)


class BaselineBuilder:
    """Megatron-style writer: one np.array per document, the index kept in Python lists until the end."""

    def __init__(self, prefix: str, dtype):
        self.prefix, self.dtype = prefix, np.dtype(dtype)
        self.data = open(prefix + ".bin", "wb")
        self.lengths, self.docs = [], [0]

    def add_document(self, ids, lengths):
        self.data.write(np.array(ids, dtype=self.dtype).tobytes(order="C"))
        self.lengths.extend(lengths)
        self.docs.append(len(self.lengths))

    def finalize(self):
        self.data.close()
        pointers, pos = [], 0
        for n in self.lengths:
            pointers.append(pos)
            pos += n * self.dtype.itemsize
        code = {np.dtype(np.uint16): 8, np.dtype(np.int32): 4}[self.dtype]
        with open(self.prefix + ".idx", "wb") as f:
            f.write(b"MMIDIDX\x00\x00" + struct.pack("<QBQQ", 1, code, len(self.lengths), len(self.docs)))
            f.write(np.array(self.lengths, np.int32).tobytes())
            f.write(np.array(pointers, np.int64).tobytes())
            f.write(np.array(self.docs, np.int64).tobytes())


def run_baseline(corpus: str, model: str, out_prefix: str, workers: int) -> None:
    import sentencepiece as spm

    encoder = BaselineEncoder(model, append_eod=True)
    vocab = spm.SentencePieceProcessor(model_file=model).get_piece_size()
    builder = BaselineBuilder(out_prefix + "_text_document", np.uint16 if vocab < 65500 else np.int32)
    with open(corpus, encoding="utf-8") as lines, multiprocessing.Pool(workers, encoder.initializer) as pool:
        for ids, lengths, _ in pool.imap(encoder.encode, lines, 32):
            builder.add_document(ids, lengths)
    builder.finalize()


# --- timing and peak memory ----------------------------------------------------------------------------

def measured(cmd) -> tuple[float, int]:
    """Wall seconds and peak RSS (MiB, the largest single process) of a command run in a fresh child."""
    probe = ("import resource, subprocess, sys, time; t = time.perf_counter(); "
             "subprocess.run(sys.argv[1:], check=True, stdout=subprocess.DEVNULL); "
             "print(time.perf_counter() - t, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)")
    out = subprocess.run([sys.executable, "-c", probe, *cmd], check=True, capture_output=True, text=True)
    secs, rss_kib = out.stdout.split()
    return float(secs), int(rss_kib) // 1024


def same_files(a: str, b: str) -> bool:
    return all(Path(a + e).read_bytes() == Path(b + e).read_bytes() for e in (".bin", ".idx"))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--vocab-size", type=int, default=16000)
    p.add_argument("--repeat", type=int, default=1, help="timed runs of each (best kept)")
    p.add_argument("--sizes", type=int, nargs="+", default=[1, 4, 8], help="corpus copies for the memory runs")
    p.add_argument("--cache-dir", type=Path, default=CACHE)
    p.add_argument("--baseline", nargs=3, metavar=("CORPUS", "MODEL", "OUT"), help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.baseline:
        return run_baseline(*args.baseline, workers=args.workers)

    args.cache_dir.mkdir(parents=True, exist_ok=True)
    corpus = args.cache_dir / "stdlib.jsonl"
    if not corpus.exists():
        print(f"building corpus from {sysconfig.get_paths()['stdlib']} ...", flush=True)
        build_corpus(corpus)
    model = args.cache_dir / f"spm{args.vocab_size // 1000}k.model"
    if not model.exists():
        print(f"training {args.vocab_size} sentencepiece BPE ...", flush=True)
        train_model(corpus, model, args.vocab_size)
    mb = corpus.stat().st_size / 1e6
    print(f"corpus: {corpus} ({mb:.1f} MB), tokenizer: {model}, workers: {args.workers}, cpus: {os.cpu_count()}")

    with tempfile.TemporaryDirectory() as tmp:
        def ours(src: Path, out: str):
            return [sys.executable, str(REPO / "tools" / "preprocess_data.py"), "--input", str(src),
                    "--output-prefix", out, "--tokenizer-type", "GPTSentencePieceTokenizer", "--tokenizer-model",
                    str(model), "--append-eod", "--workers", str(args.workers), "--quiet"]

        def baseline(src: Path, out: str):
            return [sys.executable, __file__, "--workers", str(args.workers), "--baseline", str(src), str(model), out]

        best, peak = {}, {}
        for _ in range(args.repeat):  # alternate the two, keep each one's best time
            for name, cmd in (("megatron-style", baseline), ("megaphi", ours)):
                secs, rss = measured(cmd(corpus, f"{tmp}/{name}"))
                best[name], peak[name] = min(secs, best.get(name, secs)), max(rss, peak.get(name, rss))
        from megaphi.data.indexed_dataset import IndexedDataset

        tokens = IndexedDataset(f"{tmp}/megaphi_text_document").num_tokens
        identical = same_files(f"{tmp}/megaphi_text_document", f"{tmp}/megatron-style_text_document")
        print(f"{'run':<16}{'seconds':>9}{'MB/s':>8}{'Mtok/s':>8}{'peak RSS MiB':>14}")
        for name, secs in best.items():
            print(f"{name:<16}{secs:>9.2f}{mb / secs:>8.2f}{tokens / secs / 1e6:>8.2f}{peak[name]:>14}")
        ratio = best["megatron-style"] / best["megaphi"]
        print(f"speedup megaphi / megatron-style: {ratio:.2f}x (target >= 2x); outputs byte-identical: {identical}")
        if not identical:
            sys.exit("outputs differ")

        print(f"megaphi peak RSS (largest process) as the corpus grows:\n{'copies':>7}{'MB':>8}{'MB/s':>8}{'MiB':>7}")
        for size in args.sizes:
            src = corpus
            if size > 1:
                src = Path(tmp) / f"x{size}.jsonl"
                with open(src, "wb") as f:
                    for _ in range(size):
                        f.write(corpus.read_bytes())
            secs, rss = (best["megaphi"], peak["megaphi"]) if size == 1 else measured(ours(src, f"{tmp}/x{size}"))
            print(f"{size:>7}{mb * size:>8.0f}{mb * size / secs:>8.2f}{rss:>7}")
            if size > 1:
                os.remove(src)
                for ext in (".bin", ".idx"):
                    os.remove(f"{tmp}/x{size}_text_document{ext}")

if __name__ == "__main__":
    main()
