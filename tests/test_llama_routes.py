"""llama-server's API through the gateway, model chosen by name: the official `openai` and
`anthropic` SDKs unchanged, token counting, templates, embeddings and reranking."""

from __future__ import annotations

import contextlib
import math
import os
import time
from pathlib import Path

import anthropic
import openai
import psutil
import pytest
import requests
from conftest import GatewayProcess, llama_server_busy, wait_for

SMOL, GEMMA = "smollm2-135m", "gemma3-270m"


@pytest.fixture
def oai(gateway: GatewayProcess) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{gateway.url}/v1", api_key="unused", timeout=120)


@pytest.fixture
def claude(gateway: GatewayProcess) -> anthropic.Anthropic:
    return anthropic.Anthropic(base_url=gateway.url, api_key="unused", timeout=120)


@pytest.mark.parametrize("model", [SMOL, GEMMA])
def test_openai_sdk_chat_and_stream_by_model_name(oai: openai.OpenAI, model: str) -> None:
    messages = [{"role": "user", "content": "Say hello."}]
    reply = oai.chat.completions.create(model=model, messages=messages, max_tokens=5)  # type: ignore[arg-type]
    assert reply.model == model
    assert reply.usage is not None and reply.usage.completion_tokens > 0
    stream = oai.chat.completions.create(
        model=model,
        messages=messages,  # type: ignore[arg-type]
        max_tokens=5,
        stream=True,
    )
    pieces = [chunk.choices[0].delta.content or "" for chunk in stream if chunk.choices]
    assert "".join(pieces).strip()


def test_openai_sdk_responses(oai: openai.OpenAI) -> None:
    response = oai.responses.create(model=GEMMA, input="Say hello.", max_output_tokens=5)
    assert response.model == GEMMA
    assert response.output_text.strip()
    # Streamed as raw events: the SDK's accumulating helper (responses.stream) rejects
    # llama-server's text deltas, which carry no content_index (bare llama-server too).
    stream = oai.responses.create(model=SMOL, input="Say hello.", max_output_tokens=5, stream=True)
    events = [event.type for event in stream]
    assert "response.output_text.delta" in events and events[-1] == "response.completed"


def test_openai_sdk_unknown_model_raises_not_found_with_the_keys(oai: openai.OpenAI) -> None:
    with pytest.raises(openai.NotFoundError, match="known models"):
        oai.chat.completions.create(
            model="gpt-4o",
            messages=[{"role": "user", "content": "x"}],
            max_tokens=1,
        )


@pytest.mark.parametrize("model", [SMOL, GEMMA])
def test_anthropic_sdk_messages_stream_and_count_tokens(
    claude: anthropic.Anthropic, model: str
) -> None:
    messages = [{"role": "user", "content": "Say hello."}]
    message = claude.messages.create(model=model, max_tokens=5, messages=messages)  # type: ignore[arg-type]
    assert message.model == model and message.role == "assistant"
    assert message.usage.output_tokens > 0
    with claude.messages.stream(model=model, max_tokens=5, messages=messages) as stream:  # type: ignore[arg-type]
        text = "".join(stream.text_stream)
        final = stream.get_final_message()
    assert text and final.stop_reason in {"max_tokens", "end_turn"}
    counted = claude.messages.count_tokens(model=model, messages=messages)  # type: ignore[arg-type]
    assert counted.input_tokens > 3


# Greedy SmolLM2 answers this with an emoji whose first token ends inside the character, so
# llama-server sends no chunk for it; the stream must still open with its first event
# (scripts/llama_patches/0001-stream-opening-event-after-a-split-character.patch).
SPLIT_FIRST_CHARACTER = "Send me a star emoji."


def test_anthropic_stream_opens_with_message_start_when_the_first_token_splits_a_character(
    claude: anthropic.Anthropic,
) -> None:
    messages = [{"role": "user", "content": SPLIT_FIRST_CHARACTER}]
    with claude.messages.stream(
        model=SMOL,
        max_tokens=5,
        messages=messages,  # type: ignore[arg-type]
        extra_body={"temperature": 0},
    ) as stream:
        events = [event.type for event in stream]
        final = stream.get_final_message()
    text = "".join(block.text for block in final.content if block.type == "text")
    assert not text[0].isascii()  # the case in question: a multi-byte first character
    assert events[0] == "message_start" and events.count("message_start") == 1
    assert final.usage.input_tokens > 0


