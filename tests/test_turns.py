"""The turn rule against the real llama-server: what a rejected, stopped, concurrent,
regenerated or deleted turn leaves in the conversation."""

from __future__ import annotations

import json
import threading

import requests
from conftest import GatewayProcess, wait_for
from test_chat import chat, history, sse_events, stream_chat

TOO_LONG = "word " * 6000  # more than the 4096-token context


def post_chat(server: GatewayProcess, text: str, conversation: str, **extra: object):  # type: ignore[no-untyped-def]
    body = {
        "messages": [{"role": "user", "content": text}],
        "conversation_id": conversation,
        "max_tokens": 16,
        **extra,
    }
    return requests.post(f"{server.url}/chat", json=body, timeout=120)


def stored_or_none(server: GatewayProcess, conversation: str) -> list[dict] | None:
    reply = requests.get(f"{server.url}/conversations/{conversation}", timeout=5)
    return reply.json()["messages"] if reply.status_code == 200 else None


def export(server: GatewayProcess, conversation: str, **params: str) -> str:
    reply = requests.get(
        f"{server.url}/conversations/{conversation}/export",
        params={"format": "jsonl", **params},
        timeout=10,
    )
    assert reply.status_code == 200, reply.text
    return reply.text


# --- rejected before generation: nothing stored -------------------------------------------


def test_a_message_too_long_stores_nothing_and_the_retry_of_a_shorter_one_works(
    gateway: GatewayProcess,
) -> None:
    chat(gateway, "Hello", "overflow")
    for _ in range(2):  # the same request again is rejected the same way
        rejected = post_chat(gateway, TOO_LONG, "overflow")
        assert rejected.status_code == 400
        assert "newest message" in rejected.json()["detail"]
        assert [m["role"] for m in history(gateway, "overflow")] == ["user", "assistant"]
    chat(gateway, "Say yes.", "overflow")
    roles = [m["role"] for m in history(gateway, "overflow")]
    assert roles == ["user", "assistant", "user", "assistant"]


def test_a_streamed_request_that_cannot_fit_is_a_400_before_the_stream(
    gateway: GatewayProcess,
) -> None:
    with stream_chat(gateway, TOO_LONG, "overflow-stream", max_tokens=16) as reply:
        assert reply.status_code == 400
        assert reply.headers["content-type"].startswith("application/json")
        assert "newest message" in reply.json()["detail"]
    assert stored_or_none(gateway, "overflow-stream") is None


def test_a_forced_unknown_tool_is_rejected_before_anything_is_stored(
    gateway: GatewayProcess,
) -> None:
    choice = {"type": "function", "function": {"name": "nuke"}}
    reply = post_chat(gateway, "Hi", "unknown-tool", enable_tools=True, tool_choice=choice)
    assert reply.status_code == 400 and "nuke" in reply.json()["detail"]
    assert stored_or_none(gateway, "unknown-tool") is None


# --- stopped after output began: kept, marked interrupted ----------------------------------


def test_a_client_that_goes_away_leaves_a_marked_answer_out_of_the_export(
    gateway: GatewayProcess,
) -> None:
    chat(gateway, "Say hello.", "gone")
    with stream_chat(gateway, "Tell me a very long story.", "gone", max_tokens=400) as reply:
        for line in reply.iter_lines(decode_unicode=True):
            if line.startswith("data:") and '"content"' in line:
                break
    stored = wait_for(lambda: len(history(gateway, "gone")) == 4 and history(gateway, "gone"))
    assert [m["role"] for m in stored] == ["user", "assistant", "user", "assistant"]
    assert stored[3]["interrupted"] is True and stored[3]["content"]
    assert "interrupted" not in stored[1]
    records = [json.loads(line) for line in export(gateway, "gone").splitlines()]
    assert [m["role"] for m in records[0]["messages"]] == ["system", "user", "assistant"]
    asked = [json.loads(line) for line in export(gateway, "gone", interrupted="true").splitlines()]
    assert len(asked[0]["messages"]) == 5
    # The next turn is an ordinary one.
    chat(gateway, "Shorter, please.", "gone")
    assert [m["role"] for m in history(gateway, "gone")][-2:] == ["user", "assistant"]


