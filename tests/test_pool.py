"""The model pool with the real llama-server and both real models resident at once:
routing by `model`, the memory budget, eviction, TTL, pinning and crash isolation."""

from __future__ import annotations

import json
import os
import signal
import threading
import time
from pathlib import Path
from typing import Any

import requests
from conftest import SMOLLM, GatewayProcess, wait_for

SMOL, GEMMA = "smollm2-135m", "gemma3-270m"
# Each model alone fits (estimates ~224 and ~355 MB), both together do not.
ROOM_FOR_ONE_MB = "450"


def complete(server: GatewayProcess, model: str | None, max_tokens: int = 2) -> requests.Response:
    body: dict[str, Any] = {"messages": [{"role": "user", "content": "Hi"}]}
    body["max_tokens"] = max_tokens
    if model:
        body["model"] = model
    return requests.post(f"{server.url}/v1/chat/completions", json=body, timeout=120)


def residents(server: GatewayProcess) -> dict[str, dict]:
    health = requests.get(f"{server.url}/health", timeout=5).json()
    return {m["id"]: m for m in health["models"]}


def ready_pids(server: GatewayProcess) -> dict[str, int]:
    return {key: m["pid"] for key, m in residents(server).items() if m["state"] == "ready"}


def both_ready(server: GatewayProcess) -> dict[str, int] | None:
    pids = ready_pids(server)
    return pids if set(pids) == {SMOL, GEMMA} else None


def test_both_models_stay_resident_and_alternate_without_a_reload(make_gateway) -> None:  # type: ignore[no-untyped-def]
    server: GatewayProcess = make_gateway({"AILAB_PRELOAD": GEMMA})
    # The port opens at once; the preloaded model follows the default in the background.
    pids = wait_for(lambda: both_ready(server), timeout=120)
    assert sorted(pids.values()) == sorted(server.llama_pids())
    for model in (SMOL, GEMMA, SMOL, GEMMA, None):
        reply = complete(server, model)
        assert reply.status_code == 200, reply.text
        assert reply.json()["model"] == (model or SMOL)  # no model: the default
    assert ready_pids(server) == pids  # nobody was reloaded
    listed = {m["id"]: m for m in requests.get(f"{server.url}/v1/models", timeout=5).json()["data"]}
    assert listed[SMOL]["state"] == listed[GEMMA]["state"] == "ready"
    assert listed[GEMMA]["memory_measured_mb"] > 100 and listed[GEMMA]["last_used"]


def test_a_budget_too_small_for_both_unloads_the_idle_one(make_gateway) -> None:  # type: ignore[no-untyped-def]
    server: GatewayProcess = make_gateway({"AILAB_MEMORY_BUDGET_MB": ROOM_FOR_ONE_MB})
    smol_pid = ready_pids(server)[SMOL]
    reply = complete(server, GEMMA)
    assert reply.status_code == 200, reply.text
    assert set(ready_pids(server)) == {GEMMA}
    assert smol_pid not in server.llama_pids()
    models = {m["key"]: m for m in requests.get(f"{server.url}/models", timeout=5).json()["models"]}
    assert models[SMOL]["state"] == "unloaded" and models[GEMMA]["state"] == "ready"
    assert complete(server, SMOL).status_code == 200  # and back, evicting gemma in turn
    assert set(ready_pids(server)) == {SMOL}


def test_a_busy_model_is_never_unloaded_the_other_request_waits_then_503(make_gateway) -> None:  # type: ignore[no-untyped-def]
    server: GatewayProcess = make_gateway(
        {"AILAB_MEMORY_BUDGET_MB": ROOM_FOR_ONE_MB, "AILAB_SWITCH_WAIT": "3"}
    )
    smol_pid = ready_pids(server)[SMOL]
    chunks: list[str] = []
    started = threading.Event()
    stop = threading.Event()

    def long_stream() -> None:
        body = {
            "model": SMOL,
            "messages": [{"role": "user", "content": "Tell a very long story."}],
            "max_tokens": 3000,
            "ignore_eos": True,
            "stream": True,
        }
        with requests.post(
            f"{server.url}/v1/chat/completions", json=body, stream=True, timeout=120
        ) as reply:
            for line in reply.iter_lines(decode_unicode=True):
                if line.startswith("data:"):
                    chunks.append(line)
                    started.set()
                if stop.is_set():
                    return

    reader = threading.Thread(target=long_stream)
    reader.start()
    try:
        assert started.wait(60)
        refused = complete(server, GEMMA)
        during = len(chunks)
        assert refused.status_code == 503
        reason = refused.json()["error"]["message"]
        assert f"{SMOL} (1 in flight)" in reason and "after 3 s" in reason
        assert ready_pids(server) == {SMOL: smol_pid}  # the busy one stayed
        wait_for(lambda: len(chunks) > during + 5, timeout=30)  # and kept streaming
    finally:
        stop.set()
        reader.join(60)
    # Once the stream is gone the idle model makes room.
    assert complete(server, GEMMA).status_code == 200
    assert set(ready_pids(server)) == {GEMMA}


def test_an_idle_model_is_unloaded_after_its_ttl_and_comes_back_on_use(make_gateway) -> None:  # type: ignore[no-untyped-def]
    server: GatewayProcess = make_gateway({"AILAB_MODEL_TTL": "2"})
    wait_for(lambda: not residents(server), timeout=30)
    wait_for(lambda: not server.llama_pids(), timeout=10)  # the process is gone too
    health = requests.get(f"{server.url}/health", timeout=5).json()
    assert health["status"] == "ok"  # unloaded for idling is no fault
    assert complete(server, None).status_code == 200
    assert SMOL in ready_pids(server)


