"""Convert a megaphi checkpoint (any parallel layout) into a HuggingFace transformers PhiForCausalLM folder.

    python tools/convert_to_hf.py --load runs/phi1 --output phi1-hf --verify
    python tools/convert_to_hf.py --load runs/phi1/iter_0006000 --output phi1-hf --dtype bf16 \\
        --tokenizer-type sentencepiece --tokenizer-model code16k.model

The folder holds config.json, generation_config.json, model.safetensors (sharded past --max-shard-size, with
model.safetensors.index.json) and tokenizer files; `AutoModelForCausalLM.from_pretrained(DIR)` and
`AutoTokenizer.from_pretrained(DIR)` load it without remote code. The tokenizer is the one the checkpoint's
training config names unless --tokenizer-type/--tokenizer-model are given. The folder is written beside --output
and renamed into place when complete. --verify loads it with transformers (fp32) and compares its logits with
megaphi's on random and real token ids; exit status 1 when the largest difference exceeds --tolerance.
"""

import argparse
import sys

from megaphi.hf.config import DTYPES


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--load", required=True, help="a --save folder (its latest checkpoint) or an iter_ folder")
    p.add_argument("--output", required=True, help="the HF folder to write")
    p.add_argument("--iteration", type=int, default=None, help="which checkpoint of --load (default: the latest)")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="fp32", help="dtype of the saved weights")
    p.add_argument("--tokenizer-type", default=None, help="override the checkpoint's tokenizer (sentencepiece or "
                   "huggingface, with --tokenizer-model)")
    p.add_argument("--tokenizer-model", default=None, help="a sentencepiece .model file or a tokenizer.json folder")
    p.add_argument("--max-shard-size", default="5GB", help="split model.safetensors past this size (default 5GB)")
    p.add_argument("--force", action="store_true", help="replace a non-empty --output")
    p.add_argument("--verify", action="store_true", help="compare transformers' logits with megaphi's afterwards")
    p.add_argument("--tolerance", type=float, default=1e-4, help="largest logit difference --verify accepts")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    from megaphi.hf.convert import TORCH_DTYPES, convert_to_hf, read_weights_checkpoint

    try:
        result = convert_to_hf(args.load, args.output, args.iteration, args.dtype, args.tokenizer_type,
                               args.tokenizer_model, args.max_shard_size, args.force)
    except (ValueError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    config, tokenizer = result["config"], result["tokenizer"]
    print(f"wrote {result['output']} from {result['checkpoint']}: {len(result['files'])} weight file(s), "
          f"{config.num_layers} layers, hidden {config.hidden_size}, vocab rows {config.padded_vocab_size}, "
          f"tokenizer {tokenizer.name} (eos id {tokenizer.eod})")
    if not args.verify:
        return 0
    from megaphi.hf.verify import verify

    _, state_dict = read_weights_checkpoint(result["checkpoint"])
    ok, diffs = verify(result["output"], config, state_dict, tokenizer, TORCH_DTYPES[args.dtype], args.tolerance)
    details = ", ".join(f"{name} ids {diff:.3g}" for name, diff in diffs.items())
    print(f"verify: largest |logit difference| transformers vs megaphi: {max(diffs.values()):.3g} ({details}); "
          f"tolerance {args.tolerance:g}: {'OK' if ok else 'FAILED'}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