# --- the system prompt ----------------------------------------------------------------------


def test_a_conversation_keeps_its_system_prompt_and_exports_it_as_used(
    gateway: GatewayProcess,
) -> None:
    chat(gateway, "Hello", "pirate", system_prompt="You are a pirate.")
    chat(gateway, "And now?", "pirate")  # no prompt: the conversation's own stays
    reply = requests.get(f"{gateway.url}/conversations/pirate", timeout=5).json()
    assert reply["system_prompt"] == "You are a pirate."
    record = json.loads(export(gateway, "pirate"))
    assert record["messages"][0] == {"role": "system", "content": "You are a pirate."}
    assert len(record["messages"]) == 5


def test_a_conversation_without_its_own_prompt_records_the_default_it_used(
    gateway: GatewayProcess,
) -> None:
    chat(gateway, "Hello", "default-prompt")
    reply = requests.get(f"{gateway.url}/conversations/default-prompt", timeout=5).json()
    default = requests.post(f"{gateway.url}/command", json={"command": "system"}, timeout=5).json()[
        "value"
    ]
    assert reply["system_prompt"] == default


# --- concurrency ------------------------------------------------------------------------------


def test_a_second_turn_sent_during_a_stream_waits_and_sees_the_first(
    gateway: GatewayProcess,
) -> None:
    second: dict[str, requests.Response] = {}
    with stream_chat(gateway, "Count to ten.", "busy", max_tokens=48) as reply:
        lines = reply.iter_lines(decode_unicode=True)
        next(line for line in lines if line.startswith("event: delta"))
        sender = threading.Thread(
            target=lambda: second.update(reply=post_chat(gateway, "Thanks!", "busy"))
        )
        sender.start()
        rest = list(lines)
    sender.join()
    assert any(line == "event: done" for line in rest)
    assert second["reply"].status_code == 200
    assert second["reply"].json()["tokens_input"] > 20
    roles = [m["role"] for m in history(gateway, "busy")]
    assert roles == ["user", "assistant", "user", "assistant"]


def test_deleting_a_conversation_during_a_turn_stops_it_and_it_stays_deleted(
    gateway: GatewayProcess,
) -> None:
    chat(gateway, "Hello", "doomed")
    with stream_chat(gateway, "Tell me a very long story.", "doomed", max_tokens=400) as reply:
        lines = reply.iter_lines(decode_unicode=True)
        next(line for line in lines if line.startswith("event: delta"))
        deleted = requests.delete(f"{gateway.url}/conversations/doomed", timeout=30)
        tail = list(lines)
    assert deleted.status_code == 200
    errors = [json.loads(line[5:]) for line in tail if line.startswith("data:") and "error" in line]
    assert errors and "deleted" in errors[-1]["error"]
    assert stored_or_none(gateway, "doomed") is None


def test_reset_waits_for_the_running_turn_then_empties_the_conversation(
    gateway: GatewayProcess,
) -> None:
    outcome: dict[str, requests.Response] = {}
    with stream_chat(gateway, "Count to twenty.", "to-reset", max_tokens=48) as reply:
        lines = reply.iter_lines(decode_unicode=True)
        next(line for line in lines if line.startswith("event: delta"))
        resetter = threading.Thread(
            target=lambda: outcome.update(
                reset=requests.post(
                    f"{gateway.url}/command",
                    json={"command": "reset", "conversation_id": "to-reset"},
                    timeout=60,
                )
            )
        )
        resetter.start()
        rest = list(lines)
    resetter.join()
    assert "event: done" in rest
    assert outcome["reset"].status_code == 200
    assert history(gateway, "to-reset") == []