def test_a_pinned_model_survives_ttl_and_is_never_evicted(make_gateway, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    extra = tmp_path / "extra.json"
    entry = {"filename": str(SMOLLM), "pinned": True, "chat_template_file": "chatml-tools.jinja"}
    extra.write_text(json.dumps({"smol-pinned": entry}))
    server: GatewayProcess = make_gateway(
        {
            "AILAB_EXTRA_MODELS": str(extra),
            "AILAB_DEFAULT_MODEL": "smol-pinned",
            "AILAB_MODEL_TTL": "1",
            "AILAB_MEMORY_BUDGET_MB": ROOM_FOR_ONE_MB,
        }
    )
    pid = ready_pids(server)["smol-pinned"]
    refused = complete(server, GEMMA)
    assert refused.status_code == 503
    assert "pinned models (smol-pinned)" in refused.json()["error"]["message"]
    time.sleep(3)  # three TTLs
    assert ready_pids(server) == {"smol-pinned": pid}
    assert complete(server, "smol-pinned").status_code == 200


def test_a_model_alone_over_the_budget_is_400_naming_estimate_and_budget(make_gateway) -> None:  # type: ignore[no-untyped-def]
    server: GatewayProcess = make_gateway({"AILAB_MEMORY_BUDGET_MB": "300"})
    reply = complete(server, GEMMA)
    assert reply.status_code == 400
    message = reply.json()["error"]["message"]
    assert "gemma3-270m needs an estimated 355 MB" in message and "300 MB" in message
    assert complete(server, SMOL).status_code == 200  # the one that fits still serves


def test_sigkill_of_one_models_process_leaves_the_other_serving(make_gateway) -> None:  # type: ignore[no-untyped-def]
    server: GatewayProcess = make_gateway({"AILAB_PRELOAD": GEMMA})
    pids = wait_for(lambda: both_ready(server), timeout=120)
    os.kill(pids[GEMMA], signal.SIGKILL)
    wait_for(lambda: residents(server)[GEMMA]["state"] != "ready", timeout=10, interval=0.02)
    reply = complete(server, SMOL)
    assert reply.status_code == 200, reply.text
    assert ready_pids(server)[SMOL] == pids[SMOL]
    assert complete(server, GEMMA).status_code == 200  # restarted on its own, and waited for
    restarted = residents(server)[GEMMA]
    assert restarted["restarts"] == 1 and restarted["pid"] != pids[GEMMA]


def test_load_and_unload_by_request(make_gateway) -> None:  # type: ignore[no-untyped-def]
    server: GatewayProcess = make_gateway()
    loaded = requests.post(f"{server.url}/models/load", json={"model": GEMMA}, timeout=120)
    assert loaded.status_code == 200, loaded.text
    status = loaded.json()["model"]
    assert status["state"] == "ready" and status["pid"] in server.llama_pids()
    assert status["memory_estimate_mb"] > 300
    unloaded = requests.post(f"{server.url}/models/unload", json={"model": GEMMA}, timeout=60)
    assert unloaded.json() == {"status": "ok", "unloaded": [GEMMA]}
    assert status["pid"] not in server.llama_pids()
    unknown = requests.post(f"{server.url}/models/load", json={"model": "nope"}, timeout=10)
    assert unknown.status_code == 404 and SMOL in unknown.json()["detail"]


def test_a_conversation_keeps_the_model_it_started_on(gateway: GatewayProcess) -> None:
    def chat(conversation: str, model: str | None = None) -> dict:
        body: dict[str, Any] = {
            "conversation_id": conversation,
            "messages": [{"role": "user", "content": "Hello"}],
            "max_tokens": 3,
        }
        if model:
            body["model"] = model
        reply = requests.post(f"{gateway.url}/chat", json=body, timeout=120)
        assert reply.status_code == 200, reply.text
        return reply.json()

    assert chat("on-gemma", GEMMA)["model_key"] == GEMMA
    assert chat("on-gemma")["model_key"] == GEMMA  # no model: the conversation's
    assert chat("on-default")["model_key"] == SMOL  # new, no model: the default
    unknown = requests.post(
        f"{gateway.url}/chat",
        json={"messages": [{"role": "user", "content": "x"}], "model": "nope"},
        timeout=10,
    )
    assert unknown.status_code == 404 and GEMMA in unknown.json()["detail"]


def test_an_unknown_model_is_404_in_the_shape_of_the_api_asked(gateway: GatewayProcess) -> None:
    openai = complete(gateway, "gpt-4o")
    assert openai.status_code == 404
    assert openai.json()["error"]["code"] == "model_not_found"
    assert "known models" in openai.json()["error"]["message"] and SMOL in openai.text
    anthropic = requests.post(
        f"{gateway.url}/v1/messages",
        json={"model": "claude-x", "max_tokens": 5, "messages": [{"role": "user", "content": "x"}]},
        timeout=10,
    )
    assert anthropic.status_code == 404
    assert anthropic.json()["type"] == "error"
    assert anthropic.json()["error"]["type"] == "not_found_error"
    assert GEMMA in anthropic.json()["error"]["message"]
