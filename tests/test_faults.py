"""Faults with real processes: llama-server and the gateway killed mid-turn, a database
that cannot be opened or written. After each, the turn rule holds and the next turn works.
"""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import requests
from conftest import PROJECT_DIR, GatewayProcess, llama_server_busy, wait_for
from test_chat import chat, history, stream_chat

FORCED = {"type": "function", "function": {"name": "get_current_directory"}}


def kill_llama(server: GatewayProcess) -> int:
    pid = requests.get(f"{server.url}/health", timeout=5).json()["pid"]
    os.kill(pid, signal.SIGKILL)
    return int(pid)


def sse(lines: Iterator[str]) -> Iterator[tuple[str, dict]]:
    """(event, data) pairs from SSE lines, as they arrive."""
    name = None
    for line in lines:
        if line.startswith("event:"):
            name = line.split(":", 1)[1].strip()
        elif line.startswith("data:") and name:
            yield name, json.loads(line.split(":", 1)[1])


def restarted(server: GatewayProcess, killed: int) -> bool:
    health = requests.get(f"{server.url}/health", timeout=5).json()
    return health["status"] == "ok" and health["pid"] not in (None, killed)


def assert_next_turn_works(server: GatewayProcess, conversation: str, killed: int = 0) -> None:
    """After llama-server's restart, the conversation continues with a valid history."""
    wait_for(lambda: restarted(server, killed), timeout=120)
    before = len(history(server, conversation) if stored(server, conversation) else [])
    chat(server, "Say OK.", conversation, max_tokens=8)
    roles = [m["role"] for m in history(server, conversation)]
    assert len(roles) == before + 2 and roles[-2:] == ["user", "assistant"]


def stored(server: GatewayProcess, conversation: str) -> bool:
    reply = requests.get(f"{server.url}/conversations/{conversation}", timeout=5)
    return reply.status_code == 200


def assert_every_call_answered(messages: list[dict]) -> None:
    calls = [c["id"] for m in messages for c in m.get("tool_calls") or []]
    answered = [m["tool_call_id"] for m in messages if m["role"] == "tool"]
    assert sorted(calls) == sorted(answered)


# --- llama-server killed ---------------------------------------------------------------------


def test_llama_server_killed_while_reading_the_prompt_stores_nothing(make_gateway) -> None:  # type: ignore[no-untyped-def]
    server: GatewayProcess = make_gateway()
    prompt = "Summarise this. " + "The quick brown fox jumps over the lazy dog. " * 300
    with stream_chat(server, prompt, "prompt-kill", max_tokens=16) as reply:
        assert reply.status_code == 200
        wait_for(lambda: llama_server_busy(server), timeout=30, interval=0.02)
        killed = kill_llama(server)
        events = list(sse(reply.iter_lines(decode_unicode=True)))
    assert [name for name, _ in events] == ["error"]
    assert "llama-server" in events[0][1]["error"]
    assert not stored(server, "prompt-kill")
    assert_next_turn_works(server, "prompt-kill", killed)


def test_llama_server_killed_mid_stream_keeps_what_was_streamed(make_gateway) -> None:  # type: ignore[no-untyped-def]
    server: GatewayProcess = make_gateway()
    chat(server, "Hello", "stream-kill")
    deltas: list[str] = []
    with stream_chat(server, "Tell me a very long story.", "stream-kill", max_tokens=400) as reply:
        events = sse(reply.iter_lines(decode_unicode=True))
        for name, data in events:
            assert name == "delta"
            deltas.append(data["content"])
            if len(deltas) == 3:
                killed = kill_llama(server)
                break
        rest = list(events)
    deltas += [data["content"] for name, data in rest if name == "delta"]
    assert rest[-1][0] == "error"
    messages = history(server, "stream-kill")
    assert [m["role"] for m in messages] == ["user", "assistant", "user", "assistant"]
    assert messages[3] == {"role": "assistant", "content": "".join(deltas), "interrupted": True}
    assert_next_turn_works(server, "stream-kill", killed)


