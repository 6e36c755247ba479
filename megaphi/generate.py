"""Sampling from a PhiForCausalLM with a KV cache: greedy, temperature and nucleus (top-p).

Prompts of different lengths are not padded: they are grouped by length and each group decodes as one batch, so
every row sees exactly its own prompt (no padding masks, the same logits as a single-prompt run).
generate() returns token ids; GenerationStream yields them as they come; TextCompletion turns one row's tokens
into text cut at stop strings (safe to stream); generate_text does prompts-in, texts-out.
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
    stream = GenerationStream(model, input_ids, max_new_tokens, temperature, top_p, eod, stop_ids, stop_strings,
                              decode, generator, vocab_size)
    results: list[list[int]] = [[] for _ in range(stream.num_prompts)]
    for row, token in stream:
        results[row].append(token)
    return results


class GenerationStream:
    """generate() as an iterator of (prompt index, token id), each token as soon as its row accepts it.

    Rows are decoded in groups of equal prompt length, one group after the other; the arguments are checked
    when this is created. Stopping the iteration early (break, close) ends generation.
    """

    def __init__(self, model, input_ids, max_new_tokens, temperature=0.0, top_p=1.0, eod=None, stop_ids=(),
                 stop_strings=(), decode=None, generator=None, vocab_size=None):
        prompts = input_ids.tolist() if isinstance(input_ids, torch.Tensor) else [list(p) for p in input_ids]
        stop_strings = [s for s in stop_strings if s]  # "" is in every text: it would stop at the first token
        _check_args(prompts, max_new_tokens, temperature, top_p, stop_strings, decode,
                    model.config.max_position_embeddings)
        self.num_prompts = len(prompts)
        self._events = _decode_groups(model, prompts, max_new_tokens, temperature, top_p,
                                      set(stop_ids) | ({eod} if eod is not None else set()), stop_strings, decode,
                                      generator, vocab_size)

    def __iter__(self):
        return self._events

    def close(self):
        self._events.close()


@torch.no_grad()
def _decode_groups(model, prompts, max_new_tokens, temperature, top_p, stops, stop_strings, decode, generator,
                   vocab_size):
    config = model.config
    device = next(model.parameters()).device
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
            out = [[] for _ in rows]
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
                    out[j].append(token)
                    yield rows[j], token
                    if stop_strings and any(s in decode(out[j]) for s in stop_strings):
                        done[j] = True
                if all(done):
                    break
    finally:
        model.train(was_training)


class TextCompletion:
    """The text of one generated sequence as its tokens arrive: cut before the first stop string, streamed safely.

    add(token) returns the text that can be shown now: never part of a possible stop string, never a character
    whose bytes are still arriving (a trailing U+FFFD). finish() returns the rest. strip_leading drops leading
    whitespace (a chat reply after "Assistant:").
    """

    def __init__(self, decode, stop_strings=(), strip_leading=False):
        self.decode, self.stops, self.strip_leading = decode, [s for s in stop_strings if s], strip_leading
        self.ids: list[int] = []
        self.stopped = False  # a stop string was found
        self._sent = 0  # characters of the visible text already returned

    def _visible(self, raw: str) -> str:
        return raw.lstrip() if self.strip_leading else raw

    def add(self, token: int) -> str:
        """Takes the next token; returns newly visible text ("" while it may still be a stop or a partial char)."""
        if self.stopped:
            return ""
        self.ids.append(token)
        raw = self.decode(self.ids)
        cut = min((i for i in (raw.find(s) for s in self.stops) if i >= 0), default=-1)
        if cut >= 0:
            self.stopped = True
            return self._emit(self._visible(raw[:cut]))
        hold = max((k for s in self.stops for k in range(1, len(s)) if raw.endswith(s[:k])), default=0)
        hold = max(hold, len(raw) - len(raw.rstrip("\ufffd")))
        return self._emit(self._visible(raw[:len(raw) - hold]))

    def _emit(self, visible: str) -> str:
        new = visible[self._sent:]
        self._sent = max(self._sent, len(visible))
        return new

    @property
    def text(self) -> str:
        """The whole visible text so far (cut at a stop string)."""
        raw = self.decode(self.ids)
        cuts = [i for i in (raw.find(s) for s in self.stops) if i >= 0]
        return self._visible(raw[:min(cuts)] if cuts else raw)

    def finish(self) -> str:
        """The visible text not yet returned by add()."""
        return self._emit(self.text)

    def finish_reason(self, max_new_tokens: int) -> str:
        """Why generation ended: "stop" (a stop string, eod or a stop token) or "length" (max_new_tokens)."""
        return "stop" if self.stopped or len(self.ids) < max_new_tokens else "length"


def generate_text(model, tokenizer, prompts: list[str], max_new_tokens: int, temperature: float = 0.0,
                  top_p: float = 1.0, stop_strings=(), seed: int | None = None) -> list[dict]:
    """Completions of text prompts: [{"text", "tokens" (new ids), "finish_reason"}] in the prompts' order.

    tokenizer is megaphi's (encode, decode, eod, vocab_size); the text is cut before the first stop string.
    """
    ids = [tokenizer.encode(p) or [tokenizer.eod] for p in prompts]  # an empty prompt starts a new document
    device = next(model.parameters()).device
    generator = torch.Generator(device).manual_seed(seed) if seed is not None else None
    out = generate(model, ids, max_new_tokens, temperature, top_p, eod=tokenizer.eod, stop_strings=stop_strings,
                   decode=tokenizer.decode, generator=generator, vocab_size=tokenizer.vocab_size)
    results = []
    for new in out:
        text = TextCompletion(tokenizer.decode, stop_strings)
        for token in new:
            text.add(token)
        results.append({"text": text.text, "tokens": new, "finish_reason": text.finish_reason(max_new_tokens)})
    return results
