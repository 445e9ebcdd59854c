"""The ``openai`` front-end, black-box through the official ``openai`` client (sync, async, streaming)
and raw HTTP for what a well-behaved client never sends."""

from __future__ import annotations

import asyncio
import http.client
import json
import re
import time
import urllib.request
from collections.abc import Iterator

import pytest

from tests.conftest import ServerProcess, start_server

openai = pytest.importorskip("openai")

BODY_LIMIT = 256 * 1024
MESSAGES = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Name a paged cache."}]


@pytest.fixture(scope="module")
def served(tmp_path_factory) -> Iterator[ServerProcess]:
    repository = tmp_path_factory.mktemp("repo")
    (repository / "tiny-llama.yaml").write_text(
        "backend: llm\nmax_batch_size: 0\nparameters:\n  weights: tiny-llama\n  REPORT_CUSTOM_METRICS: true\n"
    )
    # The same weights with the operator's own template (the model YAML overrides the tokenizer's).
    (repository / "custom-chat.yaml").write_text(
        "backend: llm\nmax_batch_size: 0\nparameters:\n  weights: tiny-llama\n"
        "  chat_template: \"Q: {{ messages[-1]['content'] }}\\nA:\"\n"
    )
    process = start_server(
        f"repository={repository}",
        "frontends=[grpc,openai]",
        f"server.max_message_bytes={BODY_LIMIT}",
        "cache.num_blocks=512",
    )
    yield process
    process.stop()


@pytest.fixture(scope="module")
def base_url(served: ServerProcess) -> str:
    return f"http://127.0.0.1:{served.port_of('OpenAI API')}/v1"


@pytest.fixture(scope="module")
def client(base_url: str):  # noqa: ANN201
    return openai.OpenAI(base_url=base_url, api_key="unused", max_retries=0, timeout=60)


def _post(base_url: str, path: str, body: bytes, headers: dict[str, str] | None = None) -> tuple[int, dict]:
    request = urllib.request.Request(
        base_url + path, data=body, headers={"Content-Type": "application/json", **(headers or {})}
    )
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read())


def _hf_greedy(prompt_ids: list[int], max_new_tokens: int) -> list[int]:
    transformers = pytest.importorskip("transformers")
    import torch
    from pagedserve.models.tiny import ensure_tiny_llama

    model = transformers.AutoModelForCausalLM.from_pretrained(ensure_tiny_llama(), dtype=torch.float32)
    out = model.generate(torch.tensor([prompt_ids]), max_new_tokens=max_new_tokens, do_sample=False)
    return out[0, len(prompt_ids) :].tolist()


# -- models -------------------------------------------------------------------------------------------


def test_models_lists_llm_models(client) -> None:
    ids = {model.id for model in client.models.list()}
    assert ids == {"tiny-llama", "custom-chat"}
    model = client.models.retrieve("tiny-llama")
    assert model.object == "model" and model.owned_by == "pagedserve"
    with pytest.raises(openai.NotFoundError, match="does not exist"):
        client.models.retrieve("no-such-model")


# -- completions --------------------------------------------------------------------------------------


def test_completion_is_the_same_generation_as_grpc(client, served: ServerProcess) -> None:
    import numpy as np
    import tritonclient.grpc as grpcclient

    completion = client.completions.create(
        model="tiny-llama", prompt="The scheduler", max_tokens=12, temperature=0
    )
    inputs = [
        grpcclient.InferInput("text_input", [1], "BYTES"),
        grpcclient.InferInput("sampling_parameters", [1], "BYTES"),
    ]
    inputs[0].set_data_from_numpy(np.array([b"The scheduler"], dtype=object))
    inputs[1].set_data_from_numpy(
        np.array([json.dumps({"max_tokens": 12, "temperature": 0}).encode()], dtype=object)
    )
    result = served.client().infer("tiny-llama", inputs)
    # Without exclude_input_in_output the vLLM backend returns the prompt too.
    assert "The scheduler" + completion.choices[0].text == result.as_numpy("text_output")[0].decode()
    assert completion.object == "text_completion" and completion.id.startswith("cmpl-")
    assert completion.usage.completion_tokens <= 12
    assert (
        completion.usage.total_tokens == completion.usage.prompt_tokens + completion.usage.completion_tokens
    )


