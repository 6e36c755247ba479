"""A local OpenAI-compatible server that fails on purpose: 500s, 429s with Retry-After, timeouts, dropped
connections and malformed JSON, in a fixed cycle over its requests; the other requests get canned answers.

    with FaultServer(["500", "ok", "429", "timeout", "malformed", "ok"]) as server:   # in a test
        client = LLMClient(EndpointConfig(server.url, "m", timeout=0.3, backoff=0.01))
    python tests/fault_server.py --faults 500,ok,429 --port 0     # prints "serving on http://127.0.0.1:PORT/v1"

Request r gets faults[r % len(faults)]. Answers are deterministic in the prompt (see `canned`): a prompt that
asks for a function "named `NAME`" gets a small exercise (solution plus asserts; one in six has a failing
assert, one in six does not parse), any other prompt a short textbook section.
"""

import argparse
import contextlib
import hashlib
import json
import re
import subprocess
import sys
import threading
import time
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

KINDS = ("ok", "500", "503", "429", "timeout", "drop", "malformed", "no_choices", "400")


def variant(prompt: str) -> int:
    """0: failing tests, 1: does not parse, 2-5: good (for exercise prompts)."""
    return hashlib.sha256(prompt.encode()).digest()[0] % 6


def canned(prompt: str) -> str:
    """The answer to prompt: an exercise when it names a function, else a textbook section."""
    match = re.search(r"named `(\w+)`", prompt)
    if not match:
        digest = hashlib.sha256(prompt.encode()).hexdigest()[:8]
        return (f"## Lists ({digest})\n\nA list holds items in order. Here is how to add them up:\n\n"
                "```python\ntotal = 0\nfor x in [1, 2, 3]:\n    total += x\nprint(total)\n```\n\nThe loop visits "
                "each item once.\n")
    name, kind = match.group(1), variant(prompt)
    want = 3 if kind == 0 else 2
    body = "    return len(items)\n" if kind != 1 else "    return len(items\n"
    return (f"```python\ndef {name}(items: list) -> int:\n    \"\"\"Return how many items there are.\"\"\"\n"
            f"{body}\n\nassert {name}([1, 2]) == {want}\nassert {name}([]) == 0\n```\n")


class FaultHandler(BaseHTTPRequestHandler):
    """Answers POST /v1/completions and /v1/chat/completions according to the server's fault cycle."""

    protocol_version = "HTTP/1.1"

    def log_message(self, format, *args):
        pass

    def _json(self, status: int, payload, headers=()) -> None:
        data = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        for name, value in headers:
            self.send_header(name, value)
        self.end_headers()
        self.wfile.write(data)

    def do_POST(self):
        server = self.server
        body = json.loads(self.rfile.read(int(self.headers.get("Content-Length", 0))) or b"{}")
        chat = self.path.rstrip("/").endswith("/chat/completions")
        prompt = body["messages"][-1]["content"] if chat else body.get("prompt", "")
        fault = server.next_fault(self.headers.get("Authorization"))
        try:
            if fault in ("500", "503"):
                error = {"message": "injected server error", "type": "server_error"}
                self._json(int(fault), {"error": error})
            elif fault == "429":
                error = {"message": "slow down", "type": "rate_limit"}
                self._json(429, {"error": error}, [("Retry-After", server.retry_after)])
            elif fault == "400":
                self._json(400, {"error": {"message": "injected bad request", "type": "invalid_request_error"}})
            elif fault == "timeout":
                time.sleep(server.sleep)  # past the client's timeout: it has hung up by now
                self.close_connection = True
            elif fault == "drop":
                self.close_connection = True  # no response at all
            elif fault == "malformed":
                self._json(200, b'{"id": "cmpl-x", "choices": [{"text": "trunc')
            elif fault == "no_choices":
                self._json(200, {"id": "cmpl-x", "object": "text_completion", "choices": []})
            else:
                time.sleep(server.delay)
                text = canned(prompt)
                choice = {"index": 0, "finish_reason": "stop", "logprobs": None}
                choice.update({"message": {"role": "assistant", "content": text}} if chat else {"text": text})
                usage = {"prompt_tokens": len(prompt.split()), "completion_tokens": len(text.split())}
                usage["total_tokens"] = usage["prompt_tokens"] + usage["completion_tokens"]
                self._json(200, {"id": "cmpl-ok", "object": "chat.completion" if chat else "text_completion",
                                 "model": body.get("model"), "choices": [choice], "usage": usage})
                server.record_answer(prompt)
        except (BrokenPipeError, ConnectionResetError):
            pass


class FaultServer(ThreadingHTTPServer):
    """The server: faults in a cycle, counters of what it did, answered prompts; a context manager runs it."""

    daemon_threads = True

    def __init__(self, faults=("ok",), retry_after: str = "0.05", sleep: float = 2.0, delay: float = 0.0,
                 host: str = "127.0.0.1", port: int = 0):
        bad = [f for f in faults if f not in KINDS]
        if bad or not faults:
            raise ValueError(f"--faults must be a non-empty list of {KINDS}, got {bad or faults}")
        super().__init__((host, port), FaultHandler)
        self.faults, self.retry_after, self.sleep, self.delay = list(faults), retry_after, sleep, delay
        self.lock = threading.Lock()
        self.counts = Counter()
        self.answered = Counter()  # prompt -> times answered with a completion
        self.auth = set()
        self._thread = None

    @property
    def url(self) -> str:
        return f"http://{self.server_address[0]}:{self.server_address[1]}/v1"

    def next_fault(self, auth) -> str:
        with self.lock:
            fault = self.faults[sum(self.counts.values()) % len(self.faults)]
            self.counts[fault] += 1
            self.auth.add(auth)
        return fault

    def record_answer(self, prompt: str) -> None:
        with self.lock:
            self.answered[prompt] += 1

    def __enter__(self):
        self._thread = threading.Thread(target=self.serve_forever, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self.shutdown()
        self.server_close()


@contextlib.contextmanager
def serving(argv, timeout: float = 120.0):
    """Runs a server command line whose first output line is "serving ... on URL" (tools/serve.py, this file)
    as a subprocess; yields (URL, the process), and stops the server after."""
    proc = subprocess.Popen([str(a) for a in argv], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        line = []
        reader = threading.Thread(target=lambda: line.append(proc.stdout.readline()), daemon=True)
        reader.start()
        reader.join(timeout=timeout)
        if not line or "serving" not in line[0]:
            proc.kill()
            raise RuntimeError(f"the server did not start: {line} {proc.stderr.read()}")
        yield line[0].split(" on ", 1)[1].strip(), proc
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--faults", default="ok", help=f"comma-separated cycle of {','.join(KINDS)}")
    p.add_argument("--port", type=int, default=0)
    p.add_argument("--retry-after", default="0.05", help="the Retry-After header of 429s (seconds)")
    p.add_argument("--sleep", type=float, default=2.0, help="how long a 'timeout' request hangs")
    p.add_argument("--delay", type=float, default=0.0, help="seconds before each good answer")
    args = p.parse_args(argv)
    try:
        server = FaultServer(args.faults.split(","), args.retry_after, args.sleep, args.delay, port=args.port)
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(f"serving on {server.url}", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
