"""Sampling from a PhiForCausalLM with a KV cache: greedy, temperature and nucleus (top-p).

Prompts of different lengths are not padded: they are grouped by length and each group decodes as one batch, so
every row sees exactly its own prompt (no padding masks, the same logits as a single-prompt run).
"""

from collections import defaultdict

import torch

from megaphi.model.phi import KVCache


def sample_next(logits, temperature=0.0, top_p=1.0, generator=None):
    """Next token ids (batch,) from logits (batch, vocab): argmax at temperature 0, else sampled within top_p mass."""
    if temperature == 0.0:
        return logits.argmax(dim=-1)
    probs = torch.softmax(logits.float() / temperature, dim=-1)
    if top_p < 1.0:
        sorted_probs, order = probs.sort(dim=-1, descending=True)
        # Drop a token when the tokens ranked above it already hold top_p of the mass; the top token always stays.
        drop = sorted_probs.cumsum(dim=-1) - sorted_probs >= top_p
        sorted_probs = sorted_probs.masked_fill(drop, 0.0)
        probs = torch.zeros_like(probs).scatter_(-1, order, sorted_probs)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


def _check_args(prompts, max_new_tokens, temperature, top_p, stop_strings, decode, max_positions):
    if max_new_tokens < 0:
        raise ValueError(f"max_new_tokens must be >= 0, got {max_new_tokens}")
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0, got {temperature}")
    if not 0.0 < top_p <= 1.0:
        raise ValueError(f"top_p must be in (0, 1], got {top_p}")
    if stop_strings and decode is None:
        raise ValueError("stop_strings need a decode callback (token ids -> text)")
    for i, prompt in enumerate(prompts):
        if not prompt:
            raise ValueError(f"prompt {i} is empty")
        if len(prompt) + max_new_tokens > max_positions:
            raise ValueError(f"prompt {i} has {len(prompt)} tokens; with max_new_tokens={max_new_tokens} it exceeds "
                             f"the model's max_position_embeddings={max_positions}")


@torch.no_grad()
def generate(model, input_ids, max_new_tokens, temperature=0.0, top_p=1.0, eod=None, stop_ids=(),
             stop_strings=(), decode=None, generator=None, vocab_size=None) -> list[list[int]]:
    """Continue each prompt; returns the new token ids per prompt, in the prompts' order.

    input_ids: a (batch, seq) tensor or a list of token-id lists (lengths may differ).
    temperature 0 is greedy; otherwise sampling from softmax(logits / temperature) restricted to top_p mass,
    drawn with generator (a torch.Generator on the model's device) for reproducibility.
    A row stops at eod or any of stop_ids (that token is not returned), or once decode(new ids) contains one of
    stop_strings (the ids are returned up to and including the token that completed it; trim the text yourself).
    vocab_size: never sample ids at or above it (the padded rows of the embedding).
    """
    prompts = input_ids.tolist() if isinstance(input_ids, torch.Tensor) else [list(p) for p in input_ids]
    config = model.config
    _check_args(prompts, max_new_tokens, temperature, top_p, stop_strings, decode, config.max_position_embeddings)
    stops = set(stop_ids) | ({eod} if eod is not None else set())
    device = next(model.parameters()).device
    results: list[list[int]] = [[] for _ in prompts]
    groups = defaultdict(list)
    for i, prompt in enumerate(prompts):
        groups[len(prompt)].append(i)

    was_training = model.training
    model.eval()
    try:
        for length, rows in groups.items():
            if max_new_tokens == 0:
                break
            ids = torch.tensor([prompts[i] for i in rows], dtype=torch.long, device=device)
            cache = KVCache(config.num_layers, len(rows), length + max_new_tokens)
            done = [False] * len(rows)
            tokens = ids
            for step in range(max_new_tokens):
                # Only the last position's logits are needed: skip the LM head for the rest of the prompt.
                logits = model.lm_head(model.model(tokens, kv_cache=cache)[:, -1]).float()
                if vocab_size is not None:
                    logits[:, vocab_size:] = float("-inf")
                tokens = sample_next(logits, temperature, top_p, generator)[:, None]
                for j, token in enumerate(tokens[:, 0].tolist()):
                    if done[j]:
                        continue
                    if token in stops:
                        done[j] = True
                        continue
                    out = results[rows[j]]
                    out.append(token)
                    if stop_strings and any(s in decode(out) for s in stop_strings):
                        done[j] = True
                if all(done):
                    break
    finally:
        model.train(was_training)
    return results
