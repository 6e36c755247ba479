"""An OpenAI-compatible HTTP server for a megaphi model: /v1/completions, /v1/chat/completions, /v1/models.

Python's ThreadingHTTPServer; one request generates at a time (a lock around the model), all prompts and `n`
samples of a request in one batch. Parameters: prompt (a string, a list of strings, token ids or lists of them),
messages, max_tokens (max_completion_tokens), temperature (default 1, 0 = greedy), top_p, n, stop, seed, stream
(server-sent events, ending with `data: [DONE]`; stream_options.include_usage adds a usage chunk). Bad input gets
a 400 with an OpenAI-style {"error": {...}} body; parameters megaphi does not implement (logprobs, echo, suffix,
penalties, logit_bias, tools) are refused with a 400 rather than ignored. Any `model` name is accepted.

phi-1 is a base model, so chat uses a plain template: one "Role: content" line per message (System, User,
Assistant), then "Assistant:"; the reply is the continuation with its leading whitespace removed, cut before
a line that starts another turn ("\\nUser:", "\\nSystem:", "\\nAssistant:") or any other stop string.
"""

import json
import sys
import threading
import time
import traceback
import uuid
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import torch

from megaphi.generate import GenerationStream, TextCompletion

CHAT_ROLES = {"system": "System", "developer": "System", "user": "User", "assistant": "Assistant"}
CHAT_STOPS = ("\nUser:", "\nSystem:", "\nAssistant:")
MAX_N = 128
MAX_BODY = 16 << 20
UNSUPPORTED = {"logprobs": (None, False, 0), "top_logprobs": (None, 0), "echo": (None, False), "suffix": (None, ""),
               "presence_penalty": (None, 0), "frequency_penalty": (None, 0), "logit_bias": (None, {}),
               "tools": (None, []), "functions": (None, []), "best_of": (None, 1)}


class RequestError(ValueError):
    """A client error: becomes an OpenAI-style error body with this HTTP status."""

    def __init__(self, message: str, param: str | None = None, status: int = 400):
        super().__init__(message)
        self.param, self.status = param, status


def chat_prompt(messages) -> str:
    """The prompt for a list of chat messages: "Role: content" lines, then "Assistant:"."""
    if not isinstance(messages, list) or not messages:
        raise RequestError("messages must be a non-empty list of {role, content} objects", "messages")
    lines = []
    for i, message in enumerate(messages):
        role = message.get("role") if isinstance(message, dict) else None
        if role not in CHAT_ROLES:
            raise RequestError(f"messages[{i}].role must be one of {sorted(CHAT_ROLES)}, got {role!r}", "messages")
        content = message.get("content")
        if isinstance(content, list):  # content parts: only text
            if not all(isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str)
                       for p in content):
                raise RequestError(f"messages[{i}].content: only text parts are supported", "messages")
            content = "".join(p["text"] for p in content)
        if not isinstance(content, str):
            raise RequestError(f"messages[{i}].content must be a string", "messages")
        lines.append(f"{CHAT_ROLES[role]}: {content}")
    return "\n".join(lines) + "\nAssistant:"


@dataclass
class Sampling:
    """The generation parameters of one request."""

    max_tokens: int
    temperature: float
    top_p: float
    n: int
    stop: list[str]
    seed: int | None
    stream: bool
    include_usage: bool


def _number(body, name, default, low, high, integer=False):
    value = body.get(name, default)
    if value is None:
        value = default
    kinds = (int,) if integer else (int, float)
    if isinstance(value, bool) or not isinstance(value, kinds) or not low <= value <= high:
        kind = "an integer" if integer else "a number"
        raise RequestError(f"{name} must be {kind} in [{low}, {high}], got {value!r}", name)
    return value


def parse_sampling(body: dict, default_max_tokens: int | None, max_context: int) -> Sampling:
    """Sampling parameters from a request body, validated (RequestError naming the parameter)."""
    for name, allowed in UNSUPPORTED.items():
        if name in body and body[name] not in allowed:
            raise RequestError(f"{name} is not supported by this server", name)
    name = "max_completion_tokens" if body.get("max_completion_tokens") is not None else "max_tokens"
    max_tokens = body.get(name)
    if max_tokens is not None:
        max_tokens = _number(body, name, None, 0, max_context, integer=True)
    temperature = _number(body, "temperature", 1.0, 0.0, 2.0)
    top_p = _number(body, "top_p", 1.0, 0.0, 1.0)
    if top_p == 0:
        raise RequestError("top_p must be greater than 0", "top_p")
    n = _number(body, "n", 1, 1, MAX_N, integer=True)
    stop = body.get("stop")
    stop = [] if stop is None else [stop] if isinstance(stop, str) else stop
    if not isinstance(stop, list) or not all(isinstance(s, str) and s for s in stop):
        raise RequestError("stop must be a non-empty string or a list of them", "stop")
    seed = body.get("seed")
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
        raise RequestError(f"seed must be an integer, got {seed!r}", "seed")
    stream = body.get("stream") or False
    options = body.get("stream_options") or {}
    if not isinstance(stream, bool) or not isinstance(options, dict):
        raise RequestError("stream must be a boolean and stream_options an object", "stream")
    return Sampling(default_max_tokens if max_tokens is None else max_tokens, float(temperature), float(top_p), n,
                    stop, seed, stream, bool(options.get("include_usage")))


