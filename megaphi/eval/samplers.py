"""Where completions come from: a megaphi checkpoint, an HF folder, an OpenAI-compatible endpoint.

Every sampler has `complete(prompts, n, temperature, top_p, max_new_tokens, stop, seed) -> list[list[str]]`:
n raw completions per prompt (the caller truncates at the stop sequences; samplers may stop early on them).
Temperature 0 is greedy.
"""

import os
import warnings
from pathlib import Path

import torch

from megaphi.generate import generate


class MegaphiSampler:
    """megaphi's PhiForCausalLM with the KV-cache generator, batch_size rows at a time."""

    def __init__(self, model, tokenizer, batch_size: int = 8, name: str = "megaphi model"):
        if batch_size < 1:
            raise ValueError(f"--batch-size must be >= 1, got {batch_size}")
        self.model, self.tokenizer, self.batch_size, self.name = model, tokenizer, batch_size, name
        self._warned = False

    def _fit(self, ids: list[int], max_new_tokens: int) -> list[int]:
        """Keeps the last tokens of a prompt that leaves no room for max_new_tokens (warns once)."""
        room = self.model.config.max_position_embeddings - max_new_tokens
        if room < 1:
            raise ValueError(f"--max-new-tokens {max_new_tokens} leaves no room for a prompt in the model's "
                             f"{self.model.config.max_position_embeddings} positions")
        if len(ids) > room and not self._warned:
            warnings.warn(f"prompts longer than {room} tokens keep only their last {room} tokens "
                          f"(max_position_embeddings - max_new_tokens)", stacklevel=3)
            self._warned = True
        return ids[-room:]

    def complete(self, prompts, n=1, temperature=0.0, top_p=1.0, max_new_tokens=512, stop=(), seed=0,
                 progress=None) -> list[list[str]]:
        """n completions per prompt, the text after each prompt."""
        tok = self.tokenizer
        device = next(self.model.parameters()).device
        generator = torch.Generator(device=device).manual_seed(seed) if temperature > 0 else None
        encoded = [self._fit(ids, max_new_tokens) for ids in tok.encode_batch(list(prompts))]
        rows = [(p, ids) for p, ids in enumerate(encoded) for _ in range(n)]
        out: list[list[str]] = [[] for _ in prompts]
        for start in range(0, len(rows), self.batch_size):
            batch = rows[start:start + self.batch_size]
            new = generate(self.model, [ids for _, ids in batch], max_new_tokens, temperature=temperature,
                           top_p=top_p, eod=tok.eod, stop_strings=tuple(stop), decode=tok.decode,
                           generator=generator, vocab_size=tok.vocab_size)
            for (p, ids), new_ids in zip(batch, new):
                # Decoding the prompt with its continuation keeps what sentencepiece drops at a text's start.
                out[p].append(tok.decode(ids + new_ids)[len(tok.decode(ids)):])
            if progress is not None:
                progress(len(batch))
        return out


def checkpoint_sampler(load: str, iteration: int | None = None, tokenizer_type: str | None = None,
                       tokenizer_model: str | None = None, device: str = "cpu", batch_size: int = 8,
                       dtype: str = "fp32") -> MegaphiSampler:
    """A megaphi checkpoint (any layout) with the tokenizer its training config names, or the one given."""
    from megaphi.hf.convert import find_checkpoint_path
    from megaphi.hf.loading import load_model_and_tokenizer

    model, tokenizer = load_model_and_tokenizer(load=load, iteration=iteration, device=device, dtype=dtype,
                                                tokenizer_type=tokenizer_type, tokenizer_model=tokenizer_model)
    return MegaphiSampler(model, tokenizer, batch_size, name=str(find_checkpoint_path(load, iteration)))


