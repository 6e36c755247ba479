"""tools/serve.py as a real subprocess on a free port, driven by the `openai` client: completions, chat, streaming,
stop strings, seeds, usage and OpenAI-style errors; greedy text equals megaphi.generate's."""

import http.client
import json
import sys

import openai
import pytest
import torch

from fault_server import serving
from megaphi.data.tokenizer import build_tokenizer
from megaphi.generate import generate_text
from megaphi.hf import save_weights_checkpoint
from megaphi.model import ModelConfig, PhiForCausalLM
from megaphi.serve import CHAT_STOPS, chat_prompt

CONFIG = ModelConfig(vocab_size=8000, num_layers=2, hidden_size=64, num_attention_heads=4, ffn_hidden_size=128,
                     max_position_embeddings=64, rotary_dim=8, init_std=0.2)
PROMPT = "def add(a, b):\n    return"


@pytest.fixture(scope="module")
def tokenizer(megatron_fixtures):
    return build_tokenizer("sentencepiece", megatron_fixtures / "code8k.model")


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return PhiForCausalLM(CONFIG).eval()


@pytest.fixture(scope="module")
def server(tmp_path_factory, repo_root, model, tokenizer):
    """(port, process) of tools/serve.py on a tiny checkpoint; --port 0 and the port read from its first line."""
    meta = {"config": {"data": {"tokenizer_type": "sentencepiece", "tokenizer_model": tokenizer.name}}}
    path = save_weights_checkpoint(tmp_path_factory.mktemp("serve") / "tiny", model.state_dict(), CONFIG, meta=meta)
    with serving([sys.executable, repo_root / "tools" / "serve.py", "--load", path.parent, "--port", "0",
                  "--device", "cpu", "--quiet"]) as (url, proc):
        assert url.startswith("http://127.0.0.1:")  # loopback by default
        yield int(url.rsplit(":", 1)[1].split("/")[0]), proc


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=f"http://127.0.0.1:{server[0]}/v1", api_key="unused", max_retries=0, timeout=60)


def greedy(model, tokenizer, prompt, n, stop=()):
    return generate_text(model, tokenizer, [prompt], n, stop_strings=stop)[0]


def test_models(client):
    assert [m.id for m in client.models.list().data] == ["tiny"]


def test_greedy_completion_equals_generate_with_usage(client, model, tokenizer):
    r = client.completions.create(model="tiny", prompt=PROMPT, max_tokens=20, temperature=0)
    want = greedy(model, tokenizer, PROMPT, 20)
    assert r.choices[0].text == want["text"] and r.choices[0].finish_reason == "length"
    assert r.object == "text_completion" and r.model == "tiny"
    assert r.usage.prompt_tokens == len(tokenizer.encode(PROMPT)) and r.usage.completion_tokens == 20
    assert r.usage.total_tokens == r.usage.prompt_tokens + 20


def test_prompt_list_and_n_give_prompt_major_choices(client, model, tokenizer):
    prompts = [PROMPT, "import numpy as np\n"]
    r = client.completions.create(model="m", prompt=prompts, max_tokens=8, temperature=0, n=2)
    assert [c.index for c in r.choices] == [0, 1, 2, 3]
    texts = [c.text for c in r.choices]
    assert texts == [greedy(model, tokenizer, p, 8)["text"] for p in prompts for _ in range(2)]
    ids = client.completions.create(model="m", prompt=tokenizer.encode(prompts[1]), max_tokens=8, temperature=0)
    assert ids.choices[0].text == texts[2]  # token ids as the prompt


def test_stop_string_cuts_the_text(client, model, tokenizer):
    full = greedy(model, tokenizer, PROMPT, 20)["text"]
    stop = full[6:9]
    r = client.completions.create(model="m", prompt=PROMPT, max_tokens=20, temperature=0, stop=[stop, "never"])
    assert r.choices[0].text == full[:full.index(stop)] and r.choices[0].finish_reason == "stop"