def test_completion_length_stop_and_echo(client) -> None:
    long = client.completions.create(
        model="tiny-llama", prompt="Blocks", max_tokens=5, temperature=0, extra_body={"ignore_eos": True}
    )
    assert long.choices[0].finish_reason == "length" and long.usage.completion_tokens == 5
    text = long.choices[0].text
    stop = text[2:4]
    stopped = client.completions.create(
        model="tiny-llama",
        prompt="Blocks",
        max_tokens=5,
        temperature=0,
        stop=[stop],
        extra_body={"ignore_eos": True},
    )
    assert stopped.choices[0].finish_reason == "stop"
    assert stop not in stopped.choices[0].text and text.startswith(stopped.choices[0].text)
    echoed = client.completions.create(
        model="tiny-llama",
        prompt="Blocks",
        max_tokens=5,
        temperature=0,
        echo=True,
        extra_body={"ignore_eos": True},
    )
    assert echoed.choices[0].text == "Blocks" + text


def test_completion_several_prompts_and_choices(client) -> None:
    completion = client.completions.create(
        model="tiny-llama", prompt=["one", "two"], n=2, max_tokens=4, temperature=1.0, seed=7
    )
    assert sorted(choice.index for choice in completion.choices) == [0, 1, 2, 3]
    again = client.completions.create(
        model="tiny-llama", prompt=["one", "two"], n=2, max_tokens=4, temperature=1.0, seed=7
    )
    assert [c.text for c in again.choices] == [c.text for c in completion.choices]  # seeded: reproducible


def test_completion_logprobs(client) -> None:
    completion = client.completions.create(
        model="tiny-llama",
        prompt="Prefix caching",
        max_tokens=6,
        temperature=0,
        logprobs=3,
        extra_body={"ignore_eos": True},
    )
    logprobs = completion.choices[0].logprobs
    assert len(logprobs.tokens) == len(logprobs.token_logprobs) == len(logprobs.top_logprobs) == 6
    for chosen, top in zip(logprobs.token_logprobs, logprobs.top_logprobs, strict=True):
        assert len(top) <= 3 and chosen == pytest.approx(max(top.values()))  # greedy takes the best


# -- chat ---------------------------------------------------------------------------------------------


def test_chat_greedy_matches_transformers(client) -> None:
    """The template renders as apply_chat_template does and the model continues it as HF generate."""
    transformers = pytest.importorskip("transformers")
    from pagedserve.models.tiny import ensure_tiny_llama

    tokenizer = transformers.AutoTokenizer.from_pretrained(ensure_tiny_llama())
    prompt_ids = tokenizer.apply_chat_template(MESSAGES, add_generation_prompt=True, tokenize=True)
    if not isinstance(prompt_ids, list):
        prompt_ids = prompt_ids["input_ids"]
    chat = client.chat.completions.create(
        model="tiny-llama",
        messages=MESSAGES,
        max_completion_tokens=10,
        temperature=0,
        extra_body={"ignore_eos": True},
    )
    assert chat.usage.prompt_tokens == len(prompt_ids)
    expected = tokenizer.decode(_hf_greedy(prompt_ids, 10), skip_special_tokens=True)
    assert chat.choices[0].message.content == expected
    assert chat.choices[0].message.role == "assistant" and chat.object == "chat.completion"