def hf_sampler(folder: str, device: str = "cpu", batch_size: int = 8, dtype: str = "fp32",
               backend: str = "megaphi"):
    """An HF phi folder: megaphi's own model with its weights (backend "megaphi", via megaphi.hf), or
    transformers' AutoModelForCausalLM (backend "transformers", for any causal LM)."""
    if backend == "megaphi":
        from megaphi.hf.loading import load_model_and_tokenizer

        model, tokenizer = load_model_and_tokenizer(hf=folder, device=device, dtype=dtype)
        return MegaphiSampler(model, tokenizer, batch_size, name=str(folder))
    if backend == "transformers":
        return TransformersSampler(folder, device, batch_size, dtype)
    raise ValueError(f"--hf-backend must be megaphi or transformers, got {backend!r}")


class TransformersSampler:
    """Any transformers causal LM folder, generating with model.generate (one prompt at a time, n rows)."""

    def __init__(self, folder: str, device: str = "cpu", batch_size: int = 8, dtype: str = "fp32"):
        from transformers import AutoModelForCausalLM, AutoTokenizer

        from megaphi.hf.convert import TORCH_DTYPES
        from megaphi.hf.loading import check_device

        if not Path(folder).is_dir():
            raise ValueError(f"--hf {folder}: no such folder")
        self.tokenizer = AutoTokenizer.from_pretrained(folder)
        self.model = AutoModelForCausalLM.from_pretrained(folder, dtype=TORCH_DTYPES[dtype])
        self.model = self.model.to(check_device(device)).eval()
        self.batch_size, self.name = batch_size, str(folder)

    @torch.no_grad()
    def complete(self, prompts, n=1, temperature=0.0, top_p=1.0, max_new_tokens=512, stop=(), seed=0,
                 progress=None) -> list[list[str]]:
        """n completions per prompt, the text after each prompt."""
        torch.manual_seed(seed)
        device = next(self.model.parameters()).device
        sampling = dict(do_sample=True, temperature=temperature, top_p=top_p) if temperature > 0 else \
            dict(do_sample=False)
        out = []
        for prompt in prompts:
            ids = self.tokenizer(prompt, return_tensors="pt").input_ids.to(device)
            texts = []
            for start in range(0, n, self.batch_size):
                rows = min(self.batch_size, n - start)
                new = self.model.generate(ids.expand(rows, -1), max_new_tokens=max_new_tokens,
                                          pad_token_id=self.tokenizer.eos_token_id, stop_strings=list(stop) or None,
                                          tokenizer=self.tokenizer, **sampling)
                full = self.tokenizer.batch_decode(new, skip_special_tokens=True)
                head = self.tokenizer.decode(ids[0], skip_special_tokens=True)
                texts += [t[len(head):] for t in full]
            out.append(texts)
            if progress is not None:
                progress(n)
        return out


class OpenAISampler:
    """An OpenAI-compatible /v1/completions endpoint (the openai client); the key comes from an env variable."""

    MAX_STOPS = 4  # OpenAI's API refuses more; the rest are cut afterwards

    def __init__(self, base_url: str, model: str, api_key_env: str = "OPENAI_API_KEY"):
        from openai import OpenAI

        self.client = OpenAI(base_url=base_url, api_key=os.environ.get(api_key_env) or "none")
        self.model, self.name = model, f"{model} at {base_url}"

    def complete(self, prompts, n=1, temperature=0.0, top_p=1.0, max_new_tokens=512, stop=(), seed=0,
                 progress=None) -> list[list[str]]:
        """n completions per prompt (one request per prompt)."""
        from openai import OpenAIError

        out = []
        for prompt in prompts:
            try:
                response = self.client.completions.create(
                    model=self.model, prompt=prompt, n=n, temperature=temperature, top_p=top_p,
                    max_tokens=max_new_tokens, stop=list(stop)[:self.MAX_STOPS] or None, seed=seed)
            except OpenAIError as e:
                raise ValueError(f"--openai-base-url {self.client.base_url}: {type(e).__name__}: {e}") from None
            choices = sorted(response.choices, key=lambda c: c.index)
            out.append([c.text for c in choices])
            if progress is not None:
                progress(n)
        return out
