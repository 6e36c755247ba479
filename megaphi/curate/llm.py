"""A retrying client for OpenAI-compatible endpoints, a resumable jsonl log, and bounded-concurrency requests.

    client = LLMClient(EndpointConfig("http://127.0.0.1:8000/v1", "phi-1", timeout=60, max_retries=5))
    out = ResumableJsonl("annotations.jsonl")            # a torn last line (a killed run) is cut off on open
    jobs = [{"id": "a", "prompt": "..."}, ...]
    summary = run_concurrently(client, jobs, out.done_ids(), lambda job, c: out.append({...}), concurrency=8)

Requests go through the `openai` package with its own retries off: LLMClient retries 429s (waiting what
Retry-After / retry-after-ms asks), 5xx, timeouts, connection errors and malformed bodies with exponential
backoff and jitter; any other 4xx fails at once (a wrong model name or key will not fix itself). The API key is
read from the environment variable named in the config, handed to the client and never printed or logged.
"""

import fcntl
import json
import math
import os
import random
import threading
import time
from collections import Counter
from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait
from dataclasses import dataclass, field

import openai

RETRY_KINDS = ("rate_limit", "server_error", "timeout", "connection", "malformed")
NO_KEY = "unused"  # what local servers get when the key variable is unset: the openai client insists on a key


class LLMError(RuntimeError):
    """A request that failed for good: a non-retryable status, or retries used up (`kind` says the last error)."""

    def __init__(self, message: str, kind: str, retryable: bool):
        super().__init__(message)
        self.kind, self.retryable = kind, retryable


class MalformedResponse(ValueError):
    """A 200 whose body is not a completion (bad JSON, no choices, no text)."""


@dataclass
class EndpointConfig:
    """Where and how to send requests."""

    base_url: str  # e.g. http://127.0.0.1:8000/v1
    model: str
    api_key_env: str = "OPENAI_API_KEY"  # the variable holding the key (unset: local servers get a placeholder)
    timeout: float = 120.0  # seconds per attempt
    max_retries: int = 6  # retries after the first attempt
    backoff: float = 1.0  # the first retry waits about this long; each next one twice as long
    max_backoff: float = 60.0  # cap on one wait, Retry-After included
    chat: bool = False  # /chat/completions with the prompt as one user message instead of /completions

    def __post_init__(self):
        if not self.base_url.startswith(("http://", "https://")):
            raise ValueError(f"--base-url must start with http:// or https://, got {self.base_url!r}")
        if not self.model:
            raise ValueError("--model must not be empty")
        checks = {"timeout": self.timeout > 0, "max_retries": self.max_retries >= 0,
                  "backoff": self.backoff >= 0, "max_backoff": self.max_backoff >= 0}
        for name, ok in checks.items():
            if not ok:
                flag = name.replace("_", "-")
                raise ValueError(f"--{flag} must be {'>= 0' if name != 'timeout' else '> 0'}, got {getattr(self, name)}")


@dataclass
class Completion:
    """One generated text and what it cost."""

    text: str
    prompt_tokens: int
    completion_tokens: int
    finish_reason: str | None

    def usage(self) -> dict:
        return {"prompt_tokens": self.prompt_tokens, "completion_tokens": self.completion_tokens}


def parse_completion(body: str, chat: bool) -> Completion:
    """The first choice of a completions (or chat completions) response body; MalformedResponse if it is none."""
    try:
        data = json.loads(body)
    except ValueError as err:
        raise MalformedResponse(f"the response is not JSON: {err}") from None
    choices = data.get("choices") if isinstance(data, dict) else None
    if not isinstance(choices, list) or not choices or not isinstance(choices[0], dict):
        raise MalformedResponse("the response has no choices")
    choice = choices[0]
    text = (choice.get("message") or {}).get("content") if chat else choice.get("text")
    if chat and text is None and isinstance(choice.get("message"), dict):
        text = ""  # a chat reply with no content (e.g. only a refusal or tool call)
    if not isinstance(text, str):
        raise MalformedResponse("the response's first choice has no text")
    usage = data.get("usage") if isinstance(data.get("usage"), dict) else {}
    tokens = [usage.get(k) for k in ("prompt_tokens", "completion_tokens")]
    tokens = [t if isinstance(t, int) and not isinstance(t, bool) and t >= 0 else 0 for t in tokens]
    finish = choice.get("finish_reason")
    return Completion(text, tokens[0], tokens[1], finish if isinstance(finish, str) else None)


def retry_after(headers) -> float | None:
    """Seconds a response asks us to wait (retry-after-ms, or Retry-After in seconds), or None."""
    if headers is None:
        return None
    for name, scale in (("retry-after-ms", 1000.0), ("retry-after", 1.0)):
        value = headers.get(name)
        if value is None:
            continue
        try:
            seconds = float(value) / scale
        except ValueError:
            continue  # an HTTP date: rare for APIs; fall back to our own backoff
        if math.isfinite(seconds) and seconds >= 0:
            return seconds
    return None


