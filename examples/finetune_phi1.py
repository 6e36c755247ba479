"""Fine-tunes a pretrained phi-1 checkpoint (--load) with a fresh optimizer and the paper's fine-tuning settings.

Defaults are examples/configs/finetune_phi1.yaml (batch 256, lr 1e-4, 50 warmup, weight decay 0.01); any flag
overrides them. A fine-tuning run that is stopped resumes from its own --save folder.

    python examples/finetune_phi1.py --load runs/phi1 --save runs/phi1-ft --data-path EXERCISES_text_document \
        --tokenizer-type HuggingFaceTokenizer --tokenizer-model TOKENIZER_DIR
"""

from pathlib import Path

from megaphi.train.trainer import main

DEFAULTS = Path(__file__).resolve().parent / "configs" / "finetune_phi1.yaml"

if __name__ == "__main__":
    main(defaults=DEFAULTS, description=__doc__, finetune=True)
