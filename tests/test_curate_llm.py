"""megaphi.curate.llm against a real local HTTP server that injects faults (tests/fault_server.py): retries by
kind, Retry-After, fail-fast 4xx, the key never shown; ResumableJsonl repairs torn lines; run_concurrently
completes every job exactly once."""

import json
import threading
import time

import pytest

from fault_server import FaultServer, canned
from megaphi.curate.llm import (EndpointConfig, LLMClient, LLMError, MalformedResponse, ResumableJsonl,
                                parse_completion, retry_after, run_concurrently)


def client_for(server, **kw):
    cfg = dict(timeout=0.3, max_retries=6, backoff=0.01, max_backoff=0.2)
    return LLMClient(EndpointConfig(server.url, "m", **{**cfg, **kw}))


def test_every_fault_kind_is_retried_until_an_answer():
    faults = ["500", "503", "429", "timeout", "drop", "malformed", "no_choices", "ok"]
    with FaultServer(faults, sleep=1.0) as server:
        client = client_for(server, max_retries=7)
        out = client.complete("Explain lists.", max_tokens=50, seed=1)
        assert out.text == canned("Explain lists.") and out.finish_reason == "stop"
        assert out.prompt_tokens == 2 and out.completion_tokens == len(out.text.split())
        stats = client.stats()
    assert stats["requests"] == 8 and stats["completed"] == 1 and stats["failed"] == 0
    assert stats["retries"] == {"server_error": 2, "rate_limit": 1, "timeout": 1, "connection": 1, "malformed": 2}
    assert stats["completion_tokens"] == out.completion_tokens


def test_chat_endpoint():
    with FaultServer(["ok"]) as server:
        out = client_for(server, chat=True).complete("Write a function named `count_items`.")
    assert out.text == canned("Write a function named `count_items`.") and "def count_items" in out.text


def test_retry_after_is_honoured_and_backoff_grows():
    with FaultServer(["429", "ok"], retry_after="0.6") as server:
        start = time.monotonic()
        client_for(server, backoff=0.001, max_backoff=5).complete("x")
        assert time.monotonic() - start >= 0.6
    with FaultServer(["500", "500", "500", "ok"]) as server:
        start = time.monotonic()
        client_for(server, backoff=0.1, max_backoff=5).complete("x")
        assert time.monotonic() - start >= (0.1 + 0.2 + 0.4) * 0.5  # 0.1 * (1 + 2 + 4), jitter down to half
    assert retry_after({"retry-after-ms": "250"}) == 0.25 and retry_after({"retry-after": "2"}) == 2
    assert retry_after({"retry-after": "Wed, 21 Oct 2015 07:28:00 GMT"}) is None and retry_after({}) is None


def test_bad_request_fails_fast_and_retries_run_out():
    with FaultServer(["400", "ok"]) as server:
        client = client_for(server)
        with pytest.raises(LLMError, match="answered 400") as err:
            client.complete("x")
        assert not err.value.retryable and client.stats()["requests"] == 1
    with FaultServer(["500"]) as server:
        client = client_for(server, max_retries=2)
        with pytest.raises(LLMError, match="gave up after 3 attempts: 500") as err:
            client.complete("x")
        assert err.value.retryable and err.value.kind == "server_error"
        assert client.stats() == {"requests": 3, "completed": 0, "failed": 1, "retries": {"server_error": 2},
                                  "prompt_tokens": 0, "completion_tokens": 0}


def test_unreachable_endpoint_is_a_connection_error():
    with FaultServer() as server:
        url = server.url
    client = LLMClient(EndpointConfig(url, "m", timeout=0.3, max_retries=1, backoff=0.01))
    with pytest.raises(LLMError, match="cannot reach") as err:
        client.complete("x")
    assert err.value.kind == "connection" and client.stats()["retries"] == {"connection": 1}


def test_key_comes_from_the_env_var_and_is_never_shown(monkeypatch):
    monkeypatch.setenv("MY_LLM_KEY", "sk-secret-123")
    with FaultServer(["500", "ok"]) as server:
        client = LLMClient(EndpointConfig(server.url, "m", api_key_env="MY_LLM_KEY", backoff=0.01))
        client.complete("x")
        assert server.auth == {"Bearer sk-secret-123"}
    assert "sk-secret" not in repr(client) + repr(client.cfg) + json.dumps(client.stats())
    monkeypatch.delenv("MY_LLM_KEY")
    with FaultServer(["ok"]) as server:
        LLMClient(EndpointConfig(server.url, "m", api_key_env="MY_LLM_KEY")).complete("x")
        assert server.auth == {"Bearer unused"}


@pytest.mark.parametrize("kwargs,flag", [(dict(base_url="localhost:8000"), "--base-url"), (dict(model=""), "--model"),
                                         (dict(timeout=0), "--timeout"), (dict(max_retries=-1), "--max-retries")])
