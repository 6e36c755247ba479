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
                       dtype: torch.dtype = torch.float32) -> MegaphiSampler:
    """A megaphi checkpoint (any layout) with the tokenizer its training config names, or the one given."""
    from megaphi.data.tokenizer import build_tokenizer
    from megaphi.train import checkpoint as ckpt

    folder = Path(load)
    path = folder if ckpt.CHECKPOINT_RE.match(folder.name) else ckpt.find_checkpoint(folder, iteration)
    if path is None:
        raise ValueError(f"--load {load}: no checkpoint found" + (f" at iteration {iteration}" if iteration else ""))
    if (tokenizer_type is None) != (tokenizer_model is None):
        raise ValueError("--tokenizer-type and --tokenizer-model go together: give both or neither")
    if tokenizer_type is None:
        meta = ckpt.read_meta(path)
        data = (meta.get("config") or {}).get("data") or meta.get("tokenizer") or {}
        tokenizer_type, tokenizer_model = data.get("tokenizer_type"), data.get("tokenizer_model")
        if not tokenizer_type or not tokenizer_model:
            raise ValueError(f"--load {path} names no tokenizer: pass --tokenizer-type and --tokenizer-model")
    tokenizer = build_tokenizer(tokenizer_type, tokenizer_model)
    model = ckpt.load_model(path, device=device).to(dtype)
    return MegaphiSampler(model, tokenizer, batch_size, name=str(path))


def hf_sampler(folder: str, device: str = "cpu", batch_size: int = 8, dtype: torch.dtype = torch.float32,
               backend: str = "megaphi"):
    """An HF phi folder: megaphi's own model with its weights (backend "megaphi", via megaphi.hf), or
    transformers' AutoModelForCausalLM (backend "transformers", for any causal LM)."""
    if backend == "megaphi":
        from megaphi.hf.convert import load_hf_model
        from megaphi.hf.tokenizer import load_hf_tokenizer

        tokenizer = load_hf_tokenizer(folder)
        if tokenizer is None:
            raise ValueError(f"--hf {folder} has no tokenizer.model or tokenizer.json")
        model = load_hf_model(folder, device=device, dtype=dtype)
        return MegaphiSampler(model, tokenizer, batch_size, name=str(folder))
    if backend == "transformers":
        return TransformersSampler(folder, device, batch_size, dtype)
    raise ValueError(f"--hf-backend must be megaphi or transformers, got {backend!r}")


class TransformersSampler:
    """Any transformers causal LM folder, generating with model.generate (one prompt at a time, n rows)."""

    def __init__(self, folder: str, device: str = "cpu", batch_size: int = 8, dtype: torch.dtype = torch.float32):
        from transformers import AutoModelForCausalLM, AutoTokenizer

        self.tokenizer = AutoTokenizer.from_pretrained(folder)
        self.model = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype).to(device).eval()
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
        out = []
        for prompt in prompts:
            response = self.client.completions.create(
                model=self.model, prompt=prompt, n=n, temperature=temperature, top_p=top_p,
                max_tokens=max_new_tokens, stop=list(stop)[:self.MAX_STOPS] or None, seed=seed)
            choices = sorted(response.choices, key=lambda c: c.index)
            out.append([c.text for c in choices])
            if progress is not None:
                progress(n)
        return out
