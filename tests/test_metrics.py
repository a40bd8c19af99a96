"""/metrics and the access log, after real traffic through the real llama-server."""

from __future__ import annotations

import json
import threading
import time

import requests
from conftest import GatewayProcess
from prometheus_client.parser import text_string_to_metric_families


def scrape(server: GatewayProcess) -> dict[tuple[str, frozenset], float]:
    """Every sample of /metrics, parsed by Prometheus' own parser: (name, labels) -> value."""
    reply = requests.get(f"{server.url}/metrics", timeout=30)
    assert reply.status_code == 200, reply.text
    assert reply.headers["content-type"].startswith("text/plain")
    return {
        (sample.name, frozenset(sample.labels.items())): sample.value
        for family in text_string_to_metric_families(reply.text)
        for sample in family.samples
    }


def value(samples: dict, name: str, **labels: str) -> float:
    return samples.get((name, frozenset(labels.items())), 0.0)


def completion(server: GatewayProcess) -> requests.Response:
    return requests.post(
        f"{server.url}/v1/chat/completions",
        json={
            "model": "smollm2-135m",
            "messages": [{"role": "user", "content": "Hi"}],
            "max_tokens": 1,
        },
        timeout=120,
    )


def test_requests_and_chat_tokens_are_counted_by_route_model_and_status(
    gateway: GatewayProcess,
) -> None:
    before = scrape(gateway)
    for _ in range(3):
        assert completion(gateway).status_code == 200
    chat = requests.post(
        f"{gateway.url}/chat",
        json={
            "messages": [{"role": "user", "content": "Hello"}],
            "conversation_id": "metrics",
            "model": "smollm2-135m",
        },
        timeout=120,
    ).json()
    after = scrape(gateway)
    route = {"route": "/v1/chat/completions", "model": "smollm2-135m", "status": "200"}
    name = "ailab_http_requests_total"
    assert value(after, name, **route) - value(before, name, **route) == 3
    chat_route = {"route": "/chat", "model": "smollm2-135m", "status": "200"}
    assert value(after, name, **chat_route) - value(before, name, **chat_route) == 1
    tokens = "ailab_chat_tokens_total"
    output = {"model": "smollm2-135m", "direction": "output"}
    assert (
        value(after, tokens, **output) - value(before, tokens, **output)
        == (chat["tokens_generated"])
    )
    seconds = "ailab_http_request_duration_seconds_count"
    assert (
        value(after, seconds, route="/v1/chat/completions")
        - value(before, seconds, route="/v1/chat/completions")
        == 3
    )


def test_a_v1_streams_time_to_first_token_is_observed_within_its_duration(
    gateway: GatewayProcess,
) -> None:
    route = {"route": "/v1/chat/completions", "model": "smollm2-135m"}
    name = "ailab_time_to_first_token_seconds"
    before = scrape(gateway)
    started = time.perf_counter()
    reply = requests.post(
        f"{gateway.url}/v1/chat/completions",
        json={
            "model": "smollm2-135m",
            "messages": [{"role": "user", "content": "Hi"}],
            "max_tokens": 8,
            "stream": True,
        },
        timeout=120,
    )
    took = time.perf_counter() - started
    assert reply.status_code == 200 and reply.text.rstrip().endswith("data: [DONE]")
    after = scrape(gateway)
    assert value(after, f"{name}_count", **route) - value(before, f"{name}_count", **route) == 1
    observed = value(after, f"{name}_sum", **route) - value(before, f"{name}_sum", **route)
    assert 0 < observed < took


def test_llama_servers_own_metrics_are_labelled_with_the_model(gateway: GatewayProcess) -> None:
    assert completion(gateway).status_code == 200
    samples = scrape(gateway)
    prompt_tokens = [
        v
        for (name, labels), v in samples.items()
        if name == "llamacpp_prompt_tokens_total" and ("model", "smollm2-135m") in labels
    ]
    assert prompt_tokens and prompt_tokens[0] > 0