def test_bad_config_names_the_flag(kwargs, flag):
    with pytest.raises(ValueError, match=flag):
        EndpointConfig(**{"base_url": "http://h/v1", "model": "m", **kwargs})


def test_parse_completion_rejects_malformed_bodies():
    good = parse_completion('{"choices": [{"text": "hi", "finish_reason": "length"}]}', chat=False)
    assert (good.text, good.prompt_tokens, good.finish_reason) == ("hi", 0, "length")
    for body in ["{", "[]", '{"choices": []}', '{"choices": [{"text": 3}]}', '{"choices": [{"message": {}}]}']:
        with pytest.raises(MalformedResponse):
            parse_completion(body, chat=False)


def test_resumable_jsonl_repairs_a_torn_line_and_appends_from_threads(tmp_path):
    path = tmp_path / "out.jsonl"
    path.write_bytes(b'{"id": "a"}\n{"id": "b"}\n{"id": "c", "te')  # a run killed mid-write
    log = ResumableJsonl(path)
    assert log.repaired == len(b'{"id": "c", "te') and log.done_ids() == {"a", "b"}
    with pytest.raises(ValueError, match="being written by another"):
        ResumableJsonl(path)
    threads = [threading.Thread(target=lambda i=i: [log.append({"id": f"t{i}-{j}", "x": "é" * 100})
                                                    for j in range(50)]) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    log.close()
    lines = path.read_text(encoding="utf-8").splitlines()
    assert len(lines) == 202 and all(json.loads(line) for line in lines)
    assert ResumableJsonl(path).done_ids() == {"a", "b"} | {f"t{i}-{j}" for i in range(4) for j in range(50)}
    path.write_bytes(b'{"id": "a"}\nnot json\n')
    with pytest.raises(ValueError, match=r"out.jsonl:2: not a JSON record"):
        ResumableJsonl(path).done_ids()
    path.write_bytes(b"torn")
    assert ResumableJsonl(path).repaired == 4 and path.read_bytes() == b""
    with pytest.raises(ValueError, match=r"out.parquet: results are appended as jsonl"):
        ResumableJsonl(tmp_path / "out.parquet")
    assert not (tmp_path / "out.parquet").exists()


def test_run_concurrently_with_faults_loses_and_duplicates_nothing(tmp_path):
    jobs = [{"id": f"j{i}", "prompt": f"prompt {i}", "max_tokens": 8, "extra": i} for i in range(40)]
    out = ResumableJsonl(tmp_path / "out.jsonl")
    faults = ["ok", "500", "ok", "429", "timeout", "ok", "malformed", "drop", "ok"]
    with FaultServer(faults, sleep=0.6) as server:
        client = client_for(server, max_retries=30)  # under concurrency one job may meet many faults in a row

        def write(job, completion):
            out.append({"id": job["id"], "extra": job["extra"], "text": completion.text})

        first = run_concurrently(client, jobs, out.done_ids(), write, concurrency=6, progress=False, limit=15)
        assert first.submitted == 15 and first.completed == 15 and not first.failed
        second = run_concurrently(client, jobs + jobs[:3], out.done_ids(), write, concurrency=6, progress=False)
        assert second.skipped == 15 + 3 and second.submitted == 25 and second.completed == 25
        stats = client.stats()
    records = list(out.records())
    assert sorted(r["id"] for r in records) == sorted(j["id"] for j in jobs)  # each once
    assert all(r["text"] == canned(f"prompt {r['extra']}") for r in records)
    assert sum(stats["retries"].values()) > 10 and stats["completed"] == 40


def test_run_concurrently_records_failures_and_stops_on_a_bad_request(tmp_path):
    with FaultServer(["500"]) as server:
        summary = run_concurrently(client_for(server, max_retries=1), [{"id": 1, "prompt": "a"}, {"id": 2, "prompt": "b"}],
                                   concurrency=2, progress=False)
    assert summary.completed == 0 and sorted(summary.failed) == [1, 2] and "gave up" in summary.failed[1]
    with FaultServer(["400"]) as server:
        with pytest.raises(LLMError, match="400"):
            run_concurrently(client_for(server), [{"id": i, "prompt": "a"} for i in range(10)], concurrency=2,
                             progress=False)
        assert sum(server.counts.values()) <= 3  # the queued jobs were dropped, not sent
    with FaultServer(["500", "400"]) as server:  # job 0 waits out a long backoff when job 1 stops the run
        start = time.monotonic()
        with pytest.raises(LLMError, match="400"):
            run_concurrently(client_for(server, backoff=20, max_backoff=20),
                             [{"id": i, "prompt": "a"} for i in range(2)], concurrency=2, progress=False)
        assert time.monotonic() - start < 5
    with pytest.raises(ValueError, match="--concurrency"):
        run_concurrently(None, [], concurrency=0)