class LLMClient:
    """Sends completion requests with retries; thread-safe, with counters of requests, retries and tokens."""

    def __init__(self, cfg: EndpointConfig):
        self.cfg = cfg
        key = os.environ.get(cfg.api_key_env) or NO_KEY
        self._client = openai.OpenAI(base_url=cfg.base_url, api_key=key, max_retries=0, timeout=cfg.timeout)
        self._lock = threading.Lock()
        self._stats = Counter()
        self._retries = Counter()
        self._rng = random.Random()
        self._cancel = threading.Event()  # set by run_concurrently on an error: waiting retries give up at once

    def __repr__(self) -> str:  # the openai client holds the key: never show it
        return f"LLMClient({self.cfg.base_url!r}, model={self.cfg.model!r})"

    def stats(self) -> dict:
        """A snapshot: requests (HTTP attempts), completed, failed, retries by kind, prompt and completion tokens."""
        with self._lock:
            s = dict(self._stats)
            retries = {k: self._retries[k] for k in RETRY_KINDS if self._retries[k]}
        return {"requests": s.get("requests", 0), "completed": s.get("completed", 0), "failed": s.get("failed", 0),
                "retries": retries, "prompt_tokens": s.get("prompt_tokens", 0),
                "completion_tokens": s.get("completion_tokens", 0)}

    def _count(self, **amounts) -> None:
        with self._lock:
            self._stats.update(amounts)

    def _send(self, prompt: str, max_tokens: int, temperature: float, seed, stop) -> Completion:
        args = {"model": self.cfg.model, "max_tokens": max_tokens, "temperature": temperature}
        if seed is not None:
            args["seed"] = seed
        if stop:
            args["stop"] = stop
        if self.cfg.chat:
            raw = self._client.chat.completions.with_raw_response.create(
                messages=[{"role": "user", "content": prompt}], **args)
        else:
            raw = self._client.completions.with_raw_response.create(prompt=prompt, **args)
        return parse_completion(raw.text, self.cfg.chat)

    def complete(self, prompt: str, max_tokens: int = 256, temperature: float = 1.0, seed: int | None = None,
                 stop: list[str] | None = None) -> Completion:
        """One completion of prompt, retried as the config says; LLMError when it fails for good."""
        for attempt in range(self.cfg.max_retries + 1):
            self._count(requests=1)
            wait_for = None
            try:
                out = self._send(prompt, max_tokens, temperature, seed, stop)
            except openai.RateLimitError as err:
                kind, message, wait_for = "rate_limit", f"429: {err.message}", retry_after(err.response.headers)
            except openai.InternalServerError as err:
                kind, message = "server_error", f"{err.status_code}: {err.message}"
                wait_for = retry_after(err.response.headers)
            except openai.APIStatusError as err:
                if err.status_code != 408:  # other 4xx: the request itself is wrong, retrying will not help
                    self._count(failed=1)
                    raise LLMError(f"{self.cfg.base_url} answered {err.status_code}: {err.message}", "status",
                                   retryable=False) from None
                kind, message = "timeout", f"408: {err.message}"
            except openai.APITimeoutError:
                kind, message = "timeout", f"no answer within --timeout {self.cfg.timeout:g} s"
            except openai.APIConnectionError as err:
                kind, message = "connection", f"cannot reach {self.cfg.base_url}: {err.__cause__ or err}"
            except MalformedResponse as err:
                kind, message = "malformed", str(err)
            else:
                self._count(completed=1, prompt_tokens=out.prompt_tokens, completion_tokens=out.completion_tokens)
                return out
            if attempt == self.cfg.max_retries:
                break
            with self._lock:
                self._retries[kind] += 1
                jitter = self._rng.uniform(0.5, 1.5)  # spreads out clients that failed together
            delay = self.cfg.backoff * 2 ** min(attempt, 32) * jitter if wait_for is None else wait_for
            if self._cancel.wait(min(delay, self.cfg.max_backoff)):
                self._count(failed=1)
                raise LLMError(f"cancelled while retrying: {message}", kind, retryable=True)
        self._count(failed=1)
        raise LLMError(f"gave up after {self.cfg.max_retries + 1} attempts: {message}", kind, retryable=True)


