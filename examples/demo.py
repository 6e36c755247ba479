"""The CPU demo: Python stdlib → tokenizer → indexed dataset → a few minutes of phi-style pretraining → a completion."""

import argparse
import json
import subprocess
import sys
import sysconfig
import time
from pathlib import Path

from tqdm import tqdm

REPO = Path(__file__).resolve().parent.parent
PROMPT = "def fibonacci(n):\n    "


def step(title: str) -> None:
    """Prints a step header."""
    print(f"\n=== {title} ===", flush=True)


def run(cmd: list[str]) -> None:
    """Runs one of megaphi's command-line tools, echoing the command as a user would type it."""
    shown = " ".join(str(c) for c in cmd).replace(sys.executable, "python")
    print(f"$ {shown}", flush=True)
    subprocess.run([str(c) for c in cmd], check=True, cwd=REPO)


def build_corpus(out: Path, max_files: int) -> Path:
    """Writes the .py files of this machine's Python standard library as a jsonl corpus (one file per line)."""
    corpus = out / "stdlib.jsonl"
    if corpus.exists():
        print(f"reusing {corpus}")
        return corpus
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    files = sorted(p for p in stdlib.rglob("*.py") if "site-packages" not in p.parts)[:max_files]
    tmp = corpus.with_suffix(".jsonl.tmp")
    n_bytes = 0
    with tmp.open("w", encoding="utf-8") as f:
        for path in tqdm(files, desc="corpus", unit="file"):
            try:
                text = path.read_text(encoding="utf-8")
            except (UnicodeDecodeError, OSError):
                continue
            n_bytes += len(text.encode())
            f.write(json.dumps({"text": text, "path": str(path.relative_to(stdlib))}) + "\n")
    tmp.replace(corpus)
    print(f"{len(files)} files, {n_bytes / 1e6:.1f} MB of Python from {stdlib}")
    return corpus


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", type=Path, default=REPO / "demo_out", help="where everything is written")
    parser.add_argument("--max-files", type=int, default=2000, help="stdlib files in the corpus")
    parser.add_argument("--vocab-size", type=int, default=4096, help="tokenizer vocabulary")
    parser.add_argument("--train-iters", type=int, default=900, help="pretraining iterations")
    parser.add_argument("--fresh", action="store_true", help="retrain from scratch instead of resuming")
    args = parser.parse_args()
    out = args.out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    start = time.time()

    step("1/5 corpus: the Python standard library on this machine")
    corpus = build_corpus(out, args.max_files)

    step("2/5 tokenizer: sentencepiece BPE for code")
    tokenizer = out / "code_tokenizer.model"
    if tokenizer.exists():
        print(f"reusing {tokenizer}")
    else:
        run([sys.executable, "tools/train_tokenizer.py", "--input", corpus, "--tokenizer-type", "sentencepiece",
             "--vocab-size", args.vocab_size, "--output", tokenizer])

    step("3/5 preprocess: jsonl → Megatron-compatible .bin/.idx")
    prefix = out / "stdlib"
    data = Path(f"{prefix}_text_document")
    if data.with_suffix(".idx").exists():
        print(f"reusing {data}.bin/.idx")
    else:
        run([sys.executable, "tools/preprocess_data.py", "--input", corpus, "--output-prefix", prefix,
             "--tokenizer-type", "GPTSentencePieceTokenizer", "--tokenizer-model", tokenizer,
             "--append-eod", "--workers", "2"])

    step("4/5 pretrain a small phi-architecture model on the CPU")
    ckpt = out / "checkpoints"
    cmd = [sys.executable, "examples/pretrain_phi1.py", "--config", "examples/configs/demo.yaml",
           "--data-path", data, "--tokenizer-type", "GPTSentencePieceTokenizer", "--tokenizer-model", tokenizer,
           "--train-iters", args.train_iters, "--save", ckpt]
    if not args.fresh and (ckpt / "latest").exists():
        cmd += ["--load", ckpt]
    run(cmd)
    run([sys.executable, "tools/plot_metrics.py", ckpt / "metrics.jsonl", "--output", out / "plots"])

    step("5/5 sample a completion from the trained model")
    completion = sample(ckpt, tokenizer)
    print(f"prompt + completion:\n{PROMPT}{completion}")

    print(f"\ndone in {(time.time() - start) / 60:.1f} min")
    print(f"checkpoint: {ckpt}\nmetrics:    {ckpt / 'metrics.jsonl'} (TensorBoard: tensorboard --logdir {ckpt})")
    print(f"plots:      {out / 'plots'}")


def sample(ckpt: Path, tokenizer_path: Path) -> str:
    """A sampled completion of PROMPT (temperature 0.7, top-p 0.9, fixed seed) from the latest checkpoint."""
    import torch

    from megaphi.data.tokenizer import build_tokenizer
    from megaphi.generate import generate
    from megaphi.train.checkpoint import load_model

    tok = build_tokenizer("sentencepiece", str(tokenizer_path))
    model = load_model(ckpt)
    ids = torch.tensor([tok.encode(PROMPT)])
    generator = torch.Generator().manual_seed(0)
    new = generate(model, ids, max_new_tokens=64, temperature=0.7, top_p=0.9, eod=tok.eod,
                   vocab_size=tok.vocab_size, generator=generator)[0]
    return tok.decode(new)


if __name__ == "__main__":
    main()