class Engine:
    """A model, its tokenizer and a lock: turns prompts and sampling parameters into choices."""

    def __init__(self, model, tokenizer, model_name: str):
        self.model, self.tokenizer, self.model_name = model.eval(), tokenizer, model_name
        self.max_context = model.config.max_position_embeddings
        self.device = next(model.parameters()).device
        self.lock = threading.Lock()
        self.created = int(time.time())

    def completion_prompts(self, prompt) -> list[list[int]]:
        """Token ids of a completions `prompt`: a string, a list of strings, token ids, or lists of token ids."""
        if isinstance(prompt, str):
            prompt = [prompt]
        elif isinstance(prompt, list) and prompt and all(isinstance(t, int) for t in prompt):
            prompt = [prompt]
        if not isinstance(prompt, list) or not prompt:
            raise RequestError("prompt must be a string, a list of strings or token ids", "prompt")
        out = []
        for p in prompt:
            if isinstance(p, str):
                ids = self.tokenizer.encode(p)
            elif isinstance(p, list) and all(isinstance(t, int) and not isinstance(t, bool) for t in p):
                if any(not 0 <= t < self.tokenizer.vocab_size for t in p):
                    raise RequestError(f"prompt token ids must be in [0, {self.tokenizer.vocab_size})", "prompt")
                ids = list(p)
            else:
                raise RequestError("prompt must be a string, a list of strings or token ids", "prompt")
            out.append(ids or [self.tokenizer.eod])  # an empty prompt starts a new document
        return out

    def check_length(self, prompts: list[list[int]], sampling: Sampling) -> None:
        longest = max(len(p) for p in prompts)
        if longest + sampling.max_tokens > self.max_context:
            raise RequestError(f"this model's context is {self.max_context} tokens; the prompt has {longest} and "
                               f"max_tokens is {sampling.max_tokens}: shorten the prompt or lower max_tokens",
                               "max_tokens" if longest < self.max_context else "prompt")

    def start(self, prompts: list[list[int]], sampling: Sampling, chat: bool) -> "Job":
        """A generation job (call under self.lock): one choice per prompt and sample, prompt-major."""
        return Job(self, prompts, sampling, chat)


class Job:
    """One request's generation: events() yields (choice index, new text); then finish reasons and usage."""

    def __init__(self, engine: Engine, prompts: list[list[int]], sampling: Sampling, chat: bool):
        tok = engine.tokenizer
        self.sampling, self.prompts = sampling, prompts
        stops = sampling.stop + list(CHAT_STOPS if chat else ())
        rows = [p for p in prompts for _ in range(sampling.n)]
        self.choices = [TextCompletion(tok.decode, stops, strip_leading=chat) for _ in rows]
        seed = sampling.seed if sampling.seed is not None else uuid.uuid4().int
        generator = torch.Generator(engine.device).manual_seed(seed % (1 << 63))
        self.stream = GenerationStream(engine.model, rows, sampling.max_tokens, sampling.temperature,
                                       sampling.top_p, eod=tok.eod, stop_strings=stops, decode=tok.decode,
                                       generator=generator, vocab_size=tok.vocab_size)

    def events(self):
        for row, token in self.stream:
            delta = self.choices[row].add(token)
            if delta:
                yield row, delta
        for i, choice in enumerate(self.choices):
            rest = choice.finish()
            if rest:
                yield i, rest

    def finish_reason(self, i: int) -> str:
        return self.choices[i].finish_reason(self.sampling.max_tokens)

    def usage(self) -> dict:
        prompt = sum(len(p) for p in self.prompts)
        completion = sum(len(c.ids) for c in self.choices)
        return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


