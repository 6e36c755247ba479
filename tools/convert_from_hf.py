"""Convert a HuggingFace phi folder into a megaphi checkpoint to fine-tune or generate from.

    python tools/convert_from_hf.py --hf phi-1/ --save runs/phi1-base
    python examples/finetune_phi1.py --load runs/phi1-base --save runs/phi1-ft --data-path ... \\
        --tokenizer-type huggingface --tokenizer-model runs/phi1-base/tokenizer

Reads transformers' PhiForCausalLM (model.safetensors, sharded or not, or pytorch_model.bin) and the older phi-1
releases (`layers.N.mixer.Wqkv` or `transformer.h.N.mixer.Wqkv` names, n_embd/n_layer/rotary_dim config keys).
Writes iteration 0 of --save, for --tensor-model-parallel-size N if given, and copies the folder's tokenizer to
--save/tokenizer.
"""

import argparse
import sys


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--hf", required=True, help="the HF folder (config.json + weights [+ tokenizer])")
    p.add_argument("--save", required=True, help="the megaphi checkpoint folder to write")
    p.add_argument("--tensor-model-parallel-size", type=int, default=1, help="layout of the saved checkpoint")
    p.add_argument("--force", action="store_true", help="write even if --save already holds checkpoints")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    from megaphi.hf.convert import convert_from_hf, trainer_flags

    try:
        result = convert_from_hf(args.hf, args.save, args.tensor_model_parallel_size, args.force)
    except (ValueError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    config, tok = result["config"], result["tokenizer"]
    print(f"wrote {result['checkpoint']} ({result['naming']} names): {config.num_layers} layers, hidden "
          f"{config.hidden_size}, vocab {config.vocab_size} (rows {config.padded_vocab_size}), rotary_dim "
          f"{config.rotary_dim}, rope_theta {config.rope_theta:g}")
    shape = trainer_flags(config)
    tok_flags = [] if tok is None else ["--tokenizer-type", tok["tokenizer_type"], "--tokenizer-model",
                                        tok["tokenizer_model"]]
    if tok is None:
        print("note: the folder has no tokenizer; pass --tokenizer-type/--tokenizer-model when using it")
    if shape is None:
        print(f"note: no model preset has rotary_dim {config.rotary_dim}, rope_theta {config.rope_theta:g} and "
              f"vocab rows {config.padded_vocab_size}: the trainer's flags cannot rebuild this shape; "
              f"generate or evaluate with --load {args.save} {' '.join(tok_flags)}".rstrip())
    else:
        print("fine-tune with: python examples/finetune_phi1.py " + " ".join(["--load", args.save, *shape, *tok_flags])
              + " ...")
    return 0


if __name__ == "__main__":
    sys.exit(main())