# --- regenerate -----------------------------------------------------------------------------


def regenerate(server: GatewayProcess, conversation: str, **options: object) -> requests.Response:
    return requests.post(
        f"{server.url}/conversations/{conversation}/regenerate",
        json={"max_tokens": 16, **options},
        timeout=120,
    )


def test_regenerate_replaces_the_last_answer(gateway: GatewayProcess) -> None:
    chat(gateway, "Name a colour.", "again")
    chat(gateway, "Name a fruit.", "again")
    before = history(gateway, "again")
    reply = regenerate(gateway, "again", temperature=1.5)
    assert reply.status_code == 200, reply.text
    after = history(gateway, "again")
    assert [m["role"] for m in after] == ["user", "assistant", "user", "assistant"]
    assert after[:3] == before[:3]
    assert after[3]["content"] == reply.json()["response"]


def test_regenerate_streams_like_chat(gateway: GatewayProcess) -> None:
    chat(gateway, "Name a colour.", "again-stream")
    with requests.post(
        f"{gateway.url}/conversations/again-stream/regenerate",
        json={"max_tokens": 16, "stream": True},
        stream=True,
        timeout=120,
    ) as reply:
        events = sse_events(reply)
    assert events[-1][0] == "done"
    deltas = "".join(data["content"] for name, data in events if name == "delta")
    stored = history(gateway, "again-stream")
    assert [m["role"] for m in stored] == ["user", "assistant"]
    assert stored[1]["content"] == deltas == events[-1][1]["response"]


def test_regenerate_needs_a_conversation_with_a_message(gateway: GatewayProcess) -> None:
    missing = regenerate(gateway, "never-was")
    assert missing.status_code == 404 and "never-was" in missing.json()["detail"]
    chat(gateway, "Hello", "emptied")
    requests.post(
        f"{gateway.url}/chat", json={"messages": [], "conversation_id": "emptied"}, timeout=30
    )
    empty = regenerate(gateway, "emptied")
    assert empty.status_code == 400 and "no message" in empty.json()["detail"]


# --- streamed requests are admitted before the stream starts -------------------------------


def test_a_streamed_request_past_the_queue_gets_429_with_retry_after(make_gateway) -> None:  # type: ignore[no-untyped-def]
    server: GatewayProcess = make_gateway({"AILAB_PARALLEL": "1", "AILAB_QUEUE_LIMIT": "1"})
    # A 200 means admitted: the place is held until the stream ends.
    with (
        stream_chat(server, "Tell a long story.", "q1", max_tokens=200) as first,
        stream_chat(server, "Tell a long story.", "q2", max_tokens=200) as second,
    ):
        assert (first.status_code, second.status_code) == (200, 200)
        with stream_chat(server, "Hi", "q3", max_tokens=4) as third:
            assert third.status_code == 429
            assert third.headers["Retry-After"] == "1"
            assert "busy" in third.json()["detail"]
    assert stored_or_none(server, "q3") is None


def test_a_streamed_request_without_a_model_gets_503_with_the_reason(
    make_gateway, tmp_path
) -> None:  # type: ignore[no-untyped-def]
    extra = tmp_path / "extra.json"
    extra.write_text(json.dumps({"ghost": {"filename": "ghost.gguf"}}))
    server: GatewayProcess = make_gateway(
        {"AILAB_EXTRA_MODELS": str(extra), "AILAB_DEFAULT_MODEL": "ghost"}, wait=False
    )
    wait_for(lambda: _health(server).get("status") == "error")
    with stream_chat(server, "Hi", "down", max_tokens=4) as reply:
        assert reply.status_code == 503
        assert "ghost.gguf" in reply.json()["detail"]
    assert stored_or_none(server, "down") is None


def _health(server: GatewayProcess) -> dict:
    try:
        return requests.get(f"{server.url}/health", timeout=2).json()
    except requests.ConnectionError:
        return {}