def test_llama_server_killed_between_tool_iterations_keeps_the_answered_call(
    make_gateway,
) -> None:  # type: ignore[no-untyped-def]
    server: GatewayProcess = make_gateway()
    with stream_chat(
        server, "Where are you?", "tool-kill", enable_tools=True, tool_choice=FORCED
    ) as reply:
        events = sse(reply.iter_lines(decode_unicode=True))
        for name, _ in events:
            if name == "tool_result":
                killed = kill_llama(server)
                break
        rest = list(events)
    assert rest[-1][0] == "error"
    messages = history(server, "tool-kill")
    assert [m["role"] for m in messages][:3] == ["user", "assistant", "tool"]
    assert '"status": "success"' in messages[2]["content"]
    assert_every_call_answered(messages)
    assert messages[-1]["interrupted"] is True
    assert_next_turn_works(server, "tool-kill", killed)


# --- the gateway killed ------------------------------------------------------------------------


def test_a_gateway_killed_mid_turn_restarts_with_its_completed_turns_intact(
    make_gateway,
) -> None:  # type: ignore[no-untyped-def]
    server: GatewayProcess = make_gateway()
    chat(server, "Remember the word pineapple.", "crash")
    completed = history(server, "crash")
    with stream_chat(
        server, "Where are you?", "crash", enable_tools=True, tool_choice=FORCED
    ) as reply:
        for name, _ in sse(reply.iter_lines(decode_unicode=True)):
            if name == "tool_result":
                assert server.process is not None
                server.process.kill()
                server.process.wait()
                break
    server.start()  # same data directory; the orphaned llama-server is cleaned up
    assert history(server, "crash") == completed
    audit = requests.get(f"{server.url}/tools/audit", timeout=5).json()["records"]
    assert [(r["tool"], r["status"]) for r in audit] == [("get_current_directory", "success")]
    with sqlite3.connect(server.data_dir / "ailab.sqlite3") as db:
        assert db.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    assert_next_turn_works(server, "crash")


# --- the database -------------------------------------------------------------------------------


def start_gateway_expecting_failure(data_dir: Path, binary: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "AILAB_DATA_DIR": str(data_dir), "LLAMA_SERVER_PATH": str(binary)}
    return subprocess.run(
        [sys.executable, str(PROJECT_DIR / "ai_server.py")],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_a_damaged_database_stops_start_up_with_a_message_naming_it(
    tmp_path: Path, llama_server_binary: Path
) -> None:
    (tmp_path / "ailab.sqlite3").write_bytes(b"not a database at all " * 200)
    done = start_gateway_expecting_failure(tmp_path, llama_server_binary)
    assert done.returncode == 2
    assert str(tmp_path / "ailab.sqlite3") in done.stderr and "damaged" in done.stderr
    assert "Traceback" not in done.stderr


def test_a_data_directory_that_cannot_be_written_stops_start_up_clearly(
    llama_server_binary: Path,
) -> None:
    done = start_gateway_expecting_failure(Path("/proc/ailab-data"), llama_server_binary)
    assert done.returncode == 2
    assert "/proc/ailab-data" in done.stderr and "writable" in done.stderr
    assert "Traceback" not in done.stderr


def test_a_database_that_cannot_be_written_is_a_503_and_keeps_earlier_turns(
    make_gateway,
) -> None:  # type: ignore[no-untyped-def]
    server: GatewayProcess = make_gateway()
    chat(server, "Hello", "locked")
    before = history(server, "locked")
    # Another program holding the write lock: every write of the gateway fails.
    blocker = sqlite3.connect(server.data_dir / "ailab.sqlite3", isolation_level=None)
    blocker.execute("BEGIN EXCLUSIVE")
    try:
        reply = requests.post(
            f"{server.url}/chat",
            json={
                "messages": [{"role": "user", "content": "And now?"}],
                "conversation_id": "locked",
                "max_tokens": 8,
            },
            timeout=120,
        )
    finally:
        blocker.execute("ROLLBACK")
        blocker.close()
    assert reply.status_code == 503
    detail = reply.json()["detail"]
    assert "ailab.sqlite3" in detail and "locked" in detail
    assert history(server, "locked") == before
    assert_next_turn_works(server, "locked")
