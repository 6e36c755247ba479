"""Mean-pooled hidden states of a code model: the features of the learned quality filter (phi-1 section 2.1).

    embedder = Embedder(EmbedderSpec(load="checkpoints/run"))   # or hf="phi-1/" (a local HF folder)
    features = embedder.embed(texts)                             # float32 (len(texts), hidden_size)

Backends: "megaphi" runs megaphi's PhiForCausalLM (a megaphi checkpoint, or an HF phi folder converted on load);
"transformers" runs transformers.AutoModel on an HF folder of any architecture (e.g. a code encoder); "auto"
picks megaphi for checkpoints and phi folders, transformers for other HF folders. Texts are truncated to
max_tokens, sorted by length and batched; batches are right-padded and the mean is taken over the real tokens only.
This is the only module of megaphi.curate that imports megaphi.model / megaphi.hf.
"""

import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

PHI_MODEL_TYPES = ("phi", "phi-msft", "mixformer-sequential")
BACKENDS = ("auto", "megaphi", "transformers")


@dataclass(frozen=True)
class EmbedderSpec:
    """Which model embeds the texts, and how."""

    load: str | None = None
    """A megaphi checkpoint folder (its `latest` or --iteration) or one iter_ folder."""
    hf: str | None = None
    """A local HuggingFace model folder."""
    backend: str = "auto"
    """auto | megaphi | transformers (see the module docstring)."""
    iteration: int | None = None
    """Checkpoint iteration to load (with load); default the latest."""
    max_tokens: int = 512
    """Texts are truncated to their first max_tokens tokens (and to the model's context length)."""
    batch_size: int = 16
    """Texts per forward pass."""
    device: str | None = None
    """cuda when a GPU is visible, else cpu."""
    dtype: str = "fp32"
    """fp32 | bf16 | fp16 for the forward pass; features are always returned as float32."""
    tokenizer_type: str | None = None
    tokenizer_model: str | None = None

    def __post_init__(self):
        if (self.load is None) == (self.hf is None):
            raise ValueError("give exactly one of --load (a megaphi checkpoint) and --hf (a HuggingFace folder) "
                             "for the embedding model")
        if self.backend not in BACKENDS:
            raise ValueError(f"--embed-backend must be one of {BACKENDS}, got {self.backend!r}")
        if self.load is not None and self.backend == "transformers":
            raise ValueError("--embed-backend transformers needs --hf (a HuggingFace folder), not --load")
        if self.max_tokens < 1 or self.batch_size < 1:
            raise ValueError(f"--max-tokens and --batch-size must be >= 1, got {self.max_tokens}, {self.batch_size}")

    def to_dict(self) -> dict:
        return asdict(self)

    def resolved_backend(self) -> str:
        """The backend "auto" stands for: megaphi for checkpoints and phi folders, else transformers."""
        if self.backend != "auto":
            return self.backend
        if self.load is not None:
            return "megaphi"
        config = Path(self.hf) / "config.json"
        if not config.is_file():
            raise ValueError(f"--hf {self.hf}: no config.json (not a HuggingFace model folder)")
        model_type = json.loads(config.read_text()).get("model_type")
        return "megaphi" if model_type in PHI_MODEL_TYPES else "transformers"


def _pick_device(device: str | None) -> str:
    """The spec's device; a bare "cuda" under mpiexec/srun becomes this node-local rank's GPU."""
    from megaphi.hf.loading import check_device, default_device

    device = check_device(device or default_device())
    if device == "cuda" and torch.cuda.device_count() > 1:
        for var in ("OMPI_COMM_WORLD_LOCAL_RANK", "MPI_LOCALRANKID", "PMI_LOCAL_RANK", "SLURM_LOCALID", "LOCAL_RANK"):
            if os.environ.get(var, "").isdigit():
                return f"cuda:{int(os.environ[var]) % torch.cuda.device_count()}"
    return device


