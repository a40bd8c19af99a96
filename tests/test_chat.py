"""/chat, conversations, streaming, tools and the OpenAI front against the real model."""

from __future__ import annotations

import json
import threading
import time

import requests
from conftest import GatewayProcess
from openai import OpenAI

from ailab import tools


def chat(server: GatewayProcess, text: str, conversation: str, **extra: object) -> dict:
    body = {
        "messages": [{"role": "user", "content": text}],
        "conversation_id": conversation,
        "max_tokens": 24,
        "temperature": 0,
        **extra,
    }
    reply = requests.post(f"{server.url}/chat", json=body, timeout=120)
    assert reply.status_code == 200, reply.text
    return reply.json()


def stream_chat(
    server: GatewayProcess, text: str, conversation: str, **extra: object
) -> requests.Response:
    """A streamed /chat request; use it as a context manager."""
    body = {"messages": [{"role": "user", "content": text}], "conversation_id": conversation}
    return requests.post(
        f"{server.url}/chat", json={**body, "stream": True, **extra}, stream=True, timeout=180
    )


def history(server: GatewayProcess, conversation: str) -> list[dict]:
    reply = requests.get(f"{server.url}/conversations/{conversation}", timeout=5)
    return reply.json()["messages"]


def sse_events(response: requests.Response) -> list[tuple[str, dict]]:
    events, name = [], None
    for line in response.iter_lines(decode_unicode=True):
        if line.startswith("event:"):
            name = line.split(":", 1)[1].strip()
        elif line.startswith("data:") and name:
            events.append((name, json.loads(line.split(":", 1)[1])))
    return events


def test_the_second_turn_is_sent_with_the_first(
    gateway: GatewayProcess, expected_device: str
) -> None:
    first = chat(gateway, "My name is Ada. Say hi.", "memory")
    second = chat(gateway, "What is my name?", "memory")
    assert first["response"] and second["response"]
    assert second["tokens_input"] > first["tokens_input"] + first["tokens_generated"]
    assert second["tokens_total"] == second["tokens_input"] + second["tokens_generated"]
    assert (second["device"], second["model_key"], second["iterations"]) == (
        expected_device,
        "smollm2-135m",
        1,
    )
    stored = history(gateway, "memory")
    assert [m["role"] for m in stored] == ["user", "assistant", "user", "assistant"]


def test_resending_the_whole_history_appends_only_the_new_turn(gateway: GatewayProcess) -> None:
    first = chat(gateway, "Count to three.", "resend")
    resent = [
        {"role": "user", "content": "Count to three."},
        {"role": "assistant", "content": first["response"]},
        {"role": "user", "content": "Again."},
    ]
    reply = requests.post(
        f"{gateway.url}/chat",
        json={"messages": resent, "conversation_id": "resend", "max_tokens": 8},
        timeout=120,
    )
    assert reply.status_code == 200
    stored = history(gateway, "resend")
    assert [m["content"] for m in stored if m["role"] == "user"] == ["Count to three.", "Again."]


def test_an_empty_message_list_resets_the_conversation(gateway: GatewayProcess) -> None:
    chat(gateway, "Hello", "reset-me")
    reply = requests.post(
        f"{gateway.url}/chat", json={"messages": [], "conversation_id": "reset-me"}, timeout=30
    )
    assert reply.status_code == 200
    stored = history(gateway, "reset-me")
    assert stored == []


def test_streaming_sends_deltas_then_the_statistics(gateway: GatewayProcess) -> None:
    with stream_chat(gateway, "Write a sentence about the sea.", "stream", max_tokens=32) as reply:
        events = sse_events(reply)
    deltas = [data["content"] for name, data in events if name == "delta"]
    assert len(deltas) > 3
    name, done = events[-1]
    assert name == "done"
    assert done["response"] == "".join(deltas)
    # llama-server holds back a token that ends mid-character, so deltas <= tokens.
    assert len(deltas) <= done["tokens_generated"] <= 32
    assert done["tokens_per_second"] > 0