def test_streaming_completion_matches_the_whole_response(client):
    whole = client.completions.create(model="m", prompt=PROMPT, max_tokens=16, temperature=0, n=2)
    chunks = list(client.completions.create(model="m", prompt=PROMPT, max_tokens=16, temperature=0, n=2, stream=True,
                                            stream_options={"include_usage": True}))
    texts, finish = ["", ""], [None, None]
    for chunk in chunks[:-1]:
        for c in chunk.choices:
            texts[c.index] += c.text
            finish[c.index] = c.finish_reason or finish[c.index]
    assert texts == [c.text for c in whole.choices] and finish == ["length", "length"]
    assert len(chunks) > 4  # really streamed, not one chunk
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 32


def test_chat_uses_the_documented_template(client, model, tokenizer):
    messages = [{"role": "system", "content": "You write Python."}, {"role": "user", "content": "Add two numbers."}]
    prompt = chat_prompt(messages)
    assert prompt == "System: You write Python.\nUser: Add two numbers.\nAssistant:"
    r = client.chat.completions.create(model="m", messages=messages, max_tokens=12, temperature=0)
    want = generate_text(model, tokenizer, [prompt], 12, stop_strings=CHAT_STOPS)[0]
    assert r.choices[0].message.role == "assistant" and r.object == "chat.completion"
    assert r.choices[0].message.content == want["text"].lstrip()
    assert r.usage.prompt_tokens == len(tokenizer.encode(prompt))
    stream = client.chat.completions.create(model="m", messages=messages, max_tokens=12, temperature=0, stream=True)
    deltas = [chunk.choices[0].delta for chunk in stream]
    assert deltas[0].role == "assistant"
    assert "".join(d.content or "" for d in deltas) == r.choices[0].message.content


def test_seeded_sampling_is_reproducible(client):
    def sample(seed):
        r = client.completions.create(model="m", prompt=PROMPT, max_tokens=16, temperature=1.0, top_p=0.9,
                                      seed=seed, n=2)
        return [c.text for c in r.choices]

    a, b, c = sample(7), sample(7), sample(8)
    assert a == b and a != c and a[0] != a[1]


@pytest.mark.parametrize("kwargs,param", [
    (dict(max_tokens=60), "max_tokens"),  # prompt + max_tokens exceed the 64-token context
    (dict(max_tokens=1000), "max_tokens"),
    (dict(temperature=-1), "temperature"),
    (dict(top_p=0), "top_p"),
    (dict(n=0), "n"),
    (dict(stop=[""]), "stop"),
    (dict(logprobs=2), "logprobs"),
    (dict(extra_body={"echo": True}), "echo"),
])
def test_bad_parameters_get_openai_style_400s(client, kwargs, param):
    with pytest.raises(openai.BadRequestError) as err:
        client.completions.create(model="m", prompt=PROMPT, **{"max_tokens": 4, **kwargs})
    assert err.value.status_code == 400
    assert err.value.body["type"] == "invalid_request_error" and err.value.body["param"] == param


def test_bad_chat_and_raw_requests(client, server):
    with pytest.raises(openai.BadRequestError, match="role must be one of"):
        client.chat.completions.create(model="m", messages=[{"role": "robot", "content": "hi"}])
    with pytest.raises(openai.BadRequestError, match="messages must be a non-empty list"):
        client.chat.completions.create(model="m", messages=[])
    conn = http.client.HTTPConnection("127.0.0.1", server[0], timeout=30)
    for method, path, body, status in [("POST", "/v1/completions", b"{not json", 400),
                                       ("POST", "/v1/completions", b'{"max_tokens": 2}', 400),
                                       ("POST", "/v1/edits", b"{}", 404), ("GET", "/nowhere", None, 404)]:
        conn.request(method, path, body=body, headers={"Content-Type": "application/json"})
        response = conn.getresponse()
        payload = json.loads(response.read())
        assert response.status == status and "message" in payload["error"], (path, payload)
    conn.close()
    assert server[1].poll() is None  # still serving