class Embedder:
    """A loaded model and tokenizer that turn texts into mean-pooled last hidden states."""

    def __init__(self, spec: EmbedderSpec):
        from megaphi.hf.convert import TORCH_DTYPES

        if spec.dtype not in TORCH_DTYPES:
            raise ValueError(f"--dtype must be one of {sorted(TORCH_DTYPES)}, got {spec.dtype!r}")
        self.spec, self.backend = spec, spec.resolved_backend()
        self.device = _pick_device(spec.device)
        self.dtype = TORCH_DTYPES[spec.dtype]
        if self.backend == "megaphi":
            self._load_megaphi()
        else:
            self._load_transformers()
        self.max_tokens = min(spec.max_tokens, self.context)

    def _load_megaphi(self):
        from megaphi.hf.loading import load_model_and_tokenizer

        model, tokenizer = load_model_and_tokenizer(self.spec.load, self.spec.hf, self.spec.iteration, self.device,
                                                    self.spec.dtype, self.spec.tokenizer_type,
                                                    self.spec.tokenizer_model)
        self.model, self.dim, self.context = model.model, model.config.hidden_size, model.config.max_position_embeddings
        self._encode, self._pad_id = tokenizer.encode_batch, tokenizer.eod

    def _load_transformers(self):
        from transformers import AutoModel, AutoTokenizer
        from transformers.utils import logging

        if not Path(self.spec.hf).is_dir():
            raise ValueError(f"--hf {self.spec.hf}: no such folder")
        verbosity, bar = logging.get_verbosity(), logging.is_progress_bar_enabled()
        logging.set_verbosity_error()  # AutoModel lists the LM head it leaves out as "unexpected" keys
        logging.disable_progress_bar()
        try:
            tokenizer = AutoTokenizer.from_pretrained(self.spec.hf)
            self.model = AutoModel.from_pretrained(self.spec.hf, dtype=self.dtype).to(self.device).eval()
        finally:
            logging.set_verbosity(verbosity)
            if bar:
                logging.enable_progress_bar()
        cfg = self.model.config
        self.dim = cfg.hidden_size
        self.context = getattr(cfg, "max_position_embeddings", None) or self.spec.max_tokens
        self._encode = lambda texts: tokenizer(list(texts), add_special_tokens=False, truncation=True,
                                               max_length=self.max_tokens)["input_ids"]
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        self._pad_id = pad if pad is not None else 0

    def tokenize(self, texts) -> list[list[int]]:
        """Token ids of each text, truncated to max_tokens; an empty text becomes one pad token."""
        return [ids[:self.max_tokens] or [self._pad_id] for ids in self._encode(list(texts))]

    @torch.no_grad()
    def _hidden(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Last hidden states (batch, seq, hidden) of right-padded ids."""
        if self.backend == "megaphi":
            # Causal attention: right padding cannot change the states of the real tokens before it, so no mask.
            return self.model(ids)
        return self.model(input_ids=ids, attention_mask=mask).last_hidden_state

    def embed_ids(self, token_ids: list[list[int]], progress: bool = False) -> np.ndarray:
        """float32 (n, hidden) mean-pooled features of tokenized texts, in their order."""
        out = np.zeros((len(token_ids), self.dim), dtype=np.float32)
        order = sorted(range(len(token_ids)), key=lambda i: len(token_ids[i]))  # little padding per batch
        batches = [order[i:i + self.spec.batch_size] for i in range(0, len(order), self.spec.batch_size)]
        for batch in tqdm(batches, desc="embed", unit="batch", disable=not progress):
            width = max(len(token_ids[i]) for i in batch)
            ids = torch.full((len(batch), width), self._pad_id, dtype=torch.long)
            mask = torch.zeros((len(batch), width), dtype=torch.long)
            for row, i in enumerate(batch):
                ids[row, :len(token_ids[i])] = torch.tensor(token_ids[i])
                mask[row, :len(token_ids[i])] = 1
            ids, mask = ids.to(self.device), mask.to(self.device)
            hidden = self._hidden(ids, mask).float()
            pooled = (hidden * mask.unsqueeze(-1)).sum(1) / mask.sum(1, keepdim=True)
            out[batch] = pooled.cpu().numpy()
        return out

    def embed(self, texts, progress: bool = False) -> np.ndarray:
        """float32 (len(texts), hidden) mean-pooled last hidden states of texts, in their order."""
        return self.embed_ids(self.tokenize(texts), progress)

    def describe(self) -> dict:
        """What a saved classifier records about its features, to check them when scoring."""
        paths = {k: os.path.abspath(v) for k, v in (("load", self.spec.load), ("hf", self.spec.hf)) if v}
        return {**self.spec.to_dict(), **paths, "backend": self.backend, "hidden_size": self.dim,
                "max_tokens": self.max_tokens}
