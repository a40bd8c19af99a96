"""Foundation endpoints against a real gateway: models, switching, shutdown."""

from __future__ import annotations

import json
import time
from pathlib import Path

import psutil
import pytest
import requests
from conftest import GatewayProcess


def test_models_lists_registered_models_with_their_files(gateway: GatewayProcess) -> None:
    body = requests.get(f"{gateway.url}/models", timeout=5).json()
    models = {m["key"]: m for m in body["models"]}
    assert body["current"] == "smollm2-135m"
    assert models["smollm2-135m"]["exists"] and models["smollm2-135m"]["current"]
    assert models["smollm2-135m"]["size_bytes"] > 50_000_000
    assert models["gemma3-270m"]["exists"] and not models["gemma3-270m"]["current"]
    assert models["qwen2.5-0.5b"]["hf_repo"] and not models["qwen2.5-0.5b"]["exists"]


def test_switching_to_gemma_and_back_twice_keeps_serving(make_gateway) -> None:  # type: ignore[no-untyped-def]
    server: GatewayProcess = make_gateway()
    for _ in range(2):
        for key, previous in (("gemma3-270m", "smollm2-135m"), ("smollm2-135m", "gemma3-270m")):
            reply = requests.post(
                f"{server.url}/model/switch", json={"model_key": key}, timeout=120
            )
            assert reply.status_code == 200, reply.text
            assert reply.json()["previous_model_key"] == previous
            health = requests.get(f"{server.url}/health", timeout=5).json()
            assert (health["status"], health["model_key"]) == ("ok", key)
            chat = requests.post(
                f"{server.url}/v1/chat/completions",
                json={"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 3},
                timeout=60,
            )
            assert chat.status_code == 200
            assert chat.json()["model"] == key


def test_switching_to_an_unknown_model_is_404_and_leaves_llama_server_alone(
    gateway: GatewayProcess,
) -> None:
    before = requests.get(f"{gateway.url}/health", timeout=5).json()
    reply = requests.post(f"{gateway.url}/model/switch", json={"model_key": "nope"}, timeout=10)
    assert reply.status_code == 404
    assert "known models" in reply.json()["detail"]
    after = requests.get(f"{gateway.url}/health", timeout=5).json()
    # The same process still serves the same model: nothing was stopped or restarted.
    assert (after["model_key"], after["pid"], after["restarts"]) == (
        "smollm2-135m",
        before["pid"],
        before["restarts"],
    )


def test_switching_to_a_model_whose_file_is_missing_is_400(make_gateway, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    extra = tmp_path / "extra.json"
    extra.write_text(json.dumps({"ghost": {"filename": "ghost.gguf"}}))
    server: GatewayProcess = make_gateway({"AILAB_EXTRA_MODELS": str(extra)})
    reply = requests.post(f"{server.url}/model/switch", json={"model_key": "ghost"}, timeout=10)
    assert reply.status_code == 400
    assert "ghost.gguf" in reply.json()["detail"]
    assert requests.get(f"{server.url}/health", timeout=5).json()["status"] == "ok"


@pytest.mark.parametrize(
    ("max_models", "outcome"),
    [("1", "smollm2-135m was restored"), ("3", "smollm2-135m stays the default")],
)
def test_a_model_that_fails_to_load_brings_the_previous_back(  # type: ignore[no-untyped-def]
    make_gateway, tmp_path: Path, max_models: str, outcome: str
) -> None:
    """With room for one model the old one is unloaded first and loaded again, as before
    the pool; with room for more it never leaves."""
    broken = tmp_path / "models"
    broken.mkdir()
    (broken / "broken.gguf").write_bytes(b"this is not a gguf file" * 100)
    extra = tmp_path / "extra.json"
    extra.write_text(json.dumps({"broken": {"filename": str(broken / "broken.gguf")}}))
    server: GatewayProcess = make_gateway(
        {"AILAB_EXTRA_MODELS": str(extra), "AILAB_MAX_LOADED_MODELS": max_models}
    )
    reply = requests.post(f"{server.url}/model/switch", json={"model_key": "broken"}, timeout=120)
    assert reply.status_code == 500
    assert outcome in reply.json()["detail"]
    health = requests.get(f"{server.url}/health", timeout=5).json()
    assert (health["status"], health["model_key"]) == ("ok", "smollm2-135m")


def test_malformed_requests_get_a_clear_4xx(gateway: GatewayProcess) -> None:
    cases = [
        ("/model/switch", {}),
        ("/chat", {"messages": [{"role": "wizard", "content": "x"}]}),
        ("/chat", {"messages": [], "temperature": 9}),
        ("/command", {"command": "frobnicate"}),
    ]
    for path, body in cases:
        reply = requests.post(f"{gateway.url}{path}", json=body, timeout=10)
        assert 400 <= reply.status_code < 500, (path, reply.status_code)
        assert reply.json()["detail"]
    assert requests.get(f"{gateway.url}/health", timeout=5).json()["status"] == "ok"


def test_shutdown_stops_llama_server_and_leaves_no_orphan(make_gateway) -> None:  # type: ignore[no-untyped-def]
    server: GatewayProcess = make_gateway()
    llama_pids = server.llama_pids()
    assert llama_pids
    assert requests.post(f"{server.url}/shutdown", timeout=10).json() == {"status": "ok"}
    assert server.process is not None
    server.process.wait(30)
    time.sleep(0.2)
    assert all(
        not psutil.pid_exists(pid) or psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
        for pid in llama_pids
    )


def test_conversations_are_renamed_and_searched_over_http(gateway: GatewayProcess) -> None:
    body = {"messages": [{"role": "user", "content": "Tell me about quokkas"}], "max_tokens": 4}
    reply = requests.post(f"{gateway.url}/chat", json={**body, "conversation_id": "quokka"})
    assert reply.status_code == 200, reply.text
    renamed = requests.patch(f"{gateway.url}/conversations/quokka", json={"title": " Marsupials "})
    assert renamed.json() == {"status": "ok"}
    found = requests.get(f"{gateway.url}/conversations/search", params={"q": "quokkas"}).json()
    assert [(c["id"], c["title"]) for c in found["conversations"]] == [("quokka", "Marsupials")]
    missing = requests.patch(f"{gateway.url}/conversations/nope", json={"title": "x"})
    assert missing.status_code == 404 and "nope" in missing.json()["detail"]
    assert requests.get(f"{gateway.url}/conversations/search").status_code == 422
    too_long = requests.patch(f"{gateway.url}/conversations/quokka", json={"title": "x" * 201})
    assert too_long.status_code == 422