def test_a_named_tool_choice_makes_the_model_call_the_tool_then_answer(
    gateway: GatewayProcess,
) -> None:
    body = chat(
        gateway,
        "Which folder are you working in?",
        "forced-tool",
        enable_tools=True,
        max_tokens=48,
        tool_choice={"type": "function", "function": {"name": "get_current_directory"}},
    )
    assert body["tools_used"][0] == "get_current_directory()"
    assert body["tool_calls"][0]["result"]["status"] == "success"
    assert str(gateway.data_dir / "workspace") in json.dumps(body["tool_calls"][0]["result"])
    assert body["iterations"] >= 2
    stored = history(gateway, "forced-tool")
    assert [m["role"] for m in stored][:3] == ["user", "assistant", "tool"]
    audit = requests.get(
        f"{gateway.url}/tools/audit", params={"conversation_id": "forced-tool"}, timeout=5
    ).json()["records"]
    assert audit and audit[-1]["tool"] == "get_current_directory"


def test_tool_choice_required_makes_the_model_call_some_tool(gateway: GatewayProcess) -> None:
    body = chat(
        gateway,
        "Show me the files in your folder.",
        "required-tool",
        enable_tools=True,
        max_tokens=64,
        tool_choice="required",
    )
    assert body["tool_calls"], body
    assert body["tool_calls"][0]["name"] in tools.tool_names()


def test_tool_choice_none_sends_no_tools(gateway: GatewayProcess) -> None:
    body = chat(gateway, "Hello", "no-tools", enable_tools=True, tool_choice="none")
    assert (body["tool_calls"], body["iterations"]) == ([], 1)


def test_a_streamed_tool_turn_reports_the_call_its_result_and_the_answer(
    gateway: GatewayProcess,
) -> None:
    with stream_chat(
        gateway,
        "Where are you working?",
        "stream-tool",
        enable_tools=True,
        max_tokens=32,
        tool_choice={"type": "function", "function": {"name": "get_current_directory"}},
    ) as reply:
        events = sse_events(reply)
    names = [name for name, _ in events]
    assert names[:2] == ["tool_call", "tool_result"]
    assert events[0][1]["name"] == "get_current_directory"
    assert events[1][1]["result"]["status"] == "success"
    assert names[-1] == "done"
    tools_used = events[-1][1]["tools_used"]
    assert tools_used[0] == "get_current_directory()"
    assert len(tools_used) == names.count("tool_call") == names.count("tool_result")


def test_a_message_too_long_for_the_context_is_a_400(gateway: GatewayProcess) -> None:
    reply = requests.post(
        f"{gateway.url}/chat",
        json={
            "messages": [{"role": "user", "content": "word " * 6000}],
            "conversation_id": "too-long",
            "max_tokens": 16,
        },
        timeout=60,
    )
    assert reply.status_code == 400
    assert "newest message" in reply.json()["detail"]


def test_history_is_trimmed_loudly_to_the_token_budget(make_gateway) -> None:  # type: ignore[no-untyped-def]
    server: GatewayProcess = make_gateway({"MAX_CONVERSATION_TOKENS": "300"})
    for turn in range(4):
        last = chat(server, f"Turn {turn}: tell me about the number {turn} " + "please " * 40, "t")
    assert last["trimmed_messages"] > 0
    # What was sent fits the budget (plus the chat template's few tokens per message)...
    sent_messages = 7 - last["trimmed_messages"]  # 3 earlier turns and the new message
    assert last["tokens_input"] <= 300 + 8 * (sent_messages + 1), last
    # ...and nothing was deleted from the stored history.
    assert len(history(server, "t")) == 8


def test_conversations_survive_a_gateway_restart(make_gateway) -> None:  # type: ignore[no-untyped-def]
    server: GatewayProcess = make_gateway()
    chat(server, "Remember the word pineapple.", "persist")
    server.stop()
    server.start()
    listed = requests.get(f"{server.url}/conversations", timeout=5).json()["conversations"]
    assert "persist" in [c["id"] for c in listed]
    again = chat(server, "What word?", "persist")
    assert again["tokens_input"] > 20
    stored = history(server, "persist")
    assert len(stored) == 4
    assert requests.delete(f"{server.url}/conversations/persist", timeout=5).status_code == 200
    assert requests.get(f"{server.url}/conversations/persist", timeout=5).status_code == 404