def test_a_429_is_counted_as_a_rejection(make_gateway) -> None:  # type: ignore[no-untyped-def]
    server: GatewayProcess = make_gateway({"AILAB_PARALLEL": "1", "AILAB_QUEUE_LIMIT": "1"})
    before = scrape(server)
    statuses: list[int] = []

    def one(index: int) -> None:
        reply = requests.post(
            f"{server.url}/chat",
            json={
                "messages": [{"role": "user", "content": "Tell a long story."}],
                "conversation_id": f"busy{index}",
                "max_tokens": 48,
            },
            timeout=120,
        )
        statuses.append(reply.status_code)

    threads = [threading.Thread(target=one, args=(i,)) for i in range(5)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert 429 in statuses
    after = scrape(server)
    rejected = "ailab_admission_rejections_total"
    assert value(after, rejected, reason="overloaded") - value(
        before, rejected, reason="overloaded"
    ) == statuses.count(429)


def test_a_tool_call_is_counted_with_its_decision_and_outcome(gateway: GatewayProcess) -> None:
    labels = {
        "tool": "get_current_directory",
        "server": "",
        "decision": "not_needed",
        "outcome": "success",
    }
    before = scrape(gateway)
    reply = requests.post(
        f"{gateway.url}/chat",
        json={
            "messages": [{"role": "user", "content": "Where are you working?"}],
            "conversation_id": "metrics-tool",
            "enable_tools": True,
            "max_tokens": 24,
            "tool_choice": {"type": "function", "function": {"name": "get_current_directory"}},
        },
        timeout=120,
    )
    assert reply.status_code == 200, reply.text
    after = scrape(gateway)
    name = "ailab_tool_calls_total"
    assert value(after, name, **labels) - value(before, name, **labels) == 1


def test_a_scrape_never_loads_a_model_unloaded_for_idling(make_gateway) -> None:  # type: ignore[no-untyped-def]
    server: GatewayProcess = make_gateway({"AILAB_MODEL_TTL": "1"})
    assert completion(server).status_code == 200
    deadline = time.monotonic() + 60
    while _state(server) != "unloaded":
        assert time.monotonic() < deadline, "the idle model was never unloaded"
        time.sleep(0.2)
    for _ in range(3):
        samples = scrape(server)
    assert value(samples, "ailab_model_state", model="smollm2-135m", state="unloaded") == 1
    assert _state(server) == "unloaded"
    assert server.llama_pids() == []


def test_the_access_log_has_a_line_per_request_without_contents(gateway: GatewayProcess) -> None:
    secret = "pelican-7731"
    reply = requests.post(
        f"{gateway.url}/chat",
        json={
            "messages": [{"role": "user", "content": f"Remember {secret}"}],
            "conversation_id": "access-log",
            "model": "smollm2-135m",
            "max_tokens": 4,
        },
        timeout=120,
    )
    assert reply.status_code == 200
    log = gateway.data_dir / "logs" / "access.log"
    deadline = time.monotonic() + 10
    lines: list[dict] = []
    while time.monotonic() < deadline:
        text = log.read_text() if log.exists() else ""
        lines = [json.loads(line) for line in text.splitlines()]
        if any(line.get("conversation_id") == "access-log" for line in lines):
            break
        time.sleep(0.1)
    mine = [line for line in lines if line.get("conversation_id") == "access-log"]
    assert len(mine) == 1
    assert (mine[0]["route"], mine[0]["status"], mine[0]["model"]) == ("/chat", 200, "smollm2-135m")
    assert mine[0]["tokens_output"] == reply.json()["tokens_generated"]
    assert secret not in log.read_text()


def _state(server: GatewayProcess) -> str:
    models = requests.get(f"{server.url}/models", timeout=10).json()["models"]
    return next(m for m in models if m["key"] == "smollm2-135m")["state"]
