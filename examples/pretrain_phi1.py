"""Pretrains phi-1 with the paper's hyperparameters (examples/configs/pretrain_phi1.yaml); any flag overrides them.

    torchrun --nproc_per_node 1 examples/pretrain_phi1.py --data-path DATA_text_document \
        --tokenizer-type HuggingFaceTokenizer --tokenizer-model TOKENIZER_DIR --save runs/phi1
    python examples/pretrain_phi1.py --config my.yaml --preset phi-1-small --micro-batch-size 8 ...
"""

from pathlib import Path

from megaphi.train.trainer import main

DEFAULTS = Path(__file__).resolve().parent / "configs" / "pretrain_phi1.yaml"

if __name__ == "__main__":
    main(defaults=DEFAULTS, description=__doc__)