def test_the_openai_sdk_chats_and_streams_through_the_gateway(gateway: GatewayProcess) -> None:
    client = OpenAI(base_url=f"{gateway.url}/v1", api_key="not-needed")
    models = client.models.list()
    assert models.data
    reply = client.chat.completions.create(
        model="smollm2-135m", messages=[{"role": "user", "content": "Say hello"}], max_tokens=8
    )
    assert reply.choices[0].message.content
    assert reply.usage is not None and reply.usage.completion_tokens > 0
    pieces = [
        chunk.choices[0].delta.content or ""
        for chunk in client.chat.completions.create(
            model="smollm2-135m",
            messages=[{"role": "user", "content": "Count from one to five"}],
            max_tokens=16,
            stream=True,
        )
        if chunk.choices
    ]
    assert len([p for p in pieces if p]) > 3
    completion = client.completions.create(model="smollm2-135m", prompt="The sky is", max_tokens=4)
    assert completion.choices[0].text


def test_requests_past_the_queue_are_turned_away_with_retry_after(make_gateway) -> None:  # type: ignore[no-untyped-def]
    server: GatewayProcess = make_gateway({"AILAB_PARALLEL": "1", "AILAB_QUEUE_LIMIT": "1"})
    statuses: list[int] = []
    headers: list[str | None] = []

    def one(index: int) -> None:
        reply = requests.post(
            f"{server.url}/chat",
            json={
                "messages": [{"role": "user", "content": "Tell a long story."}],
                "conversation_id": f"q{index}",
                "max_tokens": 64,
            },
            timeout=120,
        )
        statuses.append(reply.status_code)
        headers.append(reply.headers.get("Retry-After"))

    threads = [threading.Thread(target=one, args=(i,)) for i in range(5)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert statuses.count(200) >= 2
    assert 429 in statuses
    assert headers[statuses.index(429)] == "1"


def test_a_request_during_a_model_switch_waits_and_is_served_by_the_new_model(make_gateway) -> None:  # type: ignore[no-untyped-def]
    server: GatewayProcess = make_gateway()
    results: dict[str, int] = {}

    def switch() -> None:
        reply = requests.post(
            f"{server.url}/model/switch", json={"model_key": "gemma3-270m"}, timeout=120
        )
        results["switch"] = reply.status_code

    switcher = threading.Thread(target=switch)
    switcher.start()
    # Send the chat only once the switch is under way (health no longer "ok").
    for _ in range(2000):
        if requests.get(f"{server.url}/health", timeout=5).json()["status"] != "ok":
            break
        time.sleep(0.002)
    else:
        raise AssertionError("the switch never showed on /health")
    reply = requests.post(
        f"{server.url}/chat",
        json={"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 4},
        timeout=120,
    )
    switcher.join()
    assert results["switch"] == 200
    assert reply.status_code == 200
    assert reply.json()["model_key"] == "gemma3-270m"


def test_commands_get_and_set_server_state(gateway: GatewayProcess) -> None:
    def command(name: str, value: str | None = None, conversation: str = "default") -> dict:
        reply = requests.post(
            f"{gateway.url}/command",
            json={"command": name, "value": value, "conversation_id": conversation},
            timeout=120,
        )
        assert reply.status_code == 200, reply.text
        return reply.json()

    assert command("system", "You are terse.")["value"] == "You are terse."
    assert command("system")["value"] == "You are terse."
    assert command("tools", "off")["value"] is False
    assert command("tools", "on")["value"] is True
    assert command("layers")["value"] == -1
    assert command("mem")["value"]["gateway_rss_mb"] > 0
    chat(gateway, "Hello there", "cmd")
    assert command("history", conversation="cmd")["value"]["messages"] == 2
    command("reset", conversation="cmd")
    assert command("history", conversation="cmd")["value"]["messages"] == 0
    assert command("model")["value"] == "smollm2-135m"
    workspace = str(gateway.data_dir / "workspace")
    assert command("roots", workspace)["value"] == [workspace]
    refused = requests.post(
        f"{gateway.url}/command", json={"command": "roots", "value": "/etc"}, timeout=5
    )
    assert refused.status_code == 400
    bad = requests.post(
        f"{gateway.url}/command", json={"command": "layers", "value": "many"}, timeout=5
    )
    assert bad.status_code == 400 and "integer" in bad.json()["detail"]
    unknown = requests.post(f"{gateway.url}/command", json={"command": "dance"}, timeout=5)
    assert unknown.status_code == 400 and "system" in unknown.json()["detail"]


def test_ctx_command_restarts_llama_server_with_the_new_size(make_gateway) -> None:  # type: ignore[no-untyped-def]
    server: GatewayProcess = make_gateway()
    reply = requests.post(
        f"{server.url}/command", json={"command": "ctx", "value": "2048"}, timeout=120
    )
    assert reply.status_code == 200 and reply.json()["value"] == 2048
    health = requests.get(f"{server.url}/health", timeout=5).json()
    assert (health["status"], health["n_ctx"]) == ("ok", 2048)


def test_abandoned_openai_streams_give_their_queue_place_back(make_gateway) -> None:  # type: ignore[no-untyped-def]
    server: GatewayProcess = make_gateway({"AILAB_PARALLEL": "1", "AILAB_QUEUE_LIMIT": "1"})
    for _ in range(4):
        with requests.post(
            f"{server.url}/v1/chat/completions",
            json={
                "messages": [{"role": "user", "content": "Tell a long story."}],
                "max_tokens": 64,
                "stream": True,
            },
            stream=True,
            timeout=60,
        ) as reply:
            assert reply.status_code == 200
            next(reply.iter_lines())
    after = requests.post(
        f"{server.url}/v1/chat/completions",
        json={"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2},
        timeout=60,
    )
    assert after.status_code == 200


def test_two_requests_on_one_conversation_are_answered_one_after_the_other(
    gateway: GatewayProcess,
) -> None:
    threads = [
        threading.Thread(target=chat, args=(gateway, f"Question {n}", "serial")) for n in (1, 2)
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    stored = history(gateway, "serial")
    assert [m["role"] for m in stored] == ["user", "assistant", "user", "assistant"]


def test_a_stopped_stream_keeps_the_partial_answer_in_the_history(gateway: GatewayProcess) -> None:
    with stream_chat(gateway, "Tell me a very long story.", "stopped", max_tokens=400) as reply:
        for line in reply.iter_lines(decode_unicode=True):
            if line.startswith("data:") and '"content"' in line:
                break
    stored: list[dict] = []
    for _ in range(200):  # the turn is committed just after the client hangs up
        reply = requests.get(f"{gateway.url}/conversations/stopped", timeout=5)
        stored = reply.json().get("messages", []) if reply.status_code == 200 else []
        if len(stored) == 2:
            break
        time.sleep(0.1)
    assert [m["role"] for m in stored] == ["user", "assistant"]
    assert stored[1]["content"]


def _forced_delete(server: GatewayProcess, conversation: str) -> dict:
    """Ask the real model, forced to call delete_file, to delete notes.txt."""
    return chat(
        server,
        "Delete the file notes.txt",
        conversation,
        enable_tools=True,
        tool_choice={"type": "function", "function": {"name": "delete_file"}},
    )


def _decide(server: GatewayProcess, conversation: str, approval_id: str, approve: bool) -> dict:
    reply = requests.post(
        f"{server.url}/chat/approve",
        json={"conversation_id": conversation, "approval_id": approval_id, "approve": approve},
        timeout=120,
    )
    assert reply.status_code == 200, reply.text
    return reply.json()


def test_a_real_destructive_call_waits_for_approval_and_runs_when_approved(
    gateway: GatewayProcess,
) -> None:
    notes = gateway.data_dir / "workspace" / "notes.txt"
    notes.write_text("keep me?")
    first = _forced_delete(gateway, "approve-real")
    pending = first["pending_approval"]
    assert pending is not None, (first, history(gateway, "approve-real"))
    assert pending["tool"] == "delete_file"
    assert notes.exists()  # nothing ran before the decision
    _decide(gateway, "approve-real", pending["approval_id"], approve=True)
    results = [m for m in history(gateway, "approve-real") if m["role"] == "tool"]
    assert len(results) == 1
    assert ('"status": "success"' in results[0]["content"]) != notes.exists()


def test_a_real_destructive_call_declined_leaves_the_file_untouched(
    gateway: GatewayProcess,
) -> None:
    notes = gateway.data_dir / "workspace" / "notes.txt"
    notes.write_text("keep me")
    pending = _forced_delete(gateway, "decline-real")["pending_approval"]
    assert pending["tool"] == "delete_file"
    _decide(gateway, "decline-real", pending["approval_id"], approve=False)
    assert notes.read_text() == "keep me"
    results = [m for m in history(gateway, "decline-real") if m["role"] == "tool"]
    assert len(results) == 1 and "declined" in results[0]["content"]