class Handler(BaseHTTPRequestHandler):
    """Routes OpenAI API requests to the server's Engine."""

    protocol_version = "HTTP/1.1"
    server_version = "megaphi"

    @property
    def engine(self) -> Engine:
        return self.server.engine

    def handle(self):
        try:
            super().handle()
        except (ConnectionResetError, BrokenPipeError):
            pass  # a client that closed a kept-alive connection (the openai client after a stream): no traceback

    def log_message(self, format, *args):
        if getattr(self.server, "verbose", True):
            super().log_message(format, *args)

    def _send_json(self, status: int, payload: dict) -> None:
        data = json.dumps(payload).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def _send_error(self, status: int, message: str, param: str | None = None) -> None:
        kind = "invalid_request_error" if status < 500 else "server_error"
        self._send_json(status, {"error": {"message": message, "type": kind, "param": param, "code": None}})

    def do_GET(self):
        path = self.path.split("?")[0].rstrip("/")
        e = self.engine
        model = {"id": e.model_name, "object": "model", "created": e.created, "owned_by": "megaphi"}
        if path == "/v1/models":
            self._send_json(200, {"object": "list", "data": [model]})
        elif path == f"/v1/models/{e.model_name}":
            self._send_json(200, model)
        elif path in ("/health", "/v1/health"):
            self._send_json(200, {"status": "ok"})
        else:
            self._send_error(404, f"no such endpoint: GET {path}")

    def do_POST(self):
        path = self.path.split("?")[0].rstrip("/")
        self._streaming = False  # set once a 200 event stream has begun: errors then go into the stream
        try:
            body = self._read_body()
            if path == "/v1/completions":
                self._generate(body, chat=False)
            elif path == "/v1/chat/completions":
                self._generate(body, chat=True)
            else:
                self._send_error(404, f"no such endpoint: POST {path}")
        except RequestError as err:
            self._send_error(err.status, str(err), err.param)
        except (BrokenPipeError, ConnectionResetError):
            self.close_connection = True  # the client went away mid-stream
        except Exception as err:  # a bug, not the client's fault: report it and keep serving
            traceback.print_exc(file=sys.stderr)
            message = f"internal error: {type(err).__name__}: {err}"
            if not self._streaming:
                self._send_error(500, message)
                return
            self.close_connection = True
            try:
                error = {"message": message, "type": "server_error", "param": None, "code": None}
                self._chunk("data: " + json.dumps({"error": error}) + "\n\n")
                self._chunk("")
            except OSError:
                pass

    def _read_body(self) -> dict:
        length = self.headers.get("Content-Length")
        if length is None or not length.isdigit() or int(length) > MAX_BODY:
            self.close_connection = True
            raise RequestError(f"the request needs a JSON body with a Content-Length of at most {MAX_BODY} bytes")
        try:
            body = json.loads(self.rfile.read(int(length)) or b"{}")
        except ValueError as err:
            raise RequestError(f"the request body is not valid JSON: {err}") from None
        if not isinstance(body, dict):
            raise RequestError("the request body must be a JSON object")
        return body

    def _generate(self, body: dict, chat: bool) -> None:
        e = self.engine
        if chat:
            prompts = [e.tokenizer.encode(chat_prompt(body.get("messages")))]
            sampling = parse_sampling(body, None, e.max_context)
            if sampling.max_tokens is None:  # chat default: the rest of the context
                sampling.max_tokens = max(e.max_context - len(prompts[0]), 0)
        else:
            if "prompt" not in body:
                raise RequestError("prompt is required", "prompt")
            prompts = e.completion_prompts(body["prompt"])
            sampling = parse_sampling(body, 16, e.max_context)
        e.check_length(prompts, sampling)
        with e.lock:
            try:
                job = e.start(prompts, sampling, chat)
            except ValueError as err:
                raise RequestError(str(err)) from None
            head = {"id": f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}",
                    "object": "chat.completion" if chat else "text_completion",
                    "created": int(time.time()), "model": e.model_name}
            try:
                if sampling.stream:
                    self._stream(job, head, chat)
                else:
                    self._respond(job, head, chat)
            finally:
                job.stream.close()

    def _respond(self, job: Job, head: dict, chat: bool) -> None:
        for _ in job.events():
            pass
        choices = []
        for i, choice in enumerate(job.choices):
            out = {"index": i, "logprobs": None, "finish_reason": job.finish_reason(i)}
            if chat:
                out["message"] = {"role": "assistant", "content": choice.text}
            else:
                out["text"] = choice.text
            choices.append(out)
        self._send_json(200, {**head, "choices": choices, "usage": job.usage()})

    def _stream(self, job: Job, head: dict, chat: bool) -> None:
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.send_header("Cache-Control", "no-cache")
        self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()
        self._streaming = True
        head = {**head, "object": "chat.completion.chunk" if chat else "text_completion"}
        extra = {"usage": None} if job.sampling.include_usage else {}

        def send(choices: list, **fields) -> None:
            self._chunk("data: " + json.dumps({**head, "choices": choices, **extra, **fields}) + "\n\n")

        def choice(i, text=None, finish=None, role=False):
            if chat:
                delta = {"role": "assistant", "content": ""} if role else {} if text is None else {"content": text}
                return {"index": i, "delta": delta, "logprobs": None, "finish_reason": finish}
            return {"index": i, "text": text or "", "logprobs": None, "finish_reason": finish}

        if chat:
            send([choice(i, role=True) for i in range(len(job.choices))])
        for i, text in job.events():
            send([choice(i, text)])
        send([choice(i, finish=job.finish_reason(i)) for i in range(len(job.choices))])
        if job.sampling.include_usage:
            send([], usage=job.usage())
        self._chunk("data: [DONE]\n\n")
        self._chunk("")  # the zero-length chunk that ends the body

    def _chunk(self, text: str) -> None:
        data = text.encode()
        self.wfile.write(f"{len(data):X}\r\n".encode() + data + b"\r\n")
        self.wfile.flush()


def make_server(engine: Engine, host: str = "127.0.0.1", port: int = 8000, verbose: bool = True):
    """A ThreadingHTTPServer serving engine (port 0 picks a free port: see server.server_address)."""
    server = ThreadingHTTPServer((host, port), Handler)
    server.daemon_threads = True
    server.engine, server.verbose = engine, verbose
    return server