def test_chat_stream_equals_whole(client) -> None:
    whole = client.chat.completions.create(
        model="tiny-llama", messages=MESSAGES, max_tokens=12, temperature=0
    )
    chunks = list(
        client.chat.completions.create(
            model="tiny-llama",
            messages=MESSAGES,
            max_tokens=12,
            temperature=0,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole.choices[0].message.content
    finals = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finals == [whole.choices[0].finish_reason]
    assert chunks[-1].choices == [] and chunks[-1].usage.total_tokens == whole.usage.total_tokens


def test_chat_stream_ends_with_done(base_url: str) -> None:
    body = json.dumps({"model": "tiny-llama", "messages": MESSAGES, "max_tokens": 3, "stream": True}).encode()
    request = urllib.request.Request(
        base_url + "/chat/completions", data=body, headers={"Content-Type": "application/json"}
    )
    with urllib.request.urlopen(request, timeout=60) as response:
        assert response.headers["Content-Type"].startswith("text/event-stream")
        events = [line for line in response.read().decode().split("\n\n") if line]
    assert events[-1] == "data: [DONE]"
    assert all(event.startswith("data: {") for event in events[:-1])


def test_chat_logprobs(client) -> None:
    chat = client.chat.completions.create(
        model="tiny-llama", messages=MESSAGES, max_tokens=4, temperature=0, logprobs=True, top_logprobs=2
    )
    content = chat.choices[0].logprobs.content
    assert content and all(len(item.top_logprobs) <= 2 for item in content)
    assert all(item.logprob == pytest.approx(item.top_logprobs[0].logprob) for item in content)
    assert bytes(b for item in content for b in item.bytes).decode(errors="replace")


def test_model_yaml_template_overrides_the_tokenizers(client) -> None:
    chat = client.chat.completions.create(model="custom-chat", messages=MESSAGES, max_tokens=2, temperature=0)
    completion = client.completions.create(
        model="custom-chat", prompt="Q: Name a paged cache.\nA:", max_tokens=2, temperature=0
    )
    # The chat prompt is the rendered text without BOS (the template has none and chat adds none).
    assert chat.usage.prompt_tokens == completion.usage.prompt_tokens - 1


def test_async_client_concurrent_streams(base_url: str) -> None:
    async def one(client, i: int) -> str:
        stream = await client.chat.completions.create(
            model="tiny-llama",
            messages=[{"role": "user", "content": f"request {i}"}],
            max_tokens=6,
            stream=True,
            temperature=0,
        )
        return "".join([chunk.choices[0].delta.content or "" async for chunk in stream if chunk.choices])

    async def main() -> list[str]:
        client = openai.AsyncOpenAI(base_url=base_url, api_key="unused", max_retries=0)
        return await asyncio.gather(*(one(client, i) for i in range(8)))

    texts = asyncio.run(main())
    assert len(texts) == 8 and all(isinstance(t, str) for t in texts)


def test_openai_requests_count_in_model_statistics(client, served: ServerProcess) -> None:
    def count() -> int:
        stats = served.client().get_inference_statistics("tiny-llama", as_json=True)
        return int(stats["model_stats"][0]["inference_stats"]["success"].get("count", 0))

    before = count()
    client.completions.create(model="tiny-llama", prompt="count me", max_tokens=2)
    deadline = time.monotonic() + 10
    while count() != before + 1 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert count() == before + 1


def test_disconnect_cancels_the_stream(base_url: str, served: ServerProcess) -> None:
    port = int(re.search(r"pagedserve: metrics listening on [^:]+:(\d+)", served.output).group(1))

    def running() -> float:
        text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
        return sum(
            float(m)
            for m in re.findall(r'^vllm:num_requests_running\{model="tiny-llama".*\} (\S+)$', text, re.M)
        )

    host = base_url.split("//")[1].split("/")[0]
    connection = http.client.HTTPConnection(host, timeout=60)
    body = {
        "model": "tiny-llama",
        "prompt": "forever",
        "max_tokens": 1900,
        "stream": True,
        "ignore_eos": True,
    }
    connection.request("POST", "/v1/completions", json.dumps(body), {"Content-Type": "application/json"})
    response = connection.getresponse()
    assert response.status == 200
    first = response.fp.readline() + response.fp.readline()  # the first event: it is generating
    assert b"error" not in first, first
    deadline = time.monotonic() + 10
    while running() < 1 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert running() >= 1, (
        urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
    )
    connection.sock.close()
    connection.close()
    deadline = time.monotonic() + 15
    while running() > 0 and time.monotonic() < deadline:
        time.sleep(0.1)
    assert running() == 0


# -- bad input ----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("body", "status", "pattern"),
    [
        (b"{not json", 400, "failed to parse"),
        (b"[" * 100_000 + b"]" * 100_000, 400, "nesting too deep|JSON"),
        (json.dumps({"model": "tiny-llama"}).encode(), 400, "prompt"),
        (
            json.dumps({"model": "tiny-llama", "prompt": "x", "max_tokens": "many"}).encode(),
            400,
            "max_tokens",
        ),
        (json.dumps({"model": "tiny-llama", "prompt": "x", "n": 0}).encode(), 400, "n"),
        (json.dumps({"model": "tiny-llama", "prompt": "x", "temperature": -1}).encode(), 400, "temperature"),
        (json.dumps({"model": "tiny-llama", "prompt": [1, 2, 3]}).encode(), 400, "token id prompts"),
        (json.dumps({"model": "tiny-llama", "prompt": ["x"] * 1000}).encode(), 400, "at most"),
        (json.dumps({"model": "tiny-llama", "prompt": "x", "stop": ["s"] * 1000}).encode(), 400, "stop"),
        (json.dumps({"model": "nope", "prompt": "x"}).encode(), 404, "does not exist"),
        (json.dumps({"prompt": "x"}).encode(), 400, "must name a model"),
        (json.dumps({"model": "tiny-llama", "prompt": "x", "suffix": "y"}).encode(), 400, "suffix"),
        (
            json.dumps({"model": "tiny-llama", "prompt": "x", "stream_options": {}}).encode(),
            400,
            "stream_options",
        ),
    ],
    ids=[
        "malformed",
        "deep",
        "no-prompt",
        "wrong-type",
        "n-zero",
        "bad-temperature",
        "token-ids",
        "many-prompts",
        "many-stops",
        "unknown-model",
        "no-model",
        "suffix",
        "stream-options",
    ],
)
def test_bad_completion_requests(base_url: str, body: bytes, status: int, pattern: str) -> None:
    got, answer = _post(base_url, "/completions", body)
    assert got == status, answer
    error = answer["error"]
    assert error["code"] == status and re.search(pattern, error["message"]), error
    assert "Traceback" not in error["message"]


@pytest.mark.parametrize(
    ("body", "pattern"),
    [
        ({"model": "tiny-llama", "messages": []}, "messages"),
        ({"model": "tiny-llama", "messages": [{"content": "no role"}]}, "role"),
        ({"model": "tiny-llama", "messages": MESSAGES, "chat_template": "{{ 7 }}"}, "chat_template"),
        (
            {
                "model": "tiny-llama",
                "messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}],
            },
            "not supported",
        ),
        ({"model": "tiny-llama", "messages": MESSAGES, "top_logprobs": 2}, "top_logprobs"),
        ({"model": "tiny-llama", "messages": MESSAGES, "continue_final_message": True}, "cannot both"),
        (
            {"model": "tiny-llama", "messages": MESSAGES, "response_format": {"type": "xml"}},
            "response_format",
        ),
    ],
    ids=[
        "no-messages",
        "no-role",
        "request-template",
        "image",
        "top-logprobs-alone",
        "continue-and-prompt",
        "bad-format",
    ],
)
def test_bad_chat_requests(base_url: str, body: dict, pattern: str) -> None:
    status, answer = _post(base_url, "/chat/completions", json.dumps(body).encode())
    assert status == 400, answer
    assert re.search(pattern, answer["error"]["message"]), answer


def test_huge_body_is_refused_before_it_is_read(base_url: str, client) -> None:
    body = json.dumps({"model": "tiny-llama", "prompt": "x" * (BODY_LIMIT + 1)}).encode()
    status, answer = _post(base_url, "/completions", body)
    assert status == 413 and "exceeds the maximum" in answer["error"]["message"]
    # a chunked body that lies about nothing but keeps coming is cut off at the limit too
    host = base_url.split("//")[1].split("/")[0]
    connection = http.client.HTTPConnection(host, timeout=30)
    connection.putrequest("POST", "/v1/completions")
    connection.putheader("Content-Type", "application/json")
    connection.putheader("Transfer-Encoding", "chunked")
    connection.endheaders()
    chunk = b"x" * 65536
    try:
        for _ in range(2 * BODY_LIMIT // len(chunk)):
            connection.send(b"%x\r\n%s\r\n" % (len(chunk), chunk))
        connection.send(b"0\r\n\r\n")
        assert connection.getresponse().status == 413
    except (BrokenPipeError, ConnectionResetError):
        pass  # the server answered and closed while we were still sending
    connection.close()
    assert client.completions.create(model="tiny-llama", prompt="still serving", max_tokens=2).choices


def test_prompt_beyond_the_context_is_a_bad_request(client) -> None:
    with pytest.raises(openai.BadRequestError):
        client.completions.create(model="tiny-llama", prompt="word " * 5000, max_tokens=2)


def test_restricted_apis_need_their_header() -> None:
    server = start_server(
        "model=tiny-llama",
        "frontends=[grpc,openai]",
        "server.restricted_protocols=[{protocols:[inference],key:admin-key,value:s3cret}]",
    )
    try:
        base_url = f"http://127.0.0.1:{server.port_of('OpenAI API')}/v1"
        refused = openai.OpenAI(base_url=base_url, api_key="unused", max_retries=0)
        with pytest.raises(openai.PermissionDeniedError, match="expecting header 'admin-key'"):
            refused.completions.create(model="tiny-llama", prompt="x", max_tokens=2)
        wrong = openai.OpenAI(
            base_url=base_url, api_key="u", max_retries=0, default_headers={"admin-key": "nope"}
        )
        with pytest.raises(openai.PermissionDeniedError):
            wrong.completions.create(model="tiny-llama", prompt="x", max_tokens=2)
        assert [m.id for m in refused.models.list()] == ["tiny-llama"]  # model-repository is not restricted
        allowed = openai.OpenAI(
            base_url=base_url, api_key="u", max_retries=0, default_headers={"admin-key": "s3cret"}
        )
        assert allowed.completions.create(model="tiny-llama", prompt="x", max_tokens=2).choices
    finally:
        server.stop()