def test_responses_stream_is_created_once_when_the_first_token_splits_a_character(
    oai: openai.OpenAI,
) -> None:
    stream = oai.responses.create(
        model=SMOL,
        input=SPLIT_FIRST_CHARACTER,
        max_output_tokens=20,  # room for chunks after the first
        temperature=0,
        stream=True,
    )
    events = list(stream)
    text = "".join(e.delta for e in events if e.type == "response.output_text.delta")
    assert not text[0].isascii()
    kinds = [event.type for event in events]
    assert kinds[0] == "response.created" and kinds.count("response.created") == 1


def test_anthropic_sdk_unknown_model_raises_not_found(claude: anthropic.Anthropic) -> None:
    with pytest.raises(anthropic.NotFoundError, match=SMOL):
        claude.messages.create(
            model="claude-x", max_tokens=5, messages=[{"role": "user", "content": "x"}]
        )


def post(gateway: GatewayProcess, path: str, body: dict) -> dict:
    reply = requests.post(f"{gateway.url}{path}", json=body, timeout=120)
    assert reply.status_code == 200, reply.text
    return reply.json()


def test_tokenize_detokenize_and_templates_use_the_named_models_vocabulary(
    gateway: GatewayProcess,
) -> None:
    smol = post(gateway, "/tokenize", {"model": SMOL, "content": "Hello world"})["tokens"]
    gemma = post(gateway, "/tokenize", {"model": GEMMA, "content": "Hello world"})["tokens"]
    assert smol != gemma  # two vocabularies: each request reached its own model
    back = post(gateway, "/detokenize", {"model": GEMMA, "tokens": gemma})["content"]
    assert back.strip() == "Hello world"
    messages = [{"role": "user", "content": "Hi there"}]
    prompt = post(gateway, "/apply-template", {"model": SMOL, "messages": messages})["prompt"]
    assert "<|im_start|>user\nHi there" in prompt
    chat_count = post(
        gateway, "/v1/chat/completions/input_tokens", {"model": SMOL, "messages": messages}
    )
    assert chat_count["input_tokens"] == len(
        post(gateway, "/tokenize", {"model": SMOL, "content": prompt, "parse_special": True})[
            "tokens"
        ]
    )
    responses_count = post(
        gateway, "/v1/responses/input_tokens", {"model": GEMMA, "input": "Hi there"}
    )
    assert responses_count["input_tokens"] > 2


def test_a_body_that_is_not_a_json_object_is_400_in_the_apis_shape(
    gateway: GatewayProcess,
) -> None:
    reply = requests.post(
        f"{gateway.url}/v1/messages",
        data=b"[1, 2]",
        headers={"content-type": "application/json"},
        timeout=10,
    )
    assert reply.status_code == 400
    assert reply.json()["error"]["type"] == "invalid_request_error"
    assert "JSON object" in reply.json()["error"]["message"]


def embed(gateway: GatewayProcess, model: str, inputs: list[str] | str) -> list[list[float]]:
    body = post(gateway, "/v1/embeddings", {"model": model, "input": inputs})
    return [item["embedding"] for item in sorted(body["data"], key=lambda d: d["index"])]


def cosine(a: list[float], b: list[float]) -> float:
    dot = sum(x * y for x, y in zip(a, b, strict=True))
    return dot / math.sqrt(sum(x * x for x in a) * sum(y * y for y in b))