class ResumableJsonl:
    """An append-only jsonl file that survives being killed: each record is one flushed, fsynced line.

    One writer at a time: the file is locked (flock) while open, and a second writer gets a ValueError.
    """

    def __init__(self, path):
        self.path = os.fspath(path)
        if self.path.endswith((".parquet", ".gz")):  # appending jsonl lines would corrupt either format
            raise ValueError(f"{self.path}: results are appended as jsonl lines: name the file .jsonl")
        os.makedirs(os.path.dirname(os.path.abspath(self.path)), exist_ok=True)
        self._lock = threading.Lock()
        self._file = open(self.path, "ab")
        try:
            fcntl.flock(self._file.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            self._file.close()
            raise ValueError(f"{self.path} is being written by another process (or another ResumableJsonl)") \
                from None
        self.repaired = self._repair()

    def _repair(self) -> int:
        """Cuts off a last line without its newline (a write the kill interrupted); returns the bytes removed."""
        if not os.path.exists(self.path):
            return 0
        with open(self.path, "rb+") as f:
            size = f.seek(0, os.SEEK_END)
            end = size
            while end > 0:
                f.seek(max(0, end - 65536))
                block = f.read(end - max(0, end - 65536))
                newline = block.rfind(b"\n")
                if newline >= 0:
                    end = max(0, end - len(block)) + newline + 1
                    break
                end = max(0, end - len(block))
            if end < size:
                f.truncate(end)
                os.fsync(f.fileno())
            return size - end

    def records(self):
        """The records written so far (ValueError naming the line for a corrupt one)."""
        with self._lock:
            self._file.flush()
        with open(self.path, "rb") as f:
            for number, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    yield json.loads(line)
                except ValueError as err:
                    raise ValueError(f"{self.path}:{number}: not a JSON record ({err}): delete or fix that line") \
                        from None

    def done_ids(self, key: str = "id") -> set:
        """The `key` values of the records written so far."""
        return {r[key] for r in self.records() if isinstance(r, dict) and key in r}

    def append(self, record: dict) -> None:
        """Writes record as one line, flushed and fsynced before returning (thread-safe)."""
        line = json.dumps(record, ensure_ascii=False).encode("utf-8") + b"\n"
        with self._lock:
            self._file.write(line)
            self._file.flush()
            os.fsync(self._file.fileno())

    def close(self) -> None:
        with self._lock:
            self._file.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


@dataclass
class RunSummary:
    """What run_concurrently did: jobs sent, skipped (already done), completed, and failed (id -> error)."""

    submitted: int = 0
    skipped: int = 0
    completed: int = 0
    failed: dict = field(default_factory=dict)
    seconds: float = 0.0


def run_concurrently(client: LLMClient, jobs, done=(), on_result=None, concurrency: int = 8, progress: bool = True,
                     limit: int | None = None, desc: str = "requests", total: int | None = None) -> RunSummary:
    """Completes each job not in `done`, at most `concurrency` at a time; calls on_result(job, completion).

    A job is a dict with "id" and "prompt", and optionally "max_tokens", "temperature", "seed" and "stop" (the
    request's parameters); other keys are passed through to on_result untouched. on_result runs in the worker
    threads, so it must be thread-safe (ResumableJsonl.append is); an exception there stops the run. A job whose
    retries run out is counted in summary.failed and the run goes on (a rerun tries it again); a non-retryable
    error (a 4xx) stops the run with LLMError. limit: send at most this many jobs (a budget for this run).
    jobs may be a generator (total: its length, for the progress bar).
    """
    if concurrency < 1:
        raise ValueError(f"--concurrency must be >= 1, got {concurrency}")
    from tqdm import tqdm

    done = set(done)
    summary = RunSummary()
    start = time.monotonic()
    total = len(jobs) if total is None and hasattr(jobs, "__len__") else total
    bar = tqdm(total=total, desc=desc, unit="req", disable=not progress, dynamic_ncols=True)
    keys = ("max_tokens", "temperature", "seed", "stop")

    def one(job):
        completion = client.complete(job["prompt"], **{k: job[k] for k in keys if k in job})
        if on_result is not None:
            on_result(job, completion)

    pool = ThreadPoolExecutor(max_workers=concurrency)
    pending = {}
    try:
        def drain(block: bool):
            finished, _ = wait(list(pending), return_when=FIRST_COMPLETED, timeout=None if block else 0)
            for future in finished:
                job = pending.pop(future)
                try:
                    future.result()
                except LLMError as err:
                    if not err.retryable:
                        raise
                    summary.failed[job["id"]] = str(err)
                else:
                    summary.completed += 1
                bar.update(1)
            stats = client.stats()
            bar.set_postfix(retries=sum(stats["retries"].values()), failed=len(summary.failed),
                            tokens=stats["prompt_tokens"] + stats["completion_tokens"], refresh=False)

        for job in jobs:
            if job["id"] in done:
                summary.skipped += 1
                bar.update(1)
                continue
            if limit is not None and summary.submitted >= limit:
                continue  # still counting what is already done
            done.add(job["id"])  # a job listed twice is sent once
            while len(pending) >= concurrency:
                drain(block=True)
            pending[pool.submit(one, job)] = job
            summary.submitted += 1
        while pending:
            drain(block=True)
    except BaseException:
        client._cancel.set()  # an error or an interrupt: no job still retrying should wait out its backoff
        raise
    finally:
        # on an error or an interrupt: drop the queued jobs, let the running ones end (they are written whole)
        pool.shutdown(wait=True, cancel_futures=True)
        client._cancel.clear()
        bar.close()
        summary.seconds = time.monotonic() - start
    return summary