def test_embeddings_batch_equals_single_and_similar_beats_unrelated(
    gateway: GatewayProcess,
) -> None:
    texts = [
        "The cat sat on the mat.",
        "A kitten is sitting on a rug.",
        "Quarterly tax filings are due in April.",
    ]
    batch = embed(gateway, SMOL, texts)
    assert [len(v) for v in batch] == [576] * 3  # SmolLM2's width
    for text, batched in zip(texts, batch, strict=True):
        (alone,) = embed(gateway, SMOL, text)
        assert max(abs(a - b) for a, b in zip(alone, batched, strict=True)) < 1e-4
    assert cosine(batch[0], batch[1]) > cosine(batch[0], batch[2])
    health = requests.get(f"{gateway.url}/health", timeout=5).json()
    instances = {m["id"]: m for m in health["models"]}
    embedding = instances[f"{SMOL}#embeddings"]
    assert embedding["purpose"] == "embed" and embedding["memory_estimate_mb"] > 0


def test_rerank_on_a_model_not_registered_as_a_reranker_is_400_saying_why(
    gateway: GatewayProcess,
) -> None:
    reply = requests.post(
        f"{gateway.url}/v1/rerank",
        json={"model": SMOL, "query": "cats", "documents": ["a cat", "taxes"]},
        timeout=10,
    )
    assert reply.status_code == 400
    assert "not registered as a reranker" in reply.json()["error"]["message"]


def test_a_stream_is_piped_by_a_kept_thread_and_its_connection_serves_the_next_request(
    gateway: GatewayProcess,
) -> None:
    url = f"{gateway.url}/v1/chat/completions"
    messages = [{"role": "user", "content": "Write a long story about the sea."}]
    stream = {"model": SMOL, "messages": messages, "max_tokens": 200, "ignore_eos": True}
    process = psutil.Process(gateway.process.pid if gateway.process else 0)
    with requests.Session() as session:
        assert session.post(url, json={**stream, "stream": True}, timeout=60).ok  # warms up
        time.sleep(0.5)  # a piping thread that was not kept would be gone by now
        threads = process.num_threads()
        with session.post(url, json={**stream, "stream": True}, stream=True, timeout=60) as reply:
            lines = reply.iter_lines()
            assert next(lines).startswith(b"data:")
            # A thread besides the event loop's waits on llama-server's socket, and it is
            # the warm-up's, kept: no thread was started for this stream.
            wait_for(lambda: _reading_sockets(process) == 1, timeout=10)
            assert process.num_threads() == threads
            events = [line for line in lines if line]
        assert events[-1] == b"data: [DONE]" and len(events) > 100  # the whole stream came
        again = session.post(url, json={**stream, "max_tokens": 1}, timeout=60)
        assert again.status_code == 200 and again.json()["usage"]["completion_tokens"] == 1


RECVFROM = {"x86_64": 45, "aarch64": 207}[os.uname().machine]


def _reading_sockets(process: psutil.Process) -> int:
    """Threads of `process` blocked in recvfrom(2): a blocking socket read. The event
    loop's thread waits in epoll instead, and idle worker threads on futexes."""
    blocked = 0
    for thread in process.threads():
        with contextlib.suppress(FileNotFoundError):  # a thread that just ended
            syscall = Path(f"/proc/{process.pid}/task/{thread.id}/syscall").read_text()
            blocked += syscall.split()[0] == str(RECVFROM)
    return blocked


def test_a_client_hanging_up_mid_stream_stops_the_generation_and_frees_the_model(
    gateway: GatewayProcess,
) -> None:
    body = {
        "model": SMOL,
        "messages": [{"role": "user", "content": "Write a long story about the sea."}],
        "max_tokens": 3000,  # minutes of work: only a hang-up reaching llama-server ends it soon
        "ignore_eos": True,
        "stream": True,
    }
    with requests.Session() as session:
        reply = session.post(
            f"{gateway.url}/v1/chat/completions", json=body, stream=True, timeout=60
        )
        assert reply.status_code == 200
        assert next(reply.iter_lines(), b"").startswith(b"data:")  # generating
        assert llama_server_busy(gateway)
    deadline = time.monotonic() + 60
    while llama_server_busy(gateway) or _in_flight(gateway, SMOL):
        assert time.monotonic() < deadline, "the generation went on after the client hung up"
        time.sleep(0.2)


def _in_flight(gateway: GatewayProcess, model: str) -> int:
    models = requests.get(f"{gateway.url}/v1/models", timeout=10).json()["data"]
    return next(m["in_flight"] for m in models if m["id"] == model)
